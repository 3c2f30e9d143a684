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
    body BLOB NOT NULL  -- the bodies back to back
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
        row = self._w.execute("SELECT MIN(first), MAX(last) FROM chunks").fetchone()
        self.last_seq: int = row[1] or int(self._meta("last_seq") or 0)
        self.oldest: int = row[0] or self.last_seq + 1
        self._appends_since_trim = 0
        self._unsaved: dict[tuple[str, str], bytes] = {}  # follow-up data `remember` could not write yet

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
        bodies = list(map(_BODY, batch))
        chunk = (
            first,
            first + n - 1,
            batch[-1].time,
            array("d", map(_TIME, batch)).tobytes(),
            array("q", itertools.accumulate(map(len, bodies))).tobytes(),
            b"".join(bodies),
        )
        # a job's last row in the batch is the one that counts
        jobs = {a.job_key: a for a in batch if a.job_key is not None and a.job_body is not None}
        with self._wlock:
            try:
                self._w.execute("BEGIN IMMEDIATE")
                self._w.execute(_CHUNK, chunk)
                if jobs:
                    _insert_rows(
                        self._w, _JOBS, [(k[0], k[1], int(a.terminal), a.time, a.job_body) for k, a in jobs.items()]
                    )
                if self._unsaved:
                    self._w.executemany(_REMEMBER, [(p, j, time.time(), b"", f) for (p, j), f in self._unsaved.items()])
                self._w.execute("COMMIT")
                self._unsaved.clear()
                self._unchecked += len(chunk[5])
            except sqlite3.Error as exc:
                if self._w.in_transaction:
                    self._w.execute("ROLLBACK")
                raise JournalError(f"journal {self.path}: write failed: {exc}") from None
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

    def _trim(self, now: float | None = None) -> int:
        self._appends_since_trim = 0
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
            (removed,) = w.execute(
                "SELECT COALESCE(SUM(last - first + 1), 0) FROM chunks WHERE last <= ?", (upto,)
            ).fetchone()
            w.execute("DELETE FROM chunks WHERE last <= ?", (upto,))
            cut = w.execute("SELECT first, last, times, ends, body FROM chunks WHERE first <= ?", (upto,)).fetchone()
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
            rows = self._r.execute("SELECT first, ends, body FROM chunks WHERE last > ? ORDER BY first", (seq,))
            try:
                for first, ends, body in rows:  # (stepped one chunk at a time: a chunk can hold thousands)
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
        with self._rlock:
            self._r.execute("BEGIN")
            try:
                row = self._r.execute("SELECT MAX(last) FROM chunks").fetchone()
                seq = row[0] if row[0] is not None else int(self._meta_r("last_seq") or 0)
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
        with self._rlock:
            rows = self._r.execute("SELECT provider, job, body, follow FROM jobs WHERE terminal = 0").fetchall()
        out = []
        for provider, job, body, follow in rows:
            parsed = job_decoder.decode(body) if body else None
            out.append((parsed, bytes(follow) if follow else None, str(provider), str(job)))
        return out

    def job(self, provider: str, job: str) -> tuple[Job | None, bytes | None]:
        with self._rlock:
            row = self._r.execute(
                "SELECT body, follow FROM jobs WHERE provider = ? AND job = ?", (provider, job)
            ).fetchone()
        if row is None:
            return None, None
        body, follow = row
        return (job_decoder.decode(body) if body else None), (bytes(follow) if follow else None)

    def jobs_by_id(self, provider: str, jobs: Iterable[str]) -> dict[str, Job]:
        """The stored rows of several of one provider's jobs, in one indexed read per 500 ids."""
        ids = list(jobs)
        out: dict[str, Job] = {}
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
        sql = "SELECT body FROM jobs WHERE body != x''"
        if active:
            sql += " AND terminal = 0"
        sql += " ORDER BY updated DESC LIMIT ?"
        with self._rlock:
            rows = self._r.execute(sql, (limit,)).fetchall()
        return [job_decoder.decode(b) for (b,) in rows]

    def iter_jobs(self, batch: int = 5000) -> Iterable[Job]:
        """Every job, newest first, a batch at a time (for filtered `jobs` over big stores)."""
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
        with self._rlock:
            total, live = self._r.execute(
                "SELECT COUNT(*), COALESCE(SUM(terminal = 0), 0) FROM jobs WHERE body != x''"
            ).fetchone()
        return int(total), int(live)

    def close(self) -> None:
        with self._wlock, self._rlock, self._clock:
            for conn in (self._r, self._c, self._w):
                with contextlib.suppress(sqlite3.Error):
                    conn.close()


# Rows go in as multi-row `INSERT ... VALUES (...), (...)` statements: Python's sqlite3 lets go of the
# GIL around every sqlite3_step, and getting it back from a busy event loop can take the whole switch
# interval (5 ms). With one step per row (executemany) the writer queued for the GIL once per row; with
# 999-parameter statements still ~35 times per 4,096-event batch, which made the journal the bottleneck.
# Statements come in a few fixed sizes (powers of 4 rows, as large as the build's parameter limit
# allows) so that SQLite's statement cache keeps them prepared: a full batch is one step per table.
_CHUNK = "INSERT INTO chunks (first, last, time, times, ends, body) VALUES (?, ?, ?, ?, ?, ?)"
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
    """A journal from before chunks kept a row per event (`events`): its events move into chunks of
    up to 1,024, in one transaction, the first time this version opens it."""
    if w.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is None:
        return
    w.execute("BEGIN IMMEDIATE")
    try:
        rows = w.execute("SELECT seq, time, body FROM events ORDER BY seq")
        run: list[tuple[int, float, bytes]] = []

        def flush() -> None:
            bodies = [bytes(b) for _, _, b in run]
            w.execute(
                _CHUNK,
                (
                    run[0][0],
                    run[-1][0],
                    run[-1][1],
                    array("d", (t for _, t, _ in run)).tobytes(),
                    array("q", itertools.accumulate(map(len, bodies))).tobytes(),
                    b"".join(bodies),
                ),
            )
            run.clear()

        for seq, at, body in rows:  # (stepped: a journal of a million events does not fit in memory)
            if run and (seq != run[-1][0] + 1 or len(run) >= 1024):
                flush()
            run.append((int(seq), float(at), body))
        if run:
            flush()
        w.execute("DROP TABLE events")
        w.execute("COMMIT")
    except BaseException:
        w.execute("ROLLBACK")
        raise


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
