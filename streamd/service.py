"""`streamd run`: the daemon in the foreground, with signals, logging and (under systemd) notify."""

from __future__ import annotations

import logging
import sys

import anyio

from streamd import config as config_mod
from streamd.daemon import Daemon, DaemonError
from streamd.errors import first_leaf
from streamd.journal import JournalError

log = logging.getLogger("streamd")


def run_service(config_path: str | None, *, socket: str | None, state_dir: str | None, log_level: str | None) -> int:
    try:
        cfg = config_mod.load(config_path, socket=socket, state_dir=state_dir)
    except config_mod.ConfigError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=(log_level or cfg.daemon.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    daemon = Daemon(cfg)

    async def reload() -> None:
        try:
            new = config_mod.load(config_path, socket=socket, state_dir=state_dir)
        except config_mod.ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        await daemon.reload(new)

    async def main() -> None:
        from streamd.cli import _until_signal

        await _until_signal(daemon.run, reload)

    try:
        anyio.run(main)
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
