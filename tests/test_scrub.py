"""`is_clean`: the fast path that skips `scrub` must never skip a payload that scrub would change."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamd.events import REDACTED, is_clean, loads, scrub, scrub_decoded

KEYS = st.sampled_from(
    ["id", "status", "url", "apiKey", "API_KEY", "token", "taskToken", "monkey", "note", "api\u212aey", "x", ""]
)
TEXT = st.text(alphabet=st.sampled_from(list("abkeyKEY tokn=:\"'{}[]\\/\u212a\u00e9\u0130")), max_size=24)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | TEXT, inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=VALUES, ascii_only=st.booleans(), as_bytes=st.booleans())
def test_a_clean_text_decodes_to_what_scrub_leaves_alone(value: Any, ascii_only: bool, as_bytes: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    data: str | bytes = text.encode() if as_bytes else text
    decoded = loads(data)
    if is_clean(data):
        assert scrub(decoded) == decoded
        assert scrub_decoded(decoded, data) is decoded
    else:
        assert scrub_decoded(decoded, data) == scrub(decoded)


@pytest.mark.parametrize(
    "text",
    [
        '{"apiKey": "sk-1"}',
        '{"api\\u004bey": "sk-1"}',  # a name spelled with an escape
        '{"api\u212aey": "sk-1"}',  # KELVIN SIGN lower-cases to "k"
        b'{"api\xe2\x84\xaaey": "sk-1"}',  # the same, as bytes
        '{"note": "Authorization: Bearer abc"}',
        "[" * 33 + "1" + "]" * 33,  # deeper than scrub keeps
        b'{"TOKEN": 1}',
        b"\xff{}",  # not UTF-8: not known to be clean
    ],
)
def test_what_scrub_would_change_is_never_called_clean(text: str | bytes) -> None:
    assert not is_clean(text)


def test_an_ordinary_payload_is_clean_and_kept_as_it_is() -> None:
    text = '{"generation_id":"g-1","status":"succeeded","model":"seedream-4","url":"http://127.0.0.1/o.png"}'
    decoded = loads(text)
    assert is_clean(text) and is_clean(text.encode())
    assert scrub_decoded(decoded, text) is decoded
    secret = '{"generation_id":"g-1","apiKey":"sk-1"}'
    assert scrub_decoded(loads(secret), secret)["apiKey"] == REDACTED
