"""Order statistics, medians, percentiles and MAD of 1-d arrays: numpy's (and astropy's)
numbers, bit for bit and type included, without numpy's selection of several ranks at
once. Values must be finite, except that `median` gives NaN for a NaN as numpy does;
`all_finite` tells, from the two extreme values, whether they are.

``np.partition`` with one rank runs a vectorised selection; given several (as
``np.median`` of an even count, ``np.percentile``, ``scipy.stats.iqr`` pass it) it
falls back to a scalar one about 10x slower (numpy 2.x: 41 ms against 3 ms for three
ranks of a million float32 values). Here every selection is of one rank: the ranks
are taken from the largest down, each in the part of the array below the previous one.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "all_finite",
    "order_statistics",
    "median",
    "percentiles",
    "median_and_percentile",
    "median_and_percentiles",
    "mad_std",
    "row_medians",
    "row_nanmedians",
]


def all_finite(array: np.ndarray) -> bool:
    """True when every value of ``array`` is finite, from its least and largest values
    (a NaN comes out of both, an infinity is one of them): two vectorised reductions
    instead of a frame of booleans (4096 x 4096 float32: ~5 ms, where the reader's
    per-pixel tests took ~34 ms of an image and ~41 ms of a variance)."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def order_statistics(values: np.ndarray, ranks, consume: bool = False) -> np.ndarray:
    """``np.sort(values, axis=None)[ranks]`` of an array of finite values, by one-rank
    selections in a copy (in ``values`` itself, reordered, when ``consume``).

    Faster than numpy's selection of several ranks at any size (a million float32
    values, three ranks: 7 ms against 41); from `_BRACKET_MIN` values on, the ranks are
    bracketed first (`_select_bracketed`).
    """
    ranks = np.asarray(ranks, dtype=np.intp)
    return _select(np.ravel(values) if consume else np.array(values).ravel(), ranks)


#: Values sampled to look for one value held by a large share of the array.
_TIE_SAMPLE = 256
#: Sampled share above which that value is split off before selecting.
_TIE_SHARE = 1 / 16


#: Least size of an array whose ranks are bracketed before selecting (`_select_bracketed`).
_BRACKET_MIN = 1 << 18
#: Every k-th value of the array sorted to bracket the ranks.
_BRACKET_STEP = 64
#: Half-width of a bracket in standard deviations of the sample's count below a rank
#: (binomial), plus two values.
_BRACKET_SIGMAS = 5.0
#: Most brackets (ranks far apart) worth two comparisons over the array each.
_BRACKET_MAX = 3


