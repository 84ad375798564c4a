"""Binary dilation of full-frame masks by in-place shifted ORs: the same pixels as
``scipy.ndimage.binary_dilation`` with its default (4-connected) structure, about 5x
faster on full frames (25x on a 2048^2 source mask grown by 3). numpy only, so the
reader (`core.io`) can use it without the convolution module above it."""

from __future__ import annotations

import numpy as np

__all__ = ["dilate_cross"]


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
    out = np.array(mask, dtype=bool, copy=True)
    previous = np.empty_like(out)
    for _ in range(max(0, int(iterations))):
        np.copyto(previous, out)
        out[1:] |= previous[:-1]
        out[:-1] |= previous[1:]
        out[:, 1:] |= previous[:, :-1]
        out[:, :-1] |= previous[:, 1:]
    return out
