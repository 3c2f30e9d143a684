"""The envelope's time: `rfc3339` formats a second once and repeats the last text, and must still say
exactly what datetime says for every timestamp."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.events import rfc3339


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1, max_size=4))
def test_rfc3339_is_datetimes_text_with_a_z(stamps: list[float]) -> None:
    for ts in [*stamps, *stamps]:  # repeated: the one-entry cache must not hand out another stamp's text
        want = datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert rfc3339(ts) == want
