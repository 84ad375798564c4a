"""Shared fixtures: simulated pairs (cached per session), point sources drawn into an
image and the real-data fixtures folder."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["tests.service_fixtures"]

#: gzipped copies of the project's real survey images (see tests/data/real/README.md)
REAL_DATA = Path(__file__).resolve().parent / "data" / "real"


@lru_cache(maxsize=16)
def simulated_pair(name: str, size: int, seed: int):
    """A simulated pair from a named preset; cached, so tests must not mutate it."""
    from core.simulate import preset, simulate_pair

    return simulate_pair(preset(name, size=size, seed=seed))


def bright_transient_pair(n_positive: int, n_negative: int):
    """The 1024 px pair (seed 9111) of a review's bright transients, 2e5-1e6 counts, that
    brighten (``n_positive``) or fade (``n_negative``: in the template only)."""
    from core.simulate import SimulationConfig, simulate_pair

    config = SimulationConfig(
        size=1024,
        seed=9111,
        n_transients=n_positive,
        n_negative_transients=n_negative,
        transient_flux_min=2e5,
        transient_flux_max=1e6,
    )
    return simulate_pair(config)


def add_point_source(image: np.ndarray, psf, x: float, y: float, flux: float | np.floating) -> None:
    """Add ``flux`` times ``psf``'s stamp at array position (x, y) (`Psf.image_at`) to
    ``image``, in place; the stamp cut by the frame (nothing added off it)."""
    stamp, x_min, y_min = psf.image_at(x, y)
    h, w = stamp.shape
    ny, nx = image.shape
    r0, c0 = max(y_min, 0), max(x_min, 0)
    r1, c1 = min(y_min + h, ny), min(x_min + w, nx)
    if r0 < r1 and c0 < c1:
        image[r0:r1, c0:c1] += flux * stamp[r0 - y_min : r1 - y_min, c0 - x_min : c1 - x_min]


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        raise FileNotFoundError(f"the real test data is missing: {REAL_DATA}")
    return REAL_DATA
