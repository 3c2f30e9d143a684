"""Observations in; sequenced, journaled, published events out.

`emit` runs the tracker and numbers each resulting event under one lock, so seqs are gap-free
and in journal order whatever the number of providers emitting. A single writer task takes
batches off a bounded queue, appends them to the journal in a worker thread, and only then
publishes them to the bus: nobody ever sees an event the journal does not hold.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd.bus import Bus, Item
from streamd.events import Job, Kind, Observation, envelope, json_encoder
from streamd.journal import Append, Journal, JournalError
from streamd.lifecycle import Tracker
from streamd.transport.backoff import Reconnector

log = logging.getLogger("streamd.pipeline")

QUEUE = 8192  # events waiting for the journal; when full, emitters wait (providers slow down)
BATCH = 4096  # most events written in one transaction


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
        self.stats = Stats()
        self._lock = anyio.Lock()
        send, recv = anyio.create_memory_object_stream[tuple[Append, Item]](QUEUE)
        self._send: MemoryObjectSendStream[tuple[Append, Item]] = send
        self._recv: MemoryObjectReceiveStream[tuple[Append, Item]] = recv
        self._db = anyio.CapacityLimiter(1)
        self.written_seq = journal.last_seq
        self._written = anyio.Event()

    async def emit(self, *observations: Observation) -> None:
        async with self._lock:
            for obs in observations:
                now = time.time()
                if obs.job is not None and self.tracker.get(obs.provider, obs.job) is None:
                    self._restore(obs.provider, obs.job)
                for data in self.tracker.apply(obs, now):
                    seq = self.next_seq
                    self.next_seq += 1
                    body = json_encoder.encode(envelope(data, seq=seq, epoch=self.epoch, source=self.source, at=now))
                    job: Job | None = None
                    if data.job is not None and data.kind is not Kind.HEALTH:
                        job = self.tracker.get(data.provider, data.job)
                    if job is not None:
                        job.seq = seq
                        append = Append(seq, now, body, job.key, json_encoder.encode(job), job.status.terminal)
                    else:
                        append = Append(seq, now, body)
                    self.stats.emitted[data.provider] += 1
                    await self._send.send((append, Item(seq, body, data)))

    def _restore(self, provider: str, job: str) -> None:
        """A job the tracker no longer caches (finished long ago): its row decides duplicates.
        A single indexed read; only new or long-finished jobs get here."""
        known, _ = self.journal.job(provider, job)
        if known is not None:
            self.tracker.restore([known])

    async def writer(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Append batches to the journal, then publish them. On cancellation, flush what is queued
        (time-boxed, shielded) so a clean stop loses nothing."""
        task_status.started()
        try:
            while True:
                batch = [await self._recv.receive()]
                self._drain_into(batch)
                await self._write(batch)
        finally:
            with anyio.move_on_after(5, shield=True):
                rest: list[tuple[Append, Item]] = []
                self._drain_into(rest, limit=QUEUE)
                if rest:
                    await self._write(rest, retry=False)

    def _drain_into(self, batch: list[tuple[Append, Item]], limit: int = BATCH) -> None:
        while len(batch) < limit:
            try:
                batch.append(self._recv.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _write(self, batch: list[tuple[Append, Item]], *, retry: bool = True) -> None:
        appends = [a for a, _ in batch]
        policy = Reconnector(initial=0.5, maximum=30.0, healthy_after=0.0)
        while True:
            try:
                await anyio.to_thread.run_sync(self.journal.append, appends, limiter=self._db)
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
        self.written_seq = appends[-1].seq
        self._written.set()
        self._written = anyio.Event()
        self.bus.publish([item for _, item in batch])

    async def sync(self) -> None:
        """Wait until everything emitted so far is journaled (read-your-writes for requests)."""
        target = self.next_seq - 1
        while self.written_seq < target:
            await self._written.wait()
