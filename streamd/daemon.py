"""The daemon: one root task group owning the journal writer, the feed, and every provider.

Start-up order is the readiness contract: journal open → feed listening → each provider's first
connection attempt → ready (sd_notify READY=1 when under systemd). A provider that crashes is
restarted with backoff and reported as `down`; it never takes the daemon with it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from streamd import __version__, filters
from streamd import providers as registry
from streamd.bus import Bus
from streamd.config import Config, ProviderSettings
from streamd.events import Health, Job, Kind, Observation, Origin
from streamd.feed import protocol as p
from streamd.feed.server import FeedServer, RequestError, group_id
from streamd.journal import Journal, JournalError, Retention, decode_follow, encode_follow
from streamd.lifecycle import Tracker
from streamd.pipeline import Pipeline
from streamd.providers.base import Provider, ProviderError, SubmitRequest
from streamd.sidecar import Batch, Sidecar, stream_from_bus
from streamd.transport.backoff import Reconnector

log = logging.getLogger("streamd.daemon")

STALL_CHECK = 10.0  # seconds between looks for stalled jobs
READY_TIMEOUT = 30.0  # a provider that has not finished its first attempt by then does not hold readiness
TRIM_EVERY = 3600.0


class _Started:
    """A TaskStatus that only records that the provider got going."""

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


@dataclass
class ProviderState:
    name: str
    health: Health = Health.STARTING
    message: str | None = None
    delay: float | None = None
    since: float = field(default_factory=time.time)
    restarts: int = 0


class ProviderContext:
    """The daemon side of `providers.base.Context` for one provider."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.daemon = daemon
        self._name = name
        self.state = ProviderState(name)
        self.started = anyio.Event()
        self._wake = anyio.Event()

    @property
    def provider(self) -> str:
        return self._name

    async def emit(self, *observations: Observation) -> None:
        await self.daemon.pipeline.emit(*observations)

    async def health(self, health: Health, *, message: str | None = None, delay: float | None = None) -> None:
        st = self.state
        if (st.health, st.message) == (health, message) and health not in (Health.RECONNECTING, Health.DOWN):
            return
        st.health, st.message, st.delay, st.since = health, message, delay, time.time()
        await self.emit(
            Observation(
                provider=self._name,
                job=None,
                kind=Kind.HEALTH,
                upstream=f"connection.{health.value}",
                origin=Origin.DAEMON,
                health=health,
                message=message,
                delay=delay,
            )
        )
        self.daemon.health_changed()

    def unfinished(self) -> list[Job]:
        return self.daemon.tracker.unfinished(self._name)

    def follow(self, job: str) -> Mapping[str, str]:
        return self.daemon.follows.get((self._name, job), {})

    async def remember(self, job: str, follow: Mapping[str, str]) -> None:
        data = dict(follow)
        self.daemon.follows[(self._name, job)] = data
        await anyio.to_thread.run_sync(self.daemon.journal.remember, self._name, job, encode_follow(data))
        self.poke()

    def wake(self) -> anyio.Event:
        return self._wake

    def poke(self) -> None:
        self._wake.set()
        self._wake = anyio.Event()


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        providers: Mapping[str, Provider] | None = None,
        listener: socket.socket | None = None,
        on_ready: Callable[[Daemon], Awaitable[None]] | None = None,
        sidecars: Sequence[Sidecar] = (),
    ) -> None:
        self.config = config
        self._providers_given = providers
        self._listener = listener
        self._on_ready = on_ready
        self.sidecars = list(sidecars)
        self.providers: dict[str, Provider] = {}
        self.contexts: dict[str, ProviderContext] = {}
        self._scopes: dict[str, anyio.CancelScope] = {}
        self.follows: dict[tuple[str, str], dict[str, str]] = {}
        self.started_at = time.time()
        self.ready = anyio.Event()
        self._status_changed = anyio.Event()
        self._tg: TaskGroup | None = None
        self.journal: Journal
        self.tracker: Tracker
        self.bus: Bus
        self.pipeline: Pipeline
        self.feed: FeedServer

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        retention = Retention(cfg.daemon.retention_events, cfg.daemon.retention_days * 86400)
        self.journal = await anyio.to_thread.run_sync(Journal, cfg.state_dir / "journal.sqlite3", retention)
        try:
            await self._run(task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.journal.close)

    async def _run(self, task_status: TaskStatus[Daemon]) -> None:
        cfg = self.config
        self.tracker = Tracker()
        for job, follow, provider, job_id in await anyio.to_thread.run_sync(self.journal.unfinished):
            if job is not None:
                self.tracker.restore([job])
            if follow:
                self.follows[(provider, job_id)] = decode_follow(follow)
        readers = anyio.CapacityLimiter(4)  # catch-up reads in flight; more lagging readers wait their turn

        async def read_after(seq: int, limit: int) -> list[tuple[int, bytes]]:
            return await anyio.to_thread.run_sync(self.journal.read_after, seq, limit, limiter=readers)

        self.bus = Bus(self.journal.last_seq, read_after, lambda: self.journal.oldest)
        self.pipeline = Pipeline(self.journal, self.tracker, self.bus, source=f"urn:streamd:{_host()}")
        try:
            gid = group_id(cfg.daemon.socket_group)
        except ValueError as exc:
            raise DaemonError(f"daemon.socket_group: {exc}") from None
        self.feed = FeedServer(
            bus=self.bus,
            hello=self.hello,
            oldest=lambda: self.journal.oldest,
            snapshot=self._snapshot,
            handle=self.handle,
            path=cfg.socket,
            mode=int(cfg.daemon.socket_mode, 8),
            group=gid,
            listener=self._listener,
        )
        try:
            await self.feed.bind()
        except OSError as exc:
            raise DaemonError(f"feed socket {cfg.socket}: {exc.strerror or exc}") from None
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.pipeline.writer)
            await tg.start(self.pipeline.checkpointer)
            await tg.start(self.feed.serve)
            await self._start_providers(tg)
            for sidecar in self.sidecars:
                tg.start_soon(self._supervise_sidecar, sidecar)
            tg.start_soon(self._housekeeping)
            self.ready.set()
            log.info(
                "streamd %s ready: socket %s, journal %s (epoch %s, seq %d), providers: %s",
                __version__,
                cfg.socket,
                self.journal.path,
                self.journal.epoch,
                self.journal.last_seq,
                ", ".join(self.providers) or "none",
            )
            if not self.providers:
                log.warning(
                    "no provider has a key: set OXEN_API_KEY, WIRO_API_KEY (+WIRO_API_SECRET), RUNWARE_API_KEY or "
                    "APIFRAME_API_KEY, or name key files in the config; the feed runs anyway"
                )
            if self._on_ready is not None:
                await self._on_ready(self)
            task_status.started(self)
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.move_on_after(3, shield=True):
                    for prov in self.providers.values():
                        await prov.aclose()

    async def _start_providers(self, tg: TaskGroup) -> None:
        given = self._providers_given
        settings: dict[str, ProviderSettings] = self.config.providers
        for name in sorted(given or settings):
            self._launch(tg, name, given[name] if given is not None else registry.create(settings[name]))
        with anyio.move_on_after(READY_TIMEOUT):
            for ctx in self.contexts.values():
                await ctx.started.wait()

    def _launch(self, tg: TaskGroup, name: str, provider: Provider) -> None:
        self.providers[name] = provider
        ctx = self.contexts.get(name) or ProviderContext(self, name)
        ctx.started = anyio.Event()
        self.contexts[name] = ctx
        scope = anyio.CancelScope()
        self._scopes[name] = scope
        tg.start_soon(self._supervise, provider, ctx, scope)

    async def reload(self, config: Config) -> None:
        """SIGHUP: apply a new configuration without dropping subscribers. Providers whose
        settings changed (a rotated key, a new URL) are restarted; the feed is untouched."""
        old = self.config.providers
        self.config = config
        if self._tg is None or self._providers_given is not None:
            return
        for name in sorted(set(old) | set(config.providers)):
            if old.get(name) == config.providers.get(name):
                continue
            if name in self._scopes:
                self._scopes.pop(name).cancel()
                with anyio.move_on_after(3, shield=True):
                    await self.providers.pop(name).aclose()
            if name in config.providers:
                self._launch(self._tg, name, registry.create(config.providers[name]))
                log.info("reload: provider %s (re)started", name)
            else:
                await self.contexts[name].health(Health.STOPPED, message="disabled by reload")
                log.info("reload: provider %s stopped", name)
        log.info("configuration reloaded")

    async def _supervise(self, provider: Provider, ctx: ProviderContext, scope: anyio.CancelScope) -> None:
        with scope:
            await self._supervised(provider, ctx)

    async def _supervised(self, provider: Provider, ctx: ProviderContext) -> None:
        policy = Reconnector(initial=1.0, maximum=60.0, healthy_after=60.0)
        while True:
            policy.connected(time.monotonic())
            try:
                await provider.run(ctx, task_status=_Started(ctx.started))
                message = "provider stopped"
            except Exception as exc:
                log.exception("provider %s crashed", ctx.provider)
                message = f"crashed: {type(exc).__name__}; restarting"
            ctx.started.set()
            ctx.state.restarts += 1
            delay = policy.delay(time.monotonic())
            await ctx.health(Health.DOWN, message=message, delay=delay)
            await anyio.sleep(delay)

    async def _supervise_sidecar(self, sidecar: Sidecar) -> None:
        policy = Reconnector(initial=1.0, maximum=60.0, healthy_after=60.0)
        while True:
            policy.connected(time.monotonic())
            try:
                await sidecar.run(self)
            except Exception:
                log.exception("%s crashed; restarting", sidecar.name)
            await anyio.sleep(policy.delay(time.monotonic()))

    # -- sidecar host ------------------------------------------------------------------------------
    @property
    def epoch(self) -> str:
        return self.journal.epoch

    @property
    def daemon_id(self) -> str:
        return f"{_host()}:{self.journal.epoch}"

    def head(self) -> int:
        return self.bus.head

    def stream(self, cursor: int, flt: filters.Filter = filters.MATCH_ALL) -> AsyncIterator[Batch]:
        return stream_from_bus(self.bus, cursor, flt)

    async def emit(self, *observations: Observation) -> None:
        await self.pipeline.emit(*observations)

    async def get_meta(self, key: str) -> str | None:
        return await anyio.to_thread.run_sync(self.journal.get_meta, key)

    async def set_meta(self, key: str, value: str) -> None:
        await anyio.to_thread.run_sync(self.journal.set_meta, key, value)

    async def _housekeeping(self) -> None:
        last_trim = time.monotonic()
        while True:
            await anyio.sleep(STALL_CHECK)
            stalled = self.tracker.stalled(time.time(), self.config.daemon.stalled_after)
            if stalled:
                await self.pipeline.emit(*stalled)
            live = {j.key for j in self.tracker.unfinished()}
            for key in [k for k in self.follows if k not in live]:
                del self.follows[key]
            if time.monotonic() - last_trim > TRIM_EVERY:
                last_trim = time.monotonic()
                try:
                    await anyio.to_thread.run_sync(self.journal.trim)
                except JournalError as exc:
                    log.error("%s", exc)

    def health_changed(self) -> None:
        self._status_changed.set()
        self._status_changed = anyio.Event()

    async def status_changed(self) -> None:
        await self._status_changed.wait()

    # -- feed ------------------------------------------------------------------------------------
    def hello(self) -> p.Hello:
        return p.Hello(
            protocol=p.PROTOCOL_VERSION,
            server=f"streamd {__version__}",
            epoch=self.journal.epoch,
            seq=self.bus.head,
            oldest=self.journal.oldest,
        )

    async def _snapshot(self) -> tuple[int, list[Any]]:
        seq, jobs = await anyio.to_thread.run_sync(self.journal.snapshot)
        return seq, jobs

    def status(self) -> dict[str, Any]:
        now = time.time()
        total, active = len(self.tracker), len(self.tracker.unfinished())
        providers = []
        for name, ctx in self.contexts.items():
            st = ctx.state
            providers.append(
                {
                    "name": name,
                    "health": st.health.value,
                    "message": st.message,
                    "delay": st.delay,
                    "since": st.since,
                    "events": self.pipeline.stats.emitted.get(name, 0),
                    "jobs_active": len(self.tracker.unfinished(name)),
                    "restarts": st.restarts,
                }
            )
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime": now - self.started_at,
                "epoch": self.journal.epoch,
                "seq": self.bus.head,
                "oldest": self.journal.oldest,
                "subscribers": len(self.bus.subscribers),
                "connections": self.feed.connections,
                "jobs_active": active,
                "jobs_cached": total,
                "socket": str(self.config.socket),
                "state_dir": str(self.config.state_dir),
                "journal_error": self.pipeline.stats.journal_error,
                "archive_dir": str(self._archive_dir()) if self.config.archive.enabled else None,
                "sidecars": [s.name for s in self.sidecars],
            },
            "providers": providers,
        }

    def _archive_dir(self) -> Path:
        if self.config.archive.dir:
            return Path(self.config.archive.dir).expanduser().absolute()
        return (self.config.state_dir / "archive").absolute()

    async def handle(self, req: p.AnyRequest) -> Any:
        if isinstance(req, p.Status):
            return self.status()
        if isinstance(req, p.Jobs):
            return await self._jobs(req)
        if isinstance(req, p.Track | p.Submit | p.Cancel):
            return await self._provider_request(req)
        raise RequestError("unknown_op", f"unsupported request {type(req).__name__}")

    async def _jobs(self, req: p.Jobs) -> list[Job]:
        try:
            flt = filters.parse(req.filter)
        except filters.FilterError as exc:
            raise RequestError("bad_filter", str(exc)) from None
        limit = max(1, min(req.limit, 1_000_000))
        await self.pipeline.sync()

        def query() -> list[Job]:
            if not flt:
                return self.journal.jobs(active=req.active, limit=limit)
            out: list[Job] = []
            for job in self.journal.iter_jobs():
                if (not req.active or not job.status.terminal) and flt(job):
                    out.append(job)
                    if len(out) >= limit:
                        break
            return out

        return await anyio.to_thread.run_sync(query)

    async def _provider_request(self, req: p.Track | p.Submit | p.Cancel) -> dict[str, Any]:
        provider = self.providers.get(req.provider)
        ctx = self.contexts.get(req.provider)
        if provider is None or ctx is None:
            enabled = ", ".join(self.providers) or "none"
            known = ", ".join(registry.PROVIDERS)
            if req.provider in registry.PROVIDERS:
                msg = f"provider {req.provider!r} is not enabled (no API key configured); enabled: {enabled}"
                raise RequestError("provider_disabled", msg)
            raise RequestError("unknown_provider", f"unknown provider {req.provider!r} (known: {known})")
        try:
            if isinstance(req, p.Submit):
                sub = SubmitRequest(model=req.model, prompt=req.prompt, images=req.images, options=req.options)
                jobs = await provider.submit(ctx, sub)
                result: dict[str, Any] = {"jobs": jobs}
            elif isinstance(req, p.Track):
                result = {"job": await provider.track(ctx, req.ref)}
            else:
                result = {"message": await provider.cancel(ctx, req.job)}
        except ProviderError as exc:
            raise RequestError(exc.code, f"{req.provider}: {exc.message}") from None
        ctx.poke()
        await self.pipeline.sync()  # the reply means: it is in the journal, `jobs` shows it
        return result


class DaemonError(Exception):
    """The daemon cannot start: one line that says what and where."""


def _host() -> str:
    return socket.gethostname() or "localhost"
