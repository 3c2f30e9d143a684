"""Benchmark of the dashboard under load: 10,000 jobs and 1,000 events a second.

    .venv/bin/python bench/bench_tui.py [--jobs 10000] [--rate 1000] [--seconds 10]

Runs the real app headless (`App.run_test`) against the in-memory feed (`streamd_tui.fake`),
which hands it the same frame objects the real client decodes. Each scenario reports:

- applied ev/s: events folded into the view per second (must match the offered rate);
- ev→applied: from an event's publication to the tick that applied it (p50/p99);
- apply, view: per batch, time folding events into the store, and updating widgets (p50/p99/max);
- frame: time to composite one screen update, and dirty→painted (batch done → next frame done);
- loop lag: how late a 10 ms sleep wakes up (what a keypress would wait; p50/p99);
- input wait: how long a message (a keypress) waits in the app's queue while loaded;
- CPU: process CPU time over wall time.

Baselines measured in the same run: the raw cost of decoding the same events from NDJSON (what
the real client pays before the app sees anything), and the app with an empty table at the same rate.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tui")]

from streamd_tui.app import StreamdApp, make_app, tune_gc  # noqa: E402
from streamd_tui.fake import FakeDaemon  # noqa: E402

from streamd.events import EventData, Health, Job, Kind, Origin, Progress, State, envelope  # noqa: E402
from streamd.feed import protocol  # noqa: E402

PROVIDERS = ("oxen", "wiro", "runware", "apiframe")
STEP = 0.01  # the generator publishes every 10 ms


@dataclass
class Result:
    name: str
    jobs: int
    rate: float
    seconds: float = 0.0
    published: int = 0
    applied: int = 0
    load_s: float | None = None
    ev_to_view: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    view: list[float] = field(default_factory=list)
    frames: list[float] = field(default_factory=list)
    painted: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    keys: list[float] = field(default_factory=list)
    cpu: float = 0.0
    gc_pauses: list[float] = field(default_factory=list)  # full (generation 2) collections
    rows: int = 0
    cell_updates: int = 0
    sorts: int = 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Generator:
    """Realistic traffic: new jobs, state changes, progress and log lines for active jobs."""

    def __init__(self, fake: FakeDaemon, jobs: int, seed: int = 7) -> None:
        self.fake = fake
        self.rng = random.Random(seed)
        self.active: list[tuple[str, str, State]] = []
        self.count = 0
        now = time.time()
        for _ in range(jobs):
            key = self._new_key()
            state = self.rng.choice((State.QUEUED, State.RUNNING, State.COMPLETED, State.COMPLETED))
            created = now - self.rng.uniform(1, 3600)
            fake.jobs[key] = Job(
                provider=key[0],
                job=key[1],
                status=state,
                model="bytedance-seedream-4",
                prompt=f"job {self.count}: a lighthouse at dusk, volumetric fog, 35mm",
                created=created,
                since=created + 2,
                updated=created + 2,
                cost=0.03 if state is State.COMPLETED else None,
                progress=Progress(percent=100.0) if state is State.COMPLETED else None,
            )
            if not state.terminal:
                self.active.append((*key, state))
        for provider in PROVIDERS:
            fake.health(provider, Health.CONNECTED)
        self.published: dict[int, float] = {}

    def _new_key(self) -> tuple[str, str]:
        self.count += 1
        return (self.rng.choice(PROVIDERS), f"job-{self.count:07d}-{self.rng.randrange(16**6):06x}")

    def data(self) -> EventData:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05 or not self.active:
            provider, job = self._new_key()
            self.active.append((provider, job, State.QUEUED))
            return EventData(
                provider=provider,
                job=job,
                kind=Kind.STATE,
                status=State.QUEUED,
                previous=None,
                upstream="queued",
                origin=Origin.REQUEST,
                model="bytedance-seedream-4",
                prompt=f"job {self.count}: a lighthouse at dusk",
            )
        i = rng.randrange(len(self.active))
        provider, job, state = self.active[i]
        if roll < 0.25:
            ends = (State.COMPLETED, State.COMPLETED, State.FAILED)
            new = State.RUNNING if state is State.QUEUED else rng.choice(ends)
            if new.terminal:
                self.active[i] = self.active[-1]
                self.active.pop()
            else:
                self.active[i] = (provider, job, new)
            return EventData(
                provider=provider,
                job=job,
                kind=Kind.STATE,
                status=new,
                previous=state,
                upstream=new.value,
                origin=rng.choice((Origin.PUSH, Origin.POLL)),
                outputs=(f"https://cdn.example/{job}.png",) if new is State.COMPLETED else (),
                cost=0.03 if new is State.COMPLETED else None,
                error="content policy" if new is State.FAILED else None,
                raw={"status": new.value, "id": job},
            )
        if roll < 0.85:
            return EventData(
                provider=provider,
                job=job,
                kind=Kind.PROGRESS,
                status=State.RUNNING,
                previous=state,
                upstream="progress",
                origin=Origin.PUSH,
                progress=Progress(percent=round(rng.uniform(0, 99), 0)),
            )
        return EventData(
            provider=provider,
            job=job,
            kind=Kind.LOG,
            status=state,
            previous=state,
            upstream="task_output",
            origin=Origin.PUSH,
            message="step 12/30 denoising",
        )

    async def run(self, rate: float, seconds: float) -> int:
        """Publish at `rate` events/s for `seconds`, catching up if a step overslept."""
        start = time.perf_counter()
        sent = 0
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return sent
            due = int(elapsed * rate)
            now = time.perf_counter()
            while sent < due:
                event = self.fake.publish(self.data())
                self.published[event.seq] = now
                sent += 1
            await anyio.sleep(STEP)


def decode_baseline(events: int) -> float:
    """Events per second the real client could decode, from the same kind of traffic (NDJSON)."""
    gen = Generator(FakeDaemon(), 100)
    lines = [protocol.encode(envelope(gen.data(), seq=i + 1, epoch="e", source="bench")) for i in range(events)]
    start = time.perf_counter()
    for line in lines:
        protocol.decode_frame(line)
    return events / (time.perf_counter() - start)


async def scenario(
    name: str, jobs: int, rate: float, seconds: float, size: tuple[int, int], screenshot: str | None = None
) -> Result:
    fake = FakeDaemon(snapshot_chunk=1000)
    gen = Generator(fake, jobs)
    app: StreamdApp = make_app(Path("/bench/streamd.sock"), fake.connect, history=False)
    result = Result(name, jobs, rate)
    frames: list[tuple[float, float]] = []
    async with app.run_test(size=size) as pilot:
        screen = app.screen
        original = screen._compositor_refresh

        def timed_refresh() -> None:
            t0 = time.perf_counter()
            original()
            frames.append((t0, time.perf_counter()))

        screen._compositor_refresh = timed_refresh  # type: ignore[method-assign]
        t0 = time.perf_counter()
        with anyio.fail_after(120):
            while app.table.row_count < jobs or not app.store.live:
                await pilot.pause(0.01)
        await pilot.pause()
        result.load_s = time.perf_counter() - t0 if jobs else None
        app.batches.clear()
        frames.clear()
        updates, sorts = app.table.cell_updates, app.table.sorts

        lag: list[float] = []
        keys: list[float] = []
        stop = anyio.Event()

        async def probe() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await anyio.sleep(0.01)
                lag.append(time.perf_counter() - t - 0.01)

        async def typist() -> None:
            """How long a keypress would wait: a callback through the app's message queue."""
            while not stop.is_set():
                await anyio.sleep(0.25)
                done = anyio.Event()
                t = time.perf_counter()
                app.call_later(done.set)
                await done.wait()
                keys.append(time.perf_counter() - t)

        gc_start = 0.0

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            nonlocal gc_start
            if phase == "start":
                gc_start = time.perf_counter()
            elif info["generation"] == 2:
                result.gc_pauses.append(time.perf_counter() - gc_start)

        gc.callbacks.append(on_gc)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            tg.start_soon(typist)
            result.published = await gen.run(rate, seconds)
            with anyio.fail_after(30):  # let the view catch up with the last events
                while app.store.last_seq < fake.seq:
                    await pilot.pause(0.01)
            stop.set()
        gc.callbacks.remove(on_gc)
        wall = time.perf_counter() - wall0
        result.cpu = (time.process_time() - cpu0) / wall
        result.seconds = wall
        result.lag, result.keys = lag, keys
        batches = list(app.batches)
        result.applied = sum(b.applied for b in batches)
        result.apply = [b.apply_s for b in batches]
        result.view = [b.view_s for b in batches]
        result.frames = [end - start for start, end in frames]
        previous = None
        published = gen.published
        frame_ends = [end for _, end in frames]
        j = 0
        for batch in batches:
            done = batch.at + batch.apply_s + batch.view_s
            first = (previous or batch.seq - batch.applied) + 1
            for seq in range(first, batch.seq + 1):
                t = published.get(seq)
                if t is not None:
                    result.ev_to_view.append(batch.at + batch.apply_s - t)
            previous = batch.seq
            while j < len(frames) and frames[j][0] < done:
                j += 1
            if j < len(frame_ends):
                result.painted.append(frame_ends[j] - done)
        if screenshot:
            await pilot.pause()
            app.save_screenshot(Path(screenshot).name, str(Path(screenshot).parent))
        result.rows = app.table.row_count
        result.cell_updates = app.table.cell_updates - updates
        result.sorts = app.table.sorts - sorts
    return result


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.1f}"


