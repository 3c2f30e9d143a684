"""The journal: every event, appended before anyone sees it, plus the job store.

SQLite in WAL mode. One writer connection, used by one worker thread at a time; readers get
their own connection so catch-up and snapshots never wait for a write. Events are stored as the
exact CloudEvent bytes served on the feed, so replay costs no re-encoding, and a batch of events is
one row (a chunk: the bodies back to back, with their end offsets and times beside them). A row per
event cost SQLite and the kernel ~4 µs an event more in the firehose (page headers, cell pointers and
a B-tree entry per event), and nothing reads one event alone: catch-up reads a run of seqs.

The epoch is a random id made when the journal is created: a client holding a seq from another
epoch knows its cursor means nothing here.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import operator
import secrets
import sqlite3
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgspec

from streamd.events import EventData, Job, job_decoder

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    first INTEGER PRIMARY KEY,  -- the seq of its first event; the events in it have every seq up to `last`
    last INTEGER NOT NULL,
    time REAL NOT NULL,  -- its newest event's time
    times BLOB NOT NULL,  -- each event's time: float64s, native byte order
    ends BLOB NOT NULL,  -- where each event's body ends in `body`: int64s, native byte order
    body BLOB NOT NULL,  -- the bodies back to back
    jobs BLOB  -- the job rows the batch left behind (msgpack), what rebuilds the job store after a crash
);
CREATE TABLE IF NOT EXISTS jobs (
    provider TEXT NOT NULL,
    job TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    updated REAL NOT NULL,
    body BLOB NOT NULL,
    follow BLOB,
    PRIMARY KEY (provider, job)
);
CREATE INDEX IF NOT EXISTS jobs_live ON jobs (terminal, updated);
"""


_REMEMBER = (
    "INSERT INTO jobs (provider, job, terminal, updated, body, follow) VALUES (?, ?, 0, ?, ?, ?) "
    "ON CONFLICT (provider, job) DO UPDATE SET follow = excluded.follow"
)


class JournalError(Exception):
    """The journal cannot be written or read; the message says where and why."""


class Append(NamedTuple):
    """One event to write, with the job row it leaves behind (None for health events). The pipeline
    publishes the same object once it is written: `data` is for the bus's filters, not stored.
    (A named tuple: immutable, and built several times faster than a frozen dataclass.)"""

    seq: int
    time: float
    body: bytes
    job_key: tuple[str, str] | None = None
    job_body: bytes | None = None
    terminal: bool = False
    data: EventData | None = None


@dataclass(frozen=True)
class Retention:
    max_events: int = 1_000_000
    max_age: float = 30 * 86400.0


# The job store follows the events at a distance: job rows are written in bulk, at most JOBS_EVERY
# seconds or JOBS_MOST rows after their events (and before any read of the store). One row per job per
# 1,024-event transaction dirtied a page of the (provider, job) index per job when ids are random, as
# real providers' are: ~2.8 KB of WAL an event. The rows also ride in their events' chunk, so a crash
# loses none of them: opening the journal writes what the chunks after `jobs_seq` left behind.
JOBS_EVERY = 1.0
JOBS_MOST = 16384
WAL_KEEP = 64 << 20  # bytes of WAL file kept after it starts over (more is truncated)
WAL_BACKSTOP = 64 << 20  # event bytes appended with no checkpoint before the writer checkpoints itself
CHECKPOINT_EVERY = 0.5  # seconds between the pipeline's checkpoints (Pipeline.checkpointer)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process crashes
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA secure_delete=FAST")  # overwritten credentials are zeroed, not left in the page
    return conn


