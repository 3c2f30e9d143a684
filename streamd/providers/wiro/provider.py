"""Wiro's I/O: one task WebSocket for every tracked task, plus `/Task/Detail` repair polls.

The socket pushes every lifecycle step but replays nothing: a frame sent while we were away, or
before a token was registered, is gone. So after each (re)connect and (re)registration, and for
any task quiet for `quiet` seconds, the poller reads `/Task/Detail` and emits what was missed
(`origin: poll`); the tracker drops what we already knew. The socket never says whether a task
succeeded, so `task_postprocess_end` is settled with the `pexit` from `/Task/Detail`.

Task tokens (`socketaccesstoken`) are credentials: they go to `ctx.remember` (so a restarted
daemon can re-register them), into `task_info` frames and request bodies, and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from streamd.config import ProviderSettings
from streamd.events import TERMINAL, Health, Kind, Observation, Origin, State
from streamd.providers.base import Context, Provider, ProviderError, SubmitRequest
from streamd.providers.wiro import normalise
from streamd.providers.wiro.client import USER_AGENT, WiroClient, is_url, read_upload
from streamd.transport.backoff import Reconnector

log = logging.getLogger(__name__)
#: websockets traces every frame at DEBUG, and `task_info` frames carry task tokens: its logger for
#: our connections is pinned at INFO, so frame tracing stays off even when streamd logs at debug.
socket_log = logging.getLogger(__name__ + ".socket")
socket_log.setLevel(logging.INFO)
T = TypeVar("T")

DEFAULT_QUIET = 15.0  # seconds without news before a task's repair poll
POLL_CONCURRENCY = 4
MAX_FRAME = 8 * 1024 * 1024  # LLM frames carry the whole accumulated text
CLOSE_TIMEOUT = 3.0
AUTH_PROBE_MAX = 60  # while the key is rejected, probe at most every quiet * 60 seconds (15 minutes)
IDLE_DOUBLINGS = 3  # a task that keeps not changing waits up to quiet * 2**3 seconds between polls
SETTLE_TRIES = 4  # Detail reads to find `pexit` after a task_postprocess_end frame
EARLY = frozenset({State.QUEUED, State.ACCEPTED, State.PREPROCESSING})
ENDED = {"task_postprocess_end": "finished", "task_cancel": "was cancelled", "task_error": "failed"}


@dataclass
class _Task:
    id: str
    token: str | None
    seen: float  # anyio clock: last frame or poll about this task
    missing: int = 0  # consecutive polls that found no such task
    status: str = ""  # the last Detail status a poll saw
    idle: int = 0  # consecutive polls that found nothing new: each doubles the wait (IDLE_DOUBLINGS times)

    def due(self, quiet: float) -> float:
        return self.seen + quiet * (1 << min(self.idle, IDLE_DOUBLINGS))


class WiroProvider(Provider):
    name = "wiro"

    def __init__(self, settings: ProviderSettings, *, client: WiroClient | None = None) -> None:
        super().__init__(settings)
        self.client = client or WiroClient(settings)
        opts = settings.options
        self.quiet = float(settings.poll_interval or opts.get("quiet", DEFAULT_QUIET))
        self.reconnect_initial = float(opts.get("reconnect_initial", 1.0))
        self.reconnect_max = float(opts.get("reconnect_max", 60.0))
        # WebSocket keepalive: a socket that stops answering pings for this long is dropped and reopened.
        self.ping_interval = float(opts.get("ping_interval", 20.0))
        self.ping_timeout = float(opts.get("ping_timeout", 20.0))
        self.connections = 0  # sockets opened so far (status, tests)
        self._tasks: dict[str, _Task] = {}
        self._urgent: set[str] = set()
        self._settling: set[str] = set()  # tasks whose task_postprocess_end awaits its pexit
        self._poke: anyio.Event | None = None  # wakes the poller
        self._registry: anyio.Event | None = None  # wakes the registration loop
        self._tg: TaskGroup | None = None
        self._attempted = False
        self._ws_up = False
        self._ws_error: str | None = None
        self._ws_delay: float | None = None
        self._auth_error: str | None = None
        self._auth_probes = 0  # probes sent since the key was rejected
        self._limited_until = 0.0

    # -- the long-running part ------------------------------------------------------------------------
    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._poke, self._registry = anyio.Event(), anyio.Event()
        self._adopt(ctx)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._poller, ctx)
                await tg.start(self._socket, ctx)
                task_status.started()
        finally:
            self._tg = None

    async def _socket(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        url = self.settings.socket_url
        if not url:  # poll-only: still correct, only slower to notice changes
            self._attempted = True
            await self._report(ctx)
            task_status.started()
            await anyio.sleep_forever()
            return
        reconnector = Reconnector(initial=self.reconnect_initial, maximum=self.reconnect_max)
        started = False
        while True:
            error: str | None = None
            ws: ClientConnection | None = None
            try:
                ws = await connect(
                    url,
                    open_timeout=15,
                    ping_interval=self.ping_interval,
                    ping_timeout=self.ping_timeout,
                    close_timeout=CLOSE_TIMEOUT,
                    max_size=MAX_FRAME,
                    max_queue=64,
                    user_agent_header=USER_AGENT,
                    logger=socket_log,
                )
                reconnector.connected(anyio.current_time())
                self.connections += 1
                self._attempted, self._ws_up, self._ws_error = True, True, None
                await self._report(ctx)
                if not started:
                    started = True
                    task_status.started()
                error = await self._session(ctx, ws)
            except (OSError, TimeoutError, WebSocketException) as exc:
                error = _describe(exc)
            finally:
                self._ws_up = False
                if ws is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                        await ws.close()
            delay = reconnector.delay(anyio.current_time())
            self._attempted, self._ws_error, self._ws_delay = True, error, delay
            log.info("wiro socket down (%s); reconnecting in %.1fs", error, delay)
            await self._report(ctx)
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(delay)

    async def _session(self, ctx: Context, ws: ClientConnection) -> str:
        """Register every task on this connection and read frames until it ends; returns why it ended."""
        registered: set[str] = set()
        error = "closed by Wiro"
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._register, ws, registered)
            try:
                async for message in ws:
                    await self._on_message(ctx, message)
            except ConnectionClosed as exc:
                error = _describe(exc)
            tg.cancel_scope.cancel()
        return error

    async def _register(self, ws: ClientConnection, registered: set[str]) -> None:
        """Send `task_info` for each task token not yet on this connection, then ask for a repair
        poll of those tasks: frames sent before registration are lost."""
        try:
            while True:
                self._registry = wake = anyio.Event()
                todo = [(t.id, t.token) for t in list(self._tasks.values()) if t.token and t.token not in registered]
                for ident, token in todo:
                    await ws.send(json.dumps({"type": "task_info", "tasktoken": token}))
                    registered.add(token)
                    self._urgent.add(ident)
                if todo:
                    self._kick()
                await wake.wait()
        except ConnectionClosed:
            return  # the reader sees the close as well

    async def _on_message(self, ctx: Context, message: str | bytes) -> None:
        frame = normalise.decode(message)
        if not isinstance(frame, dict):
            await ctx.emit(*normalise.frame_observations(frame))
            return
        kind = frame.get("type")
        if kind == "connected":
            log.debug("wiro socket greeting, version %s", frame.get("version"))
            return
        ident = self._ident(frame)
        task = self._tasks.get(ident) if ident else None
        if task is not None:
            task.seen, task.idle = anyio.current_time(), 0
        if kind == "task_postprocess_end" and ident and "pexit" not in frame and self._tg is not None:
            if ident not in self._settling:  # one settle per task, however many copies arrive
                self._settling.add(ident)
                self._tg.start_soon(self._settle_end, ctx, ident, frame)
            return
        observations = normalise.frame_observations(frame, job=ident)
        await ctx.emit(*observations)
        self._forget_finished(observations)
        if kind == "task_error" and ident and task is not None and self._early(ctx, ident):
            self._urgent.add(ident)  # before the run, stderr may mean a fatal error: Detail knows
            self._kick()

    async def _settle_end(self, ctx: Context, ident: str, frame: dict[str, Any]) -> None:
        """Decide a `task_postprocess_end` frame with `pexit` from `/Task/Detail` (which may lag)."""
        try:
            await self._settle(ctx, ident, frame)
        finally:
            self._settling.discard(ident)

    async def _settle(self, ctx: Context, ident: str, frame: dict[str, Any]) -> None:
        record: dict[str, Any] | None = None
        for attempt in range(SETTLE_TRIES):
            try:
                record = await self._rest(ctx, lambda: self.client.detail(taskid=ident))
            except ProviderError as exc:
                log.info("wiro: reading task %s after its last frame failed: %s", ident, exc.message)
            else:
                if record.get("status") in normalise.TERMINAL_STATUSES:
                    break
            await anyio.sleep(0.25 * (attempt + 1))
        observations = normalise.frame_observations(frame, job=ident, task=record)
        await ctx.emit(*observations)
        if not self._forget_finished(observations) and ident in self._tasks:
            self._urgent.add(ident)
            self._kick()

    async def _poller(self, ctx: Context) -> None:
        """Repair polls: urgent tasks at once, others once they have been quiet for `quiet` seconds."""
        await self._probe(ctx)
        limiter = anyio.CapacityLimiter(POLL_CONCURRENCY)
        while True:
            self._poke = poke = anyio.Event()
            self._adopt(ctx)
            now = anyio.current_time()
            if now < self._limited_until:
                await anyio.sleep(self._limited_until - now)
                continue
            if self._limited_until:
                await self._recovered(ctx)  # the window Wiro asked for has passed
            if self._auth_error:
                # A rejected key stays rejected: no poll per task (a 401 each, for ever, is what gets keys
                # blocked), one probe after a growing wait. Any accepted request clears the error.
                wait = self.quiet * min(2**self._auth_probes, AUTH_PROBE_MAX)
                self._auth_probes += 1
                with anyio.move_on_after(wait):
                    await poke.wait()
                if self._auth_error:
                    await self._probe(ctx)
                continue
            self._auth_probes = 0
            due = [t.id for t in self._tasks.values() if t.id in self._urgent or now >= t.due(self.quiet)]
            self._urgent.difference_update(due)
            if due:
                for ident in due:
                    self._tasks[ident].seen = now
                async with anyio.create_task_group() as tg:
                    for ident in due:
                        tg.start_soon(self._poll, ctx, ident, limiter)
                continue
            wait = min((t.due(self.quiet) for t in self._tasks.values()), default=now + self.quiet) - now
            with anyio.move_on_after(max(wait, 0.01)):
                await poke.wait()

    async def _poll(self, ctx: Context, ident: str, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            task = self._tasks.get(ident)
            if task is None:
                return
            try:
                record = await self._rest(ctx, lambda: self.client.detail(taskid=ident))
            except ProviderError as exc:
                if exc.code == "not_found":
                    task.missing += 1
                    if task.missing == 1:
                        note = f"Wiro reports no task {ident}; still checking every {self.quiet:.0f}s"
                        await ctx.emit(normalise.diagnostic(note, {"id": ident}, job=ident, origin=Origin.POLL))
                else:
                    log.info("wiro repair poll of task %s failed: %s", ident, exc.message)
                return
            task.missing = 0
            status = normalise.scalar(record.get("status"))
            task.idle, task.status = (task.idle + 1 if status == task.status else 0), status
            token = record.get("socketaccesstoken")
            if isinstance(token, str) and token and token != task.token:
                task.token = token  # restored without its token: learn it, remember it, register it
                await ctx.remember(ident, {"token": token})
                self._kick_registry()
            observations = normalise.detail_observations(record, origin=Origin.POLL)
            await ctx.emit(*observations)
            self._forget_finished(observations)

    async def _probe(self, ctx: Context) -> None:
        """One cheap authenticated request, so a wrong key shows as AUTH_FAILED before any task."""
        with contextlib.suppress(ProviderError):
            await self._rest(ctx, lambda: self.client.detail(taskid="0"))

    # -- requests -----------------------------------------------------------------------------------
    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        owner, _, project = request.model.strip().strip("/").partition("/")
        if not owner or not project or "/" in project:
            raise ProviderError(
                "bad_request", f"Wiro model must be 'owner/model' (e.g. bytedance/seedream-v4), not {request.model!r}"
            )
        options = _wiro_options(request.options)
        field = str(options.pop("image_field", "inputImage"))
        params: dict[str, Any] = {**options, "prompt": request.prompt}
        urls = [i for i in request.images if is_url(i)]
        uploads = [await read_upload(field, i) for i in request.images if not is_url(i)]
        if urls:
            params[field] = urls if len(urls) > 1 or uploads else urls[0]
        result = await self._rest(ctx, lambda: self.client.run(owner, project, params, uploads))
        await ctx.remember(result.taskid, {"token": result.token})
        await ctx.emit(
            Observation(
                provider=self.name,
                job=result.taskid,
                kind=Kind.STATE,
                state=State.QUEUED,
                upstream="task_queue",
                origin=Origin.REQUEST,
                model=f"{owner}/{project}",
                prompt=request.prompt,
                raw={"result": True, "taskid": result.taskid},
            )
        )
        self._follow(result.taskid, result.token)
        return [result.taskid]

    async def track(self, ctx: Context, ref: str) -> str:
        """Follow a task by its token (socketaccesstoken) or its numeric task id."""
        ref = ref.strip()
        if not ref:
            raise ProviderError("bad_request", "give a Wiro task id or task token to track")
        by_id = ref.isdigit()
        try:
            if by_id:
                record = await self._rest(ctx, lambda: self.client.detail(taskid=ref))
            else:
                record = await self._rest(ctx, lambda: self.client.detail(token=ref))
        except ProviderError as exc:
            if exc.code != "not_found":
                raise
            what = f"Wiro has no task {ref}" if by_id else "Wiro has no task with that token"
            raise ProviderError("not_found", what) from None
        ident = normalise.scalar(record.get("id"))
        if not ident:
            raise ProviderError("unavailable", "Wiro's task record has no id")
        token = record.get("socketaccesstoken")
        token = token if isinstance(token, str) and token else None if by_id else ref
        if token:
            await ctx.remember(ident, {"token": token})
        observations = normalise.detail_observations(record, origin=Origin.POLL)
        await ctx.emit(*observations)
        if not _finished(observations):
            self._follow(ident, token)
        return ident

    async def cancel(self, ctx: Context, job: str) -> str:
        """Cancel a queued task, kill one past the queue (Wiro has one endpoint for each)."""
        try:
            record = await self._rest(ctx, lambda: self.client.detail(taskid=job))
        except ProviderError as exc:
            if exc.code == "not_found":
                raise ProviderError("not_found", f"Wiro has no task {job}") from None
            raise
        status = normalise.scalar(record.get("status"))
        if status in ENDED:
            raise ProviderError("cannot_cancel", f"Wiro task {job} already {ENDED[status]}")
        if status == "task_queue":
            try:
                answer = await self._rest(ctx, lambda: self.client.cancel(job))
                done = f"cancelled queued Wiro task {job}"
            except ProviderError as exc:
                if exc.code != "cannot_cancel":
                    raise
                answer = await self._rest(ctx, lambda: self.client.kill(job))  # it left the queue meanwhile
                done = f"killed Wiro task {job} (it had just left the queue)"
        else:
            answer = await self._rest(ctx, lambda: self.client.kill(job))
            done = f"killed Wiro task {job} ({status or 'running'})"
        if answer is not None:
            observations = normalise.detail_observations(answer, origin=Origin.REQUEST, history=False)
            await ctx.emit(*observations)
            self._forget_finished(observations)
        if job in self._tasks:
            self._urgent.add(job)
            self._kick()
        return done

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- bookkeeping ------------------------------------------------------------------------------
    def _follow(self, ident: str, token: str | None) -> None:
        task = self._tasks.get(ident)
        if task is None:
            self._tasks[ident] = _Task(ident, token, anyio.current_time())
        elif token and not task.token:
            task.token = token
        self._kick_registry()
        self._kick()

    def _adopt(self, ctx: Context) -> None:
        """Take on unfinished jobs the daemon knows (after a restart, or tracked by another path)."""
        for job in ctx.unfinished():
            if job.job not in self._tasks:
                token = ctx.follow(job.job).get("token") or None
                self._tasks[job.job] = _Task(job.job, token, anyio.current_time())
                self._urgent.add(job.job)
                self._kick_registry()

    def _forget_finished(self, observations: list[Observation]) -> bool:
        done = False
        for obs in observations:
            if obs.kind is Kind.STATE and obs.state in TERMINAL and obs.job:
                self._tasks.pop(obs.job, None)
                self._urgent.discard(obs.job)
                done = True
        return done

    def _ident(self, frame: dict[str, Any]) -> str | None:
        ident = normalise.scalar(frame.get("id"))
        if ident:
            return ident
        token = frame.get("tasktoken")
        if isinstance(token, str) and token:
            return next((t.id for t in self._tasks.values() if t.token == token), None)
        return None

    def _early(self, ctx: Context, ident: str) -> bool:
        job = next((j for j in ctx.unfinished() if j.job == ident), None)
        return job is None or job.status in EARLY

    def _kick(self) -> None:
        if self._poke is not None:
            self._poke.set()

    def _kick_registry(self) -> None:
        if self._registry is not None:
            self._registry.set()

    async def _rest(self, ctx: Context, call: Callable[[], Awaitable[T]]) -> T:
        """A REST call whose outcome also says how the account's credentials and limits stand."""
        try:
            result = await call()
        except ProviderError as exc:
            if exc.code == "auth":
                if self._auth_error != exc.message:
                    self._auth_error = exc.message
                    await self._report(ctx)
            elif exc.code == "rate_limited":
                self._limited_until = anyio.current_time() + (exc.retry_after or 1.0)
                await ctx.health(Health.RATE_LIMITED, message=exc.message, delay=exc.retry_after)
                self._kick()  # the poller holds off until the window passes, then says so
            elif exc.code != "unavailable":
                await self._recovered(ctx)  # a reasoned refusal means the credentials were accepted
            raise
        await self._recovered(ctx)
        return result

    async def _recovered(self, ctx: Context) -> None:
        if self._auth_error is not None or self._limited_until:
            self._auth_error, self._limited_until = None, 0.0
            await self._report(ctx)

    async def _report(self, ctx: Context) -> None:
        if self._auth_error is not None:
            await ctx.health(Health.AUTH_FAILED, message=self._auth_error)
        elif not self._attempted:
            return
        elif not self.settings.socket_url:
            await ctx.health(Health.POLLING)
        elif self._ws_up:
            await ctx.health(Health.CONNECTED)
        else:
            await ctx.health(Health.RECONNECTING, message=self._ws_error, delay=self._ws_delay)


def _wiro_options(options: dict[str, Any]) -> dict[str, Any]:
    """The CLI's generic options in Wiro's (Seedream's) terms: num → maxImages, width and height → size."""
    out = dict(options)
    if out.pop("sync", False):
        raise ProviderError("unsupported", "Wiro has no synchronous endpoint: submit without --sync")
    if "num" in out:
        out.setdefault("maxImages", out.pop("num"))
    if "width" in out and "height" in out:
        out.setdefault("size", f"{out.pop('width')}x{out.pop('height')}")
    return out


def _finished(observations: list[Observation]) -> bool:
    return any(o.kind is Kind.STATE and o.state in TERMINAL for o in observations)


def _describe(exc: BaseException) -> str:
    """Why the socket failed, in a few words (no URL parameters, no tokens)."""
    if isinstance(exc, InvalidStatus):
        return f"socket handshake refused (HTTP {exc.response.status_code})"
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        return f"socket closed (code {frame.code})" if frame is not None else "socket dropped"
    if isinstance(exc, TimeoutError):
        return "socket connect timed out"
    if isinstance(exc, OSError):
        return f"socket connect failed ({exc.strerror or type(exc).__name__})"
    return f"socket error ({type(exc).__name__})"
