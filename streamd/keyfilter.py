"""A Bloom filter of the job store's keys: a new job's first event needs no job-store read.

The tracker caches unfinished and recently finished jobs; any other job is looked up in the job store
before an observation about it is applied (its row decides duplicates). In a burst of new jobs that is
one read per event for rows that do not exist. The filter answers "certainly not stored" for almost all
of them. Fixed size (1 MiB), so memory does not grow with the store: with 100,000 jobs stored about 1
in 1,700 new jobs is looked up anyway, with 1,000,000 about 1 in 20; a false positive only costs the
read it would have done without the filter.
"""

from __future__ import annotations

from collections.abc import Iterable

BITS = 1 << 23  # 1 MiB
_MASK = BITS - 1


class KeyFilter:
    __slots__ = ("_bits",)

    def __init__(self, keys: Iterable[tuple[str, str]] = ()) -> None:
        self._bits = bytearray(BITS >> 3)
        for key in keys:
            self.add(key)

    def add(self, key: tuple[str, str]) -> bool:
        """Remember `key`; returns whether it may have been there already (False: it certainly was not)."""
        ia, ma, ib, mb = _probes(key)
        bits = self._bits
        seen = bool(bits[ia] & ma) and bool(bits[ib] & mb)
        bits[ia] |= ma
        bits[ib] |= mb
        return seen

    def __contains__(self, key: tuple[str, str]) -> bool:
        ia, ma, ib, mb = _probes(key)
        bits = self._bits
        return bool(bits[ia] & ma) and bool(bits[ib] & mb)


def _probes(key: tuple[str, str]) -> tuple[int, int, int, int]:
    """The two bits of `key`, as (byte, mask) twice, from one 64-bit hash (hash randomisation is fine:
    the filter lives in one process)."""
    h = hash(key)
    a, b = h & _MASK, (h >> 23) & _MASK
    return a >> 3, 1 << (a & 7), b >> 3, 1 << (b & 7)
