"""RunwareProvider against the Runware emulator, on loopback.

Jobs are stepped exactly with `Faults.paused` and `RunwareEmulator.force`, so a disconnect lands
in the middle of a batch every time; waits are event-driven under generous `fail_after`s.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedOK

from streamd.config import ProviderSettings, Secret
from streamd.emulators.runware import RunwareEmulator
from streamd.events import EventData, Health, Job, Kind, Origin, State
from streamd.providers.base import ProviderError, SubmitRequest
from streamd.providers.runware.provider import RunwareProvider
from tests.support import RecordingContext

pytestmark = pytest.mark.anyio

MODEL = "bytedance:5@0"
FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.2, "connect_timeout": 2.0}


def settings_for(emu: RunwareEmulator, *, key: str | None = None, **options: Any) -> ProviderSettings:
    """The emulator's own settings (its ports must be known), fast polling, quick reconnects."""
    base = emu.settings()
    return replace(
        base,
        key=Secret(key) if key is not None else base.key,
        poll_interval=0.1,
        options={**base.options, **FAST, **options},
    )


@asynccontextmanager
async def running(
    emu: RunwareEmulator, *, ctx: RecordingContext | None = None, key: str | None = None, **options: Any
) -> AsyncIterator[tuple[RunwareProvider, RecordingContext]]:
    """The emulator (unless already serving) and a provider on it, both cancelled on exit."""
    async with anyio.create_task_group() as tg:
        if not emu.ws_port:
            await tg.start(emu.serve)
        provider = RunwareProvider(settings_for(emu, key=key, **options))
        ctx = ctx or RecordingContext("runware")
        await tg.start(provider.run, ctx)
        try:
            yield provider, ctx
        finally:
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await provider.aclose()


