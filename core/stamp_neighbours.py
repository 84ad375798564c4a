"""Stars that moved between the images, and stars too bright to be kernel sources
inside the kernel sources' stamps.

A kernel source's stamp is fitted whole, and a neighbour brighter than the source
outweighs it there. A star above the S/N window (`SourcesConfig.max_snr`) is never
judged as a kernel source itself, so a change of it (a variable, a moving or a
misregistered star) went into the fit unseen: one moved by 0.5 px, 13 px from a kernel
star of 1/60 its flux, took the frame's kernel sum from 0.999 to 0.91-0.95 (spatial
order 0 to 2) and the verdict stayed good. The subtraction judges such neighbours as it
judges the kernel sources, against their ensemble (`core.subtract`): their flux ratio
and their position (`moved`), which it now judges for the kernel sources too (a moved
star keeps its flux, and the kernel learnt the shift of bright ones in the window). A
star the science lost is in no science catalog: the template's peaks that none of its
sources explains are judged by their flux too (`template_only_peaks`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from .stamps import windows

__all__ = [
    "bright_neighbours",
    "template_only_peaks",
    "moved",
    "holders_of",
    "MOVED_FLOOR_FWHM",
    "MOVED_FLOOR_PX",
]

#: A star moved between the images when its shift departs from the kernel sources'
#: median by more than this many FWHM (and by more than its error allows): a shift of
#: delta leaves a dipole of ~delta / sigma of the star's peak, 0.12 at this floor...
MOVED_FLOOR_FWHM = 0.05
#: ...and by more than this many pixels: the centroids of an undersampled PSF shift with
#: the pixel phase (JWST, FWHM 2 px, floor 0.1 px without it: a S/N 84 kernel star 0.23 px
#: off the median was taken for moved, and the kernel sum went from 0.987 to 1.049).
MOVED_FLOOR_PX = 0.25

#: Median of a 2-D Gaussian offset's length in units of its per-axis sigma (Rayleigh).
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))


def bright_neighbours(
    selected, catalog, max_snr: float, snr_column: str
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of ``catalog`` at or above ``max_snr`` centred in the stamp box of some row of
    ``selected`` (`core.sources.select_kernel_sources`' ``stamp_x0`` ... ``stamp_y1``,
    inclusive) other than its own, and for each of them the rows of ``selected`` whose
    box holds it."""
    none = np.zeros(0, dtype=int)
    if len(selected) == 0 or len(catalog) == 0 or snr_column not in catalog.colnames:
        return none, []
    snr = np.asarray(catalog[snr_column], dtype=np.float64)
    bright = np.flatnonzero(np.isfinite(snr) & (snr >= max_snr))
    if bright.size == 0:
        return none, []
    bx = np.floor(np.asarray(catalog["x"], dtype=np.float64)[bright] + 0.5)
    by = np.floor(np.asarray(catalog["y"], dtype=np.float64)[bright] + 0.5)
    x0, y0 = np.asarray(selected["stamp_x0"]), np.asarray(selected["stamp_y0"])
    x1, y1 = np.asarray(selected["stamp_x1"]), np.asarray(selected["stamp_y1"])
    # boxes are squares: a Chebyshev ball about each box's centre
    half = 0.5 * (x1 - x0)
    centres = np.column_stack([0.5 * (x0 + x1), 0.5 * (y0 + y1)])
    tree = cKDTree(np.column_stack([bx, by]))
    holders: dict[int, list[int]] = {}
    for k, hits in enumerate(tree.query_ball_point(centres, r=half + 1e-9, p=np.inf)):
        for j in hits:
            holders.setdefault(j, []).append(k)
    # a source is no neighbour of itself (it is above the window: never selected anyway)
    sx = np.floor(np.asarray(selected["x"], dtype=np.float64) + 0.5)
    sy = np.floor(np.asarray(selected["y"], dtype=np.float64) + 0.5)
    rows, held = [], []
    for j in sorted(holders):
        boxes = [k for k in holders[j] if not (sx[k] == bx[j] and sy[k] == by[j])]
        if boxes:
            rows.append(bright[j])
            held.append(np.array(boxes, dtype=int))
    return np.array(rows, dtype=int), held


#: Pixel S/N (above the median of the stamp box's border) from which a template peak is
#: measured as a neighbour: far below any star of `SourcesConfig.max_snr`, whose PSF
#: flux the test then reads.
_PEAK_PIXEL_SNR = 20.0


