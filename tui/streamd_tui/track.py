"""Start following a job that streamd did not submit: a provider and its id (or Wiro task token)."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select


@dataclass(frozen=True, slots=True)
class TrackRequest:
    provider: str
    ref: str


class TrackScreen(ModalScreen[TrackRequest | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, providers: list[str], provider: str | None = None) -> None:
        super().__init__()
        self.providers = providers
        self.provider = provider if provider in providers else (providers[0] if providers else None)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Track a job by id", classes="title")
            yield Select([(p, p) for p in self.providers], value=self.provider or Select.NULL, id="provider")
            yield Input(placeholder="job id (Wiro: task id or socket token)", id="ref")
            yield Label("", id="track-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Track", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#ref", Input).focus()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        provider = self.query_one("#provider", Select).value
        ref = self.query_one("#ref", Input).value.strip()
        if not isinstance(provider, str) or not ref:
            self.query_one("#track-error", Label).update("choose a provider and give a job id")
            return
        self.dismiss(TrackRequest(provider, ref))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
