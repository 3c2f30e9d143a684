"""Filter-as-you-type, in the one filter language of the CLI and the feed.

The text is checked here (a mistake is shown at once, and never sent) and then handed to the
daemon, which filters and sends a fresh snapshot: the dashboard never holds jobs it was not asked for.
Typing is debounced so each keystroke does not cost a re-subscription.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Input, Label

from streamd.filters import FilterError, parse

PLACEHOLDER = "filter: provider:oxen status:running,queued -status:failed model:seedream* cat   (/ to type)"


class FilterBar(Horizontal):
    """An input and the reason the current text is not a filter (if it is not)."""

    class Applied(Message):
        """A valid filter the user settled on; only the newest matters."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, FilterBar.Applied)

    def __init__(self, *, debounce: float = 0.3, id: str | None = None) -> None:
        super().__init__(id=id)
        self.debounce = debounce
        self.applied = ""
        self.error: str | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder=PLACEHOLDER, id="filter-input", compact=True)
        yield Label("", id="filter-error")

    @property
    def input(self) -> Input:
        return self.query_one("#filter-input", Input)

    def _check(self, text: str) -> bool:
        try:
            parse(text)
        except FilterError as exc:
            self.error = str(exc)
        else:
            self.error = None
        label = self.query_one("#filter-error", Label)
        label.update(self.error or "")
        self.set_class(self.error is not None, "-invalid")
        return self.error is None

    @on(Input.Changed, "#filter-input")
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._check(event.value):
            self._timer = self.set_timer(self.debounce, self._apply)

    @on(Input.Submitted, "#filter-input")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self._check(event.value):
            self._apply()

    def _apply(self) -> None:
        self._timer = None
        text = self.input.value.strip()
        if text != self.applied:
            self.applied = text
            self.post_message(self.Applied(text))

    def set_text(self, text: str) -> None:
        """Replace the filter (from the command palette): applied at once."""
        self.input.value = text
        if self._check(text):
            self._apply()
