"""The baselines: a bare httpx-sse read loop and a bare websockets read loop of the firehose.

    .venv/bin/python bench/bare.py sse|ws URL --count N [--latency] [--idle SECONDS] [--journal DIR]

Prints `{"ready": true}` once connected (and, for ws, authenticated), then reads until `count`
events have arrived and prints one JSON result: events, first/last arrival (CLOCK_MONOTONIC ns),
process CPU seconds spent from ready to the last event, and with --latency the per-event delays
from the emulator's write (`sent_ns`) to this read. --idle holds the connection for that long
without expecting events (the idle baseline). Stops by itself after --timeout seconds.

--journal is the floor: the read loop plus only what no daemon can leave out, each event's job id
decoded and the event and its job's row written to streamd's own journal in DIR (streamd from
--root, default this repository), as the daemon's writer task does: batches of up to 1,024 events
in a worker thread, held-back job rows, a checkpoint when 0.5 s have passed since the last, and no
catch-up forced at the end (the daemon's last checkpoint falls after its measurement too). Bodies are
the daemon's sizes. No normalising, lifecycle, envelope or fan-out. It reads with httpx-sse's
`aiter_sse` as the plain loop does (the daemon parses the bytes itself, a little cheaper), so it is
about, not exactly, the least a daemon built on these libraries and this journal could cost.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

SENT = re.compile(r'"sent_ns":(\d+)')
EVENT_BYTES = 843  # the size of the daemon's journaled body for one of these events (CloudEvent JSON)
JOB_ROW = b"j" * 386  # and the job row it leaves behind
ROOT = Path(__file__).resolve().parent.parent
new_tuple = tuple.__new__  # as the pipeline builds its rows


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Floor:
    """Each event's job id decoded, and the event and its job's row journaled as the daemon does."""

    def __init__(self, directory: Path, kind: str, root: Path) -> None:
        # Imported here: the plain loop, which is the baseline of every figure, imports nothing more.
        sys.path.insert(0, str(root))
        import msgspec

        from streamd.journal import CHECKPOINT_EVERY, Append, Journal
        from streamd.pipeline import BATCH

        self.journal = Journal(directory / "floor.sqlite3")
        self.kind = kind
        self.decode = msgspec.json.Decoder().decode
        self.append_type = Append
        self.batch = BATCH
        self.every = CHECKPOINT_EVERY
        self.pending: list[Any] = []
        self.seq = 0
        self.limiter = anyio.CapacityLimiter(1)
        self.checked = time.monotonic()

    def add(self, text: str, last: bool) -> bool:
        """Queue the event; True when a batch is due."""
        self.seq += 1
        value = self.decode(text)
        job = value["generation_id"] if self.kind == "sse" else value["data"][0]["taskUUID"]
        raw = text.encode()
        body = raw + b" " * (EVENT_BYTES - len(raw))  # (the data is in the daemon's body too)
        row = (self.seq, time.time(), body, (self.kind, job), JOB_ROW, True, None)
        self.pending.append(new_tuple(self.append_type, row))
        return last or len(self.pending) >= self.batch

    async def write(self) -> None:
        batch, self.pending = self.pending, []
        await anyio.to_thread.run_sync(self.journal.append, batch, limiter=self.limiter)
        if time.monotonic() - self.checked >= self.every:
            self.checked = time.monotonic()
            await anyio.to_thread.run_sync(self.catch_up, limiter=self.limiter)

    def catch_up(self) -> None:
        self.journal.flush_jobs()
        self.journal.checkpoint()


class Reader:
    def __init__(self, count: int, latency: bool, floor: Floor | None = None) -> None:
        self.count = count
        self.latency = latency
        self.floor = floor
        self.n = 0
        self.first_ns = 0
        self.last_ns = 0
        self.lat: list[int] = []
        self.cpu0 = 0.0

    def ready(self) -> None:
        self.cpu0 = time.process_time()
        emit({"ready": True})

    def got(self, text: str) -> bool:
        t = time.monotonic_ns()
        if not self.n:
            self.first_ns = t
        self.n += 1
        self.last_ns = t
        if self.latency and (m := SENT.search(text)) is not None:
            self.lat.append(t - int(m.group(1)))
        return self.n >= self.count

    def result(self) -> dict[str, Any]:
        return {
            "events": self.n,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "cpu": time.process_time() - self.cpu0,
            "latency_ns": self.lat,
        }


async def sse(url: str, reader: Reader, idle: float) -> None:
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as client,
        aconnect_sse(client, "GET", url, headers={"Authorization": "Bearer bench"}) as source,
    ):
        reader.ready()
        if idle:
            await _idle(source.aiter_sse(), idle)
            return
        async for event in source.aiter_sse():
            if event.event == "media_generation_completed":
                if reader.floor is not None and reader.floor.add(event.data, reader.n + 1 >= reader.count):
                    await reader.floor.write()
                if reader.got(event.data):
                    return


async def ws(url: str, reader: Reader, idle: float) -> None:
    async with connect(url, ping_interval=None, max_size=16 * 1024 * 1024) as conn:
        await conn.send(json.dumps([{"taskType": "authentication", "apiKey": "bench"}]))
        await conn.recv()
        reader.ready()
        if idle:
            await _idle(conn, idle)
            return
        async for message in conn:
            text = message if isinstance(message, str) else message.decode()
            if reader.floor is not None and reader.floor.add(text, reader.n + 1 >= reader.count):
                await reader.floor.write()
            if reader.got(text):
                return


async def _idle(source: Any, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        async for _ in source:
            pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["sse", "ws"])
    ap.add_argument("url")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--idle", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--journal", type=Path, default=None, help="the floor: also journal each event in DIR")
    ap.add_argument("--root", type=Path, default=ROOT, help="the streamd tree whose journal --journal uses")
    args = ap.parse_args()
    floor = Floor(args.journal, args.kind, args.root) if args.journal is not None else None
    reader = Reader(args.count, args.latency, floor)
    with anyio.move_on_after(args.timeout):
        await (sse if args.kind == "sse" else ws)(args.url, reader, args.idle)
    emit(reader.result())


if __name__ == "__main__":
    anyio.run(main)
