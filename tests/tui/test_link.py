"""The dashboard's feed link, without Textual: resume after a restart, start over on a new epoch or a gap."""

from __future__ import annotations

import anyio
import pytest
from streamd_tui.fake import SubscribeCall
from streamd_tui.link import FeedLink, LinkState, fetch_history
from streamd_tui.model import Restart, Store

from streamd.events import CloudEvent, Kind, State
from streamd.feed.protocol import Snapshot

from .helpers import SOCKET, seeded, wait_until


def seqs(store: Store) -> list[int]:
    return [item.seq for item in store.pending if isinstance(item, CloudEvent)]


@pytest.mark.anyio
async def test_resumes_after_a_restart_with_since_last_seq_and_misses_nothing() -> None:
    fake = seeded(8)
    store = Store()
    link = FeedLink(SOCKET, fake.connect, store, delays=(0.01,), status_every=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        await wait_until(None, lambda: link.status.state is LinkState.LIVE)
        fake.emit("oxen", "ox-000", State.RUNNING)
        await wait_until(None, lambda: link.cursor == fake.seq)
        before = fake.seq
        fake.drop()
        await wait_until(None, lambda: link.status.state is LinkState.WAITING)
        missed = fake.emit("oxen", "ox-000", State.COMPLETED)  # while the dashboard is cut off
        fake.restart()
        await wait_until(None, lambda: link.cursor == missed.seq)
        tg.cancel_scope.cancel()
    assert fake.subscriptions == [SubscribeCall("now", True, ""), SubscribeCall(before, False, "")]
    received = seqs(store)
    assert received == sorted(set(received)) and received[-2:] == [before, missed.seq]  # in order, once each


@pytest.mark.anyio
async def test_a_new_epoch_starts_over_with_a_snapshot() -> None:
    fake = seeded(4)
    store = Store()
    link = FeedLink(SOCKET, fake.connect, store, delays=(0.01,), status_every=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        await wait_until(None, lambda: link.status.state is LinkState.LIVE)
        fake.drop()
        await wait_until(None, lambda: link.status.state is LinkState.WAITING)
        fake.restart(epoch="epoch-2")
        fake.emit("oxen", "fresh", State.QUEUED)
        await wait_until(None, lambda: link.epoch == "epoch-2" and link.status.state is LinkState.LIVE)
        tg.cancel_scope.cancel()
    assert fake.subscriptions[-1] == SubscribeCall("now", True, "")
    restarts = [item for item in store.pending if isinstance(item, Restart)]
    assert [r.epoch for r in restarts] == ["epoch-1", "epoch-2"]
    snapshot = [item for item in store.pending if isinstance(item, Snapshot)][-1]
    assert [j.job for j in snapshot.jobs] == ["fresh"]


@pytest.mark.anyio
async def test_a_gap_on_resume_starts_over_with_a_snapshot() -> None:
    fake = seeded(4)
    store = Store()
    link = FeedLink(SOCKET, fake.connect, store, delays=(0.01,), status_every=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        await wait_until(None, lambda: link.status.state is LinkState.LIVE)
        fake.drop()
        await wait_until(None, lambda: link.status.state is LinkState.WAITING)
        for _ in range(5):
            fake.emit("oxen", "ox-000", message="log", kind=Kind.LOG)
        fake.forget_before(fake.seq)  # retention dropped what the dashboard had not seen
        fake.restart()
        await wait_until(None, lambda: len(fake.subscriptions) == 3 and link.status.state is LinkState.LIVE)
        tg.cancel_scope.cancel()
    assert [s.snapshot for s in fake.subscriptions] == [True, False, True]


@pytest.mark.anyio
async def test_changing_the_filter_resubscribes_with_it_and_a_snapshot() -> None:
    fake = seeded(8)
    store = Store()
    link = FeedLink(SOCKET, fake.connect, store, delays=(0.01,), status_every=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(link.run)
        await wait_until(None, lambda: link.status.state is LinkState.LIVE)
        link.set_filter("provider:wiro")
        await wait_until(None, lambda: len(fake.subscriptions) == 2 and link.status.state is LinkState.LIVE)
        tg.cancel_scope.cancel()
    assert fake.subscriptions[-1] == SubscribeCall("now", True, "provider:wiro")
    snapshot = [item for item in store.pending if isinstance(item, Snapshot)][-1]
    assert snapshot.jobs and {j.provider for j in snapshot.jobs} == {"wiro"}  # the daemon filtered


@pytest.mark.anyio
async def test_history_is_read_from_the_oldest_kept_event_for_one_job() -> None:
    fake = seeded(8)
    fake.emit("oxen", "ox-000", State.RUNNING)
    events = await fetch_history(fake.connect, SOCKET, ("oxen", "ox-000"))
    assert [e.data.status for e in events] == [State.QUEUED, State.RUNNING]
    assert fake.subscriptions[-1].since == "oldest"
