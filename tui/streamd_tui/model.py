"""The dashboard's client-side view of the feed: jobs, provider health and rates. Pure, no Textual.

The feed worker appends frames to `Store.pending`; the app drains them on a timer with
`apply_pending()`, so 1,000 events a second cost one batch per tick, not one repaint per event.
Widgets then read `take_changes()` (new and changed jobs since the last look) and never scan all jobs.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streamd.events import CloudEvent, Health, Job, Kind, Progress, State
from streamd.feed.protocol import Gap, Live, Snapshot

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Restart:
    """Queued by the feed worker before a fresh snapshot: seqs from before mean nothing now."""

    epoch: str


@dataclass(frozen=True, slots=True)
class Prune:
    """Queued by the link: of the jobs not updated after `seq`, only `keep` still match the filter.

    The daemon filters events one by one, so under `status:running` the event that ends a job
    never arrives; the link asks which jobs still match, and the others' rows go.
    """

    keep: frozenset[Key]
    seq: int


Item = CloudEvent | Snapshot | Gap | Live | Restart | Prune

#: Events kept per job for the detail pane; the full history is fetched from the feed on demand.
HISTORY = 32
#: Jobs per provider kept for the queue-wait and run-time distributions.
RECENT = 200
#: Seconds of per-second counts kept for the sparklines.
WINDOW = 120

STATE_ORDER = {state: i for i, state in enumerate(State)}
RUN_OR_LATER = frozenset({State.RUNNING, State.POSTPROCESSING})


def parse_time(text: str) -> float:
    """RFC 3339 (as `events.rfc3339` writes it) to unix seconds; 0.0 for anything unreadable."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


@dataclass(slots=True, eq=False)
class JobView:
    """One job as the dashboard knows it: the snapshot's `Job` plus every event since."""

    provider: str
    job: str
    status: State
    model: str | None = None
    prompt: str | None = None
    outputs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    error: str | None = None
    cost: float | None = None
    progress: Progress | None = None
    created: float = 0.0
    since: float = 0.0
    updated: float = 0.0
    seq: int = 0
    upstream: str = ""
    run_start: float | None = None  # when we saw it start running; for the run-time distribution
    history: deque[CloudEvent] | None = None  # made on the first event: most snapshot jobs never get one

    @property
    def key(self) -> Key:
        return (self.provider, self.job)

    @property
    def percent(self) -> float | None:
        return self.progress.percent if self.progress is not None else None

    @classmethod
    def from_job(cls, job: Job) -> JobView:
        view = cls(
            provider=job.provider,
            job=job.job,
            status=job.status,
            model=job.model,
            prompt=job.prompt,
            outputs=job.outputs,
            paths=job.paths,
            error=job.error,
            cost=job.cost,
            progress=job.progress,
            created=job.created,
            since=job.since,
            updated=job.updated,
            seq=job.seq,
            upstream=job.upstream,
        )
        if job.status in RUN_OR_LATER:
            view.run_start = job.since
        return view


class Rate:
    """Counts per whole second over a sliding window: the data behind a sparkline."""

    __slots__ = ("_counts", "_second")

    def __init__(self, window: int = WINDOW) -> None:
        self._counts: deque[int] = deque([0] * window, maxlen=window)
        self._second = 0

    def _advance(self, now: float) -> None:
        second = int(now)
        if self._second == 0:
            self._second = second
        steps = second - self._second
        if steps > 0:
            self._counts.extend([0] * min(steps, self._counts.maxlen or steps))
            self._second = second

    def add(self, now: float, n: int = 1) -> None:
        self._advance(now)
        self._counts[-1] += n

    def series(self, now: float, last: int | None = None) -> list[int]:
        """Counts per second, oldest first; the last entry is the current (incomplete) second."""
        self._advance(now)
        counts = list(self._counts)
        return counts[-last:] if last else counts

    def per_second(self, now: float, over: int = 10) -> float:
        """Mean over the last `over` complete seconds."""
        counts = self.series(now)
        done = counts[-over - 1 : -1]
        return sum(done) / len(done) if done else 0.0


