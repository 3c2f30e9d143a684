"""The local feed: a Unix stream socket speaking NDJSON (docs/protocol.md).

Each connection is one task group: a reader that parses requests, a sender for the current
subscription, and a bounded number of request handlers. Who may connect is checked with
SO_PEERCRED. A connection that misbehaves (garbage, overlong lines) gets an error frame; only an
overlong line, a refused peer or too many connections also close it.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from streamd import filters
from streamd.bus import Bus, GapNotice, LiveNotice, Subscriber
from streamd.feed import protocol as p
from streamd.feed import unixsock
from streamd.feed.unixsock import UnixStream

log = logging.getLogger("streamd.feed")

MAX_CONNECTIONS = 256
MAX_INFLIGHT = 8  # concurrent requests per connection beside its subscription
SNAPSHOT_CHUNK = 500

Handler = Callable[[p.AnyRequest], Awaitable[Any]]
SnapshotFn = Callable[[], Awaitable[tuple[int, list[Any]]]]


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(stream: UnixStream) -> Peer | None:
    try:
        raw = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return Peer(*struct.unpack("3i", raw))


def allowed(peer: Peer, *, uid: int, gid: int | None) -> bool:
    """The daemon's own uid, root, and members of the configured group."""
    if peer.uid in (0, uid):
        return True
    if gid is None:
        return False
    if peer.gid == gid:
        return True
    try:
        name = pwd.getpwuid(peer.uid).pw_name
        return gid in os.getgrouplist(name, peer.gid)
    except KeyError:
        return False


def group_id(name: str | None) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"socket group {name!r} does not exist") from None


