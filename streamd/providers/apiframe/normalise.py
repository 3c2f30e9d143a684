"""Apiframe payloads → Observations. Pure and total: any input gives observations, never an exception.

One reader serves every shape Apiframe sends a Job in: `GET /v2/jobs/{id}` (`id`), the 202 answer to a
submission (`jobId`, `status` only) and webhook bodies (`jobId`, `event`), so the same job reads the same
whichever way it arrived. Statuses: QUEUED → queued, PROCESSING → running (+ a progress observation),
COMPLETED → completed (outputs, cost = creditCost; `expired: true` adds one EXPIRED observation),
FAILED → failed (error; credits are refunded, so creditCost is 0), CANCELLED → cancelled. Anything else
becomes a DIAGNOSTIC observation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streamd.events import Kind, Observation, Origin, Progress, State, scrub, scrub_text

PROVIDER = "apiframe"

STATES: dict[str, State] = {
    "QUEUED": State.QUEUED,
    "PROCESSING": State.RUNNING,
    "COMPLETED": State.COMPLETED,
    "FAILED": State.FAILED,
    "CANCELLED": State.CANCELLED,
}

#: Keys of a `result` object that hold output URLs, by modality (image, video, music), in output order.
URL_LISTS = ("images", "videos", "tracks", "audios")
URL_FIELDS = ("imageUrl", "videoUrl", "audioUrl", "url")
#: Inside a list item that is an object rather than a bare URL.
ITEM_URL_FIELDS = ("url", "imageUrl", "videoUrl", "audioUrl", "audio_url", "video_url", "image_url")


# -- small readers (each total) ---------------------------------------------------------------------
def job_id_of(payload: Any) -> str | None:
    """The job id of a Job (`id`), a 202 answer or a webhook body (`jobId`)."""
    if not isinstance(payload, Mapping):
        return None
    for key in ("id", "jobId"):
        value = payload.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def status_of(payload: Any) -> str | None:
    """Apiframe's own status word, as sent."""
    if not isinstance(payload, Mapping):
        return None
    value = payload.get("status")
    return value if isinstance(value, str) and value else None


def state_of(payload: Any) -> State | None:
    status = status_of(payload)
    return STATES.get(status.strip().upper()) if status else None


def is_expired(payload: Any) -> bool:
    return isinstance(payload, Mapping) and payload.get("expired") is True


def progress_of(value: Any) -> float | None:
    """A percentage from `progress` (number, numeric string, or null), clamped to 0-100."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%"))
        except ValueError:
            return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(min(max(value, 0.0), 100.0))


def cost_of(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def error_of(value: Any) -> str | None:
    """`error` is documented as a string; tolerate an object with a message."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        for key in ("message", "error", "detail"):
            if isinstance(value.get(key), str) and value[key]:
                return str(value[key])
        return _compact(value)
    if value is None or value is False:
        return None
    return _compact(value)


def outputs_of(result: Any) -> tuple[tuple[str, ...], bool]:
    """Output URLs from `result`, and whether the shape was understood.

    Current docs: `{"images": [...], "gridUrl"?}` (video `{"videoUrl"}`/`{"videos"}`, music `{"tracks"}`);
    older docs and the SDK's tests: a bare URL string. `gridUrl` is a collage of the images, not an output.
    """
    if result is None:
        return (), True
    if isinstance(result, str):
        return ((result,) if result.strip() else ()), bool(result.strip())
    urls: list[str] = []
    if isinstance(result, Mapping):
        known = False
        for key in URL_LISTS:
            if key in result:
                known = True
                urls += _urls(result[key])
        for key in URL_FIELDS:
            if isinstance(result.get(key), str) and result[key]:
                known = True
                urls.append(result[key])
        return tuple(dict.fromkeys(urls)), known
    if isinstance(result, list | tuple):
        urls = _urls(result)
        return tuple(dict.fromkeys(urls)), bool(urls) or not result
    return (), False


def _urls(items: Any) -> list[str]:
    if isinstance(items, str):
        return [items] if items else []
    if not isinstance(items, list | tuple):
        return []
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, Mapping):
            for key in ITEM_URL_FIELDS:
                if isinstance(item.get(key), str) and item[key]:
                    out.append(item[key])
                    break
    return out


