"""WiroProvider against the Wiro emulator: socket, repair polls, track, cancel, faults."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from streamd.config import ProviderSettings, Secret
from streamd.emulators.wiro import WiroEmulator
from streamd.events import Health, Kind, Origin, State
from streamd.providers.base import ProviderError, SubmitRequest
from streamd.providers.wiro.client import WiroClient
from streamd.providers.wiro.provider import WiroProvider, _Task
from tests.support import RecordingContext

MODEL = "bytedance/seedream-v4"
ORDER = list(State)


def settings_for(emu: WiroEmulator, quiet: float) -> ProviderSettings:
    return dataclasses.replace(
        emu.settings(), poll_interval=quiet, options={"reconnect_initial": 0.05, "reconnect_max": 0.2}
    )


@pytest.fixture
async def emu() -> AsyncIterator[WiroEmulator]:
    emulator = WiroEmulator(speed=20, seed=7, fail_rate=0.0)
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.serve)
        yield emulator
        tg.cancel_scope.cancel()


@asynccontextmanager
async def running(emu: WiroEmulator, ctx: RecordingContext, *, quiet: float = 30.0) -> AsyncIterator[WiroProvider]:
    """A provider whose repair polls come only from (re)registration unless `quiet` is short."""
    provider = WiroProvider(settings_for(emu, quiet))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(provider.run, ctx)
            yield provider
            tg.cancel_scope.cancel()
    finally:
        await provider.aclose()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for emulator-side state (not visible through the context)."""
    with anyio.fail_after(20):
        while not predicate():  # noqa: ASYNC110 (the emulator's counters have no event to wait on)
            await anyio.sleep(0.01)


def ended(ctx: RecordingContext, *jobs: str) -> bool:
    return all((j := ctx.job(job)) is not None and j.status.terminal for job in jobs)


def reached(ctx: RecordingContext, job: str, state: State) -> bool:
    j = ctx.job(job)
    return j is not None and ORDER.index(j.status) >= ORDER.index(state)


def assert_forward_only(ctx: RecordingContext, job: str) -> None:
    seen = [ORDER.index(State(s)) for s in ctx.states(job)]
    assert seen == sorted(set(seen)), ctx.states(job)


def assert_no_tokens(ctx: RecordingContext, emu: WiroEmulator) -> None:
    text = msgspec.json.encode([ctx.observations, ctx.events]).decode()
    for task in emu.tasks.values():
        assert task.token not in text


def matches_truth(ctx: RecordingContext, emu: WiroEmulator, job: str) -> None:
    truth, seen = emu.truth[job], ctx.job(job)
    assert seen is not None
    assert seen.status.value == truth.state
    assert list(seen.outputs) == truth.outputs
    if truth.state == "completed":
        assert seen.cost == pytest.approx(truth.cost)


