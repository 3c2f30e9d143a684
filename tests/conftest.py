from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """websockets' asyncio client and Textual need asyncio; pin it."""
    return "asyncio"
