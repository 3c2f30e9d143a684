"""An in-memory stand-in for the daemon's feed, for tests, the benchmark and screenshots.

It speaks the `link.Feed` API with the real frame types and the real filter language: hello with
an epoch, snapshot-then-events, `since=<seq>` resumption, gaps, `Live`. `drop()` makes the
daemon vanish (open subscriptions fail, connects are refused) and `restart()` brings it back,
with the same journal or, given a new epoch, an empty one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from streamd.events import CloudEvent, EventData, Health, Job, Kind, Origin, Progress, State, envelope
from streamd.feed.protocol import PROTOCOL_VERSION, Cursor, Gap, Hello, Live, Snapshot
from streamd.filters import parse
from streamd_tui.link import FeedItem


class FakeFeedError(Exception):
    """Shaped like `streamd.feed.client.FeedError`: a code and one clear message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SubscribeCall:
    since: Cursor
    snapshot: bool
    filter: str


class FakeDaemon:
    """The daemon's side: a journal, the jobs' current state, provider status, and requests seen."""

    def __init__(self, epoch: str = "epoch-1", *, snapshot_chunk: int = 1000) -> None:
        self.epoch = epoch
        self.up = True
        self.generation = 0  # bumped by drop(): sessions of an older generation are dead
        self.journal: list[CloudEvent] = []
        self.oldest = 1
        self.jobs: dict[tuple[str, str], Job] = {}
        self.providers: dict[str, dict[str, Any]] = {}
        self.subscriptions: list[SubscribeCall] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.connects = 0
        self.snapshot_chunk = snapshot_chunk
        self.cancel_error: FakeFeedError | None = None
        self._changed = anyio.Event()
        self._ids = 0

    # -- the journal ------------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self.oldest - 1 + len(self.journal)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def publish(self, data: EventData, at: float | None = None) -> CloudEvent:
        event = envelope(data, seq=self.seq + 1, epoch=self.epoch, source="fake", at=at)
        self.journal.append(event)
        self._pulse()
        return event

    def emit(
        self,
        provider: str,
        job: str,
        status: State | None = None,
        *,
        kind: Kind | None = None,
        origin: Origin = Origin.PUSH,
        upstream: str | None = None,
        model: str | None = None,
        prompt: str | None = None,
        outputs: tuple[str, ...] = (),
        paths: tuple[str, ...] = (),
        error: str | None = None,
        cost: float | None = None,
        percent: float | None = None,
        message: str | None = None,
        raw: Any = None,
        at: float | None = None,
    ) -> CloudEvent:
        """Publish one job event, keeping the fake's job store as the daemon's tracker would."""
        at = time.time() if at is None else at
        current = self.jobs.get((provider, job))
        previous = current.status if current else None
        kind = kind or (Kind.PROGRESS if percent is not None and status is None else Kind.STATE)
        new = status or previous or State.QUEUED
        progress = Progress(percent=percent) if percent is not None else None
        if current is None:
            current = self.jobs[(provider, job)] = Job(provider=provider, job=job, status=new, created=at, since=at)
        if new != current.status:
            current.status, current.since = new, at
        current.updated = at
        current.upstream = upstream or (status.value if status else kind.value)
        current.model = current.model or model
        current.prompt = current.prompt or prompt
        current.outputs = outputs or current.outputs
        current.paths = tuple(dict.fromkeys((*current.paths, *paths)))
        current.error = error or current.error
        current.cost = cost if cost is not None else current.cost
        current.progress = progress or current.progress
        if new is State.COMPLETED:
            current.progress = Progress(percent=100.0)
        elif new in (State.FAILED, State.CANCELLED):
            current.progress = None
        event = self.publish(
            EventData(
                provider=provider,
                job=job,
                kind=kind,
                status=new,
                previous=previous,
                upstream=current.upstream,
                origin=origin,
                model=model or current.model,
                outputs=outputs,
                error=error,
                cost=cost,
                progress=progress,
                message=message,
                prompt=prompt,
                paths=paths,
                raw=raw,
            ),
            at=at,
        )
        current.seq = event.seq
        return event

    def health(
        self, provider: str, health: Health, message: str | None = None, delay: float | None = None
    ) -> CloudEvent:
        entry = self.providers.setdefault(provider, {"name": provider, "events": 0, "jobs_active": 0})
        entry.update(health=health.value, message=message, delay=delay, since=time.time())
        return self.publish(
            EventData(
                provider=provider,
                job=None,
                kind=Kind.HEALTH,
                status=None,
                previous=None,
                upstream=health.value,
                origin=Origin.DAEMON,
                health=health,
                message=message,
                delay=delay,
            )
        )

    def forget_before(self, seq: int) -> None:
        """Retention: drop journal entries older than `seq` (a resume before it gets a gap)."""
        drop = max(0, min(len(self.journal), seq - self.oldest))
        del self.journal[:drop]
        self.oldest += drop

    # -- the daemon's life ------------------------------------------------------------------------
    def drop(self) -> None:
        """The daemon goes away: open subscriptions fail, new connections are refused."""
        self.up = False
        self.generation += 1
        self._pulse()

    def restart(self, epoch: str | None = None) -> None:
        """Back again; a new `epoch` means a reset journal: no events, no jobs."""
        if epoch is not None and epoch != self.epoch:
            self.epoch = epoch
            self.journal.clear()
            self.oldest = 1
            self.jobs.clear()
        self.up = True
        self._pulse()

    def hello(self) -> Hello:
        return Hello(protocol=PROTOCOL_VERSION, server="fake", epoch=self.epoch, seq=self.seq, oldest=self.oldest)

    @asynccontextmanager
    async def connect(self, socket: Path) -> AsyncIterator[FakeClient]:
        if not self.up:
            raise FakeFeedError("unavailable", f"no daemon is listening on {socket}")
        self.connects += 1
        yield FakeClient(self, self.generation)


