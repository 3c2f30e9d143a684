"""Disk trouble: the journal's disk full (a real, tiny tmpfs filled to the last byte; needs root, as CI
has) or its database unwritable (SQLite itself refusing writes: `PRAGMA query_only`, and an
authorizer that denies retention's DELETE). In every case: a clear error in the log and in
`streamd status`, nothing published that the journal does not hold, and once writes go through
again every held event is delivered, in order, with no gap and no duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from streamd.daemon import Daemon
from streamd.events import State
from streamd.feed.client import FeedClient
from streamd.journal import Journal
from tests.reliability.harness import MODELS, Recorder, check_stream, fleet, in_process, mismatches, settle
from tests.support import ScriptedProvider, running_daemon

pytestmark = pytest.mark.anyio


def _can_mount() -> bool:
    return os.getuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write zeros until the filesystem has no byte left."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def on_writer(journal: Journal, call: Callable[[sqlite3.Connection], Any]) -> None:
    """Run `call` on the journal's writer connection, between its transactions (SQLite-level fault injection)."""
    with journal._wlock:
        call(journal._w)


async def cli_status(socket: Path) -> tuple[dict[str, Any], str]:
    """`streamd status --json` and `streamd status`, as an operator would run them."""
    base = [sys.executable, "-m", "streamd.cli", "status", "--socket", str(socket)]
    with anyio.fail_after(30):
        as_json = await anyio.run_process([*base, "--json"], check=False)
        text = await anyio.run_process(base, check=False)
    assert as_json.returncode == 0, as_json.stderr
    return json.loads(as_json.stdout), text.stdout.decode()


async def until(predicate: Callable[[], bool], within: float = 30.0) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110  (pipeline stats have no event)
            await anyio.sleep(0.02)


@contextlib.asynccontextmanager
async def watched(d: Daemon) -> AsyncIterator[Recorder]:
    recorder = Recorder(d.config.socket)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        yield recorder
        tg.cancel_scope.cancel()


async def held_then_delivered(
    d: Daemon, recorder: Recorder, fault: Callable[[], None], heal: Callable[[], None], caplog: pytest.LogCaptureFixture
) -> dict[str, Any]:
    """Events before, during and after a journal fault; returns what was seen while it lasted."""
    prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
    for i in range(50):
        await prov.push(f"before{i}", State.QUEUED, raw={"pad": "x" * 300})
    with anyio.fail_after(30):
        await d.pipeline.sync()
    published = d.bus.head
    fault()
    for i in range(300):
        await prov.push(f"during{i}", State.QUEUED, raw={"pad": "x" * 300})
        if i % 50 == 0:
            await prov.push(f"before{i // 50}", State.RUNNING)  # jobs the journal already holds move on too
    await until(lambda: d.pipeline.stats.journal_error is not None)
    await anyio.sleep(0.5)  # anything published by mistake would reach the subscriber by now
    seen_during = recorder.cursor
    status, text = await cli_status(d.config.socket)
    heal()
    await until(lambda: d.pipeline.stats.journal_error is None and recorder.cursor == d.pipeline.next_seq - 1, 60)
    after, _ = await cli_status(d.config.socket)
    rows = await anyio.to_thread.run_sync(d.journal.read_after, 0, 1_000_000)
    return {
        "published_before": published,
        "seen_during": seen_during,
        "status": status,
        "text": text,
        "after": after,
        "rows": rows,
        "logged": [r.getMessage() for r in caplog.records if r.name == "streamd.pipeline"],
    }


