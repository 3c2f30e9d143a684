"""One line per provider connection: its health (connected, reconnecting in N s, auth failed,
rate limited...), what it last said, and its event rate, so a stalled table has a visible cause.

Health comes from `ai.streamd.provider.health` events and from the periodic `status` request
(which also covers providers the current filter hides); rates are counted here, per provider.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from streamd.events import Health
from streamd_tui.format import HEALTH_GLYPH, Palette, seconds_short
from streamd_tui.model import Store


def health_label(health: Health | None, delay: float | None) -> str:
    if health is None:
        return "unknown"
    label = health.value.replace("_", " ")
    if health in (Health.RECONNECTING, Health.RATE_LIMITED) and delay is not None:
        label += f" in {seconds_short(delay)}"
    return label


class HealthPanel(Static):
    """Provider health lines; redrawn about once a second, not per event."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("waiting for the daemon…", id=id)
        self.lines: list[str] = []  # plain text of each provider line, for tests
        self._rows = -1

    def refresh_from(self, store: Store, palette: Palette, now: float) -> None:
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, ratio=1)
        grid.add_column(justify="right", no_wrap=True)
        grid.add_column(justify="right", no_wrap=True)
        lines: list[str] = []
        for name in sorted(store.providers):
            provider = store.providers[name]
            style = palette.health(provider.health)
            glyph = HEALTH_GLYPH[provider.health] if provider.health else "?"
            label = health_label(provider.health, provider.delay)
            rate = provider.rate.per_second(now)
            active = "" if provider.jobs_active is None else f"{provider.jobs_active} active"
            grid.add_row(Text(f"{glyph} {name}", style=style), Text(label, style=style), f"{rate:.1f}/s", active)
            line = f"{name} {label} {rate:.1f}/s {active}".rstrip()
            if provider.message:
                grid.add_row("", Text(provider.message, style=palette.muted, overflow="ellipsis"), "", "")
                line += f" ({provider.message})"
            lines.append(line)
        relayout = grid.row_count != self._rows  # its height is its line count: lay out only when that changes
        self._rows = grid.row_count
        self.lines = lines
        self.update(grid if lines else Text("no providers reported yet", style=palette.muted), layout=relayout)
