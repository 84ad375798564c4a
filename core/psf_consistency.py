"""Does the fitted kernel turn one PSF model into the other?

A PSF-matching kernel K is defined by K * P_convolved = P_target (the template's PSF
into the science's, or into P * P_science for a score). K is fitted on the stars'
pixels, the PSFs are models (given or estimated); when they disagree by much, a model
is wrong, and with it the basis and stamps sized from it, the kernel fitted with
them and the products that take the PSFs as true (JWST's cluster field, both PSFs
estimated, the template's 3.9x too wide: a score keeping ~9% of every constant
source was called good).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal

__all__ = ["effective_width", "kernel_psf_width_ratio"]


def effective_width(stamp: np.ndarray) -> float:
    """sqrt of the noise-equivalent area (sum)^2 / sum(p^2), px: the core's size.

    For a Gaussian it is 2 sqrt(pi) sigma; unlike second moments it does not grow
    with far wings (a WebbPSF's spikes) or kernel noise far from the centre.
    """
    p = np.asarray(stamp, dtype=np.float64)
    total, power = float(p.sum()), float(np.sum(p * p))
    if not (math.isfinite(total) and total > 0 and power > 0):
        return math.nan
    return math.sqrt(total * total / power)


def kernel_psf_width_ratio(
    kernel_image: np.ndarray, convolved_psf: np.ndarray, target_psf: np.ndarray
) -> float:
    """Width of the convolved PSF model seen through the kernel over the target's.

    1 when kernel and PSF models agree; the kernel is applied by correlation, as
    `core.psf.KernelMatchedPsf` draws it (the width does not depend on the flip).
    NaN when a stamp has no positive sum.
    """
    kernel = np.asarray(kernel_image, dtype=np.float64)
    if not float(kernel.sum()) > 0:
        return math.nan
    seen = signal.correlate(np.asarray(convolved_psf, np.float64), kernel, method="auto")
    width, target = effective_width(seen), effective_width(target_psf)
    return width / target if target > 0 else math.nan
