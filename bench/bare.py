"""The baselines: a bare httpx-sse read loop and a bare websockets read loop of the firehose.

    .venv/bin/python bench/bare.py sse|ws URL --count N [--latency] [--idle SECONDS]

Prints `{"ready": true}` once connected (and, for ws, authenticated), then reads until `count`
events have arrived and prints one JSON result: events, first/last arrival (CLOCK_MONOTONIC ns),
process CPU seconds spent from ready to the last event, and with --latency the per-event delays
from the emulator's write (`sent_ns`) to this read. --idle holds the connection for that long
without expecting events (the idle baseline). Stops by itself after --timeout seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import anyio
import httpx
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

SENT = re.compile(r'"sent_ns":(\d+)')


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Reader:
    def __init__(self, count: int, latency: bool) -> None:
        self.count = count
        self.latency = latency
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
            if event.event == "media_generation_completed" and reader.got(event.data):
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
            if reader.got(message if isinstance(message, str) else message.decode()):
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
    args = ap.parse_args()
    reader = Reader(args.count, args.latency)
    with anyio.move_on_after(args.timeout):
        await (sse if args.kind == "sse" else ws)(args.url, reader, args.idle)
    emit(reader.result())


if __name__ == "__main__":
    anyio.run(main)
