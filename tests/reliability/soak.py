"""The long soaks, as one command anyone can run:

    .venv/bin/python -m tests.reliability.soak --cycles 200 --kills 50

`--cycles`: fault-proxy cycles (faultsoak.py): each submits a job on every provider and injects one
fault (cut, cut inside a frame, stall, half-open, server restart, down) on one provider or all.
`--kills`: SIGKILLs of a `streamd run` process, each followed by a restart (crashsoak.py).
`--seed` makes a run repeatable (the proxies' random cuts and the workload are seeded; timing is not).
Prints progress, then the figures as JSON (and to `--json FILE`); exits 1 if anything was lost,
duplicated, reordered, or differs from the emulators' truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from tests.reliability.crashsoak import crash_soak
from tests.reliability.faultsoak import fault_soak


def _say(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.cycles:
        tmp = Path(tempfile.mkdtemp(prefix="sd-soak-", dir="/tmp"))
        try:
            _say(f"fault soak: {args.cycles} cycles, seed {args.seed}")
            figures = await fault_soak(tmp, cycles=args.cycles, seed=args.seed, progress=_say)
            out["faults"] = figures.summary() | {"problems": figures.problems[:20], "ok": _ok(figures)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.kills:
        tmp = Path(tempfile.mkdtemp(prefix="sd-soak-", dir="/tmp"))
        try:
            _say(f"crash soak: {args.kills} kill -9s, seed {args.seed}")
            crashes = await crash_soak(tmp, kills=args.kills, seed=args.seed, progress=_say)
            out["crashes"] = crashes.summary() | {"problems": crashes.problems[:20], "ok": _ok(crashes)}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _ok(figures: Any) -> bool:
    return bool(figures.stream is not None and figures.stream.ok and not figures.problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200, help="fault-proxy cycles (0: skip)")
    parser.add_argument("--kills", type=int, default=50, help="kill -9 and restart rounds (0: skip)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--verbose", action="store_true", help="streamd's own warnings on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL, stream=sys.stderr)
    figures = anyio.run(_main, args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if all(part["ok"] for part in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
