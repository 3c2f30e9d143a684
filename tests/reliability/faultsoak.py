"""Faults between streamd and the providers: the soak behind `test_faults.py` and `soak.py`.

Every provider endpoint (Oxen's REST+SSE port, Wiro's REST and socket, Runware's REST and socket,
Apiframe's REST) is reached through a `FaultProxy`. Each cycle submits a job on every provider
(and cancels some a moment later), waits a random moment so the jobs are mid-flight, then injects
one fault on one provider or on all of them (each block of six cycles uses every kind once, in a
random order, so even a short run covers them all):

- `cut`: every open connection closed at once;
- `cut_in_frame`: every open connection cut after a random number of further bytes (16 to 4096),
  so the cut lands inside an SSE event, a WebSocket frame or an HTTP body as often as not;
- `stall`: nothing moves, on open and new connections, for longer than the read timeouts;
- `half_open`: the server-to-client direction ends, the other hangs, then the links are cut;
- `restart`: the emulator drops every connection, as a restarting server would (state kept);
- `down`: connections refused (and open ones cut) for up to two seconds.

Then every fault is healed and the run settles: every job streamd knows must end in the state,
with the outputs and cost, that the emulator's truth records; a subscriber connected from the
start must have received every seq exactly once, in order, with no state reported twice or
backwards.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from streamd.emulators.base import Emulator
from streamd.emulators.faultproxy import FaultProxy
from streamd.feed.client import FeedClient
from tests.reliability.harness import (
    PROVIDERS,
    Recorder,
    StreamCheck,
    Workload,
    check_stream,
    fleet,
    in_process,
    mismatches,
    orphans,
    settle,
    stream_vs_jobs,
)

FAULTS = ("cut", "cut_in_frame", "stall", "half_open", "restart", "down")
READ_TIMEOUT = 1.0  # the longest read timeout / ping timeout in harness.FAST


@dataclass
class FaultFigures:
    cycles: int = 0
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)  # fault actions by kind
    targets: Counter[str] = field(default_factory=Counter)
    connections: int = 0  # proxied connections opened (reconnects included)
    cuts: int = 0  # connections cut (cut, cut_in_frame, half-open clean-up, down)
    stalls: int = 0
    half_opens: int = 0
    refused: int = 0  # connection attempts refused while a proxy was down
    restarts: int = 0  # emulator restarts
    jobs: int = 0
    states: Counter[str] = field(default_factory=Counter)
    by_provider: Counter[str] = field(default_factory=Counter)
    refused_submits: int = 0
    refusals: Counter[str] = field(default_factory=Counter)  # "provider: code"
    orphans: int = 0
    orphans_by_provider: Counter[str] = field(default_factory=Counter)
    cancels: int = 0
    stream: StreamCheck | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    def summary(self) -> dict[str, Any]:
        s = self.stream
        return {
            "cycles": self.cycles,
            "seed": self.seed,
            "faults injected": self.faults,
            "by kind": dict(self.injected),
            "connections cut": self.cuts,
            "stalls": self.stalls,
            "half-open connections": self.half_opens,
            "connections refused": self.refused,
            "emulator restarts": self.restarts,
            "proxied connections": self.connections,
            "jobs": self.jobs,
            "jobs by provider": dict(self.by_provider),
            "jobs by final state": dict(self.states),
            "submits refused": self.refused_submits,
            "refusals": dict(self.refusals),
            "orphans": self.orphans,
            "orphans by provider": dict(self.orphans_by_provider),
            "cancels sent": self.cancels,
            "events": s.head if s else 0,
            "state events": s.state_events if s else 0,
            "events lost": s.lost if s else None,
            "duplicates": (s.duplicates + s.state_duplicates) if s else None,
            "reordered": (s.reordered + s.backwards) if s else None,
            "mismatches": len(self.problems),
            "seconds": round(self.seconds, 1),
        }


async def inject(
    kind: str, proxies: list[FaultProxy], emulators: list[Emulator], rng: random.Random, figures: FaultFigures
) -> None:
    """One fault, held for its duration, then lifted (except armed in-frame cuts, which fire on their own)."""
    figures.injected[kind] += 1
    if kind == "cut":
        for proxy in proxies:
            proxy.cut_all()
    elif kind == "cut_in_frame":
        within = rng.choice((16, 256, 4096))
        for proxy in proxies:
            proxy.cut_randomly(within=within)
        await anyio.sleep(rng.uniform(0.2, 0.6))
    elif kind == "stall":
        for proxy in proxies:
            proxy.stall(True)
        await anyio.sleep(READ_TIMEOUT * rng.uniform(1.3, 2.0))
        for proxy in proxies:
            proxy.stall(False)
    elif kind == "half_open":
        for proxy in proxies:
            await proxy.half_open()
        await anyio.sleep(rng.uniform(0.3, 1.2))
        for proxy in proxies:
            proxy.cut_all()
    elif kind == "restart":
        for emu in emulators:
            await emu.restart()
        figures.restarts += len(emulators)
    elif kind == "down":
        for proxy in proxies:
            proxy.down = True
            proxy.cut_all()
        await anyio.sleep(rng.uniform(0.5, 2.0))
        for proxy in proxies:
            proxy.down = False
    else:
        raise ValueError(kind)


async def fault_soak(
    tmp: Path,
    *,
    cycles: int,
    seed: int = 1,
    speed: float = 10.0,
    settle_within: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> FaultFigures:
    rng = random.Random(seed)
    figures = FaultFigures(cycles=cycles, seed=seed)
    started = time.monotonic()
    async with fleet(seed=seed, speed=speed) as f, in_process(tmp, f.settings) as daemon:
        recorder = Recorder(daemon.config.socket)
        async with anyio.create_task_group() as tg:
            await tg.start(recorder.run)  # connected before the first job, until the end
            async with FeedClient.connect(daemon.config.socket) as client:
                work = Workload(rng)
                async with anyio.create_task_group() as cancels:
                    block: list[str] = []
                    for cycle in range(cycles):
                        await work.round(client, PROVIDERS, cancels)
                        await anyio.sleep(rng.uniform(0.05, 0.4))  # the jobs are under way
                        if not block:
                            block = rng.sample(FAULTS, len(FAULTS))
                        kind = block.pop()
                        target = rng.choice((*PROVIDERS, "all"))
                        figures.targets[target] += 1
                        names = PROVIDERS if target == "all" else (target,)
                        proxies = [px for name in names for px in f.proxies[name]]
                        await inject(kind, proxies, [f.emulators[n] for n in names], rng, figures)
                        if progress is not None and (cycle + 1) % 10 == 0:
                            progress(f"cycle {cycle + 1}/{cycles}: {figures.faults} faults, {len(work.acked)} jobs")
                f.heal()
                jobs = await settle(lambda: client.jobs(limit=1_000_000), f.emulators, work.acked, within=settle_within)
                head = daemon.bus.head
                await recorder.wait_for(lambda: recorder.cursor >= head, within=60)
            tg.cancel_scope.cancel()
        journal = await anyio.to_thread.run_sync(daemon.journal.read_after, 0, 10_000_000)
    figures.seconds = time.monotonic() - started
    for proxy in f.all_proxies():
        st = proxy.stats
        figures.connections += st.connections
        figures.cuts += st.cuts
        figures.stalls += st.stalls
        figures.half_opens += st.half_opens
        figures.refused += st.refused
    figures.jobs = len(jobs)
    figures.states = Counter(j.status.value for j in jobs)
    figures.by_provider = Counter(j.provider for j in jobs)
    figures.refused_submits = len(work.refused)
    figures.refusals = Counter(f"{provider}: {code}" for provider, code, _ in work.refused)
    lost = orphans(f.emulators, jobs)
    figures.orphans = len(lost)
    figures.orphans_by_provider = Counter(provider for provider, _ in lost)
    if figures.orphans > figures.refused_submits:
        figures.problems.append(f"{figures.orphans} jobs unknown to streamd, only {figures.refused_submits} refused")
    figures.cancels = work.cancels
    figures.stream = check_stream(recorder.events, head)
    figures.problems = mismatches(jobs, f.emulators) + stream_vs_jobs(recorder, jobs)
    if [s for s, _ in journal] != list(range(1, head + 1)):
        figures.problems.append("the journal itself is not gap-free from 1 to the head")
    if [e.seq for e in recorder.events[: len(journal)]] != [s for s, _ in journal]:
        figures.problems.append("the subscriber's seqs differ from the journal's")
    return figures
