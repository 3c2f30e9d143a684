"""The one filter language of the CLI, the feed and the dashboard.

    provider:oxen status:running,queued -status:failed model:seedream* cat

Terms are ANDed; a term's comma-separated values are ORed; `-` or `!` negates a term; values may
use `*` and `?` globs; bare words match the job id, model or prompt as case-insensitive text.
A positive `status` term also matches the state event that moves a job *out* of a matching state
(its `previous`), so a filtered stream tells its reader when a job leaves the set.
Fields: provider (p), job (j, id), status (s, state), model (m), kind (k), origin (o), text (t).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass, field
from typing import Protocol

FIELDS = {
    "provider": "provider",
    "p": "provider",
    "job": "job",
    "j": "job",
    "id": "job",
    "status": "status",
    "state": "status",
    "s": "status",
    "model": "model",
    "m": "model",
    "kind": "kind",
    "k": "kind",
    "origin": "origin",
    "o": "origin",
    "text": "text",
    "t": "text",
}


class FilterError(ValueError):
    pass


class Filterable(Protocol):
    """What a filter looks at: an event's data or a job (missing attributes read as None)."""

    provider: str


@dataclass(frozen=True)
class Term:
    field: str
    patterns: tuple[re.Pattern[str], ...]
    negated: bool = False
    source: str = ""

    def hits(self, item: object) -> bool:
        if self.field == "text":
            values = [getattr(item, name, None) for name in ("job", "model", "prompt")]
            texts = [str(v).lower() for v in values if v]
            return any(p.search(t) for p in self.patterns for t in texts)
        value = getattr(item, self.field, None)
        if self.field == "status" and not self.negated and self._left(item):
            return True
        if value is None:
            return False
        text = str(value).lower()
        return any(p.fullmatch(text) for p in self.patterns)

    def _left(self, item: object) -> bool:
        """A state event whose `previous` state matches: the job is leaving the filtered set, and a
        view filtered on `status` must hear it or it would show the job in its old state forever."""
        previous = getattr(item, "previous", None)
        return previous is not None and any(p.fullmatch(str(previous).lower()) for p in self.patterns)


@dataclass(frozen=True)
class Filter:
    terms: tuple[Term, ...] = field(default=())
    text: str = ""

    def __call__(self, item: object) -> bool:
        return all(t.hits(item) != t.negated for t in self.terms)

    def __bool__(self) -> bool:
        return bool(self.terms)


MATCH_ALL = Filter()


def _pattern(value: str, *, text: bool) -> re.Pattern[str]:
    value = value.lower()
    if text and not any(c in value for c in "*?"):
        return re.compile(re.escape(value))
    regex = fnmatch.translate(value)
    if text:
        regex = regex.removeprefix("(?s:").removesuffix(")\\Z")
    return re.compile(regex)


def parse(expr: str | None) -> Filter:
    """Parse a filter expression; raises FilterError with a message fit for a person."""
    if not expr or not expr.strip():
        return MATCH_ALL
    try:
        words = shlex.split(expr)
    except ValueError as exc:
        raise FilterError(f"filter {expr!r}: {exc}") from None
    terms = []
    for word in words:
        negated = word[:1] in "-!" and len(word) > 1
        body = word[1:] if negated else word
        name, sep, value = body.partition(":")
        if not sep:
            name, sep, value = body.partition("=")
        if sep and name.lower() in FIELDS:
            fld = FIELDS[name.lower()]
        elif sep and re.fullmatch(r"[A-Za-z_]+", name):
            known = ", ".join(sorted({v for v in FIELDS.values()}))
            raise FilterError(f"filter {word!r}: unknown field {name!r} (known: {known})")
        else:
            fld, value = "text", body
        values = [v for v in value.split(",") if v] if fld != "text" else [value]
        if not values:
            raise FilterError(f"filter {word!r}: no value after {name}:")
        patterns = tuple(_pattern(v, text=fld == "text") for v in values)
        terms.append(Term(fld, patterns, negated, word))
    return Filter(tuple(terms), expr.strip())
