"""The job lifecycle as data, and the tracker that applies it.

Pure: observations in, event data out, no I/O and no clock (callers pass `now`). The tracker
keeps every unfinished job plus a bounded set of recently finished ones; the daemon restores
older jobs from the journal's job store before applying an observation about them.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable

from streamd.events import (
    K_ARCHIVED,
    K_DIAGNOSTIC,
    K_PROGRESS,
    K_STALLED,
    K_STATE,
    TERMINAL,
    EventData,
    Job,
    Kind,
    Observation,
    Origin,
    Progress,
    State,
)

Q, A, PRE, RUN, POST = State.QUEUED, State.ACCEPTED, State.PREPROCESSING, State.RUNNING, State.POSTPROCESSING
DONE, FAIL, CANC = State.COMPLETED, State.FAILED, State.CANCELLED

#: Allowed moves, spelled out. A job may skip states, never goes backwards; terminal is final.
#: `None` is "not seen yet": a job may first be seen in any state (tracked late, or polled).
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({Q, A, PRE, RUN, POST, DONE, FAIL, CANC}),
    Q: frozenset({A, PRE, RUN, POST, DONE, FAIL, CANC}),
    A: frozenset({PRE, RUN, POST, DONE, FAIL, CANC}),
    PRE: frozenset({RUN, POST, DONE, FAIL, CANC}),
    RUN: frozenset({POST, DONE, FAIL, CANC}),
    POST: frozenset({DONE, FAIL, CANC}),
    DONE: frozenset(),
    FAIL: frozenset(),
    CANC: frozenset(),
}


class Verdict(enum.Enum):
    MOVE = "move"  # a new state: emit it
    SAME = "same"  # the state the job is already in: a duplicate, drop
    STALE = "stale"  # an earlier state than the job's: arrived late, drop
    CONFLICT = "conflict"  # a different terminal state for a finished job: keep as diagnostic


def judge(current: State | None, new: State) -> Verdict:
    if new in TRANSITIONS[current]:
        return Verdict.MOVE
    if new == current:
        return Verdict.SAME
    if current in TERMINAL and new in TERMINAL:
        return Verdict.CONFLICT
    return Verdict.STALE


#: A progress report implies the job is at least running.
IMPLIED_BY_PROGRESS = RUN


class Tracker:
    """Applies observations to jobs. `apply` returns the events to journal, in order."""

    def __init__(self, *, keep_finished: int = 10_000) -> None:
        self._live: dict[tuple[str, str], Job] = {}
        self._finished: OrderedDict[tuple[str, str], Job] = OrderedDict()
        self._keep_finished = keep_finished
        self._stalled: set[tuple[str, str]] = set()
        self.dropped = {Verdict.SAME: 0, Verdict.STALE: 0}

    # -- views -------------------------------------------------------------------------------
    def get(self, provider: str, job: str) -> Job | None:
        key = (provider, job)
        return self._live.get(key) or self._finished.get(key)

    def unfinished(self, provider: str | None = None) -> list[Job]:
        return [j for j in self._live.values() if provider is None or j.provider == provider]

    def restore(self, jobs: Iterable[Job]) -> None:
        """Load jobs from the job store (at start-up, or on a cache miss)."""
        for job in jobs:
            self._put(job)

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    # -- applying ------------------------------------------------------------------------------
    def apply(self, obs: Observation, now: float) -> list[EventData]:
        if obs.job is None:
            return [self._data(obs, None, None, None)]
        key = (obs.provider, obs.job)
        job = self._live.get(key) or self._finished.get(key)  # self.get(), inline: this runs per event
        if obs.kind is K_STATE:
            assert obs.state is not None, "a state observation carries a state"
            return self._apply_state(job, obs, obs.state, now)
        out: list[EventData] = []
        if obs.kind is K_PROGRESS:
            if job is None or judge(job.status, IMPLIED_BY_PROGRESS) is Verdict.MOVE:
                out += self._apply_state(job, obs, IMPLIED_BY_PROGRESS, now)
                job = self.get(obs.provider, obs.job)
            assert job is not None
            if obs.progress == job.progress and not out:
                return []
            job.progress = obs.progress
        if job is None:  # a log or diagnostic about a job we never saw: keep it, create nothing
            return [*out, self._data(obs, None, None, None)]
        self._merge(job, obs, now)
        if obs.kind is K_ARCHIVED:
            job.paths = tuple(dict.fromkeys((*job.paths, *obs.outputs)))
        if obs.kind is K_STALLED:
            self._stalled.add(job.key)
        out.append(self._data(obs, job, job.status, job.status))
        return out

    def _apply_state(self, job: Job | None, obs: Observation, new: State, now: float) -> list[EventData]:
        assert obs.job is not None
        current = job.status if job is not None else None
        if new not in TRANSITIONS[current]:  # judge() says MOVE exactly then: the common case, checked inline
            verdict = judge(current, new)
            if verdict is Verdict.CONFLICT:
                assert job is not None
                note = f"{obs.upstream} says {new.value}, but the job already ended {current}"
                return [self._data(obs, job, current, current, kind=K_DIAGNOSTIC, message=note)]
            self.dropped[verdict] += 1
            if job is not None and new == current:
                self._merge(job, obs, now)  # a poll may add outputs/cost a push lacked
            return []
        if job is None:
            job = Job(provider=obs.provider, job=obs.job, status=new, created=now, since=now, updated=now)
        job.status = new
        job.since = now
        job.upstream = obs.upstream
        if new in (FAIL, CANC):
            job.progress = None
        if new is DONE and job.progress is not None:
            job.progress = Progress(percent=100.0, step=job.progress.steps, steps=job.progress.steps)
        key = job.key
        self._stalled.discard(key)
        self._merge(job, obs, now)
        self._put(job, key)
        return [self._data(obs, job, current, new, kind=K_STATE)]

    def _merge(self, job: Job, obs: Observation, now: float) -> None:
        job.updated = now
        if obs.model and not job.model:
            job.model = obs.model
        if obs.prompt and not job.prompt:
            job.prompt = obs.prompt
        if obs.outputs and obs.kind is not K_ARCHIVED:
            job.outputs = obs.outputs
        if obs.error:
            job.error = obs.error
        if obs.cost is not None:
            job.cost = obs.cost

    def _put(self, job: Job, key: tuple[str, str] | None = None) -> None:
        key = key or job.key
        if job.status in TERMINAL:
            finished = self._finished
            if self._live.pop(key, None) is not None:
                self._stalled.discard(key)
            if key in finished:
                finished.move_to_end(key)
            finished[key] = job
            while len(finished) > self._keep_finished:
                finished.popitem(last=False)
        else:
            self._live[key] = job

    def _data(
        self,
        obs: Observation,
        job: Job | None,
        previous: State | None,
        status: State | None,
        *,
        kind: Kind | None = None,
        message: str | None = None,
    ) -> EventData:
        return EventData(
            provider=obs.provider,
            job=obs.job,
            kind=kind or obs.kind,
            status=status,
            previous=previous,
            upstream=obs.upstream,
            origin=obs.origin,
            model=obs.model or (job.model if job else None),
            outputs=obs.outputs or (job.outputs if job and kind is K_STATE else ()),
            error=obs.error,
            cost=obs.cost if obs.cost is not None else (job.cost if job and kind is K_STATE else None),
            progress=obs.progress,
            message=message or obs.message,
            health=obs.health,
            delay=obs.delay,
            prompt=obs.prompt,
            paths=obs.outputs if obs.kind is K_ARCHIVED else (),
            raw=obs.raw,
        )

    def note_seq(self, provider: str, job: str | None, seq: int) -> None:
        if job is not None and (j := self.get(provider, job)) is not None:
            j.seq = seq

    # -- time ----------------------------------------------------------------------------------
    def stalled(self, now: float, after: float) -> list[Observation]:
        """Observations for unfinished jobs with no change for `after` seconds, once per quiet spell."""
        out = []
        for job in self._live.values():
            if job.key in self._stalled or now - job.updated < after:
                continue
            out.append(
                Observation(
                    provider=job.provider,
                    job=job.job,
                    kind=Kind.STALLED,
                    upstream="streamd.stalled",
                    origin=Origin.DAEMON,
                    message=f"no news for {now - job.updated:.0f}s in state {job.status}",
                )
            )
        return out
