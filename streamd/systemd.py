"""systemd integration: readiness and watchdog notification, socket activation, journald logging.

This module knows nothing about the daemon; `streamd/daemon.py` decides when it is ready, what its
status is and whether its loop is alive. Everything here also works without systemd: `Notifier.from_env()`
and `listen_socket()` return None, `watchdog_interval()` returns None, and `setup_logging()` writes
plain lines to a terminal.

- `Notifier`: the sd_notify(3) protocol, a datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET` (a path, or
  `@name` for an abstract socket). Failures raise `NotifyError`; nothing is swallowed.
- `watchdog_interval()` and `watchdog_loop()`: `WATCHDOG=1` every half `WatchdogSec=`, only while the
  daemon says it is alive, so a daemon whose loop stalls is restarted by systemd.
- `listen_socket()`: the listening socket that a `.socket` unit passes (`LISTEN_FDS`, `LISTEN_PID`,
  `LISTEN_FDNAMES`; fd 3), checked to be a listening AF_UNIX stream socket.
- `setup_logging()`: one handler on stderr; under journald (or whenever stderr is not a terminal) each
  line starts with a `<N>` syslog priority, which journald strips and files as the entry's priority.
  `register_secret()` and `RedactSecrets` keep credentials out of every line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, MutableMapping
from typing import NoReturn, Protocol, TextIO

import anyio

__all__ = [
    "FEED_FD_NAME",
    "ActivationError",
    "Heartbeat",
    "Notifier",
    "NotifyError",
    "RedactSecrets",
    "SystemdError",
    "listen_socket",
    "redact",
    "register_secret",
    "setup_logging",
    "status_line",
    "syslog_priority",
    "watchdog_interval",
    "watchdog_loop",
]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
FEED_FD_NAME = "feed"  # FileDescriptorName= in systemd/streamd.socket and systemd/user/streamd.socket
NOTIFY_SEND_TIMEOUT = 1.0  # seconds; a datagram to PID 1 never takes this long unless it is wedged
REDACTED = "********"


class SystemdError(Exception):
    """Something systemd handed over (environment, socket) is not what the protocol says."""


class NotifyError(SystemdError):
    """A notification could not be sent to $NOTIFY_SOCKET."""


class ActivationError(SystemdError):
    """The socket passed by systemd is missing or is not a listening AF_UNIX stream socket."""


# -- sd_notify --------------------------------------------------------------------------------------
class Notifier:
    """Sends sd_notify(3) messages to the service manager.

    Each method sends one datagram and raises `NotifyError` if it cannot be delivered. Use
    `from_env()`, which returns None when the process was not started by systemd with `Type=notify`.
    Sending does not wait for systemd, except when its queue is full: then for at most
    `NOTIFY_SEND_TIMEOUT` seconds before the error. Safe to call from worker threads.
    """

    def __init__(self, address: str) -> None:
        if address.startswith("@") and len(address) > 1:
            target = "\0" + address[1:]  # Linux abstract namespace
        elif address.startswith("/"):
            target = address
        else:
            raise NotifyError(f"$NOTIFY_SOCKET={address!r}: expected an absolute path or an @abstract name")
        self.address = address
        self._target = target
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(NOTIFY_SEND_TIMEOUT)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier | None:
        """A notifier for $NOTIFY_SOCKET, or None when it is unset. `unset=True` removes the variable
        so that child processes do not inherit it."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        return cls(address) if address else None

    def send(self, *assignments: str) -> None:
        """Send `KEY=VALUE` assignments in one datagram."""
        for item in assignments:
            key, sep, _ = item.partition("=")
            if not sep or not key or "\n" in item:
                raise ValueError(f"not a single-line KEY=VALUE assignment: {item!r}")
        if not assignments:
            raise ValueError("nothing to send")
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                self._sock.sendto(data, self._target)
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise NotifyError(f"cannot notify systemd at {self.address}: {reason}") from exc

    def ready(self, status: str | None = None) -> None:
        """Start-up is complete: systemd considers the service started and starts units ordered after it."""
        self.send("READY=1", *_status(status))

    def status(self, text: str) -> None:
        """A one-line status that `systemctl status` shows."""
        self.send(*_status(text))

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun."""
        self.send("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> None:
        """Configuration reload has begun; send `ready()` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def watchdog(self) -> None:
        """Keep-alive ping for `WatchdogSec=`."""
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more before the start, stop or reload timeout fires."""
        if seconds <= 0:
            raise ValueError("the extension must be positive")
        self.send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})"


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)


def status_line(providers_connected: int, providers_total: int, jobs_active: int) -> str:
    """The STATUS= text: `3 providers connected, 12 jobs active`, `2 of 3 providers connected, 1 job active`."""
    if min(providers_connected, providers_total, jobs_active) < 0 or providers_connected > providers_total:
        raise ValueError(f"impossible counts: {providers_connected} of {providers_total} providers, {jobs_active} jobs")
    if providers_total == 0:
        providers = "no providers enabled"
    elif providers_connected == providers_total:
        providers = f"{_count(providers_connected, 'provider')} connected"
    else:
        providers = f"{providers_connected} of {providers_total} providers connected"
    return f"{providers}, {_count(jobs_active, 'job')} active"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- watchdog ---------------------------------------------------------------------------------------
def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings (half of `WatchdogSec=`), or None when the watchdog is off
    or meant for another process (`$WATCHDOG_PID`)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            raise SystemdError(f"$WATCHDOG_PID={pid!r} is not a process id") from None
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        raise SystemdError(f"$WATCHDOG_USEC={usec!r} is not a positive number of microseconds")
    return value / 2 / 1_000_000


async def watchdog_loop(notifier: Notifier, interval: float, alive: Callable[[], bool]) -> NoReturn:
    """Ping systemd every `interval` seconds while `alive()` is true; run it in the daemon's task group.

    The first ping is immediate. While `alive()` is false no ping is sent (and an error is logged once),
    so systemd restarts the service when `WatchdogSec=` passes; pings resume if `alive()` recovers first.
    A failed ping is logged and retried at the next interval: the missing ping is itself the alarm.
    """
    if interval <= 0:
        raise ValueError("the watchdog interval must be positive")
    stalled = False
    while True:
        if alive():
            if stalled:
                log.warning("watchdog: the daemon is making progress again; pings resume")
                stalled = False
            try:
                notifier.watchdog()
            except NotifyError as exc:
                log.error("watchdog: %s", exc)
        elif not stalled:
            stalled = True
            log.error("watchdog: the daemon has stopped making progress; withholding pings so systemd restarts it")
        await anyio.sleep(interval)


class Heartbeat:
    """A progress marker for `watchdog_loop`'s `alive`: call `beat()` wherever work gets done (a loop
    iteration, a journal commit); `alive()` is true while the last beat is at most `max_age` seconds old."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self.max_age = max_age
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last

    def alive(self) -> bool:
        return self.age() <= self.max_age


