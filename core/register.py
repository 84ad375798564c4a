"""Registration: find where each science pixel falls on the template, then warp the template.

`register_template` is the pipeline's registration step. With two celestial
WCSs it takes the pixel map they imply and corrects it on matched stars (a
pipeline WCS is often good to only a few tenths of a pixel); without a WCS it
matches stars directly. Stars are matched by triangles: each star and pairs of
its nearest neighbours form triangles whose side ratios do not change under
translation, rotation and scale; nearby invariants propose transforms, and
the one most stars agree with (counted on a KD-tree) wins, as in RANSAC. The
transform is then refitted on its inliers, its model (translation, similarity,
affine) chosen by the Bayesian information criterion.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import poisson

from . import order
from .config import DetectionConfig, RegistrationConfig
from .detection import DetectionMemo, detect_sources
from .errors import IncompatibleInputsError, InsufficientSourcesError, RegistrationError
from .exposure import Exposure
from .parallel import split_map
from .warp import PixelMap, warp_exposure, wcs_with_epoch_of

__all__ = [
    "Registration",
    "StarMatch",
    "star_positions",
    "match_stars",
    "register",
    "register_template",
]

log = logging.getLogger("alsub.register")

_MODEL_PARAMETERS = {"translation": 2, "similarity": 4, "affine": 6}
_REFINE_ITERATIONS = 4
_INVARIANT_NEIGHBOURS = 3  # candidate template triangles per science triangle
_PLENTY = 3  # this many times min_matches stars on both images should always match


@dataclass
class StarMatch:
    """A transform fitted on matched stars: (u, v) = matrix @ (x, y) + offset.

    ``covariance`` is that of the six affine parameters (u: a, b, c; v: d, e, f).
    ``misfit`` is the transform's error apart from the centroids' noise (`_misfit`;
    the rms when the stars' S/N are unknown).
    """

    model: str
    matrix: np.ndarray
    offset: np.ndarray
    rms: float
    n_matched: int
    covariance: np.ndarray
    pairs: np.ndarray  # (n, 2) indices into (source, destination)
    n_source: int = 0
    n_destination: int = 0
    misfit: float = math.nan

    def apply(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        m, t = self.matrix, self.offset
        return m[0, 0] * x + m[0, 1] * y + t[0], m[1, 0] * x + m[1, 1] * y + t[1]


@dataclass
class Registration:
    """Outcome of registering a template onto a science image."""

    pixel_map: PixelMap
    method: str
    resampled: bool
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- stars
def star_positions(
    exposure: Exposure,
    config: RegistrationConfig,
    detection: DetectionConfig | None = None,
    memo: DetectionMemo | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Parent (x, y) (n, 2) and S/N (n,) of the brightest clean stars, brightest first.

    Saturated, edge, masked and low-S/N detections are left out. The exposure's
    mask is not changed. ``memo`` keeps the background mesh and catalog for the
    steps after registration (PSF estimation and detection of the same exposure).
    """
    empty = (np.zeros((0, 2)), np.zeros(0))
    try:
        mesh = memo.mesh(exposure, detection) if memo is not None else None
        table = detect_sources(exposure, detection, set_mask=False, background=mesh)
    except InsufficientSourcesError:
        return empty
    if memo is not None:
        memo.keep(exposure, detection, table)
    if len(table) == 0:
        return empty
    keep = np.asarray(table["snr"], float) >= config.min_snr
    for flag in ("flag_saturated", "flag_edge", "flag_masked"):
        if flag in table.colnames:
            keep &= ~np.asarray(table[flag], bool)
    xy = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])[keep]
    flux = np.asarray(table["flux"], float)[keep]
    snr = np.asarray(table["snr"], float)[keep]
    good = np.all(np.isfinite(xy), axis=1) & np.isfinite(flux)
    xy, flux, snr = xy[good], flux[good], snr[good]
    order = np.argsort(-flux, kind="stable")[: config.max_stars]
    return xy[order], snr[order]


