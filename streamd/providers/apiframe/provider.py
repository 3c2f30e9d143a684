"""Apiframe: a polled provider. It has no push channel (webhooks need a public URL), so streamd polls.

Two halves. The scheduling core (`Timing`, `next_interval`, `TokenBucket`, `Gate`, `Schedule`,
`Planner`) is pure: it decides when each job is polled next, when the account's job list is read,
and whether any request may go out at all (one shared rate budget, 429 Retry-After, outage and
auth back-off). `ApiframeProvider` does the I/O: a dispatcher task asks the planner for the next
poll and hands it to a few workers over a bounded stream; each answer goes through the pure
normaliser and the planner learns the outcome.

Polling: 2-3 s while a job is PROCESSING and its progress moves; from 2.5 s backing off to 15 s while
it stays QUEUED (or stops moving); a completed job is re-checked rarely until its outputs expire
(one EXPIRED event, remembered across restarts through `Context.remember`). The job list
(`GET /v2/jobs`) is read every 30 s: it discovers jobs submitted elsewhere and doubles as a free poll
of the jobs on it. The first list only adopts unfinished jobs (finished ones are history from before
streamd ran); later lists adopt every new job.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd.config import ProviderSettings
from streamd.events import Health, Kind, Observation, Origin, State
from streamd.providers.apiframe.client import ApiframeClient, build_body, idempotency_key, parse_ref
from streamd.providers.apiframe.normalise import (
    PROVIDER,
    diagnostic,
    fingerprint,
    is_expired,
    job_id_of,
    job_page,
    normalise_accepted,
    normalise_job,
    state_of,
    status_of,
)
from streamd.providers.base import Context, Provider, ProviderError, SubmitRequest
from streamd.transport.backoff import Reconnector

Rand = Callable[[], float]


# == pure scheduling ==================================================================================
@dataclass(frozen=True)
class Timing:
    """Every interval the provider uses, in seconds. `for_interval` scales them all together, so a
    test (or a gateway with its own limits) can run the same policy faster or slower."""

    active: float = 2.5  # a PROCESSING job whose progress moves: 2-3 s with the jitter
    jitter: float = 0.2  # ± this fraction, so jobs submitted together do not poll together
    queued: float = 2.5  # first interval of a job that is QUEUED (or stopped moving)...
    queued_max: float = 15.0  # ...growing by `factor` per quiet poll up to this
    factor: float = 1.5
    quiet_polls: int = 5  # a PROCESSING job unchanged for this many polls backs off like a queued one
    listing: float = 30.0  # GET /v2/jobs: discovery, and a free poll of every job on it
    retention: float = 900.0  # a completed job: look for `expired` this often...
    retention_for: float = 36 * 3600.0  # ...for this long (Apiframe keeps outputs about 24 h)
    rate: float = 2.0  # the shared budget: requests per second across all Apiframe polls
    burst: float = 5.0
    outage: float = 1.0  # 5xx / connection errors: back-off from this...
    outage_max: float = 60.0  # ...to this
    auth: float = 60.0  # 401/403: one probe after this (no retry storm on a bad key)...
    auth_max: float = 900.0  # ...to this
    submit_backoff: float = 0.5  # first wait before a submit is retried
    submit_attempts: int = 4
    workers: int = 4  # polls in flight at once
    watch_max: int = 5000  # completed jobs watched for expiry at once (oldest dropped)
    list_pages: int = 3  # pages read per list while every job on them is new

    @classmethod
    def for_interval(cls, interval: float | None) -> Timing:
        """The default policy with `active` = `interval` (settings.poll_interval) and the rest in proportion."""
        base = cls()
        if interval is None or not interval > 0 or not math.isfinite(interval):
            return base
        s = interval / base.active
        return replace(
            base,
            active=base.active * s,
            queued=base.queued * s,
            queued_max=base.queued_max * s,
            listing=base.listing * s,
            retention=base.retention * s,
            retention_for=base.retention_for * s,
            rate=base.rate / s,
            outage=base.outage * s,
            outage_max=base.outage_max * s,
            auth=base.auth * s,
            auth_max=base.auth_max * s,
            submit_backoff=base.submit_backoff * s,
        )


ACTIVE = frozenset({State.ACCEPTED, State.PREPROCESSING, State.RUNNING, State.POSTPROCESSING})


def next_interval(state: State | None, previous: float | None, quiet: int, timing: Timing, rand: Rand) -> float:
    """Seconds until a job is polled again, after a poll that found it in `state`.

    `quiet` counts the polls in a row that brought no news (0: this one did). A moving job is polled
    every `active` s; a queued job, or one that stopped moving, backs off from `queued` to `queued_max`.
    """
    spread = 1.0 + timing.jitter * (2.0 * rand() - 1.0)
    if state in ACTIVE and quiet < timing.quiet_polls:
        return timing.active * spread
    if quiet == 0 or previous is None:
        return min(timing.queued * spread, timing.queued_max)
    return min(max(previous, timing.queued) * timing.factor * spread, timing.queued_max)


@dataclass
class TokenBucket:
    """The shared rate budget: `rate` requests per second, bursts up to `burst`."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:
            self.stamp = now

    def ready_at(self, now: float) -> float:
        self._refill(now)
        return now if self.tokens >= 1.0 else now + (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Gate:
    """Whether any request may go out: open, or closed until `until` (rate limit, outage, bad key).

    When a closed gate's time is up, exactly one request (the probe) goes out; its answer opens or
    re-closes the gate. `epoch` changes on every closing, so an answer to a request sent before the
    gate closed neither opens it early nor closes it twice.
    """

    def __init__(self) -> None:
        self.reason: str | None = None  # None (open), "rate_limited", "outage", "auth"
        self.until = 0.0
        self.probing = False
        self.epoch = 0

    def ready_at(self, now: float) -> float | None:
        """When the next request may go; None while a probe is out (wait for its answer)."""
        if self.reason is None:
            return now
        if self.probing:
            return None
        return max(now, self.until)

    def admit(self) -> None:
        if self.reason is not None:
            self.probing = True

    def close(self, now: float, reason: str, delay: float) -> None:
        self.reason = reason
        self.until = now + delay
        self.probing = False
        self.epoch += 1

    def open(self) -> str | None:
        reason, self.reason, self.probing = self.reason, None, False
        return reason


@dataclass
class Entry:
    job: str
    due: float
    state: State | None = None
    interval: float | None = None
    quiet: int = 0
    retention: bool = False  # completed: only watched for `expired`
    since: float = 0.0  # when the retention watch began
    inflight: bool = False
    fingerprint: str | None = None
    seen: float = -math.inf  # when the request whose answer was applied last was sent


class Schedule:
    """Per-job poll times. Jobs in flight are never handed out twice."""

    def __init__(self, timing: Timing, rand: Rand) -> None:
        self.timing = timing
        self.rand = rand
        self.entries: dict[str, Entry] = {}

    def __contains__(self, job: object) -> bool:
        return job in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, job: str) -> Entry | None:
        return self.entries.get(job)

    def add(self, job: str, now: float, *, due: float | None = None) -> Entry:
        entry = self.entries.get(job)
        if entry is None:
            entry = self.entries[job] = Entry(job, now if due is None else due)
        elif entry.retention:  # a finished job came back to life (tracked again): poll it as live
            entry.retention = False
            entry.due = min(entry.due, now if due is None else due)
        return entry

    def remove(self, job: str) -> None:
        self.entries.pop(job, None)

    def live(self) -> int:
        return sum(1 for e in self.entries.values() if not e.retention)

    def next_due(self) -> float | None:
        return min((e.due for e in self.entries.values() if not e.inflight), default=None)

    def pop_due(self, now: float) -> str | None:
        best: Entry | None = None
        for entry in self.entries.values():
            if not entry.inflight and entry.due <= now and (best is None or entry.due < best.due):
                best = entry
        if best is None:
            return None
        best.inflight = True
        return best.job

    def polled(self, job: str, state: State | None, news: bool, now: float) -> None:
        """A poll found `job` unfinished in `state`; `news`: anything changed since the last poll."""
        entry = self.add(job, now)
        entry.inflight = False
        entry.retention = False
        entry.quiet = 0 if news or state != entry.state else entry.quiet + 1
        entry.interval = next_interval(state, entry.interval, entry.quiet, self.timing, self.rand)
        entry.state = state
        entry.due = now + entry.interval

    def retain(self, job: str, now: float) -> None:
        """`job` completed and its outputs are still there: check for expiry now and then."""
        entry = self.entries.get(job) or self.add(job, now)
        if not entry.retention:
            entry.retention = True
            entry.since = now
        entry.inflight = False
        entry.state = State.COMPLETED
        if now - entry.since > self.timing.retention_for:
            self.remove(job)
            return
        entry.due = now + self.timing.retention * (1.0 + self.timing.jitter * (2.0 * self.rand() - 1.0))
        watched = [e for e in self.entries.values() if e.retention]
        if len(watched) > self.timing.watch_max:
            for old in sorted(watched, key=lambda e: e.since)[: len(watched) - self.timing.watch_max]:
                self.remove(old.job)

    def retry(self, job: str, at: float) -> None:
        """A poll failed: try again at `at` (never sooner than the job was due anyway)."""
        entry = self.entries.get(job)
        if entry is not None:
            entry.inflight = False
            entry.due = at

    def all_due(self, now: float) -> None:
        """After an outage: re-poll every unfinished job now, to catch what was missed."""
        for entry in self.entries.values():
            if not entry.retention and not entry.inflight:
                entry.due = min(entry.due, now)