@pytest.mark.anyio
async def test_submit_follows_tasks_to_their_end(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        assert ctx.healths[0][0] is Health.CONNECTED
        generic = {"num": 2, "width": 2048, "height": 2048}  # what `streamd submit --num 2 --size 2048x2048` sends
        request = SubmitRequest(model=MODEL, prompt="a fox [slow] [ok]", options=generic)
        ok = (await provider.submit(ctx, request))[0]
        bad = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a fox [fail]")))[0]
        assert ctx.follows[ok]["token"] == emu.tasks[ok].token  # kept for a restart, not in events
        await ctx.wait_for(lambda: ended(ctx, ok, bad))
    assert {k: emu.tasks[ok].params.get(k) for k in ("maxImages", "size", "num")} == {
        "maxImages": 2,
        "size": "2048x2048",
        "num": None,
    }
    for job in (ok, bad):
        matches_truth(ctx, emu, job)
        assert_forward_only(ctx, job)
    done = ctx.job(ok)
    assert done is not None and len(done.outputs) == 2 and done.model == MODEL and done.prompt == "a fox [slow] [ok]"
    assert done.progress is not None and done.progress.percent == 100.0
    progress = [e for e in ctx.events if e.job == ok and e.kind is Kind.PROGRESS]
    assert progress and all(e.progress and e.progress.step and e.progress.steps for e in progress)
    assert [e.origin for e in ctx.events if e.job == ok and e.status is State.COMPLETED] == [Origin.PUSH]
    failed = ctx.job(bad)
    truth_error = emu.truth[bad].error
    assert failed is not None and truth_error and failed.error and truth_error in failed.error
    assert any(e.kind is Kind.LOG and e.upstream == "task_error" for e in ctx.events if e.job == bad)
    assert_no_tokens(ctx, emu)


@pytest.mark.anyio
async def test_disconnects_mid_task_are_repaired(emu: WiroEmulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ctx = RecordingContext("wiro")
    emu.faults.drop_after = 4  # every connection dies after four frames
    async with running(emu, ctx) as provider:
        jobs = [(await provider.submit(ctx, SubmitRequest(model=MODEL, prompt=f"p{i} [ok]")))[0] for i in range(2)]
        await ctx.wait_for(lambda: ended(ctx, *jobs), within=30)
    assert emu.faults.drops >= 2 and provider.connections >= 3
    assert emu.registrations >= provider.connections + 1  # unfinished tokens again on every new connection
    for job in jobs:
        matches_truth(ctx, emu, job)
        assert_forward_only(ctx, job)
    assert any(e.origin is Origin.POLL and e.kind is Kind.STATE for e in ctx.events)
    reconnecting = [h for h in ctx.healths if h[0] is Health.RECONNECTING]
    assert reconnecting and all(delay is not None and delay > 0 for _, _, delay in reconnecting)
    assert ctx.healths[-1][0] in (Health.CONNECTED, Health.RECONNECTING)
    assert_no_tokens(ctx, emu)
    for task in emu.tasks.values():
        assert task.token not in caplog.text
    assert emu.key not in caplog.text and emu.secret not in caplog.text


@pytest.mark.anyio
async def test_server_restart_mid_run(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a lighthouse [slow] [ok]")))[0]
        await ctx.wait_for(lambda: reached(ctx, job, State.RUNNING))
        emu.faults.paused = True  # the task waits mid-run while the connection is down
        registrations, before = emu.registrations, len(ctx.events)
        await emu.restart()
        await until(lambda: emu.registrations > registrations)  # its token, again, on the new connection
        emu.faults.paused = False
        await ctx.wait_for(lambda: ended(ctx, job))
    matches_truth(ctx, emu, job)
    assert provider.connections == 2
    assert [h[0] for h in ctx.healths][:3] == [Health.CONNECTED, Health.RECONNECTING, Health.CONNECTED]
    assert any(e.origin is Origin.PUSH and e.kind is Kind.PROGRESS for e in ctx.events[before:])


@pytest.mark.anyio
async def test_lost_final_frame_still_completes_with_outputs(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    emu.lost_frames = {"task_postprocess_end"}
    async with running(emu, ctx, quiet=0.5) as provider:
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a fox [ok]")))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
    matches_truth(ctx, emu, job)
    assert emu.truth[job].outputs
    (completed,) = [e for e in ctx.events if e.job == job and e.status is State.COMPLETED and e.kind is Kind.STATE]
    assert completed.origin is Origin.POLL and completed.outputs == tuple(emu.truth[job].outputs)


@pytest.mark.anyio
async def test_stalled_socket_is_covered_by_periodic_polls(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    emu.faults.stall = True
    async with running(emu, ctx, quiet=0.3) as provider:
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a fox [ok]")))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
    matches_truth(ctx, emu, job)
    assert all(e.origin is not Origin.PUSH for e in ctx.events if e.job == job)


@pytest.mark.anyio
async def test_fatal_task_error_status_fails_the_job(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="edit this [badinput]")))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
    seen = ctx.job(job)
    assert seen is not None and seen.status is State.FAILED and seen.upstream == "task_error"
    assert seen.error and "fetch" in seen.error
    assert emu.truth[job].state == "failed"


@pytest.mark.anyio
async def test_track_work_submitted_elsewhere(emu: WiroEmulator) -> None:
    other = WiroClient(emu.settings())  # "another tool"
    by_token = await other.run("bytedance", "seedream-v4", {"prompt": "tracked by token [ok]"})
    by_id = await other.run("bytedance", "seedream-v4", {"prompt": "tracked by id [ok]"})
    await other.aclose()
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        assert await provider.track(ctx, by_token.token) == by_token.taskid
        assert await provider.track(ctx, by_id.taskid) == by_id.taskid
        assert ctx.follows[by_id.taskid]["token"] == by_id.token  # learnt from Task/Detail
        await ctx.wait_for(lambda: ended(ctx, by_token.taskid, by_id.taskid))
        # tracking a finished task reports its end at once
        ctx2 = RecordingContext("wiro")
        assert await provider.track(ctx2, by_token.token) == by_token.taskid
        assert ctx2.states(by_token.taskid)[-1] == "completed"
    for job in (by_token.taskid, by_id.taskid):
        matches_truth(ctx, emu, job)
        seen = ctx.job(job)
        assert seen is not None and seen.prompt and seen.model == MODEL
    assert_no_tokens(ctx, emu)


@pytest.mark.anyio
async def test_bad_token_is_a_clear_error(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    bogus = "ThisTokenDoesNotExist123456789"
    async with running(emu, ctx) as provider:
        with pytest.raises(ProviderError) as info:
            await provider.track(ctx, bogus)
        with pytest.raises(ProviderError) as by_id:
            await provider.track(ctx, "99999999")
    assert info.value.code == "not_found" and bogus not in info.value.message
    assert by_id.value.code == "not_found" and "99999999" in by_id.value.message
    assert not ctx.tracker.unfinished()


@pytest.mark.anyio
async def test_cancel_picks_cancel_or_kill(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        emu.faults.paused = True  # nothing leaves the queue
        queued = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="queued")))[0]
        assert "cancelled queued" in await provider.cancel(ctx, queued)
        assert emu.calls[-1][0] == "/v1/Task/Cancel"
        emu.faults.paused = False
        hung = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="stuck [hang]")))[0]
        await ctx.wait_for(lambda: reached(ctx, hung, State.RUNNING))
        assert "killed" in await provider.cancel(ctx, hung)
        assert emu.calls[-1][0] == "/v1/Task/Kill"
        await ctx.wait_for(lambda: ended(ctx, queued, hung))
        with pytest.raises(ProviderError) as again:
            await provider.cancel(ctx, hung)
    assert again.value.code == "cannot_cancel"
    for job in (queued, hung):
        matches_truth(ctx, emu, job)
        assert ctx.states(job)[-1] == "cancelled"


