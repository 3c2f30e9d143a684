"""Shared by the dashboard tests: a seeded fake daemon and waiting for a condition (never for a time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from streamd_tui.app import StreamdApp, make_app
from streamd_tui.fake import FakeDaemon
from textual.pilot import Pilot

from streamd.events import Health, State

SOCKET = Path("/nonexistent/streamd.sock")
PROVIDERS = ("oxen", "wiro", "runware", "apiframe")
#: Generous: a loaded 2-core machine may be slow, and a passing test never waits this long.
PATIENCE = 20.0


def seeded(jobs: int = 12, *, now: float | None = None) -> FakeDaemon:
    """A daemon with `jobs` jobs across the four providers in assorted states, and their health."""
    now = time.time() if now is None else now
    fake = FakeDaemon()
    fake.health("oxen", Health.CONNECTED)
    fake.health("wiro", Health.RECONNECTING, "socket closed (1006)", 4.0)
    fake.health("runware", Health.CONNECTED)
    fake.health("apiframe", Health.POLLING)
    for i in range(jobs):
        provider = PROVIDERS[i % 4]
        job = f"{provider[:2]}-{i:03d}"
        start = now - 600 + i * 10
        fake.emit(provider, job, State.QUEUED, model=f"model-{i % 3}", prompt=f"prompt number {i}", at=start)
        if i % 2:
            fake.emit(provider, job, State.RUNNING, at=start + 3)
    return fake


def app_for(fake: FakeDaemon, **options: Any) -> StreamdApp:
    """The real app against `fake`, with short delays so tests do not idle."""
    defaults: dict[str, Any] = {
        "reconnect_delays": (0.02,),
        "status_every": 0.1,
        "reconcile_every": 0.1,
        "debounce": 0.2,
        "redraw_every": 0.0,
    }
    return make_app(SOCKET, fake.connect, **{**defaults, **options})


async def wait_until(pilot: Pilot[Any] | None, predicate: Callable[[], object], what: str = "condition") -> None:
    """Let the app run until `predicate()` holds; fail (after a long patience) if it never does."""
    with anyio.fail_after(PATIENCE):
        while not predicate():
            if pilot is not None:
                await pilot.pause(0.02)
            else:
                await anyio.sleep(0.01)
    if pilot is not None:
        await pilot.pause()


def keys_in_view(app: StreamdApp) -> list[tuple[str, str]]:
    """The table's rows, top to bottom."""
    table = app.table
    return [k for k in (table.key_at(i) for i in range(table.row_count)) if k is not None]
