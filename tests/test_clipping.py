"""The one-sort sigma clipping reproduces astropy's sigma_clipped_stats (mad_std)."""

import warnings

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning

from core.clipping import sigma_clipped_median_std


def _reference(values, sigma, maxiters):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        _, median, std = sigma_clipped_stats(
            np.asarray(values, dtype=np.float64), sigma=sigma, maxiters=maxiters, stdfunc="mad_std"
        )
    return float(median), float(std)


def _samples():
    rng = np.random.default_rng(3)
    sky = rng.normal(1200.0, 35.0, 200_001).astype(np.float32)
    sky[:3000] += rng.exponential(2000.0, 3000).astype(np.float32)  # stars
    yield "sky with stars (odd count)", sky
    yield "even count", sky[:-1]
    counts = rng.poisson(40.0, 50_000).astype(np.float32)  # many ties
    counts[:200] = 5000.0
    yield "integer counts with ties", counts
    low = rng.normal(0.0, 1.0, 10_000)
    low[:500] = -1e4  # a block of low outliers
    yield "low outliers, float64", low
    flat = np.full(1000, 7.0, dtype=np.float32)
    flat[:3] = 9.0
    yield "constant with a few others (MAD 0)", flat
    with_nan = rng.normal(5.0, 2.0, 5000).astype(np.float32)
    with_nan[::7] = np.nan
    with_nan[1] = np.inf
    yield "non-finite values", with_nan
    for size in (1, 2, 3, 4, 5):
        yield f"{size} values", rng.normal(size=size)


@pytest.mark.parametrize("maxiters", [1, 3, 10])
def test_matches_astropy(maxiters):
    for name, values in _samples():
        median, std = sigma_clipped_median_std(values, sigma=3.0, maxiters=maxiters)
        ref_median, ref_std = _reference(values, 3.0, maxiters)
        assert median == ref_median, name
        assert std == pytest.approx(ref_std, rel=1e-12, abs=1e-300), name


def test_other_sigma_and_empty():
    values = np.random.default_rng(8).standard_t(3, 20_000)
    for sigma in (1.5, 2.5, 5.0):
        median, std = sigma_clipped_median_std(values, sigma=sigma, maxiters=10)
        ref_median, ref_std = _reference(values, sigma, 10)
        assert median == ref_median
        assert std == pytest.approx(ref_std, rel=1e-12)
    assert all(np.isnan(sigma_clipped_median_std(np.array([np.nan, np.inf]))))
