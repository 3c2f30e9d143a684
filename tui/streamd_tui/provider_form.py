"""What the submit and track dialogs share: a provider to choose, Esc or "Cancel" to close with None."""

from __future__ import annotations

from typing import TypeVar

from textual import on
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Button, Select

ResultT = TypeVar("ResultT")


class ProviderForm(ModalScreen[ResultT | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, providers: list[str], provider: str | None = None) -> None:
        super().__init__()
        self.providers = providers
        self.provider = provider if provider in providers else (providers[0] if providers else None)

    def provider_select(self) -> Select[str]:
        return Select([(p, p) for p in self.providers], value=self.provider or Select.NULL, id="provider")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
