"""Submit a job from the dashboard: provider, model, prompt, optional image URLs and options.

Options are a JSON object passed through to the provider as `streamd submit` would; the form
checks it parses before anything is sent, so a typo is a message here, not a provider error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Select

from streamd_tui.provider_form import ProviderForm

DEFAULT_MODELS = {
    "oxen": "bytedance-seedream-4",
    "wiro": "bytedance/seedream-v4",
    "runware": "bytedance:5@0",
    "apiframe": "seedream-4",
}


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    provider: str
    model: str
    prompt: str
    images: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


def parse_options(text: str) -> dict[str, Any]:
    """`{"width": 1024}` or empty; raises ValueError with a message fit for the form."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"options: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError('options: give a JSON object, like {"width": 1024}')
    return value


class SubmitScreen(ProviderForm[SubmitRequest]):
    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Submit a job", classes="title")
            yield self.provider_select()
            yield Input(value=DEFAULT_MODELS.get(self.provider or "", ""), placeholder="model", id="model")
            yield Input(placeholder="prompt", id="prompt")
            yield Input(placeholder="image URLs, space-separated (optional)", id="images")
            yield Input(placeholder='options as JSON, e.g. {"width": 1024, "height": 1024} (optional)', id="options")
            yield Label("", id="submit-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Submit", id="ok", variant="primary")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    @on(Select.Changed, "#provider")
    def _provider_changed(self, event: Select.Changed) -> None:
        model = self.query_one("#model", Input)
        if isinstance(event.value, str) and (not model.value or model.value in DEFAULT_MODELS.values()):
            model.value = DEFAULT_MODELS.get(event.value, model.value)

    def _error(self, text: str) -> None:
        self.query_one("#submit-error", Label).update(text)

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        provider = self.query_one("#provider", Select).value
        model = self.query_one("#model", Input).value.strip()
        prompt = self.query_one("#prompt", Input).value.strip()
        images = self.query_one("#images", Input).value.split()
        if not isinstance(provider, str):
            self._error("choose a provider")
            return
        if not model or not prompt:
            self._error("a model and a prompt are needed")
            return
        try:
            options = parse_options(self.query_one("#options", Input).value)
        except ValueError as exc:
            self._error(str(exc))
            return
        self.dismiss(SubmitRequest(provider, model, prompt, images, options))
