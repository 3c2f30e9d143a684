"""Unix stream sockets as anyio byte streams, on asyncio's own socket primitives.

anyio's asyncio backend waits for Unix sockets with `add_reader(fd, future.set_result, None)`;
when a wait is cancelled in the same loop iteration as the socket becomes readable, the callback
runs on a cancelled future and the loop reports InvalidStateError. asyncio's `sock_recv` and
`sock_sendall` check for that (its `sock_accept` does not on 3.11, so accepting waits with a guarded
reader of its own). The asyncio backend is pinned anyway: websockets and Textual need it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, TaskGroup


class UnixStream(ByteStream):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._closed = False
        self._send_lock = anyio.Lock()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, max_bytes)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise anyio.BrokenResourceError from exc
        except OSError as exc:
            if self._closed:
                raise anyio.ClosedResourceError from None
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        async with self._send_lock:
            try:
                await asyncio.get_running_loop().sock_sendall(self.sock, item)
            except OSError as exc:
                if self._closed:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()
        await anyio.lowlevel.checkpoint()


def listen(path: Path, mode: int) -> socket.socket:
    """Bind a listening socket at `path` with `mode`, never briefly wider than asked."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(sock: socket.socket, handler: Callable[[UnixStream], Coroutine[Any, Any, None]], tg: TaskGroup) -> None:
    """Accept forever, one task per connection in `tg`."""
    sock.setblocking(False)
    while True:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            await _readable(sock)
            continue
        except ConnectionAbortedError:
            continue
        except OSError as exc:  # out of descriptors: say nothing new, breathe, go on
            if exc.errno in (24, 23):  # EMFILE, ENFILE
                await anyio.sleep(0.1)
                continue
            raise
        tg.start_soon(handler, UnixStream(conn))


async def _readable(sock: socket.socket) -> None:
    """Wait until `sock` can be read, safely cancellable (Python 3.11's `loop.sock_accept` is not:
    its callback may complete a future that was already cancelled)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def connect(path: Path) -> UnixStream:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, str(path))
    except BaseException:
        sock.close()
        raise
    return UnixStream(sock)
