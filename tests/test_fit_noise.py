"""The error factor of PSF fits on correlated noise (`core.fit_noise`) against the
scatter of fits on noise made with that correlation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from core.config import ForcedPhotometryConfig
from core.convolve import convolved_noise_correlation
from core.exposure import Exposure
from core.fit_noise import psf_fit_noise_factor
from core.forced import PsfStamps, noise_scale
from core.psf import GaussianPsf


@pytest.mark.parametrize(
    ("psf_sigma", "kernel_sigma", "ring"),
    [(1.7, 0.0, 0), (1.7, 0.0, 5), (3.0, 0.0, 1), (1.7, 1.0, 5), (3.0, 2.5, 8)],
)
def test_factor_matches_the_scatter_of_fits_on_such_noise(psf_sigma, kernel_sigma, ring):
    """White noise without a ring: 1; a ring's median adds its pi / 2 variance (a 1 px
    ring around a wide PSF: 1.65, where the ring's mean would give 1.45); noise
    convolved by a Gaussian kernel: the factor (3-8 here) within 4% of the robust
    scatter of flux / error at 8000 positions (itself good to ~1.5%)."""
    rng = np.random.default_rng(11)
    n = 1024
    image = rng.normal(size=(n, n))
    variance, rho = 1.0, None
    if kernel_sigma:
        yy, xx = np.mgrid[-12:13, -12:13]
        kernel = np.exp(-(xx**2 + yy**2) / (2 * kernel_sigma**2))
        kernel /= kernel.sum()
        image = fftconvolve(image, kernel, mode="same")
        variance, rho = float(np.sum(kernel**2)), convolved_noise_correlation(None, kernel)
    exposure = Exposure.from_arrays(
        image, np.full((n, n), variance, np.float32), psf=GaussianPsf(psf_sigma)
    )
    exposure.noise_correlation = rho
    config = ForcedPhotometryConfig(fit_background=False, n_noise_positions=8000)
    stamps = PsfStamps(exposure.psf, exposure, config=config)
    measured = noise_scale(exposure, stamps, config, sky_ring=ring)
    factor = psf_fit_noise_factor(stamps, rho, ring)
    if not kernel_sigma and not ring:
        assert factor == pytest.approx(1.0, abs=1e-9)
    assert factor == pytest.approx(measured, rel=0.04)
