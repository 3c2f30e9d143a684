"""The dashboard's client-side model: folding snapshots and events into job rows, pure."""

from __future__ import annotations

from typing import Any

from streamd_tui.format import ViewClock, duration, elapsed_text, row_values
from streamd_tui.model import Prune, Rate, Restart, Store, histogram, quantile

from streamd.events import CloudEvent, EventData, Health, Job, Kind, Origin, Progress, State, envelope
from streamd.feed.protocol import Gap, Live, Snapshot

T0 = 1_700_000_000.0


def event(
    seq: int,
    job: str | None,
    kind: Kind,
    status: State | None,
    previous: State | None = None,
    *,
    at: float,
    provider: str = "oxen",
    **fields: Any,
) -> CloudEvent:
    data = EventData(
        provider=provider,
        job=job,
        kind=kind,
        status=status,
        previous=previous,
        upstream="up",
        origin=Origin.PUSH,
        **fields,
    )
    return envelope(data, seq=seq, epoch="e", source="test", at=at)


def test_snapshot_then_events_build_rows_with_times_progress_outputs_and_paths() -> None:
    store = Store()
    store.pending.extend(
        [
            Restart("e"),
            Snapshot(
                seq=10,
                jobs=[Job(provider="oxen", job="a", status=State.QUEUED, created=T0, since=T0, model="m")],
                more=True,
            ),
            Snapshot(seq=10, jobs=[Job(provider="wiro", job="b", status=State.RUNNING, created=T0, since=T0 + 2)]),
            event(11, "a", Kind.STATE, State.RUNNING, State.QUEUED, at=T0 + 5),
            event(12, "a", Kind.PROGRESS, State.RUNNING, State.RUNNING, at=T0 + 6, progress=Progress(percent=40)),
            event(
                13, "a", Kind.STATE, State.COMPLETED, State.RUNNING, at=T0 + 9, outputs=("https://x/a.png",), cost=0.03
            ),
            event(14, "a", Kind.ARCHIVED, State.COMPLETED, State.COMPLETED, at=T0 + 10, paths=("/arch/a.png",)),
            Live(seq=14),
        ]
    )
    assert store.apply_pending(now=T0 + 10) == 4
    assert store.last_seq == 14 and store.live
    a = store.jobs[("oxen", "a")]
    assert (a.status, a.since, a.created) == (State.COMPLETED, T0 + 9, T0)
    assert a.percent == 100.0  # completed: full, whatever the last progress said
    assert a.outputs == ("https://x/a.png",) and a.paths == ("/arch/a.png",) and a.cost == 0.03
    assert [e.seq for e in a.history] == [11, 12, 13, 14]
    # waited 5 s in the queue, ran 4 s: the samples behind the distributions
    assert list(store.providers["oxen"].waits) == [5.0] and list(store.providers["oxen"].runs) == [4.0]
    changes = store.take_changes()
    assert changes.reset and set(changes.new) == {("oxen", "a"), ("wiro", "b")}
    assert not changes.changed  # new rows carry their latest values already
    assert not store.take_changes()


def test_changes_list_only_touched_jobs_and_count_events() -> None:
    store = Store()
    store.load_snapshot([Job(provider="oxen", job=str(i), status=State.QUEUED, created=T0) for i in range(100)], 5)
    store.take_changes()
    store.apply_event(event(6, "7", Kind.STATE, State.RUNNING, State.QUEUED, at=T0 + 1), now=T0 + 1)
    store.apply_event(event(7, "new", Kind.STATE, State.QUEUED, at=T0 + 1), now=T0 + 1)
    store.apply_event(event(8, "ghost", Kind.LOG, None, at=T0 + 1), now=T0 + 1)
    changes = store.take_changes()
    assert changes.changed == {("oxen", "7")} and changes.new == [("oxen", "new")] and changes.events == 3
    assert ("oxen", "ghost") not in store.jobs  # a log about an unknown job makes no row


def test_health_events_and_status_replies_update_providers() -> None:
    store = Store()
    health = event(1, None, Kind.HEALTH, None, at=T0, provider="wiro", health=Health.RECONNECTING, delay=4.0)
    store.apply_event(health, now=T0)
    wiro = store.providers["wiro"]
    assert (wiro.health, wiro.delay) == (Health.RECONNECTING, 4.0)
    store.apply_status({"providers": [{"name": "oxen", "health": "auth_failed", "message": "401", "events": 9}]})
    oxen = store.providers["oxen"]
    assert (oxen.health, oxen.message, oxen.events) == (Health.AUTH_FAILED, "401", 9)


def test_restart_forgets_the_old_epochs_seq_and_gaps_are_kept() -> None:
    store = Store()
    gap = Gap(first=4, last=9, reason="retention")
    store.pending.extend([Live(seq=500), Restart("e2"), Snapshot(seq=3, jobs=[]), gap])
    store.apply_pending(now=T0)
    assert store.epoch == "e2" and store.last_seq == 9 and len(store.gaps) == 1


def test_rate_counts_per_second_and_forgets_old_seconds() -> None:
    rate = Rate(window=5)
    rate.add(T0, 3)
    rate.add(T0 + 0.5, 2)
    rate.add(T0 + 2, 7)
    assert rate.series(T0 + 2) == [0, 0, 5, 0, 7]
    assert rate.series(T0 + 100) == [0, 0, 0, 0, 0]


def test_histogram_quantiles_and_durations() -> None:
    assert histogram([0.5, 1.5, 1.9, 400]) == [1, 2, 0, 0, 0, 0, 0, 1]
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0 and quantile([], 0.5) is None
    assert [duration(s) for s in (5, 65, 3725, 90000)] == ["5s", "1m05s", "1h02m", "1d01h"]


def test_time_cells_follow_the_view_clock_and_stop_when_frozen() -> None:
    now = [T0 + 30]
    clock = ViewClock(lambda: now[0])
    assert elapsed_text(T0, clock.tick()) == "30s"
    clock.frozen = True
    now[0] += 60
    assert elapsed_text(T0, clock.tick()) == "30s"
    clock.frozen = False
    assert elapsed_text(T0, clock.tick()) == "1m30s"


def test_row_values_change_only_with_what_a_row_shows() -> None:
    store = Store()
    store.load_snapshot([Job(provider="oxen", job="a", status=State.QUEUED, created=T0, since=T0)], 1)
    before = row_values(store.jobs[("oxen", "a")])
    store.apply_event(event(2, "a", Kind.LOG, State.QUEUED, State.QUEUED, at=T0 + 1, message="hi"), now=T0)
    assert row_values(store.jobs[("oxen", "a")]) == before  # a log line changes no cell
    store.apply_event(event(3, "a", Kind.STATE, State.RUNNING, State.QUEUED, at=T0 + 2), now=T0)
    assert row_values(store.jobs[("oxen", "a")]) != before


def test_prune_drops_only_jobs_not_updated_since_the_query() -> None:
    store = Store()
    store.load_snapshot([Job(provider="oxen", job=j, status=State.RUNNING, seq=s) for j, s in (("a", 3), ("b", 4))], 4)
    store.take_changes()
    store.apply_event(event(9, "b", Kind.PROGRESS, State.RUNNING, State.RUNNING, at=T0), now=T0)
    store.pending.append(Prune(keep=frozenset(), seq=5))  # the jobs query ran at seq 5
    store.apply_pending(now=T0)
    assert set(store.jobs) == {("oxen", "b")}  # b changed after the query: its answer is stale for b
    changes = store.take_changes()
    assert changes.removed == {("oxen", "a")} and ("oxen", "a") not in changes.changed
