"""In-process consumers of the event stream (the Redis mirror, the output archiver).

A sidecar reads the same journaled stream a feed subscriber does, from any cursor, with the same
catch-up and gap semantics, and may emit observations of its own (`job.archived`). The daemon owns
its task; a sidecar that crashes is restarted with backoff and never takes the daemon down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from streamd.bus import Bus, GapNotice, LiveNotice
from streamd.events import CloudEvent, Observation, cloud_decoder
from streamd.filters import MATCH_ALL, Filter

Batch = list[CloudEvent] | GapNotice | LiveNotice


class Host(Protocol):
    """What the daemon offers a sidecar."""

    @property
    def epoch(self) -> str: ...

    @property
    def daemon_id(self) -> str:
        """Stable across restarts of this daemon's journal: the epoch plus the host name."""

    def head(self) -> int:
        """The newest published seq."""

    def stream(self, cursor: int, flt: Filter = MATCH_ALL) -> AsyncIterator[Batch]:
        """Events with seq > cursor, in order, forever (gaps reported, never silent)."""

    async def emit(self, *observations: Observation) -> None: ...

    async def get_meta(self, key: str) -> str | None:
        """Small durable state kept in the journal (a mirror's position)."""

    async def set_meta(self, key: str, value: str) -> None: ...


class Sidecar(Protocol):
    name: str

    async def run(self, host: Host, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...


async def stream_from_bus(bus: Bus, cursor: int, flt: Filter = MATCH_ALL) -> AsyncIterator[Batch]:
    sub = bus.subscribe(cursor, flt)
    try:
        async for out in bus.stream(sub):
            if isinstance(out, GapNotice | LiveNotice):
                yield out
            else:
                yield [event for lines in out for event in cloud_decoder.decode_lines(lines)]
    finally:
        bus.unsubscribe(sub)