def _triangles(xy: np.ndarray, neighbours: int):
    """Triangles of each star with pairs of its nearest neighbours.

    Returns (vertices (n, 3) indices ordered by the length of the opposite side,
    shortest first; invariants (n, 2) = (mid/long, short/mid) side ratios).
    """
    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), int), np.zeros((0, 2))
    k = min(neighbours, n - 1)
    _, near = cKDTree(xy).query(xy, k + 1)
    pairs = np.array(list(combinations(range(1, k + 1), 2)))
    tri = np.concatenate(
        [np.repeat(near[:, :1], len(pairs), axis=0), near[:, pairs].reshape(-1, 2)], axis=1
    )
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = xy[tri]  # (m, 3, 2)
    opposite = np.stack(
        [
            np.hypot(*(p[:, 1] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 2]).T),
            np.hypot(*(p[:, 0] - p[:, 1]).T),
        ],
        axis=1,
    )
    order = np.argsort(opposite, axis=1)
    sides = np.take_along_axis(opposite, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    ok = sides[:, 0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        invariants = np.stack([sides[:, 1] / sides[:, 2], sides[:, 0] / sides[:, 1]], axis=1)
    return tri[ok], invariants[ok]


def _similarity_batch(src: np.ndarray, dst: np.ndarray):
    """Least-squares similarity maps of point sets (h, k, 2) -> (h, k, 2): (matrix, offset)."""
    src_c = src - src.mean(axis=1, keepdims=True)
    dst_c = dst - dst.mean(axis=1, keepdims=True)
    norm = np.sum(src_c**2, axis=(1, 2))
    a = np.sum(src_c[..., 0] * dst_c[..., 0] + src_c[..., 1] * dst_c[..., 1], axis=1) / norm
    b = np.sum(src_c[..., 0] * dst_c[..., 1] - src_c[..., 1] * dst_c[..., 0], axis=1) / norm
    matrix = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], axis=1)
    offset = dst.mean(axis=1) - np.einsum("hij,hj->hi", matrix, src.mean(axis=1))
    return matrix, offset


def _fit(src: np.ndarray, dst: np.ndarray, model: str, weights: np.ndarray | None = None):
    """Weighted least-squares dst ~ matrix @ src + offset; returns (matrix, offset, cov, rss)."""
    n = len(src)
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones(n), np.zeros(n)
    if model == "translation":
        design = np.block([[one[:, None], zero[:, None]], [zero[:, None], one[:, None]]])
    elif model == "similarity":
        design = np.block(
            [
                [x[:, None], -y[:, None], one[:, None], zero[:, None]],
                [y[:, None], x[:, None], zero[:, None], one[:, None]],
            ]
        )
    else:
        block = np.column_stack([x, y, one])
        design = np.block([[block, np.zeros((n, 3))], [np.zeros((n, 3)), block]])
    target = np.concatenate([dst[:, 0], dst[:, 1]])
    if model == "translation":  # dst = src + t: the offsets are the data
        target = target - np.concatenate([x, y])
    if weights is not None:
        root = np.sqrt(np.concatenate([weights, weights]))
        design, target = design * root[:, None], target * root
    params, *_ = np.linalg.lstsq(design, target, rcond=None)
    rss = float(np.sum((design @ params - target) ** 2))
    dof = max(2 * n - len(params), 1)
    try:
        cov_p = np.linalg.inv(design.T @ design) * rss / dof
    except np.linalg.LinAlgError:
        cov_p = np.full((len(params), len(params)), np.inf)
    if model == "translation":
        matrix, offset = np.eye(2), params
        expand = np.zeros((6, 2))
        expand[2, 0] = expand[5, 1] = 1.0
    elif model == "similarity":
        a, b, tx, ty = params
        matrix, offset = np.array([[a, -b], [b, a]]), np.array([tx, ty])
        expand = np.zeros((6, 4))
        expand[0, 0] = expand[4, 0] = 1.0
        expand[1, 1], expand[3, 1] = -1.0, 1.0
        expand[2, 2] = expand[5, 3] = 1.0
    else:
        matrix, offset = np.array([params[:2], params[3:5]]), np.array([params[2], params[5]])
        expand = np.eye(6)
    return matrix, np.asarray(offset, float), expand @ cov_p @ expand.T, rss


