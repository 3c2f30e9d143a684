"""Apiframe: the pure poll scheduler, then the provider against the emulator on loopback.

Provider intervals are scaled with `Timing.for_interval(0.1)` (25x the real policy) and the emulator
runs at speed 10-20, so each test takes a second or two. Time is only ever asserted as a lower bound
(a Retry-After that was honoured), which a slow machine cannot break.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest

from streamd.emulators.apiframe import ApiframeEmulator
from streamd.events import Health, Job, Kind, Origin, State
from streamd.providers.apiframe.provider import (
    ApiframeProvider,
    Planner,
    Poll,
    Schedule,
    Timing,
    TokenBucket,
    next_interval,
)
from streamd.providers.base import ProviderError, SubmitRequest
from tests.support import RecordingContext

KEY = "afk_demo_key"
FAST = Timing.for_interval(0.1)


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


# == the pure scheduler ================================================================================
def test_intervals_follow_the_documented_policy() -> None:
    t = Timing()
    for r in (0.0, 0.5, 1.0):  # PROCESSING and moving: every 2-3 s
        assert 2.0 <= next_interval(State.RUNNING, None, 0, t, fixed(r)) <= 3.0
    intervals, previous = [], None
    for quiet in range(8):  # QUEUED: backing off by 1.5x to 15 s
        previous = next_interval(State.QUEUED, previous, quiet, t, fixed(0.5))
        intervals.append(previous)
    assert intervals[:3] == [2.5, 3.75, 5.625]
    assert intervals[-1] == 15.0 and intervals == sorted(intervals)
    # a running job that stopped moving backs off too; news resets it
    assert next_interval(State.RUNNING, 2.5, t.quiet_polls, t, fixed(0.5)) == 3.75
    assert next_interval(State.QUEUED, 15.0, 0, t, fixed(0.5)) == 2.5
    assert next_interval(None, 15.0, 3, t, fixed(0.5)) == 15.0  # unknown status: like queued


def test_timing_scales_together() -> None:
    t = Timing.for_interval(0.25)
    assert t.active == 0.25 and t.queued_max == 1.5 and t.listing == 3.0 and t.rate == 20.0
    assert Timing.for_interval(None) == Timing() == Timing.for_interval(-1)


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.ready_at(0.0) == 0.5
    assert not bucket.take(0.4) and bucket.take(0.5)
    assert bucket.ready_at(100.0) == 100.0 and bucket.tokens == 3.0  # refills only to the burst


def drain(planner: Planner, now: float) -> list[Poll]:
    out: list[Poll] = []
    while True:
        poll, _ = planner.next(now)
        if poll is None:
            return out
        out.append(poll)


def test_one_budget_for_all_jobs() -> None:
    t = replace(Timing(), rate=2.0, burst=3.0)
    planner = Planner(t, rand=fixed(0.5))
    for n in range(20):
        planner.jobs.add(f"job{n}", 0.0)
    first = drain(planner, 0.0)
    assert len(first) == 3 and first[0].job is None  # the list first, then two jobs: the burst
    poll, wait = planner.next(0.0)
    assert poll is None and wait == pytest.approx(0.5)
    per_tick = [len(drain(planner, step / 10)) for step in range(1, 101)]  # 10 s in 0.1 s steps
    assert max(per_tick) == 1 and sum(per_tick[:50]) == 10  # 2 per second, however many jobs are due
    assert sum(per_tick) == 18  # then every job has gone once (none is handed out twice while in flight)


def test_rate_limit_closes_the_gate_for_retry_after_then_one_probe() -> None:
    planner = Planner(FAST, rand=fixed(0.5))
    planner.list_due = math.inf
    for n in range(3):
        planner.jobs.add(f"j{n}", 0.0)
    a, b, c = drain(planner, 0.0)
    report = planner.failed(a, 0.1, ProviderError("rate_limited", "429", retry_after=7.0))
    assert report is not None and report.health is Health.RATE_LIMITED and report.delay == 7.0
    stale = planner.failed(b, 0.2, ProviderError("rate_limited", "429", retry_after=1.0))
    assert stale is not None and planner.gate.until == pytest.approx(7.1)  # an older answer never shortens it
    assert planner.succeeded(c, 0.3) is None and planner.gate.reason == "rate_limited"  # nor opens it
    poll, wait = planner.next(7.0)
    assert poll is None and wait == pytest.approx(0.1)
    probe, _ = planner.next(7.1)
    assert probe is not None
    assert planner.next(7.2) == (None, math.inf)  # one probe at a time
    report = planner.succeeded(probe, 7.3)
    assert report is not None and report.health is Health.POLLING
    (rest,) = drain(planner, 7.3)  # c is still in flight
    assert {rest.job, probe.job} == {"j0", "j1"}


def test_outage_backs_off_then_repolls_everything() -> None:
    planner = Planner(replace(FAST, active=60.0), rand=fixed(0.0))
    planner.list_due = math.inf
    planner.jobs.add("a", 0.0)
    planner.jobs.add("b", 0.0)
    (p1, p2) = drain(planner, 0.0)
    planner.succeeded(p2, 0.0)
    planner.jobs.polled("b", State.RUNNING, True, 0.0)
    healths, delays, now = [], [], 0.0
    poll: Poll | None = p1
    for _ in range(4):
        assert poll is not None
        report = planner.failed(poll, now, ProviderError("unavailable", "503"))
        assert report is not None and report.delay is not None
        healths.append(report.health)
        delays.append(report.delay)
        now += report.delay
        poll, _ = planner.next(now)
    assert healths == [Health.RECONNECTING, Health.RECONNECTING, Health.DOWN, Health.DOWN]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert poll is not None
    report = planner.succeeded(poll, now)
    assert report is not None and report.health is Health.POLLING
    due = {p.job for p in drain(planner, now)}
    assert "b" in due and None in due  # b was not due for a while; after the outage it is, and the list too


def test_bad_key_pauses_polling_until_a_slow_probe_or_a_working_submit() -> None:
    planner = Planner(FAST, rand=fixed(0.0))
    planner.jobs.add("a", 0.0)
    (listing, job) = drain(planner, 0.0)
    report = planner.failed(job, 0.0, ProviderError("auth", "Apiframe rejected the API key (401 Invalid API key)"))
    assert report is not None and report.health is Health.AUTH_FAILED and report.delay == pytest.approx(FAST.auth)
    assert planner.failed(listing, 0.0, ProviderError("auth", "401")) is None  # the same news, once
    assert planner.next(FAST.auth / 2)[0] is None
    assert planner.succeeded(None, 1.0) is not None  # a submit with a key that works again
    assert [p.job for p in drain(planner, 1.0)] == ["a"]


def test_schedule_hands_out_each_job_once_and_watches_completed_jobs() -> None:
    t = replace(FAST, retention=5.0, retention_for=12.0, jitter=0.0)
    schedule = Schedule(t, fixed(0.5))
    schedule.add("a", 0.0)
    schedule.add("b", 1.0)
    assert schedule.pop_due(2.0) == "a" and schedule.pop_due(2.0) == "b" and schedule.pop_due(2.0) is None
    schedule.polled("a", State.RUNNING, True, 2.0)
    assert schedule.next_due() == pytest.approx(2.1)
    schedule.retain("b", 2.0)
    entry = schedule.get("b")
    assert entry is not None and entry.retention and entry.due == 7.0
    schedule.all_due(3.0)  # a repair after an outage does not re-check completed jobs
    assert entry.due == 7.0
    schedule.retain("b", 15.0)  # past retention_for: no longer watched
    assert "b" not in schedule


# == against the emulator ==============================================================================
@asynccontextmanager
async def harness(
    emu: ApiframeEmulator, *, run: bool = True, ctx: RecordingContext | None = None, **timing: Any
) -> AsyncIterator[tuple[ApiframeProvider, RecordingContext]]:
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        provider = ApiframeProvider(replace(emu.settings(), poll_interval=0.1), timing=replace(FAST, **timing))
        ctx = ctx or RecordingContext("apiframe")
        if run:
            await tg.start(provider.run, ctx)
        try:
            yield provider, ctx
        finally:
            tg.cancel_scope.cancel()
            await provider.aclose()


async def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    """Wait for emulator-side state, which has no event to wait on."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


