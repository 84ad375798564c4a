"""Binary dilation of full-frame masks by in-place shifted ORs: the same pixels as
``scipy.ndimage.binary_dilation`` with its default (4-connected) structure, about 5x
faster on full frames (25x on a 2048^2 source mask grown by 3), and the bitwise OR over
a box (`or_filter`, the convolution's mask spreading). numpy only, so the reader
(`core.io`) can use them without the convolution module above it."""

from __future__ import annotations

import numpy as np

from .parallel import frame_array

__all__ = ["dilate_cross", "or_filter"]


def dilate_cross(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=iterations)`` (4-connected cross,
    nothing beyond the border), as in-place shifted ORs: about 5x faster on full frames.

    Parameters
    ----------
    mask : `numpy.ndarray` (ny, nx), bool
    iterations : int
        Growth in pixels of city-block distance.

    Returns
    -------
    grown : `numpy.ndarray` (ny, nx), bool (a new array)
    """
    # written whole: on huge pages (a 4096^2 boolean frame is past the heap's mmap
    # threshold, and its 4 kB pages took ~12 ms of faults, the two a third of the call)
    out = frame_array(np.shape(mask), bool)
    np.copyto(out, mask, casting="unsafe")
    previous = frame_array(out.shape, bool)
    for _ in range(max(0, int(iterations))):
        np.copyto(previous, out)
        out[1:] |= previous[:-1]
        out[:-1] |= previous[1:]
        out[:, 1:] |= previous[:, :-1]
        out[:, :-1] |= previous[:, 1:]
    return out


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
