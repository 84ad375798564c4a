"""Sigma-clipped median and standard deviation of a large sample, from one sort.

`astropy.stats.sigma_clipped_stats` with ``stdfunc="mad_std"`` selects the kept
values anew on every pass (a median and a median absolute deviation each time:
four partial sorts of the whole sample per pass). On sorted values every kept set
is an index range, so each pass is a few binary searches: the median is an index
lookup, and the median absolute deviation is an order statistic of two sorted
runs (the values below the median, read backwards, and those above it). The
results are astropy's, to rounding of the final mean and standard deviation.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sigma_clipped_median_std"]

#: 1 / Phi^-1(3/4): the MAD of a Gaussian times this is its sigma (astropy's ``mad_std``).
_MAD_TO_SIGMA = 1.482602218505602


def _first_at_or_above(v: np.ndarray, bound: float) -> int:
    """Index of the first value >= ``bound`` (a float64) in sorted ``v``, compared exactly
    whatever the type of ``v`` (no float64 copy of a float32 array)."""
    if v.dtype == np.float64 or math.isnan(bound):
        return int(np.searchsorted(v, np.float64(bound), side="left"))
    b = v.dtype.type(bound)
    if float(b) < bound:  # rounded down: the smallest value of v's type >= bound is next
        b = np.nextafter(b, v.dtype.type(np.inf))
    return int(np.searchsorted(v, b, side="left"))


def _first_above(v: np.ndarray, bound: float) -> int:
    """Index of the first value > ``bound`` (a float64) in sorted ``v``, compared exactly."""
    if v.dtype == np.float64 or math.isnan(bound):
        return int(np.searchsorted(v, np.float64(bound), side="right"))
    b = v.dtype.type(bound)
    if float(b) > bound:  # rounded up: the largest value of v's type <= bound is before
        b = np.nextafter(b, v.dtype.type(-np.inf))
    return int(np.searchsorted(v, b, side="right"))


def _range_median(v: np.ndarray, a: int, b: int) -> float:
    count = b - a
    mid = a + count // 2
    if count % 2:
        return float(v[mid])
    return (float(v[mid - 1]) + float(v[mid])) / 2.0


def _kth_distance(v: np.ndarray, a: int, b: int, m: float, k: int) -> float:
    """The k-th smallest (0-based) of |v[i] - m| for i in [a, b); v sorted, m a median."""
    p = int(np.searchsorted(v[a:b], m, side="left")) + a
    n_left, n_right = p - a, b - p

    def left(i: int) -> float:  # i-th smallest distance below m
        return m - float(v[p - 1 - i])

    def right(j: int) -> float:  # j-th smallest distance at or above m
        return float(v[p + j]) - m

    # take i of the k + 1 smallest from the left run and k + 1 - i from the right one
    lo, hi = max(0, k + 1 - n_right), min(k + 1, n_left)
    while True:
        i = (lo + hi) // 2
        j = k + 1 - i
        if i < n_left and j > 0 and right(j - 1) > left(i):
            lo = i + 1
        elif i > 0 and j < n_right and left(i - 1) > right(j):
            hi = i - 1
        else:
            candidates = ([left(i - 1)] if i > 0 else []) + ([right(j - 1)] if j > 0 else [])
            return max(candidates)


def _mad_std(v: np.ndarray, a: int, b: int, m: float) -> float:
    count = b - a
    k = count // 2
    if count % 2:
        mad = _kth_distance(v, a, b, m, k)
    else:
        mad = (_kth_distance(v, a, b, m, k - 1) + _kth_distance(v, a, b, m, k)) / 2.0
    return mad * _MAD_TO_SIGMA


def sigma_clipped_median_std(
    values: np.ndarray, sigma: float = 3.0, maxiters: int = 10
) -> tuple[float, float]:
    """Median and standard deviation after sigma clipping about the median, with the
    clipping width from the MAD (``sigma_clipped_stats(values, sigma=sigma,
    maxiters=maxiters, stdfunc="mad_std")[1:]``). Non-finite values are ignored.

    ``values`` may be float32: they are sorted as they are and read in float64
    (exactly the values astropy would see after ``astype(np.float64)``).
    """
    # sorted in their own type (float32 sorts twice as fast) and never copied: NaNs
    # sort last and infinities next to them, so the finite values are one slice
    v = np.sort(np.asarray(values).ravel())
    if v.dtype.kind != "f":
        v = v.astype(np.float64)
    start = int(np.searchsorted(v, -np.inf, side="right"))
    stop = int(np.searchsorted(v, np.inf, side="left"))
    finite = v[start:stop]
    n = finite.size
    if n == 0:
        return math.nan, math.nan
    a, b = 0, n
    lower = upper = math.nan
    for _ in range(maxiters):
        median = _range_median(finite, a, b)
        std = _mad_std(finite, a, b, median)
        lower, upper = median - std * sigma, median + std * sigma
        new_a = max(a, _first_at_or_above(finite, lower))
        new_b = min(b, _first_above(finite, upper))
        changed = (b - a) - max(new_b - new_a, 0)
        a, b = new_a, max(new_b, new_a)
        if changed == 0 or b == a:
            break
    # the last bounds select from all values, as astropy's final mask does
    a = _first_at_or_above(finite, lower)
    b = _first_above(finite, upper)
    if b <= a:
        return math.nan, math.nan
    kept = finite[a:b].astype(np.float64)
    mean = kept.mean()
    return _range_median(finite, a, b), float(np.sqrt(np.mean(np.square(kept - mean))))
