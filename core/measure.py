"""Measurement of sources on a matched-filtered exposure: centroids, adaptive moments,
PSF fluxes and their S/N, vectorised over sources; `measure_sources` at given positions;
`star_offset`, where the same stars sit in two images of one grid (their centroids).

`_Filtered` (background-subtracted image, its PSF-correlated S/N and variance) is
shared with detection (`core.detection`), which measures the peaks it finds here.

Why not a library (not measured yet, by design only): photutils' ``SourceCatalog``
has no PSF-weighted flux with a matched-filter error, and sep's fluxes are
apertures; the stamps here are gathered once and every iteration runs on all
sources at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage

from . import order
from .background import BACKGROUND_IGNORE_PLANES, _background_mesh, _BackgroundMesh
from .convolve import correlate_finite_rows
from .exposure import Exposure
from .parallel import frame_array, n_threads, row_blocks, thread_map
from .psf import GaussianPsf, Psf
from .stamps import clipped_rows

__all__ = ["measure_sources", "star_offset", "star_shifts", "MASKED_FLAG_PLANES", "StarOffset"]

#: Planes that set ``flag_masked`` when present in a source's footprint.
MASKED_FLAG_PLANES = ("BAD", "NO_DATA", "SAT", "CR")
#: Fewest selected values a noise estimate samples on large frames (measures a
#: noise scale to ~0.15%).
_NOISE_SAMPLE = 1_000_000
#: Fewest sources per thread when a measurement is split among threads.
_SOURCES_PER_THREAD = 1000
#: Most sources measured at once: their float64 stacks then stay under glibc's mmap
#: threshold (`core.parallel.MMAP_THRESHOLD`), reused from the heap, where a whole
#: catalog's were mapped afresh by every step (3347 sources, one thread: 170 -> 130 ms).
_MEASURE_BATCH = 1024
#: Smoothing Gaussian sigma (pixels) for a first detection pass when no PSF is known.
_DEFAULT_SMOOTH_SIGMA = 1.0


def _negative_side_sigma(values: np.ndarray, use: np.ndarray | None = None) -> float:
    """Noise from the lower half of a distribution (sources only add a positive tail).

    ``use`` optionally selects the entries of ``values`` to look at (boolean, same
    shape). Large frames are sampled on a regular grid (every k-th row and column)
    holding at least about a million selected values: a strided view, so no
    frame-wide pass or copy is made; up to 4 million selected values, all are used.
    """
    values = np.atleast_2d(values)
    if use is not None:
        use = np.atleast_2d(use)
    selected = values.size if use is None else int(np.count_nonzero(use))
    step = max(1, math.isqrt(selected // _NOISE_SAMPLE))
    grid = np.s_[::step, ::step]
    sample = values[grid]
    keep = np.isfinite(sample)
    if use is not None:
        keep &= use[grid]
    sample = sample[keep]
    if sample.size < 10:
        return 1.0
    median, lower = order.median_and_percentile(sample, 15.865525393145708, consume=True)
    sigma = median - lower
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

    def __init__(
        self, exposure: Exposure, psf: Psf, estimate: _BackgroundMesh, keep_maps: bool = True
    ):
        """``keep_maps``: keep the filtered image and variance (``smoothed``,
        ``smoothed_var``) that measurements interpolate; without, only the S/N map is
        made, in the filtered image's frame (two frames fewer)."""
        # written whole, block by block: huge pages (`frame_array`)
        no_data = frame_array(exposure.shape, bool)
        variance = np.asarray(exposure.variance, dtype=np.float32)
        no_data_bits = exposure.bitmask(["NO_DATA"])
        self._exposure = exposure
        self._estimate = estimate
        # usable variances are only counted here: their frame is made only when some
        # are not (finite and positive: NaN fails both comparisons)
        n_ok = 0
        for rows in row_blocks(no_data.shape[0]):
            bad = no_data[rows]
            np.isfinite(self._subtracted(rows), out=bad)
            np.logical_not(bad, out=bad)
            if no_data_bits:
                bad |= (exposure.mask[rows] & no_data_bits) != 0
            var = variance[rows]
            ok = var > 0
            ok &= var < np.inf
            ok &= ~bad
            n_ok += int(np.count_nonzero(ok))
        any_no_data = bool(no_data.any())
        var_ok = None
        if n_ok < 0.5 * no_data.size:
            # unusable variance plane: the mesh noise is the local variance
            variance = np.square(estimate.noise(), dtype=np.float32)
            var_ok = np.isfinite(variance) & (variance > 0) & ~no_data
            n_ok = int(np.count_nonzero(var_ok))
        all_ok = n_ok == no_data.size
        if not all_ok and var_ok is None:
            var_ok = np.isfinite(variance) & (variance > 0) & ~no_data
        good = variance.ravel() if var_ok is None else variance[var_ok]
        # a strided sample's median is plenty for a fill value
        fill = float(order.median(good[:: good.size // 1_000_000 + 1])) if good.size else 1.0
        if var_ok is not None and not all_ok:
            variance = np.where(var_ok, variance, np.float32(fill))
        del var_ok, good
        self.shape = no_data.shape
        self.no_data = no_data
        self.psf = psf
        kernel = psf.kernel_image(*(psf.average_position or (None, None))).astype(np.float64)
        self.kernel = kernel
        self.psf_sum_sq = float(np.sum(kernel**2))

        def image_rows(rows: slice, part: np.ndarray) -> None:
            # the background-subtracted image, no-data pixels 0, made a band at a time
            # in the correlation's own buffer: no frame of it (a fresh frame's pages
            # cost more than making the rows twice)
            self._subtracted(rows, out=part)
            if any_no_data:
                np.copyto(part, np.float32(0.0), where=no_data[rows])

        def variance_rows(rows: slice, part: np.ndarray) -> None:
            np.copyto(part, variance[rows])

        # single precision: the matched filter feeds a threshold and fluxes quoted far
        # above 1e-5; tiled and threaded like the kernel convolution
        smoothed = correlate_finite_rows(self.shape, image_rows, kernel)
        assert smoothed is not None
        floor = np.float32(1e-30 * fill)
        if keep_maps:
            self.smoothed = smoothed
            smoothed_var = correlate_finite_rows(self.shape, variance_rows, kernel**2)
            assert smoothed_var is not None
            self.smoothed_var = smoothed_var
            np.maximum(self.smoothed_var, floor, out=self.smoothed_var)
            # in place: every frame-sized temporary costs page faults on first touch
            snr = frame_array(self.shape, np.float32)
            np.sqrt(self.smoothed_var, out=snr)
            np.divide(self.smoothed, snr, out=snr)
        else:
            # the S/N made in the filtered image's frame, from each band of the filtered
            # variance as it is made (no frame of that either)
            snr = smoothed

            def to_snr(rows: slice, var_rows: np.ndarray) -> None:
                np.maximum(var_rows, floor, out=var_rows)
                np.sqrt(var_rows, out=var_rows)
                np.divide(snr[rows], var_rows, out=snr[rows])

            correlate_finite_rows(self.shape, variance_rows, kernel**2, write=to_snr)
        del smoothed
        if any_no_data:
            snr[no_data] = 0.0
        # the variance plane may be off by a constant (correlated or mis-scaled noise):
        # rescale the S/N so that its empty-sky scatter is 1
        self.noise_factor = _negative_side_sigma(snr, ~no_data if any_no_data else None)
        snr /= np.float32(self.noise_factor)
        self.snr = snr

    def _subtracted(self, rows: slice, out: np.ndarray | None = None) -> np.ndarray:
        """The background-subtracted image's ``rows`` (no-data pixels as they are)."""
        return np.subtract(self._exposure.image[rows], self._estimate.background(rows), out=out)

    def image_stamps(self, cx: np.ndarray, cy: np.ndarray, half: int) -> np.ndarray:
        """Stamps (n, 2h+1, 2h+1) of the background-subtracted image (no-data pixels 0)
        centred on array indices (cx, cy), pixels off the frame 0: what `_stack` cuts
        from the full map, recomputed with the same float32 operations."""
        exposure = self._exposure
        ny, nx = self.shape
        offsets = np.arange(-half, half + 1)
        side = offsets.size
        # clipped to the frame: the pixels beyond it are zeroed below
        rows = np.clip(np.asarray(cy)[:, None] + offsets, 0, ny - 1)
        x0 = np.asarray(cx) - half
        stamps = np.empty((len(cx), side, side), dtype=np.float32)
        np.subtract(
            clipped_rows(exposure.image, rows, x0, side),
            self._estimate.background_rows(rows, x0, side),
            out=stamps,
        )
        bad = ~np.isfinite(stamps)
        bits = exposure.bitmask(["NO_DATA"])
        if bits:
            bad |= (clipped_rows(exposure.mask, rows, x0, side) & bits) != 0
        stamps[bad] = 0.0
        rows_all = np.asarray(cy)[:, None] + offsets
        cols_all = np.asarray(cx)[:, None] + offsets
        inside_r = (rows_all >= 0) & (rows_all < ny)
        inside_c = (cols_all >= 0) & (cols_all < nx)
        if not (inside_r.all() and inside_c.all()):
            stamps[~(inside_r[:, :, None] & inside_c[:, None, :])] = 0.0
        return stamps


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
    # the products run in float64: cast once, not in every step's product
    data = np.asarray(stamps, dtype=np.float64)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        sub = data if active.size == n else data[active]
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
    data = np.asarray(stamps, dtype=np.float64)
    # columns weighted by 1, x and x^2: one product per stamp gives every sum over x
    powers = np.stack([np.ones_like(xs), xs, xs * xs], axis=2)  # (n, w, 3)
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
        ex = (-ayy / (2.0 * det))[:, None] * (x * x)
        ey = (-axx / (2.0 * det))[:, None] * (y * y)
        weighted = ((axy / det)[:, None] * y)[:, :, None] * x[:, None, :]
        weighted += ey[:, :, None]
        weighted += ex[:, None, :]
        np.exp(weighted, out=weighted)
        everyone = active.size == n  # no gathered copies while no source is frozen
        weighted *= data if everyone else data[active]
        rows = np.matmul(weighted, powers if everyone else powers[active])  # (m, w, 3) per y
        total = rows[:, :, 0].sum(axis=1)
        total = np.where(total > 0, total, np.nan)
        mxx = rows[:, :, 2].sum(axis=1) / total
        myy = np.einsum("mj,mj->m", rows[:, :, 0], y * y) / total
        mxy = np.einsum("mj,mj->m", rows[:, :, 1], y) / total
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
            # no flux (NaN): the limit, which marks the source failed below
            nxx = np.clip(np.where(np.isnan(nxx), limit, nxx), 0.05, limit)
            nyy = np.clip(np.where(np.isnan(nyy), limit, nyy), 0.05, limit)
            bound = 0.95 * np.sqrt(nxx * nyy)
            nxy = np.clip(np.where(np.isnan(nxy), 0.0, nxy), -bound, bound)
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
    stamps = clipped_rows(array, rows, ic - h, offsets.size).astype(np.float64)
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
    """Centroid, PSF flux, S/N, peak, adaptive size of sources near array positions.

    Every source is measured on its own stamp, so many sources are split among the
    threads (the numpy work releases the GIL), and measured in batches of at most
    `_MEASURE_BATCH`; the numbers do not depend on the split.
    """
    sigma = _psf_sigma(filtered.psf)
    half = int(max(5, math.ceil(4.0 * sigma)))
    ny, nx = filtered.shape
    cx = np.clip(np.floor(col + 0.5).astype(int), 0, nx - 1)
    cy = np.clip(np.floor(row + 0.5).astype(int), 0, ny - 1)
    stamps = filtered.image_stamps(cx, cy, half)
    batches = -(-len(col) // _MEASURE_BATCH)
    if batches <= 1:
        return _measure_stamps(filtered, stamps, cx, cy, col, row, recentroid, sigma, half)
    parts = thread_map(
        lambda i: _measure_stamps(
            filtered, stamps[i], cx[i], cy[i], col[i], row[i], recentroid, sigma, half
        ),
        np.array_split(np.arange(len(col)), batches),
        max(1, min(n_threads(), len(col) // _SOURCES_PER_THREAD)),
    )
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _measure_stamps(
    filtered: _Filtered,
    stamps: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    col: np.ndarray,
    row: np.ndarray,
    recentroid: bool,
    sigma: float,
    half: int,
) -> dict[str, np.ndarray]:
    """`_measure` of the sources whose stamps are ``stamps`` (centred on cx, cy)."""
    if recentroid:
        dx, dy = _centroids(stamps, sigma)
        col, row = cx + dx, cy + dy
    else:
        dx, dy = col - cx, row - cy
    ixx, iyy, ixy = _moments(stamps, dx, dy, sigma)
    numerator = _interp_at(filtered.smoothed, col, row)
    pixel_var = _interp_at(filtered.smoothed_var, col, row)
    numerator_var = pixel_var * filtered.noise_factor**2
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
        # against the variance plane alone: in a crowded field the sky's scatter (which
        # detection must beat) is confusion, but the kernel fit only sees pixel noise
        snr_pixel = numerator / np.sqrt(np.maximum(pixel_var, 0))
    return {
        "col": col,
        "row": row,
        "flux": flux,
        "flux_err": flux_err,
        "snr": snr,
        "snr_pixel": snr_pixel,
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
        m = {k: np.zeros(0) for k in ("col", "row", "flux", "flux_err", "snr", "snr_pixel", "peak")}
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
            "snr_pixel": m["snr_pixel"],
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
# the same stars in two images
#: Fewest stars whose centroids give `star_offset` a median offset.
_MIN_OFFSET_STARS = 3


@dataclass(frozen=True)
class StarOffset:
    """Median centroid offset (dx, dy) of the same stars, second image minus first (px),
    its standard error per axis and the number of stars it comes from."""

    dx: float
    dy: float
    error: float
    n: int

    @property
    def significant(self) -> bool:
        """True when the offset stands 3 standard errors clear of zero."""
        return math.hypot(self.dx, self.dy) > 3.0 * self.error


def _rim_plane(stamps: np.ndarray) -> np.ndarray:
    """The local sky of square stamps (n, w, w): a plane whose slopes join the medians of
    opposite sides of the rim and whose level is the rim's median about them (medians:
    a neighbour on the rim does not tilt it). NaN where the rim has a NaN."""
    w = stamps.shape[1]
    offsets = np.arange(w, dtype=np.float64) - w // 2
    left, right = np.median(stamps[:, :, 0], axis=1), np.median(stamps[:, :, -1], axis=1)
    bottom, top = np.median(stamps[:, 0, :], axis=1), np.median(stamps[:, -1, :], axis=1)
    span = float(w - 1)
    plane = ((right - left) / span)[:, None, None] * offsets[None, None, :] + (
        (top - bottom) / span
    )[:, None, None] * offsets[None, :, None]
    rim = np.ones((w, w), dtype=bool)
    rim[1:-1, 1:-1] = False
    level = np.median((stamps - plane)[:, rim], axis=1)
    return plane + level[:, None, None]


def star_shifts(
    first: Exposure, second: Exposure, x: np.ndarray, y: np.ndarray, fwhm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How far each star at parent positions (``x``, ``y``) sits in ``second`` from where
    it sits in ``first``, two images of one pixel grid: (dx, dy, clean), differences of
    Gaussian-weighted centroids of width ``fwhm`` (the same weight on both, so different
    PSF widths do not bias them) about each star's local sky; ``clean``: both stamps
    whole and finite (dx, dy are meaningless elsewhere)."""
    sigma = max(fwhm, 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = int(math.ceil(3.0 * sigma)) + 1
    offsets = []
    for exposure in (first, second):
        cx = np.floor(np.asarray(x, float) - exposure.xy0[0] + 0.5).astype(int)
        cy = np.floor(np.asarray(y, float) - exposure.xy0[1] + 0.5).astype(int)
        stamps = _stack(exposure.image, cx, cy, half, fill=np.nan).astype(np.float64)
        # about the local sky: a pedestal would pull the weighted centroid to the window,
        # a sky gradient in one image only (moonlight, twilight) to its bright side (a
        # ramp of +-1500 counts over 512 px moved the stars 0.33 px)
        stamps -= _rim_plane(stamps)
        clean = np.asarray(np.isfinite(stamps).all(axis=(1, 2)), dtype=bool)
        dx, dy = _centroids(np.where(clean[:, None, None], stamps, 0.0), sigma)
        offsets.append((dx, dy, clean))
    (dx1, dy1, clean1), (dx2, dy2, clean2) = offsets
    return dx2 - dx1, dy2 - dy1, clean1 & clean2


def star_offset(
    first: Exposure, second: Exposure, x: np.ndarray, y: np.ndarray, fwhm: float
) -> StarOffset | None:
    """Where the stars at parent positions (``x``, ``y``) sit in ``second`` relative to
    ``first`` (`star_shifts`): their median offset. None with fewer than
    `_MIN_OFFSET_STARS` clean stars."""
    shift_x, shift_y, use = star_shifts(first, second, x, y, fwhm)
    if np.count_nonzero(use) < _MIN_OFFSET_STARS:
        return None
    ddx, ddy = shift_x[use], shift_y[use]
    n = int(use.sum())
    # a median's standard error is sqrt(pi / 2) times the mean's
    scale = math.sqrt(math.pi / 2.0 / n)
    error = scale * math.hypot(float(order.mad_std(ddx)), float(order.mad_std(ddy))) / math.sqrt(2)
    return StarOffset(float(np.median(ddx)), float(np.median(ddy)), error, n)