def _pairs_within(src_mapped: np.ndarray, dst: np.ndarray, radius: float) -> np.ndarray:
    """Mutual nearest neighbours closer than ``radius``: (n, 2) indices (src, dst)."""
    if len(src_mapped) == 0 or len(dst) == 0:
        return np.zeros((0, 2), int)
    d_fwd, j = cKDTree(dst).query(src_mapped, distance_upper_bound=radius)
    _, i_back = cKDTree(src_mapped).query(dst, distance_upper_bound=radius)
    i = np.arange(len(src_mapped))
    ok = np.isfinite(d_fwd)
    ok[ok] &= i_back[j[ok]] == i[ok]
    return np.column_stack([i[ok], j[ok]])


def match_stars(
    src: np.ndarray,
    dst: np.ndarray,
    config: RegistrationConfig,
    src_snr: np.ndarray | None = None,
    dst_snr: np.ndarray | None = None,
) -> StarMatch:
    """Find the transform taking star positions ``src`` (n, 2) onto ``dst`` (m, 2).

    Both lists are brightest first. With the stars' S/N given, the final fit
    weights each pair by 1 / (1/snr_src^2 + 1/snr_dst^2) (centroid errors scale
    as 1/S/N).

    Raises
    ------
    RegistrationError
        Too few stars, no transform that more stars agree with than chance
        coincidences explain, or a residual rms above ``config.max_rms``.
    """
    need = config.min_matches
    if len(src) < need or len(dst) < need:
        raise RegistrationError(
            f"misregistration: too few stars to register ({len(src)} on the science image, "
            f"{len(dst)} on the template; {need} needed). Give both images a WCS and use "
            "registration.mode 'wcs', or warp the template yourself and use 'none'."
        )
    n_tri = config.triangle_stars
    tri_s, inv_s = _triangles(src[:n_tri], config.triangle_neighbours)
    tri_d, inv_d = _triangles(dst[:n_tri], config.triangle_neighbours)
    if len(tri_s) == 0 or len(tri_d) == 0:
        raise RegistrationError("misregistration: too few stars to form matching triangles")
    k = min(_INVARIANT_NEIGHBOURS, len(tri_d))
    _, cand = cKDTree(inv_d).query(inv_s, k)
    cand = np.asarray(cand).reshape(len(inv_s), -1)
    hyp_s = np.repeat(tri_s, cand.shape[1], axis=0)
    hyp_d = tri_d[cand.ravel()]
    matrices, offsets = _similarity_batch(src[:n_tri][hyp_s], dst[:n_tri][hyp_d])
    # the prior itself (``src`` comes mapped by it: the identity, or the WCSs' map) is a
    # trial too: where the brightest detections of one image are mostly cosmic rays, no
    # triangle of them finds the stars' transform (100 on a 512^2 frame without WCS
    # refused an aligned pair)
    matrices = np.concatenate([matrices, np.eye(2)[None]])
    offsets = np.concatenate([offsets, np.zeros((1, 2))])
    ok = np.all(np.isfinite(matrices), axis=(1, 2))
    matrices, offsets = matrices[ok], offsets[ok]
    if len(matrices) == 0:
        raise RegistrationError("misregistration: no plausible trial transform between the stars")
    # count the stars each trial transform brings within match_radius of a template star
    mapped = np.einsum("hij,nj->hni", matrices, src) + offsets[:, None, :]
    dist, _ = cKDTree(dst).query(mapped.reshape(-1, 2), distance_upper_bound=config.match_radius)
    votes = np.isfinite(dist).reshape(len(matrices), len(src)).sum(axis=1)
    best = int(np.argmax(votes))
    chance = _chance_matches(src, dst, config.match_radius)
    # each trial matches its own three triangle stars by construction; beyond those, the best
    # of many trials must beat what chance gives any of them with small probability
    by_chance = float(poisson.isf(config.false_match_probability / len(votes), chance))
    threshold = max(need, 3 + by_chance + 1)
    if votes[best] < threshold:
        raise RegistrationError(
            f"misregistration: no transform matches enough stars (best {int(votes[best])} of "
            f"{len(src)}, {threshold:.0f} needed, {chance:.1f} expected by chance): the images "
            "may show different fields. Check the inputs, or warp the template yourself."
        )
    matrix, offset = matrices[best], offsets[best]
    radius = config.match_radius
    pairs = np.zeros((0, 2), int)
    model = "affine"
    for _ in range(_REFINE_ITERATIONS):
        mapped_best = src @ matrix.T + offset
        pairs = _pairs_within(mapped_best, dst, radius)
        if len(pairs) < need:
            break
        model = "similarity" if len(pairs) < 2 * _MODEL_PARAMETERS["affine"] else "affine"
        matrix, offset, _, rss = _fit(src[pairs[:, 0]], dst[pairs[:, 1]], model)
        rms = math.sqrt(rss / len(pairs))
        # tighten to the measured scatter, never past the trial radius
        radius = min(config.match_radius, max(4.0 * rms, 0.5))
    if len(pairs) < need:
        raise RegistrationError(
            f"misregistration: only {len(pairs)} stars match after refinement ({need} needed)"
        )
    weights = None
    if src_snr is not None and dst_snr is not None:
        weights = 1.0 / (1.0 / src_snr[pairs[:, 0]] ** 2 + 1.0 / dst_snr[pairs[:, 1]] ** 2)
        weights = weights / weights.mean()
    return _select_model(src[pairs[:, 0]], dst[pairs[:, 1]], pairs, config, weights)


