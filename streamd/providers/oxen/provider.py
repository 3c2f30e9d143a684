"""The Oxen.ai provider: one SSE stream per account plus a poller that repairs what SSE cannot say.

Oxen's SSE stream only reports completions, keeps no ids and buffers nothing, so anything that
happens while streamd is not connected is lost. After every (re)connect the poller therefore
re-polls every unfinished job and the account's active list (which also discovers jobs submitted
elsewhere), and it polls unfinished jobs on its own, faster while they run: one by one while there
are few, through the active list (one request for all of them) once there are many. The tracker
drops the duplicates this creates. A rejected key stops the stream instead of retrying it: retrying
cannot help, and a storm of 401s is what gets keys blocked.
"""

from __future__ import annotations

import math
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from anyio.abc import TaskStatus

from streamd.config import ProviderSettings
from streamd.events import Health, Kind, Observation, Origin, State, scrub
from streamd.providers.base import Context, Provider, ProviderError, SubmitRequest
from streamd.providers.oxen import normalise
from streamd.providers.oxen.client import OxenClient
from streamd.transport import sse
from streamd.transport.backoff import Reconnector

BASE_INTERVAL = 2.0  # Oxen's advice for images: poll every 2-5 s
BACKOFF_FACTOR = 1.5
MISSING_INTERVAL = 60.0  # a job the queue no longer knows (older API: 404 once terminal)
LIST_INTERVAL = 60.0  # look for jobs submitted elsewhere this often, besides after each reconnect
POLL_CONCURRENCY = 4
# From this many unfinished jobs on, the active list (one request) is the poll for every job in it, every
# `base_interval`; only jobs missing from it (finished since, most likely) are asked one by one. 5,000
# jobs polled one by one at the advised 2-5 s were ~1,100 requests a second.
LIST_MODE_JOBS = 8
LIST_TRIES = 3  # list failures in a row before polling one by one, for LIST_PAUSE seconds
LIST_PAUSE = 60.0


@dataclass
class _Due:
    """When to poll one job next, and what it said last time."""

    due: float
    interval: float
    last: str | None = None
    missing: bool = False
    polled: float = -math.inf  # when its last status request went out


