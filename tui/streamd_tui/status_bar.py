"""One line on the state of the dashboard itself: link to the daemon, position in the stream,
how many jobs are shown, the sort, and whether the view is paused (with how much is waiting).
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from streamd_tui.format import Palette, seconds_short
from streamd_tui.link import LinkState, LinkStatus

LINK_VARIABLE = {
    LinkState.CONNECTING: "warning",
    LinkState.SYNCING: "accent",
    LinkState.LIVE: "success",
    LinkState.WAITING: "error",
}


class StatusBar(Static):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.plain = ""

    def show(
        self,
        palette: Palette,
        link: LinkStatus,
        *,
        seq: int,
        jobs: int,
        filter: str,
        sort: str,
        paused_events: int | None,
        held: bool,
    ) -> None:
        text = Text()
        if paused_events is not None:
            text.append(f" ⏸ PAUSED · {paused_events:,} new events ", style=palette.style("warning", bold=True))
            text.append(" ")
        label = link.state.value
        if link.state is LinkState.WAITING and link.delay is not None:
            label = f"reconnecting in {seconds_short(link.delay)} (try {link.attempt})"
        text.append(f"● {label}", style=palette.style(LINK_VARIABLE[link.state], bold=True))
        if link.detail and link.state is not LinkState.LIVE:
            text.append(f" {link.detail}", style=palette.muted)
        text.append(f"  seq {seq:,}", style=palette.muted)
        if link.epoch:
            text.append(f"  epoch {link.epoch[:12]}", style=palette.muted)
        text.append(f"  {jobs:,} jobs")
        if filter:
            text.append(f"  filter: {filter}", style=palette.style("accent"))
        text.append(f"  sort: {sort}", style=palette.muted)
        if held:
            text.append("  holding a row (esc lets go)", style=palette.style("primary-lighten-2"))
        if text.plain != self.plain or paused_events is not None:
            self.plain = text.plain
            self.update(text, layout=False)  # one line, always: no need to lay out the screen again