class Journal:
    """Blocking API; call it from a worker thread (the daemon does, through anyio.to_thread)."""

    def __init__(self, path: Path, retention: Retention | None = None) -> None:
        self.path = path
        self.retention = retention or Retention()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._w = _connect(path)
            self._w.executescript(SCHEMA)
            # The writer never checkpoints inside a commit (that made the events behind it wait: the
            # p99 latency); `checkpoint()` does it on a connection of its own, beside the writer.
            self._w.execute("PRAGMA wal_autocheckpoint=0")
            self._w.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")
            _migrate(self._w)
            if "jobs" not in {r[1] for r in self._w.execute("PRAGMA table_info(chunks)")}:  # (chunks before it)
                self._w.execute("ALTER TABLE chunks ADD COLUMN jobs BLOB")
            self._r = _connect(path)
            self._c = _connect(path)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {path}: cannot open: {exc}") from None
        except OSError as exc:
            raise JournalError(f"journal {path}: cannot create its folder: {exc.strerror}") from None
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._clock = threading.Lock()
        self._unchecked = 0  # bytes of events appended since the last checkpoint (about the WAL's growth)
        self.wal_backstop = WAL_BACKSTOP
        self.epoch = self._meta("epoch") or self._new_epoch()
        oldest, newest = self._bounds(self._w)
        self.last_seq: int = newest or int(self._meta("last_seq") or 0)
        self.oldest: int = oldest or self.last_seq + 1
        self._appends_since_trim = 0
        self._unsaved: dict[tuple[str, str], bytes] = {}  # follow-up data `remember` could not write yet
        # Job rows not written to the store yet (the newest per job), and since when.
        self._dirty: dict[tuple[str, str], JobRow] = {}
        self._dirty_since = 0.0
        stored = self._meta("jobs_seq")  # the store is complete up to this seq
        if stored is None:  # a new journal, or one from before rows were held back (its store is complete)
            self._w.execute("INSERT OR REPLACE INTO meta VALUES ('jobs_seq', ?)", (str(self.last_seq),))
        self.jobs_seq = int(stored) if stored is not None else self.last_seq
        if self.jobs_seq < self.last_seq:
            self._recover_jobs()

    @staticmethod
    def _bounds(conn: sqlite3.Connection) -> tuple[int | None, int | None]:
        """The oldest and newest seq held (None, None when empty), through the primary key."""
        oldest = conn.execute("SELECT first FROM chunks ORDER BY first LIMIT 1").fetchone()
        newest = conn.execute("SELECT last FROM chunks ORDER BY first DESC LIMIT 1").fetchone()
        return (oldest[0] if oldest else None), (newest[0] if newest else None)

    # -- meta --------------------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._w.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _new_epoch(self) -> str:
        epoch = secrets.token_hex(8)
        self._w.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (epoch,))
        self._w.execute("INSERT OR REPLACE INTO meta VALUES ('created', ?)", (str(time.time()),))
        return epoch

    def get_meta(self, key: str) -> str | None:
        with self._wlock:
            return self._meta(key)

    def set_meta(self, key: str, value: str) -> None:
        with self._wlock:
            self._w.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- writing ---------------------------------------------------------------------------------
    def append(self, batch: Sequence[Append]) -> None:
        """Write a batch in one transaction; on failure nothing of it is written. Its seqs follow one
        another, after every seq the journal holds (the pipeline's seqs are gap-free and in order)."""
        if not batch:
            return
        first, n = batch[0].seq, len(batch)
        if first <= self.last_seq or not all(map(operator.eq, map(_SEQ, batch), range(first, first + n))):
            raise JournalError(
                f"journal {self.path}: write failed: "
                f"seqs {first}..{batch[-1].seq} do not follow {self.last_seq} one by one"
            )
        # a job's last row in the batch is the one that counts
        jobs: dict[tuple[str, str], JobRow] = {
            a.job_key: (a.job_key[0], a.job_key[1], int(a.terminal), a.time, a.job_body)
            for a in batch
            if a.job_key is not None and a.job_body is not None
        }
        chunk = _chunk_row(
            first,
            array("d", map(_TIME, batch)),
            list(map(_BODY, batch)),
            _rows_encoder.encode(list(jobs.values())) if jobs else None,
        )
        with self._wlock:
            now = time.monotonic()
            dirty = self._dirty
            store = len(dirty) + len(jobs) >= JOBS_MOST or (bool(dirty) and now - self._dirty_since >= JOBS_EVERY)
            try:
                self._w.execute("BEGIN IMMEDIATE")
                self._w.execute(_CHUNK, chunk)
                if store:
                    self._store_jobs({**dirty, **jobs}, batch[-1].seq)
                if self._unsaved:
                    self._w.executemany(_REMEMBER, [(p, j, time.time(), b"", f) for (p, j), f in self._unsaved.items()])
                self._w.execute("COMMIT")
                self._unsaved.clear()
                self._unchecked += len(chunk[5]) + len(chunk[6] or b"")
            except sqlite3.Error as exc:
                if self._w.in_transaction:
                    self._w.execute("ROLLBACK")
                raise JournalError(f"journal {self.path}: write failed: {exc}") from None
            if store:
                dirty.clear()
                self.jobs_seq = batch[-1].seq
            elif jobs:
                if not dirty:
                    self._dirty_since = now
                dirty.update(jobs)
            self.last_seq = batch[-1].seq
            if self.oldest > first:
                self.oldest = first
            self._appends_since_trim += n
            if self._unchecked > self.wal_backstop:
                # Nobody is checkpointing (a journal used on its own), or not fast enough: do it here,
                # so the WAL stays bounded whatever runs the journal.
                with contextlib.suppress(JournalError):
                    self.checkpoint()
            if self._appends_since_trim >= 10_000:
                # The batch is committed: a failed trim (a DELETE needs WAL room a full disk may lack)
                # must not report it as failed, or it is retried and collides on its seqs for ever.
                with contextlib.suppress(JournalError):
                    self._trim()

    def trim(self, now: float | None = None) -> int:
        """Apply retention now; returns the number of events removed."""
        with self._wlock:
            return self._trim(now)

    # -- the job store -------------------------------------------------------------------------------
    def flush_jobs(self) -> None:
        """Write the job rows still held back (the pipeline's checkpointer does, after writes; every read
        of the store does first)."""
        with self._wlock:
            self._flush_jobs()

    def _flush_jobs(self) -> None:
        if not self._dirty and self.jobs_seq >= self.last_seq:
            return
        try:
            self._w.execute("BEGIN IMMEDIATE")
            self._store_jobs(self._dirty, self.last_seq)  # (none held back: the seq alone moves on)
            self._w.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._w.in_transaction:
                self._w.execute("ROLLBACK")
            raise JournalError(f"journal {self.path}: write failed: {exc}") from None
        self._dirty.clear()
        self.jobs_seq = self.last_seq

    def _store_jobs(self, rows: dict[tuple[str, str], JobRow], seq: int) -> None:
        """Inside a write transaction: the rows, in key order (neighbours share index pages), and the seq
        the store is now complete up to."""
        _insert_rows(self._w, _JOBS, [rows[k] for k in sorted(rows)])
        self._w.execute("INSERT OR REPLACE INTO meta VALUES ('jobs_seq', ?)", (str(seq),))

    def _recover_jobs(self) -> None:
        """After a crash: the job rows of the chunks after `jobs_seq`, the newest per job, into the store
        (held back, as if just appended, and written)."""
        for (blob,) in self._w.execute(
            "SELECT jobs FROM chunks WHERE first > ? AND jobs IS NOT NULL ORDER BY first", (self.jobs_seq,)
        ):
            self._dirty.update(((row[0], row[1]), row) for row in _rows_decoder.decode(blob))
        self._flush_jobs()

    def _trim(self, now: float | None = None) -> int:
        self._appends_since_trim = 0
        self._flush_jobs()  # the chunks about to go may hold the only copy of some job rows
        cutoff_seq = self.last_seq - self.retention.max_events
        cutoff_time = (time.time() if now is None else now) - self.retention.max_age
        w = self._w
        try:
            # Events are appended in time order, so the expired ones are the oldest: walk the chunks from
            # the oldest to the first whose newest event is still young enough (and delete a prefix)
            # instead of reading every row's time, which made each trim cost the whole journal.
            row = w.execute(
                "SELECT first, times FROM chunks WHERE time >= ? ORDER BY first LIMIT 1", (cutoff_time,)
            ).fetchone()
            young = row[0] + bisect.bisect_left(_floats(row[1]), cutoff_time) if row is not None else self.last_seq + 1
            upto = max(cutoff_seq, young - 1)  # every event up to this seq goes
            # The newest seq is MAX(last) of the chunks kept; only a trim can leave none, so it saves the
            # newest seq beside its delete (each append saving it cost a page write per commit).
            w.execute("BEGIN IMMEDIATE")
            w.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)", (str(self.last_seq),))
            # (`first <= ?` first: the primary key bounds every scan to the chunks that go)
            (removed,) = w.execute(
                "SELECT COALESCE(SUM(last - first + 1), 0) FROM chunks WHERE first <= ? AND last <= ?", (upto, upto)
            ).fetchone()
            w.execute("DELETE FROM chunks WHERE first <= ? AND last <= ?", (upto, upto))
            cut = w.execute(
                "SELECT first, last, times, ends, body FROM chunks WHERE first <= ? ORDER BY first LIMIT 1", (upto,)
            ).fetchone()
            if cut is not None:  # the chunk the line runs through keeps its newer part
                first, last, times, ends, body = cut
                keep = upto + 1 - first
                offsets = array("q", ends)
                start = offsets[keep - 1]
                w.execute("DELETE FROM chunks WHERE first = ?", (first,))
                w.execute(
                    _CHUNK,
                    (
                        upto + 1,
                        last,
                        _floats(times)[-1],
                        times[keep * 8 :],
                        array("q", (e - start for e in offsets[keep:])).tobytes(),
                        body[start:],
                        None,  # (the job store was brought up to date before the trim)
                    ),
                )
                removed += keep
            w.execute("COMMIT")
            row = w.execute("SELECT MIN(first) FROM chunks").fetchone()
        except sqlite3.Error as exc:
            if w.in_transaction:
                w.execute("ROLLBACK")
            raise JournalError(f"journal {self.path}: retention failed: {exc}") from None
        self.oldest = row[0] if row[0] is not None else self.last_seq + 1
        return int(removed)

    def checkpoint(self) -> int:
        """Copy the WAL's committed pages into the database file (PASSIVE: never waits for, nor holds up,
        the writer or readers); returns the WAL frames it still holds. Once every frame is copied, the
        next commit starts the WAL from its beginning again."""
        with self._clock:
            try:
                _, frames, done = self._c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: checkpoint failed: {exc}") from None
            self._unchecked = 0
        return max(0, int(frames) - int(done))

    def remember(self, provider: str, job: str, follow: bytes) -> None:
        """Store what is needed to keep following a job (credentials included: never served).

        If the journal cannot be written now (disk full, read-only), it is kept and written with the
        next batch of events that goes in, as the pipeline holds its events: the provider goes on
        following the job meanwhile, and a submit is not failed for it."""
        with self._wlock:
            try:
                self._w.execute(_REMEMBER, (provider, job, time.time(), b"", follow))
            except sqlite3.Error:
                self._unsaved[(provider, job)] = follow
            else:
                self._unsaved.pop((provider, job), None)  # an older one held back must not overwrite it

    # -- reading ---------------------------------------------------------------------------------
    def read_after(self, seq: int, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Up to `limit` events after `seq`, in order: (seq, body)."""
        out: list[tuple[int, bytes]] = []
        with self._rlock:
            rows = self._r.execute(  # from the chunk holding seq + 1, through the primary key
                "SELECT first, last, ends, body FROM chunks WHERE first >= "
                "COALESCE((SELECT first FROM chunks WHERE first <= ? ORDER BY first DESC LIMIT 1), 0) ORDER BY first",
                (seq + 1,),
            )
            try:
                for first, last, ends, body in rows:  # (stepped one chunk at a time: a chunk can hold thousands)
                    if last <= seq:
                        continue
                    offsets = array("q", ends)
                    skip = max(0, seq + 1 - first)
                    start = offsets[skip - 1] if skip else 0
                    for i in range(skip, min(len(offsets), skip + limit - len(out))):
                        end = offsets[i]
                        out.append((first + i, bytes(body[start:end])))
                        start = end
                    if len(out) >= limit:
                        break
            finally:
                rows.close()
        return out

    def snapshot(self, *, finished: int = 1000) -> tuple[int, list[Job]]:
        """Jobs as of one seq, read in one transaction: every unfinished job and the most recently
        updated `finished` ones. Returns (seq, jobs)."""
        self.flush_jobs()
        with self._rlock:
            self._r.execute("BEGIN")
            try:
                # the seq the store is complete up to, written with the rows: the two agree
                seq = int(self._meta_r("jobs_seq") or 0)
                live = self._r.execute("SELECT body FROM jobs WHERE terminal = 0 AND body != x''").fetchall()
                done = self._r.execute(
                    "SELECT body FROM jobs WHERE terminal = 1 ORDER BY updated DESC LIMIT ?", (finished,)
                ).fetchall()
            finally:
                self._r.execute("COMMIT")
        jobs = [job_decoder.decode(b) for (b,) in (*live, *done)]
        return int(seq), jobs

    def _meta_r(self, key: str) -> str | None:
        row = self._r.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def unfinished(self) -> list[tuple[Job | None, bytes | None, str, str]]:
        """Every unfinished job with its follow-up data: what a restarted daemon resumes."""
        self.flush_jobs()
        with self._rlock:
            rows = self._r.execute("SELECT provider, job, body, follow FROM jobs WHERE terminal = 0").fetchall()
        out = []
        for provider, job, body, follow in rows:
            parsed = job_decoder.decode(body) if body else None
            out.append((parsed, bytes(follow) if follow else None, str(provider), str(job)))
        return out

    def job(self, provider: str, job: str) -> tuple[Job | None, bytes | None]:
        held = self._dirty.get((provider, job))
        with self._rlock:
            row = self._r.execute(
                "SELECT body, follow FROM jobs WHERE provider = ? AND job = ?", (provider, job)
            ).fetchone()
        body, follow = row if row is not None else (None, None)
        if held is not None:  # newer than the store's row
            body = held[4]
        return (job_decoder.decode(body) if body else None), (bytes(follow) if follow else None)

    def jobs_by_id(self, provider: str, jobs: Iterable[str]) -> dict[str, Job]:
        """The stored rows of several of one provider's jobs, in one indexed read per 500 ids."""
        ids = list(jobs)
        out: dict[str, Job] = {}
        # Rows held back, looked at before the store: one written and let go meanwhile is in the store then.
        dirty = self._dirty
        held = {job: row for job in ids if (row := dirty.get((provider, job))) is not None} if dirty else {}
        with self._rlock:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows = self._r.execute(
                    f"SELECT job, body FROM jobs WHERE provider = ? AND job IN ({','.join('?' * len(chunk))})",
                    (provider, *chunk),
                ).fetchall()
                for job, body in rows:
                    if body:
                        out[str(job)] = job_decoder.decode(body)
        for job, row in held.items():  # newer than the store's
            out[job] = job_decoder.decode(row[4])
        return out

    def job_keys(self) -> Iterable[tuple[str, str]]:
        """Every stored job's key, a batch at a time (what the pipeline's key filter starts from)."""
        last = ("", "")
        while True:
            with self._rlock:
                rows = self._r.execute(
                    "SELECT provider, job FROM jobs WHERE (provider, job) > (?, ?) ORDER BY provider, job LIMIT 10000",
                    last,
                ).fetchall()
            if not rows:
                return
            yield from ((str(p), str(j)) for p, j in rows)
            last = rows[-1]

    def jobs(self, *, active: bool = False, limit: int = 1000) -> list[Job]:
        self.flush_jobs()
        sql = "SELECT body FROM jobs WHERE body != x''"
        if active:
            sql += " AND terminal = 0"
        sql += " ORDER BY updated DESC LIMIT ?"
        with self._rlock:
            rows = self._r.execute(sql, (limit,)).fetchall()
        return [job_decoder.decode(b) for (b,) in rows]

    def iter_jobs(self, batch: int = 5000) -> Iterable[Job]:
        """Every job, newest first, a batch at a time (for filtered `jobs` over big stores)."""
        self.flush_jobs()
        offset = 0
        while True:
            with self._rlock:
                rows = self._r.execute(
                    "SELECT body FROM jobs WHERE body != x'' ORDER BY updated DESC LIMIT ? OFFSET ?", (batch, offset)
                ).fetchall()
            if not rows:
                return
            yield from (job_decoder.decode(b) for (b,) in rows)
            offset += batch

    def counts(self) -> tuple[int, int]:
        self.flush_jobs()
        with self._rlock:
            total, live = self._r.execute(
                "SELECT COUNT(*), COALESCE(SUM(terminal = 0), 0) FROM jobs WHERE body != x''"
            ).fetchone()
        return int(total), int(live)

    def close(self) -> None:
        with self._wlock, self._rlock, self._clock:
            with contextlib.suppress(JournalError):
                self._flush_jobs()  # (or the next start writes them from the chunks)
            for conn in (self._r, self._c, self._w):
                with contextlib.suppress(sqlite3.Error):
                    conn.close()


# Rows go in as multi-row `INSERT ... VALUES (...), (...)` statements: Python's sqlite3 lets go of the
# GIL around every sqlite3_step, and getting it back from a busy event loop can take the whole switch
# interval (5 ms). With one step per row (executemany) the writer queued for the GIL once per row; with
# 999-parameter statements still ~35 times per 4,096-event batch, which made the journal the bottleneck.
# Statements come in a few fixed sizes (powers of 4 rows, as large as the build's parameter limit
# allows) so that SQLite's statement cache keeps them prepared: a full batch is one step per table.
_CHUNK = "INSERT INTO chunks (first, last, time, times, ends, body, jobs) VALUES (?, ?, ?, ?, ?, ?, ?)"
JobRow = tuple[str, str, int, float, bytes]  # provider, job, terminal, updated, body: a row of `jobs`
_rows_encoder = msgspec.msgpack.Encoder()
_rows_decoder = msgspec.msgpack.Decoder(list[JobRow])
_JOBS = (
    "INSERT INTO jobs (provider, job, terminal, updated, body) VALUES ",
    "(?, ?, ?, ?, ?)",
    " ON CONFLICT (provider, job) DO UPDATE SET terminal = excluded.terminal, "
    "updated = excluded.updated, body = excluded.body, "
    # A finished job needs no follow-up data, and it may hold credentials (a Wiro task token): drop it.
    "follow = CASE WHEN excluded.terminal THEN NULL ELSE follow END",
    5,
)
_MOST_ROWS = 4096
_SEQ = operator.itemgetter(0)  # Append's fields, read in C loops
_TIME = operator.itemgetter(1)
_BODY = operator.itemgetter(2)


def _floats(raw: bytes) -> array[float]:
    return array("d", raw)


def _migrate(w: sqlite3.Connection) -> None:
    """A journal from before chunks kept a row per event (`events`): the first time this version opens
    it, its events move into chunks of up to 1,024, oldest first, MIGRATE_STEP events a transaction, each
    step deleting what it moved and checkpointing: the freed pages take the next step's chunks, so the
    file and the WAL stay about the journal's size, and a step cut short by a crash is taken up again at
    the next start."""
    while w.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is not None:
        w.execute("BEGIN IMMEDIATE")
        try:
            rows = w.execute("SELECT seq, time, body FROM events ORDER BY seq LIMIT ?", (MIGRATE_STEP,)).fetchall()
            if rows:
                _move_events(w, rows)
                w.execute("DELETE FROM events WHERE seq <= ?", (rows[-1][0],))
            else:
                w.execute("DROP TABLE events")
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        w.execute("PRAGMA wal_checkpoint(TRUNCATE)")


MIGRATE_STEP = 65536


ChunkRow = tuple[int, int, float, bytes, bytes, bytes, bytes | None]  # the columns of `chunks`, in order


def _chunk_row(first: int, times: array[float], bodies: list[bytes], jobs: bytes | None) -> ChunkRow:
    """The `chunks` row of consecutive events from seq `first`: their times and bodies, and the job rows."""
    return (
        first,
        first + len(bodies) - 1,
        times[-1],
        times.tobytes(),
        array("q", itertools.accumulate(map(len, bodies))).tobytes(),
        b"".join(bodies),
        jobs,
    )


def _move_events(w: sqlite3.Connection, rows: list[tuple[int, float, bytes]]) -> None:
    run: list[tuple[int, float, bytes]] = []

    def flush() -> None:
        times = array("d", (t for _, t, _ in run))
        # (its job rows are in the store already)
        w.execute(_CHUNK, _chunk_row(run[0][0], times, [bytes(b) for _, _, b in run], None))
        run.clear()

    for seq, at, body in rows:
        if run and (seq != run[-1][0] + 1 or len(run) >= 1024):
            flush()
        run.append((int(seq), float(at), body))
    if run:
        flush()


@functools.lru_cache(maxsize=64)
def _statement(head: str, row: str, tail: str, rows: int) -> str:
    return head + ", ".join([row] * rows) + tail


@functools.lru_cache(maxsize=8)
def _sizes(width: int, limit: int) -> tuple[int, ...]:
    """Statement sizes in rows, largest first: powers of 4 up to what `limit` parameters allow."""
    most = min(_MOST_ROWS, max(1, limit // width))
    sizes = [1]
    while sizes[-1] * 4 <= most:
        sizes.append(sizes[-1] * 4)
    return tuple(reversed(sizes))


def _insert_rows(conn: sqlite3.Connection, sql: tuple[str, str, str, int], rows: Sequence[tuple[object, ...]]) -> None:
    head, row, tail, width = sql
    i, n = 0, len(rows)
    for size in _sizes(width, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)):
        while n - i >= size:
            conn.execute(_statement(head, row, tail, size), list(itertools.chain.from_iterable(rows[i : i + size])))
            i += size


def encode_follow(follow: dict[str, str]) -> bytes:
    return msgspec.json.encode(follow)


def decode_follow(raw: bytes | None) -> dict[str, str]:
    if not raw:
        return {}
    try:
        value = msgspec.json.decode(raw, type=dict[str, str])
    except msgspec.DecodeError:
        return {}
    return value
