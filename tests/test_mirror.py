"""The Redis Streams mirror, against a real redis-server on loopback started by these tests."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamd.config import Config, RedisMirrorFile
from streamd.daemon import Daemon
from streamd.events import CloudEvent, State, cloud_decoder, json_encoder
from streamd.feed.client import FeedClient
from streamd.filters import parse
from streamd.mirror import (
    POSITION_KEY,
    MirrorError,
    RedisMirror,
    _entries,
    _Seen,
    decode_entry,
    redact,
    tail_redis,
)
from streamd.providers.base import Provider
from tests.support import ScriptedProvider

PASSWORD = "hunter2-" + uuid.uuid4().hex[:8]  # an ACL user's password, which must never reach a log line
FAST = (0.02, 0.2)  # mirror reconnect backoff in tests: initial, maximum


# -- a redis-server of our own ----------------------------------------------------------------------------
class RedisServer:
    """redis-server on 127.0.0.1, restartable on the same port with its data (SHUTDOWN SAVE, then start)."""

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def secret_url(self) -> str:
        """As the mirror's ACL user, with a password."""
        return f"redis://streamd:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.folder), "--dbfilename", "dump.rdb"]
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            for _ in range(200):  # up to ~20 s for the server to listen
                if self.proc.poll() is not None:
                    tail = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"redis-server exited with status {self.proc.returncode}:\n{tail}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    subprocess.run(["sleep", "0.1"], check=False)
            else:
                pytest.fail(f"redis-server did not answer on 127.0.0.1:{self.port}")
            # ACL users are not in the RDB file: (re)create the mirror's user on every start
            client.acl_setuser(
                "streamd",
                enabled=True,
                reset=True,
                passwords=[f"+{PASSWORD}"],
                keys=["~*"],
                channels=["&*"],
                commands=["+@all"],
            )
        finally:
            client.close()

    def stop(self) -> None:
        """Save the data and stop: the mirror sees refused connections until start()."""
        if self.proc is None:
            return
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(save=True)
        client.close()
        self.proc.wait(timeout=20)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed, and the Redis mirror tests need it: "
            "apt-get install -y redis-server (.ci/run installs it when run as root)"
        )
    folder = Path(tempfile.mkdtemp(prefix="sd-redis-"))
    server = RedisServer(binary, folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def key() -> str:
    """A stream key of this test's own, on the shared server."""
    return f"streamd-test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def rc(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


# -- daemons with a mirror ---------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def daemon_with(
    state: Path, mirror: RedisMirror | None, providers: dict[str, Provider] | None = None
) -> AsyncIterator[Daemon]:
    """`tests.support.running_daemon`, with the mirror as its sidecar."""
    cfg = Config(socket=state / "feed.sock", state_dir=state / "state", providers={})
    daemon = Daemon(
        cfg,
        providers=providers if providers is not None else {"oxen": ScriptedProvider()},
        sidecars=[mirror] if mirror is not None else [],
    )
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        yield daemon
        tg.cancel_scope.cancel()


def oxen(d: Daemon) -> ScriptedProvider:
    prov = d.providers["oxen"]
    assert isinstance(prov, ScriptedProvider)
    return prov


async def push_jobs(prov: ScriptedProvider, names: list[str]) -> None:
    for name in names:
        await prov.push(name, State.QUEUED, model="seedream-4")
        await prov.push(name, State.RUNNING)
        await prov.push(name, State.COMPLETED, outputs=(f"https://cdn.example/{name}.png",))


async def entries(rc: aioredis.Redis, key: str) -> list[tuple[str, int, CloudEvent]]:
    """(daemon, seq, event) of every entry in the stream, in stream order."""
    out = []
    for _, fields in _entries([[key, await rc.xrange(key)]]):
        assert fields is not None
        out.append(decode_entry(fields))
    return out


