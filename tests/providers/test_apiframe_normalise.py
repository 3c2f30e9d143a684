"""Apiframe's pure parts: the normaliser against recorded payloads (tests/frames/apiframe/), and the
REST client's request building and error mapping. No I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.events import REDACTED, Kind, Observation, Origin, State
from streamd.lifecycle import Tracker
from streamd.providers.apiframe.client import build_body, error_for, idempotency_key, params_key, parse_ref
from streamd.providers.apiframe.normalise import (
    fingerprint,
    job_page,
    normalise_accepted,
    normalise_job,
    normalise_webhook,
    outputs_of,
    progress_of,
    time_of,
)
from streamd.providers.base import ProviderError, SubmitRequest

FRAMES = Path(__file__).parent.parent / "frames" / "apiframe"
JOB = "b2c3d4e5-f6a7-8901-bcde-f23456789012"
SDK_JOB = "00000000-0000-0000-0000-000000000abc"


def frame(name: str) -> Any:
    return json.loads((FRAMES / f"{name}.json").read_text())


def read(name: str, how: str) -> list[Observation]:
    payload = frame(name)
    if how == "accepted":
        return normalise_accepted(payload, model="seedream-4", prompt="a car")
    if how == "webhook":
        return normalise_webhook(payload)
    return normalise_job(payload, job=SDK_JOB if how == "hinted" else None)


@dataclass(frozen=True)
class Want:
    kinds: tuple[Kind, ...]
    state: State | None = None
    job: str | None = JOB
    upstream: str | None = None
    origin: Origin = Origin.POLL
    outputs: tuple[str, ...] = ()
    cost: float | None = None
    error: str | None = None
    percent: float | None = None
    model: str | None = None
    prompt: str | None = None
    at: float | None = None
    message: tuple[str, ...] = field(default_factory=tuple)  # substrings of the last observation's message


CDN = "https://cdn2.apiframe.ai/jobs/b2c3d4e5"
CASES: list[tuple[str, str, Want]] = [
    (
        "accepted",
        "accepted",
        Want((Kind.STATE,), State.QUEUED, upstream="QUEUED", origin=Origin.REQUEST, model="seedream-4", prompt="a car"),
    ),
    ("accepted-replay-completed", "accepted", Want((Kind.LOG,), origin=Origin.REQUEST, message=("already COMPLETED",))),
    (
        "queued",
        "job",
        Want(
            (Kind.STATE,),
            State.QUEUED,
            upstream="QUEUED",
            model="seedream-4",
            prompt="a sleek silver sports car on a coastal highway at sunset, hyper-realistic",
            at=1777593600.0,
        ),
    ),
    ("processing-45", "job", Want((Kind.STATE, Kind.PROGRESS), State.RUNNING, upstream="PROCESSING", percent=45.0)),
    ("processing-no-progress", "job", Want((Kind.STATE,), State.RUNNING, job=SDK_JOB, model="m")),
    (
        "completed-images",
        "job",
        Want(
            (Kind.STATE,),
            State.COMPLETED,
            upstream="COMPLETED",
            outputs=(f"{CDN}/0.jpg", f"{CDN}/1.jpg"),  # gridUrl is a collage of these, not an output
            cost=3.0,
            at=1777593612.0,
        ),
    ),
    (
        "completed-legacy-string",
        "job",
        Want(
            (Kind.STATE,), State.COMPLETED, job=SDK_JOB, outputs=("https://cdn/x.png",), cost=16.0, model="midjourney"
        ),
    ),
    (
        "completed-expired",
        "job",
        Want(
            (Kind.STATE, Kind.EXPIRED),
            State.COMPLETED,
            outputs=(f"{CDN}/0.jpg",),
            cost=3.0,
            message=("expired",),
        ),
    ),
    (
        "completed-video",
        "job",
        Want(
            (Kind.STATE,),
            State.COMPLETED,
            job="c3d4e5f6-a7b8-9012-cdef-345678901234",
            outputs=("https://cdn2.apiframe.ai/jobs/c3d4e5f6/video.mp4",),
            cost=40.0,
        ),
    ),
    (
        "completed-unreadable-result",
        "job",
        Want(
            (Kind.STATE, Kind.DIAGNOSTIC),
            State.COMPLETED,
            job="c3d4e5f6-a7b8-9012-cdef-345678901234",
            cost=3.0,
            message=("cannot read", "42"),
        ),
    ),
    ("failed", "job", Want((Kind.STATE,), State.FAILED, job=SDK_JOB, error="Provider returned 500", cost=0.0)),
    ("cancelled", "job", Want((Kind.STATE,), State.CANCELLED, job=SDK_JOB, cost=0.0, upstream="CANCELLED")),
    ("unknown-status", "job", Want((Kind.DIAGNOSTIC,), job=SDK_JOB, upstream="RETRYING", message=("RETRYING",))),
    ("missing-status", "job", Want((Kind.DIAGNOSTIC,), job=SDK_JOB, message=("without a status",))),
    ("not-an-object", "hinted", Want((Kind.DIAGNOSTIC,), job=SDK_JOB, message=("list",))),
    ("not-an-object", "job", Want((Kind.DIAGNOSTIC,), job=None)),
    (
        "webhook-progress",
        "webhook",
        Want((Kind.STATE, Kind.PROGRESS), State.RUNNING, origin=Origin.PUSH, percent=45.0),
    ),
    (
        "webhook-completed",
        "webhook",
        Want((Kind.STATE,), State.COMPLETED, origin=Origin.PUSH, outputs=(f"{CDN}/0.jpg",), cost=3.0),
    ),
    (
        "webhook-failed",
        "webhook",
        Want((Kind.STATE,), State.FAILED, origin=Origin.PUSH, error="content policy: prompt rejected by safety filter"),
    ),
]


@pytest.mark.parametrize(("name", "how", "want"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_recorded_payloads(name: str, how: str, want: Want) -> None:
    out = read(name, how)
    assert tuple(o.kind for o in out) == want.kinds
    assert all(o.provider == "apiframe" and o.job == want.job and o.origin is want.origin for o in out)
    first = out[0]
    assert first.state is want.state
    if want.upstream is not None:
        assert first.upstream == want.upstream
    assert first.outputs == want.outputs
    assert first.cost == want.cost
    assert first.error == want.error
    if want.model is not None:
        assert first.model == want.model
    if want.prompt is not None:
        assert first.prompt == want.prompt
    if want.at is not None:
        assert first.at == want.at
    progress = [o.progress.percent for o in out if o.kind is Kind.PROGRESS and o.progress]
    assert progress == ([want.percent] if want.percent is not None else [])
    for text in want.message:
        assert text in (out[-1].message or "")
    assert all(o.raw is not None for o in out)  # the payload is kept


def test_expired_observation_names_the_dead_urls() -> None:
    expired = [o for o in read("completed-expired", "job") if o.kind is Kind.EXPIRED]
    assert len(expired) == 1
    assert expired[0].outputs == (f"{CDN}/0.jpg",) and expired[0].upstream == "expired"


def test_secrets_are_scrubbed_from_raw() -> None:
    (obs,) = read("secret-in-payload", "job")
    text = json.dumps(obs.raw)
    assert "afk_leaked_key" not in text
    assert obs.raw["input"]["apiKey"] == REDACTED and obs.raw["input"]["headers"]["X-API-Key"] == REDACTED
    assert obs.prompt == "a cat"


def test_a_tracker_sees_one_clean_lifecycle_from_repeated_polls() -> None:
    """Polls repeat themselves; the observations must let the tracker drop the repeats."""
    tracker = Tracker()
    seq = ["queued", "queued", "processing-45", "processing-45", "completed-images", "completed-images"]
    events = [e for name in seq for obs in read(name, "job") for e in tracker.apply(obs, 0.0)]
    states = [e.status for e in events if e.kind is Kind.STATE]
    assert states == [State.QUEUED, State.RUNNING, State.COMPLETED]
    assert [e.progress.percent for e in events if e.kind is Kind.PROGRESS and e.progress] == [45.0]
    done = tracker.get("apiframe", JOB)
    assert done is not None and done.cost == 3.0 and len(done.outputs) == 2
    assert done.progress is not None and done.progress.percent == 100.0


@pytest.mark.parametrize(
    ("value", "want"),
    [
        *[(45, 45.0), (45.5, 45.5), ("45", 45.0), ("45%", 45.0), (-3, 0.0), (250, 100.0)],
        *[(None, None), (True, None), ("soon", None), (float("nan"), None), ({"p": 1}, None)],
    ],
)
def test_progress_values(value: Any, want: float | None) -> None:
    assert progress_of(value) == want


@pytest.mark.parametrize(
    ("result", "urls", "understood"),
    [
        (None, (), True),
        ("https://x/1.png", ("https://x/1.png",), True),
        ("", (), False),
        ({"images": ["a", "b", "a"]}, ("a", "b"), True),
        ({"images": [{"url": "a"}, 3, None]}, ("a",), True),
        ({"videos": ["v"], "videoUrl": "w"}, ("v", "w"), True),
        ({"tracks": [{"audioUrl": "t"}]}, ("t",), True),
        ({"gridUrl": "g"}, (), False),
        (["a", "b"], ("a", "b"), True),
        (42, (), False),
    ],
)
def test_result_shapes(result: Any, urls: tuple[str, ...], understood: bool) -> None:
    assert outputs_of(result) == (urls, understood)


def test_times() -> None:
    assert time_of("2026-05-01T00:00:12.000Z") == 1777593612.0
    assert time_of(1777593612000) == 1777593612.0
    assert time_of("2026-05-01T00:00:12") is None  # no zone: do not guess
    assert time_of("yesterday") is None and time_of(None) is None and time_of(True) is None


def test_fingerprint_changes_only_with_news() -> None:
    a = frame("processing-45")
    assert fingerprint(a) == fingerprint({**a, "webhookStatus": "pending"})
    assert fingerprint(a) != fingerprint({**a, "progress": 46})
    assert fingerprint(a) != fingerprint({**frame("completed-images"), "expired": True})


def test_job_list_pages() -> None:
    page = job_page(frame("job-list"))
    assert [j["id"][:8] for j in page.jobs] == ["11111111", "22222222"]
    assert page.cursor == "22222222-2222-4222-8222-222222222222" and page.more
    assert page.problem is not None and "1 unreadable" in page.problem
    empty = job_page(frame("job-list-empty"))
    assert empty.jobs == () and not empty.more and empty.problem is None
    assert job_page([1, 2]).problem and job_page({"jobs": "no"}).problem


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=25,
)
JOBLIKE = st.fixed_dictionaries(
    {"id": st.text(max_size=8), "status": st.sampled_from(["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "X"])},
    optional={"progress": JSON, "result": JSON, "error": JSON, "creditCost": JSON, "expired": JSON, "input": JSON},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, JOBLIKE))
def test_normaliser_is_total(payload: Any) -> None:
    for origin in Origin:
        out = normalise_job(payload, origin=origin, job="j")
        assert out, "every payload gives at least one observation"
        assert all(o.kind is not Kind.STATE or o.state is not None for o in out)
    job_page(payload)
    fingerprint(payload)
    normalise_accepted(payload, model=None, prompt=None)


# -- the client's pure helpers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("seedream-4", "seedreamParams"),
        ("seedream-4.5", "seedreamParams"),
        ("flux-2-pro", "fluxParams"),
        ("nano-banana", "nanoBananaParams"),
        ("midjourney", "midjourneyParams"),
        ("123", "modelParams"),
    ],
)
def test_params_key(model: str, key: str) -> None:
    assert params_key(model) == key


def test_build_body() -> None:
    request = SubmitRequest(
        model="seedream-4",
        prompt="a car",
        images=["https://example.com/input.jpg"],
        options={"guidance_scale": 3, "webhook_url": "https://hook", "idempotency_key": "k1", "params": {"seed": 7}},
    )
    assert build_body(request) == {
        "model": "seedream-4",
        "prompt": "a car",
        "webhookUrl": "https://hook",
        "seedreamParams": {"seed": 7, "guidance_scale": 3, "image_input": "https://example.com/input.jpg"},
    }
    flux = build_body(SubmitRequest(model="flux-2-pro", prompt="p", images=["a", "b"]))
    assert flux["fluxParams"] == {"input_images": ["a", "b"]}
    assert build_body(SubmitRequest(model="seedream-4", prompt="p")) == {"model": "seedream-4", "prompt": "p"}
    custom = build_body(SubmitRequest(model="odd-1", prompt="p", options={"params_key": "oddParamsV2", "x": 1}))
    assert custom["oddParamsV2"] == {"x": 1}


def test_idempotency_key() -> None:
    assert idempotency_key(SubmitRequest(model="m", prompt="p", options={"idempotency_key": "mine"})) == "mine"
    fresh = {idempotency_key(SubmitRequest(model="m", prompt="p")) for _ in range(3)}
    assert len(fresh) == 3 and all(len(k) <= 255 for k in fresh)
    with pytest.raises(ProviderError) as caught:
        idempotency_key(SubmitRequest(model="m", prompt="p", options={"idempotency_key": "x" * 256}))
    assert caught.value.code == "bad_request"


def test_parse_ref() -> None:
    assert parse_ref(f"  {JOB} ") == JOB
    assert parse_ref(f"https://api.apiframe.ai/v2/jobs/{JOB}") == JOB
    for bad in ("", "a b", "/", "x" * 200, "?id=1"):
        with pytest.raises(ProviderError) as caught:
            parse_ref(bad)
        assert caught.value.code == "bad_request"


@pytest.mark.parametrize(
    ("status", "body", "header", "code", "words"),
    [
        (400, frame("error-400"), None, "bad_request", ("prompt: String must contain at most 2000", "guidance_scale")),
        (401, {"error": "API key is required"}, None, "auth", ("401", "API key is required")),
        (401, {"error": "Invalid API key"}, None, "auth", ("Invalid API key",)),
        (403, {"error": "API key is inactive"}, None, "auth", ("403", "inactive")),
        (402, frame("error-402"), None, "balance", ("Insufficient credits", "16 required, 4 available")),
        (404, {"error": "Job not found"}, None, "not_found", ("no such job x",)),
        (409, {"error": "conflict"}, None, "conflict", ("Idempotency-Key",)),
        (429, {"error": "Too many requests"}, "7", "rate_limited", ("retry after 7s",)),
        (503, {"error": "Service temporarily unavailable"}, None, "unavailable", ("503",)),
        (502, "<html>bad gateway</html>", None, "unavailable", ("502",)),
        (418, {}, None, "bad_request", ("418",)),
    ],
)
def test_errors(status: int, body: Any, header: str | None, code: str, words: tuple[str, ...]) -> None:
    error = error_for(status, body, header, what="job x")
    assert error.code == code
    assert "\n" not in error.message
    for word in words:
        assert word in error.message
    if status == 429:
        assert error.retry_after == 7.0
    else:
        assert error.retry_after is None