@pytest.mark.anyio
async def test_restarted_daemon_reregisters_remembered_tokens(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")  # its tracker and follows play the journal's job store
    async with running(emu, ctx) as first:
        job = (await first.submit(ctx, SubmitRequest(model=MODEL, prompt="long one [slow] [ok]")))[0]
        await ctx.wait_for(lambda: reached(ctx, job, State.ACCEPTED))
        emu.faults.paused = True  # the daemon is down while the task waits
    before = len(ctx.events)
    registrations = emu.registrations
    async with running(emu, ctx) as second:
        await until(lambda: emu.registrations > registrations)
        emu.faults.paused = False
        await ctx.wait_for(lambda: ended(ctx, job))
    assert second.connections >= 1 and emu.registrations > registrations
    matches_truth(ctx, emu, job)
    after = ctx.events[before:]
    assert any(e.kind is Kind.PROGRESS and e.origin is Origin.PUSH for e in after)  # the socket, not just polls
    assert_forward_only(ctx, job)


@pytest.mark.anyio
async def test_auth_failure_shows_in_health_and_recovers(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    emu.faults.reject_auth = True
    async with running(emu, ctx, quiet=0.2) as provider:
        await ctx.wait_for(lambda: any(h[0] is Health.AUTH_FAILED for h in ctx.healths))
        with pytest.raises(ProviderError) as info:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x"))
        assert info.value.code == "auth" and emu.key not in info.value.message
        emu.faults.reject_auth = False
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.CONNECTED)


@pytest.mark.anyio
async def test_wrong_signature_is_auth_failed() -> None:
    emulator = WiroEmulator(speed=20, secret="the-real-secret")
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.serve)
        ctx = RecordingContext("wiro")
        wrong = dataclasses.replace(emulator.settings(), secret=Secret("a-wrong-secret"))
        provider = WiroProvider(wrong)
        await tg.start(provider.run, ctx)
        await ctx.wait_for(lambda: any(h[0] is Health.AUTH_FAILED for h in ctx.healths))
        message = next(h[1] for h in ctx.healths if h[0] is Health.AUTH_FAILED) or ""
        assert "not valid" in message and "a-wrong-secret" not in message
        tg.cancel_scope.cancel()
    await provider.aclose()