@dataclass(frozen=True)
class Poll:
    """One request for a worker: poll `job`, or read the job list when `job` is None."""

    job: str | None
    epoch: int


@dataclass(frozen=True)
class Report:
    health: Health
    message: str | None = None
    delay: float | None = None


class Planner:
    """The poll scheduler's decisions, with time passed in: what goes out next, and what a result means."""

    def __init__(self, timing: Timing, *, rand: Rand = random.random) -> None:
        self.timing = timing
        self.jobs = Schedule(timing, rand)
        self.bucket = TokenBucket(timing.rate, timing.burst)
        self.gate = Gate()
        self.list_due: float | None = -math.inf  # None while a list is in flight
        self.health: Health | None = None
        self._outage = Reconnector(timing.outage, timing.outage_max, healthy_after=timing.listing, rand=rand)
        self._auth = Reconnector(timing.auth, timing.auth_max, healthy_after=timing.listing, rand=rand)

    def next(self, now: float) -> tuple[Poll | None, float]:
        """The next request to send, or None and how long to wait (inf: until something changes)."""
        gate = self.gate.ready_at(now)
        if gate is None:
            return None, math.inf
        job_due = self.jobs.next_due()
        due = min((t for t in (self.list_due, job_due) if t is not None), default=None)
        if due is None:
            return None, math.inf
        at = max(gate, due)
        if at > now:
            return None, at - now
        ready = self.bucket.ready_at(now)
        if ready > now:
            return None, ready - now
        self.bucket.take(now)
        self.gate.admit()
        if self.list_due is not None and self.list_due <= now and (job_due is None or self.list_due <= job_due):
            self.list_due = None
            return Poll(None, self.gate.epoch), 0.0
        job = self.jobs.pop_due(now)
        assert job is not None, "a job was due"
        return Poll(job, self.gate.epoch), 0.0

    def take_list(self, now: float) -> Poll:
        """The first request at start-up: read the job list (the baseline)."""
        self.bucket.take(now)
        self.list_due = None
        return Poll(None, self.gate.epoch)

    def listed(self, now: float) -> None:
        self.list_due = now + self.timing.listing

    def succeeded(self, poll: Poll | None, now: float) -> Report | None:
        """Apiframe answered (any answer but 401/403/429/5xx). Opens the gate if this was its probe, or
        if a submit/track (`poll` None) shows a rejected key works again."""
        if self.gate.reason is not None:
            current = poll.epoch == self.gate.epoch if poll is not None else self.gate.reason == "auth"
            if not current:
                return None
            reason = self.gate.open()
            if reason == "outage":  # catch up on what happened while we could not look
                self._outage.connected(now)
                self.jobs.all_due(now)
                if self.list_due is not None:
                    self.list_due = now
            elif reason == "auth":
                self._auth = Reconnector(self.timing.auth, self.timing.auth_max, rand=self._auth.rand)
                self.jobs.all_due(now)
        elif self.health is Health.POLLING:
            return None
        self._outage.connected(now)
        return self._set(Report(Health.POLLING))

    def failed(self, poll: Poll, now: float, error: ProviderError) -> Report | None:
        """A poll got 401/403/429/5xx or no answer: close the gate (unless that answer is stale),
        and put the poll back for when the gate opens. Other errors concern one job: see `release`."""
        current = poll.epoch == self.gate.epoch
        report: Report | None = None
        if error.code == "rate_limited":
            delay = error.retry_after if error.retry_after is not None else 1.0
            if current or self.gate.until < now + delay:
                self.gate.close(now, "rate_limited", delay)
            report = Report(Health.RATE_LIMITED, "Apiframe rate limit (429)", delay)
        elif error.code == "auth" and current:
            delay = self._auth.delay(now)
            self.gate.close(now, "auth", delay)
            report = Report(Health.AUTH_FAILED, f"{error.message}; polling paused", delay)
        elif error.code not in ("auth", "rate_limited") and current:
            delay = self._outage.delay(now)
            self.gate.close(now, "outage", delay)
            health = Health.RECONNECTING if self._outage.attempts < 3 else Health.DOWN
            report = Report(health, error.message, delay)
        at = max(now, self.gate.until) if self.gate.reason is not None else now + self.timing.queued
        if poll.job is None:
            self.list_due = at if self.list_due is None else self.list_due
        else:
            self.jobs.retry(poll.job, at)
        return self._set(report) if report is not None else None

    def throttle(self, now: float, delay: float | None) -> Report:
        """A submit or track was told 429: the budget is shared, so polls wait too."""
        wait = delay if delay is not None else 1.0
        if self.gate.until < now + wait or self.gate.reason is None:
            self.gate.close(now, "rate_limited", wait)
        return self._set(Report(Health.RATE_LIMITED, "Apiframe rate limit (429)", wait))

    def release(self, poll: Poll, now: float) -> None:
        """A job-level failure (not a gate matter): try the job again later, or the list at its time."""
        if poll.job is None:
            if self.list_due is None:
                self.listed(now)
        else:
            self.jobs.retry(poll.job, now + self.timing.queued_max)

    def _set(self, report: Report) -> Report:
        self.health = report.health
        return report


