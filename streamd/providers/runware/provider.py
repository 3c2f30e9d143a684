"""Runware: one persistent WebSocket, with getResponse polling as the repair path.

I/O only; every frame goes through `normalise.Normaliser`. What the socket loop does and why:

- The first message on a connection is the `authentication` task. Its reply carries a
  `connectionSessionUUID`; re-authenticating with it after a disconnect makes Runware deliver the
  results it buffered for that session (for up to 120 s). The UUID is remembered per job so a
  restarted daemon can resume the session too.
- Runware closes a connection after 120 s without messages, so a `ping` task goes out every
  `ping_interval`; a connection that sends nothing for `pong_timeout` is treated as dead.
- Repair: when a reconnect resumed the session, tasks that hear nothing within `resume_grace` are
  polled with `getResponse`; when the session was lost (new UUID, or the socket was down longer
  than the resume window) every open task is polled at once and from then on by polling, since its
  results will never be pushed again. Polls go over the socket when it is up, else over REST.
- An `invalidApiKey` answer stops the loop (AUTH_FAILED) instead of reconnecting in a storm.

Options (`ProviderSettings.options`, the emulator sets small ones): ping_interval, pong_timeout,
resume_window, resume_grace, repair_after, poll_interval, ack_timeout, connect_timeout,
reconnect_initial, reconnect_max.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from streamd.config import ProviderSettings
from streamd.events import Health, Job, Origin
from streamd.providers.base import Context, Provider, ProviderError, SubmitRequest
from streamd.providers.runware.client import (
    PING,
    RestClient,
    auth_task,
    get_response_tasks,
    inference_task,
    is_task_uuid,
    loopback,
)
from streamd.providers.runware.normalise import Normaliser, Reading, parse_items
from streamd.transport.backoff import Reconnector, backoff, retry_after

log = logging.getLogger("streamd.providers.runware")
# websockets logs frame contents at DEBUG, which would include the authentication task's key.
_ws_log = logging.getLogger("streamd.providers.runware.ws")
_ws_log.setLevel(logging.INFO)

MAX_FRAME = 16 * 1024 * 1024
MAX_POLL_BATCH = 50  # getResponse tasks per request
# Frames read but not yet absorbed: past this many the reader absorbs them itself before reading on,
# so a provider slower to take events than Runware is to send them holds the socket back (its buffers
# and TCP's) instead of piling readings up here.
MAX_PENDING = 1024
ABSORB_GRACE = 10.0  # seconds an absorb may outlive the cancellation of the task doing it


@dataclass
class _Task:
    """An open task as the I/O layer sees it: which channel can still bring its news."""

    id: str
    follow: dict[str, str]
    session: str | None  # the socket session it was sent on; None: sent over REST, or tracked
    polled: bool  # no push will come (REST, tracked, or its session's buffer was lost)
    poll_at: float  # monotonic time of its next getResponse
    polled_at: float | None = None  # monotonic time its last getResponse went out
    # False for a task restored after a restart until a getResponse answer about it has been read: the
    # dead process may have read frames it never journaled, and no resumed buffer holds those again.
    checked: bool = True
    last_look: bool = False  # ended before it was checked: kept for that one getResponse, then dropped


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    acked: bool = False
    rejected: str | None = None


class _AuthFailed(Exception):
    pass


class _Ended(Exception):
    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class RunwareProvider(Provider):
    name: ClassVar[str] = "runware"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        opts = settings.options
        self.ping_interval = float(opts.get("ping_interval", 30.0))
        self.pong_timeout = float(opts.get("pong_timeout", max(10.0, 2 * self.ping_interval)))
        self.resume_window = float(opts.get("resume_window", 120.0))
        self.resume_grace = float(opts.get("resume_grace", 5.0))
        self.repair_after = float(opts.get("repair_after", 60.0))
        self.poll_interval = float(settings.poll_interval or opts.get("poll_interval", 3.0))
        self.ack_timeout = float(opts.get("ack_timeout", 15.0))
        self.connect_timeout = float(opts.get("connect_timeout", 15.0))
        self._reconnector = Reconnector(
            initial=float(opts.get("reconnect_initial", 1.0)), maximum=float(opts.get("reconnect_max", 60.0))
        )
        self.ws_url = settings.ws_url or "wss://ws-api.runware.ai/v1"
        self._rest = RestClient(settings.base_url, settings.key)
        self._norm = Normaliser(self.name)
        self._tasks: dict[str, _Task] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._ws: ClientConnection | None = None
        self._session: str | None = None  # the current or last connectionSessionUUID
        self._down_since: float | None = None  # monotonic; None while connected (or never tried)
        self._auth_failed: str | None = None
        self._dead_reason: str | None = None
        self._last_rx = 0.0
        self._send_lock = anyio.Lock()
        # Readings in the order the normaliser made them, not yet absorbed (see `_read`, `_flush`).
        self._pending: deque[Reading] = deque()
        self._absorb_lock = anyio.Lock()
        self._poke = anyio.Event()
        self._rest_delays = backoff(initial=max(self.poll_interval, 1.0), maximum=60.0)
        self._poll_pause_until = 0.0
        self._rate_limited = False
        self._task_status: TaskStatus[None] | None = None

    # -- the four operations -------------------------------------------------------------------
    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        self._restore(ctx)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._repair_poller, ctx)
            await self._socket_loop(ctx)

    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        self._check_auth()
        task_id = str(uuid.uuid4())
        task = await inference_task(request, task_id)
        n = int(task["numberResults"])
        self._norm.expect(task_id, number_results=n, model=request.model, prompt=request.prompt)
        ws = self._ws
        entry = _Task(
            task_id,
            {"numberResults": str(n), "via": "ws"},
            session=self._session if ws is not None else None,
            polled=ws is None,
            poll_at=time.monotonic() + self.repair_after,
        )
        self._tasks[task_id] = entry
        try:
            acked = ws is not None and await self._submit_ws(ws, task)
            if not acked:
                entry.session, entry.polled, entry.follow["via"] = None, True, "rest"
                entry.poll_at = time.monotonic() + self.poll_interval
                await self._submit_rest(ctx, task, check_first=ws is not None)
        except BaseException:
            self._tasks.pop(task_id, None)
            self._norm.forget(task_id)
            raise
        if entry.session:
            entry.follow["session"] = entry.session
        await ctx.remember(task_id, entry.follow)
        self._wake()
        return [task_id]

    async def track(self, ctx: Context, ref: str) -> str:
        ref = ref.strip()
        if not is_task_uuid(ref):
            raise ProviderError("bad_request", f"{ref!r} is not a Runware taskUUID")
        if ref in self._tasks:
            return ref
        self._check_auth()
        fresh = ref not in self._norm.batches
        self._norm.expect(ref, number_results=None)
        try:
            reading = self._read(await self._rest.post(get_response_tasks([ref])), Origin.POLL)
        except BaseException:
            if fresh:
                self._norm.forget(ref)
            raise
        if ref in reading.missing or ref not in reading.heard:
            self._pending.remove(reading)  # not a job here: the answer makes no event
            if fresh:
                self._norm.forget(ref)
            raise ProviderError("not_found", f"Runware has no task {ref} (unknown, expired, or another account's)")
        batch = self._norm.batches[ref]
        follow = {"via": "track", "numberResults": str(batch.total)}
        if not batch.done:
            self._tasks[ref] = _Task(ref, follow, None, True, time.monotonic() + self.poll_interval)
        await ctx.remember(ref, follow)
        await self._flush(ctx)
        self._wake()
        return ref

    async def cancel(self, ctx: Context, job: str) -> str:
        raise ProviderError("unsupported", "Runware has no API to cancel a task; it runs to completion")

    async def aclose(self) -> None:
        await self._rest.aclose()

    # -- submission paths ----------------------------------------------------------------------
    async def _submit_ws(self, ws: ClientConnection, task: dict[str, Any]) -> bool:
        """Send over the socket and wait for the acknowledgement; False if it never came."""
        task_id = str(task["taskUUID"])
        waiter = self._waiters[task_id] = _Waiter()
        try:
            try:
                await self._send(ws, [task])
            except ConnectionClosed:
                return False
            with anyio.move_on_after(self.ack_timeout):
                await waiter.event.wait()
        finally:
            self._waiters.pop(task_id, None)
        if waiter.rejected is not None:
            raise ProviderError("bad_request", f"Runware refused the task: {waiter.rejected}")
        return waiter.acked

    async def _submit_rest(self, ctx: Context, task: dict[str, Any], *, check_first: bool) -> None:
        """Submit over REST. After an unanswered socket submit, first ask whether it arrived."""
        task_id = str(task["taskUUID"])
        if check_first:
            reading = self._read(await self._rest.post(get_response_tasks([task_id])), Origin.POLL)
            if task_id in reading.heard:
                await self._flush(ctx)
                return
            self._pending.remove(reading)  # it never arrived: submit it (and say nothing of the question)
        reading = self._read(await self._rest.post([task]), Origin.REQUEST)
        if task_id in reading.rejected and task_id not in reading.acked:
            self._pending.remove(reading)  # refused: nothing of it becomes an event (submit raises)
            raise ProviderError("bad_request", f"Runware refused the task: {reading.rejected[task_id]}")
        await self._flush(ctx)

    # -- the socket ----------------------------------------------------------------------------
    async def _socket_loop(self, ctx: Context) -> None:
        while True:
            try:
                await self._connection(ctx)
            except _AuthFailed as exc:
                self._auth_failed = str(exc)
                await ctx.health(Health.AUTH_FAILED, message=str(exc))
                self._signal_started()
                await anyio.sleep_forever()  # a wrong key stays wrong: no reconnect storm
            except _Ended as exc:
                self._signal_started()
                delay = self._reconnector.delay(time.monotonic(), at_least=exc.retry_after)
                log.info("runware socket: %s; reconnecting in %.1fs", exc.reason, delay)
                await ctx.health(Health.RECONNECTING, message=exc.reason, delay=delay)
                await anyio.sleep(delay)

    async def _connection(self, ctx: Context) -> None:
        """One connection's life. Always ends by raising `_Ended` or `_AuthFailed`."""
        try:
            ws = await self._open()
        except BaseException:
            self._mark_down()
            raise
        self._dead_reason = None
        self._last_rx = time.monotonic()
        try:
            session = await self._authenticate(ctx, ws)
            previous, self._session = self._session, session
            resumed = previous is not None and previous == session
            down_for = None if self._down_since is None else time.monotonic() - self._down_since
            self._ws, self._down_since = ws, None
            self._reconnector.connected(time.monotonic())
            await ctx.health(Health.CONNECTED, message="session resumed" if resumed else "new session")
            self._signal_started()
            self._after_connect(resumed=resumed, down_for=down_for)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pinger, ws)
                await self._reader(ctx, ws)
                tg.cancel_scope.cancel()
            if self._auth_failed is not None:
                raise _AuthFailed(self._auth_failed)
            raise _Ended(self._dead_reason or _describe_close(ws))
        finally:
            self._ws = None
            self._mark_down()
            for waiter in self._waiters.values():
                waiter.event.set()  # a submit waiting for its ack falls back to REST
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await ws.close()

    async def _open(self) -> ClientConnection:
        try:
            return await connect(
                self.ws_url,
                open_timeout=self.connect_timeout,
                ping_interval=None,  # Runware's own ping task keeps the idle timer alive
                close_timeout=2,
                max_size=MAX_FRAME,
                logger=_ws_log,
                proxy=None if loopback(self.ws_url) else True,
                user_agent_header="streamd",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _AuthFailed(f"Runware refused the connection (HTTP {status})") from None
            wait = retry_after(exc.response.headers.get("Retry-After"), default=0.0)
            raise _Ended(f"handshake refused: HTTP {status}", retry_after=wait) from None
        except InvalidURI:
            raise _Ended(f"invalid ws_url {self.ws_url!r}") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise _Ended(f"cannot connect: {type(exc).__name__}") from None

    async def _authenticate(self, ctx: Context, ws: ClientConnection) -> str:
        try:
            await self._send(ws, [auth_task(self.settings.key, self._session)])
            with anyio.move_on_after(self.connect_timeout):
                while True:
                    message = await ws.recv()
                    self._last_rx = time.monotonic()
                    reading = self._read(message, Origin.PUSH)
                    if reading.auth_error is not None:
                        self._pending.remove(reading)
                        raise _AuthFailed(f"Runware rejected the API key ({reading.auth_error})")
                    await self._flush(ctx)
                    if reading.session is not None:
                        return reading.session
        except ConnectionClosed:
            raise _Ended(f"closed during authentication: {_describe_close(ws)}") from None
        raise _Ended(f"no authentication reply within {self.connect_timeout:g}s")

    async def _reader(self, ctx: Context, ws: ClientConnection) -> None:
        """Reads frames and leaves them to an absorber task, which absorbs whatever has been read
        whenever it runs: that is when the reader waits for the network, since `recv` returns at once
        while websockets holds frames already received. A burst of frames is one `emit`, not one each
        (an emit per frame cost more than the rest of the frame's handling)."""
        more = anyio.Event()
        reading_done = False

        async def absorber() -> None:
            nonlocal more
            while not reading_done:
                await more.wait()
                more = anyio.Event()
                await self._flush(ctx)
            await self._flush(ctx)  # what was read while the last flush was out

        async with anyio.create_task_group() as tg:
            tg.start_soon(absorber)
            try:
                async for message in ws:
                    self._last_rx = time.monotonic()
                    reading = self._read(message, Origin.PUSH)
                    if reading.auth_error is not None:  # (the absorber's last flush takes the rest of it)
                        self._auth_failed = f"Runware rejected the API key ({reading.auth_error})"
                        break
                    if len(self._pending) >= MAX_PENDING:
                        await self._flush(ctx)
                    more.set()
            except ConnectionClosed:
                pass
            finally:
                reading_done = True  # the absorber takes what is left, then ends
                more.set()

    async def _pinger(self, ws: ClientConnection) -> None:
        """Keeps Runware's idle timer from closing the socket; notices a socket gone silent."""
        while True:
            await anyio.sleep(self.ping_interval)
            if time.monotonic() - self._last_rx > self.pong_timeout:
                self._dead_reason = f"no frame from Runware for {self.pong_timeout:g}s"
                ws.transport.abort()
                return
            with anyio.move_on_after(self.pong_timeout) as scope:
                try:
                    await self._send(ws, [PING])
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                self._dead_reason = "sending a ping timed out"
                ws.transport.abort()
                return

    async def _send(self, ws: ClientConnection, tasks: list[dict[str, Any]]) -> None:
        text = json.dumps(tasks, separators=(",", ":"))
        async with self._send_lock:
            await ws.send(text)

    def _after_connect(self, *, resumed: bool, down_for: float | None) -> None:
        """Decide which open tasks need a getResponse now that the socket is back.

        Tasks of a resumed session get their buffered results pushed, so they are polled only if
        still silent after `resume_grace`; every other task is polled at once, over the socket.
        """
        now = time.monotonic()
        within = resumed and (down_for is None or down_for <= self.resume_window)
        for task in self._tasks.values():
            if not task.polled and within and task.session == self._session:
                task.poll_at = min(task.poll_at, now + self.resume_grace)
            else:  # polled anyway, or its session's buffer is gone: only polling can tell
                task.polled = True
                # at once, unless a poll went out less than the advised interval ago (the first
                # sweep after a restart runs over REST before the socket is up): then when it is due
                last = task.polled_at
                recent = last is not None and now - last < self.poll_interval
                task.poll_at = last + self.poll_interval if last is not None and recent else now
        self._poll_pause_until = 0.0  # a REST back-off says nothing about the socket
        self._wake()

    def _mark_down(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()

    def _signal_started(self) -> None:
        if self._task_status is not None:
            status, self._task_status = self._task_status, None
            status.started()

    # -- repair --------------------------------------------------------------------------------
    async def _repair_poller(self, ctx: Context) -> None:
        while True:
            self._adopt_unfinished(ctx)
            now = time.monotonic()
            if self._ws is None and self._down_since is not None and now - self._down_since > self.resume_window:
                for task in self._tasks.values():
                    if not task.polled:  # its buffered results have expired upstream
                        task.polled, task.poll_at = True, now
            due = sorted((t for t in self._tasks.values() if t.poll_at <= now), key=lambda t: t.poll_at)
            paused = self._ws is None and now < self._poll_pause_until  # REST is backing off
            if due and self._auth_failed is None and not paused:
                await self._poll(ctx, due[:MAX_POLL_BATCH])
            soonest = min((t.poll_at for t in self._tasks.values()), default=now + 1.0)
            if self._ws is None:
                soonest = max(soonest, self._poll_pause_until)
            poke = self._poke
            with anyio.move_on_after(min(max(soonest - time.monotonic(), 0.02), 1.0)):
                await poke.wait()

    async def _poll(self, ctx: Context, due: list[_Task]) -> None:
        now = time.monotonic()
        for task in due:
            task.poll_at = now + (self.poll_interval if task.polled else self.repair_after)
            task.polled_at = now
        frames = get_response_tasks(t.id for t in due)
        ws = self._ws
        if ws is not None:
            try:
                await self._send(ws, frames)
                return
            except ConnectionClosed:
                pass
        try:
            body = await self._rest.post(frames)
        except ProviderError as exc:
            await self._rest_failed(ctx, exc, due)
            return
        self._poll_pause_until = 0.0
        if self._rate_limited:
            self._rate_limited = False
            if self._ws is not None:
                await ctx.health(Health.CONNECTED, message="rate limit over")
            else:
                await ctx.health(Health.RECONNECTING, message="socket down; polling over REST")
        self._rest_delays = backoff(initial=max(self.poll_interval, 1.0), maximum=60.0)
        self._read(body, Origin.POLL)
        await self._flush(ctx)

    async def _rest_failed(self, ctx: Context, exc: ProviderError, due: list[_Task]) -> None:
        now = time.monotonic()
        if exc.code == "auth":
            self._auth_failed = exc.message
            await ctx.health(Health.AUTH_FAILED, message=exc.message)
            return
        wait = exc.retry_after if exc.retry_after is not None else next(self._rest_delays)
        self._poll_pause_until = now + wait
        for task in due:
            task.poll_at = max(task.poll_at, now + wait)
        if exc.code == "rate_limited":
            self._rate_limited = True
            await ctx.health(Health.RATE_LIMITED, message=exc.message, delay=wait)
        else:
            log.info("runware poll failed: %s; next try in %.1fs", exc.message, wait)

    def _adopt_unfinished(self, ctx: Context) -> None:
        """Pick up open jobs the daemon knows and this provider does not (restored lazily)."""
        now = time.monotonic()
        for job in ctx.unfinished():
            if job.job in self._tasks:
                continue
            batch = self._norm.batches.get(job.job)
            if batch is not None and batch.done:
                continue
            self._adopt(job, dict(ctx.follow(job.job)), now)

    def _restore(self, ctx: Context) -> None:
        """After a restart: every open job, and the newest socket session to resume."""
        self._adopt_unfinished(ctx)
        remembered = [(t.session, j.created) for j in ctx.unfinished() if (t := self._tasks.get(j.job)) and t.session]
        if remembered and self._session is None:
            self._session = max(remembered, key=lambda pair: pair[1])[0]

    def _adopt(self, job: Job, follow: dict[str, str], now: float) -> None:
        number = follow.get("numberResults", "")
        self._norm.expect(
            job.job,
            number_results=int(number) if number.isdigit() else None,
            model=job.model,
            prompt=job.prompt,
            items=parse_items(follow.get("items", "[]")),
            unsized=not number.isdigit(),  # (killed before its follow-up data was stored: polled at once)
        )
        session = follow.get("session") or None
        polled = follow.get("via") != "ws" or session is None
        self._tasks[job.job] = _Task(
            job.job, follow, session, polled, now if polled else now + self.repair_after, checked=False
        )

    # -- every frame ends here -----------------------------------------------------------------
    def _read(self, payload: Any, origin: Origin) -> Reading:
        """Normalise one frame or answer; its reading waits in `_pending` for `_flush`. Readings are
        absorbed in the order they were read, whichever task read them (the socket's reader, a REST
        poll, a submit), so a job's events go out in the order the normaliser saw its frames."""
        reading = self._norm.feed(payload, origin)
        self._pending.append(reading)
        return reading

    async def _flush(self, ctx: Context) -> None:
        """Absorb every pending reading, in order, with one emit."""
        async with self._absorb_lock:  # (taken before the readings, so whoever flushes next comes after)
            if not self._pending:
                return
            readings = list(self._pending)
            self._pending.clear()
            # Shielded (time-boxed): these may be other tasks' readings, the socket's among them, and the
            # normaliser has moved past them, so a caller cancelled now (a submit whose client went away)
            # must not take them along.
            with anyio.move_on_after(ABSORB_GRACE, shield=True):
                await self._absorb(ctx, readings)

    async def _absorb(self, ctx: Context, readings: list[Reading]) -> None:
        now = time.monotonic()
        observations = []
        for reading in readings:
            for task_id in reading.heard:
                task = self._tasks.get(task_id)
                if task is not None and not task.polled:
                    task.poll_at = now + self.repair_after
            for task_id in reading.missing:
                task = self._tasks.get(task_id)
                if task is not None:  # unknown upstream (yet, or any more): ask again, slowly
                    task.poll_at = now + max(self.repair_after, self.poll_interval)
            held: set[str] = set()
            for task_id in reading.acked:
                waiter = self._waiters.get(task_id)
                if waiter is not None:
                    waiter.acked = True
                    waiter.event.set()
            for task_id, message in reading.rejected.items():
                waiter = self._waiters.get(task_id)
                if waiter is not None and not waiter.acked:
                    waiter.rejected = message
                    waiter.event.set()
                    held.add(task_id)  # refused at submission: submit raises, no job exists
            for task_id in reading.answered:
                task = self._tasks.get(task_id)
                if task is not None:
                    task.checked = True
                    if task.last_look:  # its items are in now (a late one is a log line with the outputs)
                        self._tasks.pop(task_id)
            for task_id in reading.finished:
                task = self._tasks.get(task_id)
                if task is not None and not task.checked:
                    # Restored, and ended by a push (a resumed session's buffer) before any getResponse:
                    # one last look, for items the dead process read and never journaled.
                    task.polled, task.poll_at, task.last_look = True, now, True
                else:
                    self._tasks.pop(task_id, None)
            observations += [o for o in reading.observations if o.job not in held] if held else reading.observations
        if observations:
            await ctx.emit(*observations)
        for reading in readings:
            for task_id in reading.new_items - reading.finished:
                task = self._tasks.get(task_id)
                batch = self._norm.batches.get(task_id)
                if task is not None and batch is not None:
                    task.follow["items"] = batch.items_json()
                    await ctx.remember(task_id, task.follow)

    def _wake(self) -> None:
        self._poke.set()
        self._poke = anyio.Event()

    def _check_auth(self) -> None:
        if self._auth_failed is not None:
            raise ProviderError("auth", self._auth_failed)


def _describe_close(ws: ClientConnection) -> str:
    code, reason = ws.close_code, ws.close_reason
    if code is None:
        return "connection lost"
    return f"closed by Runware ({code}{': ' + reason if reason else ''})"
