"""Lines of DIA sources: satellite and aircraft trails, bad rows or columns, and the
row and column artifacts of saturated stars (CCD overshoot, bleeding), which a
detection on the difference breaks into sources strung along one straight line.

Transients and subtraction residuals are scattered; a trail's detections sit on it a
few to tens of PSF widths apart (the matched filter's peaks along a ridge: 11 sources
within 0.23 px of a simulated trail, up to 27 FWHM apart), and the residual band along
a saturated star's row in SAAO frame 0028 gave 11 sources within 0.4 px of one row.
Sources are taken as a line when at least `MIN_SOURCES` of them lie within
`WIDTH_FWHM` PSF FWHMs of one straight line, each within `GAP_FWHM` of the next along
it, and so many so close are unlikely by chance given the density of sources beside
the line (`FALSE_LINES`): none in 40 random fields of 1100 or 3000 sources per
4096^2, nor in the clumps of residuals around bright JWST stars.

Rubin finds trails in the image (a Hough transform of the detection mask, STREAK
plane); an input's STREAK plane raises the same flag (`core.forced.FLAG_BITS`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import poisson

__all__ = [
    "BESIDE_FWHM",
    "DISTINCT_FWHM",
    "FALSE_LINES",
    "GAP_FWHM",
    "MAX_PAIRS",
    "MIN_SOURCES",
    "SEED_FWHM",
    "WIDTH_FWHM",
    "on_lines",
]

#: Least number of sources on a line (at least `DISTINCT_FWHM` apart).
MIN_SOURCES = 5
#: Largest distance (PSF FWHMs) of a source from the line.
WIDTH_FWHM = 0.15
#: Largest step (PSF FWHMs) along the line from one source to the next.
GAP_FWHM = 40.0
#: A line is proposed by three of its sources within this (PSF FWHMs) of each other:
#: a trail has such triples among wider steps, and random fields few.
SEED_FWHM = 15.0
#: Half-width (PSF FWHMs) of the strips beside a line whose sources give the density
#: a chance alignment is measured against.
BESIDE_FWHM = 3.0
#: Lines expected by chance, at most, for a line to be taken.
FALSE_LINES = 0.01
#: Sources closer than this (PSF FWHMs) along a line count as one.
DISTINCT_FWHM = 1.5
#: Pairs of sources within `SEED_FWHM` of each other (expected from their density)
#: above which no line is searched for: 5000 sources per 4096^2 (17000 pairs) take 0.13 s,
#: 20000 (270000) 5-11 s; the dense test field has 800, a SAAO frame up to 500.
MAX_PAIRS = 20_000


def on_lines(x: np.ndarray, y: np.ndarray, fwhm: float) -> np.ndarray:
    """True for the sources (positions ``x``, ``y`` in px) that lie on a line of sources.

    A source between two others, on their line and within `SEED_FWHM` of each,
    proposes that line (so most sources, with fewer than two such neighbours, cost
    nothing); the sources near it are chained along it, the line is refitted to the
    chain (total least squares) and the chain taken again; a chain of at least
    `MIN_SOURCES` that chance does not explain (`_significant`) is a line.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    found = np.zeros(x.size, dtype=bool)
    finite = np.isfinite(x) & np.isfinite(y)
    if np.count_nonzero(finite) < MIN_SOURCES or not fwhm > 0:
        return found
    index = np.flatnonzero(finite)
    points = np.column_stack([x[index], y[index]])
    extent = np.ptp(points, axis=0)
    area = max(float(extent[0] * extent[1]), 1.0)
    neighbours = index.size * math.pi * (SEED_FWHM * fwhm) ** 2 / area
    if index.size * neighbours > MAX_PAIRS:
        # the search costs seconds (it grows with the pairs of neighbours): a failed
        # subtraction's thousands of crowded sources, not a field of transients
        return found
    gap, width = GAP_FWHM * fwhm, WIDTH_FWHM * fwhm
    done = np.zeros(index.size, dtype=bool)
    # the tested chain each source was last in: a triple whose two sources were chained
    # together already proposes the same line again
    chained = np.full(index.size, -1)
    for tested, (a, b) in enumerate(_collinear_triples(points, SEED_FWHM * fwhm, width)):
        if done[b] or chained[a] == chained[b] >= 0:
            continue
        centre, unit = points[b], points[a] - points[b]
        unit = unit / np.hypot(*unit)
        chain = np.zeros(0, dtype=int)
        for _ in range(3):  # the triple's line, then the fits to its chain
            chain = _chain(points, centre, unit, width, gap, b)
            if chain.size < 3:
                break
            centre, unit = _fit_line(points[chain])
        chained[chain] = tested
        if chain.size >= MIN_SOURCES and _significant(
            points, area, chain, centre, unit, fwhm, width
        ):
            done[chain] = True
    found[index[done]] = True
    return found


