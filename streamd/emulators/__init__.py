"""Loopback emulators of the providers' APIs, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamd.emulators.base import Emulator

EMULATORS: dict[str, str] = {
    "oxen": "streamd.emulators.oxen:OxenEmulator",
    "wiro": "streamd.emulators.wiro:WiroEmulator",
    "runware": "streamd.emulators.runware:RunwareEmulator",
    "apiframe": "streamd.emulators.apiframe:ApiframeEmulator",
}


def create(name: str, **knobs: Any) -> Emulator:
    """knobs: seed (int), speed (float, >1 is faster), fail_rate (float)."""
    module, _, cls = EMULATORS[name].partition(":")
    factory: Any = getattr(importlib.import_module(module), cls)
    emulator: Emulator = factory(**knobs)
    return emulator
