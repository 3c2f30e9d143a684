"""The bus's hand-over from journal catch-up to live fan-out."""

from __future__ import annotations

import anyio
import pytest

from streamd.bus import Bus, Item, LiveNotice
from streamd.events import EventData, Kind, Origin

DATA = EventData(provider="oxen", job="j", kind=Kind.LOG, status=None, previous=None, upstream="x", origin=Origin.PUSH)


@pytest.mark.anyio
async def test_events_published_while_a_catch_up_read_is_out_still_arrive() -> None:
    """The read started before the batch was committed (so it finds nothing), and the batch was
    published while the read was out, passing the still-lagging subscriber by: it must read again."""
    journal: list[tuple[int, bytes]] = []
    bus: Bus

    async def fetch(after: int, limit: int) -> list[tuple[int, bytes]]:
        before = [row for row in journal if row[0] > after][:limit]
        if not journal:  # the first read: the writer commits and publishes while it is out
            items = [Item(seq, b"e%d" % seq, DATA) for seq in (1, 2, 3)]
            journal.extend((i.seq, i.body) for i in items)
            bus.publish(items)
        await anyio.lowlevel.checkpoint()
        return before

    bus = Bus(0, fetch, lambda: 1)
    bus.head = 1  # something to catch up on, so the subscriber reads the journal first
    sub = bus.subscribe(0)
    got: list[bytes] = []
    with anyio.fail_after(5):
        async for out in bus.stream(sub):
            if isinstance(out, list):
                got += out
            if isinstance(out, LiveNotice) or len(got) >= 3:
                break
    assert got == [b"e1", b"e2", b"e3"]
    assert sub.cursor == 3


@pytest.mark.anyio
async def test_a_batch_is_joined_once_for_every_subscriber_to_everything_and_counted_in_events() -> None:
    from streamd.filters import parse

    async def fetch(after: int, limit: int) -> list[tuple[int, bytes]]:
        return []

    bus = Bus(0, fetch, lambda: 1, limit=5)
    subs = [bus.subscribe(0) for _ in range(2)]
    picky = bus.subscribe(0, parse("provider:wiro"))
    for sub in (*subs, picky):
        sub.lagging = False  # live from seq 0
    wiro = EventData(
        provider="wiro", job="w", kind=Kind.LOG, status=None, previous=None, upstream="x", origin=Origin.PUSH
    )
    bus.publish([Item(1, b"e1", DATA), Item(2, b"e2", wiro), Item(3, b"e3", DATA)])
    assert subs[0].buffer[0] is subs[1].buffer[0]  # one join, shared
    assert [s.pending for s in (*subs, picky)] == [3, 3, 1]
    bus.publish([Item(4, b"e4", DATA), Item(5, b"e5", DATA)])  # 3 + 2 events: still room for the whole batch
    bus.publish([Item(6, b"e6", DATA)])  # no room: a subscriber's limit is events, not items
    assert subs[0].pending == 5 and subs[0].lagging and subs[0].overflows == 1
    out = []
    async for batch in bus.stream(subs[1]):
        assert isinstance(batch, list)
        out = batch
        break
    assert b"\n".join([*out, b""]) == b"e1\ne2\ne3\ne4\ne5\n"  # the NDJSON the feed sends
    assert subs[1].pending == 0