# -- socket activation ------------------------------------------------------------------------------
def listen_socket(
    name: str | None = FEED_FD_NAME, *, environ: MutableMapping[str, str] | None = None
) -> socket.socket | None:
    """The listening socket passed by systemd socket activation, or None when there is none.

    Follows sd_listen_fds(3): the sockets start at fd 3, `$LISTEN_FDS` says how many and `$LISTEN_PID`
    must be this process. `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the
    environment in every case, so that no child process mistakes them for its own.

    One socket is expected (whatever its name); when several are passed, `name` picks the one whose
    `FileDescriptorName=` it is, and the others are closed. It must be a listening AF_UNIX SOCK_STREAM
    socket, else `ActivationError`. It is returned in the blocking mode systemd gave it (blocking unless
    `NonBlocking=yes`); `anyio.abc.SocketListener.from_socket()` adopts it.
    """
    env = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", None)
    fds_text = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if not fds_text or not pid_text:
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        raise ActivationError(f"$LISTEN_PID={pid_text!r} is not a process id") from None
    if pid != os.getpid():
        return None  # meant for the process that exec'd us
    try:
        count = int(fds_text)
    except ValueError:
        count = -1
    if count < 0:
        raise ActivationError(f"$LISTEN_FDS={fds_text!r} is not a number of file descriptors")
    if count == 0:
        return None
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(f"$LISTEN_FDNAMES names {len(names)} sockets but $LISTEN_FDS={count}")
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"fd {fd} from $LISTEN_FDS is not open: {exc.strerror}") from None

    if count == 1:
        chosen = fds[0]
    else:
        matches = [fd for fd, fd_name in zip(fds, names, strict=True) if fd_name == name]
        if name is None or len(matches) != 1:
            wanted = f"exactly one named {name!r}" if name else "one"
            raise ActivationError(f"systemd passed {count} sockets ({', '.join(names)}); expected {wanted}")
        chosen = matches[0]
        for fd in fds:
            if fd != chosen:
                os.close(fd)

    label = f"fd {chosen} ({names[chosen - SD_LISTEN_FDS_START]})"
    try:
        mode = os.fstat(chosen).st_mode
    except OSError as exc:
        raise ActivationError(f"{label}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{label} is not a socket")
    sock = socket.socket(fileno=chosen)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            kind = f"{sock.family.name} {sock.type.name}{'' if listening else ', not listening'}"
            raise ActivationError(f"{label} is {kind}; expected a listening AF_UNIX SOCK_STREAM socket")
    except BaseException:
        sock.close()
        raise
    return sock