def _chance_matches(src: np.ndarray, dst: np.ndarray, radius: float) -> float:
    """Stars of ``src`` expected within ``radius`` of a ``dst`` star by chance."""
    span = np.ptp(dst, axis=0) if len(dst) > 1 else np.ones(2)
    area = max(float(span[0] * span[1]), 1.0)
    return len(src) * min(1.0, len(dst) * math.pi * radius**2 / area)


def _select_model(src, dst, pairs, config: RegistrationConfig, weights=None) -> StarMatch:
    """Fit the configured model, or the simplest the matches support (BIC); clip outliers.
    ``weights``: each pair's centroid precision (1 / (1/S/N_src^2 + 1/S/N_dst^2), to a
    common scale), when the S/N are known: the misfit test then discounts centroid noise."""
    models = (
        [config.transform]
        if config.transform != "auto"
        else [m for m in _MODEL_PARAMETERS if len(src) >= _MODEL_PARAMETERS[m] + 2]
    )
    keep = np.ones(len(src), bool)
    precision = weights
    if weights is None:
        weights = np.ones(len(src))
    best: tuple | None = None
    for _ in range(5):
        best = None
        for model in models:
            matrix, offset, cov, rss = _fit(src[keep], dst[keep], model, weights[keep])
            n2 = 2 * int(keep.sum())
            bic = n2 * math.log(max(rss, 1e-12) / n2) + _MODEL_PARAMETERS[model] * math.log(n2)
            if best is None or bic < best[0]:
                best = (bic, model, matrix, offset, cov, rss)
        assert best is not None
        _, model, matrix, offset, cov, rss = best
        # residuals in units of each pair's expected error; for 2-D Gaussian errors the
        # median distance is 1.1774 sigma, and 3.5 sigma leaves 0.2% of good pairs out
        distance = np.hypot(*(src @ matrix.T + offset - dst).T) * np.sqrt(weights)
        sigma = max(float(np.median(distance[keep])) / 1.1774, 1e-6)
        new_keep = distance <= config.clip_sigma * sigma
        if new_keep.sum() < config.min_matches or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    assert best is not None
    _, model, matrix, offset, cov, rss = best
    n = int(keep.sum())
    residual = src[keep] @ matrix.T + offset - dst[keep]
    rms = math.sqrt(float(np.mean(np.sum(residual**2, axis=1))))
    if precision is None:
        scatter, what = rms, "rms"
    else:
        scatter, what = _misfit(src, dst, 1.0 / precision, model, keep), "rms beyond centroid noise"
    if scatter > config.max_rms:
        raise RegistrationError(
            f"misregistration: matched stars scatter by {scatter:.2f} px {what} about the "
            f"best {model} transform (at most {config.max_rms} px accepted; {rms:.2f} px "
            "rms in all); the images may be distorted differently or show different fields"
        )
    return StarMatch(model, matrix, offset, rms, n, cov, pairs[keep], misfit=scatter)


