"""Deblending by the highest path between peaks (core.saddles): close transients stay
apart, one extended residual is not broken into many sources."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.config import DiaSourceConfig
from core.diasources import detect_dia_sources
from core.exposure import Exposure
from core.psf import GaussianPsf
from core.saddles import key_saddles, sampling_dip

NOISE = 10.0
SHAPE = (160, 160)


def _blob(x: float, y: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def _exposure(image: np.ndarray, sigma: float, seed: int) -> Exposure:
    noisy = image + np.random.default_rng(seed).normal(size=SHAPE) * NOISE
    variance = np.full(SHAPE, NOISE**2, dtype=np.float32)
    return Exposure.from_arrays(noisy.astype(np.float32), variance, psf=GaussianPsf(sigma))


def _near(det, x: float, y: float, radius: float, sign: int = 1) -> int:
    return int(((np.hypot(det.col - x, det.row - y) < radius) & (det.sign == sign)).sum())


def test_key_saddle_follows_the_footprint_not_the_line():
    """Two bumps on a ring: the line between them crosses the hole (0), the highest
    path goes round the ring (100)."""
    yy, xx = np.mgrid[:41, :41]
    radius = np.hypot(xx - 20, yy - 20)
    box = 100.0 * np.exp(-((radius - 12) ** 2) / 8)
    box += 10.0 * np.exp(-((xx - 8) ** 2 + (yy - 20) ** 2) / 4)
    box += 20.0 * np.exp(-((xx - 32) ** 2 + (yy - 20) ** 2) / 4)
    inside = box > 50
    peaks = np.array([[20, 32], [20, 8]])
    saddle = key_saddles(box, inside, peaks)
    assert saddle[0] == -np.inf
    # the ring's crest between them, sampled on the grid: 100 less the grid's dip
    assert 100 * (1 - sampling_dip(1.0)) < saddle[1] <= 100.5
    assert ndimage.map_coordinates(box, [[20] * 5, np.linspace(8, 32, 5)], order=1).min() < 1


def test_key_saddles_of_separate_ranges():
    """Three peaks: each's saddle is where its region meets higher ground."""
    row = np.array([[5.0, 1.0, 7.0, 3.0, 9.0]])
    saddles = key_saddles(row, np.ones(row.shape, bool), np.array([[0, 0], [0, 2], [0, 4]]))
    np.testing.assert_array_equal(saddles, [1.0, 3.0, -np.inf])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mismatched_star_ring_is_one_source(seed):
    """A bright star subtracted with a 25% too narrow PSF leaves a ring of S/N ~140
    around a negative core. The line test split the ring into 8-9 positive sources (the
    line between two of its pixels crosses the core); round the ring the grid's
    sampling alone dips ~5 sigma."""
    sigma = 1.8
    image = 3e5 * (_blob(80.3, 79.6, 1.25 * sigma) - _blob(80.3, 79.6, sigma))
    det = detect_dia_sources(_exposure(image, sigma, seed), DiaSourceConfig())
    assert _near(det, 80.3, 79.6, 4, sign=-1) == 1
    assert 1 <= _near(det, 80.3, 79.6, 15) <= 2


@pytest.mark.parametrize("is_score", [False, True])
@pytest.mark.parametrize("sigma", [0.9, 1.8])
@pytest.mark.parametrize("separation_fwhm", [2.0, 3.0])
def test_close_transients_stay_two_sources(is_score, sigma, separation_fwhm):
    """Two S/N ~20 transients 2-3 FWHM apart, any direction and sub-pixel phase, are
    two sources on a difference and on a score, also at JWST-like sampling."""
    rng = np.random.default_rng(int(10 * sigma + separation_fwhm))
    for seed in range(4):
        x0, y0 = 80 + rng.uniform(-0.5, 0.5), 80 + rng.uniform(-0.5, 0.5)
        angle = rng.uniform(0, np.pi)
        step = separation_fwhm * 2.3548 * sigma
        x1, y1 = x0 + step * np.cos(angle), y0 + step * np.sin(angle)
        # matched-filter S/N of a Gaussian point source: flux / (noise sqrt(4 pi sigma^2))
        flux = 20 * NOISE * np.sqrt(4 * np.pi) * sigma
        image = flux * (_blob(x0, y0, sigma) + _blob(x1, y1, sigma))
        det = detect_dia_sources(_exposure(image, sigma, seed), DiaSourceConfig(), is_score)
        assert _near(det, x0, y0, 1.5) == 1
        assert _near(det, x1, y1, 1.5) == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_brightened_galaxy_is_one_source(seed):
    """An exponential galaxy (half-light radius 6 px) 10% brighter in the science: its
    residual, S/N ~60 at the centre, is one source."""
    sigma = 1.8
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    disc = np.exp(-1.678 * np.hypot(xx - 80.2, (yy - 79.7) / 0.7) / 6.0)
    galaxy = ndimage.gaussian_filter(disc / disc.sum() * 1.5e6, sigma)
    det = detect_dia_sources(_exposure(0.1 * galaxy, sigma, seed), DiaSourceConfig())
    assert _near(det, 80.2, 79.7, 25) == 1
    assert np.abs(det.peak_snr).max() > 30
