"""Wiro payloads → `Observation`s. Pure and total: nothing here raises or does I/O.

Two sources: socket frames (`{"type", "id", "tasktoken", "message", "result"}`) and `/Task/Detail`
task records. The socket never says whether a task succeeded (`task_postprocess_end` carries the
outputs but no `pexit`), so the provider passes the Detail record in; without it the frame is
reported as postprocessing-with-outputs and the poller settles the verdict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from streamd.events import REDACTED, Kind, Observation, Origin, Progress, State, loads, scrub

PROVIDER = "wiro"
EXTRA_SECRETS = frozenset({"accesskey"})
MAX_TEXT = 4000  # longest log text kept in an Observation (full logs keep their tail)

#: Socket frame / Detail status → state, for the statuses that move a task.
STATE_OF: dict[str, State] = {
    "task_queue": State.QUEUED,
    "task_accept": State.ACCEPTED,
    "task_assign": State.ACCEPTED,
    "task_preprocess_start": State.PREPROCESSING,
    "task_preprocess_end": State.PREPROCESSING,
    "task_start": State.RUNNING,
    "task_end": State.POSTPROCESSING,
    "task_postprocess_start": State.POSTPROCESSING,
    "task_cancel": State.CANCELLED,
}
#: Socket frames that are logs or progress, never a state change.
LOG_TYPES = frozenset(
    {"task_output", "task_error", "task_output_full", "task_error_full", "task_stream_ready", "task_stream_end"}
)
#: Detail statuses that only a running task reports (the DB keeps the last socket type).
RUNNING_STATUSES = frozenset({"task_output", "task_output_full", "task_error_full", "task_stream_ready"})
#: Statuses after which a task never changes, as seen by `/Task/Detail` (task_error is fatal there).
TERMINAL_STATUSES = frozenset({"task_postprocess_end", "task_cancel", "task_error"})

#: Detail timestamps, in lifecycle order, used to rebuild the transitions a client missed.
_HISTORY: tuple[tuple[State, str, tuple[str, ...]], ...] = (
    (State.QUEUED, "task_queue", ("createtime",)),
    (State.ACCEPTED, "task_accept", ("accepttime", "assigntime")),
    (State.PREPROCESSING, "task_preprocess_start", ("preprocessstarttime",)),
    (State.RUNNING, "task_start", ("starttime",)),
    (State.POSTPROCESSING, "task_postprocess_start", ("postprocessstarttime", "endtime")),
)
#: Which Detail timestamp says when a task entered its current status.
_WHEN: dict[str, tuple[str, ...]] = {
    "task_queue": ("createtime",),
    "task_accept": ("accepttime",),
    "task_assign": ("assigntime", "accepttime"),
    "task_preprocess_start": ("preprocessstarttime",),
    "task_preprocess_end": ("preprocessendtime",),
    "task_start": ("starttime",),
    "task_end": ("endtime",),
    "task_postprocess_start": ("postprocessstarttime",),
    "task_postprocess_end": ("postprocessendtime", "endtime"),
    "task_cancel": ("canceltime",),
}
_ORDER = [State.QUEUED, State.ACCEPTED, State.PREPROCESSING, State.RUNNING, State.POSTPROCESSING]


def decode(message: str | bytes) -> Any:
    """A socket message as JSON, or the message itself when it is not JSON (the normaliser reports it)."""
    try:
        return loads(message)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return message


def diagnostic(what: str, raw: Any, *, job: str | None = None, origin: Origin = Origin.PUSH) -> Observation:
    return Observation(
        provider=PROVIDER,
        job=job,
        kind=Kind.DIAGNOSTIC,
        upstream="unreadable",
        origin=origin,
        message=what,
        raw=_safe_raw(raw),
    )


def frame_observations(
    frame: Any, *, job: str | None = None, task: Any = None, origin: Origin = Origin.PUSH
) -> list[Observation]:
    """Observations for one socket frame. `job` names the task when the frame has no `id`;
    `task` is the task's `/Task/Detail` record, which decides `task_postprocess_end`."""
    try:
        return _frame(frame, job, task, origin)
    except Exception as exc:  # the normaliser is total: a surprise becomes a diagnostic
        return [diagnostic(f"could not read Wiro frame ({type(exc).__name__})", frame, job=job, origin=origin)]


def detail_observations(task: Any, *, origin: Origin = Origin.POLL, history: bool = True) -> list[Observation]:
    """Observations for one `/Task/Detail` task record: its current state, preceded (when `history`)
    by the earlier states its timestamps prove, so a poll restores transitions the socket lost."""
    try:
        return _detail(task, origin, history)
    except Exception as exc:
        return [diagnostic(f"could not read Wiro task record ({type(exc).__name__})", task, origin=origin)]