# == I/O =============================================================================================
class ApiframeProvider(Provider):
    """Follows Apiframe jobs by polling; see the module docstring for the policy."""

    name = "apiframe"

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        timing: Timing | None = None,
        clock: Callable[[], float] = anyio.current_time,
        rand: Rand = random.random,
    ) -> None:
        super().__init__(settings)
        self.timing = timing or Timing.for_interval(settings.poll_interval)
        self.planner = Planner(self.timing, rand=rand)
        self._clock = clock
        self._client: ApiframeClient | None = None
        self._kicked: anyio.Event | None = None
        self._known: OrderedDict[str, None] = OrderedDict()  # every job id seen, so the list adopts each once
        self._gone: OrderedDict[str, None] = OrderedDict()  # 404: not polled again in this run
        self._expired: OrderedDict[str, None] = OrderedDict()  # EXPIRED reported
        self._baseline = False  # a first job list has been read
        self._problem: str | None = None  # last job-list problem reported
        scope = settings.options.get("scope")
        self._scope = scope if isinstance(scope, str) else None

    # -- the provider seam -------------------------------------------------------------------------
    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._kicked = anyio.Event()
        self._reconcile(ctx)
        await self._do(ctx, self.planner.take_list(self._clock()))
        task_status.started()
        send, receive = anyio.create_memory_object_stream[Poll](self.timing.workers)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_wake, ctx)
            for _ in range(max(1, self.timing.workers)):
                tg.start_soon(self._worker, ctx, receive.clone())
            receive.close()
            await self._dispatch(send)

    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        body = build_body(request)
        key = idempotency_key(request)
        try:
            answer = await self._http().generate(
                body, key=key, attempts=self.timing.submit_attempts, initial=self.timing.submit_backoff
            )
        except ProviderError as exc:
            if exc.code == "rate_limited":
                await self._report(ctx, self.planner.throttle(self._clock(), exc.retry_after))
            raise
        now = self._clock()
        await self._report(ctx, self.planner.succeeded(None, now))
        job = str(answer["jobId"])
        self._note(self._known, job)
        self._gone.pop(job, None)
        state = state_of(answer)
        first = now + self.timing.queued if state is not None and not state.terminal else now
        self.planner.jobs.add(job, now, due=first)
        await ctx.emit(*normalise_accepted(answer, model=request.model, prompt=request.prompt))
        self._kick()
        return [job]

    async def track(self, ctx: Context, ref: str) -> str:
        job = parse_ref(ref)
        sent = self._clock()
        try:
            payload = await self._http().job(job)
        except ProviderError as exc:
            if exc.code == "rate_limited":
                await self._report(ctx, self.planner.throttle(self._clock(), exc.retry_after))
            raise
        await self._report(ctx, self.planner.succeeded(None, self._clock()))
        self._gone.pop(job, None)
        self._note(self._known, job)
        await self._apply(ctx, payload, job=job, sent=sent)
        self._kick()
        return job

    async def cancel(self, ctx: Context, job: str) -> str:
        raise ProviderError(
            "unsupported",
            f"Apiframe cannot cancel jobs: its API has no cancel endpoint, so job {job} runs to its end",
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await client.aclose()

    # -- tasks ---------------------------------------------------------------------------------------
    async def _dispatch(self, send: MemoryObjectSendStream[Poll]) -> None:
        async with send:
            while True:
                poll, wait = self.planner.next(self._clock())
                if poll is not None:
                    await send.send(poll)
                    continue
                kicked = self._kicked
                assert kicked is not None
                with anyio.move_on_after(min(wait, 3600.0)):
                    await kicked.wait()
                if kicked.is_set():
                    self._kicked = anyio.Event()

    async def _worker(self, ctx: Context, receive: MemoryObjectReceiveStream[Poll]) -> None:
        async with receive:
            async for poll in receive:
                await self._do(ctx, poll)
                self._kick()  # the dispatcher may be asleep until a time computed while this was in flight

    async def _watch_wake(self, ctx: Context) -> None:
        """The daemon sets ctx.wake() when a job is tracked or submitted: pick it up now, not at the next list."""
        while True:
            event = ctx.wake()
            await event.wait()
            self._reconcile(ctx)
            self._kick()
            if ctx.wake() is event:  # a context that does not re-arm its event: do not spin
                await anyio.sleep(self.timing.active / 4)

    # -- one request ---------------------------------------------------------------------------------
    async def _do(self, ctx: Context, poll: Poll) -> None:
        sent = self._clock()
        try:
            if poll.job is None:
                await self._list(ctx, poll)
                return
            payload = await self._http().job(poll.job)
        except ProviderError as exc:
            await self._failed(ctx, poll, exc)
            return
        except Exception as exc:  # a bug must not stop the polling of every other job
            self.planner.release(poll, self._clock())
            note = f"streamd could not handle this Apiframe answer ({type(exc).__name__})"
            await ctx.emit(diagnostic(None, note, job=poll.job))
            return
        await self._report(ctx, self.planner.succeeded(poll, self._clock()))
        await self._apply(ctx, payload, job=poll.job, sent=sent)

    async def _failed(self, ctx: Context, poll: Poll, exc: ProviderError) -> None:
        now = self._clock()
        if exc.code in ("auth", "rate_limited", "unavailable"):
            await self._report(ctx, self.planner.failed(poll, now, exc))
            return
        await self._report(ctx, self.planner.succeeded(poll, now))  # Apiframe answered: the connection is fine
        if poll.job is None:
            self.planner.release(poll, now)
            await self._problem_once(ctx, f"job list: {exc.message}")
            return
        if exc.code in ("not_found", "bad_request"):  # asking again will not help
            self.planner.jobs.remove(poll.job)
            self._note(self._gone, poll.job)
            note = f"{exc.message}: no longer polled (deleted, or not this account's)"
        else:
            self.planner.release(poll, now)
            note = exc.message
        await ctx.emit(diagnostic(None, note, job=poll.job))

    async def _list(self, ctx: Context, poll: Poll) -> None:
        """Read the account's recent jobs: adopt new ones, and take the list as a poll of known ones."""
        baseline = not self._baseline
        cursor: str | None = None
        for number in range(self.timing.list_pages):
            sent = self._clock()
            payload = await self._http().jobs(limit=100, cursor=cursor, scope=self._scope)
            if number == 0:
                await self._report(ctx, self.planner.succeeded(poll, self._clock()))
            page = job_page(payload)
            if page.problem:
                await self._problem_once(ctx, f"job list: {page.problem}")
            fresh = 0
            for item in page.jobs:
                fresh += await self._consider(ctx, item, baseline, sent)
            if baseline or not page.more or page.cursor is None or fresh < len(page.jobs):
                break
            cursor = page.cursor
        self._baseline = True
        self.planner.listed(self._clock())

    async def _consider(self, ctx: Context, item: Mapping[str, Any], baseline: bool, sent: float) -> bool:
        """One job from the list; True if streamd had never seen it."""
        job = job_id_of(item)
        if job is None:
            return False
        entry = self.planner.jobs.get(job)
        if entry is not None:
            if not entry.inflight:  # a worker is polling it right now: let that answer count
                await self._apply(ctx, item, job=job, sent=sent)
            return False
        if job in self._known or job in self._gone:
            return False
        self._note(self._known, job)
        state = state_of(item)
        if baseline and state is not None and state.terminal:
            # History from before streamd ran; but a job it saw complete may still owe an EXPIRED event.
            if state is State.COMPLETED and ctx.follow(job).get("expiry") == "watch":
                await self._apply(ctx, item, job=job, sent=sent)
            return True
        await self._apply(ctx, item, job=job, sent=sent)
        return True

    async def _apply(self, ctx: Context, payload: Any, *, job: str, sent: float) -> None:
        """A Job payload from a poll or the list (its request `sent` then): emit what is new, and
        schedule the job's next look. An answer older than one already applied is ignored, so a slow
        list page never moves progress backwards."""
        now = self._clock()
        job = job_id_of(payload) or job
        state = state_of(payload)
        mark = fingerprint(payload)
        entry = self.planner.jobs.get(job)
        if entry is not None and sent < entry.seen:
            return
        news = entry is None or entry.fingerprint != mark
        watching = entry is not None and entry.retention
        expiry_reported = job in self._expired or ctx.follow(job).get("expiry") == "reported"
        # Schedule first (no await in between): a list and a poll answering together must agree.
        if state is None or not state.terminal:
            self.planner.jobs.polled(job, state, news, now)
        elif state is State.COMPLETED and not is_expired(payload) and not expiry_reported:
            self.planner.jobs.retain(job, now)
        else:
            self.planner.jobs.remove(job)
        if (current := self.planner.jobs.get(job)) is not None:
            current.fingerprint = mark
            current.seen = sent
        if not news:
            return
        out: list[Observation] = []
        expired_now = False
        for obs in normalise_job(payload, origin=Origin.POLL, job=job):
            if obs.kind is Kind.EXPIRED:
                if expiry_reported:
                    continue
                expired_now = True
            out.append(obs)
        await ctx.emit(*out)
        if expired_now:
            self._note(self._expired, job)
            await ctx.remember(job, {**ctx.follow(job), "expiry": "reported"})
        elif state is State.COMPLETED and not watching and job in self.planner.jobs:
            await ctx.remember(job, {**ctx.follow(job), "expiry": "watch"})

    # -- helpers -------------------------------------------------------------------------------------
    def _http(self) -> ApiframeClient:
        if self._client is None:
            self._client = ApiframeClient(self.settings.base_url, self.settings.key)
        return self._client

    def _reconcile(self, ctx: Context) -> None:
        """Poll every unfinished job the daemon knows (restored after a restart, or tracked)."""
        now = self._clock()
        added = False
        for known in ctx.unfinished():
            if known.job not in self.planner.jobs and known.job not in self._gone:
                self.planner.jobs.add(known.job, now)
                self._note(self._known, known.job)
                added = True
        if added:
            self._kick()

    def _kick(self) -> None:
        if self._kicked is not None:
            self._kicked.set()

    async def _report(self, ctx: Context, report: Report | None) -> None:
        if report is not None:
            await ctx.health(report.health, message=report.message, delay=report.delay)

    async def _problem_once(self, ctx: Context, problem: str) -> None:
        if problem != self._problem:
            self._problem = problem
            await ctx.emit(diagnostic(None, problem))

    @staticmethod
    def _note(seen: OrderedDict[str, None], job: str, limit: int = 50_000) -> None:
        seen[job] = None
        seen.move_to_end(job)
        while len(seen) > limit:
            seen.popitem(last=False)


__all__ = ["PROVIDER", "ApiframeProvider", "Planner", "Timing", "TokenBucket", "next_interval", "status_of"]
