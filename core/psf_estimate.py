"""PSF estimation from the bright isolated stars of an exposure.

It sits above detection (`core.detection`) and the PSF models (`core.psf`), so
the models need not know how stars are found: no import circle.
"""

from __future__ import annotations

import math

import numpy as np

from .background import background_off_sources
from .config import DetectionConfig
from .detection import background_estimate, detect_sources
from .errors import PsfError
from .measure import measure_sources
from .psf import (
    LOCUS_SNR,
    LOCUS_TOLERANCE,
    SIGMA_TO_FWHM,
    ImagePsf,
    PolynomialPsf,
    Psf,
    _odd,
    _shift_raw,
    local_star_size,
    point_like,
    polynomial_terms,
    star_size,
)

__all__ = ["estimate_psf", "PSF_STAMP_BAD_PLANES"]

#: Mask planes that disqualify a star's stamp from PSF estimation.
PSF_STAMP_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "CR", "EDGE", "SUSPECT", "INTRP")


def estimate_psf(
    exposure,
    *,
    catalog=None,
    stamp_size: int | None = None,
    max_stars: int = 200,
    min_stars: int = 5,
    spatial_order: int | None = 0,
    background=None,
    detected=None,
) -> Psf:
    """Build a PSF from bright, isolated, unsaturated, unmasked stars.

    Stars come from ``catalog`` (parent ``x``, ``y``; measured on the exposure)
    or from `core.detection.detect_sources`. A star is used when it is not
    flagged (saturated, edge, masked, blended), its S/N is at least 20, its
    adaptive size is within 15% of the stars' there (`core.psf.star_size`, or
    `core.psf.local_star_size` where it varies over the field: rejects galaxies,
    cosmic rays and blends), its shape is a star's
    (`core.psf.star_shaped`: wider across than a cosmic-ray track), no other detected source
    with over 2% of its flux lies within the stamp radius, and its stamp holds
    no pixel of `PSF_STAMP_BAD_PLANES`. The
    brightest ``max_stars`` are cut out with a margin, background subtracted
    (the detection's mesh, corrected off a stamp-sized disc around every source of the
    catalog or detection: `core.background.background_off_sources`), shifted by a Fourier
    phase ramp so the weighted centroid falls on the central pixel, cropped,
    normalised by their flux within 2 FWHM and combined by a per-pixel
    3-sigma clipped mean weighted by each star's S/N; with many stars, those
    whose shape departs from the ensemble beyond their noise (blends) are left
    out and no star weighs more than the fifth heaviest.

    Parameters
    ----------
    exposure : `core.exposure.Exposure`
        Not modified.
    catalog : `astropy.table.Table` or None
        Candidate stars (``x``, ``y`` parent); detection when None.
    stamp_size : int or None
        Odd width of the PSF stamp; default 6 x the measured FWHM (15..101).
    max_stars : int
        Most stars combined.
    min_stars : int
        Fewest usable stars; fewer raises `PsfError`.
    spatial_order : int or None
        0 gives an `ImagePsf`. 1 to 4 fits each pixel as a polynomial of that
        order in (x, y) over the stars (weighted as the mean; stars with outlying
        residuals are rejected) and returns it as a `PolynomialPsf`, evaluated
        exactly where it is drawn; with too few stars for the order (fewer than 3
        per term) the order is lowered. None chooses the order (0 to
        `_MAX_CHOSEN_ORDER`, 4: a PSF twice as wide in the corners as at the centre
        needs it) by cross-validation over the
        stars: the lowest whose fits measure the held-out stars' PSF fluxes as
        consistently as the best order's, within one standard error (a PSF that varies
        over the field and is taken as constant biases PSF fluxes by position).
    background : optional
        `core.detection.background_estimate` of the exposure (default mesh), when the
        caller has it already; computed otherwise.
    detected : `astropy.table.Table` or None
        The table ``detect_sources(exposure, set_mask=False)`` gives (default settings,
        no PSF), when the caller has it already (registration of plain images makes
        it); detected otherwise. Ignored when ``catalog`` is given.

    Returns
    -------
    `ImagePsf` (average position at the exposure centre) or `PolynomialPsf`.

    Raises
    ------
    PsfError
        Fewer than ``min_stars`` suitable stars.
    """
    # one mesh serves the detection and the stamps' background
    mesh = background if background is not None else background_estimate(exposure)
    if catalog is None and detected is not None:
        stars = detected
    elif catalog is None:
        stars = detect_sources(exposure, set_mask=False, background=mesh)
        # only the catalog is used: free its segmentation images (two int32 frames)
        stars.meta.pop("segmentation", None)
        stars.meta.pop("segmentation_negative", None)
    else:
        x = np.asarray(catalog["x"], dtype=np.float64)
        y = np.asarray(catalog["y"], dtype=np.float64)
        stars = measure_sources(exposure, x, y, recentroid=True)
    n_found = len(stars)
    need = f"need at least {min_stars}"
    if n_found == 0:
        raise PsfError(f"found 0 suitable stars, {need} (no source detected) to estimate a PSF")
    usable = point_like(stars)
    size = np.asarray(stars["size"], dtype=np.float64)
    ok = usable & (np.asarray(stars["snr"], dtype=np.float64) >= LOCUS_SNR)
    locus = star_size(stars, usable)
    local = None
    if locus is not None:
        local = local_star_size(stars, usable, locus, exposure.bbox)
        ok &= np.abs(size / (locus if local is None else local) - 1.0) < LOCUS_TOLERANCE
    if ok.sum() == 0:
        raise PsfError(
            f"found 0 suitable stars among {n_found} sources, {need}: none is bright "
            "(S/N >= 20), unflagged and point-like"
        )
    # a varying PSF's stamps and flux aperture are sized for its widest stars
    typical = float(np.median(size[ok]))
    fwhm = SIGMA_TO_FWHM * typical
    if stamp_size is None:
        stamp_size = int(np.clip(_odd(6.0 * fwhm), 15, 101))
    if stamp_size % 2 == 0:
        raise PsfError(f"PSF stamp size must be odd, got {stamp_size}")
    half = stamp_size // 2
    x_all = np.asarray(stars["x"], dtype=np.float64)
    y_all = np.asarray(stars["y"], dtype=np.float64)
    flux_all = np.asarray(stars["flux"], dtype=np.float64)
    # isolation: no neighbour holding more than 2% of the star's flux inside the stamp
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([x_all, y_all]))
    candidates = np.nonzero(ok)[0]
    isolated = []
    for k in candidates:
        near = tree.query_ball_point([x_all[k], y_all[k]], r=float(half))
        if all(j == k or not flux_all[j] > 0.02 * flux_all[k] for j in near):
            isolated.append(k)
    candidates = np.array(isolated, dtype=int)
    candidates = candidates[np.argsort(-flux_all[candidates])]

    # stamps are cut and their background (the float32 map's values, evaluated on the
    # stamp alone: no frame of it) subtracted in float64; that background is measured
    # off a stamp-sized disc around every star of the catalog or detection, else the
    # stars' own wings raise it and the stacked wings come out too faint (PSF fluxes
    # low by 2-6%)
    bad = exposure.masked(PSF_STAMP_BAD_PLANES) | ~np.isfinite(exposure.image)
    x0, y0 = exposure.xy0
    if len(candidates):
        mesh = background_off_sources(
            exposure, x_all - x0, y_all - y0, half, mesh, DetectionConfig().background_mesh
        )
    ny, nx = exposure.shape
    pad = max(4, int(math.ceil(2 * typical)))
    big = half + pad
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    aperture = xx**2 + yy**2 <= (2.0 * fwhm) ** 2
    stamps, xs, ys, weights, variances = [], [], [], [], []
    for k in candidates:
        col, row = x_all[k] - x0, y_all[k] - y0
        ic, ir = int(math.floor(col + 0.5)), int(math.floor(row + 0.5))
        if ic - big < 0 or ir - big < 0 or ic + big >= nx or ir + big >= ny:
            continue
        if bad[ir - half : ir + half + 1, ic - half : ic + half + 1].any():
            continue
        box = np.s_[ir - big : ir + big + 1, ic - big : ic + big + 1]
        rows = np.arange(ir - big, ir + big + 1)
        sky = mesh.background_rows(rows[None, :], np.array([ic - big]), 2 * big + 1)[0]
        cut = exposure.image[box].astype(np.float64) - sky
        # recentre: move the centroid (col, row) onto the central pixel
        shifted = _shift_raw(cut, ic - col, ir - row)[pad:-pad, pad:-pad]
        norm = shifted[aperture].sum()
        if not norm > 0:
            continue
        stamps.append(shifted / norm)
        # inverse variance of the normalised stamp's sky noise: bright stars weigh more
        weights.append(norm**2 / max(float(np.median(exposure.variance[box])), 1e-30))
        if spatial_order is None:
            # the normalised stamp's pixel variances (the star's own noise included),
            # for the order's cross-validation
            variances.append(exposure.variance[box][pad:-pad, pad:-pad] / norm**2)
        xs.append(x_all[k])
        ys.append(y_all[k])
        if len(stamps) >= max_stars:
            break
    n_used = len(stamps)
    if n_used < min_stars:
        raise PsfError(
            f"found {n_used} suitable stars, {need} (of {n_found} sources, {int(ok.sum())} "
            "were bright, unflagged and point-like; the rest had neighbours or masked "
            "pixels in their stamp); give a catalog of stars or a PSF"
        )
    cube = np.array(stamps)
    centre = exposure.bbox_center()
    order = _MAX_CHOSEN_ORDER if spatial_order is None else int(spatial_order)
    while order > 0 and n_used < 3 * (order + 1) * (order + 2) // 2:
        order -= 1
    xs_, ys_, weights_ = np.array(xs), np.array(ys), np.array(weights)
    if spatial_order is None and order > 0:
        core = (slice(None), aperture)  # the pixels PSF fluxes rest on
        order = _chosen_order(
            cube[core],
            np.array(variances, np.float64)[core],
            xs_,
            ys_,
            weights_,
            exposure.bbox,
            order,
        )
    if order == 0:
        keep = _consistent(cube, weights_)
        combined = _clipped_mean(cube[keep], _capped(weights_[keep]))
        return ImagePsf(_clean_stamp(combined), average_position=centre)
    return _fit_polynomial_psf(cube, xs_, ys_, order, exposure.bbox, weights_)