@pytest.mark.anyio
async def test_local_file_submitted_as_multipart(emu: WiroEmulator, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        request = SubmitRequest(model=MODEL, prompt="make it dusk [ok]", images=[str(photo), "https://e.x/2.png"])
        job = (await provider.submit(ctx, request))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
        calls = len(emu.calls)
        with pytest.raises(ProviderError) as missing:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x", images=[str(tmp_path / "no.png")]))
        assert len(emu.calls) == calls  # refused before any request
    assert missing.value.code == "bad_request"
    assert emu.uploads == [(job, "inputImage", "photo.png", photo.read_bytes())]
    assert emu.tasks[job].params["inputImage"][0] == "https://e.x/2.png"
    matches_truth(ctx, emu, job)


@pytest.mark.anyio
async def test_concurrency_and_balance_refusals(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        emu.concurrency_limit = 0
        with pytest.raises(ProviderError) as busy:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x"))
        emu.concurrency_limit, emu.balance = None, 0.0
        with pytest.raises(ProviderError) as broke:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x"))
        with pytest.raises(ProviderError) as model:
            await provider.submit(ctx, SubmitRequest(model="seedream-v4", prompt="x"))
        with pytest.raises(ProviderError) as sync:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x", options={"sync": True}))
    assert (busy.value.code, broke.value.code, model.value.code) == ("concurrency", "balance", "bad_request")
    assert sync.value.code == "unsupported"
    assert "concurrency limit" in busy.value.message and "balance" in broke.value.message
    assert not ctx.tracker.unfinished()


@pytest.mark.anyio
async def test_rate_limit_shows_in_health_then_clears(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        emu.faults.error_status, emu.faults.error_count, emu.faults.retry_after = 429, 1, 0.2
        with pytest.raises(ProviderError) as info:
            await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="x"))
        assert info.value.code == "rate_limited" and info.value.retry_after == pytest.approx(0.2)
        assert ctx.healths[-1][0] is Health.RATE_LIMITED and ctx.healths[-1][2] == pytest.approx(0.2)
        await ctx.wait_for(lambda: ctx.healths[-1][0] is Health.CONNECTED)


@pytest.mark.anyio
async def test_duplicate_final_frames_settle_once(emu: WiroEmulator) -> None:
    """A replayed or duplicated task_postprocess_end must not produce a second terminal event."""
    ctx = RecordingContext("wiro")
    async with running(emu, ctx) as provider:
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a fox [ok]")))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
        task = emu.tasks[job]
        for _ in range(3):
            emu._push(task, "task_postprocess_end", task.outputs)
            emu._push(task, "task_start", None)  # a stale frame after the end
        await provider.track(ctx, job)  # and a poll on top
    states = [e.status for e in ctx.events if e.job == job and e.kind is Kind.STATE]
    assert states.count(State.COMPLETED) == 1 and states[-1] is State.COMPLETED


def test_unchanging_tasks_back_off_their_polls() -> None:
    task = _Task("1", None, seen=100.0)
    assert [dataclasses.replace(task, idle=n).due(2.0) for n in (0, 1, 2, 3, 9)] == [102.0, 104.0, 108.0, 116.0, 116.0]


@pytest.mark.anyio
async def test_poll_only_without_a_socket_url(emu: WiroEmulator) -> None:
    ctx = RecordingContext("wiro")
    provider = WiroProvider(dataclasses.replace(settings_for(emu, 0.2), socket_url=None))
    async with anyio.create_task_group() as tg:
        await tg.start(provider.run, ctx)
        job = (await provider.submit(ctx, SubmitRequest(model=MODEL, prompt="a fox [ok]")))[0]
        await ctx.wait_for(lambda: ended(ctx, job))
        tg.cancel_scope.cancel()
    await provider.aclose()
    matches_truth(ctx, emu, job)
    assert [h[0] for h in ctx.healths] == [Health.POLLING] and emu.registrations == 0