def kinds(ctx: RecordingContext, job: str, kind: Kind) -> list[Any]:
    return [e for e in ctx.events if e.job == job and e.kind is kind]


def finished(ctx: RecordingContext, job: str) -> bool:
    current = ctx.job(job)
    return current is not None and current.status.terminal


def no_secret(ctx: RecordingContext) -> None:
    assert KEY not in repr(ctx.observations) and KEY not in repr(ctx.healths)


@pytest.mark.anyio
async def test_submitted_job_is_followed_to_completion() -> None:
    emu = ApiframeEmulator(seed=1, speed=20, fail_rate=0.0)
    async with harness(emu) as (provider, ctx):
        emu.faults.paused = True
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a lighthouse [ok]"))
        assert ctx.states(job) == ["queued"] and ctx.events[-1].origin is Origin.REQUEST
        assert emu.submissions[-1][0] is not None  # sent with an Idempotency-Key
        emu.force(job, "PROCESSING")
        emu.jobs[job].progress = 40
        await ctx.wait_for(lambda: any(e.progress and e.progress.percent == 40 for e in kinds(ctx, job, Kind.PROGRESS)))
        emu.faults.paused = False
        await ctx.wait_for(lambda: finished(ctx, job))
        assert ctx.states(job) == ["queued", "running", "completed"]
        done = kinds(ctx, job, Kind.STATE)[-1]
        truth = emu.truth[job]
        assert done.origin is Origin.POLL and truth.state == "completed"
        assert list(done.outputs) == truth.outputs and len(truth.outputs) == 1
        assert done.cost == truth.cost == 3.0 and done.model == "seedream-4"
        async with httpx.AsyncClient() as http:
            image = await http.get(done.outputs[0])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert (Health.POLLING, None, None) in ctx.healths
        no_secret(ctx)


