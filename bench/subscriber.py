"""Feed subscribers for the bench: N readers (and optionally K that never read) on the daemon's socket.

    .venv/bin/python bench/subscriber.py SOCKET --subs N [--stalled K] --count C [--latency]

Each reader speaks the feed protocol directly (subscribe since "now"), counts CloudEvent lines at
C speed, keeps the first and last seq it saw (a gap-free, in-order stream has last - first + 1 ==
events), and with --latency takes each event's `sent_ns` (stamped by the emulator at its write)
and the arrival time of the read that brought it. A stalled subscriber subscribes, then never
reads again. Prints `{"ready": true}` once every reader is live, then one JSON result when every
reader has C events, or at --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
from typing import Any

EVENT = b'{"specversion"'
SEQ = re.compile(rb'"seq":(\d+)')
SENT = re.compile(rb'"sent_ns":(\d+)')


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Sub:
    def __init__(self, path: str, count: int, latency: bool) -> None:
        self.path = path
        self.count = count
        self.latency = latency
        self.sock: socket.socket | None = None
        self.events = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.first_ns = 0
        self.last_ns = 0
        self.lat: list[int] = []
        self.done = asyncio.Event()
        self.live = asyncio.Event()
        self._buf = b""

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, self.path)
        self.sock = sock
        await loop.sock_sendall(sock, b'{"op":"subscribe","id":1,"since":"now"}\n')

    async def wait_live(self) -> None:
        """Read up to the `live` frame (hello, reply, live); anything after it is kept for run()."""
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while b'"frame":"live"' not in self._buf:
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise ConnectionError("daemon closed the feed connection")
            self._buf += chunk
        _, _, rest = self._buf.partition(b'"frame":"live"')
        _, _, self._buf = rest.partition(b"\n")
        self.live.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        buf = self._take(self._buf, time.monotonic_ns())
        while self.events < self.count:
            chunk = await loop.sock_recv(self.sock, 1 << 18)
            if not chunk:
                break
            buf = self._take(buf + chunk, time.monotonic_ns())
        self.done.set()

    def _take(self, buf: bytes, t: int) -> bytes:
        """Account for the complete lines in `buf` (read at `t`); return the incomplete rest."""
        cut = buf.rfind(b"\n") + 1
        if not cut:
            return buf
        lines, rest = buf[:cut], buf[cut:]
        n = lines.count(EVENT)
        if not n:
            return rest
        if self.first_seq is None:
            m = SEQ.search(lines, lines.find(EVENT))
            self.first_seq = int(m.group(1)) if m else None
            self.first_ns = t
        m = SEQ.search(lines, lines.rfind(EVENT))
        if m:
            self.last_seq = int(m.group(1))
        self.events += n
        self.last_ns = t
        if self.latency:
            self.lat.extend(t - int(s) for s in SENT.findall(lines))
        return rest

    def result(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "latency_ns": self.lat,
        }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--subs", type=int, default=1)
    ap.add_argument("--stalled", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    subs = [Sub(args.socket, args.count, args.latency) for _ in range(args.subs)]
    stalled = [Sub(args.socket, args.count, False) for _ in range(args.stalled)]
    for s in (*subs, *stalled):
        await s.open()
    await asyncio.wait_for(asyncio.gather(*(s.wait_live() for s in (*subs, *stalled))), 30)
    # A stalled subscriber never reads again: shrink its receive buffer so it stalls soon.
    for s in stalled:
        assert s.sock is not None
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    emit({"ready": True})
    tasks = [asyncio.ensure_future(s.run()) for s in subs]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    except TimeoutError:
        for task in tasks:
            task.cancel()
    emit({"subs": [s.result() for s in subs]})
    for s in (*subs, *stalled):
        if s.sock is not None:
            s.sock.close()


if __name__ == "__main__":
    asyncio.run(main())
