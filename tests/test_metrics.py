"""core.metrics: the robust noise statistics behind noise_ratio."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import mad_std

from core.metrics import robust_sigma_median


def test_robust_sigma_is_a_gaussians_sigma_and_ignores_outliers():
    rng = np.random.default_rng(5)
    values = rng.normal(3.0, 2.0, 200_000)
    values[:2000] = 1e6  # 1% wild pixels (cosmic rays, residuals)
    sigma, median = robust_sigma_median(values)
    assert abs(sigma / 2.0 - 1) < 0.02
    assert abs(median - 3.0) < 0.05  # 1% outliers move the median by ~0.013 sigma


def test_robust_sigma_is_the_interquartile_width_not_the_mad():
    # On skewed pixels (faint sources on the sky) the IQR- and MAD-based widths differ;
    # noise_ratio is defined on the IQR.
    rng = np.random.default_rng(6)
    values = rng.normal(0.0, 1.0, 400_000) + np.where(
        rng.random(400_000) < 0.2, rng.exponential(2.0, 400_000), 0.0
    )
    q25, q75 = np.percentile(values, [25, 75])
    sigma, _ = robust_sigma_median(values)
    assert abs(sigma - (q75 - q25) / 1.3489795) < 1e-6
    assert abs(sigma / mad_std(values) - 1) > 0.003  # mad_std would move noise_ratio


def test_robust_sigma_median_of_non_finite_or_no_values_is_nan():
    # as scipy's iqr and np.median propagate NaN
    values = np.arange(100.0)
    values[7] = np.nan
    assert all(np.isnan(v) for v in robust_sigma_median(values))
    values[7] = np.inf
    assert all(np.isnan(v) for v in robust_sigma_median(values))
    assert all(np.isnan(v) for v in robust_sigma_median(np.zeros(0)))


def test_noise_ratio_is_also_measured_per_cell_of_a_3x3_grid():
    """A corner whose noise is 1.3x its variance (a 900 x 600 frame, xy0 (100, 50)):
    its cell reads 1.3, the others 1.0, and the frame's figure is what it was."""
    from core import metrics
    from core.exposure import Exposure

    rng = np.random.default_rng(9)
    shape = (600, 900)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32)
    image[400:, 600:] *= 1.3
    variance = np.ones(shape, np.float32)
    exposure = Exposure.from_arrays(image, variance, xy0=(100, 50))
    out = metrics.noise_statistics(exposure)
    sigma, _ = robust_sigma_median(image.ravel())
    assert out["noise_ratio"] == sigma  # every pixel sampled (fewer than 2^22)
    cells = out["noise_ratio_cells"]
    assert [(cell["x"], cell["y"]) for cell in cells] == [
        ([100 + x0, 100 + x1], [50 + y0, 50 + y1])
        for y0, y1 in ((0, 199), (200, 399), (400, 599))
        for x0, x1 in ((0, 299), (300, 599), (600, 899))
    ]
    # every 4th pixel of the sample: 15,000 a cell, an IQR good to ~1.2%
    assert [cell["n"] for cell in cells] == [15000] * 9
    assert cells[-1]["noise_ratio"] == pytest.approx(1.3, rel=0.04)
    for cell in cells[:-1]:
        assert cell["noise_ratio"] == pytest.approx(1.0, rel=0.04)
