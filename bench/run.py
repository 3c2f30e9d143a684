"""streamd's performance bench: the daemon as a separate process against bench emulators, each figure
beside a baseline measured in the same run.

    .venv/bin/python bench/run.py            # the full run (several minutes; see docs/performance.md)
    .venv/bin/python bench/run.py --smoke    # a short run for CI: checks that the bench works, not targets
    .venv/bin/python bench/run.py --only throughput,latency --runs 3 --json /tmp/bench.json

Every measurement starts a fresh `streamd run` (its own config, state directory and socket) pointed at
`bench/firehose.py`, an Oxen-compatible SSE firehose and a Runware-compatible WebSocket firehose that
push `count` completions for distinct jobs as fast as the socket takes them (or paced). Subscribers
(`bench/subscriber.py`) and the baselines (`bench/bare.py`, a bare httpx-sse / websockets read loop of
the same stream) are separate processes too; CPU and RSS come from the OS (psutil). Timestamps are
CLOCK_MONOTONIC, which every process on the machine shares. Everything stays on loopback, and every
wait is bounded: the bench stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


# -- processes ---------------------------------------------------------------------------------------
class Child:
    """A child process whose stdout carries JSON lines, read by a thread so waits can time out."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.argv = list(argv)
        self.log = log
        self._err = log.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=cwd,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))
        self.lines.put(None)

    def next(self, timeout: float) -> dict[str, Any]:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError(f"{Path(self.argv[1]).name}: no answer within {timeout:g}s{self.tail()}") from None
        if item is None:
            raise BenchError(f"{Path(self.argv[1]).name} exited ({self.proc.wait()}){self.tail()}")
        return item

    def tail(self) -> str:
        self._err.flush()
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-8:]
        except OSError:
            return ""
        return ("\n    " + "\n    ".join(text)) if text else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


class BenchError(Exception):
    pass


class Emulator:
    def __init__(self, tmp: Path) -> None:
        self.child = Child([PY, str(BENCH / "firehose.py")], tmp / "firehose.log")
        ports = self.child.next(20)
        self.http, self.ws = int(ports["http"]), int(ports["ws"])
        self.url = f"http://127.0.0.1:{self.http}"

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        with _OPENER.open(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def start(self, count: int, channel: str, rate: float = 0.0, ids: str = "sequential") -> None:
        self._call("/bench/start", {"count": count, "channel": channel, "rate": rate, "ids": ids})

    def stats(self) -> dict[str, Any]:
        return self._call("/bench/stats")

    def oxen_active(self, ids: list[str]) -> None:
        self._call("/bench/oxen-active", {"ids": ids})

    def stop(self) -> None:
        self.child.stop()


def _scale_id(i: int) -> str:
    """The scale journal's job ids (odd i: Oxen, even: Runware; i below scale_active: still running)."""
    return f"{i:08x}-0000-4000-8000-{i:012x}"


TREE: Path | None = None  # --tree: run the daemon and the CLI from this source tree instead


def streamd_argv() -> list[str]:
    script = Path(PY).with_name("streamd")
    return [str(script)] if script.exists() and TREE is None else [PY, "-m", "streamd.cli"]


def write_config(emu: Emulator, tmp: Path) -> Path:
    cfg = tmp / "streamd.toml"
    cfg.write_text(
        f"""[daemon]
socket = "{tmp / "feed.sock"}"
state_dir = "{tmp / "state"}"
log_level = "warning"

[providers.oxen]
api_key_env = "STREAMD_BENCH_OXEN_KEY"
base_url = "{emu.url}"

[providers.runware]
api_key_env = "STREAMD_BENCH_RUNWARE_KEY"
base_url = "{emu.url}/v1"
ws_url = "ws://127.0.0.1:{emu.ws}"

[providers.wiro]
enabled = false

[providers.apiframe]
enabled = false
"""
    )
    return cfg


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_SECRET")) and k != "NOTIFY_SOCKET"}
    env.update(
        STREAMD_BENCH_OXEN_KEY="bench-oxen", STREAMD_BENCH_RUNWARE_KEY="bench-runware", PYTHONDONTWRITEBYTECODE="1"
    )
    for name in ("STREAMD_CONFIG", "STREAMD_SOCKET", "CREDENTIALS_DIRECTORY", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(name, None)
    if TREE is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(TREE), str(TREE / "tui")])
    env.update(extra or {})
    return env


