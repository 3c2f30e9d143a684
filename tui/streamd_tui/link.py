"""The dashboard's one connection to the daemon: subscribe, resume, reconnect. No widgets here.

The link only queues frames on `Store.pending`; the app applies them on its timer. It remembers
the newest seq it received, so after a daemon restart it resumes with `since=<seq>` and misses
nothing; when the hello carries another epoch (the journal was reset), or a gap says events were
lost, or the filter changed, it starts over with a snapshot.
"""

from __future__ import annotations

import enum
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from streamd.events import CloudEvent, Job
from streamd.feed.protocol import Cursor, Gap, Hello, Live, Snapshot
from streamd.filters import FilterError, parse
from streamd_tui.model import Prune, Restart, Store

FeedItem = CloudEvent | Snapshot | Gap | Live


class Feed(Protocol):
    """What the dashboard uses of `streamd.feed.client.FeedClient` (so tests can pass a fake)."""

    @property
    def hello(self) -> Hello: ...

    async def jobs(self, *, filter: str = ..., active: bool = ..., limit: int = ...) -> list[Job]: ...

    async def status(self) -> dict[str, Any]: ...

    async def submit(
        self, provider: str, model: str, prompt: str, *, images: list[str] = ..., options: dict[str, Any] = ...
    ) -> dict[str, Any]: ...

    async def track(self, provider: str, ref: str) -> dict[str, Any]: ...

    async def cancel(self, provider: str, job: str) -> dict[str, Any]: ...

    def subscribe(self, *, since: Cursor = ..., snapshot: bool = ..., filter: str = ...) -> AsyncIterator[FeedItem]: ...


Connect = Callable[[Path], AbstractAsyncContextManager[Feed]]

RECONCILE_LIMIT = 5000

#: Seconds to wait before reconnect attempts 1, 2, 3...; the last one repeats.
DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    SYNCING = "syncing"  # connected, catching up (snapshot or journal) before `live`
    LIVE = "live"
    WAITING = "waiting"  # disconnected; retrying after `delay`


@dataclass(frozen=True, slots=True)
class LinkStatus:
    state: LinkState
    detail: str = ""
    delay: float | None = None
    attempt: int = 0
    epoch: str | None = None
    seq: int = 0


def has_status_term(expr: str) -> bool:
    try:
        return any(term.field == "status" for term in parse(expr).terms)
    except FilterError:
        return False


