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

__all__ = ["bright_star_light", "changed_star", "outside_kernel_hull"]


def changed_star(flux, light, saturated, fraction: float) -> np.ndarray:
    """Sources on a bright star (`bright_star_light`) that are a change of the star, not
    its residual: ``|flux|`` reaches ``fraction`` of the template's ``light`` on the
    disc (a variable star), and no pixel near is ``saturated`` (a clipped core leaves
    a residual of any size). All False when ``fraction`` is 0."""
    with np.errstate(invalid="ignore"):
        change = np.abs(np.asarray(flux, dtype=np.float64)) >= fraction * light
    return change & ~np.asarray(saturated, dtype=bool) & (fraction > 0)


def bright_star_light(
    template: Exposure | None, ix, iy, radius: float, limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """True where a matched-template pixel within ``radius`` px of array pixels (ix, iy)
    exceeds ``limit`` S/N above the level around that disc (a bright star's light there,
    whose residual can fake a source); and the template's light (sum above that level)
    under each position where that is a star's core (NaN elsewhere)."""
    if template is None or ix.size == 0 or radius <= 0:
        return np.zeros(ix.size, dtype=bool), np.zeros(ix.size)
    parts = batches(ix.size)
    if len(parts) > 1:  # in batches that stay in the caches (`core.stamps.STAMP_BATCH`)
        done = [bright_star_light(template, ix[p], iy[p], radius, limit) for p in parts]
        return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])
    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius).ravel()
    data = _stack(template.image, ix, iy, r, fill=np.nan).reshape(ix.size, -1)
    # the level from the pixels around the disc, the S/N on the disc's pixels only
    outside = data[:, ~disc].astype(np.float64)
    level = np.median(outside, axis=1)
    holes = ~np.isfinite(level)
    if holes.any():  # stamps over the frame's edge: the NaN-aware median (NaN off it)
        level[holes] = row_nanmedians(outside[holes], consume=True)
    excess = data[:, disc].astype(np.float64) - level[:, None]
    # the light under the source itself (within a third of the radius: a PSF FWHM at
    # the default), not its neighbours' in a crowded field; NaN unless its brightest
    # pixel is inside it, off its rim (the source is on a star's core, not on the
    # wings, rings or spikes of one beside it, whose residuals are any fraction of
    # their light there)
    r2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel()[disc]
    core = radius / 3.0
    finite = np.isfinite(excess)
    under = finite & (r2 <= core * core)
    light = np.where(under, excess, 0.0).sum(axis=1)
    brightest = np.where(under, excess, -np.inf).argmax(axis=1)
    light[r2[brightest] > max(core - 1.0, 0.0) ** 2] = np.nan
    # where even the least variance the stamp can have keeps every pixel below the
    # limit, the variance is not needed (a deferred plane's stamps cost small FFTs)
    with np.errstate(invalid="ignore"):
        peak = np.max(np.where(finite, excess, -np.inf), axis=1)
        need = ~(peak <= limit * np.sqrt(template.variance_floors(ix, iy, r)))
    var = np.full(excess.shape, np.nan)
    if need.any():
        stamps = template.variance_stamps(ix[need], iy[need], r, fill=np.nan)
        var[need] = stamps.reshape(int(need.sum()), -1)[:, disc]
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = excess / np.sqrt(var)
    return np.any((snr > limit) & np.isfinite(snr), axis=1), light


def outside_kernel_hull(kernel_sources, xy0, x, y, margin: float) -> np.ndarray:
    """True where array position (x, y) lies more than ``margin`` px outside the hull of
    the kernel sources (a table with parent ``x``, ``y``; ``xy0``: the array's origin)."""
    out = np.zeros(x.size, dtype=bool)
    if kernel_sources is None or x.size == 0 or len(kernel_sources) < 3:
        return out
    if "x" not in kernel_sources.colnames or "y" not in kernel_sources.colnames:
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
