"""The feed client shared by the CLI and the dashboard.

One connection carries one subscription and any number of requests; a reader task routes
replies to their callers by id and everything else to the subscription. The subscription's
queue is bounded: a consumer that falls behind makes the reader wait, the socket fills, and the
daemon switches this subscriber to catch-up from its journal (or a gap), never to unbounded memory.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd.errors import first_leaf
from streamd.events import CloudEvent, Job
from streamd.feed import protocol as p
from streamd.feed.unixsock import UnixStream, connect

QUEUE = 10_000
MAX_SERVER_LINE = 64 * 1024 * 1024  # snapshots can be big

Item = CloudEvent | p.Snapshot | p.Gap | p.Live


class FeedError(Exception):
    """Something a person can act on: no daemon, refused, or the daemon said no."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Pending:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.reply: p.Reply | None = None


class FeedClient:
    def __init__(self, stream: UnixStream, hello: p.Hello, reader: BufferedByteReceiveStream) -> None:
        self.stream = stream
        self.hello = hello
        self._reader = reader
        self._ids = itertools.count(1)
        self._pending: dict[str | int, _Pending] = {}
        self._send_lock = anyio.Lock()
        send, recv = anyio.create_memory_object_stream[Item](QUEUE)
        self._items_send: MemoryObjectSendStream[Item] = send
        self._items_recv: MemoryObjectReceiveStream[Item] = recv
        self._closed: FeedError | None = None

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: str | PathLike[str]) -> AsyncIterator[FeedClient]:
        path = Path(path)
        try:
            stream = await connect(path)
        except FileNotFoundError:
            raise FeedError("no_daemon", f"no streamd daemon at {path} (start one with `streamd run`)") from None
        except ConnectionRefusedError:
            raise FeedError("no_daemon", f"no streamd daemon listening at {path} (stale socket?)") from None
        except PermissionError:
            raise FeedError("forbidden", f"not allowed to connect to {path}") from None
        except OSError as exc:
            raise FeedError("no_daemon", f"cannot connect to {path}: {exc.strerror or exc}") from None
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            first = await _read_frame(reader)
            if isinstance(first, p.Error):
                raise FeedError(first.code, f"{path}: {first.message}")
            if not isinstance(first, p.Hello):
                raise FeedError("protocol", f"{path} did not greet like a streamd daemon")
            if first.protocol != p.PROTOCOL_VERSION:
                raise FeedError(
                    "protocol", f"daemon speaks feed protocol {first.protocol}, this client {p.PROTOCOL_VERSION}"
                )
            client = cls(stream, first, reader)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client._read_loop)
                    try:
                        yield client
                    finally:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The reader never fails; what comes out is the caller's own exception: give it back bare.
                raise first_leaf(group) from None

    # -- requests --------------------------------------------------------------------------------
    async def request(self, req: p.AnyRequest) -> Any:
        if self._closed is not None:
            raise self._closed
        rid = next(self._ids)
        req.id = rid
        pending = _Pending()
        self._pending[rid] = pending
        try:
            async with self._send_lock:
                try:
                    await self.stream.send(p.encode(req))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    raise FeedError("disconnected", "the daemon closed the connection") from None
            await pending.done.wait()
        finally:
            self._pending.pop(rid, None)
        reply = pending.reply
        if reply is None:
            raise self._closed or FeedError("disconnected", "the daemon closed the connection")
        if not reply.ok:
            err = reply.error or p.ErrorBody(code="error", message="request failed")
            raise FeedError(err.code, err.message)
        return reply.result

    async def jobs(self, filter: str = "", active: bool = False, limit: int = 1000) -> list[Job]:
        result = await self.request(p.Jobs(filter=filter, active=active, limit=limit))
        return msgspec.convert(result, list[Job])

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(p.Status())
        return result

    async def submit(
        self,
        provider: str,
        model: str,
        prompt: str,
        images: list[str] | None = None,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        req = p.Submit(provider=provider, model=model, prompt=prompt, images=images or [], options=options or {})
        result: dict[str, Any] = await self.request(req)
        return result

    async def track(self, provider: str, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(p.Track(provider=provider, ref=ref))
        return result

    async def cancel(self, provider: str, job: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(p.Cancel(provider=provider, job=job))
        return result

    # -- subscription ------------------------------------------------------------------------------
    async def subscribe(
        self, since: int | str = "now", snapshot: bool = False, filter: str = ""
    ) -> AsyncIterator[Item]:
        """Events (and snapshot/gap/live frames) in seq order, until the connection ends."""
        cursor: p.Cursor = since if isinstance(since, int) else ("oldest" if since == "oldest" else "now")
        await self.request(p.Subscribe(since=cursor, snapshot=snapshot, filter=filter))
        while True:
            try:
                item = await self._items_recv.receive()
            except anyio.EndOfStream:
                raise self._closed or FeedError("disconnected", "the daemon closed the connection") from None
            yield item

    # -- reading -----------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await _read_frame(self._reader)
                if isinstance(frame, p.Reply):
                    pending = self._pending.get(frame.id) if frame.id is not None else None
                    if pending is not None:
                        pending.reply = frame
                        pending.done.set()
                elif isinstance(frame, p.Error):
                    if frame.id is not None and (pending := self._pending.get(frame.id)) is not None:
                        pending.reply = p.Reply(
                            id=frame.id, ok=False, error=p.ErrorBody(code=frame.code, message=frame.message)
                        )
                        pending.done.set()
                    elif frame.fatal:
                        self._closed = FeedError(frame.code, frame.message)
                        return
                elif isinstance(frame, p.Hello):
                    continue
                else:
                    await self._items_send.send(frame)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._closed = self._closed or FeedError("disconnected", "the daemon closed the connection")
        finally:
            self._closed = self._closed or FeedError("disconnected", "the daemon closed the connection")
            self._items_send.close()
            for pending in self._pending.values():
                pending.done.set()


async def _read_frame(reader: BufferedByteReceiveStream) -> p.AnyFrame | CloudEvent:
    while True:
        line = await reader.receive_until(b"\n", MAX_SERVER_LINE)
        if line.strip():
            try:
                return p.decode_frame(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise FeedError("protocol", f"unreadable line from the daemon: {exc}") from None
