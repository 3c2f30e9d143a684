"""The feed, end to end over a real Unix socket against an in-process daemon."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from streamd.events import CloudEvent, State
from streamd.feed import protocol as p
from streamd.feed.client import FeedClient, FeedError
from streamd.feed.server import Peer, allowed
from streamd.feed.unixsock import UnixStream, connect
from tests.support import ScriptedProvider, running_daemon

pytestmark = pytest.mark.anyio


class Raw:
    """A bare NDJSON peer, as `socat - UNIX-CONNECT:PATH` would be."""

    def __init__(self, stream: UnixStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)

    async def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
        await self.stream.send(data)

    async def line(self) -> dict[str, Any]:
        with anyio.fail_after(20):
            raw = await self.reader.receive_until(b"\n", 1 << 24)
        value: dict[str, Any] = json.loads(raw)
        return value


async def raw(path: Path) -> Raw:
    return Raw(await connect(path))


def provider(d: Any) -> ScriptedProvider:
    prov: ScriptedProvider = d.providers["oxen"]
    return prov


async def test_hello_socket_mode_and_socat_style_subscribe(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        assert stat.S_IMODE(os.stat(d.config.socket).st_mode) == 0o600
        await provider(d).push("a", State.QUEUED)
        await d.pipeline.sync()
        peer = await raw(d.config.socket)
        hello = await peer.line()
        assert hello["frame"] == "hello" and hello["protocol"] == 1 and hello["epoch"] == d.journal.epoch
        await peer.send({"op": "subscribe", "since": 0, "id": "s1"})
        reply = await peer.line()
        assert reply == {"frame": "reply", "id": "s1", "ok": True, "result": {"cursor": 0, "filter": ""}}
        events = [await peer.line() for _ in range(2)]  # the provider's health, then job a
        assert [e["seq"] for e in events] == [1, 2]
        assert all(e["specversion"] == "1.0" and e["datacontenttype"] == "application/json" for e in events)
        assert events[1]["type"] == "ai.streamd.job.queued" and events[1]["subject"] == "oxen/a"
        assert {
            "provider",
            "job",
            "status",
            "previous",
            "upstream",
            "origin",
            "model",
            "outputs",
            "error",
            "cost",
            "progress",
            "raw",
        } <= set(events[1]["data"])
        assert (await peer.line())["frame"] == "live"
        await provider(d).push("a", State.RUNNING)
        live = await peer.line()
        assert live["seq"] == 3 and live["data"]["previous"] == "queued" and live["data"]["status"] == "running"


async def test_snapshot_is_atomic_with_the_events_after_it(short_tmp: Path) -> None:
    """While jobs move, a snapshot subscriber's view (snapshot + later events) ends equal to the truth,
    and no event at or before the snapshot's seq is delivered after it."""
    async with running_daemon(short_tmp) as d, anyio.create_task_group() as tg:
        prov = provider(d)
        path = [State.QUEUED, State.ACCEPTED, State.RUNNING, State.POSTPROCESSING, State.COMPLETED]

        async def churn() -> None:
            for step in path:
                for i in range(60):
                    await prov.push(f"j{i}", step)

        tg.start_soon(churn)
        await anyio.lowlevel.checkpoint()
        async with FeedClient.connect(d.config.socket) as c:
            view: dict[str, str] = {}
            snap_seq = None
            with anyio.fail_after(60):
                async for item in c.subscribe(snapshot=True):
                    if isinstance(item, p.Snapshot):
                        snap_seq = item.seq
                        view.update({j.job: j.status.value for j in item.jobs})
                    elif isinstance(item, CloudEvent):
                        assert snap_seq is not None and item.seq > snap_seq
                        if item.data.status and item.data.job:
                            view[item.data.job] = item.data.status.value
                    # (the churn may be over before the snapshot is taken: then the snapshot is all)
                    if len(view) == 60 and all(v == "completed" for v in view.values()):
                        break
        assert view == {f"j{i}": "completed" for i in range(60)}


async def test_since_older_than_retention_gets_a_gap_frame(short_tmp: Path) -> None:
    async with running_daemon(short_tmp, retention_events=5) as d:
        for i in range(20):
            await provider(d).push(f"j{i}", State.QUEUED)
        with anyio.fail_after(20):
            while d.bus.head < 21:  # noqa: ASYNC110  (the bus has no event for this; tests only)
                await anyio.sleep(0.01)
        await anyio.to_thread.run_sync(d.journal.trim)
        assert d.journal.oldest == 17
        async with FeedClient.connect(d.config.socket) as c:
            items = []
            async for item in c.subscribe(since=3):
                items.append(item)
                if isinstance(item, p.Live):
                    break
        assert isinstance(items[0], p.Gap) and (items[0].first, items[0].last) == (4, 16)
        assert [i.seq for i in items[1:-1] if isinstance(i, CloudEvent)] == [17, 18, 19, 20, 21]


