"""The short variants of the soaks, for CI: faults between streamd and the providers, and daemon
crashes. The long ones: `.venv/bin/python -m tests.reliability.soak --cycles 200 --kills 50`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.crashsoak import crash_soak
from tests.reliability.faultsoak import FAULTS, fault_soak

pytestmark = pytest.mark.anyio


async def test_faults_between_streamd_and_the_providers(short_tmp: Path) -> None:
    """Every fault kind once, each on a random provider (or all), with jobs in flight on all four."""
    figures = await fault_soak(short_tmp, cycles=len(FAULTS), seed=11)
    print("\nfault soak:", figures.summary())
    assert figures.stream is not None
    assert set(figures.injected) == set(FAULTS) and figures.faults == len(FAULTS)
    assert figures.cuts > 0 and figures.refused > 0 and figures.half_opens > 0 and figures.restarts > 0
    assert figures.stream.lost == 0 and figures.stream.duplicates == 0 and figures.stream.reordered == 0
    assert figures.stream.state_duplicates == 0 and figures.stream.backwards == 0
    assert not figures.problems, figures.problems
    assert figures.jobs >= 4 * len(FAULTS) - figures.refused_submits
    assert figures.orphans <= figures.refused_submits


async def test_kill_9_at_random_moments_and_restart(short_tmp: Path) -> None:
    figures = await crash_soak(short_tmp, kills=3, seed=11, speed=8.0)
    print("\ncrash soak:", figures.summary())
    assert figures.stream is not None
    assert figures.starts == 4 and figures.resumes == 3 and figures.epochs == 1 and figures.gaps == 0
    assert figures.stream.lost == 0 and figures.stream.duplicates == 0 and figures.stream.reordered == 0
    assert figures.stream.state_duplicates == 0 and figures.stream.backwards == 0
    assert not figures.problems, figures.problems
    assert figures.jobs > 0
