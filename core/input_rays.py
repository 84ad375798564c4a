"""Cosmic rays and hot pixels of the inputs, told in the images as they were read.

A ray in one input is narrower than that input's PSF only until something convolves it:
the preconvolution filter of a score, or the matching kernel of the convolved image,
widens it into a source of the output's PSF shape, which the sharpness test on the output
(`core.sharpness`) cannot tell from a transient (the real pairs' preconvolve scores: 43
of 60 rays unflagged, SAAO 0103 16 of 19). The unconvolved input still holds the ray as
it fell: a positive source is tested in the science, a negative one in the template (on
the output's grid), each against its own PSF, with the sky around the position taken
off. A point source there (a transient, a star under it) is the PSF's shape at most, as
on the difference, and is not flagged.

The input holds all the light at the position, not only the change: a star whose shape
the PSF model misses by more than the test's tolerance looks sharp there whatever
changed (about 1% of the SAAO frames' stars, narrower across rows than their PSF
models). So only a source that is at least half the light there is tested
(`DOMINANT_FRACTION`): a ray on empty sky is all of it, a star's variation a part.
"""

from __future__ import annotations

import numpy as np

from .config import ForcedPhotometryConfig
from .exposure import Exposure
from .forced import UNUSABLE_PLANES, PsfStamps
from .rings import ring_levels
from .sharpness import contrast_bounds, sharper_than_psf
from .stamps import stamps as _stack

__all__ = ["DOMINANT_FRACTION", "sharp_in_inputs"]

#: Saturated pixels are left out too: a clipped core tells nothing of its width.
_UNUSABLE = (*UNUSABLE_PLANES, "SAT")
#: A source is tested in an input only when its flux is at least this fraction of the
#: input's light at the position: there the input's shape is the source's.
DOMINANT_FRACTION = 0.5
#: Half-width of the tested stamp: the central 3 x 3 and the pixels around it.
_HALF = 2


def sharp_in_inputs(
    output: Exposure,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    light: np.ndarray,
    science: Exposure | None,
    template: Exposure | None,
    config: ForcedPhotometryConfig,
) -> np.ndarray:
    """Sources (array ``x``, ``y`` of ``output``) narrower than the PSF in the input that
    holds their light: the science for positive sources, the template for negative ones
    (``flux`` < 0, the sources' signed PSF fluxes). ``light``: the PSF flux of that
    input at each source (science units; NaN: not tested), which the source must hold
    `DOMINANT_FRACTION` of to be tested; an input that is None or has no PSF tests
    nothing."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        dominant = np.abs(flux) >= DOMINANT_FRACTION * np.asarray(light, dtype=np.float64)
    negative = flux < 0
    sharp = np.zeros(x.size, dtype=bool)
    ox, oy = output.xy0
    for exposure, side in ((science, ~negative), (template, negative)):
        which = side & dominant
        if exposure is None or exposure.psf is None or not which.any():
            continue
        ex, ey = exposure.xy0
        px, py = x[which] + (ox - ex), y[which] + (oy - ey)
        stamps = PsfStamps(exposure.psf, exposure, config=config)
        bounds = contrast_bounds(stamps, px + ex, py + ey)
        sharp[which] = _sharp(exposure, px, py, bounds, stamps.half)
    return sharp


def _sharp(exposure: Exposure, x, y, bounds, half: int) -> np.ndarray:
    """`core.sharpness.sharper_than_psf` at array (x, y) of an image that carries sky.

    Its level is taken off first, and not overestimated: the test compares the centre
    with a bound (> 1) times its neighbours, so a level set too high raises every
    contrast. On a steep host or a star's wing the median of a far ring is above the
    light under the source (the wing is convex): the nearer ring around the 3 x 3, whose
    median a short track cannot move, is then the lower and is used."""
    ix = np.floor(x + 0.5).astype(np.intp)
    iy = np.floor(y + 0.5).astype(np.intp)
    near = ring_levels(exposure, ix, iy, _HALF - 1, 1, _UNUSABLE)
    far = ring_levels(exposure, ix, iy, half, max(4, half // 2), _UNUSABLE)
    level = np.fmin(near, far)
    data = _stack(exposure.image, ix, iy, _HALF, fill=np.nan).astype(np.float64)
    data -= level[:, None, None]
    var = exposure.variance_stamps(ix, iy, _HALF, fill=np.nan).astype(np.float64)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    bits = exposure.bitmask(_UNUSABLE)
    if bits:
        good &= (_stack(exposure.mask, ix, iy, _HALF, fill=-1) & bits) == 0
    data[~good] = 0.0
    var[~good] = 0.0
    # the source's light is positive in the image that holds it
    return sharper_than_psf(data, var, good, bounds, np.ones(ix.size))
