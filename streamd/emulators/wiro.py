"""A Wiro emulator on loopback: the signed REST API and the task WebSocket, as providers.md documents them.

REST (under /v1): `Run/{owner}/{model}` (JSON or multipart with file parts), `Task/Detail`,
`Task/Cancel` (queued only), `Task/Kill` (past the queue), with signature checking (or key-only
mode), the `{result, errors[]}` envelope with HTTP 200 for request errors and 401 for auth, and
codes 96 (concurrency, via `concurrency_limit`) and 97 (balance, via `balance`). Outputs and
uploaded inputs are served from the emulator's own URLs.

WebSocket: `{"type":"connected","version":"1.0"}` on connect, `task_info` registration (several
tokens per connection), `{type, id, tasktoken, message, result}` frames sent only to connections
registered for the task at that moment (no replay), and a ping every `ping_interval` seconds.
Tasks go through the documented status order on an emulated clock (`Faults.paused` stops it):
task_queue → task_accept → task_preprocess_start/_end → task_assign → task_start → task_output
(text, then progressGenerate objects) → task_output_full → task_end → task_postprocess_start →
task_postprocess_end (outputs in `message`; `pexit` only in Task/Detail). Failures either exit
non-zero (stderr as task_error frames, then task_postprocess_end with no outputs), or, when an input
cannot be fetched, die before running: a task_error frame, and `task_error` as the Detail status
(besides the shared prompt tags, `[badinput]` forces that second kind).
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import hmac
import json
import logging
import random
import re
import string
import struct
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from streamd.config import ProviderSettings, Secret
from streamd.emulators.base import FAILURES, Faults, JobPlan, Truth, plan_for, ticks
from streamd.emulators.http import HttpServer, Request, Response
from streamd.providers.wiro.client import sign

TICK = 0.02  # seconds between clock steps
CONN_BUFFER = 512  # frames queued per socket connection before it counts as too slow and is dropped
PONG_TIMEOUT = 10.0
MAX_PROGRESS_FRAMES = 20
PRE_EXECUTION_FAILURE = FAILURES[2]  # "input image could not be fetched": dies before it runs

#: Models the emulator knows, with a price per output image (USD).
MODELS: dict[str, float] = {
    "bytedance/seedream-v4": 0.03,
    "bytedance/seedream-v4-5": 0.04,
    "black-forest-labs/flux-schnell": 0.003,
}
LIFECYCLE_TIMES = {
    "task_accept": "accepttime",
    "task_preprocess_start": "preprocessstarttime",
    "task_preprocess_end": "preprocessendtime",
    "task_assign": "assigntime",
    "task_start": "starttime",
    "task_end": "endtime",
    "task_postprocess_start": "postprocessstarttime",
    "task_postprocess_end": "postprocessendtime",
    "task_cancel": "canceltime",
}
ENDED = frozenset({"task_postprocess_end", "task_cancel", "task_error"})
SOCKET_LOG = logging.getLogger(__name__ + ".socket")
SOCKET_LOG.setLevel(logging.WARNING)  # no frame traces (they hold task tokens), no per-connection chatter
AUTH_MISSING = "Project authorization is not founded."
AUTH_SIGNATURE = "Project requires signature authentication. x-signature and x-nonce headers are required."
AUTH_INVALID = "Project authorization is not valid."


def tiny_png(seed: str, size: int = 8) -> bytes:
    """A valid square PNG in one colour derived from `seed`."""
    rgb = zlib.crc32(seed.encode()).to_bytes(4, "big")[:3]
    raw = b"".join(b"\x00" + rgb * size for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def envelope_error(
    code: int, message: str, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response.json({"result": False, "errors": [{"code": code, "message": message}]}, status, headers)


@dataclass
class _Step:
    at: float  # emulated seconds
    kind: str  # frame type
    message: Any = None
    status: str | None = None  # the Detail status this step sets (lifecycle steps: the frame type)


@dataclass
class _Task:
    id: str
    token: str
    uuid: str
    model: str
    params: dict[str, Any]
    plan: JobPlan
    images: int
    price: float
    status: str = "task_queue"
    pexit: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    debugoutput: str = ""
    debugerror: str = ""
    times: dict[str, int] = field(default_factory=dict)
    steps: deque[_Step] = field(default_factory=deque)
    totalcost: float = 0.0

    @property
    def active(self) -> bool:
        return self.status not in ENDED

    def record(self) -> dict[str, Any]:
        """The task as `/Task/Detail` shows it: every number a string, like the real API."""
        owner, _, project = self.model.partition("/")
        elapsed = max(self.times.get("endtime", 0) - self.times.get("starttime", 0), 0)
        size = sum(int(o["size"]) for o in self.outputs)
        t = {name: str(self.times.get(name, 0)) for name in ("createtime", *LIFECYCLE_TIMES.values())}
        return {
            "id": self.id,
            "uuid": self.uuid,
            "name": "",
            "socketaccesstoken": self.token,
            "parameters": dict(self.params),
            "debugoutput": self.debugoutput,
            "debugerror": self.debugerror,
            "starttime": t["starttime"],
            "endtime": t["endtime"],
            "elapsedseconds": f"{elapsed:.4f}",
            "status": self.status,
            "cps": f"{self.price / 10:.12f}",
            "totalcost": f"{self.totalcost:.12f}",
            "guestid": None,
            "projectid": "699",
            "modelid": "598",
            "modelslugowner": owner,
            "modelslugproject": project,
            "modeldescription": f"{project} (emulated)",
            "description": "",
            "basemodelid": "0",
            "runtype": "model",
            "callbackurl": self.params.get("callbackUrl", ""),
            "createtime": t["createtime"],
            "canceltime": t["canceltime"],
            "assigntime": t["assigntime"],
            "accepttime": t["accepttime"],
            "preprocessstarttime": t["preprocessstarttime"],
            "preprocessendtime": t["preprocessendtime"],
            "postprocessstarttime": t["postprocessstarttime"],
            "postprocessendtime": t["postprocessendtime"],
            "pexit": self.pexit,
            "outputs": [dict(o) for o in self.outputs],
            "size": str(size),
        }


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    send: MemoryObjectSendStream[str]
    tokens: set[str] = field(default_factory=set)
    sent: int = 0

    def abort(self) -> None:
        self.ws.transport.abort()


class WiroEmulator:
    name = "wiro"

    def __init__(
        self,
        *,
        seed: int = 0,
        speed: float = 1.0,
        fail_rate: float = 0.12,
        host: str = "127.0.0.1",
        key: str = "wiro-demo-key",
        secret: str = "wiro-demo-secret",
        signed: bool = True,
        ping_interval: float = 30.0,
    ) -> None:
        self.faults = Faults()
        self.truth: dict[str, Truth] = {}
        self.speed = speed
        self.fail_rate = fail_rate
        self.host = host
        self.key = key
        self.secret = secret
        self.signed = signed
        self.ping_interval = ping_interval
        self.concurrency_limit: int | None = None  # Run answers code 96 when this many tasks are active
        self.balance: float | None = None  # USD; Run answers code 97 at or below zero; None: unlimited
        self.lost_frames: set[str] = set()  # frame types never delivered (tests: a frame lost in transit)
        self.tasks: dict[str, _Task] = {}
        self.uploads: list[tuple[str, str, str, bytes]] = []  # (taskid, field, filename, content)
        self.calls: list[tuple[str, str]] = []  # (path, content-type) of every authorised POST
        self.registrations = 0
        self._rng = random.Random(seed)
        self._tokens = random.Random(seed ^ 0x5EED)
        self._next_id = 534574
        self._files: dict[str, tuple[str, bytes]] = {}
        self._conns: set[_Conn] = set()
        self._http = HttpServer(self._handle, host)
        self._server: Server | None = None
        self._ws_port = 0
        self._clock_now = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self._http.serve)
            self._server = await serve(self._ws, self.host, 0, ping_interval=None, max_size=1 << 20, logger=SOCKET_LOG)
            try:
                self._ws_port = next(iter(self._server.sockets)).getsockname()[1]
                tg.start_soon(self._clock)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                for conn in list(self._conns):
                    conn.abort()
                self._server.close(close_connections=False)
                with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                    await self._server.wait_closed()

    def settings(self) -> ProviderSettings:
        return ProviderSettings(
            name="wiro",
            key=Secret(self.key),
            secret=Secret(self.secret) if self.signed else None,
            base_url=f"{self._http.url}/v1",
            socket_url=f"ws://{self.host}:{self._ws_port}/v1",
        )

    async def restart(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        await self._http.close_all()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def send_raw(self, text: str) -> int:
        """Send `text` as one frame to every socket connection (tests: malformed frames). Returns how many."""
        conns = list(self._conns)
        for conn in conns:
            conn.send.send_nowait(text)
        return len(conns)

    # -- the clock -----------------------------------------------------------------------------
    async def _clock(self) -> None:
        async for dt in ticks(TICK, self.faults):
            if not dt:
                continue
            self._clock_now += dt
            for task in list(self.tasks.values()):
                while task.steps and task.steps[0].at <= self._clock_now:
                    self._fire(task, task.steps.popleft())

    def _fire(self, task: _Task, step: _Step) -> None:
        now = int(time.time())
        if step.status is not None:
            task.status = step.status
            if step.status in LIFECYCLE_TIMES:
                task.times[LIFECYCLE_TIMES[step.status]] = now
        if step.kind == "task_postprocess_end":
            self._finish(task, now)
            step.message = [dict(o) for o in task.outputs]
        elif step.kind == "task_error" and step.status == "task_error":
            task.debugerror = step.message
            self._end_truth(task, "failed", PRE_EXECUTION_FAILURE)
        elif step.kind == "task_output_full":
            task.debugoutput = step.message["raw"]
        elif step.kind == "task_error_full":
            task.debugerror = step.message["raw"]
        self._push(task, step.kind, step.message)

    def _finish(self, task: _Task, now: int) -> None:
        if task.plan.outcome == "succeeded":
            task.pexit = "0"
            task.outputs = [self._output(task, i, now) for i in range(task.images)]
            task.totalcost = task.price * task.images
            if self.balance is not None:
                self.balance -= task.totalcost
            self._end_truth(task, "completed", None)
        else:
            task.pexit = "1"
            self._end_truth(task, "failed", task.plan.error)

    def _output(self, task: _Task, index: int, now: int) -> dict[str, Any]:
        png = tiny_png(f"{task.uuid}/{index}")
        return {
            "id": uuid.UUID(int=self._rng.getrandbits(128)).hex,
            "name": f"{index}.png",
            "contenttype": "image/png",
            "parentid": task.uuid.replace("-", ""),
            "uuid": task.uuid,
            "size": str(len(png)),
            "addedtime": str(now),
            "modifiedtime": str(now),
            "accesskey": "".join(self._tokens.choices(string.ascii_letters, k=30)),
            "foldercount": "0",
            "filecount": "0",
            "ispublic": 0,
            "expiretime": None,
            "url": f"{self._http.url}/cdn/{task.uuid}/{index}.png",
        }

    def _end_truth(self, task: _Task, state: str, error: str | None) -> None:
        self.truth[task.id] = Truth(
            job=task.id,
            state=state,
            outputs=[o["url"] for o in task.outputs],
            cost=task.totalcost if state == "completed" else None,
            error=error,
        )

    def _schedule(self, task: _Task) -> None:
        plan = task.plan
        gap = max(0.02, min(0.3, plan.run_s / 25))
        at = self._clock_now + plan.queue_s
        out = task.steps

        def step(kind: str, message: Any = None, *, status: bool = False, pause: float = gap) -> None:
            nonlocal at
            out.append(_Step(at, kind, message, kind if status else None))
            at += pause

        for kind in ("task_accept", "task_preprocess_start"):
            step(kind, status=True)
        if plan.outcome == "failed" and plan.error == PRE_EXECUTION_FAILURE:
            url = task.params.get("inputImage") or "https://example.com/input.png"
            line = f"Error: could not fetch input image {url}: HTTP 404"
            out.append(_Step(at, "task_error", line, "task_error"))
            return
        for kind in ("task_preprocess_end", "task_assign", "task_start"):
            step(kind, status=True)
        step("task_output", f"Loading {task.model} weights…")
        stride = max(1, -(-plan.steps // MAX_PROGRESS_FRAMES))
        marks = list(range(stride, plan.steps + 1, stride))
        if marks[-1] != plan.steps:
            marks.append(plan.steps)
        last = marks[-1] if plan.outcome != "failed" else marks[len(marks) // 2]
        if plan.outcome == "hang":
            last = marks[len(marks) // 3]
        per_step = plan.run_s / plan.steps
        for mark in marks:
            if mark > last:
                break
            step("task_output", self._progress(mark, plan.steps, per_step), pause=per_step * stride)
        if plan.outcome == "hang":
            return
        logs = f"Loading {task.model} weights…\nGenerating {task.images} image(s), {plan.steps} steps"
        if plan.outcome == "failed":
            step("task_error", f"Traceback (most recent call last):\n  ...\nRuntimeError: {plan.error}")
            step("task_output_full", {"raw": logs})
            step("task_error_full", {"raw": f"RuntimeError: {plan.error}"})
        else:
            step("task_output_full", {"raw": logs + "\nDone."})
        for kind in ("task_end", "task_postprocess_start", "task_postprocess_end"):
            step(kind, status=True)

    @staticmethod
    def _progress(step: int, total: int, per_step: float) -> dict[str, str]:
        def clock(seconds: float) -> str:
            return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"

        return {
            "type": "progressGenerate",
            "task": "Generating",
            "percentage": str(round(step * 100 / total)),
            "stepCurrent": str(step),
            "stepTotal": str(total),
            "speed": f"{1 / max(per_step, 1e-3):.2f}",
            "speedType": "it/s",
            "elapsedTime": clock(step * per_step),
            "remainingTime": clock((total - step) * per_step),
        }

    # -- the socket ----------------------------------------------------------------------------
    def _push(self, task: _Task, kind: str, message: Any) -> None:
        if kind in self.lost_frames:
            return
        text = json.dumps({"type": kind, "id": task.id, "tasktoken": task.token, "message": message, "result": True})
        for conn in list(self._conns):
            if task.token in conn.tokens:
                try:
                    conn.send.send_nowait(text)
                except anyio.WouldBlock:
                    conn.abort()  # a reader this slow is cut off, as a real server would
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass

    async def _ws(self, ws: ServerConnection) -> None:
        if ws.request is None or ws.request.path.rstrip("/") != "/v1":
            await ws.close(1008, "unknown path")
            return
        send, receive = anyio.create_memory_object_stream[str](CONN_BUFFER)
        conn = _Conn(ws, send)
        self._conns.add(conn)
        try:
            await ws.send(json.dumps({"type": "connected", "version": "1.0"}))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, conn, receive)
                tg.start_soon(self._pinger, conn)
                try:
                    async for message in ws:
                        await self._from_client(conn, message)
                except ConnectionClosed:
                    pass
                tg.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(conn)
            send.close()
            receive.close()

    async def _from_client(self, conn: _Conn, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return  # like the real server: unreadable frames are ignored
        if not isinstance(frame, dict) or frame.get("type") != "task_info":
            return  # unknown types are dropped silently (documented for the same server)
        token = frame.get("tasktoken")
        if not isinstance(token, str) or not token:
            await conn.send.send(json.dumps({"type": "error", "message": "tasktoken-required", "result": False}))
            return
        conn.tokens.add(token)  # unknown tokens are accepted and simply never get a frame
        self.registrations += 1

    async def _writer(self, conn: _Conn, receive: MemoryObjectReceiveStream[str]) -> None:
        try:
            async for text in receive:
                if self.faults.stall:
                    continue  # a wedged connection: the frame is lost, as the socket replays nothing
                await conn.ws.send(text)
                conn.sent += 1
                drop = self.faults.drop_after
                if drop is not None and conn.sent >= drop:
                    self.faults.drops += 1
                    conn.abort()
                    return
        except ConnectionClosed:
            return

    async def _pinger(self, conn: _Conn) -> None:
        try:
            while True:
                await anyio.sleep(self.ping_interval)
                if self.faults.stall:
                    continue
                pong = await conn.ws.ping()
                with anyio.move_on_after(PONG_TIMEOUT) as scope:
                    await pong
                if scope.cancelled_caught:
                    conn.abort()  # a client that does not pong within a few seconds is dropped
                    return
        except ConnectionClosed:
            return

    # -- REST ----------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        if self.faults.delay:
            await anyio.sleep(self.faults.delay)
        if request.method == "GET":
            return self._download(request.path)
        if request.method != "POST" or not request.path.startswith("/v1/"):
            return envelope_error(1, "Endpoint not found.", 404)
        fault = self.faults.take_error()
        if fault is not None:
            if fault == 429:
                retry = [("retry-after", f"{self.faults.retry_after:g}")]
                return envelope_error(0, "Too many requests.", 429, retry)
            return envelope_error(0, "Internal server error.", fault)
        refused = self._check_auth(request.headers)
        if refused is not None:
            return refused
        self.calls.append((request.path, request.headers.get("content-type", "")))
        route = request.path.removeprefix("/v1")
        if route.startswith("/Run/"):
            return self._run(request, route.removeprefix("/Run/"))
        try:
            body = request.json()
        except ValueError:
            return envelope_error(0, "Request body is not valid JSON.")
        if not isinstance(body, dict):
            return envelope_error(0, "Request parameter [taskid] required")
        if route == "/Task/Detail":
            task = self._find(body)
            if task is None:
                return envelope_error(1, "There is no task yet.")
            return Response.json({"total": "1", "errors": [], "tasklist": [task.record()], "result": True})
        if route == "/Task/Cancel":
            return self._cancel(body, kill=False)
        if route == "/Task/Kill":
            return self._cancel(body, kill=True)
        return envelope_error(1, "Endpoint not found.", 404)

    def _check_auth(self, headers: dict[str, str]) -> Response | None:
        key = headers.get("x-api-key", "")
        if not key:
            return envelope_error(0, AUTH_MISSING, 401)
        if self.faults.reject_auth or not hmac.compare_digest(key, self.key):
            return envelope_error(0, AUTH_INVALID, 401)
        if not self.signed:
            return None
        nonce, signature = headers.get("x-nonce", ""), headers.get("x-signature", "")
        if not nonce or not signature:
            return envelope_error(0, AUTH_SIGNATURE, 401)
        if not hmac.compare_digest(signature.lower(), sign(self.key, self.secret, nonce)):
            return envelope_error(0, AUTH_INVALID, 401)
        return None

    def _run(self, request: Request, slug: str) -> Response:
        model = slug.strip("/")
        if model.count("/") != 1 or model not in MODELS:
            return envelope_error(1, "slug-owner-project-not-exist")
        ctype = request.headers.get("content-type", "")
        taskid = str(self._next_id)
        if ctype.startswith("multipart/form-data"):
            parsed = self._multipart(ctype, request.body, taskid)
            if parsed is None:
                return envelope_error(0, "Request body could not be read as multipart/form-data.")
            params = parsed
        else:
            try:
                params = request.json()
            except ValueError:
                return envelope_error(0, "Request body is not valid JSON.")
            if not isinstance(params, dict):
                return envelope_error(0, "Request parameter [prompt] required")
        prompt = params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return envelope_error(0, "Request parameter [prompt] required")
        if self.balance is not None and self.balance <= 0:
            return envelope_error(97, "Insufficient balance. Please add funds to your account.")
        active = sum(1 for t in self.tasks.values() if t.active)
        if self.concurrency_limit is not None and active >= self.concurrency_limit:
            limit = self.concurrency_limit
            return envelope_error(96, f"Concurrent task limit reached ({limit} for your balance).")
        self._next_id += 1
        images = _count(params.get("maxImages") or params.get("num"))
        task = _Task(
            id=taskid,
            token="".join(self._tokens.choices(string.ascii_letters + string.digits, k=30)),
            uuid=str(uuid.UUID(int=self._rng.getrandbits(128))),
            model=model,
            params=params,
            plan=self._plan(prompt),
            images=images,
            price=MODELS[model],
            times={"createtime": int(time.time())},
        )
        self.tasks[taskid] = task
        self.truth[taskid] = Truth(job=taskid, state="")
        self._schedule(task)
        self._push(task, "task_queue", None)  # nobody can be registered yet: the client never sees it
        return Response.json({"errors": [], "taskid": taskid, "socketaccesstoken": task.token, "result": True})

    def _plan(self, prompt: str) -> JobPlan:
        plan = plan_for(prompt, self._rng, speed=self.speed, fail_rate=self.fail_rate)
        if "[badinput]" in prompt:  # this emulator's own tag: the input cannot be fetched
            plan = dataclasses.replace(plan, outcome="failed", error=PRE_EXECUTION_FAILURE)
        return plan

    def _multipart(self, ctype: str, body: bytes, taskid: str) -> dict[str, Any] | None:
        """Form fields, with each file part stored and replaced by its URL (as Wiro's File API does)."""
        head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not message.is_multipart():
            return None
        params: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str):
                continue
            payload = part.get_payload(decode=True)
            content = payload if isinstance(payload, bytes) else b""
            filename = part.get_filename()
            if filename is not None:
                fid = "".join(self._tokens.choices(string.ascii_letters + string.digits, k=30))
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename) or "upload"
                self._files[fid] = (safe, content)
                self.uploads.append((taskid, name, filename, content))
                value: str = f"{self._http.url}/v1/File/{fid}/{safe}"
            else:
                value = content.decode("utf-8", "replace")
            if name in params:
                previous = params[name]
                params[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
            else:
                params[name] = value
        return params

    def _find(self, body: dict[str, Any]) -> _Task | None:
        taskid = body.get("taskid")
        if taskid is not None:
            return self.tasks.get(str(taskid))
        token = body.get("tasktoken") or body.get("socketaccesstoken")
        if isinstance(token, str):
            return next((t for t in self.tasks.values() if t.token == token), None)
        return None

    def _cancel(self, body: dict[str, Any], *, kill: bool) -> Response:
        task = self._find(body)
        if task is None:
            return envelope_error(1, "There is no task yet.")
        if not kill and task.status != "task_queue":
            return envelope_error(1, "Task is not in a cancellable state.")
        if kill and not task.active:
            return envelope_error(1, "Task could not be killed: task has already ended.")
        if kill and task.status == "task_queue":
            return envelope_error(1, "Task could not be killed: task is still queued, use Task/Cancel.")
        task.steps.clear()
        task.status = "task_cancel"
        task.times["canceltime"] = int(time.time())
        self._end_truth(task, "cancelled", None)
        self._push(task, "task_cancel", None)
        return Response.json({"errors": [], "tasklist": [task.record()], "result": True})

    def _download(self, path: str) -> Response:
        match = re.fullmatch(r"/cdn/([0-9a-f-]+)/(\d+)\.png", path)
        if match and any(t.uuid == match[1] and t.outputs for t in self.tasks.values()):
            return Response(200, tiny_png(f"{match[1]}/{match[2]}"), [("content-type", "image/png")])
        match = re.fullmatch(r"/v1/File/(\w+)/[^/]+", path)
        if match and match[1] in self._files:
            return Response(200, self._files[match[1]][1], [("content-type", "application/octet-stream")])
        return Response(404, b"not found", [("content-type", "text/plain")])


def _count(value: Any) -> int:
    try:
        return min(max(int(str(value)), 1), 4)
    except ValueError:
        return 1
