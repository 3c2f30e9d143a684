"""How jobs look: columns, cell renderables, theme colours. Pure functions of a `JobView`.

Each column has a `value` (what `update_cell` compares, so an unchanged cell is never touched),
a `cell` (a Rich `Text`) and a `sort` key. Time columns are computed from a `ViewClock`
the app advances each tick (and stops while paused); the table rewrites them for rows on screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.color import Color, ColorParseError

from streamd.events import Health, State, cost_text
from streamd_tui.model import STATE_ORDER, JobView

STATE_GLYPH = {
    State.QUEUED: "◌",
    State.ACCEPTED: "○",
    State.PREPROCESSING: "◔",
    State.RUNNING: "◑",
    State.POSTPROCESSING: "◕",
    State.COMPLETED: "✔",
    State.FAILED: "✖",
    State.CANCELLED: "⊘",
}
#: Theme variables (Textual's colour system) per state, so every theme colours states its own way.
STATE_VARIABLE = {
    State.QUEUED: "foreground-darken-2",
    State.ACCEPTED: "secondary-lighten-2",
    State.PREPROCESSING: "accent",
    State.RUNNING: "primary-lighten-2",
    State.POSTPROCESSING: "accent-lighten-1",
    State.COMPLETED: "success",
    State.FAILED: "error",
    State.CANCELLED: "warning",
}
BOLD_STATES = frozenset({State.RUNNING, State.FAILED})
HEALTH_GLYPH = {
    Health.STARTING: "◌",
    Health.CONNECTED: "●",
    Health.POLLING: "●",
    Health.RECONNECTING: "◐",
    Health.RATE_LIMITED: "◐",
    Health.AUTH_FAILED: "✖",
    Health.DOWN: "✖",
    Health.STOPPED: "○",
}
HEALTH_VARIABLE = {
    Health.STARTING: "foreground-darken-2",
    Health.CONNECTED: "success",
    Health.POLLING: "success",
    Health.RECONNECTING: "warning",
    Health.RATE_LIMITED: "warning",
    Health.AUTH_FAILED: "error",
    Health.DOWN: "error",
    Health.STOPPED: "foreground-darken-2",
}


class Palette:
    """Rich styles taken from the app's current theme variables; rebuilt when the theme changes."""

    def __init__(self, variables: Mapping[str, str] | None = None) -> None:
        self._variables = dict(variables or {})
        self._cache: dict[str, Style] = {}

    def load(self, variables: Mapping[str, str]) -> None:
        """Take the colours of a (new) theme; widgets sharing this palette redraw to pick them up."""
        self._variables = dict(variables)
        self._cache.clear()

    def style(self, variable: str, *, bold: bool = False) -> Style:
        key = f"{variable}:{bold}"
        style = self._cache.get(key)
        if style is None:
            color = None
            value = self._variables.get(variable)
            if value:
                try:
                    color = Color.parse(value).rich_color
                except ColorParseError:
                    color = None
            style = self._cache[key] = Style(color=color, bold=bold or None)
        return style

    def state(self, state: State) -> Style:
        return self.style(STATE_VARIABLE[state], bold=state in BOLD_STATES)

    def health(self, health: Health | None) -> Style:
        return self.style(HEALTH_VARIABLE[health] if health else "foreground-darken-2")

    @property
    def muted(self) -> Style:
        return self.style("foreground-darken-2")


class ViewClock:
    """The time the view shows: advanced by the app's tick, frozen while the view is paused."""

    __slots__ = ("frozen", "now", "source")

    def __init__(self, source: Callable[[], float] = time.time) -> None:
        self.source = source
        self.now = source()
        self.frozen = False

    def tick(self) -> float:
        if not self.frozen:
            self.now = self.source()
        return self.now


def duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def seconds_short(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 10:
        return f"{value:.1f}s"
    return duration(value)


BAR = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int) -> str:
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (BAR[part] if part else "")).ljust(width)


def excerpt(text: str | None, limit: int = 200) -> str:
    if not text:
        return ""
    return " ".join(text.split())[:limit]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    width: int
    value: Callable[[JobView], Hashable]
    cell: Callable[[JobView, Palette, ViewClock], Any]
    sort: Callable[[JobView], Any]
    right: bool = False