@asynccontextmanager
async def serving(emu: RunwareEmulator) -> AsyncIterator[None]:
    """The emulator alone, outliving the providers (daemons) a test starts and stops on it."""
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        yield
        tg.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    """For emulator-side conditions, which emit nothing a context could wait on."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110  (emulator counters have no event to wait on)
            await anyio.sleep(0.01)


def request(prompt: str, **options: Any) -> SubmitRequest:
    return SubmitRequest(model=MODEL, prompt=prompt, options=options)


def submitted_elsewhere(emu: RunwareEmulator, task: str, prompt: str, *, results: int) -> list[dict[str, Any]]:
    """A REST request as another client of the account would send it, written out by hand (not with
    streamd's own client code)."""
    return [
        {"taskType": "authentication", "apiKey": emu.key},
        {
            "taskType": "imageInference",
            "taskUUID": task,
            "model": MODEL,
            "positivePrompt": prompt,
            "numberResults": results,
            "deliveryMethod": "async",
            "includeCost": True,
        },
    ]


def states(ctx: RecordingContext, job: str, state: State) -> list[EventData]:
    return [e for e in ctx.events if e.job == job and e.kind is Kind.STATE and e.status is state]


def steps(ctx: RecordingContext, job: str) -> list[int]:
    return [
        e.progress.step
        for e in ctx.events
        if e.job == job and e.kind is Kind.PROGRESS and e.progress and e.progress.step
    ]


def terminal(ctx: RecordingContext, job: str) -> Callable[[], bool]:
    return lambda: (j := ctx.job(job)) is not None and j.status.terminal


def assert_no_secret(ctx: RecordingContext, secret: str) -> None:
    encoded = msgspec.json.encode([ctx.observations, ctx.events]) + repr(ctx.healths).encode()
    assert secret.encode() not in encoded


def assert_matches_truth(ctx: RecordingContext, emu: RunwareEmulator, job: str) -> EventData:
    """Exactly one COMPLETED event, carrying what really happened; returns it."""
    truth = emu.truth[job]
    assert truth.state == "completed"
    [done] = states(ctx, job, State.COMPLETED)
    assert sorted(done.outputs) == sorted(truth.outputs)
    assert done.cost == pytest.approx(truth.cost)
    assert ctx.states(job)[-1] == "completed"
    assert steps(ctx, job) == sorted(set(steps(ctx, job)))  # progress never repeats or goes back
    return done


async def test_batch_over_the_socket_completes_with_outputs_and_cost() -> None:
    emu = RunwareEmulator(speed=20, seed=3)
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            assert ctx.healths[0][:2] == (Health.CONNECTED, "new session")
            [job] = await provider.submit(ctx, request("[ok] a lighthouse at dusk", num="3", width=1024, height=768))
            assert uuid.UUID(job).version == 4
            await ctx.wait_for(terminal(ctx, job))
            done = assert_matches_truth(ctx, emu, job)
            assert done.origin is Origin.PUSH
            assert ctx.states(job) == ["queued", "running", "completed"]
            [queued] = states(ctx, job, State.QUEUED)
            assert (queued.origin, queued.upstream, queued.model) == (Origin.REQUEST, "acknowledgement", MODEL)
            assert steps(ctx, job) == [1, 2]
            assert emu.tasks[job].plan.outcome == "succeeded" and len(emu.tasks[job].gens) == 3
            follow = ctx.follows[job]
            assert follow["numberResults"] == "3" and follow["session"] in emu.session_ids()
            async with httpx.AsyncClient() as http:
                image = await http.get(done.outputs[0])
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
            assert emu.get_responses == 0  # nothing needed repair
            assert_no_secret(ctx, emu.key)


async def test_one_task_fails_while_another_on_the_same_session_succeeds() -> None:
    emu = RunwareEmulator(speed=20, seed=4)
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            [bad] = await provider.submit(ctx, request("[fail] a red fox in snow"))
            [good] = await provider.submit(ctx, request("[ok] a red fox in snow", numberResults=2))
            assert ctx.follows[bad]["session"] == ctx.follows[good]["session"]
            await ctx.wait_for(lambda: terminal(ctx, bad)() and terminal(ctx, good)())
            [failed] = states(ctx, bad, State.FAILED)
            assert failed.error == emu.truth[bad].error and failed.error
            assert failed.origin is Origin.PUSH and failed.upstream != "diagnostic"
            assert ctx.states(bad) == ["queued", "failed"]
            assert_matches_truth(ctx, emu, good)


async def test_disconnect_mid_batch_resumed_inside_the_window_delivers_the_buffer() -> None:
    emu = RunwareEmulator(speed=20, seed=5)
    with anyio.fail_after(30):  # resume_grace: only the session buffer can bring items 2-3
        async with running(emu, resume_grace=60.0) as (provider, ctx):
            emu.faults.paused = True
            [job] = await provider.submit(ctx, request("[ok] isometric bakery", numberResults=4))
            emu.force(job, items=1)
            await ctx.wait_for(lambda: steps(ctx, job) == [1])
            emu.faults.drop_after = 0  # every reconnect is cut at once...
            await emu.restart()
            emu.force(job, items=2)  # ...while two more items land in the session's buffer
            await until(lambda: emu.faults.drops >= 1)
            emu.faults.drop_after = None
            await ctx.wait_for(lambda: steps(ctx, job) == [1, 2, 3])
            emu.force(job)
            await ctx.wait_for(terminal(ctx, job))
            done = assert_matches_truth(ctx, emu, job)
            assert done.origin is Origin.PUSH
            assert emu.resumed >= 1 and emu.unknown_resumes == 0
            assert emu.get_responses == 0
            assert (Health.CONNECTED, "session resumed") in [h[:2] for h in ctx.healths]
            assert any(h[0] is Health.RECONNECTING and h[2] is not None for h in ctx.healths)


async def test_disconnect_mid_batch_beyond_the_window_is_repaired_by_get_response_once() -> None:
    emu = RunwareEmulator(speed=20, seed=6, resume_window=0.4)
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            emu.faults.paused = True
            [job] = await provider.submit(ctx, request("[ok] brutalist library", numberResults=4))
            emu.force(job, items=1)
            await ctx.wait_for(lambda: steps(ctx, job) == [1])
            emu.faults.drop_after = 0  # the socket stays down...
            emu.faults.error_status, emu.faults.error_count = 503, -1  # ...and REST with it
            await emu.restart()
            emu.force(job, items=2)  # buffered for a session that will expire
            await until(lambda: emu.expired >= 1)
            emu.force(job)  # the batch finishes upstream with nobody listening
            assert emu.truth[job].state == "completed"
            emu.faults.error_status, emu.faults.drop_after = None, None
            await ctx.wait_for(terminal(ctx, job))
            done = assert_matches_truth(ctx, emu, job)
            assert done.origin is Origin.POLL and done.upstream == "success"
            await ctx.wait_for(lambda: ctx.healths[-1][:2] == (Health.CONNECTED, "new session"))
            assert emu.resumed == 0 and emu.unknown_resumes >= 1
            assert emu.get_responses >= 1


async def test_legacy_error_shape_fails_the_task() -> None:
    emu = RunwareEmulator(speed=20, seed=7)
    emu.legacy_errors = True
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            [job] = await provider.submit(ctx, request("[fail] macro dew on a web"))
            await ctx.wait_for(terminal(ctx, job))
            [failed] = states(ctx, job, State.FAILED)
            assert failed.error == emu.truth[job].error
            assert failed.upstream == "error" and failed.raw["errorId"] == 0


@pytest.mark.parametrize(
    ("legacy", "reject"), [(False, False), (True, False), (False, True)], ids=["errors-array", "legacy", "reject-knob"]
)
async def test_invalid_api_key_stops_without_a_storm(legacy: bool, reject: bool) -> None:
    emu = RunwareEmulator(speed=20)
    emu.legacy_errors = legacy
    emu.faults.reject_auth = reject
    wrong = emu.key if reject else "sk-wrong-key-0123456789"
    with anyio.fail_after(30):
        async with running(emu, key=wrong, reconnect_initial=0.01) as (provider, ctx):
            assert ctx.healths[-1][0] is Health.AUTH_FAILED  # known once run() reports started
            message = ctx.healths[-1][1] or ""
            assert "API key" in message and ("invalidApiKey" in message or "Invalid api key" in message)
            await anyio.sleep(0.5)  # a retry loop at 10 ms would connect dozens of times here
            assert emu.ws_connections == 1 and emu.auth_failures == 1
            with pytest.raises(ProviderError) as refused:
                await provider.submit(ctx, request("[ok] anything"))
            assert refused.value.code == "auth" and wrong not in refused.value.message
            assert_no_secret(ctx, wrong)


async def test_refused_submission_raises_and_leaves_no_job() -> None:
    emu = RunwareEmulator(speed=20)
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            with pytest.raises(ProviderError) as upstream:  # Runware's own validation, over the socket
                await provider.submit(ctx, request("[ok] too small", width=64, height=64))
            assert upstream.value.code == "bad_request" and "width" in upstream.value.message
            for options in ({"numberResults": 21}, {"taskUUID": "mine"}, {"width": 512}, {"steps": "many"}):
                with pytest.raises(ProviderError) as local:
                    await provider.submit(ctx, request("[ok] x", **options))
                assert local.value.code == "bad_request"
            assert [e for e in ctx.events if e.job is not None] == []
            assert ctx.follows == {}


async def test_track_follows_a_task_submitted_elsewhere() -> None:
    emu = RunwareEmulator(speed=20, seed=8)
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            task = str(uuid.uuid4())
            body = submitted_elsewhere(emu, task, "[ok] watercolour archipelago", results=2)
            async with httpx.AsyncClient() as http:
                answer = await http.post(provider.settings.base_url, json=body)
            assert answer.status_code == 200 and answer.json()["data"][0]["taskUUID"] == task
            assert await provider.track(ctx, f" {task} ") == task
            assert ctx.follows[task]["via"] == "track"
            await ctx.wait_for(terminal(ctx, task))
            assert assert_matches_truth(ctx, emu, task).origin is Origin.POLL
            assert await provider.track(ctx, task) == task  # tracking a finished job again...
            asked = emu.get_responses
            await anyio.sleep(0.5)  # ...is one look, not a poll every 0.1 s forever
            assert emu.get_responses == asked
            assert len(states(ctx, task, State.COMPLETED)) == 1
            with pytest.raises(ProviderError) as unknown:
                await provider.track(ctx, str(uuid.uuid4()))
            assert unknown.value.code == "not_found"
            with pytest.raises(ProviderError) as malformed:
                await provider.track(ctx, "not-a-uuid")
            assert malformed.value.code == "bad_request"
            with pytest.raises(ProviderError) as cancel:
                await provider.cancel(ctx, task)
            assert cancel.value.code == "unsupported" and "\n" not in cancel.value.message


async def test_socket_down_submits_and_polls_over_rest_through_a_rate_limit() -> None:
    emu = RunwareEmulator(speed=20, seed=9)
    emu.faults.drop_after = 0  # the socket never comes up
    emu.faults.retry_after = 0.2
    with anyio.fail_after(30):
        async with running(emu) as (provider, ctx):
            assert ctx.healths[0][0] is Health.RECONNECTING
            [job] = await provider.submit(ctx, request("[slow] product shot of a mug", numberResults=2))
            assert ctx.follows[job]["via"] == "rest" and "session" not in ctx.follows[job]
            [queued] = states(ctx, job, State.QUEUED)
            assert queued.origin is Origin.REQUEST
            emu.faults.error_status, emu.faults.error_count = 429, 1
            await ctx.wait_for(terminal(ctx, job))
            assert assert_matches_truth(ctx, emu, job).origin is Origin.POLL
            limited = [h for h in ctx.healths if h[0] is Health.RATE_LIMITED]
            assert limited and limited[0][2] == pytest.approx(0.2)
            assert emu.faults.errors_served == 1


async def test_idle_connections_are_closed_but_pings_keep_the_provider_connected() -> None:
    emu = RunwareEmulator(speed=20, idle_timeout=0.4)
    with anyio.fail_after(30):
        async with serving(emu):
            async with connect(emu.settings().ws_url, proxy=None) as ws:
                await ws.send(f'[{{"taskType": "authentication", "apiKey": "{emu.key}"}}]')
                assert "connectionSessionUUID" in str(await ws.recv())
                with pytest.raises(ConnectionClosedOK):
                    await ws.recv()  # silent client: Runware closes it
                assert (ws.close_code, ws.close_reason) == (1000, "idle timeout")
            assert emu.idle_closes == 1
            async with running(emu) as (_, ctx):  # pings every idle_timeout / 4
                await anyio.sleep(1.5)  # several idle windows
                assert emu.idle_closes == 1
                assert [h[0] for h in ctx.healths] == [Health.CONNECTED]


async def test_a_silent_socket_is_replaced_and_its_session_resumed() -> None:
    emu = RunwareEmulator(speed=20, seed=10)
    with anyio.fail_after(30):
        async with running(emu, ping_interval=0.1, pong_timeout=0.5, connect_timeout=1.0) as (provider, ctx):
            emu.faults.stall = True
            await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.RECONNECTING)
            assert "no frame" in (ctx.healths[-1][1] or "")
            emu.faults.stall = False
            await ctx.wait_for(lambda: ctx.healths[-1][:2] == (Health.CONNECTED, "session resumed"))
            [job] = await provider.submit(ctx, request("[ok] retro train station"))
            await ctx.wait_for(terminal(ctx, job))
            assert assert_matches_truth(ctx, emu, job).origin is Origin.PUSH