def time_of(value: Any) -> float | None:
    """Unix seconds from an ISO 8601 timestamp (`2026-05-01T00:01:00.000Z`) or epoch seconds/ms."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            return None
        return float(value / 1000.0 if value > 1e11 else value)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def fingerprint(payload: Any) -> str:
    """What a poll reported, reduced to what can change; equal fingerprints mean "no news"."""
    if isinstance(payload, Mapping):
        keys = ("status", "progress", "result", "error", "creditCost", "expired")
        subset: Any = {k: payload.get(k) for k in keys}
    else:
        subset = payload
    text = json.dumps(subset, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _compact(value: Any, limit: int = 300) -> str:
    try:
        text = json.dumps(scrub(value), default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    text = scrub_text(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the normaliser -----------------------------------------------------------------------------------
def normalise_job(
    payload: Any,
    *,
    origin: Origin = Origin.POLL,
    job: str | None = None,
    model: str | None = None,
    prompt: str | None = None,
) -> list[Observation]:
    """Observations for one Job payload. `job`, `model`, `prompt`: what the caller already knows
    (the id it polled, what it submitted), used where the payload is silent."""
    try:
        return _normalise(payload, origin, job, model, prompt)
    except Exception as exc:  # a safety net: the readers above are total, but a crash here must not kill polling
        return [diagnostic(payload, f"unreadable Apiframe job ({type(exc).__name__})", origin=origin, job=job)]


def normalise_accepted(payload: Any, *, model: str | None, prompt: str | None) -> list[Observation]:
    """The 202 answer to `POST /v2/images/generate`: `{"jobId","status":"QUEUED"}`.

    An idempotent replay may answer with a later status but without the result; a terminal state from it
    would reach subscribers with no outputs, so it becomes a LOG line and the next poll reports the end.
    """
    state = state_of(payload)
    if state is not None and state.terminal:
        return [
            Observation(
                provider=PROVIDER,
                job=job_id_of(payload),
                kind=Kind.LOG,
                upstream=status_of(payload) or "",
                origin=Origin.REQUEST,
                model=model,
                message=f"idempotent replay: the job is already {status_of(payload)}; polling for the details",
                raw=scrub(payload),
            )
        ]
    return normalise_job(payload, origin=Origin.REQUEST, model=model, prompt=prompt)


def normalise_webhook(payload: Any) -> list[Observation]:
    """A webhook body (`{"event":"completed","jobId",...}`): a Job by another road, pushed."""
    return normalise_job(payload, origin=Origin.PUSH)


def diagnostic(payload: Any, message: str, *, origin: Origin = Origin.POLL, job: str | None = None) -> Observation:
    return Observation(
        provider=PROVIDER,
        job=job,
        kind=Kind.DIAGNOSTIC,
        upstream="apiframe.unreadable",
        origin=origin,
        message=message,
        raw=scrub(payload),
    )


def _normalise(
    payload: Any, origin: Origin, job_hint: str | None, model_hint: str | None, prompt_hint: str | None
) -> list[Observation]:
    if not isinstance(payload, Mapping):
        return [
            diagnostic(
                payload, f"Apiframe sent {type(payload).__name__}, not a job object", origin=origin, job=job_hint
            )
        ]
    job = job_id_of(payload) or job_hint
    status = status_of(payload)
    if job is None:
        return [diagnostic(payload, "Apiframe job without an id", origin=origin)]
    if status is None:
        return [diagnostic(payload, "Apiframe job without a status", origin=origin, job=job)]
    raw = scrub(payload)
    model = payload.get("model") if isinstance(payload.get("model"), str) and payload.get("model") else model_hint
    given = payload.get("input")
    prompt = given.get("prompt") if isinstance(given, Mapping) and isinstance(given.get("prompt"), str) else None
    common: dict[str, Any] = {
        "provider": PROVIDER,
        "job": job,
        "upstream": status,
        "origin": origin,
        "model": model,
        "prompt": prompt or prompt_hint,
        "raw": raw,
    }
    state = STATES.get(status.strip().upper())
    if state is None:
        return [
            Observation(
                kind=Kind.DIAGNOSTIC,
                message=f"unknown Apiframe status {status!r}; still polling",
                **common,
            )
        ]
    cost = cost_of(payload.get("creditCost"))
    if state is State.QUEUED:
        return [Observation(kind=Kind.STATE, state=state, at=time_of(payload.get("createdAt")), **common)]
    if state is State.RUNNING:
        out = [Observation(kind=Kind.STATE, state=state, **common)]
        percent = progress_of(payload.get("progress"))
        if percent is not None:
            out.append(Observation(kind=Kind.PROGRESS, progress=Progress(percent=percent), **common))
        return out
    done_at = time_of(payload.get("completedAt"))
    if state is State.COMPLETED:
        outputs, understood = outputs_of(payload.get("result"))
        out = [Observation(kind=Kind.STATE, state=state, outputs=outputs, cost=cost, at=done_at, **common)]
        if not understood or payload.get("result") is None:
            note = f"COMPLETED with a result streamd cannot read: {_compact(payload.get('result'))}"
            out.append(Observation(kind=Kind.DIAGNOSTIC, message=note, **common))
        if payload.get("expired") is True:
            out.append(
                Observation(
                    kind=Kind.EXPIRED,
                    outputs=outputs,
                    message="output URLs expired: Apiframe purged the files from its CDN",
                    **{**common, "upstream": "expired"},
                )
            )
        return out
    error = error_of(payload.get("error"))
    return [Observation(kind=Kind.STATE, state=state, error=error, cost=cost, at=done_at, **common)]


# -- the job list -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Page:
    """One page of `GET /v2/jobs`: `{"jobs": [...], "nextCursor", "hasMore"}`."""

    jobs: tuple[Mapping[str, Any], ...]
    cursor: str | None
    more: bool
    problem: str | None = None  # set when the page could not be read


def job_page(payload: Any) -> Page:
    if not isinstance(payload, Mapping):
        return Page((), None, False, f"job list is {type(payload).__name__}, not an object")
    items: Any = None
    for key in ("jobs", "data", "items"):
        if key in payload:
            items = payload[key]
            break
    if not isinstance(items, Sequence) or isinstance(items, str):
        return Page((), None, False, "job list without a `jobs` array")
    jobs = tuple(item for item in items if isinstance(item, Mapping) and job_id_of(item))
    cursor = payload.get("nextCursor")
    cursor = cursor if isinstance(cursor, str) and cursor else None
    more = payload.get("hasMore")
    skipped = len(items) - len(jobs)
    problem = f"{skipped} unreadable entries in the job list" if skipped else None
    return Page(jobs, cursor, bool(more) if isinstance(more, bool) else cursor is not None, problem)
