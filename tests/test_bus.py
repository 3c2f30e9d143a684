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