async def test_a_restarted_daemon_resumes_the_remembered_session() -> None:
    emu = RunwareEmulator(speed=20, seed=11)
    ctx = RecordingContext("runware")  # survives the provider, as the journal's job store would
    with anyio.fail_after(30):
        async with serving(emu):
            async with running(emu, ctx=ctx) as (first, _):
                emu.faults.paused = True
                [job] = await first.submit(ctx, request("[ok] old fisherman portrait", numberResults=3))
                emu.force(job, items=1)
                await ctx.wait_for(lambda: steps(ctx, job) == [1])
            emu.force(job, items=1)  # arrives while no daemon runs: buffered for the session
            async with running(emu, ctx=ctx):
                await ctx.wait_for(lambda: steps(ctx, job) == [1, 2])  # counted on from the follow
                emu.force(job)
                await ctx.wait_for(terminal(ctx, job))
                done = assert_matches_truth(ctx, emu, job)
                assert done.origin is Origin.PUSH
                assert emu.resumed == 1 and emu.unknown_resumes == 0


async def test_a_task_restored_without_its_size_is_not_completed_by_its_first_image() -> None:
    """Killed after a submit was acknowledged but before its numberResults was stored: the restarted
    daemon resumes the session (another job's follow-up data names it), which pushes the task's first
    image. Counted against Runware's default of one image, that completed a two-image task. (Whichever
    comes first, that push or the restored task's first getResponse, the job completes once, with both
    images; the normaliser's tests pin the push-first order, which this run may or may not take.)"""
    emu = RunwareEmulator(speed=20, seed=11)
    ctx = RecordingContext("runware")  # survives the provider, as the journal's job store would
    with anyio.fail_after(30):
        async with serving(emu):
            async with running(emu, ctx=ctx) as (first, _):
                emu.faults.paused = True
                await first.submit(ctx, request("[ok] a lighthouse at dusk", numberResults=2))
                [job] = await first.submit(ctx, request("[ok] old fisherman portrait", numberResults=2))
            del ctx.follows[job]  # the kill came before it was stored
            emu.force(job, items=1)  # arrives while no daemon runs: buffered for the session
            async with running(emu, ctx=ctx):
                await ctx.wait_for(lambda: steps(ctx, job) == [1])
                assert not states(ctx, job, State.COMPLETED)
                emu.force(job)
                await ctx.wait_for(terminal(ctx, job))
                assert_matches_truth(ctx, emu, job)
                assert emu.resumed == 1