def _collinear_triples(points: np.ndarray, gap: float, width: float) -> list[tuple[int, int]]:
    """(a, b) for every source b lying between two neighbours a and c (each within
    ``gap``) and within ``width`` of their line.

    Vectorised over the sources with the same number of neighbours: a Python loop
    over the sources cost 6 ms for the dense field's 1100, and 20-28 ms beside the
    DIA stage's other threads."""
    pairs = cKDTree(points).query_pairs(gap, output_type="ndarray")
    if pairs.size == 0:
        return []
    # every neighbour of each source, grouped by source
    edges = np.concatenate([pairs, pairs[:, ::-1]])
    edges = edges[np.argsort(edges[:, 0], kind="stable")]
    counts = np.bincount(edges[:, 0], minlength=points.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    seeds: list[tuple[int, int]] = []
    for k in np.unique(counts[counts >= 2]).tolist():
        centres = np.flatnonzero(counts == k)
        around = edges[starts[centres][:, None] + np.arange(k), 1]  # (m, k)
        v = points[around] - points[centres][:, None, :]
        first, second = np.triu_indices(k, 1)
        vi, vj = v[:, first], v[:, second]
        dot = np.einsum("mpc,mpc->mp", vi, vj)
        cross = vi[..., 0] * vj[..., 1] - vi[..., 1] * vj[..., 0]
        span = np.hypot(*(vi - vj).transpose(2, 0, 1))
        # b's distance from the line a-c is |cross| / span; opposite sides: dot < 0
        ok = (dot < 0) & (np.abs(cross) <= width * span)
        rows, which = np.nonzero(ok)
        seeds += zip(around[rows, first[which]].tolist(), centres[rows].tolist(), strict=True)
    return seeds


def _chain(points, centre, unit, width: float, gap: float, seed: int) -> np.ndarray:
    """Indices of the sources within ``width`` of the line through ``centre`` along
    ``unit`` that are linked to source ``seed`` by steps of at most ``gap`` along it."""
    offset = points - centre
    across = offset[:, 0] * unit[1] - offset[:, 1] * unit[0]
    near = np.flatnonzero(np.abs(across) <= width)
    if seed not in near:
        return np.zeros(0, dtype=int)
    along = offset[near] @ unit
    order = np.argsort(along)
    near, along = near[order], along[order]
    breaks = np.flatnonzero(np.diff(along) > gap) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [near.size]])
    at = int(np.flatnonzero(near == seed)[0])
    part = np.searchsorted(ends, at, side="right")
    return near[starts[part] : ends[part]]


def _significant(points, area: float, chain, centre, unit, fwhm: float, width: float) -> bool:
    """Whether so many sources so close to one line are unlikely by chance: fewer than
    `FALSE_LINES` such lines expected among the pairs of sources (spread over ``area``,
    their bounding box) no farther apart than the chain is long, were the sources
    scattered at random with the density found beside the line (within `BESIDE_FWHM`
    FWHMs of it, the chain left out; a clump of residuals is dense)."""
    offset = points - centre
    along = offset @ unit
    across = np.abs(offset[:, 0] * unit[1] - offset[:, 1] * unit[0])
    lo, hi = along[chain].min(), along[chain].max()
    beside = BESIDE_FWHM * fwhm
    in_span = (along >= lo) & (along <= hi)
    others = np.count_nonzero(in_span & (across <= beside)) - chain.size
    # one more than seen: no neighbour is not proof of an empty field
    density = (max(others, 0) + 1) / (2.0 * beside * max(hi - lo, fwhm))
    expected = density * 2.0 * width * (hi - lo)
    # sources closer than `DISTINCT_FWHM` to the last one counted along the line count
    # once: residuals come in clumps (two beside each of two bright stars are not four
    # aligned points), while a row broken into close sources still counts them all
    distinct, last = 0, -np.inf
    for position in np.sort(along[chain]):
        if position - last > DISTINCT_FWHM * fwhm:
            distinct, last = distinct + 1, position
    if distinct < MIN_SOURCES:
        return False
    # two sources define the line; the rest fell in its strip. The lines tried are the
    # pairs of sources no farther apart than the chain's length
    chance = poisson.sf(distinct - 3, expected)
    n = points.shape[0]
    tests = n * (n - 1) / 2 * min(1.0, math.pi * (hi - lo) ** 2 / area)
    return tests * chance < FALSE_LINES


def _fit_line(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and unit direction of the total-least-squares line through ``points``."""
    centre = points.mean(axis=0)
    _, _, rows = np.linalg.svd(points - centre, full_matrices=False)
    return centre, rows[0]
