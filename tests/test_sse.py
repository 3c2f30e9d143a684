"""The event-stream reader: recorded byte streams through httpx.MockTransport, split every way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import pytest

from streamd.transport import sse
from streamd.transport.sse import SSEEvent, SSEParser

OXEN_SUCCESS = (
    '{"generation_id":"9f1c","status":"succeeded","media_type":"image",'
    '"model":"bytedance-seedream-4","url":"https://hub.oxen.ai/api/repos/a/b/file/main/caf\u00e9.png"}'
)


def parse_all(chunks: Sequence[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    out: list[SSEEvent] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.close()


def every_split(data: bytes) -> list[list[bytes]]:
    """The stream cut once at every byte offset, plus one byte per chunk."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)] + [[data[i : i + 1] for i in range(len(data))]]


def test_oxen_completion_frame_with_keepalives() -> None:
    stream = f": keep-alive\n\nevent: media_generation_completed\ndata: {OXEN_SUCCESS}\n\n: keep-alive\n\n".encode()
    parser = SSEParser()
    events = parser.feed(stream) + parser.close()
    assert events == [SSEEvent(event="media_generation_completed", data=OXEN_SUCCESS)]
    assert parser.comments == 2


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_endings_and_every_split(newline: str) -> None:
    text = newline.join(["event: a", "data: one", "data:two", "", ": c", "data:  x é", "", ""])
    expected = [SSEEvent(event="a", data="one\ntwo"), SSEEvent(event="message", data=" x é")]
    for chunks in every_split(text.encode()):
        assert parse_all(chunks) == expected, chunks


def test_bom_stripped_once_even_when_split() -> None:
    data = "\ufeffdata: first\n\n".encode() + "\ufeffdata: second\n\n".encode()
    for chunks in every_split(data):
        events = parse_all(chunks)
        # A second BOM is not at the start of the stream, so that line's field name is "\ufeffdata": ignored.
        assert events == [SSEEvent(event="message", data="first")], chunks


def test_empty_data_buffer_is_not_dispatched() -> None:
    text = "event: lonely\n\nid: 7\n\nretry: 1500\n\nevent: real\ndata\n\n"
    parser = SSEParser()
    events = parser.feed(text.encode()) + parser.close()
    # A bare `data` line makes an empty (but present) data buffer: that one is dispatched, with the
    # event name of its own block, not the `lonely` one left over.
    assert events == [SSEEvent(event="real", data="", id="7")]
    assert parser.reconnection_time == 1500
    assert parser.last_event_id == "7"


def test_incomplete_final_event_discarded() -> None:
    assert parse_all([b"data: done\n\ndata: cut off"]) == [SSEEvent(event="message", data="done")]


def test_invalid_utf8_replaced_not_raised() -> None:
    assert parse_all([b"data: \xff\xfe ok\n\n"]) == [SSEEvent(event="message", data="\ufffd\ufffd ok")]


# -- over HTTP --------------------------------------------------------------------------------------
async def _chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://oxen.test")


async def _read(client: httpx.AsyncClient) -> list[SSEEvent]:
    async with sse.connect(client, "/api/events") as stream:
        return [event async for event in stream.events()]


@pytest.mark.anyio
async def test_latin1_header_with_utf8_body_and_mid_character_chunks() -> None:
    body = f"\ufeffevent: media_generation_completed\r\ndata: {OXEN_SUCCESS}\r\n\r\n".encode()
    cut = body.index("é".encode()) + 1  # inside the two-byte é
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "text/event-stream; charset=iso-8859-1"}
        return httpx.Response(200, headers=headers, content=_chunks([body[:3], body[3:cut], body[cut:]]))

    async with _client(handler) as client:
        events = await _read(client)
    assert events == [SSEEvent(event="media_generation_completed", data=OXEN_SUCCESS)]
    assert seen[0].headers["accept"] == "text/event-stream"
    assert seen[0].headers["cache-control"] == "no-store"


@pytest.mark.anyio
async def test_unauthorised_is_its_own_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"type": "unauthenticated"}, "status": "error", "status_message": "unauthenticated"}
        return httpx.Response(401, json=body)

    async with _client(handler) as client:
        with pytest.raises(sse.SSEAuthError) as info:
            await _read(client)
    assert info.value.status == 401
    assert "unauthenticated" in info.value.body_excerpt


@pytest.mark.anyio
async def test_rate_limited_carries_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": "7"}, text="slow down\nplease")

    async with _client(handler) as client:
        with pytest.raises(sse.SSEStatusError) as info:
            await _read(client)
    assert not isinstance(info.value, sse.SSEAuthError)
    assert (info.value.status, info.value.retry_after, info.value.body_excerpt) == (429, 7.0, "slow down please")


@pytest.mark.anyio
async def test_server_error_excerpt_is_bounded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="x" * 100_000)

    async with _client(handler) as client:
        with pytest.raises(sse.SSEStatusError) as info:
            await _read(client)
    assert info.value.status == 503 and info.value.retry_after is None
    assert len(info.value.body_excerpt) <= sse.EXCERPT_CHARS


@pytest.mark.anyio
async def test_wrong_content_type() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html"}, text="<html>login</html>")

    async with _client(handler) as client:
        with pytest.raises(sse.SSEContentTypeError, match="text/html"):
            await _read(client)


@pytest.mark.anyio
async def test_read_timeout_is_configurable() -> None:
    captured: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        captured.append(request.extensions["timeout"])
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"data: x\n\n")

    async with _client(handler) as client:
        await _read(client)
        async with sse.connect(client, "/api/events", read_timeout=3.0) as stream:
            assert [e.data async for e in stream.events()] == ["x"]
    assert captured[0]["read"] == sse.DEFAULT_READ_TIMEOUT
    assert captured[1]["read"] == 3.0