#: Highest PSF order `estimate_psf` chooses from, and the folds of its cross-validation.
_MAX_CHOSEN_ORDER = 4
_FOLDS = 5


def _weighted_fit(design: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of ``values`` (n, pixels) on ``design`` (n, terms)."""
    root = np.sqrt(weights)[:, np.newaxis]
    return np.linalg.lstsq(design * root, values * root, rcond=None)[0]


def _chosen_order(cube, variances, xs, ys, weights, bbox, top: int) -> int:
    """Lowest order <= ``top`` whose fits measure held-out stars' PSF fluxes as
    consistently as the best order's, within one standard error (fits weighted as the
    mean; each star predicted by the fit to the other folds).

    Each held-out stamp (unit flux within the aperture) is PSF-fitted with its
    prediction, weighted by its pixel variances; the fitted flux is the same for every
    star wherever it lies when the model follows the field. The loss is its
    inverse-variance weighted scatter.
    Pixel chi^2 does not tell: a PSF whose FWHM varies by +-10% over the field changes
    it by less than the fits' own noise, yet moves PSF fluxes by +-5% (the `varying`
    preset without PSFs: the chi^2 criterion kept a constant PSF, and transients' fluxes
    read 1.04 on one side of the frame and 0.93 on the other).
    ``cube`` and ``variances`` hold the stamps' pixels within the flux aperture."""
    # stars the top order's own fit rejects (blends, defects) would tilt the others' fits
    keep = _fitted_stars(cube, xs, ys, weights, bbox, top)
    cube, variances, xs, ys, weights = (a[keep] for a in (cube, variances, xs, ys, weights))
    n = len(cube)
    values = cube.reshape(n, -1)
    variances = variances.reshape(n, -1)
    inverse = np.where(variances > 0, 1.0 / np.where(variances > 0, variances, 1.0), 0.0)
    capped = _capped(weights)
    fold = np.arange(n) % min(_FOLDS, n)
    loss = np.empty((top + 1, n))
    for order in range(top + 1):
        design = polynomial_terms(xs, ys, order, bbox)
        predicted = np.empty_like(values)
        for f in np.unique(fold):
            train, test = fold != f, fold == f
            coeffs = _weighted_fit(design[train], values[train], capped[train])
            predicted[test] = design[test] @ coeffs
        # a prediction sums to 1 over the aperture as every stamp does (the fit's constant
        # term), so the fitted flux is the fitted light there; `energy` its inverse variance
        energy = np.sum(inverse * predicted**2, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = np.sum(inverse * predicted * values, axis=1) / energy
        weight = np.where(np.isfinite(flux) & (energy > 0), energy, 0.0)
        flux = np.where(weight > 0, flux, 0.0)
        mean = np.sum(weight * flux) / max(np.sum(weight), 1e-300)
        loss[order] = weight * (flux - mean) ** 2
    totals = loss.sum(axis=1)
    best = int(totals.argmin())
    error = np.sqrt(n) * np.std(loss - loss[best], axis=1, ddof=1 if n > 1 else 0)
    return next(o for o in range(top + 1) if totals[o] <= totals[best] + error[o])


#: With many stars, none weighs more than the this-many-th heaviest in the PSF's mean and
#: the inconsistent ones are left out, so that one bright unresolved blend cannot set the
#: PSF; with few (fewer than `_WEIGHT_CAP_MIN_STARS`), every star and its full weight
#: are needed.
_WEIGHT_CAP_RANK = 5
_WEIGHT_CAP_MIN_STARS = 15


def _capped(weights: np.ndarray) -> np.ndarray:
    """Inverse-variance weights, the heaviest capped at the `_WEIGHT_CAP_RANK`-th."""
    if weights.size < _WEIGHT_CAP_MIN_STARS:
        return weights
    cap = np.sort(weights)[-_WEIGHT_CAP_RANK]
    return np.minimum(weights, cap)


def _consistent(cube: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Stars whose normalised stamp departs from the ensemble's no more than the others
    do (beyond their noise): unresolved blends and stars on a neighbour's wing stand out,
    and a bright one would otherwise carry its weight into the PSF."""
    if len(cube) < _WEIGHT_CAP_MIN_STARS:
        return np.ones(len(cube), dtype=bool)
    from astropy.stats import sigma_clip

    reference = np.ma.filled(sigma_clip(cube, sigma=3.0, maxiters=5, axis=0).mean(axis=0), 0.0)
    npix = cube[0].size
    # summed |departure| in units of the star's flux, less what its sky noise alone gives
    departure = np.abs(cube - reference).reshape(len(cube), -1).sum(axis=1)
    noise = npix * np.sqrt(2.0 / np.pi) / np.sqrt(weights)
    excess = departure - noise
    centre = np.median(excess)
    spread = 1.4826 * np.median(np.abs(excess - centre))
    return excess <= centre + 5.0 * max(spread, 1e-12)


def _clipped_mean(cube: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel 3-sigma clipped mean over the stars, weighted when ``weights`` are given.

    Unweighted, the faintest stars' noise dominates the wings, whose errors the unit
    sum then moves into the core (a flux bias of several per cent).
    """
    from astropy.stats import sigma_clip

    clipped = sigma_clip(cube, sigma=3.0, maxiters=5, axis=0)
    if weights is None:
        return np.ma.filled(clipped.mean(axis=0), 0.0)
    w = np.broadcast_to(weights[:, None, None], cube.shape)
    return np.ma.filled(np.ma.average(clipped, axis=0, weights=w), 0.0)


def _clean_stamp(stamp: np.ndarray) -> np.ndarray:
    """Unit-sum stamp. Negative noise pixels in the wings are kept: clipping them to zero
    would leave the positive half of the noise, a pedestal that the unit sum would take
    from the core (a PSF-flux bias of several per cent)."""
    return stamp / stamp.sum()


def _fitted_stars(cube, xs, ys, weights, bbox, order: int) -> np.ndarray:
    """Stars a per-pixel polynomial fit of ``order`` keeps: those whose residual chi^2 is
    not an outlier (3 sigma, iterated)."""
    from astropy.stats import sigma_clip

    n = len(cube)
    values = cube.reshape(n, -1)
    capped = _capped(weights)
    design = polynomial_terms(xs, ys, order, bbox)
    use = np.ones(n, dtype=bool)
    for _ in range(3):
        coeffs = _weighted_fit(design[use], values[use], capped[use])
        residual = np.sqrt(weights * np.mean((values - design @ coeffs) ** 2, axis=1))
        new_use = ~np.ma.getmaskarray(sigma_clip(residual, sigma=3.0, maxiters=3))
        if new_use.sum() < design.shape[1] + 1 or np.array_equal(new_use, use):
            break
        use = new_use
    return use


def _fit_polynomial_psf(cube, xs, ys, order, bbox, weights) -> PolynomialPsf:
    """Per-pixel polynomial in (x, y) over the stars, evaluated where the PSF is drawn.

    ``weights`` (the stamps' inverse variances; capped as for the mean) weight the
    fit; stars whose residual chi^2 is an outlier are rejected (`_fitted_stars`).
    """
    k = cube.shape[1]
    use = _fitted_stars(cube, xs, ys, weights, bbox, order)
    coeffs = _weighted_fit(
        polynomial_terms(xs[use], ys[use], order, bbox),
        cube[use].reshape(use.sum(), -1),
        _capped(weights)[use],
    )
    return PolynomialPsf(coeffs.reshape(-1, k, k), order, bbox)
