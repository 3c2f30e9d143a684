"""What the reliability tests and the soak command share.

- `fleet()`: the four provider emulators on loopback, each endpoint (REST, SSE, WebSocket) behind
  its own `FaultProxy`, and provider settings that point streamd at the proxies with every timer
  compressed (read timeouts, pings, backoff caps, poll intervals), so minutes of provider
  behaviour play out in seconds.
- `in_process()` / `DaemonProcess`: streamd in this event loop, or as a real `streamd run` process.
- `Recorder`: a subscriber that keeps every event it is sent; with `resume` it reconnects after the
  daemon goes away and asks for everything after the last seq it saw.
- `Workload`: submits (and sometimes cancels) jobs on every provider through the feed.
- `check_stream()` and `mismatches()`: the verdicts (lost, duplicated, reordered events; jobs whose
  final state, outputs or cost differ from the emulators' truth).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import Process, TaskGroup, TaskStatus

from streamd import providers as registry
from streamd.config import Config, DaemonFile, ProviderSettings
from streamd.daemon import Daemon
from streamd.emulators.apiframe import ApiframeEmulator
from streamd.emulators.base import Emulator
from streamd.emulators.faultproxy import FaultProxy
from streamd.emulators.oxen import OxenEmulator
from streamd.emulators.runware import RunwareEmulator
from streamd.emulators.wiro import WiroEmulator
from streamd.events import CloudEvent, Job, Kind, State
from streamd.feed import protocol as p
from streamd.feed.client import FeedClient, FeedError

PROVIDERS = ("oxen", "wiro", "runware", "apiframe")
MODELS = {
    "oxen": "bytedance-seedream-4",
    "wiro": "bytedance/seedream-v4",
    "runware": "bytedance:5@0",
    "apiframe": "seedream-4",
}
CANCELLABLE = frozenset({"oxen", "wiro"})
#: Providers whose job API reports what a job cost. Oxen's queue does not (its price is per model),
#: so streamd reports no cost for Oxen jobs and the emulator's list price is not compared.
COSTED = frozenset({"wiro", "runware", "apiframe"})
#: Runware pushes a batch's images as each finishes, with no index: their order is arrival order (a
#: repair poll can bring an earlier image after a later push), so its outputs compare as a set.
UNORDERED = frozenset({"runware"})
URL_FIELDS = ("base_url", "socket_url", "ws_url")
ORDER = {s: i for i, s in enumerate(State)}

#: Every timer compressed. Read timeouts sit just above the emulators' keep-alives/pings, and
#: backoff caps are a fraction of a second, so a stall, a cut or a restart is noticed and repaired
#: within a second or two instead of a minute.
POLL = {"oxen": 0.25, "wiro": 0.5, "runware": 0.25, "apiframe": 0.1}
FAST: dict[str, dict[str, Any]] = {
    "oxen": {
        "read_timeout": 1.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
        "healthy_after": 1.0,
        "list_interval": 2.0,
    },
    "wiro": {"reconnect_initial": 0.05, "reconnect_max": 0.5, "ping_interval": 0.5, "ping_timeout": 1.0},
    "runware": {
        "ping_interval": 0.3,
        "pong_timeout": 1.0,
        "resume_grace": 0.5,
        "repair_after": 1.0,
        "ack_timeout": 2.0,
        "connect_timeout": 2.0,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.5,
    },
    "apiframe": {},
}


def make_emulators(
    seed: int, speed: float, *, fail_rate: float = 0.12, keys: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, Emulator]:
    """`keys`: per provider, the emulator's `key` (and Wiro's `secret`) instead of its demo ones."""
    k: Mapping[str, Mapping[str, Any]] = keys or {}
    return {
        "oxen": OxenEmulator(seed=seed, speed=speed, fail_rate=fail_rate, keepalive=0.25, **k.get("oxen", {})),
        "wiro": WiroEmulator(seed=seed + 1, speed=speed, fail_rate=fail_rate, ping_interval=0.5, **k.get("wiro", {})),
        "runware": RunwareEmulator(
            seed=seed + 2, speed=speed, fail_rate=fail_rate, resume_window=3.0, **k.get("runware", {})
        ),
        "apiframe": ApiframeEmulator(seed=seed + 3, speed=speed, fail_rate=fail_rate, **k.get("apiframe", {})),
    }


def _via(url: str, proxy: FaultProxy) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{proxy.host}:{proxy.port}"))


@dataclass
class Fleet:
    emulators: dict[str, Emulator]
    proxies: dict[str, list[FaultProxy]]  # provider -> one proxy per endpoint (empty when not proxied)
    settings: dict[str, ProviderSettings]  # streamd's view: through the proxies, timers compressed
    direct: dict[str, ProviderSettings]  # the emulators' own addresses

    def heal(self) -> None:
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.heal()

    def all_proxies(self) -> list[FaultProxy]:
        return [proxy for proxies in self.proxies.values() for proxy in proxies]


@contextlib.asynccontextmanager
async def fleet(
    *,
    seed: int = 1,
    speed: float = 10.0,
    proxied: bool = True,
    fail_rate: float = 0.12,
    fast: bool = True,
    keys: Mapping[str, Mapping[str, str]] | None = None,
) -> AsyncIterator[Fleet]:
    emulators = make_emulators(seed, speed, fail_rate=fail_rate, keys=keys)
    async with anyio.create_task_group() as tg:
        for emu in emulators.values():
            await tg.start(emu.serve)
        proxies: dict[str, list[FaultProxy]] = {name: [] for name in emulators}
        settings: dict[str, ProviderSettings] = {}
        direct: dict[str, ProviderSettings] = {}
        for name, emu in emulators.items():
            base = emu.settings()
            direct[name] = base
            changes: dict[str, str] = {}
            for attr in URL_FIELDS:
                url = getattr(base, attr)
                if url is None or not proxied:
                    continue
                parts = urlsplit(url)
                proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 80, seed=seed * 31 + len(changes))
                await tg.start(proxy.serve)
                proxies[name].append(proxy)
                changes[attr] = _via(url, proxy)
            options = {**base.options, **(FAST[name] if fast else {})}
            poll = POLL[name] if fast else base.poll_interval
            settings[name] = replace(base, poll_interval=poll, options=options, **changes)  # type: ignore[arg-type]
        try:
            yield Fleet(emulators, proxies, settings, direct)
        finally:
            tg.cancel_scope.cancel()


# -- streamd ------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def in_process(tmp: Path, settings: Mapping[str, ProviderSettings], **daemon_opts: Any) -> AsyncIterator[Daemon]:
    """A daemon in this event loop running the real providers for `settings`."""
    cfg = Config(
        socket=tmp / "feed.sock",
        state_dir=tmp / "state",
        providers=dict(settings),
        daemon=DaemonFile(**daemon_opts),
    )
    daemon = Daemon(cfg, providers={name: registry.create(s) for name, s in settings.items()})
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        try:
            yield daemon
        finally:
            tg.cancel_scope.cancel()


def write_config(tmp: Path, settings: Mapping[str, ProviderSettings], *, log_level: str = "info") -> Path:
    """A TOML config for `streamd run`: every key and secret in its own file, as an operator would."""
    lines = [
        "[daemon]",
        f'socket = "{tmp / "feed.sock"}"',
        f'state_dir = "{tmp / "state"}"',
        f'log_level = "{log_level}"',
    ]
    for name, s in settings.items():
        key = tmp / f"{name}.key"
        key.write_text(s.key.reveal() + "\n")
        key.chmod(0o600)
        lines += ["", f"[providers.{name}]", f'api_key_file = "{key}"', f'base_url = "{s.base_url}"']
        if s.secret is not None:
            secret = tmp / f"{name}.secret"
            secret.write_text(s.secret.reveal() + "\n")
            secret.chmod(0o600)
            lines.append(f'api_secret_file = "{secret}"')
        if s.socket_url:
            lines.append(f'socket_url = "{s.socket_url}"')
        if s.ws_url:
            lines.append(f'ws_url = "{s.ws_url}"')
        if s.poll_interval:
            lines.append(f"poll_interval = {s.poll_interval}")
    path = tmp / "streamd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_env(tmp: Path) -> dict[str, str]:
    """The test's environment minus anything that would give the daemon another key, socket or notify target."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith(("_API_KEY", "_API_SECRET")) and not k.startswith(("LISTEN_", "NOTIFY", "STREAMD_"))
    }
    return env | {"XDG_CONFIG_HOME": str(tmp / "xdg"), "PYTHONUNBUFFERED": "1"}


