"""Binary dilation of full-frame masks by shifted ORs of bit-packed rows: the same pixels
as ``scipy.ndimage.binary_dilation`` with its default (4-connected) structure, about 10x
faster on full frames (`dilate_cross`), or by any symmetric shape of non-increasing rows
(`packed_dilate`: detection's discs), and the bitwise OR over a box (`or_filter`, the
convolution's mask spreading). numpy only, so the reader (`core.io`) can use them
without the convolution module above it."""

from __future__ import annotations

import numpy as np

from .parallel import frame_array, row_blocks

__all__ = ["dilate_cross", "packed_dilate", "or_filter"]


def dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=iterations)`` (4-connected cross,
    nothing beyond the border): the pixels within city-block distance ``iterations``, a
    diamond (`packed_dilate`, ~2x faster than in-place shifted ORs of bytes, ~10x than
    scipy's on full frames).

    Parameters
    ----------
    mask : `numpy.ndarray` (ny, nx), bool
    iterations : int
        Growth in pixels of city-block distance.

    Returns
    -------
    grown : `numpy.ndarray` (ny, nx), bool (a new array)
    """
    radius = max(0, int(iterations))
    if radius == 0:
        return np.array(mask, dtype=bool, copy=True)
    return packed_dilate(mask, [radius - dy for dy in range(radius + 1)])


def packed_dilate(mask: np.ndarray, widths: list[int]) -> np.ndarray:
    """``mask`` dilated by the symmetric shape whose rows at vertical offsets +-dy reach
    ``widths[dy]`` pixels either side (non-increasing), nothing beyond the border.

    Rows of the shape are horizontal dilations of increasing half-width, each made
    from the previous one and OR-ed in at the vertical offsets that use it; the rows
    are packed 64 pixels to a word, so each OR touches 1/8 of the bytes.
    """
    ny, nx = mask.shape
    padded = mask
    if nx % 64:
        padded = np.zeros((ny, nx + 64 - nx % 64), dtype=bool)
        padded[:, :nx] = mask
    # bit k of word w is pixel 64 w + k (little bit order on little-endian words)
    packed = np.packbits(padded, axis=1, bitorder="little").view("<u8")
    del padded
    radius = len(widths) - 1
    out = np.zeros_like(packed)
    current = packed
    one, top = np.uint64(1), np.uint64(63)
    for w in range(widths[0] + 1):
        if w:
            # one more pixel either side: shift by one bit, carrying across words
            wider = current | (current << one) | (current >> one)
            wider[:, 1:] |= current[:, :-1] >> top
            wider[:, :-1] |= current[:, 1:] << top
            current = wider
        for dy in range(radius + 1):
            if widths[dy] != w:
                continue
            if dy == 0:
                out |= current
            elif dy < ny:
                out[dy:] |= current[:-dy]
                out[:-dy] |= current[dy:]
    # unpacked a block of rows at a time into a frame on huge pages (`frame_array`)
    grown = frame_array((ny, nx), bool)
    for rows in row_blocks(ny):
        bits = np.unpackbits(out[rows].view(np.uint8), axis=1, count=nx, bitorder="little")
        grown[rows] = bits.view(bool)
    return grown


def or_filter(array: np.ndarray, hy: int, hx: int) -> np.ndarray:
    """Bitwise OR of ``array`` over a (2hy+1) x (2hx+1) box around each pixel (zero outside).

    Works on integer or boolean arrays; separable, with windows built by doubling,
    so the cost is O(log h) whole-array ORs per axis whatever the bits. Integer
    arrays whose set bits fit in 8 or 16 bits are filtered in that narrower type.
    """
    narrow = array
    if array.dtype.kind in "iu" and array.dtype.itemsize > 1:
        present = int(np.bitwise_or.reduce(array, axis=None))
        if present >= 0:
            if present < 1 << 8:
                narrow = array.astype(np.uint8)
            elif present < 1 << 16 and array.dtype.itemsize > 2:
                narrow = array.astype(np.uint16)
    out = _or_filter_1d(_or_filter_1d(narrow, hx, 1), hy, 0)
    return out.astype(array.dtype, copy=False)


def _or_filter_1d(array: np.ndarray, h: int, axis: int) -> np.ndarray:
    if h <= 0:
        return array.copy()
    n = array.shape[axis]
    window = 2 * h + 1

    def take(start, stop):
        index = [slice(None)] * array.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    shape = list(array.shape)
    shape[axis] = n + 2 * h
    w = np.zeros(shape, dtype=array.dtype)
    w[take(h, h + n)] = array
    total = shape[axis]
    # after each step w[i] = OR of the `length` values starting at i
    length = 1
    while 2 * length <= window:
        w[take(0, total - length)] |= w[take(length, total)]
        length *= 2
    return w[take(0, n)] | w[take(window - length, window - length + n)]