async def eventually(check: Callable[[], Any], within: float = 20.0) -> None:
    """Wait until `await check()` is truthy (re-checked every 20 ms); fail after `within` seconds."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110 - Redis and the journal offer no event to wait on
            await anyio.sleep(0.02)


async def mirrored(rc: aioredis.Redis, key: str, d: Daemon, count: int | None = None) -> None:
    """Until the stream holds `count` entries (default: every event of `d`) and the position is saved."""
    await d.pipeline.sync()
    want = d.head() if count is None else count

    async def done() -> bool:
        return int(await rc.xlen(key)) >= want and await d.get_meta(POSITION_KEY) == str(d.head())

    await eventually(done)


async def journal_events(d: Daemon) -> list[CloudEvent]:
    await d.pipeline.sync()
    rows = await anyio.to_thread.run_sync(d.journal.read_after, 0, 100_000)
    return [cloud_decoder.decode(body) for _, body in rows]


async def collect(url: str, key: str, *, count: int | None = None, within: float = 20.0, **kw: Any) -> list[CloudEvent]:
    out: list[CloudEvent] = []
    with anyio.fail_after(within):
        async with contextlib.aclosing(tail_redis(url, key, **kw)) as events:
            async for ev in events:
                out.append(ev)
                if count is not None and len(out) >= count:
                    break
    return out


# -- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_mirror_appends_every_event_in_order(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path
) -> None:
    mirror = RedisMirror(redis_server.url, key, 10_000, batch=7, backoff=FAST)  # small batches: many pipelines
    async with daemon_with(short_tmp, mirror) as d:
        follower: list[CloudEvent] = []

        async def follow() -> None:  # a live reader, started before the events exist
            async for ev in tail_redis(redis_server.url, key, since="oldest"):
                follower.append(ev)
                if len(follower) == 61:  # the provider's health event, then 20 jobs x 3 states
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await push_jobs(oxen(d), [f"job{i}" for i in range(20)])
            await mirrored(rc, key, d)
        local = await journal_events(d)
        got = await entries(rc, key)
        assert len(local) == d.head() == 61  # the provider's health event, then 20 jobs x 3 states
        assert [seq for _, seq, _ in got] == list(range(1, 62))
        assert {daemon for daemon, _, _ in got} == {d.daemon_id}
        assert [ev for _, _, ev in got] == local  # the same CloudEvents, byte for byte once encoded
        assert [json_encoder.encode(ev) for ev in follower] == [json_encoder.encode(ev) for ev in local]
        assert mirror.stats.pipelines >= 9 and mirror.stats.position == 61 and mirror.stats.outages == 0


@pytest.mark.anyio
async def test_maxlen_trims_approximately(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path
) -> None:
    async with daemon_with(short_tmp, RedisMirror(redis_server.url, key, 50, backoff=FAST)) as d:
        await push_jobs(oxen(d), [f"j{i}" for i in range(100)])
        await d.pipeline.sync()
        await eventually(lambda: _position_is(d, d.head()))
        length = int(await rc.xlen(key))
        assert 50 <= length < d.head()  # `MAXLEN ~`: trimmed by whole nodes, never below the limit
        last = await entries(rc, key)
        assert last[-1][1] == d.head()


async def _position_is(d: Daemon, seq: int) -> bool:
    return await d.get_meta(POSITION_KEY) == str(seq)


@pytest.mark.anyio
async def test_outage_and_restart_resume_exactly_once_without_blocking_the_feed(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamd.mirror")
    mirror = RedisMirror(redis_server.secret_url, key, 10_000, batch=5, backoff=FAST)
    async with daemon_with(short_tmp, mirror) as d:
        await push_jobs(oxen(d), ["before1", "before2"])
        await mirrored(rc, key, d)
        before = d.head()

        redis_server.stop()
        try:
            await push_jobs(oxen(d), [f"during{i}" for i in range(10)])
            # the local feed serves every event while Redis is down
            async with FeedClient.connect(d.config.socket) as feed:
                seen: list[int] = []
                with anyio.fail_after(20):
                    async for item in feed.subscribe(since=0):
                        if isinstance(item, CloudEvent):
                            seen.append(item.seq)
                            if item.seq == d.head():
                                break
            assert seen == list(range(1, d.head() + 1))
            # the mirror keeps trying (backoff), and keeps its saved position where Redis last confirmed
            await eventually(lambda: _true(mirror.stats.failures >= 3))
            assert await d.get_meta(POSITION_KEY) == str(before)
            assert mirror.stats.down_since is not None and mirror.stats.error
        finally:
            redis_server.start()
            await rc.connection_pool.disconnect()  # the test's own client: drop its dead connection

        await push_jobs(oxen(d), ["after"])
        await mirrored(rc, key, d)
        got = await entries(rc, key)
        assert [seq for _, seq, _ in got] == list(range(1, d.head() + 1))  # every event once, in order
        assert mirror.stats.outages == 1 and mirror.stats.down_since is None
        confirmed = d.head()

    outage_lines = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "streamd.mirror"]
    assert len(outage_lines) == 1, [r.getMessage() for r in outage_lines]  # one line per outage, not per attempt
    assert "cannot append" in outage_lines[0].getMessage()
    assert any("is back" in r.getMessage() for r in caplog.records)
    assert PASSWORD not in caplog.text
    assert "streamd:***@127.0.0.1" in caplog.text

    # a restart resumes from the journal's position: events journaled while no mirror ran are sent once
    async with daemon_with(short_tmp, None) as d:
        await push_jobs(oxen(d), ["offline1", "offline2"])
        await d.pipeline.sync()
        head = d.head()
    assert int(await rc.xlen(key)) < head
    mirror = RedisMirror(redis_server.url, key, 10_000, backoff=FAST)
    async with daemon_with(short_tmp, mirror) as d:
        await mirrored(rc, key, d)
        got = await entries(rc, key)
        assert [seq for _, seq, _ in got] == list(range(1, d.head() + 1))
        assert {daemon for daemon, _, _ in got} == {d.daemon_id}  # the same journal: the same daemon id
        assert mirror.stats.mirrored == d.head() - confirmed  # only what the first run had not confirmed


async def _true(value: bool) -> bool:
    return value


@pytest.mark.anyio
async def test_outage_mid_stream_loses_nothing_and_a_reader_reconnects(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.mirror")
    mirror = RedisMirror(redis_server.url, key, 10_000, batch=4, backoff=FAST)
    total = 1 + 3 * 30  # the health event, then 30 jobs x 3 states
    got: list[int] = []
    async with daemon_with(short_tmp, mirror) as d:

        async def follow() -> None:  # reads across the outage
            async with contextlib.aclosing(tail_redis(redis_server.url, key, since="oldest")) as events:
                async for ev in events:
                    got.append(ev.seq)
                    if len(got) == total:
                        return

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await push_jobs(oxen(d), [f"a{i}" for i in range(10)])
            await eventually(lambda: _true(len(got) >= 5))
            stopping = anyio.Event()

            async def stop() -> None:  # while the mirror is still writing
                await anyio.to_thread.run_sync(redis_server.stop)
                stopping.set()

            tg.start_soon(stop)
            await push_jobs(oxen(d), [f"b{i}" for i in range(10)])
            await stopping.wait()
            await push_jobs(oxen(d), [f"c{i}" for i in range(5)])
            await eventually(lambda: _true(mirror.stats.failures >= 1))
            redis_server.start()
            await rc.connection_pool.disconnect()
            await push_jobs(oxen(d), [f"d{i}" for i in range(5)])
        await mirrored(rc, key, d, total)

    assert got == list(range(1, total + 1))  # each event once, in order, after de-duplication
    raw = [seq for _, seq, _ in await entries(rc, key)]
    assert set(raw) == set(range(1, total + 1))  # nothing lost; a re-sent pipeline would show up here twice
    for i, seq in enumerate(raw):  # in order per daemon: an entry not above all before it is a re-send
        if seq <= max(raw[:i], default=0):
            assert seq in raw[:i]
    assert any("reading again" in r.getMessage() for r in caplog.records)
    assert mirror.stats.outages == 1 and mirror.stats.down_since is None


@pytest.mark.anyio
async def test_two_daemons_share_one_stream(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path
) -> None:
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    async with (
        daemon_with(short_tmp / "a", RedisMirror(redis_server.url, key, 10_000, batch=3, backoff=FAST)) as a,
        daemon_with(short_tmp / "b", RedisMirror(redis_server.url, key, 10_000, batch=4, backoff=FAST)) as b,
    ):
        for i in range(8):  # interleaved
            await push_jobs(oxen(a), [f"a{i}"])
            await push_jobs(oxen(b), [f"b{i}"])
        await a.pipeline.sync()
        await b.pipeline.sync()
        await eventually(lambda: _position_is(a, a.head()))
        await eventually(lambda: _position_is(b, b.head()))
        assert a.daemon_id != b.daemon_id
        got = await entries(rc, key)
        assert len(got) == a.head() + b.head()
        by_daemon: dict[str, list[int]] = {}
        for daemon, seq, ev in got:
            by_daemon.setdefault(daemon, []).append(seq)
            assert ev.seq == seq
        assert by_daemon == {a.daemon_id: list(range(1, a.head() + 1)), b.daemon_id: list(range(1, b.head() + 1))}

        # a reader sees both, each daemon's events in its order
        read = await collect(redis_server.url, key, since="oldest", follow=False)
        assert len(read) == len(got)
        ids = {ev.id for ev in read}
        assert len(ids) == len(read)  # (epoch, seq) ids: no two daemons collide
        jobs_a = [ev.data.job for ev in read if ev.data.job and ev.data.job.startswith("a")]
        assert jobs_a == [j for i in range(8) for j in [f"a{i}"] * 3]


@pytest.mark.anyio
async def test_consumer_group_claims_what_a_crashed_consumer_left_pending(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path
) -> None:
    async with daemon_with(short_tmp, RedisMirror(redis_server.url, key, 10_000, backoff=FAST)) as d:
        await push_jobs(oxen(d), [f"job{i}" for i in range(5)])  # 16 events
        await mirrored(rc, key, d)
        head = d.head()

        # the group starts at the beginning; a consumer takes 6 entries and dies without XACK
        await rc.xgroup_create(key, "workers", id="0")
        taken = _entries(await rc.xreadgroup("workers", "crashed", {key: ">"}, count=6))
        assert len(taken) == 6
        # another consumer with a claim threshold of 0 ms takes them over at once, then reads the rest
        got = await collect(redis_server.url, key, group="workers", consumer="rescuer", claim_after=0, follow=False)
        assert sorted(ev.seq for ev in got) == list(range(1, head + 1))
        assert [ev.seq for ev in got] == list(range(1, head + 1))  # claimed (1..6) first, then the rest in order
        pending = await rc.xpending(key, "workers")
        assert pending["pending"] == 0  # everything acknowledged, the crashed consumer's share too

        # a consumer that stops with an entry in hand leaves it pending (at least once), and the one
        # it had read ahead too; both go to the next consumer
        await push_jobs(oxen(d), ["late"])
        await mirrored(rc, key, d)
        first = await collect(redis_server.url, key, group="workers", consumer="quitter", count=2, follow=False)
        assert [ev.seq for ev in first] == [head + 1, head + 2]
        pending = await rc.xpending(key, "workers")
        assert pending["pending"] == 2
        rest = await collect(redis_server.url, key, group="workers", consumer="heir", claim_after=0, follow=False)
        assert [ev.seq for ev in rest] == [head + 2, head + 3]
        assert (await rc.xpending(key, "workers"))["pending"] == 0

        # a group created at "now" sees only what comes after
        await push_jobs(oxen(d), ["newer"])
        await mirrored(rc, key, d)
        nothing = await collect(redis_server.url, key, group="fresh", consumer="c", since="now", follow=False)
        assert nothing == []
        await push_jobs(oxen(d), ["newest"])
        await mirrored(rc, key, d)
        fresh = await collect(redis_server.url, key, group="fresh", consumer="c", follow=False)
        assert [ev.data.job for ev in fresh] == ["newest"] * 3


@pytest.mark.anyio
async def test_tail_filters_drops_duplicates_and_skips_foreign_entries(
    redis_server: RedisServer, rc: aioredis.Redis, key: str, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    providers: dict[str, Provider] = {"oxen": ScriptedProvider("oxen"), "wiro": ScriptedProvider("wiro")}
    async with daemon_with(short_tmp, RedisMirror(redis_server.url, key, 10_000, backoff=FAST), providers) as d:
        wiro = d.providers["wiro"]
        assert isinstance(wiro, ScriptedProvider)
        await push_jobs(oxen(d), ["o1", "o2"])
        await wiro.push("w1", State.QUEUED, model="seedream-4.5")
        await wiro.push("w1", State.FAILED, error="nsfw")
        await wiro.push("w2", State.QUEUED, model="seedream-4")
        await wiro.push("w2", State.RUNNING)
        await mirrored(rc, key, d)
        local = await journal_events(d)

        # a re-sent entry (as after a lost EXEC reply) and an entry some other program wrote
        dup_daemon, dup_seq, dup_event = (await entries(rc, key))[3]
        await rc.xadd(key, {"daemon": dup_daemon, "seq": str(dup_seq), "event": json_encoder.encode(dup_event)})
        await rc.xadd(key, {"hello": "world"})
        await push_jobs(oxen(d), ["o3"])
        await mirrored(rc, key, d, d.head() + 2)

        local = await journal_events(d)
        every = await collect(redis_server.url, key, since="oldest", follow=False)
        assert [ev.seq for ev in every] == [ev.seq for ev in local]  # the duplicate dropped, the stranger skipped
        assert "not a streamd entry" in caplog.text

        for expr in ("provider:wiro -status:failed", "status:completed model:seedream*", "-p:oxen", "o2"):
            flt = parse(expr)
            got = await collect(redis_server.url, key, filter=flt, since="oldest", follow=False)
            want = [ev for ev in local if flt(ev.data)]
            assert want, expr
            assert [ev.seq for ev in got] == [ev.seq for ev in want], expr

        # since an entry id: what follows it
        mid = _entries([[key, await rc.xrange(key)]])[10][0]
        after = await collect(redis_server.url, key, since=mid, follow=False)
        assert after[0].seq == 12


@pytest.mark.anyio
async def test_errors_for_people(redis_server: RedisServer, rc: aioredis.Redis, key: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(MirrorError, match=r"redis redis://:\*\*\*@127\.0\.0\.1:\d+/0: .*(refused|connect)") as info:
        await collect(f"redis://:{PASSWORD}@127.0.0.1:{closed}/0", key)
    assert PASSWORD not in str(info.value)
    with pytest.raises(MirrorError, match="--since 'yesterday'"):
        await collect(redis_server.url, key, since="yesterday")
    with pytest.raises(MirrorError, match="needs a consumer group"):
        await collect(redis_server.url, key, consumer="me")
    await rc.set(key, "not a stream")
    with pytest.raises(MirrorError, match="holds a string, not a stream"):
        await collect(redis_server.url, key, follow=False)
    with pytest.raises(MirrorError, match="redis URL"):
        RedisMirror("http://example.com", key)
    with pytest.raises(MirrorError, match="maxlen 0"):
        RedisMirror(redis_server.url, key, 0)
    mirror = RedisMirror.from_config(RedisMirrorFile(url=f"redis://u:{PASSWORD}@h:1/0?password={PASSWORD}"))
    assert PASSWORD not in repr(mirror) and mirror.stream == "streamd:events" and mirror.maxlen == 1_000_000


def test_redact() -> None:
    assert redact("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("rediss://user:s3cret@h/2") == "rediss://user:***@h/2"
    assert redact("redis://s3cret@h") == "redis://***@h"
    assert redact("unix:///run/redis.sock?db=1&password=s3cret") == "unix:///run/redis.sock?db=1&password=***"


def test_seen_drops_resent_entries_in_order_and_claimed_repeats() -> None:
    seen = _Seen(limit=4)
    assert [seen.first_time("a", s, in_order=True) for s in (1, 2, 3, 2, 3, 4)] == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    assert seen.first_time("b", 1, in_order=True)  # daemons are independent
    assert seen.first_time("a", 0, in_order=False)  # claimed, older, never seen: delivered
    assert not seen.first_time("a", 0, in_order=False)
