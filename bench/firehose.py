"""Bench-only emulators: an Oxen-compatible SSE firehose and a Runware-compatible WebSocket firehose.

    .venv/bin/python bench/firehose.py        # prints {"http": PORT, "ws": PORT}, serves until SIGTERM

Loopback only. Nothing is sent until a program is posted, so the daemon and the subscribers can
connect first:

    POST /bench/start   {"count": N, "rate": R, "channel": "sse" | "ws"}
        R = 0: as fast as the socket takes them (events are pre-formatted in big writes);
        R > 0: paced, one event per write, each stamped with CLOCK_MONOTONIC ns at the write
        (`sent_ns` in the payload, which the daemon passes through in `data.raw`).
    GET  /bench/stats   what was sent and polled

Every event is about a distinct job: SSE sends Oxen's `media_generation_completed`, the socket
sends a Runware `imageInference` result (a one-image task, so one COMPLETED event each). Both
also answer what the providers poll (Oxen `GET /api/ai/queue[/id]`, Runware `getResponse` and
`ping` over the socket) with "processing", and count those polls per job for the scale figure.

The WebSocket side is a minimal RFC 6455 server on asyncio streams (no extensions): the client
under test is the daemon's `websockets`, and a cheap emulator keeps the two cores for it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streamd.emulators.http import HttpServer, Request, Response, StreamResponse  # noqa: E402

KEEPALIVE = 15.0  # seconds, as Oxen
FAST_CHUNK = 256  # events per write in fast mode
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC: comparable across processes on one machine


class Program:
    def __init__(self, seq: int, count: int, rate: float, channel: str, ids: list[str] | None = None) -> None:
        self.seq = seq
        self.count = count
        self.rate = rate
        self.channel = channel
        self.ids = ids  # the jobs' ids, event by event; None: sequential ids (the job store's best case)


def _oxen_item(gid: str) -> dict[str, Any]:
    return {
        "generation_id": gid,
        "model_name": "bytedance-seedream-4",
        "prompt": "bench",
        "media_type": "image",
        "status": "processing",
        "result_url": None,
        "error_message": None,
        "enqueued_at": 1_700_000_000.0,
        "started_at": 1_700_000_001.0,
        "completed_at": None,
    }


class PollLog:
    """Per-job poll times, to check polling against the providers' advised rates."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # requests (a getResponse frame may ask for many jobs)
        self.jobs: Counter[str] = Counter()  # job polls
        self.last: dict[str, float] = {}
        self.intervals: dict[str, list[float]] = {"oxen": [], "runware": []}
        self.first: dict[str, float] = {}
        self.latest: dict[str, float] = {}

    def poll(self, provider: str, job: str) -> None:
        t = time.monotonic()
        self.jobs[provider] += 1
        self.first.setdefault(provider, t)
        self.latest[provider] = t
        key = provider + "/" + job
        prev = self.last.get(key)
        if prev is not None:
            iv = self.intervals[provider]
            if len(iv) < 200_000:
                iv.append(t - prev)
        self.last[key] = t

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for provider, advised in (("oxen", 2.0), ("runware", 3.0)):
            iv = sorted(self.intervals[provider])
            span = self.latest.get(provider, 0.0) - self.first.get(provider, 0.0)
            out[provider] = {
                "requests": self.requests[provider],
                "job_polls": self.jobs[provider],
                "jobs": sum(1 for k in self.last if k.startswith(provider + "/")),
                "span": span,
                "interval_min": iv[0] if iv else None,
                "interval_p1": iv[len(iv) // 100] if iv else None,
                "interval_p50": iv[len(iv) // 2] if iv else None,
                "below_share": sum(1 for v in iv if v < 0.95 * advised) / len(iv) if iv else 0.0,
            }
        return out


class Firehose:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.http = HttpServer(self._handle, host=host)
        self.ws_port = 0
        self.prefix = os.urandom(4).hex()
        self._program: Program | None = None
        self._programs = 0
        self._go = anyio.Event()
        self.sent: Counter[str] = Counter()
        self.started_ns: dict[str, int] = {}
        self.finished_ns: dict[str, int] = {}
        self.polls = PollLog()
        self._oxen_active: list[str] = []  # what the Oxen active list holds (the scale bench sets it)
        self._oxen_list = Response.json({"count": 0, "generations": []})
        self.ws_conns = 0
        self.sse_conns = 0

    # -- events ------------------------------------------------------------------------------------
    def job_id(self, n: int) -> str:
        prog = self._program
        if prog is not None and prog.ids is not None and n < len(prog.ids):
            return prog.ids[n]
        return f"{self.prefix}-0000-4000-8000-{n:012x}"

    def _oxen_data(self, n: int, stamp: int | None) -> str:
        gid = self.job_id(n)
        extra = f',"sent_ns":{stamp}' if stamp is not None else ""
        return (
            f'{{"generation_id":"{gid}","status":"succeeded","media_type":"image",'
            f'"model":"bytedance-seedream-4","url":"http://{self.host}/o/{gid}.png"{extra}}}'
        )

    def sse_event(self, n: int, stamp: int | None) -> str:
        return f"event: media_generation_completed\ndata: {self._oxen_data(n, stamp)}\n\n"

    def ws_message(self, n: int, stamp: int | None) -> bytes:
        tid = self.job_id(n)
        extra = f',"sent_ns":{stamp}' if stamp is not None else ""
        return (
            f'{{"data":[{{"taskType":"imageInference","taskUUID":"{tid}","imageUUID":"{tid}",'
            f'"imageURL":"http://{self.host}/o/{tid}.png","cost":0.0013{extra}}}]}}'
        ).encode()

    async def _next_program(self, last: int, channel: str) -> Program | None:
        """The next program for `channel` after `last`, or None after a keep-alive period."""
        with anyio.move_on_after(KEEPALIVE):
            while True:
                prog = self._program
                if prog is not None and prog.seq > last and prog.channel == channel:
                    return prog
                await self._go.wait()
        return None

    def _begin(self, channel: str) -> None:
        self.started_ns.setdefault(channel, now_ns())

    def _end(self, channel: str) -> None:
        self.finished_ns[channel] = now_ns()

    # -- HTTP: SSE, Oxen polls, control --------------------------------------------------------------
    async def _handle(self, request: Request) -> Response | StreamResponse:
        path, method = request.path, request.method
        if path == "/bench/start" and method == "POST":
            body = request.json()
            self._programs += 1
            count = int(body["count"])
            # random UUIDs, as real providers' ids are, made before the first event goes out
            ids = [str(uuid.uuid4()) for _ in range(count)] if body.get("ids") == "random" else None
            self._program = Program(
                self._programs, count, float(body.get("rate", 0.0)), str(body.get("channel", "sse")), ids
            )
            self.sent.clear()
            self.started_ns.clear()
            self.finished_ns.clear()
            self._go.set()
            self._go = anyio.Event()
            return Response.json({"ok": True})
        if path == "/bench/stats":
            return Response.json(
                {
                    "sent": dict(self.sent),
                    "started_ns": self.started_ns,
                    "finished_ns": self.finished_ns,
                    "polls": self.polls.summary(),
                    "connections": {"sse": self.sse_conns, "ws": self.ws_conns},
                }
            )
        if path == "/api/events" and method == "GET":
            headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            return StreamResponse(self._sse(), headers=headers)
        if path == "/bench/oxen-active" and method == "POST":  # the jobs the active list holds
            ids = [str(i) for i in request.json()["ids"]]
            self._oxen_active = ids
            self._oxen_list = Response.json({"count": len(ids), "generations": [_oxen_item(i) for i in ids]})
            return Response.json({"ok": True})
        if path == "/api/ai/queue" and method == "GET":  # one request, a poll of every job it lists
            self.polls.requests["oxen"] += 1
            self.polls.requests["oxen-list"] += 1
            for gid in self._oxen_active:
                self.polls.poll("oxen", gid)
            return self._oxen_list
        if path.startswith("/api/ai/queue/") and method == "GET":
            gid = path.removeprefix("/api/ai/queue/")
            self.polls.requests["oxen"] += 1
            self.polls.poll("oxen", gid)
            return Response.json(_oxen_item(gid))
        if method == "POST" and path in ("/v1", "/v1/"):  # Runware REST (used only while the socket is down)
            try:
                tasks = request.json()
            except ValueError:
                tasks = []
            self.polls.requests["runware-rest"] += 1
            return Response.json({"data": self._runware_answers(tasks)})
        return Response.json({"error": {"message": f"no route {method} {path}"}}, 404)

    async def _sse(self) -> Any:
        self.sse_conns += 1
        last = self._program.seq if self._program is not None else 0
        try:
            while True:
                prog = await self._next_program(last, "sse")
                if prog is None:
                    yield b": keep-alive\n\n"
                    continue
                last = prog.seq
                self._begin("sse")
                if prog.rate <= 0:
                    n = 0
                    while n < prog.count:
                        k = min(FAST_CHUNK, prog.count - n)
                        stamp = now_ns()
                        yield "".join([self.sse_event(i, stamp) for i in range(n, n + k)]).encode()
                        n += k
                        self.sent["sse"] = n
                else:
                    start = time.monotonic()
                    for i in range(prog.count):
                        delay = start + i / prog.rate - time.monotonic()
                        if delay > 0:
                            await anyio.sleep(delay)
                        yield self.sse_event(i, now_ns()).encode()
                        self.sent["sse"] = i + 1
                self._end("sse")
        finally:
            self.sse_conns -= 1

    # -- WebSocket (Runware) -----------------------------------------------------------------------
    def _runware_answers(self, tasks: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not isinstance(tasks, list):
            return out
        for task in tasks:
            if not isinstance(task, dict):
                continue
            kind = task.get("taskType")
            if kind == "authentication":
                out.append({"taskType": "authentication", "connectionSessionUUID": self.job_id(0xFFFFFFFF)})
            elif kind == "ping":
                out.append({"taskType": "ping", "pong": True})
            elif kind == "getResponse":
                tid = str(task.get("taskUUID"))
                self.polls.poll("runware", tid)
                out.append({"taskType": "getResponse", "taskUUID": tid, "status": "processing"})
        return out

    async def ws_serve(self) -> asyncio.Server:
        server = await asyncio.start_server(self._ws_conn, self.host, 0, limit=1 << 20)
        self.ws_port = server.sockets[0].getsockname()[1]
        return server

    async def _ws_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            key = headers.get("sec-websocket-key", "").encode()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        self.ws_conns += 1
        pusher = asyncio.ensure_future(self._ws_push(writer))
        try:
            while True:
                opcode, payload = await _read_frame(reader)
                if opcode == 0x8:  # close: echo it and end
                    writer.write(_frame(0x8, payload[:2]))
                    break
                if opcode == 0x9:
                    writer.write(_frame(0xA, payload))
                elif opcode == 0x1:
                    try:
                        tasks = json.loads(payload)
                    except ValueError:
                        continue
                    answers = self._runware_answers(tasks)
                    if any(t.get("taskType") == "getResponse" for t in tasks if isinstance(t, dict)):
                        self.polls.requests["runware"] += 1
                    if answers:
                        writer.write(_frame(0x1, json.dumps({"data": answers}).encode()))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ws_conns -= 1
            pusher.cancel()
            writer.close()

    async def _ws_push(self, writer: asyncio.StreamWriter) -> None:
        last = self._program.seq if self._program is not None else 0
        while True:
            prog = await self._next_program(last, "ws")
            if prog is None:
                continue
            last = prog.seq
            self._begin("ws")
            if prog.rate <= 0:
                n = 0
                while n < prog.count:
                    k = min(FAST_CHUNK, prog.count - n)
                    stamp = now_ns()
                    writer.write(b"".join([_frame(0x1, self.ws_message(i, stamp)) for i in range(n, n + k)]))
                    await writer.drain()
                    n += k
                    self.sent["ws"] = n
            else:
                start = time.monotonic()
                for i in range(prog.count):
                    delay = start + i / prog.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    writer.write(_frame(0x1, self.ws_message(i, now_ns())))
                    await writer.drain()
                    self.sent["ws"] = i + 1
            self._end("ws")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server frame: FIN, unmasked."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One complete client message (masked frames, continuation frames joined)."""
    opcode = 0
    parts: list[bytes] = []
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        mask = await reader.readexactly(4) if b1 & 0x80 else b""
        data = await reader.readexactly(n)
        if mask:
            key = (mask * (n // 4 + 1))[:n]
            data = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        op = b0 & 0x0F
        if op >= 0x8:  # control frames are never fragmented and may interleave
            return op, data
        if op:
            opcode = op
        parts.append(data)
        if b0 & 0x80:
            return opcode, b"".join(parts)


async def main() -> None:
    fh = Firehose()
    ws_server = await fh.ws_serve()
    async with anyio.create_task_group() as tg:
        await tg.start(fh.http.serve)
        sys.stdout.write(json.dumps({"http": fh.http.port, "ws": fh.ws_port, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        ws_server.close()
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
