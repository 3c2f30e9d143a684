"""Sparklines of events per second and completions per second over the last two minutes.

A glance tells whether the daemon is busy, quiet, or stuck: a flat line while jobs are running
is the thing to notice. Fed once a second from the store's per-second counters.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline

from streamd_tui.model import Store

POINTS = 60


class RatesPanel(Vertical):
    """Two labelled sparklines; the labels carry the current figures."""

    def compose(self) -> ComposeResult:
        yield Label("events/s", id="events-label")
        yield Sparkline([0.0] * POINTS, id="events-spark")
        yield Label("completions/s", id="done-label")
        yield Sparkline([0.0] * POINTS, id="done-spark")

    def refresh_from(self, store: Store, now: float) -> None:
        events = store.events.series(now, POINTS + 1)[:-1]  # complete seconds only
        done = store.completions.series(now, POINTS + 1)[:-1]
        self.query_one("#events-spark", Sparkline).data = [float(v) for v in events]
        self.query_one("#done-spark", Sparkline).data = [float(v) for v in done]
        self.query_one("#events-label", Label).update(
            f"events/s  now {events[-1] if events else 0}  peak {max(events, default=0)}  total {store.applied:,}",
            layout=False,
        )
        self.query_one("#done-label", Label).update(
            f"completions/s  now {done[-1] if done else 0}  last 60s {sum(done)}", layout=False
        )
