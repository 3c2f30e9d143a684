"""Helpers shared by tests: a provider Context that records what a provider emits."""

from __future__ import annotations

import time
from collections.abc import Mapping

import anyio

from streamd.events import EventData, Health, Job, Kind, Observation, Origin
from streamd.lifecycle import Tracker


class RecordingContext:
    """A `providers.base.Context` backed by a real Tracker, without journal or feed.

    `observations` holds everything emitted; `events` what the tracker let through (what a
    subscriber would see); `healths` the health reports in order.
    """

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self.tracker = Tracker()
        self.observations: list[Observation] = []
        self.events: list[EventData] = []
        self.healths: list[tuple[Health, str | None, float | None]] = []
        self.follows: dict[str, dict[str, str]] = {}
        self._wake = anyio.Event()
        self._changed = anyio.Event()

    @property
    def provider(self) -> str:
        return self._provider

    async def emit(self, *observations: Observation) -> None:
        for obs in observations:
            self.observations.append(obs)
            self.events.extend(self.tracker.apply(obs, time.time()))
        self._changed.set()
        self._changed = anyio.Event()

    async def health(self, health: Health, *, message: str | None = None, delay: float | None = None) -> None:
        if not self.healths or self.healths[-1][:2] != (health, message):
            self.healths.append((health, message, delay))
        await self.emit(
            Observation(
                provider=self._provider,
                job=None,
                kind=Kind.HEALTH,
                upstream=health.value,
                origin=Origin.DAEMON,
                health=health,
                message=message,
                delay=delay,
            )
        )

    def unfinished(self) -> list[Job]:
        return self.tracker.unfinished(self._provider)

    def follow(self, job: str) -> Mapping[str, str]:
        return self.follows.get(job, {})

    async def remember(self, job: str, follow: Mapping[str, str]) -> None:
        self.follows[job] = dict(follow)
        self._wake.set()
        self._wake = anyio.Event()

    def wake(self) -> anyio.Event:
        return self._wake

    # -- for tests -----------------------------------------------------------------------------
    def job(self, job: str) -> Job | None:
        return self.tracker.get(self._provider, job)

    def states(self, job: str) -> list[str]:
        """The state sequence a subscriber saw for `job`."""
        return [e.status.value for e in self.events if e.job == job and e.kind is Kind.STATE and e.status]

    async def wait_for(self, predicate: object, within: float = 20.0) -> None:
        """Wait until predicate() is true, re-checking after every emit."""
        assert callable(predicate)
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()
