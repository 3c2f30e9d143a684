"""Reconnect delays: exponential with full jitter, capped, reset after a healthy spell. Pure."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def backoff(
    initial: float = 1.0,
    maximum: float = 60.0,
    factor: float = 2.0,
    jitter: float = 0.5,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Delays for successive attempts: initial, initial*factor, ... capped at `maximum`.

    Each delay is reduced by up to `jitter` of itself at random, so that many clients cut off
    together do not come back together.
    """
    delay = initial
    while True:
        yield delay * (1.0 - jitter * rand())
        delay = min(delay * factor, maximum)


@dataclass
class Reconnector:
    """Backoff state for one connection: `delay()` after a failure; `connected(now)` on success.

    The sequence restarts only once a connection has stayed up for `healthy_after` seconds, so a
    server that accepts then drops at once still gets backed off.
    """

    initial: float = 1.0
    maximum: float = 60.0
    healthy_after: float = 30.0
    rand: Callable[[], float] = random.random
    _gen: Iterator[float] = field(init=False)
    _up_since: float | None = field(default=None, init=False)
    attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._gen = backoff(self.initial, self.maximum, rand=self.rand)

    def connected(self, now: float) -> None:
        self._up_since = now

    def delay(self, now: float, *, at_least: float = 0.0) -> float:
        """The wait before the next attempt; `at_least` carries a server's Retry-After."""
        if self._up_since is not None and now - self._up_since >= self.healthy_after:
            self._gen = backoff(self.initial, self.maximum, rand=self.rand)
            self.attempts = 0
        self._up_since = None
        self.attempts += 1
        return max(next(self._gen), at_least)


def retry_after(value: str | None, *, default: float = 1.0, cap: float = 600.0) -> float:
    """Seconds from a Retry-After header (delta-seconds, or an HTTP date), bounded."""
    if not value:
        return default
    value = value.strip()
    try:
        return min(max(float(value), 0.0), cap)
    except ValueError:
        pass
    import time
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return default
    return min(max(when - time.time(), 0.0), cap)
