"""An Oxen.ai emulator on loopback: the async queue, the synchronous endpoint, models, and SSE.

It behaves as providers.md documents Oxen: Bearer auth with error shape (a), the documented error
texts, statuses queued → processing → succeeded/failed (or cancelled by DELETE), rows that persist
after they finish, a list of active jobs only unless `status` is asked for, and one account-wide
SSE stream that sends `media_generation_completed` only to subscribers connected at that moment
(no ids, no buffer), nothing for cancelled jobs, `: keep-alive` when idle, and now and then an
unrelated event type. Job time is kept by a clock task in `serve()`, so `Faults.paused` freezes it.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import uuid
import zlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd.config import ProviderSettings, Secret
from streamd.emulators.base import Faults, JobPlan, Truth, plan_for, ticks
from streamd.emulators.http import Drop, HttpServer, Request, Response, StreamResponse

TICK = 0.02  # seconds between clock steps
SUBSCRIBER_BUFFER = 256
KEEPALIVE = b": keep-alive\n\n"
ACTIVE = ("queued", "processing")
OUTPUT_PREFIX = "/api/repos/emulator/outputs/file/main/"
UNRELATED_RATE = 0.1  # share of completions followed by a deployment event


def _schema(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props, "x-order": list(props)}


_PROMPT = {"type": "string", "description": "Text description of what you want to generate", "basic": True}
_IMAGES = {
    "type": "array",
    "items": {"type": "string", "format": "uri"},
    "renderType": "image-url",
    "description": "Input images to transform or use as reference (supports multiple image urls)",
}
_SEED = {"type": "integer", "description": "Random seed. Set for reproducible generation"}


def _model(model_id: str, display: str, developer: str, output: str, cost: float, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 1_756_684_800,
        "owned_by": developer,
        "display_name": display,
        "model_type": "base",
        "endpoint": "/images/generate" if output == "image" else "/chat/completions",
        "capabilities": {"input": ["text", "image"] if output == "image" else ["text"], "output": [output]},
        "pricing": {"method": "per_image", "cost_per_image": cost} if output == "image" else {"method": "per_token"},
        "deployments": [],
        "developer": developer,
        "released_at": "2025-09-01",
        **extra,
    }


MODELS: dict[str, dict[str, Any]] = {
    m["id"]: m
    for m in (
        _model(
            "bytedance-seedream-4",
            "Seedream 4.0",
            "bytedance",
            "image",
            0.03,
            json_request_schema=_schema(["prompt"], {"prompt": _PROMPT, "input_image": _IMAGES}),
        ),
        _model(
            "bytedance-seedream-4-5",
            "Seedream 4.5",
            "bytedance",
            "image",
            0.04,
            json_request_schema=_schema(
                ["prompt"],
                {
                    "prompt": _PROMPT,
                    "input_image": _IMAGES,
                    "aspect_ratio": {
                        "type": "string",
                        "default": "1:1",
                        "enum": ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "match_input_image"],
                    },
                    "size": {"type": "string", "default": "4K", "enum": ["2K", "4K"]},
                    "seed": _SEED,
                },
            ),
        ),
        _model(
            "black-forest-labs-flux-2-klein-4b",
            "FLUX.2 [klein] 4B",
            "black-forest-labs",
            "image",
            0.01,
            request_schema=_schema(
                ["prompt"],
                {
                    "prompt": _PROMPT,
                    "input_image": _IMAGES,
                    "aspect_ratio": {"type": "string", "default": "16:9"},
                    "output_format": {"type": "string", "enum": ["png", "jpg", "webp"]},
                    "seed": _SEED,
                    "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 50},
                    "guidance_scale": {"type": "number"},
                },
            ),
        ),
        _model("oxen-demo-chat-1b", "Demo chat 1B", "oxen", "text", 0.0),
    )
}


def tiny_png(seed: str, size: int = 16) -> bytes:
    """A real, valid PNG of one colour derived from `seed`, so archive tests fetch something genuine."""
    r, g, b = hashlib.sha256(seed.encode()).digest()[:3]
    row = b"\x00" + bytes((r, g, b)) * size
    raw = row * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def error_a(kind: str, title: str, detail: str, status: int, headers: list[tuple[str, str]] | None = None) -> Response:
    """Oxen's error shape (a)."""
    body = {"error": {"type": kind, "title": title, "detail": detail}, "status": "error", "status_message": kind}
    return Response.json(body, status, headers)


