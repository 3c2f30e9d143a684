"""systemd integration: sd_notify, the watchdog, socket activation, credentials, journald logging, and
the unit files themselves (`.ci/check-units`)."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from streamd import config
from streamd import systemd as sd
from streamd.systemd import (
    ActivationError,
    Heartbeat,
    Notifier,
    NotifyError,
    SystemdError,
    listen_socket,
    register_secret,
    setup_logging,
    status_line,
    watchdog_interval,
    watchdog_loop,
)

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"


# -- helpers ----------------------------------------------------------------------------------------
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="sd-") as name:
        yield Path(name)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)  # guards a hang only; every datagram is already queued when read
    with sock:
        yield sock, path


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on `sock`, without waiting."""
    out = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of the active (uncommented) lines of a unit file."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# -- sd_notify --------------------------------------------------------------------------------------
def test_notifier_sends_each_message_as_one_datagram(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_env()
    assert notifier is not None
    with notifier:
        notifier.status(status_line(2, 3, 0))
        notifier.ready(status_line(3, 3, 12))
        notifier.watchdog()
        notifier.extend_timeout(2.5)
        notifier.stopping("shutting down:\nclosing the journal")
        assert [sock.recv(4096) for _ in range(5)] == [
            b"STATUS=2 of 3 providers connected, 0 jobs active",
            b"READY=1\nSTATUS=3 providers connected, 12 jobs active",
            b"WATCHDOG=1",
            b"EXTEND_TIMEOUT_USEC=2500000",
            b"STOPPING=1\nSTATUS=shutting down: closing the journal",
        ]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        first, second = sock.recv(4096).decode().split("\n")
        assert first == "RELOADING=1"
        key, _, usec = second.partition("=")
        assert key == "MONOTONIC_USEC"
        assert before <= int(usec) <= after
    assert drain(sock) == []


def test_notifier_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"streamd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_env(unset=True)
        assert notifier is not None
        assert "NOTIFY_SOCKET" not in os.environ
        with notifier:
            notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_from_env_without_notify_socket_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_env() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": ""}) is None


def test_notify_errors_are_raised(short_dir: Path) -> None:
    with pytest.raises(NotifyError, match="absolute path"):
        Notifier.from_env({"NOTIFY_SOCKET": "relative/notify"})
    missing = str(short_dir / "gone")
    with Notifier(missing) as notifier, pytest.raises(NotifyError, match=re.escape(missing)) as info:
        notifier.ready()
    assert isinstance(info.value.__cause__, OSError)
    with Notifier(missing) as notifier:
        with pytest.raises(ValueError):
            notifier.send("READY=1\nSTATUS=smuggled")
        with pytest.raises(ValueError):
            notifier.send("READY")


def test_status_line_reads_like_a_sentence() -> None:
    assert status_line(3, 3, 12) == "3 providers connected, 12 jobs active"
    assert status_line(1, 1, 1) == "1 provider connected, 1 job active"
    assert status_line(1, 4, 0) == "1 of 4 providers connected, 0 jobs active"
    assert status_line(0, 2, 5) == "0 of 2 providers connected, 5 jobs active"
    assert status_line(0, 0, 0) == "no providers enabled, 0 jobs active"
    with pytest.raises(ValueError):
        status_line(4, 3, 0)
    with pytest.raises(ValueError):
        status_line(0, 1, -1)


# -- watchdog ---------------------------------------------------------------------------------------
def test_watchdog_interval_is_half_the_timeout_for_this_process() -> None:
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": mine}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    for bad in ("0", "-5", "thirty"):
        with pytest.raises(SystemdError, match="WATCHDOG_USEC"):
            watchdog_interval({"WATCHDOG_USEC": bad, "WATCHDOG_PID": mine})


def _alive_script(answers: list[bool], done: anyio.Event) -> Callable[[], bool]:
    """alive() giving `answers` in turn; when they run out it sets `done` and keeps giving the last one.
    The loop sends (or withholds) that call's ping before it next awaits, so counts are exact."""
    calls = iter(answers)

    def alive() -> bool:
        answer = next(calls, None)
        if answer is None:
            done.set()
            return answers[-1]
        return answer

    return alive


async def _run_watchdog(notifier: Notifier, alive: Callable[[], bool], done: anyio.Event) -> None:
    with anyio.fail_after(60):  # a hang guard only
        async with anyio.create_task_group() as tg:
            tg.start_soon(watchdog_loop, notifier, 0.001, alive)
            await done.wait()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_watchdog_pings_stop_when_the_daemon_is_not_alive(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    done = anyio.Event()
    alive = _alive_script([True, True, True, False, False, False, False], done)
    with Notifier(path) as notifier, caplog.at_level(logging.WARNING, logger="streamd.systemd"):
        await _run_watchdog(notifier, alive, done)
    assert drain(sock) == [b"WATCHDOG=1"] * 3
    assert [r.getMessage() for r in caplog.records if "progress" in r.getMessage()] == [
        "watchdog: the daemon has stopped making progress; withholding pings so systemd restarts it"
    ]


@pytest.mark.anyio
async def test_watchdog_pings_resume_when_the_daemon_recovers(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver
    done = anyio.Event()
    alive = _alive_script([True, False, False, True, True], done)
    with Notifier(path) as notifier, caplog.at_level(logging.WARNING, logger="streamd.systemd"):
        await _run_watchdog(notifier, alive, done)
    assert drain(sock) == [b"WATCHDOG=1"] * 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("stopped making progress" in m for m in messages) == 1
    assert sum("progress again" in m for m in messages) == 1


@pytest.mark.anyio
async def test_watchdog_reports_failed_pings_and_keeps_trying(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    done = anyio.Event()
    alive = _alive_script([True, True, True], done)
    with Notifier(str(short_dir / "nobody-listens")) as notifier, caplog.at_level(logging.ERROR):
        await _run_watchdog(notifier, alive, done)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "cannot notify systemd" in r.getMessage()]
    assert len(failures) == 4


def test_heartbeat_is_alive_only_while_beats_are_recent() -> None:
    now = [100.0]
    beat = Heartbeat(10.0, clock=lambda: now[0])
    assert beat.alive()
    now[0] = 110.0
    assert beat.alive()
    now[0] = 110.5
    assert not beat.alive()
    beat.beat()
    assert beat.alive()
    assert beat.age() == 0.0


# -- socket activation ------------------------------------------------------------------------------
# Does what systemd does between fork and exec: the passed sockets become fds 3, 4, ..., and
# LISTEN_PID is the pid of the process that is then exec'd (the same pid).
LAUNCHER = """
import os, sys
code, names, *sources = sys.argv[1:]
sources = [int(fd) for fd in sources]
for i, fd in enumerate(sources):
    os.dup2(fd, 3 + i)
for fd in sources:
    os.close(fd)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sources)))
if names:
    env["LISTEN_FDNAMES"] = names
os.execve(sys.executable, [sys.executable, "-c", code], env)
"""

# The daemon's side: take the socket, report what it got, serve one connection.
ACTIVATED = """
import os, sys
from streamd.systemd import ActivationError, listen_socket
try:
    sock = listen_socket()
except ActivationError as exc:
    print("ActivationError:", exc, flush=True)
    sys.exit(3)
left = sorted(k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ)
print(sock.fileno(), sock.getsockname(), os.get_inheritable(sock.fileno()), left, flush=True)
for fd in range(3, 8):
    if fd != sock.fileno():
        try:
            os.fstat(fd)
            print("still open:", fd, flush=True)
        except OSError:
            pass
conn, _ = sock.accept()
conn.sendall(b"hello from %d\\n" % os.getpid())
conn.close()
"""


def _spawn_activated(sockets: list[socket.socket], names: str) -> subprocess.Popen[str]:
    # Duplicates at fd >= 10, so that moving them to 3, 4, ... in the child never overwrites one.
    sources = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in sockets]
    try:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, ACTIVATED, names, *map(str, sources)],
            pass_fds=sources,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    finally:
        for fd in sources:
            os.close(fd)


def _unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def _serve_one(proc: subprocess.Popen[str], path: Path) -> str:
    """Connect to `path` and return the child's greeting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(60)
        client.connect(str(path))
        return client.makefile("r").readline().strip()


def test_socket_activation_hands_the_listening_socket_to_the_daemon(short_dir: Path) -> None:
    path = short_dir / "feed.sock"
    with _unix_listener(path) as listener:
        proc = _spawn_activated([listener], "feed")
    # Only the child holds the socket now: a connection that succeeds was accepted by it.
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == f"3 {path} False []", proc.stderr.read() if proc.stderr else ""
    greeting = _serve_one(proc, path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert greeting == f"hello from {proc.pid}"
    assert "still open" not in out


def test_socket_activation_picks_the_named_socket_and_closes_the_rest(short_dir: Path) -> None:
    feed, other = short_dir / "feed.sock", short_dir / "other.sock"
    with _unix_listener(other) as first, _unix_listener(feed) as second:
        proc = _spawn_activated([first, second], "extra:feed")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == f"4 {feed} False []"
    greeting = _serve_one(proc, feed)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert greeting == f"hello from {proc.pid}"
    assert "still open" not in out  # fd 3, the unnamed extra socket, was closed


@pytest.mark.parametrize(
    ("make", "complaint"),
    [
        (lambda path: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "AF_INET SOCK_DGRAM"),
        (lambda path: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "not listening"),
    ],
    ids=["udp", "unix-not-listening"],
)
def test_socket_activation_refuses_a_socket_that_is_not_a_unix_listener(
    short_dir: Path, make: Callable[[Path], socket.socket], complaint: str
) -> None:
    with make(short_dir / "x.sock") as wrong:
        proc = _spawn_activated([wrong], "feed")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert out.startswith("ActivationError: fd 3 (feed) is ")
    assert complaint in out


def test_socket_activation_ignores_and_clears_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "feed", "PATH": "/bin"}
    assert listen_socket(environ=env) is None
    assert env == {"PATH": "/bin"}
    assert listen_socket(environ={}) is None
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert listen_socket(environ=env) is None
    assert env == {}


def test_socket_activation_rejects_malformed_variables() -> None:
    mine = str(os.getpid())
    with pytest.raises(ActivationError, match="LISTEN_FDNAMES"):
        listen_socket(environ={"LISTEN_PID": mine, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "feed"})
    with pytest.raises(ActivationError, match="LISTEN_FDS"):
        listen_socket(environ={"LISTEN_PID": mine, "LISTEN_FDS": "many"})
    with pytest.raises(ActivationError, match="LISTEN_PID"):
        listen_socket(environ={"LISTEN_PID": "me", "LISTEN_FDS": "1"})


# -- credentials and directories (config.load under systemd) ---------------------------------------
PROVIDER_ENV = ("OXEN_API_KEY", "WIRO_API_KEY", "WIRO_API_SECRET", "RUNWARE_API_KEY", "APIFRAME_API_KEY")


def test_config_reads_systemd_credentials_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*PROVIDER_ENV, "STREAMD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    conf, creds, state, run = (tmp_path / d for d in ("etc", "creds", "state", "run"))
    for d in (conf, creds, state, run):
        d.mkdir()
    (conf / "streamd.toml").write_text('[providers.oxen]\nbase_url = "http://127.0.0.1:9/"\n')
    (creds / "oxen_api_key").write_text("oxen-from-credential\n")
    (creds / "wiro_api_key").write_text("wiro-key-from-credential")
    (creds / "wiro_api_secret").write_text("wiro-secret-from-credential")
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(conf))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    monkeypatch.setenv("OXEN_API_KEY", "oxen-from-environment")  # a credential wins over the environment

    cfg = config.load()

    assert cfg.source == conf / "streamd.toml"
    assert sorted(cfg.providers) == ["oxen", "wiro"]
    assert cfg.providers["oxen"].key.reveal() == "oxen-from-credential"
    assert cfg.providers["oxen"].base_url == "http://127.0.0.1:9"
    assert cfg.providers["wiro"].key.reveal() == "wiro-key-from-credential"
    assert cfg.providers["wiro"].secret is not None
    assert cfg.providers["wiro"].secret.reveal() == "wiro-secret-from-credential"
    assert cfg.state_dir == state
    assert cfg.socket == run / "streamd.sock"
    assert "from-credential" not in repr(cfg)


def test_units_load_credentials_under_the_names_config_reads() -> None:
    """Every LoadCredential(Encrypted)= example in the units names a credential that config.py looks
    for (the provider's environment variable, lower-cased), and every such credential has an example."""
    expected = {value.lower() for d in config.DEFAULTS.values() for key, value in d.items() if key.endswith("_env")}
    for unit in (UNITS / "streamd.service", UNITS / "user" / "streamd.service"):
        named = re.findall(r"^#?LoadCredential(?:Encrypted)?=([^:\s]+):", unit.read_text(), re.M)
        assert set(named) <= expected, unit
    system = UNITS / "streamd.service"
    plain = re.findall(r"^#?LoadCredential=([^:\s]+):", system.read_text(), re.M)
    encrypted = re.findall(r"^#?LoadCredentialEncrypted=([^:\s]+):", system.read_text(), re.M)
    assert set(plain) == expected == set(encrypted)


# -- logging ----------------------------------------------------------------------------------------
@pytest.fixture
def clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    sd._installed = None
    sd._secrets.clear()
    logging.captureWarnings(False)
    for name in sd.QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET)


def _emit_sample(name: str = "streamd.test") -> None:
    logger = logging.getLogger(name)
    logger.debug("debug detail")
    logger.info("hello %s", "journal")
    logger.warning("provider %s is slow", "oxen")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("it failed")
    logger.critical("giving up")


@pytest.mark.usefixtures("clean_logging")
def test_logging_under_journald_prefixes_every_line_with_its_priority(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        setup_logging("info", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        _emit_sample()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[:2] == ["<6>streamd.test: hello journal", "<4>streamd.test: provider oxen is slow"]
    assert lines[2] == "<3>streamd.test: it failed"
    traceback = lines[3:-1]
    assert traceback[0] == "<3>Traceback (most recent call last):"
    assert traceback[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in traceback)
    assert lines[-1] == "<2>streamd.test: giving up"
    assert not any("debug detail" in line for line in lines)


@pytest.mark.usefixtures("clean_logging")
def test_logging_to_a_pipe_keeps_priorities_and_adds_timestamps() -> None:
    stream = io.StringIO()
    setup_logging(logging.DEBUG, stream=stream, environ={})
    _emit_sample()
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"<7>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG streamd\.test: debug detail", lines[0])
    assert re.fullmatch(r"<6>\S+ \S+ INFO streamd\.test: hello journal", lines[1])
    assert all(re.match(r"<[234567]>", line) for line in lines)


@pytest.mark.usefixtures("clean_logging")
def test_logging_to_a_terminal_has_no_priority_prefix() -> None:
    leader, follower = os.openpty()
    with open(leader, "rb", buffering=0), open(follower, "w") as tty:
        # JOURNAL_STREAM inherited from a user service does not describe this terminal.
        handler = setup_logging("info", stream=tty, environ={"JOURNAL_STREAM": "1:2"})
    assert isinstance(handler.formatter, logging.Formatter)
    record = logging.LogRecord("streamd.test", logging.WARNING, __file__, 1, "careful", None, None)
    line = handler.format(record)
    assert re.fullmatch(r"\S+ \S+ WARNING  streamd\.test: careful", line)


def test_setup_logging_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose", stream=io.StringIO())


@pytest.mark.usefixtures("clean_logging")
def test_registered_secrets_never_reach_the_log() -> None:
    key, wiro = "sk-live-9f8e7d6c", "wiro/secret+value"
    register_secret(key)
    register_secret(config.Secret(wiro))
    register_secret("")  # ignored, else every message would be mangled
    stream = io.StringIO()
    setup_logging("debug", stream=stream, journal=True)
    logger = logging.getLogger("streamd.providers.oxen")
    logger.info("GET https://hub.oxen.ai/api?key=%s", key)
    logger.warning("signature for %s", {"secret": wiro})
    logger.info("url-encoded: https://api.wiro.ai/v1?s=wiro%2Fsecret%2Bvalue and wiro/secret%2Bvalue")
    try:
        raise PermissionError(f"401 for token {key}")
    except PermissionError:
        logger.exception("auth failed for key %s", key)
    text = stream.getvalue()
    for needle in (key, wiro, "wiro%2Fsecret%2Bvalue", "wiro/secret%2Bvalue"):
        assert needle not in text
    assert "GET https://hub.oxen.ai/api?key=********" in text
    assert "<3>PermissionError: 401 for token ********" in text
    assert "url-encoded: https://api.wiro.ai/v1?s=******** and ********" in text
    assert text.count("********") == 6


def test_redaction_survives_log_calls_whose_arguments_do_not_fit() -> None:
    register_secret("tok-123456")
    try:
        record = logging.LogRecord("streamd.x", logging.ERROR, __file__, 1, "bad %s %s for %r", ("tok-123456",), None)
        assert sd.RedactSecrets().filter(record)
        assert "tok-123456" not in record.getMessage()
        assert record.args is None
        assert record.getMessage().startswith("bad %s %s for %r [log arguments dropped")
    finally:
        sd._secrets.clear()


# -- MemoryDenyWriteExecute=yes ---------------------------------------------------------------------
# systemd 252's MemoryDenyWriteExecute= is a seccomp filter (systemd >= 255 may use PR_SET_MDWE): mmap()
# with PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() adding PROT_EXEC and shmat(SHM_EXEC) fail with
# EPERM. The child installs the same filter and then does what the daemon does.
MDWE_CHILD = r"""
import ctypes, errno, mmap, sys
ARCH, MMAP, MPROTECT, PKEY_MPROTECT, SHMAT = {numbers}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | errno.EPERM
prog = [(LD, 0, 0, 4), (JEQ, 1, 0, ARCH), (RET, 0, 0, ALLOW)]
for nr, arg, mask, value in [(MMAP, 2, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC),
                             (MPROTECT, 2, PROT_EXEC, PROT_EXEC), (PKEY_MPROTECT, 2, PROT_EXEC, PROT_EXEC),
                             (SHMAT, 2, SHM_EXEC, SHM_EXEC)]:
    prog += [(LD, 0, 0, 0), (JEQ, 0, 5, nr), (LD, 0, 0, 16 + 8 * arg), (AND, 0, 0, mask),
             (JEQ, 0, 1, value), (RET, 0, 0, DENY), (RET, 0, 0, ALLOW)]
prog.append((RET, 0, 0, ALLOW))
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
filters = (Filter * len(prog))(*[Filter(*i) for i in prog])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
assert libc.prctl(22, 2, ctypes.byref(Prog(len(prog), filters)), 0, 0) == 0, ctypes.get_errno()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("the filter is not in force")
except PermissionError:
    pass

import importlib, os, pkgutil, sqlite3, ssl, tempfile
import anyio, httpx, msgspec, platformdirs, websockets
import streamd
for module in pkgutil.walk_packages(streamd.__path__, "streamd."):
    importlib.import_module(module.name)
ssl.create_default_context()
with tempfile.TemporaryDirectory() as d:
    db = sqlite3.connect(os.path.join(d, "journal.db"))
    assert db.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    db.execute("CREATE TABLE t(x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    db.commit()
    async def main():
        assert await anyio.to_thread.run_sync(lambda: 6 * 7) == 42
        listener = await anyio.create_unix_listener(os.path.join(d, "s"))
        await listener.aclose()
        async with httpx.AsyncClient() as client:
            pass
    anyio.run(main)
assert msgspec.json.decode(msgspec.json.encode({"seq": 1})) == {"seq": 1}
print("ok")
"""

SYSCALLS = {  # audit arch, mmap, mprotect, pkey_mprotect, shmat
    "x86_64": (0xC000003E, 9, 10, 329, 30),
    "aarch64": (0xC00000B7, 222, 226, 288, 196),
}


def test_python_and_its_libraries_run_under_memory_deny_write_execute() -> None:
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"syscall numbers for {platform.machine()} are not in this test")
    result = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD.replace("{numbers}", repr(numbers))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- the unit files ---------------------------------------------------------------------------------
def test_units_describe_the_documented_sockets_and_notify_protocol() -> None:
    system_socket = unit_settings(UNITS / "streamd.socket")
    assert system_socket["ListenStream"] == ["/run/streamd/streamd.sock"]
    assert system_socket["SocketMode"] == ["0660"]
    assert system_socket["SocketGroup"] == ["streamd"]
    user_socket = unit_settings(UNITS / "user" / "streamd.socket")
    assert user_socket["ListenStream"] == ["%t/streamd/streamd.sock"]
    assert user_socket["SocketMode"] == ["0600"]
    for sock in (system_socket, user_socket):
        assert sock["FileDescriptorName"] == [sd.FEED_FD_NAME]
    for path in (UNITS / "streamd.service", UNITS / "user" / "streamd.service"):
        service = unit_settings(path)
        assert service["Type"] == ["notify"]
        assert service["Requires"] == ["streamd.socket"]
        assert service["StateDirectory"] == ["streamd"]
        assert service["ConfigurationDirectory"] == ["streamd"]
        assert "WatchdogSec" in service
        assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # the daemon reloads on SIGHUP
        # systemd keeps ConfigurationDirectory= owned by root (not User=): the service user reads it
        # through the "other" bits.
        assert int(service.get("ConfigurationDirectoryMode", ["0755"])[0], 8) & 0o005 == 0o005
        # The feed socket lives in /run/streamd; a RuntimeDirectory= would be removed, socket and
        # all, whenever the service stops.
        assert "RuntimeDirectory" not in service
    assert unit_settings(UNITS / "streamd.service")["ExecStart"] == ["/usr/bin/streamd run"]
    sysusers = (UNITS / "sysusers.d" / "streamd.conf").read_text()
    assert re.search(r"^u\s+streamd\s", sysusers, re.M)


def _check_units(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "check-units"), *args], capture_output=True, text=True, timeout=300
    )


