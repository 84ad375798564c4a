"""Rescaling of a variance plane to the noise measured in the pixels (algorithm.md 1.6).

Variance planes from headers or upstream pipelines are often off by a constant
factor (correlated noise from resampling, wrong gain). The kernel fit weights
and the decorrelation use them, so they are rescaled before the fit.
"""

from __future__ import annotations

import warnings

import numpy as np

from .config import ScaleVarianceConfig
from .errors import ExceedsMaxVarianceScaleError
from .exposure import Exposure

__all__ = ["mesh_background", "variance_scale_factor", "scale_variance"]

# 0.741301... x IQR is the standard deviation of a Gaussian
_IQR_TO_SIGMA = 0.7413
_SAMPLE_PIXELS = 1_000_000


def mesh_background(image: np.ndarray, good: np.ndarray, bin_size: int) -> np.ndarray:
    """Smooth background: medians of good pixels on a mesh, interpolated bilinearly.

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx)
    good : `numpy.ndarray` (ny, nx), bool
        Pixels that may enter the medians.
    bin_size : int
        Mesh cell side in pixels; partial cells at the top/right are included.

    Returns
    -------
    background : `numpy.ndarray` (ny, nx), float32
    """
    ny, nx = image.shape
    my, mx = max(1, -(-ny // bin_size)), max(1, -(-nx // bin_size))
    pad_y, pad_x = my * bin_size - ny, mx * bin_size - nx
    data = np.pad(
        np.where(good, image, np.nan).astype(np.float32),
        ((0, pad_y), (0, pad_x)),
        constant_values=np.nan,
    )
    cells = data.reshape(my, bin_size, mx, bin_size).transpose(0, 2, 1, 3).reshape(my, mx, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells are expected
        mesh = np.nanmedian(cells, axis=2)
    if np.all(np.isnan(mesh)):
        return np.zeros(image.shape, dtype=np.float32)
    # empty cells take the median of the others rather than NaN
    mesh = np.where(np.isfinite(mesh), mesh, np.nanmedian(mesh))
    # cell centres sit at (k + 0.5) * bin_size - 0.5 in pixel units; outside the outer
    # centres the surface is extrapolated linearly rather than held flat (gradients)
    wy = _linear_weights((np.arange(ny) + 0.5) / bin_size - 0.5, my)
    wx = _linear_weights((np.arange(nx) + 0.5) / bin_size - 0.5, mx)
    return (wy @ mesh @ wx.T).astype(np.float32)


def _linear_weights(coords: np.ndarray, n: int) -> np.ndarray:
    """(len(coords), n) matrix of linear interpolation/extrapolation weights on 0..n-1."""
    weights = np.zeros((coords.size, n))
    if n == 1:
        weights[:, 0] = 1.0
        return weights
    left = np.clip(np.floor(coords).astype(int), 0, n - 2)
    frac = coords - left
    rows = np.arange(coords.size)
    weights[rows, left] = 1.0 - frac
    weights[rows, left + 1] = frac
    return weights


def variance_scale_factor(exposure: Exposure, config: ScaleVarianceConfig | None = None) -> float:
    """Factor by which the variance plane must be multiplied to match the pixel noise.

    Raises
    ------
    ExceedsMaxVarianceScaleError
        When both the pixel-based and the image-based estimates exceed ``config.limit``.
    """
    config = config or ScaleVarianceConfig()
    # a regular subsample of about a million pixels measures a noise scale to 0.1%
    step = max(1, int(np.sqrt(exposure.image.size / _SAMPLE_PIXELS)))
    sample = np.s_[::step, ::step]
    image, variance = exposure.image[sample], exposure.variance[sample]
    good = (
        ~exposure.masked(config.mask_planes)[sample]
        & np.isfinite(image)
        & np.isfinite(variance)
        & (variance > 0)
    )
    if np.count_nonzero(good) < 2:
        return 1.0
    bin_size = max(4, config.background_bin_size // step)
    residual = image - mesh_background(image, good, bin_size)
    values = residual[good]
    snr = values / np.sqrt(variance[good])
    q25, q75 = np.percentile(snr, [25, 75])
    factor = float((_IQR_TO_SIGMA * (q75 - q25)) ** 2)
    if factor > config.limit:
        q25, q75 = np.percentile(values, [25, 75])
        factor = float((_IQR_TO_SIGMA * (q75 - q25)) ** 2 / np.median(variance[good]))
        if factor > config.limit:
            raise ExceedsMaxVarianceScaleError(
                f"the variance plane underestimates the pixel noise by a factor {factor:.1f} "
                f"(limit {config.limit}); check the gain/read-noise keywords or the variance file, "
                "or disable do_scale_variance"
            )
    return factor


def scale_variance(exposure: Exposure, config: ScaleVarianceConfig | None = None) -> float:
    """Multiply the variance plane of ``exposure`` in place by its scale factor; return it."""
    factor = variance_scale_factor(exposure, config)
    if factor > 0 and np.isfinite(factor):
        exposure.variance *= np.float32(factor)
    return factor