class FeedServer:
    def __init__(
        self,
        *,
        bus: Bus,
        hello: Callable[[], p.Hello],
        oldest: Callable[[], int],
        snapshot: SnapshotFn,
        handle: Handler,
        path: Path,
        mode: int = 0o600,
        group: int | None = None,
        listener: socket.socket | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.bus = bus
        self._hello = hello
        self._oldest = oldest
        self._snapshot = snapshot
        self._handle = handle
        self.path = path
        self.mode = mode
        self.group = group
        self._inherited = listener
        self._sock: socket.socket | None = None
        self._slots = anyio.Semaphore(max_connections)
        self.connections = 0
        self.refused = 0

    async def bind(self) -> None:
        """Listen now, so a start-up failure (socket in use, no permission) is the caller's to report."""
        self._sock = await self._listen()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sock = self._sock or await self._listen()
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                await unixsock.serve(sock, self._connection, tg)
        finally:
            sock.close()
            if self._inherited is None:
                with suppress(OSError):
                    self.path.unlink()

    async def _listen(self) -> socket.socket:
        if self._inherited is not None:
            return self._inherited
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.is_socket():
            # A socket file left by a daemon that died: refuse to steal one that still answers.
            try:
                probe = await unixsock.connect(self.path)
            except OSError:
                self.path.unlink()
            else:
                await probe.aclose()
                raise OSError(f"another streamd is already listening on {self.path}")
        sock = unixsock.listen(self.path, self.mode)
        if self.group is not None:
            os.chown(self.path, -1, self.group)
        return sock

    # -- one connection ------------------------------------------------------------------------
    async def _connection(self, stream: UnixStream) -> None:
        async with stream:
            peer = peer_of(stream)
            if peer is None or not allowed(peer, uid=os.getuid(), gid=self.group):
                self.refused += 1
                log.warning("refused feed connection from uid %s", peer.uid if peer else "?")
                with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(p.encode(p.Error(code="forbidden", message="not allowed here", fatal=True)))
                return
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send(
                        p.encode(p.Error(code="busy", message="too many feed connections; retry later", fatal=True))
                    )
                return
            self.connections += 1
            try:
                await Connection(self, stream).run()
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                pass  # the peer went away; its subscription is already gone
            except* Exception:  # a bug in one connection must never take the feed down: log it, close it
                log.exception("feed connection failed")
            finally:
                self.connections -= 1
                self._slots.release()


class Connection:
    def __init__(self, server: FeedServer, stream: UnixStream) -> None:
        self.server = server
        self.stream = stream
        self._send_lock = anyio.Lock()
        self._inflight = anyio.Semaphore(MAX_INFLIGHT)
        self._subscription: anyio.CancelScope | None = None
        self._subscriber: Subscriber | None = None

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(data)

    async def run(self) -> None:
        await self.send(p.encode(self.server._hello()))
        reader = BufferedByteReceiveStream(self.stream)
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    try:
                        line = await reader.receive_until(b"\n", p.MAX_LINE)
                    except anyio.DelimiterNotFound:
                        msg = f"request line longer than {p.MAX_LINE} bytes"
                        await self.send(p.encode(p.Error(code="too_long", message=msg, fatal=True)))
                        tg.cancel_scope.cancel()
                        return
                    except (anyio.IncompleteRead, anyio.EndOfStream):
                        # The peer closed its sending side (`echo ... | socat`): requests in flight still
                        # get their replies and a subscription keeps streaming until the peer is gone.
                        return
                    except anyio.BrokenResourceError:
                        tg.cancel_scope.cancel()
                        return
                    line = line.strip()
                    if line:
                        await self._dispatch(line, tg)
        finally:
            if self._subscriber is not None:
                self.server.bus.unsubscribe(self._subscriber)

    async def _dispatch(self, line: bytes, tg: TaskGroup) -> None:
        try:
            req = p.decode_request(line)
        except p.ProtocolError as exc:
            await self.send(p.encode(p.Error(id=_loose_id(line), code=exc.code, message=exc.message)))
            return
        if isinstance(req, p.Subscribe):
            await self._subscribe(req, tg)
        elif isinstance(req, p.Unsubscribe):
            self._stop_subscription()
            await self.reply(req.id, {"subscribed": False})
        elif isinstance(req, p.Ping):
            await self.reply(req.id, {"pong": True})
        else:
            try:
                self._inflight.acquire_nowait()
            except anyio.WouldBlock:
                await self._fail(req.id, "busy", f"more than {MAX_INFLIGHT} requests in flight")
                return
            tg.start_soon(self._request, req)

    async def reply(self, rid: str | int | None, result: Any) -> None:
        await self.send(p.encode(p.Reply(id=rid, ok=True, result=result)))

    async def _fail(self, rid: str | int | None, code: str, message: str) -> None:
        await self.send(p.encode(p.Reply(id=rid, ok=False, error=p.ErrorBody(code=code, message=message))))

    async def _request(self, req: p.AnyRequest) -> None:
        try:
            result = await self.server._handle(req)
        except RequestError as exc:
            await self._fail(req.id, exc.code, str(exc))
        except Exception:  # a bug must not take the connection down with it; say so, log it
            log.exception("request %s failed", type(req).__name__)
            await self._fail(req.id, "internal", "internal error; see the daemon's log")
        else:
            await self.reply(req.id, result)
        finally:
            self._inflight.release()

    # -- subscriptions -------------------------------------------------------------------------
    def _stop_subscription(self) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        if self._subscriber is not None:
            self.server.bus.unsubscribe(self._subscriber)
            self._subscriber = None

    async def _subscribe(self, req: p.Subscribe, tg: TaskGroup) -> None:
        try:
            flt = filters.parse(req.filter)
        except filters.FilterError as exc:
            await self.send(
                p.encode(p.Reply(id=req.id, ok=False, error=p.ErrorBody(code="bad_filter", message=str(exc))))
            )
            return
        bus = self.server.bus
        jobs: list[Any] = []
        if req.snapshot:
            cursor, jobs = await self.server._snapshot()
            jobs = [j for j in jobs if flt(j)]
        elif req.since == "now":
            cursor = bus.head
        elif req.since == "oldest":
            cursor = self.server._oldest() - 1
        else:
            cursor = req.since
            if cursor < 0 or cursor > bus.head:
                msg = f"cursor {cursor} is outside this journal (newest seq {bus.head}); check the epoch in hello"
                await self._fail(req.id, "bad_cursor", msg)
                return
        self._stop_subscription()
        sub = bus.subscribe(cursor, flt)
        self._subscriber = sub
        scope = anyio.CancelScope()
        self._subscription = scope
        await self.reply(req.id, {"cursor": cursor, "filter": flt.text})
        if req.snapshot:
            for i in range(0, max(len(jobs), 1), SNAPSHOT_CHUNK):
                chunk = jobs[i : i + SNAPSHOT_CHUNK]
                await self.send(p.encode(p.Snapshot(seq=cursor, jobs=chunk, more=i + SNAPSHOT_CHUNK < len(jobs))))
        tg.start_soon(self._pump, sub, scope)

    async def _pump(self, sub: Subscriber, scope: anyio.CancelScope) -> None:
        with scope:
            async for out in self.server.bus.stream(sub):
                if isinstance(out, GapNotice):
                    await self.send(p.encode(p.Gap(first=out.first, last=out.last, reason="retention")))
                elif isinstance(out, LiveNotice):
                    await self.send(p.encode(p.Live(seq=out.seq)))
                else:
                    out.append(b"")
                    await self.send(b"\n".join(out))


class RequestError(Exception):
    """A request the daemon cannot carry out; `code` goes on the wire with the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _loose_id(line: bytes) -> str | int | None:
    """The id of a request we could not fully parse, so the error can still be matched."""
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str | int) else None
