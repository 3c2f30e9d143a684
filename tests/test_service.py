"""`streamd run` as systemd runs it: a real process, $NOTIFY_SOCKET, watchdog, SIGHUP, SIGTERM,
socket activation, credentials, against the Oxen emulator on loopback."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from streamd import service
from streamd.config import Config, DaemonFile
from streamd.daemon import Daemon
from streamd.emulators.oxen import OxenEmulator
from streamd.feed.client import FeedClient
from tests.support import ScriptedProvider

pytestmark = pytest.mark.anyio


class NotifySocket:
    """A datagram socket where the daemon's sd_notify lines land, drained by a thread as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()

    async def wait_for(self, key: str, value: str | None = None, within: float = 30.0) -> dict[str, str]:
        with anyio.fail_after(within):
            while True:
                for msg in list(self.messages):
                    if key in msg and (value is None or msg[key] == value):
                        return msg
                await anyio.sleep(0.02)

    def count(self, key: str) -> int:
        return sum(1 for m in list(self.messages) if key in m)


@asynccontextmanager
async def emulator() -> AsyncIterator[OxenEmulator]:
    emu = OxenEmulator(speed=20.0, seed=3)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        yield emu
        tg.cancel_scope.cancel()


def write_config(tmp: Path, emu: OxenEmulator, key_file: Path) -> Path:
    cfg = tmp / "streamd.toml"
    cfg.write_text(
        f'[daemon]\nsocket = "{tmp / "feed.sock"}"\nstate_dir = "{tmp / "state"}"\n\n'
        f'[providers.oxen]\napi_key_file = "{key_file}"\nbase_url = "{emu.settings().base_url}"\n'
    )
    return cfg


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith(("LISTEN_", "NOTIFY"))
    }
    return env | {"XDG_CONFIG_HOME": str(tmp / "xdg")} | extra


