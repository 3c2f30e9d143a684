"""The seam between the daemon and a provider.

A provider package has three parts: `normalise.py` (pure: payloads in, `Observation`s out),
`client.py` (REST requests), and a `Provider` subclass (I/O: holds the push channel, polls,
repairs after reconnects). The daemon gives each provider a `Context`; everything a provider
learns goes out through `Context.emit`, and everything it must remember across restarts
(a Wiro task token, a Runware session) goes through `Context.remember`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus

from streamd.config import ProviderSettings
from streamd.events import Health, Job, Observation


class SubmitRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str
    images: list[str] = msgspec.field(default_factory=list)  # URLs, or local paths where supported
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class ProviderError(Exception):
    """A provider said no, or could not be reached. `message` is for people and holds no secret.

    Codes: auth, rate_limited, balance, concurrency, bad_request, not_found, unavailable,
    cannot_cancel, unsupported.
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Context(Protocol):
    """What the daemon offers a provider. All methods are safe to call from the provider's tasks."""

    @property
    def provider(self) -> str: ...

    async def emit(self, *observations: Observation) -> None:
        """Hand observations to the tracker; returns once they are queued for the journal."""

    async def health(self, health: Health, *, message: str | None = None, delay: float | None = None) -> None:
        """Report the connection's health (deduplicated by the daemon: repeats are dropped)."""

    def unfinished(self) -> list[Job]:
        """This provider's jobs that have not reached a terminal state."""

    def follow(self, job: str) -> Mapping[str, str]:
        """What `remember` stored for `job` (empty if nothing)."""

    async def remember(self, job: str, follow: Mapping[str, str]) -> None:
        """Persist what is needed to keep following `job` after a restart (may hold credentials;
        kept in the job store only, never served on the feed)."""

    def wake(self) -> anyio.Event:
        """Set whenever a job is tracked or submitted, so pollers can look sooner."""


class Provider(abc.ABC):
    """One provider's I/O. Subclasses set `name` and implement the four operations."""

    name: ClassVar[str]

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def run(self, ctx: Context, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the push channel and poll until cancelled. Call `task_status.started()` once the
        first connection attempt has finished (successful or not): readiness waits for it."""

    @abc.abstractmethod
    async def submit(self, ctx: Context, request: SubmitRequest) -> list[str]:
        """Start a job; returns the job ids (several for a batch). Emits their first events."""

    @abc.abstractmethod
    async def track(self, ctx: Context, ref: str) -> str:
        """Follow a job submitted elsewhere; returns its job id."""

    @abc.abstractmethod
    async def cancel(self, ctx: Context, job: str) -> str:
        """Cancel (or kill) a job; returns a one-line description of what was done."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        """Release clients; called with a time-boxed, shielded scope on shutdown."""
