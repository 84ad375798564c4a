"""Sources: detection, user catalogs, kernel-source selection and sky positions.

alsub does not need a measured catalog (algorithm.md, decision 5): `detect_sources`
finds sources with a matched filter and measures what kernel-source selection
cuts on (S/N, size, flags); `read_catalog` reads a user's FITS/CSV/JSON catalog;
`select_kernel_sources` applies the cuts of section 3.1; `sky_sources` places
empty-sky positions for the metrics of section 6.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.utils.exceptions import AstropyUserWarning
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.stats import qmc

from .config import DetectionConfig, SourcesConfig
from .convolve import correlate_image
from .errors import InsufficientSourcesError, InvalidCatalogError
from .exposure import Exposure
from .parallel import thread_map
from .psf import SIGMA_TO_FWHM, GaussianPsf, Psf, stellar_locus

__all__ = [
    "background_map",
    "detect_sources",
    "measure_sources",
    "read_catalog",
    "select_kernel_sources",
    "sky_sources",
    "BACKGROUND_IGNORE_PLANES",
    "MASKED_FLAG_PLANES",
]

#: Planes whose pixels do not enter the background and noise estimate.
BACKGROUND_IGNORE_PLANES = (
    "BAD",
    "SAT",
    "NO_DATA",
    "EDGE",
    "CR",
    "DETECTED",
    "DETECTED_NEGATIVE",
)
#: Planes that set ``flag_masked`` when present in a source's footprint.
MASKED_FLAG_PLANES = ("BAD", "NO_DATA", "SAT", "CR")
#: Smoothing Gaussian sigma (pixels) for a first detection pass when no PSF is known.
_DEFAULT_SMOOTH_SIGMA = 1.0
#: Fewest valid pixels (fraction of a mesh cell) for a cell to count in the background.
_MIN_CELL_FRACTION = 0.25
#: A secondary peak in a footprint counts as a source when it rises this many noise
#: sigmas (smoothed S/N units) above the saddle towards a brighter peak.
_PEAK_PROMINENCE = 3.0
#: Rows per block for frame-wide elementwise work: temporaries stay a few MB (reused
#: by the allocator) instead of frame-sized arrays that each cost fresh page faults.
_BLOCK_ROWS = 256


def _row_blocks(ny: int):
    """Row slices covering 0..ny in blocks of `_BLOCK_ROWS`."""
    return [slice(y, min(y + _BLOCK_ROWS, ny)) for y in range(0, ny, _BLOCK_ROWS)]


def _plane_hits(exposure: Exposure, names, rows: slice) -> np.ndarray:
    """``exposure.masked(names)`` for a block of rows."""
    bits = exposure.bitmask(names)
    if not bits:
        return np.zeros((rows.stop - rows.start, exposure.shape[1]), dtype=bool)
    return (exposure.mask[rows] & bits) != 0


# --------------------------------------------------------------------------------------
# background and noise
def _interp_matrix(n_out: int, first: float, step: float, n: int) -> np.ndarray:
    """Linear interpolation weights (n_out, n) from nodes at first + k step to pixels
    0..n_out-1; pixels beyond the outer nodes are extrapolated linearly (half a cell
    at most), so gradients stay straight up to the edge."""
    if n == 1:
        return np.ones((n_out, 1))
    t = (np.arange(n_out, dtype=np.float64) - first) / step
    lo = np.clip(np.floor(t).astype(int), 0, n - 2)
    frac = t - lo
    weights = np.zeros((n_out, n))
    weights[np.arange(n_out), lo] = 1.0 - frac
    weights[np.arange(n_out), lo + 1] += frac
    return weights


def _despike(mesh: np.ndarray, floor: float) -> np.ndarray:
    """Replace cells that stand out from their 3x3 median (bright halos) by that median.

    Only departures above ``floor`` count, so a smooth gradient (whose corner
    cells differ from their median by about one cell's change) is left alone.
    """
    size = (min(3, mesh.shape[0]), min(3, mesh.shape[1]))
    if size == (1, 1):
        return mesh
    smooth = ndimage.median_filter(mesh, size=size, mode="nearest")
    diff = mesh - smooth
    scatter = 1.4826 * np.median(np.abs(diff))
    outlier = np.abs(diff) > max(3.0 * scatter, floor)
    return np.where(outlier, smooth, mesh)


def _search_rows(sorted_rows: np.ndarray, n: np.ndarray, value: np.ndarray, right: bool):
    """Per-row `numpy.searchsorted` on rows sorted ascending with NaNs last (``n`` finite
    values each): a vectorised binary search over all rows at once."""
    rows = np.arange(sorted_rows.shape[0])
    lo = np.zeros(rows.size, dtype=np.int64)
    hi = n.astype(np.int64)
    last = sorted_rows.shape[1] - 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        probe = sorted_rows[rows, np.minimum(mid, last)]
        with np.errstate(invalid="ignore"):
            before = (probe <= value) if right else (probe < value)
        before &= active
        lo = np.where(before, mid + 1, lo)
        hi = np.where(active & ~before, mid, hi)


def _clipped_stats_sorted(s: np.ndarray, sigma: float, maxiters: int):
    """Clipped median and std of each row of ``s`` (sorted, NaNs last).

    Reproduces `astropy.stats.sigma_clipped_stats` (median centre, population
    std, clipping cumulative, final bounds applied to all values): on sorted rows
    every clipped set is an index range, so each pass is a binary search and the
    sums come from prefix sums instead of a new selection per pass.
    """
    k, length = s.shape
    rows = np.arange(k)
    finite = np.isfinite(s)
    n = finite.sum(axis=1)
    # sums about a value near the median keep E[d^2] - E[d]^2 accurate; one trailing
    # zero lets every range end (up to k * length) be a valid reduceat index
    ref = np.where(n > 0, s[rows, np.minimum(n // 2, length - 1)], 0.0)
    d = np.zeros(k * length + 1)
    d[:-1] = (s - ref[:, None].astype(np.float64)).ravel()
    if not finite.all():
        d[:-1][~finite.ravel()] = 0.0
    d2 = d * d
    base = rows * length

    def range_sum(values, a, b):
        # sums over [a, b) of every row at once; empty ranges are blanked by the caller
        bounds = np.empty(2 * k, dtype=np.int64)
        bounds[0::2] = base + np.minimum(a, length - 1)
        bounds[1::2] = base + np.maximum(b, a + 1)
        return np.add.reduceat(values, bounds)[0::2]

    def stats(a, b):
        count = b - a
        safe = np.maximum(count, 1)
        mid = a + count // 2
        upper = s[rows, np.clip(mid, 0, length - 1)].astype(np.float64)
        lower = s[rows, np.clip(mid - 1, 0, length - 1)].astype(np.float64)
        median = np.where(count % 2 == 1, upper, 0.5 * (upper + lower))
        mean = range_sum(d, a, b) / safe
        var = range_sum(d2, a, b) / safe - mean * mean
        empty = count == 0
        median[empty] = np.nan
        std = np.sqrt(np.maximum(var, 0.0))
        std[empty] = np.nan
        return median, std

    a = np.zeros(k, dtype=np.int64)
    b = n.astype(np.int64)
    done = n == 0
    lower = np.full(k, np.nan)
    upper = np.full(k, np.nan)
    for _ in range(maxiters):
        median, std = stats(a, b)
        lower = np.where(done, lower, median - sigma * std)
        upper = np.where(done, upper, median + sigma * std)
        new_a = np.maximum(a, _search_rows(s, n, lower, right=False))
        new_b = np.minimum(b, _search_rows(s, n, upper, right=True))
        count = np.maximum(new_b - new_a, 0)
        stop = (count == b - a) | (count == 0)
        update = ~done & ~stop
        a = np.where(update, new_a, a)
        b = np.where(update, new_b, b)
        done |= stop
        if done.all():
            break
    # the final bounds select from all values, as astropy's final mask does
    a = _search_rows(s, n, lower, right=False)
    b = np.maximum(_search_rows(s, n, upper, right=True), a)
    return (*stats(a, b), n)


def _cell_stats(cells: np.ndarray, sigma: float = 3.0, maxiters: int = 5, chunk: int = 512):
    """3-sigma clipped median, std and number of finite values of each cell.

    ``cells`` is (m, n) rows or an (nby, nbx, h, w) block view of an image (NaN =
    no data). Cells are copied, sorted and reduced a chunk at a time, so the
    sorted copy and the sums stay small.
    """
    if cells.ndim == 4:
        step = max(1, chunk // max(cells.shape[1], 1))
        size = cells.shape[2] * cells.shape[3]
        parts = [cells[i : i + step].reshape(-1, size) for i in range(0, cells.shape[0], step)]
    else:
        parts = [cells[i : i + chunk] for i in range(0, cells.shape[0], chunk)]
    if not parts:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)

    def reduce(part: np.ndarray):
        return _clipped_stats_sorted(np.sort(part, axis=1), sigma, maxiters)

    # sorting and the clipping passes release the GIL: chunks run on all cores
    median, std, count = zip(*thread_map(reduce, parts), strict=True)
    return np.concatenate(median), np.concatenate(std), np.concatenate(count)


class _BackgroundMesh:
    """Mesh background and noise of `background_map`, interpolated to pixels on demand
    (whole frame, or a block of rows so that no frame-sized map need exist)."""

    def __init__(self, median: np.ndarray, std: np.ndarray, wy: np.ndarray, wx: np.ndarray):
        self.median = median
        self.std = std
        self.wy = wy
        self.wx_t = wx.T.astype(np.float32)

    @classmethod
    def constant(cls, ny: int, nx: int, level: float, noise: float) -> _BackgroundMesh:
        return cls(np.array([[level]]), np.array([[noise]]), np.ones((ny, 1)), np.ones((nx, 1)))

    def _rows(self, mesh: np.ndarray, rows: slice) -> np.ndarray:
        # (rows, nby) @ (nby, nbx) @ (nbx, nx): along y first, then along x
        return (self.wy[rows] @ mesh).astype(np.float32) @ self.wx_t

    def background(self, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(self.median, rows)

    def noise(self, rows: slice = slice(None)) -> np.ndarray:
        return self._rows(self.std, rows)


def background_map(
    exposure: Exposure,
    mesh: int = 64,
    ignore_planes=BACKGROUND_IGNORE_PLANES,
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth background and noise maps from a mesh of sigma-clipped statistics.

    Each ``mesh`` x ``mesh`` cell gets the 3-sigma clipped median and standard
    deviation of its valid pixels (finite and not in ``ignore_planes``); cells
    with under a quarter valid pixels take their nearest valid neighbour; cells
    far (3 sigma) from their 3x3 median are replaced by it; the mesh is then
    linearly interpolated to every pixel.

    Parameters
    ----------
    exposure : `Exposure`
    mesh : int
        Cell size in pixels.
    ignore_planes : sequence of str
        Mask planes excluded from the statistics.

    Returns
    -------
    background, noise : `numpy.ndarray` (ny, nx), float32
    """
    estimate = _background_mesh(exposure, mesh, ignore_planes)
    return estimate.background(), estimate.noise()


def _background_mesh(exposure: Exposure, mesh: int, ignore_planes) -> _BackgroundMesh:
    image = np.asarray(exposure.image, dtype=np.float32)
    ny, nx = image.shape
    valid = np.empty((ny, nx), dtype=bool)
    for rows in _row_blocks(ny):
        np.logical_and(
            np.isfinite(image[rows]), ~_plane_hits(exposure, ignore_planes, rows), out=valid[rows]
        )
    mesh = int(max(4, min(mesh, ny, nx)))
    nby, nbx = -(-ny // mesh), -(-nx // mesh)
    if ny == nby * mesh and nx == nbx * mesh and valid.all():
        padded = image
    else:
        padded = np.full((nby * mesh, nbx * mesh), np.nan, dtype=np.float32)
        padded[:ny, :nx] = np.where(valid, image, np.float32(np.nan))
    cells = padded.reshape(nby, mesh, nbx, mesh).transpose(0, 2, 1, 3)
    median, std, counts = (v.reshape(nby, nbx) for v in _cell_stats(cells))
    good = (counts >= _MIN_CELL_FRACTION * mesh * mesh) & np.isfinite(median) & np.isfinite(std)
    if not good.any():
        # nothing usable cell by cell: one global estimate
        finite = image[valid] if valid.any() else image[np.isfinite(image)]
        if finite.size == 0:
            return _BackgroundMesh.constant(ny, nx, 0.0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            _, med, sd = sigma_clipped_stats(finite, sigma=3.0, maxiters=5)
        return _BackgroundMesh.constant(ny, nx, float(med), float(sd) if sd > 0 else 1.0)
    if not good.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~good, return_indices=True)
        median, std = median[iy, ix], std[iy, ix]
    typical_noise = float(np.median(std))
    median = _despike(median, 2.0 * typical_noise)
    std = _despike(std, 0.5 * typical_noise)
    wy = _interp_matrix(ny, (mesh - 1) / 2.0, mesh, nby)
    wx = _interp_matrix(nx, (mesh - 1) / 2.0, mesh, nbx)
    return _BackgroundMesh(median, std, wy, wx)


def _negative_side_sigma(values: np.ndarray, use: np.ndarray | None = None) -> float:
    """Noise from the lower half of a distribution (sources only add a positive tail).

    ``use`` optionally selects the entries of ``values`` to look at (boolean, same
    shape). Of the selected finite values at most about a million, evenly strided
    (every k-th in raster order), enter the estimate; they are gathered block by
    block so no frame-sized copy is made.
    """
    values = np.atleast_2d(values)
    if use is not None:
        use = np.atleast_2d(use)
    blocks = _row_blocks(values.shape[0])

    def selected(rows: slice) -> np.ndarray:
        keep = np.isfinite(values[rows])
        if use is not None:
            keep &= use[rows]
        return keep

    counts = [int(np.count_nonzero(selected(rows))) for rows in blocks]
    total = sum(counts)
    if total < 10:
        return 1.0
    step = total // 1_000_000 + 1 if total > 1_000_000 else 1
    pieces: list[np.ndarray] = []
    seen = 0
    for rows, count in zip(blocks, counts, strict=True):
        if count:
            chosen = values[rows][selected(rows)]
            # global ordinals seen .. seen + count - 1; keep multiples of step
            pieces.append(chosen[(-seen) % step :: step])
            seen += count
    sample = np.concatenate(pieces)
    median = np.median(sample)
    sigma = median - np.percentile(sample, 15.865525393145708)
    return float(sigma) if sigma > 0 else 1.0


def _psf_sigma(psf: Psf) -> float:
    try:
        return float(psf.sigma())
    except Exception:  # noqa: BLE001 - a broken PSF falls back to a generic width
        return _DEFAULT_SMOOTH_SIGMA


class _Filtered:
    """Background-subtracted image, its matched-filtered S/N and the pieces to measure.

    Maps are float32 (the inputs are): half the memory traffic of float64 on
    full frames, with rounding far below the noise.
    """

    def __init__(self, exposure: Exposure, psf: Psf, estimate: _BackgroundMesh):
        image = np.empty(exposure.shape, dtype=np.float32)
        no_data = np.empty(image.shape, dtype=bool)
        var_ok = np.empty(image.shape, dtype=bool)
        variance = np.asarray(exposure.variance, dtype=np.float32)
        for rows in _row_blocks(image.shape[0]):
            np.subtract(exposure.image[rows], estimate.background(rows), out=image[rows])
            hits = _plane_hits(exposure, ["NO_DATA"], rows)
            np.logical_or(~np.isfinite(image[rows]), hits, out=no_data[rows])
            var = variance[rows]
            var_ok[rows] = np.isfinite(var) & (var > 0) & ~no_data[rows]
        any_no_data = bool(no_data.any())
        if any_no_data:
            image[no_data] = 0.0
        n_ok = np.count_nonzero(var_ok)
        if n_ok < 0.5 * var_ok.size:
            # unusable variance plane: the mesh noise is the local variance
            variance = np.square(estimate.noise(), dtype=np.float32)
            var_ok = np.isfinite(variance) & (variance > 0) & ~no_data
            n_ok = np.count_nonzero(var_ok)
        all_ok = n_ok == var_ok.size
        good = variance.ravel() if all_ok else variance[var_ok]
        # a strided sample's median is plenty for a fill value
        fill = float(np.median(good[:: good.size // 1_000_000 + 1])) if good.size else 1.0
        if not all_ok:
            variance = np.where(var_ok, variance, np.float32(fill))
        del var_ok, good
        self.image = image
        self.variance = variance
        self.no_data = no_data
        self.psf = psf
        kernel = psf.kernel_image(*(psf.average_position or (None, None))).astype(np.float64)
        self.kernel = kernel
        self.psf_sum_sq = float(np.sum(kernel**2))
        # single precision: the matched filter feeds a threshold and fluxes quoted far
        # above 1e-5; tiled and threaded like the kernel convolution
        self.smoothed = correlate_image(image, kernel, single=True)
        self.smoothed_var = correlate_image(variance, kernel**2, single=True)
        np.maximum(self.smoothed_var, np.float32(1e-30 * fill), out=self.smoothed_var)
        # in place: every frame-sized temporary costs page faults on first touch
        snr = np.sqrt(self.smoothed_var)
        np.divide(self.smoothed, snr, out=snr)
        if any_no_data:
            snr[no_data] = 0.0
        # the variance plane may be off by a constant (correlated or mis-scaled noise):
        # rescale the S/N so that its empty-sky scatter is 1
        self.noise_factor = _negative_side_sigma(snr, ~no_data if any_no_data else None)
        snr /= np.float32(self.noise_factor)
        self.snr = snr


# --------------------------------------------------------------------------------------
# measurement helpers (vectorised over sources)
def _stack(array: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int, fill=0.0) -> np.ndarray:
    """Stamps (n, 2h+1, 2h+1) of ``array`` centred on integer array indices (cx, cy);
    pixels off the array are ``fill``. Gathers only the stamps (no padded frame copy)."""
    ny, nx = array.shape
    offsets = np.arange(-half, half + 1)
    rows = np.asarray(cy)[:, None] + offsets
    cols = np.asarray(cx)[:, None] + offsets
    stamps = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    row_in = (rows >= 0) & (rows < ny)
    col_in = (cols >= 0) & (cols < nx)
    if not (row_in.all() and col_in.all()):
        stamps[~(row_in[:, :, None] & col_in[:, None, :])] = fill
    return stamps


#: A source's iterative centroid is frozen once a step moves it by less than this (px).
_CENTROID_CONVERGED = 1e-8
#: A source's adaptive moments are frozen once a step changes them by less than this
#: fraction of their trace (they then sit within a few 1e-6 of the fixed point).
_MOMENTS_CONVERGED = 1e-6


def _centroids(stamps: np.ndarray, sigma: float, iterations: int = 15):
    """Gaussian-weighted centroid offsets (dx, dy) from the stamp centres.

    The weight is separable, so each step is one small matrix product per stamp;
    sources whose step falls below `_CENTROID_CONVERGED` px are frozen.
    """
    n, w, _ = stamps.shape
    half = w // 2
    grid = np.arange(w, dtype=np.float64) - half
    dx = np.zeros(n)
    dy = np.zeros(n)
    inv = 1.0 / (2.0 * sigma * sigma)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        sub = stamps[active]
        wx = np.exp(-((grid[None, :] - dx[active, None]) ** 2) * inv)
        wy = np.exp(-((grid[None, :] - dy[active, None]) ** 2) * inv)
        # columns weighted by wx and by wx * x: (m, w, 2), summed over x
        rows = np.matmul(sub, np.stack([wx, wx * grid], axis=2))
        total = np.einsum("mj,mj->m", rows[:, :, 0], wy)
        sum_x = np.einsum("mj,mj->m", rows[:, :, 1], wy)
        sum_y = np.einsum("mj,mj->m", rows[:, :, 0], wy * grid)
        ok = total > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            new_dx = np.where(ok, sum_x / total, dx[active])
            new_dy = np.where(ok, sum_y / total, dy[active])
        new_dx = np.clip(new_dx, -half / 2.0, half / 2.0)
        new_dy = np.clip(new_dy, -half / 2.0, half / 2.0)
        step = np.maximum(np.abs(new_dx - dx[active]), np.abs(new_dy - dy[active]))
        dx[active] = new_dx
        dy[active] = new_dy
        active = active[~(step < _CENTROID_CONVERGED)]
    return dx, dy


def _moments(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, sigma: float, iterations=30):
    """Adaptive second moments (ixx, iyy, ixy) of a stack of stamps about (dx, dy).

    Sources whose moments change by less than `_MOMENTS_CONVERGED` of their
    trace in a step are frozen (the iteration is a contraction near its fixed
    point, so later steps would move them by about as little).
    """
    n, w, _ = stamps.shape
    half = w // 2
    grid = np.arange(w, dtype=np.float64) - half
    xs = grid[None, :] - dx[:, None]  # (n, w): x of each column
    ys = grid[None, :] - dy[:, None]  # (n, w): y of each row
    cxx = np.full(n, sigma * sigma)
    cyy = cxx.copy()
    cxy = np.zeros(n)
    total_all = np.full(n, np.nan)
    limit = float(half * half)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        axx, ayy, axy = cxx[active], cyy[active], cxy[active]
        x, y = xs[active], ys[active]
        det = axx * ayy - axy * axy
        # weight exp(-(cyy x^2 - 2 cxy x y + cxx y^2) / (2 det)), split by term
        ex = (ayy / (2.0 * det))[:, None] * (x * x)
        ey = (axx / (2.0 * det))[:, None] * (y * y)
        expo = (axy / det)[:, None, None] * (y[:, :, None] * x[:, None, :])
        expo -= ey[:, :, None]
        expo -= ex[:, None, :]
        weighted = stamps[active] * np.exp(expo)
        row_sum = weighted.sum(axis=2)  # (m, w) over x, per y
        col_sum = weighted.sum(axis=1)  # (m, w) over y, per x
        total = row_sum.sum(axis=1)
        total = np.where(total > 0, total, np.nan)
        mxx = np.einsum("mi,mi->m", col_sum, x * x) / total
        myy = np.einsum("mj,mj->m", row_sum, y * y) / total
        mxy = np.einsum("mj,mj->m", np.matmul(weighted, x[:, :, None])[:, :, 0], y) / total
        # object moments C from measured = (C^-1 + W^-1)^-1
        mdet = mxx * myy - mxy * mxy
        with np.errstate(divide="ignore", invalid="ignore"):
            bxx, byy, bxy = myy / mdet - ayy / det, mxx / mdet - axx / det, -mxy / mdet + axy / det
            bdet = bxx * byy - bxy * bxy
            nxx, nyy, nxy = byy / bdet, bxx / bdet, -bxy / bdet
        bad = ~(np.isfinite(nxx) & np.isfinite(nyy) & (nxx > 0) & (nyy > 0) & (bdet > 0))
        nxx = np.where(bad, 2 * mxx, nxx)
        nyy = np.where(bad, 2 * myy, nyy)
        nxy = np.where(bad, 2 * mxy, nxy)
        nxx = np.clip(np.nan_to_num(nxx, nan=limit), 0.05, limit)
        nyy = np.clip(np.nan_to_num(nyy, nan=limit), 0.05, limit)
        nxy = np.clip(np.nan_to_num(nxy), -0.95 * np.sqrt(nxx * nyy), 0.95 * np.sqrt(nxx * nyy))
        step = np.maximum(np.maximum(np.abs(nxx - axx), np.abs(nyy - ayy)), np.abs(nxy - axy))
        cxx[active], cyy[active], cxy[active] = nxx, nyy, nxy
        total_all[active] = total
        active = active[~(step < _MOMENTS_CONVERGED * (nxx + nyy))]
    failed = ~np.isfinite(total_all) | (cxx >= limit) | (cyy >= limit)
    cxx[failed] = cyy[failed] = cxy[failed] = np.nan
    return cxx, cyy, cxy


#: Margin (pixels) of the stamps that `_interp_at` spline-filters: the cubic B-spline
#: prefilter is a recursive filter whose pole (sqrt(3) - 2) damps a stamp edge's
#: influence by 0.27 per pixel, 2e-6 at this distance.
_SPLINE_MARGIN = 10


def _interp_at(array: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Cubic-spline value of a smooth map at fractional array positions.

    Same as ``ndimage.map_coordinates(array, [row, col], order=3, mode="nearest")``
    but the spline coefficients are computed on a stamp around each position
    instead of over the whole frame (stamps beyond the frame repeat its edge).
    """
    col = np.asarray(col, dtype=np.float64)
    row = np.asarray(row, dtype=np.float64)
    if col.size == 0:
        return np.zeros(0)
    ny, nx = array.shape
    col = np.clip(col, 0, nx - 1)
    row = np.clip(row, 0, ny - 1)
    ic = np.floor(col).astype(int)
    ir = np.floor(row).astype(int)
    h = _SPLINE_MARGIN
    offsets = np.arange(-h, h + 2)
    rows = np.clip(ir[:, None] + offsets, 0, ny - 1)
    cols = np.clip(ic[:, None] + offsets, 0, nx - 1)
    stamps = array[rows[:, :, None], cols[:, None, :]].astype(np.float64)
    # the filter is separable: along y for every column, then along x only for the
    # four rows whose coefficients the cubic B-spline at floor - 1 .. floor + 2 uses
    coeffs = ndimage.spline_filter1d(stamps, 3, axis=1, mode="nearest")[:, h - 1 : h + 3]
    coeffs = ndimage.spline_filter1d(coeffs, 3, axis=2, mode="nearest")
    core = coeffs[:, :, h - 1 : h + 3]
    wy = _bspline_weights(row - ir)
    wx = _bspline_weights(col - ic)
    return np.einsum("nji,nj,ni->n", core, wy, wx)


def _bspline_weights(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights (n, 4) of nodes -1, 0, 1, 2 at fractional offsets t."""
    t = t[:, None]
    t2, t3 = t * t, t * t * t
    return (
        np.concatenate(
            [(1.0 - t) ** 3, 4.0 - 6.0 * t2 + 3.0 * t3, 1.0 + 3.0 * (t + t2 - t3), t3],
            axis=1,
        )
        / 6.0
    )


def _measure(
    filtered: _Filtered,
    exposure: Exposure,
    col: np.ndarray,
    row: np.ndarray,
    recentroid: bool,
) -> dict[str, np.ndarray]:
    """Centroid, PSF flux, S/N, peak, adaptive size of sources near array positions."""
    sigma = _psf_sigma(filtered.psf)
    half = int(max(5, math.ceil(4.0 * sigma)))
    ny, nx = filtered.image.shape
    cx = np.clip(np.floor(col + 0.5).astype(int), 0, nx - 1)
    cy = np.clip(np.floor(row + 0.5).astype(int), 0, ny - 1)
    stamps = _stack(filtered.image, cx, cy, half)
    if recentroid:
        dx, dy = _centroids(stamps, sigma)
        col, row = cx + dx, cy + dy
    else:
        dx, dy = col - cx, row - cy
    ixx, iyy, ixy = _moments(stamps, dx, dy, sigma)
    numerator = _interp_at(filtered.smoothed, col, row)
    numerator_var = _interp_at(filtered.smoothed_var, col, row) * filtered.noise_factor**2
    flux = numerator / filtered.psf_sum_sq
    flux_err = np.sqrt(np.maximum(numerator_var, 0)) / filtered.psf_sum_sq
    inner = max(1, int(round(sigma)))
    core = stamps[:, half - inner : half + inner + 1, half - inner : half + inner + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        size = np.sqrt(0.5 * (ixx + iyy))
        tr = ixx + iyy
        root = np.sqrt((ixx - iyy) ** 2 + 4 * ixy**2)
        roundness = np.sqrt(np.clip((tr - root) / (tr + root), 0, 1))
        snr = flux / flux_err
    return {
        "col": col,
        "row": row,
        "flux": flux,
        "flux_err": flux_err,
        "snr": snr,
        "peak": core.max(axis=(1, 2)),
        "ixx": ixx,
        "iyy": iyy,
        "ixy": ixy,
        "size": size,
        "roundness": roundness,
        "half": np.full(col.shape, half),
    }


def _resolve_psf(exposure: Exposure, psf: Psf | None) -> Psf | None:
    return psf if psf is not None else exposure.psf


# --------------------------------------------------------------------------------------
# detection
def _footprints(
    snr: np.ndarray,
    threshold: float,
    min_pixels: int,
    negative: bool = False,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Labels of 8-connected pieces with ``snr >= threshold`` (``<= -threshold`` when
    ``negative``) of at least ``min_pixels`` pixels, numbered in raster order; written
    into ``out`` (int32, reused between passes) when given."""
    above = snr <= -threshold if negative else snr >= threshold
    if not above.any():
        # nothing to label (often the negative side): skip the full-frame scan
        if out is None:
            return np.zeros(snr.shape, dtype=np.int32), 0
        out.fill(0)
        return out, 0
    structure = np.ones((3, 3), dtype=bool)
    if out is None:
        labels, n = ndimage.label(above, structure=structure)
    else:
        labels, n = out, ndimage.label(above, structure=structure, output=out)
    if n == 0:
        return labels, 0
    # count and relabel only the (few) pixels above threshold, not the whole frame
    flat = labels.ravel()
    where = np.flatnonzero(above)
    values = flat[where]
    keep = np.bincount(values, minlength=n + 1) >= min_pixels
    keep[0] = False
    n_keep = int(keep.sum())
    if n_keep < n:
        relabel = np.zeros(n + 1, dtype=labels.dtype)
        relabel[keep] = np.arange(1, n_keep + 1, dtype=labels.dtype)
        flat[where] = relabel[values]
    return labels, n_keep


def _disc_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of a True pixel of ``mask``.

    Equal to ``distance_transform_edt(~mask) <= radius`` but built from shifted ORs:
    rows of the disc are horizontal dilations of increasing half-width, each made
    from the previous one and OR-ed in at the vertical offsets that use it.
    """
    if radius <= 0:
        return mask.copy()
    ny = mask.shape[0]
    widths = [int(math.isqrt(radius * radius - dy * dy)) for dy in range(radius + 1)]
    out = np.zeros(mask.shape, dtype=bool)
    current = mask
    spare = np.empty_like(mask)
    wider = np.empty_like(mask)
    for w in range(widths[0] + 1):
        if w:
            np.copyto(wider, current)
            wider[:, 1:] |= current[:, :-1]
            wider[:, :-1] |= current[:, 1:]
            current, wider = wider, (spare if current is mask else current)
        for dy in range(radius + 1):
            if widths[dy] != w:
                continue
            if dy == 0:
                out |= current
            elif dy < ny:
                out[dy:] |= current[:-dy]
                out[:-dy] |= current[dy:]
    return out


def _grow(labels: np.ndarray, radius: int, out: np.ndarray | None = None) -> np.ndarray:
    """Grow labelled footprints by ``radius`` pixels (nearest label wins contested pixels).

    The grown area is a disc dilation of all footprints; its connected pieces
    that hold a single footprint take that label outright, and only pieces
    shared by several footprints need a nearest-pixel (distance) transform, on
    their own bounding box. A footprint pixel from another piece lies farther
    than ``radius`` from every pixel of this one, so the result equals a
    whole-frame nearest-label transform (up to ties between equidistant pixels).
    ``out`` (int32, not ``labels``) receives the result when given.
    """
    if radius <= 0 or labels.max() == 0:
        return labels
    seeds = labels > 0
    reach = _disc_dilate(seeds, radius)
    structure = np.ones((3, 3), dtype=bool)
    if out is None:
        pieces, n_pieces = ndimage.label(reach, structure=structure)
    else:
        pieces, n_pieces = out, ndimage.label(reach, structure=structure, output=out)
    where = np.flatnonzero(seeds)
    seed_labels = labels.ravel()[where]
    seed_pieces = pieces.ravel()[where]
    lowest = np.full(n_pieces + 1, np.iinfo(np.int64).max, dtype=np.int64)
    highest = np.zeros(n_pieces + 1, dtype=np.int64)
    np.minimum.at(lowest, seed_pieces, seed_labels)
    np.maximum.at(highest, seed_pieces, seed_labels)
    single = lowest == highest
    lookup = np.where(single, highest, 0).astype(labels.dtype)
    lookup[0] = 0
    del reach, seeds
    shared = np.flatnonzero(~single[1:]) + 1
    # a piece is its seeds dilated by the disc: its box is theirs grown by the radius
    ny, nx = labels.shape
    in_shared = ~single[seed_pieces]
    seed_rows, seed_cols = np.divmod(where[in_shared], nx)
    box_lo = np.full((n_pieces + 1, 2), np.iinfo(np.int64).max, dtype=np.int64)
    box_hi = np.full((n_pieces + 1, 2), -1, dtype=np.int64)
    np.minimum.at(box_lo, seed_pieces[in_shared], np.column_stack([seed_rows, seed_cols]))
    np.maximum.at(box_hi, seed_pieces[in_shared], np.column_stack([seed_rows, seed_cols]))
    boxes = {
        piece: (
            slice(max(box_lo[piece, 0] - radius, 0), min(box_hi[piece, 0] + radius + 1, ny)),
            slice(max(box_lo[piece, 1] - radius, 0), min(box_hi[piece, 1] + radius + 1, nx)),
        )
        for piece in shared
    }
    insides = [pieces[boxes[piece]] == piece for piece in shared]
    # the piece image becomes the grown label image, a block at a time
    grown = pieces
    for rows in _row_blocks(grown.shape[0]):
        grown[rows] = lookup[grown[rows]]
    if shared.size:
        for piece, inside in zip(shared, insides, strict=True):
            box = boxes[piece]
            window = labels[box]
            _, (iy, ix) = ndimage.distance_transform_edt(
                ~((window > 0) & inside), return_indices=True
            )
            grown[box][inside] = window[iy, ix][inside]
    return grown


def detect_sources(
    exposure: Exposure,
    config: DetectionConfig | None = None,
    psf: Psf | None = None,
    set_mask: bool = True,
    grow_sigma: float = 2.4,
) -> Table:
    """Detect sources above a threshold in units of the local noise.

    The background and its noise come from `background_map`. With a PSF (given,
    or the exposure's) and ``config.smooth_with_psf`` the background-subtracted
    image is correlated with the PSF (matched filter) and divided by the square
    root of the equally filtered variance plane, giving an S/N image whose
    empty-sky scatter is renormalised to 1 (robust lower-half estimate). Without
    a PSF a Gaussian of sigma 2 px is used, then the sources' median adaptive
    size defines a Gaussian PSF for a second pass. Connected pixels (8-way) at or
    above ``threshold`` with at least ``min_pixels`` form footprints, which are
    then grown by ``grow_sigma`` PSF sigmas (as Rubin's detection does); the
    same is done on the negated S/N image for negative sources.

    Parameters
    ----------
    exposure : `Exposure`
        Searched; its DETECTED and DETECTED_NEGATIVE planes are replaced when
        ``set_mask`` (the only change made to it).
    config : `DetectionConfig` or None
        Threshold, minimum footprint size, background mesh, smoothing switch.
    psf : `Psf` or None
        Overrides the exposure's PSF for the matched filter and photometry.
    set_mask : bool
        Write the grown footprints into the DETECTED / DETECTED_NEGATIVE planes.
    grow_sigma : float
        Footprint growth in PSF sigmas.

    Returns
    -------
    `astropy.table.Table`
        One row per positive footprint: ``id``, ``label`` (value in the
        segmentation image), ``x``, ``y`` (parent coordinates, weighted
        centroid), ``flux``, ``flux_err`` (PSF flux and its error, counts),
        ``snr``, ``peak`` (background-subtracted, counts), ``peak_snr``,
        ``npix``, ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (inclusive
        parent box of the footprint), ``n_peaks``, ``ixx``, ``iyy``, ``ixy``
        (adaptive moments, px^2), ``size`` (trace radius, px), ``roundness``
        (minor/major axis ratio), ``flag_saturated``, ``flag_edge``,
        ``flag_masked``, ``flag_blended``. ``meta`` holds ``segmentation``
        (int32 label image of grown positive footprints, array indices),
        ``segmentation_negative``, ``n_negative``, ``threshold``,
        ``noise_factor``, ``psf_sigma`` and ``xy0``.
    """
    config = config or DetectionConfig()
    given = _resolve_psf(exposure, psf)
    estimate = _background_mesh(exposure, config.background_mesh, BACKGROUND_IGNORE_PLANES)
    if given is not None and config.smooth_with_psf:
        table = _detect_pass(exposure, config, given, estimate, grow_sigma, set_mask)
    else:
        first = GaussianPsf(_DEFAULT_SMOOTH_SIGMA)
        table = _detect_pass(exposure, config, first, estimate, grow_sigma, False)
        sizes = _clean_sizes(table)
        sigma = stellar_locus(sizes) if sizes.size >= 3 else _DEFAULT_SMOOTH_SIGMA
        if not config.smooth_with_psf:
            sigma = max(0.5, min(sigma, 20.0))
        if abs(sigma / _DEFAULT_SMOOTH_SIGMA - 1) > 0.15 or set_mask:
            model = GaussianPsf(max(0.5, min(sigma, 20.0)))
            table = _detect_pass(exposure, config, model, estimate, grow_sigma, set_mask)
        if given is not None:
            table.meta["psf_sigma"] = _psf_sigma(given)
    return table


def _clean_sizes(table: Table) -> np.ndarray:
    ok = (
        (table["snr"] > 20)
        & ~table["flag_saturated"]
        & ~table["flag_masked"]
        & ~table["flag_edge"]
        & ~table["flag_blended"]
        & np.isfinite(table["size"])
        & (table["size"] > 0.6)
    )
    return np.asarray(table["size"][ok])


def _local_maxima(snr: np.ndarray, pixels: np.ndarray, half: int):
    """(rows, cols) of the flat indices ``pixels`` whose value is the maximum of the
    (2 half + 1)^2 box around them (clipped to the frame), in ``pixels`` order.

    Same as comparing with ``ndimage.maximum_filter`` (whose reflected border
    repeats in-frame values) but only at the given pixels; the nearest ring is
    tested first, so most pixels drop out after eight comparisons.
    """
    ny, nx = snr.shape
    rows, cols = np.divmod(pixels, nx)
    value = snr.ravel()[pixels]
    keep = np.arange(pixels.size)
    offsets = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]
    offsets.sort(key=lambda o: max(abs(o[0]), abs(o[1])))
    for dy, dx in offsets[1:]:
        r = np.clip(rows[keep] + dy, 0, ny - 1)
        c = np.clip(cols[keep] + dx, 0, nx - 1)
        keep = keep[value[keep] >= snr[r, c]]
        if keep.size == 0:
            break
    return rows[keep], cols[keep]


def _find_peaks(snr: np.ndarray, labels: np.ndarray, n: int, sigma: float, prominence: float):
    """Peaks (row, col, label) of each footprint: its maximum, plus other local maxima
    that rise ``prominence`` above the lowest S/N on the line to a brighter peak."""
    pixels = np.flatnonzero(labels)
    pixel_labels = labels.ravel()[pixels]
    values = snr.ravel()[pixels]
    # brightest pixel of each footprint (the first in raster order on ties)
    best = np.full(n + 1, -np.inf, dtype=values.dtype)
    np.maximum.at(best, pixel_labels, values)
    top = np.flatnonzero(values == best[pixel_labels])
    _, first = np.unique(pixel_labels[top], return_index=True)
    main_flat = pixels[top[first]]
    main = np.column_stack(np.divmod(main_flat, labels.shape[1])).astype(int)
    size = max(3, 2 * int(round(sigma)) + 1)
    rows, cols = _local_maxima(snr, pixels, size // 2)
    secondary = ~np.isin(rows * labels.shape[1] + cols, main_flat)
    rows, cols = rows[secondary], cols[secondary]
    plabel = labels[rows, cols]
    # peaks of footprints with candidate secondaries (brightest first), main peak first
    peaks: dict[int, list[tuple[int, int]]] = {}
    order = np.argsort(-snr[rows, cols])
    for k in order:
        r, c, lab = int(rows[k]), int(cols[k]), int(plabel[k])
        known = peaks.setdefault(lab, [(int(main[lab - 1, 0]), int(main[lab - 1, 1]))])
        brighter = np.array(known, dtype=float)
        dist = np.hypot(brighter[:, 0] - r, brighter[:, 1] - c)
        near = brighter[int(np.argmin(dist))]
        steps = max(2, int(math.ceil(dist.min() * 2)))
        t = np.linspace(0.0, 1.0, steps + 1)
        line = ndimage.map_coordinates(
            snr, [r + t * (near[0] - r), c + t * (near[1] - c)], order=1, mode="nearest"
        )
        if snr[r, c] - line.min() >= prominence:
            known.append((r, c))
    extra = [(r, c, lab, k) for lab, found in peaks.items() for k, (r, c) in enumerate(found) if k]
    out = np.column_stack([main, np.arange(1, n + 1), np.zeros(n, dtype=int)])
    if extra:
        out = np.concatenate([out, np.array(extra, dtype=int)])
    # by footprint, main peak then secondaries in the order they were accepted
    out = out[np.lexsort((out[:, 3], out[:, 2]))]
    return out[:, :3]


def _detect_pass(exposure, config, psf, estimate, grow_sigma, set_mask) -> Table:
    filtered = _Filtered(exposure, psf, estimate)
    sigma = _psf_sigma(psf)
    grow = int(round(grow_sigma * sigma))
    labels, n = _footprints(filtered.snr, config.threshold, config.min_pixels)
    neg_labels, n_neg = _footprints(filtered.snr, config.threshold, config.min_pixels, True)
    # re-measure the S/N scatter on sky outside every footprint (sources and faint
    # wings inflate the first estimate), then detect again
    footprints = np.empty(labels.shape, dtype=bool)
    for rows in _row_blocks(labels.shape[0]):
        np.logical_or(labels[rows] > 0, neg_labels[rows] > 0, out=footprints[rows])
    sky = _disc_dilate(footprints, grow) if grow > 0 else footprints
    np.logical_not(sky, out=sky)
    for rows in _row_blocks(sky.shape[0]):
        sky[rows] &= ~filtered.no_data[rows]
    if np.count_nonzero(sky) > 1000:
        factor = _negative_side_sigma(filtered.snr, sky)
        filtered.snr /= factor
        filtered.noise_factor *= factor
        del footprints, sky
        thr, least = config.threshold, config.min_pixels
        labels, n = _footprints(filtered.snr, thr, least, out=labels)
        neg_labels, n_neg = _footprints(filtered.snr, thr, least, True, out=neg_labels)
    # grow positive and negative footprints together (one transform; nearest wins);
    # the label buffers are reused for the grown images
    if n_neg:
        both = np.where(neg_labels > 0, neg_labels + n, labels)
        result = _grow(both, grow, out=neg_labels)
        grown, grown_neg = both, neg_labels
        for rows in _row_blocks(result.shape[0]):
            block = result[rows]
            positive = np.where(block <= n, block, 0)
            negative = np.where(block > n, block - n, 0)
            grown[rows] = positive
            grown_neg[rows] = negative
    else:
        grown = _grow(labels, grow, out=neg_labels)
        grown_neg = np.zeros(grown.shape, dtype=grown.dtype)  # calloc: no pages touched
    if set_mask:
        exposure.clear_plane("DETECTED")
        exposure.clear_plane("DETECTED_NEGATIVE")
        exposure.set_plane("DETECTED", grown > 0)
        if n_neg:
            exposure.set_plane("DETECTED_NEGATIVE", grown_neg > 0)
        else:
            exposure.mask_planes.bit("DETECTED_NEGATIVE")  # the plane exists, empty
    x0, y0 = exposure.xy0
    table = _empty_detection_table()
    table.meta.update(
        {
            "segmentation": grown.astype(np.int32, copy=False),
            "segmentation_negative": grown_neg.astype(np.int32, copy=False),
            "n_footprints": n,
            "n_negative": n_neg,
            "threshold": float(config.threshold),
            "noise_factor": float(filtered.noise_factor),
            "psf_sigma": float(sigma),
            "xy0": (x0, y0),
        }
    )
    if n == 0:
        return table
    peaks = _find_peaks(filtered.snr, labels, n, sigma, _PEAK_PROMINENCE)
    prow, pcol, plabel = peaks[:, 0], peaks[:, 1], peaks[:, 2]
    measured = _measure(filtered, exposure, pcol.astype(float), prow.astype(float), True)
    n_peaks = np.bincount(plabel, minlength=n + 1)[plabel]
    # per-footprint sums over the grown footprints' pixels only
    inside = np.flatnonzero(grown)
    inside_label = grown.ravel()[inside]
    inside_mask = exposure.mask.ravel()[inside]
    npix = np.bincount(inside_label, minlength=n + 1)[plabel]
    inside_row, inside_col = np.divmod(inside, grown.shape[1])
    boxes = np.empty((n + 1, 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], inside_label, inside_col)
    np.minimum.at(boxes[:, 1], inside_label, inside_row)
    np.maximum.at(boxes[:, 2], inside_label, inside_col)
    np.maximum.at(boxes[:, 3], inside_label, inside_row)
    bbox = boxes[plabel]

    def any_in(planes) -> np.ndarray:
        bits = exposure.bitmask(planes)
        hit = (inside_mask & bits) != 0 if bits else np.zeros(inside.size, dtype=bool)
        return (np.bincount(inside_label[hit], minlength=n + 1) > 0)[plabel]

    saturated = any_in(["SAT"])
    saturate_level = exposure.metadata.get("SATURATE")
    if isinstance(saturate_level, int | float) and saturate_level > 0:
        values = exposure.image.ravel()[inside]
        above = np.isfinite(values) & (values >= saturate_level)
        saturated |= (np.bincount(inside_label[above], minlength=n + 1) > 0)[plabel]
    ny, nx = exposure.shape
    half = measured["half"]
    edge = (
        any_in(["EDGE"])
        | (bbox[:, 0] == 0)
        | (bbox[:, 1] == 0)
        | (bbox[:, 2] == nx - 1)
        | (bbox[:, 3] == ny - 1)
        | (measured["col"] < half)
        | (measured["row"] < half)
        | (measured["col"] > nx - 1 - half)
        | (measured["row"] > ny - 1 - half)
    )
    columns = {
        "id": np.arange(len(peaks)),
        "label": plabel.astype(np.int32),
        "x": measured["col"] + x0,
        "y": measured["row"] + y0,
        "flux": measured["flux"],
        "flux_err": measured["flux_err"],
        "snr": measured["snr"],
        "peak": measured["peak"],
        "peak_snr": filtered.snr[prow, pcol],
        "npix": npix,
        "bbox_x0": bbox[:, 0] + x0,
        "bbox_y0": bbox[:, 1] + y0,
        "bbox_x1": bbox[:, 2] + x0,
        "bbox_y1": bbox[:, 3] + y0,
        "n_peaks": n_peaks,
        "ixx": measured["ixx"],
        "iyy": measured["iyy"],
        "ixy": measured["ixy"],
        "size": measured["size"],
        "roundness": measured["roundness"],
        "flag_saturated": saturated,
        "flag_edge": edge,
        "flag_masked": any_in(MASKED_FLAG_PLANES),
        "flag_blended": n_peaks > 1,
    }
    # copy=False: the meta's segmentation images are fresh, no need to deep-copy them
    return Table(columns, meta=table.meta, copy=False)


_DETECTION_COLUMNS = {
    "id": int,
    "label": np.int32,
    "x": float,
    "y": float,
    "flux": float,
    "flux_err": float,
    "snr": float,
    "peak": float,
    "peak_snr": float,
    "npix": int,
    "bbox_x0": int,
    "bbox_y0": int,
    "bbox_x1": int,
    "bbox_y1": int,
    "n_peaks": int,
    "ixx": float,
    "iyy": float,
    "ixy": float,
    "size": float,
    "roundness": float,
    "flag_saturated": bool,
    "flag_edge": bool,
    "flag_masked": bool,
    "flag_blended": bool,
}


def _empty_detection_table() -> Table:
    return Table(
        [np.zeros(0, dtype=t) for t in _DETECTION_COLUMNS.values()],
        names=list(_DETECTION_COLUMNS),
    )


# --------------------------------------------------------------------------------------
# measurement at given positions
def measure_sources(
    exposure: Exposure,
    x,
    y,
    psf: Psf | None = None,
    recentroid: bool = False,
    background_mesh: int = 64,
) -> Table:
    """Measure flux, S/N, size and flags at given parent positions.

    Used for catalogs that carry only positions. Flags look at a box of
    half-width 4 PSF sigmas (at least 5 px) around each position.

    Parameters
    ----------
    exposure : `Exposure`
    x, y : array-like
        Parent positions.
    psf : `Psf` or None
        PSF for the photometry; default the exposure's, else a 2 px Gaussian.
    recentroid : bool
        Replace the positions by weighted centroids.
    background_mesh : int
        Background mesh size (pixels).

    Returns
    -------
    `astropy.table.Table`
        Columns x, y, flux, flux_err, snr, peak, ixx, iyy, ixy, size, roundness,
        flag_saturated, flag_edge, flag_masked, flag_blended (always False).
    """
    psf = _resolve_psf(exposure, psf) or GaussianPsf(_DEFAULT_SMOOTH_SIGMA)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    x0, y0 = exposure.xy0
    estimate = _background_mesh(exposure, background_mesh, BACKGROUND_IGNORE_PLANES)
    filtered = _Filtered(exposure, psf, estimate)
    col, row = x - x0, y - y0
    if x.size == 0:
        m = {k: np.zeros(0) for k in ("col", "row", "flux", "flux_err", "snr", "peak")}
        m.update({k: np.zeros(0) for k in ("ixx", "iyy", "ixy", "size", "roundness")})
        m["half"] = np.zeros(0, dtype=int)
    else:
        m = _measure(filtered, exposure, col, row, recentroid)
    ny, nx = exposure.shape
    half = m["half"]
    inside = (m["col"] >= half) & (m["row"] >= half)
    inside &= (m["col"] <= nx - 1 - half) & (m["row"] <= ny - 1 - half)
    h = int(half[0]) if half.size else 0
    cx = np.clip(np.floor(m["col"] + 0.5).astype(int), 0, max(nx - 1, 0))
    cy = np.clip(np.floor(m["row"] + 0.5).astype(int), 0, max(ny - 1, 0))

    def any_in(planes) -> np.ndarray:
        if x.size == 0:
            return np.zeros(0, dtype=bool)
        return np.asarray(
            _stack(exposure.masked(planes), cx, cy, h, fill=False).any(axis=(1, 2)), dtype=bool
        )

    return Table(
        {
            "x": m["col"] + x0,
            "y": m["row"] + y0,
            "flux": m["flux"],
            "flux_err": m["flux_err"],
            "snr": m["snr"],
            "peak": m["peak"],
            "ixx": m["ixx"],
            "iyy": m["iyy"],
            "ixy": m["ixy"],
            "size": m["size"],
            "roundness": m["roundness"],
            "flag_saturated": any_in(["SAT"]),
            "flag_edge": ~inside | any_in(["EDGE"]),
            "flag_masked": any_in(MASKED_FLAG_PLANES),
            "flag_blended": np.zeros(x.size, dtype=bool),
        },
        meta={"psf_sigma": _psf_sigma(psf), "noise_factor": filtered.noise_factor},
    )


# --------------------------------------------------------------------------------------
# user catalogs
_ALIASES = {
    "x": ("x", "xcentroid", "x_pix", "xpos", "col"),
    "y": ("y", "ycentroid", "y_pix", "ypos", "row"),
    "ra": ("ra", "ra_deg", "alpha"),
    "dec": ("dec", "dec_deg", "delta"),
    "flux": ("flux", "instflux", "psf_flux"),
    "flux_err": ("flux_err", "fluxerr", "flux_error", "instflux_err", "psf_flux_err"),
}


def _load_table(source: Any) -> Table:
    if isinstance(source, Table):
        return source.copy()
    if isinstance(source, list | tuple):
        return _table_from_records(list(source), "list")
    if isinstance(source, dict):
        return _table_from_json(source, "dict")
    if isinstance(source, bytes | bytearray):
        return _load_bytes(bytes(source), "uploaded catalog")
    path = Path(source)
    if not path.is_file():
        raise InvalidCatalogError(f"catalog file {str(path)!r} does not exist")
    return _load_bytes(path.read_bytes(), str(path))


def _load_bytes(data: bytes, name: str) -> Table:
    head = data.lstrip()[:1]
    try:
        if data.startswith(b"SIMPLE"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Table.read(io.BytesIO(data), format="fits")
        if head in (b"{", b"["):
            return _table_from_json(json.loads(data.decode("utf-8")), name)
        text = data.decode("utf-8")
        return Table.read(text, format="ascii.csv")
    except InvalidCatalogError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes a typed error
        raise InvalidCatalogError(f"cannot read catalog {name}: {exc}") from None


def _table_from_json(obj: Any, name: str) -> Table:
    if isinstance(obj, dict):
        if "sources" not in obj:
            raise InvalidCatalogError(
                f"JSON catalog {name} must be a list of objects or {{'sources': [...]}}"
            )
        obj = obj["sources"]
    if not isinstance(obj, list):
        raise InvalidCatalogError(f"JSON catalog {name}: 'sources' must be a list")
    return _table_from_records(obj, name)


def _table_from_records(records: list, name: str) -> Table:
    if not records:
        return Table()
    if not all(isinstance(r, dict) for r in records):
        raise InvalidCatalogError(f"catalog {name}: every source must be an object")
    keys: list[str] = []
    for record in records:
        keys.extend(k for k in record if k not in keys)
    columns = {k: [r.get(k) for r in records] for k in keys}
    try:
        return Table({k: np.array(v, dtype=float) for k, v in columns.items()})
    except (TypeError, ValueError):
        bad = [k for k, v in columns.items() if not _all_numbers(v)]
        raise InvalidCatalogError(
            f"catalog {name}: non-numeric or missing values in column(s) {', '.join(bad)}"
        ) from None


def _all_numbers(values) -> bool:
    try:
        np.array(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


def _find(table: Table, key: str) -> str | None:
    lower = {name.lower(): name for name in table.colnames}
    for alias in _ALIASES[key]:
        if alias in lower:
            return lower[alias]
    return None


def _numeric(table: Table, column: str, name: str) -> np.ndarray:
    try:
        values = np.ma.filled(np.ma.asarray(table[column]).astype(float), np.nan)
    except (TypeError, ValueError):
        raise InvalidCatalogError(f"catalog {name}: column {column!r} is not numeric") from None
    return np.asarray(values, dtype=np.float64)


def read_catalog(source, wcs=None) -> Table:
    """Read a user's source catalog into a table with parent ``x``, ``y``.

    Parameters
    ----------
    source : path, bytes, `astropy.table.Table`, list of dict or dict
        A FITS binary table, a CSV file with a header line, or JSON (a list of
        objects or ``{"sources": [...]}``). Column names are case-insensitive;
        ``x``/``y`` (0-based parent pixel positions) or ``ra``/``dec`` (degrees,
        converted through ``wcs``), optional ``flux`` and ``flux_err``.
    wcs : `astropy.wcs.WCS` or None
        Needed when the catalog has only ra/dec.

    Returns
    -------
    `astropy.table.Table`
        Columns ``x``, ``y`` (float64), ``flux`` and ``flux_err`` when given
        (float64), ``ra``/``dec`` when given, and every other input column.

    Raises
    ------
    InvalidCatalogError
        Missing or unreadable file, no position columns, non-numeric or
        non-finite positions, ra/dec without a WCS.
    """
    name = str(source) if isinstance(source, str | Path) else "catalog"
    table = _load_table(source)
    xcol, ycol = _find(table, "x"), _find(table, "y")
    racol, deccol = _find(table, "ra"), _find(table, "dec")
    out = Table(meta=dict(table.meta))
    if xcol and ycol:
        x = _numeric(table, xcol, name)
        y = _numeric(table, ycol, name)
    elif racol and deccol:
        if wcs is None:
            raise InvalidCatalogError(
                f"catalog {name} has ra/dec but no x/y, and the exposure has no WCS to convert them"
            )
        ra = _numeric(table, racol, name)
        dec = _numeric(table, deccol, name)
        x, y = wcs.all_world2pix(ra, dec, 0) if len(ra) else (ra.copy(), dec.copy())
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    else:
        raise InvalidCatalogError(
            f"catalog {name} has no position columns: need x and y (pixels) or ra and dec "
            f"(degrees); found {', '.join(table.colnames) or 'no columns'}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InvalidCatalogError(f"catalog {name} has missing or non-finite positions")
    out["x"] = x
    out["y"] = y
    for key in ("flux", "flux_err"):
        col = _find(table, key)
        if col is not None:
            out[key] = _numeric(table, col, name)
    for col in table.colnames:
        if col not in (xcol, ycol) and col.lower() not in ("x", "y", "flux", "flux_err"):
            if col not in out.colnames and col not in (
                _find(table, "flux"),
                _find(table, "flux_err"),
            ):
                out[col] = table[col]
    return out


# --------------------------------------------------------------------------------------
# kernel-source selection
def _box_counts(bad: np.ndarray, x0: int, y0: int, bx0, by0, bx1, by1) -> np.ndarray:
    """Number of ``bad`` pixels inside inclusive parent boxes.

    Boxes are stamp-sized and a few thousand at most, so slicing each is far
    cheaper than a summed-area table of the whole frame.
    """
    ny, nx = bad.shape
    counts = np.zeros(len(np.atleast_1d(bx0)), dtype=np.int64)
    if not bad.any():
        return counts
    i0 = np.clip(np.asarray(bx0) - x0, 0, nx)
    j0 = np.clip(np.asarray(by0) - y0, 0, ny)
    i1 = np.clip(np.asarray(bx1) - x0 + 1, 0, nx)
    j1 = np.clip(np.asarray(by1) - y0 + 1, 0, ny)
    for k in range(counts.size):
        counts[k] = np.count_nonzero(bad[j0[k] : j1[k], i0[k] : i1[k]])
    return counts


def _spread_order(x: np.ndarray, y: np.ndarray, snr: np.ndarray, bbox, n_keep: int) -> np.ndarray:
    """Indices of ``n_keep`` sources, best S/N first within each cell of a coarse grid,
    taken round-robin across cells so the selection covers the frame."""
    cells = int(np.clip(math.floor(math.sqrt(max(n_keep, 1) / 2.0)), 1, 8))
    min_x, min_y, max_x, max_y = bbox
    cx = np.clip(((x - min_x) / (max_x - min_x + 1) * cells).astype(int), 0, cells - 1)
    cy = np.clip(((y - min_y) / (max_y - min_y + 1) * cells).astype(int), 0, cells - 1)
    cell = cy * cells + cx
    order = np.lexsort((-snr, cell))
    rank = np.empty(len(x), dtype=int)
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank[order] = np.arange(len(x)) - starts
    final = np.lexsort((-snr, rank))
    return final[:n_keep]


def select_kernel_sources(
    catalog: Table,
    science: Exposure,
    template: Exposure,
    kernel_size: int,
    config: SourcesConfig | None = None,
    psf_fwhm: float | None = None,
    edge_buffer: int = 0,
) -> Table:
    """Choose the sources whose stamps fit the PSF-matching kernel (algorithm.md 3.1).

    Cuts, in order (the count each removed goes to ``meta['rejected']``):
    non-finite or out-of-window S/N (``min_snr < snr < max_snr``); saturated,
    edge, masked or blended flags (when the columns exist); resolved sources,
    size > ``max_size_ratio`` x PSF sigma; a neighbour in the input catalog
    closer than ``isolation_radius_fwhm`` x FWHM; a stamp box of side
    ``2 kernel_size + 1`` centred on round(x, y) not inside the science box
    shrunk by ``edge_buffer`` (+ ``kernel_size`` if
    ``restrict_kernel_edge_sources``); a box touching ``exclude_mask_planes``
    in the science or template mask (or leaving the template). Then, above
    ``max_kernel_sources``, the highest-S/N sources are kept round-robin over
    a coarse grid so they spread across the frame.

    Parameters
    ----------
    catalog : `astropy.table.Table`
        Needs ``x``, ``y`` (parent). ``snr`` (or ``flux`` and ``flux_err``),
        sizes and flags are measured on ``science`` when missing.
    science, template : `Exposure`
    kernel_size : int
        Kernel basis width (kSize); stamps are ``2 kernel_size + 1`` wide.
    config : `SourcesConfig` or None
    psf_fwhm : float or None
        Science PSF FWHM (px) for the size and isolation cuts; default from
        the science PSF (skipped if neither is known).
    edge_buffer : int
        Extra margin (kSize for the preconvolution task).

    Returns
    -------
    `astropy.table.Table`
        The selected rows, with ``snr`` and ``stamp_x0``, ``stamp_y0``,
        ``stamp_x1``, ``stamp_y1`` (inclusive parent box of each stamp).

    Raises
    ------
    InsufficientSourcesError
        Fewer than ``min_kernel_sources`` remain.
    """
    config = config or SourcesConfig()
    table = catalog.copy(copy_data=True)
    if "x" not in table.colnames or "y" not in table.colnames:
        raise InvalidCatalogError("kernel-source catalog needs x and y columns")
    n_input = len(table)
    x_all = np.asarray(table["x"], dtype=np.float64)
    y_all = np.asarray(table["y"], dtype=np.float64)
    fwhm = psf_fwhm
    if fwhm is None and science.psf is not None:
        try:
            fwhm = science.psf.fwhm()
        except Exception:  # noqa: BLE001 - size and isolation cuts are then skipped
            fwhm = None
    needs = [c for c in ("snr", "size", "flag_saturated", "flag_edge", "flag_masked")]
    has_snr = "snr" in table.colnames or {"flux", "flux_err"} <= set(table.colnames)
    if n_input and (not has_snr or any(c not in table.colnames for c in needs[1:])):
        psf = science.psf or (GaussianPsf(fwhm / SIGMA_TO_FWHM) if fwhm else None)
        measured = measure_sources(science, x_all, y_all, psf=psf)
        for col in measured.colnames:
            if col in ("x", "y"):
                continue
            if col == "snr" and has_snr:
                continue
            if col in ("flux", "flux_err") and col in table.colnames:
                continue
            if col not in table.colnames:
                table[col] = measured[col]
        if fwhm is None:
            fwhm = SIGMA_TO_FWHM * float(measured.meta["psf_sigma"])
    if "snr" not in table.colnames:
        with np.errstate(divide="ignore", invalid="ignore"):
            table["snr"] = np.asarray(table["flux"], float) / np.asarray(table["flux_err"], float)
    snr = np.asarray(table["snr"], dtype=np.float64)
    keep = np.ones(n_input, dtype=bool)
    rejected: dict[str, int] = {}

    def cut(reason: str, bad: np.ndarray) -> None:
        newly = keep & bad
        rejected[reason] = int(newly.sum())
        keep[newly] = False

    cut("snr", ~(np.isfinite(snr) & (snr > config.min_snr) & (snr < config.max_snr)))
    flags = np.zeros(n_input, dtype=bool)
    for col in ("flag_saturated", "flag_edge", "flag_masked", "flag_blended"):
        if col in table.colnames:
            flags |= np.asarray(table[col], dtype=bool)
    cut("flags", flags)
    if fwhm and "size" in table.colnames:
        size = np.asarray(table["size"], dtype=np.float64)
        sigma = fwhm / SIGMA_TO_FWHM
        cut("resolved", ~np.isfinite(size) | (size > config.max_size_ratio * sigma))
    else:
        rejected["resolved"] = 0
    radius = config.isolation_radius_fwhm * (fwhm or 0.0)
    if radius > 0 and n_input > 1:
        tree = cKDTree(np.column_stack([x_all, y_all]))
        pairs = tree.query_pairs(radius, output_type="ndarray")
        crowded = np.zeros(n_input, dtype=bool)
        crowded[pairs.ravel()] = True
        cut("isolation", crowded)
    else:
        rejected["isolation"] = 0
    half = int(kernel_size)
    ix = np.floor(x_all + 0.5).astype(int)
    iy = np.floor(y_all + 0.5).astype(int)
    bx0, by0, bx1, by1 = ix - half, iy - half, ix + half, iy + half
    margin = int(edge_buffer) + (half if config.restrict_kernel_edge_sources else 0)
    min_x, min_y, max_x, max_y = science.bbox
    inside = (bx0 >= min_x + margin) & (by0 >= min_y + margin)
    inside &= (bx1 <= max_x - margin) & (by1 <= max_y - margin)
    cut("edge", ~inside)
    bad_sci = science.masked(config.exclude_mask_planes)
    bad_tpl = template.masked(config.exclude_mask_planes)
    touching = _box_counts(bad_sci, *science.xy0, bx0, by0, bx1, by1) > 0
    touching |= _box_counts(bad_tpl, *template.xy0, bx0, by0, bx1, by1) > 0
    t_min_x, t_min_y, t_max_x, t_max_y = template.bbox
    touching |= (bx0 < t_min_x) | (by0 < t_min_y) | (bx1 > t_max_x) | (by1 > t_max_y)
    cut("mask", touching)
    selected = np.nonzero(keep)[0]
    cap = config.max_kernel_sources
    if cap > 0 and selected.size > cap:
        chosen = _spread_order(x_all[selected], y_all[selected], snr[selected], science.bbox, cap)
        rejected["cap"] = int(selected.size - cap)
        selected = np.sort(selected[chosen])
    else:
        rejected["cap"] = 0
    n = int(selected.size)
    if n < config.min_kernel_sources:
        raise InsufficientSourcesError(
            f"Only {n} sources were selected for PSF matching, but "
            f"{config.min_kernel_sources} are required. {_advice(n_input, rejected)}"
        )
    result = table[selected]
    result["stamp_x0"] = bx0[selected]
    result["stamp_y0"] = by0[selected]
    result["stamp_x1"] = bx1[selected]
    result["stamp_y1"] = by1[selected]
    result.meta["rejected"] = rejected
    result.meta["n_input"] = n_input
    result.meta["kernel_size"] = half
    return result


_ADVICE = {
    "snr": "lower sources.min_snr (or raise sources.max_snr), or give a deeper catalog",
    "flags": "most sources are saturated, masked, blended or at the edge; check the mask planes",
    "resolved": "most sources look resolved; raise sources.max_size_ratio or check the PSF",
    "isolation": "the field is crowded; lower sources.isolation_radius_fwhm",
    "edge": "stamps do not fit; use a smaller kernel or set restrict_kernel_edge_sources=false",
    "mask": "stamps touch masked pixels; check sources.exclude_mask_planes and template coverage",
}


def _advice(n_input: int, rejected: dict[str, int]) -> str:
    if n_input == 0:
        return "The catalog is empty: give sources or let alsub detect them."
    counts = {k: v for k, v in rejected.items() if k in _ADVICE and v > 0}
    summary = ", ".join(f"{v} by {k}" for k, v in counts.items())
    if not counts:
        return f"Of {n_input} input sources none was rejected by a cut."
    worst = max(counts, key=lambda name: counts[name])
    return f"Of {n_input} input sources, rejected {summary}; to fix: {_ADVICE[worst]}."


# --------------------------------------------------------------------------------------
# sky sources
def sky_sources(
    exposure: Exposure,
    n: int = 100,
    radius: float = 8.0,
    seed: int = 0,
    avoid_planes=("DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE", "SAT"),
    detect_if_needed: bool = True,
) -> Table:
    """Positions on empty sky for metrics (algorithm.md 6.3).

    Candidate centres come from a scrambled 2-D Halton sequence (seeded); a
    candidate is kept when its disc of ``radius`` lies inside the image and
    touches no ``avoid_planes`` pixel; each kept disc, grown to twice the radius,
    joins the avoid mask so positions do not overlap. Stops at ``n`` positions
    or after ``50 n`` candidates.

    Parameters
    ----------
    exposure : `Exposure`
        Not modified.
    n : int
        Positions wanted.
    radius : float
        Disc radius (pixels).
    seed : int
        Halton scrambling seed (reproducible positions).
    avoid_planes : sequence of str
    detect_if_needed : bool
        When no DETECTED pixel exists, detect sources on a copy first.

    Returns
    -------
    `astropy.table.Table`
        Columns ``x``, ``y`` (parent), ``radius``, ``sky_source`` (True).
    """
    if detect_if_needed and not exposure.masked(["DETECTED"]).any():
        work = exposure.copy()
        detect_sources(work, set_mask=True)
        avoid = work.masked(avoid_planes)
    else:
        avoid = exposure.masked(avoid_planes).copy()
    avoid |= ~np.isfinite(exposure.image)
    ny, nx = exposure.shape
    x0, y0 = exposure.xy0
    r_in = int(math.ceil(radius))
    r_out = int(math.ceil(2 * radius))
    yy, xx = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
    disc_in = (xx**2 + yy**2 <= radius**2)[
        r_out - r_in : r_out + r_in + 1, r_out - r_in : r_out + r_in + 1
    ]
    disc_out = xx**2 + yy**2 <= (2 * radius) ** 2
    xs: list[float] = []
    ys: list[float] = []
    if n > 0 and nx > 2 * r_in and ny > 2 * r_in:
        sampler = qmc.Halton(d=2, scramble=True, seed=seed)
        candidates = sampler.random(50 * n)
        for u, v in candidates:
            cx = int(r_in + u * (nx - 2 * r_in - 1) + 0.5)
            cy = int(r_in + v * (ny - 2 * r_in - 1) + 0.5)
            window = avoid[cy - r_in : cy + r_in + 1, cx - r_in : cx + r_in + 1]
            if window[disc_in].any():
                continue
            xs.append(cx + x0)
            ys.append(cy + y0)
            j0, j1 = max(cy - r_out, 0), min(cy + r_out + 1, ny)
            i0, i1 = max(cx - r_out, 0), min(cx + r_out + 1, nx)
            avoid[j0:j1, i0:i1] |= disc_out[
                j0 - (cy - r_out) : j1 - (cy - r_out), i0 - (cx - r_out) : i1 - (cx - r_out)
            ]
            if len(xs) >= n:
                break
    return Table(
        {
            "x": np.array(xs, dtype=np.float64),
            "y": np.array(ys, dtype=np.float64),
            "radius": np.full(len(xs), float(radius)),
            "sky_source": np.ones(len(xs), dtype=bool),
        }
    )
