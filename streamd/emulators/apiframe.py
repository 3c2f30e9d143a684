"""An Apiframe (v2) emulator on loopback: submit, get a job, list jobs, and a CDN for the outputs.

It behaves as providers.md documents Apiframe: `X-API-Key` auth (401 `API key is required` /
`Invalid API key`, 403 `API key is inactive`), `POST /v2/images/generate` answering 202
`{"jobId","status":"QUEUED"}`, 400 with `details` keyed by JSON path, 402 when credits run out,
`Idempotency-Key` replays within 24 h (409 for a reused key with another body), jobs going
QUEUED → PROCESSING (rising `progress`) → COMPLETED (`result.images`, `creditCost`) or FAILED
(credits refunded: `creditCost: 0`), `GET /v2/jobs` newest first with a keyset cursor, and outputs
that expire (`expired: true`, URLs then 404) `expire_after` seconds after completion.
There is no cancel endpoint, as at Apiframe.

Fault knobs (`Faults`): `delay`, `error_status`/`error_count` (429 with `Retry-After`), `reject_auth`
and `paused` (job time, and so expiry, stops) apply as everywhere. Apiframe has no push connection,
so `stall` has nothing to stall and `drop_after` means: drop the connection *instead of answering*
the next N API requests, after doing their work (a submit still creates its job), then reset to
None. That is the lost-answer case idempotency keys exist for. Other knobs: `credits` (402 below a
job's price), `inactive` (403), `legacy_result` (`result` as a bare URL string), `inject()` (a job
submitted elsewhere), `expire()` and `force()`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from anyio.abc import TaskStatus

from streamd.config import ProviderSettings, Secret
from streamd.emulators.base import Faults, JobPlan, Truth, plan_for, ticks
from streamd.emulators.http import Drop, HttpServer, Request, Response

TICK = 0.02  # seconds between clock steps
CDN_PREFIX = "/cdn/"
IDEMPOTENCY_TTL = 24 * 3600.0
MAX_KEY = 255
MAX_PROMPT = 2000
STATUSES = ("QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED")
JOB_ID = re.compile(r"^[0-9a-fA-F-]{8,64}$")


@dataclass(frozen=True)
class Model:
    params: str  # the `<model>Params` block this model takes
    cost: float  # credits per job
    images: int = 1
    grid: bool = False


MODELS: dict[str, Model] = {
    "seedream-4": Model("seedreamParams", 3.0),
    "seedream-4.5": Model("seedreamParams", 4.0),
    "midjourney": Model("midjourneyParams", 16.0, images=4, grid=True),
    "flux-2-pro": Model("fluxParams", 5.0),
    "nano-banana": Model("nanoBananaParams", 4.0),
}
SEEDREAM_PARAMS = frozenset({"image_input", "output_format", "guidance_scale", "use_pre_llm", "enhance_prompt", "seed"})
WEBHOOK_EVENTS = frozenset({"progress", "completed", "failed"})


def tiny_png(seed: str, size: int = 16) -> bytes:
    """A real, valid PNG of one colour derived from `seed`, so downloads fetch something genuine."""
    r, g, b = hashlib.sha256(seed.encode()).digest()[:3]
    raw = (b"\x00" + bytes((r, g, b)) * size) * size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error(message: str, status: int, **extra: Any) -> Response:
    headers = [("retry-after", f"{extra.pop('retry_after'):g}")] if "retry_after" in extra else None
    return Response.json({"error": message, **extra}, status, headers)


def invalid(details: dict[str, list[str]]) -> Response:
    return error("Validation failed", 400, details=details)


@dataclass
class ApiJob:
    id: str
    model: str
    prompt: str
    input: dict[str, Any]
    plan: JobPlan
    cost: float
    created: float  # wall clock, for createdAt
    status: str = "QUEUED"
    elapsed: float = 0.0  # job time (stops while paused)
    progress: int | None = None
    done_at: float | None = None  # job time of completion
    completed: float | None = None  # wall clock, for completedAt
    outputs: list[str] = field(default_factory=list)
    grid: str | None = None
    error: str | None = None
    credit_cost: float | None = None
    expired: bool = False

    def payload(self, *, legacy: bool = False) -> dict[str, Any]:
        result: Any = None
        if self.status == "COMPLETED":
            if legacy:
                result = self.outputs[0] if self.outputs else None
            else:
                result = {"images": list(self.outputs), **({"gridUrl": self.grid} if self.grid else {})}
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "progress": self.progress,
            "result": result,
            "error": self.error,
            "creditCost": self.credit_cost,
            "webhookStatus": None,
            "createdAt": iso(self.created),
            "completedAt": iso(self.completed) if self.completed is not None else None,
            "input": self.input,
        }
        if self.status == "COMPLETED":
            body["expired"] = self.expired
        return body


class ApiframeEmulator:
    name = "apiframe"

    def __init__(
        self,
        *,
        seed: int = 0,
        speed: float = 1.0,
        fail_rate: float = 0.12,
        host: str = "127.0.0.1",
        key: str = "afk_demo_key",
        expire_after: float | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.speed = speed
        self.fail_rate = fail_rate
        self.key = key
        self.expire_after = expire_after  # job-time seconds from completion to purged outputs (None: never)
        self.faults = Faults()
        self.truth: dict[str, Truth] = {}
        self.jobs: dict[str, ApiJob] = {}  # in creation order
        self.server = HttpServer(self._handle, host=host)
        #: knobs beside Faults
        self.credits = 100_000.0  # the account's balance: a submit costing more gets 402
        self.inactive = False  # 403 `API key is inactive`
        self.legacy_result = False  # `result` as a bare URL string, as the older docs show
        self.idempotency_ttl = IDEMPOTENCY_TTL
        #: (clock time, method, path, status) of recent requests (status 0: dropped), for tests that count them.
        self.log: deque[tuple[float, str, str, int]] = deque(maxlen=10_000)
        #: (Idempotency-Key, status) of every submit, in order.
        self.submissions: deque[tuple[str | None, int]] = deque(maxlen=10_000)
        self._idempotency: dict[str, tuple[str, str, float]] = {}  # key -> (body digest, job id, when)
        self._active: dict[str, ApiJob] = {}

    # -- Emulator protocol -----------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self.server.serve)
            tg.start_soon(self._clock)
            task_status.started()

    def settings(self) -> ProviderSettings:
        return ProviderSettings(name="apiframe", key=Secret(self.key), base_url=self.server.url)

    async def restart(self) -> None:
        await self.server.close_all()

    # -- for tests and the demo ------------------------------------------------------------------
    def requests(self, method: str | None = None, path: str | None = None) -> list[tuple[float, str, str, int]]:
        """Logged requests, filtered by method and path prefix."""
        return [r for r in self.log if (method is None or r[1] == method) and (path is None or r[2].startswith(path))]

    def inject(self, prompt: str, model: str = "seedream-4") -> str:
        """A job submitted elsewhere (the web app, another program on the same account)."""
        return self._new(model, prompt, {"model": model, "prompt": prompt}).id

    def expire(self, job_id: str) -> None:
        """Purge a completed job's outputs now."""
        job = self.jobs[job_id]
        if job.status == "COMPLETED":
            job.expired = True

    def force(self, job_id: str, status: str, *, error: str | None = None) -> None:
        """Move a job at once (tests pair this with `faults.paused` for exact sequences)."""
        job = self.jobs[job_id]
        if status == "PROCESSING" and job.status == "QUEUED":
            job.status, job.progress = "PROCESSING", 0
        elif status in ("COMPLETED", "FAILED", "CANCELLED") and job.status in ("QUEUED", "PROCESSING"):
            self._finish(job, status, error or job.plan.error or "forced failure")

    # -- time ------------------------------------------------------------------------------------
    async def _clock(self) -> None:
        async for dt in ticks(TICK, self.faults):
            for job in list(self._active.values()) if dt else ():
                self._advance(job, dt)

    def _advance(self, job: ApiJob, dt: float) -> None:
        job.elapsed += dt
        plan = job.plan
        if job.status == "COMPLETED":  # still active only while its outputs can expire
            if self.expire_after is None or job.done_at is None:
                self._active.pop(job.id, None)
            elif job.elapsed - job.done_at >= self.expire_after:
                job.expired = True
                self._active.pop(job.id, None)
            return
        if job.status == "QUEUED" and job.elapsed >= plan.queue_s:
            job.status, job.progress = "PROCESSING", 0
        if job.status != "PROCESSING":
            return
        running = job.elapsed - plan.queue_s
        if plan.outcome != "hang" and running >= plan.run_s:
            self._finish(job, "COMPLETED" if plan.outcome == "succeeded" else "FAILED", plan.error)
            return
        fraction = running / plan.run_s if plan.run_s > 0 else 1.0
        step = int(fraction * plan.steps)
        job.progress = min(95 if plan.outcome == "hang" else 99, int(100 * step / max(plan.steps, 1)))

    def _finish(self, job: ApiJob, status: str, reason: str) -> None:
        job.status = status
        job.completed = time.time()
        job.done_at = job.elapsed
        self._active.pop(job.id, None)
        if status == "COMPLETED":
            spec = MODELS.get(job.model, MODELS["seedream-4"])
            job.progress = 100
            job.credit_cost = job.cost
            job.outputs = [f"{self.server.url}{CDN_PREFIX}{job.id}/{n}.png" for n in range(spec.images)]
            job.grid = f"{self.server.url}{CDN_PREFIX}{job.id}/grid.png" if spec.grid else None
            if self.expire_after is not None:
                self._active[job.id] = job  # the clock expires its outputs later
        else:
            job.progress = None
            job.credit_cost = 0.0  # refunded
            job.error = reason if status == "FAILED" else None
            self.credits += job.cost
        self.truth[job.id] = Truth(
            job=job.id,
            state=status.lower(),
            outputs=list(job.outputs),
            cost=job.credit_cost,
            error=job.error,
        )

    def _new(self, model: str, prompt: str, given: dict[str, Any]) -> ApiJob:
        spec = MODELS.get(model, MODELS["seedream-4"])
        job = ApiJob(
            id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            model=model,
            prompt=prompt,
            input={k: v for k, v in given.items() if k not in ("model", "webhookUrl", "webhookEvents")},
            plan=plan_for(prompt, self.rng, speed=self.speed, fail_rate=self.fail_rate),
            cost=spec.cost,
            created=time.time(),
        )
        self.credits -= job.cost  # reserved now; refunded if the job fails
        self.jobs[job.id] = job
        self._active[job.id] = job
        self.truth[job.id] = Truth(job=job.id, state="")
        return job

    # -- HTTP ------------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        try:
            response = await self._route(request)
        except Drop:
            self.log.append((anyio.current_time(), request.method, request.path, 0))
            raise
        if request.path.startswith("/v2/") and self._take_drop():
            self.log.append((anyio.current_time(), request.method, request.path, 0))
            raise Drop  # the work is done (a job may have been created); the answer is lost
        self.log.append((anyio.current_time(), request.method, request.path, response.status))
        return response

    def _take_drop(self) -> bool:
        left = self.faults.drop_after
        if left is None or left <= 0:
            return False
        self.faults.drop_after = left - 1 if left > 1 else None
        self.faults.drops += 1
        return True

    async def _route(self, request: Request) -> Response:
        path, method = request.path, request.method
        if method == "GET" and path.startswith(CDN_PREFIX):  # a public CDN: no auth, no faults
            return self._cdn(path)
        if not path.startswith("/v2/"):
            return error("Not found", 404)
        if self.faults.delay > 0:
            await anyio.sleep(self.faults.delay)
        if (status := self.faults.take_error()) is not None:
            return self._fault(status)
        given = request.headers.get("x-api-key")
        if not given:
            return error("API key is required", 401)
        if self.faults.reject_auth or given != self.key:
            return error("Invalid API key", 401)
        if self.inactive:
            return error("API key is inactive", 403)
        if path == "/v2/images/generate":
            if method != "POST":
                return error("Method not allowed", 405)
            response = self._generate(request)
            self.submissions.append((request.headers.get("idempotency-key"), response.status))
            return response
        if path == "/v2/jobs" and method == "GET":
            return self._list(request.query)
        if path.startswith("/v2/jobs/") and method == "GET":
            return self._get(path.removeprefix("/v2/jobs/"))
        return error("Not found", 404)

    def _fault(self, status: int) -> Response:
        if status == 429:
            return error("Too many requests", 429, retry_after=self.faults.retry_after)
        if status == 401:
            return error("Invalid API key", 401)
        if status == 403:
            return error("API key is inactive", 403)
        if status == 503:
            return error("Service temporarily unavailable", 503)
        return error("Internal server error" if status >= 500 else f"emulated HTTP {status}", status)

    def _cdn(self, path: str) -> Response:
        job_id, _, name = path.removeprefix(CDN_PREFIX).partition("/")
        job = self.jobs.get(job_id)
        urls = [*(job.outputs if job else []), *([job.grid] if job and job.grid else [])]
        if job is None or job.expired or f"{self.server.url}{path}" not in urls:
            return Response(404, b"Not Found", [("content-type", "text/plain")])
        return Response(200, tiny_png(f"{job_id}/{name}"), [("content-type", "image/png")])

    def _get(self, job_id: str) -> Response:
        if not JOB_ID.match(job_id):
            return error("Invalid job id", 400)
        job = self.jobs.get(job_id)
        if job is None:
            return error("Job not found", 404)
        return Response.json(job.payload(legacy=self.legacy_result))

    def _list(self, query: dict[str, str]) -> Response:
        details: dict[str, list[str]] = {}
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            details["limit"] = ["Number must be between 1 and 100"]
        status = query.get("status")
        if status is not None and status not in STATUSES:
            details["status"] = [f"Invalid enum value. Expected {' | '.join(STATUSES)}, received '{status}'"]
        if query.get("scope", "mine") not in ("mine", "team"):
            details["scope"] = ["Invalid enum value. Expected 'mine' | 'team'"]
        if details:
            return invalid(details)
        order = list(reversed(self.jobs))  # newest first
        cursor = query.get("cursor")
        if cursor:
            if cursor not in self.jobs:
                return error("Invalid cursor", 400)
            order = order[order.index(cursor) + 1 :]
        model = query.get("model")
        picked = [
            self.jobs[j]
            for j in order
            if (not status or self.jobs[j].status == status) and (not model or self.jobs[j].model == model)
        ]
        page, more = picked[:limit], len(picked) > limit
        return Response.json(
            {
                "jobs": [j.payload(legacy=self.legacy_result) for j in page],
                "nextCursor": page[-1].id if more and page else None,
                "hasMore": more,
            }
        )

    def _generate(self, request: Request) -> Response:
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= MAX_KEY:
            return invalid({"Idempotency-Key": [f"String must contain between 1 and {MAX_KEY} character(s)"]})
        try:
            body = request.json()
        except ValueError:
            return error("Invalid JSON body", 400)
        if not isinstance(body, dict):
            return error("Invalid JSON body", 400)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        now = anyio.current_time()
        if key is not None and (seen := self._idempotency.get(key)) and now - seen[2] < self.idempotency_ttl:
            if seen[0] != digest:
                return error("Idempotency-Key was already used with a different request body", 409)
            original = self.jobs[seen[1]]
            return Response.json({"jobId": original.id, "status": original.status}, 202)
        if (details := self._validate(body)) is not None:
            return invalid(details)
        model = MODELS[body["model"]]
        if self.credits < model.cost:
            return error(
                "Insufficient credits", 402, creditsRequired=model.cost, creditsAvailable=max(self.credits, 0.0)
            )
        job = self._new(body["model"], body["prompt"], body)
        if key is not None:
            self._idempotency[key] = (digest, job.id, now)
            if len(self._idempotency) > 100_000:  # forget the oldest, as the 24 h window would
                self._idempotency.pop(next(iter(self._idempotency)))
        return Response.json({"jobId": job.id, "status": "QUEUED"}, 202)

    @staticmethod
    def _validate(body: dict[str, Any]) -> dict[str, list[str]] | None:
        """Like the real API's schema: a union keyed by `model`, `additionalProperties: false`."""
        details: dict[str, list[str]] = {}
        model = body.get("model")
        if model not in MODELS:
            expected = " | ".join(f"'{m}'" for m in MODELS)
            details["model"] = [f"Invalid discriminator value. Expected {expected}"]
            return details
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            details["prompt"] = ["Required"]
        elif not 1 <= len(prompt) <= MAX_PROMPT:
            details["prompt"] = [f"String must contain between 1 and {MAX_PROMPT} character(s)"]
        spec = MODELS[str(model)]
        for name in body:
            if name not in ("model", "prompt", spec.params, "webhookUrl", "webhookEvents"):
                details[name] = ["Unrecognized key"]
        params = body.get(spec.params, {})
        if not isinstance(params, dict):
            details[spec.params] = ["Expected object"]
        elif spec.params == "seedreamParams":
            for name in params:
                if name not in SEEDREAM_PARAMS:
                    details[f"seedreamParams.{name}"] = ["Unrecognized key"]
            if params.get("output_format", "jpg") not in ("jpg", "png"):
                details["seedreamParams.output_format"] = ["Invalid enum value. Expected 'jpg' | 'png'"]
            scale = params.get("guidance_scale", 3)
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not 1 <= scale <= 10:
                details["seedreamParams.guidance_scale"] = ["Number must be between 1 and 10"]
            images = params.get("image_input")
            if images is not None and not (
                isinstance(images, str) or (isinstance(images, list) and all(isinstance(i, str) for i in images))
            ):
                details["seedreamParams.image_input"] = ["Expected string (URL) or array of URLs"]
        events = body.get("webhookEvents")
        if events is not None and not (isinstance(events, list) and set(events) <= WEBHOOK_EVENTS):
            details["webhookEvents"] = ["Invalid enum value. Expected 'progress' | 'completed' | 'failed'"]
        return details or None
