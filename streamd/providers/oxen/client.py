"""Oxen's REST API over one httpx.AsyncClient. Every failure becomes a one-line `ProviderError`.

Oxen answers errors in two shapes: (a) `{"error":{"type","title","detail"},"status":"error",
"status_message":...}` and (b) `{"error":{"message":...}}`; `error_message()` reads both. The key
travels only in the `Authorization` header: it is never logged and never put in a message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from streamd.config import ProviderSettings
from streamd.events import loads
from streamd.providers.base import ProviderError
from streamd.transport.backoff import retry_after as parse_retry_after

API = "/api/ai"
#: REST calls are quick; the synchronous generate endpoint blocks while the image is made (5-30 s typical).
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
SYNC_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
MAX_DETAIL = 240


def error_message(body: bytes, status: int) -> str:
    """The server's own words from either error shape, else a short excerpt, else the status."""
    text = body[:4096].decode("utf-8", errors="replace")
    try:
        parsed: Any = loads(text)
    except ValueError:
        parsed = None
    detail: str | None = None
    if isinstance(parsed, Mapping):
        err = parsed.get("error")
        if isinstance(err, Mapping):
            for key in ("detail", "message", "title", "type"):
                if isinstance(err.get(key), str) and err[key].strip():
                    detail = err[key]
                    break
        elif isinstance(err, str) and err.strip():
            detail = err
        if detail is None:
            for key in ("detail", "message", "status_message"):
                if isinstance(parsed.get(key), str) and parsed[key].strip():
                    detail = parsed[key]
                    break
    elif parsed is None and text.strip() and "<html" not in text[:200].lower():
        detail = text
    detail = " ".join((detail or f"HTTP {status}").split())
    return detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…"


def error_for(status: int, body: bytes, headers: Mapping[str, str]) -> ProviderError:
    detail = error_message(body, status)
    if status in (401, 403):
        return ProviderError("auth", f"Oxen rejected the API key (HTTP {status}: {detail})")
    if status == 402:
        return ProviderError("balance", f"Oxen: not enough credits (HTTP 402: {detail})")
    if status == 429:
        after = parse_retry_after(headers.get("retry-after"), default=5.0)
        return ProviderError("rate_limited", f"Oxen rate limit hit; retry in {after:.0f}s", retry_after=after)
    if status == 404:
        return ProviderError("not_found", f"Oxen: {detail} (HTTP 404)")
    if 400 <= status < 500:
        return ProviderError("bad_request", f"Oxen: {detail} (HTTP {status})")
    return ProviderError("unavailable", f"Oxen is unavailable (HTTP {status}: {detail})")


def schema_of(model: Any) -> dict[str, Any] | None:
    """A model's request JSON Schema: the model pages say `json_request_schema`, the overview `request_schema`."""
    if not isinstance(model, Mapping):
        return None
    for key in ("json_request_schema", "request_schema"):
        value = model.get(key)
        if isinstance(value, str):  # some generators store the schema as a JSON string
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, Mapping):
            return dict(value)
    return None


class OxenClient:
    def __init__(self, settings: ProviderSettings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = settings.base_url.rstrip("/")
        self.host = httpx.URL(self.base_url).host or self.base_url  # for messages: never userinfo
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {settings.key.reveal()}", "User-Agent": "streamd"},
            timeout=TIMEOUT,
            transport=transport,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ProviderError("unavailable", f"Oxen did not answer {method} {path} in time") from exc
        except httpx.HTTPError as exc:
            raise ProviderError("unavailable", f"cannot reach Oxen at {self.host}: {type(exc).__name__}") from exc
        if not 200 <= response.status_code < 300:
            raise error_for(response.status_code, response.content, response.headers)
        if not response.content.strip():  # e.g. a 204 to DELETE
            return None
        try:
            return loads(response.content)
        except ValueError:
            raise ProviderError(
                "unavailable", f"Oxen answered {method} {path} with something that is not JSON"
            ) from None

    # -- the queue ---------------------------------------------------------------------------------
    async def enqueue(
        self,
        model: str,
        prompt: str,
        *,
        images: Sequence[str] = (),
        num_generations: int = 1,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """`POST /api/ai/queue`; other options pass through to the model as Oxen does."""
        body: dict[str, Any] = {**(options or {}), "model": model, "prompt": prompt, "num_generations": num_generations}
        if images:
            body["input_image"] = list(images)
        return await self._request("POST", f"{API}/queue", json=body)

    async def status(self, generation_id: str) -> Any:
        return await self._request("GET", f"{API}/queue/{_segment(generation_id)}")

    async def active(self, **filters: str) -> Any:
        """`GET /api/ai/queue`: active generations only, unless a `status` filter is given."""
        return await self._request("GET", f"{API}/queue", params=filters)

    async def cancel(self, generation_id: str) -> Any:
        return await self._request("DELETE", f"{API}/queue/{_segment(generation_id)}")

    # -- synchronous generation and models ---------------------------------------------------------
    async def generate(
        self, model: str, prompt: str, *, images: Sequence[str] = (), options: Mapping[str, Any] | None = None
    ) -> Any:
        body: dict[str, Any] = {**(options or {}), "model": model, "prompt": prompt}
        if images:
            body["input_image"] = list(images)
        return await self._request("POST", f"{API}/images/generate", json=body, timeout=SYNC_TIMEOUT)

    async def model(self, model_id: str) -> Any:
        return await self._request("GET", f"{API}/models/{_segment(model_id)}")

    async def model_schema(self, model_id: str) -> dict[str, Any] | None:
        return schema_of(await self.model(model_id))


def _segment(value: str) -> str:
    """One URL path segment: an id from a user must not walk to another endpoint."""
    value = value.strip()
    if not value or "/" in value or value in (".", "..") or any(c in value for c in "?#"):
        raise ProviderError("bad_request", f"not an Oxen id: {value[:80]!r}")
    return value
