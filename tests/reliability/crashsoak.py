"""Daemon crashes: `streamd run` killed with SIGKILL at random moments and started again.

The four emulators run in this process (their state and truth survive every daemon death); the
daemon is a real `streamd run --config FILE` process with all four providers. Each round a
submitter sends jobs through the feed (and cancels some) while a random moment passes, then the
daemon is killed, wherever it is: mid-submit, mid-write, mid-poll, mid-reconnect. It is started
again on the same state directory, and the next round begins.

A subscriber stays attached across every death: when the daemon goes, it reconnects and asks for
everything after the last seq it saw. At the end it must have received every seq from 1 to the
head exactly once, in order, with the same epoch on every connection and the same bytes the
journal holds at each seq (a seq handed out twice would show here); and every job the daemon ever
knew must have been followed to its end, matching the emulators' truth.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec

from streamd.events import CloudEvent
from streamd.feed.client import FeedClient, FeedError
from streamd.journal import Journal
from tests.reliability.harness import (
    PROVIDERS,
    DaemonProcess,
    Recorder,
    StreamCheck,
    Workload,
    check_stream,
    fleet,
    mismatches,
    orphans,
    settle,
    stream_vs_jobs,
    write_config,
)


@dataclass
class CrashFigures:
    kills: int = 0
    seed: int = 0
    starts: int = 0
    resumes: int = 0  # subscriber reconnections
    epochs: int = 0  # distinct epochs the subscriber saw (must be 1)
    gaps: int = 0
    jobs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    interrupted_submits: int = 0
    orphans: int = 0
    unfinished_at_kills: int = 0  # jobs the daemon had not seen end when it was killed (summed)
    stream: StreamCheck | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        s = self.stream
        return {
            "kills": self.kills,
            "seed": self.seed,
            "daemon starts": self.starts,
            "subscriber resumes": self.resumes,
            "epochs seen": self.epochs,
            "gap frames": self.gaps,
            "jobs": self.jobs,
            "jobs by final state": dict(self.states),
            "jobs unfinished at a kill (sum)": self.unfinished_at_kills,
            "submits interrupted": self.interrupted_submits,
            "orphans": self.orphans,
            "events": s.head if s else 0,
            "events lost": s.lost if s else None,
            "duplicates": (s.duplicates + s.state_duplicates) if s else None,
            "reordered": (s.reordered + s.backwards) if s else None,
            "mismatches": len(self.problems),
            "seconds": round(self.seconds, 1),
        }


async def _submitter(socket: Path, work: Workload, rng: random.Random) -> None:
    """Rounds of submissions until cancelled; a daemon that dies under it ends it quietly."""
    with contextlib.suppress(FeedError, OSError):
        async with FeedClient.connect(socket) as client, anyio.create_task_group() as cancels:
            while True:
                await work.round(client, PROVIDERS, cancels)
                await anyio.sleep(rng.uniform(0.05, 0.3))


async def _active_jobs(socket: Path) -> int:
    with contextlib.suppress(FeedError, OSError):
        async with FeedClient.connect(socket) as client:
            return len(await client.jobs(active=True, limit=1_000_000))
    return 0


async def crash_soak(
    tmp: Path,
    *,
    kills: int,
    seed: int = 1,
    speed: float = 4.0,
    settle_within: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> CrashFigures:
    rng = random.Random(seed)
    figures = CrashFigures(kills=kills, seed=seed)
    started = time.monotonic()
    async with fleet(seed=seed, speed=speed, proxied=False) as f:
        daemon = DaemonProcess(tmp, write_config(tmp, f.settings))
        await daemon.start()
        recorder = Recorder(daemon.socket)
        work = Workload(rng)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(partial(recorder.run, resume=True))
                for k in range(kills):
                    async with anyio.create_task_group() as round_tg:
                        round_tg.start_soon(_submitter, daemon.socket, work, rng)
                        await anyio.sleep(rng.uniform(0.0, 1.5))
                        figures.unfinished_at_kills += await _active_jobs(daemon.socket)
                        await daemon.kill()  # wherever it is
                        round_tg.cancel_scope.cancel()
                    await daemon.start()
                    if progress is not None and (k + 1) % 5 == 0:
                        progress(f"kill {k + 1}/{kills}: {len(work.acked)} jobs acknowledged")
                async with FeedClient.connect(daemon.socket) as client:
                    jobs = await settle(
                        lambda: client.jobs(limit=1_000_000), f.emulators, work.acked, within=settle_within
                    )
                    head = (await client.status())["daemon"]["seq"]
                await recorder.wait_for(lambda: recorder.cursor >= head, within=60)
                tg.cancel_scope.cancel()
            code = await daemon.stop()
            if code != 0:
                figures.problems.append(f"streamd exited with {code} on SIGTERM")
        finally:
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.kill()
    journal = Journal(tmp / "state" / "journal.sqlite3")
    try:
        rows = journal.read_after(0, 10_000_000)
    finally:
        journal.close()
    figures.seconds = time.monotonic() - started
    figures.starts = daemon.starts
    figures.resumes = recorder.connections - 1
    figures.epochs = len(set(recorder.epochs))
    figures.gaps = len(recorder.gaps)
    figures.jobs = len(jobs)
    figures.states = Counter(j.status.value for j in jobs)
    figures.interrupted_submits = sum(1 for _, code, _ in work.refused if code in ("disconnected", "no_daemon"))
    lost = orphans(f.emulators, jobs)
    figures.orphans = len(lost)
    figures.stream = check_stream(recorder.events, head)
    figures.problems += mismatches(jobs, f.emulators) + stream_vs_jobs(recorder, jobs)
    if figures.orphans > figures.interrupted_submits:
        figures.problems.append(f"{figures.orphans} jobs unknown to streamd, only {figures.interrupted_submits} cut")
    other = [(p, c, m) for p, c, m in work.refused if c not in ("disconnected", "no_daemon")]
    figures.problems += [f"submit to {p} refused: {c}: {m}" for p, c, m in other]
    if [s for s, _ in rows] != list(range(1, head + 1)):
        figures.problems.append("the journal is not gap-free from 1 to the head")
    journaled = {s: msgspec.json.decode(b, type=CloudEvent) for s, b in rows}
    changed = [e.seq for e in recorder.events if journaled.get(e.seq) != e]
    if changed:
        figures.problems.append(f"{len(changed)} delivered events differ from the journal at their seq: {changed[:5]}")
    return figures
