"""OxenProvider against the Oxen emulator on loopback, with a RecordingContext for the daemon.

Exact sequences come from pausing the emulator's clock (`faults.paused`) and moving jobs with
`force()`; the free-running clock covers the rest. Waits are on emitted events, never on sleeps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from streamd.emulators.oxen import OxenEmulator
from streamd.events import Health, Kind, Origin, State
from streamd.providers.base import ProviderError, SubmitRequest
from streamd.providers.oxen.provider import LIST_MODE_JOBS, LIST_TRIES, OxenProvider
from streamd.transport import sse
from tests.support import RecordingContext

MODEL = "bytedance-seedream-4"
FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.5, "list_interval": 60.0}


Prepare = Callable[[OxenEmulator], Awaitable[None]]


def emulator(seed: int = 7, keepalive: float = 1.0) -> OxenEmulator:
    return OxenEmulator(seed=seed, speed=40.0, keepalive=keepalive)


@asynccontextmanager
async def oxen(
    *,
    paused: bool = False,
    poll: float = 0.2,
    options: dict[str, Any] | None = None,
    emu: OxenEmulator | None = None,
    prepare: Prepare | None = None,
) -> AsyncIterator[tuple[OxenEmulator, OxenProvider, RecordingContext]]:
    """A served emulator and a running provider. `emu` carries faults armed in advance; `prepare`
    runs against the served emulator before the provider starts."""
    emu = emu or emulator()
    emu.faults.paused = paused
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        if prepare is not None:
            await prepare(emu)
        settings = dataclasses.replace(emu.settings(), poll_interval=poll, options={**FAST, **(options or {})})
        provider = OxenProvider(settings)
        ctx = RecordingContext("oxen")
        try:
            with anyio.fail_after(20):
                await tg.start(provider.run, ctx)
            yield emu, provider, ctx
        finally:
            tg.cancel_scope.cancel()
            with anyio.move_on_after(5, shield=True):
                await provider.aclose()


async def submit_pairs(provider: OxenProvider, ctx: RecordingContext, pairs: int, prompt: str) -> list[str]:
    """`pairs` enqueues of two generations each, for many unfinished jobs at once; their ids."""
    return [
        job
        for k in range(pairs)
        for job in await provider.submit(
            ctx, SubmitRequest(model=MODEL, prompt=f"{prompt} {k} [ok]", options={"num_generations": 2})
        )
    ]


def state_events(ctx: RecordingContext, job: str, state: State) -> list[Any]:
    return [e for e in ctx.events if e.job == job and e.kind is Kind.STATE and e.status is state]


async def connected(ctx: RecordingContext) -> None:
    await ctx.wait_for(lambda: any(h[0] is Health.CONNECTED for h in ctx.healths))


@pytest.mark.anyio
async def test_full_lifecycle_with_outputs() -> None:
    async with oxen(paused=True) as (emu, provider, ctx):
        await connected(ctx)
        (job,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a red fox [ok]", options={"seed": 3}))
        assert ctx.states(job) == ["queued"]
        assert emu.generations[job].params == {"seed": 3}  # options pass through to the model
        emu.force(job, "processing")
        await ctx.wait_for(lambda: ctx.states(job) == ["queued", "running"])
        emu.force(job, "succeeded")
        await ctx.wait_for(lambda: ctx.states(job)[-1:] == ["completed"])
        truth = emu.truth[job]
        assert truth.state == "completed"
        (done,) = state_events(ctx, job, State.COMPLETED)
        assert list(done.outputs) == truth.outputs and truth.outputs
        assert done.model == MODEL and done.origin in (Origin.PUSH, Origin.POLL)
        job_view = ctx.job(job)
        assert job_view is not None and job_view.prompt == "a red fox [ok]"
        async with httpx.AsyncClient() as http:  # outputs point at the emulator and are real PNGs
            image = await http.get(truth.outputs[0])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.anyio
async def test_sse_dropped_mid_job_still_completes_once_by_repoll() -> None:
    # Polling is slowed right down, so only the re-poll after reconnecting can learn the outcome.
    async with oxen(paused=True, poll=30.0) as (emu, provider, ctx):
        await connected(ctx)
        (job,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="lost event [ok]"))
        emu.force(job, "processing")
        emu.faults.drop_after = 0  # the live stream is cut at its next event, and so is every new one
        emu.force(job, "succeeded")
        await ctx.wait_for(lambda: ctx.states(job)[-1:] == ["completed"])
        (done,) = state_events(ctx, job, State.COMPLETED)
        assert done.origin is Origin.POLL
        assert list(done.outputs) == emu.truth[job].outputs
        assert emu.faults.drops >= 1
        assert not [o for o in ctx.observations if o.job == job and o.origin is Origin.PUSH]
        assert any(h[0] is Health.RECONNECTING for h in ctx.healths)
        emu.faults.drop_after = None
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.CONNECTED)
        assert len(state_events(ctx, job, State.COMPLETED)) == 1


@pytest.mark.anyio
async def test_failed_job_carries_its_error() -> None:
    async with oxen() as (emu, provider, ctx):
        ids = await provider.submit(
            ctx, SubmitRequest(model=MODEL, prompt="doomed [fail]", options={"num_generations": 2})
        )
        assert len(ids) == 2
        await ctx.wait_for(lambda: all(ctx.states(j)[-1:] == ["failed"] for j in ids))
        for job in ids:
            (failed,) = state_events(ctx, job, State.FAILED)
            assert emu.truth[job].state == "failed"
            assert failed.error == emu.truth[job].error and failed.error
            view = ctx.job(job)
            assert view is not None and view.error == failed.error


@pytest.mark.anyio
async def test_cancel_and_cannot_cancel_a_finished_job() -> None:
    async with oxen(paused=True) as (emu, provider, ctx):
        await connected(ctx)
        (hung,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="forever [hang]"))
        (done,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="quick [ok]"))
        message = await provider.cancel(ctx, hung)
        assert hung in message
        assert ctx.states(hung) == ["queued", "cancelled"]
        assert emu.truth[hung].state == "cancelled"
        (cancelled,) = state_events(ctx, hung, State.CANCELLED)
        assert cancelled.origin is Origin.REQUEST

        emu.force(done, "succeeded")
        with pytest.raises(ProviderError) as info:
            await provider.cancel(ctx, done)
        assert info.value.code == "cannot_cancel"
        assert ctx.states(done)[-1] == "completed"
        assert not state_events(ctx, done, State.CANCELLED)

        with pytest.raises(ProviderError) as missing:
            await provider.cancel(ctx, "00000000-0000-4000-8000-000000000000")
        assert missing.value.code == "not_found"


async def enqueue_directly(emu: OxenEmulator, prompt: str) -> str:
    """Submit as another program would, straight to the (emulated) API, not through streamd."""
    headers = {"Authorization": f"Bearer {emu.key}"}
    async with httpx.AsyncClient(base_url=emu.server.url, headers=headers) as http:
        answer = await http.post("/api/ai/queue", json={"model": MODEL, "prompt": prompt})
    assert answer.status_code == 200, answer.text
    job: str = answer.json()["generations"][0]["generation_id"]
    return job


@pytest.mark.anyio
async def test_discovers_a_job_submitted_elsewhere() -> None:
    jobs: list[str] = []

    async def elsewhere(emu: OxenEmulator) -> None:
        jobs.append(await enqueue_directly(emu, "from a notebook [ok]"))

    async with oxen(paused=True, prepare=elsewhere) as (emu, _, ctx):
        (job,) = jobs
        await ctx.wait_for(lambda: ctx.states(job) == ["queued"])
        assert state_events(ctx, job, State.QUEUED)[0].origin is Origin.POLL
        emu.faults.paused = False
        await ctx.wait_for(lambda: ctx.states(job)[-1:] == ["completed"])
        assert emu.truth[job].state == "completed"


@pytest.mark.anyio
async def test_rejected_key_reports_auth_failed_without_a_retry_storm() -> None:
    emu = emulator()
    emu.faults.reject_auth = True
    async with oxen(emu=emu) as (emu, provider, ctx):
        # run() reported started although the only connection attempt failed
        await ctx.wait_for(lambda: any(h[0] is Health.AUTH_FAILED for h in ctx.healths))
        await anyio.sleep(1.0)  # at reconnect_initial=0.05 a retrying stream would have tried ~10 times
        assert len(emu.requests("GET", "/api/events")) == 1
        assert len(emu.log) == 1
        assert not any(h[0] is Health.RECONNECTING for h in ctx.healths)
        message = next(h[1] for h in ctx.healths if h[0] is Health.AUTH_FAILED)
        assert message and "401" in message and emu.key not in message

        with pytest.raises(ProviderError) as info:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x"))
        assert info.value.code == "auth" and emu.key not in str(info.value)

        # Once a request with the key succeeds again, the stream comes back by itself.
        emu.faults.reject_auth = False
        await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="after the fix [ok]"))
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.CONNECTED)


@pytest.mark.anyio
async def test_rate_limited_stream_honours_retry_after() -> None:
    emu = emulator()
    emu.faults.error_status, emu.faults.error_count, emu.faults.retry_after = 429, 1, 1.5
    async with oxen(emu=emu) as (emu, _, ctx):
        await connected(ctx)
        limited = [h for h in ctx.healths if h[0] is Health.RATE_LIMITED]
        assert limited and limited[0][2] is not None and limited[0][2] >= 1.5
        first, second = emu.requests("GET", "/api/events")[:2]
        assert first[3] == 429 and second[3] == 200
        assert second[0] - first[0] >= 1.4  # a lower bound only: a slow machine can only make it longer


@pytest.mark.anyio
async def test_synchronous_generation() -> None:
    async with oxen() as (emu, provider, ctx):
        (job,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="right now [ok]", options={"sync": True}))
        assert job.startswith("sync-")
        assert ctx.states(job) == ["running", "completed"]
        (done,) = state_events(ctx, job, State.COMPLETED)
        assert done.outputs and done.outputs[0].startswith(emu.server.url)

        with pytest.raises(ProviderError) as info:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt=" ", options={"sync": True}))
        assert info.value.code == "bad_request" and "Prompt cannot be empty" in info.value.message
        failed = [o for o in ctx.observations if o.state is State.FAILED and o.job and o.job.startswith("sync-")]
        assert failed and "Prompt cannot be empty" in (failed[0].error or "")


@pytest.mark.anyio
async def test_track_and_documented_errors() -> None:
    async with oxen(paused=True) as (emu, provider, ctx):
        job = await enqueue_directly(emu, "tracked [ok]")
        assert await provider.track(ctx, job) == job
        assert ctx.states(job) == ["queued"]

        cases = [
            ("no-such-model", {}, "bad_request", "Model not found: no-such-model"),
            (MODEL, {"num_generations": 5}, "bad_request", "num_generations must be an integer between 1 and 4"),
        ]
        for model, options, code, text in cases:
            with pytest.raises(ProviderError) as info:
                await provider.submit(ctx, SubmitRequest(model=model, prompt="p", options=options))
            assert info.value.code == code and text in info.value.message
        with pytest.raises(ProviderError) as unknown:
            await provider.track(ctx, "00000000-0000-4000-8000-000000000000")
        assert unknown.value.code == "not_found"
        schema = await provider.client.model_schema("bytedance-seedream-4-5")
        assert schema is not None and "prompt" in schema["required"]
        assert (await provider.client.model_schema("black-forest-labs-flux-2-klein-4b")) is not None


@pytest.mark.anyio
async def test_stalled_stream_hits_the_read_timeout_and_reconnects() -> None:
    async with oxen(emu=emulator(keepalive=0.1), options={"read_timeout": 0.6}) as (emu, _, ctx):
        await connected(ctx)
        emu.faults.stall = True
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.RECONNECTING)
        assert "no data" in (ctx.healths[-1][1] or "")
        emu.faults.stall = False
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.CONNECTED)


@pytest.mark.anyio
async def test_emulator_restart_drops_the_stream_and_the_provider_catches_up() -> None:
    async with oxen(paused=True, poll=30.0) as (emu, provider, ctx):
        await connected(ctx)
        (job,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="across a restart [ok]"))
        before = len(emu.requests("GET", "/api/events"))
        await emu.restart()
        emu.force(job, "succeeded")  # while streamd is away: Oxen keeps no event for it
        await ctx.wait_for(lambda: ctx.states(job)[-1:] == ["completed"])
        assert len(emu.requests("GET", "/api/events")) > before
        assert state_events(ctx, job, State.COMPLETED)[0].origin is Origin.POLL


# -- the emulator's own contract -----------------------------------------------------------------
@pytest.mark.anyio
async def test_emulator_sse_keepalives_no_buffering_and_nothing_for_cancelled() -> None:
    emu = OxenEmulator(seed=5, speed=40.0, keepalive=0.05)
    emu.faults.paused = True
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        done = await enqueue_directly(emu, "first [ok]")
        before = await enqueue_directly(emu, "finished before anyone listened [ok]")
        dropped = await enqueue_directly(emu, "cancelled [hang]")
        emu.force(before, "succeeded")
        headers = {"Authorization": f"Bearer {emu.key}"}
        async with httpx.AsyncClient(base_url=emu.server.url, headers=headers) as http:
            listed = (await http.get("/api/ai/queue")).json()
            assert {g["generation_id"] for g in listed["generations"]} == {done, dropped}
            finished = (await http.get("/api/ai/queue", params={"status": "succeeded"})).json()
            assert [g["generation_id"] for g in finished["generations"]] == [before]

            received: list[sse.SSEEvent] = []
            with anyio.fail_after(20):
                async with sse.connect(http, "/api/events") as stream, anyio.create_task_group() as reader:
                    quiet, completed = anyio.Event(), anyio.Event()

                    async def read() -> None:  # the bytes by hand, to see the comments as they come
                        async for chunk in stream.response.aiter_bytes():
                            received.extend(stream.parser.feed(chunk))
                            if stream.parser.comments:
                                quiet.set()  # keep-alives arrive on their own while nothing happens
                            if any(e.event == "media_generation_completed" for e in received):
                                completed.set()

                    reader.start_soon(read)
                    await quiet.wait()
                    await http.delete(f"/api/ai/queue/{dropped}")
                    emu.force(done, "failed", error="worker lost during inference")
                    await completed.wait()
                    reader.cancel_scope.cancel()
        tg.cancel_scope.cancel()
    completions = [json.loads(e.data) for e in received if e.event == "media_generation_completed"]
    data = completions[0]
    assert data == {
        "generation_id": done,
        "status": "failed",
        "media_type": "image",
        "error": "worker lost during inference",
    }
    # one completion: none for the cancelled job, none replayed for the one that finished before
    assert len(completions) == 1
    assert emu.truth[dropped].state == "cancelled" and emu.truth[before].state == "completed"


@pytest.mark.anyio
async def test_a_reconnect_right_after_a_poll_repolls_when_the_interval_allows_not_at_once() -> None:
    """The repair after a reconnect needs a poll that went out after the stream came up; a job polled
    less than the advised interval before is asked then (soon), not twice within a second."""
    async with oxen(paused=True, poll=2.0) as (emu, provider, ctx):
        await connected(ctx)
        (job,) = await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="polled twice? [ok]"))
        path = f"/api/ai/queue/{job}"
        with anyio.fail_after(20):
            while not emu.requests("GET", path):  # noqa: ASYNC110  (the emulator's log has no event)
                await anyio.sleep(0.02)
        first = emu.requests("GET", path)[0][0]
        reconnects = len([h for h in ctx.healths if h[0] is Health.CONNECTED])
        emu.faults.drop_after = 0  # cut the stream at its next event (a keep-alive), and let it back
        with anyio.fail_after(20):
            while len([h for h in ctx.healths if h[0] is Health.CONNECTED]) == reconnects:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        emu.faults.drop_after = None
        with anyio.fail_after(20):
            while len(emu.requests("GET", path)) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        second = emu.requests("GET", path)[1][0]
        assert second - first >= 2.0 - 0.05  # (the emulator's clock; a little slack for its rounding)


@pytest.mark.anyio
async def test_many_jobs_are_polled_through_the_active_list_and_a_finished_one_by_itself() -> None:
    """From LIST_MODE_JOBS unfinished jobs on, one list request a round is every job's poll (it was one
    request per job: ~1,100 a second for 2,500 jobs); a job missing from the list (it finished, and
    SSE lost its event) is asked for by itself and completes with its outputs."""
    async with oxen(paused=True, poll=0.2) as (emu, provider, ctx):
        await connected(ctx)
        jobs = await submit_pairs(provider, ctx, 5, "list")
        assert len(jobs) == 10 >= LIST_MODE_JOBS
        lists = len(emu.requests("GET", "/api/ai/queue"))
        emu.force(jobs[0], "processing")
        await ctx.wait_for(lambda: bool(state_events(ctx, jobs[0], State.RUNNING)))
        [running] = state_events(ctx, jobs[0], State.RUNNING)
        assert running.origin is Origin.POLL
        emu.force(jobs[1], "processing")
        emu.force(jobs[1], "succeeded", announce=False)  # SSE never says so
        await ctx.wait_for(lambda: bool(state_events(ctx, jobs[1], State.COMPLETED)))
        [done] = state_events(ctx, jobs[1], State.COMPLETED)
        assert (done.origin, done.outputs) == (Origin.POLL, tuple(emu.truth[jobs[1]].outputs))
        assert len(emu.requests("GET", "/api/ai/queue")) > lists  # the list answered the polls...
        assert len(emu.requests("GET", f"/api/ai/queue/{jobs[1]}")) >= 1  # ...but not for the finished job
        for job in jobs[2:]:
            assert emu.requests("GET", f"/api/ai/queue/{job}") == [], job  # the list answered for them all


@pytest.mark.anyio
async def test_a_failing_list_is_asked_again_and_only_then_each_job_by_itself() -> None:
    """One failed list is asked again at the next round (polling thousands of jobs one by one at once
    is the storm list mode avoids); after LIST_TRIES failures in a row the jobs are polled one by one."""
    async with oxen(paused=True, poll=0.2) as (emu, provider, ctx):
        await connected(ctx)
        jobs = await submit_pairs(provider, ctx, 4, "fall")
        lists = len(emu.requests("GET", "/api/ai/queue"))
        emu.faults.error_status, emu.faults.error_count = 500, 1  # the next request (a list) fails
        with anyio.fail_after(20):
            while len(emu.requests("GET", "/api/ai/queue")) < lists + 3:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert emu.faults.errors_served == 1
        assert not any(emu.requests("GET", f"/api/ai/queue/{job}") for job in jobs)  # the list did it again
        emu.faults.error_status, emu.faults.error_count = 500, LIST_TRIES  # now it keeps failing
        with anyio.fail_after(20):
            while not all(emu.requests("GET", f"/api/ai/queue/{job}") for job in jobs):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert emu.faults.errors_served == 1 + LIST_TRIES