def _select(scratch: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """``np.sort(scratch)[ranks]``, reordering ``scratch`` (or reading it only, when one
    value holds a large share of it: `_select_around`, or its ranks are bracketed:
    `_select_bracketed`)."""
    if scratch.size > 4 * _TIE_SAMPLE:
        sample = scratch[:: scratch.size // _TIE_SAMPLE]
        values, counts = np.unique(sample, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > _TIE_SHARE * sample.size:
            return _select_around(scratch, ranks, values[top])
    if scratch.size >= _BRACKET_MIN:
        return _select_bracketed(scratch, ranks)
    return _select_partitioned(scratch, ranks)


def _select_bracketed(values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """`_select` of a large array: each rank's value is bracketed by two values of a
    sorted strided sample (every `_BRACKET_STEP`-th), and only the array's values in
    the bracket are selected among; the values below it are only counted. Two
    comparisons per value instead of a partition of all (the DIA noise factor's 2^21
    float32 S/N values, four ranks: ~20 -> ~7 ms of CPU). The result is exact whatever the
    sample: a rank the counts show outside its bracket (a sample unlike the array) is
    selected in the whole array, as without brackets."""
    n = values.size
    sample = np.sort(values[::_BRACKET_STEP])
    m = sample.size
    share = ranks / (n - 1)
    spread = _BRACKET_SIGMAS * np.sqrt(m * share * (1.0 - share)) + 2.0
    first = np.floor(share * (m - 1) - spread).astype(np.intp)
    last = np.ceil(share * (m - 1) + spread).astype(np.intp)
    # overlapping brackets (the two middle ranks of a median) merged into one
    groups: list[list] = []
    for i in np.argsort(first, kind="stable").tolist():
        if groups and first[i] <= groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], int(last[i]))
            groups[-1][2].append(i)
        else:
            groups.append([int(first[i]), int(last[i]), [i]])
    if len(groups) > _BRACKET_MAX:
        return _select_partitioned(values, ranks)
    out = np.empty(ranks.size, dtype=values.dtype)
    done = np.zeros(ranks.size, dtype=bool)
    for a, b, members in groups:
        low = sample[a] if a > 0 else -np.inf
        high = sample[b] if b < m - 1 else np.inf
        inside = values >= low
        below = n - int(np.count_nonzero(inside))
        inside &= values <= high
        within = values[inside]  # a copy, reordered by the selection
        wanted = ranks[members] - below
        if wanted.min() >= 0 and wanted.max() < within.size:
            out[members] = _select_partitioned(within, wanted)
            done[members] = True
    if not done.all():
        out[~done] = _select_partitioned(values, ranks[~done])
    return out


def _select_around(values: np.ndarray, ranks: np.ndarray, tied) -> np.ndarray:
    """`_select` of an array where ``tied`` is frequent: numpy's vectorised partition
    slows down many times when much of the array equals the pivot (a million float32
    with half of them equal: 64 ms against 7; a template's variance plane, flat on the
    sky, is like that), so ranks that fall on ``tied`` are read off the counts of
    values below and equal to it, and the others selected among the values below or
    above it alone."""
    below = values < tied
    n_below = int(np.count_nonzero(below))
    n_tied = int(np.count_nonzero(values == tied))
    out = np.empty(ranks.size, dtype=values.dtype)
    out[:] = tied
    low = ranks < n_below
    high = ranks >= n_below + n_tied
    if low.any():
        out[low] = _select(values[below], ranks[low])
    if high.any():
        out[high] = _select(values[values > tied], ranks[high] - n_below - n_tied)
    return out


def _select_partitioned(scratch: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """One-rank partitions from the largest rank down, each of the part below the rank
    before (all of it <= that value)."""
    out = np.empty(ranks.size, dtype=scratch.dtype)
    top = scratch.size  # scratch[:top] holds the `top` smallest values
    for i in np.argsort(ranks, kind="stable")[::-1]:
        rank = int(ranks[i])
        if rank < top - 1:
            scratch[:top].partition(rank)
        elif rank == top - 1:  # the largest of what is left: moved to its place
            at = int(np.argmax(scratch[:top]))
            scratch[at], scratch[rank] = scratch[rank], scratch[at]
        out[i] = scratch[rank]
        top = rank
    return out


def median(sample: np.ndarray, consume: bool = False):
    """``np.median(sample)`` of a 1-d array (same number, same type; NaN if any value is
    or none is given);
    ``consume``: ``sample`` is not needed afterwards (reordered, not copied)."""
    n = sample.size
    if n == 0 or np.isnan(sample).any():
        return np.float64(np.nan) if n == 0 else sample.dtype.type(np.nan)
    mid_a, mid_b = order_statistics(sample, [(n - 1) // 2, n // 2], consume)
    return _mean_of_middle(mid_a, mid_b, n)


def percentiles(sample: np.ndarray, percents, consume: bool = False) -> list[float]:
    """``np.percentile(sample, percents)`` for a list of ``percents`` (numpy's default
    "linear" method) of a 1-d array of finite values, bit for bit: numpy interpolates
    a list's quantiles in float64 (a single percent's in the sample's type)."""
    return median_and_percentiles(sample, percents, consume)[1]


def median_and_percentiles(sample: np.ndarray, percents, consume: bool = False):
    """(``np.median(sample)``, `percentiles` ``(sample, percents)``) from one selection."""
    n = sample.size
    brackets = [_bracket(n, percent) for percent in percents]
    ranks = [(n - 1) // 2, n // 2]
    ranks += [rank for below, _ in brackets for rank in (below, min(below + 1, n - 1))]
    values = order_statistics(sample, ranks, consume)
    out = []
    for k, (_, gamma) in enumerate(brackets):
        a, b = values[2 * k + 2], values[2 * k + 3]
        diff = np.float64(b - a)  # the difference in the sample's type, as numpy's
        out.append(float(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma))
    return _mean_of_middle(values[0], values[1], n), out


def median_and_percentile(sample: np.ndarray, percent: float, consume: bool = False):
    """(np.median(sample), np.percentile(sample, percent)) of a 1-d array of finite values,
    from one selection, with numpy's arithmetic."""
    n = sample.size
    below, gamma = _bracket(n, percent)
    ranks = [(n - 1) // 2, n // 2, below, min(below + 1, n - 1)]
    mid_a, mid_b, a, b = order_statistics(sample, ranks, consume)
    return _mean_of_middle(mid_a, mid_b, n), _lerp(a, b, gamma)


def mad_std(values: np.ndarray, consume: bool = False):
    """``astropy.stats.mad_std(values)`` of a 1-d float array (the same number, of the
    same type); ``consume``: ``values`` are not needed afterwards (overwritten by the
    absolute deviations instead of copied)."""
    if not consume:
        values = values.copy()
    centre = median(values, consume=True)  # reordered: the deviations do not care
    np.subtract(values, centre, out=values)
    np.abs(values, out=values)
    return median(values, consume=True) * 1.482602218505602


def row_medians(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=1)`` of a 2-d array of finite values (same numbers and
    type): its rows sorted (numpy's vectorised sort beats its selection along an axis
    ~10x on a few hundred kernel stamps)."""
    n = values.shape[1]
    ordered = np.sort(values, axis=1)
    if n % 2:
        return ordered[:, n // 2]
    return np.mean(ordered[:, [n // 2 - 1, n // 2]], axis=1)


def row_nanmedians(values: np.ndarray, consume: bool = False) -> np.ndarray:
    """``np.nanmedian(values, axis=1)`` of a 2-d float array, in float64 (NaN for a row
    of NaN only), as `row_medians` does it: the rows sorted (NaN last) and the middle of
    each row's values taken, ~5x faster than ``np.median`` along the rows (1000 rings of
    368 px). With ``consume`` ``values`` is sorted in place."""
    ordered = values if consume else values.copy()
    count = np.count_nonzero(~np.isnan(ordered), axis=1)
    ordered.sort(axis=1)
    rows = np.arange(ordered.shape[0])
    low = ordered[rows, np.maximum((count - 1) // 2, 0)].astype(np.float64)
    out = 0.5 * (low + ordered[rows, np.maximum(count // 2, 0)])
    out[count == 0] = np.nan
    return out


def _bracket(n: int, percent: float) -> tuple[int, float]:
    virtual = (n - 1) * (percent / 100)  # numpy's virtual index of the linear method
    below = min(max(int(math.floor(virtual)), 0), n - 1)
    return below, virtual - below


def _lerp(a, b, gamma: float):
    # numpy's lerp: from the nearer end, in the sample's precision
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def _mean_of_middle(mid_a, mid_b, n: int):
    # np.median's mean of the middle pair (of the one middle value), in the sample's type
    return np.mean(np.array([mid_a, mid_b] if n % 2 == 0 else [mid_b]))
