"""Variance rescaling (algorithm.md 1.6) and the mesh background."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import ScaleVarianceConfig
from core.errors import ExceedsMaxVarianceScaleError
from core.exposure import Exposure
from core.variance import scale_variance, variance_scale_factor


def _noise_exposure(sigma, variance, shape=(512, 512), seed=0, sky=None):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, sigma, shape)
    if sky is not None:
        image += sky
    return Exposure.from_arrays(image, np.full(shape, variance))


def test_factor_recovers_wrong_variance_despite_a_sky_gradient():
    yy, xx = np.mgrid[0:512, 0:512]
    exposure = _noise_exposure(3.0, 4.0, sky=100 + 0.2 * xx - 0.1 * yy)
    assert variance_scale_factor(exposure) == pytest.approx(9.0 / 4.0, rel=0.02)


def test_masked_pixels_are_ignored():
    exposure = _noise_exposure(2.0, 4.0)
    exposure.image[:100] += 1000 * np.random.default_rng(1).random((100, 512))
    exposure.set_plane("BAD", np.zeros(exposure.shape, bool))
    exposure.mask[:100] |= exposure.mask_planes.value("BAD")
    assert variance_scale_factor(exposure) == pytest.approx(1.0, rel=0.02)


def test_scale_variance_multiplies_in_place_and_returns_factor():
    exposure = _noise_exposure(1.0, 0.25)
    factor = scale_variance(exposure)
    assert factor == pytest.approx(4.0, rel=0.02)
    assert np.median(exposure.variance) == pytest.approx(0.25 * factor)


def test_image_based_fallback_and_limit():
    exposure = _noise_exposure(10.0, 1.0)  # 100x too small a variance
    with pytest.raises(ExceedsMaxVarianceScaleError, match="factor"):
        variance_scale_factor(exposure, ScaleVarianceConfig(limit=10.0))
    assert variance_scale_factor(exposure, ScaleVarianceConfig(limit=200.0)) == pytest.approx(
        100.0, rel=0.03
    )
