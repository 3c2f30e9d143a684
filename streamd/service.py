"""`streamd run`: the daemon in the foreground, with signals, logging and (under systemd) notify.

One root task group owns the daemon, the signal handler, the watchdog and the status reporter.
Readiness (READY=1) is sent only once the daemon says it is ready: journal open, feed listening,
every enabled provider past its first connection attempt.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import sys
from pathlib import Path

import anyio

from streamd import config as config_mod
from streamd.daemon import Daemon, DaemonError
from streamd.errors import first_leaf
from streamd.journal import JournalError
from streamd.mirror import MirrorError, RedisMirror
from streamd.sidecar import Sidecar
from streamd.systemd import (
    ActivationError,
    Heartbeat,
    Notifier,
    NotifyError,
    listen_socket,
    register_secret,
    setup_logging,
    status_line,
    watchdog_interval,
    watchdog_loop,
)

log = logging.getLogger("streamd")

STATUS_EVERY = 5.0


def sidecars_for(cfg: config_mod.Config) -> list[Sidecar]:
    """The Redis mirror and the output archiver, each when configured (imported only then)."""
    out: list[Sidecar] = []
    if cfg.mirror.redis is not None:
        out.append(RedisMirror.from_config(cfg.mirror.redis))
    if cfg.archive.enabled:
        from streamd.archive import Archiver

        archiver = Archiver.from_config(cfg)
        if archiver is not None:
            out.append(archiver)
    return out  # seconds between STATUS= refreshes (only sent when the text changed)


def _register_secrets(cfg: config_mod.Config) -> None:
    for settings in cfg.providers.values():
        register_secret(settings.key)
        register_secret(settings.secret)


def run_service(config_path: str | None, *, socket: str | None, state_dir: str | None, log_level: str | None) -> int:
    try:
        cfg = config_mod.load(config_path, socket=socket, state_dir=state_dir)
    except config_mod.ConfigError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return 1
    setup_logging(log_level or cfg.daemon.log_level)
    _register_secrets(cfg)
    try:
        listener = listen_socket()
        notifier = Notifier.from_env()
    except (ActivationError, NotifyError) as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return 1
    if listener is not None:
        cfg = dataclasses.replace(cfg, socket=Path(listener.getsockname()))
        log.info("using the feed socket passed by systemd: %s", cfg.socket)
    try:
        sidecars = sidecars_for(cfg)
    except MirrorError as exc:
        print(f"streamd: error: {cfg.source or 'config'}: mirror.redis: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(cfg, listener=listener, sidecars=sidecars)
    try:
        anyio.run(_serve, daemon, notifier, config_path, socket, state_dir)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaf = first_leaf(exc)
        if isinstance(leaf, DaemonError | JournalError):
            print(f"streamd: error: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
    return 0


def _status(daemon: Daemon) -> str:
    ctxs = daemon.contexts.values()
    connected = sum(1 for c in ctxs if c.state.health.value in ("connected", "polling"))
    return status_line(connected, len(daemon.contexts), len(daemon.tracker.unfinished()))


def _notify(notifier: Notifier | None, method: str, *args: str) -> None:
    """Notify errors are logged, not fatal: a daemon that works but cannot tell systemd is still useful
    (systemd will time it out and say why)."""
    if notifier is None:
        return
    try:
        getattr(notifier, method)(*args)
    except NotifyError as exc:
        log.error("sd_notify %s: %s", method, exc)


async def _serve(
    daemon: Daemon, notifier: Notifier | None, config_path: str | None, socket: str | None, state_dir: str | None
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        _notify(notifier, "ready", _status(daemon))
        settle()
        interval = watchdog_interval()
        if notifier is not None and interval is not None:
            heartbeat = Heartbeat(max_age=interval * 1.5)
            tg.start_soon(_tick, heartbeat, interval / 2)
            tg.start_soon(watchdog_loop, notifier, interval, heartbeat.alive)
        if notifier is not None:
            tg.start_soon(_report_status, daemon, notifier)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _notify(notifier, "reloading", "reloading configuration")
                    await _reload(daemon, config_path, socket, state_dir)
                    _notify(notifier, "ready", _status(daemon))
                    settle()
                    continue
                log.info("%s: stopping", signal.Signals(signum).name)
                _notify(notifier, "stopping", "stopping")
                tg.cancel_scope.cancel()
                break


def settle() -> None:
    """Put what start-up (or a reload) built out of the garbage collector's sight, once it is built.

    Modules, classes, functions and the running configuration (~45,000 objects) live as long as the
    process, yet every full collection walked them all: under the latency bench's load, a 15 to 40 ms
    stop of the event loop once or twice in each 5-second run (the walk, and the process descheduled
    during it), which was the tail of its p99. Frozen, a full collection walks only what came after
    them. This call's own collection is one such stop, right after READY or a reload. Collected first,
    so no garbage is frozen with them; unfrozen first, so what a reload replaced is collected, not kept
    for ever. What is frozen here and later dropped in a reference cycle (the first connections'
    objects, once replaced), and what it refers to, waits for the next reload: a one-off amount, since
    nothing made after this call is frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _reload(daemon: Daemon, config_path: str | None, socket: str | None, state_dir: str | None) -> None:
    try:
        new = config_mod.load(config_path, socket=socket, state_dir=state_dir)
    except config_mod.ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    _register_secrets(new)
    await daemon.reload(dataclasses.replace(new, socket=daemon.config.socket))


async def _tick(heartbeat: Heartbeat, every: float) -> None:
    """Beats while the event loop turns; a wedged loop stops beating and the watchdog stops pinging."""
    while True:
        heartbeat.beat()
        await anyio.sleep(every)


async def _report_status(daemon: Daemon, notifier: Notifier) -> None:
    last = ""
    while True:
        text = _status(daemon)
        if text != last:
            _notify(notifier, "status", text)
            last = text
        with anyio.move_on_after(STATUS_EVERY):
            await daemon.status_changed()
        await anyio.sleep(0.2)  # coalesce bursts of health changes
