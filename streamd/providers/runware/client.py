"""Runware's REST endpoint, and the task objects both channels send.

REST is one URL: `POST {base_url}` with a JSON array of tasks and `Authorization: Bearer`. It
serves submission and `getResponse` polling while the WebSocket is down. HTTP statuses that
concern the whole request (auth, balance, rate limits, outages) become `ProviderError`s; bodies
that carry per-task `data`/`errors` are returned for the normaliser, whatever their status.
The key appears only in the Authorization header and the WebSocket's authentication task.
"""

from __future__ import annotations

import base64
import mimetypes
import uuid
from collections.abc import Iterable
from typing import Any

import anyio
import httpx
import msgspec

from streamd.config import Secret
from streamd.events import loads
from streamd.providers.base import ProviderError, SubmitRequest
from streamd.transport.backoff import retry_after

#: Fields streamd sets itself; options may not override them.
RESERVED = frozenset({"taskType", "taskUUID", "deliveryMethod", "includeCost", "positivePrompt", "model"})
INT_FIELDS = frozenset({"numberResults", "width", "height", "steps", "seed", "outputQuality", "ttl"})
FLOAT_FIELDS = frozenset({"CFGScale", "strength"})
#: Friendlier option names (the CLI and the demo use `num`) for Runware's own field names.
ALIASES = {"num": "numberResults", "n": "numberResults", "number_results": "numberResults", "count": "numberResults"}
MAX_LOCAL_IMAGE = 10 * 1024 * 1024
MAX_RESULTS = 20

PING: dict[str, Any] = {"taskType": "ping", "ping": True}


def auth_task(key: Secret, session: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"taskType": "authentication", "apiKey": key.reveal()}
    if session:
        task["connectionSessionUUID"] = session
    return task


def get_response_tasks(tasks: Iterable[str]) -> list[dict[str, Any]]:
    return [{"taskType": "getResponse", "taskUUID": t} for t in tasks]


def is_task_uuid(ref: str) -> bool:
    try:
        uuid.UUID(ref)
    except ValueError:
        return False
    return True


def _coerce(name: str, value: Any) -> Any:
    """CLI options arrive as strings; Runware wants numbers for its numeric fields."""
    try:
        if name in INT_FIELDS and isinstance(value, str | float) and not isinstance(value, bool):
            return int(value)
        if name in FLOAT_FIELDS and isinstance(value, str | int) and not isinstance(value, bool):
            return float(value)
    except ValueError:
        raise ProviderError("bad_request", f"option {name} must be a number, not {value!r}") from None
    return value


async def image_reference(image: str) -> str:
    """A URL, data URI or Runware image UUID passes through; a local file becomes a data URI."""
    if image.startswith(("http://", "https://", "data:")) or is_task_uuid(image):
        return image
    path = await anyio.Path(image).expanduser()
    if not await path.is_file():
        raise ProviderError("bad_request", f"image {image} is neither a URL nor a readable file")
    stat = await path.stat()
    if stat.st_size > MAX_LOCAL_IMAGE:
        raise ProviderError("bad_request", f"image {image} is larger than {MAX_LOCAL_IMAGE // (1024 * 1024)} MB")
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(await path.read_bytes()).decode()}"


async def inference_task(request: SubmitRequest, task_uuid: str) -> dict[str, Any]:
    """The `imageInference` task for a submit request: async delivery, costs included."""
    if not request.prompt.strip():
        raise ProviderError("bad_request", "the prompt is empty")
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": task_uuid,
        "model": request.model,
        "positivePrompt": request.prompt,
        "deliveryMethod": "async",
        "includeCost": True,
        "outputType": "URL",
        "numberResults": 1,
    }
    for given, value in request.options.items():
        name = ALIASES.get(given, given)
        if name in RESERVED:
            raise ProviderError("bad_request", f"option {name} is set by streamd and cannot be overridden")
        task[name] = _coerce(name, value)
    n = task["numberResults"]
    if not isinstance(n, int) or not 1 <= n <= MAX_RESULTS:
        raise ProviderError("bad_request", f"numberResults must be between 1 and {MAX_RESULTS}")
    if ("width" in task) != ("height" in task):
        raise ProviderError("bad_request", "width and height go together")
    if request.images:
        refs = [await image_reference(i) for i in request.images]
        inputs = task.setdefault("inputs", {})
        if not isinstance(inputs, dict):
            raise ProviderError("bad_request", "option inputs must be an object")
        inputs["referenceImages"] = refs
    return task


class RestClient:
    """POSTs task arrays to Runware. One `httpx.AsyncClient`, closed by `aclose`."""

    def __init__(self, base_url: str, key: Secret, *, timeout: float = 30.0) -> None:
        self.base_url = base_url
        self._key = key
        self._http = httpx.AsyncClient(timeout=timeout, trust_env=not loopback(base_url))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post(self, tasks: list[dict[str, Any]]) -> Any:
        """The decoded response body; raises ProviderError for request-wide failures."""
        try:
            response = await self._http.post(
                self.base_url,
                content=msgspec.json.encode(tasks),
                headers={"Authorization": f"Bearer {self._key.reveal()}", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
            raise ProviderError("unavailable", f"cannot reach Runware at {self.base_url}: {reason}") from None
        status = response.status_code
        try:
            body = loads(response.content) if response.content else None
        except ValueError:
            body = None
        code = _first_code(body)
        if status in (401, 403):
            raise ProviderError("auth", f"Runware rejected the API key (HTTP {status}{', ' + code if code else ''})")
        if status == 402:
            raise ProviderError("balance", "Runware says the account balance is insufficient (HTTP 402)")
        if status == 429:
            wait = retry_after(response.headers.get("retry-after"))
            message = f"Runware is rate limiting (HTTP 429), retry in {wait:g}s"
            raise ProviderError("rate_limited", message, retry_after=wait)
        if status >= 500:
            header = response.headers.get("retry-after")
            later = retry_after(header) if header else None
            raise ProviderError("unavailable", f"Runware answered HTTP {status}", retry_after=later)
        if body is None:
            raise ProviderError("bad_request", f"Runware answered HTTP {status} without a JSON body")
        if code in ("invalidApiKey", "missingApiKey"):
            raise ProviderError("auth", f"Runware rejected the API key ({code})")
        return body


def _first_code(body: Any) -> str | None:
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = errors[0].get("code")
            return code if isinstance(code, str) else None
    return None


def loopback(url: str) -> bool:
    """Loopback URLs (the emulators) never go through a proxy from the environment."""
    return httpx.URL(url).host in ("127.0.0.1", "localhost", "::1")
