"""What every provider emulator shares: fault knobs, job plans, and the ground truth.

Emulators decide each job's fate from a seeded RNG (or from markers in the prompt, for tests):
`[fail]`, `[slow]`, `[fast]`, `[hang]` (never finishes on its own). Tests read `truth` to
compare what streamd reported with what really happened.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from streamd.config import ProviderSettings


@dataclass
class Faults:
    """Knobs a test or benchmark turns while the emulator runs. All are read on each use.

    drop_after: close each push connection after this many frames/events (None: never).
    delay: seconds added before every REST response.
    error_status / error_count: answer the next `error_count` REST requests with this status
        (429 adds `Retry-After: retry_after`); error_count < 0 means "until reset".
    reject_auth: answer every request (and socket auth) as if the key were wrong.
    stall: push connections stop sending (no frames, no keep-alives) while True.
    paused: the emulator's clock stops: jobs make no progress while True.
    """

    drop_after: int | None = None
    delay: float = 0.0
    error_status: int | None = None
    error_count: int = 0
    retry_after: float = 1.0
    reject_auth: bool = False
    stall: bool = False
    paused: bool = False
    errors_served: int = 0
    drops: int = 0

    def take_error(self) -> int | None:
        """The status to fail this request with, if a fault is armed (and count it)."""
        if self.error_status is None or self.error_count == 0:
            return None
        if self.error_count > 0:
            self.error_count -= 1
        self.errors_served += 1
        return self.error_status


@dataclass(frozen=True)
class JobPlan:
    outcome: str  # "succeeded" | "failed" | "hang"
    queue_s: float
    run_s: float
    steps: int
    error: str = ""


FAILURES = (
    "CUDA out of memory while decoding latents",
    "content policy: prompt rejected by safety filter",
    "input image could not be fetched (HTTP 404)",
    "worker lost during inference",
)


def plan_for(prompt: str, rng: random.Random, *, speed: float = 1.0, fail_rate: float = 0.12) -> JobPlan:
    """A job's fate. `speed` > 1 makes everything faster (tests use 20-100)."""
    tags = set(re.findall(r"\[(\w+)\]", prompt))
    scale = (3.0 if "slow" in tags else 0.2 if "fast" in tags else 1.0) / speed
    outcome = "failed" if "fail" in tags else "hang" if "hang" in tags else "succeeded"
    if not tags & {"fail", "hang", "ok"} and rng.random() < fail_rate:
        outcome = "failed"
    return JobPlan(
        outcome=outcome,
        queue_s=rng.uniform(0.3, 3.0) * scale,
        run_s=rng.uniform(2.0, 9.0) * scale,
        steps=rng.choice((20, 25, 30, 40)),
        error=rng.choice(FAILURES) if outcome == "failed" else "",
    )


@dataclass
class Truth:
    """What really happened to a job, for tests to compare with streamd's view."""

    job: str
    state: str  # the provider's final normalised state name: completed/failed/cancelled, or ""
    outputs: list[str] = field(default_factory=list)
    cost: float | None = None
    error: str | None = None


async def ticks(every: float, faults: Faults) -> AsyncIterator[float]:
    """The emulated clock: seconds since the previous tick, or 0.0 while `faults.paused` stops time."""
    last = anyio.current_time()
    while True:
        await anyio.sleep(every)
        now = anyio.current_time()
        dt, last = now - last, now
        yield 0.0 if faults.paused else dt


class Emulator(Protocol):
    """A provider emulator on loopback. `serve` starts its servers and reports readiness."""

    name: str
    faults: Faults
    truth: dict[str, Truth]

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None: ...

    def settings(self) -> ProviderSettings:
        """ProviderSettings pointing streamd at this emulator, with a key it accepts."""

    async def restart(self) -> None:
        """Drop every open connection, as a server restart would (state is kept)."""
