"""Normalised job events and their CloudEvents 1.0 envelope.

Normalisers produce `Observation`s (what a provider said, nothing decided). The tracker turns
them into `Event`s (sequenced, with the job's state before and after), which are journaled and
served as CloudEvents. Everything here is immutable and encodes with msgspec.
"""

from __future__ import annotations

import enum
import json
import math
import re
import time as _time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec


class State(enum.StrEnum):
    QUEUED = "queued"
    ACCEPTED = "accepted"
    PREPROCESSING = "preprocessing"
    RUNNING = "running"
    POSTPROCESSING = "postprocessing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


class Origin(enum.StrEnum):
    PUSH = "push"  # a provider's push channel (SSE, WebSocket)
    POLL = "poll"  # a status poll (repair or polled provider)
    REQUEST = "request"  # the answer to our own submit/cancel request
    DAEMON = "daemon"  # decided by streamd itself (stalled, archived, expired)


class Kind(enum.StrEnum):
    STATE = "state"  # the job moved to `status`
    PROGRESS = "progress"
    LOG = "log"
    STALLED = "stalled"
    DIAGNOSTIC = "diagnostic"  # a frame or value we did not understand; kept, never dropped
    ARCHIVED = "archived"
    EXPIRED = "expired"
    HEALTH = "health"  # a provider connection's health; job is None


class Health(enum.StrEnum):
    STARTING = "starting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    AUTH_FAILED = "auth_failed"
    RATE_LIMITED = "rate_limited"
    POLLING = "polling"  # a provider with no push channel, polling fine
    DOWN = "down"
    STOPPED = "stopped"


# Enum members the hot path compares per event, as module constants: `Kind.STATE` is a class-attribute
# look-up through the enum machinery each time (~50 ns on 3.11); a global costs next to nothing.
K_STATE, K_PROGRESS, K_ARCHIVED, K_STALLED, K_DIAGNOSTIC, K_HEALTH = (
    Kind.STATE,
    Kind.PROGRESS,
    Kind.ARCHIVED,
    Kind.STALLED,
    Kind.DIAGNOSTIC,
    Kind.HEALTH,
)
O_PUSH = Origin.PUSH


# The structs below are made by the thousand per second and never form reference cycles (they hold
# text, numbers, tuples and decoded JSON), so the cyclic GC need not track them: `gc=False` keeps the
# hot path from triggering a collection every few hundred events.
class Progress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    percent: float | None = None
    step: int | None = None
    steps: int | None = None
    eta: float | None = None  # seconds remaining, when the provider says