class OxenProvider(Provider):
    name = "oxen"

    def __init__(self, settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(settings)
        opts = settings.options
        self.client = OxenClient(settings, transport=transport)
        self.events_url = f"{self.client.base_url}/api/events"
        self.read_timeout = float(opts.get("read_timeout", sse.DEFAULT_READ_TIMEOUT))
        self.base_interval = float(settings.poll_interval or BASE_INTERVAL)
        self.max_interval = self.base_interval * 2.5
        self.list_interval = float(opts.get("list_interval", LIST_INTERVAL))
        self.reconnect_initial = float(opts.get("reconnect_initial", 1.0))
        self.reconnect_max = float(opts.get("reconnect_max", 60.0))
        self.healthy_after = float(opts.get("healthy_after", 30.0))
        self._schedule: dict[str, _Due] = {}
        self._kick = anyio.Event()
        self._sweep_all = False  # set on (re)connect: re-poll everything at the next sweep
        self._last_list = -math.inf  # when the active list was last asked for (discovery)
        self._list_at = -math.inf  # when list mode last polled through it
        self._list_broken_until = -math.inf  # after failed list polls: one by one until then
        self._list_failures = 0
        self._sse_up = False
        self._connected_at = -math.inf  # when the event stream last came up
        self._auth_failed = False
        self._auth_ok = anyio.Event()
        self._hold_until = 0.0  # polls wait out a 429 until then
        self._poll_limited = False
        self._sync_inflight: set[str] = set()

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- run ---------------------------------------------------------------------------------------
    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poller, ctx)
            await tg.start(self._stream, ctx)
            task_status.started()

    async def _stream(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold `GET /api/events`, reconnecting with jittered backoff; `started()` after the first attempt."""
        reconnector = Reconnector(
            initial=self.reconnect_initial, maximum=self.reconnect_max, healthy_after=self.healthy_after
        )
        started = False
        while True:
            if self._auth_failed:
                if not started:
                    task_status.started()
                    started = True
                await self._auth_ok.wait()  # a later request with the same key succeeded: try again
            health, message, at_least = Health.RECONNECTING, "", 0.0
            try:
                async with sse.connect(self.client.http, self.events_url, read_timeout=self.read_timeout) as stream:
                    reconnector.connected(anyio.current_time())
                    self._sse_up = True
                    self._connected_at = anyio.current_time()
                    await ctx.health(Health.CONNECTED)
                    self._request_sweep(everything=True)
                    if not started:
                        task_status.started()
                        started = True
                    async with aclosing(stream.batches()) as batches:
                        async for batch in batches:  # every event of a chunk read, in one emit
                            await ctx.emit(*[o for e in batch for o in normalise.from_sse(e.event, e.data)])
                message = "Oxen closed the event stream"
            except sse.SSEAuthError as exc:
                self._sse_up = False
                await self._auth_failure(
                    ctx, f"Oxen rejected the API key (HTTP {exc.status}) on the event stream; not retrying"
                )
                continue
            except sse.SSEStatusError as exc:
                if exc.status == 429:
                    health, at_least = Health.RATE_LIMITED, exc.retry_after or 0.0
                    message = "Oxen rate-limited the event stream"
                else:
                    message = f"event stream answered HTTP {exc.status}" + (
                        f": {exc.body_excerpt}" if exc.body_excerpt else ""
                    )
            except sse.SSEStreamError as exc:
                message = str(exc)
            except httpx.ReadTimeout:
                message = f"no data (not even a keep-alive) for {self.read_timeout:g}s"
            except httpx.HTTPError as exc:
                message = f"event stream lost: {type(exc).__name__}"
            self._sse_up = False
            delay = reconnector.delay(anyio.current_time(), at_least=at_least)
            await ctx.health(health, message=message, delay=delay)
            if not started:
                task_status.started()
                started = True
            await anyio.sleep(delay)

    # -- polling -----------------------------------------------------------------------------------
    def _request_sweep(self, *, everything: bool = False) -> None:
        if everything:
            self._sweep_all = True
        self._kick.set()

    async def _poller(self, ctx: Context) -> None:
        while True:
            await self._sweep(ctx)
            now = anyio.current_time()
            wait = min([d.due - now for d in self._schedule.values()], default=self.base_interval)
            if self._hold_until > now:
                wait = max(wait, self._hold_until - now)
            await self._wait(ctx, min(max(wait, 0.0), self.base_interval))

    async def _wait(self, ctx: Context, seconds: float) -> None:
        """Sleep for `seconds`, or until a kick from this provider or the daemon's wake event."""
        kick = self._kick
        if not kick.is_set():
            with anyio.move_on_after(seconds):
                async with anyio.create_task_group() as tg:

                    async def until(event: anyio.Event) -> None:
                        await event.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(until, kick)
                    tg.start_soon(until, ctx.wake())
        if kick.is_set():
            self._kick = anyio.Event()

    async def _sweep(self, ctx: Context) -> None:
        now = anyio.current_time()
        if self._auth_failed or now < self._hold_until:
            return
        jobs = {j.job for j in ctx.unfinished()}
        for gone in self._schedule.keys() - jobs:
            del self._schedule[gone]
        listing = len(jobs) >= LIST_MODE_JOBS and now >= self._list_broken_until
        first = max(now, self._list_at + self.base_interval) if listing else now  # (new jobs: the next list)
        for job_id in jobs:
            if job_id not in self._schedule:
                self._schedule[job_id] = _Due(due=first, interval=self.base_interval, last=None)
        everything, self._sweep_all = self._sweep_all, False
        listed: set[str] = set()
        # The list goes out when a job is due or the repair after a (re)connect asks for it, and never
        # less than the advised interval after the last one: a repair that would come sooner is left to
        # the per-job schedule below (each job falls due when the interval allows).
        if (
            listing
            and now - self._list_at >= self.base_interval
            and (everything or any(d.due <= now for d in self._schedule.values()))
        ):
            answered = await self._list_poll(ctx)
            if self._auth_failed or anyio.current_time() < self._hold_until:
                self._sweep_all = self._sweep_all or everything  # the repair is still owed
                return
            if answered is not None:
                listed, self._list_failures = answered, 0
            else:
                self._list_failures += 1
                if self._list_failures < LIST_TRIES:
                    # Ask the list again at the next round rather than every job by itself at once (for
                    # thousands of jobs, the request storm list mode exists to avoid).
                    for d in self._schedule.values():
                        d.due = max(d.due, self._list_at + self.base_interval)
                    self._sweep_all = self._sweep_all or everything
                    return
                self._list_failures = 0  # it keeps failing: one by one for a while (see _list_poll)
                self._list_broken_until = self._list_at + LIST_PAUSE
            now = anyio.current_time()
        # After a (re)connect every job needs a poll that went out after it came up: one already
        # polled since then (the first sweep at start-up races the connection) is not asked twice, nor
        # one polled less than the advised interval before (it is asked when it is due, seconds later).
        since, least = self._connected_at, self.base_interval
        due = []
        for job_id, d in self._schedule.items():
            if job_id in listed:
                continue
            if d.due <= now:
                due.append(job_id)
            elif everything and d.polled < since:
                if now - d.polled >= least:
                    due.append(job_id)
                else:
                    d.due = min(d.due, d.polled + least)  # the repair poll, as soon as the advice allows
        # (in list mode the list polls do the discovery too, as often as the advice allows)
        list_due = not listing and (everything or (self._sse_up and now - self._last_list >= self.list_interval))
        if not due and not list_due:
            return
        limiter = anyio.CapacityLimiter(POLL_CONCURRENCY)
        async with anyio.create_task_group() as tg:
            if list_due:
                self._last_list = now
                tg.start_soon(self._poll_list, ctx, limiter)
            for job_id in due:
                if job_id.startswith("sync-"):
                    tg.start_soon(self._orphaned_sync, ctx, job_id)
                else:
                    tg.start_soon(self._poll_job, ctx, job_id, limiter)

    async def _list_poll(self, ctx: Context) -> set[str] | None:
        """List mode: the active list as the poll of every job in it. Returns the jobs it answered for
        (their next poll is scheduled as a job's own poll would), or None if it failed."""
        sent = anyio.current_time()
        self._list_at = self._last_list = sent
        observations = await self._read_list(ctx)
        if observations is None:
            return None
        now = anyio.current_time()
        answered: set[str] = set()
        for obs in observations:
            entry = self._schedule.get(obs.job) if obs.job is not None and obs.kind is Kind.STATE else None
            if entry is not None and obs.job is not None:
                answered.add(obs.job)
                entry.polled = sent
                self._next_poll(entry, obs, now)
        return answered

    async def _poll_list(self, ctx: Context, limiter: anyio.CapacityLimiter) -> None:
        """Discovery (and the after-connect look at the list) while jobs are polled one by one."""
        async with limiter:
            await self._read_list(ctx)

    async def _read_list(self, ctx: Context) -> list[Observation] | None:
        """`GET /api/ai/queue`, its observations emitted and returned; None (and reported) if it failed."""
        try:
            payload = await self.client.active()
        except ProviderError as exc:
            await self._poll_error(ctx, exc)
            return None
        await self._poll_ok(ctx)
        observations = normalise.from_list(payload)
        await ctx.emit(*observations)
        return observations

    async def _poll_job(self, ctx: Context, job_id: str, limiter: anyio.CapacityLimiter) -> None:
        entry = self._schedule.get(job_id)
        if entry is None:
            return
        async with limiter:
            if self._auth_failed or anyio.current_time() < self._hold_until:
                return
            try:
                entry.polled = anyio.current_time()
                payload = await self.client.status(job_id)
            except ProviderError as exc:
                await self._poll_error(ctx, exc, job_id=job_id, entry=entry)
                return
        await self._poll_ok(ctx)
        observations = normalise.from_item(payload, origin=Origin.POLL)
        await ctx.emit(*observations)
        self._next_poll(entry, next((o for o in observations if o.job == job_id), None), anyio.current_time())

    def _next_poll(self, entry: _Due, said: Observation | None, now: float) -> None:
        """After a poll answered `said` about a job: its next poll, sooner while it runs or changes."""
        upstream = said.upstream if said is not None else None
        if (said is not None and said.state is State.RUNNING) or upstream != entry.last:
            entry.interval = self.base_interval
        else:  # queued, or nothing new: back off towards the cap
            entry.interval = min(entry.interval * BACKOFF_FACTOR, self.max_interval)
        entry.last, entry.missing = upstream, False
        entry.due = now + entry.interval

    async def _orphaned_sync(self, ctx: Context, job_id: str) -> None:
        """A synchronous job left unfinished by an earlier run: its answer went with that run."""
        if job_id in self._sync_inflight:
            self._schedule[job_id].due = anyio.current_time() + self.max_interval
            return
        message = "the synchronous request was interrupted (streamd stopped while waiting); its result is unknown"
        await ctx.emit(normalise.sync_failed(job_id, message))

    async def _poll_ok(self, ctx: Context) -> None:
        if self._poll_limited:
            self._poll_limited = False
            if self._sse_up:
                await ctx.health(Health.CONNECTED)

    async def _poll_error(
        self, ctx: Context, exc: ProviderError, *, job_id: str | None = None, entry: _Due | None = None
    ) -> None:
        now = anyio.current_time()
        if exc.code == "auth":
            await self._auth_failure(ctx, exc.message + "; polling stopped")
        elif exc.code == "rate_limited":
            after = exc.retry_after if exc.retry_after is not None else self.max_interval
            self._hold_until = max(self._hold_until, now + after)
            self._poll_limited = True
            await ctx.health(Health.RATE_LIMITED, message="Oxen rate-limited status polling", delay=after)
        elif entry is not None and exc.code == "not_found":
            if not entry.missing:
                entry.missing = True
                await ctx.emit(
                    normalise.diagnostic(
                        f"Oxen no longer knows this generation ({exc.message}); checking every {MISSING_INTERVAL:g}s",
                        raw=None,
                        origin=Origin.POLL,
                        job=job_id,
                        upstream="not_found",
                    )
                )
            entry.interval = max(MISSING_INTERVAL, self.max_interval)
        elif entry is not None:
            entry.interval = min(entry.interval * 2, self.max_interval * 4)
        if entry is not None:
            entry.due = now + entry.interval

    # -- auth --------------------------------------------------------------------------------------
    async def _auth_failure(self, ctx: Context, message: str) -> None:
        if not self._auth_failed:
            self._auth_failed = True
            self._auth_ok = anyio.Event()
        await ctx.health(Health.AUTH_FAILED, message=message)

    def _request_ok(self) -> None:
        """A request went through: if the key had been rejected, it works again, so resume."""
        if self._auth_failed:
            self._auth_failed = False
            self._auth_ok.set()

    async def _call(self, ctx: Context, request: Any) -> Any:
        """Await one user-initiated REST call, keeping the auth state in step with its outcome."""
        try:
            result = await request
        except ProviderError as exc:
            if exc.code == "auth":
                await self._auth_failure(ctx, exc.message)
            raise
        self._request_ok()
        return result

    # -- requests ----------------------------------------------------------------------------------
    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        for image in request.images:
            if not image.startswith(("https://", "http://", "data:")):
                raise ProviderError("unsupported", f"Oxen needs image URLs, not local files: {image[:120]}")
        options = dict(request.options)
        if options.pop("sync", False):
            return [await self._submit_sync(ctx, request, options)]
        count = _generations(options.pop("num_generations", 1))
        payload = await self._call(
            ctx,
            self.client.enqueue(
                request.model, request.prompt, images=request.images, num_generations=count, options=options
            ),
        )
        observations = normalise.from_enqueue(payload, model=request.model, prompt=request.prompt)
        await ctx.emit(*observations)
        ids = normalise.enqueued_ids(observations)
        if not ids:
            raise ProviderError("unavailable", "Oxen accepted the request but returned no generation id")
        due = anyio.current_time() + self.base_interval
        for job_id in ids:
            self._schedule[job_id] = _Due(due=due, interval=self.base_interval, last="queued")
        self._request_sweep()
        return ids

    async def _submit_sync(self, ctx: Context, request: SubmitRequest, options: dict[str, Any]) -> str:
        """`POST /api/ai/images/generate` blocks until the image exists; streamd shows it running meanwhile."""
        job_id = f"sync-{uuid.uuid4()}"
        self._sync_inflight.add(job_id)
        try:
            await ctx.emit(normalise.sync_started(job_id, model=request.model, prompt=request.prompt))
            try:
                payload = await self._call(
                    ctx, self.client.generate(request.model, request.prompt, images=request.images, options=options)
                )
            except ProviderError as exc:
                await ctx.emit(normalise.sync_failed(job_id, exc.message))
                raise
            except anyio.get_cancelled_exc_class():
                with anyio.move_on_after(2.0, shield=True):
                    await ctx.emit(normalise.sync_failed(job_id, "streamd stopped while waiting for the answer"))
                raise
            await ctx.emit(*normalise.from_sync(job_id, payload, model=request.model))
            return job_id
        finally:
            self._sync_inflight.discard(job_id)

    async def track(self, ctx: Context, ref: str) -> str:
        job_id = ref.strip().rstrip("/").rsplit("/", 1)[-1]  # an id, or a .../queue/<id> URL
        if job_id.startswith("sync-"):
            raise ProviderError("unsupported", "a synchronous Oxen generation has no queue entry to track")
        payload = await self._call(ctx, self.client.status(job_id))
        observations = normalise.from_item(payload, origin=Origin.POLL)
        await ctx.emit(*observations)
        if not any(o.job == job_id and o.kind is Kind.STATE for o in observations):
            raise ProviderError("unavailable", f"Oxen's answer about {job_id} could not be read")
        self._request_sweep()
        return job_id

    async def cancel(self, ctx: Context, job: str) -> str:
        """DELETE, then check: Oxen's cancel "has no effect" on a finished job and SSE says nothing either way."""
        if job.startswith("sync-"):
            raise ProviderError("cannot_cancel", "a synchronous Oxen generation cannot be cancelled")
        answer = await self._call(ctx, self.client.cancel(job))
        try:
            after = normalise.from_item(await self.client.status(job), origin=Origin.POLL)
        except ProviderError:
            after = []
        state = next((o.state for o in after if o.job == job and o.kind is Kind.STATE), None)
        if state in (State.COMPLETED, State.FAILED):
            await ctx.emit(*after)
            raise ProviderError("cannot_cancel", f"Oxen job {job} had already {state}; nothing to cancel")
        await ctx.emit(
            Observation(
                provider=normalise.PROVIDER,
                job=job,
                kind=Kind.STATE,
                upstream="cancelled",
                origin=Origin.REQUEST,
                state=State.CANCELLED,
                raw=scrub(answer),
            )
        )
        return f"cancelled Oxen job {job}"


def _generations(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProviderError("bad_request", "num_generations must be an integer between 1 and 4")
    return value
