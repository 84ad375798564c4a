"""Warping an exposure onto another pixel grid with a Lanczos-3 interpolant.

A `PixelMap` says where each output (science) pixel falls on the input
(template): an affine map, plus a smooth residual for non-linear WCS pairs.
`warp_exposure` resamples image, variance (sum of squared weights times the
input variance, so per-pixel noise stays honest), mask (bits grown by the
interpolation footprint, NO_DATA outside the input) and PSF, multiplies by the
Jacobian so fluxes are conserved, and records the noise correlation the
interpolation leaves (`warp_noise_correlation`) in ``Exposure.noise_correlation``.

Affine maps are resampled in two separable passes (along input rows, then along
output columns: Catmull and Smith's decomposition), six taps each. A gently bent
map (a WCS pair whose Jacobian stays within 5% of its affine part) rides on the
same passes, its departures sampled on nodes; a stronger bend takes the direct
6 x 6 Lanczos sum. Two passes keep the variance exact: each combines pixels the
previous one left independent. The weights come from a table every 1/8192 px,
positions are carried in fixed point, and the passes run in cache-sized blocks on
all cores. A mask with few set pixels is scattered onto the outputs their taps
reach; a dense one is grown over the footprint and gathered. No path has a Python
loop over pixels.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy import sparse
from scipy.interpolate import BSpline, RectBivariateSpline

from . import order
from .config import WarpConfig
from .errors import IncompatibleInputsError, InvalidExposureError, PsfError
from .exposure import Exposure
from .parallel import n_threads, thread_map
from .psf import Psf
from .sky import pixel_to_pixel

__all__ = [
    "PixelMap",
    "lanczos_weights",
    "tabulated_weights",
    "warp_exposure",
    "warp_onto",
    "warp_noise_correlation",
    "WarpedPsf",
    "wcs_with_epoch_of",
]

_ORDER = 3  # Lanczos-3, as Rubin warps templates
_TAPS = 2 * _ORDER
_NODE_GUARD = np.float32(1e-5)
_CHUNK_PIXELS = 1 << 14  # pixels per vectorised block: temporaries stay in L2 (best of 2^13-2^16)
_SHIFT_CHUNK_PIXELS = 1 << 16  # a shift's row blocks re-read 5 rows each: larger blocks
_FINISH_PIXELS = 1 << 16  # the Jacobian and NO_DATA pass: a few cheap ops per block
# pass 2's tiles drift across at most this many intermediate rows (30 deg turn, 4096 px:
# 32-128 alike, 250 as slow as whole rows)
_TILE_DRIFT = 128
_TAP_REACH = ((_ORDER - 1, _ORDER), (_ORDER - 1, _ORDER))  # taps floor(p) - 2 ... floor(p) + 3
_PAD = _ORDER  # NaN border: any tap that leaves the input reads NaN and marks NO_DATA
# The frame-sized paths read the weights from a table every 1/8192 px instead of evaluating
# sines per pixel (6x cheaper); sampling positions move by at most 6e-5 px (Rubin's warper
# caches its kernel the same way, every 1e-4 px).
_TABLE_STEPS = 8192
# The passes carry positions in fixed point (int64, 2^-20 px): the base pixel and the table
# row are then a shift and a mask instead of floor, subtract, scale and two conversions.
# A position is the sum of two rounded terms: it moves by at most 1e-6 px.
_FIX = 20
_FIX_ONE = 1 << _FIX
_TABLE_SHIFT = _FIX - 13  # _TABLE_STEPS = 2^13
_BLEND_BITS = 24  # fixed-point weight of the row blend of a smooth correction


# --------------------------------------------------------------------------- maps
@dataclass(frozen=True)
class PixelMap:
    """Where output parent pixel (x, y) falls on the input: (u, v) in input parent pixels.

    ``(u, v) = matrix @ (x, y) + offset + residual(x, y)``; ``residual`` is a pair
    of cubic splines over the output box (None for an affine map).

    Parameters
    ----------
    matrix : `numpy.ndarray` (2, 2), float64
    offset : `numpy.ndarray` (2,), float64, input pixels
    residual : tuple of two `scipy.interpolate.RectBivariateSpline` (in y, x) or None
    """

    matrix: np.ndarray
    offset: np.ndarray
    residual: tuple | None = None

    @classmethod
    def affine(cls, matrix, offset) -> PixelMap:
        return cls(np.asarray(matrix, dtype=np.float64), np.asarray(offset, dtype=np.float64))

    @classmethod
    def identity(cls) -> PixelMap:
        return cls.affine(np.eye(2), np.zeros(2))

    @classmethod
    def from_wcs(
        cls, output: Exposure, input: Exposure, config: WarpConfig | None = None
    ) -> PixelMap:
        """The map the two exposures' celestial WCSs imply, on the output's box.

        Sampled exactly every ``config.grid_step`` pixels; the affine part is a
        least-squares fit and the rest is kept as a spline only where it exceeds
        ``config.affine_tolerance`` pixels.

        Raises
        ------
        IncompatibleInputsError
            If either exposure lacks a celestial WCS, or the output's sky does not
            map onto the input's pixels (different parts of the sky).
        """
        config = config or WarpConfig()
        for exposure, label in ((output, "science"), (input, "template")):
            if exposure.wcs is None or not exposure.wcs.has_celestial:
                raise IncompatibleInputsError(
                    f"the {label} exposure has no celestial WCS; register by stars instead "
                    "(registration.mode 'stars')"
                )
        output_wcs, input_wcs = output.wcs, input.wcs
        assert output_wcs is not None and input_wcs is not None
        min_x, min_y, max_x, max_y = output.bbox
        xs = _nodes(min_x, max_x, config.grid_step)
        ys = _nodes(min_y, max_y, config.grid_step)
        gx, gy = np.meshgrid(xs, ys)
        u, v = pixel_to_pixel(output_wcs, input_wcs, gx - output.xy0[0], gy - output.xy0[1])
        u, v = u + input.xy0[0], v + input.xy0[1]
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
            raise IncompatibleInputsError(
                "the science sky does not project onto the template's pixels (different "
                "fields or a broken WCS); check both WCSs"
            )
        design = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
        coef_u, *_ = np.linalg.lstsq(design, u.ravel(), rcond=None)
        coef_v, *_ = np.linalg.lstsq(design, v.ravel(), rcond=None)
        matrix = np.array([coef_u[:2], coef_v[:2]])
        offset = np.array([coef_u[2], coef_v[2]])
        du = u - (design @ coef_u).reshape(u.shape)
        dv = v - (design @ coef_v).reshape(v.shape)
        if max(np.abs(du).max(), np.abs(dv).max()) <= config.affine_tolerance:
            return cls.affine(matrix, offset)
        kx, ky = min(3, len(xs) - 1), min(3, len(ys) - 1)
        residual = (
            RectBivariateSpline(ys, xs, du, kx=ky, ky=kx),
            RectBivariateSpline(ys, xs, dv, kx=ky, ky=kx),
        )
        return cls(matrix, offset, residual)

    @property
    def is_affine(self) -> bool:
        return self.residual is None

    def __call__(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Input position of output points (any matching shapes)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        m, t = self.matrix, self.offset
        u = m[0, 0] * x + m[0, 1] * y + t[0]
        v = m[1, 0] * x + m[1, 1] * y + t[1]
        if self.residual is not None:
            u = u + self.residual[0].ev(y, x)
            v = v + self.residual[1].ev(y, x)
        return u, v

    def on_grid(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input positions (len(ys), len(xs)) of the output grid xs x ys (separable, fast)."""
        m, t = self.matrix, self.offset
        u = (m[0, 0] * xs)[None, :] + (m[0, 1] * ys + t[0])[:, None]
        v = (m[1, 0] * xs)[None, :] + (m[1, 1] * ys + t[1])[:, None]
        if self.residual is not None:
            u = u + self.residual[0](ys, xs)
            v = v + self.residual[1](ys, xs)
        return u, v

    def then(self, matrix, offset) -> PixelMap:
        """This map followed by the affine ``(u, v) -> matrix @ (u, v) + offset``."""
        matrix = np.asarray(matrix, dtype=np.float64)
        offset = np.asarray(offset, dtype=np.float64)
        residual = self.residual
        if residual is not None:
            # a linear map of two splines is a spline: rescale their coefficients
            ru, rv = (_scaled_spline(residual, matrix[i]) for i in range(2))
            residual = (ru, rv)
        return PixelMap(matrix @ self.matrix, matrix @ self.offset + offset, residual)

    def jacobian(self, x: float, y: float, step: float = 1.0) -> np.ndarray:
        """d(u, v)/d(x, y) at one output point (2, 2)."""
        if self.residual is None:
            return self.matrix.copy()
        u1, v1 = self(np.array([x - step, x + step, x, x]), np.array([y, y, y - step, y + step]))
        return np.array([[u1[1] - u1[0], u1[3] - u1[2]], [v1[1] - v1[0], v1[3] - v1[2]]]) / (
            2 * step
        )

    def max_displacement(self, bbox) -> float:
        """Largest |(u, v) - (x, y)| over the box's corners, centre and a coarse grid (px)."""
        min_x, min_y, max_x, max_y = bbox
        xs = np.linspace(min_x, max_x, 9)
        ys = np.linspace(min_y, max_y, 9)
        u, v = self.on_grid(xs, ys)
        return float(np.hypot(u - xs[None, :], v - ys[:, None]).max())