class Observation(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One fact from a provider, as a normaliser read it. Pure data; the tracker decides."""

    provider: str
    job: str | None
    kind: Kind
    upstream: str  # the provider's own name for what happened
    origin: Origin
    state: State | None = None  # for Kind.STATE: the state the provider reports
    model: str | None = None
    prompt: str | None = None
    outputs: tuple[str, ...] = ()
    error: str | None = None
    cost: float | None = None
    progress: Progress | None = None
    message: str | None = None  # log text, diagnostic detail, health detail
    health: Health | None = None
    delay: float | None = None  # health: seconds until the next attempt
    raw: Any = None  # the provider's payload, secrets removed
    at: float | None = None  # when the provider says it happened (unix seconds)


class EventData(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The `data` of a CloudEvent: lifecycle.md's minimum fields plus kind-specific ones."""

    provider: str
    job: str | None
    kind: Kind
    status: State | None  # the job's state after this event
    previous: State | None  # the job's state before this event
    upstream: str
    origin: Origin
    model: str | None = None
    outputs: tuple[str, ...] = ()
    error: str | None = None
    cost: float | None = None
    progress: Progress | None = None
    message: str | None = None
    health: Health | None = None
    delay: float | None = None
    prompt: str | None = None
    paths: tuple[str, ...] = ()  # local archived copies of outputs
    raw: Any = None


class CloudEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """CloudEvents 1.0, structured JSON mode, with the integer extension attribute `seq`."""

    specversion: str = "1.0"  # first, so a reader can tell an event line by its first bytes
    id: str
    source: str
    type: str
    time: str
    subject: str
    datacontenttype: str = "application/json"
    seq: int
    data: EventData


TYPE_PREFIX = "ai.streamd."


def event_type(data: EventData) -> str:
    """`ai.streamd.job.completed`, `ai.streamd.job.progress`, `ai.streamd.provider.health`..."""
    kind = data.kind
    if kind is K_HEALTH:
        return _HEALTH_TYPE
    if kind is K_STATE and data.status is not None:
        return _STATE_TYPES[data.status]
    return _KIND_TYPES[kind]


_STATE_TYPES = {s: TYPE_PREFIX + "job." + s.value for s in State}
_KIND_TYPES = {k: TYPE_PREFIX + "job." + k.value for k in Kind}
_HEALTH_TYPE = TYPE_PREFIX + "provider.health"


_second: tuple[int | None, str] = (None, "")  # the last whole second formatted, and its text
_last: tuple[float | None, str] = (None, "")  # the last time formatted, and its text


def rfc3339(ts: float) -> str:
    """`datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")` with a `Z`, exactly (the
    microseconds rounded half-to-even as datetime does), formatting the date and time once a second."""
    global _second, _last
    if _last[0] == ts:  # the events of one batch share their time
        return _last[1]
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    elif us < 0:
        us += 1_000_000
        whole -= 1.0
    sec = int(whole)
    if _second[0] != sec:
        _second = (sec, datetime.fromtimestamp(sec, UTC).isoformat().replace("+00:00", ""))
    text = f"{_second[1]}.{us:06d}Z"
    _last = (ts, text)
    return text


def envelope(data: EventData, *, seq: int, epoch: str, source: str, at: float | None = None) -> CloudEvent:
    """Wrap `data` as the CloudEvent numbered `seq` in journal `epoch`.

    `id` is unique per (epoch, seq), which is what CloudEvents asks of (source, id).
    """
    subject = f"{data.provider}/{data.job}" if data.job is not None else data.provider
    return CloudEvent(
        id=f"{epoch}-{seq}",
        source=source,
        type=event_type(data),
        time=rfc3339(_time.time() if at is None else at),
        subject=subject,
        seq=seq,
        data=data,
    )


CREDIT_PROVIDERS = frozenset({"apiframe"})  # these report cost in their own credits, not US dollars


def cost_text(provider: str, cost: float | None) -> str:
    """A cost as people read it: dollars, or the provider's credits."""
    if cost is None:
        return "-"
    if provider in CREDIT_PROVIDERS:
        return f"{cost:g} cr"
    return f"${cost:.4f}" if cost < 0.01 else f"${cost:.3f}" if cost < 10 else f"${cost:,.2f}"


class Job(msgspec.Struct, kw_only=True, gc=False):
    """A job's current view: what `jobs` and snapshots return. Mutable only inside the tracker."""

    provider: str
    job: str
    status: State
    model: str | None = None
    prompt: str | None = None
    outputs: tuple[str, ...] = ()
    error: str | None = None
    cost: float | None = None
    progress: Progress | None = None
    paths: tuple[str, ...] = ()
    created: float = 0.0  # when streamd first saw it
    updated: float = 0.0  # last event of any kind
    since: float = 0.0  # when it entered `status`
    seq: int = 0  # seq of its last event
    upstream: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider, self.job)


SECRET_KEYS = frozenset(
    {
        "apikey",
        "api_key",
        "x-api-key",
        "authorization",
        "socketaccesstoken",
        "tasktoken",
        "token",
        "secret",
        "x-signature",
        "signature",
        "password",
        "accesskey",  # Wiro: an output file's access key
    }
)
REDACTED = "[redacted]"

#: A secret-named field inside text: a frame that could not be parsed (cut short, garbled), JSON held
#: in a string, a Python repr, `key=value`, an `Authorization: Bearer ...` header; its value a string,
#: a list or a flat object. The closing quote or bracket is optional, so a frame cut inside a
#: credential does not keep its first half.
_SECRET_IN_TEXT = re.compile(
    r"""((?:"""
    + "|".join(re.escape(k) for k in sorted(SECRET_KEYS, key=len, reverse=True))
    + r""")(?:\\?["'])?\s*[:=]\s*)"""
    r"""(\\?"[^"\\]*(?:\\?")?|'[^']*'?|\[[^\]]*\]?|\{[^}]*\}?|(?:(?:bearer|basic)\s+)?[^\s,;&}\]"'\\]+)""",
    re.IGNORECASE,
)


