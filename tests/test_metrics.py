"""core.metrics: the robust noise statistics behind noise_ratio."""

from __future__ import annotations

import numpy as np
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