async def test_a_restored_task_ended_by_its_resumed_session_gets_one_last_look() -> None:
    """The dead daemon read a task's first image and was killed before it journaled it; the task then
    failed while no daemon ran. The resumed session replays only the failure (the image was delivered),
    so only a getResponse can still say that one image was made, and what it cost."""
    emu = RunwareEmulator(speed=20, seed=11)
    before = RecordingContext("runware")
    with anyio.fail_after(30):
        async with serving(emu):
            async with running(emu, ctx=before) as (first, _):
                emu.faults.paused = True
                [job] = await first.submit(before, request("[ok] old fisherman portrait", numberResults=2))
                emu.force(job, items=1)
                await before.wait_for(lambda: steps(before, job) == [1])
            # What the journal held at the kill: the job as submitted, its follow-up data without the item.
            after = RecordingContext("runware")
            after.tracker.restore([Job(provider="runware", job=job, status=State.QUEUED)])
            after.follows[job] = {k: v for k, v in before.follows[job].items() if k != "items"}
            emu.force(job, fail=True)  # while no daemon runs: buffered for the session
            async with running(emu, ctx=after):
                await after.wait_for(lambda: (j := after.job(job)) is not None and bool(j.outputs))
                truth = emu.truth[job]
                assert truth.state == "failed" and len(truth.outputs) == 1
                final = after.job(job)
                assert final is not None and final.status is State.FAILED
                assert list(final.outputs) == truth.outputs and final.cost == pytest.approx(truth.cost)
                assert len(states(after, job, State.FAILED)) == 1
                assert emu.resumed == 1


