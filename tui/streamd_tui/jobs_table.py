"""The live jobs table: fixed-width columns, cell-level updates, sorting that never moves a held row.

Nothing re-renders the whole table per event: `apply()` adds rows for new jobs and calls
`update_cell` only for changed cells of rows on screen, at most every `redraw_every` seconds.
Sorting is suspended while a row is *pinned* (the user moved the cursor onto it or clicked it):
rows keep their places and new ones join at the bottom, until Escape lets go and the table sorts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowDoesNotExist, RowKey

from streamd_tui.format import (
    COLUMN_BY_KEY,
    COLUMNS,
    DEFAULT_SORT,
    TIME_COLUMNS,
    Palette,
    ViewClock,
    row_cells,
    row_values,
    time_cell,
    time_texts,
)
from streamd_tui.model import Changes, JobView, Key, Store

SEP = "\x1f"
#: Row values that equal nothing: every cell of a row so marked is rewritten when next on screen.
STALE: tuple[Hashable, ...] = tuple(object() for _ in COLUMNS)
SORT_INDEX = {column.key: i for i, column in enumerate(COLUMNS)}
TIME_INDEX = tuple(SORT_INDEX[key] for key in TIME_COLUMNS)


def row_key(key: Key) -> str:
    return f"{key[0]}{SEP}{key[1]}"


def job_key(row: RowKey | str) -> Key:
    value = row.value if isinstance(row, RowKey) else row
    provider, _, job = (value or "").partition(SEP)
    return (provider, job)


class JobsTable(DataTable[Any]):
    """All jobs the current filter lets through, one row each, keyed by (provider, job)."""

    BINDINGS = [
        *(Binding(str(i + 1), f"sort({i})", f"sort {c.label}", show=False) for i, c in enumerate(COLUMNS)),
        Binding("escape", "unpin", "let go", show=False),
    ]

    class Pinned(Message):
        """The held job changed (None: nothing held, the table follows the sort again)."""

        def __init__(self, key: Key | None) -> None:
            super().__init__()
            self.key = key

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, JobsTable.Pinned)

    class Sorted(Message):
        def __init__(self, column: str, reverse: bool) -> None:
            super().__init__()
            self.column = column
            self.reverse = reverse

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, JobsTable.Sorted)

    def __init__(
        self,
        store: Store,
        palette: Palette,
        clock: ViewClock,
        *,
        redraw_every: float = 0.25,
        monotonic: Callable[[], float] = time.monotonic,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True, show_cursor=False)
        self.store = store
        self.palette = palette
        self.clock = clock
        self.sort_column = DEFAULT_SORT
        self.sort_reverse = False
        self.pinned: Key | None = None
        self.redraw_every = redraw_every
        self._monotonic = monotonic
        self._shown: dict[Key, tuple[Hashable, ...]] = {}  # what each row's cells show
        self._latest: dict[Key, tuple[Hashable, ...]] = {}  # what they should show
        self._stale: set[Key] = set()  # rows whose cells lag behind (off screen until drawn)
        self._times: dict[Key, tuple[str, str]] = {}  # the time cells as last written
        self._waiting: list[Key] = []  # new jobs not yet given a row
        self._leaving: set[Key] = set()  # jobs that left the filter, rows not yet removed
        self._unsorted = False
        self._last_redraw = float("-inf")
        self._visible = range(0)
        self.cell_updates = 0  # counters for the benchmark and tests
        self.sorts = 0

    def on_mount(self) -> None:
        for column in COLUMNS:
            self.add_column(self._label(column.key), width=column.width, key=column.key)

    def on_resize(self, event: events.Resize) -> None:
        """The detail pane opening shrinks the table: keep the held row in sight."""
        if self.pinned is not None:
            # (the held row's place when the call runs: keys pressed meanwhile have moved the hold)
            self.call_after_refresh(self._show_held)

    def _show_held(self) -> None:
        if self.pinned is not None:
            with contextlib.suppress(RowDoesNotExist):
                self.move_cursor(row=self.get_row_index(row_key(self.pinned)), animate=False)

    # -- applying changes ---------------------------------------------------------------------------
    def apply(self, changes: Changes) -> None:
        """Bring the rows up to date with the store, doing as little as the screen needs.

        DataTable redraws every visible line after any change (its caches are keyed by one update
        counter), so the table is touched at most every `redraw_every` seconds: then new rows are
        added, rows re-sorted, and `update_cell` called for changed cells of rows on screen. Rows off
        screen are brought up to date when they scroll into view (at once: that is the user moving).
        """
        if changes.reset:
            self.rebuild()
            return
        jobs = self.store.jobs
        latest = self._latest
        sort_index = SORT_INDEX[self.sort_column]
        self._waiting.extend(changes.new)
        self._leaving.update(changes.removed)
        for key in changes.changed:
            job = jobs.get(key)
            old = latest.get(key)
            if job is None or old is None:
                continue  # no row yet: it will be drawn from the store when added
            new = row_values(job)
            if new != old:
                latest[key] = new
                self._stale.add(key)
                if new[sort_index] != old[sort_index]:
                    self._unsorted = True
        now = self._monotonic()
        if now - self._last_redraw >= self.redraw_every:
            self._last_redraw = now
            if self._leaving and self.pinned is None:
                self._remove_leaving()
            if self._waiting:
                self._add_waiting()
            self._maybe_sort()
            self.refresh_visible()
        else:
            self.follow_scroll()

    def follow_scroll(self) -> None:
        """After a scroll, bring the rows that came into view up to date (also while paused)."""
        if self.visible_rows() != self._visible:
            self.refresh_visible()

    def _add_waiting(self) -> None:
        jobs = self.store.jobs
        for key in self._waiting:
            job = jobs.get(key)
            if job is None or key in self._latest:
                continue
            self._add(key, job)
            self._unsorted = True
        self._waiting.clear()

    def _remove_leaving(self) -> None:
        """Rows of jobs that left the filter; held back while a row is held, so nothing shifts."""
        for key in self._leaving:
            if self._latest.pop(key, None) is not None:
                self.remove_row(row_key(key))
            self._shown.pop(key, None)
            self._times.pop(key, None)
            self._stale.discard(key)
        self._leaving.clear()

    def _add(self, key: Key, job: JobView) -> None:
        self._latest[key] = self._shown[key] = row_values(job)
        self._times[key] = time_texts(job, self.clock)
        self.add_row(*row_cells(job, self.palette, self.clock), key=row_key(key))

    def visible_rows(self) -> range:
        first = max(0, int(self.scroll_y))
        return range(first, min(self.row_count, first + self.scrollable_content_region.height))

    def refresh_visible(self) -> None:
        """Write the changed cells of the rows on screen, and their times as the view clock moves."""
        stale, times = self._stale, self._times
        jobs, palette, clock = self.store.jobs, self.palette, self.clock
        self._visible = self.visible_rows()
        for row in self._visible:
            key = self.key_at(row)
            job = jobs.get(key) if key is not None else None
            if key is None or job is None:
                continue
            rkey = row_key(key)
            if key in stale:
                stale.discard(key)
                new, old = self._latest[key], self._shown[key]
                if new != old:
                    self._shown[key] = new
                    for i, column in enumerate(COLUMNS):
                        if new[i] != old[i] and i not in TIME_INDEX:
                            self.update_cell(rkey, column.key, column.cell(job, palette, clock))
                            self.cell_updates += 1
            now = time_texts(job, clock)
            if now != times.get(key):
                old_times = times.get(key, ("", ""))
                times[key] = now
                for name, text, before in zip(TIME_COLUMNS, now, old_times, strict=True):
                    if text != before:
                        self.update_cell(rkey, name, time_cell(name, text, palette))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.refresh_visible()

    def rebuild(self) -> None:
        """Start over from the store (new snapshot). A held row keeps its place if it still exists."""
        order = [job_key(row.key) for row in self.ordered_rows] if self.pinned else []
        self.clear()
        self._shown.clear()
        self._latest.clear()
        self._stale.clear()
        self._times.clear()
        self._waiting.clear()
        self._leaving.clear()
        jobs = self.store.jobs
        if self.pinned:
            kept = [key for key in order if key in jobs]
            seen = set(kept)
            keys: Iterable[Key] = kept + [key for key in jobs if key not in seen]
        else:
            keys = self._sorted(jobs.values())
        for key in keys:
            self._add(key, jobs[key])
        self._unsorted = False
        if self.pinned:
            if self.pinned in jobs:
                self.move_cursor(row=self.get_row_index(row_key(self.pinned)), animate=False)
            else:
                self._unsorted = True  # rows were laid out in the old order for the held row's sake
                self.unpin()

    def restyle(self, palette: Palette) -> None:
        """A new theme: redraw every row with its colours."""
        self.palette = palette
        for key in self._shown:
            self._shown[key] = STALE  # every cell differs: rewritten as it comes into view
        self._stale.update(self._shown)
        self._times.clear()
        self.refresh_visible()

    # -- sorting ---------------------------------------------------------------------------------------
    def _label(self, key: str) -> Text:
        column = COLUMN_BY_KEY[key]
        label = Text(column.label, justify="right" if column.right else "left")
        if key == self.sort_column:
            label.append(" ▼" if self.sort_reverse else " ▲", style="bold")
        return label

    def _sorted(self, jobs: Iterable[JobView]) -> list[Key]:
        sort = COLUMN_BY_KEY[self.sort_column].sort
        return [job.key for job in sorted(jobs, key=sort, reverse=self.sort_reverse)]

    def _maybe_sort(self) -> None:
        if not self._unsorted or self.pinned is not None:
            return
        self._unsorted = False
        self.sorts += 1
        jobs = self.store.jobs
        sort = COLUMN_BY_KEY[self.sort_column].sort

        def by_job(cells: tuple[Text, Text]) -> Any:  # the provider and job cells: the row's key
            job = jobs.get((cells[0].plain, cells[1].plain))
            return sort(job) if job is not None else ()

        self.sort("provider", "job", key=by_job, reverse=self.sort_reverse)
        self.refresh_visible()  # other rows are on screen now

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if column not in COLUMN_BY_KEY:
            return
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else False
        old = self.sort_column
        self.sort_column, self.sort_reverse = column, reverse
        for key in {old, column}:
            self.columns[ColumnKey(key)].label = self._label(key)
        self._unsorted = True
        if self.pinned is None:
            self._maybe_sort()
        else:
            self._touch()  # no sort while a row is held, but the header's arrow must be redrawn
        self.post_message(self.Sorted(column, reverse))

    def _touch(self) -> None:
        """Rewrite one cell with its own value: DataTable then redraws, header included."""
        key = self.key_at(self.cursor_row)
        if key is not None:
            self.update_cell(row_key(key), "provider", self.get_cell(row_key(key), "provider"))

    def action_sort(self, index: int) -> None:
        if 0 <= index < len(COLUMNS):
            self.sort_by(COLUMNS[index].key)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(str(event.column_key.value))

    # -- holding a row ---------------------------------------------------------------------------------
    def key_at(self, row: int) -> Key | None:
        if not 0 <= row < self.row_count:
            return None
        return job_key(self.coordinate_to_cell_key(Coordinate(row, 0)).row_key)

    def pin(self, key: Key) -> bool:
        """Hold `key`: show the cursor on it and stop re-sorting."""
        try:
            row = self.get_row_index(row_key(key))
        except RowDoesNotExist:
            return False
        self.show_cursor = True
        self.move_cursor(row=row, animate=False)
        self._set_pinned(key)
        return True

    def unpin(self) -> None:
        self.show_cursor = False
        self._set_pinned(None)
        if self._leaving:
            self._remove_leaving()
        self._maybe_sort()

    def action_unpin(self) -> None:
        if self.pinned is not None:
            self.unpin()

    def _set_pinned(self, key: Key | None) -> None:
        if key != self.pinned:
            self.pinned = key
            self.post_message(self.Pinned(key))

    def _sync_pin(self) -> None:
        if self.show_cursor:
            key = self.key_at(self.cursor_row)
            if key is not None:
                self._set_pinned(key)

    def _grab(self) -> bool:
        """First navigation key: put the cursor on the top visible row instead of moving it."""
        if self.pinned is not None or not self.row_count:
            return False
        row = min(self.row_count - 1, max(0, int(self.scroll_y)))
        self.show_cursor = True
        self.move_cursor(row=row, animate=False, scroll=False)
        self._sync_pin()
        return True

    def _navigate(self, move: Callable[[], None]) -> None:
        if not self._grab():
            move()
            self._sync_pin()

    def action_cursor_up(self) -> None:
        self._navigate(super().action_cursor_up)

    def action_cursor_down(self) -> None:
        self._navigate(super().action_cursor_down)

    def action_page_up(self) -> None:
        self._navigate(super().action_page_up)

    def action_page_down(self) -> None:
        self._navigate(super().action_page_down)

    def action_scroll_top(self) -> None:
        self._navigate(super().action_scroll_top)

    def action_scroll_bottom(self) -> None:
        self._navigate(super().action_scroll_bottom)

    def action_select_cursor(self) -> None:
        if not self._grab():
            super().action_select_cursor()

    async def _on_click(self, event: events.Click) -> None:
        meta = event.style.meta
        if meta.get("row", -1) >= 0 and "column" in meta:
            self.show_cursor = True  # DataTable's own handler then moves the cursor to the click
            self.call_next(self._sync_pin)
