"""The selected job in full: state and times, prompt, outputs and archived copies, error, every
event with its time and origin (push or poll), logs and progress, and the raw upstream payload.

The table row only has room for a summary; this pane is where a person finds out *why* a job is
where it is. Its history is the journal's (fetched on selection) merged with events since.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.json import JSON
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from streamd.events import CloudEvent, Kind, Origin, cost_text
from streamd_tui.format import (
    STATE_GLYPH,
    Palette,
    ViewClock,
    clock_text,
    duration,
    progress_cell,
    state_cell,
)
from streamd_tui.model import JobView, parse_time

ORIGIN_VARIABLE = {
    Origin.PUSH: "success",
    Origin.POLL: "warning",
    Origin.REQUEST: "primary-lighten-2",
    Origin.DAEMON: "foreground-darken-2",
}
SHOWN_EVENTS = 200


def merge_history(fetched: Iterable[CloudEvent], recent: Iterable[CloudEvent]) -> list[CloudEvent]:
    """The journal's history plus what arrived since, once each, in seq order."""
    by_seq = {event.seq: event for event in fetched}
    for event in recent:
        by_seq.setdefault(event.seq, event)
    return [by_seq[seq] for seq in sorted(by_seq)]


def event_detail(event: CloudEvent) -> str:
    data = event.data
    parts: list[str] = []
    if data.kind is Kind.STATE and data.status is not None:
        parts.append(f"{data.previous.value if data.previous else '∅'} → {data.status.value}")
    if data.progress is not None:
        p = data.progress
        if p.percent is not None:
            parts.append(f"{p.percent:.0f}%")
        if p.step is not None:
            parts.append(f"step {p.step}" + (f"/{p.steps}" if p.steps else ""))
        if p.eta is not None:
            parts.append(f"eta {duration(p.eta)}")
    if data.message:
        parts.append(data.message)
    if data.error:
        parts.append(f"error: {data.error}")
    if data.outputs and data.kind is not Kind.ARCHIVED:
        parts.append(f"{len(data.outputs)} output(s)")
    if data.paths or data.kind is Kind.ARCHIVED:
        parts.append(f"archived {len(data.paths or data.outputs)} file(s)")
    if data.cost is not None:
        parts.append(cost_text(data.provider, data.cost))
    return "  ".join(parts)


class DetailPane(VerticalScroll):
    """Everything about one job; empty (with a hint) when no row is held."""

    HINT = "Move onto a row (↑/↓, click) to hold it and see its history here. Esc lets go."

    def __init__(self, palette: Palette, clock: ViewClock, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.palette = palette
        self.clock = clock
        self.job: JobView | None = None
        self.history: list[CloudEvent] = []
        self.loading = False
        self._body = Static(self.HINT, id="detail-body")
        self._renderable: RenderableType = Text(self.HINT)

    def compose(self) -> Any:
        yield self._body

    def show(self, job: JobView | None, fetched: list[CloudEvent] | None) -> None:
        self.job = job
        if job is None:
            self.history = []
            self.border_title = "job"
            self._set(Text(self.HINT, style=self.palette.muted))
            return
        self.loading = fetched is None
        self.history = merge_history(fetched or (), job.history or ())
        self.border_title = f"{job.provider} / {job.job}"
        self._set(self._render_job(job))

    def _set(self, renderable: RenderableType) -> None:
        self._renderable = renderable
        self._body.update(renderable)

    def plain_text(self, width: int = 140) -> str:
        """What the pane says, as plain text (for tests and for copying)."""
        console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
        console.print(self._renderable)
        return console.export_text()

    # -- rendering -------------------------------------------------------------------------------------
    def _render_job(self, job: JobView) -> RenderableType:
        palette, now = self.palette, self.clock.now
        muted = palette.muted
        head = Text()
        head.append_text(state_cell(job.status, palette))
        head.append(f"  for {duration(now - job.since)}" if job.since else "", style=muted)
        head.append(f"  · total {duration(now - job.created)}" if job.created else "", style=muted)
        if job.percent is not None:
            head.append("  ")
            head.append_text(progress_cell(job.percent, palette.state(job.status)))
        if job.cost is not None:
            head.append(f"  · {cost_text(job.provider, job.cost)}")
        fields = Table.grid(padding=(0, 2))
        fields.add_column(style=muted, no_wrap=True)
        fields.add_column(overflow="fold")
        fields.add_row("job", f"{job.provider} / {job.job}")
        fields.add_row("model", job.model or "—")
        fields.add_row("upstream", job.upstream or "—")
        fields.add_row("seen", f"{clock_text(job.created)}  (last event {clock_text(job.updated)}, seq {job.seq})")
        if job.prompt:
            fields.add_row("prompt", job.prompt)
        for i, url in enumerate(job.outputs):
            fields.add_row("output" if i == 0 else "", Text(url, style=palette.style("primary-lighten-2")))
        for i, path in enumerate(job.paths):
            fields.add_row("archived" if i == 0 else "", Text(path, style=palette.style("success")))
        if job.error:
            fields.add_row("error", Text(job.error, style=palette.style("error", bold=True)))
        parts: list[RenderableType] = [head, fields, Text(""), self._render_events()]
        raw = next((e for e in reversed(self.history) if e.data.raw is not None), None)
        if raw is not None:
            title = Text(f"raw payload of seq {raw.seq} ({raw.data.upstream}, {raw.data.origin.value})", style="bold")
            parts += [Text(""), title, self._raw(raw.data.raw)]
        return Group(*parts)

    def _render_events(self) -> RenderableType:
        palette = self.palette
        events = self.history[-SHOWN_EVENTS:]
        note = "" if len(self.history) <= SHOWN_EVENTS else f", the last {SHOWN_EVENTS} shown"
        loading = " (loading the journal's history…)" if self.loading else ""
        table = Table(
            title=f"events ({len(self.history)}{note}){loading}",
            title_justify="left",
            title_style="bold",
            box=None,
            padding=(0, 1),
            show_edge=False,
            expand=False,
        )
        table.add_column("time", style=palette.muted, no_wrap=True)
        table.add_column("seq", justify="right", no_wrap=True)
        table.add_column("origin", no_wrap=True)
        table.add_column("event", no_wrap=True)
        table.add_column("upstream", no_wrap=True)
        table.add_column("detail", overflow="fold")
        for event in events:
            data = event.data
            kind = event.type.rsplit(".", 1)[-1]
            if data.kind is Kind.STATE and data.status is not None:
                kind_text = Text(f"{STATE_GLYPH[data.status]} {kind}", style=palette.state(data.status))
            elif data.kind is Kind.LOG:
                kind_text = Text(f"≡ {kind}", style=palette.muted)
            else:
                kind_text = Text(f"· {kind}")
            table.add_row(
                clock_text(parse_time(event.time)),
                str(event.seq),
                Text(data.origin.value, style=palette.style(ORIGIN_VARIABLE[data.origin])),
                kind_text,
                data.upstream,
                event_detail(event),
            )
        return table

    @staticmethod
    def _raw(raw: Any) -> RenderableType:
        try:
            return JSON(json.dumps(raw, default=str), indent=2)
        except (TypeError, ValueError):
            return Text(repr(raw))
