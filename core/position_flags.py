"""Flags of positions that need more than the image measured: near a bright star of
the matched template (its residuals fake sources there), outside the hull of the kernel
sources (the matching kernel is extrapolated there). The DIA catalog and forced
photometry at given positions raise them alike (`core.forced.FLAG_BITS`)."""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from .exposure import Exposure
from .order import row_nanmedians
from .stamps import batches
from .stamps import stamps as _stack

__all__ = [
    "EXTRAPOLATED_ORDER",
    "bright_star_light",
    "bright_star_limit",
    "changed_star",
    "outside_kernel_hull",
]

#: Mask planes of the matched template's saturated pixels (the template's own, renamed).
_SATURATED_PLANES = ("SAT", "SAT_TEMPLATE")

#: Meta key of a kernel-source table (`core.subtract`, kept in kernel.fits): the highest
#: spatial order of what was fitted on those sources alone and applied to the whole
#: frame (0: a constant kernel and background, nothing to extrapolate beyond them).
EXTRAPOLATED_ORDER = "extrapolated_order"


def changed_star(flux, light, saturated, fraction: float) -> np.ndarray:
    """Sources on a bright star (`bright_star_light`) that are a change of the star, not
    its residual: ``|flux|`` reaches ``fraction`` of the template's ``light`` on the
    disc (a variable star), and no pixel near is ``saturated`` (a clipped core leaves
    a residual of any size). All False when ``fraction`` is 0."""
    with np.errstate(invalid="ignore"):
        change = np.abs(np.asarray(flux, dtype=np.float64)) >= fraction * light
    return change & ~np.asarray(saturated, dtype=bool) & (fraction > 0)


def bright_star_limit(flux_err, threshold: float, residual: float) -> np.ndarray:
    """The light (flux units) from which a star is bright at each position: its
    ``residual`` (a fraction of its light) reaches ``threshold`` times the position's
    point-source flux error ``flux_err`` (a source at the detection threshold); where
    that error is unknown (a fit off the frame), the median of the known ones."""
    noise = np.array(flux_err, dtype=np.float64, ndmin=1)
    unknown = ~np.isfinite(noise)
    if unknown.any() and not unknown.all():
        noise[unknown] = np.median(noise[~unknown])
    return threshold * noise / residual