def test_check_units_passes_and_the_score_is_the_documented_one() -> None:
    result = _check_units()
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"security: streamd\.service exposure (\d+\.\d) \(limit 2\.0\)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 2.0
    documented = re.search(
        r"Overall exposure level for streamd\.service: (\d+\.\d)", (ROOT / "docs/service.md").read_text()
    )
    assert documented, "docs/service.md records the exposure score"
    assert documented.group(1) == match.group(1)


def _weaken(text: str) -> str:
    for setting in ("ProtectSystem", "ProtectHome", "PrivateDevices", "SystemCallFilter", "RestrictAddressFamilies"):
        text = re.sub(rf"^{setting}=.*\n", "", text, flags=re.M)
    return text


@pytest.mark.parametrize(
    ("name", "edit", "complaint"),
    [
        ("streamd.service", lambda t: t.replace("NoNewPrivileges=", "NoNewPrivilege="), "Unknown key 'NoNewPrivilege'"),
        ("user/streamd.service", lambda t: t.replace("WatchdogSec=30s", "WatchdogSec=thirty"), "parse sec value"),
        ("streamd.socket", lambda t: t.replace("SocketGroup=streamd", "SocketGroup=feeders"), "SocketGroup=feeders"),
        ("streamd.service", lambda t: t.replace("Requires=streamd.socket", "Requires=feed.socket"), "feed.socket"),
        ("streamd.service", _weaken, "is above 2.0"),
    ],
    ids=["typo", "bad-value-in-user-unit", "group-not-created", "missing-dependency", "weaker-hardening"],
)
def test_check_units_fails_on_what_verify_only_warns_about(
    tmp_path: Path, name: str, edit: Callable[[str], str], complaint: str
) -> None:
    units = tmp_path / "systemd"
    for source in UNITS.rglob("*"):
        if source.is_file():
            target = units / source.relative_to(UNITS)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    unit = units / name
    edited = edit(unit.read_text())
    assert edited != unit.read_text()
    unit.write_text(edited)
    result = _check_units(str(units))
    assert result.returncode != 0
    assert complaint in result.stderr, result.stdout + result.stderr
