"""Per-event cost of each stage of the hot path, in-process, without sockets (where the time goes).

    .venv/bin/python bench/stages.py [--events 50000] [--repeat 5]
    PYTHONPATH=/tmp/streamd-before .venv/bin/python bench/stages.py    # another source tree (run from /tmp)

Each stage runs over the same `media_generation_completed` stream as the SSE firehose (one new job per
event); the best of `--repeat` passes is printed in µs per event. The loop-thread stages add up to what
the event loop spends per event; the journal runs in the daemon's worker thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamd.events import envelope, json_encoder
from streamd.journal import Append, Journal
from streamd.lifecycle import Tracker
from streamd.pipeline import BATCH
from streamd.providers.oxen import normalise
from streamd.transport.sse import SSEParser


def payload(i: int) -> str:
    gid = f"abcd1234-0000-4000-8000-{i:012x}"
    return (
        f'{{"generation_id":"{gid}","status":"succeeded","media_type":"image",'
        f'"model":"bytedance-seedream-4","url":"http://127.0.0.1/o/{gid}.png"}}'
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.events
    datas = [payload(i) for i in range(n)]
    raw = "".join(f"event: media_generation_completed\ndata: {d}\n\n" for d in datas).encode()
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    results: list[tuple[str, float]] = []

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        best, out = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        results.append((name, best / n * 1e6))
        return out

    def parse() -> list[Any]:
        parser = SSEParser()
        return [e for c in chunks for e in parser.feed(c)]

    events = stage("SSE parsing (SSEParser.feed)", parse)
    observations = stage(
        "normalise (oxen from_sse, incl. scrub)",
        lambda: [o for e in events for o in normalise.from_sse(e.event, e.data)],
    )
    now = time.time()

    def track() -> tuple[Tracker, list[Any]]:
        tracker = Tracker(keep_finished=n)
        return tracker, [d for o in observations for d in tracker.apply(o, now)]

    tracker, datas_out = stage("tracker (Tracker.apply)", track)
    envelopes = stage(
        "envelope (CloudEvent, rfc3339)",
        lambda: [
            envelope(d, seq=i, epoch="0123456789abcdef", source="urn:streamd:bench", at=now + i * 1e-5)
            for i, d in enumerate(datas_out)
        ],
    )
    bodies = stage("encode event (msgspec)", lambda: [json_encoder.encode(e) for e in envelopes])
    jobs = [tracker.get(d.provider, d.job) for d in datas_out if d.job is not None]
    job_bodies = stage("encode job row (msgspec)", lambda: [json_encoder.encode(j) for j in jobs])
    appends = stage(
        "Append (the journal row, published as it is)",
        lambda: [
            Append(i + 1, now, bodies[i], jobs[i].key, job_bodies[i], True, datas_out[i])
            for i in range(n)
            if jobs[i] is not None
        ],
    )
    bare = [a._replace(job_key=None, job_body=None, terminal=False) for a in appends]
    for label, rows in (("events only", bare), ("events + job rows", appends)):
        with tempfile.TemporaryDirectory(prefix="streamd-stages-") as tmp:
            journals = [Journal(Path(tmp) / f"j{r}.sqlite3") for r in range(args.repeat)]

            def write(rows: list[Append] = rows, journals: list[Journal] = journals) -> None:
                journal = journals.pop()
                for k in range(0, len(rows), BATCH):
                    journal.append(rows[k : k + BATCH])
                journal.checkpoint()  # the daemon's checkpointer does this beside the writer
                journal.close()

            stage(f"journal, {label}: {BATCH}-event batches + checkpoint (threads)", write)
    width = max(len(name) for name, _ in results)
    for name, us in results:
        print(f"{name:<{width}}  {us:6.2f} µs/event")
    loop = sum(us for name, us in results if "(threads)" not in name)
    print(f"{'loop-thread stages, total':<{width}}  {loop:6.2f} µs/event")


if __name__ == "__main__":
    main()