@pytest.mark.anyio
async def test_a_retried_submit_with_the_same_key_makes_one_job() -> None:
    emu = ApiframeEmulator(seed=2, speed=20)
    async with harness(emu, run=False) as (provider, ctx):
        emu.faults.paused = True  # so the replayed answer still says QUEUED, however slow the retry
        emu.faults.drop_after = 1  # the job is created, then the answer is lost
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a fox in snow"))
        assert emu.faults.drops == 1 and emu.faults.drop_after is None
        assert list(emu.jobs) == [job] and list(emu.truth) == [job]
        keys = [key for key, _ in emu.submissions]
        assert len(keys) == 2 and keys[0] == keys[1] is not None
        assert ctx.states(job) == ["queued"]


@pytest.mark.anyio
async def test_a_reused_key_with_another_body_is_a_conflict() -> None:
    emu = ApiframeEmulator(seed=3, speed=20)
    async with harness(emu, run=False) as (provider, ctx):
        first = SubmitRequest(model="seedream-4", prompt="a mug", options={"idempotency_key": "order-42"})
        (job,) = await provider.submit(ctx, first)
        assert await provider.submit(ctx, first) == [job]  # a replay: the original job
        other = SubmitRequest(model="seedream-4", prompt="a bowl", options={"idempotency_key": "order-42"})
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, other)
        assert caught.value.code == "conflict" and "Idempotency-Key" in caught.value.message
        assert list(emu.jobs) == [job]


@pytest.mark.anyio
async def test_polls_honour_429_retry_after() -> None:
    emu = ApiframeEmulator(seed=4, speed=20, fail_rate=0.0)
    async with harness(emu, listing=600.0) as (provider, ctx):
        emu.faults.paused = True  # the job stays queued: the provider keeps polling it
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a map [ok]"))
        emu.faults.retry_after = 1.0
        emu.faults.error_status, emu.faults.error_count = 429, 2
        await until(lambda: emu.faults.errors_served == 2 and len(emu.requests("GET", f"/v2/jobs/{job}")) >= 4)
        emu.faults.paused = False
        await ctx.wait_for(lambda: finished(ctx, job))
        log = emu.requests(path="/v2/")
        limited = [i for i, entry in enumerate(log) if entry[3] == 429]
        assert len(limited) == 2
        for i in limited:  # one job, polled one request at a time: nothing before Retry-After
            assert log[i + 1][0] - log[i][0] >= 0.95
        health = [h for h, _, _ in ctx.healths]
        assert Health.RATE_LIMITED in health and health[-1] is Health.POLLING
        assert all(d == 1.0 for h, _, d in ctx.healths if h is Health.RATE_LIMITED)
        assert ctx.states(job)[-1] == "completed"


@pytest.mark.anyio
async def test_submit_waits_out_a_429() -> None:
    emu = ApiframeEmulator(seed=5, speed=20)
    async with harness(emu, run=False) as (provider, ctx):
        emu.faults.retry_after = 1.0
        emu.faults.error_status, emu.faults.error_count = 429, 1
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a train station"))
        posts = emu.requests("POST")
        assert [status for _, _, _, status in posts] == [429, 202]
        assert posts[1][0] - posts[0][0] >= 0.95
        assert list(emu.jobs) == [job]


