"""Who may connect, and what a crowd of bad clients can do to the feed (nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from streamd.events import CloudEvent, State
from streamd.feed.client import FeedClient
from streamd.feed.unixsock import connect
from tests.support import ScriptedProvider, running_daemon

pytestmark = pytest.mark.anyio

NOBODY = 65534

CHILD = r"""
import os, socket, sys, json
os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print(json.dumps({{"refused": "EACCES"}})); sys.exit(0)
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip() or json.dumps({{"closed": True}}))
"""


async def as_other_user(sock: Path) -> dict[str, object]:
    with anyio.fail_after(30):
        out = await anyio.run_process([sys.executable, "-c", CHILD.format(uid=NOBODY), str(sock)], check=False)
    assert out.returncode == 0, out.stderr
    value: dict[str, object] = json.loads(out.stdout)
    return value


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid (CI runs as root)")
async def test_another_user_is_refused_by_mode_and_by_peer_credentials(short_tmp: Path) -> None:
    os.chmod(short_tmp, 0o755)
    async with running_daemon(short_tmp) as d:
        sock = d.config.socket
        assert await as_other_user(sock) == {"refused": "EACCES"}  # mode 0600: the kernel says no
        os.chmod(sock, 0o666)  # even with the door open, SO_PEERCRED says no
        frame = await as_other_user(sock)
        assert frame["frame"] == "error" and frame["code"] == "forbidden" and frame["fatal"] is True
        assert d.feed.refused == 1


async def test_a_thousand_connections_and_vanishing_clients_leave_subscribers_untouched(short_tmp: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    try:
        async with running_daemon(short_tmp) as d, FeedClient.connect(d.config.socket) as watcher:
            prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
            seen: list[int] = []

            async def watch() -> None:
                async for item in watcher.subscribe(since="now", filter="kind:state"):
                    if isinstance(item, CloudEvent):
                        seen.append(item.seq)
                        if item.data.job == "last":
                            return

            outcomes: dict[str, int] = {"hello": 0, "busy": 0, "closed": 0}

            async def crowd_member(i: int) -> None:
                try:
                    stream = await connect(d.config.socket)
                except OSError:
                    outcomes["closed"] += 1
                    return
                async with stream:
                    reader = BufferedByteReceiveStream(stream)
                    try:
                        first = json.loads(await reader.receive_until(b"\n", 65536))
                    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                        outcomes["closed"] += 1
                        return
                    if first.get("frame") != "hello":
                        assert first["code"] == "busy" and first["fatal"]
                        outcomes["busy"] += 1
                        return
                    outcomes["hello"] += 1
                    with contextlib.suppress(anyio.BrokenResourceError):
                        if i % 3 == 0:
                            await stream.send(b'{"op":"subscribe","since":"oldest","snapshot":tr')  # then vanish
                        elif i % 3 == 1:
                            await stream.send(b"garbage\n")
                        await anyio.sleep(0.2)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await anyio.sleep(0.1)
                async with anyio.create_task_group() as crowd:
                    for i in range(1000):
                        crowd.start_soon(crowd_member, i)
                    for i in range(50):
                        await prov.push(f"j{i}", State.QUEUED)
                await prov.push("last", State.QUEUED)
        assert sum(outcomes.values()) == 1000
        assert outcomes["hello"] >= 200 and outcomes["busy"] > 0
        assert len(seen) == 51 and seen == sorted(seen)  # the watcher got everything, in order
        assert d.feed.connections == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
