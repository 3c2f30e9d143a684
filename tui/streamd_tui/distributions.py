"""Per provider, how long recent jobs waited in the queue and how long they ran.

Shown as small histograms over fixed buckets (<1s … >5m) with the median and 90th percentile,
which is what tells a slow provider from a busy one. Built from state changes the dashboard saw.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from streamd_tui.format import Palette, seconds_short
from streamd_tui.model import BUCKET_LABELS, Store, histogram, quantile

BLOCKS = " ▁▂▃▄▅▆▇█"


def spark(counts: list[int]) -> str:
    top = max(counts, default=0)
    if not top:
        return "·" * len(counts)
    return "".join(BLOCKS[min(8, round(8 * c / top))] if c else "·" for c in counts)


class DistributionPanel(Static):
    """Queue-wait and run-time histograms of each provider's recent jobs."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("no finished jobs yet", id=id)

    def refresh_from(self, store: Store, palette: Palette) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        rows = 0
        for name in sorted(store.providers):
            provider = store.providers[name]
            if not provider.waits and not provider.runs:
                continue
            counts = f"{len(provider.waits)} waits, {len(provider.runs)} runs"
            grid.add_row(Text(name, style="bold"), "", Text(counts, style=palette.muted))
            for label, values, variable in (
                ("wait", provider.waits, "warning"),
                ("run", provider.runs, "primary-lighten-2"),
            ):
                if values:
                    p50, p90 = quantile(values, 0.5), quantile(values, 0.9)
                    grid.add_row(
                        Text(f" {label}", style=palette.muted),
                        Text(spark(histogram(values)), style=palette.style(variable)),
                        f"p50 {seconds_short(p50)}  p90 {seconds_short(p90)}",
                    )
            rows += 1
        if not rows:
            self.update(Text("no timings yet: they appear as jobs start and finish", style=palette.muted))
            return
        axis = Text("marks: " + " ".join(BUCKET_LABELS), style=palette.muted)
        self.update(Group(grid, axis), layout=False)  # a fixed-height panel: no need to lay out the screen
