"""Runware's normaliser against recorded frames (tests/frames/runware), table-driven, plus totality."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.events import Kind, Observation, Origin, State
from streamd.providers.runware.normalise import Item, Normaliser, parse_items

FRAMES = Path(__file__).parent.parent / "frames" / "runware"
T = "d0e27e41-af62-43be-926c-8211a3a92adb"  # the seed page's task
A = "f9b9414a-9ebb-4f93-9bb9-d4b16d312a36"
B = "2eca900b-015a-461d-94d9-b42305f46cde"
FIRST_IMAGE = "dc98754d-90c1-41b8-9482-c3d63f90c93c"


def frame(name: str) -> str:
    return (FRAMES / name).read_text()


@dataclass
class Want:
    """The fields of one expected observation that matter for the case."""

    kind: Kind
    job: str | None = T
    state: State | None = None
    upstream: str | None = None
    origin: Origin | None = None
    outputs: int | None = None
    cost: float | None = None
    error: str | None = None
    step: tuple[int, int] | None = None  # progress (items in, numberResults)
    message: str | None = None  # substring


@dataclass
class Case:
    name: str
    file: str
    want: list[Want]
    origin: Origin = Origin.PUSH
    batches: dict[str, int | None] = field(default_factory=lambda: {T: 1})  # task -> numberResults
    known_items: list[str] = field(default_factory=list)  # imageUUIDs already counted for T
    session: str | None = None
    auth_error: str | None = None  # substring
    pong: bool = False
    acked: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)


SEED_URL = "https://im.runware.ai/image/os/a25d05/ws/3/ii/dc98754d-90c1-41b8-9482-c3d63f90c93c.jpg"
CASES = [
    Case("auth reply", "auth_ok.json", [], session="f40c2aeb-f8a7-4af7-a1ab-7594c9bf778f"),
    Case("legacy auth reply", "auth_ok_legacy.json", [], session="f40c2aeb-f8a7-4af7-a1ab-7594c9bf778f"),
    Case("invalid key", "auth_invalid_key.json", [], auth_error="invalidApiKey"),
    Case("invalid key, legacy shape", "auth_invalid_key_legacy.json", [], auth_error="Invalid api key"),
    Case("pong", "pong.json", [], pong=True),
    Case(
        "async acknowledgement is QUEUED, origin request",
        "ack_async.json",
        [Want(Kind.STATE, state=State.QUEUED, upstream="acknowledgement", origin=Origin.REQUEST)],
        acked={T},
    ),
    Case(
        "the only result completes the job",
        "result_seedream.json",
        [
            Want(
                Kind.STATE,
                state=State.COMPLETED,
                upstream="result",
                origin=Origin.PUSH,
                outputs=1,
                cost=0.03,
                step=(1, 1),
            )
        ],
        finished={T},
    ),
    Case(
        "first of two results is progress",
        "result_seedream.json",
        [Want(Kind.PROGRESS, upstream="result", origin=Origin.PUSH, outputs=1, cost=0.03, step=(1, 2))],
        batches={T: 2},
    ),
    Case(
        "second of two results completes with both outputs and the summed cost",
        "result_seedream_second.json",
        [Want(Kind.STATE, state=State.COMPLETED, outputs=2, cost=0.06, step=(2, 2))],
        batches={T: 2},
        known_items=[FIRST_IMAGE],
        finished={T},
    ),
    Case(
        "a result delivered twice counts once",
        "result_seedream.json",
        [],
        batches={T: 2},
        known_items=[FIRST_IMAGE],
    ),
    Case(
        "getResponse processing is RUNNING, origin poll",
        "getresponse_processing.json",
        [Want(Kind.STATE, state=State.RUNNING, upstream="processing", origin=Origin.POLL)],
        batches={T: 2},
    ),
    Case(
        "older docs' pending is RUNNING too",
        "getresponse_pending_old_docs.json",
        [Want(Kind.STATE, state=State.RUNNING, upstream="pending", origin=Origin.POLL)],
    ),
    Case(
        "queued is QUEUED",
        "getresponse_queued.json",
        [Want(Kind.STATE, state=State.QUEUED, upstream="queued", origin=Origin.POLL)],
    ),
    Case(
        "partial results: running, then one item in",
        "getresponse_partial.json",
        [
            Want(Kind.STATE, state=State.RUNNING, upstream="processing"),
            Want(Kind.PROGRESS, upstream="success", origin=Origin.POLL, outputs=1, step=(1, 2)),
        ],
        batches={T: 2},
    ),
    Case(
        "all generations succeeded",
        "getresponse_success.json",
        [
            Want(Kind.PROGRESS, upstream="success", step=(1, 2)),
            Want(Kind.STATE, state=State.COMPLETED, upstream="success", origin=Origin.POLL, outputs=2, cost=0.06),
        ],
        batches={T: 2},
        finished={T},
    ),
    Case(
        "a tracked task learns numberResults from getResponse",
        "getresponse_success.json",
        [Want(Kind.PROGRESS, step=(1, 2)), Want(Kind.STATE, state=State.COMPLETED, outputs=2, step=(2, 2))],
        batches={},
        finished={T},
    ),
    Case(
        "status error is FAILED with the message",
        "getresponse_error_status.json",
        [Want(Kind.STATE, state=State.FAILED, origin=Origin.POLL, error="The provider did not answer in time")],
        rejected={T},
        finished={T},
    ),
    Case(
        "an unknown status is a diagnostic, not a state",
        "getresponse_unknown_status.json",
        [Want(Kind.DIAGNOSTIC, origin=Origin.POLL, message="throttled")],
    ),
    Case(
        "a failure reported by getResponse in errors[]",
        "getresponse_failed_in_errors.json",
        [Want(Kind.STATE, state=State.FAILED, upstream="timeoutProvider", origin=Origin.POLL)],
        rejected={T},
        finished={T},
    ),
    Case(
        "a task Runware does not know is a diagnostic and `missing`",
        "getresponse_not_found.json",
        [Want(Kind.DIAGNOSTIC, origin=Origin.POLL, message="taskNotFound")],
        missing={T},
    ),
    Case(
        "errors[] entry fails its task",
        "errors_task_failed.json",
        [
            Want(
                Kind.STATE,
                state=State.FAILED,
                upstream="timeoutProvider",
                origin=Origin.PUSH,
                error="The provider did not answer in time",
            )
        ],
        rejected={T},
        finished={T},
    ),
    Case(
        "one task fails while another in the same frame succeeds",
        "mixed_data_and_errors.json",
        [
            Want(Kind.STATE, job=A, state=State.COMPLETED, outputs=1, cost=0.03),
            Want(Kind.STATE, job=B, state=State.FAILED, upstream="invalidPositivePrompt"),
        ],
        batches={A: 1, B: 1},
        rejected={B},
        finished={A, B},
    ),
    Case(
        "legacy error shape naming a task",
        "legacy_task_error.json",
        [
            Want(
                Kind.STATE,
                state=State.FAILED,
                upstream="error",
                error="content policy: prompt rejected by safety filter",
            )
        ],
        rejected={T},
        finished={T},
    ),
    Case(
        "legacy error without a task is a diagnostic",
        "legacy_error_no_task.json",
        [Want(Kind.DIAGNOSTIC, job=None, message="Server is restarting")],
    ),
    Case(
        "an unexpected task type is a diagnostic",
        "unexpected_task_with_key.json",
        [Want(Kind.DIAGNOSTIC, job="c9b3cbaf-cb72-4015-9f57-18d8e8737a77", message="imageUpload")],
    ),
]


def _check(obs: Observation, want: Want) -> None:
    assert obs.provider == "runware"
    assert (obs.kind, obs.job) == (want.kind, want.job)
    if want.state is not None:
        assert obs.state is want.state
    if want.upstream is not None:
        assert obs.upstream == want.upstream
    if want.origin is not None:
        assert obs.origin is want.origin
    if want.outputs is not None:
        assert len(obs.outputs) == want.outputs
        assert all(url.startswith("https://im.runware.ai/image/") for url in obs.outputs)
    if want.cost is not None:
        assert obs.cost == pytest.approx(want.cost)
    if want.error is not None:
        assert obs.error == want.error
    if want.step is not None:
        assert obs.progress is not None
        assert (obs.progress.step, obs.progress.steps) == want.step
    if want.message is not None:
        assert obs.message is not None and want.message in obs.message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_recorded_frame(case: Case) -> None:
    norm = Normaliser()
    for task, n in case.batches.items():
        norm.expect(task, number_results=n, model="bytedance:5@0")
    if case.known_items:
        norm.expect(T, number_results=None, items=[Item(i, SEED_URL, 0.03) for i in case.known_items])
    reading = norm.feed(frame(case.file), case.origin)
    assert len(reading.observations) == len(case.want), reading.observations
    for obs, want in zip(reading.observations, case.want, strict=True):
        _check(obs, want)
    assert reading.session == case.session
    if case.auth_error is None:
        assert reading.auth_error is None
    else:
        assert reading.auth_error is not None and case.auth_error in reading.auth_error
    assert reading.pong is case.pong
    assert reading.acked == case.acked
    assert set(reading.rejected) == case.rejected
    assert reading.missing == case.missing
    assert reading.finished == case.finished
    for obs in reading.observations:
        if obs.kind is not Kind.DIAGNOSTIC and obs.job in case.batches:
            assert obs.model == "bytedance:5@0"  # the batch's model rides on every job observation


def test_frames_all_have_a_case() -> None:
    """A frame file nobody reads is a recorded payload nobody tests."""
    used = {c.file for c in CASES}
    assert {p.name for p in FRAMES.glob("*.json")} == used


def test_completion_is_produced_once_whatever_repeats_it() -> None:
    """Resume buffer, pushes and repair polls all repeat items: one COMPLETED, all outputs."""
    norm = Normaliser()
    norm.expect(T, number_results=2)
    seen: list[Observation] = []
    for name, origin in [
        ("result_seedream.json", Origin.PUSH),
        ("result_seedream.json", Origin.PUSH),  # buffered copy after a resume
        ("getresponse_partial.json", Origin.POLL),
        ("result_seedream_second.json", Origin.PUSH),
        ("getresponse_success.json", Origin.POLL),  # the repair poll, after the fact
        ("result_seedream_second.json", Origin.PUSH),
        ("errors_task_failed.json", Origin.PUSH),  # a contradicting late error
    ]:
        seen += norm.feed(frame(name), origin).observations
    terminal = [o for o in seen if o.kind is Kind.STATE and o.state in (State.COMPLETED, State.FAILED)]
    assert [o.state for o in terminal] == [State.COMPLETED]
    assert len(terminal[0].outputs) == 2
    assert terminal[0].cost == pytest.approx(0.06)
    assert [o.progress.step for o in seen if o.kind is Kind.PROGRESS and o.progress] == [1]


def test_items_survive_a_restart() -> None:
    """`items_json` in the job's follow lets a restarted daemon keep counting the batch."""
    first = Normaliser()
    first.expect(T, number_results=2)
    first.feed(frame("result_seedream.json"), Origin.PUSH)
    remembered = first.batches[T].items_json()
    second = Normaliser()
    second.expect(T, number_results=2, items=parse_items(remembered))
    reading = second.feed(frame("result_seedream_second.json"), Origin.PUSH)
    [obs] = reading.observations
    assert obs.state is State.COMPLETED
    assert len(obs.outputs) == 2 and obs.cost == pytest.approx(0.06)
    assert parse_items("not json") == [] and parse_items('[["k", 3, "x"], 7]') == [Item("k", None, None)]


