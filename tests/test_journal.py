from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamd.events import Job, State, json_encoder
from streamd.journal import Append, Journal, JournalError, Retention, decode_follow, encode_follow


def batch(start: int, n: int, t: float = 1000.0) -> list[Append]:
    out = []
    for seq in range(start, start + n):
        job = Job(provider="oxen", job=f"j{seq % 3}", status=State.RUNNING if seq % 2 else State.COMPLETED, seq=seq)
        out.append(Append(seq, t + seq, b'{"seq":%d}' % seq, job.key, json_encoder.encode(job), job.status.terminal))
    return out


def test_append_read_and_restart_keep_seq_and_epoch(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    epoch = j.epoch
    j.append(batch(1, 10))
    assert [s for s, _ in j.read_after(4, 3)] == [5, 6, 7]
    j.close()
    again = Journal(tmp_path / "j.db")
    assert (again.epoch, again.last_seq, again.oldest) == (epoch, 10, 1)
    assert again.read_after(9, 10) == [(10, b'{"seq":10}')]


def test_new_journal_has_new_epoch(tmp_path: Path) -> None:
    assert Journal(tmp_path / "a.db").epoch != Journal(tmp_path / "b.db").epoch


def test_failed_batch_writes_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.append(batch(1, 5))
    with pytest.raises(JournalError, match="write failed"):
        j.append(batch(6, 3) + batch(5, 1))  # seq 5 again: the whole batch must roll back
    assert j.last_seq == 5 and j.read_after(5, 10) == []


def test_retention_by_count_and_age_moves_oldest(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", Retention(max_events=4, max_age=1e9))
    j.append(batch(1, 10, t=time.time()))
    assert j.trim() == 6 and j.oldest == 7
    j2 = Journal(tmp_path / "k.db", Retention(max_events=10**9, max_age=100.0))
    j2.append(batch(1, 10, t=1000.0))  # times 1001..1010
    assert j2.trim(now=1105.5) == 5 and j2.oldest == 6
    j2.close()
    assert Journal(tmp_path / "k.db").oldest == 6  # known after a restart too


def test_empty_journal_after_full_trim_keeps_seq_going(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", Retention(max_events=0, max_age=1e9))
    j.append(batch(1, 3, t=time.time()))
    j.trim()
    j.close()
    again = Journal(tmp_path / "j.db")
    assert again.last_seq == 3 and again.oldest == 4


def test_snapshot_is_jobs_at_one_seq(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.append(batch(1, 6))
    seq, jobs = j.snapshot()
    assert seq == 6
    assert {job.job: job.seq for job in jobs} == {"j0": 6, "j1": 4, "j2": 5}


def test_follow_data_survives_and_is_not_in_job_bodies(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.remember("wiro", "2221", encode_follow({"token": "s3cret-token"}))
    j.append(
        [
            Append(
                1,
                1.0,
                b"{}",
                ("wiro", "2221"),
                json_encoder.encode(Job(provider="wiro", job="2221", status=State.QUEUED)),
                False,
            )
        ]
    )
    j.close()
    again = Journal(tmp_path / "j.db")
    [(job, follow, provider, job_id)] = again.unfinished()
    assert (provider, job_id) == ("wiro", "2221") and job is not None and job.status is State.QUEUED
    assert decode_follow(follow) == {"token": "s3cret-token"}
    assert all(b"s3cret" not in json_encoder.encode(x) for x in again.jobs())


def test_unopenable_journal_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(JournalError, match=r"cannot create its folder|cannot open"):
        Journal(tmp_path / "file" / "j.db")


def _wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_stays_bounded_with_or_without_a_checkpointer(tmp_path: Path) -> None:
    """The writer never checkpoints inside a commit; `checkpoint()` (the pipeline's task) lets the WAL
    start over, and with nobody calling it the writer's own backstop does."""
    body = b"x" * 1000
    path = tmp_path / "j.db"
    j = Journal(path)
    seq = 0

    def write(megabytes: int) -> None:
        nonlocal seq
        for _ in range(megabytes):
            j.append([Append(seq + i + 1, 1000.0, body) for i in range(1000)])
            seq += 1000

    j.wal_backstop = 1 << 60  # no backstop: only checkpoint() bounds the WAL
    write(8)
    grown = _wal_bytes(path)
    assert grown > 8_000_000  # nothing checkpointed inside the commits
    assert j.checkpoint() == 0  # everything copied
    write(2)
    assert _wal_bytes(path) <= grown  # it started over instead of growing

    j.close()
    other = tmp_path / "k.db"  # a fresh WAL, with the backstop on: it checkpoints every MiB or so
    j = Journal(other)
    j.wal_backstop = 1 << 20
    first = seq + 1
    write(8)
    assert _wal_bytes(other) < 4_000_000
    assert j.read_after(first - 1, 1)[0][0] == first and j.last_seq == seq  # nothing lost on the way
    j.close()


def test_reads_run_across_chunks_from_any_seq(tmp_path: Path) -> None:
    """A batch is one row: a read may start in the middle of one and end in the middle of another."""
    j = Journal(tmp_path / "j.db")
    for start, n in ((1, 3), (4, 1), (5, 6), (11, 2)):
        j.append(batch(start, n))
    everything = [(s, b'{"seq":%d}' % s) for s in range(1, 13)]
    for after in range(13):
        for limit in (1, 2, 5, 100):
            assert j.read_after(after, limit) == everything[after : after + limit], (after, limit)


def test_a_batch_whose_seqs_do_not_follow_on_is_refused_whole(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.append(batch(1, 3))
    for bad in (batch(5, 2) + batch(4, 1), batch(4, 1) + batch(6, 1), batch(3, 2)):
        with pytest.raises(JournalError, match="do not follow 3"):
            j.append(bad)
    j.append(batch(4, 2))
    assert [s for s, _ in j.read_after(0, 10)] == [1, 2, 3, 4, 5]


def test_trim_through_the_middle_of_chunks_keeps_their_newer_events(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", Retention(max_events=5, max_age=1e9))
    j.append(batch(1, 4, t=time.time()))
    j.append(batch(5, 4, t=time.time()))
    assert j.trim() == 3 and j.oldest == 4
    assert j.read_after(0, 10) == [(s, b'{"seq":%d}' % s) for s in range(4, 9)]
    j.close()
    again = Journal(tmp_path / "j.db")
    assert (again.oldest, again.last_seq) == (4, 8)
    again.append(batch(9, 1))
    assert [s for s, _ in again.read_after(3, 10)] == [4, 5, 6, 7, 8, 9]


def test_a_journal_with_a_row_per_event_is_moved_into_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journals written before chunks keep their events, seqs and epoch; the move goes in steps."""
    import sqlite3

    import streamd.journal as journal_module

    monkeypatch.setattr(journal_module, "MIGRATE_STEP", 1000)  # three steps for these 2,510 events

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, time REAL NOT NULL, body BLOB NOT NULL);"
        "INSERT INTO meta VALUES ('epoch', 'oldepoch');"
    )
    seqs = [*range(7, 2507), *range(2600, 2610)]  # a hole (a trim long ago can not make one; be safe)
    db.executemany("INSERT INTO events VALUES (?, ?, ?)", [(s, 1000.0 + s, b"e%d" % s) for s in seqs])
    db.commit()
    db.close()
    j = Journal(path)
    assert (j.epoch, j.oldest, j.last_seq) == ("oldepoch", 7, 2609)
    assert j.read_after(0, 10_000) == [(s, b"e%d" % s) for s in seqs]
    assert j.read_after(2505, 3) == [(2506, b"e2506"), (2600, b"e2600"), (2601, b"e2601")]
    j.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "events" not in tables and "chunks" in tables


def test_job_rows_held_back_are_read_through_and_survive_a_crash(tmp_path: Path) -> None:
    """Job rows are written to the store in bulk, after their events; until then reads see them anyway,
    and a crash loses none: the next start writes them from the chunks they rode in."""
    path = tmp_path / "j.db"
    j = Journal(path)
    j.append(batch(1, 6))  # j0..j2, last rows at seqs 6, 4, 5
    j.append(batch(7, 2))  # j1 at 7, j2 at 8
    assert j._dirty and j.jobs_seq < j.last_seq  # held back: nothing forced a write yet
    assert j.job("oxen", "j1")[0] is not None and j.job("oxen", "j1")[0].seq == 7  # type: ignore[union-attr]
    assert {k: v.seq for k, v in j.jobs_by_id("oxen", ["j0", "j1", "j2", "nope"]).items()} == {
        "j0": 6,
        "j1": 7,
        "j2": 8,
    }
    # a crash: this journal is never closed (its held-back rows die with it); another process opens the file
    again = Journal(path)
    assert again.jobs_seq == again.last_seq == 8
    assert {job.job: job.seq for job in again.jobs(limit=10)} == {"j0": 6, "j1": 7, "j2": 8}
    assert again.snapshot()[0] == 8


def test_job_rows_are_written_after_at_most_jobs_most_of_them(tmp_path: Path) -> None:
    import streamd.journal as journal_module

    j = Journal(tmp_path / "j.db")
    rows = []
    for seq in range(1, journal_module.JOBS_MOST + 101):
        job = Job(provider="oxen", job=f"k{seq}", status=State.COMPLETED, seq=seq)
        rows.append(Append(seq, 1000.0, b"e", job.key, json_encoder.encode(job), True))
    held = []
    for k in range(0, len(rows), 1024):
        j.append(rows[k : k + 1024])
        held.append(len(j._dirty))
    assert max(held) < journal_module.JOBS_MOST and 0 < j.jobs_seq < j.last_seq  # written along the way
    assert j.counts() == (journal_module.JOBS_MOST + 100, 0)  # (a read writes what is held first)
    assert j.jobs_seq == j.last_seq and not j._dirty


def test_a_move_into_chunks_cut_short_by_a_crash_is_finished_at_the_next_start(tmp_path: Path) -> None:
    import sqlite3

    import streamd.journal as journal_module

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, time REAL NOT NULL, body BLOB NOT NULL);"
        "INSERT INTO meta VALUES ('epoch', 'oldepoch');"
    )
    db.executemany("INSERT INTO events VALUES (?, ?, ?)", [(s, 1000.0 + s, b"e%d" % s) for s in range(1, 3001)])
    db.executescript(journal_module.SCHEMA)
    # what the first step of a move leaves behind if the daemon dies right after it
    db.execute("BEGIN")
    journal_module._move_events(db, db.execute("SELECT seq, time, body FROM events WHERE seq <= 1200").fetchall())
    db.execute("DELETE FROM events WHERE seq <= 1200")
    db.execute("COMMIT")
    db.close()
    j = Journal(path)
    assert (j.oldest, j.last_seq) == (1, 3000)
    assert j.read_after(0, 10_000) == [(s, b"e%d" % s) for s in range(1, 3001)]