# -- frames -----------------------------------------------------------------------------------------
def _frame(frame: Any, job: str | None, task: Any, origin: Origin) -> list[Observation]:
    if isinstance(frame, bytes | bytearray):
        return [diagnostic(f"binary socket frame of {len(frame)} bytes", {"binary": len(frame)}, job=job)]
    if isinstance(frame, str):
        return [diagnostic("socket frame is not JSON", frame[:MAX_TEXT], job=job, origin=origin)]
    if not isinstance(frame, Mapping):
        return [diagnostic("socket frame is not a JSON object", frame, job=job, origin=origin)]
    kind = frame.get("type")
    if not isinstance(kind, str) or not kind:
        return [diagnostic("socket frame has no type", frame, job=job, origin=origin)]
    if kind == "connected":  # a connection-level greeting; the provider notes it
        return []
    if kind == "error":
        text = _text(frame.get("message")) or "error"
        return [_obs(None, Kind.DIAGNOSTIC, "error", origin, frame, message=f"Wiro socket error: {text}")]
    ident = scalar(frame.get("id")) or job
    message = frame.get("message")
    if kind in STATE_OF:
        return [_obs(ident, Kind.STATE, kind, origin, frame, state=STATE_OF[kind])]
    if kind == "task_postprocess_end":
        return [_postprocess_end(ident, frame, task, origin)]
    if kind == "task_output":
        return [_output(ident, message, frame, origin)]
    if kind in LOG_TYPES:
        text = _log_text(message)
        full = kind.endswith("_full")
        return [_obs(ident, Kind.LOG, kind, origin, frame, message=_clip(text, tail=full) or None)]
    if kind == "task_cost":
        cost = _money(message.get("totalcost") if isinstance(message, Mapping) else message)
        return [_obs(ident, Kind.LOG, kind, origin, frame, cost=cost, message=_clip(_log_text(message)) or None)]
    return [_obs(ident, Kind.DIAGNOSTIC, kind, origin, frame, message=f"unknown Wiro frame type {kind!r}")]


def _output(job: str | None, message: Any, frame: Mapping[str, Any], origin: Origin) -> Observation:
    if isinstance(message, Mapping) and message.get("type") == "progressGenerate":
        progress = Progress(
            percent=_clamp(_float(message.get("percentage"))),
            step=_int(message.get("stepCurrent")),
            steps=_int(message.get("stepTotal")),
            eta=_duration(message.get("remainingTime")),
        )
        note = scalar(message.get("task")) or None
        return _obs(job, Kind.PROGRESS, "task_output", origin, frame, progress=progress, message=note)
    return _obs(job, Kind.LOG, "task_output", origin, frame, message=_clip(_log_text(message)) or None)


def _postprocess_end(job: str | None, frame: Mapping[str, Any], task: Any, origin: Origin) -> Observation:
    details: Mapping[str, Any] = task if isinstance(task, Mapping) else {}
    pexit = scalar(frame.get("pexit"))
    if not pexit and scalar(details.get("status")) == "task_postprocess_end":
        pexit = scalar(details.get("pexit"))  # a Detail record that lags the socket gives no verdict
    outputs = _outputs(frame.get("message")) or _outputs(details.get("outputs"))
    kw: dict[str, Any] = {"outputs": outputs, **_task_facts(details)}
    if not pexit:
        state = State.POSTPROCESSING
    elif pexit == "0":
        state, kw["message"] = State.COMPLETED, _llm_answer(frame.get("message"))
    else:
        state, kw["error"] = State.FAILED, _failure(details, pexit)
    return _obs(job, Kind.STATE, "task_postprocess_end", origin, frame, state=state, **kw)


# -- Task/Detail ------------------------------------------------------------------------------------
def _detail(task: Any, origin: Origin, history: bool) -> list[Observation]:
    if not isinstance(task, Mapping):
        return [diagnostic("Wiro task record is not a JSON object", task, origin=origin)]
    job = scalar(task.get("id"))
    status = scalar(task.get("status"))
    if not job:
        return [diagnostic("Wiro task record has no id", task, origin=origin)]
    if not status:
        return [diagnostic("Wiro task record has no status", task, job=job, origin=origin)]
    facts = _task_facts(task)
    outputs = _outputs(task.get("outputs"))
    at = _time(task, *_WHEN.get(status, ()))
    final: Observation
    if status == "task_postprocess_end":
        pexit = scalar(task.get("pexit"))
        ok = pexit == "0" or (not pexit and bool(outputs))
        final = _obs(
            job, Kind.STATE, status, origin, task, state=State.COMPLETED if ok else State.FAILED, outputs=outputs,
            error=None if ok else _failure(task, pexit), at=at, **facts,
        )  # fmt: skip
    elif status == "task_error":
        final = _obs(job, Kind.STATE, status, origin, task, state=State.FAILED, error=_failure(task, ""), **facts)
    elif status in STATE_OF:
        final = _obs(job, Kind.STATE, status, origin, task, state=STATE_OF[status], outputs=outputs, at=at, **facts)
    elif status in RUNNING_STATUSES:
        final = _obs(job, Kind.STATE, status, origin, task, state=State.RUNNING, at=at, **facts)
    else:
        note = f"unknown Wiro task status {status!r}"
        return [_obs(job, Kind.DIAGNOSTIC, status, origin, task, message=note, **facts)]
    if not history or final.state is None:
        return [final]
    earlier = []
    limit = _ORDER.index(final.state) if final.state in _ORDER else len(_ORDER)
    for state, upstream, fields in _HISTORY[:limit]:
        when = _time(task, *fields)
        if when is not None:
            slice_ = {"id": job, **{f: task.get(f) for f in fields}}
            earlier.append(_obs(job, Kind.STATE, upstream, origin, slice_, state=state, at=when, **facts))
    return [*earlier, final]


