"""App-level messages. Each replaces a stale one of its kind still in the queue (`can_replace`),
so a burst of link changes or history loads costs one update, not a backlog of outdated ones.
"""

from __future__ import annotations

from textual.message import Message

from streamd.events import CloudEvent
from streamd_tui.link import LinkStatus
from streamd_tui.model import Key


class LinkChanged(Message):
    """The connection to the daemon changed state (connecting, live, waiting to reconnect...)."""

    def __init__(self, status: LinkStatus) -> None:
        super().__init__()
        self.status = status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LinkChanged)


class HistoryLoaded(Message):
    """A job's history as the journal keeps it, for the detail pane; only the newest load matters."""

    def __init__(self, key: Key, events: list[CloudEvent], error: str | None = None) -> None:
        super().__init__()
        self.key = key
        self.events = events
        self.error = error

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, HistoryLoaded)
