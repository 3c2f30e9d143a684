"""Helpers shared by tests: a provider Context that records what a provider emits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from streamd.config import Config, DaemonFile, ProviderSettings, Secret
from streamd.daemon import Daemon
from streamd.events import EventData, Health, Job, Kind, Observation, Origin, State
from streamd.lifecycle import Tracker
from streamd.providers.base import Context, Provider, ProviderError, SubmitRequest


class RecordingContext:
    """A `providers.base.Context` backed by a real Tracker, without journal or feed.

    `observations` holds everything emitted; `events` what the tracker let through (what a
    subscriber would see); `healths` the health reports in order.
    """

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self.tracker = Tracker()
        self.observations: list[Observation] = []
        self.events: list[EventData] = []
        self.healths: list[tuple[Health, str | None, float | None]] = []
        self.follows: dict[str, dict[str, str]] = {}
        self._wake = anyio.Event()
        self._changed = anyio.Event()

    @property
    def provider(self) -> str:
        return self._provider

    async def emit(self, *observations: Observation) -> None:
        for obs in observations:
            self.observations.append(obs)
            self.events.extend(self.tracker.apply(obs, time.time()))
        self._changed.set()
        self._changed = anyio.Event()

    async def health(self, health: Health, *, message: str | None = None, delay: float | None = None) -> None:
        if not self.healths or self.healths[-1][:2] != (health, message):
            self.healths.append((health, message, delay))
        await self.emit(
            Observation(
                provider=self._provider,
                job=None,
                kind=Kind.HEALTH,
                upstream=health.value,
                origin=Origin.DAEMON,
                health=health,
                message=message,
                delay=delay,
            )
        )

    def unfinished(self) -> list[Job]:
        return self.tracker.unfinished(self._provider)

    def follow(self, job: str) -> Mapping[str, str]:
        return self.follows.get(job, {})

    async def remember(self, job: str, follow: Mapping[str, str]) -> None:
        self.follows[job] = dict(follow)
        self._wake.set()
        self._wake = anyio.Event()

    def wake(self) -> anyio.Event:
        return self._wake

    # -- for tests -----------------------------------------------------------------------------
    def job(self, job: str) -> Job | None:
        return self.tracker.get(self._provider, job)

    def states(self, job: str) -> list[str]:
        """The state sequence a subscriber saw for `job`."""
        return [e.status.value for e in self.events if e.job == job and e.kind is Kind.STATE and e.status]

    async def wait_for(self, predicate: object, within: float = 20.0) -> None:
        """Wait until predicate() is true, re-checking after every emit."""
        assert callable(predicate)
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()


# -- an in-process daemon with a scripted provider -------------------------------------------------


class ScriptedProvider(Provider):
    """A provider with no I/O: `submit` walks a job through `path`; tests call `push` directly."""

    name = "oxen"

    def __init__(self, name: str = "oxen", path: tuple[State, ...] = (State.QUEUED,)) -> None:
        super().__init__(ProviderSettings(name=name, key=Secret("scripted-key"), base_url="http://127.0.0.1:9"))
        self.provider = name
        self.path = path
        self.ctx: Context | None = None
        self.count = 0
        self.cancelled: list[str] = []

    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.ctx = ctx
        await ctx.health(Health.CONNECTED)
        task_status.started()
        await anyio.sleep_forever()

    async def push(self, job: str, state: State, **kw: object) -> None:
        assert self.ctx is not None
        await self.ctx.emit(
            Observation(
                provider=self.provider,
                job=job,
                kind=Kind.STATE,
                state=state,
                upstream=state.value,
                origin=Origin.PUSH,
                **kw,
            )  # type: ignore[arg-type]
        )

    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        if request.model == "refuse":
            raise ProviderError("bad_request", "Model not found: refuse")
        self.count += 1
        job = f"job{self.count}"
        for state in self.path:
            await self.push(job, state, model=request.model, prompt=request.prompt)
        return [job]

    async def track(self, ctx: Context, ref: str) -> str:
        await self.push(ref, State.RUNNING)
        return ref

    async def cancel(self, ctx: Context, job: str) -> str:
        self.cancelled.append(job)
        await self.push(job, State.CANCELLED)
        return f"cancelled {job}"


@contextlib.asynccontextmanager
async def running_daemon(
    tmp: Path, providers: dict[str, Provider] | None = None, **daemon_opts: object
) -> AsyncIterator[Daemon]:
    """A daemon on a socket under `tmp`, cancelled (cleanly) on exit."""
    cfg = Config(
        socket=tmp / "feed.sock",
        state_dir=tmp / "state",
        providers={},
        daemon=DaemonFile(**daemon_opts),  # type: ignore[arg-type]
    )
    daemon = Daemon(cfg, providers=providers if providers is not None else {"oxen": ScriptedProvider()})
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        yield daemon
        tg.cancel_scope.cancel()
