"""Reading a `text/event-stream` with httpx, on httpx-sse 0.4.3's decoders, fixed up to WHATWG rules.

httpx-sse 0.4.3 departs from the WHATWG event-stream rules in ways that matter against real servers:
it decodes with the charset the content-type header claims (the stream is always UTF-8), keeps a
leading BOM (so the first field name is garbled), and dispatches an event whose data buffer is
empty (a bare `event:` block). `SSEParser` reuses its line splitter and field decoder and fixes
those three; `connect()` checks status and content type before anything is read and raises typed
errors, so a caller can tell "bad key" from "rate limited" from "wrong endpoint".

The parser is sans-I/O (bytes in, events out); `EventStream` only moves bytes into it.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import NamedTuple

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from streamd.transport.backoff import retry_after as parse_retry_after

#: Above Oxen's 15 s keep-alive, with room for two missed ones.
DEFAULT_READ_TIMEOUT = 45.0
EXCERPT_BYTES = 2048
EXCERPT_CHARS = 200
BOM = "\ufeff"


class SSEEvent(NamedTuple):  # immutable, and built several times faster than a frozen dataclass
    event: str  # "message" when the stream gave no `event:` field
    data: str
    id: str = ""
    retry: int | None = None


_new = tuple.__new__


class SSEStreamError(Exception):
    """The event stream could not be opened or read as one."""


class SSEStatusError(SSEStreamError):
    """A non-200 answer. `body_excerpt` is one line of the server's body, for people."""

    def __init__(self, status: int, retry_after: float | None, body_excerpt: str) -> None:
        self.status = status
        self.retry_after = retry_after
        self.body_excerpt = body_excerpt
        detail = f": {body_excerpt}" if body_excerpt else ""
        super().__init__(f"event stream answered HTTP {status}{detail}")


class SSEAuthError(SSEStatusError):
    """401 (or 403): retrying with the same credentials will not help."""


class SSEContentTypeError(SSEStreamError):
    def __init__(self, content_type: str) -> None:
        self.content_type = content_type
        super().__init__(f"expected content-type text/event-stream, got {content_type or 'none'!r}")


class _WhatwgDecoder(SSEDecoder):
    """httpx-sse's field decoder, but an empty data buffer resets instead of dispatching."""

    def __init__(self) -> None:
        super().__init__()
        self.comments = 0
        self.reconnection_time: int | None = None  # WHATWG applies `retry:` at once, not per event

    def decode(self, line: str) -> ServerSentEvent | None:
        if not line and not self._data:
            self._event = ""
            self._retry = None
            return None
        if line.startswith(":"):
            self.comments += 1
            return None
        sse = super().decode(line)
        if line.startswith("retry") and self._retry is not None:
            self.reconnection_time = self._retry
        return sse


class SSEParser:
    """Bytes in, events out. Always UTF-8 (invalid bytes replaced), one leading BOM stripped,
    chunks may split lines, CRLF pairs and UTF-8 sequences anywhere."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._lines = SSELineDecoder()
        self._fields = _WhatwgDecoder()
        self._at_start = True

    @property
    def comments(self) -> int:
        """Comment lines seen (keep-alives), so callers and tests can tell a quiet stream from a dead one."""
        return self._fields.comments

    @property
    def last_event_id(self) -> str:
        return self._fields._last_event_id

    @property
    def reconnection_time(self) -> int | None:
        return self._fields.reconnection_time

    def feed(self, data: bytes) -> list[SSEEvent]:
        return self._text(self._utf8.decode(data))

    def close(self) -> list[SSEEvent]:
        """End of stream: an event without its closing blank line is discarded, as WHATWG says."""
        events = self._text(self._utf8.decode(b"", final=True))
        # A held-back CR ended its line (it was waiting to see whether an LF followed): that line is
        # complete. Text after the last line break is pending data, which WHATWG discards.
        complete = self._lines.trailing_cr
        lines = self._lines.flush()
        if complete:
            events += self._dispatch(lines)
        return events

    def _text(self, text: str) -> list[SSEEvent]:
        if self._at_start and text:
            self._at_start = False
            text = text.removeprefix(BOM)
        if not text:
            return []
        return self._dispatch(self._lines.decode(text))

    def _dispatch(self, lines: list[str]) -> list[SSEEvent]:
        """`_WhatwgDecoder.decode` for each line, inlined on the decoder's own state: the same rules
        (httpx-sse's field decoding plus the WHATWG fixes above) without a call and an httpx-sse
        `ServerSentEvent` per line, which was most of the parsing cost of a busy stream."""
        f = self._fields
        out: list[SSEEvent] = []
        for line in lines:
            if not line:
                if f._data:  # dispatch, then reset the block (the last event id persists)
                    # tuple.__new__ directly: a named tuple's own __new__ is a Python-level call
                    out.append(_new(SSEEvent, (f._event or "message", "\n".join(f._data), f._last_event_id, f._retry)))
                    f._data = []
                f._event = ""
                f._retry = None
                continue
            if line[0] == ":":
                f.comments += 1
                continue
            name, _, value = line.partition(":")
            if value[:1] == " ":
                value = value[1:]
            if name == "data":
                f._data.append(value)
            elif name == "event":
                f._event = value
            elif name == "id":
                if "\0" not in value:
                    f._last_event_id = value
            elif name == "retry":
                with contextlib.suppress(TypeError, ValueError):
                    f._retry = int(value)
            if f._retry is not None and line.startswith("retry"):
                f.reconnection_time = f._retry
        return out


class EventStream:
    """An open, checked event stream. Iterate `events()`; it ends when the server closes."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SSEParser()

    async def events(self) -> AsyncGenerator[SSEEvent, None]:
        async for chunk in self.response.aiter_bytes():
            for event in self.parser.feed(chunk):
                yield event
        for event in self.parser.close():
            yield event

    async def batches(self) -> AsyncGenerator[list[SSEEvent], None]:
        """The same events as `events()`, in the same order, a list per chunk read: a busy stream
        is handed on a chunk at a time instead of an event at a time."""
        async for chunk in self.response.aiter_bytes():
            if events := self.parser.feed(chunk):
                yield events
        if events := self.parser.close():
            yield events


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


async def check_response(response: httpx.Response) -> None:
    """Raise the typed error for a response that is not a 200 event stream; reads at most a small excerpt."""
    if response.status_code != 200:
        excerpt = await _excerpt(response)
        header = response.headers.get("retry-after")
        after = parse_retry_after(header) if header else None
        cls = SSEAuthError if response.status_code in (401, 403) else SSEStatusError
        raise cls(response.status_code, after, excerpt)
    content_type = response.headers.get("content-type", "")
    if media_type(content_type) != "text/event-stream":
        raise SSEContentTypeError(content_type)


async def _excerpt(response: httpx.Response) -> str:
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= EXCERPT_BYTES:
                break
    except httpx.HTTPError:
        pass
    text = " ".join(bytes(body[:EXCERPT_BYTES]).decode("utf-8", errors="replace").split())
    return text[:EXCERPT_CHARS]


@asynccontextmanager
async def connect(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    connect_timeout: float = 10.0,
) -> AsyncIterator[EventStream]:
    """Open `url` as an event stream. Raises `SSEStatusError` / `SSEAuthError` / `SSEContentTypeError`
    before yielding; httpx's own errors (connect, read timeout, protocol) pass through."""
    timeout = httpx.Timeout(connect_timeout, read=read_timeout)
    async with aconnect_sse(client, "GET", url, headers=dict(headers or {}), timeout=timeout) as source:
        await check_response(source.response)
        yield EventStream(source.response)