def _names_a_secret(low: str) -> bool:
    """Whether lower-cased `low` holds one of the words every secret key holds (most text does not)."""
    return (
        "key" in low
        or "token" in low
        or "secret" in low
        or "signature" in low
        or "password" in low
        or "authorization" in low
    )


def scrub_text(text: str) -> str:
    """`text` with the value of every secret-named field in it replaced."""
    if _names_a_secret(text.lower()):  # most text is passed over cheaply
        return _SECRET_IN_TEXT.sub(r'\1"[redacted]"', text)
    return text


def is_clean(text: str | bytes) -> bool:
    """True when `scrub` would change nothing decoded from this JSON text, so the scrub can be skipped:
    the text names none of the secret words (lower-cased as scrub lower-cases keys and text; every
    name in SECRET_KEYS and everything scrub_text looks for holds one of them), spells nothing with a
    `\\u` escape, and nests less deeply than scrub's limit. A few passes over the text at C speed
    instead of a walk of the decoded value with a search of every string in it."""
    if isinstance(text, bytes):
        if not text.isascii():
            try:
                text = text.decode()
            except UnicodeDecodeError:
                return False
        else:
            text = text.decode("ascii")
    if "\\u" in text or text.count("{") + text.count("[") > 32:
        return False
    return not _names_a_secret(text.lower())


def scrub_decoded(value: Any, text: str | bytes) -> Any:
    """`scrub(value)` for a value freshly decoded from the JSON `text`; skipped when the text is clean."""
    return value if is_clean(text) else scrub(value)


def scrub(raw: Any, *, depth: int = 0) -> Any:
    """A copy of a provider payload with credential fields replaced, so raw data is safe to serve.
    Strings are searched too: a payload that could not be parsed is kept as text."""
    if depth > 32:
        return REDACTED
    kind = type(raw)
    if kind is dict:  # the common case, without an ABC isinstance check and a call per plain value
        return {
            k: REDACTED
            if (k if type(k) is str else str(k)).lower() in SECRET_KEYS
            else (v if depth < 32 and type(v) in _PLAIN else scrub(v, depth=depth + 1))
            for k, v in raw.items()
        }
    if kind in _PLAIN:
        return raw
    if kind is not str and isinstance(raw, Mapping):
        return {k: (REDACTED if str(k).lower() in SECRET_KEYS else scrub(v, depth=depth + 1)) for k, v in raw.items()}
    if isinstance(raw, list | tuple):
        return [scrub(v, depth=depth + 1) for v in raw]
    if isinstance(raw, str):
        return scrub_text(raw)
    return raw


_PLAIN = frozenset({int, float, bool, type(None)})  # exactly these types: never a Mapping, a list or text
json_encoder = msgspec.json.Encoder()
cloud_decoder = msgspec.json.Decoder(CloudEvent)
job_decoder = msgspec.json.Decoder(Job)
_any_decoder = msgspec.json.Decoder()


def loads(data: str | bytes | bytearray) -> Any:
    """JSON from a provider as Python data that can always be journaled; ValueError if it is not JSON.

    JSON may escape lone UTF-16 surrogates (`"\\ud83d"`: JavaScript's `JSON.stringify` writes one for a
    string cut in the middle of an emoji). No UTF-8 text can hold them, so an event carrying one could
    not be encoded and the provider that read it would crash on every poll; they become U+FFFD. JSON
    nested too deeply to decode is a ValueError too, not a RecursionError that callers do not expect.
    """
    try:
        return _any_decoder.decode(data)
    except msgspec.DecodeError:
        pass  # not JSON, or JSON that msgspec is stricter about (lone surrogates, NaN, numbers out of range)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    try:
        return _mend(json.loads(data))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _mend(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if not value.isascii() else value
    if isinstance(value, dict):
        return {_mend(k): _mend(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mend(v) for v in value]
    return value
