"""`streamd tui`: the live dashboard, a client of the daemon's feed and nothing else.

Frames from the feed are queued by the link (`link.py`) and applied to the store on a timer
(`TICK_HZ`), in batches. The table then gets `add_row` for new jobs and `update_cell` for changed
cells on screen, at most every `redraw_every` seconds (each DataTable change redraws every visible
line); side panels are redrawn about once a second. `make_app()` takes the feed's `connect`, so
tests and the benchmark run the real app against an in-memory daemon (`fake.py`).
"""

from __future__ import annotations

import gc
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.theme import Theme
from textual.timer import Timer
from textual.widgets import Footer, Input

from streamd.events import CloudEvent
from streamd_tui.confirm import ConfirmScreen
from streamd_tui.detail import DetailPane
from streamd_tui.distributions import DistributionPanel
from streamd_tui.filter_bar import FilterBar
from streamd_tui.format import COLUMNS, Palette, ViewClock
from streamd_tui.health import HealthPanel
from streamd_tui.jobs_table import JobsTable
from streamd_tui.link import DELAYS, Connect, FeedLink, LinkStatus, describe, fetch_history
from streamd_tui.messages import HistoryLoaded, LinkChanged
from streamd_tui.model import Key, Store
from streamd_tui.rates import RatesPanel
from streamd_tui.status_bar import StatusBar
from streamd_tui.submit import SubmitRequest, SubmitScreen
from streamd_tui.track import TrackRequest, TrackScreen

TICK_HZ = 10
#: Most events applied in one tick; a larger backlog (a long catch-up) spreads over several ticks.
BATCH_LIMIT = 20_000
KNOWN_PROVIDERS = ("apiframe", "oxen", "runware", "wiro")
FREEZE_AT = 1000
HISTORY_AFTER = 0.2  # seconds the cursor rests on a row before its history is read from the journal
DETAIL_EVERY = 0.25  # seconds between redraws of the detail pane while its job keeps changing
ACTIVE_FILTER = "-status:completed,failed,cancelled"


@dataclass(frozen=True, slots=True)
class Batch:
    """One tick's work, for the benchmark: events applied and where the time went."""

    at: float  # perf_counter at the start of the tick
    applied: int
    seq: int  # newest seq applied
    apply_s: float  # folding events into the store
    view_s: float  # updating widgets (cells, rows, sort)