class DaemonProcess:
    """`streamd run --config FILE` as a child process that a test can start, `kill -9` and start again."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp = tmp
        self.config = config
        self.socket = tmp / "feed.sock"
        self.stderr_path = tmp / "stderr.log"
        self.proc: Process | None = None
        self.starts = 0
        self.kills = 0
        self._log: IO[bytes] | None = None

    async def start(self, *, ready_within: float = 60.0) -> None:
        self._log = self.stderr_path.open("ab")
        self.proc = await anyio.open_process(
            [sys.executable, "-m", "streamd.cli", "run", "--config", str(self.config)],
            env=clean_env(self.tmp),
            stdout=self._log,
            stderr=self._log,
        )
        self.starts += 1
        with anyio.fail_after(ready_within):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"streamd exited with {self.proc.returncode}: see {self.stderr_path}")
                with contextlib.suppress(FeedError, OSError):
                    async with FeedClient.connect(self.socket) as client:
                        status = await client.status()
                        if status["daemon"]["pid"] == self.proc.pid:
                            return
                await anyio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        with anyio.fail_after(30):
            await self.proc.wait()
        self.kills += 1
        self._close_log()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            with anyio.fail_after(30):
                code = await self.proc.wait()
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the subscriber -----------------------------------------------------------------------------------
class Recorder:
    """A feed subscriber that keeps everything. Without `resume` a disconnect is an error (the fault
    soak's subscriber must stay connected throughout); with it, it reconnects and resumes from the
    last seq it saw, as a well-behaved client of a restarting daemon does."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.events: list[CloudEvent] = []
        self.gaps: list[p.Gap] = []
        self.epochs: list[str] = []
        self.connections = 0
        self.cursor = 0
        self._changed = anyio.Event()

    async def run(self, *, resume: bool = False, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            try:
                async with FeedClient.connect(self.socket) as client:
                    self.connections += 1
                    self.epochs.append(client.hello.epoch)
                    async for item in client.subscribe(since=self.cursor):
                        if isinstance(item, CloudEvent):
                            self.events.append(item)
                            self.cursor = item.seq
                        elif isinstance(item, p.Gap):
                            self.gaps.append(item)
                            self.cursor = item.last
                        elif isinstance(item, p.Live) and not started:
                            started = True
                            task_status.started()
                        self._changed.set()
                        self._changed = anyio.Event()
            except FeedError:
                if not resume:
                    raise
            await anyio.sleep(0.05)

    async def wait_for(self, predicate: Callable[[], bool], within: float) -> None:
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    def final_states(self) -> dict[tuple[str, str], CloudEvent]:
        out: dict[tuple[str, str], CloudEvent] = {}
        for ev in self.events:
            d = ev.data
            if d.kind is Kind.STATE and d.job is not None:
                out[(d.provider, d.job)] = ev
        return out


# -- the workload -------------------------------------------------------------------------------------
PROMPTS = (
    "a lighthouse on a basalt cliff at dusk",
    "isometric cutaway of a tiny bakery",
    "a red fox in fresh snow",
    "retro-futurist train station poster",
    "watercolour map of an imaginary archipelago",
)
TAGS = ("", "", "", "", "[slow]", "[slow]", "[fast]", "[fail]")


@dataclass
class Workload:
    rng: random.Random
    cancel_rate: float = 0.15
    acked: dict[tuple[str, str], str] = field(default_factory=dict)  # (provider, job) -> prompt
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (provider, code, message)
    cancels: int = 0
    cancel_refusals: int = 0
    submitted: int = 0

    def _request(self, provider: str) -> tuple[str, dict[str, Any]]:
        self.submitted += 1
        tag = self.rng.choice(TAGS)
        if provider == "wiro" and self.rng.random() < 0.05:
            tag = "[badinput]"
        prompt = f"{self.rng.choice(PROMPTS)} #{self.submitted} {tag}".strip()  # unique: idempotency keys
        options: dict[str, Any] = {}
        if provider in ("runware", "wiro") and self.rng.random() < 0.3:
            options["num"] = 2
        return prompt, options

    async def submit(self, client: FeedClient, provider: str, tg: TaskGroup | None = None) -> list[str]:
        prompt, options = self._request(provider)
        try:
            result = await client.submit(provider, MODELS[provider], prompt, options=options)
        except FeedError as exc:
            self.refused.append((provider, exc.code, exc.message))
            return []
        jobs = [str(j) for j in result.get("jobs", [])]
        for job in jobs:
            self.acked[(provider, job)] = prompt
        if tg is not None and provider in CANCELLABLE and jobs and self.rng.random() < self.cancel_rate:
            tg.start_soon(self._cancel_later, client, provider, jobs[0], self.rng.uniform(0.0, 0.6))
        return jobs

    async def round(self, client: FeedClient, providers: Iterable[str], tg: TaskGroup | None = None) -> None:
        """One job per provider, submitted concurrently."""
        async with anyio.create_task_group() as inner:
            for provider in providers:
                inner.start_soon(self.submit, client, provider, tg)

    async def _cancel_later(self, client: FeedClient, provider: str, job: str, delay: float) -> None:
        await anyio.sleep(delay)
        self.cancels += 1
        try:
            await client.cancel(provider, job)
        except FeedError:
            self.cancel_refusals += 1  # finished first, or the answer was lost: the truth decides


# -- verdicts -----------------------------------------------------------------------------------------
@dataclass
class StreamCheck:
    received: int
    head: int
    lost: int  # seqs in 1..head never delivered
    duplicates: int  # seqs delivered more than once
    reordered: int  # deliveries not in increasing seq order
    state_events: int
    state_duplicates: int  # a job's state reported twice
    backwards: int  # a job's state event earlier in the lifecycle than one before it

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.reordered or self.state_duplicates or self.backwards)


def check_stream(events: list[CloudEvent], head: int, *, first: int = 1) -> StreamCheck:
    seqs = [e.seq for e in events]
    unique = set(seqs)
    per_job: dict[tuple[str, str], list[State]] = {}
    for ev in events:
        d = ev.data
        if d.kind is Kind.STATE and d.job is not None and d.status is not None:
            per_job.setdefault((d.provider, d.job), []).append(d.status)
    return StreamCheck(
        received=len(seqs),
        head=head,
        lost=len(set(range(first, head + 1)) - unique),
        duplicates=len(seqs) - len(unique),
        reordered=sum(1 for a, b in itertools.pairwise(seqs) if b <= a),
        state_events=sum(len(v) for v in per_job.values()),
        state_duplicates=sum(len(v) - len(set(v)) for v in per_job.values()),
        backwards=sum(1 for v in per_job.values() for a, b in itertools.pairwise(v) if ORDER[b] <= ORDER[a]),
    )


def same_cost(seen: float | None, truth: float | None) -> bool:
    """Equal charges. Nothing charged is nothing charged whether a provider says 0 or says nothing
    (a Wiro task cancelled on the socket has no record read; Apiframe refunds to `creditCost: 0`)."""
    if not seen or not truth:
        return not seen and not truth
    return abs(seen - truth) <= 1e-9 * max(1.0, abs(seen), abs(truth))


def mismatches(jobs: Iterable[Job], emulators: Mapping[str, Emulator]) -> list[str]:
    """Every way streamd's view of `jobs` differs from what the emulators say really happened."""
    out = []
    for job in jobs:
        truth = emulators[job.provider].truth.get(job.job)
        where = f"{job.provider}/{job.job}"
        if truth is None:
            out.append(f"{where}: the emulator has no such job")
            continue
        if job.status.value != truth.state:
            out.append(f"{where}: streamd says {job.status.value}, the emulator {truth.state or 'unfinished'}")
            continue
        seen, real = list(job.outputs), list(truth.outputs)
        if job.provider in UNORDERED:
            seen, real = sorted(seen), sorted(real)
        if seen != real:
            out.append(f"{where} ({truth.state}): outputs {list(job.outputs)} != {truth.outputs}")
        if job.provider in COSTED and not same_cost(job.cost, truth.cost):
            out.append(f"{where} ({truth.state}): cost {job.cost} != {truth.cost}")
        if job.provider not in COSTED and job.cost is not None:
            out.append(f"{where}: a cost ({job.cost}) the provider never reported")
    return out


def stream_vs_jobs(recorder: Recorder, jobs: Iterable[Job]) -> list[str]:
    """The subscriber's last state event for each job says what the job store says."""
    final = recorder.final_states()
    out = []
    for job in jobs:
        ev = final.get(job.key)
        if ev is None:
            out.append(f"{job.provider}/{job.job}: the subscriber never saw a state event")
        elif ev.data.status is not job.status:
            out.append(f"{job.provider}/{job.job}: subscriber's last state {ev.data.status}, job store {job.status}")
        elif job.status is State.COMPLETED and list(ev.data.outputs) != list(job.outputs):
            out.append(f"{job.provider}/{job.job}: completed event outputs differ from the job's")
    return out


async def settle(
    jobs: Callable[[], Awaitable[list[Job]]],
    emulators: Mapping[str, Emulator],
    acked: Iterable[tuple[str, str]],
    *,
    within: float,
) -> list[Job]:
    """Wait until every job streamd knows (and every acknowledged one) has ended, in streamd and in
    the emulator, and streamd's view matches the truth; return the jobs. On timeout, fail saying how."""
    wanted = set(acked)
    latest: list[Job] = []
    problems: list[str] = ["not checked yet"]
    with contextlib.suppress(TimeoutError), anyio.fail_after(within):
        while True:
            latest = await jobs()
            known = {j.key for j in latest}
            problems = [f"{p}/{j}: acknowledged but unknown to streamd" for p, j in sorted(wanted - known)]
            problems += [f"{j.provider}/{j.job}: still {j.status.value}" for j in latest if not j.status.terminal]
            if not problems:
                problems = mismatches(latest, emulators)
                if not problems:
                    return latest
            await anyio.sleep(0.2)
    raise AssertionError(f"{len(problems)} job(s) did not settle in {within:g}s: " + "; ".join(problems[:10]))


def orphans(emulators: Mapping[str, Emulator], jobs: Iterable[Job]) -> list[tuple[str, str]]:
    """Jobs an emulator ran that streamd never heard of (a submit whose answer was lost)."""
    known = {j.key for j in jobs}
    return [(name, job) for name, emu in emulators.items() for job in emu.truth if (name, job) not in known]


def count_by(items: Iterable[str]) -> dict[str, int]:
    return dict(Counter(items))