@pytest.mark.parametrize("pushed", [["result_seedream.json"], ["result_seedream.json", "result_seedream_second.json"]])
def test_a_task_restored_without_its_size_completes_only_once_getresponse_sizes_it(pushed: list[str]) -> None:
    """A task killed before its numberResults was stored is restored unsized. A resumed session may
    push its items before the first getResponse: counted against Runware's default of one image, the
    first of two completed it, and the second became a log line after the end."""
    norm = Normaliser()
    norm.expect(T, number_results=None, unsized=True)
    seen = [o for name in pushed for o in norm.feed(frame(name), Origin.PUSH).observations]
    assert [o.kind for o in seen] == [Kind.PROGRESS] * len(pushed)
    assert [o.progress.step if o.progress else None for o in seen] == list(range(1, len(pushed) + 1))
    assert all(o.progress is not None and o.progress.steps is None for o in seen)  # of a number not known
    reading = norm.feed(frame("getresponse_success.json"), Origin.POLL)  # two generations, both done
    completed = [o for o in reading.observations if o.kind is Kind.STATE]
    assert [o.state for o in completed] == [State.COMPLETED]
    assert len(completed[0].outputs) == 2 and completed[0].cost == pytest.approx(0.06)
    assert completed[0].progress is not None and (completed[0].progress.step, completed[0].progress.steps) == (2, 2)
    assert reading.finished == {T}
    assert not [o for o in reading.observations if o.kind is Kind.LOG]


