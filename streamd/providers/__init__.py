"""Provider registry. Imported lazily so the daemon loads only what it runs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamd.config import ProviderSettings
    from streamd.providers.base import Provider

PROVIDERS: dict[str, str] = {
    "oxen": "streamd.providers.oxen.provider:OxenProvider",
    "wiro": "streamd.providers.wiro.provider:WiroProvider",
    "runware": "streamd.providers.runware.provider:RunwareProvider",
    "apiframe": "streamd.providers.apiframe.provider:ApiframeProvider",
}


def create(settings: ProviderSettings) -> Provider:
    module, _, cls = PROVIDERS[settings.name].partition(":")
    factory: type[Provider] = getattr(importlib.import_module(module), cls)
    return factory(settings)