# Cells are `Text`, not markup strings: DataTable parses a string cell's markup every time it
# measures or draws it, which made loading 10,000 rows twice as slow. The many small objects
# this makes are frozen out of the cyclic GC after a snapshot (see app.py).


def cell(text: str, style: Style | None = None, *, right: bool = False) -> Text:
    return Text(text, style=style or "", justify="right" if right else None, no_wrap=True, end="")


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def elapsed_text(start: float, now: float) -> str:
    return duration(now - start) if start else "—"


TIME_COLUMNS = ("in_state", "total")


def time_texts(job: JobView, clock: ViewClock) -> tuple[str, str]:
    """What the time cells say at the view clock's time; rewritten for rows on screen as it moves."""
    return (elapsed_text(job.since, clock.now), elapsed_text(job.created, clock.now))


def time_cell(column: str, text: str, palette: Palette) -> Text:
    return cell(text, palette.muted if column == "total" else None, right=True)


def state_cell(state: State, palette: Palette) -> Text:
    return cell(f"{STATE_GLYPH[state]} {state.value}", palette.state(state))


def progress_cell(percent: float | None, style: Style) -> Text:
    if percent is None:
        return Text("")
    text = Text(bar(percent / 100, 6), style=style, no_wrap=True, end="")
    text.append(f"{percent:4.0f}%")
    return text


COLUMNS: tuple[Column, ...] = (
    Column(
        "provider",
        "provider",
        8,
        lambda j: j.provider,
        lambda j, p, c: cell(j.provider),
        lambda j: (j.provider, -j.created),
    ),
    Column("job", "job", 14, lambda j: j.job, lambda j, p, c: cell(j.job), lambda j: j.job),
    Column(
        "model",
        "model",
        18,
        lambda j: j.model,
        lambda j, p, c: cell(clip(j.model or "", 18)),
        lambda j: (j.model or "", -j.created),
    ),
    Column(
        "state",
        "state",
        16,
        lambda j: j.status.value,  # a str: a values tuple of atoms is one the GC stops tracking
        lambda j, p, c: state_cell(j.status, p),
        lambda j: (STATE_ORDER[j.status], -j.created),
    ),
    Column(
        "in_state",
        "in state",
        8,
        lambda j: j.since,
        lambda j, p, c: time_cell("in_state", elapsed_text(j.since, c.now), p),
        lambda j: -j.since,
        right=True,
    ),
    Column(
        "total",
        "total",
        8,
        lambda j: j.created,
        lambda j, p, c: time_cell("total", elapsed_text(j.created, c.now), p),
        lambda j: -j.created,
        right=True,
    ),
    Column(
        "progress",
        "progress",
        11,
        lambda j: j.percent,
        lambda j, p, c: progress_cell(j.percent, p.state(j.status)),
        lambda j: (-1.0 if j.percent is None else j.percent, -j.created),
    ),
    Column(
        "cost",
        "cost",
        8,
        lambda j: j.cost,
        lambda j, p, c: cell(cost_text(j.provider, j.cost), right=True),
        lambda j: (-1.0 if j.cost is None else j.cost, -j.created),
        right=True,
    ),
    Column(
        "prompt",
        "prompt",
        48,
        lambda j: j.prompt,
        lambda j, p, c: cell(clip(excerpt(j.prompt), 48), p.style("foreground-darken-1")),
        lambda j: ((j.prompt or "").lower(), -j.created),
    ),
)
COLUMN_BY_KEY = {column.key: column for column in COLUMNS}
DEFAULT_SORT = "total"


def row_values(job: JobView) -> tuple[Hashable, ...]:
    return tuple(column.value(job) for column in COLUMNS)


def row_cells(job: JobView, palette: Palette, clock: ViewClock) -> list[Any]:
    return [column.cell(job, palette, clock) for column in COLUMNS]


def clock_text(ts: float) -> str:
    """Local wall time with milliseconds, for event histories."""
    if not ts:
        return "—"
    local = time.localtime(ts)
    return time.strftime("%H:%M:%S", local) + f".{int(ts * 1000) % 1000:03d}"