def _task_facts(task: Mapping[str, Any]) -> dict[str, Any]:
    """model ("owner/project"), prompt and cost from a Detail record (unknown values left out)."""
    facts: dict[str, Any] = {}
    owner, project = scalar(task.get("modelslugowner")), scalar(task.get("modelslugproject"))
    if owner and project:
        facts["model"] = f"{owner}/{project}"
    params = task.get("parameters")
    if isinstance(params, Mapping):
        prompt = scalar(params.get("prompt"))
        if prompt:
            facts["prompt"] = prompt
    cost = _money(task.get("totalcost"))
    if cost is not None and (cost > 0 or scalar(task.get("status")) in TERMINAL_STATUSES):
        facts["cost"] = cost  # "0" on a running task means "not billed yet", not "free"
    return facts


def _failure(task: Mapping[str, Any], pexit: str) -> str:
    """A one-line reason: the last line of the task's stderr, else its exit code."""
    text = scalar(task.get("debugerror")).strip()
    if text:
        return _clip(text.splitlines()[-1].strip(), tail=True)
    return f"task exited with code {pexit}" if pexit else "task failed before it ran"


# -- helpers -----------------------------------------------------------------------------------------
def _obs(
    job: str | None, kind: Kind, upstream: str, origin: Origin, raw: Any, *, outputs: tuple[str, ...] = (), **kw: Any
) -> Observation:
    raw = _safe_raw(raw)
    return Observation(
        provider=PROVIDER, job=job, kind=kind, upstream=upstream, origin=origin, outputs=outputs, raw=raw, **kw
    )


def _safe_raw(raw: Any) -> Any:
    """scrub() plus a guard for payloads too odd to serve (deep nesting, non-JSON types)."""
    try:
        cleaned = _redact(scrub(raw))
        json.dumps(cleaned)
    except (TypeError, ValueError, RecursionError):
        return {"unserialisable": type(raw).__name__}
    return cleaned


def _redact(raw: Any) -> Any:
    """Wiro-specific credentials that `events.scrub` does not know: output files' `accesskey`."""
    if isinstance(raw, dict):
        return {k: REDACTED if str(k).lower() in EXTRA_SECRETS else _redact(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_redact(v) for v in raw]
    return raw


def _outputs(message: Any) -> tuple[str, ...]:
    if not isinstance(message, list):
        return ()
    urls = [item.get("url") for item in message if isinstance(item, Mapping)]
    return tuple(u for u in urls if isinstance(u, str) and u)


def _llm_answer(message: Any) -> str | None:
    """LLM tasks end with `[{contenttype: "raw", content: {answer, ...}}]` instead of files."""
    if isinstance(message, list):
        for item in message:
            if isinstance(item, Mapping) and isinstance(item.get("content"), Mapping):
                return _clip(_log_text(item["content"])) or None
    return None


def _log_text(message: Any) -> str:
    """Text of a log payload: a string, `{raw}`, or an LLM `{answer[], raw}` (full accumulated text)."""
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    if isinstance(message, Mapping):
        answer = message.get("answer")
        if isinstance(answer, list) and answer:
            return "".join(str(a) for a in answer)
        if isinstance(answer, str) and answer:
            return answer
        raw = message.get("raw")
        if isinstance(raw, str):
            return raw
    return _text(message)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(scrub(value), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return repr(type(value))


def _clip(text: str, *, tail: bool = False) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return "…" + text[-MAX_TEXT:] if tail else text[:MAX_TEXT] + "…"


def scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float):
        return str(value)
    return ""


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip().rstrip("%"))
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number >= 0 else None


def _clamp(percent: float | None) -> float | None:
    return None if percent is None else min(max(percent, 0.0), 100.0)


def _money(value: Any) -> float | None:
    number = _float(value)
    return number if number is not None and number >= 0 else None


def _duration(value: Any) -> float | None:
    """Seconds from "12", "12.5s", "01:05" or "1:02:03" (Wiro sends strings; the format varies)."""
    text = scalar(value).strip().rstrip("s")
    if not text:
        return None
    if ":" in text:
        total = 0.0
        for part in text.split(":"):
            number = _float(part)
            if number is None:
                return None
            total = total * 60 + number
        return total if total >= 0 else None
    number = _float(text)
    return number if number is not None and number >= 0 else None


def _time(task: Mapping[str, Any], *fields: str) -> float | None:
    """The first of `fields` that holds a real unix time (Wiro writes "0" for "not yet")."""
    for field in fields:
        number = _float(task.get(field))
        if number is not None and number > 0:
            return number
    return None
