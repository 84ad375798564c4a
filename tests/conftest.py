"""Shared fixtures: simulated pairs (cached per session) and the real-data fixtures folder."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

pytest_plugins = ["tests.service_fixtures"]

#: gzipped copies of the project's real survey images (see tests/data/real/README.md)
REAL_DATA = Path(__file__).resolve().parent / "data" / "real"


@lru_cache(maxsize=16)
def simulated_pair(name: str, size: int, seed: int):
    """A simulated pair from a named preset; cached, so tests must not mutate it."""
    from core.simulate import preset, simulate_pair

    return simulate_pair(preset(name, size=size, seed=seed))


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        raise FileNotFoundError(f"the real test data is missing: {REAL_DATA}")
    return REAL_DATA