async def test_filters_with_negation_on_a_subscription(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        async with FeedClient.connect(d.config.socket) as c:
            got: list[tuple[str | None, str | None]] = []
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    async for item in c.subscribe(filter="provider:oxen kind:state -status:failed -job:skip*"):
                        if isinstance(item, CloudEvent):
                            got.append((item.data.job, item.data.status and item.data.status.value))
                            if item.data.job == "end":
                                tg.cancel_scope.cancel()

                tg.start_soon(read)
                await anyio.sleep(0.2)
                for job, st in [
                    ("a", State.QUEUED),
                    ("b", State.FAILED),
                    ("skip1", State.QUEUED),
                    ("end", State.QUEUED),
                ]:
                    await provider(d).push(job, st)
        assert got == [("a", "queued"), ("end", "queued")]


async def test_slow_reader_is_caught_up_from_the_journal_and_memory_stays_bounded(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        d.bus.limit = 64
        slow = await raw(d.config.socket)
        await slow.line()
        await slow.send({"op": "subscribe", "since": "now", "id": 1})
        await slow.line()
        await slow.line()  # live
        prov = provider(d)
        total = 3000
        max_buffer = 0
        for i in range(total):
            await prov.push(f"j{i}", State.QUEUED)
            max_buffer = max(max_buffer, *(s.pending for s in d.bus.subscribers))
        await d.pipeline.sync()
        max_buffer = max(max_buffer, *(s.pending for s in d.bus.subscribers))
        assert max_buffer <= 64
        assert any(s.overflows for s in d.bus.subscribers)
        seqs = []
        while len(seqs) < total:
            line = await slow.line()
            if "seq" in line:
                seqs.append(line["seq"])
        first = seqs[0]
        assert seqs == list(range(first, first + total))  # every event, in order, no gap, no duplicate


async def test_garbage_gets_error_frames_and_the_connection_survives(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        peer = await raw(d.config.socket)
        await peer.line()
        await peer.send(b"this is not json\n")
        err = await peer.line()
        assert err["frame"] == "error" and err["code"] == "bad_json" and not err.get("fatal")
        await peer.send({"op": "launch-rockets", "id": 7})
        err = await peer.line()
        assert err["code"] == "unknown_op" and err["id"] == 7
        await peer.send({"op": "subscribe", "since": "yesterday", "id": 8})
        assert (await peer.line())["code"] == "bad_request"
        await peer.send({"op": "ping", "id": 9})
        assert (await peer.line()) == {"frame": "reply", "id": 9, "ok": True, "result": {"pong": True}}


async def test_overlong_line_is_refused_and_closed(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        peer = await raw(d.config.socket)
        await peer.line()
        with pytest.raises((anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
            for _ in range(p.MAX_LINE // 65536 + 2):
                await peer.stream.send(b"x" * 65536)
            err = await peer.line()
            assert err["code"] == "too_long" and err["fatal"]
            await peer.stream.send(b"\n")
            await peer.line()


async def test_requests_and_their_errors(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d, FeedClient.connect(d.config.socket) as c:
        res = await c.submit("oxen", "seedream", "a cat")
        assert res == {"jobs": ["job1"]}
        jobs = await c.jobs(filter="provider:oxen status:queued")
        assert [(j.job, j.model, j.prompt) for j in jobs] == [("job1", "seedream", "a cat")]
        assert await c.cancel("oxen", "job1") == {"message": "cancelled job1"}
        assert (await c.jobs(filter="status:cancelled"))[0].job == "job1"
        assert await c.track("oxen", "elsewhere-7") == {"job": "elsewhere-7"}
        status = await c.status()
        assert status["providers"][0]["name"] == "oxen" and status["providers"][0]["health"] == "connected"
        assert status["daemon"]["jobs_active"] == 1
        with pytest.raises(FeedError, match="unknown provider 'nope'") as e1:
            await c.submit("nope", "m", "p")
        assert e1.value.code == "unknown_provider"
        with pytest.raises(FeedError, match="'wiro' is not enabled"):
            await c.track("wiro", "x")
        with pytest.raises(FeedError, match="oxen: Model not found: refuse") as e2:
            await c.submit("oxen", "refuse", "p")
        assert e2.value.code == "bad_request"
        with pytest.raises(FeedError, match="unknown field 'colour'"):
            await c.jobs(filter="colour:red")


async def test_client_without_daemon_says_so(short_tmp: Path) -> None:
    with pytest.raises(FeedError, match="no streamd daemon at") as err:
        async with FeedClient.connect(short_tmp / "none.sock"):
            pass
    assert err.value.code == "no_daemon"


async def test_restart_keeps_seq_epoch_and_unfinished_jobs(short_tmp: Path) -> None:
    async with running_daemon(short_tmp) as d:
        await provider(d).push("live", State.RUNNING)
        await provider(d).push("done", State.COMPLETED)
        await d.pipeline.sync()
        epoch, head = d.journal.epoch, d.bus.head
    async with running_daemon(short_tmp) as d2:
        assert d2.journal.epoch == epoch and d2.bus.head >= head
        assert [j.job for j in d2.tracker.unfinished()] == ["live"]
        await provider(d2).push("done", State.COMPLETED)  # a duplicate after restart: dropped
        await provider(d2).push("live", State.COMPLETED)
        await d2.pipeline.sync()
        async with FeedClient.connect(d2.config.socket) as c:
            states = []
            async for item in c.subscribe(since=head):
                if isinstance(item, CloudEvent) and item.data.job:
                    states.append((item.data.job, item.data.status and item.data.status.value))
                if isinstance(item, p.Live):
                    break
        assert states == [("live", "completed")]


def test_peer_credentials_policy() -> None:
    me = os.getuid()
    assert allowed(Peer(1, me, 1000), uid=me, gid=None)
    assert allowed(Peer(1, 0, 0), uid=4242, gid=None)
    assert not allowed(Peer(1, 4243, 4243), uid=4242, gid=None)
    assert allowed(Peer(1, 4243, 777), uid=4242, gid=777)
    assert not allowed(Peer(1, 4243, 778), uid=4242, gid=777)