@pytest.mark.anyio
async def test_an_expired_result_is_reported_once() -> None:
    emu = ApiframeEmulator(seed=6, speed=20, fail_rate=0.0, expire_after=0.3)
    async with harness(emu, retention=0.2, listing=0.2) as (provider, ctx):
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a bakery [fast]"))
        await ctx.wait_for(lambda: bool(kinds(ctx, job, Kind.EXPIRED)))
        assert ctx.states(job)[-1] == "completed"
        (expired,) = kinds(ctx, job, Kind.EXPIRED)
        assert list(expired.outputs) == emu.truth[job].outputs and expired.status is State.COMPLETED
        assert ctx.follows[job]["expiry"] == "reported"  # kept for after a restart
        async with httpx.AsyncClient() as http:
            assert (await http.get(expired.outputs[0])).status_code == 404
        lists = len(emu.requests("GET", "/v2/jobs"))
        await until(lambda: len(emu.requests("GET", "/v2/jobs")) >= lists + 3)  # the list still shows it expired
        assert len(kinds(ctx, job, Kind.EXPIRED)) == 1
        assert ctx.states(job).count("completed") == 1


@pytest.mark.anyio
async def test_a_failed_job_reports_its_error_and_refund() -> None:
    emu = ApiframeEmulator(seed=7, speed=20)
    credits = emu.credits
    async with harness(emu) as (provider, ctx):
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a portrait [fail]"))
        await ctx.wait_for(lambda: finished(ctx, job))
        assert ctx.states(job)[-1] == "failed"
        failed = kinds(ctx, job, Kind.STATE)[-1]
        assert failed.error == emu.truth[job].error and failed.error
        assert failed.cost == 0.0 and emu.credits == credits  # refunded
        assert failed.upstream == "FAILED" and failed.outputs == ()


@pytest.mark.anyio
async def test_track_follows_a_job_submitted_elsewhere() -> None:
    emu = ApiframeEmulator(seed=8, speed=10, fail_rate=0.0)
    async with harness(emu, listing=600.0) as (provider, ctx):
        job = emu.inject("a cosy reading nook [slow]")
        assert ctx.job(job) is None  # not discovered: the list is far away
        assert await provider.track(ctx, f"https://api.apiframe.ai/v2/jobs/{job}") == job
        assert kinds(ctx, job, Kind.STATE)[0].origin is Origin.POLL
        await ctx.wait_for(lambda: finished(ctx, job))
        assert ctx.states(job)[-1] == "completed" and ctx.job(job).outputs == tuple(emu.truth[job].outputs)  # type: ignore[union-attr]
        polls = len(emu.requests("GET", f"/v2/jobs/{job}"))
        done = emu.inject("an archipelago [fast]")
        await until(lambda: emu.jobs[done].status == "COMPLETED")
        emu.legacy_result = True  # `result` as the older docs show it: a bare URL string
        await provider.track(ctx, done)
        assert ctx.states(done) == ["completed"]
        assert kinds(ctx, done, Kind.STATE)[0].outputs == tuple(emu.truth[done].outputs)
        with pytest.raises(ProviderError) as caught:
            await provider.track(ctx, "9f0c2a6e-0000-4000-8000-000000000000")
        assert caught.value.code == "not_found"
        await anyio.sleep(0.5)  # five active intervals: finished jobs are no longer polled
        assert len(emu.requests("GET", f"/v2/jobs/{job}")) == polls


@pytest.mark.anyio
async def test_the_job_list_discovers_jobs() -> None:
    emu = ApiframeEmulator(seed=9, speed=20, fail_rate=0.0)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        emu.faults.paused = True
        old = emu.inject("history [ok]")
        emu.force(old, "COMPLETED")
        running = emu.inject("running before streamd started [ok]")
        emu.force(running, "PROCESSING")
        tg.cancel_scope.cancel()
    async with harness(emu, listing=0.3) as (_, ctx):
        assert ctx.states(running) == ["running"]  # adopted by the first list, before `started`
        assert ctx.job(old) is None  # finished before streamd ran: history, not news
        new = emu.inject("submitted elsewhere later [ok]")
        await ctx.wait_for(lambda: ctx.job(new) is not None)
        emu.faults.paused = False
        await ctx.wait_for(lambda: finished(ctx, running) and finished(ctx, new))
        assert ctx.states(new)[-1] == ctx.states(running)[-1] == "completed"
        assert not [e for e in ctx.events if e.job == old]


