"""Helpers for reporting errors to people."""

from __future__ import annotations


def first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups: task groups wrap what
    their body raises, but a person wants the one line that says what went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
