"""The dashboard driven like a person would, against an in-memory daemon (`streamd_tui.fake`)."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from rich.text import Text
from streamd_tui.confirm import ConfirmScreen
from streamd_tui.fake import FakeFeedError, SubscribeCall
from streamd_tui.health import HealthPanel
from streamd_tui.link import LinkState
from streamd_tui.status_bar import StatusBar
from streamd_tui.submit import SubmitScreen
from streamd_tui.track import TrackScreen
from textual.widgets import Input

from streamd.events import Health, Kind, Origin, State

from .helpers import app_for, keys_in_view, seeded, wait_until

SIZE = (180, 50)


def cell_text(app: object, key: tuple[str, str], column: str) -> str:
    table = app.table  # type: ignore[attr-defined]
    value = table.get_cell(f"{key[0]}\x1f{key[1]}", column)
    return value.plain if isinstance(value, Text) else str(value)


def cell_color(app: object, key: tuple[str, str], column: str) -> str:
    """The hex colour a cell is drawn in."""
    value = app.table.get_cell(f"{key[0]}\x1f{key[1]}", column)  # type: ignore[attr-defined]
    return str(value.style.color.triplet.hex).lower()


def live(app: object) -> bool:
    return app.link.status.state is LinkState.LIVE  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_snapshot_fills_the_table_and_events_update_only_their_cells() -> None:
    fake = seeded(12)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 12)
        assert cell_text(app, ("oxen", "ox-000"), "state") == "◌ queued"
        assert cell_text(app, ("wiro", "wi-001"), "state") == "◑ running"
        # newest first by default (sorted by total time, ascending)
        assert keys_in_view(app)[0] == ("apiframe", "ap-011")
        updates = app.table.cell_updates
        fake.emit("oxen", "ox-000", State.RUNNING)
        fake.emit("oxen", "ox-000", percent=42.0)
        await wait_until(pilot, lambda: "42%" in cell_text(app, ("oxen", "ox-000"), "progress"))
        assert cell_text(app, ("oxen", "ox-000"), "state") == "◑ running"
        # state, time in state, progress: a few cells, not a redraw of the table
        assert 2 <= app.table.cell_updates - updates <= 4
        fake.emit("oxen", "brand-new", State.QUEUED, model="m", prompt="a new job")
        await wait_until(pilot, lambda: app.table.row_count == 13)
        # colours come from the theme: a completed state is drawn in the theme's success colour
        fake.emit("wiro", "wi-001", State.COMPLETED, outputs=("https://x/1.png",))
        await wait_until(pilot, lambda: "completed" in cell_text(app, ("wiro", "wi-001"), "state"))
        assert cell_color(app, ("wiro", "wi-001"), "state") == app.theme_variables["success"].lower()


@pytest.mark.anyio
async def test_filter_as_you_type_is_sent_to_the_daemon_and_bad_filters_are_not() -> None:
    fake = seeded(12)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 12 and live(app))
        await pilot.press("slash", *"provider:oxen", "enter")
        await wait_until(pilot, lambda: fake.subscriptions[-1].filter == "provider:oxen")
        await wait_until(pilot, lambda: app.table.row_count == 3)
        assert fake.subscriptions[-1] == SubscribeCall("now", True, "provider:oxen")
        assert {k[0] for k in keys_in_view(app)} == {"oxen"}
        # negation and values, the same language as the CLI: not queued (odd jobs are running)
        await pilot.press("ctrl+a", "ctrl+k", *"-status:queued")
        await wait_until(pilot, lambda: fake.subscriptions[-1].filter == "-status:queued")
        await wait_until(pilot, lambda: app.table.row_count == 6)
        assert all(cell_text(app, k, "state") == "◑ running" for k in keys_in_view(app))
        # an unknown field: said at once, never sent
        sent = len(fake.subscriptions)
        app.query_one("#filter-input", Input).value = "colour:red"
        await pilot.press("enter")
        await pilot.pause()
        assert "unknown field" in (app.query_one("#filter").error or "")  # type: ignore[attr-defined]
        assert len(fake.subscriptions) == sent
        # the status bar says which filter is in force
        assert "filter: -status:queued" in app.query_one(StatusBar).plain


@pytest.mark.anyio
async def test_under_a_status_filter_jobs_that_leave_it_lose_their_row() -> None:
    """The daemon drops the event that ends a job under `status:running`; the dashboard finds out."""
    fake = seeded(8)
    app = app_for(fake, filter="status:running")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 4 and live(app))
        assert fake.subscriptions[0] == SubscribeCall("now", True, "status:running")
        fake.emit("wiro", "wi-001", State.COMPLETED)
        await wait_until(pilot, lambda: ("wiro", "wi-001") not in keys_in_view(app))
        assert len(keys_in_view(app)) == 3
        assert any(op == "jobs" and fields["filter"] == "status:running" for op, fields in fake.requests)
        # a job entering the filter arrives as an event, as usual
        fake.emit("oxen", "ox-000", State.RUNNING)
        await wait_until(pilot, lambda: ("oxen", "ox-000") in keys_in_view(app))


@pytest.mark.anyio
async def test_sorting_by_keys_and_by_clicking_a_header() -> None:
    fake = seeded(12)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 12)
        await pilot.press("1")  # provider, ascending
        providers = [k[0] for k in keys_in_view(app)]
        assert providers == sorted(providers) and providers[0] == "apiframe"
        await pilot.press("1")  # again: descending
        assert keys_in_view(app)[0][0] == "wiro"
        # click the "job" header: sort by job id
        table = app.table
        await pilot.click(table, offset=(1 + 10 + 2, 1))  # border, then the provider column (8 + padding)
        await pilot.pause()
        assert table.sort_column == "job"
        jobs = [k[1] for k in keys_in_view(app)]
        assert jobs == sorted(jobs)
        assert "sort: job ▲" in app.query_one(StatusBar).plain
        # clicking a row holds it (header is line 1 inside the border, so row 3 is at y=5)
        await pilot.click(table, offset=(5, 5))
        await pilot.pause()
        assert table.pinned == keys_in_view(app)[3]
        assert table.cursor_row == 3


@pytest.mark.anyio
async def test_a_held_row_stays_put_until_released_and_its_detail_shows_everything() -> None:
    fake = seeded(12)
    fake.emit("oxen", "ox-004", State.RUNNING, origin=Origin.POLL, raw={"status": "processing", "queue": 3})
    fake.emit("oxen", "ox-004", kind=Kind.LOG, message="step 3 of 20")
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 12)
        await pilot.press("4")  # sort by state
        order = keys_in_view(app)
        await pilot.press("down")  # holds the top row
        held = app.table.pinned
        assert held == order[0]
        await pilot.press("down", "down")
        held = app.table.pinned
        assert held == order[2]
        # everything that would move rows arrives: state changes and a new job
        for key in order[:6]:
            fake.emit(*key, State.COMPLETED)
        fake.emit("oxen", "zzz-new", State.QUEUED)
        await wait_until(pilot, lambda: app.table.row_count == 13)
        await wait_until(pilot, lambda: cell_text(app, order[0], "state") == "✔ completed")
        assert keys_in_view(app)[:12] == order  # nothing jumped; the new row joined at the bottom
        assert app.table.key_at(app.table.cursor_row) == held
        await pilot.press("escape")  # let go: the table sorts again
        await wait_until(pilot, lambda: keys_in_view(app) != [*order[:12], ("oxen", "zzz-new")])
        assert app.table.pinned is None
        assert cell_text(app, keys_in_view(app)[-1], "state") == "✔ completed"

        # detail of a job with history from before the dashboard started (fetched from the journal)
        await pilot.press("1")
        app.table.pin(("oxen", "ox-004"))
        await wait_until(pilot, lambda: app.held_history is not None)
        fake.emit(
            "oxen",
            "ox-004",
            State.COMPLETED,
            outputs=("https://cdn.example/ox-004.png",),
            error=None,
            raw={"status": "succeeded", "url": "https://cdn.example/ox-004.png"},
        )
        fake.emit("oxen", "ox-004", kind=Kind.ARCHIVED, paths=("/var/lib/streamd/archive/ox-004.png",))
        await wait_until(pilot, lambda: "archived" in app.detail.plain_text())
        text = app.detail.plain_text(width=160)
        for expected in (
            "completed",
            "prompt number 4",
            "https://cdn.example/ox-004.png",
            "/var/lib/streamd/archive/ox-004.png",
            "queued → running",  # the state change, with its origin...
            "poll",
            "step 3 of 20",  # ...a log line...
            '"succeeded"',  # ...and the raw payload of the latest event that had one
        ):
            assert expected in text, expected
        assert text.count("push") >= 2
        # copy the output URL
        await pilot.press("y")
        assert app.clipboard == "https://cdn.example/ox-004.png"


@pytest.mark.anyio
async def test_pause_freezes_the_view_and_then_says_how_many_events_arrived() -> None:
    fake = seeded(8)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 8 and live(app))
        await pilot.press("p")
        assert app.paused
        fake.emit("oxen", "ox-000", State.RUNNING)
        fake.emit("oxen", "ox-000", percent=10.0)
        fake.emit("oxen", "new-while-paused", State.QUEUED)
        await wait_until(pilot, lambda: "3 new events" in app.query_one(StatusBar).plain)
        assert cell_text(app, ("oxen", "ox-000"), "state") == "◌ queued"  # frozen
        assert app.table.row_count == 8
        await pilot.press("p")
        assert cell_text(app, ("oxen", "ox-000"), "state") == "◑ running"
        assert app.table.row_count == 9
        assert "PAUSED" not in app.query_one(StatusBar).plain


@pytest.mark.anyio
async def test_cancel_asks_first_and_only_yes_cancels() -> None:
    fake = seeded(8)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 8)
        await pilot.press("c")  # nothing held: a warning, no dialog
        assert not isinstance(app.screen, ConfirmScreen)
        target = ("wiro", "wi-001")
        app.table.pin(target)
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        assert "wi-001" in app.screen.question
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("c", "y")
        await wait_until(pilot, lambda: cell_text(app, target, "state") == "⊘ cancelled")
        assert [r for r in fake.requests if r[0] == "cancel"] == [("cancel", {"provider": "wiro", "job": "wi-001"})]
        # a refusal from the daemon is shown, not raised
        fake.cancel_error = FakeFeedError("provider_error", "apiframe says no")
        app.table.pin(("apiframe", "ap-003"))
        await pilot.press("c", "y")
        await wait_until(pilot, lambda: any("says no" in str(n.message) for n in app._notifications))


@pytest.mark.anyio
async def test_track_and_submit_send_requests_and_hold_the_new_job() -> None:
    fake = seeded(4)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 4 and live(app))
        await pilot.press("t")
        assert isinstance(app.screen, TrackScreen)
        await pilot.press(*"task-77", "enter")
        await wait_until(pilot, lambda: app.table.pinned is not None)
        track = next(r for r in fake.requests if r[0] == "track")
        assert track[1]["ref"] == "task-77"
        assert app.table.pinned == (track[1]["provider"], "task-77")
        await pilot.press("escape", "n")
        assert isinstance(app.screen, SubmitScreen)
        app.screen.query_one("#prompt", Input).value = "a lighthouse at dusk"
        await pilot.press("enter")
        await wait_until(pilot, lambda: any(r[0] == "submit" for r in fake.requests))
        submit = next(r for r in fake.requests if r[0] == "submit")[1]
        assert submit["prompt"] == "a lighthouse at dusk" and submit["model"]
        await wait_until(pilot, lambda: app.table.pinned is not None and "submitted" in app.table.pinned[1])


@pytest.mark.anyio
async def test_reconnects_after_the_daemon_restarts_and_resumes_where_it_was() -> None:
    fake = seeded(8)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 8 and live(app))
        seq = fake.seq
        fake.drop()
        await wait_until(pilot, lambda: app.link.status.state is LinkState.WAITING)
        # the bar re-renders on its own beat, and the link may already be trying again: wait to see it say so
        await wait_until(pilot, lambda: "reconnecting in" in app.query_one(StatusBar).plain)
        fake.emit("oxen", "ox-000", State.RUNNING)  # happened while the dashboard was cut off
        fake.emit("oxen", "after-restart", State.QUEUED)
        fake.restart()
        await wait_until(pilot, lambda: app.table.row_count == 9 and live(app))
        assert fake.subscriptions[-1] == SubscribeCall(seq, False, "")
        assert cell_text(app, ("oxen", "ox-000"), "state") == "◑ running"
        assert len(set(keys_in_view(app))) == 9
        # the journal was reset (new epoch): start over with a snapshot, old rows go
        fake.drop()
        fake.restart(epoch="epoch-2")
        fake.emit("runware", "only-one", State.QUEUED)
        await wait_until(pilot, lambda: keys_in_view(app) == [("runware", "only-one")])
        assert fake.subscriptions[-1] == SubscribeCall("now", True, "")


@pytest.mark.anyio
async def test_provider_health_lines_and_screenshot(tmp_path: Path) -> None:
    fake = seeded(30)
    fake.health("oxen", Health.AUTH_FAILED, "401 Unauthorized")
    for i in range(1, 30, 4):  # wiro jobs that ran: run-time samples
        fake.emit("wiro", f"wi-{i:03d}", State.COMPLETED, cost=0.03, at=time.time() - 30 + i)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(app.query_one(HealthPanel).lines) == 4)
        lines = app.query_one(HealthPanel).lines
        assert any(line.startswith("oxen auth failed") and "401" in line for line in lines)
        assert any(line.startswith("wiro reconnecting in 4.0s") for line in lines)
        app.table.pin(("oxen", "ox-004"))
        await wait_until(pilot, lambda: app.held_history is not None)
        await pilot.pause()
        svg = await anyio.Path(app.save_screenshot("dashboard.svg", str(tmp_path))).read_text()
        assert svg.startswith("<svg") and "providers" in svg
        # a different theme recolours the states
        held = ("oxen", "ox-004")  # on screen: off-screen rows are recoloured as they scroll into view
        before = cell_color(app, held, "state")
        app.theme = "nord"
        await wait_until(pilot, lambda: cell_color(app, held, "state") != before)
        assert cell_color(app, held, "state") == app.theme_variables["foreground-darken-2"].lower()
        await pilot.pause()
        app.save_screenshot("dashboard-nord.svg", str(tmp_path))


@pytest.mark.anyio
async def test_a_tick_that_lands_during_shutdown_is_a_no_op() -> None:
    # Textual prunes the screens before it stops the app's timers: a late tick must not query them.
    fake = seeded(2)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 2)
    assert not app.is_running
    app.tick()


@pytest.mark.anyio
async def test_track_and_submit_dialogs_close_on_escape_and_on_cancel_sending_nothing() -> None:
    fake = seeded(2)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 2 and live(app))
        for key, screen in (("t", TrackScreen), ("n", SubmitScreen)):
            await pilot.press(key)
            assert isinstance(app.screen, screen)
            await pilot.press("escape")
            await wait_until(pilot, lambda s=screen: not isinstance(app.screen, s))
            await pilot.press(key)
            assert isinstance(app.screen, screen)
            await pilot.click("#cancel")
            await wait_until(pilot, lambda s=screen: not isinstance(app.screen, s))
        assert not [r for r in fake.requests if r[0] in ("track", "submit")]


@pytest.mark.anyio
async def test_keys_pressed_before_a_resize_is_handled_still_move_the_hold() -> None:
    """Holding a row opens the detail pane, which shrinks the table; the table then puts the held row
    back in sight after the next refresh. Keys pressed before that refresh must not be undone by it
    (seen as a swallowed key press: the hold one row short of where the keys took it)."""
    from textual import events
    from textual.geometry import Size

    fake = seeded(12)
    app = app_for(fake)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.table.row_count == 12)
        table = app.table
        order = keys_in_view(app)
        assert table.pin(order[0])
        table.on_resize(events.Resize(Size(80, 10), Size(80, 12)))  # the pane opening, as Textual sends it
        table.action_cursor_down()  # two key presses, before the refresh the resize waits for
        table.action_cursor_down()
        await pilot.pause()
        await pilot.pause()
        assert table.pinned == order[2]
        assert table.key_at(table.cursor_row) == order[2]