def _nodes(lo: int, hi: int, step: int) -> np.ndarray:
    count = max(4, int(math.ceil((hi - lo) / step)) + 1)
    return np.linspace(lo, hi, count)


def _scaled_spline(residual, row):
    """Spline equal to row[0] * residual[0] + row[1] * residual[1] (same knots)."""
    su, sv = residual
    tx, ty, cu = su.tck
    cv = sv.tck[2]
    out = RectBivariateSpline.__new__(RectBivariateSpline)
    out.tck = (tx, ty, row[0] * cu + row[1] * cv)
    out.degrees = su.degrees
    return out


# --------------------------------------------------------------------------- weights
def lanczos_weights(frac: np.ndarray) -> np.ndarray:
    """Unit-sum Lanczos-3 weights of the six taps floor(p) - 2 ... floor(p) + 3.

    Parameters
    ----------
    frac : `numpy.ndarray`, any shape, in [0, 1)
        Fractional part of the sampled position.

    Returns
    -------
    weights : `numpy.ndarray` (6,) + frac.shape, float32
    """
    # keep off the nodes, where the formula is 0/0: moves a position by at most 1e-5 px
    t = np.clip(np.asarray(frac, dtype=np.float32), _NODE_GUARD, 1 - _NODE_GUARD)
    # sin(pi (t - o)) = (-1)^o sin(pi t): three transcendental calls instead of twelve
    s1 = np.sin(np.float32(np.pi) * t)
    third = np.float32(np.pi / 3.0) * t
    s3, c3 = np.sin(third), np.cos(third)
    weights = np.empty((_TAPS,) + t.shape, dtype=np.float32)
    d2 = np.empty_like(t)
    work = np.empty_like(t)
    for n, o in enumerate(range(1 - _ORDER, _ORDER + 1)):
        np.subtract(t, np.float32(o), out=d2)
        np.multiply(d2, d2, out=d2)
        w = weights[n]
        np.multiply(s3, np.float32(math.cos(math.pi * o / 3.0)), out=w)
        np.multiply(c3, np.float32(math.sin(math.pi * o / 3.0)), out=work)
        w -= work
        w *= s1
        w *= np.float32((-3.0 if o % 2 else 3.0) / math.pi**2)
        w /= d2
    weights /= weights.sum(axis=0)
    return weights


@functools.lru_cache(maxsize=1)
def _weight_table() -> np.ndarray:
    """(6, _TABLE_STEPS + 1) float32: `lanczos_weights` at fractions 0, 1/N, ..., 1."""
    table = lanczos_weights(np.arange(_TABLE_STEPS + 1) / _TABLE_STEPS)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=1)
def _pair_table() -> np.ndarray:
    """(6, _TABLE_STEPS + 1) uint64: each the float32 pair (w, w^2) of `_weight_table`."""
    table = _weight_table()
    pairs = np.stack([table, table * table], axis=-1)
    pairs = pairs.view(np.uint64)[..., 0]
    pairs.setflags(write=False)
    return pairs