@dataclass(slots=True)
class ProviderView:
    """One provider connection: health from events and `status`, rates and recent durations."""

    name: str
    health: Health | None = None
    message: str | None = None
    delay: float | None = None
    since: float = 0.0
    events: int | None = None  # total, from `status`
    jobs_active: int | None = None
    rate: Rate = field(default_factory=Rate)
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    runs: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass(slots=True)
class Changes:
    """What changed since the last `take_changes()`: the widgets' whole to-do list."""

    reset: bool = False  # start over: everything the table shows is stale
    new: list[Key] = field(default_factory=list)
    changed: set[Key] = field(default_factory=set)
    removed: set[Key] = field(default_factory=set)
    events: int = 0

    def __bool__(self) -> bool:
        return self.reset or bool(self.new) or bool(self.changed) or bool(self.removed)


class Store:
    """Jobs and providers, fed by feed frames. Keeps `last_seq` so a reconnect resumes in place."""

    def __init__(self) -> None:
        self.jobs: dict[Key, JobView] = {}
        self.providers: dict[str, ProviderView] = {}
        self.pending: deque[Item] = deque()
        self.epoch: str | None = None
        self.last_seq = 0
        self.live = False
        self.gaps: list[Gap] = []
        self.events = Rate()
        self.completions = Rate()
        self.applied = 0  # events applied, ever
        self._changes = Changes()
        self._snapshot: list[Job] = []

    # -- feeding --------------------------------------------------------------------------------
    def apply_pending(self, now: float, limit: int | None = None) -> int:
        """Apply queued frames (at most `limit`); returns how many events were applied."""
        n = 0
        pending = self.pending
        while pending and (limit is None or n < limit):
            item = pending.popleft()
            if isinstance(item, CloudEvent):
                self.apply_event(item, now)
                n += 1
            elif isinstance(item, Snapshot):
                self._snapshot.extend(item.jobs)
                if not item.more:
                    self.load_snapshot(self._snapshot, item.seq)
                    self._snapshot = []
            elif isinstance(item, Live):
                self.live = True
                self.last_seq = max(self.last_seq, item.seq)
            elif isinstance(item, Restart):
                self.epoch = item.epoch
                self.last_seq = 0
                self.live = False
                self._snapshot = []
            elif isinstance(item, Prune):
                self.prune(item)
            else:
                self.gaps.append(item)
                self.last_seq = max(self.last_seq, item.last)
        if n:
            self.events.add(now, n)
        return n

    def prune(self, prune: Prune) -> None:
        gone = [k for k, v in self.jobs.items() if k not in prune.keep and v.seq <= prune.seq]
        for key in gone:
            del self.jobs[key]
        self._changes.removed.update(gone)

    def load_snapshot(self, jobs: Iterable[Job], seq: int) -> None:
        self.jobs.clear()
        self._changes = Changes(reset=True)
        for job in jobs:
            view = JobView.from_job(job)
            self.jobs[view.key] = view
            self._changes.new.append(view.key)
        self.last_seq = max(self.last_seq, seq)

    def apply_event(self, event: CloudEvent, now: float) -> None:
        """Fold one event into its job, mirroring the daemon's tracker (which already judged it)."""
        self.applied += 1
        self._changes.events += 1
        if event.seq > self.last_seq:
            self.last_seq = event.seq
        data = event.data
        provider = self.provider(data.provider)
        provider.rate.add(now)
        at = parse_time(event.time)
        if data.kind is Kind.HEALTH:
            provider.health = data.health
            provider.message = data.message
            provider.delay = data.delay
            provider.since = at
            return
        if data.job is None:
            return
        key = (data.provider, data.job)
        view = self.jobs.get(key)
        if view is None:
            if data.status is None:
                return  # a log about a job we never saw: nothing to make a row of
            view = JobView(provider=data.provider, job=data.job, status=data.status, created=at, since=at)
            if data.status in RUN_OR_LATER:
                view.run_start = at  # its wait before we saw it is unknown: not a sample
            self.jobs[key] = view
            self._changes.new.append(key)
        else:
            self._changes.changed.add(key)
            if data.status is not None and data.status != view.status:
                self._enter(view, provider, data.status, at)
        if data.kind is Kind.STATE and data.status is State.COMPLETED:
            self.completions.add(now)
        if view.history is None:
            view.history = deque(maxlen=HISTORY)
        view.history.append(event)
        view.seq = event.seq
        view.updated = at
        view.upstream = data.upstream
        if data.model and not view.model:
            view.model = data.model
        if data.prompt and not view.prompt:
            view.prompt = data.prompt
        if data.error:
            view.error = data.error
        if data.cost is not None:
            view.cost = data.cost
        if data.kind is Kind.ARCHIVED:
            view.paths = tuple(dict.fromkeys((*view.paths, *(data.paths or data.outputs))))
        else:
            if data.outputs:
                view.outputs = data.outputs
            if data.paths:
                view.paths = tuple(dict.fromkeys((*view.paths, *data.paths)))
        if data.kind is Kind.PROGRESS and data.progress is not None:
            view.progress = data.progress
        elif data.status is State.COMPLETED:
            view.progress = Progress(percent=100.0)
        elif data.status in (State.FAILED, State.CANCELLED):
            view.progress = None

    def _enter(self, view: JobView, provider: ProviderView, state: State, at: float) -> None:
        view.status = state
        view.since = at
        if state in RUN_OR_LATER and view.run_start is None:
            view.run_start = at
            if view.created:
                provider.waits.append(max(0.0, at - view.created))
        if state.terminal and view.run_start is not None:
            provider.runs.append(max(0.0, at - view.run_start))

    def apply_status(self, status: dict[str, Any]) -> None:
        """Merge a `status` reply: health and totals for every provider, even filtered-out ones."""
        for entry in status.get("providers") or ():
            name = entry.get("name")
            if not isinstance(name, str):
                continue
            provider = self.provider(name)
            health = entry.get("health")
            if health in Health.__members__.values():
                provider.health = Health(health)
            provider.message = entry.get("message")
            provider.delay = entry.get("delay")
            provider.since = float(entry.get("since") or provider.since)
            provider.events = entry.get("events")
            provider.jobs_active = entry.get("jobs_active")

    # -- reading --------------------------------------------------------------------------------
    def provider(self, name: str) -> ProviderView:
        view = self.providers.get(name)
        if view is None:
            view = self.providers[name] = ProviderView(name)
        return view

    def take_changes(self) -> Changes:
        """Hand over what changed and start a new list. A job both new and changed is only new."""
        changes, self._changes = self._changes, Changes()
        if changes.new:
            changes.changed.difference_update(changes.new)
        if changes.removed:
            changes.changed.difference_update(changes.removed)
            changes.new = [k for k in changes.new if k not in changes.removed]
        return changes

    def peek_changes(self) -> Changes:
        return self._changes

    def get(self, key: Key) -> JobView | None:
        return self.jobs.get(key)

    def __iter__(self) -> Iterator[JobView]:
        return iter(self.jobs.values())

    def __len__(self) -> int:
        return len(self.jobs)


# -- distributions ----------------------------------------------------------------------------
#: Upper bounds (seconds) of the histogram buckets for queue-wait and run-time distributions.
BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, math.inf)
BUCKET_LABELS = ("<1s", "2s", "5s", "10s", "30s", "1m", "5m", ">5m")


def histogram(values: Iterable[float]) -> list[int]:
    counts = [0] * len(BUCKETS)
    for value in values:
        counts[bisect.bisect_left(BUCKETS, value)] += 1
    return counts


def quantile(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