def test_a_job_restored_without_its_number_of_results_is_unsized() -> None:
    provider = RunwareProvider(settings_for(RunwareEmulator()))
    lost, kept = (Job(provider="runware", job=str(uuid.uuid4()), status=State.QUEUED) for _ in range(2))
    provider._adopt(lost, {}, 0.0)
    provider._adopt(kept, {"numberResults": "3", "via": "ws", "session": "s"}, 0.0)
    sized = {task: (b.unsized, b.expected) for task, b in provider._norm.batches.items()}
    assert sorted(sized.values()) == [(False, 3), (True, None)]


async def test_a_task_polled_just_before_the_socket_came_up_is_not_asked_again_at_once() -> None:
    """After a restart the first sweep goes over REST while the socket is still down; the socket's
    after-connect repair then waits for the advised interval instead of asking again within ms."""
    emu = RunwareEmulator(speed=20, seed=11)
    emu.faults.paused = True  # the task stays processing: only polls can be seen
    emu.faults.drop_after = 0  # the socket cannot come up yet
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(emu.serve)
            task = str(uuid.uuid4())
            body = submitted_elsewhere(emu, task, "[ok] a lighthouse", results=1)
            async with httpx.AsyncClient() as http:
                assert (await http.post(emu.settings().base_url, json=body)).status_code == 200
            ctx = RecordingContext("runware")
            ctx.tracker.restore([Job(provider="runware", job=task, status=State.RUNNING)])
            ctx.follows[task] = {"via": "rest", "numberResults": "1"}
            settings = replace(settings_for(emu), poll_interval=30.0)
            provider = RunwareProvider(settings)
            tg.start_soon(provider.run, ctx)
            await until(lambda: emu.get_responses == 1)  # the restore's sweep, over REST
            emu.faults.drop_after = None
            await until(lambda: any(h[0] is Health.CONNECTED for h in ctx.healths))
            await anyio.sleep(0.5)
            assert emu.get_responses == 1
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True):
                await provider.aclose()


