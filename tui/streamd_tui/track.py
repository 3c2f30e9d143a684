"""Start following a job that streamd did not submit: a provider and its id (or Wiro task token)."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Select

from streamd_tui.provider_form import ProviderForm


@dataclass(frozen=True, slots=True)
class TrackRequest:
    provider: str
    ref: str


class TrackScreen(ProviderForm[TrackRequest]):
    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Track a job by id", classes="title")
            yield self.provider_select()
            yield Input(placeholder="job id (Wiro: task id or socket token)", id="ref")
            yield Label("", id="track-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Track", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#ref", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        provider = self.query_one("#provider", Select).value
        ref = self.query_one("#ref", Input).value.strip()
        if not isinstance(provider, str) or not ref:
            self.query_one("#track-error", Label).update("choose a provider and give a job id")
            return
        self.dismiss(TrackRequest(provider, ref))