@pytest.mark.anyio
async def test_a_rejected_key_stops_polling_without_a_storm() -> None:
    emu = ApiframeEmulator(seed=10, speed=20, fail_rate=0.0)
    emu.faults.reject_auth = True
    async with harness(emu, auth=30.0) as (provider, ctx):
        health, message, delay = ctx.healths[-1]
        assert health is Health.AUTH_FAILED and delay is not None and delay >= 15.0
        assert message is not None and "Invalid API key" in message
        await anyio.sleep(1.0)  # ten active intervals
        assert len(emu.requests(path="/v2/")) == 1
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="p"))
        assert caught.value.code == "auth" and KEY not in caught.value.message
        emu.faults.reject_auth = False
        emu.inactive = True
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="p"))
        assert caught.value.code == "auth" and "inactive" in caught.value.message
        emu.inactive = False
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="works again [fast]"))
        await ctx.wait_for(lambda: finished(ctx, job))
        assert ctx.healths[-1][0] is Health.POLLING
        no_secret(ctx)


@pytest.mark.anyio
async def test_an_outage_is_ridden_out_and_missed_transitions_caught_up() -> None:
    emu = ApiframeEmulator(seed=11, speed=20, fail_rate=0.0)
    async with harness(emu, outage_max=0.5) as (provider, ctx):
        emu.faults.paused = True
        (job,) = await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="a mug [ok]"))
        emu.faults.error_status, emu.faults.error_count = 503, -1
        await until(lambda: sum(h is Health.DOWN for h, _, _ in ctx.healths) >= 1)
        emu.force(job, "COMPLETED")  # happens while streamd cannot look
        await emu.restart()
        emu.faults.error_count = 0
        await ctx.wait_for(lambda: finished(ctx, job))
        assert ctx.states(job) == ["queued", "completed"]
        assert kinds(ctx, job, Kind.STATE)[-1].origin is Origin.POLL
        health = [h for h, _, _ in ctx.healths]
        assert health.index(Health.RECONNECTING) < health.index(Health.DOWN) and health[-1] is Health.POLLING
        assert all(d is not None and d > 0 for h, _, d in ctx.healths if h in (Health.RECONNECTING, Health.DOWN))


@pytest.mark.anyio
async def test_refusals_are_clear_errors() -> None:
    emu = ApiframeEmulator(seed=12, speed=20)
    async with harness(emu, run=False) as (provider, ctx):
        with pytest.raises(ProviderError) as caught:
            await provider.cancel(ctx, "some-job")
        assert caught.value.code == "unsupported" and caught.value.message.startswith("Apiframe cannot cancel jobs: ")
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="x" * 2001))
        assert caught.value.code == "bad_request" and "prompt: String must contain" in caught.value.message
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="p", options={"guidance_scale": 99}))
        assert "seedreamParams.guidance_scale" in caught.value.message
        emu.credits = 1.0
        with pytest.raises(ProviderError) as caught:
            await provider.submit(ctx, SubmitRequest(model="seedream-4", prompt="p"))
        assert caught.value.code == "balance" and "3.0 required, 1.0 available" in caught.value.message
        assert not emu.jobs and not ctx.events


@pytest.mark.anyio
async def test_jobs_the_daemon_knows_are_resumed_and_woken_for() -> None:
    """After a restart the daemon restores unfinished jobs; a job tracked later sets ctx.wake()."""
    emu = ApiframeEmulator(seed=13, speed=20, fail_rate=0.0)
    emu.faults.paused = True
    before = emu.inject("submitted before a restart [ok]")
    emu.force(before, "PROCESSING")
    ctx = RecordingContext("apiframe")
    ctx.tracker.restore([Job(provider="apiframe", job=before, status=State.QUEUED)])
    async with harness(emu, listing=600.0, ctx=ctx) as (_, ctx):
        assert ctx.states(before) == ["running"]  # caught up at once, origin poll
        later = emu.inject("tracked by the daemon later [ok]")
        emu.faults.paused = False
        await ctx.wait_for(lambda: finished(ctx, before))
        assert ctx.states(before)[-1] == "completed"
        assert ctx.job(later) is None  # no list for ten minutes: only the daemon can tell the provider
        ctx.tracker.restore([Job(provider="apiframe", job=later, status=State.QUEUED)])
        await ctx.remember(later, {})  # the daemon sets ctx.wake() when it tracks a job
        await ctx.wait_for(lambda: finished(ctx, later))
        assert ctx.states(later)[-1] == "completed"
