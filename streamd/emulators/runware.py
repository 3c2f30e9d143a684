"""A Runware emulator on loopback: the WebSocket API with sessions, and the REST endpoint.

It behaves as providers.md documents Runware:
- WebSocket (`ws://…/v1`): the first message must be `[{"taskType": "authentication", "apiKey": …}]`;
  the reply carries a `connectionSessionUUID`. Results of tasks sent on a session are pushed to
  it; while the session has no connection they wait in its buffer, which lives `resume_window`
  seconds (Runware: 120) and is delivered when a client re-authenticates with that UUID. After
  that the session is gone and a re-authentication gets a new UUID. A connection with no message
  either way for `idle_timeout` seconds (Runware: 120) is closed. `ping` tasks get `pong`s.
- REST (`POST http://…/v1`): a JSON array of tasks, authorised by `Authorization: Bearer` or an
  `authentication` task first in the array.
- Envelopes `{"data": [...]}` / `{"errors": [...]}` matched by `taskUUID`; with `legacy_errors`
  set, errors use the old `{"error": true, "errorId": …, "errorMessage": …}` shape instead.
- `imageInference` with `deliveryMethod: "async"` is acknowledged at once; each of its
  `numberResults` items is pushed as it is done (cost per image with `includeCost`).
  `getResponse` answers one entry per generation (`processing`/`success`), a failed task as an
  `errors` entry, an unknown one as `taskNotFound`. Runware has no cancel task, and neither has this.

Emulator-only choices (Runware does not document them): failure codes, `taskNotFound`,
`duplicateTaskUUID`, REST status 400 for answers made only of errors. Job time runs on a clock
task, so `Faults.paused` freezes jobs; `force()` steps a job exactly for tests.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse

from streamd.config import ProviderSettings, Secret
from streamd.emulators.base import FAILURES, Faults, JobPlan, Truth, plan_for, ticks
from streamd.emulators.http import Drop, HttpServer, Request, Response
from streamd.emulators.oxen import tiny_png

TICK = 0.02
OUTBOX_LIMIT = 10_000  # frames a session may hold; older ones fall off, as a bounded buffer would
IMAGE_PREFIX = "/image/"
MAX_PROMPT = 2000
MAX_RESULTS = 20
MAX_REFERENCES = 14
SYNC_LIMIT = 300.0  # seconds a synchronous REST request waits before timeoutProvider
COSTS = {"bytedance:5@0": 0.03, "bytedance:seedream@4.5": 0.04}
DEFAULT_COST = 0.0038
ERROR_CODES = dict(
    zip(
        FAILURES, ("providerInternalError", "contentModerated", "invalidReferenceImage", "timeoutProvider"), strict=True
    )
)
LEGACY_IDS = {"invalidApiKey": 19, "taskNotFound": 12}
INVALID_KEY = "Invalid API key. Get one at https://my.runware.ai/signup"

log = logging.getLogger("streamd.emulators.runware")


@dataclass
class Generation:
    index: int
    due: float  # seconds after submission (emulator clock) when it is done
    status: str = "processing"
    image: str = ""
    url: str = ""
    cost: float = 0.0
    seed: int = 0


@dataclass
class Task:
    id: str
    model: str
    prompt: str
    plan: JobPlan
    session: str | None  # the socket session its results are pushed to; None for REST
    include_cost: bool
    gens: list[Generation]
    seed: int
    elapsed: float = 0.0
    status: str = "processing"  # processing | success | error
    code: str = ""
    error: str = ""
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Session:
    id: str
    outbox: deque[str] = field(default_factory=lambda: deque(maxlen=OUTBOX_LIMIT))
    conn: _Conn | None = None
    detached_at: float | None = None
    wake: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    sent: int = 0
    last: float = field(default_factory=time.monotonic)
    session: _Session | None = None
    closed: bool = False


class RunwareEmulator:
    name = "runware"

    def __init__(
        self,
        *,
        seed: int = 0,
        speed: float = 1.0,
        fail_rate: float = 0.12,
        host: str = "127.0.0.1",
        key: str = "runware-demo-key",
        idle_timeout: float = 120.0,
        resume_window: float = 120.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.speed = speed
        self.fail_rate = fail_rate
        self.host = host
        self.key = key
        self.idle_timeout = idle_timeout
        self.resume_window = resume_window
        self.faults = Faults()
        self.truth: dict[str, Truth] = {}
        self.tasks: dict[str, Task] = {}
        self.legacy_errors = False  # answer errors in the old single-error shape
        self.http = HttpServer(self._handle, host=host)
        self.ws_port = 0
        # counters, for tests
        self.ws_connections = 0
        self.resumed = 0  # re-authentications that got their session (and its buffer) back
        self.unknown_resumes = 0  # re-authentications naming a session that had expired
        self.expired = 0  # sessions dropped with their buffer after resume_window
        self.idle_closes = 0
        self.auth_failures = 0
        self.get_responses = 0  # getResponse tasks answered, both channels
        self._sessions: dict[str, _Session] = {}
        self._conns: set[_Conn] = set()
        self._active: dict[str, Task] = {}
        self._images: set[str] = set()

    # -- Emulator protocol -----------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.http.serve)
            server: Server = await serve(
                self._ws_handler,
                self.host,
                0,
                process_request=self._process_request,
                ping_interval=None,  # Runware's idle timer counts messages, not protocol pings
                max_size=16 * 1024 * 1024,
                logger=logging.getLogger("streamd.emulators.runware.ws"),
            )
            try:
                self.ws_port = next(iter(server.sockets)).getsockname()[1]
                tg.start_soon(self._clock)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                    server.close()
                    await server.wait_closed()

    def settings(self) -> ProviderSettings:
        return ProviderSettings(
            name="runware",
            key=Secret(self.key),
            base_url=f"{self.http.url}/v1",
            ws_url=f"ws://{self.host}:{self.ws_port}/v1",
            options={"resume_window": self.resume_window, "ping_interval": min(30.0, self.idle_timeout / 4)},
        )

    async def restart(self) -> None:
        for conn in list(self._conns):
            self._abort(conn)
        await self.http.close_all()

    # -- for tests -------------------------------------------------------------------------------
    def force(self, task_id: str, *, items: int | None = None, fail: bool = False) -> None:
        """Finish the next `items` generations (all if None), or fail the task, right now."""
        task = self.tasks[task_id]
        if task.status != "processing":
            return
        if fail:
            message = task.plan.error or FAILURES[0]
            self._fail(task, ERROR_CODES.get(message, "providerInternalError"), message)
            return
        pending = [g for g in task.gens if g.status == "processing"]
        for gen in pending[: len(pending) if items is None else items]:
            self._produce(task, gen)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    # -- time ------------------------------------------------------------------------------------
    async def _clock(self) -> None:
        async for dt in ticks(TICK, self.faults):
            for task in list(self._active.values()) if dt else ():
                self._advance(task, dt)
            self._expire(time.monotonic())

    def _advance(self, task: Task, dt: float) -> None:
        task.elapsed += dt
        for gen in task.gens:
            if gen.status == "processing" and task.elapsed >= gen.due:
                self._produce(task, gen)
        plan = task.plan
        if task.status == "processing" and plan.outcome == "failed" and task.elapsed >= plan.queue_s + plan.run_s:
            self._fail(task, ERROR_CODES.get(plan.error, "providerInternalError"), plan.error)

    def _expire(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if (
                session.conn is None
                and session.detached_at is not None
                and now - session.detached_at > self.resume_window
            ):
                del self._sessions[session.id]
                self.expired += 1

    def _produce(self, task: Task, gen: Generation) -> None:
        gen.status = "success"
        gen.image = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        gen.url = f"{self.http.url}{IMAGE_PREFIX}{gen.image}.png"
        gen.cost = COSTS.get(task.model, DEFAULT_COST)
        gen.seed = task.seed + gen.index
        self._images.add(gen.image)
        item = {"taskType": "imageInference", "taskUUID": task.id, **self._result(task, gen)}
        self._deliver(task.session, {"data": [item]})
        if all(g.status == "success" for g in task.gens):
            task.status = "success"
            self._settle(task)

    def _fail(self, task: Task, code: str, message: str) -> None:
        task.status, task.code, task.error = "error", code, message
        for gen in task.gens:
            if gen.status == "processing":
                gen.status = "error"
        self._settle(task)
        for frame in self._frames([], [self._error(code, message, "imageInference", task.id)]):
            self._deliver(task.session, frame)

    def _settle(self, task: Task) -> None:
        self._active.pop(task.id, None)
        done = [g for g in task.gens if g.status == "success"]
        self.truth[task.id] = Truth(
            job=task.id,
            state="completed" if task.status == "success" else "failed",
            outputs=[g.url for g in done],
            cost=round(sum(g.cost for g in done), 10) if done else None,
            error=task.error or None,
        )
        task.done.set()

    @staticmethod
    def _result(task: Task, gen: Generation) -> dict[str, Any]:
        out: dict[str, Any] = {"imageUUID": gen.image, "imageURL": gen.url, "seed": gen.seed, "NSFWContent": False}
        if task.include_cost:
            out["cost"] = gen.cost
        return out

    # -- tasks (both channels) -------------------------------------------------------------------
    def _process(self, obj: Any, session: str | None, data: list[Any], errors: list[Any]) -> Task | None:
        """One task object. Returns a synchronous inference task the caller must wait for."""
        if not isinstance(obj, dict):
            errors.append(self._error("invalidTask", "Each task must be a JSON object"))
            return None
        kind = obj.get("taskType")
        task_id = obj.get("taskUUID") if isinstance(obj.get("taskUUID"), str) else None
        if kind == "ping":
            data.append({"taskType": "ping", "pong": True})
        elif kind == "authentication":
            if session is not None:
                data.append({"taskType": "authentication", "connectionSessionUUID": session})
        elif kind == "getResponse":
            self._get_response(task_id, data, errors)
        elif kind == "imageInference":
            return self._inference(obj, session, data, errors)
        else:
            errors.append(self._error("unsupportedTaskType", f"Unsupported taskType {kind!r}", kind, task_id))
        return None

    def _inference(self, obj: dict[str, Any], session: str | None, data: list[Any], errors: list[Any]) -> Task | None:
        task_id = obj.get("taskUUID")
        problem = self._validate(obj)
        if problem is not None:
            code, message = problem
            errors.append(self._error(code, message, "imageInference", task_id if isinstance(task_id, str) else None))
            return None
        assert isinstance(task_id, str)
        prompt, model, n = obj["positivePrompt"], obj["model"], int(obj.get("numberResults", 1))
        plan = plan_for(prompt, self.rng, speed=self.speed, fail_rate=self.fail_rate)
        if plan.outcome == "hang":
            dues = [float("inf")] * n
        else:
            dues = [plan.queue_s + plan.run_s * (i + 1) / n for i in range(n)]
            if plan.outcome == "failed":  # the last generation is the one that fails
                dues[-1] = float("inf")
        seed = obj.get("seed")
        task = Task(
            id=task_id,
            model=model,
            prompt=prompt,
            plan=plan,
            session=session,
            include_cost=bool(obj.get("includeCost")),
            gens=[Generation(i, due) for i, due in enumerate(dues)],
            seed=seed if isinstance(seed, int) else self.rng.randrange(2**32),
        )
        self.tasks[task.id] = task
        self._active[task.id] = task
        self.truth[task.id] = Truth(job=task.id, state="")
        if obj.get("deliveryMethod") == "async":
            data.append({"taskType": "imageInference", "taskUUID": task.id})
            return None
        return task

    def _validate(self, obj: dict[str, Any]) -> tuple[str, str] | None:
        task_id = obj.get("taskUUID")
        try:
            uuid.UUID(str(task_id))
        except ValueError:
            return "invalidTaskUUID", "taskUUID must be a UUID v4"
        if task_id in self.tasks:
            return "duplicateTaskUUID", "A task with this taskUUID already exists"
        if not isinstance(obj.get("model"), str) or not obj["model"]:
            return "invalidModel", "model is required"
        prompt = obj.get("positivePrompt")
        if not isinstance(prompt, str) or not 1 <= len(prompt.strip()) <= MAX_PROMPT:
            return "invalidPositivePrompt", f"positivePrompt must be 1 to {MAX_PROMPT} characters"
        n = obj.get("numberResults", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_RESULTS:
            return "invalidNumberResults", f"numberResults must be an integer from 1 to {MAX_RESULTS}"
        if ("width" in obj) != ("height" in obj):
            return "invalidDimensions", "width and height must be given together"
        for side in ("width", "height"):
            value = obj.get(side, 1024)
            if not isinstance(value, int) or not 128 <= value <= 8192:
                return "invalidDimensions", f"{side} must be an integer from 128 to 8192"
        if obj.get("deliveryMethod", "sync") not in ("sync", "async"):
            return "invalidDeliveryMethod", "deliveryMethod must be sync or async"
        inputs = obj.get("inputs")
        refs = inputs.get("referenceImages") if isinstance(inputs, dict) else obj.get("referenceImages")
        if refs is not None and (not isinstance(refs, list) or not 1 <= len(refs) <= MAX_REFERENCES):
            return "invalidReferenceImages", f"referenceImages must list 1 to {MAX_REFERENCES} images"
        return None

    def _get_response(self, task_id: str | None, data: list[Any], errors: list[Any]) -> None:
        self.get_responses += 1
        task = self.tasks.get(task_id or "")
        if task is None:
            errors.append(self._error("taskNotFound", "No task found with this taskUUID", "getResponse", task_id))
        elif task.status == "error":  # generations done before the failure stay there, as partial results do
            for gen in task.gens:
                if gen.status == "success":
                    data.append(
                        {
                            "taskType": "getResponse",
                            "taskUUID": task.id,
                            "status": gen.status,
                            **self._result(task, gen),
                        }
                    )
            errors.append(self._error(task.code, task.error, "getResponse", task.id))
        else:
            for gen in task.gens:
                entry: dict[str, Any] = {"taskType": "getResponse", "taskUUID": task.id, "status": gen.status}
                if gen.status == "success":
                    entry.update(self._result(task, gen))
                data.append(entry)

    @staticmethod
    def _error(code: str, message: str, task_type: Any = None, task_id: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"code": code, "message": message}
        if task_type is not None:
            entry["taskType"] = task_type
        if task_id is not None:
            entry["taskUUID"] = task_id
        return entry

    def _frames(self, data: list[Any], errors: list[Any]) -> list[dict[str, Any]]:
        """The envelopes for one answer: one combined frame, or the legacy one-error-per-frame shape."""
        if not self.legacy_errors or not errors:
            frame: dict[str, Any] = {}
            if data:
                frame["data"] = data
            if errors:
                frame["errors"] = errors
            return [frame] if frame else []
        return ([{"data": data}] if data else []) + [self._legacy(e) for e in errors]

    @staticmethod
    def _legacy(error: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "error": True,
            "errorId": LEGACY_IDS.get(error["code"], 0),
            "errorMessage": "Invalid api key" if error["code"] == "invalidApiKey" else error["message"],
        }
        if "taskUUID" in error:
            out["taskUUID"] = error["taskUUID"]
        return out

    # -- WebSocket -------------------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        if request.path.rstrip("/") != "/v1":
            return connection.respond(404, "Not Found\n")
        return None

    async def _ws_handler(self, ws: ServerConnection) -> None:
        conn = _Conn(ws)
        self.ws_connections += 1
        self._conns.add(conn)
        try:
            if self._should_drop(conn):
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._idle_watch, conn)
                await self._ws_serve(conn, tg)
                tg.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._conns.discard(conn)
            self._detach(conn)

    async def _ws_serve(self, conn: _Conn, tg: TaskGroup) -> None:
        try:
            await self._ws_conversation(conn, tg)
        except ConnectionClosed:
            return

    async def _ws_conversation(self, conn: _Conn, tg: TaskGroup) -> None:
        first = await conn.ws.recv()
        conn.last = time.monotonic()
        tasks = self._decode(first)
        session = await self._ws_auth(conn, tasks)
        if session is None:
            return
        tg.start_soon(self._sender, conn, session)
        if isinstance(tasks, list) and len(tasks) > 1:
            self._ws_tasks(session, tasks[1:])
        async for message in conn.ws:
            conn.last = time.monotonic()
            tasks = self._decode(message)
            if tasks is None:
                self._push(session, {"errors": [self._error("invalidJSON", "The message is not valid JSON")]})
                continue
            self._ws_tasks(session, tasks if isinstance(tasks, list) else [tasks])

    def _ws_tasks(self, session: _Session, tasks: list[Any]) -> None:
        data: list[Any] = []
        errors: list[Any] = []
        for obj in tasks:
            self._process(obj, session.id, data, errors)
        for frame in self._frames(data, errors):
            self._push(session, frame)

    async def _ws_auth(self, conn: _Conn, tasks: Any) -> _Session | None:
        first = tasks[0] if isinstance(tasks, list) and tasks else tasks
        if not isinstance(first, dict) or first.get("taskType") != "authentication":
            error = self._error(
                "missingApiKey", "The first message must be an authentication task", "authentication", None
            )
            await self._refuse(conn, error)
            return None
        if self.faults.reject_auth or first.get("apiKey") != self.key:
            self.auth_failures += 1
            await self._refuse(conn, self._error("invalidApiKey", INVALID_KEY, "authentication", None))
            return None
        wanted = first.get("connectionSessionUUID")
        session = self._sessions.get(wanted) if isinstance(wanted, str) else None
        if session is not None:
            self.resumed += 1
            if session.conn is not None and session.conn is not conn:
                self._abort(session.conn)  # the same session from a new connection wins
        else:
            if isinstance(wanted, str):
                self.unknown_resumes += 1
            session = _Session(str(uuid.uuid4()))
            self._sessions[session.id] = session
        reply = {"data": [{"taskType": "authentication", "connectionSessionUUID": session.id}]}
        if not await self._send(conn, json.dumps(reply)):
            if session.conn is None and session.detached_at is None:
                session.detached_at = time.monotonic()
            return None
        session.conn, session.detached_at, conn.session = conn, None, session
        session.wake.set()
        return session

    async def _refuse(self, conn: _Conn, error: dict[str, Any]) -> None:
        frame = self._frames([], [error])[0]
        if await self._send(conn, json.dumps(frame)):
            with anyio.move_on_after(2):
                await conn.ws.close(1008, "authentication failed")

    async def _sender(self, conn: _Conn, session: _Session) -> None:
        """Drains the session's buffer in order; a frame leaves it only once it was sent."""
        while session.conn is conn and not conn.closed:
            if not session.outbox:
                session.wake = anyio.Event()
                await session.wake.wait()
                continue
            frame = session.outbox[0]
            if not await self._send(conn, frame):
                return
            if session.outbox and session.outbox[0] is frame:
                session.outbox.popleft()

    async def _send(self, conn: _Conn, text: str) -> bool:
        while self.faults.stall and not conn.closed:  # noqa: ASYNC110  (a knob, not an event)
            await anyio.sleep(TICK)
        if conn.closed or self._should_drop(conn):
            return False
        try:
            await conn.ws.send(text)
        except ConnectionClosed:
            conn.closed = True
            return False
        conn.sent += 1
        conn.last = time.monotonic()
        return True

    def _should_drop(self, conn: _Conn) -> bool:
        limit = self.faults.drop_after
        if limit is None or conn.sent < limit:
            return False
        self.faults.drops += 1
        self._abort(conn)
        return True

    def _abort(self, conn: _Conn) -> None:
        """Cut the TCP connection without a close frame, as a network failure would."""
        conn.closed = True
        self._detach(conn)
        conn.ws.transport.abort()

    def _detach(self, conn: _Conn) -> None:
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            session.detached_at = time.monotonic()
            session.wake.set()

    async def _idle_watch(self, conn: _Conn) -> None:
        while not conn.closed:
            await anyio.sleep(min(self.idle_timeout / 4, 1.0))
            if time.monotonic() - conn.last >= self.idle_timeout:
                self.idle_closes += 1
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await conn.ws.close(1000, "idle timeout")
                return

    def _push(self, session: _Session, frame: dict[str, Any]) -> None:
        session.outbox.append(json.dumps(frame))
        session.wake.set()

    def _deliver(self, session_id: str | None, frame: dict[str, Any]) -> None:
        """A result for a socket session: sent, or buffered; lost only if the session expired."""
        session = self._sessions.get(session_id) if session_id is not None else None
        if session is not None:
            self._push(session, frame)

    @staticmethod
    def _decode(message: str | bytes) -> Any:
        try:
            return json.loads(message)
        except ValueError:
            return None

    # -- REST ------------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Drop:
            raise
        except Exception as exc:  # an emulator bug answers 500 rather than ending the server
            log.exception("runware emulator error")
            return Response.json({"errors": [self._error("internalError", f"emulator error: {exc!r}")]}, 500)

    async def _route(self, request: Request) -> Response:
        path = request.path
        if request.method == "GET" and path.startswith(IMAGE_PREFIX):  # image CDN: no auth, no faults
            image = path[len(IMAGE_PREFIX) :].removesuffix(".png")
            if image not in self._images:
                return Response(404, b"not found", [("content-type", "text/plain")])
            return Response(200, tiny_png(image), [("content-type", "image/png")])
        if path.rstrip("/") != "/v1":
            return Response.json({"errors": [self._error("notFound", f"No route for {path}")]}, 404)
        if request.method != "POST":
            return Response.json({"errors": [self._error("methodNotAllowed", "Use POST")]}, 405)
        if self.faults.delay > 0:
            await anyio.sleep(self.faults.delay)
        if (status := self.faults.take_error()) is not None:
            return self._fault(status)
        try:
            body = request.json()
        except ValueError:
            return self._rest_reply([], [self._error("invalidJSON", "The body is not valid JSON")])
        if not isinstance(body, list) or not body:
            return self._rest_reply([], [self._error("invalidBody", "The body must be a JSON array of tasks")])
        authed = request.headers.get("authorization") == f"Bearer {self.key}"
        if isinstance(body[0], dict) and body[0].get("taskType") == "authentication":
            authed = authed or body[0].get("apiKey") == self.key
            body = body[1:]
        if self.faults.reject_auth or not authed:
            self.auth_failures += 1
            return self._rest_reply([], [self._error("invalidApiKey", INVALID_KEY, "authentication", None)], status=401)
        data: list[Any] = []
        errors: list[Any] = []
        waiting = [t for obj in body if (t := self._process(obj, None, data, errors)) is not None]
        for task in waiting:  # deliveryMethod sync: answer when the task is done
            with anyio.move_on_after(SYNC_LIMIT):
                await task.done.wait()
            if task.status == "success":
                data.extend(
                    {"taskType": "imageInference", "taskUUID": task.id, **self._result(task, g)} for g in task.gens
                )
            elif task.status == "error":
                errors.append(self._error(task.code, task.error, "imageInference", task.id))
            else:
                errors.append(
                    self._error("timeoutProvider", "The task did not finish in time", "imageInference", task.id)
                )
        return self._rest_reply(data, errors)

    def _rest_reply(self, data: list[Any], errors: list[Any], *, status: int | None = None) -> Response:
        if status is None:
            status = 200 if data or not errors else 400
        frames = self._frames(data, errors)
        if len(frames) > 1:  # legacy shape over REST: the data, or else the first error
            frames = frames[:1]
        return Response.json(frames[0] if frames else {"data": []}, status)

    def _fault(self, status: int) -> Response:
        if status == 429:
            headers = [("retry-after", f"{self.faults.retry_after:g}")]
            error = self._error("rateLimitExceeded", "Too many requests")
            return Response.json({"errors": [error]}, 429, headers)
        if status == 401:
            return Response.json({"errors": [self._error("invalidApiKey", INVALID_KEY, "authentication", None)]}, 401)
        code = "serverError" if status >= 500 else "badRequest"
        return Response.json({"errors": [self._error(code, f"emulated HTTP {status}")]}, status)