async def stop(proc: Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with anyio.fail_after(30):
        return await proc.wait()


async def test_readiness_status_watchdog_reload_and_clean_stop(short_tmp: Path) -> None:
    notify = NotifySocket(short_tmp / "notify")
    async with emulator() as emu:
        key = short_tmp / "oxen.key"
        key.write_text(emu.settings().key.reveal())
        cfg = write_config(short_tmp, emu, key)
        env = env_for(short_tmp, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="600000")
        log = (short_tmp / "stderr.log").open("wb")
        proc = await anyio.open_process(
            [sys.executable, "-m", "streamd.cli", "run", "--config", str(cfg)], env=env, stdout=None, stderr=log
        )
        try:
            ready = await notify.wait_for("READY", "1")
            # Ready means: the feed listens and the provider made its first connection attempt.
            assert (short_tmp / "feed.sock").exists()
            assert emu.requests("GET", "/api/events")
            assert ready.get("STATUS") == "1 provider connected, 0 jobs active"
            await notify.wait_for("WATCHDOG", "1")
            async with FeedClient.connect(short_tmp / "feed.sock") as client:
                jobs = await client.submit("oxen", "bytedance-seedream-4", "a lighthouse [hang]")
                await notify.wait_for("STATUS", "1 provider connected, 1 job active")
                # SIGHUP with a rotated key file: the provider restarts, the subscriber stays.
                key.write_text(emu.settings().key.reveal() + " ")
                n_ready = notify.count("READY")
                proc.send_signal(signal.SIGHUP)
                await notify.wait_for("RELOADING", "1")
                with anyio.fail_after(30):
                    while notify.count("READY") == n_ready:  # noqa: ASYNC110  (a thread fills the list)
                        await anyio.sleep(0.02)
                status = await client.status()
                assert status["providers"][0]["health"] in ("connected", "starting")
                assert [j.job for j in await client.jobs()] == jobs["jobs"]
            code = await stop(proc)
            assert code == 0
            await notify.wait_for("STOPPING", "1")
            assert not (short_tmp / "feed.sock").exists()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            notify.close()
            log.close()
    # Nothing the daemon logged holds the key, and the log is journald-style (priority prefixes).
    text = (short_tmp / "stderr.log").read_bytes()
    assert text and emu.settings().key.reveal().encode() not in text
    assert all(line.startswith(b"<") for line in text.splitlines())


async def test_socket_activation_and_credentials(short_tmp: Path) -> None:
    """A listening socket passed as fd 3 (LISTEN_FDS/LISTEN_PID) is used instead of binding; the key
    comes from $CREDENTIALS_DIRECTORY as LoadCredential= provides it."""
    sock_path = short_tmp / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    creds = short_tmp / "creds"
    creds.mkdir()
    async with emulator() as emu:
        (creds / "oxen_api_key").write_text(emu.settings().key.reveal())
        cfg = short_tmp / "streamd.toml"
        cfg.write_text(
            f'[daemon]\nstate_dir = "{short_tmp / "state"}"\n[providers.oxen]\nbase_url = "{emu.settings().base_url}"\n'
        )
        fd = listener.fileno()
        # What systemd does before exec: the socket at fd 3, LISTEN_PID = the pid that will run streamd.
        launcher = (
            "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd) if fd != 3 else None; "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='feed'); "
            "os.execv(sys.executable, [sys.executable, '-m', 'streamd.cli', 'run', '--config', sys.argv[2]])"
        )
        env = env_for(short_tmp, CREDENTIALS_DIRECTORY=str(creds))
        proc = await anyio.open_process(
            [sys.executable, "-c", launcher, str(fd), str(cfg)], env=env, pass_fds=(fd,), stdout=None, stderr=None
        )  # output goes to pytest's captured fds
        listener.close()
        try:
            with anyio.fail_after(30):
                while True:
                    try:
                        async with FeedClient.connect(sock_path) as client:
                            status = await client.status()
                            if status["providers"] and status["providers"][0]["health"] == "connected":
                                break
                    except Exception:
                        pass
                    await anyio.sleep(0.1)
            assert status["daemon"]["socket"] == str(sock_path)
            assert not (short_tmp / "xdg").exists() or not any((short_tmp / "xdg").rglob("*.sock"))
            assert await stop(proc) == 0
            assert sock_path.exists()  # the socket belongs to systemd: the daemon does not remove it
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_settle_freezes_what_start_up_built_and_frees_what_a_reload_replaced() -> None:
    """Full collections stop walking what start-up built; a reload settles again, and must not keep
    what it replaced for ever."""

    class Provider:  # stands for start-up state in a reference cycle, as objects with callbacks are
        def __init__(self) -> None:
            self.me = self

    built = Provider()
    ref = weakref.ref(built)
    try:
        service.settle()
        assert gc.get_freeze_count() > 0
        del built  # replaced by a reload
        gc.collect()
        assert ref() is not None, "frozen objects are out of the collector's sight"
        service.settle()  # after the reload
        assert ref() is None, "what the reload replaced was frozen for ever"
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_serve_settles_once_ready_and_after_each_reload(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`streamd run` settles once READY is sent and again after each SIGHUP reload (signals come from a
    stream here, not from the test process's own signal handlers)."""
    notified: list[str] = []
    settled, settles = anyio.create_memory_object_stream[str](4)  # what _notify had said when settle ran
    monkeypatch.setattr(service, "settle", lambda: settled.send_nowait(notified[-1] if notified else "nothing"))
    monkeypatch.setattr(service, "_notify", lambda _notifier, method, *args: notified.append(method))
    send, receive = anyio.create_memory_object_stream[int](4)
    monkeypatch.setattr(service.anyio, "open_signal_receiver", lambda *_: contextlib.nullcontext(receive))
    config = short_tmp / "streamd.toml"
    config.write_text(f'[daemon]\nsocket = "{short_tmp / "feed.sock"}"\nstate_dir = "{short_tmp / "state"}"\n')
    cfg = Config(socket=short_tmp / "feed.sock", state_dir=short_tmp / "state", providers={}, daemon=DaemonFile())
    daemon = Daemon(cfg, providers={"oxen": ScriptedProvider()})
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(service._serve, daemon, None, str(config), None, None)
            assert await settles.receive() == "ready"
            await send.send(signal.SIGHUP)
            assert await settles.receive() == "ready"  # the second READY, after the reload
            await send.send(signal.SIGTERM)  # _serve returns, and the task group with it
    with pytest.raises(anyio.WouldBlock):
        settles.receive_nowait()  # no more than those two
    assert notified == ["ready", "reloading", "ready", "stopping"]