def template_only_peaks(selected, catalog, template, radius: float):
    """Peaks of ``template`` inside the stamp boxes of ``selected`` (as in
    `bright_neighbours`) with no source of ``catalog`` (the science's) within ``radius``
    px, nor the box's own source: a star the science lost (faded, or a transient of the
    template's epoch) is in no catalog the neighbour test reads, and went into the kernel
    fit unseen (30 faded transients of 2.5e5-4.1e5 counts beside kernel stars: 6 constant
    stars came out as DIA sources, none with the transients brightening instead).

    A peak is a local maximum of its 3 x 3 at `_PEAK_PIXEL_SNR` above the median of its
    box's border (the sky around the box's own star). The boxes are cut as one stack per
    size, and only pixels above that level are tested for a maximum (a loop over the
    1000 boxes of a 4096 px frame took 220 ms, a stack of whole-box statistics 167 ms).
    Returns parent (x, y) of the peaks and, for each, the rows of ``selected`` whose box
    holds it."""
    none = np.zeros(0)
    if len(selected) == 0:
        return none, none, []
    x0, y0 = template.xy0
    bx0 = np.asarray(selected["stamp_x0"], dtype=int) - x0
    by0 = np.asarray(selected["stamp_y0"], dtype=int) - y0
    side = np.asarray(selected["stamp_x1"], dtype=int) - x0 - bx0 + 1
    holders: dict[tuple[int, int], list[int]] = {}
    for size in np.unique(side):
        boxes = np.flatnonzero(side == size)
        k, j, i = _box_peaks(template, by0[boxes], bx0[boxes], int(size))
        for box, row, col in zip(
            boxes[k].tolist(),
            (by0[boxes][k] + j).tolist(),
            (bx0[boxes][k] + i).tolist(),
            strict=True,
        ):
            holders.setdefault((row, col), []).append(box)
    if not holders:
        return none, none, []
    own = np.column_stack([np.asarray(selected["x"], float), np.asarray(selected["y"], float)])
    known = own
    if len(catalog):
        others = np.column_stack([np.asarray(catalog["x"], float), np.asarray(catalog["y"], float)])
        known = np.concatenate([own, others])
    peaks = np.array(list(holders), dtype=np.float64)  # (row, column) on the array
    px, py = peaks[:, 1] + x0, peaks[:, 0] + y0
    distance = cKDTree(known).query(np.column_stack([px, py]), distance_upper_bound=radius)[0]
    alone = np.isinf(distance)
    held = [np.array(k, dtype=int) for k, a in zip(holders.values(), alone, strict=True) if a]
    return px[alone], py[alone], held


def _box_peaks(template, y0: np.ndarray, x0: np.ndarray, side: int):
    """(box, row, column) in the boxes of corners (y0, x0) of the pixels at
    `_PEAK_PIXEL_SNR` above their box's border median that no pixel of their 3 x 3 in
    the box exceeds (off the frame and non-finite pixels are never peaks)."""
    image = windows(template.image, y0, x0, side, fill=np.nan)
    sigma = np.sqrt(windows(template.variance, y0, x0, side, fill=np.nan))
    border = np.concatenate(
        [image[:, 0, :], image[:, -1, :], image[:, 1:-1, 0], image[:, 1:-1, -1]], axis=1
    )
    with np.errstate(invalid="ignore"):
        level = (
            np.nanmedian(border, axis=1) if np.isnan(border).any() else np.median(border, axis=1)
        )
        above = image - level[:, None, None]
        k, j, i = np.nonzero(above >= _PEAK_PIXEL_SNR * sigma)
    # each candidate against its 8 neighbours within the box (-inf beyond its edges)
    padded = np.pad(above, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    value = above[k, j, i]
    peak = np.ones(k.size, dtype=bool)
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            if dj or di:
                with np.errstate(invalid="ignore"):
                    peak &= ~(padded[k, j + 1 + dj, i + 1 + di] > value)
    return k[peak], j[peak], i[peak]


def moved(
    shift_x: np.ndarray,
    shift_y: np.ndarray,
    clean: np.ndarray,
    snr: np.ndarray,
    ensemble: np.ndarray,
    fwhm: float,
    n_sigma: float,
) -> np.ndarray:
    """Stars whose shift between the images (`core.measure.star_shifts`) departs from the
    median shift of the stars ``ensemble`` (indices; the kernel sources) by more than
    `MOVED_FLOOR_FWHM` FWHM, `MOVED_FLOOR_PX` and ``n_sigma`` times its error; False
    where a stamp was not clean.

    The error is measured on the ensemble, not modelled: a centroid's noise goes as
    1 / (S/N) (``snr``, the catalog's), its scale the ensemble's median distance times
    S/N (a 2-D distance's median is 1.177 per-axis sigmas; what does not shrink with
    S/N, undersampling, the PSFs' asymmetries, local registration, makes it larger:
    the test errs towards keeping a faint star, whose shift weighs little in the fit,
    and a bright one meets the floors). On the real pairs that scale is 2.3-8.3 PSF
    sigmas; a model of 2 made a S/N 12 DECam kernel star 2.3 px off a moved one (and
    the preconvolve score's star chi2 1.02 -> 1.99), the fainter half's alone (5 of 9
    stars) a S/N 13 one 1.45 px off."""
    shift_x, shift_y = np.asarray(shift_x, float), np.asarray(shift_y, float)
    snr = np.asarray(snr, dtype=np.float64)
    centre_x, centre_y = float(np.median(shift_x[ensemble])), float(np.median(shift_y[ensemble]))
    distance = np.hypot(shift_x - centre_x, shift_y - centre_y)
    noise = float(np.median(distance[ensemble] * snr[ensemble])) / _RAYLEIGH_MEDIAN
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = max(MOVED_FLOOR_FWHM * fwhm, MOVED_FLOOR_PX)
        limit = np.maximum(floor, n_sigma * noise / snr)
    return np.asarray(clean, dtype=bool) & np.isfinite(distance) & (distance > limit)


def holders_of(changed: np.ndarray, held: list[np.ndarray], n: int) -> np.ndarray:
    """(n,) bool: the selected rows whose stamp holds a ``changed`` neighbour."""
    out = np.zeros(n, dtype=bool)
    for flag, boxes in zip(changed, held, strict=True):
        if flag:
            out[boxes] = True
    return out
