"""Convolution of exposures by fixed or spatially varying kernels (the hot path).

A spatial kernel of Chebyshev order o is K(X, Y) = sum_t T_t(x', y') K_t with
(o+1)(o+2)/2 fixed images K_t, so the convolved image is that many full-frame
correlations weighted pixelwise by the (separable) Chebyshev terms (decision 6),
and the variance, which needs K^2 = sum_{t,l} T_t T_l K_t K_l, is
n(n+1)/2 more. Each correlation is an FFT over overlapping tiles (256 px and up)
that share one set of kernel transforms, run on a thread pool, in float32 unless a
plane's dynamic range would let round-off leak (then float64); terms whose x weights
are equal share their inverse transform along x (the weights are separable).

Semantics follow algorithm.md sections 0.2 and 5.3: correlation (no kernel flip),
variance by the squared kernel, every mask bit OR'ed over the kernel footprint,
and a border of kernel half-width that cannot be computed (copied and flagged
EDGE, or set to NaN / NO_DATA / inf).

Non-finite pixels: an FFT would spread one NaN over the whole tile, so
non-finite inputs are replaced by 0 for the transform and every output pixel
whose kernel footprint (the full kernel box) touches one is set to NaN (image)
or NaN/inf (variance), as a direct sum would give.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import scipy.fft as sfft

from . import order
from .dilation import or_filter
from .exposure import DeferredPlane, Exposure
from .kernel import SpatialKernel, term_degrees
from .parallel import frame_array, n_threads, thread_map
from .stamps import windows

__all__ = ["convolve_exposure", "correlate_image", "correlate_finite_rows", "or_filter"]

# Frames whose side plus kernel margins fits this are one transform (no tiles).
_TILE_FFT = 512
# Smallest tile FFT length (powers of two: the fastest transform sizes). Small tiles
# keep each transform's buffers in cache: a 256^2 float32 rfft2/irfft2 pair costs
# ~0.6x per pixel what a 512^2 one does; the margins they repeat grow instead, so the
# length doubles until the overlap is at most a quarter of the tile.
_TILE_MIN = 256
# float32 FFT round-off on each output pixel is ~1e-7 x the rms of its tile, and one
# pixel R times the typical value |median| makes that rms ~R/512 typical in a 512^2 tile.
# Past these ratios the plane is transformed in float64: the error stays below ~2e-5
# of the typical variance, and below ~2e-3 of the typical image value (~ the noise).
_MAX_FLOAT32_RANGE_VARIANCE = 1.0e5
_MAX_FLOAT32_RANGE_IMAGE = 1.0e7


def _workers(workers: int | None) -> int:
    return n_threads(workers)


def _axis_plan(n: int, h: int, tile_fft: int) -> tuple[int, list[tuple[int, int]]]:
    """FFT length and core ranges of the tiles along one axis."""
    if n + 2 * h <= tile_fft:
        return sfft.next_fast_len(n + 2 * h, real=True), [(0, n)]
    length = _TILE_MIN
    while 2 * h > length // 4:  # keep the overlap at most a quarter of the tile
        length *= 2
    core = length - 2 * h
    return length, [(start, min(start + core, n)) for start in range(0, n, core)]


def _kernel_transform(kernel: np.ndarray, shape: tuple[int, int], dtype) -> np.ndarray:
    """rFFT of k_pad with k_pad(w) = K(-w), so circular convolution with it correlates with K."""
    ky, kx = kernel.shape
    pad = np.zeros(shape, dtype=dtype)
    pad[:ky, :kx] = kernel[::-1, ::-1]
    pad = np.roll(pad, (-(ky // 2), -(kx // 2)), axis=(0, 1))
    return sfft.rfft2(pad)


def _correlate_weighted(
    data: np.ndarray,
    kernels: np.ndarray,
    wx: np.ndarray | None,
    wy: np.ndarray | None,
    *,
    workers: int | None,
    dtype=np.float32,
    tile_fft: int = _TILE_FFT,
) -> np.ndarray:
    """sum_t wy[t, Y] wx[t, X] * correlate(data, kernels[t])(X, Y), zero outside the frame.

    Terms that share their x weights share the inverse transform along x: each one's
    product spectrum is inverted along y (c2c), cropped to the tile's core rows,
    weighted by its y weights and summed, and the sum inverted along x once (the
    weights are separable). A group of one term takes the plain 2-D inverse.

    Frames tiled along both axes go a few tiles of a band of rows per transform call
    (`_correlate_bands`: a 4096 x 4096 frame, one kernel, two threads 183 -> 113 ms; the
    convolve stage of a 4096 auto subtraction 0.50-0.59 -> 0.40-0.42 s); their lengths
    are powers of two, so its inverse along y then x (kept rows only) gives the 2-D
    inverse's values exactly. Smaller frames keep the per-tile loop (one transform of
    any fast length along an axis).

    Parameters
    ----------
    data : (ny, nx) finite array
    kernels : (m, ky, kx) odd kernels
    wx, wy : (m, nx), (m, ny) separable weights, or None for unit weights
    """
    ny, nx = data.shape
    m, ky, kx = kernels.shape
    hy, hx = ky // 2, kx // 2
    py, rows = _axis_plan(ny, hy, tile_fft)
    px, cols = _axis_plan(nx, hx, tile_fft)
    transforms = np.stack([_kernel_transform(k, (py, px), dtype) for k in kernels])
    if wx is not None:
        assert wy is not None  # the weights come in pairs
        wx, wy = wx.astype(dtype), wy.astype(dtype)
    # terms with the same x weights
    groups = _equal_rows(wx) if wx is not None else [list(range(m))]
    if len(rows) > 1 and len(cols) > 1:

        def read(band: slice, part: np.ndarray) -> None:
            np.copyto(part, data[band], casting="unsafe")

        terms = _Terms(transforms, groups, wx, wy, (hy, hx), (py, px), nx)
        out = _correlate_bands(data.shape, read, terms, workers=workers)
        assert out is not None
        return out
    # factors equal to 1 everywhere (T0 along that axis) need no multiplication
    unit_x, unit_y = [True] * m, [True] * m
    if wx is not None:
        assert wy is not None
        unit_x = [bool(np.all(wx[t] == 1)) for t in range(m)]
        unit_y = [bool(np.all(wy[t] == 1)) for t in range(m)]
    out = frame_array((ny, nx), dtype)  # every tile writes its core
    tiles = [(r, c) for r in rows for c in cols]
    n_threads = min(_workers(workers), len(tiles))
    fft_workers = 1 if n_threads > 1 else _workers(workers)

    def run(tile):
        (y0, y1), (x0, x1) = tile
        # input rows y0-hy .. y1+hy-1 (zero outside the frame) go to buffer rows 0..
        in_y0, in_y1 = max(y0 - hy, 0), min(y1 + hy, ny)
        in_x0, in_x1 = max(x0 - hx, 0), min(x1 + hx, nx)
        buffer = np.zeros((py, px), dtype=dtype)
        oy, ox = in_y0 - (y0 - hy), in_x0 - (x0 - hx)
        buffer[oy : oy + in_y1 - in_y0, ox : ox + in_x1 - in_x0] = data[in_y0:in_y1, in_x0:in_x1]
        spectrum = sfft.rfft2(buffer, workers=fft_workers)
        acc = out[y0:y1, x0:x1]  # tiles do not overlap in the output: safe across threads
        product = np.empty_like(spectrum)
        first = True
        for group in groups:
            if len(group) == 1:
                (t,) = group
                np.multiply(spectrum, transforms[t], out=product)
                full = sfft.irfft2(product, s=(py, px), workers=fft_workers, overwrite_x=True)
                core = full[hy : hy + y1 - y0, hx : hx + x1 - x0]
                if not unit_y[t]:
                    assert wy is not None
                    core *= wy[t, y0:y1, np.newaxis]
            else:
                rows_sum = None
                for t in group:
                    np.multiply(spectrum, transforms[t], out=product)
                    # the first term's inverse is kept: it may not overwrite `product`
                    part = sfft.ifft(
                        product, axis=0, workers=fft_workers, overwrite_x=rows_sum is not None
                    )[hy : hy + y1 - y0]
                    if not unit_y[t]:
                        assert wy is not None
                        part *= wy[t, y0:y1, np.newaxis]
                    if rows_sum is None:
                        rows_sum = part
                    else:
                        rows_sum += part
                core = sfft.irfft(rows_sum, n=px, axis=1, workers=fft_workers)
                core = core[:, hx : hx + x1 - x0]
            if not unit_x[group[0]]:
                assert wx is not None
                core *= wx[group[0], np.newaxis, x0:x1]
            if first:
                acc[...] = core
                first = False
            else:
                acc += core

    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(run, tiles))
    else:
        for tile in tiles:
            run(tile)
    return out


class _Terms:
    """Kernel terms of a correlation in (py, px) overlap-save tiles: their transforms, the
    groups of terms sharing x weights (`_equal_rows`), and each term's separable weights
    (None where its factor is 1 along that axis; x weights 0-padded to whole tiles)."""

    def __init__(self, transforms, groups, wx, wy, h: tuple[int, int], tile: tuple[int, int], nx):
        self.transforms, self.groups = transforms, groups
        self.hy, self.hx = h
        self.py, self.px = tile
        self.core_y, self.core_x = self.py - 2 * self.hy, self.px - 2 * self.hx
        self.dtype = transforms.real.dtype
        m = len(transforms)
        self.wx: list[np.ndarray | None] = [None] * m
        self.wy: list[np.ndarray | None] = [None] * m
        if wx is None:
            return
        width = -(-nx // self.core_x) * self.core_x
        for t in range(m):
            if not np.all(wx[t] == 1):
                padded = np.zeros(width, dtype=wx.dtype)
                padded[:nx] = wx[t]
                self.wx[t] = padded
            if not np.all(wy[t] == 1):
                self.wy[t] = wy[t]


def correlate_rows(
    shape: tuple[int, int],
    read: Callable[[slice, np.ndarray], None],
    kernel: np.ndarray,
    tile: int = _TILE_MIN,
    write: Callable[[slice, np.ndarray], None] | None = None,
    workers: int | None = None,
) -> np.ndarray | None:
    """float32 correlation with ``kernel`` (0 off the frame) of the frame whose rows
    ``read(rows, part)`` writes into ``part`` (float32, (rows, nx), every value), in overlap-save
    tiles: a band of tile rows is padded once and its tiles transformed in one batch
    (one call per band rather than per tile), bands on the thread pool.

    Returns the correlated frame, or None when each band's rows are handed to
    ``write(rows, values)`` instead (in the band's thread; ``values`` is scratch)."""
    h = kernel.shape[0] // 2
    while 2 * h > tile // 4:  # the overlap at most a quarter of the tile, as `_axis_plan`
        tile *= 2
    transform = _kernel_transform(kernel, (tile, tile), np.float32)[np.newaxis]
    terms = _Terms(transform, [[0]], None, None, (h, h), (tile, tile), shape[1])
    return _correlate_bands(shape, read, terms, write, workers)


def _correlate_bands(shape, read, terms: _Terms, write=None, workers=None):
    """`correlate_rows` of the weighted terms ``terms`` (see `_correlate_weighted`)."""
    ny, nx = shape
    hy, hx, py, px = terms.hy, terms.hx, terms.py, terms.px
    core_y, core_x = terms.core_y, terms.core_x
    nty, ntx = -(-ny // core_y), -(-nx // core_x)
    out = frame_array((ny, nx), terms.dtype) if write is None else None

    def band(r: int) -> None:
        y0 = r * core_y
        rows = slice(max(y0 - hy, 0), min(y0 + core_y + hy, ny))
        r0, r1 = rows.start - (y0 - hy), rows.stop - (y0 - hy)
        # ``read`` writes the frame's part whole: only the margins around it are zeroed
        # (a zeroed buffer wrote every band's ~4 MB twice)
        buffer = np.empty((py, ntx * core_x + 2 * hx), dtype=terms.dtype)
        buffer[:r0] = 0
        buffer[r1:] = 0
        buffer[r0:r1, :hx] = 0
        buffer[r0:r1, hx + nx :] = 0
        read(rows, buffer[r0:r1, hx : hx + nx])
        tiles = np.lib.stride_tricks.sliding_window_view(buffer, px, axis=1)[:, ::core_x]
        y1 = min(y0 + core_y, ny)
        if out is None:
            assert write is not None
            kept = _correlate_tiles(tiles, terms, y0, y1, 0)
            write(slice(y0, y1), kept.reshape(y1 - y0, ntx * core_x)[:, :nx])
            return
        # a few tiles at a time (`_TILES_AT_ONCE`)
        for t0 in range(0, ntx, _TILES_AT_ONCE):
            t1 = min(t0 + _TILES_AT_ONCE, ntx)
            kept = _correlate_tiles(tiles[:, t0:t1], terms, y0, y1, t0)
            # the tiles' kept columns straight into the frame (no joined copy first)
            x0, x1 = t0 * core_x, min(t1 * core_x, nx)
            whole = (x1 - x0) // core_x
            into = out[y0:y1, x0 : x0 + whole * core_x].reshape(y1 - y0, whole, core_x)
            np.copyto(into, kept[:, :whole])
            if x0 + whole * core_x < x1:
                out[y0:y1, x0 + whole * core_x : x1] = kept[:, whole, : x1 - x0 - whole * core_x]

    thread_map(band, range(nty), workers)
    return out


#: Tiles of a `correlate_rows` band transformed together: two 256-px tiles' spectra
#: (~0.5 MB) stay in a core's cache through the four passes over them, where a whole
#: band's (18 tiles at 4096) went through memory each time (numerator, 4096 auto pair:
#: one thread 146 -> 126 ms, two threads 102 -> 89 ms wall, medians of 15).
_TILES_AT_ONCE = 2


def _correlate_tiles(tiles, terms: _Terms, y0: int, y1: int, first: int) -> np.ndarray:
    """Correlated kept part (rows, tiles, core_x) of a band's tiles ((py, m, px) view, the
    first one the band's tile ``first``): per group of terms sharing x weights, each
    term's product spectrum inverted along y for the kept rows, weighted along y and
    summed, the sum inverted along x and weighted along x. Each tile's transforms are
    its own, so any grouping of tiles gives the same values."""
    hy, hx, core_x = terms.hy, terms.hx, terms.core_x
    spectrum = sfft.rfft2(tiles.transpose(1, 0, 2), workers=1)
    alone = len(terms.transforms) == 1
    total = None
    for group in terms.groups:
        summed = None
        for t in group:
            if alone:  # the only use of the spectrum
                spectrum *= terms.transforms[t]
                product = spectrum
            else:
                product = spectrum * terms.transforms[t]
            part = sfft.ifft(product, axis=1, workers=1, overwrite_x=True)[:, hy : hy + y1 - y0]
            weight = terms.wy[t]
            if weight is not None and len(group) > 1:
                part *= weight[y0:y1, np.newaxis]
            if summed is None:
                summed = part
            else:
                summed += part
        values = sfft.irfft(summed, n=terms.px, axis=2, workers=1)[:, :, hx : hx + core_x]
        weight = terms.wy[group[0]]
        if weight is not None and len(group) == 1:  # a lone term: on its real values
            values *= weight[y0:y1, np.newaxis]
        weight = terms.wx[group[0]]
        if weight is not None:
            columns = weight[first * core_x : (first + values.shape[0]) * core_x]
            values *= columns.reshape(values.shape[0], 1, core_x)
        if total is None:
            total = values
        else:
            total += values
    assert total is not None
    return total.transpose(1, 0, 2)


def _replace_bits(mask: np.ndarray, source: np.ndarray, bits) -> None:
    """mask = (mask & ~bits) | (source & bits) in place, without frame-sized temporaries."""
    bits = np.int32(bits)
    step = max(1, (1 << 20) // max(mask.shape[-1], 1))
    for y in range(0, mask.shape[0], step):
        rows = mask[y : y + step]
        rows &= ~bits
        rows |= source[y : y + step] & bits


def _dynamic_dtype(
    values: np.ndarray, max_range: float, extremes: tuple[float, float] | None = None
):
    """float32 unless one pixel dwarfs the typical one (its round-off would leak).

    ``extremes``: (max, min) of ``values`` when the caller has them.
    """
    if values.size == 0:
        return np.float32
    typical = float(order.median(np.abs(values[::7, ::7]), consume=True))
    high, low = extremes if extremes is not None else (float(values.max()), float(values.min()))
    peak = max(high, -low)
    if peak > max_range * max(typical, float(np.finfo(np.float32).tiny)):
        return np.float64
    return np.float32


def _kernel_parts(
    kernel: SpatialKernel | np.ndarray, exposure: Exposure
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Fixed images and separable pixel weights of a kernel over an exposure's pixels."""
    if isinstance(kernel, SpatialKernel):
        if not kernel.is_spatially_varying:
            return kernel.image()[np.newaxis], None, None
        images = kernel.spatial_images()
        xs, ys = exposure.pixel_grid()
        wx, wy = kernel.axis_terms(xs, ys)
        keep = _kept_terms(images)
        return images[keep], wx[keep], wy[keep]
    image = np.asarray(kernel, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0:
        raise ValueError(f"kernel image must be 2-D with odd sides, got shape {image.shape}")
    return image[np.newaxis], None, None


def _kept_terms(images: np.ndarray) -> np.ndarray:
    """Spatial terms whose image is not zero (the constant term always)."""
    keep = np.any(images != 0, axis=(1, 2))
    keep[0] = True
    return keep


def _squared_parts(images, wx, wy):
    """Images and weights of K^2 = sum_{t<=l} (2 - delta_tl) T_t T_l K_t K_l."""
    if wx is None:
        return images**2, None, None
    sq, sx, sy = [], [], []
    m = images.shape[0]
    for t in range(m):
        for s in range(t, m):
            sq.append((1.0 if t == s else 2.0) * images[t] * images[s])
            sx.append(wx[t] * wx[s])
            sy.append(wy[t] * wy[s])
    return np.array(sq), np.array(sx), np.array(sy)


def _squared_chebyshev_parts(kernel: SpatialKernel, exposure: Exposure):
    """Images and weights of K^2 grouped by Chebyshev products (exact, fewer terms).

    K^2 = sum_{t,l} T_t T_l K_t K_l, and T_a(x) T_c(x) = (T_{a+c}(x) + T_{|a-c|}(x)) / 2,
    so every product of two terms of total degree <= o is a sum of T_i(x') T_j(y')
    with i + j <= 2 o: (2o + 1)(2o + 2) / 2 correlations (15 for o = 2) instead of
    the n (n + 1) / 2 products (21), one inverse FFT fewer per tile for each saved.
    """
    images = kernel.spatial_images()
    keep = _kept_terms(images)
    degrees = [d for d, k in zip(term_degrees(kernel.order), keep, strict=True) if k]
    images = images[keep]
    groups: dict[tuple[int, int], np.ndarray] = {}
    m = images.shape[0]
    for t in range(m):
        for s in range(t, m):
            product = (1.0 if t == s else 2.0) * images[t] * images[s]
            (a, b), (c, d) = degrees[t], degrees[s]
            for i, wi in _chebyshev_product(a, c):
                for j, wj in _chebyshev_product(b, d):
                    if (i, j) in groups:
                        groups[(i, j)] = groups[(i, j)] + (wi * wj) * product
                    else:
                        groups[(i, j)] = (wi * wj) * product
    keys = sorted(groups)
    xs, ys = exposure.pixel_grid()
    tx, ty = kernel.axis_polynomials(xs, ys, 2 * kernel.order)
    return (
        np.array([groups[key] for key in keys]),
        np.array([tx[i] for i, _ in keys]),
        np.array([ty[j] for _, j in keys]),
    )


def _chebyshev_product(a: int, c: int) -> list[tuple[int, float]]:
    """T_a T_c as [(degree, weight), ...]."""
    if a == 0 or c == 0:
        return [(a + c, 1.0)]
    return [(a + c, 0.5), (abs(a - c), 0.5)]


def _correlate_plane(values, images, wx, wy, *, workers, max_range, dtype=None):
    """Correlate one plane, with the local non-finite handling of the module docstring.

    Returns the result and the boolean arrays of outputs touched by NaN and by +inf.
    """
    _, ky, kx = images.shape
    # max and min propagate NaN and show inf: finite extremes mean a finite plane (the
    # check and the dynamic range in the same two passes, no frame-sized boolean)
    extremes = (float(values.max()), float(values.min())) if values.size else (0.0, 0.0)
    all_finite = math.isfinite(extremes[0]) and math.isfinite(extremes[1])
    data = values
    if not all_finite:
        finite = np.isfinite(values)
        data = np.where(finite, values, 0.0).astype(values.dtype)
    if dtype is None:
        dtype = _dynamic_dtype(data, max_range, extremes if all_finite else None)
    out = _correlate_weighted(data, images, wx, wy, workers=workers, dtype=dtype)
    if all_finite:
        return out, None, None
    hy, hx = ky // 2, kx // 2
    touched_nan = or_filter(~finite & ~np.isposinf(values), hy, hx)
    touched_inf = or_filter(np.isposinf(values), hy, hx)
    return out, touched_nan, touched_inf


def correlate_image(
    image: np.ndarray, kernel: np.ndarray, *, workers: int | None = None, single: bool = False
) -> np.ndarray:
    """Correlate an image with a fixed kernel by FFT: out(X,Y) = sum K(u,v) in(X+u, Y+v).

    Same output shape as the input; pixels outside the frame count as zero
    (``scipy.ndimage.correlate(image, kernel, mode="constant")``). Non-finite input
    pixels make NaN every output whose kernel box touches them (+inf stays +inf
    when no NaN is involved).

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx)
    kernel : `numpy.ndarray` (ky, kx), odd sides; pixel (j, i) is offset (j - ky//2, i - kx//2)
    workers : int or None
        Threads for the FFTs (default: all cores).
    single : bool
        Transform float32 input in float32 whatever its dynamic range (for callers
        such as detection's matched filter whose output only meets a threshold).

    Returns
    -------
    out : `numpy.ndarray` (ny, nx), float32 for float32 input, else float64
    """
    image = np.asarray(image)
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {kernel.shape}")
    out_dtype = np.float32 if image.dtype == np.float32 else np.float64
    values = image.astype(out_dtype, copy=False)
    dtype = np.float64 if out_dtype == np.float64 else (np.float32 if single else None)
    out, touched_nan, touched_inf = _correlate_plane(
        values,
        kernel[np.newaxis],
        None,
        None,
        workers=workers,
        max_range=_MAX_FLOAT32_RANGE_IMAGE,
        dtype=dtype,
    )
    out = out.astype(out_dtype, copy=False)
    if touched_inf is not None:
        out[touched_inf] = np.inf
        out[touched_nan] = np.nan
    return out


def correlate_finite_rows(
    shape: tuple[int, int],
    read: Callable[[slice, np.ndarray], None],
    kernel: np.ndarray,
    write: Callable[[slice, np.ndarray], None] | None = None,
    workers: int | None = None,
) -> np.ndarray | None:
    """``correlate_image(frame, kernel, single=True)`` of a finite float32 frame whose
    rows ``read(rows, part)`` writes (as `correlate_rows`), the same values: in
    `correlate_rows`' bands when the frame is tiled along both axes (they then share
    its tiles), so no frame of the input is made; else of the frame read whole.
    ``write`` as in `correlate_rows` (None returned)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    ny, nx = shape
    ky, kx = kernel.shape
    if ky == kx and len(_axis_plan(ny, ky // 2, _TILE_FFT)[1]) > 1:
        if len(_axis_plan(nx, kx // 2, _TILE_FFT)[1]) > 1:
            return correlate_rows(shape, read, kernel, write=write, workers=workers)
    frame = np.empty(shape, dtype=np.float32)
    read(slice(0, ny), frame)
    out = correlate_image(frame, kernel, workers=workers, single=True)
    if write is None:
        return out
    write(slice(0, ny), out)
    return None


def convolve_exposure(
    exposure: Exposure,
    kernel: SpatialKernel | np.ndarray,
    *,
    preserve_planes=(),
    copy_edge: bool = True,
    workers: int | None = None,
    defer_variance: bool = False,
) -> Exposure:
    """Convolve an exposure (image, variance, mask) by a fixed or spatially varying kernel.

    The kernel at output pixel (X, Y) is evaluated at that pixel's parent position
    and applied as a correlation (algorithm.md 0.2). The input is not modified.

    Parameters
    ----------
    exposure : `core.exposure.Exposure`
    kernel : `core.kernel.SpatialKernel` or `numpy.ndarray` (ky, kx) with odd sides
    preserve_planes : iterable of str
        Mask planes that are not dilated: they keep exactly their input pixels (5.3).
    copy_edge : bool
        True: the border of kernel half-width keeps the input pixels and gets EDGE.
        False: there image = NaN, mask = NO_DATA, variance = +inf.
    workers : int or None
        Threads for the FFTs (default: all cores).
    defer_variance : bool
        Make the variance plane only when it is first read (`Exposure.defer_variance`);
        its stamps are made without it (`_ConvolvedVariance.stamps`). For a caller
        that may not need it: it costs about twice the image.

    Returns
    -------
    convolved : `core.exposure.Exposure`
        A copy with image, variance and mask replaced (float32 planes).
    """
    images, wx, wy = _kernel_parts(kernel, exposure)
    ky, kx = images.shape[1:]
    hy, hx = ky // 2, kx // 2
    ny, nx = exposure.shape
    planes = exposure.mask_planes.copy()

    image, nan_i, inf_i = _correlate_plane(
        exposure.image, images, wx, wy, workers=workers, max_range=_MAX_FLOAT32_RANGE_IMAGE
    )
    if nan_i is not None:
        image[nan_i | inf_i] = np.nan
    if isinstance(kernel, SpatialKernel) and wx is not None:
        sq_images, sq_wx, sq_wy = _squared_chebyshev_parts(kernel, exposure)
    else:
        sq_images, sq_wx, sq_wy = _squared_parts(images, wx, wy)
    variance_plane = _ConvolvedVariance(
        exposure.variance, sq_images, sq_wx, sq_wy, copy_edge, workers
    )
    variance = None if defer_variance else variance_plane.compute()

    preserved = np.int32(planes.get_bitmask(preserve_planes))
    original = exposure.mask
    # the bits present decide the work: no frame-sized temporaries when nothing dilates
    present = np.int32(np.bitwise_or.reduce(original, axis=None)) if original.size else 0
    dilating = np.int32(present & ~preserved)
    if dilating:
        mask = or_filter(original & dilating if present & preserved else original, hy, hx)
    else:
        mask = np.zeros(original.shape, dtype=original.dtype)

    # the border that cannot be computed
    for strip in _border((ny, nx), hy, hx):
        if copy_edge:
            image[strip] = exposure.image[strip]
            mask[strip] = original[strip] | np.int32(planes.value("EDGE"))
        else:
            image[strip] = np.nan
            mask[strip] = np.int32(planes.value("NO_DATA"))
    if preserved:
        # (mask & ~preserved) | (original & preserved), in place a block of rows at a time
        _replace_bits(mask, original, preserved)

    planes_out = {
        "image": image.astype(np.float32, copy=False),
        "mask": mask.astype(np.int32, copy=False),
        "mask_planes": planes,
        "metadata": copy.deepcopy(exposure.metadata),
    }
    if variance is None:
        deferred = DeferredPlane(variance_plane.compute, variance_plane.stamps)
        return exposure.replace_deferred(deferred, **planes_out)
    return replace(exposure, variance=variance, **planes_out)


class _ConvolvedVariance:
    """The variance plane of `convolve_exposure`: V correlated with the squared kernel
    (``images``, weights ``wx``, ``wy``), never negative, non-finite inputs spread over
    the kernel box, and the border of kernel half-width copied from V (``copy_edge``)
    or +inf. `compute` makes the frame; `stamps` makes stamps of it on their own."""

    def __init__(self, variance, images, wx, wy, copy_edge: bool, workers) -> None:
        self.variance, self.images, self.wx, self.wy = variance, images, wx, wy
        self.copy_edge, self.workers = copy_edge, workers
        # terms with the same x weights, summed before `stamps`' inverse along x
        self._x_groups = _equal_rows(wx) if wx is not None else [list(range(images.shape[0]))]

    def compute(self) -> np.ndarray:
        values = self.variance
        variance, nan_v, inf_v = _correlate_plane(
            values,
            self.images,
            self.wx,
            self.wy,
            workers=self.workers,
            max_range=_MAX_FLOAT32_RANGE_VARIANCE,
        )
        if nan_v is not None:
            variance[inf_v] = np.inf
            variance[nan_v] = np.nan
        # a variance is never negative; FFT round-off can dip just below 0 next to zeros
        np.maximum(variance, 0.0, out=variance)
        _, ky, kx = self.images.shape
        for strip in _border(values.shape, ky // 2, kx // 2):
            variance[strip] = values[strip] if self.copy_edge else np.inf
        return variance.astype(np.float32, copy=False)

    def stamps(self, cx: np.ndarray, cy: np.ndarray, half: int, fill: float) -> np.ndarray:
        """(n, 2h+1, 2h+1) stamps of `compute`'s frame centred on (cx, cy), ``fill`` off
        the frame: each from a window of V one kernel half-width wider, correlated by
        small FFTs (float32 as the frame's, float64 past the same dynamic range: equal
        to the frame's values to its round-off)."""
        values = self.variance
        ny, nx = values.shape
        m, ky, kx = self.images.shape
        hy, hx = ky // 2, kx // 2
        k = max(hy, hx)
        side, wide = 2 * half + 1, 2 * half + 1 + 2 * k
        cx = np.asarray(cx, dtype=np.intp).ravel()
        cy = np.asarray(cy, dtype=np.intp).ravel()
        # in the plane's precision (float32): widened only when the range needs it below
        data = windows(values, cy - half - k, cx - half - k, wide)
        finite = np.isfinite(data)
        all_finite = bool(finite.all())
        if not all_finite:
            posinf = np.isposinf(data)
            data[~finite] = 0.0
        # float32 transforms unless one pixel dwarfs the typical one (the frame's rule)
        dtype = _dynamic_dtype(data.reshape(-1, wide), _MAX_FLOAT32_RANGE_VARIANCE)
        data = data.astype(dtype, copy=False)
        # correlation = convolution with the flipped kernel, embedded in a (2k+1)^2 box
        box = np.zeros((m, 2 * k + 1, 2 * k + 1), dtype=dtype)
        box[:, k - hy : k + hy + 1, k - hx : k + hx + 1] = self.images
        length = sfft.next_fast_len(wide, real=True)
        spectra = sfft.rfft2(box[:, ::-1, ::-1], s=(length, length))
        data_spectra = sfft.rfft2(data, s=(length, length))
        offsets = np.arange(-half, half + 1)
        r, c = cy[:, None] + offsets, cx[:, None] + offsets  # the stamps' rows and columns
        rows, cols = np.clip(r, 0, ny - 1), np.clip(c, 0, nx - 1)
        out = np.zeros((cx.size, side, side), dtype=dtype)
        # per term the inverse along y (rows kept) times its y weights; then per group of
        # terms sharing x weights one inverse along x of the kept rows: at spatial order
        # 1, 6 terms in 3 groups (inverses 37 -> 23 ms at 4096) instead of 6 2-d inverses
        kept = slice(2 * k, 2 * k + side)
        # every term's y weights on the stamps' rows, gathered once: (m, n, side, 1)
        wy = None if self.wy is None else self.wy[:, rows].astype(dtype)[..., None]
        for group in self._x_groups:
            summed = None
            for t in group:
                term = sfft.ifft(data_spectra * spectra[t], axis=1, overwrite_x=True)[:, kept]
                if wy is not None:
                    term *= wy[t]
                summed = term if summed is None else summed + term
            part = sfft.irfft(summed, n=length, axis=2)[:, :, kept]
            if self.wx is not None:
                part *= self.wx[group[0]][cols].astype(dtype)[:, None, :]
            out += part
        if not all_finite:
            # any non-finite input in an output's kernel box: +inf if all are +inf, else NaN
            out[_box_any(~finite & ~posinf, half, k, hy, hx)] = np.nan
            touched_inf = _box_any(posinf, half, k, hy, hx)
            out[touched_inf & ~np.isnan(out)] = np.inf
        np.maximum(out, 0.0, out=out)
        out = out.astype(np.float32, copy=False)
        # the border copied from V (or +inf), and fill off the frame
        border = ((r < hy) | (r >= ny - hy))[:, :, None] | ((c < hx) | (c >= nx - hx))[:, None, :]
        if border.any():
            edge = windows(values, cy - half, cx - half, side).astype(np.float32)
            out[border] = edge[border] if self.copy_edge else np.inf
        off = ~(((r >= 0) & (r < ny))[:, :, None] & ((c >= 0) & (c < nx))[:, None, :])
        out[off] = fill
        return out


def _equal_rows(weights: np.ndarray) -> list[list[int]]:
    """Indices of ``weights``' rows grouped by equal values, in order of first row."""
    groups: list[list[int]] = []
    for t in range(weights.shape[0]):
        for group in groups:
            if np.array_equal(weights[group[0]], weights[t]):
                group.append(t)
                break
        else:
            groups.append([t])
    return groups


def _box_any(flags: np.ndarray, half: int, k: int, hy: int, hx: int) -> np.ndarray:
    """(n, 2h+1, 2h+1): whether any of ``flags`` (n, 2h+1+2k, same) lies in each
    output's (2hy+1) x (2hx+1) box (summed-area table)."""
    table = np.zeros((flags.shape[0], flags.shape[1] + 1, flags.shape[2] + 1))
    table[:, 1:, 1:] = flags.cumsum(axis=1).cumsum(axis=2)
    side = 2 * half + 1
    y0, x0 = k - hy, k - hx
    y1, x1 = y0 + 2 * hy + 1, x0 + 2 * hx + 1

    def corner(y: int, x: int) -> np.ndarray:
        return table[:, y : y + side, x : x + side]

    return (corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)) > 0


def _border(shape: tuple[int, int], hy: int, hx: int) -> list[tuple[slice, slice]]:
    """The border of half-widths (hy, hx) as four strips (cheaper than a boolean frame)."""
    ny, nx = shape
    return [
        np.s_[: min(hy, ny), :],
        np.s_[max(ny - hy, 0) :, :],
        np.s_[:, : min(hx, nx)],
        np.s_[:, max(nx - hx, 0) :],
    ]


def convolved_noise_correlation(
    correlation: np.ndarray | None, kernel_image: np.ndarray
) -> np.ndarray:
    """Normalised noise autocorrelation after convolving by ``kernel_image``.

    Noise with autocorrelation C, convolved by K, has autocorrelation C * (K star K)
    (the kernel's own autocorrelation); white input (None) gives K star K. The result
    is square with odd sides and 1 at the centre, as `Exposure.noise_correlation`
    expects, so a convolved product written to FITS states its true correlation
    instead of its input's.
    """
    from scipy.signal import fftconvolve

    k = np.asarray(kernel_image, dtype=np.float64)
    auto = fftconvolve(k, k[::-1, ::-1], mode="full")
    if correlation is not None:
        auto = fftconvolve(auto, np.asarray(correlation, dtype=np.float64), mode="full")
    side = max(auto.shape) | 1
    out = np.zeros((side, side))
    oy, ox = (side - auto.shape[0]) // 2, (side - auto.shape[1]) // 2
    out[oy : oy + auto.shape[0], ox : ox + auto.shape[1]] = auto
    centre = out[side // 2, side // 2]
    if not centre > 0:
        return np.ones((1, 1))
    out /= centre
    # keep the centred square that holds every lag above 1e-4 (a wide kernel's tails are 0)
    lags = np.argwhere(np.abs(out) >= 1e-4) - side // 2
    half = int(np.abs(lags).max()) if lags.size else 0
    c = side // 2
    return out[c - half : c + half + 1, c - half : c + half + 1]
