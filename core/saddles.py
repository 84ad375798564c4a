"""Saddles of peaks in a footprint: the level where a peak's region meets higher ground.

A straight line between two peaks dips wherever the footprint bends, so it finds a
deep "saddle" between two parts of one curved or lumpy residual; the highest path
inside the footprint does not. Flooding the footprint from the top (union-find,
8-connected) gives that path's lowest point: a peak's region grows until it meets a
region whose highest pixel is higher; that level is the peak's saddle (its key col).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["key_saddles", "prominent", "sampling_dip"]


def sampling_dip(sigma: float) -> float:
    """Largest fractional dip the pixel grid alone puts on a smooth crest of Gaussian
    width ``sigma`` (px): an 8-connected path along it passes up to half a pixel off
    the crest, where it is exp(-0.5**2 / (2 sigma**2)) of its height. A bright ridge
    (a mismatched star's ring, an extended residual's rim) dips this much between
    any two of its pixels without any second source: at S/N 140 and sigma 1.8 px
    that is 5 sigma, far above the noise's ``prominence``."""
    return 1.0 - math.exp(-1.0 / (8.0 * sigma**2))


def key_saddles(
    box: np.ndarray, inside: np.ndarray, peaks: np.ndarray, floor: float = -np.inf
) -> np.ndarray:
    """Saddle level of each of ``peaks`` ((k, 2) rows and columns in ``box``).

    ``box``: the map around one footprint; ``inside``: its pixels (bool, same shape).
    The highest peak's saddle is -inf (there is no higher ground in the footprint), and
    so is any saddle below ``floor``: only pixels at or above it are flooded (a bright
    residual's wide base costs nothing when only its tops are in question).
    """
    ny, nx = box.shape
    flat = np.flatnonzero(inside & (box >= floor))
    values = box.ravel()[flat]
    # visiting order: highest first (ties in raster order)
    order = flat[np.argsort(-values, kind="stable")]
    parents = np.full(ny * nx, -1, dtype=np.int64)  # -1: not flooded yet
    # a region's root is its first (highest) pixel: comparing roots compares heights
    rank = np.empty(ny * nx, dtype=np.int64)
    rank[order] = np.arange(order.size)
    saddle = dict.fromkeys((peaks[:, 0] * nx + peaks[:, 1]).tolist(), -np.inf)
    flat_box = box.ravel()

    def find(i: int) -> int:
        root = i
        while parents[root] != root:
            root = int(parents[root])
        while parents[i] != root:  # path compression
            parents[i], i = root, int(parents[i])
        return root

    for i in order.tolist():
        parents[i] = i
        r, c = divmod(i, nx)
        root = i
        for rr in (r - 1, r, r + 1):
            if rr < 0 or rr >= ny:
                continue
            for cc in (c - 1, c, c + 1):
                if cc < 0 or cc >= nx:
                    continue
                j = rr * nx + cc
                if parents[j] < 0:
                    continue
                other = find(j)
                if other == root:
                    continue
                # the region with the lower top ends here: its top's saddle is this level
                high, low = (root, other) if rank[root] < rank[other] else (other, root)
                if low in saddle:
                    saddle[low] = float(flat_box[i])
                parents[low] = high
                root = high
    return np.array([saddle[p] for p in (peaks[:, 0] * nx + peaks[:, 1]).tolist()])


def prominent(
    snr: np.ndarray,
    pixels: np.ndarray,
    pixel_labels: np.ndarray,
    peaks: np.ndarray,
    prominence: float,
    sigma: float,
) -> np.ndarray:
    """Mask of ``peaks`` ((k, 3) row, column, footprint label) to keep: each footprint's
    highest, and the others that rise above their `key_saddles` level by ``prominence``
    (noise) plus `sampling_dip` of their height.

    ``pixels`` (flat indices into ``snr``) and ``pixel_labels``: the footprints' pixels;
    ``sigma``: the PSF's trace radius (px) in the map.
    """
    margin = sampling_dip(sigma)
    keep = np.ones(len(peaks), dtype=bool)
    labels, count = np.unique(peaks[:, 2], return_counts=True)
    multi = labels[count > 1]
    if multi.size == 0:
        return keep
    nx = snr.shape[1]
    chosen = np.isin(pixel_labels, multi)
    sel_pixels, sel_labels = pixels[chosen], pixel_labels[chosen]
    by_label = np.argsort(sel_labels, kind="stable")
    bounds = np.searchsorted(sel_labels[by_label], multi, side="left")
    ends = np.searchsorted(sel_labels[by_label], multi, side="right")
    for label, a, b in zip(multi.tolist(), bounds.tolist(), ends.tolist(), strict=True):
        rows, cols = np.divmod(sel_pixels[by_label[a:b]], nx)
        r0, c0 = rows.min(), cols.min()
        region = (slice(r0, rows.max() + 1), slice(c0, cols.max() + 1))
        inside = np.zeros((region[0].stop - r0, region[1].stop - c0), dtype=bool)
        inside[rows - r0, cols - c0] = True
        mine = np.flatnonzero(peaks[:, 2] == label)
        at = peaks[mine, :2] - [r0, c0]
        height = snr[peaks[mine, 0], peaks[mine, 1]]
        need = prominence + margin * height
        # a saddle below every peak's height less its need keeps that peak whatever it is
        floor = float((height - need).min())
        keep[mine] = height - key_saddles(snr[region], inside, at, floor) >= need
    return keep
