"""Slow readers: one subscriber that never reads, beside ten that do, under a steady event rate.

The ten must get every event live (never switched to catch-up, never more than a buffer behind the
head); the one that does not read must cost at most its bounded buffer (its kernel socket buffer
fills, then the bus stops queueing for it), and when it finally reads it must get every event, in
order, from the journal, or an explicit gap for what retention has dropped, then the rest.
Latency figures are measured and printed (for docs/reliability.md), never asserted: wall-clock
bounds would make the test flaky on a loaded machine.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psutil  # type: ignore[import-untyped]
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from streamd.bus import Subscriber
from streamd.daemon import Daemon
from streamd.events import CloudEvent, State
from streamd.feed.client import FeedClient
from streamd.feed.unixsock import UnixStream, connect
from tests.support import ScriptedProvider, running_daemon

pytestmark = pytest.mark.anyio

RAW = {"note": "x" * 1500}  # a realistic payload size: unbounded buffering would show in memory


@dataclass
class Reader:
    """A subscriber that reads everything as it comes and keeps running figures (so that its own
    memory stays flat): first and last seq, whether every seq came once and in order, the largest
    lag behind the head, and the latency of every tenth event."""

    first: int = 0
    last: int = 0
    count: int = 0
    in_order: bool = True
    max_lag: int = 0  # events published but not yet received, at receipt
    latency: list[float] = field(default_factory=list)  # seconds from emit to receipt, sampled

    async def run(self, daemon: Daemon, until: int, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with FeedClient.connect(daemon.config.socket) as client:
            started = False
            async for item in client.subscribe(since="now"):
                if not started:
                    started = True
                    task_status.started()
                if not isinstance(item, CloudEvent):
                    continue
                if self.count and item.seq != self.last + 1:
                    self.in_order = False
                self.first = self.first or item.seq
                self.last = item.seq
                self.count += 1
                self.max_lag = max(self.max_lag, daemon.bus.head - item.seq)
                if self.count % 10 == 0:
                    self.latency.append(time.time() - datetime.fromisoformat(item.time).timestamp())
                if item.seq >= until:
                    return


async def stuck_subscriber(daemon: Daemon) -> tuple[UnixStream, BufferedByteReceiveStream, Subscriber, int]:
    """A raw connection that subscribes, reads its reply, then reads nothing at all. Returns the
    stream, its reader, its subscriber on the bus, and the cursor it subscribed at."""
    before = set(daemon.bus.subscribers)
    stream = await connect(daemon.config.socket)
    reader = BufferedByteReceiveStream(stream)
    await reader.receive_until(b"\n", 1 << 20)  # hello
    await stream.send(b'{"op":"subscribe","since":"now","id":1}\n')
    reply = json.loads(await reader.receive_until(b"\n", 1 << 20))
    with anyio.fail_after(10):
        while not (set(daemon.bus.subscribers) - before):  # noqa: ASYNC110  (the bus has no event for this)
            await anyio.sleep(0.01)
    (sub,) = set(daemon.bus.subscribers) - before
    return stream, reader, sub, int(reply["result"]["cursor"])


async def produce(prov: ScriptedProvider, start: int, count: int, *, per_tick: int = 40) -> None:
    """A steady rate: `per_tick` events every 10 ms (up to 4000/s, as fast as a loaded machine allows)."""
    for i in range(start, start + count):
        await prov.push(f"j{i}", State.QUEUED, raw=RAW)
        if i % per_tick == 0:
            await anyio.sleep(0.01)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else (values or [0.0])[0]


async def read_all(reader: BufferedByteReceiveStream, head: int) -> tuple[list[int], list[dict[str, Any]]]:
    """Everything the stuck subscriber was sent, up to `head`: event seqs and control frames."""
    seqs: list[int] = []
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(60):
        while not seqs or seqs[-1] < head:
            line = json.loads(await reader.receive_until(b"\n", 1 << 24))
            if "seq" in line and "specversion" in line:
                seqs.append(line["seq"])
            else:
                frames.append(line)
    return seqs, frames


async def test_one_reader_that_never_reads_beside_ten_that_do(short_tmp: Path) -> None:
    proc = psutil.Process(os.getpid())
    async with running_daemon(short_tmp) as d:
        prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
        limit = d.bus.limit

        # Phase 1, the baseline: ten readers, nobody stuck.
        n1 = 1024
        start_head = d.bus.head
        base = [Reader() for _ in range(10)]
        async with anyio.create_task_group() as tg:
            for r in base:
                await tg.start(r.run, d, start_head + n1)
            await produce(prov, 0, n1)

        # Phase 2: the same ten, and one that never reads, for its buffer's worth of events and 2048 more.
        n2 = limit + 2048
        stream, stuck_reader, stuck, cursor = await stuck_subscriber(d)
        head0 = d.bus.head
        fast = [Reader() for _ in range(10)]
        peak_buffer = peak_bytes = 0
        full_at: tuple[int, int] | None = None  # (head, RSS) when the stuck one's buffer gave up
        rss_peak = 0
        async with anyio.create_task_group() as tg:
            for r in fast:
                await tg.start(r.run, d, head0 + n2)

            async def watch() -> None:
                nonlocal peak_buffer, peak_bytes, rss_peak, full_at
                while True:
                    peak_buffer = max(peak_buffer, stuck.pending)
                    peak_bytes = max(peak_bytes, sum(len(body) for body in stuck.buffer))
                    rss = proc.memory_info().rss
                    if full_at is None and stuck.overflows:
                        full_at = (d.bus.head, rss)
                    rss_peak = max(rss_peak, rss)
                    await anyio.sleep(0.01)

            tg.start_soon(watch)
            await produce(prov, n1, n2)
            with anyio.fail_after(60):
                while any(r.last < head0 + n2 for r in fast):  # noqa: ASYNC110  (readers set it)
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        fast_subs = [s for s in d.bus.subscribers if s is not stuck]
        head = d.bus.head

        # The stuck one reads at last: every event, in order, from the journal where the buffer gave up.
        seqs, frames = await read_all(stuck_reader, head)
        await stream.aclose()

    for r in fast:
        assert (r.first, r.last, r.count, r.in_order) == (head0 + 1, head0 + n2, n2, True), "every event, live"
        assert r.max_lag < limit, "never a buffer behind the head"
    assert len(fast_subs) == 10 and all(s.overflows == 0 for s in fast_subs), "the ten were never switched to catch-up"
    assert stuck.overflows >= 1, "the stuck one outgrew its buffer and was switched to the journal"
    assert peak_buffer <= limit, "its memory is its bounded buffer, however far behind it falls"
    assert seqs == list(range(cursor + 1, head + 1)) and not [f for f in frames if f.get("frame") == "gap"]
    # What the daemon holds for the stuck one is its bus buffer (the pipeline's queue is bounded on its
    # own): at most `limit` events, however many pass it by. (Whole-process RSS is printed, not
    # asserted: it holds the ten readers too, and whatever the allocator kept from earlier tests.)
    body = max(len(e) for e in [json.dumps(RAW).encode()]) + 1000
    assert peak_bytes <= limit * body, f"{peak_bytes} bytes held for the stuck reader"
    assert full_at is not None
    grown = (rss_peak - full_at[1]) / 2**20
    after = head0 + n2 - full_at[0]  # events published once the stuck one's buffer was full
    unbounded = after * (len(json.dumps(RAW)) + 600) / 2**20  # what holding them for it would take
    all_base = [x for r in base for x in r.latency]
    all_fast = [x for r in fast for x in r.latency]
    print(
        f"\nslow readers: {n1} then {n2} events at up to 4000/s; ten readers' latency p50/p99/max "
        f"{pct(all_base, 50) * 1e3:.1f}/{pct(all_base, 99) * 1e3:.1f}/{max(all_base) * 1e3:.1f} ms alone, "
        f"{pct(all_fast, 50) * 1e3:.1f}/{pct(all_fast, 99) * 1e3:.1f}/{max(all_fast) * 1e3:.1f} ms beside a stuck "
        f"reader; stuck reader's buffer peak {peak_buffer}/{limit} events, {peak_bytes / 2**20:.1f} MiB, "
        f"overflows {stuck.overflows}; "
        f"RSS +{grown:.1f} MiB over the {after} events after its buffer filled (holding them: ~{unbounded:.0f} MiB)"
    )


async def test_a_stuck_reader_behind_retention_gets_an_explicit_gap_then_the_rest(short_tmp: Path) -> None:
    async with running_daemon(short_tmp, retention_events=1000) as d:
        prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
        d.bus.limit = 256
        stream, reader, stuck, head0 = await stuck_subscriber(d)
        await produce(prov, 0, 5000)
        await d.pipeline.sync()
        await anyio.to_thread.run_sync(d.journal.trim)
        oldest, head = d.journal.oldest, d.bus.head
        assert oldest > head0 + 1000, "retention dropped events the stuck reader has not read"
        seqs, frames = await read_all(reader, head)
        await stream.aclose()
    gaps = [f for f in frames if f.get("frame") == "gap"]
    assert len(gaps) == 1 and gaps[0]["reason"] == "retention"
    gap = range(gaps[0]["first"], gaps[0]["last"] + 1)
    assert gaps[0]["last"] == oldest - 1
    assert sorted(seqs) == seqs and len(set(seqs)) == len(seqs), "in order, no duplicate"
    got = sorted([*seqs, *gap])
    want = list(range(head0 + 1, head + 1))
    assert got == want, (
        f"every event: delivered, or named in the gap; gap {gaps[0]}, oldest {oldest}, head0 {head0}, head {head}, "
        f"{len(seqs)} delivered {seqs[:3]}..{seqs[-3:]}, missing {sorted(set(want) - set(got))[:10]}, "
        f"twice {sorted(set(seqs) & set(gap))[:10]}, frames {frames[:4]}"
    )
    assert stuck.overflows >= 1