def test_a_partial_getresponse_sizes_an_unsized_task() -> None:
    norm = Normaliser()
    norm.expect(T, number_results=None, unsized=True)
    reading = norm.feed(frame("getresponse_partial.json"), Origin.POLL)  # one of two done
    assert [o.kind for o in reading.observations if o.kind is not Kind.STATE] == [Kind.PROGRESS]
    assert norm.batches[T].expected == 2 and not norm.batches[T].unsized
    [done] = norm.feed(frame("result_seedream_second.json"), Origin.PUSH).observations
    assert done.state is State.COMPLETED and len(done.outputs) == 2


def test_finished_batches_are_kept_for_duplicates_but_bounded() -> None:
    norm = Normaliser(keep_finished=1)
    norm.expect(A, number_results=1)
    norm.feed(frame("mixed_data_and_errors.json"), Origin.PUSH)  # finishes A and B
    assert set(norm.batches) == {B}  # A, the older, went
    again = norm.feed(frame("mixed_data_and_errors.json"), Origin.PUSH)
    assert [o.job for o in again.observations] == [A]  # B's repeat is recognised; A reads as news


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\xff not json", "not JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('"text"', "not a JSON object"),
        ('{"data": 5}', "neither data nor errors"),
        ("{}", "neither data nor errors"),
        ('{"data": [7]}', "not an object"),
        ('{"data": [{"taskType": "imageInference"}]}', "without taskUUID"),
        ('{"errors": ["boom"]}', "not an object"),
        ('{"errors": [{"code": "serverBusy", "message": "try later"}]}', "serverBusy"),
        ('{"data": [{"taskType": "authentication"}]}', "without a session"),
    ],
)
def test_unreadable_frames_become_one_diagnostic(payload: str | bytes, message: str) -> None:
    reading = Normaliser().feed(payload, Origin.PUSH)
    [obs] = reading.observations
    assert obs.kind is Kind.DIAGNOSTIC and obs.state is None
    assert obs.message is not None and message in obs.message


