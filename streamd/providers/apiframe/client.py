"""Apiframe v2 REST: submit, get a job, list jobs. Answers are JSON; failures are `ProviderError`s.

The key travels only in the `X-API-Key` header. Error messages are built here from status and body,
never from httpx's exceptions wholesale (their request objects carry the headers), and anything that
could echo the key is scrubbed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx

from streamd.config import Secret
from streamd.events import loads
from streamd.providers.base import ProviderError, SubmitRequest
from streamd.transport.backoff import backoff, retry_after

GENERATE = "/v2/images/generate"
JOBS = "/v2/jobs"
MAX_IDEMPOTENCY_KEY = 255
#: SubmitRequest.options that are top-level fields of the request body (the rest go into `<model>Params`).
TOP_LEVEL = {"webhookUrl": "webhookUrl", "webhook_url": "webhookUrl", "webhookEvents": "webhookEvents"}
#: Options that steer streamd itself and are never sent.
LOCAL = frozenset({"idempotency_key", "params_key", "params"})
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


# -- pure helpers -------------------------------------------------------------------------------------
def params_key(model: str) -> str:
    """The `<model>Params` block a model's options go in: the family name in camelCase.

    `seedream-4` and `seedream-4.5` → `seedreamParams`, `flux-2-pro` → `fluxParams`,
    `nano-banana` → `nanoBananaParams`, `midjourney` → `midjourneyParams`. The request option
    `params_key` overrides this for a family the rule gets wrong.
    """
    words: list[str] = []
    for part in model.strip().lower().split("-"):
        if not part or part[0].isdigit():
            break
        words.append(re.sub(r"[^a-z0-9]", "", part))
    words = [w for w in words if w] or ["model"]
    return words[0] + "".join(w.capitalize() for w in words[1:]) + "Params"


def build_body(request: SubmitRequest) -> dict[str, Any]:
    """The JSON body of `POST /v2/images/generate` for a SubmitRequest.

    Reference images go in `image_input` (one URL as a string, as Seedream documents it; several as a
    list), or `input_images` for Flux. Options other than the webhook fields go in the params block.
    """
    body: dict[str, Any] = {"model": request.model, "prompt": request.prompt}
    params: dict[str, Any] = {}
    given = request.options.get("params")
    if isinstance(given, Mapping):
        params.update(given)
    for name, value in request.options.items():
        if name in TOP_LEVEL:
            body[TOP_LEVEL[name]] = value
        elif name not in LOCAL:
            params[name] = value
    if request.images:
        if params_key(request.model) == "fluxParams":
            params.setdefault("input_images", list(request.images))
        else:
            params.setdefault("image_input", request.images[0] if len(request.images) == 1 else list(request.images))
    if params:
        key = request.options.get("params_key")
        body[key if isinstance(key, str) and key else params_key(request.model)] = params
    return body


def idempotency_key(request: SubmitRequest) -> str:
    """The caller's key (so a resubmission from a script is deduplicated too), else a fresh one."""
    given = request.options.get("idempotency_key")
    if given is None:
        return f"streamd-{uuid.uuid4()}"
    key = str(given).strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise ProviderError("bad_request", f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
    return key


def parse_ref(ref: str) -> str:
    """A job id from what a user pasted: the id itself, or a URL ending in /jobs/<id>."""
    text = ref.strip()
    if "/" in text:
        text = urlsplit(text).path.rstrip("/").rsplit("/", 1)[-1]
    if not JOB_ID.match(text):
        shown = ref.strip()[:60]
        raise ProviderError("bad_request", f"not an Apiframe job id: {shown!r}")
    return text


def _details(details: Any) -> str:
    """`{"prompt": ["String must contain at most 2000 character(s)"]}` → `prompt: String must …`."""
    if isinstance(details, Mapping):
        parts = []
        for path, messages in details.items():
            text = "; ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
            parts.append(f"{path}: {text}" if str(path) else text)
        return "; ".join(parts)
    if isinstance(details, list):
        return "; ".join(str(d) for d in details)
    return "" if details is None else str(details)


def error_for(
    status: int, body: Any, retry_after_header: str | None = None, *, what: str = "resource"
) -> ProviderError:
    """The ProviderError for a non-2xx answer: one line, for people, without secrets."""
    said = body.get("error") if isinstance(body, Mapping) else None
    said = said if isinstance(said, str) and said else None
    if status == 400:
        details = _details(body.get("details")) if isinstance(body, Mapping) else ""
        text = ": ".join(p for p in (said or "invalid request", details) if p)
        return ProviderError("bad_request", f"Apiframe rejected the request: {text}")
    if status in (401, 403):
        return ProviderError("auth", f"Apiframe rejected the API key ({status} {said or 'unauthorized'})")
    if status == 402:
        need = body.get("creditsRequired") if isinstance(body, Mapping) else None
        have = body.get("creditsAvailable") if isinstance(body, Mapping) else None
        extra = f": {need} required, {have} available" if need is not None and have is not None else ""
        return ProviderError("balance", f"Apiframe: {said or 'insufficient credits'}{extra}")
    if status == 404:
        return ProviderError("not_found", f"Apiframe has no such {what} (404)")
    if status == 409:
        return ProviderError(
            "conflict", "Apiframe: this Idempotency-Key was already used with a different request (409)"
        )
    if status == 429:
        delay = retry_after(retry_after_header, default=1.0)
        return ProviderError("rate_limited", f"Apiframe rate limit (429); retry after {delay:g}s", retry_after=delay)
    if status >= 500:
        return ProviderError("unavailable", f"Apiframe is unavailable ({status}{' ' + said if said else ''})")
    return ProviderError("bad_request", f"Apiframe answered {status}{': ' + said if said else ''}")


# -- the client ---------------------------------------------------------------------------------------
Sleep = Callable[[float], Awaitable[None]]


class ApiframeClient:
    """One httpx client per provider. GETs are retried once on a broken pooled connection; submits
    are retried by `generate` under one Idempotency-Key so a retry never creates a second job."""

    def __init__(
        self,
        base_url: str,
        key: Secret,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = key
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"X-API-Key": key.reveal(), "Accept": "application/json", "User-Agent": "streamd"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _clean(self, text: str) -> str:
        key = self._key.reveal()
        return text.replace(key, "[redacted]") if key else text

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "resource",
        retry_broken: bool = False,
    ) -> Any:
        """Send one request; the decoded JSON of a 2xx answer (or its text, if not JSON)."""
        response: httpx.Response | None = None
        failure = ""
        for attempt in range(2 if retry_broken else 1):
            try:
                response = await self._http.request(method, path, json=json, params=params, headers=headers)
                break
            except httpx.HTTPError as exc:  # it holds the request (and so the headers): keep only its words
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                stale = isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)  # a pooled keep-alive gone
                if not (retry_broken and attempt == 0 and stale):
                    break
        if response is None:
            raise ProviderError("unavailable", self._clean(f"cannot reach Apiframe at {self.base_url} ({failure})"))
        try:
            body: Any = loads(response.content)
        except ValueError:
            body = response.text[:2000]
        if response.is_success:
            return body
        error = error_for(response.status_code, body, response.headers.get("retry-after"), what=what)
        raise ProviderError(error.code, self._clean(error.message), retry_after=error.retry_after)

    async def job(self, job_id: str) -> Any:
        return await self.request("GET", f"{JOBS}/{quote(job_id, safe='')}", what=f"job {job_id}", retry_broken=True)

    async def jobs(self, *, limit: int = 100, cursor: str | None = None, scope: str | None = None) -> Any:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        if scope:
            params["scope"] = scope
        return await self.request("GET", JOBS, params=params, what="job list", retry_broken=True)

    async def generate(
        self,
        body: Mapping[str, Any],
        *,
        key: str,
        attempts: int = 4,
        initial: float = 0.5,
        max_wait: float = 60.0,
        sleep: Sleep = anyio.sleep,
    ) -> Mapping[str, Any]:
        """Submit, retrying 5xx, 429 (after Retry-After) and connection failures with the same
        Idempotency-Key: if the first attempt created the job but its answer was lost, the retry gets
        the original job back instead of a second one."""
        delays = backoff(initial, maximum=max(initial, 8.0))
        error: ProviderError | None = None
        for attempt in range(max(1, attempts)):
            if error is not None:
                wait = next(delays)
                if error.code == "rate_limited" and error.retry_after is not None:
                    wait = error.retry_after
                await sleep(wait)
            try:
                answer = await self.request("POST", GENERATE, json=dict(body), headers={"Idempotency-Key": key})
            except ProviderError as exc:
                retryable = exc.code == "unavailable" or (
                    exc.code == "rate_limited" and (exc.retry_after or 0.0) <= max_wait
                )
                if not retryable or attempt + 1 >= attempts:
                    raise
                error = exc
                continue
            if not isinstance(answer, Mapping) or not isinstance(answer.get("jobId"), str) or not answer["jobId"]:
                raise ProviderError("unavailable", "Apiframe accepted the request but sent no jobId")
            return answer
        raise AssertionError("unreachable")  # pragma: no cover
