"""Footprints and peaks of a DIA S/N map computed only where it can pass the threshold.

The matched-filter S/N of a difference is (image (x) PSF) / sqrt(variance (x)
PSF^2). The numerator is one full-frame correlation; the denominator is not
needed on the whole frame: the squared kernel is non-negative, so on a block
of pixels the noise is at least the smallest variance within the kernel's
reach times the kernel's energy (the part of it inside the frame). Blocks
whose largest |numerator| stays below the threshold times that lower bound
cannot hold a pixel above threshold; only the others (a few per cent of a
difference: sources and star residuals) get the exact denominator, by small
batched FFTs. The renormalisation of the S/N by its empty-sky scatter is
measured on a fixed lattice of blocks (about `NOISE_SAMPLE_PIXELS` pixels),
computed exactly as well.

Connected candidate blocks (and every block inside their bounding
rectangle) are laid side by side, one zero pixel apart, on a small canvas
where footprints are labelled and peaks found by `core.detection`'s
routines. Outside the rectangles every pixel is below the threshold, so the
footprints, peaks and their S/N equal those of the whole-frame map. The
rectangles' blocks that are no candidate are computed only where a deblending
test could read them (`_Fillers`).

The PSF stamp is cropped to the box holding all but `KERNEL_ENERGY_LOSS` of
its squared sum: for a point source the matched-filter signal and its noise
both scale with that sum, so the S/N changes by about that fraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from . import order
from .convolve import correlate_rows
from .detection import _find_peaks, _footprint_pixels, _local_maxima
from .measure import _negative_side_sigma
from .parallel import frame_array, frame_zeros, n_threads, thread_map
from .saddles import prominent
from .stamps import windows as _patches

__all__ = [
    "KERNEL_ENERGY_LOSS",
    "NOISE_SAMPLE_PIXELS",
    "crop_kernel",
    "Peaks",
    "sparse_peaks",
    "DifferenceSnr",
    "prepare_difference",
    "matched_numerator",
    "prepare_score",
    "block_size",
    "block_extremes",
]

#: Fraction of the squared PSF stamp left out of the matched filter by cropping.
KERNEL_ENERGY_LOSS = 1e-6
#: Pixels (every k-th row) whose variances give `prepare_difference` its fill value, a
#: level for the few unusable pixels: 4096 auto pair 1392.744 from 2^18 of them, 1392.751
#: from a million, whose sampling and median took 11 ms of its 45 ms preparation.
_FILL_SAMPLE = 1 << 18
#: Pixels (in whole blocks on a fixed lattice) whose S/N measures the noise factor.
NOISE_SAMPLE_PIXELS = 2**21


def crop_kernel(
    kernel: np.ndarray, loss: float = KERNEL_ENERGY_LOSS, min_half: int = 0
) -> np.ndarray:
    """The smallest centred square of ``kernel`` holding all but the fraction ``loss`` of
    its sum of squares, of half-width ``min_half`` at least (as far as the kernel
    reaches); a kernel with no power is returned whole."""
    k2 = np.asarray(kernel, dtype=np.float64) ** 2
    total = k2.sum()
    c = kernel.shape[0] // 2
    if not total > 0:
        return kernel
    # energy inside the centred square of half-width h, for every h at once
    ring = np.maximum(
        np.abs(np.arange(kernel.shape[0]) - c)[:, None],
        np.abs(np.arange(kernel.shape[1]) - kernel.shape[1] // 2)[None, :],
    )
    inside = np.cumsum(np.bincount(ring.ravel(), weights=k2.ravel()))
    half = max(int(np.searchsorted(inside, (1.0 - loss) * total)), min_half)
    half = min(half, c, kernel.shape[1] // 2)
    cx = kernel.shape[1] // 2
    return kernel[c - half : c + half + 1, cx - half : cx + half + 1]


def block_size(half: int) -> int:
    """Block side: at least the kernel's width, so the FFT padding stays under ~4x."""
    size = 32
    while size < 2 * half:
        size *= 2
    return size


class Peaks:
    """Peaks of both signs, in the order of ``core.detection`` on the whole frame.

    Attributes: ``col``, ``row``, ``sign``, ``footprint`` (numbered in raster order
    of their first pixel, negative footprints after the positive ones),
    ``n_peaks``, ``value`` (|S/N| at the peak); ``merged`` (2, m): column and row of
    the local maxima the saddle test (`core.saddles`) folded into a brighter peak.
    """

    def __init__(self, col, row, sign, footprint, n_peaks, value, merged=None):
        self.col, self.row, self.sign = col, row, sign
        self.footprint, self.n_peaks, self.value = footprint, n_peaks, value
        self.merged = np.zeros((2, 0), dtype=int) if merged is None else merged


