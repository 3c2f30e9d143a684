"""Wiro's REST API: signed requests, the `{result, errors[]}` envelope, one clear error per failure.

Wiro's docs contradict each other on status codes ("all responses are HTTP 200", but auth errors
are 401 and rate limits 429), so a response counts as success only when the status is 2xx *and*
`result` is true with no errors. Every failure becomes a `ProviderError` whose message names no
credential: not the key, the secret, a signature, nor a task token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mimetypes
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from streamd.config import ProviderSettings
from streamd.events import loads
from streamd.providers.base import ProviderError
from streamd.transport.backoff import retry_after

MAX_UPLOAD = 100 * 1024 * 1024  # Wiro's per-file limit
USER_AGENT = "streamd/0.1 (+wiro)"
_AUTH_HINTS = ("project authorization", "requires signature", "sign in", "bearer token")


def sign(key: str, secret: str, nonce: str) -> str:
    """Wiro's signature: hex HMAC-SHA256 keyed by the API *key* over secret + nonce."""
    return hmac.new(key.encode(), (secret + nonce).encode(), hashlib.sha256).hexdigest()


class _Nonces:
    """Millisecond nonces that never repeat within a process, even for requests in the same ms."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            self._last = max(time.time_ns() // 1_000_000, self._last + 1)
            return str(self._last)


_nonces = _Nonces()


def auth_headers(settings: ProviderSettings, nonce: str | None = None) -> dict[str, str]:
    """`x-api-key`, plus `x-nonce`/`x-signature` unless the project is key-only (no secret)."""
    key = settings.key.reveal()
    headers = {"x-api-key": key}
    if settings.secret is not None:
        nonce = nonce or _nonces.next()
        headers["x-nonce"] = nonce
        headers["x-signature"] = sign(key, settings.secret.reveal(), nonce)
    return headers


@dataclass(frozen=True)
class Upload:
    """A local file to send as a multipart part."""

    field: str
    filename: str
    content: bytes
    content_type: str


@dataclass(frozen=True)
class RunResult:
    taskid: str
    token: str = field(repr=False)  # the socketaccesstoken: a credential, never logged or served


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


async def read_upload(field: str, path: str) -> Upload:
    """A local image for a multipart Run; a missing or oversized file is the user's mistake."""
    local = await anyio.Path(path.removeprefix("file://")).expanduser()
    try:
        size = (await local.stat()).st_size
        if size > MAX_UPLOAD:
            raise ProviderError("bad_request", f"image {path}: {size // (1024 * 1024)} MB is over Wiro's 100 MB limit")
        content = await local.read_bytes()
    except FileNotFoundError:
        hint = "give a local path or an http(s) URL"
        raise ProviderError("bad_request", f"image {path}: no such file ({hint})") from None
    except IsADirectoryError:
        raise ProviderError("bad_request", f"image {path}: is a directory") from None
    except PermissionError:
        raise ProviderError("bad_request", f"image {path}: permission denied") from None
    ctype = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
    return Upload(field, local.name, content, ctype)


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


