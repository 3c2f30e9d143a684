"""Oxen normaliser, table-driven over recorded frames in tests/frames/oxen/, plus totality checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamd.events import REDACTED, Kind, Observation, Origin, State
from streamd.providers.oxen import normalise

FRAMES = sorted((Path(__file__).parent.parent / "frames" / "oxen").glob("*.json"))


def run_frame(frame: dict[str, Any]) -> list[Observation]:
    source = frame["source"]
    if source == "sse":
        return normalise.from_sse(frame["event"], frame["data"])
    if source == "item":
        return normalise.from_item(frame["payload"])
    if source == "list":
        return normalise.from_list(frame["payload"])
    if source == "enqueue":
        return normalise.from_enqueue(frame["payload"], model=frame.get("model"), prompt=frame.get("prompt"))
    if source == "sync":
        return normalise.from_sync(frame["job"], frame["payload"], model=frame.get("model"))
    raise AssertionError(f"unknown frame source {source}")


def test_frames_present() -> None:
    assert len(FRAMES) >= 20


@pytest.mark.parametrize("path", FRAMES, ids=[p.stem for p in FRAMES])
def test_frame(path: Path) -> None:
    frame = json.loads(path.read_text())
    observations = run_frame(frame)
    assert len(observations) == len(frame["expect"]), observations
    for obs, expect in zip(observations, frame["expect"], strict=True):
        assert obs.provider == "oxen"
        assert obs.kind is Kind(expect["kind"])
        for key, want in expect.items():
            if key == "kind":
                continue
            if key == "state":
                assert obs.state is State(want)
            elif key == "origin":
                assert obs.origin is Origin(want)
            elif key == "outputs":
                assert list(obs.outputs) == want
            elif key == "message_contains":
                assert obs.message is not None and want in obs.message
            elif key == "raw_redacted":
                for field in want:
                    assert obs.raw[field] == REDACTED
                assert "sk-should-not-leak" not in json.dumps(obs.raw)
                assert "t0k" not in json.dumps(obs.raw)
            elif key == "raw_max_len":
                assert len(json.dumps(obs.raw)) <= want
            else:
                assert getattr(obs, key) == want, (key, obs)
        if obs.kind is Kind.STATE:
            assert obs.state is not None
        else:
            assert obs.state is None


def test_raw_is_a_scrubbed_copy_of_the_whole_payload() -> None:
    item = {"generation_id": "g", "status": "queued", "seed": 7, "aspect_ratio": "1:1"}
    (obs,) = normalise.from_item(item)
    assert obs.raw == item and obs.raw is not item


def test_bytes_payload_accepted() -> None:
    (obs,) = normalise.from_item(b'{"generation_id":"g","status":"succeeded","result_url":"https://x/y.png"}')
    assert obs.state is State.COMPLETED and obs.outputs == ("https://x/y.png",)


def test_enqueued_ids_skip_diagnostics() -> None:
    obs = normalise.from_enqueue({"generations": [{"generation_id": "a", "status": "queued"}, {"status": "queued"}]})
    assert normalise.enqueued_ids(obs) == ["a"]
    assert [o.kind for o in obs] == [Kind.STATE, Kind.DIAGNOSTIC]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
oxenish = st.fixed_dictionaries(
    {},
    optional={
        "generation_id": json_values | st.just("g-1"),
        "status": json_values | st.sampled_from([*normalise.STATES, "expired", ""]),
        "model_name": json_values,
        "model": json_values,
        "result_url": json_values,
        "url": json_values,
        "error_message": json_values,
        "error": json_values,
        "enqueued_at": json_values,
        "started_at": json_values,
        "completed_at": json_values,
        "images": json_values,
        "generations": st.lists(json_values, max_size=3),
    },
)


@given(st.one_of(json_values, oxenish), st.sampled_from(["media_generation_completed", "other", ""]))
def test_total_on_any_payload(payload: Any, event: str) -> None:
    """Never raises, always says something, and a STATE observation always names its job and state."""
    text = json.dumps(payload)
    listed = normalise.from_list(payload)
    assert listed or payload.get("generations") == []  # only an empty list says nothing
    for observations in (
        normalise.from_sse(event, text),
        normalise.from_item(payload),
        listed,
        normalise.from_enqueue(payload),
        normalise.from_sync("sync-x", payload),
    ):
        assert observations or observations is listed
        for obs in observations:
            if obs.kind is Kind.STATE:
                assert obs.job and obs.state is not None
            json.dumps(obs.raw, default=str)