def describe(exc: BaseException) -> str:
    """One line for a person: the first real error inside any exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).splitlines()[0]


class FeedLink:
    """Keeps one subscription alive across daemon restarts, queueing frames for the app."""

    def __init__(
        self,
        socket: Path,
        connect: Connect,
        store: Store,
        *,
        on_status: Callable[[LinkStatus], None] = lambda status: None,
        delays: Sequence[float] = DELAYS,
        status_every: float = 2.0,
        reconcile_every: float = 5.0,
        filter: str = "",
    ) -> None:
        self.socket = socket
        self.connect = connect
        self.store = store
        self.on_status = on_status
        self.delays = tuple(delays) or DELAYS
        self.status_every = status_every
        self.reconcile_every = reconcile_every
        self.filter = filter
        self.client: Feed | None = None
        self.epoch: str | None = None
        self.cursor: int | None = None  # newest seq received in `epoch`; None: start over with a snapshot
        self.subscriptions: list[tuple[Cursor, bool, str]] = []  # what we asked for, in order
        self.status = LinkStatus(LinkState.CONNECTING)
        self._kick = anyio.Event()

    # -- control (called from the app) ------------------------------------------------------------
    def set_filter(self, text: str) -> None:
        """Re-subscribe with `text`: the daemon filters, and a fresh snapshot replaces the rows."""
        if text == self.filter:
            return
        self.filter = text
        self.restart()

    def restart(self) -> None:
        """Start over with a snapshot on a fresh connection (also cuts a reconnect wait short)."""
        self.cursor = None
        self._kick.set()

    # -- the loop ------------------------------------------------------------------------------------
    async def run(self) -> None:
        attempt = 0
        while True:
            self._kick = anyio.Event()
            kick = self._kick
            error: str | None = None
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._cancel_on, kick, tg.cancel_scope)
                    connected = await self._session()
                    tg.cancel_scope.cancel()
                if connected:
                    attempt = 0
            except Exception as exc:  # any failure of the daemon or the socket: say so and retry
                error = describe(exc)
                if self.client is not None:
                    attempt = 0
            finally:
                self.client = None
            if kick.is_set():
                continue
            delay = self.delays[min(attempt, len(self.delays) - 1)]
            attempt += 1
            self._report(LinkState.WAITING, error or "the daemon closed the feed", delay=delay, attempt=attempt)
            with anyio.move_on_after(delay):
                await self._kick.wait()

    async def _cancel_on(self, kick: anyio.Event, scope: anyio.CancelScope) -> None:
        await kick.wait()
        scope.cancel()

    async def _session(self) -> bool:
        """One connection: hello, subscribe (resume or snapshot), poll status. Returns when it ends."""
        self._report(LinkState.CONNECTING, str(self.socket))
        async with self.connect(self.socket) as client:
            self.client = client
            hello = client.hello
            if hello.epoch != self.epoch:
                self.epoch = hello.epoch
                self.cursor = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._poll_status, client)
                tg.start_soon(self._reconcile, client)
                await self._subscribe(client)
                tg.cancel_scope.cancel()
            return True

    async def _subscribe(self, client: Feed) -> None:
        """Follow one subscription until the daemon ends it, or a gap makes us start over."""
        pending = self.store.pending
        resume = self.cursor
        since: Cursor = "now" if resume is None else resume
        snapshot = resume is None
        if snapshot:
            assert self.epoch is not None
            pending.append(Restart(self.epoch))
        self.subscriptions.append((since, snapshot, self.filter))
        self._report(LinkState.SYNCING, "snapshot" if snapshot else f"resuming after seq {resume}")
        async for item in client.subscribe(since=since, snapshot=snapshot, filter=self.filter):
            pending.append(item)
            if isinstance(item, CloudEvent | Snapshot):
                self.cursor = item.seq
            elif isinstance(item, Live):
                self.cursor = max(self.cursor or 0, item.seq)
                self._report(LinkState.LIVE, "")
            else:  # a gap: rows may be stale, so start over at once rather than show a hole
                self.restart()
                return

    async def _poll_status(self, client: Feed) -> None:
        """Provider health and totals for every provider, including ones the filter hides."""
        while True:
            self.store.apply_status(await client.status())
            await anyio.sleep(self.status_every)

    async def _reconcile(self, client: Feed) -> None:
        """Under a status filter, drop the rows of jobs that left it (their last event was filtered out)."""
        while True:
            await anyio.sleep(self.reconcile_every)
            flt = self.filter
            if not has_status_term(flt) or self.cursor is None or self.status.state is not LinkState.LIVE:
                continue
            seq = self.cursor
            limit = max(RECONCILE_LIMIT, 2 * len(self.store.jobs))
            jobs = await client.jobs(filter=flt, limit=limit)
            if flt == self.filter and len(jobs) < limit:  # a truncated answer proves nothing
                self.store.pending.append(Prune(frozenset((j.provider, j.job) for j in jobs), seq))

    def _report(self, state: LinkState, detail: str, *, delay: float | None = None, attempt: int = 0) -> None:
        self.status = LinkStatus(state, detail, delay, attempt, self.epoch, self.cursor or 0)
        self.on_status(self.status)


async def fetch_history(connect: Connect, socket: Path, key: tuple[str, str], *, limit: int = 2000) -> list[CloudEvent]:
    """A job's whole kept history, read from the journal on a second, short-lived connection."""
    provider, job = key
    expr = f"provider:{shlex.quote(provider)} job:{shlex.quote(job)}"
    events: list[CloudEvent] = []
    async with connect(socket) as client:
        async for item in client.subscribe(since="oldest", snapshot=False, filter=expr):
            if isinstance(item, CloudEvent):
                if item.data.provider == provider and item.data.job == job:
                    events.append(item)
                    if len(events) >= limit:
                        break
            elif isinstance(item, Live):
                break
    return events
