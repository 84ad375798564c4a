"""The background measured off the detected sources (`background_off_sources`)."""

from __future__ import annotations

import numpy as np

from core.background import background_off_sources
from core.detection import background_estimate
from core.exposure import Exposure
from core.psf import MoffatPsf
from tests.conftest import add_point_source

SKY = 1000.0


def _field(n: int, seed: int = 1, size: int = 256):
    """Bright Moffat stars on a flat sky of `SKY` with Gaussian noise."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, size - 20, n)
    y = rng.uniform(20, size - 20, n)
    model = np.zeros((size, size))
    for xi, yi in zip(x, y, strict=True):
        add_point_source(model, MoffatPsf(4.0, beta=2.5), xi, yi, 2e5)
    image = rng.normal(model + SKY, np.sqrt(SKY + model)).astype(np.float32)
    return Exposure.from_arrays(image, np.full(image.shape, SKY, np.float32)), x, y


def test_stars_wings_leave_the_sky_off_the_sources_at_its_level():
    """A few bright winged stars raise the mesh's clipped medians; with discs of 3 FWHM
    around them left out, the cells read the sky."""
    exposure, x, y = _field(12)
    mesh = background_estimate(exposure)
    off = background_off_sources(exposure, x, y, 12.0, mesh)
    raised = np.median(mesh.background()) - SKY
    assert raised > 0.5, raised
    assert abs(np.median(off.background()) - SKY) < 0.2 * raised
    # the noise map is the cells' too: the sky's own
    assert abs(np.median(off.noise()) / np.sqrt(SKY) - 1) < 0.05


def test_cells_the_discs_cover_take_the_fallback():
    """A cell left with under a quarter of its pixels (a crowded field) keeps the
    fallback's background at its centre."""
    exposure, x, y = _field(12)
    mesh = background_estimate(exposure)
    # one more "source" covering the top-left cell whole
    off = background_off_sources(exposure, np.append(x, 31.5), np.append(y, 31.5), 50.0, mesh)
    assert off.median[0, 0] == np.float32(mesh.background(np.array([31]))[0, 31])
    assert off.median[-1, -1] != mesh.median[-1, -1]