def error_b(message: str, status: int) -> Response:
    """Oxen's error shape (b)."""
    return Response.json({"error": {"message": message}}, status)


@dataclass
class Generation:
    id: str
    model: str
    prompt: str
    params: dict[str, Any]
    plan: JobPlan
    enqueued_at: float
    media_type: str = "image"
    status: str = "queued"
    elapsed: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    result_url: str | None = None
    error_message: str | None = None
    sync: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)

    def item(self) -> dict[str, Any]:
        return {
            **self.params,
            "generation_id": self.id,
            "model_name": self.model,
            "prompt": self.prompt,
            "media_type": self.media_type,
            "status": self.status,
            "result_url": self.result_url,
            "error_message": self.error_message,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }


@dataclass(eq=False)
class _Subscriber:
    send: MemoryObjectSendStream[bytes]
    receive: MemoryObjectReceiveStream[bytes]


class OxenEmulator:
    name = "oxen"

    def __init__(
        self,
        *,
        seed: int = 0,
        speed: float = 1.0,
        fail_rate: float = 0.12,
        host: str = "127.0.0.1",
        key: str = "oxen-demo-key",
        keepalive: float = 15.0,
    ) -> None:
        self.rng = random.Random(seed)
        self._extra_rng = random.Random(seed + 1)  # unrelated events, kept apart from job plans
        self.speed = speed
        self.fail_rate = fail_rate
        self.key = key
        self.keepalive = keepalive
        self.faults = Faults()
        self.truth: dict[str, Truth] = {}
        self.generations: dict[str, Generation] = {}
        self.server = HttpServer(self._handle, host=host)
        #: (clock time, method, path, status) of recent requests, for tests that count them.
        self.log: deque[tuple[float, str, str, int]] = deque(maxlen=10_000)
        self._active: dict[str, Generation] = {}
        self._subscribers: set[_Subscriber] = set()

    # -- Emulator protocol -----------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.server.serve)
            tg.start_soon(self._clock)
            task_status.started()

    def settings(self) -> ProviderSettings:
        return ProviderSettings(name="oxen", key=Secret(self.key), base_url=self.server.url)

    async def restart(self) -> None:
        for sub in list(self._subscribers):
            sub.send.close()
        self._subscribers.clear()
        await self.server.close_all()

    # -- for tests and the demo ------------------------------------------------------------------
    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[float, str, str, int]]:
        return [r for r in self.log if (method is None or r[1] == method) and (path is None or r[2] == path)]

    def force(self, generation_id: str, status: str, *, error: str | None = None, announce: bool = True) -> None:
        """Move a generation at once (tests pair this with `faults.paused` for exact sequences).
        `announce=False` finishes it without its SSE event, as if the stream had lost it."""
        gen = self.generations[generation_id]
        if status == "processing" and gen.status == "queued":
            self._start(gen)
        elif status in ("succeeded", "failed") and gen.status in ACTIVE:
            self._finish(gen, status, error or gen.plan.error or "forced failure", announce=announce)

    def send_raw(self, frame: bytes) -> int:
        """Send `frame` as it is to every connected SSE subscriber (tests: malformed events). Returns how many."""
        subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.send.send_nowait(frame)
        return len(subscribers)

    # -- time ------------------------------------------------------------------------------------
    async def _clock(self) -> None:
        async for dt in ticks(TICK, self.faults):
            for gen in list(self._active.values()) if dt else ():
                self._advance(gen, dt)

    def _advance(self, gen: Generation, dt: float) -> None:
        gen.elapsed += dt
        if gen.status == "queued" and gen.elapsed >= gen.plan.queue_s:
            self._start(gen)
        due = gen.elapsed >= gen.plan.queue_s + gen.plan.run_s
        if gen.status == "processing" and gen.plan.outcome != "hang" and due:
            self._finish(gen, gen.plan.outcome, gen.plan.error)

    def _start(self, gen: Generation) -> None:
        gen.status = "processing"
        gen.started_at = time.time()

    def _finish(self, gen: Generation, outcome: str, error: str, *, announce: bool = True) -> None:
        gen.completed_at = time.time()
        self._active.pop(gen.id, None)
        if outcome == "succeeded":
            gen.status = "succeeded"
            gen.result_url = f"{self.server.url}{OUTPUT_PREFIX}{gen.id}.png"
            data: dict[str, Any] = {
                "generation_id": gen.id,
                "status": "succeeded",
                "media_type": gen.media_type,
                "model": gen.model,
                "url": gen.result_url,
            }
        else:
            gen.status = "failed"
            gen.error_message = error
            data = {"generation_id": gen.id, "status": "failed", "media_type": gen.media_type, "error": error}
        gen.done.set()
        if gen.sync:
            return
        self.truth[gen.id] = Truth(
            job=gen.id,
            state="completed" if gen.status == "succeeded" else "failed",
            outputs=[gen.result_url] if gen.result_url else [],
            cost=MODELS[gen.model]["pricing"].get("cost_per_image"),
            error=gen.error_message,
        )
        if announce:
            self._publish("media_generation_completed", data)
        if self._extra_rng.random() < UNRELATED_RATE:
            self._publish("deployment_status_changed", {"deployment_id": f"dep_{gen.id[:8]}", "status": "live"})

    def _publish(self, event: str, data: dict[str, Any]) -> None:
        """To the subscribers connected now; Oxen keeps nothing for anyone who is not."""
        frame = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(frame)
            except anyio.WouldBlock:  # a subscriber that cannot keep up is cut off, as a server would
                sub.send.close()
                self._subscribers.discard(sub)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(sub)

    # -- HTTP ------------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response | StreamResponse:
        try:
            response = await self._route(request)
        except Drop:
            self.log.append((anyio.current_time(), request.method, request.path, 0))
            raise
        except Exception as exc:  # HttpServer lets handler errors end the server; answer 500 instead
            response = error_a("unknown_error", "Internal error", f"emulator error: {exc!r}", 500)
        self.log.append((anyio.current_time(), request.method, request.path, response.status))
        return response

    async def _route(self, request: Request) -> Response | StreamResponse:
        path, method = request.path, request.method
        if method == "GET" and path.startswith(OUTPUT_PREFIX):  # presigned-style: no auth, no faults
            gen = self.generations.get(path[len(OUTPUT_PREFIX) :].removesuffix(".png"))
            if gen is None or gen.result_url is None:
                return error_a("resource_not_found", "Not found", "File not found", 404)
            return Response(200, tiny_png(gen.id), [("content-type", "image/png")])
        if not path.startswith("/api/"):
            return error_a("resource_not_found", "Not found", f"No route for {path}", 404)
        if path != "/api/events" and self.faults.delay > 0:
            await anyio.sleep(self.faults.delay)
        if (status := self.faults.take_error()) is not None:
            return self._fault(status)
        if self.faults.reject_auth or request.headers.get("authorization") != f"Bearer {self.key}":
            return error_a("unauthenticated", "Unauthenticated", "Invalid or missing API key", 401)
        if path == "/api/events" and method == "GET":
            return self._events()
        if path == "/api/ai/queue":
            if method == "POST":
                return self._enqueue(request)
            if method == "GET":
                return self._list(request.query)
        if path.startswith("/api/ai/queue/"):
            gen = self.generations.get(path.removeprefix("/api/ai/queue/"))
            if gen is None or gen.sync:
                return error_a("resource_not_found", "Not found", "Generation not found", 404)
            if method == "GET":
                return Response.json(gen.item())
            if method == "DELETE":
                return self._cancel(gen)
        if path == "/api/ai/images/generate" and method == "POST":
            return await self._generate(request)
        if path == "/api/ai/models" and method == "GET":
            return Response.json({"object": "list", "data": list(MODELS.values())})
        if path.startswith("/api/ai/models/") and method == "GET":
            model = MODELS.get(path.removeprefix("/api/ai/models/"))
            if model is None:
                return error_a("resource_not_found", "Not found", f"Model not found: {path.rsplit('/', 1)[-1]}", 404)
            return Response.json(model)
        return error_a("resource_not_found", "Not found", f"No route for {method} {path}", 404)

    def _fault(self, status: int) -> Response:
        if status == 429:
            headers = [("retry-after", f"{self.faults.retry_after:g}")]
            return error_a("too_many_requests", "Too many requests", "Rate limit exceeded", 429, headers)
        if status == 401:
            return error_a("unauthenticated", "Unauthenticated", "Invalid or missing API key", 401)
        kind = "unknown_error" if status >= 500 else "invalid_params"
        return error_a(kind, "Error", f"emulated HTTP {status}", status)

    def _new(self, model: str, prompt: str, params: dict[str, Any], *, sync: bool = False) -> Generation:
        plan = plan_for(prompt, self.rng, speed=self.speed, fail_rate=self.fail_rate)
        if not prompt.strip():  # enqueue does not check model parameters; the job fails later
            plan = JobPlan(outcome="failed", queue_s=plan.queue_s, run_s=0.0, steps=0, error="Prompt cannot be empty")
        gen = Generation(
            id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            model=model,
            prompt=prompt,
            params=params,
            plan=plan,
            enqueued_at=time.time(),
            sync=sync,
        )
        self.generations[gen.id] = gen
        self._active[gen.id] = gen
        return gen

    @staticmethod
    def _body(request: Request) -> dict[str, Any] | None:
        try:
            body = request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _enqueue(self, request: Request) -> Response:
        body = self._body(request)
        if body is None:
            return error_a("invalid_params", "Invalid params", "Request body must be a JSON object", 400)
        model = body.pop("model", None)
        if not isinstance(model, str) or model not in MODELS:
            return error_a("invalid_params", "Invalid params", f"Model not found: {model}", 400)
        if "image" not in MODELS[model]["capabilities"]["output"]:
            return error_a("invalid_params", "Invalid params", ":unsupported_media_type", 400)
        count = body.pop("num_generations", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4:
            return error_a(
                "invalid_params", "Invalid params", "num_generations must be an integer between 1 and 4", 400
            )
        body.pop("target_namespace", None)
        prompt = body.pop("prompt", "")
        prompt = prompt if isinstance(prompt, str) else ""
        gens = [self._new(model, prompt, dict(body)) for _ in range(count)]
        for gen in gens:
            self.truth[gen.id] = Truth(job=gen.id, state="")
        return Response.json({"generations": [{"generation_id": g.id, "status": g.status} for g in gens]})

    def _list(self, query: dict[str, str]) -> Response:
        status = query.get("status")
        items = [
            g.item()
            for g in self.generations.values()
            if not g.sync
            and (g.status == status if status else g.status in ACTIVE)
            and (not query.get("model") or g.model == query["model"])
            and (not query.get("media_type") or g.media_type == query["media_type"])
        ]
        return Response.json({"count": len(items), "generations": items})

    def _cancel(self, gen: Generation) -> Response:
        if gen.status in ACTIVE:  # on a finished job it "has no effect"
            gen.status = "cancelled"
            gen.completed_at = time.time()
            self._active.pop(gen.id, None)
            gen.done.set()
            self.truth[gen.id] = Truth(job=gen.id, state="cancelled")
        return Response.json({"status": "success", "generation_id": gen.id})

    async def _generate(self, request: Request) -> Response:
        body = self._body(request)
        if body is None:
            return error_b("Request body must be a JSON object", 400)
        model = body.pop("model", None)
        if not isinstance(model, str) or model not in MODELS or "image" not in MODELS[model]["capabilities"]["output"]:
            return error_b(f"Model not found: {model}", 400)
        prompt = body.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            return error_b("Prompt cannot be empty", 400)
        gen = self._new(model, prompt, body, sync=True)
        await gen.done.wait()
        if gen.status != "succeeded":
            return error_b(gen.error_message or "generation failed", 500)
        return Response.json({"model": model, "created": int(time.time()), "images": [{"url": gen.result_url}]})

    def _events(self) -> StreamResponse:
        send, receive = anyio.create_memory_object_stream[bytes](SUBSCRIBER_BUFFER)
        sub = _Subscriber(send, receive)
        self._subscribers.add(sub)
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        return StreamResponse(self._stream(sub), headers=headers)

    async def _stream(self, sub: _Subscriber) -> AsyncIterator[bytes]:
        sent = 0
        try:
            while True:
                if self._should_drop(sent):
                    raise Drop
                frame: bytes | None = None
                with anyio.move_on_after(self.keepalive):
                    frame = await sub.receive.receive()
                if self.faults.stall:
                    continue  # a stalled stream sends nothing at all; what it would have sent is lost
                if frame is None:
                    yield KEEPALIVE
                    continue
                if self._should_drop(sent):
                    raise Drop
                yield frame
                sent += 1
        except anyio.EndOfStream:
            raise Drop from None
        finally:
            self._subscribers.discard(sub)
            sub.send.close()
            sub.receive.close()

    def _should_drop(self, sent: int) -> bool:
        limit = self.faults.drop_after
        if limit is not None and sent >= limit:
            self.faults.drops += 1
            return True
        return False