def _grid_blocks(shape: tuple[int, int], size: int) -> tuple[int, int]:
    return -(-shape[0] // size), -(-shape[1] // size)


def _groups(candidate: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """Labels (block grid) of the 8-connected groups of candidate blocks and their
    bounding rectangles (block slices)."""
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    return labels, [b for b in ndimage.find_objects(labels) if b is not None]


def _pack(heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Shelf packing of rectangles with a one-pixel gap after each: origins and canvas size."""
    width = int(max(widths.max() + 1, math.isqrt(int(((heights + 1) * (widths + 1)).sum())) + 1))
    ys = np.zeros(heights.size, dtype=int)
    xs = np.zeros(heights.size, dtype=int)
    y = x = shelf = 0
    for k in np.argsort(-heights, kind="stable"):
        if x + widths[k] + 1 > width:
            y, x, shelf = y + shelf, 0, 0
        ys[k], xs[k] = y + 1, x + 1
        x += widths[k] + 1
        shelf = max(shelf, heights[k] + 1)
    return ys, xs, y + shelf + 1, width + 1


def _rectangle_blocks(rects: list[tuple[slice, slice]]) -> np.ndarray:
    """(k, 3) rectangle index, block row and block column of every block of every
    rectangle, rectangle by rectangle, each in raster order (a block shared by
    rectangles once per rectangle)."""
    rows = np.array([(r[0].start, r[0].stop, r[1].start, r[1].stop) for r in rects], dtype=int)
    high, wide = rows[:, 1] - rows[:, 0], rows[:, 3] - rows[:, 2]
    count = high * wide
    rect = np.repeat(np.arange(len(rects)), count)
    # each block's rank inside its rectangle, split into row and column
    rank = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    j, m = np.divmod(rank, wide[rect])
    return np.column_stack([rect, rows[rect, 0] + j, rows[rect, 2] + m])


class _Owner:
    """The rectangle of `_pack`'s canvas pixels that lie in one: (rows, cols) -> indices.
    Each shelf's rectangles share their top row, so a pixel's is the last rectangle
    starting at or before it on the last shelf starting at or above it."""

    def __init__(self, cy0: np.ndarray, cx0: np.ndarray, cnx: int) -> None:
        self.shelves = np.unique(cy0)
        self.width = cnx + 1
        key = cy0 * self.width + cx0
        self.order = np.argsort(key, kind="stable")
        self.keys = key[self.order]

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        top = self.shelves[np.searchsorted(self.shelves, rows, side="right") - 1]
        at = np.searchsorted(self.keys, top * self.width + cols, side="right") - 1
        return self.order[at]


class _Fillers:
    """The blocks of `sparse_peaks`' rectangles that are no candidate, held at -inf on
    the canvas until their S/N can matter.

    Footprints (pixels >= threshold) and local maxima (a footprint pixel against its
    neighbours, which are below it when outside the footprint) are the same for any
    value below the threshold there. Only the prominence test of a secondary peak
    reads values between pixels (bilinearly, on a line inside its footprint's
    bounding box): for footprints with two or more local maxima in 3 x 3 boxes (a
    superset of `_find_peaks`' candidates), the filler blocks of every rectangle
    their box, one pixel wider, touches get their exact S/N first. The saddle test
    after it (`core.saddles`) reads footprint pixels only.
    """

    def __init__(self, canvas, owner, rects, placement, blocks, size: int, snr_blocks):
        """``blocks`` (k, 3): rectangle, block row and block column of each filler;
        ``placement``: `sparse_peaks`' canvas origins and sizes of the rectangles;
        ``owner``: its `_Owner`."""
        self.canvas, self.owner, self.rects, self.size = canvas, owner, rects, size
        self.placement, self.snr_blocks = placement, snr_blocks
        self.pending: dict[int, list[tuple[int, int]]] = {}
        for i, j, m in blocks.tolist():
            self.pending.setdefault(i, []).append((j, m))

    def _where(self, i: int, j: int, m: int) -> tuple[slice, slice]:
        """Canvas pixels of block (j, m) of rectangle i (cut by the frame's far edges)."""
        cy0, cx0, heights, widths = self.placement
        rows, cols = self.rects[i]
        s = self.size
        y, x = (j - rows.start) * s, (m - cols.start) * s
        h, w = min(s, heights[i] - y), min(s, widths[i] - x)
        return slice(cy0[i] + y, cy0[i] + y + h), slice(cx0[i] + x, cx0[i] + x + w)

    def draw_near_deblending(
        self, pixels: np.ndarray, labels: np.ndarray, maxima: np.ndarray, sign: int
    ) -> None:
        """Exact S/N (times ``sign``, the canvas's) of the fillers a prominence line of
        the footprints could read; ``pixels`` (sorted flat indices) and ``labels``
        (1..n) are the footprints' pixels, ``maxima`` those that are the maximum of
        their 3 x 3 box (sorted flat indices)."""
        if not self.pending:
            return
        nx = self.canvas.shape[1]
        flat = np.searchsorted(pixels, maxima)
        count = np.bincount(labels[flat], minlength=int(labels.max()) + 1)
        of_multi = count[labels] >= 2
        if not of_multi.any():
            return
        # bounding boxes of those footprints, from their pixels
        multi, index = np.unique(labels[of_multi], return_inverse=True)
        prow, pcol = np.divmod(pixels[of_multi], nx)
        box = np.empty((4, multi.size), dtype=np.int64)
        box[0], box[2] = np.iinfo(np.int64).max, np.iinfo(np.int64).max
        box[1], box[3] = -1, -1
        np.minimum.at(box[0], index, prow)
        np.maximum.at(box[1], index, prow)
        np.minimum.at(box[2], index, pcol)
        np.maximum.at(box[3], index, pcol)
        # a footprint lies in one rectangle and the one-pixel gaps around each keep the
        # box, one pixel wider, out of every other
        first = np.zeros(multi.size, dtype=np.int64)
        first[index] = pixels[of_multi]
        owners = self.owner(*np.divmod(first, nx)).tolist()
        touched: set[int] = set()
        for (r0, r1, c0, c1), i in zip(box.T.tolist(), owners, strict=True):
            region = (slice(max(r0 - 1, 0), r1 + 2), slice(max(c0 - 1, 0), c1 + 2))
            if i not in touched and np.isneginf(self.canvas[region]).any():
                touched.add(i)
        todo = [(i, j, m) for i in sorted(touched) for j, m in self.pending.pop(i, [])]
        if not todo:
            return
        blocks = np.array(todo, dtype=int)
        values = self.snr_blocks(blocks[:, 1], blocks[:, 2])
        if sign < 0:
            np.negative(values, out=values)
        for (i, j, m), value in zip(todo, values, strict=True):
            where = self._where(i, j, m)
            h, w = where[0].stop - where[0].start, where[1].stop - where[1].start
            self.canvas[where] = value[:h, :w]


def sparse_peaks(
    shape: tuple[int, int],
    size: int,
    candidate: np.ndarray,
    snr_blocks: Callable[[np.ndarray, np.ndarray], np.ndarray],
    threshold: float,
    min_pixels: int,
    sigma: float,
    prominence: float,
    candidate_snr: Callable[[], np.ndarray] | None = None,
) -> Peaks:
    """Footprints and peaks above ``threshold`` in an S/N map known block by block.

    Parameters
    ----------
    shape : (ny, nx)
        The frame.
    size : int
        Block side (px); blocks at the far edges are cut by the frame.
    candidate : `numpy.ndarray` (nby, nbx), bool
        Blocks that may hold a pixel with |S/N| >= ``threshold``; every other pixel
        must be below it.
    snr_blocks : callable (by, bx) -> (m, size, size) float32
        The S/N of blocks (block row and column indices); pixels beyond the frame
        are ignored.
    threshold, min_pixels, sigma, prominence
        As `core.detection._footprints` and `_find_peaks`.
    candidate_snr : callable () -> (m, size, size) float32, or None
        ``snr_blocks`` of the candidate blocks in raster order (``np.nonzero``), when
        made elsewhere (e.g. on other threads while the canvas is laid out here).
    """
    ny, nx = shape
    labels, rects = _groups(candidate)
    if not rects:
        empty = np.zeros(0, dtype=int)
        return Peaks(empty, empty, empty, empty, empty, np.zeros(0, dtype=np.float32))
    fy0 = np.array([r[0].start * size for r in rects])
    fx0 = np.array([r[1].start * size for r in rects])
    heights = np.array([min(r[0].stop * size, ny) for r in rects]) - fy0
    widths = np.array([min(r[1].stop * size, nx) for r in rects]) - fx0
    cy0, cx0, cny, cnx = _pack(heights, widths)
    # the gaps between rectangles stay 0 (fresh pages are zero: no pass to clear them)
    canvas = frame_zeros((cny, cnx), np.float32)
    owner = _Owner(cy0, cx0, cnx)
    index = _rectangle_blocks(rects)
    keys, inverse = np.unique(index[:, 1] * candidate.shape[1] + index[:, 2], return_inverse=True)
    key_y, key_x = np.divmod(keys, candidate.shape[1])
    # blocks that are no candidate only fill their rectangle: every pixel in them is
    # below the threshold, so they stay -inf until their values can matter (`_Fillers`)
    needed = candidate[key_y, key_x]
    slot = np.cumsum(needed) - 1  # each needed key's block in `values`
    boxes = zip(cy0.tolist(), cx0.tolist(), heights.tolist(), widths.tolist(), strict=True)
    for y, x, h, w in boxes:
        canvas[y : y + h, x : x + w] = -np.inf
    # the needed keys are the candidate blocks in raster order
    values = candidate_snr() if candidate_snr else snr_blocks(key_y[needed], key_x[needed])
    # another group's blocks inside a rectangle stay below the threshold there (they are
    # searched in their own rectangle); the S/N of all pixels between is exact
    below = np.nextafter(np.float32(threshold), np.float32(0))
    key = inverse.ravel()
    on = needed[key]
    other = labels[index[:, 1], index[:, 2]]
    other = (other != 0) & (other != index[:, 0] + 1)
    # each needed block written straight to its place on the canvas (cut by the frame)
    rect, by, bx = index[on].T
    top = cy0[rect] + (by - fy0[rect] // size) * size
    left = cx0[rect] + (bx - fx0[rect] // size) * size
    high = np.minimum(size, heights[rect] - (top - cy0[rect]))
    wide = np.minimum(size, widths[rect] - (left - cx0[rect]))
    rows = zip(
        slot[key[on]].tolist(),
        top.tolist(),
        left.tolist(),
        high.tolist(),
        wide.tolist(),
        other[on].tolist(),
        strict=True,
    )
    for k, y, x, h, w, clip in rows:
        target = canvas[y : y + h, x : x + w]
        if clip:
            np.clip(values[k, :h, :w], -below, below, out=target)
        else:
            target[...] = values[k, :h, :w]
    placement = (cy0, cx0, heights, widths)
    filler_blocks = index[~on]
    fillers = _Fillers(canvas, owner, rects, placement, filler_blocks, size, snr_blocks)
    parts = []
    merged: list[tuple[np.ndarray, np.ndarray]] = []
    offset = 0
    # every other value on the canvas is a filler's (|S/N| below the threshold), 0 or
    # clipped below it: without a value down to -threshold there is no negative side
    negative = bool((values <= -threshold).any())
    for sign in (1, -1) if negative else (1,):
        if sign < 0:
            # fillers still pending stay -inf (the only -inf values): all else negated
            np.negative(canvas, out=canvas, where=canvas != -np.inf)
        # `_footprints`, keeping its list of the footprints' pixels
        pixels, pixel_labels, n, _ = _footprint_pixels(canvas, threshold, min_pixels)
        if n:
            # the maxima of 3 x 3 boxes stay so when fillers are drawn (all below them)
            rows, cols = _local_maxima(canvas, pixels, 1)
            maxima = rows * cnx + cols
            fillers.draw_near_deblending(pixels, pixel_labels, maxima, sign)
            # the footprints' pixels stand for their label image (none is made)
            peaks = _find_peaks(
                canvas, None, n, sigma, prominence, pixels, pixel_labels, near_maxima=maxima
            )
            # the line test passes peaks of a bent or lumpy footprint whose line leaves
            # it; the highest path between them decides (`core.saddles`)
            keep = prominent(canvas, pixels, pixel_labels, peaks, prominence, sigma)
            gone = peaks[~keep]
            rid = owner(gone[:, 0], gone[:, 1])
            # kept for the streak finder: a trail's ridge folds into a few peaks
            merged.append((gone[:, 1] - cx0[rid] + fx0[rid], gone[:, 0] - cy0[rid] + fy0[rid]))
            peaks = peaks[keep]
            row, col, label = peaks[:, 0], peaks[:, 1], peaks[:, 2]
            # footprints renumbered in raster order of their first pixel on the frame
            prow, pcol = np.divmod(pixels, cnx)
            rid = owner(prow, pcol)
            frame = (prow - cy0[rid] + fy0[rid]) * nx + (pcol - cx0[rid] + fx0[rid])
            first = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
            np.minimum.at(first, pixel_labels, frame)
            rank = np.empty(n + 1, dtype=np.int64)
            rank[0] = 0
            rank[1:][np.argsort(first[1:], kind="stable")] = np.arange(1, n + 1)
            value = canvas[row, col]
            rid = owner(row, col)
            row = row - cy0[rid] + fy0[rid]
            col = col - cx0[rid] + fx0[rid]
            label = rank[label]
            order = np.argsort(label, kind="stable")  # by footprint, peaks in found order
            row, col, label, value = row[order], col[order], label[order], value[order]
            count = np.bincount(label, minlength=n + 1)[label]
            parts.append((col, row, np.full(row.size, sign), label + offset, count, value))
            offset += n
    if not parts:
        empty = np.zeros(0, dtype=int)
        return Peaks(empty, empty, empty, empty, empty, np.zeros(0, dtype=np.float32))
    col, row, sign_, footprint, n_peaks, value = (
        np.concatenate(p) for p in zip(*parts, strict=True)
    )
    lost = np.array([np.concatenate(m) for m in zip(*merged, strict=True)]).reshape(2, -1)
    return Peaks(col, row, sign_, footprint, n_peaks, value, lost)


def _bands(ny: int, size: int) -> list[slice]:
    """Row bands of whole blocks (about 128 rows) for the threaded frame passes: half
    as many numpy calls as 64-row bands, temporaries still ~2 MB (4096 wide, two
    threads: prepare_difference 38.9 -> 32.5 ms, block_extremes 10.8 -> 8.5 ms)."""
    rows = size * max(1, 128 // size)
    return [slice(y, min(y + rows, ny)) for y in range(0, ny, rows)]


def prepare_difference(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    bits: int,
    size: int,
    lazy_variance: bool = False,
    keep_image: bool = True,
):
    """The difference with unusable pixels at 0 (None unless ``keep_image``; see
    `matched_numerator`), its variance with those filled, the unusable pixels (None
    when there are none), the fill value and the least variance of every ``size``
    block; in threaded bands of rows.

    Unusable: not finite or any of ``bits`` set in ``mask``. Unusable variances
    (also non-finite or <= 0 ones) take the median of the usable ones, estimated
    on every k-th row (about `_FILL_SAMPLE` pixels); when fewer than half of those are
    usable the variance plane is ignored (1 everywhere: the S/N is then
    normalised by its measured scatter alone). With ``lazy_variance`` the filled
    variance is a `FilledVariance` (windows filled on demand, no frame copy).
    """
    ny, nx = image.shape
    step = max(1, (ny * nx) // _FILL_SAMPLE)
    with np.errstate(invalid="ignore"):
        sampled = variance[::step]
        ok = np.isfinite(sampled) & (sampled > 0) & np.isfinite(image[::step])
        if bits:
            ok &= (mask[::step] & bits) == 0
    usable = np.asarray(sampled[ok], dtype=np.float32)
    ignore = usable.size < 0.5 * ok.size
    fill = 1.0 if ignore or usable.size == 0 else float(order.median(usable, consume=True))
    out_image = np.empty((ny, nx), dtype=np.float32) if keep_image else None
    out_var = None if lazy_variance else np.empty((ny, nx), dtype=np.float32)
    no_data = frame_array((ny, nx), bool)
    nbx = -(-nx // size)
    vmin = np.empty((-(-ny // size), nbx))
    dirty = np.empty(vmin.shape, dtype=bool)  # blocks where the filled variance differs

    def band(rows: slice) -> bool:
        img = image[rows]
        bad = no_data[rows]  # computed in place
        np.isfinite(img, out=bad)
        np.logical_not(bad, out=bad)
        if bits:
            bad |= (mask[rows] & bits) != 0
        if out_image is not None:
            np.copyto(out_image[rows], img)
            np.copyto(out_image[rows], np.float32(0), where=bad)
        filled = np.empty(img.shape, np.float32) if out_var is None else out_var[rows]
        replaced = _fill_variance(filled, variance[rows], bad, fill, ignore)
        b0 = rows.start // size
        b1 = b0 + -(-(rows.stop - rows.start) // size)
        vmin[b0:b1] = _block_reduce(filled, size, np.minimum, np.inf)
        dirty[b0:b1] = True if replaced is None else _block_reduce(replaced, size, np.maximum, 0)
        return bool(bad.any())

    any_bad = any(thread_map(band, _bands(ny, size)))
    var_out = (
        FilledVariance(image, variance, mask, bits, fill, ignore, (dirty, size))
        if out_var is None
        else out_var
    )
    return out_image, var_out, no_data if any_bad else None, fill, vmin


def matched_numerator(
    image: np.ndarray, no_data: np.ndarray | None, kernel: np.ndarray, tile: int = 256
) -> np.ndarray:
    """float32 correlation of ``image`` (pixels of ``no_data`` at 0, 0 off the frame) with
    ``kernel``: ``core.convolve.correlate_image`` of `prepare_difference`'s image, in the
    same overlap-save tiles, without that frame-sized zeroed copy."""

    def read(rows: slice, part: np.ndarray) -> None:
        np.copyto(part, image[rows], casting="unsafe")
        if no_data is not None:
            np.copyto(part, np.float32(0), where=no_data[rows])

    out = correlate_rows(image.shape, read, kernel, tile)
    assert out is not None
    return out


def _fill_variance(out: np.ndarray, var: np.ndarray, bad: np.ndarray, fill: float, ignore: bool):
    """``out`` (float32) = the variance, or ``fill`` where it is unusable or ``bad``
    (all 1 when the plane is ignored); returns the replaced pixels (None if ignored)."""
    if ignore:
        out[...] = 1.0
        return None
    np.copyto(out, var)
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(var) & (var > 0)
    keep &= ~bad
    np.logical_not(keep, out=keep)
    np.copyto(out, np.float32(fill), where=keep)
    return keep


class FilledVariance:
    """The filled variance of `prepare_difference`, cut window by window: the same
    values as its frame (0 off the frame), without holding a frame-sized copy.

    ``dirty`` (grid, block side), when given, marks the blocks holding a replaced
    pixel: windows on the frame that touch none of them are plain copies of the
    variance (most windows; the fill's tests cost ~5x the copy).
    """

    def __init__(self, image, variance, mask, bits: int, fill: float, ignore: bool, dirty=None):
        self.image, self.variance, self.mask = image, variance, mask
        self.bits, self.fill, self.ignore = bits, fill, ignore
        self.shape = image.shape
        self._dirty_sum = None
        if dirty is not None and not ignore:
            grid, self._block = dirty
            # 2-d prefix sum: dirty blocks in any block rectangle in O(1)
            self._dirty_sum = np.pad(grid.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def windows(self, y0: np.ndarray, x0: np.ndarray, side: int) -> np.ndarray:
        y0, x0 = np.asarray(y0, dtype=np.intp), np.asarray(x0, dtype=np.intp)
        ny, nx = self.shape
        if self._dirty_sum is not None and y0.size:
            s, c = self._block, self._dirty_sum
            on = (y0 >= 0) & (x0 >= 0) & (y0 + side <= ny) & (x0 + side <= nx)
            b0, b1 = np.clip(y0 // s, 0, None), np.clip((y0 + side - 1) // s + 1, 0, c.shape[0] - 1)
            a0, a1 = np.clip(x0 // s, 0, None), np.clip((x0 + side - 1) // s + 1, 0, c.shape[1] - 1)
            clean = on & (c[b1, a1] - c[b0, a1] - c[b1, a0] + c[b0, a0] == 0)
            if clean.all():
                return _patches(self.variance, y0, x0, side)
            if clean.any():
                # the clean windows sliced straight into the result: a gathered stack
                # scattered into it would copy every window twice
                out = np.empty((y0.size, side, side), dtype=np.float32)
                corners = zip(y0[clean].tolist(), x0[clean].tolist(), strict=True)
                for k, (y, x) in zip(np.flatnonzero(clean).tolist(), corners, strict=True):
                    out[k] = self.variance[y : y + side, x : x + side]
                out[~clean] = self._filled(y0[~clean], x0[~clean], side)
                return out
        return self._filled(y0, x0, side)

    def read(self, rows: slice, out: np.ndarray) -> None:
        """The filled variance of ``rows`` (whole rows) into ``out`` (float32)."""
        bad = ~np.isfinite(self.image[rows])
        if self.bits:
            bad |= (self.mask[rows] & self.bits) != 0
        _fill_variance(out, self.variance[rows], bad, self.fill, self.ignore)

    def _filled(self, y0: np.ndarray, x0: np.ndarray, side: int) -> np.ndarray:
        ny, nx = self.shape
        offsets = np.arange(side)
        rows = np.asarray(y0)[:, None] + offsets
        cols = np.asarray(x0)[:, None] + offsets
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        bad = ~np.isfinite(_patches(self.image, y0, x0, side))
        if self.bits:
            bad |= (_patches(self.mask, y0, x0, side) & self.bits) != 0
        out = np.empty(bad.shape, dtype=np.float32)
        _fill_variance(out, _patches(self.variance, y0, x0, side), bad, self.fill, self.ignore)
        out[~inside] = 0.0
        return out


def prepare_score(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    bits: int,
    size: int,
    keep_image: bool = True,
):
    """Score / sqrt(variance) (0 where the variance is unusable or any of ``bits`` is
    set), the score with non-finite pixels at 0 (None unless ``keep_image``), and the
    largest |S/N| of every ``size`` block; in threaded bands of rows."""
    ny, nx = image.shape
    out_image = np.empty((ny, nx), dtype=np.float32) if keep_image else None
    snr = np.zeros((ny, nx), dtype=np.float32)
    top = np.empty((-(-ny // size), -(-nx // size)))

    def band(rows: slice) -> None:
        shape = (rows.stop - rows.start, nx)
        img = out_image[rows] if out_image is not None else np.empty(shape, np.float32)
        np.copyto(img, image[rows])
        np.copyto(img, np.float32(0), where=~np.isfinite(img))
        var = variance[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = np.isfinite(var) & (var > 0)
            np.divide(img, np.sqrt(var), out=snr[rows], where=ok)
        if bits:
            np.copyto(snr[rows], np.float32(0), where=(mask[rows] & bits) != 0)
        b0 = rows.start // size
        part = snr[rows]
        high = _block_reduce(part, size, np.maximum, -np.inf)
        top[b0 : b0 + high.shape[0]] = np.maximum(
            high, -_block_reduce(part, size, np.minimum, np.inf)
        )

    thread_map(band, _bands(ny, size))
    return snr, out_image, top


def block_extremes(array: np.ndarray, size: int) -> np.ndarray:
    """Largest |value| of every ``size`` block, in threaded bands of rows."""
    ny, nx = array.shape
    out = np.empty((-(-ny // size), -(-nx // size)))

    def band(rows: slice) -> None:
        b0 = rows.start // size
        part = array[rows]
        top = _block_reduce(part, size, np.maximum, -np.inf)
        low = _block_reduce(part, size, np.minimum, np.inf)
        out[b0 : b0 + top.shape[0]] = np.maximum(top, -low)

    thread_map(band, _bands(ny, size))
    return out


#: Working memory (bytes) of one batch of `DifferenceSnr` block transforms: each
#: temporary stays under glibc's mmap threshold (`core.parallel.MMAP_THRESHOLD`), so the
#: batches reuse heap memory instead of faulting fresh mappings in (4096 x 4096 pair,
#: one thread: noise lattice 102 -> 70 ms, candidate blocks 86 -> 67 ms against 64 MB).
_SNR_BATCH_BYTES = 16 << 20


class DifferenceSnr:
    """Matched-filter S/N of a difference, exact on the blocks asked for.

    Parameters
    ----------
    smoothed : (ny, nx) float32
        The image correlated with ``kernel``.
    variance : (ny, nx) float32
        Positive, finite variance (unusable pixels already filled).
    no_data : (ny, nx) bool or None
        Pixels whose S/N is 0.
    kernel : (k, k) float64
        The matched filter (odd side).
    floor : float
        Least value of the correlated variance.
    """

    def __init__(self, smoothed, variance, no_data, kernel, floor: float, vmin=None):
        self.smoothed, self.variance, self.no_data = smoothed, variance, no_data
        self.vmin = vmin
        self.half = kernel.shape[0] // 2
        self.size = block_size(self.half)
        self.grid = _grid_blocks(smoothed.shape, self.size)
        k2 = kernel.astype(np.float64) ** 2
        self.energy = float(k2.sum())
        self.k2 = k2
        self.floor = np.float32(floor)
        self._transforms: dict[int, np.ndarray] = {}
        self.factor = 1.0
        # blocks computed so far: their S/N (before the noise factor) and where each is
        self._store = np.zeros((0, self.size, self.size), dtype=np.float32)
        self._where = np.full(self.grid, -1, dtype=np.intp)
        # or the S/N of the whole frame (before the noise factor), 0-padded to whole blocks
        self._frame: np.ndarray | None = None

    def _transform(self, side: int) -> tuple[int, np.ndarray]:
        """FFT length for (side, side) windows (the least fast length holding a window
        and the kernel's reach: no wrap-around) and the squared kernel's transform."""
        h = self.half
        n = sfft.next_fast_len(side + 2 * h - 1, real=True)
        if n not in self._transforms:
            pad = np.zeros((n, n))
            pad[: 2 * h + 1, : 2 * h + 1] = self.k2[::-1, ::-1]
            pad = np.roll(pad, (-h, -h), axis=(0, 1))
            self._transforms[n] = sfft.rfft2(pad).astype(np.complex64)
        return n, self._transforms[n]

    def _snr(
        self, y0: np.ndarray, x0: np.ndarray, side: int, batch: int | None = None
    ) -> np.ndarray:
        """Unscaled S/N (before the noise factor) of (side, side) windows with corners
        (y0, x0), (m, side, side) float32, in batches of at most ``batch`` windows on the
        thread pool (default: about `_SNR_BATCH_BYTES` of working memory in all). Each
        window's transforms are its own, so the values do not depend on the batching."""
        n, _ = self._transform(side)
        batch = batch or max(1, _SNR_BATCH_BYTES // (16 * n * n))
        out = frame_array((y0.size, side, side), np.float32)
        threads = max(1, min(n_threads(), y0.size))
        # as many pieces as threads at least (the windows' copies, transforms and
        # divisions all release the GIL), each at most `batch` / threads windows
        step = max(1, min(-(-y0.size // threads), batch // threads))
        parts = [slice(a, min(a + step, y0.size)) for a in range(0, y0.size, step)]

        def one(part: slice) -> None:
            self._snr_windows(y0[part], x0[part], side, out[part])

        thread_map(one, parts, threads)
        return out

    def _snr_windows(
        self, y0: np.ndarray, x0: np.ndarray, side: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """`_snr` of one batch of windows, in the calling thread (into ``out`` if given)."""
        h = self.half
        n, transform = self._transform(side)
        if out is None:
            out = np.empty((y0.size, side, side), dtype=np.float32)
        if y0.size == 0:
            return out
        if isinstance(self.variance, FilledVariance):
            patches = self.variance.windows(y0 - h, x0 - h, n)
        else:
            patches = _patches(self.variance, y0 - h, x0 - h, n)
        spectrum = sfft.rfft2(patches, axes=(1, 2), workers=1)
        del patches
        spectrum *= transform
        # inverse transform of the kept rows only (the rest is the padding)
        rows = sfft.ifft(spectrum, axis=1, workers=1, overwrite_x=True)[:, h : h + side]
        var = sfft.irfft(rows, n=n, axis=2, workers=1)[:, :, h : h + side]
        np.maximum(var, self.floor, out=var)
        np.sqrt(var, out=var)
        np.divide(_patches(self.smoothed, y0, x0, side), var, out=out)
        if self.no_data is not None:
            out[_patches(self.no_data, y0, x0, side)] = 0.0
        return out

    def blocks(self, by: np.ndarray, bx: np.ndarray) -> np.ndarray:
        """Final S/N (noise factor applied) of blocks (block row and column indices),
        (m, size, size); each block is computed once and kept."""
        s = self.size
        by = np.asarray(by, dtype=int)
        bx = np.asarray(bx, dtype=int)
        if self._frame is not None:
            out = _patches(self._frame, by * s, bx * s, s)
            out /= np.float32(self.factor)
            return out
        where = self._where[by, bx]
        todo = np.unique(by[where < 0] * self.grid[1] + bx[where < 0])
        if todo.size:
            ty, tx = np.divmod(todo, self.grid[1])
            self._where[ty, tx] = self._store.shape[0] + np.arange(todo.size)
            # in batches (`_snr`): the padded patches and their spectra of every candidate
            # block at once would cost several frames
            new = self._snr(ty * s, tx * s, s)
            if self._store.shape[0]:
                self._store = np.concatenate([self._store, new])
            else:
                self._store = new
            where = self._where[by, bx]
        out = self._store[where]
        out /= np.float32(self.factor)
        return out

    def _whole_frame(self) -> np.ndarray:
        """Unscaled S/N of the whole frame, 0-padded to whole blocks, kept for `blocks`:
        the correlated variance in `correlate_rows`' overlap-save tiles (~4x fewer
        transformed pixels than block by block)."""
        ny, nx = self.smoothed.shape
        nby, nbx = self.grid
        # fresh zero pages on huge pages: the padding is never written
        frame = frame_zeros((nby * self.size, nbx * self.size), np.float32)
        variance = self.variance
        read = (
            variance.read
            if isinstance(variance, FilledVariance)
            else lambda rows, part: np.copyto(part, variance[rows], casting="unsafe")
        )

        def write(rows: slice, noise: np.ndarray) -> None:
            np.maximum(noise, self.floor, out=noise)
            np.sqrt(noise, out=noise)
            snr = frame[rows, :nx]
            np.divide(self.smoothed[rows], noise, out=snr)
            if self.no_data is not None:
                np.copyto(snr, np.float32(0), where=self.no_data[rows])

        correlate_rows((ny, nx), read, self.k2, write=write)
        self._frame = frame
        return frame

    def noise_factor(self, sample_pixels: int = NOISE_SAMPLE_PIXELS) -> float:
        """Empty-sky scatter of the S/N (`core.measure._negative_side_sigma`); sets
        ``factor``. Frames of up to twice ``sample_pixels`` are measured whole (kept for
        the detection; the values taken block by block in raster order of the blocks),
        larger ones on a lattice of square windows (256-pixel transforms) holding about
        ``sample_pixels`` pixels."""
        self.factor = 1.0
        self.factor = _negative_side_sigma(self._noise_sample(sample_pixels))
        return self.factor

    def _noise_sample(self, sample_pixels: int) -> np.ndarray:
        """The S/N values (factor 1) `noise_factor` measures, computed on the thread pool."""
        ny, nx = self.smoothed.shape
        side = 256 - 2 * self.half
        if ny * nx <= 2 * sample_pixels or side < 64 or min(ny, nx) < side:
            frame = self._whole_frame()
            keep = np.zeros(frame.shape, dtype=bool)
            if self.no_data is None:
                keep[:ny, :nx] = True
            else:
                np.logical_not(self.no_data, out=keep[:ny, :nx])
            nby, nbx = self.grid
            s = self.size

            def blockwise(a: np.ndarray) -> np.ndarray:
                # copied in block order first: a boolean index of the transposed view
                # took 1.7x as long (2048 px frame: 10 -> 6 ms)
                return np.ascontiguousarray(a.reshape(nby, s, nbx, s).transpose(0, 2, 1, 3))

            return blockwise(frame)[blockwise(keep)]
        count = -(-sample_pixels // (side * side))
        gy = max(1, round(math.sqrt(count * ny / nx)))
        gx = -(-count // gy)
        # window centres in the middle of a gy x gx grid of cells
        cy = ((np.arange(gy) + 0.5) * ny / gy - side / 2).astype(int).clip(0, ny - side)
        cx = ((np.arange(gx) + 0.5) * nx / gx - side / 2).astype(int).clip(0, nx - side)
        y0, x0 = np.repeat(cy, gx), np.tile(cx, gy)
        values = self._snr(y0, x0, side)
        if self.no_data is not None:
            keep = ~_patches(self.no_data, y0, x0, side)
            if not keep.all():
                values = values[keep]
        return values.reshape(1, -1)

    def candidates(self, threshold: float) -> np.ndarray:
        """Blocks (nby, nbx) where |S/N| may reach ``threshold`` (see the module docstring)."""
        top, bound = self._reach()
        return top >= threshold * self.factor * bound * (1.0 - 1e-5)

    def search(self, threshold: float, sample_pixels: int = NOISE_SAMPLE_PIXELS) -> np.ndarray:
        """`noise_factor`, then `candidates` (same values): the statistics of the
        factor run in one thread, so the part of the candidates' test that does not
        need the factor is computed beside them."""
        self.factor = 1.0
        sample = self._noise_sample(sample_pixels)
        factor, (top, bound) = thread_map(
            lambda job: job(), [lambda: _negative_side_sigma(sample), self._reach]
        )
        self.factor = factor
        return top >= threshold * self.factor * bound * (1.0 - 1e-5)

    def _reach(self) -> tuple[np.ndarray, np.ndarray]:
        """Largest |numerator| of every block and the lower bound of its noise (factor
        1): a block is a candidate where the first reaches the threshold times the
        second."""
        s, h = self.size, self.half
        ny, nx = self.smoothed.shape
        vmin = (
            self.vmin
            if self.vmin is not None
            else _block_reduce(self.variance, s, np.minimum, np.inf)
        )
        reach = -(-h // s)
        vmin = ndimage.minimum_filter(vmin, size=2 * reach + 1, mode="nearest")
        top = block_extremes(self.smoothed, s)
        # kernel energy inside the frame, bounded below per block: rows lost at the
        # top/bottom and columns lost at the sides are subtracted separately
        rows_energy = self.k2.sum(axis=1)
        cols_energy = self.k2.sum(axis=0)
        ey = _inside_energy(rows_energy, ny, h, s)
        ex = _inside_energy(cols_energy, nx, h, s)
        energy = np.clip(ey[:, None] + ex[None, :] - self.energy, 0.0, None)
        return top, np.sqrt(np.maximum(vmin * energy, float(self.floor)))


def _inside_energy(profile: np.ndarray, n: int, h: int, s: int) -> np.ndarray:
    """Least kernel energy (summed over the other axis) inside [0, n) over each block's
    pixels along one axis; ``profile[d + h]`` is the energy at offset d."""
    cum = np.concatenate([[0.0], np.cumsum(profile)])
    pos = np.arange(n)
    lo = np.clip(-pos, -h, h + 1) + h  # first kernel row inside the frame
    hi = np.clip(n - 1 - pos, -h - 1, h) + h + 1
    inside = cum[np.clip(hi, 0, 2 * h + 1)] - cum[np.clip(lo, 0, 2 * h + 1)]
    pad = -(-n // s) * s - n
    inside = np.concatenate([inside, np.full(pad, np.inf)])
    return inside.reshape(-1, s).min(axis=1)


def _block_reduce(array: np.ndarray, s: int, ufunc, fill) -> np.ndarray:
    """``ufunc`` (np.minimum / np.maximum) over s x s blocks; blocks cut by the frame's far
    edges reduce over their pixels on it."""
    ny, nx = array.shape
    nby, nbx = -(-ny // s), -(-nx // s)
    if nby * s != ny:  # rows first (whole contiguous rows at a time), padded with fill
        array = np.concatenate([array, np.full((nby * s - ny, nx), fill, dtype=array.dtype)])
    rows = ufunc.reduce(array.reshape(nby, s, nx), axis=1)
    if nbx * s != nx:
        rows = np.concatenate([rows, np.full((nby, nbx * s - nx), fill, dtype=rows.dtype)], axis=1)
    return ufunc.reduce(rows.reshape(nby, nbx, s), axis=2).astype(np.float64)
