"""Quality metrics of a difference image (algorithm.md 6.1) and of its noise.

The footprint ratios follow Rubin's `computeDifferenceImageMetrics`; the noise
figures (``noise_ratio``: robust std of D/sqrt(V) on empty sky), the star
residual chi^2 and the flux the kernel stars keep (`star_residual_fraction`) are
what the acceptance tests, the quality verdict and dashboards read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import erfinv

from . import order
from .exposure import Exposure
from .forced import whole_stamp_fluxes
from .parallel import row_blocks, thread_map
from .psf import ImagePsf, Psf

__all__ = [
    "limiting_magnitude",
    "noise_statistics",
    "robust_sigma_median",
    "footprint_means",
    "compute_difference_metrics",
    "star_residual_fraction",
    "residual_cells",
    "NOISE_MASK_PLANES",
]

#: Interquartile range of the unit normal (scipy.stats.iqr's ``scale="normal"``).
_IQR_NORMAL = float(2.0 * math.sqrt(2.0) * erfinv(0.5))
#: Most pixels whose z = D/sqrt(V) enter the noise quantiles (an even stride beyond).
_NOISE_SAMPLE = 1 << 22
#: Cells per side of the grid the noise ratio is also measured in: a PSF mismatch in the
#: corners only raised their noise to 1.05-1.065x its variance, the frame's to 1.038.
NOISE_CELLS = 3
#: Fewest sampled pixels a cell's noise ratio is given for (its IQR then good to ~3%).
_NOISE_CELL_PIXELS = 1000
#: The cells' noise ratios take every this-th pixel of the frame's sample: up to ~100,000
#: a cell, whose IQR is good to ~0.5%, at a fifth of the cost of all.
_CELL_STRIDE = 4
#: Pixels left out of the noise statistics.
NOISE_MASK_PLANES = (
    "BAD",
    "SAT",
    "NO_DATA",
    "EDGE",
    "CR",
    "INTRP",
    "SUSPECT",
    "SAT_TEMPLATE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "INJECTED",
    "INJECTED_TEMPLATE",
)


def limiting_magnitude(exposure: Exposure, fwhm: float) -> float:
    """5-sigma point-source magnitude as Rubin defines it (algorithm.md 1.2 step 7).

    m = ZP - 2.5 log10(5 sqrt(A)), A = pi sqrt(Ixx Iyy) of the PSF (or pi (FWHM/2)^2
    when the PSF cannot be evaluated); NaN without a photometric calibration.
    """
    if exposure.photo_calib is None:
        return math.nan
    try:
        psf = exposure.require_psf()
        ixx, iyy, _ = psf.moments(*(psf.average_position or exposure.bbox_center()))
        area = math.pi * math.sqrt(ixx * iyy)
    except Exception:  # noqa: BLE001 - documented fallback to the FWHM
        area = math.nan
    if not (math.isfinite(area) and area > 0):
        area = math.pi * (fwhm / 2.0) ** 2
    if not (math.isfinite(area) and area > 0):
        return math.nan
    return exposure.photo_calib.zero_point - 2.5 * math.log10(5.0 * math.sqrt(area))


#: Most kernel stars (the highest rated) whose residual `star_residual_fraction` measures:
#: the median of 200 is known to a few tenths of a percent, and each star costs a PSF
#: model evaluation or two.
_RESIDUAL_STARS = 200
#: Standard error of the median of n normal values, times sqrt(n) / sigma.
_MEDIAN_ERROR = math.sqrt(math.pi / 2.0)
#: Cells per side of the grid over which the star residual is also measured: a kernel
#: whose error varies over the field (a constant kernel under a varying PSF) leaves stars
#: +8% at the centre and -6% in the corners, with a median of +1% over the field.
RESIDUAL_CELLS = 3
#: Fewest stars a cell's median is given for: the interquartile range of 8 values, which
#: makes its error, is known to about a third; fewer would call noise a residual.
_CELL_STARS = 8


def star_residual_fraction(
    output: Exposure,
    minuend: Exposure,
    x,
    y,
    output_psf: Psf | None = None,
    minuend_psf: Psf | None = None,
    rating=None,
) -> dict[str, Any]:
    """The fraction of the kernel stars' flux a difference (or score) keeps.

    A constant star vanishes from a good difference. Where the matching kernel gets
    the stars' flux or core wrong (a kernel sum off, a kernel broader or sharper than
    the PSFs need), every star leaves the same fraction of its flux, of one sign: the
    PSF-fit flux of each star in ``output`` over its PSF-fit flux in ``minuend`` (the
    image whose stars the difference keeps when nothing is subtracted: the science, or
    the matched science), local backgrounds fitted. Unlike a chi^2 at the stars it
    does not grow with their brightness: the same 1% mismatch reads 1% on a faint
    field and on a bright one (SAAO's bulge stars: chi^2 4-5 at residuals of 0.0-0.3%).

    Parameters
    ----------
    output, minuend : `Exposure`
        The difference (or score) and the image it was made from.
    x, y : array-like
        Parent positions of the stars (the kernel stars of the fit).
    output_psf, minuend_psf : `Psf` or None
        Profiles fitted in each (default: each exposure's own PSF), drawn at the
        centre of ``output``.
    rating : array-like or None
        With more than `_RESIDUAL_STARS` stars, the highest rated are measured.

    Returns
    -------
    dict
        ``star_residual_fraction`` (median of the stars' ratios), its standard error
        ``star_residual_fraction_error`` (from their robust scatter) and
        ``n_residual_stars``; NaN for both below 3 measured stars. Also
        ``star_residual_cells``: the same median and error in each cell of a
        `RESIDUAL_CELLS` x `RESIDUAL_CELLS` grid over ``output`` holding at least
        `_CELL_STARS` stars (`residual_cells`).
    """
    xs, ys = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if rating is not None and xs.size > _RESIDUAL_STARS:
        keep = np.argsort(-np.asarray(rating, dtype=np.float64), kind="stable")[:_RESIDUAL_STARS]
        xs, ys = xs[keep], ys[keep]
    out: dict[str, Any] = {
        "star_residual_fraction": math.nan,
        "star_residual_fraction_error": math.nan,
    }
    ratios = np.zeros(0)
    if xs.size:
        # each profile drawn once, at the frame centre: a ratio of two fits with the same
        # (or the matched) profile hardly feels its variation, and a matched or
        # decorrelated PSF drawn per star cost a second on 200 stars
        centre = output.bbox_center()
        star_psf, left_psf = (
            ImagePsf(np.asarray((psf or exposure.require_psf()).kernel_image(*centre)))
            for psf, exposure in ((minuend_psf, minuend), (output_psf, output))
        )
        star_flux, _ = whole_stamp_fluxes(minuend, xs, ys, star_psf)
        left, _ = whole_stamp_fluxes(output, xs, ys, left_psf)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = left / star_flux
        measured = np.isfinite(ratios) & (star_flux > 0)
        ratios, xs, ys = ratios[measured], xs[measured], ys[measured]
    out["n_residual_stars"] = int(ratios.size)
    if ratios.size >= 3:
        out["star_residual_fraction"], out["star_residual_fraction_error"] = _median_and_error(
            ratios
        )
        out["star_residual_cells"] = residual_cells(ratios, xs, ys, output.bbox)
    return out


def _median_and_error(ratios: np.ndarray) -> tuple[float, float]:
    """The median of ``ratios`` and its standard error from their robust scatter."""
    sigma, median = robust_sigma_median(ratios)
    return median, _MEDIAN_ERROR * sigma / math.sqrt(ratios.size)


def residual_cells(ratios, x, y, bbox, cells: int = RESIDUAL_CELLS) -> list[dict]:
    """The stars' residual ratios per cell of a ``cells`` x ``cells`` grid over ``bbox``
    (inclusive min_x, min_y, max_x, max_y): for each cell with at least `_CELL_STARS`
    stars, its pixel range (``x``, ``y``: [first, last]), ``fraction`` (their median),
    its standard ``error`` and ``n``."""
    min_x, min_y, max_x, max_y = bbox
    edges_x = np.linspace(min_x, max_x + 1, cells + 1)
    edges_y = np.linspace(min_y, max_y + 1, cells + 1)
    column = np.clip(np.searchsorted(edges_x, x, side="right") - 1, 0, cells - 1)
    row = np.clip(np.searchsorted(edges_y, y, side="right") - 1, 0, cells - 1)
    out = []
    for j in range(cells):
        for i in range(cells):
            inside = (row == j) & (column == i)
            if np.count_nonzero(inside) < _CELL_STARS:
                continue
            fraction, error = _median_and_error(ratios[inside])
            out.append(
                {
                    "x": [int(math.ceil(edges_x[i])), int(math.ceil(edges_x[i + 1])) - 1],
                    "y": [int(math.ceil(edges_y[j])), int(math.ceil(edges_y[j + 1])) - 1],
                    "fraction": fraction,
                    "error": error,
                    "n": int(np.count_nonzero(inside)),
                }
            )
    return out


#: Footprints measured together by `footprint_means`.
_FOOTPRINT_BATCH = 256


def noise_statistics(exposure: Exposure, exclude: np.ndarray | None = None) -> dict[str, Any]:
    """Robust mean and width of image/sqrt(variance) over unmasked pixels.

    ``noise_ratio`` = 0.7413 IQR of z (1 when the variance plane is right),
    ``noise_mean`` = median of z. ``exclude`` removes more pixels (e.g. near stars).
    Past `_NOISE_SAMPLE` good pixels the quantiles come from an even stride over
    them (every k-th in raster order; the quantiles of 4M values are good to ~1e-3
    relative), gathered a block of rows at a time so nothing frame-sized is built;
    ``noise_pixels`` counts all good pixels. ``noise_ratio_cells``: the noise ratio in
    each cell of a `NOISE_CELLS` x `NOISE_CELLS` grid (`_noise_cells`), from every
    `_CELL_STRIDE`-th pixel of that sample.
    """
    bits = exposure.bitmask(NOISE_MASK_PLANES)
    ny = exposure.shape[0]
    blocks = row_blocks(ny)

    def good(rows: slice) -> np.ndarray:
        var = exposure.variance[rows]
        keep = np.isfinite(exposure.image[rows]) & np.isfinite(var) & (var > 0)
        if bits:
            keep &= (exposure.mask[rows] & bits) == 0
        if exclude is not None:
            keep &= ~exclude[rows]
        return keep

    keeps = thread_map(good, blocks)  # one bool per pixel, evaluated once
    counts = [int(np.count_nonzero(keep)) for keep in keeps]
    total = sum(counts)
    if total < 10:
        return {"noise_ratio": math.nan, "noise_mean": math.nan, "noise_pixels": 0}
    step = total // _NOISE_SAMPLE + 1
    # global ordinals seen.. of each block's good pixels; keep multiples of step
    starts = np.cumsum([0] + counts[:-1])

    # each pixel's cell of the grid, by row and by column (lookups: a division per pixel
    # cost as much as the statistics)
    row_cell = (np.arange(ny) * NOISE_CELLS // ny * NOISE_CELLS).astype(np.int8)
    column_cell = (np.arange(exposure.shape[1]) * NOISE_CELLS // exposure.shape[1]).astype(np.int8)

    nx = exposure.shape[1]

    def sample(job) -> tuple[np.ndarray, np.ndarray]:
        rows, keep, seen = job
        # the kept pixels' flat indices: only the sampled ones are gathered
        index = np.flatnonzero(keep)[(-int(seen)) % step :: step]
        image = exposure.image[rows].ravel()[index]
        variance = exposure.variance[rows].ravel()[index]
        # the cells of every _CELL_STRIDE-th pixel sampled: rows by a float product (exact
        # below 2^26 pixels a block), which integer division was 10x slower than
        cells = index[::_CELL_STRIDE]
        row = (cells * (1.0 / nx) + 0.5 / nx).astype(np.intp)
        cell = row_cell[rows][row] + column_cell[cells - row * nx]
        return image / np.sqrt(variance), cell

    jobs = [
        (rows, keep, seen)
        for rows, count, keep, seen in zip(blocks, counts, keeps, starts, strict=True)
        if count
    ]
    pieces = thread_map(sample, jobs)
    z = np.concatenate([values for values, _ in pieces])
    sigma, median = robust_sigma_median(z)
    # every _CELL_STRIDE-th value of each block's sample, as its cells were taken
    z_cells = np.concatenate([values[::_CELL_STRIDE] for values, _ in pieces])
    cells = _noise_cells(z_cells, np.concatenate([cell for _, cell in pieces]), exposure)
    return {
        "noise_ratio": sigma,
        "noise_mean": median,
        "noise_pixels": total,
        "noise_ratio_cells": cells,
    }


def _noise_cells(z: np.ndarray, cell: np.ndarray, exposure: Exposure) -> list[dict]:
    """The noise ratio in each cell of a `NOISE_CELLS` x `NOISE_CELLS` grid over the
    exposure holding `_NOISE_CELL_PIXELS` sampled pixels or more: its pixel range
    (``x``, ``y``: [first, last], parent), ``noise_ratio`` and ``n`` (pixels sampled)."""
    order = np.argsort(cell, kind="stable")  # a radix sort on int8: one pass
    counts = np.bincount(cell, minlength=NOISE_CELLS * NOISE_CELLS)
    ny, nx = exposure.shape
    x0, y0 = exposure.xy0
    out = []
    for k, values in enumerate(np.split(z[order], np.cumsum(counts)[:-1])):
        if values.size < _NOISE_CELL_PIXELS:
            continue
        j, i = divmod(k, NOISE_CELLS)
        first_x, first_y = -(-i * nx // NOISE_CELLS), -(-j * ny // NOISE_CELLS)
        last_x = -(-(i + 1) * nx // NOISE_CELLS) - 1
        last_y = -(-(j + 1) * ny // NOISE_CELLS) - 1
        out.append(
            {
                "x": [x0 + first_x, x0 + last_x],
                "y": [y0 + first_y, y0 + last_y],
                "noise_ratio": robust_sigma_median(values)[0],
                "n": int(values.size),
            }
        )
    return out


def robust_sigma_median(values: np.ndarray) -> tuple[float, float]:
    """Gaussian-equivalent sigma from the interquartile range, and the median, of ``values``
    (NaN for both when any value is not finite, or none is given).

    IQR / 1.349 as `scipy.stats.iqr` with ``scale="normal"`` defines it (numpy's linear
    quartiles, interpolated in float64). Not astropy's `mad_std`: the noise ratio is
    defined on the IQR (as afw's IQRANGE statistic), and the two differ on skewed pixel
    distributions (faint sources on the sky of a difference).
    """
    values = np.asarray(values).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        return math.nan, math.nan
    median, (q25, q75) = order.median_and_percentiles(values, [25.0, 75.0])
    return (q75 - q25) / _IQR_NORMAL, float(median)


def footprint_means(stamp_values, n_values: int, x, y, radius: float, shape) -> list[np.ndarray]:
    """Means of per-pixel quantities over circular footprints centred on (x, y).

    Parameters
    ----------
    stamp_values : callable(window) -> sequence of `numpy.ndarray`
        Given an index into the frame (row and column index arrays that broadcast to
        (m, 2r + 1, 2r + 1): a batch of m square stamps), the ``n_values``
        quantities on those pixels, elementwise; nothing frame-sized is built.
    n_values : int
    x, y : array-like
        Footprint centres in array coordinates.
    radius : float
        Footprint radius in pixels.
    shape : (ny, nx)

    Returns
    -------
    means : list of `numpy.ndarray`, one (n,) array per quantity; NaN for footprints
        with no finite pixel or off the image.
    """
    ny, nx = shape
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx * dx + dy * dy <= radius * radius
    xs, ys = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    out = [np.full(xs.size, np.nan) for _ in range(n_values)]
    ix, iy = np.floor(xs + 0.5).astype(int), np.floor(ys + 0.5).astype(int)
    inside = np.nonzero((ix - r >= 0) & (iy - r >= 0) & (ix + r + 1 <= nx) & (iy + r + 1 <= ny))[0]
    offsets = np.arange(-r, r + 1)
    # footprints in batches (one set of numpy calls each) small enough to stay in cache
    for start in range(0, inside.size, _FOOTPRINT_BATCH):
        batch = inside[start : start + _FOOTPRINT_BATCH]
        rows = (iy[batch, None] + offsets)[:, :, None]
        cols = (ix[batch, None] + offsets)[:, None, :]
        for stamps, values in zip(stamp_values((rows, cols)), out, strict=True):
            pix = np.asarray(stamps, dtype=np.float64)[:, disc]
            finite = np.isfinite(pix)
            count = finite.sum(axis=1)
            total = np.where(finite, pix, 0.0).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                values[batch] = np.where(count > 0, total / count, np.nan)
    return out


def compute_difference_metrics(
    science: Exposure, difference: Exposure, stars, fwhm: float, config, sky=None
) -> dict[str, float]:
    """Footprint ratios of Rubin's metrics (6.1) and residual chi^2 at stars.

    Parameters
    ----------
    science, difference : `Exposure`
    stars : `astropy.table.Table` or None
        Catalog with x, y (parent coordinates) of the sources to test.
    fwhm : float
        Science PSF FWHM; footprints have radius ``config.metrics.footprint_radius_fwhm`` x it.
    sky : `astropy.table.Table` or None
        Sky-source positions (x, y); without them the sky level is the
        nan-median of |difference|.
    """
    radius = max(1.5, config.metrics.footprint_radius_fwhm * fwhm)
    x0, y0 = difference.xy0

    def stamp_values(window):
        image, variance = difference.image[window], difference.variance[window]
        with np.errstate(divide="ignore", invalid="ignore"):
            chi = np.where(variance > 0, image**2 / variance, np.nan)
        return np.abs(science.image[window]), np.abs(image), chi

    def means(table, n_values):
        return footprint_means(
            stamp_values,
            n_values,
            np.asarray(table["x"]) - x0,
            np.asarray(table["y"]) - y0,
            radius,
            difference.shape,
        )

    metrics: dict[str, float] = {}
    if sky is not None and len(sky):
        s_sky, d_sky = means(sky, 3)[:2]
        mean, std = _mean_std(np.abs(d_sky / s_sky))
        metrics["differenceFootprintSkyRatioMean"] = mean
        metrics["differenceFootprintSkyRatioStdev"] = std
        level = float(np.nanmean(d_sky))
    else:
        metrics["differenceFootprintSkyRatioMean"] = math.nan
        metrics["differenceFootprintSkyRatioStdev"] = math.nan
        level = float(np.nanmedian(np.abs(difference.image)))
    if stars is not None and len(stars):
        s_f, d_f, chi_f = means(stars, 3)
        mean, std = _mean_std(np.abs((d_f - level) / s_f))
        chi_f = chi_f[np.isfinite(chi_f)]
        metrics["differenceFootprintRatioMean"] = mean
        metrics["differenceFootprintRatioStdev"] = std
        metrics["star_residual_chi2_median"] = float(np.median(chi_f)) if chi_f.size else math.nan
        metrics["n_metric_stars"] = int(len(stars))
    else:
        metrics["differenceFootprintRatioMean"] = math.nan
        metrics["differenceFootprintRatioStdev"] = math.nan
        metrics["star_residual_chi2_median"] = math.nan
        metrics["n_metric_stars"] = 0
    return metrics


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population std (ddof 0, as Rubin) of the finite values; NaN when none."""
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))