def pair(values: list[float], q: float = 0.99) -> str:
    top = pct(values, q) if q < 1 else max(values, default=float("nan"))
    return f"{ms(pct(values, 0.5))} / {ms(top)}"


def triple(values: list[float]) -> str:
    return f"{ms(pct(values, 0.5))} / {ms(pct(values, 0.99))} / {ms(max(values, default=float('nan')))}"


def report(results: list[Result], decode_rate: float) -> None:
    print()
    print(f"baseline: decoding the same events from NDJSON: {decode_rate:,.0f} events/s on one core")
    print()
    rows = [
        ("scenario", *(r.name for r in results)),
        ("jobs in table (end)", *(f"{r.rows:,}" for r in results)),
        ("snapshot load, s", *("-" if r.load_s is None else f"{r.load_s:.2f}" for r in results)),
        ("offered ev/s", *(f"{r.published / r.seconds:,.0f}" for r in results)),
        ("applied ev/s", *(f"{r.applied / r.seconds:,.0f}" for r in results)),
        ("ev→applied p50/p99 ms", *(pair(r.ev_to_view) for r in results)),
        ("batches (ticks with events)", *(f"{len(r.apply):,}" for r in results)),
        ("apply/batch p50/p99/max ms", *(triple(r.apply) for r in results)),
        ("view/batch p50/p99/max ms", *(triple(r.view) for r in results)),
        ("cells updated, sorts", *(f"{r.cell_updates:,}, {r.sorts}" for r in results)),
        ("frames/s", *(f"{len(r.frames) / r.seconds:.1f}" for r in results)),
        ("frame p50/p99/max ms", *(triple(r.frames) for r in results)),
        ("dirty→painted p50/p99 ms", *(pair(r.painted) for r in results)),
        ("loop lag p50/p99 ms", *(pair(r.lag) for r in results)),
        ("input wait p50/max ms", *(pair(r.keys, 1.0) for r in results)),
        ("full GCs, max pause ms", *(f"{len(r.gc_pauses)}, {ms(max(r.gc_pauses, default=0.0))}" for r in results)),
        ("CPU (process/wall)", *(f"{r.cpu * 100:.0f}%" for r in results)),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


async def main(args: argparse.Namespace) -> None:
    if not args.default_gc:
        tune_gc()  # as `streamd tui` does
    size = tuple(int(v) for v in args.size.split("x"))
    assert len(size) == 2
    results = []
    for name, jobs in (("empty table", 0), (f"{args.jobs:,} jobs", args.jobs)):
        print(f"running: {name}, {args.rate:,.0f} events/s for {args.seconds:g} s ...", flush=True)
        shot = args.screenshot if jobs else None
        results.append(await scenario(name, jobs, args.rate, args.seconds, (size[0], size[1]), shot))
    report(results, decode_baseline(20_000))


def cli(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="200x60", help="terminal size, COLSxROWS")
    parser.add_argument("--screenshot", help="save an SVG of the loaded dashboard here at the end")
    parser.add_argument("--default-gc", action="store_true", help="keep Python's GC thresholds (for comparison)")
    args = parser.parse_args(argv)
    anyio.run(main, args)


if __name__ == "__main__":
    cli()