#: Most matched pairs `_misfit`'s regression takes (evenly spaced in brightness order).
_MISFIT_PAIRS = 1000


def _misfit(src, dst, variance, model: str, keep: np.ndarray) -> float:
    """The transform's position error apart from centroid noise: fitted unweighted on
    the kept pairs (a fit weighted by S/N bends to its few brightest stars and hides a
    distortion in the faint ones), each matched pair's squared residual is regressed
    (Theil-Sen: robust to mismatches) on its centroid ``variance`` (1 / S/N_src^2 + 1 /
    S/N_dst^2 to any scale: the intercept does not depend on it); the intercept is the
    squared error of a star measured without noise. Faint stars' centroid noise (~FWHM /
    S/N) is no misregistration: with FWHM 10 px PSFs it alone made the rms of an aligned
    pair 0.55 px."""
    from scipy.stats import theilslopes

    matrix, offset, _, _ = _fit(src[keep], dst[keep], model)
    squared = np.sum((src @ matrix.T + offset - dst) ** 2, axis=1)
    # Theil-Sen takes every pair of points: at most ~1000 of them (4 ms; 5000 took 2 s)
    every = slice(None, None, -(-len(squared) // _MISFIT_PAIRS))
    _, intercept, _, _ = theilslopes(squared[every], variance[every])
    return math.sqrt(max(float(intercept), 0.0))


# --------------------------------------------------------------------------- registration
def register(
    template: Exposure,
    science: Exposure,
    config: RegistrationConfig | None = None,
    detection: DetectionConfig | None = None,
    memo: DetectionMemo | None = None,
) -> Registration:
    """The pixel map from the science grid onto the template, and how it was found.

    Parameters
    ----------
    template, science : `Exposure`
    config : `RegistrationConfig` or None
    detection : `DetectionConfig` or None
        Detection settings for the stars matched.
    memo : `DetectionMemo` or None
        Receives the whole-frame detections made here, for later steps to reuse.

    Returns
    -------
    `Registration`
        ``pixel_map`` (science parent pixel -> template parent pixel), the method
        used, whether the template must be resampled, and figures for the metrics.

    Raises
    ------
    RegistrationError
        The stars cannot be matched well (misregistration).
    IncompatibleInputsError
        ``mode`` is 'wcs' and an input lacks a celestial WCS.
    """
    config = config or RegistrationConfig()
    t0 = time.perf_counter()
    both_wcs = all(e.wcs is not None and e.wcs.has_celestial for e in (template, science))
    mode: str = config.mode
    if mode == "auto":
        mode = "wcs+stars" if both_wcs else "stars"
    metrics: dict[str, Any] = {"mode": config.mode, "method": mode}
    if mode in ("wcs", "wcs+stars"):
        if not both_wcs:
            missing = "science" if science.wcs is None else "template"
            raise IncompatibleInputsError(
                f"registration.mode 'wcs' needs a celestial WCS on both images; the {missing} "
                "has none. Use registration.mode 'stars' (or 'auto')."
            )
        pixel_map = PixelMap.from_wcs(science, template, config.warp)
        wcs_offset = pixel_map.max_displacement(science.bbox)
        metrics["wcs_max_displacement_px"] = wcs_offset
        if _same_grid(pixel_map, science, config.same_grid_tolerance):
            metrics.update(_map_figures(PixelMap.identity(), science))
            metrics.update(method="same grid", resampled=False)
            metrics["seconds"] = time.perf_counter() - t0
            return Registration(PixelMap.identity(), "same grid", False, metrics)
        if mode == "wcs+stars":
            pixel_map = _correct_on_stars(
                pixel_map, template, science, config, detection, metrics, memo
            )
    else:
        match = _match_exposures(template, science, PixelMap.identity(), config, detection, memo)
        pixel_map = PixelMap.affine(match.matrix, match.offset)
        metrics.update(_match_figures(match))
        if _insignificant(match, _corners(science), config.identity_sigma):
            metrics.update(_map_figures(pixel_map, science))
            metrics.update(method="stars: same grid", resampled=False)
            metrics["seconds"] = time.perf_counter() - t0
            return Registration(PixelMap.identity(), "stars: same grid", False, metrics)
    metrics.update(_map_figures(pixel_map, science))
    metrics["resampled"] = True
    metrics["seconds"] = time.perf_counter() - t0
    return Registration(pixel_map, mode, True, metrics)


def register_template(
    template: Exposure,
    science: Exposure,
    config: RegistrationConfig | None = None,
    detection: DetectionConfig | None = None,
    memo: DetectionMemo | None = None,
) -> tuple[Exposure, dict[str, Any]]:
    """Bring ``template`` onto ``science``'s pixel grid: (template on that grid, metrics).

    Nothing is resampled when the two already share a grid (the template is
    returned as given, or cut/padded with NO_DATA to the science box on the
    same grid); otherwise the template is warped (`core.warp.warp_exposure`).
    ``memo`` (see `register`) keeps the detections for the steps that follow.
    """
    config = config or RegistrationConfig()
    if config.mode == "none":
        return template, {"mode": "none", "method": "none", "resampled": False}
    registration = register(template, science, config, detection, memo)
    metrics = registration.metrics
    if not registration.resampled:
        return _on_science_box(template, science), metrics
    t0 = time.perf_counter()
    warped = warp_exposure(
        template, registration.pixel_map, science.shape, science.xy0, science.wcs, config.warp
    )
    metrics["warp_seconds"] = time.perf_counter() - t0
    return warped, metrics


def _on_science_box(template: Exposure, science: Exposure) -> Exposure:
    """The template on the science box of the same grid: as given, cut, or padded with NO_DATA."""
    tx0, ty0, tx1, ty1 = template.bbox
    sx0, sy0, sx1, sy1 = science.bbox
    if tx0 <= sx0 and ty0 <= sy0 and tx1 >= sx1 and ty1 >= sy1:
        return template
    planes = template.mask_planes.copy()
    no_data = np.int32(planes.value("NO_DATA"))
    image = np.zeros(science.shape, dtype=np.float32)
    variance = np.ones(science.shape, dtype=np.float32)
    mask = np.full(science.shape, no_data, dtype=np.int32)
    ix0, iy0, ix1, iy1 = max(tx0, sx0), max(ty0, sy0), min(tx1, sx1), min(ty1, sy1)
    if ix1 >= ix0 and iy1 >= iy0:
        src = np.s_[iy0 - ty0 : iy1 - ty0 + 1, ix0 - tx0 : ix1 - tx0 + 1]
        dst = np.s_[iy0 - sy0 : iy1 - sy0 + 1, ix0 - sx0 : ix1 - sx0 + 1]
        image[dst] = template.image[src]
        variance[dst] = template.variance[src]
        mask[dst] = template.mask[src]
        variance[mask & no_data != 0] = order.median(template.variance[src])
    return replace(
        template,
        image=image,
        variance=variance,
        mask=mask,
        mask_planes=planes,
        wcs=wcs_with_epoch_of(science.wcs, template.wcs),
        xy0=science.xy0,
        metadata=dict(template.metadata),
    )


def _same_grid(pixel_map: PixelMap, science: Exposure, tolerance: float) -> bool:
    """True when the map moves no science pixel by more than ``tolerance``."""
    min_x, min_y, max_x, max_y = science.bbox
    xs = np.linspace(min_x, max_x, 17)
    ys = np.linspace(min_y, max_y, 17)
    u, v = pixel_map.on_grid(xs, ys)
    return float(np.hypot(u - xs[None, :], v - ys[:, None]).max()) <= tolerance


def _match_exposures(template, science, prior: PixelMap, config, detection, memo=None) -> StarMatch:
    """Stars of the science image, mapped by ``prior``, matched onto the template's stars."""
    # the two detections are independent and mostly GIL-free numpy: each on its share
    # of the cores
    science_stars, template_stars = split_map(
        lambda exposure: star_positions(exposure, config, detection, memo), (science, template)
    )
    return _match_stars_of(science_stars, template_stars, prior, config)


def _match_stars_of(science_stars, template_stars, prior: PixelMap, config) -> StarMatch:
    science_xy, science_snr = science_stars
    template_xy, template_snr = template_stars
    mapped = np.column_stack(prior(science_xy[:, 0], science_xy[:, 1]))
    match = match_stars(mapped, template_xy, config, science_snr, template_snr)
    match.n_source, match.n_destination = len(science_xy), len(template_xy)
    return match


def _patch_centres(science: Exposure, config: RegistrationConfig) -> list[tuple[float, float]]:
    """Centres of star_patches x star_patches patches spread over the science box."""
    n, size = config.star_patches, config.star_patch_size
    min_x, min_y, max_x, max_y = science.bbox
    if n == 0 or (max_x - min_x + 1) * (max_y - min_y + 1) <= 2 * (n * size) ** 2:
        return []  # small enough: detect on the whole frame
    xs = np.linspace(min_x + size / 2, max_x - size / 2, n)
    ys = np.linspace(min_y + size / 2, max_y - size / 2, n)
    return [(float(x), float(y)) for y in ys for x in xs]


def _stars_in_patches(exposure: Exposure, centres, config, detection, memo=None):
    """Stars detected in patches around ``centres`` (the whole frame when there are none).

    The WCS already fixes the map to a pixel or so, so a correction needs stars spread
    over the frame, not every star: patches keep detection a small part of the time.
    Only a whole-frame detection goes into ``memo`` (a patch is of no later use).
    """
    if not centres:
        return star_positions(exposure, config, detection, memo)
    half = config.star_patch_size // 2
    min_x, min_y, max_x, max_y = exposure.bbox
    xy, snr = [np.zeros((0, 2))], [np.zeros(0)]
    for x, y in centres:
        box = (
            max(min_x, int(x) - half),
            max(min_y, int(y) - half),
            min(max_x, int(x) + half),
            min(max_y, int(y) + half),
        )
        if box[2] - box[0] < half or box[3] - box[1] < half:
            continue  # the patch falls (mostly) off this image
        patch_xy, patch_snr = star_positions(exposure.cutout(box), config, detection)
        xy.append(patch_xy)
        snr.append(patch_snr)
    all_xy, all_snr = np.concatenate(xy), np.concatenate(snr)
    order = np.argsort(-all_snr, kind="stable")[: config.max_stars]
    return all_xy[order], all_snr[order]


def _correct_on_stars(
    pixel_map, template, science, config, detection, metrics, memo=None
) -> PixelMap:
    """The WCS map followed by the correction matched stars measure (kept if significant)."""
    centres = _patch_centres(science, config)
    template_centres = [tuple(float(c) for c in pixel_map(x, y)) for x, y in centres]
    science_stars, template_stars = split_map(
        lambda job: _stars_in_patches(job[0], job[1], config, detection, memo),
        ((science, centres), (template, template_centres)),
    )
    try:
        # a WCS is usually off by an offset: fit what correction_transform allows
        correction_config = config.model_copy(update={"transform": config.correction_transform})
        match = _match_stars_of(science_stars, template_stars, pixel_map, correction_config)
    except RegistrationError as exc:
        crowded = min(len(science_stars[0]), len(template_stars[0])) >= _PLENTY * config.min_matches
        if crowded:
            # plenty of stars on both and none agree: not the sky the WCSs claim
            raise RegistrationError(
                f"{exc.message} (with {len(science_stars[0])} science and "
                f"{len(template_stars[0])} template stars, where the WCSs say they overlap)"
            ) from None
        # a sparse field: the WCS alone is the best there is; say so in the metrics
        log.info("registration: WCS kept without star correction: %s", exc.message)
        metrics["star_correction"] = f"not applied: {exc.message}"
        return pixel_map
    metrics.update(_match_figures(match))
    centre = science.bbox_center()
    u0, v0 = pixel_map(*centre)
    u1, v1 = match.apply(u0, v0)
    metrics["wcs_correction_px"] = [float(u1 - u0), float(v1 - v0)]
    if _insignificant(match, _corners(science, pixel_map), config.identity_sigma):
        metrics["star_correction"] = "not needed: the WCS agrees with the stars within errors"
        return pixel_map
    metrics["star_correction"] = "applied"
    return pixel_map.then(match.matrix, match.offset)


def _corners(science: Exposure, pixel_map: PixelMap | None = None) -> list[tuple[float, float]]:
    """The science box corners, mapped by ``pixel_map`` when given."""
    min_x, min_y, max_x, max_y = science.bbox
    corners = [(min_x, min_y), (max_x, min_y), (min_x, max_y), (max_x, max_y)]
    if pixel_map is None:
        return [(float(x), float(y)) for x, y in corners]
    return [tuple(float(c) for c in pixel_map(x, y)) for x, y in corners]  # type: ignore[misc]


def _insignificant(match: StarMatch, corners, limit: float) -> bool:
    """True when the fitted map moves no corner by more than a few standard errors."""
    worst = 0.0
    for x, y in corners:
        du, dv = match.apply(x, y)
        shift = math.hypot(du - x, dv - y)
        row = np.array([[x, y, 1, 0, 0, 0], [0, 0, 0, x, y, 1]], float)
        err = math.sqrt(max(float(np.trace(row @ match.covariance @ row.T)), 0.0))
        if not math.isfinite(err):
            return False
        worst = max(worst, shift / max(err, 1e-12))
    return worst < limit


def _match_figures(match: StarMatch) -> dict[str, Any]:
    return {
        "model": match.model,
        "rms_px": match.rms,
        "misfit_px": match.misfit,
        "n_matched": match.n_matched,
        "n_science_stars": match.n_source,
        "n_template_stars": match.n_destination,
    }


def _map_figures(pixel_map: PixelMap, science: Exposure) -> dict[str, Any]:
    """Matrix, offset, shift at the centre, rotation and scale of the map (affine part);
    ``mirrored`` when it reverses handedness, its rotation then that of the matrix with
    x reversed first (an x flip reads 0 deg, a y flip 180: the angle of a matrix with a
    negative determinant read as a rotation was noise, 45 deg on a review's flip)."""
    m = pixel_map.matrix
    det = float(np.linalg.det(m))
    mirrored = det < 0
    proper = m @ np.diag([-1.0, 1.0]) if mirrored else m
    centre = science.bbox_center()
    u, v = pixel_map(*centre)
    return {
        "matrix": m.tolist(),
        "offset": pixel_map.offset.tolist(),
        "shift_at_centre": [float(u - centre[0]), float(v - centre[1])],
        "rotation_deg": math.degrees(
            math.atan2(proper[1, 0] - proper[0, 1], proper[0, 0] + proper[1, 1])
        ),
        "mirrored": mirrored,
        "scale": math.sqrt(abs(det)),
        "affine": pixel_map.is_affine,
    }