class CountingContext(RecordingContext):
    def __init__(self, provider: str) -> None:
        super().__init__(provider)
        self.emits = 0

    async def emit(self, *observations: Any) -> None:
        self.emits += 1
        await super().emit(*observations)


async def test_a_burst_of_frames_is_emitted_together_and_in_order() -> None:
    """Frames that arrive together are absorbed together: one emit for the burst, not one a frame
    (which cost more than reading them), and the jobs' events in the order of the frames."""
    import json

    from websockets.asyncio.server import ServerConnection, serve

    tasks = [str(uuid.uuid4()) for _ in range(300)]

    async def runware(conn: ServerConnection) -> None:
        await conn.recv()  # the authentication task
        await conn.send(json.dumps({"data": [{"taskType": "authentication", "connectionSessionUUID": "s-1"}]}))
        for k, task in enumerate(tasks):
            item = {"taskType": "imageInference", "taskUUID": task, "imageUUID": f"i-{k}", "cost": 0.01}
            await conn.send(json.dumps({"data": [{**item, "imageURL": f"http://127.0.0.1:9/{k}.png"}]}))
        await conn.wait_closed()

    ctx = CountingContext("runware")
    with anyio.fail_after(30):
        async with serve(runware, "127.0.0.1", 0) as server, anyio.create_task_group() as tg:
            port = server.sockets[0].getsockname()[1]
            provider = RunwareProvider(
                ProviderSettings(
                    name="runware",
                    key=Secret("k-123"),
                    base_url="http://127.0.0.1:9/v1",  # never asked: no task needs a poll
                    ws_url=f"ws://127.0.0.1:{port}/v1",
                    options=FAST,
                )
            )
            await tg.start(provider.run, ctx)
            await ctx.wait_for(lambda: all(terminal(ctx, t)() for t in tasks))
            tg.cancel_scope.cancel()
        await provider.aclose()
    completed = [e.job for e in ctx.events if e.kind is Kind.STATE and e.status is State.COMPLETED]
    assert completed == tasks
    assert [e.outputs for e in ctx.events if e.job == tasks[7]] == [("http://127.0.0.1:9/7.png",)]
    assert ctx.emits < 30, ctx.emits  # one a frame would be 300, plus the health reports


async def test_a_flush_whose_caller_is_cancelled_still_hands_over_what_it_took() -> None:
    """A flush takes every pending reading, other tasks' too (the socket's): the caller that happened to
    flush being cancelled mid-emit (a submit whose client went away) must not lose them."""
    import json

    class Blocked(RecordingContext):
        def __init__(self) -> None:
            super().__init__("runware")
            self.room = anyio.Event()

        async def emit(self, *observations: Any) -> None:
            await self.room.wait()  # the pipeline's queue is full: emit waits for room
            await super().emit(*observations)

    provider = RunwareProvider(ProviderSettings(name="runware", key=Secret("k-1"), base_url="http://127.0.0.1:9/v1"))
    ctx = Blocked()
    task = str(uuid.uuid4())
    provider._norm.expect(task, number_results=1)
    result = {
        "taskType": "imageInference",
        "taskUUID": task,
        "imageUUID": "u-1",
        "imageURL": "http://127.0.0.1:9/u.png",
    }
    provider._read(json.dumps({"data": [result]}), Origin.PUSH)  # read by the socket's reader
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            caller = anyio.CancelScope()

            async def submitter_flushing() -> None:
                with caller:
                    await provider._flush(ctx)

            tg.start_soon(submitter_flushing)
            await anyio.sleep(0.05)
            caller.cancel()  # its client went away
            await anyio.sleep(0.05)
            ctx.room.set()
    assert [e.status for e in ctx.events if e.job == task] == [State.COMPLETED]
    await provider.aclose()
