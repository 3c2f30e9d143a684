"""The Wiro normaliser against recorded frames and Task/Detail records (tests/frames/wiro)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.events import Kind, Observation, Origin, State
from streamd.lifecycle import Tracker
from streamd.providers.wiro import normalise

FRAMES = Path(__file__).parent.parent / "frames" / "wiro"
TOKEN = "eDcCm5yyUfIvMFspTwww49OUfgXkQt"


def load(name: str) -> Any:
    return json.loads((FRAMES / f"{name}.json").read_text())


def detail(name: str) -> dict[str, Any]:
    task: dict[str, Any] = load(name)["tasklist"][0]
    return task


def assert_no_token(observations: list[Observation]) -> None:
    text = msgspec.json.encode(observations).decode()
    for secret in (TOKEN, "ZpYote30on42O4jjHXNiKmrWAZqbRE", "dFKlMApaSgMeHKsJyaDeKrefcHahUK"):
        assert secret not in text


# name → (kind, state, upstream)
TABLE: dict[str, tuple[Kind, State | None, str]] = {
    "task_queue": (Kind.STATE, State.QUEUED, "task_queue"),
    "task_accept": (Kind.STATE, State.ACCEPTED, "task_accept"),
    "task_assign": (Kind.STATE, State.ACCEPTED, "task_assign"),
    "task_preprocess_start": (Kind.STATE, State.PREPROCESSING, "task_preprocess_start"),
    "task_preprocess_end": (Kind.STATE, State.PREPROCESSING, "task_preprocess_end"),
    "task_start": (Kind.STATE, State.RUNNING, "task_start"),
    "task_end": (Kind.STATE, State.POSTPROCESSING, "task_end"),
    "task_postprocess_start": (Kind.STATE, State.POSTPROCESSING, "task_postprocess_start"),
    "task_cancel": (Kind.STATE, State.CANCELLED, "task_cancel"),
    "task_output_text": (Kind.LOG, None, "task_output"),
    "task_output_progress": (Kind.PROGRESS, None, "task_output"),
    "task_output_llm": (Kind.LOG, None, "task_output"),
    "task_error": (Kind.LOG, None, "task_error"),
    "task_output_full": (Kind.LOG, None, "task_output_full"),
    "task_output_full_llm": (Kind.LOG, None, "task_output_full"),
    "task_error_full": (Kind.LOG, None, "task_error_full"),
    "task_stream_ready": (Kind.LOG, None, "task_stream_ready"),
    "task_stream_end": (Kind.LOG, None, "task_stream_end"),
    "task_cost": (Kind.LOG, None, "task_cost"),
    "task_postprocess_end": (Kind.STATE, State.POSTPROCESSING, "task_postprocess_end"),  # no pexit yet
    "task_mystery": (Kind.DIAGNOSTIC, None, "task_mystery"),
    "error": (Kind.DIAGNOSTIC, None, "error"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_frame_type(name: str) -> None:
    kind, state, upstream = TABLE[name]
    observations = normalise.frame_observations(load(name))
    assert len(observations) == 1
    (obs,) = observations
    assert (obs.kind, obs.state, obs.upstream, obs.origin) == (kind, state, upstream, Origin.PUSH)
    assert obs.provider == "wiro"
    assert obs.job == (None if name == "error" else "534574")
    assert obs.raw is not None
    assert_no_token(observations)


def test_connected_is_a_control_frame() -> None:
    assert normalise.frame_observations(load("connected")) == []


def test_progress_object_becomes_percentage_and_step() -> None:
    (obs,) = normalise.frame_observations(load("task_output_progress"))
    assert obs.progress is not None
    assert obs.progress.percent == 45.0
    assert (obs.progress.step, obs.progress.steps) == (9, 20)
    assert obs.progress.eta == 6.0  # "00:06"


def test_text_and_llm_output_are_logs_with_text() -> None:
    (text,) = normalise.frame_observations(load("task_output_text"))
    assert text.message is not None and text.message.startswith("Loading pipeline components")
    (llm,) = normalise.frame_observations(load("task_output_llm"))
    assert llm.message == "A haiku about the sea"  # the accumulated answer, not the thinking
    (full,) = normalise.frame_observations(load("task_error_full"))
    assert full.message is not None and full.message.endswith("RuntimeError: CUDA out of memory")
    (cost,) = normalise.frame_observations(load("task_cost"))
    assert cost.cost == 0.0125


def test_postprocess_end_is_decided_by_pexit_from_detail() -> None:
    frame = load("task_postprocess_end")
    url = frame["message"][0]["url"]
    (done,) = normalise.frame_observations(frame, task=detail("detail_completed"))
    assert done.state is State.COMPLETED and done.outputs == (url,)
    assert done.model == "bytedance/seedream-v4" and done.cost == pytest.approx(0.00351)
    assert done.prompt == "A serene desert landscape at dusk"
    assert done.origin is Origin.PUSH
    (failed,) = normalise.frame_observations(load("task_postprocess_end_empty"), task=detail("detail_failed"))
    assert failed.state is State.FAILED
    assert failed.error == "RuntimeError: CUDA out of memory while decoding latents"
    # Detail still says running: no verdict, but the outputs are kept
    (pending,) = normalise.frame_observations(frame, task=detail("detail_running"))
    assert pending.state is State.POSTPROCESSING and pending.outputs == (url,)


def test_llm_postprocess_end_completes_with_the_answer() -> None:
    (obs,) = normalise.frame_observations(load("task_postprocess_end_llm"), task=detail("detail_completed"))
    assert obs.state is State.COMPLETED
    assert obs.message == "A haiku about the sea"


def test_frame_without_id_uses_the_job_hint() -> None:
    frame = load("task_start")
    del frame["id"]
    (obs,) = normalise.frame_observations(frame, job="77")
    assert obs.job == "77" and obs.state is State.RUNNING


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("detail_completed", State.COMPLETED),
        ("detail_failed", State.FAILED),
        ("detail_task_error", State.FAILED),
        ("detail_running", State.RUNNING),
        ("detail_cancelled_queued", State.CANCELLED),
    ],
)
def test_detail_status(name: str, state: State) -> None:
    observations = normalise.detail_observations(detail(name))
    final = observations[-1]
    assert final.state is state
    assert final.origin is Origin.POLL
    assert all(o.kind is Kind.STATE for o in observations)
    assert_no_token(observations)


def test_detail_task_error_is_terminal_failure_with_reason() -> None:
    final = normalise.detail_observations(detail("detail_task_error"))[-1]
    assert final.state is State.FAILED and final.upstream == "task_error"
    assert final.error == "Error: could not fetch input image: HTTP 404"


def test_detail_history_restores_missed_transitions_without_duplicates() -> None:
    """A poll after a long disconnect emits only what the subscriber has not seen, in order."""
    tracker = Tracker()
    for name in ("task_queue", "task_accept", "task_start"):
        for obs in normalise.frame_observations(load(name)):
            tracker.apply(obs, 0.0)
    events = [e for o in normalise.detail_observations(detail("detail_completed")) for e in tracker.apply(o, 1.0)]
    assert [(e.status, e.origin) for e in events] == [
        (State.POSTPROCESSING, Origin.POLL),
        (State.COMPLETED, Origin.POLL),
    ]
    assert events[-1].outputs and events[-1].cost == pytest.approx(0.00351)
    again = [e for o in normalise.detail_observations(detail("detail_completed")) for e in tracker.apply(o, 2.0)]
    assert again == []


def test_history_of_a_task_cancelled_in_the_queue() -> None:
    states = [o.state for o in normalise.detail_observations(detail("detail_cancelled_queued"))]
    assert states == [State.QUEUED, State.CANCELLED]  # never accepted: no times, no invented states


def test_running_detail_reports_no_cost_yet() -> None:
    assert normalise.detail_observations(detail("detail_running"))[-1].cost is None
    assert normalise.detail_observations(detail("detail_failed"))[-1].cost == 0.0


@pytest.mark.parametrize(
    "message",
    ["not json {", b"\x00\x01binary", "[1, 2]", "42", '{"type": 5}', '{"no": "type"}', "null", '"a string"'],
)
def test_unreadable_frames_become_one_diagnostic(message: str | bytes) -> None:
    observations = normalise.frame_observations(normalise.decode(message))
    assert [o.kind for o in observations] == [Kind.DIAGNOSTIC]


def test_unknown_detail_status_is_kept_as_diagnostic() -> None:
    task = detail("detail_running") | {"status": "task_teleport"}
    (obs,) = normalise.detail_observations(task)
    assert obs.kind is Kind.DIAGNOSTIC and obs.upstream == "task_teleport" and obs.job == "534574"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
KEYS = st.sampled_from(["type", "id", "message", "tasktoken", "status", "pexit", "outputs", "totalcost", "parameters"])
SHAPED = st.dictionaries(
    KEYS, JSON | st.sampled_from([*sorted(normalise.STATE_OF), "task_output", "task_postprocess_end"])
)


@settings(max_examples=300, deadline=None)
@given(frame=JSON | SHAPED, task=JSON | SHAPED)
def test_normaliser_is_total(frame: Any, task: Any) -> None:
    for observations in (
        normalise.frame_observations(frame, task=task),
        normalise.detail_observations(frame),
        normalise.detail_observations(task, history=True),
    ):
        assert isinstance(observations, list)
        msgspec.json.encode(observations)  # everything it produces can be journaled
