"""Profile the daemon under the firehose with py-spy (install it in the venv yourself; it is not a dependency).

    .venv/bin/python bench/profile.py [--channel sse|ws] [--subs 1] [--count 300000] [--out /tmp/streamd.txt]

Starts the emulator, `streamd run` and the subscribers as `bench/run.py` does, then records the
daemon with `py-spy record --format raw` (collapsed stacks, all threads, GIL-idle frames left out) while
the firehose runs, and prints the hottest functions by own time and by total time.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import PY, Daemon, Emulator, Subscribers


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channel", default="sse", choices=["sse", "ws"])
    ap.add_argument("--subs", type=int, default=1)
    ap.add_argument("--count", type=int, default=300_000)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--out", default="/tmp/streamd-profile.txt")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument(
        "--spy",
        default="",
        help="extra py-spy flags, after '=' as they start with dashes: --spy=--gil, --spy='--idle --threads'",
    )
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="streamd-profile-") as tmpdir:
        tmp = Path(tmpdir)
        emu = Emulator(tmp)
        daemon = Daemon(emu, tmp)
        try:
            subs = Subscribers(daemon, subs=args.subs, count=args.count, timeout=300)
            rec = subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(daemon.ps.pid),
                    "-r",
                    str(args.rate),
                    "--format",
                    "raw",
                    "-o",
                    args.out,
                    *args.spy.split(),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            t0, cpu0 = time.monotonic(), daemon.cpu()
            emu.start(args.count, args.channel)
            results = subs.result()
            wall, cpu = time.monotonic() - t0, daemon.cpu() - cpu0
            rec.send_signal(signal.SIGINT)
            rec.wait(30)
        finally:
            daemon.stop()
            emu.stop()
    events = min(r["events"] for r in results)
    print(f"{events} events in {wall:.2f} s ({events / wall:,.0f}/s); daemon CPU {cpu / events * 1e6:.1f} µs/event")
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    n = 0
    for line in Path(args.out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        k = int(count)
        frames = stack.split(";")
        n += k
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    print(f"\nown time ({n} samples)")
    for f, k in own.most_common(args.top):
        print(f"{k / n * 100:6.1f}%  {f}")
    print("\ntotal time")
    for f, k in total.most_common(args.top):
        print(f"{k / n * 100:6.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
