"""A fault-injecting TCP proxy on loopback, between streamd and an emulator.

It forwards bytes both ways and, on command or at random, cuts connections (anywhere, inside a
frame too), stalls them (the connection stays open, nothing moves: read timeouts must fire),
half-closes them (one direction ends, the other hangs), or refuses new ones (a server that is
down). The random mode is seeded, so a failing soak run can be replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus


@dataclass
class ProxyStats:
    connections: int = 0
    cuts: int = 0
    stalls: int = 0
    half_opens: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def faults(self) -> int:
        return self.cuts + self.stalls + self.half_opens + self.refused


@dataclass(eq=False)  # kept in a set: hashed by identity
class _Link:
    client: SocketStream
    upstream: SocketStream
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stalled: bool = False
    cut_at: int | None = None  # cut once this many bytes went downstream
    sent: int = 0


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self.down = False  # refuse new connections
        self.stall_all = False
        self._links: set[_Link] = set()

    @property
    def url_host(self) -> str:
        return f"{self.host}:{self.port}"

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._handle)

    # -- faults ------------------------------------------------------------------------------------
    def cut_all(self) -> int:
        """Close every open connection now; returns how many."""
        n = 0
        for link in list(self._links):
            link.scope.cancel()
            n += 1
        self.stats.cuts += n
        return n

    def cut_randomly(self, *, within: int = 4096) -> int:
        """Arm every open connection to be cut after a random number of further bytes (so the
        cut lands inside a frame as often as between frames)."""
        for link in self._links:
            link.cut_at = link.sent + self.rng.randint(1, within)
        return len(self._links)

    def stall(self, on: bool = True) -> None:
        """Stop moving bytes on every connection (open ones and new ones) while `on`."""
        self.stall_all = on
        for link in self._links:
            link.stalled = on
        if on:
            self.stats.stalls += 1

    def heal(self) -> None:
        """End every fault: accept connections, move bytes, disarm pending random cuts."""
        self.down = False
        self.stall(False)
        for link in self._links:
            link.cut_at = None

    async def half_open(self) -> int:
        """End the server-to-client direction of every connection; the other direction stays."""
        n = 0
        for link in list(self._links):
            try:
                await link.client.send_eof()
                n += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                continue
            link.stalled = True
        self.stats.half_opens += n
        return n

    # -- forwarding --------------------------------------------------------------------------------
    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if self.down:
                self.stats.refused += 1
                return
            try:
                upstream = await anyio.connect_tcp(*self.target)
            except OSError:
                self.stats.refused += 1
                return
            link = _Link(client, upstream, stalled=self.stall_all)
            self.stats.connections += 1
            self._links.add(link)
            try:
                async with upstream:
                    with link.scope:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pump, link, client, upstream, True)
                            tg.start_soon(self._pump, link, upstream, client, False)
            finally:
                self._links.discard(link)

    async def _pump(self, link: _Link, src: SocketStream, dst: SocketStream, up: bool) -> None:
        try:
            while True:
                data = await src.receive(65536)
                while link.stalled:  # noqa: ASYNC110  (a knob, not an event)
                    await anyio.sleep(0.05)
                if not up and link.cut_at is not None and link.sent + len(data) >= link.cut_at:
                    keep = link.cut_at - link.sent
                    if keep > 0:
                        await dst.send(data[:keep])
                    self.stats.cuts += 1
                    link.scope.cancel()
                    return
                await dst.send(data)
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    link.sent += len(data)
                    self.stats.bytes_down += len(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            link.scope.cancel()
