"""The feed's wire format: NDJSON frames both ways, pure (no sockets). See docs/protocol.md.

Client lines are requests tagged by `op`. Server lines are either CloudEvents (they carry
`specversion`) or control frames tagged by `frame`. Replies echo the request's `id`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from streamd.events import CloudEvent, Job

PROTOCOL_VERSION = 1
MAX_LINE = 1 << 20  # longest request line accepted, bytes; longer lines get an error and a close

Cursor = int | Literal["now", "oldest"]


# -- requests (client -> daemon) -----------------------------------------------------------------
class Request(msgspec.Struct, tag_field="op", kw_only=True, forbid_unknown_fields=True):
    id: str | int | None = None


class Subscribe(Request, tag="subscribe", kw_only=True):
    since: Cursor = "now"  # an int: every event with seq > since
    snapshot: bool = False  # first the matching jobs' current state, atomically with the cursor
    filter: str = ""


class Unsubscribe(Request, tag="unsubscribe", kw_only=True):
    pass


class Jobs(Request, tag="jobs", kw_only=True):
    filter: str = ""
    active: bool = False  # only unfinished jobs
    limit: int = 1000


class Status(Request, tag="status", kw_only=True):
    pass


class Track(Request, tag="track", kw_only=True):
    provider: str
    ref: str  # the provider's job id, or (Wiro) the task token


class Submit(Request, tag="submit", kw_only=True):
    provider: str
    model: str
    prompt: str
    images: list[str] = msgspec.field(default_factory=list)
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class Cancel(Request, tag="cancel", kw_only=True):
    provider: str
    job: str


class Ping(Request, tag="ping", kw_only=True):
    pass


AnyRequest = Subscribe | Unsubscribe | Jobs | Status | Track | Submit | Cancel | Ping


# -- frames (daemon -> client) --------------------------------------------------------------------
class Frame(msgspec.Struct, tag_field="frame", kw_only=True, omit_defaults=True):
    pass


class Hello(Frame, tag="hello", kw_only=True):
    protocol: int
    server: str
    epoch: str  # changes when the journal is reset: seqs from another epoch mean nothing
    seq: int  # newest seq in the journal (0 when empty)
    oldest: int  # oldest seq still kept (seq + 1 when empty)


class ErrorBody(msgspec.Struct, kw_only=True):
    code: str  # bad_request, unknown_op, too_long, unknown_provider, provider_error, not_found, ...
    message: str


class Reply(Frame, tag="reply", kw_only=True):
    id: str | int | None
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


class Error(Frame, tag="error", kw_only=True):
    """An error not tied to a request (a line we could not parse); `fatal` means we close next."""

    id: str | int | None = None
    code: str
    message: str
    fatal: bool = False


class Gap(Frame, tag="gap", kw_only=True):
    """Events `first`..`last` (inclusive) will not be delivered to this subscriber."""

    first: int
    last: int
    reason: Literal["retention", "epoch"]


class Snapshot(Frame, tag="snapshot", kw_only=True):
    """Current jobs at `seq`; chunked: the last chunk has more=false, then events after `seq`."""

    seq: int
    jobs: list[Job]
    more: bool = False


class Live(Frame, tag="live", kw_only=True):
    """Caught up: every later event arrives as it happens."""

    seq: int


AnyFrame = Hello | Reply | Error | Gap | Snapshot | Live

_request_decoder: msgspec.json.Decoder[AnyRequest] = msgspec.json.Decoder(AnyRequest)
_frame_decoder: msgspec.json.Decoder[AnyFrame] = msgspec.json.Decoder(AnyFrame)
_encoder = msgspec.json.Encoder()


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_request(line: bytes) -> AnyRequest:
    try:
        return _request_decoder.decode(line)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "Invalid value" in text and "`$.op`" in text:
            raise ProtocolError("unknown_op", f"unknown op: {text}") from None
        raise ProtocolError("bad_request", text) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_json", f"not a JSON object: {exc}") from None


def encode(obj: AnyRequest | AnyFrame | CloudEvent) -> bytes:
    return _encoder.encode(obj) + b"\n"


def encode_into(obj: Any, buf: bytearray) -> None:
    """Append one NDJSON line for `obj` to `buf` (cheap batching for the hot path)."""
    _encoder.encode_into(obj, buf, len(buf))
    buf.extend(b"\n")


_event_decoder = msgspec.json.Decoder(CloudEvent)
EVENT_PREFIX = b'{"specversion"'


def decode_frame(line: bytes) -> AnyFrame | CloudEvent:
    """A server line: a control frame, or a CloudEvent."""
    if line.startswith(EVENT_PREFIX):
        return _event_decoder.decode(line)
    return _frame_decoder.decode(line)
