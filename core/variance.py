"""Rescaling of a variance plane to the noise measured in the pixels (algorithm.md 1.6).

Variance planes from headers or upstream pipelines are often off by a constant
factor (correlated noise from resampling, wrong gain). The kernel fit weights
and the decorrelation use them, so they are rescaled before the fit.
"""

from __future__ import annotations

import numpy as np

from .config import ScaleVarianceConfig
from .errors import ExceedsMaxVarianceScaleError
from .exposure import Exposure
from .sources import background_map

__all__ = ["variance_scale_factor", "scale_variance"]

# 0.741301... x IQR is the standard deviation of a Gaussian
_IQR_TO_SIGMA = 0.7413
_SAMPLE_PIXELS = 1_000_000


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
    subsample = Exposure(
        exposure.image[sample],
        exposure.variance[sample],
        exposure.mask[sample],
        mask_planes=exposure.mask_planes,
    )
    image, variance = subsample.image, subsample.variance
    good = (
        ~subsample.masked(config.mask_planes)
        & np.isfinite(image)
        & np.isfinite(variance)
        & (variance > 0)
    )
    if np.count_nonzero(good) < 2:
        return 1.0
    bin_size = max(4, config.background_bin_size // step)
    background, _ = background_map(subsample, bin_size, ignore_planes=config.mask_planes)
    residual = image - background
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
