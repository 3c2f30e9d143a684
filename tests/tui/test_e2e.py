"""The dashboard against a real daemon (journal, bus, feed server, real client) started in-process,
with a scripted provider: submit, live updates, a daemon restart resumed without a gap, the
journal's history in the detail pane, a filter applied by the daemon, and cancel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamd_tui.app import make_app
from streamd_tui.confirm import ConfirmScreen
from streamd_tui.health import HealthPanel
from streamd_tui.link import LinkState

from streamd.events import State
from streamd.feed.client import FeedClient

from ..support import ScriptedProvider, running_daemon
from .helpers import keys_in_view, wait_until


@pytest.mark.anyio
async def test_dashboard_follows_a_real_daemon_across_a_restart(tmp_path: Path) -> None:
    socket = tmp_path / "feed.sock"
    app = make_app(socket, FeedClient.connect, reconnect_delays=(0.05,), status_every=0.2, redraw_every=0.0)
    first = ScriptedProvider(path=(State.QUEUED, State.RUNNING))
    async with app.run_test(size=(180, 50)) as pilot:
        async with running_daemon(tmp_path, {"oxen": first}):
            await wait_until(pilot, lambda: app.link.status.state is LinkState.LIVE)
            client = app.link.client
            assert client is not None
            result = await client.submit("oxen", "bytedance-seedream-4", "a red fox in the snow")
            assert result["jobs"] == ["job1"]
            await wait_until(pilot, lambda: ("oxen", "job1") in keys_in_view(app))
            await wait_until(pilot, lambda: app.store.jobs[("oxen", "job1")].status is State.RUNNING)
            health = app.query_one(HealthPanel)
            await wait_until(pilot, lambda: any(line.startswith("oxen connected") for line in health.lines))
            seq = app.link.cursor
            assert seq is not None and seq > 0
        # the daemon is gone: the dashboard says so and keeps trying
        await wait_until(pilot, lambda: app.link.status.state is LinkState.WAITING)
        second = ScriptedProvider(path=(State.QUEUED, State.RUNNING))
        second.count = 100  # new ids after the restart
        async with running_daemon(tmp_path, {"oxen": second}):
            await wait_until(pilot, lambda: app.link.status.state is LinkState.LIVE)
            # resumed where it was (same journal, same epoch): no snapshot, no gap
            assert app.link.subscriptions[-1] == (seq, False, "")
            assert not app.store.gaps
            await wait_until(pilot, lambda: second.ctx is not None)
            await second.push("job1", State.COMPLETED, outputs=("https://cdn.example/job1.png",))
            await wait_until(pilot, lambda: app.store.jobs[("oxen", "job1")].status is State.COMPLETED)

            # the detail pane reads the job's whole history from the daemon's journal
            app.table.pin(("oxen", "job1"))
            await wait_until(pilot, lambda: app.held_history is not None)
            assert [e.data.status for e in app.held_history or []] == [
                State.QUEUED,
                State.RUNNING,
                State.COMPLETED,
            ]
            assert "https://cdn.example/job1.png" in app.detail.plain_text()

            # a filter is applied by the daemon: a fresh snapshot of the matching jobs only
            result = await app.link.client.submit("oxen", "m", "a lighthouse")  # type: ignore[union-attr]
            await wait_until(pilot, lambda: ("oxen", "job101") in app.store.jobs)
            await pilot.press("escape", "slash", *"status:running", "enter", "escape")
            await wait_until(pilot, lambda: keys_in_view(app) == [("oxen", "job101")])
            assert app.link.subscriptions[-1] == ("now", True, "status:running")

            # cancel, confirmed, through the daemon to the provider
            app.table.pin(("oxen", "job101"))
            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_until(pilot, lambda: second.cancelled == ["job101"])
