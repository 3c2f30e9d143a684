"""Fan-out of journaled events to subscribers, each with a bounded buffer.

Publishing never waits. A subscriber whose buffer fills is marked lagging and stops receiving
live events; its sender then reads what it missed from the journal and rejoins the live stream
once it has caught up. History older than the journal keeps is reported as a gap. Memory per
subscriber is at most `limit` events, as bytes shared by all subscribers: a published batch that
several subscribers to everything take whole is joined into its lines once, for all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import anyio

from streamd.events import EventData, cloud_decoder
from streamd.filters import MATCH_ALL, Filter

Fetch = Callable[[int, int], Awaitable[list[tuple[int, bytes]]]]


class Published(Protocol):
    """What the bus publishes: the pipeline hands over its journal rows (`journal.Append`) as they are."""

    @property
    def seq(self) -> int: ...
    @property
    def body(self) -> bytes: ...  # the CloudEvent line without its newline, as journaled
    @property
    def data(self) -> EventData | None: ...


class Item(NamedTuple):  # a published event on its own (tests, benches)
    seq: int
    body: bytes
    data: EventData


@dataclass(slots=True, frozen=True)
class GapNotice:
    first: int
    last: int


@dataclass(slots=True, frozen=True)
class LiveNotice:
    """The subscriber has caught up; sent once, the first time."""

    seq: int


class Subscriber:
    __slots__ = (
        "_wake",
        "announced",
        "buffer",
        "closed",
        "cursor",
        "filter",
        "lagging",
        "limit",
        "overflows",
        "pending",
    )

    def __init__(self, flt: Filter, cursor: int, limit: int) -> None:
        self.filter = flt
        self.cursor = cursor  # every matching event with seq <= cursor has been handed over
        self.limit = limit
        # Event lines without their last newline, shared with every other subscriber: an event's body, or
        # a whole published batch's bodies joined by newlines. `pending` counts the events in it.
        self.buffer: deque[bytes] = deque()
        self.pending = 0
        self.lagging = True  # until the first catch-up check attaches it to the live stream
        self.closed = False
        self.overflows = 0
        self.announced = False
        self._wake = anyio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake = anyio.Event()


class Bus:
    def __init__(self, head: int, fetch: Fetch, oldest: Callable[[], int], *, limit: int = 4096) -> None:
        self.head = head  # the newest published seq
        self._fetch = fetch
        self._oldest = oldest
        self.limit = limit
        self.subscribers: set[Subscriber] = set()
        self.published = 0

    def publish(self, items: Sequence[Published]) -> None:
        if not items:
            return
        first, last = items[0].seq, items[-1].seq
        self.head = last
        self.published += len(items)
        n = len(items)
        block: bytes | None = None
        for sub in self.subscribers:
            if sub.lagging:
                continue
            flt = sub.filter
            if not flt and sub.cursor < first and sub.pending + n <= sub.limit:
                # The common case, a subscriber to everything with room for the whole batch: the batch's
                # lines, joined once for every such subscriber (each one's sender sent its own join).
                if block is None:
                    block = b"\n".join([item.body for item in items])
                sub.buffer.append(block)
                sub.pending += n
                sub.cursor = last
                sub.wake()
                continue
            for item in items:
                if item.seq <= sub.cursor:
                    continue  # already read from the journal while catching up
                if flt and (item.data is None or not flt(item.data)):
                    sub.cursor = item.seq
                    continue
                if sub.pending >= sub.limit:
                    sub.lagging = True
                    sub.overflows += 1
                    break
                sub.buffer.append(item.body)
                sub.pending += 1
                sub.cursor = item.seq
            sub.wake()

    def subscribe(self, cursor: int, flt: Filter = MATCH_ALL) -> Subscriber:
        sub = Subscriber(flt, cursor, self.limit)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        self.subscribers.discard(sub)
        sub.wake()

    async def stream(self, sub: Subscriber) -> AsyncIterator[list[bytes] | GapNotice | LiveNotice]:
        """What to send `sub`, batch by batch, in seq order: event lines (each a body, or several joined
        by newlines; joined by newlines they are the NDJSON to send), or a gap notice."""
        while not sub.closed:
            if sub.buffer:
                batch = list(sub.buffer)
                sub.buffer.clear()
                sub.pending = 0
                yield batch
                continue
            if sub.lagging:
                oldest = self._oldest()
                if sub.cursor + 1 < oldest:
                    gap = GapNotice(sub.cursor + 1, oldest - 1)
                    sub.cursor = oldest - 1
                    yield gap
                    continue
                rows = [] if sub.cursor >= self.head else await self._fetch(sub.cursor, 1000)
                if not rows:
                    if sub.cursor < self.head:
                        # Published while the read was out (it passed this subscriber by, as lagging):
                        # read again, or those events would never reach it.
                        continue
                    sub.lagging = False  # caught up: from here on, publish() feeds the buffer
                    if not sub.announced:
                        sub.announced = True
                        yield LiveNotice(sub.cursor)
                    continue
                flt = sub.filter
                bodies = [b for _, b in rows if not flt or flt(cloud_decoder.decode(b).data)]
                sub.cursor = max(sub.cursor, rows[-1][0])
                if bodies:
                    yield bodies
                continue
            await sub.wait()
