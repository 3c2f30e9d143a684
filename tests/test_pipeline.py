"""The pipeline's job-store look-ups: a job the tracker no longer caches is restored from the store
(its row decides duplicates), and a job the key filter knows is new costs no store read."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from streamd.bus import Bus
from streamd.events import Kind, Observation, Origin, State
from streamd.journal import Journal
from streamd.keyfilter import KeyFilter
from streamd.lifecycle import Tracker
from streamd.pipeline import QUEUE, Pipeline
from tests.support import ScriptedProvider, running_daemon


def done(job: str) -> Observation:
    return Observation(
        provider="oxen", job=job, kind=Kind.STATE, upstream="completed", origin=Origin.PUSH, state=State.COMPLETED
    )


def pipeline_on(journal: Journal) -> Pipeline:
    async def fetch(seq: int, limit: int) -> list[tuple[int, bytes]]:
        return journal.read_after(seq, limit)

    bus = Bus(journal.last_seq, fetch, lambda: journal.oldest)
    return Pipeline(journal, Tracker(keep_finished=100), bus, source="urn:test")


async def emit_all(pipeline: Pipeline, *batches: tuple[Observation, ...]) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.writer)
        for batch in batches:
            await pipeline.emit(*batch)
            await pipeline.sync()  # (the tracker keeps far more finished jobs than the writer's queue holds)
        tg.cancel_scope.cancel()


class CountingJournal(Journal):
    reads = 0

    def job(self, provider: str, job: str) -> Any:
        self.reads += 1
        return super().job(provider, job)

    def jobs_by_id(self, provider: str, jobs: Any) -> Any:
        jobs = list(jobs)
        self.reads += len(jobs)
        return super().jobs_by_id(provider, jobs)


@pytest.mark.anyio
async def test_finished_jobs_from_another_run_are_duplicates_and_new_jobs_cost_no_read(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    first = Journal(path)
    await emit_all(pipeline_on(first), tuple(done(f"old-{i}") for i in range(50)))
    first.close()

    journal = CountingJournal(path)
    pipeline = pipeline_on(journal)
    before = journal.last_seq
    # evicted from the tracker (it keeps 100 finished jobs) and from another run: only the store knows them
    olds = tuple(done(f"old-{i}") for i in range(50))
    news = tuple(done(f"new-{i}") for i in range(200))
    await emit_all(pipeline, olds, news, (done("old-7"),), (done("new-3"),))
    assert journal.last_seq == before + 200  # the 50 old ones again, twice: no events
    # read: the 50 old ones (one batch), old-7 and new-3 (both left the tracker's cache); the 200 new ones
    # were judged new without a read (a false positive of the filter at this fill is ~1 in 10^10)
    assert journal.reads == 50 + 1 + 1
    journal.close()


def test_the_key_filter_has_no_false_negatives_and_few_false_positives() -> None:
    keys = [("oxen", f"job-{i}") for i in range(20_000)]
    f = KeyFilter(keys[:10_000])
    assert all(k in f for k in keys[:10_000])
    false_positives = sum(k in f for k in keys[10_000:])
    assert false_positives < 20  # ~1 in 3,000 expected at this fill


@pytest.mark.anyio
async def test_an_emitter_in_a_tight_loop_still_lets_others_run_and_can_be_cancelled(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    pipeline = pipeline_on(journal)
    seen_at: list[int] = []  # how many events had been emitted at each turn of the other task
    emitted = 0

    async def other(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            seen_at.append(emitted)
            await anyio.lowlevel.checkpoint()

    async def firehose() -> None:
        nonlocal emitted
        while True:  # no await but emit's own
            await pipeline.emit(done(f"j{emitted}"))
            emitted += 1

    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.writer)
        await tg.start(other)  # turns counted from before the firehose starts
        with anyio.move_on_after(1.0) as scope:  # cancellation reaches the emitter
            await firehose()
        assert scope.cancelled_caught
        tg.cancel_scope.cancel()
    assert emitted > 100
    # The other task got turns all along, not only when the writer's queue (QUEUE events) was full: emit
    # gives the loop a turn every millisecond, and no emit takes anywhere near QUEUE / 4 of a millisecond.
    most_between_turns = max(b - a for a, b in itertools.pairwise(seen_at))
    assert len(seen_at) > 10 and most_between_turns < QUEUE // 4
    journal.close()


def test_adding_to_the_key_filter_says_whether_the_key_may_have_been_there() -> None:
    f = KeyFilter()
    assert not f.add(("oxen", "a"))  # certainly new
    assert f.add(("oxen", "a")) and ("oxen", "a") in f


@pytest.mark.anyio
async def test_the_daemon_checkpoints_the_journal_after_writes(short_tmp: Path) -> None:
    provider = ScriptedProvider()
    async with running_daemon(short_tmp, {"oxen": provider}) as d:
        calls = 0
        checkpoint = d.journal.checkpoint

        def counting() -> int:
            nonlocal calls
            calls += 1
            return checkpoint()

        d.journal.checkpoint = counting  # type: ignore[method-assign]
        await provider.push("j1", State.QUEUED)
        with anyio.fail_after(20):
            while calls == 0:  # noqa: ASYNC110  (nothing to wait on but the journal being checkpointed)
                await anyio.sleep(0.05)
