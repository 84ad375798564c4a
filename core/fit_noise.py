"""The error factor of a PSF fit on correlated noise, from the noise's autocorrelation.

A PSF fit's variance-plane error treats pixels as independent. Convolution (the
matching kernel, a score's preconvolution) and resampling correlate neighbours,
and the true variance of the fitted flux F = sum w_i d_i is sum_ij w_i w_j C_ij.
With the local sky taken as the median of a ring around the fitted box, the
median's linear (Bahadur) form gives its covariances: with the fit's pixels
those of the ring's mean, among the ring's pixels (2 / pi) arcsin(rho) times
pi / 2 (white noise: the median's familiar pi / 2 variance).

Why not measure it: the scatter of fluxes at random positions (`core.forced.noise_scale`)
is right on a difference, which is empty sky almost everywhere, but on the images
before subtraction it measures the stars: in a crowded field most random stamps
hold starlight: the SAAO bulge's science and template errors came out 9-85x the
difference's (the template's up to 1600x its pixel noise).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import fftconvolve

from .forced import PsfStamps

__all__ = ["psf_fit_noise_factor"]


def _lag_sum(auto: np.ndarray, correlation: np.ndarray) -> float:
    """Sum over lags of ``auto`` (a cross-correlation of weight images) times
    ``correlation`` (odd square centred on lag 0), on the lags both cover."""
    ca, cc = auto.shape[0] // 2, correlation.shape[0] // 2
    m = min(ca, cc)
    return float(
        np.sum(
            auto[ca - m : ca + m + 1, ca - m : ca + m + 1]
            * correlation[cc - m : cc + m + 1, cc - m : cc + m + 1]
        )
    )


def psf_fit_noise_factor(
    stamps: PsfStamps, correlation: np.ndarray | None, sky_ring: int = 0
) -> float:
    """True / variance-plane error of a PSF fit (`core.forced.psf_photometry`, no
    fitted background) on noise of normalised autocorrelation ``correlation``
    (`Exposure.noise_correlation`; None: white), with the local sky the median of a
    ``sky_ring`` px ring around the fitted box (0: none).

    The fit is taken at the PSF of the frame's centre on locally uniform variance;
    1.0 for white noise without a ring.
    """
    rho = np.ones((1, 1)) if correlation is None else np.asarray(correlation, np.float64)
    # the stamp of a point source on a pixel centre at the middle of the nodes' grid
    x = 0.5 * (stamps.nodes_x[0] + stamps.nodes_x[-1])
    y = 0.5 * (stamps.nodes_y[0] + stamps.nodes_y[-1])
    psf = stamps.at([math.floor(x)], [math.floor(y)])[0][0]
    energy = float(np.sum(psf * psf))
    if not energy > 0:
        return 1.0
    weights = psf / energy  # flux = sum(weights * data) on uniform variance
    r = sky_ring
    fit = np.pad(weights, r)
    ring = np.pad(np.zeros_like(weights), r, constant_values=1.0)
    n_ring = float(ring.sum())

    def correlate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return fftconvolve(a, b[::-1, ::-1], mode="full")

    variance = _lag_sum(correlate(fit, fit), rho)
    if n_ring:
        ring *= -float(weights.sum()) / n_ring
        variance += 2.0 * _lag_sum(correlate(fit, ring), rho)
        variance += _lag_sum(correlate(ring, ring), np.arcsin(np.clip(rho, -1.0, 1.0)))
    return math.sqrt(max(variance, 0.0) / float(np.sum(weights * weights)))
