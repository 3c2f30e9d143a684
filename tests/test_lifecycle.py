"""The state table, table-driven like h11's: every (from, to) pair has one expected verdict."""

from __future__ import annotations

import itertools

import pytest

from streamd.events import TERMINAL, Kind, Observation, Origin, Progress, State
from streamd.lifecycle import TRANSITIONS, Tracker, Verdict, judge

ORDER = list(State)
RANK = {s: i for i, s in enumerate(ORDER[:5])} | {s: 5 for s in TERMINAL}


def expected(current: State | None, new: State) -> Verdict:
    if current is None:
        return Verdict.MOVE
    if current in TERMINAL:
        if new == current:
            return Verdict.SAME
        return Verdict.CONFLICT if new in TERMINAL else Verdict.STALE
    if new == current:
        return Verdict.SAME
    return Verdict.MOVE if RANK[new] > RANK[current] else Verdict.STALE


@pytest.mark.parametrize(("current", "new"), list(itertools.product([None, *ORDER], ORDER)))
def test_every_pair_has_the_documented_verdict(current: State | None, new: State) -> None:
    assert judge(current, new) is expected(current, new)


def test_table_covers_every_state_and_terminals_are_final() -> None:
    assert set(TRANSITIONS) == {None, *State}
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()


def obs(job: str, state: State | None = None, kind: Kind = Kind.STATE, **kw: object) -> Observation:
    return Observation(
        provider="oxen", job=job, kind=kind, state=state, upstream=str(state or kind), origin=Origin.POLL, **kw
    )  # type: ignore[arg-type]


def test_duplicates_and_backward_moves_are_dropped() -> None:
    t = Tracker()
    seen = []
    for st in (State.QUEUED, State.RUNNING, State.QUEUED, State.RUNNING, State.COMPLETED, State.RUNNING):
        seen += t.apply(obs("a", st), 1.0)
    assert [(e.previous, e.status) for e in seen] == [
        (None, State.QUEUED),
        (State.QUEUED, State.RUNNING),
        (State.RUNNING, State.COMPLETED),
    ]
    assert t.dropped[Verdict.SAME] == 1 and t.dropped[Verdict.STALE] == 2


def test_conflicting_terminal_becomes_a_diagnostic_not_a_state() -> None:
    t = Tracker()
    t.apply(obs("a", State.COMPLETED), 1.0)
    out = t.apply(obs("a", State.FAILED), 2.0)
    assert len(out) == 1 and out[0].kind is Kind.DIAGNOSTIC and out[0].status is State.COMPLETED
    assert t.get("oxen", "a").status is State.COMPLETED  # type: ignore[union-attr]


def test_progress_implies_running_once_and_repeats_are_dropped() -> None:
    t = Tracker()
    t.apply(obs("a", State.QUEUED), 1.0)
    first = t.apply(obs("a", kind=Kind.PROGRESS, progress=Progress(percent=10)), 2.0)
    assert [e.kind for e in first] == [Kind.STATE, Kind.PROGRESS]
    assert first[0].status is State.RUNNING
    assert t.apply(obs("a", kind=Kind.PROGRESS, progress=Progress(percent=10)), 3.0) == []
    assert len(t.apply(obs("a", kind=Kind.PROGRESS, progress=Progress(percent=20)), 4.0)) == 1


def test_poll_fills_outputs_a_push_lacked_without_a_second_event() -> None:
    t = Tracker()
    t.apply(obs("a", State.COMPLETED), 1.0)
    assert t.apply(obs("a", State.COMPLETED, outputs=("https://x/1.png",), cost=0.03), 2.0) == []
    job = t.get("oxen", "a")
    assert job is not None and job.outputs == ("https://x/1.png",) and job.cost == 0.03


def test_finished_jobs_are_bounded_but_unfinished_are_kept() -> None:
    t = Tracker(keep_finished=3)
    for i in range(10):
        t.apply(obs(f"done{i}", State.COMPLETED), float(i))
    t.apply(obs("live", State.RUNNING), 11.0)
    assert len(t) == 4 and t.get("oxen", "done0") is None and t.get("oxen", "done9") is not None
    assert [j.job for j in t.unfinished()] == ["live"]


def test_stalled_fires_once_per_quiet_spell() -> None:
    t = Tracker()
    t.apply(obs("a", State.RUNNING), 0.0)
    assert t.stalled(100.0, after=300.0) == []
    first = t.stalled(400.0, after=300.0)
    assert len(first) == 1 and first[0].kind is Kind.STALLED
    for e in t.apply(first[0], 400.0):
        assert e.kind is Kind.STALLED
    assert t.stalled(800.0, after=300.0) == []
    t.apply(obs("a", State.POSTPROCESSING), 900.0)
    assert len(t.stalled(1300.0, after=300.0)) == 1


def test_unknown_job_log_is_kept_without_creating_a_job() -> None:
    t = Tracker()
    out = t.apply(obs("ghost", kind=Kind.LOG, message="hello"), 1.0)
    assert len(out) == 1 and out[0].kind is Kind.LOG and t.get("oxen", "ghost") is None