def bright_star_light(
    template: Exposure | None, ix, iy, radius: float, limit, saturated_limit: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where a star at least ``limit`` bright has light near, and the light under each
    position.

    Parameters
    ----------
    template : `Exposure` or None
        The matched template, with the PSF of a star in it (`Exposure.psf`).
    ix, iy : `numpy.ndarray` (n,), int
        Array column and row of the positions.
    radius : float
        Radius (px) of the disc searched around each position.
    limit : float or `numpy.ndarray` (n,)
        Light (the template's units) from which a star is bright, per position.
    saturated_limit : float or None
        The same for a saturated core (``SAT`` or ``SAT_TEMPLATE``), whose clipped
        peak understates its light and whose residual is of any size: a limit at the
        frame's typical noise, not at positions beside it, whose noise the star's own
        inflates (default ``limit``).

    Returns
    -------
    bright : `numpy.ndarray` (n,), bool
        A star's core (a local maximum of the template) on the disc exceeds the level
        around it by more than ``limit`` times the PSF's peak, the most of a star's
        light one pixel holds (a saturated core ``saturated_limit`` times): a star of
        at least that light sits there.
    light : `numpy.ndarray` (n,), float64
        The template's light under the position (its excess within a third of
        ``radius``, over the PSF's fraction there) where that is a star's core; NaN
        elsewhere.
    """
    if template is None or ix.size == 0 or radius <= 0:
        return np.zeros(ix.size, dtype=bool), np.zeros(ix.size)
    # a star's light, not its pixels' S/N: smoothing the matched template (the more in
    # preconvolve mode, where it matches P * S) lowers its pixel noise more than a
    # star's peak, and a per-pixel S/N limit was passed by stars 3x fainter there (on
    # the SAAO frames 44-58% of injected sources flagged, 5-8% in auto mode). The light
    # a star's peak implies (over the PSF's peak, both smoothed alike), and the residual
    # it can leave, do not depend on the smoothing.
    peak, fraction = _psf_peak_and_core(template, ix, iy, radius / 3.0)
    least = np.broadcast_to(np.asarray(limit, dtype=np.float64), ix.shape) * peak
    at_saturated = least
    if saturated_limit is not None:
        at_saturated = np.minimum(least, saturated_limit * peak)
    # in batches that stay in the caches (`core.stamps.STAMP_BATCH`)
    done = [
        _bright_part(template, ix[p], iy[p], radius, (least[p], at_saturated[p]), fraction[p])
        for p in batches(ix.size)
    ]
    return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])


#: Cells per axis in each of which `bright_star_light` takes the PSF as constant (a PSF
#: varies smoothly, and its peak sets a flag's limit, not a measurement).
_PSF_CELLS = 4


def _psf_peak_and_core(template: Exposure, ix, iy, core: float) -> tuple:
    """(n,) peak (largest pixel) of the template's unit-sum PSF and its fraction within
    ``core`` px of the centre, at array positions (ix, iy): from the PSF's image at the
    centre of the position's cell (`_PSF_CELLS` x `_PSF_CELLS` over the frame)."""
    psf = template.require_psf()
    ny, nx = template.shape
    cells_x = np.clip(np.asarray(ix) * _PSF_CELLS // max(nx, 1), 0, _PSF_CELLS - 1)
    cells_y = np.clip(np.asarray(iy) * _PSF_CELLS // max(ny, 1), 0, _PSF_CELLS - 1)
    cell = cells_y * _PSF_CELLS + cells_x
    peak, fraction = np.empty(cell.size), np.empty(cell.size)
    for k in np.unique(cell).tolist():
        x = template.xy0[0] + (k % _PSF_CELLS + 0.5) * nx / _PSF_CELLS - 0.5
        y = template.xy0[1] + (k // _PSF_CELLS + 0.5) * ny / _PSF_CELLS - 0.5
        stamp = np.asarray(psf.kernel_image(x, y), dtype=np.float64)
        stamp = stamp / stamp.sum()
        h, w = stamp.shape[0] // 2, stamp.shape[1] // 2
        squared = np.arange(-h, h + 1)[:, None] ** 2 + np.arange(-w, w + 1)[None, :] ** 2
        peak[cell == k] = stamp.max()
        fraction[cell == k] = stamp[squared <= core * core].sum()
    return peak, fraction


def _local_maxima(stack: np.ndarray) -> np.ndarray:
    """Pixels of each stamp inside its one-pixel border that are >= their 8 neighbours:
    ``scipy.ndimage.maximum_filter`` (3 x 3 in each stamp) of the inner pixels, as a
    maximum of nine shifted views (no padding, no per-pixel window; 2-3x faster)."""
    n, ny, nx = stack.shape
    inner = stack[:, 1 : ny - 1, 1 : nx - 1]
    top = inner.copy()
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                np.maximum(top, stack[:, dy : ny - 2 + dy, dx : nx - 2 + dx], out=top)
    return inner >= top


def _bright_part(template: Exposure, ix, iy, radius: float, least: tuple, fraction) -> tuple:
    """`bright_star_light` of one batch of positions: ``least``, the excess of a bright
    star's core and of a bright saturated one; ``fraction``, the PSF's light within a
    third of ``radius``."""
    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    squared = (offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel()
    disc = squared <= radius * radius
    # a pixel wider, for the local maxima: stars' cores (off the frame: none)
    wider = _stack(template.image, ix, iy, r + 1, fill=np.nan).astype(np.float64)
    known = np.where(np.isfinite(wider), wider, -np.inf)
    cores = _local_maxima(known).reshape(ix.size, -1)[:, disc]
    data = wider[:, 1:-1, 1:-1].reshape(ix.size, -1)
    clipped = np.zeros(cores.shape, dtype=bool)
    bits = template.bitmask(_SATURATED_PLANES)
    if bits:
        mask = _stack(template.mask, ix, iy, r, fill=0).reshape(ix.size, -1)[:, disc]
        clipped = (mask & np.int32(bits)) != 0
    # the level from the pixels around the disc, the excess on the disc's pixels only
    outside = data[:, ~disc]
    level = np.median(outside, axis=1)
    holes = ~np.isfinite(level)
    if holes.any():  # stamps over the frame's edge: the NaN-aware median (NaN off it)
        level[holes] = row_nanmedians(outside[holes], consume=True)
    excess = data[:, disc] - level[:, None]
    # the light under the source itself (within a third of the radius: a PSF FWHM at
    # the default), not its neighbours' in a crowded field; NaN unless its brightest
    # pixel is inside it, off its rim (the source is on a star's core, not on the
    # wings, rings or spikes of one beside it, whose residuals are any fraction of
    # their light there)
    core = radius / 3.0
    r2 = squared[disc]
    finite = np.isfinite(excess)
    under = finite & (r2 <= core * core)
    with np.errstate(invalid="ignore", divide="ignore"):
        light = np.where(under, excess, 0.0).sum(axis=1) / fraction
    brightest = np.where(under, excess, -np.inf).argmax(axis=1)
    light[r2[brightest] > max(core - 1.0, 0.0) ** 2] = np.nan
    # a star's core on the disc, not any pixel: the wing of a star beyond it holds more
    # of its peak the wider the PSF, and judged by its light there it flagged 2x the
    # positions on a score of the poor-seeing SAAO frames. A saturated core by its own
    # limit: always bright was no answer, the mask marking every peak the kernel (the
    # wider on a score) spread the clipped pixels to (1.5-3x the SAAO positions there)
    with np.errstate(invalid="ignore"):
        star = excess > least[0][:, None]
        star |= clipped & (excess > least[1][:, None])
        bright = np.any(cores & star, axis=1)
    return bright, light


def outside_kernel_hull(kernel_sources, xy0, x, y, margin: float) -> np.ndarray:
    """True where array position (x, y) lies more than ``margin`` px outside the hull of
    the kernel sources (a table with parent ``x``, ``y``; ``xy0``: the array's origin),
    unless what was fitted on them is constant (meta `EXTRAPOLATED_ORDER` 0; absent:
    not known, so not assumed)."""
    out = np.zeros(x.size, dtype=bool)
    if kernel_sources is None or x.size == 0 or len(kernel_sources) < 3:
        return out
    if "x" not in kernel_sources.colnames or "y" not in kernel_sources.colnames:
        return out
    # a constant kernel and background are the same outside the hull as in it: no
    # polynomial is extrapolated there, and the position is no reason for suspicion
    # (14-28% of the JWST pair's detections were flagged under a constant kernel)
    if kernel_sources.meta.get(EXTRAPOLATED_ORDER) == 0:
        return out
    points = np.column_stack(
        [np.asarray(kernel_sources["x"]) - xy0[0], np.asarray(kernel_sources["y"]) - xy0[1]]
    )
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) < 3:
        return out
    try:
        hull = ConvexHull(points)
    except QhullError:
        return out
    # signed distance to each facet's line; the largest is the distance outside
    distance = (hull.equations[:, :2] @ np.vstack([x, y]) + hull.equations[:, 2:3]).max(axis=0)
    return distance > margin