def _table_index(frac: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Row of `_weight_table` nearest to each fraction in [0, 1) (``out``: float64 scratch)."""
    if out is None:
        return (np.asarray(frac) * _TABLE_STEPS + 0.5).astype(np.intp)
    np.multiply(frac, _TABLE_STEPS, out=out)
    out += 0.5
    return out.astype(np.intp)


def tabulated_weights(frac: np.ndarray) -> np.ndarray:
    """The Lanczos-3 weights the warp applies: `lanczos_weights` at the nearest 1/8192 px.

    Same shape convention as `lanczos_weights`: (6,) + frac.shape, float32.
    """
    return _weight_table()[:, _table_index(frac)]


# --------------------------------------------------------------------------- warping
def warp_onto(
    template: Exposure,
    science: Exposure,
    pixel_map: PixelMap | None = None,
    config: WarpConfig | None = None,
) -> Exposure:
    """Warp ``template`` onto ``science``'s pixel grid (its box, WCS and xy0).

    ``pixel_map`` (science parent pixel -> template parent pixel) defaults to
    the one the two WCSs imply.
    """
    if pixel_map is None:
        pixel_map = PixelMap.from_wcs(science, template, config)
    return warp_exposure(template, pixel_map, science.shape, science.xy0, science.wcs, config)


#: Epoch attributes of astropy's `Wcsprm` (MJD-OBS, DATE-OBS, ... cards): the grid's WCS
#: given to an image resampled onto it says when the grid's image was taken; the
#: resampled image keeps its own (a matched template's said the science's MJD-OBS).
_EPOCH_MJDS = ("mjdobs", "mjdavg", "mjdbeg", "mjdend")
_EPOCH_DATES = ("dateobs", "dateavg", "datebeg", "dateend")


def wcs_with_epoch_of(wcs, source):
    """A copy of ``wcs`` (a grid's) with the epoch cards of ``source``.

    Parameters
    ----------
    wcs : `astropy.wcs.WCS` or None
        The WCS of the grid an image is resampled onto.
    source : `astropy.wcs.WCS` or None
        The image's own WCS; None: the copy states no epoch.

    Returns
    -------
    `astropy.wcs.WCS` or None
        None when ``wcs`` is None; ``wcs`` itself is not changed.
    """
    if wcs is None:
        return None
    out = wcs.deepcopy()
    for name in _EPOCH_MJDS:
        setattr(out.wcs, name, getattr(source.wcs, name) if source is not None else np.nan)
    for name in _EPOCH_DATES:
        setattr(out.wcs, name, getattr(source.wcs, name) if source is not None else "")
    return out


def warp_exposure(
    exposure: Exposure,
    pixel_map: PixelMap,
    shape: tuple[int, int],
    xy0: tuple[int, int] = (0, 0),
    wcs=None,
    config: WarpConfig | None = None,
) -> Exposure:
    """Resample ``exposure`` onto an output grid of ``shape`` at ``xy0``.

    Parameters
    ----------
    exposure : `Exposure`
        The input (template); not changed.
    pixel_map : `PixelMap`
        Output parent pixel -> input parent pixel.
    shape : (ny, nx)
        Output size.
    xy0 : (int, int)
        Parent position of output pixel [0, 0].
    wcs : `astropy.wcs.WCS` or None
        WCS of the output grid.
    config : `WarpConfig` or None

    Returns
    -------
    warped : `Exposure`
        image x |det J| (flux conserving), variance = |det J|^2 sum(w^2 var), mask
        bits OR-ed over the interpolation footprint, NO_DATA (image 0) where the
        footprint leaves the input or meets its NO_DATA or non-finite pixels,
        `WarpedPsf`, ``noise_correlation`` from `warp_noise_correlation`.
    """
    config = config or WarpConfig()
    ny, nx = int(shape[0]), int(shape[1])
    if ny < 1 or nx < 1:
        raise InvalidExposureError(f"cannot warp onto an empty grid {shape}")
    no_data_bits = exposure.bitmask(["NO_DATA"])
    image, variance = exposure.image, exposure.variance
    # NO_DATA and non-finite input pixels read as NaN (marked while the passes copy)
    unusable = (exposure.mask, no_data_bits)
    # input index = input parent - input xy0; output parent = output index + xy0
    matrix = pixel_map.matrix
    offset = pixel_map.offset + matrix @ np.asarray(xy0, float) - np.asarray(exposure.xy0, float)
    index_map = PixelMap(matrix, offset, _shifted_residual(pixel_map, xy0))
    if index_map.is_affine and np.array_equal(matrix, np.eye(2)):
        out_image, out_var, footprint = _warp_translation(image, variance, offset, ny, nx, unusable)
    elif index_map.is_affine:
        out_image, out_var, footprint = _warp_affine(
            image, variance, matrix, offset, ny, nx, unusable=unusable
        )
    elif _gently_bent(index_map, ny, nx):
        out_image, out_var, footprint = _warp_affine(
            image, variance, matrix, offset, ny, nx, index_map, unusable
        )
    else:
        out_image, out_var, footprint = _warp_general(image, variance, index_map, ny, nx, unusable)
    det = _jacobian_determinant(index_map, ny, nx)
    mask = _warp_mask(exposure.mask, no_data_bits, index_map, ny, nx, footprint)
    planes = exposure.mask_planes.copy()
    _finish(out_image, out_var, det, mask, np.int32(planes.value("NO_DATA")))
    centre = ((xy0[0] + xy0[0] + nx - 1) / 2.0, (xy0[1] + xy0[1] + ny - 1) / 2.0)
    psf = WarpedPsf(exposure.psf, pixel_map, centre) if exposure.psf is not None else None
    metadata = dict(exposure.metadata)
    metadata["WARPED"] = True
    return replace(
        exposure,
        image=out_image,
        variance=out_var,
        mask=mask,
        mask_planes=planes,
        psf=psf,
        wcs=wcs_with_epoch_of(wcs, exposure.wcs),
        metadata=metadata,
        xy0=(int(xy0[0]), int(xy0[1])),
        variance_source=f"{exposure.variance_source}, warped",
        noise_correlation=warp_noise_correlation(
            pixel_map, (ny, nx), xy0, config.noise_correlation_radius
        ),
    )


def _gently_bent(index_map: PixelMap, ny: int, nx: int, xy0=(0, 0)) -> bool:
    """True when the map's Jacobian stays within 5% of its affine part over the box.

    Then the two separable passes follow it (the departures ride on them, see
    `_smooth_corrections`); a stronger bend takes the direct 6 x 6 sum.
    """
    scale = float(np.abs(index_map.matrix).max())
    for x in np.linspace(xy0[0], xy0[0] + nx - 1, 5):
        for y in np.linspace(xy0[1], xy0[1] + ny - 1, 5):
            if np.abs(index_map.jacobian(x, y) - index_map.matrix).max() > 0.05 * scale:
                return False
    return True


def _shifted_residual(pixel_map: PixelMap, xy0) -> tuple | None:
    """The residual splines re-expressed in output index coordinates."""
    if pixel_map.residual is None:
        return None
    out = []
    for spline in pixel_map.residual:
        tx, ty, c = spline.tck
        shifted = RectBivariateSpline.__new__(RectBivariateSpline)
        # knots along y come first (the splines are built as f(y, x))
        shifted.tck = (tx - xy0[1], ty - xy0[0], c)
        shifted.degrees = spline.degrees
        out.append(shifted)
    return tuple(out)


def _jacobian_determinant(index_map: PixelMap, ny: int, nx: int):
    """|det J| of the map: a float32 scalar for affine maps, else a `_Determinant`."""
    if index_map.is_affine:
        return np.float32(abs(np.linalg.det(index_map.matrix)))
    return _Determinant(index_map, ny, nx)


def _along_columns(col_nodes: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Node rows ``values`` (rows, len(col_nodes)) interpolated linearly to columns 0 ... n - 1."""
    columns = np.arange(n, dtype=np.float64)
    index = np.clip(np.searchsorted(col_nodes, columns, side="right") - 1, 0, len(col_nodes) - 2)
    frac = (columns - col_nodes[index]) / np.diff(col_nodes)[index]
    # take (C order, unlike fancy indexing on axis 1): a block's rows are then contiguous
    left = values.take(index, axis=1)
    along = values.take(index + 1, axis=1)
    along -= left
    along *= frac
    along += left
    return along


class _Determinant:
    """|det J| of a non-affine map on the output grid, a block of rows at a time.

    Exact (central differences of the map) on nodes every `_SMOOTH_STEP` px, read back
    bilinearly: a WCS map's Jacobian varies over thousands of pixels, so it is good to
    float32 rounding (1e-7 against central differences at every pixel), and no
    frame-sized image (nor a frame-sized spline product) is made.
    """

    def __init__(self, index_map: PixelMap, ny: int, nx: int):
        step = max(1, min(_SMOOTH_STEP, (max(nx, ny) - 1) // 64))
        xs, ys = _nodes(0, nx - 1, step), _nodes(0, ny - 1, step)
        u_right, v_right = index_map.on_grid(xs + 0.5, ys)
        u_left, v_left = index_map.on_grid(xs - 0.5, ys)
        u_up, v_up = index_map.on_grid(xs, ys + 0.5)
        u_down, v_down = index_map.on_grid(xs, ys - 0.5)
        dets = np.abs((u_right - u_left) * (v_up - v_down) - (u_up - u_down) * (v_right - v_left))
        self.row_nodes, self.shape = ys, (ny, nx)
        self.along = _along_columns(xs, dets, nx).astype(np.float32)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, nx) float32: rows start ... stop - 1."""
        rows = np.arange(start, min(stop, self.shape[0]), dtype=np.float64)
        nodes = self.row_nodes
        k = np.clip(np.searchsorted(nodes, rows, side="right") - 1, 0, len(nodes) - 2)
        weight = ((rows - nodes[k]) / np.diff(nodes)[k]).astype(np.float32)[:, None]
        out = self.along[k + 1]
        out -= self.along[k]
        out *= weight
        out += self.along[k]
        return out

    def image(self) -> np.ndarray:
        """The whole (ny, nx) float32 image (for tests and references)."""
        return self.rows(0, self.shape[0])


def _basis(points: np.ndarray, knots: np.ndarray, k: int) -> np.ndarray:
    """Dense B-spline basis (len(points), len(knots) - k - 1); points clamped as fitpack does."""
    inside = np.clip(points, knots[k], knots[-k - 1])
    # clamped already: extrapolate=True only skips a bounds check that loops in Python
    return BSpline.design_matrix(inside, knots, k, extrapolate=True).toarray()


def _finish(out_image, out_var, det, mask, no_data: np.int32) -> None:
    """Multiply by the Jacobian, then NO_DATA where image or variance is NaN (in place).

    There the image is 0 and the variance the median elsewhere; row blocks run in threads.
    """
    ny, nx = out_image.shape
    bad = np.empty((ny, nx), dtype=bool)
    chunk = max(1, _FINISH_PIXELS // nx)
    found = []

    def block(start: int) -> None:
        rows = np.s_[start : start + chunk]
        image, var, flagged = out_image[rows], out_var[rows], bad[rows]
        scale = det.rows(start, start + chunk) if isinstance(det, _Determinant) else det
        image *= scale
        var *= scale * scale
        np.isnan(image, out=flagged)
        flagged |= np.isnan(var)
        if flagged.any():
            found.append(start)
            np.copyto(image, 0.0, where=flagged)
            np.bitwise_or(mask[rows], no_data, out=mask[rows], where=flagged)

    _in_parallel(block, range(0, ny, chunk))
    if found:
        sample = out_var[::7, ::7][~bad[::7, ::7]]  # a fill value only: a subsample is plenty
        np.copyto(out_var, order.median(sample, consume=True) if sample.size else 1.0, where=bad)


def _interleaved(
    image: np.ndarray,
    variance: np.ndarray,
    orient=(False, False, False),
    unusable: tuple[np.ndarray, int] | None = None,
):
    """(h + 2 PAD, w + 2 PAD, 2) float32: image and variance side by side, NaN border.

    One gather of a 64-bit element then fetches a pixel's image and variance together
    (the gathers are what the warp spends its time on). ``orient`` = (transpose,
    flip_x, flip_y) as `_dihedral` returns, applied while copying. ``unusable`` = (mask,
    bits): pixels with those bits, or a non-finite image, are NaN in both planes (NaN
    spreads through every tap, so any output touching them is NO_DATA); marked block by
    block while copying, with no frame-sized temporaries.
    """
    planes = [_oriented_view(plane, *orient) for plane in (image, variance)]
    mask = None if unusable is None or not unusable[1] else _oriented_view(unusable[0], *orient)
    h, w = planes[0].shape
    pairs = np.empty((h + 2 * _PAD, w + 2 * _PAD, 2), dtype=np.float32)
    pairs[:_PAD] = np.nan
    pairs[-_PAD:] = np.nan
    pairs[:, :_PAD] = np.nan
    pairs[:, -_PAD:] = np.nan
    chunk = max(1, _FINISH_PIXELS // w)

    def copy(start: int) -> None:  # a frame-sized strided copy: worth both cores
        stop = min(start + chunk, h)
        inner = pairs[_PAD + start : _PAD + stop, _PAD:-_PAD]
        for n, plane in enumerate(planes):
            inner[..., n] = plane[start:stop]
        if unusable is None:
            return
        bad = ~np.isfinite(inner[..., 0])
        if mask is not None:
            bad |= (mask[start:stop] & unusable[1]) != 0
        if bad.any():
            inner[bad] = np.nan

    _in_parallel(copy, range(0, h, chunk))
    return pairs


class _RowSource:
    """The padded input's rows as (image, variance) pairs, a block of rows at a time.

    Pass 1 reads each input row in one block only, so the pairs are interleaved block by
    block into a per-thread buffer (cache-sized; no frame-sized copy, which would cost
    134 MB at 4096^2 and its page faults). A transposed input reads its rows down the
    columns of the arrays: one frame-wide `_interleaved` copy then reads them once.
    ``orient`` and ``unusable`` as in `_interleaved`.
    """

    def __init__(self, image, variance, orient, unusable=None):
        self.planes = [_oriented_view(plane, *orient) for plane in (image, variance)]
        h, w = self.planes[0].shape
        self.shape = (h + 2 * _PAD, w + 2 * _PAD)
        self.mask = None
        if unusable is not None and unusable[1]:
            self.mask = _oriented_view(unusable[0], *orient)
            self.bits = unusable[1]
        self.unusable = unusable is not None
        self.whole = None
        if orient[0]:
            self.whole = _interleaved(image, variance, orient, unusable)
            self.flat = self.whole.view(np.uint64).ravel()

    def rows(self, j0: int, j1: int, c0: int, c1: int) -> tuple[np.ndarray, int]:
        """(flat pairs, row stride): padded pixel (j, c) of rows j0 ... j1 - 1 and columns
        c0 ... c1 - 1 at index (j - j0) stride + c - c0, a uint64 element each."""
        wp = self.shape[1]
        if self.whole is not None:
            return self.flat[j0 * wp + c0 :], wp
        out = _scratch("source rows", (j1 - j0, c1 - c0), np.uint64)
        pairs = out.view(np.float32).reshape(out.shape + (2,))
        h, w = self.shape[0] - 2 * _PAD, wp - 2 * _PAD
        # the input inside the window; NaN elsewhere (the border, as `_interleaved` has)
        r0, r1 = max(j0, _PAD), min(j1, h + _PAD)
        s0, s1 = max(c0, _PAD), min(c1, w + _PAD)
        if r1 <= r0 or s1 <= s0:
            pairs[...] = np.nan
            return out.ravel(), c1 - c0
        pairs[: r0 - j0] = np.nan
        pairs[r1 - j0 :] = np.nan
        pairs[:, : s0 - c0] = np.nan
        pairs[:, s1 - c0 :] = np.nan
        inner = pairs[r0 - j0 : r1 - j0, s0 - c0 : s1 - c0]
        rows, cols = np.s_[r0 - _PAD : r1 - _PAD], np.s_[s0 - _PAD : s1 - _PAD]
        for n, plane in enumerate(self.planes):
            inner[..., n] = plane[rows, cols]
        if self.unusable:
            bad = ~np.isfinite(inner[..., 0])
            if self.mask is not None:
                bad |= (self.mask[rows, cols] & self.bits) != 0
            if bad.any():
                inner[bad] = np.nan
        return out.ravel(), c1 - c0


def _take_pairs(pairs: np.ndarray, base, step: int, q, out) -> None:
    """out = sum_k (w_k, w_k^2) * src[base + k step]: image and variance, w_k = table[k, q].

    ``pairs`` is the flat uint64 view of an interleaved (image, variance) array and
    ``out`` is float32 of shape base.shape + (2,) (interleaved too, rows may be strided):
    one 64-bit gather fetches a pixel's pair, one more its (w, w^2), one multiply and one
    add serve both planes.
    """
    table = _pair_table()
    got = _scratch("got", base.shape, np.uint64)
    pair = got.view(np.float32).reshape(base.shape + (2,))
    got_weights = _scratch("got weights", base.shape, np.uint64)
    weights = got_weights.view(np.float32).reshape(base.shape + (2,))
    for k in range(_TAPS):
        # tap k of every pixel: the same indices into the array shifted by k steps
        # the callers clip the indices: "wrap" never wraps, and gathers faster than "clip"
        pairs[k * step :].take(base, out=got, mode="wrap")
        table[k].take(q, out=got_weights, mode="wrap")
        if k == 0:
            np.multiply(pair, weights, out=out)
            continue
        pair *= weights
        out += pair


def _dihedral(matrix: np.ndarray, offset: np.ndarray, shape):
    """Flip/transpose of the input array that makes the map diagonally dominant.

    Returns (transpose, flip_x, flip_y, matrix', offset', shape'): exact, lossless
    array operations that bring any rotation within 45 degrees of the axes, where
    the two-pass resampling is well conditioned.
    """
    best = None
    h, w = shape
    for transpose in (False, True):
        for flip_x in (False, True):
            for flip_y in (False, True):
                perm = np.array([[0.0, 1.0], [1.0, 0.0]]) if transpose else np.eye(2)
                hh, ww = (w, h) if transpose else (h, w)
                signs = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0])
                shift = np.array([ww - 1.0 if flip_x else 0.0, hh - 1.0 if flip_y else 0.0])
                m = signs @ perm @ matrix
                t = signs @ perm @ offset + shift
                score = min(abs(m[0, 0]) - abs(m[0, 1]), abs(m[1, 1]) - abs(m[1, 0]))
                if m[0, 0] < 0 or m[1, 1] < 0:
                    score -= 1e-9  # prefer no flip when it does not matter
                if best is None or score > best[0] + 1e-12:
                    best = (score, transpose, flip_x, flip_y, m, t)
    assert best is not None
    return best[1:]


def _oriented_view(plane: np.ndarray, transpose: bool, flip_x: bool, flip_y: bool):
    if transpose:
        plane = plane.T
    if flip_x:
        plane = plane[:, ::-1]
    if flip_y:
        plane = plane[::-1]
    return plane


_scratch_space = threading.local()


def _scratch(slot: str, shape, dtype=np.float32) -> np.ndarray:
    """A reusable per-thread buffer for a block's temporaries, viewed as ``shape``.

    A block's temporaries are a few hundred kB: fresh ones come from the system (mmap)
    and are page-faulted in on every block, which costs as much as the arithmetic on
    them. Kept per thread (slot names distinguish buffers live at the same time) until
    `_in_parallel` returns.
    """
    dtype = np.dtype(dtype)
    need = math.prod(shape) * dtype.itemsize
    buffers = _scratch_space.__dict__
    buffer = buffers.get(slot)
    if buffer is None or buffer.size < need:
        buffer = np.empty(need, dtype=np.uint8)  # malloc alignment: any dtype's view is aligned
        buffers[slot] = buffer
    return buffer[:need].view(dtype).reshape(shape)


def _in_parallel(task, starts) -> None:
    """Run ``task(start)`` for every block start on a thread per core (numpy drops the GIL)."""
    workers = min(n_threads(), len(starts))
    if workers <= 1:
        try:
            for start in starts:
                task(start)
        finally:
            _scratch_space.__dict__.clear()  # this thread lives on: free its buffers
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:  # its threads take their buffers
        for _ in pool.map(task, starts):
            pass


def _warp_translation(image, variance, offset, ny, nx, unusable=None):
    """A pure shift: the same six weights everywhere, two separable passes over row blocks.

    ``unusable`` = (mask, bits): as in `_interleaved`, such input pixels read as NaN.
    """
    whole = np.floor(offset).astype(int)
    wx, wy = (tabulated_weights(np.array([frac]))[:, 0] for frac in offset - whole)
    h, w = image.shape
    x0, y0 = whole[0] - (_ORDER - 1), whole[1] - (_ORDER - 1)
    out_image = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty((ny, nx), dtype=np.float32)
    chunk = max(1, _SHIFT_CHUNK_PIXELS // nx)

    def block(start: int) -> None:
        stop = min(start + chunk, ny)
        # input window feeding these output rows, NaN where it leaves the input
        shape = (stop - start + _TAPS - 1, nx + _TAPS - 1)
        wy0 = y0 + start
        sx0, sy0 = max(x0, 0), max(wy0, 0)
        sx1, sy1 = min(x0 + shape[1], w), min(wy0 + shape[0], h)
        window = np.full(shape, np.nan, dtype=np.float32)
        rows = np.empty((shape[0], nx), dtype=np.float32)
        term = np.empty_like(rows)
        inside = np.s_[sy0 - wy0 : sy1 - wy0, sx0 - x0 : sx1 - x0]
        bad = None
        if unusable is not None and sx1 > sx0 and sy1 > sy0:
            bad = ~np.isfinite(image[sy0:sy1, sx0:sx1])
            if unusable[1]:
                bad |= (unusable[0][sy0:sy1, sx0:sx1] & unusable[1]) != 0
            bad = bad if bad.any() else None
        for plane, wxk, wyk, out in (
            (image, wx, wy, out_image),
            (variance, wx * wx, wy * wy, out_var),
        ):
            if sx1 > sx0 and sy1 > sy0:
                window[inside] = plane[sy0:sy1, sx0:sx1]
                if bad is not None:
                    window[inside][bad] = np.nan
            np.multiply(window[:, :nx], wxk[0], out=rows)
            for k in range(1, _TAPS):
                np.multiply(window[:, k : k + nx], wxk[k], out=term)
                rows += term
            target = out[start:stop]
            np.multiply(rows[: stop - start], wyk[0], out=target)
            for k in range(1, _TAPS):
                np.multiply(rows[k : k + stop - start], wyk[k], out=term[: stop - start])
                target += term[: stop - start]

    _in_parallel(block, range(0, ny, chunk))
    return out_image, out_var, _TAP_REACH


def _fixed(values) -> np.ndarray:
    """Positions (px) in fixed point: int64 multiples of 2^-_FIX px, rounded."""
    return np.rint(np.asarray(values, dtype=np.float64) * _FIX_ONE).astype(np.int64)


def _tap_starts(p: np.ndarray, last: int) -> tuple[np.ndarray, np.ndarray]:
    """(first tap, table row) of fixed-point positions of the first tap (``p``, reused).

    Positions are clipped to [0, last + 1): a clipped pixel's taps reach the NaN border
    (it is NO_DATA whatever its weights). The table row is the nearest 1/8192 px.
    """
    np.clip(p, 0, ((last + 1) << _FIX) - 1, out=p)
    q = np.bitwise_and(p, _FIX_ONE - 1, out=_scratch("table rows", p.shape, np.int64))
    q += 1 << (_TABLE_SHIFT - 1)
    q >>= _TABLE_SHIFT
    p >>= _FIX
    return p, q


class _Positions:
    """Fixed-point positions ``slope * x + start(row) + correction(row, x)`` a block at a time.

    The smooth correction (a WCS map's departure from its affine part) is sampled on
    nodes and read back bilinearly: a WCS residual bends over hundreds of pixels, so node
    spacing `_SMOOTH_STEP` px keeps the interpolation error (spacing^2 / 8 x curvature)
    far below 1e-3 px. The node rows are interpolated along the columns once (with the
    slope folded in); a block of rows then blends two of them in integers.

    Parameters
    ----------
    slope : float
        Change of position per column.
    n : int
        Number of columns.
    row_nodes, col_nodes : `numpy.ndarray` or None
        Node coordinates of ``values`` (rows, columns), increasing.
    values : `numpy.ndarray` (len(row_nodes), len(col_nodes)) or None
        The correction at the nodes (px); None: none.
    """

    def __init__(self, slope: float, n: int, row_nodes=None, col_nodes=None, values=None):
        columns = np.arange(n, dtype=np.float64)
        self.row_nodes = row_nodes
        self.largest = 0.0 if values is None else float(np.abs(values).max())
        if values is None:
            self.along = _fixed(slope * columns)[None, :]
            return
        along = _along_columns(col_nodes, values, n)
        along += slope * columns
        self.along = _fixed(along)
        self.rise = np.diff(self.along, axis=0)  # from each node row to the next

    def __call__(self, rows: np.ndarray, start: np.ndarray, x0: int = 0, x1: int | None = None):
        """(len(rows), x1 - x0) int64 positions at columns x0 ... x1 - 1; start per row (px).

        The result is a per-thread scratch buffer (`_scratch`), valid until the next call.
        """
        first = _fixed(start)[:, None]
        columns = np.s_[x0 : self.along.shape[1] if x1 is None else x1]
        width = self.along[0, columns].size
        out = _scratch("positions", (len(rows), width), np.int64)
        if self.row_nodes is None:
            np.add(self.along[0, columns], first, out=out)
            return out
        nodes = self.row_nodes
        k = np.clip(np.searchsorted(nodes, rows, side="right") - 1, 0, len(nodes) - 2)
        weight = np.rint((rows - nodes[k]) / np.diff(nodes)[k] * (1 << _BLEND_BITS))
        weight = weight.astype(np.int64)[:, None]
        # rows between the same two nodes share their slices (a block spans one or a few)
        edges = np.flatnonzero(np.diff(k)) + 1
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(rows)], strict=True):
            band = out[lo:hi]
            np.multiply(self.rise[k[lo], columns], weight[lo:hi], out=band)
            band >>= _BLEND_BITS
            band += self.along[k[lo], columns]
        out += first
        return out

    def values(self, rows: np.ndarray, start: np.ndarray, x0: int = 0, x1: int | None = None):
        """The same positions in px (float64): for tests and references."""
        return self(rows, start, x0, x1) / float(_FIX_ONE)


_SMOOTH_STEP = 16


class _ColumnSpline:
    """A residual spline f(y, x) on fixed columns xs, evaluated at any rows there.

    Along a column it is a 1-D spline in y whose coefficients are the 2-D ones summed
    against the column's x basis: B-spline bases instead of fitpack point by point.
    Rows outside the knots are clamped, as fitpack does.
    """

    def __init__(self, spline, xs: np.ndarray):
        ty, tx, c = spline.tck
        ky, kx = spline.degrees
        bx = _basis(xs, tx, kx)
        self.knots, self.degree = ty, ky
        self.columns = c.reshape(len(ty) - ky - 1, bx.shape[1]) @ bx.T  # (n basis y, len(xs))

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Values at rows ``y`` (m, len(xs)), column by column."""
        k = self.degree
        rows = np.clip(np.ravel(y), self.knots[k], self.knots[-k - 1])
        # k + 1 consecutive entries a row; extrapolate=True: see _basis
        basis = BSpline.design_matrix(rows, self.knots, k, extrapolate=True)
        first = basis.indices[:: k + 1].reshape(y.shape)
        weights = basis.data.reshape(y.shape + (k + 1,))
        columns = np.arange(y.shape[1])
        total = weights[..., 0] * self.columns[first, columns]
        for i in range(1, k + 1):
            total += weights[..., i] * self.columns[first + i, columns]
        return total


class _GridRows:
    """``index_map.on_grid(xs, ys)`` for one block of rows ys after another.

    The residual splines' x bases are summed once against their coefficients, so a block
    costs one sparse product per spline (k + 1 y basis entries a row) instead of fitpack
    at every pixel.
    """

    def __init__(self, index_map: PixelMap, xs: np.ndarray):
        self.map, self.xs = index_map, xs
        self.parts = []
        for spline in index_map.residual or ():
            ty, tx, c = spline.tck
            ky, kx = spline.degrees
            bx = _basis(xs, tx, kx)
            self.parts.append((ty, ky, c.reshape(len(ty) - ky - 1, bx.shape[1]) @ bx.T))

    def __call__(self, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, t = self.map.matrix, self.map.offset
        u = (m[0, 0] * self.xs)[None, :] + (m[0, 1] * ys + t[0])[:, None]
        v = (m[1, 0] * self.xs)[None, :] + (m[1, 1] * ys + t[1])[:, None]
        for plane, (ty, ky, along_x) in zip((u, v), self.parts, strict=False):
            # sparse rows (k + 1 entries): no BLAS call, whose threads fight the blocks' own
            rows = np.clip(ys, ty[ky], ty[-ky - 1])
            plane += BSpline.design_matrix(rows, ty, ky, extrapolate=True) @ along_x
        return u, v


def _smooth_corrections(index_map: PixelMap, orientation, m, t, ny, nx, hp):
    """Departures of a non-affine map from its affine part, for the two passes.

    In the oriented input frame: pass 2 samples row v(x, y) of the intermediate, pass 1
    samples input row j at u(x, y*) where output column x crosses it (v(x, y*) = j).
    Returns (row range j_lo, j_hi (padded), du for pass 1, dv for pass 2), du and dv as
    (row nodes, column nodes, values) for `_Positions`.
    """
    transpose, flip_x, flip_y, shape = orientation
    linear = np.eye(2)
    if transpose:
        linear = np.array([[0.0, 1.0], [1.0, 0.0]])
    linear = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0]) @ linear
    oriented = index_map.then(linear, t - linear @ index_map.offset)
    assert oriented.residual is not None

    (a, b), (d, e) = m
    # nodes every 16 px, closer on small boxes (at least 64 per side; they are cheap)
    step = max(1, min(_SMOOTH_STEP, (max(nx, ny, hp) - 1) // 64))
    xn = _nodes(0, nx - 1, step)
    yn = _nodes(0, ny - 1, step)
    # all the map is sampled at is the node columns xn: the splines along them are 1-D
    residual_u, residual_v = (_ColumnSpline(spline, xn) for spline in oriented.residual)
    (mu, nu), (mv, nv) = oriented.matrix
    tu, tv = oriented.offset

    def v_at(y):
        return mv * xn + nv * y + tv + residual_v(y)

    gy = np.broadcast_to(yn[:, None], (len(yn), len(xn)))
    v_exact = v_at(gy)
    dv = v_exact - (d * xn + e * gy + t[1])
    j_lo = int(np.clip(math.floor(v_exact.min() + _PAD) - _ORDER, 0, hp - 1))
    j_hi = int(np.clip(math.floor(v_exact.max() + _PAD) + _ORDER + 1, 0, hp - 1))
    jn = _nodes(j_lo - _PAD, j_hi - _PAD, step)  # unpadded input rows
    gx, gj = np.meshgrid(xn, jn)
    y = (gj - d * gx - t[1]) / e
    for _ in range(6):  # Newton on v(x, y) = j; the slope is e up to the small residual
        step = (v_at(y) - gj) / e
        y -= step
        if np.abs(step).max() < 1e-7:  # converged (fixed point resolves 1e-6 px)
            break
    u_exact = mu * gx + nu * y + tu + residual_u(y)
    alpha = (a * e - b * d) / e
    du = u_exact - (alpha * gx + (b / e) * (gj - t[1]) + t[0])
    return j_lo, j_hi, (jn + _PAD, xn, du), (yn, xn, dv)


def _warp_affine(
    image,
    variance,
    matrix,
    offset,
    ny,
    nx,
    index_map: PixelMap | None = None,
    unusable: tuple[np.ndarray, int] | None = None,
):
    """Two separable Lanczos passes; returns (image, variance, reach).

    An affine index map, or with ``index_map`` a smooth non-affine one whose affine
    part is (matrix, offset): its departures ride on the same two passes. ``unusable``
    = (mask, bits): input pixels with those bits read as NaN (see `_interleaved`).
    """
    transpose, flip_x, flip_y, m, t = _dihedral(matrix, offset, image.shape)
    reader = _RowSource(image, variance, (transpose, flip_x, flip_y), unusable)
    hp, wp = reader.shape
    source: _RowSource | None = reader
    del reader
    (a, b), (d, e) = m
    c, f = t[0] + _PAD, t[1] + _PAD  # padded input coordinates
    # pass 1 along input rows j: the output column x meets row j at u = alpha x + beta_j
    alpha = (a * e - b * d) / e
    du = dv = None
    if index_map is not None and not index_map.is_affine:
        j_lo, j_hi, du, dv = _smooth_corrections(
            index_map, (transpose, flip_x, flip_y, image.shape), m, t, ny, nx, hp
        )
    else:
        corners_v = [d * x + e * y + f for x in (0, nx - 1) for y in (0, ny - 1)]
        j_lo = int(np.clip(math.floor(min(corners_v)) - _ORDER + 1, 0, hp - 1))
        j_hi = int(np.clip(math.floor(max(corners_v)) + _ORDER, 0, hp - 1))
    # first-tap positions of both passes (ORDER - 1 before the base pixel), fixed point
    u_at = _Positions(alpha, nx, *(du or ()))
    v_at = _Positions(d, nx, *(dv or ()))
    rows = np.arange(j_lo, j_hi + 1)
    chunk = max(1, _CHUNK_PIXELS // nx)
    # the intermediate image keeps the pairs interleaved for pass 2's gathers
    middle = np.empty((rows.size, nx, 2), dtype=np.float32)

    # pass 2 reads, in column x, rows around v(x, y) for y in the output: only there
    # does pass 1 need that column (a turned grid's band of rows is a parallelogram)
    low, high = sorted((0.0, e * (ny - 1)))
    margin = _ORDER + 2 + v_at.largest

    def needed_columns(j_first: int, j_last: int) -> tuple[int, int]:
        top, bottom = j_last - f - low + margin, j_first - f - high - margin
        if d == 0:
            return (0, nx) if bottom <= 0 <= top else (0, 0)
        lo, hi = sorted((top / d, bottom / d))
        return max(0, math.floor(lo)), min(nx, math.ceil(hi) + 1)

    # a pixel whose taps reach the NaN border is NaN whatever its weights: with u (padded)
    # below 5 or from the input's width on, taps floor(u) - 2 ... floor(u) + 3 do. Those
    # are set, not computed (one pixel of margin for rounding, more for a bend)
    u_inside = (_PAD + 1 - u_at.largest, wp - 2 * _PAD + 1 + u_at.largest)
    v_inside = (_PAD + 1 - v_at.largest, hp - 2 * _PAD + 1 + v_at.largest)

    def inside_columns(j_first: int, j_last: int, x0: int, x1: int) -> tuple[int, int]:
        """Columns x0 ... x1 - 1 narrowed to those whose u on rows j_first ... j_last may
        be inside the input (u = alpha x + beta_j, beta linear in j)."""
        betas = [(b / e) * (j - f) + c for j in (j_first, j_last)]
        ends = sorted(((u_inside[0] - max(betas)) / alpha, (u_inside[1] - min(betas)) / alpha))
        return max(x0, math.floor(ends[0])), min(x1, math.ceil(ends[1]) + 1)

    def along_rows(start: int) -> None:
        j = rows[start : start + chunk]
        block = middle[start : start + chunk]
        x0, x1 = needed_columns(int(j[0]), int(j[-1]))
        x0, x1 = inside_columns(int(j[0]), int(j[-1]), x0, x1)
        block[:, :x0] = np.nan  # never read by pass 2, or NaN whatever
        block[:, max(x0, x1) :] = np.nan
        if x1 <= x0:
            return
        first = (b / e) * (j - f) + c - (_ORDER - 1)
        first, q = _tap_starts(u_at(j.astype(np.float64), first, x0, x1), wp - _TAPS)
        # the columns these rows' taps read
        c0, c1 = int(first.min()), int(first.max()) + _TAPS
        assert source is not None
        pairs, stride = source.rows(int(j[0]), int(j[-1]) + 1, c0, c1)
        first -= c0
        first += (np.arange(len(j)) * stride)[:, None]
        _take_pairs(pairs, first, 1, q, block[:, x0:x1])

    _in_parallel(along_rows, range(0, rows.size, chunk))
    source = None  # the intermediate and the outputs take its place
    # pass 1 reads row j at U(j) = u + (b / e)(j - v), up to |b / e| ORDER columns from u;
    # flips mirror the reach, so it is taken symmetric (at most a pixel too wide; one more
    # for a bending map, whose local slope departs a little from b / e)
    wide = _ORDER + int(math.ceil(abs(b / e) * _ORDER)) + (du is not None)
    reach = ((wide, wide), (_ORDER, _ORDER + (du is not None)))
    if transpose:
        reach = reach[::-1]
    if rows.size < _TAPS:
        nothing = np.full((ny, nx), np.nan, dtype=np.float32)
        return nothing, nothing.copy(), reach
    # pass 2 along output columns: v = d x + e y + f, taps on rows of the intermediate
    out_image = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty((ny, nx), dtype=np.float32)
    flat_middle = middle.view(np.uint64).ravel()
    x_index = np.arange(nx, dtype=np.int64)

    # pass 2 in tiles: along a row of the output, pass 2 drifts by d rows of the intermediate
    # per column; a tile narrow enough keeps the rows it reads in cache (a turned grid)
    tile_x = nx if abs(d) * nx <= _TILE_DRIFT else max(_TILE_DRIFT, int(_TILE_DRIFT / abs(d)))
    tile_y = max(1, _CHUNK_PIXELS // tile_x)

    def outside(y0: int, y1: int, x0: int, x1: int) -> bool:
        """True if every output pixel of the tile has a tap on the NaN border (all NaN)."""
        vs = [d * x + e * y + f for x in (x0, x1 - 1) for y in (y0, y1 - 1)]
        if max(vs) < v_inside[0] or min(vs) >= v_inside[1]:
            return True
        # the intermediate rows the tile reads, and u along them
        js = (min(vs) - _ORDER - v_at.largest, max(vs) + _ORDER + v_at.largest)
        us = [alpha * x + (b / e) * (j - f) + c for x in (x0, x1 - 1) for j in js]
        return max(us) < u_inside[0] or min(us) >= u_inside[1]

    def along_columns(corner: tuple[int, int]) -> None:
        start, x0 = corner
        x1 = min(x0 + tile_x, nx)
        if outside(start, min(start + tile_y, ny), x0, x1):
            out_image[start : start + tile_y, x0:x1] = np.nan
            out_var[start : start + tile_y, x0:x1] = np.nan
            return
        y = np.arange(start, min(start + tile_y, ny), dtype=np.float64)
        first = e * y + f - (_ORDER - 1) - j_lo
        first, q = _tap_starts(v_at(y, first, x0, x1), rows.size - _TAPS)
        first *= nx
        first += x_index[None, x0:x1]
        pairs = _scratch("pairs", first.shape + (2,))
        _take_pairs(flat_middle, first, nx, q, pairs)
        block = np.s_[start : start + tile_y, x0:x1]
        out_image[block] = pairs[..., 0]
        out_var[block] = pairs[..., 1]

    _in_parallel(
        along_columns, [(y, x) for y in range(0, ny, tile_y) for x in range(0, nx, tile_x)]
    )
    return out_image, out_var, reach


def _warp_general(image, variance, index_map: PixelMap, ny, nx, unusable=None):
    """Direct 6 x 6 Lanczos sum at positions from the (non-affine) map."""
    source = _interleaved(image, variance, unusable=unusable)
    hp, wp = source.shape[:2]
    flat_source = source.view(np.uint64).ravel()
    out_image = np.empty((ny, nx), dtype=np.float32)
    out_var = np.empty_like(out_image)
    on_grid = _GridRows(index_map, np.arange(nx, dtype=np.float64))
    chunk = max(1, _CHUNK_PIXELS // nx)
    table = _pair_table()

    def block(start: int) -> None:
        ys = np.arange(start, min(start + chunk, ny), dtype=np.float64)
        u, v = on_grid(ys)
        u, v = u + _PAD, v + _PAD
        bu, bv = np.floor(u), np.floor(v)
        qu, qv = _table_index(u - bu), _table_index(v - bv)
        col = np.clip(bu.astype(np.int64) - (_ORDER - 1), 0, wp - _TAPS)
        row = np.clip(bv.astype(np.int64) - (_ORDER - 1), 0, hp - _TAPS)
        base = row * wp + col
        total = np.zeros(base.shape + (2,), dtype=np.float32)
        along = np.empty_like(total)
        got_weights = np.empty(base.shape, dtype=np.uint64)
        weights = got_weights.view(np.float32).reshape(total.shape)
        for l in range(_TAPS):
            _take_pairs(flat_source, base + l * wp, 1, qu, along)
            table[l].take(qv, out=got_weights)
            along *= weights
            total += along
        out_image[start : start + len(ys)] = total[..., 0]
        out_var[start : start + len(ys)] = total[..., 1]

    _in_parallel(block, range(0, ny, chunk))
    return out_image, out_var, _TAP_REACH


def _or_dilate(mask: np.ndarray, reach_x: tuple[int, int], reach_y: tuple[int, int]):
    """OR of every bit over the window [i - lo, i + hi] along x (and likewise along y).

    ``reach_x = (lo, hi)``: a pixel's taps run from lo before to hi after its base index.
    Rows (then columns) are independent: blocks of them run in threads.
    """
    h, w = mask.shape
    rows = np.empty_like(mask)
    out = np.empty_like(mask)
    step_y = max(1, _FINISH_PIXELS // w)
    step_x = max(1, _FINISH_PIXELS // h)

    def along_x(start: int) -> None:
        band = np.s_[start : start + step_y]
        rows[band] = _or_window(mask[band], *reach_x, axis=1)

    def along_y(start: int) -> None:
        band = np.s_[:, start : start + step_x]
        out[band] = _or_window(rows[band], *reach_y, axis=0)

    _in_parallel(along_x, range(0, h, step_y))
    _in_parallel(along_y, range(0, w, step_x))
    return out


def _or_window(a: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    """OR over [i - lo, i + hi] along ``axis`` (clipped at the ends) by doubling windows.

    ceil(log2(lo + hi + 1)) passes instead of lo + hi: the window covering [p, p + width)
    of the zero-padded array ORs with itself shifted by up to its width.
    """
    n, length = a.shape[axis], lo + hi + 1

    def cut(start, stop):
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    shape = list(a.shape)
    shape[axis] = n + lo + hi
    acc = np.zeros(shape, dtype=a.dtype)
    acc[cut(lo, lo + n)] = a
    spare = np.empty_like(acc)
    width = 1
    while width < length:
        step = min(width, length - width)
        np.bitwise_or(acc[cut(None, -step)], acc[cut(step, None)], out=spare[cut(None, -step)])
        spare[cut(-step, None)] = acc[cut(-step, None)]
        acc, spare = spare, acc
        width += step
    return acc[cut(0, n)]


def _warp_mask(mask, no_data_bits: int, index_map: PixelMap, ny, nx, footprint) -> np.ndarray:
    """Input bits OR-ed over each output pixel's interpolation taps (base index floor(u), floor(v)).

    NO_DATA bits are left out (the image's NaN carries them). ``footprint`` = ((lo, hi)
    along x, (lo, hi) along y): the taps' reach from the base index. A few set pixels (bad
    columns, saturated stars, cosmic rays) are scattered onto the outputs whose taps reach
    them (`_scatter_mask`); many are grown over the footprint and read back at every
    output's base (`_gather_mask`). Both give the same bits.
    """
    out = np.zeros((ny, nx), dtype=np.int32)
    keep = np.int32(~np.int32(no_data_bits))
    budget = int(ny * nx / _SPARSE_MASK_SHARE)
    window = _scatter_window(index_map, footprint, ny, nx)
    points = None
    if window is not None:
        points = _set_pixels(mask, keep, max(1, budget // window[0].size))
    if points is not None:
        if points.size:
            _scatter_mask(mask, keep, points, index_map, footprint, window, out)
        return out
    kept = np.empty_like(mask)
    np.bitwise_and(mask, keep, out=kept)
    used = int(np.bitwise_or.reduce(kept, axis=None))
    if used:
        # the planes in use fit a byte (Rubin's default ones but NO_DATA do): a quarter of
        # the memory for the growth and the gather to stream through
        small = np.uint8 if used < 1 << 8 else np.uint16 if used < 1 << 16 else None
        _gather_mask(kept if small is None else kept.astype(small), index_map, footprint, out)
    return out


_SPARSE_MASK_SHARE = 8  # scatter while the candidate outputs number under 1/8 of the output


def _set_pixels(mask: np.ndarray, keep: np.int32, most: int) -> np.ndarray | None:
    """Flat indices of the pixels with bits in ``keep``; None if there are more than ``most``."""
    h, w = mask.shape
    chunk = max(1, (_FINISH_PIXELS << 2) // w)

    def find(start: int) -> np.ndarray | None:
        kept = mask[start : start + chunk] & keep
        if np.count_nonzero(kept) > most:
            return None
        found = np.flatnonzero(kept)
        found += start * w
        return found

    parts = thread_map(find, range(0, h, chunk))
    if any(part is None for part in parts) or sum(part.size for part in parts) > most:
        return None
    return np.concatenate(parts)


def _scatter_window(index_map: PixelMap, footprint, ny: int, nx: int):
    """Output pixels that may read an input pixel: offsets (x, y) from the first of them.

    The taps of an output at base b reach b - lo ... b + hi, so those reading input pixel p
    have u in [p - hi, p + lo + 1) (likewise v): the preimage of that box under the map.
    Returned as (offsets x, offsets y, corner x, corner y): the corner is the box's
    bounding corner relative to p's preimage, one pixel wider all round (more for a bent
    map, whose local Jacobian departs from its affine part). None: the map bends too much
    for a window (the direct path's strong bends), or the map is singular.
    """
    (lo_x, hi_x), (lo_y, hi_y) = footprint
    if abs(np.linalg.det(index_map.matrix)) < 1e-9:
        return None
    inverse = np.linalg.inv(index_map.matrix)
    box = np.array([[-hi_x, -hi_y], [lo_x + 1, -hi_y], [-hi_x, lo_y + 1], [lo_x + 1, lo_y + 1]])
    corners = box @ inverse.T
    margin = 1.0
    if not index_map.is_affine:
        # how far the local inverse Jacobian departs from the affine part's, over the box
        worst = 0.0
        for x in np.linspace(0, nx - 1, 9):
            for y in np.linspace(0, ny - 1, 9):
                local = np.linalg.inv(index_map.jacobian(x, y))
                worst = max(worst, float(np.abs(local - inverse).max()))
        margin += 2 * worst * float(np.abs(box).max(axis=0).sum())
        if margin > 4:
            return None
    first = corners.min(axis=0) - margin
    size = np.ceil(corners.max(axis=0) - corners.min(axis=0) + 2 * margin).astype(int) + 1
    offset_x, offset_y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    return offset_x.ravel(), offset_y.ravel(), float(first[0]), float(first[1])


def _scatter_mask(mask, keep, points, index_map: PixelMap, footprint, window, out) -> None:
    """OR each input pixel's bits in ``keep`` into the outputs whose taps reach it (in place).

    Candidates come from `_scatter_window` around the pixel's preimage; each is kept if its
    base index (computed as `_GridRows` does) lies in the pixel's tap box and in the input.
    """
    (lo_x, hi_x), (lo_y, hi_y) = footprint
    h, w = mask.shape
    ny, nx = out.shape
    offset_x, offset_y, first_x, first_y = window
    m, t = index_map.matrix, index_map.offset
    inverse = np.linalg.inv(m)
    flat_out = out.ravel()
    step = max(1, (1 << 16) // offset_x.size)  # 64k candidates a block: temporaries in cache
    for start in range(0, points.size, step):
        chunk = points[start : start + step]
        py, px = np.divmod(chunk, w)
        bits = mask.ravel()[chunk] & keep
        # where the map lands on each pixel: the affine inverse, then Newton for a bent map
        ox = inverse[0, 0] * (px - t[0]) + inverse[0, 1] * (py - t[1])
        oy = inverse[1, 0] * (px - t[0]) + inverse[1, 1] * (py - t[1])
        for _ in range(0 if index_map.is_affine else 3):
            u, v = index_map(ox, oy)
            ox = ox - (inverse[0, 0] * (u - px) + inverse[0, 1] * (v - py))
            oy = oy - (inverse[1, 0] * (u - px) + inverse[1, 1] * (v - py))
        cx = np.floor(ox + first_x)[:, None] + offset_x
        cy = np.floor(oy + first_y)[:, None] + offset_y
        # the same expression as _GridRows, so the same base index to the last bit
        u = m[0, 0] * cx + (m[0, 1] * cy + t[0])
        v = m[1, 0] * cx + (m[1, 1] * cy + t[1])
        if index_map.residual is not None:
            # a residual bends over hundreds of pixels: its Taylor expansion to second order
            # about the preimage holds to ~1e-8 px over the window (fitpack at every
            # candidate would cost 20x more)
            dx, dy = cx - ox[:, None], cy - oy[:, None]
            u += _taylor(index_map.residual[0], ox, oy, dx, dy)
            v += _taylor(index_map.residual[1], ox, oy, dx, dy)
        bu, bv = np.floor(u), np.floor(v)
        inside = (bu >= np.maximum(px - hi_x, 0)[:, None]) & (
            bu <= np.minimum(px + lo_x, w - 1)[:, None]
        )
        inside &= (bv >= np.maximum(py - hi_y, 0)[:, None]) & (
            bv <= np.minimum(py + lo_y, h - 1)[:, None]
        )
        inside &= (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny)
        index = (cy[inside] * nx + cx[inside]).astype(np.int64)
        np.bitwise_or.at(flat_out, index, np.broadcast_to(bits[:, None], inside.shape)[inside])


def _taylor(spline, x, y, dx, dy) -> np.ndarray:
    """``spline`` (built as f(y, x)) at (x + dx, y + dy) to second order about each (x, y).

    Beyond its knots the spline is constant (fitpack clamps the points): points and
    centres are clamped alike, so the expansion is of the smooth part inside.
    """
    ty, tx, _ = spline.tck
    ky, kx = spline.degrees
    x_range, y_range = (tx[kx], tx[-kx - 1]), (ty[ky], ty[-ky - 1])
    cx, cy = np.clip(x, *x_range), np.clip(y, *y_range)
    dx = np.clip(x[:, None] + dx, *x_range) - cx[:, None]
    dy = np.clip(y[:, None] + dy, *y_range) - cy[:, None]
    x, y = cx, cy

    def ev(order_y: int, order_x: int) -> np.ndarray:
        return spline.ev(y, x, dx=order_y, dy=order_x)[:, None]

    out = ev(0, 0) + ev(0, 1) * dx + ev(1, 0) * dy
    out += (0.5 * ev(0, 2)) * dx * dx + ev(1, 1) * dx * dy + (0.5 * ev(2, 0)) * dy * dy
    return out


def _gather_mask(mask, index_map: PixelMap, footprint, out) -> None:
    """Grow the bits over the footprint, then read them at every output's base (in place).

    ``mask`` may be of a narrower integer type than ``out`` (int32) when its bits fit.
    """
    ny, nx = out.shape
    # a pixel at base index b reads b - lo ... b + hi: OR the bits over that window
    grown = _or_dilate(mask, footprint[0], footprint[1])
    h, w = mask.shape
    # a zero border: bases off the input read 0 there (those pixels are NO_DATA anyway)
    padded = np.zeros((h + 2, w + 2), dtype=grown.dtype)
    padded[1:-1, 1:-1] = grown
    if index_map.is_affine and np.array_equal(index_map.matrix, np.eye(2)):
        # a shift: base index = output index + floor(offset), as _warp_translation takes it
        sx, sy = (int(s) for s in np.floor(index_map.offset))
        x0, x1 = max(0, -sx - 1), min(nx, w + 1 - sx)
        y0, y1 = max(0, -sy - 1), min(ny, h + 1 - sy)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = padded[y0 + sy + 1 : y1 + sy + 1, x0 + sx + 1 : x1 + sx + 1]
        return
    flat = padded.ravel()
    on_grid = _GridRows(index_map, np.arange(nx, dtype=np.float64))
    # a few cheap ops a pixel; a bent map's residual costs ~0.5 ms of set-up a block
    chunk = max(1, (_CHUNK_PIXELS if index_map.is_affine else _FINISH_PIXELS << 2) // nx)

    def block(start: int) -> None:
        ys = np.arange(start, min(start + chunk, ny), dtype=np.float64)
        u, v = on_grid(ys)
        np.floor(u, out=u)
        np.floor(v, out=v)
        np.clip(u, -1, w, out=u)
        np.clip(v, -1, h, out=v)
        v += 1
        v *= w + 2
        v += u
        v += 1
        if flat.dtype == out.dtype:
            flat.take(v.astype(np.int64), out=out[start : start + len(ys)])
        else:
            out[start : start + len(ys)] = flat.take(v.astype(np.int64))

    _in_parallel(block, range(0, ny, chunk))


# --------------------------------------------------------------------------- noise
def _tap_matrix(index_map: PixelMap, xs: np.ndarray, ys: np.ndarray):
    """Interpolation weights of output pixels (ys x xs) on input pixels, as the warp applies them.

    Returns a sparse matrix (n_out, n_in) over a local input window, so W W^T is
    the covariance the warp gives white unit-variance input noise.
    """
    if index_map.is_affine:
        # the two-pass weights: rows j_l of pass 2, then the row positions of pass 1
        transpose, flip_x, flip_y, m, t = _dihedral(index_map.matrix, index_map.offset, (1, 1))
        (a, b), (d, e) = m
        alpha = (a * e - b * d) / e
        gx, gy = np.meshgrid(xs, ys)
        v = d * gx + e * gy + t[1]
        bv = np.floor(v)
        wv = tabulated_weights(v - bv)
        rows_l = bv[None] + np.arange(1 - _ORDER, _ORDER + 1)[:, None, None]
        u = alpha * gx[None] + (b / e) * (rows_l - t[1]) + t[0]
        bu = np.floor(u)
        wu = tabulated_weights(u - bu)  # (6 cols, 6 rows, ny, nx)
        cols = bu[None] + np.arange(1 - _ORDER, _ORDER + 1)[:, None, None, None]
        rows = np.broadcast_to(rows_l[None], cols.shape)
        weights = wu * wv[None]
    else:
        u, v = index_map.on_grid(xs, ys)
        bu, bv = np.floor(u), np.floor(v)
        wu, wv = tabulated_weights(u - bu), tabulated_weights(v - bv)
        offsets = np.arange(1 - _ORDER, _ORDER + 1)
        cols = np.broadcast_to(bu[None, None] + offsets[:, None, None, None], (6, 6) + u.shape)
        rows = np.broadcast_to(bv[None, None] + offsets[None, :, None, None], (6, 6) + u.shape)
        weights = wu[:, None] * wv[None, :]
    n_out = len(xs) * len(ys)
    out_index = np.broadcast_to(np.arange(n_out).reshape(len(ys), len(xs)), weights.shape)
    cols, rows = cols.astype(np.int64), rows.astype(np.int64)
    cols -= cols.min()
    rows -= rows.min()
    width = int(cols.max()) + 1
    in_index = rows * width + cols
    return sparse.csr_matrix(
        (weights.ravel().astype(np.float64), (out_index.ravel(), in_index.ravel())),
        shape=(n_out, int(in_index.max()) + 1),
    )


def warp_noise_correlation(
    pixel_map: PixelMap, shape: tuple[int, int], xy0=(0, 0), radius: int = 5, patch: int = 24
) -> np.ndarray:
    """Normalised autocorrelation of white input noise after the warp.

    The covariance of output pixels is W W^T for the warp's interpolation
    weights W; it is averaged over offsets on a ``patch`` x ``patch`` block at
    the centre of the output grid (the sampling phase varies across a rotated
    or scaled grid, so this is the mean over phases) and divided by its value
    at zero offset. For a pure translation by (fx, fy) it is the product of
    the autocorrelations of the two 1-D Lanczos weight sequences.

    Parameters
    ----------
    pixel_map : `PixelMap`
        Output parent pixel -> input parent pixel.
    shape : (ny, nx)
        Output size; xy0 its origin.
    radius : int
        Half-size of the returned array.

    Returns
    -------
    correlation : `numpy.ndarray` (2 radius + 1, 2 radius + 1), float64, centre 1
    """
    ny, nx = shape
    n = min(patch, ny, nx)
    x0 = xy0[0] + (nx - n) // 2
    y0 = xy0[1] + (ny - n) // 2
    xs = np.arange(x0, x0 + n, dtype=np.float64)
    ys = np.arange(y0, y0 + n, dtype=np.float64)
    if not pixel_map.is_affine and _gently_bent(pixel_map, ny, nx, xy0):
        # resampled by the two passes: locally the affine map tangent at the patch centre
        xc, yc = x0 + (n - 1) / 2.0, y0 + (n - 1) / 2.0
        tangent = pixel_map.jacobian(xc, yc)
        uc, vc = pixel_map(xc, yc)
        pixel_map = PixelMap.affine(tangent, np.array([uc, vc]) - tangent @ np.array([xc, yc]))
    weights = _tap_matrix(pixel_map, xs, ys)
    cov = (weights @ weights.T).toarray().reshape(n, n, n, n)
    size = 2 * radius + 1
    out = np.zeros((size, size))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if abs(dx) >= n or abs(dy) >= n:
                continue
            y1, y2 = max(0, -dy), min(n, n - dy)
            x1, x2 = max(0, -dx), min(n, n - dx)
            a = np.arange(y1, y2)[:, None], np.arange(x1, x2)[None, :]
            out[dy + radius, dx + radius] = cov[a[0], a[1], a[0] + dy, a[1] + dx].mean()
    return out / out[radius, radius]


# --------------------------------------------------------------------------- PSF
class WarpedPsf(Psf):
    """The input's PSF seen on the output grid, smoothed by the same Lanczos-3 interpolant.

    At output position (x, y) the input PSF stamp at the mapped position is
    resampled through the local linear map (the map's Jacobian), then
    renormalised to unit sum.

    Parameters
    ----------
    psf : `Psf`
        PSF of the input, in input parent coordinates.
    pixel_map : `PixelMap`
        Output parent pixel -> input parent pixel.
    centre : (float, float)
        Output position used when none is given (the output box centre).
    """

    def __init__(self, psf: Psf, pixel_map: PixelMap, centre: tuple[float, float]):
        self.psf = psf
        self.pixel_map = pixel_map
        self.average_position = centre

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        if x is None or y is None:
            x, y = self.average_position  # type: ignore[misc]
        u, v = self.pixel_map(x, y)
        stamp = np.asarray(self.psf.kernel_image(float(u), float(v)), dtype=np.float32)
        jac = self.pixel_map.jacobian(float(x), float(y))
        n = stamp.shape[0]
        # output stamp wide enough to hold the input stamp seen through J^-1
        stretch = float(np.linalg.norm(np.linalg.inv(jac), 2))
        size = int(math.ceil(n * stretch))
        size += 1 - size % 2
        # zeros around the stamp: the wings fall to zero there, and the taps stay in data
        margin = size // 2 + _TAPS
        stamp = np.pad(stamp, margin)
        half, half_in = size // 2, n // 2 + margin
        # centre maps to centre: u = J (x - half) + half_in in stamp indices
        offset = np.array([half_in, half_in], dtype=np.float64) - jac @ np.array([half, half])
        warped, _, _ = _warp_affine(stamp, np.zeros_like(stamp), jac, offset, size, size)
        warped = np.where(np.isfinite(warped), warped, 0.0).astype(np.float64)
        total = warped.sum()
        if not np.isfinite(total) or total <= 0:
            raise PsfError("the warped PSF stamp has no positive flux")
        return warped / total

    def __repr__(self) -> str:
        return f"WarpedPsf({self.psf!r})"