def test_secrets_never_reach_raw() -> None:
    structured = Normaliser().feed(frame("unexpected_task_with_key.json"), Origin.PUSH)
    text = Normaliser().feed('{"apiKey": "sk-should-never-show", broken', Origin.PUSH)
    for reading in (structured, text):
        encoded = msgspec.json.encode(reading.observations)
        assert b"sk-should-never-show" not in encoded
        assert b"[redacted]" in encoded


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
runware_keys = st.sampled_from(
    ["data", "errors", "error", "taskType", "taskUUID", "status", "imageUUID", "imageURL", "cost", "code", "message"]
)
runware_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([T, "success", "processing", "getResponse"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(runware_keys, inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, runware_like), st.sampled_from(list(Origin)))
def test_never_raises_on_any_json(value: Any, origin: Origin) -> None:
    norm = Normaliser()
    norm.expect(T, number_results=2)
    for payload in (value, json.dumps(value)):
        reading = norm.feed(payload, origin)
        for obs in reading.observations:
            assert isinstance(obs, Observation)
            msgspec.json.encode(obs)  # journal-ready
            if obs.kind is Kind.STATE:
                assert obs.state is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_never_raises_on_bytes(data: bytes) -> None:
    reading = Normaliser().feed(data, Origin.PUSH)
    assert all(isinstance(o, Observation) for o in reading.observations)
