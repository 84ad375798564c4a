"""The background measured off the detected sources (`background_off_sources`)."""

from __future__ import annotations

import numpy as np

from core.background import background_off_sources
from core.detection import background_estimate
from core.exposure import Exposure
from core.psf import MoffatPsf
from tests.conftest import add_point_source

SKY = 1000.0


def _field(n: int, seed: int = 1, size: int = 256, gradient: float = 0.0):
    """Bright Moffat stars on a sky of `SKY` (plus ``gradient`` counts per pixel along x)
    with Gaussian noise; the true sky plane."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, size - 20, n)
    y = rng.uniform(20, size - 20, n)
    model = np.zeros((size, size))
    for xi, yi in zip(x, y, strict=True):
        add_point_source(model, MoffatPsf(4.0, beta=2.5), xi, yi, 2e5)
    sky = SKY + gradient * (np.arange(size) - size / 2)[None, :] + np.zeros((size, 1))
    image = rng.normal(model + sky, np.sqrt(SKY + model)).astype(np.float32)
    return Exposure.from_arrays(image, np.full(image.shape, SKY, np.float32)), x, y, sky


def test_stars_wings_leave_the_sky_off_the_sources_at_its_level():
    """A few bright winged stars raise the mesh's clipped medians; with discs of 3 FWHM
    around them left out, the cells read the sky."""
    exposure, x, y, sky = _field(12)
    mesh = background_estimate(exposure)
    off = background_off_sources(exposure, x, y, 12.0, mesh)
    raised = np.median(mesh.background() - sky)
    assert raised > 0.5, raised
    assert abs(np.median(off.background() - sky)) < 0.2 * raised


def test_a_sky_gradient_does_not_leak_in_through_the_discs():
    """Discs cover a cell unevenly, so its remaining pixels' median sits off the cell's
    centre (raw cell medians on a 0.5 count / px gradient: off by several counts under
    such cells); measured as a correction to the mesh, which carries the gradient, the
    sky's error is the flat field's (same noise, same stars) to 0.2 count."""
    errors = []
    for gradient in (0.0, 0.5):
        exposure, x, y, sky = _field(12, gradient=gradient)
        off = background_off_sources(exposure, x, y, 12.0, background_estimate(exposure))
        errors.append(off.background() - sky)
    leak = errors[1] - errors[0]
    assert np.sqrt(np.mean(leak**2)) < 0.2, np.sqrt(np.mean(leak**2))


def test_cells_the_discs_cover_keep_the_fallback():
    """A cell left with under a quarter of its pixels (a crowded field) keeps the
    fallback's background; sources off the frame or without a position mask nothing."""
    exposure, x, y, sky = _field(12)
    mesh = background_estimate(exposure)
    covered = background_off_sources(exposure, np.array([31.5]), np.array([31.5]), 50.0, mesh)
    assert abs(covered.median[0, 0] - mesh.median[0, 0]) < 1e-3
    # the far cells (no disc there) are measured: the residual's median, not 0
    assert abs(covered.median[-1, -1] - mesh.median[-1, -1]) > 1e-3
    nowhere = background_off_sources(
        exposure, np.array([np.nan, -500.0, 5000.0]), np.array([10.0, 10.0, 10.0]), 12.0, mesh
    )
    none = background_off_sources(exposure, np.zeros(0), np.zeros(0), 12.0, mesh)
    np.testing.assert_array_equal(nowhere.background(), none.background())
