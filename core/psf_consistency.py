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

from .errors import PsfError
from .psf import SIGMA_TO_FWHM, _half_maximum_sigma, adaptive_moments, upsampled

__all__ = [
    "effective_width",
    "field_points",
    "half_maximum_width",
    "kernel_psf_width_ratio",
    "sharpening_ratio",
    "worst_over_field",
]


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


def half_maximum_width(stamp: np.ndarray) -> float:
    """Diameter (px) of the disc as large as the area above half the peak: the FWHM of
    a round profile, whatever its wings (`core.psf._half_maximum_sigma`'s count)."""
    p = np.asarray(stamp, dtype=np.float64)
    if not (p.size and np.all(np.isfinite(p)) and p.max() > 0):
        return math.nan
    return SIGMA_TO_FWHM * _half_maximum_sigma(p)


def kernel_psf_width_ratio(
    kernel_image: np.ndarray,
    convolved_psf: np.ndarray,
    target_psf: np.ndarray,
    target_is_stand_in: bool = False,
) -> float:
    """Width of the convolved PSF model seen through the kernel over the target's.

    1 when kernel and PSF models agree; the kernel is applied by correlation, as
    `core.psf.KernelMatchedPsf` draws it (the width does not depend on the flip).
    NaN when a stamp has no positive sum. ``target_is_stand_in``: the target is a
    Gaussian of a measured FWHM standing in for a PSF nobody estimated; only its half
    maximum is known, so the widths compared are those (`half_maximum_width`): a real
    star's wings made the effective width of the kernel-matched model 1.46x a
    stand-in's for a Moffat (beta 2) of its FWHM.
    """
    kernel = np.asarray(kernel_image, dtype=np.float64)
    if not float(kernel.sum()) > 0:
        return math.nan
    seen = signal.correlate(np.asarray(convolved_psf, np.float64), kernel, method="auto")
    measure = half_maximum_width if target_is_stand_in else effective_width
    width, target = measure(seen), measure(target_psf)
    return width / target if target > 0 else math.nan


#: Upsampling (cubic spline) of the stamps `sharpening_ratio` takes moments of: a trailed
#: PSF's short axis (1.5 px FWHM) along a pixel axis collapsed the adaptive moments of the
#: stamp as drawn, which then read round (ellipticity 0.7 against a round template at 0 /
#: 10 / 15 / 30 degrees: 0.91 / 0.93 / 1.71 / 1.67; twice upsampled 1.67 / 1.60 / 1.58 /
#: 1.60, four times the same to 0.005).
_MOMENT_UPSAMPLE = 2


def _moment_matrix(stamp: np.ndarray) -> np.ndarray:
    """Adaptive second moments of ``stamp`` as a matrix (px^2), measured upsampled."""
    fine, (sy, sx) = upsampled(np.asarray(stamp, dtype=np.float64), _MOMENT_UPSAMPLE)
    ixx, iyy, ixy = adaptive_moments(fine)
    return np.array([[ixx * sx * sx, ixy * sx * sy], [ixy * sx * sy, iyy * sy * sy]])


def sharpening_ratio(convolved_psf: np.ndarray, target_psf: np.ndarray) -> float:
    """How much wider the convolved image's PSF is than the target's along the direction
    where it is widest relative to it: > 1 asks the kernel to sharpen there, which a
    convolution cannot (a sum of Gaussians only approaches it).

    From the two profiles' adaptive second moments C and T (`_MOMENT_UPSAMPLE`): the
    square root of the largest eigenvalue of T^-1 C, the width ratio along that
    direction. For round profiles it is their FWHM ratio; a science PSF elongated by
    trailing against a round template has it above 1 across the trail however wide the
    science is on average (ellipticity 0.7, 5 px, against 2.5 px: 1.60). NaN for a
    degenerate profile.
    """
    try:
        convolved, target = (_moment_matrix(p) for p in (convolved_psf, target_psf))
    except PsfError:  # no positive flux
        return math.nan
    if not (np.all(np.isfinite(target)) and np.linalg.det(target) > 0):
        return math.nan
    eigen = np.linalg.eigvals(np.linalg.solve(target, convolved)).real
    largest = float(eigen.max())
    return math.sqrt(largest) if largest > 0 else math.nan


def field_points(bbox: tuple[int, int, int, int]) -> list[tuple[str, tuple[float, float]]]:
    """The centre, the edge midpoints and the corners of an inclusive box (min_x, min_y,
    max_x, max_y), each with a name: where a PSF that varies over the field is checked.

    A PSF model varies smoothly (a polynomial or a grid of nodes spanning the frame), so
    its extremes lie at the corners or along the edges: a template sharper at the centre
    and broader in the corners read 0.92 at the centre and 1.70 in the corners.
    """
    min_x, min_y, max_x, max_y = bbox
    mid_x, mid_y = (min_x + max_x) / 2.0, (min_y + max_y) / 2.0
    points = [("centre", (mid_x, mid_y))]
    for x, y in ((mid_x, min_y), (max_x, mid_y), (mid_x, max_y), (min_x, mid_y)):
        points.append((f"edge ({x:.0f}, {y:.0f})", (x, y)))
    for x, y in ((min_x, min_y), (max_x, min_y), (max_x, max_y), (min_x, max_y)):
        points.append((f"corner ({x:.0f}, {y:.0f})", (x, y)))
    return points


def worst_over_field(
    values: list[tuple[str, float]], departure=lambda value: value
) -> tuple[float, str]:
    """The value whose ``departure`` is largest among finite ones, and where it was;
    (NaN, "") when none is finite."""
    finite = [(where, value) for where, value in values if math.isfinite(value)]
    if not finite:
        return math.nan, ""
    where, value = max(finite, key=lambda item: departure(item[1]))
    return value, where
