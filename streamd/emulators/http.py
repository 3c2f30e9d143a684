"""A small HTTP/1.1 server for the emulators: h11 does the protocol, anyio moves bytes.

Handlers get a parsed `Request` and return a `Response`, or a `StreamResponse` whose chunks are
written as they come (SSE). Raising `Drop` closes the connection abruptly, which is how fault
knobs cut a client off. `close_all()` drops every open connection (a server "restart").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import h11
from anyio.abc import SocketStream, TaskStatus

MAX_BODY = 110 * 1024 * 1024  # above Wiro's 100 MB upload limit


class Drop(Exception):
    """Close the client's connection now, without a response."""


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
        return cls(status, json.dumps(obj).encode(), [("content-type", "application/json"), *(headers or [])])


@dataclass
class StreamResponse:
    chunks: AsyncIterator[bytes]
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class HttpServer:
    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._conns: set[SocketStream] = set()
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port, reuse_port=False)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(self.port)
        async with listener:
            await listener.serve(self._connection)

    async def close_all(self) -> None:
        for conn in list(self._conns):
            await conn.aclose()

    async def _connection(self, stream: SocketStream) -> None:
        self._conns.add(stream)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                self.requests += 1
                try:
                    response = await self.handler(request)
                except Drop:
                    return
                await self._write(conn, stream, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, h11.ProtocolError):
            return
        finally:
            self._conns.discard(stream)
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_request(self, conn: h11.Connection, stream: SocketStream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    data = b""
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise h11.ProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode(), head.target.decode(), headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _write(self, conn: h11.Connection, stream: SocketStream, response: Response | StreamResponse) -> None:
        headers = [(k.encode(), v.encode()) for k, v in response.headers]
        if isinstance(response, Response):
            headers.append((b"content-length", str(len(response.body)).encode()))
            await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
            if response.body:
                await stream.send(conn.send(h11.Data(data=response.body)) or b"")
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
            return
        headers.append((b"transfer-encoding", b"chunked"))
        await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        try:
            async for chunk in response.chunks:
                if chunk:
                    await stream.send(conn.send(h11.Data(data=chunk)) or b"")
        except Drop:
            raise anyio.ClosedResourceError from None
        await stream.send(conn.send(h11.EndOfMessage()) or b"")