class FakeClient:
    """One connection, shaped like `FeedClient`; it dies when the daemon drops."""

    def __init__(self, daemon: FakeDaemon, generation: int) -> None:
        self.daemon = daemon
        self.generation = generation
        self.hello = daemon.hello()

    def _check(self) -> None:
        if self.generation != self.daemon.generation or not self.daemon.up:
            raise FakeFeedError("closed", "the daemon closed the connection")

    async def _request(self, op: str, **fields: Any) -> None:
        self._check()
        self.daemon.requests.append((op, fields))
        await anyio.lowlevel.checkpoint()

    async def jobs(self, *, filter: str = "", active: bool = False, limit: int = 1000) -> list[Job]:
        await self._request("jobs", filter=filter, active=active, limit=limit)
        match = parse(filter)
        jobs = [j for j in self.daemon.jobs.values() if match(j) and not (active and j.status.terminal)]
        return jobs[:limit]

    async def status(self) -> dict[str, Any]:
        await self._request("status")
        daemon = self.daemon
        return {
            "daemon": {
                "version": "fake",
                "pid": 0,
                "uptime": 0.0,
                "epoch": daemon.epoch,
                "seq": daemon.seq,
                "oldest": daemon.oldest,
                "subscribers": 0,
                "jobs_active": sum(not j.status.terminal for j in daemon.jobs.values()),
                "jobs_total": len(daemon.jobs),
                "socket": "",
                "state_dir": "",
            },
            "providers": [dict(entry) for entry in daemon.providers.values()],
        }

    async def submit(
        self,
        provider: str,
        model: str,
        prompt: str,
        *,
        images: list[str] | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        await self._request("submit", provider=provider, model=model, prompt=prompt, images=images, options=options)
        self.daemon._ids += 1
        job = f"{provider}-submitted-{self.daemon._ids}"
        self.daemon.emit(provider, job, State.QUEUED, origin=Origin.REQUEST, model=model, prompt=prompt)
        return {"jobs": [job]}

    async def track(self, provider: str, ref: str) -> dict[str, Any]:
        await self._request("track", provider=provider, ref=ref)
        if (provider, ref) not in self.daemon.jobs:
            self.daemon.emit(provider, ref, State.QUEUED, origin=Origin.POLL)
        return {"job": ref}

    async def cancel(self, provider: str, job: str) -> dict[str, Any]:
        await self._request("cancel", provider=provider, job=job)
        if self.daemon.cancel_error is not None:
            raise self.daemon.cancel_error
        if (provider, job) not in self.daemon.jobs:
            raise FakeFeedError("not_found", f"no job {provider}/{job}")
        self.daemon.emit(provider, job, State.CANCELLED, origin=Origin.REQUEST)
        return {"message": f"cancel requested for {provider}/{job}"}

    async def subscribe(
        self, *, since: Cursor = "now", snapshot: bool = False, filter: str = ""
    ) -> AsyncIterator[FeedItem]:
        self._check()
        daemon = self.daemon
        daemon.subscriptions.append(SubscribeCall(since, snapshot, filter))
        match = parse(filter)
        if snapshot:
            cursor = daemon.seq
            jobs = [job for job in daemon.jobs.values() if match(job)]
            chunk = daemon.snapshot_chunk
            for start in range(0, max(1, len(jobs)), chunk):
                yield Snapshot(seq=cursor, jobs=jobs[start : start + chunk], more=start + chunk < len(jobs))
        elif since == "now":
            cursor = daemon.seq
        elif since == "oldest":
            cursor = daemon.oldest - 1
        else:
            cursor = since
            if cursor < daemon.oldest - 1:
                yield Gap(first=cursor + 1, last=daemon.oldest - 1, reason="retention")
                cursor = daemon.oldest - 1
        live = False
        while True:
            self._check()
            changed = daemon._changed
            start = cursor - daemon.oldest + 1
            backlog = daemon.journal[start:]
            for n, event in enumerate(backlog):
                if match(event.data):
                    yield event
                if n % 500 == 499:
                    await anyio.lowlevel.checkpoint()  # a real socket yields too: do not starve the app
                    self._check()
            cursor = daemon.seq if not backlog else backlog[-1].seq
            if not live:
                live = True
                yield Live(seq=cursor)
            if daemon.seq == cursor:
                await changed.wait()
