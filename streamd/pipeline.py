"""Observations in; sequenced, journaled, published events out.

`emit` runs the tracker and numbers each resulting event under one lock, so seqs are gap-free
and in journal order whatever the number of providers emitting. A single writer task takes
batches off a bounded queue, appends them to the journal in a worker thread, and only then
publishes them to the bus: nobody ever sees an event the journal does not hold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from streamd.bus import Bus
from streamd.events import K_HEALTH, TERMINAL, Job, Observation, envelope, json_encoder
from streamd.journal import CHECKPOINT_EVERY, Append, Journal, JournalError
from streamd.keyfilter import KeyFilter
from streamd.lifecycle import Tracker
from streamd.transport.backoff import Reconnector

log = logging.getLogger("streamd.pipeline")

new_tuple = tuple.__new__
QUEUE = 8192  # events waiting for the journal; when full, emitters wait (providers slow down)
# Most events written in one transaction, and so published at once: well under a subscriber's buffer
# (bus.Bus.limit, 4096), so a subscriber that keeps up is never pushed into catch-up by one big batch.
BATCH = 1024
YIELD_EVERY = 0.001  # seconds: the longest an emitter goes without giving the loop a turn


@dataclass
class Stats:
    emitted: Counter[str] = field(default_factory=Counter)  # events per provider
    written: int = 0
    batches: int = 0
    journal_error: str | None = None


class Pipeline:
    def __init__(self, journal: Journal, tracker: Tracker, bus: Bus, *, source: str) -> None:
        self.journal = journal
        self.tracker = tracker
        self.bus = bus
        self.source = source
        self.epoch = journal.epoch
        self.next_seq = journal.last_seq + 1
        self._stored = KeyFilter(journal.job_keys())  # no job-store read for a job certainly not in it
        self.stats = Stats()
        # One lock for the tracker and the seq counter; contended, emitters queue on it in order. It is
        # asyncio's own (the asyncio backend is pinned: see feed/unixsock.py): anyio's Lock looks the
        # backend and the current task up on every acquire and release, which cost more than the rest
        # of a one-event emit (a WebSocket provider emits each message on its own).
        self._lock = asyncio.Lock()
        self._turn = 0.0  # when emit last gave the loop a turn
        # The bounded queue to the writer. A deque plus two wake-up events instead of a memory object
        # stream: appending never yields to the loop (a stream's send checkpoints on every item), and an
        # emitter waits for room *before* the tracker moves or a seq is taken, so a cancelled emitter
        # leaves no hole in the seqs. It holds at most QUEUE + 1 events (an observation makes at most two).
        self._queue: deque[Append] = deque()
        self._has_data = anyio.Event()
        self._has_room = anyio.Event()
        self._db = anyio.CapacityLimiter(1)
        self.written_seq = journal.last_seq
        self._written = anyio.Event()

    async def emit(self, *observations: Observation) -> None:
        # A turn for the other tasks (and a cancellation point) at least once a millisecond, before
        # anything moves, so an emitter in a tight loop never starves the loop. Not on every call: a
        # WebSocket provider emits each message on its own, and a full turn of the loop (an epoll_wait)
        # per message cost more than the rest of its emit. On asyncio `sleep(0)` is what
        # anyio.lowlevel.checkpoint() does, without looking the backend up.
        now_mono = time.monotonic()
        if now_mono - self._turn >= YIELD_EVERY:
            self._turn = now_mono
            await asyncio.sleep(0)
        async with self._lock:
            absent = self._restore_many(observations)
            queue = self._queue
            tracker = self.tracker
            emitted = self.stats.emitted
            epoch, source = self.epoch, self.source
            encode, get = json_encoder.encode, tracker.get
            now = time.time()  # one time for what arrived together (one formatted time too: see rfc3339)
            for obs in observations:
                while len(queue) >= QUEUE:  # full: the providers slow down, nothing has moved yet
                    self._has_data.set()
                    room = self._has_room = anyio.Event()
                    await room.wait()
                    now = time.time()
                if obs.job is not None and (obs.provider, obs.job) not in absent and get(obs.provider, obs.job) is None:
                    self._restore(obs.provider, obs.job)
                for data in tracker.apply(obs, now):
                    seq = self.next_seq
                    self.next_seq += 1
                    body = encode(envelope(data, seq=seq, epoch=epoch, source=source, at=now))
                    job: Job | None = None
                    if data.job is not None and data.kind is not K_HEALTH:
                        job = get(data.provider, data.job)
                    row: tuple[object, ...]
                    if job is not None:
                        job.seq = seq
                        # (tuple.__new__ directly: a named tuple's own __new__ is a Python-level call)
                        row = (seq, now, body, job.key, encode(job), job.status in TERMINAL, data)
                    else:
                        row = (seq, now, body, None, None, False, data)
                    queue.append(new_tuple(Append, row))
                    emitted[data.provider] += 1
            if queue:
                self._has_data.set()

    def _restore_many(self, observations: tuple[Observation, ...]) -> set[tuple[str, str]]:
        """Restore, in one read per provider, the jobs of a batch the tracker does not cache; returns the
        keys the job store does not hold either (new jobs), which need no further look-up."""
        if len(observations) < 2:
            return set()
        tracker = self.tracker
        missing: dict[str, set[str]] = {}
        stored = self._stored
        absent: set[tuple[str, str]] = set()
        for obs in observations:
            if obs.job is not None and tracker.get(obs.provider, obs.job) is None:
                key = (obs.provider, obs.job)
                if stored.add(key):  # (whatever it is, it will be stored: the filter learns it now)
                    missing.setdefault(obs.provider, set()).add(obs.job)
                else:
                    absent.add(key)
        for provider, jobs in missing.items():
            if len(jobs) < 2:
                continue  # the per-observation look-up does it
            found = self.journal.jobs_by_id(provider, jobs)
            tracker.restore(found.values())
            absent.update((provider, job) for job in jobs if job not in found)
        return absent

    def _restore(self, provider: str, job: str) -> None:
        """A job the tracker no longer caches (finished long ago): its row decides duplicates.
        A single indexed read; only new or long-finished jobs get here."""
        if not self._stored.add((provider, job)):
            return
        known, _ = self.journal.job(provider, job)
        if known is not None:
            self.tracker.restore([known])

    async def writer(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Append batches to the journal, then publish them. On cancellation, flush what is queued
        (time-boxed, shielded) so a clean stop loses nothing."""
        task_status.started()
        try:
            while True:
                while not self._queue:
                    data = self._has_data = anyio.Event()
                    await data.wait()
                await self._write(self._take(BATCH))
        finally:
            with anyio.move_on_after(5, shield=True):
                while rest := self._take(BATCH):
                    await self._write(rest, retry=False)

    async def checkpointer(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write the job rows the journal holds back and checkpoint its WAL, in a thread of its own beside
        the writer, twice a second and only after writes: a checkpoint inside a commit held up every event
        behind it."""
        task_status.started()
        checked = self.written_seq
        limiter = anyio.CapacityLimiter(1)
        while True:
            while self.written_seq == checked:  # idle: no wake-ups until something is written
                await self._written.wait()
            await anyio.sleep(CHECKPOINT_EVERY)
            checked = self.written_seq
            try:
                await anyio.to_thread.run_sync(self._catch_up, limiter=limiter)
            except JournalError as exc:
                log.warning("%s", exc)  # the next one tries again; the writer has its own backstop

    def _catch_up(self) -> None:
        """The job rows the journal holds back, then the WAL's checkpoint (in the checkpointer's thread)."""
        self.journal.flush_jobs()
        self.journal.checkpoint()

    def _take(self, limit: int) -> list[Append]:
        queue = self._queue
        if len(queue) <= limit:
            batch = list(queue)
            queue.clear()
        else:
            batch = list(itertools.islice(queue, limit))
            for _ in range(limit):
                queue.popleft()
        self._has_room.set()
        return batch

    async def _write(self, batch: list[Append], *, retry: bool = True) -> None:
        policy = Reconnector(initial=0.5, maximum=30.0, healthy_after=0.0)
        while True:
            try:
                await anyio.to_thread.run_sync(self.journal.append, batch, limiter=self._db)
                break
            except JournalError as exc:
                # Nothing is published until it is written: hold the batch (emitters wait on the
                # bounded queue) and say so, loudly, until the disk takes it again.
                if self.stats.journal_error != str(exc):
                    log.error("%s; holding %d events until it can be written", exc, len(batch))
                self.stats.journal_error = str(exc)
                if not retry:
                    raise
                await anyio.sleep(policy.delay(time.monotonic()))
        if self.stats.journal_error:
            log.warning("journal writable again; %d held events written", len(batch))
            self.stats.journal_error = None
        self.stats.written += len(batch)
        self.stats.batches += 1
        self.written_seq = batch[-1].seq
        self._written.set()
        self._written = anyio.Event()
        self.bus.publish(batch)

    async def sync(self) -> None:
        """Wait until everything emitted so far is journaled (read-your-writes for requests)."""
        target = self.next_seq - 1
        while self.written_seq < target:
            await self._written.wait()