class WiroClient:
    """One `httpx.AsyncClient` for the provider's lifetime; `transport` lets tests mock the network."""

    def __init__(
        self, settings: ProviderSettings, *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout, connect=10.0),
            headers={"user-agent": USER_AGENT, "accept": "application/json"},
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- endpoints -----------------------------------------------------------------------------
    async def run(
        self, owner: str, project: str, params: Mapping[str, Any], uploads: Sequence[Upload] = ()
    ) -> RunResult:
        """POST /Run/{owner}/{project}: JSON, or multipart when there are local files."""
        path = f"/Run/{owner}/{project}"
        if uploads:
            data: dict[str, Any] = {}
            for name, value in params.items():
                if value is None:
                    continue
                data[name] = [_form_value(v) for v in value] if isinstance(value, list) else _form_value(value)
            files = [(u.field, (u.filename, u.content, u.content_type)) for u in uploads]
            body = await self._post(path, data=data, files=files)
        else:
            body = await self._post(path, json={k: v for k, v in params.items() if v is not None})
        # The docs' samples disagree on nesting; the API answers at the top level.
        nested = body.get("data")
        holder: Mapping[str, Any] = nested if "taskid" not in body and isinstance(nested, Mapping) else body
        taskid, token = holder.get("taskid"), holder.get("socketaccesstoken")
        if taskid in (None, "") or not isinstance(token, str) or not token:
            raise ProviderError("unavailable", "Wiro accepted the run but returned no task id or token")
        return RunResult(str(taskid), token)

    async def detail(self, *, taskid: str | None = None, token: str | None = None) -> dict[str, Any]:
        """POST /Task/Detail by id or token; the one task record, or ProviderError not_found."""
        payload = {"taskid": taskid} if taskid is not None else {"tasktoken": token}
        body = await self._post("/Task/Detail", json=payload)
        tasks = body.get("tasklist")
        if not isinstance(tasks, list) or not tasks or not isinstance(tasks[0], dict):
            raise ProviderError("not_found", _which(taskid) + " not found on Wiro")
        return tasks[0]

    async def cancel(self, taskid: str) -> dict[str, Any] | None:
        """POST /Task/Cancel: only for tasks still queued."""
        return _first_task(await self._post("/Task/Cancel", json={"taskid": taskid}))

    async def kill(self, taskid: str) -> dict[str, Any] | None:
        """POST /Task/Kill: for tasks past the queue."""
        return _first_task(await self._post("/Task/Kill", json={"taskid": taskid}))

    # -- plumbing --------------------------------------------------------------------------------
    async def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.post(path, headers=auth_headers(self.settings), **kwargs)
        except httpx.TimeoutException:
            raise ProviderError("unavailable", f"Wiro API timed out ({path})") from None
        except httpx.HTTPError as exc:
            raise ProviderError("unavailable", f"Wiro API unreachable ({type(exc).__name__})") from None
        return self._check(path, response)

    def _check(self, path: str, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        try:
            body = loads(response.content)
        except ValueError:
            body = None
        errors = body.get("errors") if isinstance(body, dict) else None
        first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
        code = first.get("code")
        text = self._clean(str(first.get("message") or "")).strip()
        if status in (401, 403) or code in (98, 99) or any(h in text.lower() for h in _AUTH_HINTS):
            raise ProviderError("auth", f"Wiro rejected the credentials: {text or f'HTTP {status}'}")
        if status == 429:
            wait = retry_after(response.headers.get("retry-after"))
            raise ProviderError("rate_limited", f"Wiro rate limit hit; retry in {wait:.0f}s", retry_after=wait)
        if code in (96, "96"):
            raise ProviderError(
                "concurrency", "Wiro concurrency limit reached (code 96): wait for running tasks or top up the balance"
            )
        if code in (97, "97"):
            raise ProviderError("balance", "Wiro balance is insufficient (code 97): top up the account")
        if status >= 500:
            raise ProviderError("unavailable", f"Wiro API error HTTP {status}{': ' + text if text else ''}")
        if not isinstance(body, dict):
            raise ProviderError("unavailable", f"Wiro API answered HTTP {status} without a JSON envelope ({path})")
        if status < 300 and body.get("result") is True and not errors:
            return body
        if code in (1, "1") or status == 404:
            lowered = text.lower()
            if "cancellable" in lowered or "could not be killed" in lowered:
                raise ProviderError("cannot_cancel", text)
            raise ProviderError("not_found", text or f"not found ({path})")
        if "could not be killed" in text.lower():
            raise ProviderError("cannot_cancel", text)
        raise ProviderError("bad_request", f"Wiro refused the request: {text or f'HTTP {status}'}")

    def _clean(self, text: str) -> str:
        """Drop our own credentials from a server message, in case one is echoed back."""
        for secret in (self.settings.key, self.settings.secret):
            if secret is not None and secret.reveal():
                text = text.replace(secret.reveal(), "[redacted]")
        return text[:300]


def _which(taskid: str | None) -> str:
    return f"task {taskid}" if taskid is not None else "the task with that token"


def _first_task(body: Mapping[str, Any]) -> dict[str, Any] | None:
    tasks = body.get("tasklist")
    if isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
        return tasks[0]
    return None
