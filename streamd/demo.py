"""`streamd demo`: the four emulators, a job generator, the daemon and the dashboard in one process.

Nothing leaves loopback and no key is needed: the emulators accept their own demo keys. State
lives in a temporary folder that is removed on exit.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import anyio

from streamd import emulators
from streamd.config import ArchiveFile, Config, DaemonFile, ProviderSettings
from streamd.daemon import Daemon, DaemonError
from streamd.emulators.base import Emulator
from streamd.emulators.generator import generate
from streamd.events import CloudEvent, Kind
from streamd.feed.client import FeedClient

log = logging.getLogger("streamd.demo")
ALL = ("oxen", "wiro", "runware", "apiframe")


def available(names: tuple[str, ...] | list[str]) -> list[str]:
    """Providers whose emulator ships in this build."""
    out = []
    for name in names:
        module = emulators.EMULATORS[name].partition(":")[0]
        if importlib.util.find_spec(module) is not None:
            out.append(name)
    return out


def run_demo(
    *,
    headless: bool,
    duration: float | None,
    socket: str | None,
    seed: int | None,
    speed: float,
    rate: float,
    providers: list[str] | None,
) -> int:
    unknown = [p for p in providers or [] if p not in ALL]
    if unknown:
        print(f"streamd: error: --providers: unknown {', '.join(unknown)} (known: {', '.join(ALL)})", file=sys.stderr)
        return 1
    names = available(providers or list(ALL))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="streamd-demo-"))
    sock = Path(socket).expanduser() if socket else tmp / "streamd.sock"
    try:
        return anyio.run(_demo, headless, duration, sock, tmp, seed, speed, rate, names)
    except DaemonError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _demo(
    headless: bool,
    duration: float | None,
    sock: Path,
    tmp: Path,
    seed: int | None,
    speed: float,
    rate: float,
    names: list[str],
) -> int:
    base = seed if seed is not None else 0
    emus: dict[str, Emulator] = {
        name: emulators.create(name, seed=base + i, speed=speed) for i, name in enumerate(names)
    }
    code = 0
    async with anyio.create_task_group() as tg:
        for emu in emus.values():
            await tg.start(emu.serve)
        settings: dict[str, ProviderSettings] = {name: emu.settings() for name, emu in emus.items()}
        cfg = Config(
            socket=sock,
            state_dir=tmp / "state",
            providers=settings,
            daemon=DaemonFile(stalled_after=60.0),
            archive=ArchiveFile(enabled=True, dir=str(tmp / "archive")),
        )
        from streamd.service import sidecars_for

        await tg.start(Daemon(cfg, sidecars=sidecars_for(cfg)).run)
        tg.start_soon(lambda: generate(sock, names, rate=rate, speed=speed, seed=seed))
        if headless:
            print(f"streamd demo: {', '.join(names)} emulated on loopback; feed at {sock}", flush=True)
            with anyio.move_on_after(duration if duration is not None else float("inf")):
                await _print_events(sock)
            await _summary(sock)
        else:
            code = await _dashboard(sock, duration)
        tg.cancel_scope.cancel()
    return code


async def _print_events(sock: Path) -> None:
    from streamd.cli import format_event

    colour = sys.stdout.isatty()
    async with FeedClient.connect(sock) as client:
        async for item in client.subscribe(since="oldest"):
            if isinstance(item, CloudEvent) and item.data.kind is not Kind.DIAGNOSTIC:
                print(format_event(item, colour=colour), flush=True)


async def _summary(sock: Path) -> None:
    async with FeedClient.connect(sock) as client:
        jobs = await client.jobs(limit=100_000)
    by: Counter[tuple[str, str]] = Counter((j.provider, j.status.value) for j in jobs)
    print("\nsummary (jobs by provider and final state):")
    for provider in sorted({p for p, _ in by}):
        parts = ", ".join(f"{state} {n}" for (p, state), n in sorted(by.items()) if p == provider)
        print(f"  {provider:<9} {parts}")


async def _dashboard(sock: Path, duration: float | None) -> int:
    from streamd_tui.app import run_async

    with anyio.move_on_after(duration if duration is not None else float("inf")):
        return await run_async(sock)
    return 0