class StreamdApp(App[int]):
    """The dashboard. Construct it with `make_app()`."""

    CSS_PATH = "streamd.tcss"
    TITLE = "streamd"
    BINDINGS = [
        Binding("slash", "focus_filter", "filter"),
        Binding("p,space", "toggle_pause", "pause"),
        Binding("c", "cancel_job", "cancel job"),
        Binding("y", "copy_url", "copy URL"),
        Binding("t", "track", "track"),
        Binding("n", "submit", "new job"),
        Binding("a", "active_only", "active only", show=False),
        Binding("s", "toggle_side", "side panel", show=False),
        Binding("escape", "leave_filter", "back", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(
        self,
        socket: Path,
        connect: Connect,
        *,
        clock: Callable[[], float] = time.time,
        tick_hz: float = TICK_HZ,
        reconnect_delays: Sequence[float] = DELAYS,
        status_every: float = 2.0,
        reconcile_every: float = 5.0,
        filter: str = "",
        debounce: float = 0.3,
        redraw_every: float = 0.25,
        history: bool = True,
    ) -> None:
        super().__init__()
        self.socket = socket
        self.connect = connect
        self.wall = clock
        self.tick_hz = tick_hz
        self.store = Store()
        self.palette = Palette()
        self.view_clock = ViewClock(clock)
        self.link = FeedLink(
            socket,
            connect,
            self.store,
            on_status=self._link_changed,
            delays=reconnect_delays,
            status_every=status_every,
            reconcile_every=reconcile_every,
            filter=filter,
        )
        self.link_status = self.link.status
        self.debounce = debounce
        self.redraw_every = redraw_every
        self.load_history = history
        self.paused = False
        self.batches: deque[Batch] = deque(maxlen=100_000)
        self.held_history: list[CloudEvent] | None = None
        self._pin_when_seen: Key | None = None
        self._last_slow = 0.0
        self._last_detail = 0.0
        self._detail_stale = False
        self._last_status = 0.0
        self._timer: Timer | None = None
        self._history_timer: Timer | None = None

    def _link_changed(self, status: LinkStatus) -> None:
        self.post_message(LinkChanged(status))

    # -- layout -----------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield FilterBar(debounce=self.debounce, id="filter")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield JobsTable(self.store, self.palette, self.view_clock, redraw_every=self.redraw_every, id="jobs")
                yield DetailPane(self.palette, self.view_clock, id="detail")
            with Vertical(id="side"):
                yield HealthPanel(id="health")
                yield RatesPanel(id="rates")
                yield DistributionPanel(id="timings")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def table(self) -> JobsTable:
        return self.query_one(JobsTable)

    @property
    def detail(self) -> DetailPane:
        return self.query_one(DetailPane)

    def on_mount(self) -> None:
        self.palette.load(self.theme_variables)
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.query_one("#filter", FilterBar).applied = self.link.filter
        self.query_one("#filter-input", Input).value = self.link.filter
        self.query_one("#health").border_title = "providers"
        self.query_one("#rates").border_title = "activity"
        self.query_one("#timings").border_title = "queue wait · run time (recent jobs)"
        self.table.border_title = "jobs"
        self.detail.show(None, None)
        self.table.focus()
        self.run_worker(self.link.run(), name="feed", group="feed")
        self._timer = self.set_interval(1 / self.tick_hz, self.tick, name="apply")
        self._refresh_status(force=True)

    def _theme_changed(self, theme: Theme) -> None:
        self.palette.load(self.theme_variables)
        self.table.restyle(self.palette)
        self._slow_refresh(self.wall())

    # -- applying the feed -------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply what the link queued since the last tick; while paused, keep the view as it was."""
        if not self.is_running:
            # Shutting down: Textual prunes the screens before it stops the app's timers.
            return
        start = time.perf_counter()
        now = self.wall()
        applied = self.store.apply_pending(now, limit=BATCH_LIMIT)
        applied_at = time.perf_counter()
        if not self.paused:
            self.view_clock.tick()
            changes = self.store.take_changes()
            table = self.table
            table.apply(changes)
            if changes.reset and len(self.store) >= FREEZE_AT:
                # A big snapshot is long-lived: keep the cyclic GC from rescanning it (a 10k-job
                # table made each full collection pause the screen for a few hundred ms).
                gc.freeze()
            held = table.pinned
            if held is not None and (changes.reset or held in changes.changed):
                self._detail_stale = True
            if self._detail_stale and time.monotonic() - self._last_detail >= DETAIL_EVERY:
                self._show_held()  # at most a few times a second: the pane's layout costs a full redraw
            wanted = self._pin_when_seen
            if wanted is not None and wanted in self.store.jobs and table.pin(wanted):
                self._pin_when_seen = None
            if now - self._last_slow >= 1.0:
                self._slow_refresh(now)
        else:
            self.table.follow_scroll()
        self._refresh_status()
        if applied:
            end = time.perf_counter()
            self.batches.append(Batch(start, applied, self.store.last_seq, applied_at - start, end - applied_at))

    def _slow_refresh(self, now: float) -> None:
        """About once a second: clocks, health, sparklines, timings."""
        self._last_slow = now
        self.query_one(HealthPanel).refresh_from(self.store, self.palette, now)
        self.query_one(RatesPanel).refresh_from(self.store, now)
        self.query_one(DistributionPanel).refresh_from(self.store, self.palette)
        if self.table.pinned is not None:
            self._show_held()

    def _refresh_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_status < 0.25:
            return
        self._last_status = now
        self.query_one(StatusBar).show(
            self.palette,
            self.link_status,
            seq=self.store.last_seq,
            jobs=self.table.row_count,
            filter=self.link.filter,
            sort=f"{self.table.sort_column} {'▼' if self.table.sort_reverse else '▲'}",
            paused_events=self.store.peek_changes().events if self.paused else None,
            held=self.table.pinned is not None,
        )

    def on_link_changed(self, message: LinkChanged) -> None:
        self.link_status = message.status
        self._refresh_status(force=True)

    # -- the held job and its detail ---------------------------------------------------------------------
    def _show_held(self) -> None:
        self._detail_stale = False
        self._last_detail = time.monotonic()
        key = self.table.pinned
        self.detail.show(self.store.get(key) if key else None, self.held_history)

    def on_jobs_table_pinned(self, message: JobsTable.Pinned) -> None:
        self.held_history = None
        self.set_class(message.key is not None, "-holding")
        self._show_held()
        self._refresh_status(force=True)
        if self._history_timer is not None:
            self._history_timer.stop()
            self._history_timer = None
        if message.key is not None and self.load_history:
            # wait for the cursor to rest: each load is a connection that reads the journal
            key = message.key
            self._history_timer = self.set_timer(
                HISTORY_AFTER,
                lambda: self.run_worker(self._load_history(key), group="history", exclusive=True),
            )

    async def _load_history(self, key: Key) -> None:
        try:
            events = await fetch_history(self.connect, self.socket, key)
        except Exception as exc:  # the journal is a nicety: the pane still shows recent events
            self.post_message(HistoryLoaded(key, [], describe(exc)))
        else:
            self.post_message(HistoryLoaded(key, events))

    def on_history_loaded(self, message: HistoryLoaded) -> None:
        if message.key == self.table.pinned:
            self.held_history = message.events
            self._show_held()

    def on_jobs_table_sorted(self, message: JobsTable.Sorted) -> None:
        self._refresh_status(force=True)

    # -- filter ------------------------------------------------------------------------------------------
    @on(FilterBar.Applied)
    def _filter_applied(self, message: FilterBar.Applied) -> None:
        self.link.set_filter(message.text)
        self._refresh_status(force=True)

    def action_focus_filter(self) -> None:
        self.query_one("#filter-input", Input).focus()

    def action_leave_filter(self) -> None:
        if isinstance(self.focused, Input) and self.focused.id == "filter-input":
            self.table.focus()

    def action_active_only(self) -> None:
        self.query_one(FilterBar).set_text(ACTIVE_FILTER)

    def set_filter(self, text: str) -> None:
        self.query_one(FilterBar).set_text(text)

    def action_toggle_side(self) -> None:
        """Give the table the whole width on narrow terminals."""
        self.toggle_class("-no-side")

    # -- pause -------------------------------------------------------------------------------------------
    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        self.view_clock.frozen = self.paused
        self.set_class(self.paused, "-paused")
        if not self.paused:
            waiting = self.store.peek_changes().events
            self.notify(f"{waiting:,} new events while paused", title="resumed")
            self.tick()
        self._refresh_status(force=True)

    # -- actions on jobs ---------------------------------------------------------------------------------
    def _held_or_warn(self) -> Key | None:
        key = self.table.pinned
        if key is None:
            self.notify("Hold a job first: move onto it with ↑/↓ or click it.", severity="warning")
        return key

    def action_cancel_job(self) -> None:
        key = self._held_or_warn()
        if key is None:
            return
        job = self.store.get(key)
        if job is not None and job.status.terminal:
            self.notify(f"{key[0]}/{key[1]} already ended: {job.status.value}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._cancel(key), group="requests")

        self.push_screen(ConfirmScreen(f"Cancel job {key[1]} on {key[0]}?"), answered)

    async def _cancel(self, key: Key) -> None:
        client = self.link.client
        if client is None:
            self.notify("Not connected to the daemon; try again when it is back.", severity="error")
            return
        try:
            result = await client.cancel(key[0], key[1])
        except Exception as exc:
            self.notify(describe(exc), title="cancel failed", severity="error")
        else:
            self.notify(str(result.get("message") or "cancel requested"), title="cancel")

    def action_copy_url(self) -> None:
        key = self._held_or_warn()
        job = self.store.get(key) if key else None
        if job is None:
            return
        urls = list(job.outputs) or list(job.paths)
        if not urls:
            self.notify("This job has no outputs yet.", severity="warning")
            return
        self.copy_to_clipboard(urls[0])
        more = f" (1 of {len(urls)})" if len(urls) > 1 else ""
        self.notify(f"{urls[0]}{more}", title="copied")

    def _providers(self) -> list[str]:
        return sorted(self.store.providers) or list(KNOWN_PROVIDERS)

    def action_track(self) -> None:
        held = self.table.pinned
        self.push_screen(TrackScreen(self._providers(), held[0] if held else None), self._tracked)

    def _tracked(self, request: TrackRequest | None) -> None:
        if request is not None:
            self.run_worker(self._track(request), group="requests")

    async def _track(self, request: TrackRequest) -> None:
        client = self.link.client
        if client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        try:
            result = await client.track(request.provider, request.ref)
        except Exception as exc:
            self.notify(describe(exc), title="track failed", severity="error")
            return
        job = str(result.get("job") or request.ref)
        self._pin_when_seen = (request.provider, job)
        self.notify(f"{request.provider}/{job}", title="tracking")

    def action_submit(self) -> None:
        held = self.table.pinned
        self.push_screen(SubmitScreen(self._providers(), held[0] if held else None), self._submitted)

    def _submitted(self, request: SubmitRequest | None) -> None:
        if request is not None:
            self.run_worker(self._submit(request), group="requests")

    async def _submit(self, request: SubmitRequest) -> None:
        client = self.link.client
        if client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        try:
            result = await client.submit(
                request.provider, request.model, request.prompt, images=request.images, options=request.options
            )
        except Exception as exc:
            self.notify(describe(exc), title="submit failed", severity="error")
            return
        jobs = [str(j) for j in result.get("jobs") or ()]
        if jobs:
            self._pin_when_seen = (request.provider, jobs[0])
        self.notify(", ".join(jobs) or "submitted", title=f"submitted to {request.provider}")

    # -- command palette ---------------------------------------------------------------------------------
    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Pause / resume", "Freeze the view while events keep arriving", self.action_toggle_pause)
        yield SystemCommand("Cancel the held job", "Asks first", self.action_cancel_job)
        yield SystemCommand("Copy output URL", "Of the held job, to the clipboard", self.action_copy_url)
        yield SystemCommand("Track a job", "Follow a job by provider and id", self.action_track)
        yield SystemCommand("Submit a job", "Provider, model, prompt", self.action_submit)
        yield SystemCommand("Active jobs only", f"Filter: {ACTIVE_FILTER}", self.action_active_only)
        yield SystemCommand("Clear the filter", "Show every job", lambda: self.set_filter(""))
        yield SystemCommand("Let go of the held row", "The table follows its sort again", self.table.action_unpin)
        for column in COLUMNS:
            yield SystemCommand(
                f"Sort by {column.label}", "Again to reverse", lambda key=column.key: self.table.sort_by(key)
            )


def tune_gc() -> None:
    """Fewer full collections, for a process that holds a big table and redraws it often.

    DataTable's render caches churn tens of thousands of objects a second; with Python's default
    thresholds a full collection ran every second or so, each stopping the screen for 100-300 ms
    with 10,000 rows (see bench/bench_tui.py). Called by `run()` and `run_async()`, not by tests.
    """
    gc.set_threshold(10_000, 20, 20)


def make_app(socket: Path, connect: Connect | None = None, **options: Any) -> StreamdApp:
    """The dashboard for the daemon at `socket`; `connect` defaults to the real feed client."""
    if connect is None:
        from streamd.feed.client import FeedClient

        connect = FeedClient.connect
    return StreamdApp(socket, connect, **options)


def run(socket: Path) -> int:
    """Run the dashboard in this terminal until the user quits; the exit code for `streamd tui`.

    With no daemon listening, one line on stderr and exit code 1, before the screen is taken over.
    """
    from streamd.feed.client import FeedClient, FeedError

    async def probe() -> None:
        async with FeedClient.connect(socket):
            pass

    try:
        anyio.run(probe)
    except FeedError as exc:
        print(f"streamd tui: {exc.message}", file=sys.stderr)
        return 1
    tune_gc()
    app = make_app(socket, FeedClient.connect)
    code = app.run()
    return code if isinstance(code, int) else (app.return_code or 0)


async def run_async(socket: Path, connect: Connect | None = None) -> int:
    """Run the dashboard inside a running event loop (`streamd demo`).

    Cancelling the caller asks the app to exit and waits for it, so the terminal is always restored.
    """
    tune_gc()
    app = make_app(socket, connect)
    done = anyio.Event()
    code = 0

    async def runner() -> None:
        nonlocal code
        with anyio.CancelScope(shield=True):
            try:
                result = await app.run_async()
                code = result if isinstance(result, int) else (app.return_code or 0)
            finally:
                done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                app.exit(0)
                await done.wait()
            raise
    return code