# -- logging ----------------------------------------------------------------------------------------
def syslog_priority(levelno: int) -> int:
    """The syslog priority journald files a record under: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class _Revealable(Protocol):
    def reveal(self) -> str: ...


class _Secrets:
    """The registered secret values and one regular expression that finds any of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        quote = urllib.parse.quote
        variants = {value, quote(value, safe=""), quote(value), urllib.parse.quote_plus(value)}
        with self._lock:
            if variants <= self._values:
                return
            self._values |= variants
            # Longest first, so that a secret containing another is replaced whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self.pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.pattern = None


_secrets = _Secrets()


def register_secret(value: str | _Revealable | None) -> None:
    """Never log `value` (a str, or a `config.Secret`): every handler that `setup_logging` installs
    replaces it, and its URL-encoded forms, with `********`. Empty values are ignored."""
    if value is None:
        return
    text = value if isinstance(value, str) else value.reveal()
    if text.strip():
        _secrets.add(text)


def redact(text: str) -> str:
    """`text` with every registered secret replaced."""
    pattern = _secrets.pattern
    return pattern.sub(REDACTED, text) if pattern is not None else text


class RedactSecrets(logging.Filter):
    """A handler filter that replaces registered secrets in the message, its arguments, the traceback
    and the stack. Attach it to every handler: filters on a logger do not see its children's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets.pattern is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format call: keep the format string, drop the arguments
            message = f"{record.msg} [log arguments dropped: they do not match the format]"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class PriorityFormatter(logging.Formatter):
    """Prefixes every line of the formatted record, traceback lines included, with `<N>`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


JOURNAL_FORMAT = "%(name)s: %(message)s"  # journald adds the time, identifier and pid
PIPE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TTY_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
QUIET_LIBRARIES = ("httpx", "httpcore", "websockets", "hpack", "asyncio")

_installed: logging.Handler | None = None


def is_journal_stream(stream: TextIO, environ: MutableMapping[str, str] | None = None) -> bool:
    """True when `stream` is the journald connection that systemd named in `$JOURNAL_STREAM`."""
    env = os.environ if environ is None else environ
    expected = env.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    level: int | str = logging.INFO,
    *,
    stream: TextIO | None = None,
    journal: bool | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> logging.Handler:
    """Send all logging to `stream` (stderr) through one handler that redacts registered secrets.

    Under journald (`$JOURNAL_STREAM` names the stream) lines are `<6>streamd.feed: message`, each line
    with its priority and without a timestamp (journald adds one). When the stream is some other pipe
    or file, lines carry the priority and a timestamp; on a terminal, a timestamp and the level name.
    `journal` forces the priority prefix on or off. Calling it again replaces the handler. Unless `level`
    is DEBUG, the HTTP and WebSocket libraries are kept to warnings (httpx logs every request at INFO).
    """
    global _installed
    levelno = _level(level)
    stream = sys.stderr if stream is None else stream
    journald = is_journal_stream(stream, environ)
    prefixed = journal if journal is not None else journald or not _isatty(stream)

    handler = logging.StreamHandler(stream)
    fmt = JOURNAL_FORMAT if journald else PIPE_FORMAT if prefixed else TTY_FORMAT
    formatter = PriorityFormatter(fmt) if prefixed else logging.Formatter(fmt)
    handler.setFormatter(formatter)
    handler.addFilter(RedactSecrets())

    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    _installed = handler
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if levelno <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)
    return handler


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r} (one of debug, info, warning, error, critical)")
    return levels[name]


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False
