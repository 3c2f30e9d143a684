"""Runware frames to `Observation`s. Pure: no I/O, no clock; total: never raises.

Runware answers every request, over the WebSocket and over REST alike, with an envelope:
`{"data": [...]}` and/or `{"errors": [...]}`, each entry naming its `taskUUID`; old servers send a
single `{"error": true, "errorId": .., "errorMessage": ..}` instead. A job is one `imageInference`
task (its `taskUUID` is the job id) with `numberResults` items, so the reader must count items:
that per-task memory is the `Batch`, and `Normaliser` is a small state machine over batches.

Mapping (lifecycle.md, and the choices where Runware's docs are vague):

| Runware says | observation |
|---|---|
| acknowledgement of an async task (`imageInference` echo with no result) | QUEUED, origin request |
| getResponse `queued` / `waiting` / `scheduled` | QUEUED (the generation has not started) |
| getResponse `processing`, and `pending` (the older docs' name for the same thing) | RUNNING |
| a result item (pushed, or getResponse `success`) | PROGRESS (items in / numberResults), COMPLETED when all are in(*) |
| getResponse `error`, an `errors[]` entry, a legacy `error` frame naming the task | FAILED with the message |
| `errors[]` with a not-found code | DIAGNOSTIC (the task is unknown upstream; no state) |
| anything else | DIAGNOSTIC, never dropped, never a crash |

(*): a task restored after a crash that lost its numberResults is unsized: its items are PROGRESS with no
total, and it completes only once getResponse, which lists every generation, has said how many.

COMPLETED carries every output URL and the summed `cost`. Items are keyed by `imageUUID`, so an
item delivered twice (resumed session and getResponse repair) counts once, and COMPLETED is
produced exactly once per task.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamd.events import Kind, Observation, Origin, Progress, State, is_clean, loads, scrub

PROVIDER = "runware"

QUEUED_STATUSES = frozenset({"queued", "waiting", "scheduled"})
RUNNING_STATUSES = frozenset({"processing", "pending"})
SUCCESS_STATUSES = frozenset({"success", "succeeded", "completed"})
ERROR_STATUSES = frozenset({"error", "failed"})

AUTH_CODES = frozenset({"invalidApiKey", "missingApiKey", "unauthorized", "apiKeyRevoked"})
NOT_FOUND_CODES = frozenset({"taskNotFound", "taskUUIDNotFound", "notFound"})
LEGACY_AUTH_ERROR_IDS = frozenset({19})

RESULT_FIELDS = frozenset({"imageUUID", "imageURL", "imageBase64Data", "imageDataURI"})  # an entry with any is a result
MAX_RAW_TEXT = 2000
_KEY_IN_TEXT = re.compile(r'("apiKey"\s*:\s*)"[^"]*"', re.IGNORECASE)


@dataclass
class Item:
    key: str
    url: str | None
    cost: float | None


@dataclass
class Batch:
    """One `imageInference` task: how many items it promised and which have arrived."""

    task: str
    expected: int | None = None  # numberResults; None until known (a task tracked from elsewhere)
    # Its size is unknown and must come from getResponse, not from Runware's default of one: a task this
    # daemon submitted and followed, restored after a crash that lost its numberResults.
    unsized: bool = False
    model: str | None = None
    prompt: str | None = None
    items: dict[str, Item] = field(default_factory=dict)  # (add them with `add`)
    done: bool = False  # a terminal observation has been produced
    # What every observation of the task carries, kept up to date by `add` rather than recomputed
    # over the items for each observation: the URLs in arrival order, the summed cost.
    outputs: tuple[str, ...] = ()
    cost: float | None = None
    _costs: float = 0.0  # the costs summed in arrival order, unrounded (as `sum` would)

    def add(self, item: Item) -> bool:
        """Count an item once: False if one with its key has arrived already."""
        if item.key in self.items:
            return False
        self.items[item.key] = item
        if item.url:
            self.outputs = (*self.outputs, item.url)
        if item.cost is not None:
            self._costs += item.cost
            self.cost = round(self._costs, 10)
        return True

    @property
    def total(self) -> int:
        return max(self.expected or 1, 1)

    def items_json(self) -> str:
        """The arrived items, for `Context.remember`, so a restarted daemon keeps counting."""
        return json.dumps([[i.key, i.url, i.cost] for i in self.items.values()], separators=(",", ":"))


@dataclass(eq=False)
class Reading:
    """What one frame said: observations for the tracker, and facts for the I/O layer. (Compared by
    identity: the provider takes a particular one back out of its queue.)"""

    observations: list[Observation] = field(default_factory=list)
    session: str | None = None  # connectionSessionUUID from an authentication reply
    auth_error: str | None = None  # why authentication failed, for people (no secrets)
    pong: bool = False
    acked: set[str] = field(default_factory=set)  # tasks acknowledged
    rejected: dict[str, str] = field(default_factory=dict)  # tasks that failed here -> message (a refusal, to submit)
    missing: set[str] = field(default_factory=set)  # tasks getResponse does not know
    heard: set[str] = field(default_factory=set)  # tasks this frame said anything about
    new_items: set[str] = field(default_factory=set)  # tasks that gained result items
    finished: set[str] = field(default_factory=set)  # tasks that reached a terminal state here
    answered: set[str] = field(default_factory=set)  # tasks a getResponse answer covered (found or not)


_TEXT_TYPES = (str, bytes, bytearray, memoryview)


def decode(payload: Any) -> tuple[Any, str | None]:
    """JSON text or bytes to Python data; already-decoded data passes through."""
    if isinstance(payload, _TEXT_TYPES):
        try:
            return loads(bytes(payload) if isinstance(payload, memoryview) else payload), None
        except ValueError as exc:
            return None, f"not JSON: {exc}"
    return payload, None


def redact_text(text: str) -> str:
    """An unreadable frame kept as text, with any `"apiKey": "..."` value removed, bounded."""
    return _KEY_IN_TEXT.sub(r'\1"[redacted]"', text[:MAX_RAW_TEXT])


def parse_items(text: str) -> list[Item]:
    """Inverse of `Batch.items_json`; bad input gives no items rather than an error."""
    data, problem = decode(text)
    out: list[Item] = []
    if problem or not isinstance(data, list):
        return out
    for row in data:
        if isinstance(row, list) and len(row) == 3 and isinstance(row[0], str):
            url = row[1] if isinstance(row[1], str) else None
            cost = float(row[2]) if isinstance(row[2], int | float) and not isinstance(row[2], bool) else None
            out.append(Item(row[0], url, cost))
    return out


def _text(payload: Any) -> str:
    return payload if isinstance(payload, str) else bytes(payload).decode("utf-8", "replace")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


_COST_TYPES = (int, float, str)  # (a tuple: isinstance with `int | float | str` builds the union every call)


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, _COST_TYPES):
        return None
    try:
        cost = float(value)
    except ValueError:
        return None
    return cost if math.isfinite(cost) and cost >= 0 else None


def _message(entry: Mapping[str, Any]) -> str:
    for key in ("message", "errorMessage", "error", "detail"):
        value = entry.get(key)
        if isinstance(value, str) and value:
            return value
    code = _str(entry.get("code"))
    return f"Runware error {code}" if code else "Runware reported an error without a message"


class Normaliser:
    """Frames in, `Reading`s out. Holds one `Batch` per task it has heard of; nothing else."""

    def __init__(self, provider: str = PROVIDER, *, keep_finished: int = 10_000) -> None:
        self.provider = provider
        self.batches: dict[str, Batch] = {}
        # Finished batches stay a while so late duplicates (resume buffer, repair polls) are
        # recognised, not read as new jobs; the oldest go once there are more than this many.
        self._finished: deque[str] = deque()
        self._keep_finished = keep_finished
        # True while reading a frame whose text holds nothing scrub would change: its parts go out as raw
        # without a walk of each (see events.is_clean).
        self._clean = False

    # -- batch bookkeeping -----------------------------------------------------------------------
    def expect(
        self,
        task: str,
        *,
        number_results: int | None,
        model: str | None = None,
        prompt: str | None = None,
        items: Iterable[Item] = (),
        unsized: bool = False,
    ) -> Batch:
        batch = self.batches.get(task)
        if batch is None:
            batch = self.batches[task] = Batch(task)
        if number_results is not None:
            batch.expected = number_results
        elif unsized and batch.expected is None:
            batch.unsized = True
        batch.model = model or batch.model
        batch.prompt = prompt or batch.prompt
        for item in items:
            batch.add(item)
        return batch

    def forget(self, task: str) -> None:
        self.batches.pop(task, None)

    # -- reading ---------------------------------------------------------------------------------
    def feed(self, payload: Any, origin: Origin) -> Reading:
        """Read one frame (text, bytes, or decoded JSON). Never raises."""
        reading = Reading()
        try:
            self._clean = type(payload) in (str, bytes) and is_clean(payload)
            self._feed(payload, origin, reading)
        except Exception as exc:  # totality: a bug here must not kill the connection
            self._clean = False
            raw = redact_text(_text(payload)) if isinstance(payload, str | bytes) else payload
            reading.observations.append(self._diagnostic(None, origin, f"normaliser error: {exc!r}", raw))
        finally:
            self._clean = False
        while len(self._finished) > self._keep_finished:
            self.batches.pop(self._finished.popleft(), None)
        return reading

    def _feed(self, payload: Any, origin: Origin, reading: Reading) -> None:
        frame, problem = decode(payload)
        if problem is not None:
            reading.observations.append(self._diagnostic(None, origin, problem, redact_text(_text(payload))))
            return
        if not isinstance(frame, dict):
            reading.observations.append(self._diagnostic(None, origin, "frame is not a JSON object", frame))
            return
        data, errors = frame.get("data"), frame.get("errors")
        legacy_session = frame.get("newConnectionSessionUUID")
        understood = False
        if isinstance(legacy_session, dict) and _str(legacy_session.get("connectionSessionUUID")):
            reading.session = legacy_session["connectionSessionUUID"]
            understood = True
        if isinstance(data, list):
            self._data(data, origin, reading)
            understood = True
        if isinstance(errors, list):
            for entry in errors:
                self._error(entry, origin, reading)
            understood = True
        if "error" in frame and frame.get("error") not in (None, False) and not isinstance(errors, list):
            self._legacy(frame, origin, reading)
            understood = True
        if not understood:
            reading.observations.append(
                self._diagnostic(None, origin, "frame has neither data nor errors", frame),
            )

    def _data(self, data: list[Any], origin: Origin, reading: Reading) -> None:
        polls: dict[str, list[dict[str, Any]]] = {}
        for entry in data:
            if not isinstance(entry, dict):
                reading.observations.append(self._diagnostic(None, origin, "data entry is not an object", entry))
                continue
            task_type = entry.get("taskType")
            if task_type == "authentication":
                session = _str(entry.get("connectionSessionUUID"))
                if session:
                    reading.session = session
                else:
                    reading.observations.append(
                        self._diagnostic(None, origin, "authentication reply without a session", entry)
                    )
                continue
            if task_type == "ping":
                reading.pong = True
                continue
            task = _str(entry.get("taskUUID"))
            if task is None:
                reading.observations.append(self._diagnostic(None, origin, "data entry without taskUUID", entry))
                continue
            if "status" in entry or task_type == "getResponse":
                polls.setdefault(task, []).append(entry)
            elif task_type == "imageInference" and not RESULT_FIELDS.isdisjoint(entry):
                self._results(task, [entry], origin, reading, upstream="result")
            elif task_type == "imageInference":
                self._ack(task, entry, reading)
            else:
                reading.observations.append(
                    self._diagnostic(task, origin, f"unexpected taskType {task_type!r}", entry),
                )
        for task, entries in polls.items():
            self._poll(task, entries, reading)

    def _ack(self, task: str, entry: dict[str, Any], reading: Reading) -> None:
        batch = self._batch(task)
        reading.heard.add(task)
        reading.acked.add(task)
        if batch.done:
            return
        reading.observations.append(
            self._obs(batch, Kind.STATE, "acknowledgement", Origin.REQUEST, entry, state=State.QUEUED),
        )

    def _poll(self, task: str, entries: list[dict[str, Any]], reading: Reading) -> None:
        """One getResponse answer: one entry per generation, each with its own status."""
        batch = self._batch(task)
        reading.heard.add(task)
        reading.answered.add(task)
        if batch.expected is None or batch.expected < len(entries):
            batch.expected = len(entries)
        batch.unsized = False  # (one entry per generation: now it is known)
        successes: list[dict[str, Any]] = []
        running: dict[str, Any] | None = None
        queued: dict[str, Any] | None = None
        for entry in entries:
            status = entry.get("status")
            status = status.lower() if isinstance(status, str) else status
            if status in SUCCESS_STATUSES or (status is None and not RESULT_FIELDS.isdisjoint(entry)):
                successes.append(entry)
            elif status in ERROR_STATUSES:
                self._fail(batch, _message(entry), str(status), Origin.POLL, entry, reading)
            elif status in RUNNING_STATUSES:
                running = running or entry
            elif status in QUEUED_STATUSES:
                queued = queued or entry
            else:
                reading.observations.append(
                    self._diagnostic(task, Origin.POLL, f"unknown getResponse status {status!r}", entry),
                )
        if batch.done:
            if successes:
                self._results(task, successes, Origin.POLL, reading, upstream="success")
            return
        if running is not None:
            reading.observations.append(
                self._obs(batch, Kind.STATE, str(running["status"]), Origin.POLL, running, state=State.RUNNING),
            )
        elif queued is not None and not successes:
            reading.observations.append(
                self._obs(batch, Kind.STATE, str(queued["status"]), Origin.POLL, queued, state=State.QUEUED),
            )
        if successes:
            self._results(task, successes, Origin.POLL, reading, upstream="success")

    def _results(
        self, task: str, entries: list[dict[str, Any]], origin: Origin, reading: Reading, *, upstream: str
    ) -> None:
        batch = self._batch(task)
        reading.heard.add(task)
        for entry in entries:
            key = _str(entry.get("imageUUID")) or _str(entry.get("imageURL"))
            if key is None:
                digest = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()
                key = "sha256:" + digest[:32]
            if not batch.add(Item(key, _str(entry.get("imageURL")), _cost(entry.get("cost")))):
                continue  # delivered twice (resume buffer and repair poll): counted once
            reading.new_items.add(task)
            if batch.done:
                reading.observations.append(
                    self._obs(batch, Kind.LOG, upstream, origin, entry, message="result item after the task ended")
                )
                continue
            if not self._complete(batch, upstream, origin, entry, reading):
                reading.observations.append(
                    self._obs(batch, Kind.PROGRESS, upstream, origin, entry, progress=self._progress(batch))
                )
        if entries and not batch.done:
            # Every item was in already, counted while the batch was unsized (pushed by a resumed
            # session before the first getResponse of a task restored without its numberResults).
            self._complete(batch, upstream, origin, entries[-1], reading)

    def _complete(self, batch: Batch, upstream: str, origin: Origin, entry: Any, reading: Reading) -> bool:
        """COMPLETED once every promised item is in. An unsized batch is never complete: counting its
        pushed items against Runware's default of one image completed a multi-image task at its first."""
        if batch.unsized or len(batch.items) < batch.total:
            return False
        self._end(batch, reading)
        reading.observations.append(
            self._obs(batch, Kind.STATE, upstream, origin, entry, state=State.COMPLETED, progress=self._progress(batch))
        )
        return True

    @staticmethod
    def _progress(batch: Batch) -> Progress:
        done, total = len(batch.items), batch.total
        if batch.unsized:  # items in, of a number not known yet
            return Progress(step=done)
        return Progress(percent=round(100.0 * min(done, total) / total, 2), step=done, steps=total)

    def _error(self, entry: Any, origin: Origin, reading: Reading) -> None:
        if not isinstance(entry, dict):
            reading.observations.append(self._diagnostic(None, origin, "errors entry is not an object", entry))
            return
        code = _str(entry.get("code")) or "error"
        task = _str(entry.get("taskUUID"))
        task_type = entry.get("taskType")
        message = _message(entry)
        if code in AUTH_CODES or task_type == "authentication":
            reading.auth_error = f"{code}: {message}"
            return
        if task is None:
            reading.observations.append(self._diagnostic(None, origin, f"{code}: {message}", entry))
            return
        if task_type == "getResponse":
            origin = Origin.POLL
            reading.answered.add(task)
        if code in NOT_FOUND_CODES:
            reading.missing.add(task)
            reading.observations.append(self._diagnostic(task, origin, f"{code}: {message}", entry))
            return
        self._fail(self._batch(task), message, code, origin, entry, reading)

    def _legacy(self, frame: dict[str, Any], origin: Origin, reading: Reading) -> None:
        """The old single-error shape: `{"error": true, "errorId": 19, "errorMessage": "..."}`."""
        body = frame["error"] if isinstance(frame["error"], dict) else frame
        message = _message({k: v for k, v in body.items() if k != "error" or isinstance(v, str)})
        error_id = body.get("errorId")
        task = _str(body.get("taskUUID")) or _str(frame.get("taskUUID"))
        if task is not None:
            self._fail(self._batch(task), message, "error", origin, frame, reading)
        elif error_id in LEGACY_AUTH_ERROR_IDS or "api key" in message.lower():
            reading.auth_error = f"errorId {error_id}: {message}"
        else:
            reading.observations.append(self._diagnostic(None, origin, f"errorId {error_id}: {message}", frame))

    def _fail(self, batch: Batch, message: str, upstream: str, origin: Origin, raw: Any, reading: Reading) -> None:
        reading.heard.add(batch.task)
        reading.rejected[batch.task] = message
        if batch.done:
            return  # a late second error, or an error after completion: the tracker has the end
        self._end(batch, reading)
        reading.observations.append(
            self._obs(batch, Kind.STATE, upstream, origin, raw, state=State.FAILED, error=message),
        )

    def _end(self, batch: Batch, reading: Reading) -> None:
        batch.done = True
        reading.finished.add(batch.task)
        self._finished.append(batch.task)  # in order, for the bound on kept batches

    # -- helpers ---------------------------------------------------------------------------------
    def _batch(self, task: str) -> Batch:
        batch = self.batches.get(task)
        if batch is None:
            batch = self.batches[task] = Batch(task)
        return batch

    def _obs(
        self,
        batch: Batch,
        kind: Kind,
        upstream: str,
        origin: Origin,
        raw: Any,
        *,
        state: State | None = None,
        progress: Progress | None = None,
        error: str | None = None,
        message: str | None = None,
    ) -> Observation:
        return Observation(
            provider=self.provider,
            job=batch.task,
            kind=kind,
            upstream=upstream,
            origin=origin,
            state=state,
            model=batch.model,
            prompt=batch.prompt,
            outputs=batch.outputs,
            error=error,
            cost=batch.cost,
            progress=progress,
            message=message,
            raw=raw if self._clean else scrub(raw),
        )

    def _diagnostic(self, job: str | None, origin: Origin, message: str, raw: Any) -> Observation:
        return Observation(
            provider=self.provider,
            job=job,
            kind=Kind.DIAGNOSTIC,
            upstream="diagnostic",
            origin=origin,
            message=message,
            raw=raw if self._clean else scrub(raw),
        )
