"""Oxen payloads → Observations. Pure and total: nothing here raises or does I/O.

Oxen speaks in two places: the queue (`GET /api/ai/queue/{id}`, the list, the enqueue answer),
whose `status` is one of queued/processing/succeeded/failed/cancelled, and the account's SSE
stream, which only ever says `media_generation_completed` (succeeded or failed). Older API
versions used `model` instead of `model_name`; both are read. Anything unreadable becomes one
`Kind.DIAGNOSTIC` observation, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from streamd.events import K_STATE, O_PUSH, Kind, Observation, Origin, State, loads, scrub, scrub_decoded, scrub_text

PROVIDER = "oxen"
COMPLETED_EVENT = "media_generation_completed"
SYNC_UPSTREAM = "images/generate"

STATES: dict[str, State] = {
    "queued": State.QUEUED,
    "processing": State.RUNNING,
    "succeeded": State.COMPLETED,
    "failed": State.FAILED,
    "cancelled": State.CANCELLED,
}
MAX_MESSAGE = 300


def _short(value: Any) -> str:
    """A message for people: one line, bounded, and with any credential in it (messages quote payloads) removed."""
    text = value if isinstance(value, str) else repr(value)
    text = scrub_text(" ".join(text.split()))
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def diagnostic(message: str, *, raw: Any, origin: Origin, job: str | None = None, upstream: str = "") -> Observation:
    return Observation(
        provider=PROVIDER,
        job=job,
        kind=Kind.DIAGNOSTIC,
        upstream=upstream or "unreadable",
        origin=origin,
        message=_short(message),
        raw=scrub(raw),
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    return None


def _error(value: Any) -> str | None:
    """`error_message` / `error` may be a string or an object with a message."""
    if value is None:  # the common case, before the (slow) ABC check
        return None
    if isinstance(value, Mapping):
        for key in ("message", "detail", "title", "type"):
            if (text := _text(value.get(key))) is not None:
                return text
        return None
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else _short(value)


def _timestamp(value: Any) -> float | None:
    """Unix seconds (Oxen's form); an ISO 8601 string is accepted too, just in case."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _outputs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()


def _json(data: str | bytes | Any) -> Any:
    if isinstance(data, str | bytes):
        return loads(data)
    return data


# -- SSE ---------------------------------------------------------------------------------------------
def from_sse(event: str, data: str) -> list[Observation]:
    """One SSE event. Only `media_generation_completed` is about a job; the stream is account-wide and
    may carry other event types (deployments), which become job-less log observations."""
    try:
        return _from_sse(event, data)
    except Exception as exc:  # total by contract: a bug here must not kill the stream
        return [diagnostic(f"could not read SSE event {event!r}: {exc!r}", raw=data, origin=Origin.PUSH)]


def _from_sse(event: str, data: str) -> list[Observation]:
    try:
        payload: Any = loads(data)
    except ValueError:
        payload = None
    if event != COMPLETED_EVENT:
        return [
            Observation(
                provider=PROVIDER,
                job=None,
                kind=Kind.LOG,
                upstream=event or "message",
                origin=Origin.PUSH,
                message=_short(f"unrelated event {event!r}: {data}"),
                raw=scrub(payload if payload is not None else data),
            )
        ]
    if type(payload) is not dict and not isinstance(payload, Mapping):  # (the ABC check is slow)
        return [diagnostic(f"{COMPLETED_EVENT} data is not a JSON object: {data}", raw=data, origin=Origin.PUSH)]
    job = _text(payload.get("generation_id"))
    if job is None:
        return [diagnostic(f"{COMPLETED_EVENT} without a generation_id", raw=payload, origin=Origin.PUSH)]
    status = payload.get("status")
    state = STATES.get(status) if isinstance(status, str) else None
    if state is None:
        return [
            diagnostic(
                f"{COMPLETED_EVENT} with unknown status {status!r}",
                raw=payload,
                origin=Origin.PUSH,
                job=job,
                upstream=COMPLETED_EVENT,
            )
        ]
    return [
        Observation(
            provider=PROVIDER,
            job=job,
            kind=K_STATE,
            upstream=COMPLETED_EVENT,
            origin=O_PUSH,
            state=state,
            model=_text(payload.get("model_name")) or _text(payload.get("model")),
            outputs=_outputs(payload.get("url")) or _outputs(payload.get("result_url")),
            error=_error(payload.get("error")) or _error(payload.get("error_message")),
            raw=scrub_decoded(payload, data),
        )
    ]


# -- the queue ---------------------------------------------------------------------------------------
def from_item(payload: Any, *, origin: Origin = Origin.POLL) -> list[Observation]:
    """One queue item (`GET /api/ai/queue/{id}`, or an element of the list)."""
    try:
        return _from_item(_json(payload), origin)
    except Exception as exc:
        return [diagnostic(f"could not read queue item: {exc!r}", raw=_raw_text(payload), origin=origin)]


def _raw_text(payload: Any) -> Any:
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload


def _from_item(item: Any, origin: Origin) -> list[Observation]:
    if not isinstance(item, Mapping):
        return [diagnostic(f"queue item is not an object: {item!r}", raw=item, origin=origin)]
    job = _text(item.get("generation_id")) or _text(item.get("id"))
    if job is None:
        return [diagnostic("queue item without a generation_id", raw=item, origin=origin)]
    status = item.get("status")
    state = STATES.get(status) if isinstance(status, str) else None
    if state is None:
        return [
            diagnostic(
                f"unknown queue status {status!r}",
                raw=item,
                origin=origin,
                job=job,
                upstream=status if isinstance(status, str) else "",
            )
        ]
    assert isinstance(status, str)
    if state is State.QUEUED:
        at = _timestamp(item.get("enqueued_at"))
    elif state is State.RUNNING:
        at = _timestamp(item.get("started_at")) or _timestamp(item.get("enqueued_at"))
    else:
        at = _timestamp(item.get("completed_at"))
    return [
        Observation(
            provider=PROVIDER,
            job=job,
            kind=Kind.STATE,
            upstream=status,
            origin=origin,
            state=state,
            model=_text(item.get("model_name")) or _text(item.get("model")),
            prompt=_text(item.get("prompt")),
            outputs=_outputs(item.get("result_url")) or _outputs(item.get("url")),
            error=_error(item.get("error_message")) or _error(item.get("error")),
            raw=scrub(item),
            at=at,
        )
    ]


def from_list(payload: Any) -> list[Observation]:
    """`GET /api/ai/queue`: `{"count": N, "generations": [...]}`; a bad item spoils only itself."""
    try:
        body = _json(payload)
        items = body.get("generations") if isinstance(body, Mapping) else None
        if not isinstance(items, list):
            return [diagnostic("queue list without a generations array", raw=body, origin=Origin.POLL)]
        return [obs for item in items for obs in from_item(item, origin=Origin.POLL)]
    except Exception as exc:
        return [diagnostic(f"could not read queue list: {exc!r}", raw=_raw_text(payload), origin=Origin.POLL)]


def from_enqueue(payload: Any, *, model: str | None = None, prompt: str | None = None) -> list[Observation]:
    """`POST /api/ai/queue`: `{"generations": [{"generation_id", "status"}, ...]}`, one QUEUED each.

    Before 2026-05-11 the answer said `processing` for a job that had only just been accepted; it
    is read as QUEUED (upstream keeps the word), since the job cannot have started yet.
    """
    try:
        body = _json(payload)
        items = body.get("generations") if isinstance(body, Mapping) else None
        if not isinstance(items, list) or not items:
            return [diagnostic("enqueue answer without generations", raw=body, origin=Origin.REQUEST)]
        out: list[Observation] = []
        for item in items:
            job = _text(item.get("generation_id")) if isinstance(item, Mapping) else None
            if job is None:
                out.append(diagnostic("enqueued generation without an id", raw=item, origin=Origin.REQUEST))
                continue
            status = item.get("status")
            state = STATES.get(status) if isinstance(status, str) else State.QUEUED
            if state in (None, State.RUNNING):
                state = State.QUEUED
            out.append(
                Observation(
                    provider=PROVIDER,
                    job=job,
                    kind=Kind.STATE,
                    upstream=status if isinstance(status, str) else "queued",
                    origin=Origin.REQUEST,
                    state=state,
                    model=_text(item.get("model_name")) or _text(item.get("model")) or model,
                    prompt=_text(item.get("prompt")) or prompt,
                    raw=scrub(item),
                    at=_timestamp(item.get("enqueued_at")),
                )
            )
        return out
    except Exception as exc:
        return [diagnostic(f"could not read enqueue answer: {exc!r}", raw=_raw_text(payload), origin=Origin.REQUEST)]


def enqueued_ids(observations: list[Observation]) -> list[str]:
    return [o.job for o in observations if o.kind is Kind.STATE and o.job is not None]


# -- the synchronous endpoint ------------------------------------------------------------------------
def sync_started(job: str, *, model: str, prompt: str) -> Observation:
    """`POST /api/ai/images/generate` blocks while it runs; streamd reports it as running meanwhile."""
    return Observation(
        provider=PROVIDER,
        job=job,
        kind=Kind.STATE,
        upstream=SYNC_UPSTREAM,
        origin=Origin.REQUEST,
        state=State.RUNNING,
        model=model,
        prompt=prompt,
    )


def sync_failed(job: str, error: str, *, raw: Any = None) -> Observation:
    return Observation(
        provider=PROVIDER,
        job=job,
        kind=Kind.STATE,
        upstream=SYNC_UPSTREAM,
        origin=Origin.REQUEST,
        state=State.FAILED,
        error=_short(error),
        raw=scrub(raw),
    )


def from_sync(job: str, payload: Any, *, model: str | None = None) -> list[Observation]:
    """The synchronous answer `{"model","created","images":[{"url"}|{"b64_json"}]}` → COMPLETED.

    Inline `b64_json` images are not URLs: they are counted in the message and cut from `raw`.
    """
    try:
        body = _json(payload)
        images = body.get("images") if isinstance(body, Mapping) else None
        if not isinstance(images, list):
            return [
                diagnostic("generate answer without images", raw=body, origin=Origin.REQUEST, job=job),
                sync_failed(job, "the synchronous answer had no images", raw=body),
            ]
        urls = tuple(u for i in images if isinstance(i, Mapping) and (u := _text(i.get("url"))) is not None)
        inline = sum(1 for i in images if isinstance(i, Mapping) and i.get("b64_json"))
        raw = dict(body)
        raw["images"] = [_cut_inline(i) for i in images]
        return [
            Observation(
                provider=PROVIDER,
                job=job,
                kind=Kind.STATE,
                upstream=SYNC_UPSTREAM,
                origin=Origin.REQUEST,
                state=State.COMPLETED,
                model=_text(body.get("model")) or model,
                outputs=urls,
                message=f"{inline} image(s) returned inline as b64_json, not kept" if inline else None,
                raw=scrub(raw),
                at=_timestamp(body.get("created")),
            )
        ]
    except Exception as exc:
        return [
            diagnostic(f"could not read generate answer: {exc!r}", raw=_raw_text(payload), origin=Origin.REQUEST),
            sync_failed(job, "the synchronous answer could not be read"),
        ]


def _cut_inline(image: Any) -> Any:
    if isinstance(image, Mapping) and isinstance(image.get("b64_json"), str):
        return {**image, "b64_json": f"[{len(image['b64_json'])} base64 characters]"}
    return image