class Daemon:
    """`streamd run` in its own process, ready once every provider says connected."""

    def __init__(self, emu: Emulator, tmp: Path, *, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.tmp = tmp
        self.socket = tmp / "feed.sock"
        cfg = write_config(emu, tmp)
        self.t0 = time.monotonic()
        argv = [*streamd_argv(), "run", "--config", str(cfg)]
        self.child = Child(argv, tmp / "daemon.log", env=daemon_env(env), cwd=TREE or ROOT)
        self.ps = psutil.Process(self.child.proc.pid)
        if wait:
            self.wait_connected()

    def wait_connected(self, timeout: float = 30.0, providers: tuple[str, ...] = ("oxen", "runware")) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.proc.poll() is not None:
                raise BenchError(f"streamd run exited ({self.child.proc.returncode}){self.child.tail()}")
            try:
                status = feed_request(self.socket, {"op": "status"}, timeout=2.0)
            except OSError:
                time.sleep(0.02)
                continue
            health = {p["name"]: p["health"] for p in status["result"]["providers"]}
            if all(health.get(p) == "connected" for p in providers):
                return
            time.sleep(0.02)
        raise BenchError(f"the daemon did not connect to the emulators within {timeout:g}s{self.child.tail()}")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        self.child.stop()


def feed_request(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request on the feed socket, synchronously: the reply frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        f = sock.makefile("rb")
        f.readline()  # hello
        sock.sendall(json.dumps({**request, "id": 1}).encode() + b"\n")
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("feed closed")
            frame: dict[str, Any] = json.loads(line)
            if frame.get("frame") == "reply":
                return frame


class Subscribers:
    def __init__(
        self, daemon: Daemon, *, subs: int, count: int, stalled: int = 0, latency: bool = False, timeout: float
    ) -> None:
        argv = [PY, str(BENCH / "subscriber.py"), str(daemon.socket), "--subs", str(subs), "--count", str(count)]
        argv += ["--stalled", str(stalled), "--timeout", str(timeout)] + (["--latency"] if latency else [])
        self.child = Child(argv, daemon.tmp / "subscriber.log")
        self.timeout = timeout
        self.child.next(30)  # ready: every reader is live

    def result(self) -> list[dict[str, Any]]:
        subs: list[dict[str, Any]] = self.child.next(self.timeout + 30)["subs"]
        self.child.stop()
        return subs


class Bare:
    def __init__(self, kind: str, emu: Emulator, tmp: Path, *, count: int = 0, latency: bool = False, **kw: Any):
        url = f"{emu.url}/api/events" if kind == "sse" else f"ws://127.0.0.1:{emu.ws}"
        argv = [PY, str(BENCH / "bare.py"), kind, url, "--count", str(count)] + (["--latency"] if latency else [])
        for k, v in kw.items():
            argv += [f"--{k}", str(v)]
        self.child = Child(argv, tmp / f"bare-{kind}.log")
        self.ps = psutil.Process(self.child.proc.pid)
        self.child.next(30)

    def result(self, timeout: float) -> dict[str, Any]:
        out = self.child.next(timeout)
        self.child.stop()
        return out


# -- statistics --------------------------------------------------------------------------------------
def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class Figure:
    """One row: samples of the daemon's figure and of its baseline, one per run."""

    key: str
    name: str
    unit: str
    target: str
    check: Callable[[float, float], bool] | None = None  # (daemon median, baseline median) -> met?
    base_name: str = ""
    daemon: list[float] = field(default_factory=list)
    base: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def met(self) -> str:
        if self.check is None or not self.daemon:
            return "-"
        b = statistics.median(self.base) if self.base else float("nan")
        return "yes" if self.check(statistics.median(self.daemon), b) else "NO"


def fmt(values: Sequence[float], unit: str) -> str:
    if not values:
        return "-"
    med, lo, hi = statistics.median(values), min(values), max(values)

    def one(v: float) -> str:
        if unit == "ev/s":
            return f"{v / 1000:,.1f}k"
        if unit == "µs/ev":
            return f"{v * 1e6:.2f}"
        if unit == "ms":
            return f"{v * 1e3:.2f}"
        if unit == "MB":
            return f"{v / 1e6:.1f}"
        if unit == "%":
            return f"{v * 100:.2f}"
        if unit == "s":
            return f"{v:.3f}"
        return f"{v:.3g}"

    if len(values) == 1:
        return one(med)
    return f"{one(med)} [{one(lo)}..{one(hi)}]"


# -- the measurements ----------------------------------------------------------------------------------
@dataclass
class Params:
    runs: int
    count: int  # events per throughput measurement
    lat_count: int  # events per latency measurement (at lat_rate)
    lat_rate: float
    idle_seconds: float
    idle_runs: int
    scale_jobs: int
    scale_active: int
    scale_settle: float
    scale_runs: int
    startup_runs: int
    timeout: float
    ids: str = "sequential"  # the firehose's job ids: sequential (the job store's best case) or random UUIDs


FULL = Params(
    runs=5,
    count=200_000,
    lat_count=5_000,
    lat_rate=1000.0,
    idle_seconds=60.0,
    idle_runs=3,
    scale_jobs=100_000,
    scale_active=5_000,
    scale_settle=20.0,
    scale_runs=3,
    startup_runs=5,
    timeout=180.0,
)
SMOKE = Params(
    runs=1,
    count=10_000,
    lat_count=500,
    lat_rate=1000.0,
    idle_seconds=3.0,
    idle_runs=1,
    scale_jobs=5_000,
    scale_active=500,
    scale_settle=3.0,
    scale_runs=1,
    startup_runs=2,
    timeout=40.0,
)
WARMUP = 0.05  # latency: the first 5 % of events (connection warm-up) are left out of percentiles


class Bench:
    def __init__(self, params: Params, tmp: Path, verbose: bool) -> None:
        self.p = params
        self.tmp = tmp
        self.verbose = verbose
        self.figs: dict[str, Figure] = {}
        self._n = 0
        self.gap_free = True

    def fig(self, key: str, *args: Any, **kw: Any) -> Figure:
        if key not in self.figs:
            self.figs[key] = Figure(key, *args, **kw)
        return self.figs[key]

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"  {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def workdir(self) -> Iterator[Path]:
        self._n += 1
        path = self.tmp / f"m{self._n:03d}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def stack(self, tmp: Path) -> Iterator[tuple[Emulator, Daemon]]:
        emu = Emulator(tmp)
        daemon: Daemon | None = None
        try:
            daemon = Daemon(emu, tmp)
            yield emu, daemon
        finally:
            if daemon is not None:
                daemon.stop()
            emu.stop()

    # -- throughput, cost per event, slow subscriber ----------------------------------------------------
    def bare_throughput(self, channel: str, *, floor: bool = False) -> tuple[float, float]:
        """The bare read loop's events/s and CPU seconds per event; with `floor`, the loop that also
        journals each event (bench/bare.py --journal): the least any daemon on this journal could cost."""
        with self.workdir() as tmp:
            emu = Emulator(tmp)
            try:
                kw: dict[str, Any] = {"journal": tmp / "floor", "root": TREE or ROOT} if floor else {}
                bare = Bare(channel, emu, tmp, count=self.p.count, timeout=self.p.timeout, **kw)
                emu.start(self.p.count, channel, ids=self.p.ids)
                res = bare.result(self.p.timeout + 30)
                start = emu.stats()["started_ns"][channel]
            finally:
                emu.stop()
        if res["events"] < self.p.count:
            raise BenchError(f"bare {channel} loop read {res['events']} of {self.p.count} events")
        rate = res["events"] / ((res["last_ns"] - start) / 1e9)
        return rate, res["cpu"] / res["events"]

    def daemon_throughput(self, channel: str, subs: int, stalled: int = 0) -> tuple[float, float, int]:
        with self.workdir() as tmp, self.stack(tmp) as (emu, daemon):
            sub = Subscribers(daemon, subs=subs, stalled=stalled, count=self.p.count, timeout=self.p.timeout)
            cpu0 = daemon.cpu()
            emu.start(self.p.count, channel, ids=self.p.ids)
            results = sub.result()
            cpu = daemon.cpu() - cpu0
            rss = daemon.rss()
            start = emu.stats()["started_ns"][channel]
        rates = []
        for r in results:
            if r["events"] < self.p.count:
                raise BenchError(f"a subscriber got {r['events']} of {self.p.count} events (timeout)")
            if r["last_seq"] - r["first_seq"] + 1 != r["events"]:
                self.gap_free = False
            rates.append(r["events"] / ((r["last_ns"] - start) / 1e9))
        return min(rates), cpu / self.p.count, rss

    def throughput(self) -> None:
        for channel, label in (("sse", "SSE"), ("ws", "WebSocket")):
            base_rate, base_cpu = self.bare_throughput(channel)
            lib = "httpx-sse" if channel == "sse" else "websockets"
            f1 = self.fig(
                f"tp1-{channel}",
                f"throughput, 1 subscriber, {label}",
                "ev/s",
                "≥ 100k/s and ≥ 0.3 x bare",
                lambda d, b: d >= 100_000 and d >= 0.3 * b,
                base_name=f"bare {lib} loop",
            )
            f1.base.append(base_rate)
            rate, cpu, _ = self.daemon_throughput(channel, 1)
            f1.daemon.append(rate)
            _, floor_cpu = self.bare_throughput(channel, floor=True)
            for key, name, value in (
                (f"cpu-{channel}", f"cost per event, {label} (CPU µs)", cpu),
                (f"floor-{channel}", f"  floor: read + journal only, {label} (CPU µs)", floor_cpu),
            ):
                fc = self.fig(key, name, "µs/ev", "≤ 3 x bare", lambda d, b: d <= 3 * b, base_name=f"bare {lib} loop")
                fc.base.append(base_cpu)
                fc.daemon.append(value)
            self.say(
                f"{label}: bare {base_rate:,.0f} ev/s, daemon {rate:,.0f} ev/s; cpu {cpu * 1e6:.2f} µs/ev "
                f"(floor {floor_cpu * 1e6:.2f})"
            )
        base = self.figs["tp1-sse"].base[-1]
        rate10, _, _ = self.daemon_throughput("sse", 10)
        f10 = self.fig(
            "tp10",
            "throughput, 10 subscribers, SSE (each)",
            "ev/s",
            "≥ 50k/s each",
            lambda d, b: d >= 50_000,
            base_name="bare httpx-sse loop",
        )
        f10.base.append(base)
        f10.daemon.append(rate10)
        rate_slow, _, _ = self.daemon_throughput("sse", 10, stalled=1)
        fs = self.fig(
            "tp10-slow",
            "throughput, 10 + 1 never-reading (each)",
            "ev/s",
            "within 10 % of 10 subs",
            lambda d, b: d >= 0.9 * b,
            base_name="10 subscribers, no slow one",
        )
        fs.base.append(rate10)
        fs.daemon.append(rate_slow)
        self.say(f"10 subs: {rate10:,.0f} ev/s each; with a never-reading one: {rate_slow:,.0f}")

    # -- latency ------------------------------------------------------------------------------------------
    def _lat(self, samples: list[int]) -> tuple[float, float]:
        keep = samples[int(len(samples) * WARMUP) :]
        return pct(keep, 50) / 1e9, pct(keep, 99) / 1e9

    def bare_latency(self, channel: str) -> tuple[float, float]:
        with self.workdir() as tmp:
            emu = Emulator(tmp)
            try:
                bare = Bare(channel, emu, tmp, count=self.p.lat_count, latency=True, timeout=self.p.timeout)
                emu.start(self.p.lat_count, channel, rate=self.p.lat_rate, ids=self.p.ids)
                res = bare.result(self.p.timeout + 30)
            finally:
                emu.stop()
        return self._lat(res["latency_ns"])

    def daemon_latency(self, channel: str, subs: int, stalled: int = 0) -> tuple[float, float]:
        with self.workdir() as tmp, self.stack(tmp) as (emu, daemon):
            sub = Subscribers(
                daemon, subs=subs, stalled=stalled, count=self.p.lat_count, latency=True, timeout=self.p.timeout
            )
            emu.start(self.p.lat_count, channel, rate=self.p.lat_rate, ids=self.p.ids)
            results = sub.result()
        per = [self._lat(r["latency_ns"]) for r in results]
        return statistics.median(p50 for p50, _ in per), max(p99 for _, p99 in per)

    def latency(self) -> None:
        rate = f"{self.p.lat_rate:,.0f} ev/s"
        for channel, label in (("sse", "SSE"), ("ws", "WebSocket")):
            b50, b99 = self.bare_latency(channel)
            d50, d99 = self.daemon_latency(channel, 1)
            lib = "httpx-sse" if channel == "sse" else "websockets"
            f50 = self.fig(
                f"lat50-{channel}",
                f"latency p50, {label}, {rate}",
                "ms",
                "≤ 1 ms",
                lambda d, b: d <= 0.001,
                base_name=f"bare {lib} loop",
            )
            f99 = self.fig(
                f"lat99-{channel}",
                f"latency p99, {label}, {rate}",
                "ms",
                "≤ 5 ms",
                lambda d, b: d <= 0.005,
                base_name=f"bare {lib} loop",
            )
            f50.base.append(b50)
            f50.daemon.append(d50)
            f99.base.append(b99)
            f99.daemon.append(d99)
            bare_ms, daemon_ms = f"{b50 * 1e3:.2f}/{b99 * 1e3:.2f}", f"{d50 * 1e3:.2f}/{d99 * 1e3:.2f}"
            self.say(f"latency {label} p50/p99: bare {bare_ms} ms, daemon {daemon_ms} ms")
        _, p99_10 = self.daemon_latency("sse", 10)
        _, p99_slow = self.daemon_latency("sse", 10, stalled=1)
        fs = self.fig(
            "lat99-slow",
            f"latency p99, 10 + 1 never-reading, {rate}",
            "ms",
            "within 10 % of 10 subs",
            lambda d, b: d <= 1.1 * b,
            base_name="10 subscribers, no slow one",
        )
        fs.base.append(p99_10)
        fs.daemon.append(p99_slow)
        self.say(f"latency 10 subs p99 {p99_10 * 1e3:.2f} ms; with a never-reading one {p99_slow * 1e3:.2f} ms")

    # -- idle ---------------------------------------------------------------------------------------------
    def idle(self) -> None:
        with self.workdir() as tmp, self.stack(tmp) as (emu, daemon):
            bares = [
                Bare(kind, emu, tmp, idle=self.p.idle_seconds + 10, timeout=self.p.idle_seconds + 30)
                for kind in ("sse", "ws")
            ]
            time.sleep(min(3.0, self.p.idle_seconds))
            cpu0, bcpu0, t0 = daemon.cpu(), [_cpu(b.ps) for b in bares], time.monotonic()
            rss_max = 0
            while time.monotonic() - t0 < self.p.idle_seconds:
                time.sleep(0.5)
                rss_max = max(rss_max, daemon.rss())
            wall = time.monotonic() - t0
            cpu, bcpu = daemon.cpu() - cpu0, sum(_cpu(b.ps) for b in bares) - sum(bcpu0)
            brss = sum(b.ps.memory_info().rss for b in bares)
            for b in bares:
                b.child.stop()
        fc = self.fig(
            "idle-cpu",
            f"idle CPU, {self.p.idle_seconds:g} s (% of one core)",
            "%",
            "≤ 0.5 %",
            lambda d, b: d <= 0.005,
            base_name="bare SSE + WS loops, connected",
        )
        fc.daemon.append(cpu / wall)
        fc.base.append(bcpu / wall)
        fr = self.fig(
            "idle-rss",
            "idle RSS",
            "MB",
            "≤ 60 MB",
            lambda d, b: d <= 60e6,
            base_name="bare SSE + WS loops (sum)",
        )
        fr.daemon.append(rss_max)
        fr.base.append(brss)
        self.say(f"idle: {cpu / wall * 100:.2f} % of a core, RSS {rss_max / 1e6:.1f} MB")

    # -- start-up -----------------------------------------------------------------------------------------
    def startup(self) -> None:
        fb = self.fig(
            "startup",
            "start-up, `streamd run` to READY=1",
            "s",
            "≤ 0.5 s",
            lambda d, b: d <= 0.5,
            base_name="`python -c pass`",
        )
        fl = self.fig("startup-listen", "start-up, to the socket answering", "s", "-", base_name="`python -c pass`")
        with self.workdir() as tmp:
            t0 = time.monotonic()
            subprocess.run([PY, "-c", "pass"], check=True, cwd=ROOT)
            bare = time.monotonic() - t0
            fb.base.append(bare)
            fl.base.append(bare)
            emu = Emulator(tmp)
            try:
                notify_path = tmp / "notify.sock"
                ready_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                ready_sock.bind(str(notify_path))
                ready_sock.settimeout(0.005)
                daemon = Daemon(emu, tmp, env={"NOTIFY_SOCKET": str(notify_path)}, wait=False)
                listen = ready = None
                try:
                    while ready is None and time.monotonic() - daemon.t0 < 30:
                        with contextlib.suppress(TimeoutError, BlockingIOError):
                            if b"READY=1" in ready_sock.recv(4096):
                                ready = time.monotonic() - daemon.t0
                        if listen is None and daemon.socket.exists():
                            with contextlib.suppress(OSError):
                                feed_request(daemon.socket, {"op": "ping"}, timeout=1.0)
                                listen = time.monotonic() - daemon.t0
                    if ready is None:
                        raise BenchError(f"no READY=1 within 30 s{daemon.child.tail()}")
                    fb.daemon.append(ready)
                    if listen is not None:
                        fl.daemon.append(listen)
                    self.say(f"start-up: READY=1 after {ready:.3f} s, socket answering after {listen or 0:.3f} s")
                finally:
                    daemon.stop()
                    ready_sock.close()
            finally:
                emu.stop()

    def dashboard_imported(self) -> list[str]:
        """Modules of the dashboard (textual, streamd_tui) that `streamd run` imports, from -X importtime."""
        with self.workdir() as tmp:
            emu = Emulator(tmp)
            try:
                daemon = Daemon(emu, tmp, env={"PYTHONPROFILEIMPORTTIME": "1"})
                daemon.stop()
                text = (tmp / "daemon.log").read_text(errors="replace")
            finally:
                emu.stop()
        found = set()
        for line in text.splitlines():
            if line.startswith("import time:") and "|" in line:
                name = line.rsplit("|", 1)[1].strip()
                if name.split(".")[0] in ("textual", "streamd_tui", "rich"):
                    found.add(name.split(".")[0])
        return sorted(found)

    # -- scale --------------------------------------------------------------------------------------------
    def scale(self, journal_dir: Path) -> None:
        with self.workdir() as tmp:
            shutil.copytree(journal_dir, tmp / "state")
            emu = Emulator(tmp)
            try:
                # Oxen's active list holds the journal's running Oxen jobs (see build_journal)
                emu.oxen_active([_scale_id(i) for i in range(1, self.p.scale_active, 2)])
                daemon = Daemon(emu, tmp, wait=False)
                try:
                    daemon.wait_connected(timeout=60)
                    ready = time.monotonic() - daemon.t0
                    cpu0, t0 = daemon.cpu(), time.monotonic()
                    rss_max = 0
                    while time.monotonic() - t0 < self.p.scale_settle:
                        time.sleep(0.25)
                        rss_max = max(rss_max, daemon.rss())
                    cpu = (daemon.cpu() - cpu0) / (time.monotonic() - t0)
                    jobs_s, n_jobs = self._cli(daemon, ["jobs", "--json"])
                    status_s, _ = self._cli(daemon, ["status", "--json"])
                    polls = emu.stats()["polls"]
                finally:
                    daemon.stop()
            finally:
                emu.stop()
        fr = self.fig(
            "scale-rss",
            f"scale: RSS, {self.p.scale_jobs:,} jobs / {self.p.scale_active:,} active",
            "MB",
            "≤ 200 MB",
            lambda d, b: d <= 200e6,
            base_name="idle daemon, empty journal",
        )
        fr.daemon.append(rss_max)
        if "idle-rss" in self.figs:
            fr.base = list(self.figs["idle-rss"].daemon)
        fj = self.fig(
            "scale-jobs",
            "scale: `streamd jobs --json` (wall)",
            "s",
            "≤ 1 s",
            lambda d, b: d <= 1.0,
            base_name="`streamd status --json`",
        )
        fj.daemon.append(jobs_s)
        fj.base.append(status_s)
        fc = self.fig("scale-cpu", "scale: daemon CPU while polling (% of one core)", "%", "-", base_name="")
        fc.daemon.append(cpu)
        fu = self.fig("scale-ready", "scale: start-up to connected, big journal", "s", "-", base_name="")
        fu.daemon.append(ready)
        for provider, advised in (("oxen", 2.0), ("runware", 3.0)):
            s = polls[provider]
            fp = self.fig(
                f"scale-poll-{provider}",
                f"scale: {provider} per-job poll interval, p1",
                "s",
                f"≥ {advised:g} s (advised)",
                lambda d, b, a=advised: d >= 0.95 * a,
                base_name="advised minimum",
            )
            if s["interval_p1"] is not None:
                fp.daemon.append(s["interval_p1"])
                fp.base.append(advised)
            rate = s["job_polls"] / s["span"] if s["span"] else 0.0
            fp.notes.append(
                f"{provider}: {s['jobs']} jobs polled, {s['job_polls']} job polls in {s['requests']} requests "
                f"over {s['span']:.1f} s ({rate:,.0f} job polls/s); per-job interval min {_f(s['interval_min'])} s, "
                f"median {_f(s['interval_p50'])} s, {s['below_share']:.1%} of intervals under {advised:g} s"
            )
        self.say(
            f"scale: RSS {rss_max / 1e6:.1f} MB, jobs --json {jobs_s:.3f} s ({n_jobs} jobs), CPU {cpu * 100:.0f} %"
        )

    def _cli(self, daemon: Daemon, args: list[str]) -> tuple[float, int]:
        t0 = time.monotonic()
        out = subprocess.run(
            [*streamd_argv(), *args, "--socket", str(daemon.socket)],
            capture_output=True,
            check=True,
            timeout=60,
            env=daemon_env(),
            cwd=TREE or ROOT,
        )
        wall = time.monotonic() - t0
        parsed = json.loads(out.stdout)
        return wall, len(parsed) if isinstance(parsed, list) else 1

    def build_journal(self) -> Path:
        """A journal with `scale_jobs` jobs (two events each), `scale_active` of them still running,
        split between oxen and runware: what a long-running daemon leaves behind."""
        sys.path.insert(0, str(ROOT))
        from streamd.events import EventData, Job, Kind, Origin, State, envelope, json_encoder
        from streamd.journal import Append, Journal

        path = self.tmp / "scale-state"
        journal = Journal(path / "journal.sqlite3")
        now = time.time()
        seq = 0
        batch: list[Append] = []
        active = self.p.scale_active
        for i in range(self.p.scale_jobs):
            provider = "oxen" if i % 2 else "runware"
            jid = _scale_id(i)
            steps = (State.QUEUED, State.RUNNING) if i < active else (State.QUEUED, State.COMPLETED)
            created = now - 86400 + i * 0.5
            job = Job(provider=provider, job=jid, status=State.QUEUED, model="bytedance-seedream-4", created=created)
            previous: State | None = None
            for k, state in enumerate(steps):
                seq += 1
                at = created + k
                job.status, job.since, job.updated, job.seq = state, at, at, seq
                job.prompt = f"bench prompt {i}"
                if state is State.COMPLETED:
                    job.outputs = (f"https://example.invalid/{jid}.png",)
                data = EventData(
                    provider=provider,
                    job=jid,
                    kind=Kind.STATE,
                    status=state,
                    previous=previous,
                    upstream=state.value,
                    origin=Origin.POLL,
                    model=job.model,
                    outputs=job.outputs,
                    raw={"status": state.value, "id": jid},
                )
                body = json_encoder.encode(envelope(data, seq=seq, epoch=journal.epoch, source="urn:bench", at=at))
                batch.append(Append(seq, at, body, job.key, json_encoder.encode(job), state.terminal))
                previous = state
            if len(batch) >= 4096:
                journal.append(batch)
                batch = []
        journal.append(batch)
        journal.close()
        return path


def _cpu(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return float(t.user + t.system)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def others_busy(seconds: float = 1.0) -> float:
    """CPU used by other processes (not this bench's), in cores, sampled over `seconds`."""
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    before = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            before[proc.pid] = _cpu(proc)
    time.sleep(seconds)
    used = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.pid in before:
                used += _cpu(proc) - before[proc.pid]
    return used / seconds


def machine() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {psutil.cpu_count()} logical CPUs "
        f"({len(os.sched_getaffinity(0))} usable), {mem:.1f} GiB RAM, Python {platform.python_version()}"
    )


def table(figs: list[Figure]) -> str:
    rows = [("figure", "unit", "baseline", "streamd", "target", "met", "baseline is")]
    for f in figs:
        rows.append((f.name, f.unit, fmt(f.base, f.unit), fmt(f.daemon, f.unit), f.target, f.met(), f.base_name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


SECTIONS = ("throughput", "latency", "idle", "startup", "scale")


def compare_table(before: list[Figure], after: list[Figure]) -> str:
    old = {f.key: f for f in before}
    rows = [("figure", "unit", "before", "after", "change", "target", "met after")]
    for f in after:
        o = old.get(f.key)
        if o is None or not o.daemon or not f.daemon:
            continue
        b, a = statistics.median(o.daemon), statistics.median(f.daemon)
        change = f"{a / b:.2f}x" if b else "-"
        rows.append((f.name, f.unit, fmt([b], f.unit), fmt([a], f.unit), change, f.target, f.met()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--smoke", action="store_true", help="a short run that checks the bench works (CI)")
    ap.add_argument("--runs", type=int, help="runs per figure (default 5; smoke 1)")
    ap.add_argument("--count", type=int, help="events per throughput measurement")
    ap.add_argument("--idle-seconds", type=float, help="idle window (default 60 s)")
    ap.add_argument("--lat-count", type=int, help="events per latency measurement (at 1,000/s)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--json", help="also write the samples to this file")
    ap.add_argument("--tree", help="run the daemon and CLI from this source tree (e.g. `git archive HEAD` unpacked)")
    ap.add_argument(
        "--compare",
        metavar="TREE",
        help="also measure the daemon from TREE (before), alternating with this one (after) measurement by "
        "measurement, so both see the same machine; prints both tables and before -> after",
    )
    ap.add_argument(
        "--ids",
        choices=["sequential", "random"],
        default="sequential",
        help="the firehose's job ids: sequential (the default; the job store's best case) or random UUIDs",
    )
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    p = dataclasses.replace(SMOKE if args.smoke else FULL)
    if args.runs:
        p.runs = args.runs
    if args.count:
        p.count = args.count
    if args.idle_seconds:
        p.idle_seconds = args.idle_seconds
    if args.lat_count:
        p.lat_count = args.lat_count
    p.ids = args.ids
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}")
    this = Path(args.tree).resolve() if args.tree else None
    trees: list[tuple[str, Path | None]] = [("after" if args.compare else "streamd", this)]
    if args.compare:
        trees.insert(0, ("before", Path(args.compare).resolve()))
    started = time.monotonic()
    print(f"streamd bench ({'smoke' if args.smoke else 'full'}): {machine()}", flush=True)
    if p.ids != "sequential":
        print(f"job ids in the firehose: {p.ids}", flush=True)
    for label, tree in trees:
        print(f"{label}: daemon from {tree or ROOT}", flush=True)
    busy_before = others_busy()
    global TREE
    with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmpdir:
        benches: list[tuple[str, Path | None, Bench]] = []
        for label, tree in trees:
            (Path(tmpdir) / label).mkdir()
            benches.append((label, tree, Bench(p, Path(tmpdir) / label, verbose=not args.quiet)))

        def each(step: Callable[[Bench], None]) -> None:
            global TREE
            for label, tree, bench in benches:
                TREE = tree
                if len(benches) > 1:
                    bench.say(f"[{label}]")
                step(bench)

        try:
            if "startup" in sections:
                for _ in range(p.startup_runs):
                    each(Bench.startup)

                def dashboard(bench: Bench) -> None:
                    dash = bench.dashboard_imported()
                    bench.figs["startup"].notes.append(
                        "dashboard modules imported by `streamd run`: " + (", ".join(dash) if dash else "none")
                    )

                each(dashboard)
            for run in range(p.runs):
                benches[0][2].say(f"run {run + 1}/{p.runs}")
                if "throughput" in sections:
                    each(Bench.throughput)
                if "latency" in sections:
                    each(Bench.latency)
            if "idle" in sections:
                for _ in range(p.idle_runs):
                    each(Bench.idle)
            if "scale" in sections:
                journal = benches[0][2].build_journal()
                for _ in range(p.scale_runs):
                    each(lambda bench: bench.scale(journal))
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        finally:
            TREE = this
        busy_after = others_busy()
        for label, tree, bench in benches:
            figs = list(bench.figs.values())
            print(f"\n{label} ({tree or ROOT}):\n")
            print(table(figs))
            notes = [n for f in figs for n in f.notes]
            if not bench.gap_free:
                notes.append("WARNING: a subscriber saw a gap or a duplicate in seq")
            elif "throughput" in sections:
                notes.append("every subscriber saw gap-free, in-order seqs (last - first + 1 == events)")
            for n in notes:
                print(f"  * {n}")
        if len(benches) > 1:
            print("\nbefore -> after (medians):\n")
            print(compare_table(list(benches[0][2].figs.values()), list(benches[1][2].figs.values())))
        print()
        if "latency" in sections:
            print(f"  * latency percentiles leave out the first {WARMUP:.0%} of events of each run")
        print(
            f"  * other processes used {busy_before:.0%} of a core before the run and {busy_after:.0%} after "
            "(figures from a shared machine are noisy)"
        )
        print(f"\n{p.runs} run(s); median [min..max]; {time.monotonic() - started:.0f} s in all", flush=True)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "machine": machine(),
                        "params": vars(p),
                        "others_busy": [busy_before, busy_after],
                        "trees": {
                            label: {
                                "path": str(tree or ROOT),
                                "figures": [
                                    {"key": f.key, "name": f.name, "unit": f.unit, "daemon": f.daemon, "base": f.base}
                                    for f in bench.figs.values()
                                ],
                            }
                            for label, tree, bench in benches
                        },
                    },
                    indent=1,
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