def assert_held_then_delivered(d: Daemon, recorder: Recorder, seen: dict[str, Any], error: str) -> None:
    head = d.bus.head
    assert seen["seen_during"] == seen["published_before"], "nothing published that the journal does not hold"
    daemon = seen["status"]["daemon"]
    message = daemon["journal_error"]
    assert message and error in message and str(d.journal.path) in message, message
    assert "JOURNAL ERROR" in seen["text"] and error in seen["text"]
    assert seen["after"]["daemon"]["journal_error"] is None
    assert any("holding" in m and error in m for m in seen["logged"]), seen["logged"]
    assert any("writable again" in m for m in seen["logged"])
    stream = check_stream(recorder.events, head)
    assert stream.ok and stream.received == head, stream
    assert [s for s, _ in seen["rows"]] == list(range(1, head + 1)), "the journal is gap-free too"
    assert head == seen["published_before"] + 306, "every event emitted during the fault is there"


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs (CI runs as root)")
async def test_a_full_disk_holds_every_event_until_there_is_room(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.pipeline")
    with tmpfs(short_tmp / "state", "6m") as disk:
        async with running_daemon(short_tmp) as d, watched(d) as recorder:
            filler: list[Path] = []
            seen = await held_then_delivered(
                d, recorder, lambda: filler.append(fill(disk)), lambda: filler[0].unlink(), caplog
            )
            assert_held_then_delivered(d, recorder, seen, "database or disk is full")


async def test_an_unwritable_journal_holds_every_event_and_says_so(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamd.pipeline")
    async with running_daemon(short_tmp) as d, watched(d) as recorder:
        seen = await held_then_delivered(
            d,
            recorder,
            lambda: on_writer(d.journal, lambda w: w.execute("PRAGMA query_only = ON")),
            lambda: on_writer(d.journal, lambda w: w.execute("PRAGMA query_only = OFF")),
            caplog,
        )
        assert_held_then_delivered(d, recorder, seen, "readonly database")


async def test_jobs_submitted_while_the_journal_is_unwritable_are_followed_to_their_end(short_tmp: Path) -> None:
    """Wiro and Runware write follow-up data (a task token, a session) straight to the job store as
    they submit. That write failing used to fail the submit with `internal error` while the task ran
    upstream; Wiro's was then never followed. Now the journal keeps what it could not write and writes
    it with the next batch: the submit is answered once the journal takes writes again, and the job
    is followed to its end, token and all."""
    async with fleet(proxied=False) as f:
        settings = {n: f.settings[n] for n in ("wiro", "runware")}
        async with in_process(short_tmp, settings) as d, FeedClient.connect(d.config.socket) as client:
            for emu in f.emulators.values():
                emu.faults.paused = True  # the jobs wait until the checks below are done
            on_writer(d.journal, lambda w: w.execute("PRAGMA query_only = ON"))
            answers: dict[str, Any] = {}

            async def submit(name: str) -> None:
                answers[name] = await client.submit(name, MODELS[name], "a lighthouse [fast]")

            async with anyio.create_task_group() as tg:
                for name in settings:
                    tg.start_soon(submit, name)
                await until(lambda: d.pipeline.stats.journal_error is not None)
                await anyio.sleep(0.5)
                assert not answers, "no answer before the jobs are in the journal"
                on_writer(d.journal, lambda w: w.execute("PRAGMA query_only = OFF"))
            acked = [(n, j) for n, a in answers.items() for j in a["jobs"]]
            await d.pipeline.sync()
            running = {(p, j): (await anyio.to_thread.run_sync(d.journal.job, p, j))[1] for p, j in acked}
            for emu in f.emulators.values():
                emu.faults.paused = False
            jobs = await settle(lambda: client.jobs(), f.emulators, acked, within=60)
            await d.pipeline.sync()
            ended = {(p, j): (await anyio.to_thread.run_sync(d.journal.job, p, j))[1] for p, j in acked}
    assert len(acked) == 2 and not mismatches(jobs, f.emulators)
    assert {len(f.emulators[n].truth) for n in settings} == {1}, "one task each upstream, each followed"
    assert all(running.values()), "the follow-up data reached the job store once it could be written"
    assert b"token" in (running[next(k for k in acked if k[0] == "wiro")] or b"")
    assert not any(ended.values()), "and was dropped, credentials and all, once the jobs ended"


async def test_retention_failing_after_a_write_does_not_wedge_the_journal(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention runs after a batch commits, every 10,000 events. If it fails (a DELETE needs room in
    the WAL, which a nearly full disk may not have), the batch is still written: reporting the append
    as failed made the pipeline retry a committed batch, which collided on its seqs for ever and
    published nothing again."""
    caplog.set_level(logging.INFO, logger="streamd.pipeline")

    def no_delete(action: int, *args: Any) -> int:
        return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_DELETE else sqlite3.SQLITE_OK

    async with running_daemon(short_tmp, retention_events=100) as d, watched(d) as recorder:
        prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
        on_writer(d.journal, lambda w: w.set_authorizer(no_delete))
        for i in range(10_500):
            await prov.push(f"j{i}", State.QUEUED)
        await until(lambda: recorder.cursor == d.pipeline.next_seq - 1, 60)
        on_writer(d.journal, lambda w: w.set_authorizer(None))
        head = d.bus.head
    assert head == 10_501 and check_stream(recorder.events, head).ok
    assert not [r for r in caplog.records if "write failed" in r.getMessage()]
