"""DIA sources: detection and measurement of what changed, on the difference or the score.

In the ordinary modes the difference is correlated with its own PSF (matched
filter) and divided by the equally filtered noise, renormalised so that its
empty-sky scatter is 1 (correlated noise widens it); in preconvolve mode the
score divided by the square root of its variance already is that S/N.
Positive and negative footprints above the threshold, of at least a fraction
of the PSF's area (`footprint_min_pixels`), are labelled, their peaks found and
close peaks deblended (core.detection does the pixel work).
The noise of the filtered difference is computed only on the blocks where
the S/N can reach the threshold, and labelling runs on those blocks alone
(core.diadetect): the result is that of the whole-frame map. Peaks that the
PSF of brighter ones explains (its rings and wings through the matched filter,
core.sidelobes) are dropped; then a
positive and a negative peak that are each other's nearest within a couple of
PSF widths are one dipole (a misregistered or moving star), fitted with two
PSFs. Every source gets a position (a centroid, or on a score its profile's peak),
PSF and aperture fluxes on the difference, moments, flags, and the science and
template fluxes at its position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import scipy.fft as sfft
from astropy.io import fits
from astropy.table import Column, MaskedColumn, Table
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from .config import DiaSourceConfig
from .decorrelate import DecorrelatedPsf
from .diadetect import (
    DifferenceSnr,
    block_size,
    crop_kernel,
    matched_numerator,
    prepare_difference,
    prepare_score,
    sparse_peaks,
)
from .exposure import Exposure
from .fit_noise import psf_fit_noise_factor
from .forced import (
    FLAG_BITS,
    UNUSABLE_PLANES,
    PsfStamps,
    flag_columns,
    noise_positions,
    noise_scale,
    observation_meta,
    pixel_flags,
    profile_sigma,
    psf_photometry,
    pull_scale,
    sky_positions,
)
from .input_rays import sharp_in_inputs
from .measure import _centroids, _moments, _negative_side_sigma
from .parallel import InlineExecutor, n_threads, task_pool
from .position_flags import (
    bright_star,
    bright_star_light,
    bright_star_limit,
    outside_kernel_hull,
    saturated_search,
    saturated_stars,
)
from .psf import SIGMA_TO_FWHM, DrawnOncePsf, ImagePsf, Psf
from .sidelobes import FilteredPsf, close_pairs, explained
from .stamps import STAMP_BATCH, batches, windows
from .stamps import stamps as _stack
from .streaks import on_lines

__all__ = [
    "detect_dia_sources",
    "footprint_min_pixels",
    "measure_dia_sources",
    "dia_sources",
    "score_profile",
    "catalog_hdulist",
    "read_dia_sources",
    "Detections",
    "DIA_COLUMNS",
]

#: Columns of a DIA-source table, in order, with their types.
DIA_COLUMNS: dict[str, Any] = {
    "id": np.int64,
    "x": np.float64,
    "y": np.float64,
    "ra": np.float64,
    "dec": np.float64,
    "psf_flux": np.float64,
    "psf_flux_err": np.float64,
    "snr": np.float64,
    "detection_snr": np.float64,
    "aperture_flux": np.float64,
    "aperture_flux_err": np.float64,
    "ixx": np.float64,
    "iyy": np.float64,
    "ixy": np.float64,
    "is_negative": bool,
    "is_dipole": bool,
    "dipole_separation": np.float64,
    "dipole_angle": np.float64,
    "dipole_pos_flux": np.float64,
    "dipole_neg_flux": np.float64,
    "footprint": np.int64,
    "n_peaks": np.int64,
    "science_flux": np.float64,
    "science_flux_err": np.float64,
    "template_flux": np.float64,
    "template_flux_err": np.float64,
    "flags": np.int32,
    **{f"flag_{name}": bool for name in FLAG_BITS},
}
#: Sub-pixel samples per axis for the fractional pixel coverage of apertures.
_APERTURE_SUBSAMPLE = 5


class Detections:
    """Peaks above threshold on a difference or score.

    Attributes
    ----------
    col, row : `numpy.ndarray` (n,), int
        Array position of each peak.
    sign : `numpy.ndarray` (n,), int
        +1 for a positive peak, -1 for a negative one.
    footprint : `numpy.ndarray` (n,), int
        Footprint number (positive and negative footprints numbered apart).
    n_peaks : `numpy.ndarray` (n,), int
        Peaks in the source's footprint (more than one: deblended).
    peak_snr : `numpy.ndarray` (n,), float
        Detection S/N at the peak (negative for negative peaks).
    image : `SearchedImage`
        Stamps of the searched image with unusable pixels set to 0 (for centroids);
        cut on demand, so no frame-sized copy of it is held.
    noise_factor : float
        Measured empty-sky scatter of the S/N before renormalisation.
    psf_sigma : float
        Trace radius (px) of the profile of a point source in ``image``.
    merged : `numpy.ndarray` (2, m), int
        Column and row of local maxima folded into brighter peaks (`core.saddles`).
    """

    def __init__(
        self, col, row, sign, footprint, n_peaks, peak_snr, image, noise_factor, sigma, merged
    ):
        self.col, self.row, self.sign = col, row, sign
        self.footprint, self.n_peaks, self.peak_snr = footprint, n_peaks, peak_snr
        self.image, self.noise_factor, self.psf_sigma = image, noise_factor, sigma
        self.merged = merged

    def subset(self, keep: np.ndarray) -> Detections:
        """The detections at indices ``keep``, in that order; ``n_peaks`` counts the kept."""
        footprint = self.footprint[keep]
        _, where, count = np.unique(footprint, return_inverse=True, return_counts=True)
        return Detections(
            self.col[keep],
            self.row[keep],
            self.sign[keep],
            footprint,
            count[where].astype(self.n_peaks.dtype),
            self.peak_snr[keep],
            self.image,
            self.noise_factor,
            self.psf_sigma,
            self.merged,
        )


class SearchedImage:
    """Stamps of an exposure's image as float32 with non-finite pixels and those with
    any of ``bits`` set in the mask at 0 (0 off the frame): the values of the frame
    copy the S/N was computed from, cut only where measurements need them.

    ``filtered``: the image is matched-filtered already (a score), so a source's
    position is its profile's peak (`_shape`)."""

    def __init__(
        self, exposure: Exposure, bits: int, after_cast: bool = False, filtered: bool = False
    ):
        # after_cast: non-finite tested on the float32 values (the score's copy), else
        # on the image's own (the difference's)
        self.exposure, self.bits, self.after_cast = exposure, bits, after_cast
        self.filtered = filtered
        self.shape = exposure.shape

    def stamps(self, cx, cy, half: int) -> np.ndarray:
        return self._cut(cx, cy, half, False)

    def mirrored_stamps(self, cx, cy, half: int) -> np.ndarray:
        """`stamps` with every pixel whose mirror through the stamp's centre is unusable
        or off the frame at 0 too: a profile cut on one side (the frame's or a
        convolution's edge, a saturated core) is cut alike on the other, so that its
        weighted centroid leans less away from the cut."""
        return self._cut(cx, cy, half, True)

    def _cut(self, cx, cy, half: int, mirrored: bool) -> np.ndarray:
        # off the frame NaN, so unusable as a non-finite pixel is (0 in the stamps)
        raw = _stack(self.exposure.image, cx, cy, half, fill=np.nan)
        out = raw.astype(np.float32)
        bad = ~np.isfinite(out if self.after_cast else raw)
        if self.bits:
            bad |= (_stack(self.exposure.mask, cx, cy, half) & self.bits) != 0
        if mirrored:
            bad |= bad[:, ::-1, ::-1]
        out[bad] = 0.0
        return out


#: Difference pixels the matched filter leaves out (0, their variance filled): no data,
#: and pixels whose value is no measurement of the sky's change. A saturated or bleeding
#: star's clipped core (either image's) leaves a residual of thousands of sigma, which the
#: filter spread up to its own radius: a synthetic pair with six saturated stars and bleed
#: trails had 34 unflagged detections 5-18 px from saturated pixels, detected at S/N 6-42
#: and fitted at |S/N| < 3 on the usable pixels.
_SEARCH_UNUSABLE = ("NO_DATA", "EDGE", "BAD", "SAT", "SAT_TEMPLATE", "CR")


def _search_kernel(psf: Psf) -> np.ndarray:
    """The difference's matched filter: its PSF at the average position, float64, cropped
    to all but `core.diadetect.KERNEL_ENERGY_LOSS` of its energy (`crop_kernel`)."""
    return crop_kernel(psf.kernel_image(*(psf.average_position or (None, None))).astype(np.float64))


def _difference_peaks(exposure: Exposure, config: DiaSourceConfig, width: Future, min_pixels: int):
    """Peaks of the matched-filtered difference (core.diadetect), the image searched and
    the noise factor. The convolution's EDGE band holds no usable difference: it
    counts as no data. ``width``: a future of the PSF's trace radius; ``min_pixels``:
    `footprint_min_pixels`."""
    kernel = _search_kernel(exposure.require_psf())
    size = block_size(kernel.shape[0] // 2)
    bits = exposure.bitmask([p for p in _SEARCH_UNUSABLE if p in exposure.mask_planes])
    # the variance is filled block by block as the S/N needs it, and unusable pixels are
    # zeroed tile by tile inside the correlation (no frame-sized copies of either)
    _, variance, no_data, fill, vmin = prepare_difference(
        exposure.image, exposure.variance, exposure.mask, bits, size, True, keep_image=False
    )
    smoothed = matched_numerator(exposure.image, no_data, kernel)
    snr = DifferenceSnr(smoothed, variance, no_data, kernel, 1e-30 * fill, vmin)
    candidate = snr.search(config.threshold)
    factor = snr.factor
    with task_pool() as pool:
        # the candidate blocks' S/N (FFTs on the thread pool) while the search lays
        # out its canvas
        values = pool.submit(snr.blocks, *np.nonzero(candidate))
        peaks = sparse_peaks(
            exposure.shape,
            snr.size,
            candidate,
            snr.blocks,
            config.threshold,
            min_pixels,
            width.result(),
            config.peak_prominence,
            values.result,
        )
    return peaks, SearchedImage(exposure, bits), factor


def _usable_scatter(snr: np.ndarray, exposure: Exposure, bits: int) -> float:
    """Empty-sky scatter of a score's S/N (`_negative_side_sigma`) over its usable pixels,
    on a grid of about a million of them. `prepare_score` leaves the unusable ones at 0,
    which would narrow it: a mosaic's uncovered 40% made it 0.6, not 1, raising every
    S/N by 1 / 0.6."""
    step = max(1, math.isqrt(snr.size // 1_000_000))
    grid = np.s_[::step, ::step]
    variance = exposure.variance[grid]
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(exposure.image[grid]) & np.isfinite(variance) & (variance > 0)
    if bits:
        usable &= (exposure.mask[grid] & bits) == 0
    return _negative_side_sigma(snr[grid], usable)


def _score_peaks(exposure: Exposure, config: DiaSourceConfig, width: Future, min_pixels: int):
    """Peaks of score / sqrt(variance), the image searched and the noise factor;
    ``width``: a future of the PSF's trace radius; ``min_pixels``: `footprint_min_pixels`."""
    size = 32
    bits = exposure.bitmask([p for p in ("NO_DATA", "EDGE") if p in exposure.mask_planes])
    snr, _, top = prepare_score(
        exposure.image, exposure.variance, exposure.mask, bits, size, keep_image=False
    )
    factor = _usable_scatter(snr, exposure, bits)

    def blocks(by, bx):
        return windows(snr, by * size, bx * size, size) / np.float32(factor)

    peaks = sparse_peaks(
        snr.shape,
        size,
        top >= config.threshold * factor * (1.0 - 1e-6),
        blocks,
        config.threshold,
        min_pixels,
        width.result(),
        config.peak_prominence,
    )
    # the score's unusable pixels out of the centroids too (they are out of its S/N): its
    # EDGE band's values (mean 52, sky noise 7 on a 512 px pair with 11 px PSFs) drew
    # the centroids of sources beside it 6-11 px into it
    return peaks, SearchedImage(exposure, bits, after_cast=True, filtered=True), factor


def footprint_min_pixels(psf: Psf, config: DiaSourceConfig) -> int:
    """Fewest pixels above threshold a DIA footprint needs: ``config.min_area_fraction``
    of the PSF's noise-equivalent area (at its average position, to the nearest pixel),
    at least ``config.min_pixels``.

    A point source's profile in the S/N map (the difference matched-filtered by its PSF,
    or a score) is the PSF's autocorrelation; for a Gaussian PSF its area above the
    threshold t at peak S/N v is NEA ln(v / t), and near that for any compact PSF. A
    fixed count of pixels is then a cut on S/N that depends on the sampling: 3 px asked
    v >= 5.3 at a 4.7 px FWHM (NEA 60 px) but v >= 8 at 2 px (NEA 6 px, JWST's
    decorrelated difference), which lost half the sources of S/N 7-10 there. A fraction
    of the NEA asks the same margin, v >= t e^fraction, at every sampling.
    """
    area = psf.noise_equivalent_area(*(psf.average_position or (None, None)))
    return max(int(config.min_pixels), math.floor(config.min_area_fraction * area + 0.5), 1)


def detect_dia_sources(
    exposure: Exposure,
    config: DiaSourceConfig | None = None,
    is_score: bool = False,
) -> Detections:
    """Positive and negative peaks above ``config.threshold`` on a difference or score.

    Parameters
    ----------
    exposure : `Exposure`
        The difference (its PSF is the matched filter) or the score.
    config : `DiaSourceConfig` or None
    is_score : bool
        ``exposure`` is a preconvolution score: score / sqrt(variance) is the S/N.

    Returns
    -------
    `Detections`
        Peaks sorted by decreasing absolute S/N, at most ``config.max_sources``.
    """
    config = config or DiaSourceConfig()
    psf = exposure.require_psf()
    find = _score_peaks if is_score else _difference_peaks
    min_pixels = footprint_min_pixels(psf, config)
    with task_pool() as pool:
        # the PSF's width (only the search needs it) beside the frame passes
        width = pool.submit(profile_sigma, psf)
        peaks, image, factor = find(exposure, config, width, min_pixels)
        sigma = width.result()
    order = np.argsort(-peaks.value, kind="stable")[: config.max_sources]
    return Detections(
        peaks.col[order],
        peaks.row[order],
        peaks.sign[order],
        peaks.footprint[order],
        peaks.n_peaks[order],
        (peaks.value * peaks.sign)[order].astype(np.float64),
        image,
        factor,
        sigma,
        peaks.merged,
    )


def _pair_dipoles(det: Detections, max_separation: float) -> np.ndarray:
    """(k, 2) indices (positive, negative) of peaks that are each other's nearest."""
    pos = np.flatnonzero(det.sign > 0)
    neg = np.flatnonzero(det.sign < 0)
    if max_separation <= 0 or pos.size == 0 or neg.size == 0:
        return np.zeros((0, 2), dtype=int)
    pxy = np.column_stack([det.col[pos], det.row[pos]]).astype(float)
    nxy = np.column_stack([det.col[neg], det.row[neg]]).astype(float)
    d_pn, to_neg = cKDTree(nxy).query(pxy, distance_upper_bound=max_separation)
    _, to_pos = cKDTree(pxy).query(nxy, distance_upper_bound=max_separation)
    strength = np.abs(det.peak_snr)
    pairs = [
        (pos[i], neg[j])
        for i, j in enumerate(to_neg)
        if np.isfinite(d_pn[i])
        and j < neg.size
        and to_pos[j] == i
        and _balanced(strength[pos[i]], strength[neg[j]])
    ]
    return np.array(pairs, dtype=int).reshape(-1, 2)


#: Most of a pair's summed |peak S/N| one lobe may hold for the pair to be a dipole
#: (Rubin's dipole classification, ``maxFluxRatio``): a misregistered star's lobes are
#: alike; a -100 sigma fading star 17 px from a +7 sigma blob (a score's reach of two
#: FWHMs is 23 px on SAAO 0156) is two sources.
DIPOLE_MAX_LOBE_SHARE = 0.65


def _balanced(a: float, b: float) -> bool:
    """Whether neither of two lobes' strengths holds more than `DIPOLE_MAX_LOBE_SHARE`."""
    return max(a, b) <= DIPOLE_MAX_LOBE_SHARE * (a + b)


#: Step (px) that ends a dipole fit's search: far below any use of its positions; the
#: default tolerance, relative to the coordinates, made a fit search ~300 models, most
#: of them along the flat valley of a near-degenerate pair.
_DIPOLE_XTOL_PX = 1e-3
#: Most steps (models; the Jacobian's are not counted) of one dipole search: a fit
#: converges in 15-40 on the real frames, a pair its model cannot describe (lobes held
#: at the images' fluxes under a large net change) wandered for ~260.
_DIPOLE_MAX_STEPS = 60


#: Least S/N of the science and the template flux at a dipole for a star to be under
#: it: a noise-level flux says nothing about its lobes (either sign by chance).
LOBE_STAR_SNR = 5.0


def _fit_dipole(
    exposure: Exposure,
    stamps: PsfStamps,
    pos_xy,
    neg_xy,
    lobe_fluxes=None,
    max_separation: float = math.inf,
) -> dict[str, float]:
    """Two-PSF fit (positive and negative lobe) of a dipole, positions free.

    The lobe fluxes enter linearly, so only the coordinates are searched
    (variable projection); the box spans both lobes plus the PSF fitting radius.
    Lobes closer than a PSF FWHM are degenerate (flux times separation is all
    the data fixes): the free fit keeps them at least a FWHM apart (it would
    slide towards coincident lobes of unbounded, opposite fluxes). When it ends
    there and ``lobe_fluxes`` ((flux, error) of the science and of the template
    there) show a star in both (S/N >= `LOBE_STAR_SNR`), the lobes are held at those
    fluxes and only the positions are fitted, at any separation, as Rubin's dipole
    fit leans on the images before subtraction; the held fit is kept only while it
    stays on the free fit's centre and direction (the data fix both whatever the
    lobes). Without lobe fluxes, or when the held fit leaves the dipole, the
    separation and the lobe fluxes are NaN (not measured), the position and the
    angle stay; so they are when the free fit finds no positive and negative lobe.
    Lobes stay at most
    ``max_separation`` apart (the pairing's reach). The net flux and its error
    always come from the free linear fit at the final positions (their sum is
    well determined).
    """
    x0, y0 = exposure.xy0
    h = stamps.half
    cx = int(round(0.5 * (pos_xy[0] + neg_xy[0])))
    cy = int(round(0.5 * (pos_xy[1] + neg_xy[1])))
    half = h + int(math.ceil(0.5 * math.hypot(pos_xy[0] - neg_xy[0], pos_xy[1] - neg_xy[1])))
    data = _stack(exposure.image, np.array([cx]), np.array([cy]), half, fill=np.nan)[0]
    var = _stack(exposure.variance, np.array([cx]), np.array([cy]), half, fill=np.nan)[0]
    good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    # the pixels single sources' fits leave out (`UNUSABLE_PLANES`): a hot column's
    # BAD values 6 px from a net-zero dipole read as net 27059 +- 73, unflagged
    bits = exposure.bitmask([p for p in UNUSABLE_PLANES if p in exposure.mask_planes])
    if bits:
        good &= (
            _stack(exposure.mask, np.array([cx]), np.array([cy]), half, fill=bits)[0] & bits
        ) == 0
    data = np.where(good, data, 0.0).astype(np.float64)
    weight = np.where(good, 1.0, 0.0)
    size = 2 * half + 1

    def models_of(ps):
        """Both lobes' PSF stamps placed in the box, (len(ps), 2, size, size): the PSF is
        drawn at every position of every parameter set in one call."""
        ps = np.asarray(ps, dtype=float)
        placed = np.zeros((ps.shape[0] * 2, size, size))
        model, ix, iy = stamps.at(ps[:, 0::2].ravel() + x0, ps[:, 1::2].ravel() + y0)
        for k in range(placed.shape[0]):
            j0, i0 = iy[k] - h - (cy - half), ix[k] - h - (cx - half)
            ys = slice(max(j0, 0), min(j0 + 2 * h + 1, size))
            xs = slice(max(i0, 0), min(i0 + 2 * h + 1, size))
            placed[k, ys, xs] = model[k, ys.start - j0 : ys.stop - j0, xs.start - i0 : xs.stop - i0]
        return (placed * weight).reshape(ps.shape[0], 2, size, size)

    fixed: list[np.ndarray] = []

    def solve(placed):
        design = placed.reshape(2, -1).T
        if fixed:
            return design, fixed[0]
        amplitude, *_ = np.linalg.lstsq(design, data.ravel(), rcond=None)
        return design, amplitude

    def residuals(ps):
        out = []
        for placed in models_of(ps):
            design, amplitude = solve(placed)
            out.append(design @ amplitude - data.ravel())
        return np.array(out)

    def jacobian(to_p, hi):
        """Forward differences of the residual in each parameter (steps of the size of
        scipy's '2-point' scheme, backwards at an upper bound), every model drawn in
        one call instead of one call per parameter."""

        def jac(q):
            step = np.sqrt(np.finfo(float).eps) * np.maximum(1.0, np.abs(q))
            step = np.where(q + step > hi, -step, step)
            sets = [to_p(q)] + [to_p(q + shift) for shift in np.diag(step)]
            r = residuals(sets)
            return ((r[1:] - r[0]) / step[:, None]).T

        return jac

    def residual(p):
        return residuals([p])[0]

    def lobes_of(m):  # (mid x, mid y, separation, angle) -> (pos x, pos y, neg x, neg y)
        dx, dy = 0.5 * m[2] * math.cos(m[3]), 0.5 * m[2] * math.sin(m[3])
        return np.array([m[0] + dx, m[1] + dy, m[0] - dx, m[1] - dy])

    def search(fun, begin, lo, hi, jac, method="trf"):
        begin = np.clip(begin, lo, hi)
        # steps of ~_DIPOLE_XTOL_PX end the search (the default is relative to the
        # coordinates, hundreds to thousands of px)
        xtol = _DIPOLE_XTOL_PX / max(1.0, float(np.linalg.norm(begin)))
        try:
            fit = least_squares(
                fun,
                begin,
                bounds=(lo, hi),
                x_scale=1.0,
                method=method,
                jac=jac,
                xtol=xtol,
                max_nfev=_DIPOLE_MAX_STEPS,
            )
            return fit.x
        except (ValueError, np.linalg.LinAlgError):
            return begin

    start = np.array([pos_xy[0], pos_xy[1], neg_xy[0], neg_xy[1]], dtype=float)
    lo = np.array([cx - half, cy - half, cx - half, cy - half], dtype=float) + 1
    hi = np.array([cx + half, cy + half, cx + half, cy + half], dtype=float) - 1
    # the free fit in (midpoint, separation >= FWHM, angle)
    fwhm = stamps.fwhm
    spread = start[:2] - start[2:]
    middle = 0.5 * (start[:2] + start[2:])
    begin = [*middle, math.hypot(*spread), math.atan2(spread[1], spread[0])]
    reach = max(min(2.0 * (half - 1), max_separation), fwhm * 1.01)
    upper = np.array([hi[0], hi[1], reach, 2 * math.pi])
    free = search(
        lambda m: residual(lobes_of(m)),
        np.array(begin),
        np.array([lo[0], lo[1], fwhm, -2 * math.pi]),
        upper,
        jacobian(lobes_of, upper),
        method="dogbox",
    )
    p = lobes_of(free)
    close = free[2] <= fwhm * (1 + 1e-6)
    lobes = None
    if (
        close
        and lobe_fluxes is not None
        and all(np.isfinite(f) and f >= LOBE_STAR_SNR * e for f, e in lobe_fluxes)
    ):
        lobes = (float(lobe_fluxes[0][0]), -float(lobe_fluxes[1][0]))
        fixed.append(np.array(lobes))
        # from the free fit's centre and direction, lobes 0.2 px apart
        toward = 0.1 * np.array([math.cos(free[3]), math.sin(free[3])])
        begin_fixed = np.concatenate([free[:2] + toward, free[:2] - toward])
        held = search(residual, begin_fixed, lo, hi, jacobian(lambda q: q, hi))
        fixed.clear()
        # the data fix the dipole's centre and direction whatever its lobes: a held fit
        # that leaves them describes another source (SAAO 0028: 3.5 px off, the angle
        # reversed, S/N ~0 at the position given); then the lobes are not measured
        centre = 0.5 * (held[:2] + held[2:])
        direction = math.atan2(held[1] - held[3], held[0] - held[2])
        if math.hypot(*(centre - free[:2])) <= 0.25 * fwhm and math.cos(direction - free[3]) > 0.5:
            p = held
        else:
            lobes = None
    design, amplitude = solve(models_of([p])[0])
    normal = design.T @ design
    try:
        inverse = np.linalg.inv(normal)
    except np.linalg.LinAlgError:
        inverse = np.full((2, 2), np.nan)
    estimator = inverse @ design.T
    covariance = (estimator * var.ravel().clip(0)[None, :]) @ estimator.T
    total_err = math.sqrt(max(float(np.sum(covariance)), 0.0))
    net = float(amplitude[0] + amplitude[1])
    # direction from the negative lobe to the positive one, degrees from +x to +y
    angle = math.degrees(math.atan2(p[1] - p[3], p[0] - p[2]))
    separation = math.hypot(p[0] - p[2], p[1] - p[3])
    if lobes is not None:
        pos_flux, neg_flux = lobes
    elif close or not amplitude[0] > 0 > amplitude[1]:
        # degenerate, or no positive and negative lobe where the peaks were
        pos_flux = neg_flux = separation = math.nan
    else:
        pos_flux, neg_flux = float(amplitude[0]), float(amplitude[1])
    return {
        "x": 0.5 * (p[0] + p[2]),
        "y": 0.5 * (p[1] + p[3]),
        "pos_flux": pos_flux,
        "neg_flux": neg_flux,
        "flux": net,
        "flux_err": total_err,
        "separation": separation,
        "angle": angle,
    }


def _aperture_weights(fx, fy, half: int, radius: float) -> np.ndarray:
    """Fraction of each pixel of a (2 half + 1)^2 stamp inside a circle of ``radius``
    about offset (fx, fy) from its centre pixel, on `_APERTURE_SUBSAMPLE`^2 sub-pixels.

    Pixels whose every sub-pixel centre is inside (outside) by a margin weigh 1
    (0); only the ring between is counted. Along a sub-row the sub-pixel centres
    inside the circle form one run, so each ring pixel's count along x is a
    difference of two floors (no (s x s) grid per pixel).
    """
    s = _APERTURE_SUBSAMPLE
    sub = (np.arange(s) + 0.5) / s - 0.5
    grid = np.arange(-half, half + 1)
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    # nearest and farthest sub-pixel centre of each pixel, per axis
    ax, ay = np.abs(grid[None, :] - fx[:, None]), np.abs(grid[None, :] - fy[:, None])
    reach = sub[-1]
    far = (ay + reach)[:, :, None] ** 2 + (ax + reach)[:, None, :] ** 2
    near = np.maximum(ay - reach, 0)[:, :, None] ** 2 + np.maximum(ax - reach, 0)[:, None, :] ** 2
    r2 = radius * radius
    weight = (far < r2 * (1 - 1e-9)).astype(np.float64)
    k, j, i = np.nonzero(~(far < r2 * (1 - 1e-9)) & (near <= r2 * (1 + 1e-9)))
    oy = grid[j][:, None] + sub[None, :] - fy[k][:, None]  # (ring pixels, s)
    reach_x = r2 - oy * oy
    inside_x = np.sqrt(np.where(reach_x >= 0, reach_x, np.nan))
    c = (grid[i] - fx[k])[:, None]
    # sub-pixel b of pixel i sits at c + sub[b]: inside when |c + sub[b]| <= X
    with np.errstate(invalid="ignore"):
        first = np.ceil(s * (0.5 - inside_x - c) - 0.5).clip(0, s)
        last = np.floor(s * (0.5 + inside_x - c) - 0.5).clip(-1, s - 1)
        count = np.nan_to_num(last - first + 1, nan=0.0).clip(0, s)
    weight[k, j, i] = count.sum(axis=1) / (s * s)
    return weight


def _shared_aperture_weights(fx, fy, half: int, radius: float) -> np.ndarray:
    """`_aperture_weights`, made once when every position has the same offset (the
    noise scale's whole pixels): each offset's weights are its own."""
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    if fx.size > 1 and np.all(fx == fx[0]) and np.all(fy == fy[0]):
        return np.repeat(_aperture_weights(fx[:1], fy[:1], half, radius), fx.size, axis=0)
    return _aperture_weights(fx, fy, half, radius)


def _aperture(exposure: Exposure, x, y, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Circular aperture sums and errors with fractional pixel coverage (sub-sampled);
    NaN where the aperture touches a pixel off the frame, not finite, or in a plane the
    PSF fits leave out (`UNUSABLE_PLANES`: a band of no data filled with -500 took a
    source's sum from 9889 to 331, unflagged, where its PSF flux held)."""
    parts = batches(x.size)
    if len(parts) > 1:  # in batches that stay in the caches (`core.stamps.STAMP_BATCH`)
        sums = [_aperture(exposure, x[part], y[part], radius) for part in parts]
        return np.concatenate([s[0] for s in sums]), np.concatenate([s[1] for s in sums])
    if x.size == 0:
        return np.zeros(0), np.zeros(0)
    half = int(math.ceil(radius)) + 1
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    weight = _shared_aperture_weights(x - ix, y - iy, half, radius)
    data = _stack(exposure.image, ix, iy, half, fill=np.nan).astype(np.float64)
    var = _stack(exposure.variance, ix, iy, half, fill=np.nan).astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var)
    bits = exposure.bitmask([p for p in UNUSABLE_PLANES if p in exposure.mask_planes])
    if bits:
        good &= (_stack(exposure.mask, ix, iy, half, fill=bits) & bits) == 0
    covered = np.where(good, weight, 0).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))
    flux = np.where(good, weight * data, 0).sum(axis=(1, 2))
    err = np.sqrt(np.where(good, weight**2 * var, 0).sum(axis=(1, 2)))
    incomplete = covered < 1.0
    flux[incomplete] = np.nan
    err[incomplete] = np.nan
    return flux, err


def _aperture_scale(output: Exposure, radius: float, config) -> float:
    """`noise_scale` of aperture sums (`pull_scale` of sum / error at half the PSF
    fits' random positions): a score's noise is correlated, as an undecorrelated
    difference's is (the score's errors were 6.2x too small on the 4096 test pair)."""
    half = int(math.ceil(radius)) + 1
    positions = noise_positions(output.shape, half, config.n_noise_positions // 2, config.seed)
    if positions is None:
        return 1.0
    col, row = positions
    flux, error = _aperture(output, col.astype(np.float64), row.astype(np.float64), radius)
    return pull_scale(flux / error)


def _matched_scale(exposure: Exposure, stamps: PsfStamps) -> float:
    """The factor a matched image's PSF-fit errors need for its correlated noise
    (`psf_fit_noise_factor` of its ``noise_correlation``, the ring sky's median included):
    computed, not measured at random positions, which on an image before subtraction land
    on stars (SAAO bulge: science and template errors 9-85x the difference's, the
    template's up to 1600x its pixel noise)."""
    return psf_fit_noise_factor(stamps, exposure.noise_correlation, _sky_ring(stamps))


def _sky_ring(stamps: PsfStamps) -> int:
    """Width of the ring whose median is a matched image's local sky: half the fitted
    stamp's half-width, at least 4 px (a few hundred pixels)."""
    return max(4, stamps.half // 2)


#: Planes the matched images' PSF fits leave out: besides no data, saturated pixels,
#: whose clipped values no PSF fits (a fit of the rest is NaN where they held most of
#: the PSF: too little coverage).
_MATCHED_UNUSABLE = (*UNUSABLE_PLANES, "SAT")


def _matched_photometry(output, matched_science, matched_template, config):
    """PSF photometry function (x, y, pool) -> [(flux, error) on the matched science, on
    the matched template], each as a future of ``pool`` (``.result()``; computed at once
    without one).

    Both are on the science PSF (the template is matched to it). They still carry sky:
    the median of a ring around the fitted stamp (`_sky_ring`) is taken off first, so
    the flux is the light at the position above its surroundings (a constant fitted
    with the flux inside the stamp took up a bright neighbour's or host's light, and
    the flux off its peak came out strongly negative: on the JWST pair, science flux
    S/N median -13.6, 5% below -284, 36 of 66 sources negative). Errors carry each image's
    correlated-noise factor (`_matched_scale`): the matched template is convolved by the
    kernel (and both images by the preconvolution kernel for a score); fitted without
    it, the errors were 3.3x (template) too small on the 4096 test pair, 6.6x and 8.9x
    in preconvolve mode. They are the pixel noise's: in a crowded field the light of
    unresolved neighbours (confusion) adds to it. None when either image is missing.
    """
    if matched_science is None or matched_template is None:
        return None
    psf = matched_science.psf or output.require_psf()
    # the two share the pixel grid and the PSF: one set of drawn stamps per position
    stamps = PsfStamps(psf, matched_science, config=config)
    science_scale = _matched_scale(matched_science, stamps)
    template_scale = _matched_scale(matched_template, stamps)

    def measure(x, y, pool: Executor | None = None) -> list[Any]:
        x0, y0 = matched_science.xy0
        x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y))
        model = stamps.at(x + x0, y + y0)

        def fit(exposure, scale, part=slice(None)):
            drawn = (model[0][part], model[1][part], model[2][part])
            fit = psf_photometry(
                exposure,
                x[part],
                y[part],
                stamps,
                False,
                config.min_psf_coverage,
                drawn=drawn,
                unusable=_MATCHED_UNUSABLE,
                sky_ring=_sky_ring(stamps),
            )
            return fit["flux"], fit["flux_err"] * scale

        pool = pool or InlineExecutor()
        futures: list[Any] = [pool.submit(fit, matched_science, science_scale)]
        if matched_template.variance_deferred and x.size > STAMP_BATCH:
            # its variance stamps cost small FFTs: the template's fit, then the longest,
            # is split evenly over the pool's threads (each position's numbers are its own)
            size = -(-x.size // n_threads())
            parts = [
                pool.submit(fit, matched_template, template_scale, p) for p in batches(x.size, size)
            ]
            futures.append(_Joined(parts))
        else:
            futures.append(pool.submit(fit, matched_template, template_scale))
        return futures

    return measure


class _Joined:
    """The (flux, error) futures of consecutive parts of the positions, as one."""

    def __init__(self, parts: list[Future]) -> None:
        self.parts = parts

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        done = [part.result() for part in self.parts]
        return np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done])


#: Half-width of the PSF fit of a single-signed source on a score, in FWHMs of a point
#: source's profile there (`score_profile`; at least 1 px).
SCORE_FIT_RADIUS_FWHM = 0.2


class _Setup(NamedTuple):
    """`_setup`'s result. ``scale`` None: a score's, measured only for its dipoles."""

    stamps: PsfStamps
    scale: float | None
    single_stamps: PsfStamps
    single_scale: float
    matched: Any
    aperture_scale: float
    response: FilteredPsf | None


def _setup(output: Exposure, config, matched_science, matched_template, is_score: bool):
    """What does not depend on the detections, made beside them: the output's PSF stamps
    and the noise scale of their fluxes (`noise_scale`; on a score None, measured only
    for dipoles), the same for single-signed sources (other stamps on a score), the
    matched images' photometry (`_matched_photometry`) and the aperture sums' noise
    scale (`_aperture_scale`).

    A score is already matched-filtered: a source's S/N is gathered at its position.
    The profile's wings carry noise correlated with its core's: fitted over the whole
    profile, the S/N was 0.80-0.87 of a PSF fit's on the difference (1024 and 4096
    test pairs, each noise scale from 4000 positions), on the core 0.95-0.98, fluxes
    within 0.7%. Single sources are fitted on the core (`SCORE_FIT_RADIUS_FWHM`),
    dipoles, two lobes, on the whole profile."""
    forced = config.forced
    stamps = PsfStamps(output.require_psf(), output, config=forced)
    matched = _matched_photometry(output, matched_science, matched_template, forced)
    aperture = _aperture_scale(output, config.aperture_radius_fwhm * stamps.fwhm, forced)
    response = _filtered_psf(output, config, is_score) if config.drop_psf_sidelobes else None
    if is_score:
        half = max(1, round(SCORE_FIT_RADIUS_FWHM * stamps.fwhm))
        core = PsfStamps(stamps.psf, output, half=half, config=forced)
        scale = noise_scale(output, core, forced)
        return _Setup(stamps, None, core, scale, matched, aperture, response)
    scale = noise_scale(output, stamps, forced)
    return _Setup(stamps, scale, stamps, scale, matched, aperture, response)


def _filtered_psf(output: Exposure, config: DiaSourceConfig, is_score: bool) -> FilteredPsf:
    """What a point source puts in the detection's filtered image (`core.sidelobes`): its
    PSF (cropped as the detection crops it) correlated with the detection's matched
    filter, that PSF on a difference and none on a score, which is already filtered
    (``output`` then carries a point source's profile in it, `score_profile`)."""
    psf = output.require_psf()
    profile = _search_kernel(psf)
    kernel = np.ones((1, 1)) if is_score else profile
    return FilteredPsf(psf, output, kernel, profile.shape[0] // 2, config.forced)


def measure_dia_sources(
    output: Exposure,
    detections: Detections,
    config: DiaSourceConfig | None = None,
    matched_science: Exposure | None = None,
    matched_template: Exposure | None = None,
    kernel_sources: Table | None = None,
    is_score: bool = False,
) -> Table:
    """Measure detected DIA sources; see `dia_sources` for the columns. ``output``
    carries the PSF to fit (on a score, `score_profile`'s) and ``is_score`` says it
    is a score."""
    return _measure_beside(
        output,
        lambda: detections,
        config or DiaSourceConfig(),
        matched_science,
        matched_template,
        kernel_sources,
        is_score,
    )


def _measure_beside(
    output: Exposure,
    detect: Callable[[], Detections],
    config: DiaSourceConfig,
    matched_science: Exposure | None,
    matched_template: Exposure | None,
    kernel_sources: Table | None,
    is_score: bool,
    inputs: tuple[Exposure | None, Exposure | None] | None = None,
) -> Table:
    """`_measure` of the detections ``detect()`` gives, on a task pool: what does not
    need them (`_setup`) is made beside ``detect``, its Python-bound work beside its
    frame passes, which hold the GIL little (the output's stamps started after them,
    beside the Python-bound search, made the 4096 auto pair's DIA sources take 0.392 s
    instead of 0.379 s; medians of 10 alternating processes)."""
    if matched_template is not None and matched_template.psf is None:
        # a star in it has the output's profile: the subtraction matched it so
        matched_template = matched_template.with_psf(output.require_psf())
    with task_pool() as pool:
        setup = pool.submit(_setup, output, config, matched_science, matched_template, is_score)
        detections = detect()
        table = _measure(
            output,
            detections,
            config,
            matched_science,
            matched_template,
            kernel_sources,
            setup,
            pool,
            is_score,
            inputs,
        )
    table.meta.update(observation_meta(output))
    return table


def _without_sidelobes(
    output: Exposure,
    det: Detections,
    config: DiaSourceConfig,
    fit_stamps: PsfStamps,
    response: FilteredPsf,
) -> Detections:
    """``det`` without the detections that brighter ones' PSF explains (`core.sidelobes`).

    Each detection with a fainter one within the reach of ``response`` (`_filtered_psf`)
    is centroided (`_shape`; on a score too: at the peaks of bright, flat-topped SAAO
    profiles the fits explained fewer rings, 1-2 more rows a frame) and PSF-fitted
    (``fit_stamps``), and predicts the filtered image at the fainter peaks.
    """
    kernel = response.kernel
    order = np.argsort(-np.abs(det.peak_snr), kind="stable")
    col, row = det.col[order], det.row[order]
    fainter, brighter = close_pairs(col, row, response.reach)
    if fainter.size == 0:
        return det
    models = np.unique(brighter)
    _, dx, dy, _, _ = _shape(det, order[models], _shape_half(det))
    x, y = det.col[order[models]] + dx, det.row[order[models]] + dy
    forced = config.forced
    fit = psf_photometry(output, x, y, fit_stamps, forced.fit_background, forced.min_psf_coverage)
    model = np.searchsorted(models, brighter)
    predicted = fit["flux"][model] * response.values(x, y, model, col[fainter], row[fainter])
    observed = np.zeros(order.size)
    tested = np.unique(fainter)
    h = kernel.shape[0] // 2
    observed[tested] = np.einsum(
        "nij,ij->n", det.image.stamps(col[tested], row[tested], h).astype(np.float64), kernel
    )
    gone = explained(
        det.peak_snr[order],
        observed,
        fainter,
        brighter,
        predicted,
        config.threshold,
        config.sidelobe_model_error,
    )
    return det.subset(np.sort(order[~gone]))


def _distinct(x, y, sign, strength, radius: float) -> np.ndarray:
    """Mask of the positions to keep: of same-signed ones closer than ``radius``, the
    strongest (the others are the same source seen through two peaks)."""
    keep = np.ones(x.size, dtype=bool)
    if x.size < 2:
        return keep
    tree = cKDTree(np.column_stack([x, y]))
    for i, j in sorted(
        tree.query_pairs(radius), key=lambda p: -max(strength[p[0]], strength[p[1]])
    ):
        if sign[i] == sign[j] and keep[i] and keep[j]:
            keep[j if strength[i] >= strength[j] else i] = False
    return keep


def _shape(det: Detections, peaks: np.ndarray, half: int) -> tuple[np.ndarray, ...]:
    """Sign-corrected stamps of ``peaks`` (indices into ``det``), their centroid offsets
    (dx, dy) from the peak pixels and the offsets of their positions (px, py): on a score
    the profile's peak (`_peak_offsets`) where its 3 x 3 gives one, else the centroid.

    The peak of a matched-filtered image is where the PSF fits best: on the test presets'
    scores, position rms at S/N >= 20 0.088-0.132 -> 0.081-0.120 px, FWHM 7 px 0.205 ->
    0.178 (the weighted centroid of a profile the filter already widened scatters more).
    The centroids still tell deblended peaks of one flat-topped profile (`_distinct`),
    whose peaks stay apart.

    A profile that unusable pixels or the frame's edge cut is cut alike through the peak
    pixel (`SearchedImage.mirrored_stamps`). Point sources of FWHM 7 px 2.3 / 3.6 / 5.1 px
    from an EDGE band: centroids 0.62 / 0.24 / 0.04 px off cut on one side, 0.39 / 0.13 /
    0.02 mirrored (a window symmetric about the peak pixel, not the source, still leans
    when the cut is within half a FWHM); a transient beside a score's EDGE band (FWHM 7
    px) 1.46 px -> 0.30 px.
    """
    sign = det.sign[peaks].astype(float)[:, None, None]
    stamps = det.image.mirrored_stamps(det.col[peaks], det.row[peaks], half)
    profile = stamps * sign
    dx, dy = _centroids(profile, det.psf_sigma)
    px, py = dx, dy
    if det.image.filtered:
        peak_x, peak_y, ok = _peak_offsets(profile)
        px, py = np.where(ok, peak_x, dx), np.where(ok, peak_y, dy)
    return profile, dx, dy, px, py


def _peak_offsets(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets (dx, dy) of each stamp's peak from its centre pixel: the vertex of the
    quadratic through the logarithms of its central 3 x 3 (exact for a Gaussian peak,
    tilted or not), and where that holds (all nine positive, a maximum within a pixel)."""
    c = profile.shape[1] // 2
    core = np.asarray(profile[:, c - 1 : c + 2, c - 1 : c + 2], dtype=np.float64)
    ok = (core > 0).all(axis=(1, 2))
    w = np.log(np.where(core > 0, core, 1.0))
    gx, gy = 0.5 * (w[:, 1, 2] - w[:, 1, 0]), 0.5 * (w[:, 2, 1] - w[:, 0, 1])
    hxx = w[:, 1, 2] - 2.0 * w[:, 1, 1] + w[:, 1, 0]
    hyy = w[:, 2, 1] - 2.0 * w[:, 1, 1] + w[:, 0, 1]
    hxy = 0.25 * (w[:, 2, 2] - w[:, 2, 0] - w[:, 0, 2] + w[:, 0, 0])
    det = hxx * hyy - hxy * hxy
    ok &= (hxx < 0) & (det > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = (hxy * gy - hyy * gx) / det
        dy = (hxy * gx - hxx * gy) / det
    ok &= (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    return np.where(ok, dx, 0.0), np.where(ok, dy, 0.0), ok


def _shape_half(det: Detections) -> int:
    """Half-width (px) of the stamps `_shape` centroids: 4 PSF sigma, at least 5 px."""
    return int(max(5, math.ceil(4.0 * det.psf_sigma)))


def _interleave(halves) -> np.ndarray:
    """The values of every other item (from 0, then from 1) back in item order."""
    even, odd = halves
    out = np.empty(even.size + odd.size, dtype=np.result_type(even, odd))
    out[0::2], out[1::2] = even, odd
    return out


def _measure(
    output: Exposure,
    det: Detections,
    config: DiaSourceConfig,
    matched_science: Exposure | None,
    matched_template: Exposure | None,
    kernel_sources: Table | None,
    setup: Future,
    pool: Executor,
    is_score: bool,
    inputs: tuple[Exposure | None, Exposure | None] | None = None,
) -> Table:
    """`measure_dia_sources` with what does not need the detections in ``setup`` (a
    future of `_setup`); the independent measurements run on ``pool``."""
    forced = config.forced
    stamps, scale, single_stamps, single_scale, matched, aperture_scale, response = setup.result()
    fwhm = stamps.fwhm
    found = det.col.size
    if response is not None:
        # before the pairing: a ring's peaks of both signs made dipoles of each other
        det = _without_sidelobes(output, det, config, single_stamps, response)
    pairs = _pair_dipoles(det, config.dipole_max_separation_fwhm * fwhm)
    # a score's dipoles are fitted on the whole profile: its noise scale, beside the rest
    whole = None
    if scale is None and pairs.size:
        whole = pool.submit(noise_scale, output, stamps, forced)
    in_pair = np.zeros(det.col.size, dtype=bool)
    in_pair[pairs.ravel()] = True
    single = np.flatnonzero(~in_pair)

    # centroids, positions and moments of single-signed sources, on sign-corrected
    # stamps; each source's iterations are its own, so two halves run on two threads
    # (every other source: bright ones converge in fewer iterations)
    half = _shape_half(det)
    later = pool.submit(_shape, det, single[1::2], half)
    shapes = [_shape(det, single[0::2], half), later.result()]
    moments = [pool.submit(_moments, p, dx, dy, det.psf_sigma) for p, dx, dy, _, _ in shapes]
    dx, dy, px, py = (_interleave([shape[k] for shape in shapes]) for k in range(1, 5))
    # deblended peaks of one source whose centroids meet (a score's flat-topped profile:
    # 0.001-0.2 px apart on SAAO 0028) are one source: the strongest stays
    kept = _distinct(
        det.col[single] + dx,
        det.row[single] + dy,
        det.sign[single],
        np.abs(det.peak_snr[single]),
        0.25 * fwhm,
    )
    single = single[kept]
    x, y = det.col[single] + px[kept], det.row[single] + py[kept]
    fit = pool.submit(
        psf_photometry,
        output,
        x,
        y,
        single_stamps,
        forced.fit_background,
        forced.min_psf_coverage,
        # a cosmic ray or hot pixel in the output is narrower than its PSF; on a score,
        # already filtered by the PSF, it is not
        sharpness=not is_score,
    )
    n_single, n_pair = single.size, pairs.shape[0]
    n = n_single + n_pair

    columns: dict[str, np.ndarray] = {
        name: np.zeros(n, dtype=kind) for name, kind in DIA_COLUMNS.items()
    }
    for name in ("dipole_separation", "dipole_angle", "dipole_pos_flux", "dipole_neg_flux"):
        columns[name][:] = np.nan
    columns["x"][:n_single], columns["y"][:n_single] = x, y
    columns["is_negative"][:n_single] = det.sign[single] < 0
    columns["detection_snr"][:n_single] = det.peak_snr[single]
    columns["footprint"][:n_single] = det.footprint[single]
    columns["n_peaks"][:n_single] = det.n_peaks[single]

    if whole is not None:
        scale = whole.result()
    for k, (ip, jn) in enumerate(pairs):
        mid_x = 0.5 * (det.col[ip] + det.col[jn])
        mid_y = 0.5 * (det.row[ip] + det.row[jn])
        lobes = None
        if matched is not None:
            at_mid = matched(np.array([mid_x]), np.array([mid_y]))
            lobes = [(float(f.result()[0][0]), float(f.result()[1][0])) for f in at_mid]
        dipole = _fit_dipole(
            output,
            stamps,
            (det.col[ip], det.row[ip]),
            (det.col[jn], det.row[jn]),
            lobes,
            config.dipole_max_separation_fwhm * fwhm,
        )
        row = n_single + k
        columns["x"][row], columns["y"][row] = dipole["x"], dipole["y"]
        columns["psf_flux"][row] = dipole["flux"]
        columns["psf_flux_err"][row] = dipole["flux_err"] * scale
        columns["dipole_separation"][row] = dipole["separation"]
        columns["dipole_angle"][row] = dipole["angle"]
        columns["dipole_pos_flux"][row] = dipole["pos_flux"]
        columns["dipole_neg_flux"][row] = dipole["neg_flux"]
        columns["is_dipole"][row] = True
        strongest = ip if abs(det.peak_snr[ip]) >= abs(det.peak_snr[jn]) else jn
        columns["detection_snr"][row] = det.peak_snr[strongest]
        columns["footprint"][row] = det.footprint[ip]
        columns["n_peaks"][row] = det.n_peaks[ip] + det.n_peaks[jn]
    if n_pair:
        pair_x, pair_y = columns["x"][n_single:], columns["y"][n_single:]
        profile = det.image.stamps(
            np.floor(pair_x + 0.5).astype(int),
            np.floor(pair_y + 0.5).astype(int),
            half,
        )
        # moments of the absolute profile: the extent of both lobes
        offset_x = pair_x - np.floor(pair_x + 0.5)
        offset_y = pair_y - np.floor(pair_y + 0.5)
        m = _moments(np.abs(profile), offset_x, offset_y, det.psf_sigma)
        columns["ixx"][n_single:], columns["iyy"][n_single:], columns["ixy"][n_single:] = m

    x_all, y_all = columns["x"], columns["y"]
    ix = np.floor(x_all + 0.5).astype(int)
    iy = np.floor(y_all + 0.5).astype(int)
    # the measurements at the final positions are independent of each other
    aperture = pool.submit(_aperture, output, x_all, y_all, config.aperture_radius_fwhm * fwhm)
    fluxes = matched(x_all, y_all, pool) if matched is not None else None
    columns["ra"], columns["dec"] = sky_positions(output, x_all, y_all)
    # the flags' reach in the difference's FWHM in both modes (a score's profile is
    # sqrt(2) wider: an INTRP pixel 5 px away flagged the score's source, not the
    # difference's)
    difference_fwhm = _difference_fwhm(stamps, is_score)
    flags = pixel_flags(output, ix, iy, forced.flag_radius_fwhm * difference_fwhm, stamps.half)
    outside = outside_kernel_hull(
        kernel_sources, output.xy0, x_all, y_all, config.suspect_kernel_margin
    )
    single_fit = fit.result()
    columns["psf_flux"][:n_single] = single_fit["flux"]
    columns["psf_flux_err"][:n_single] = single_fit["flux_err"] * single_scale
    ixx, iyy, ixy = (_interleave(m)[kept] for m in zip(*(f.result() for f in moments), strict=True))
    columns["ixx"][:n_single], columns["iyy"][:n_single], columns["ixy"][:n_single] = ixx, iyy, ixy
    with np.errstate(invalid="ignore", divide="ignore"):
        columns["snr"] = columns["psf_flux"] / columns["psf_flux_err"]
    # near a star whose residual can reach the threshold in the source's noise (a
    # saturated one's in the typical source's), in the difference's widths on a score
    # too (a residual is where the star is in both modes)
    limits = bright_star_limit(
        columns["psf_flux_err"], config.threshold, config.bright_star_residual
    )
    bright = pool.submit(
        bright_star_light,
        matched_template,
        ix,
        iy,
        config.bright_star_radius_fwhm * difference_fwhm,
        limits,
        float(np.median(limits)) if n else None,
    )
    # the saturated stars in reach of the sources (their clipped cores and bleed trails)
    profile, reach, search, template = saturated_search(
        output.require_psf(), kernel_sources, fwhm, matched_template, config, filtered=is_score
    )
    saturated = pool.submit(saturated_stars, output, template, ix, iy, search)
    columns["aperture_flux"], aperture_err = aperture.result()
    columns["aperture_flux_err"] = aperture_err * aperture_scale
    # the matched images' fluxes and the flags that need neither the bright stars nor the
    # saturated ones, made here while those two run on the pool (this thread would wait)
    for label, result in zip(("science", "template"), fluxes or [None, None], strict=True):
        flux, error = result.result() if result is not None else (np.nan, np.nan)
        columns[f"{label}_flux"][:] = flux
        columns[f"{label}_flux_err"][:] = error
    if "sharp" in single_fit:
        flags[:n_single][single_fit["sharp"]] |= FLAG_BITS["sharp"][0]
    # a trail or a saturated star's row artifact, broken into sources along a line; the
    # maxima folded into them still mark where its ridge ran
    along = np.concatenate([x_all, det.merged[0]]), np.concatenate([y_all, det.merged[1]])
    flags[on_lines(*along, fwhm)[: x_all.size]] |= FLAG_BITS["streak"][0]
    if inputs is not None and n_single:
        # a ray the preconvolution or the matching kernel widened is still narrow there
        negative = det.sign[single] < 0
        signed = np.copysign(np.abs(columns["psf_flux"][:n_single]), np.where(negative, -1, 1))
        light = np.where(
            negative, columns["template_flux"][:n_single], columns["science_flux"][:n_single]
        )
        in_inputs = sharp_in_inputs(output, x, y, signed, light, inputs[0], inputs[1], forced)
        flags[:n_single][in_inputs] |= FLAG_BITS["sharp"][0]
    # the fit's S/N or the detection's, the less: a fit reads saturated pixels, which the
    # search leaves out
    near = bright_star(
        ix,
        iy,
        columns["psf_flux"],
        columns["psf_flux_err"],
        np.fmin(np.abs(columns["snr"]), np.abs(columns["detection_snr"])),
        (flags & FLAG_BITS["saturated"][0]) != 0,
        bright.result(),
        saturated.result(),
        profile,
        reach,
        config,
        # a dipole's lobes have both signs: its net flux is judged whole
        np.where(columns["is_dipole"], 0.0, np.sign(columns["detection_snr"])),
    )
    flags[near] |= FLAG_BITS["bright_star"][0]
    flags[outside] |= FLAG_BITS["suspect_kernel"][0]
    columns["flags"] = flags
    columns.update(flag_columns(flags))

    # most significant first; ids follow that order
    order = np.argsort(-np.abs(columns["detection_snr"]), kind="stable")
    table = Table({name: columns[name][order] for name in DIA_COLUMNS})
    table["id"] = np.arange(n, dtype=np.int64)
    table.meta.update(
        {
            "threshold": float(config.threshold),
            # the run's cutout side goes with its catalog: `alsub cutouts`' default
            "cutout_size": int(config.cutout_size),
            "noise_factor": float(det.noise_factor),
            "noise_scale": float(single_scale),
            "psf_fwhm": float(fwhm),
            "n_positive": int(np.count_nonzero(~table["is_negative"] & ~table["is_dipole"])),
            "n_negative": int(np.count_nonzero(table["is_negative"])),
            "n_dipoles": int(n_pair),
            "n_sidelobes": int(found - det.col.size),
        }
    )
    return table


def _difference_fwhm(stamps: PsfStamps, is_score: bool) -> float:
    """FWHM (px) of a point source in the difference: on a score, of the PSF its profile
    was made from (`score_profile`), not of the profile the preconvolution widened."""
    if is_score and isinstance(stamps.psf, _CorrelatedPsf):
        return SIGMA_TO_FWHM * profile_sigma(stamps.psf.psf)
    return stamps.fwhm


class _CorrelatedPsf(DrawnOncePsf):
    """A PSF correlated with a fixed kernel, normalised to unit sum: the steps of
    ``scipy.signal.fftconvolve(stamp, flipped kernel, "full")`` with the kernel's
    transform made once per stamp shape (PSF photometry draws a stamp at every node of
    its grid)."""

    def __init__(self, psf: Psf, kernel: np.ndarray):
        self.psf = psf
        self.kernel = kernel[::-1, ::-1]  # correlation = convolution with the flipped kernel
        self.average_position = psf.average_position
        self._spectra: dict[tuple[int, ...], tuple[list[int], list[int], np.ndarray]] = {}

    def _draw(self, x, y) -> np.ndarray:
        stamp = np.asarray(self.psf.kernel_image(x, y))
        if stamp.shape not in self._spectra:
            shape = [a + b - 1 for a, b in zip(stamp.shape, self.kernel.shape, strict=True)]
            fast = [sfft.next_fast_len(n, True) for n in shape]
            spectrum = sfft.rfftn(self.kernel, fast, axes=[0, 1])
            self._spectra[stamp.shape] = shape, fast, spectrum
        shape, fast, spectrum = self._spectra[stamp.shape]
        out = sfft.irfftn(sfft.rfftn(stamp, fast, axes=[0, 1]) * spectrum, fast, axes=[0, 1])
        out = out[: shape[0], : shape[1]]
        return out / out.sum()


def score_profile(psf: Psf, preconvolution_psf: Psf) -> Psf:
    """Profile of a point source in a score (or preconvolved) image: ``psf`` correlated
    with the preconvolution kernel (``preconvolution_psf`` at its average position,
    unit sum), as the preconvolution task builds it; for a decorrelated score both are
    its decorrelated PSF (see `dia_sources`)."""
    stamp = np.asarray(preconvolution_psf.kernel_image(), dtype=np.float64)
    return _CorrelatedPsf(psf, stamp / stamp.sum())


def _point_source_in_score(psf: Psf, kernel: np.ndarray | None) -> Psf:
    """`score_profile` of ``psf`` with the preconvolution kernel a point source labelled
    ``psf`` was correlated with, as ``psf`` is seen: ``psf`` itself when the kernel was
    the whole science PSF (None), else ``kernel`` (cut from it), through the same
    decorrelation filter as ``psf``.

    A cut kernel P' keeps the fraction f of P's flux in its box and is scaled to unit
    sum: a point source's score profile P (x) P' then holds its core 1/f higher than
    P (x) P, and fitted with the latter its flux came out 21% high (JWST, P cut to the
    power fraction 0.999: 9 of 205 px)."""
    if kernel is None:
        return score_profile(psf, psf)
    stamp = ImagePsf(kernel, average_position=psf.average_position)
    applied = psf.with_base(stamp) if isinstance(psf, DecorrelatedPsf) else stamp
    return score_profile(psf, applied)


def dia_sources(
    output: Exposure,
    config: DiaSourceConfig | None = None,
    is_score: bool = False,
    matched_science: Exposure | None = None,
    matched_template: Exposure | None = None,
    kernel_sources: Table | None = None,
    inputs: tuple[Exposure | None, Exposure | None] | None = None,
    preconvolution_kernel: np.ndarray | None = None,
) -> Table:
    """Detect and measure the DIA sources of a subtraction.

    Parameters
    ----------
    output : `Exposure`
        The difference (science units) or, with ``is_score``, the score.
    config : `DiaSourceConfig` or None
    is_score : bool
        Detect on score / sqrt(variance) instead of the matched-filtered difference.
    matched_science, matched_template : `Exposure` or None
        For the science and template fluxes at each position and the bright-star flag.
    kernel_sources : `astropy.table.Table` or None
        The kernel sources (parent x, y); sources far outside their hull are flagged
        ``suspect_kernel``, unless their meta says the solution fitted on them is
        constant (`core.position_flags.EXTRAPOLATED_ORDER` 0, set by the subtraction).
    inputs : (science, template) or None
        The inputs as read, before any convolution (the template on the science grid;
        either may be None): single-signed sources narrower than the PSF there are
        flagged ``sharp`` too (`core.input_rays`), rays a convolution widened.
    preconvolution_kernel : `numpy.ndarray` or None
        With ``is_score``: the preconvolution kernel as applied when it was cut from the
        science PSF's stamp (``SubtractionConfig.preconvolution_width_fwhm``); None: the
        whole science PSF was.

    Returns
    -------
    `astropy.table.Table`
        One row per DIA source, most significant first (`DIA_COLUMNS`): ``id``;
        ``x``, ``y`` (0-based column and row of the science array: the Gaussian-weighted
        centroid on a difference, the profile's peak on a score where its central 3 x 3
        gives one, `_shape`); ``ra``,
        ``dec`` (degrees, NaN without WCS); ``psf_flux``, ``psf_flux_err``
        (PSF fit on the output with its PSF at the position, science counts;
        errors scaled for correlated noise, meta ``noise_scale``; on a score,
        single-signed sources are fitted on the core of a point source's profile,
        `SCORE_FIT_RADIUS_FWHM`, and the meta scale is theirs, dipoles' on the
        whole profile having their own) and ``snr``; ``detection_snr`` (peak
        of the detection S/N, negative for negative sources); ``aperture_flux``
        and error (radius ``aperture_radius_fwhm`` FWHM; the error scaled for
        correlated noise, `_aperture_scale`); adaptive moments
        ``ixx``, ``iyy``, ``ixy`` (px^2); ``is_negative``; ``is_dipole`` with
        ``dipole_separation`` (px), ``dipole_angle`` (degrees from +x towards
        +y, negative lobe to positive lobe), ``dipole_pos_flux`` and
        ``dipole_neg_flux`` (< 0), the separation and lobe fluxes NaN where the
        fit cannot tell them apart (lobes closer than a FWHM with no star under
        them in the images before subtraction, or no lobe of each sign);
        ``footprint`` and ``n_peaks`` (deblending);
        ``science_flux``, ``template_flux`` (PSF fluxes on the matched images
        above the median of a ring around the fitted stamp, saturated pixels left
        out, science units; NaN with too little of the PSF usable) and errors
        (pixel noise, its correlation by the kernels included; in a crowded field
        the light of unresolved neighbours adds scatter they do not hold);
        ``flags`` (bits of
        `core.forced.FLAG_BITS`; ``bright_star``: a star's residual may be the source,
        near a bright star or within reach of a saturated one's light, docs/DIA_FLAGS.md;
        ``streak``: one of a line of sources, `core.streaks`;
        ``sharp``: narrower than the PSF, a cosmic ray or hot pixel,
        `core.sharpness`: on the output, not on a score, where the PSF filter widened
        it, and in the ``inputs`` as read)
        and one ``flag_<name>`` column per bit. Meta ``n_sidelobes``: detections
        dropped as brighter sources' PSF rings and wings (``drop_psf_sidelobes``).
    """
    config = config or DiaSourceConfig()
    measured = output
    if is_score:
        # a point source in the score is its PSF label correlated with the preconvolution
        # kernel, and the decorrelation filtered both by sqrt(phi) (core.decorrelate): it
        # is the label correlated with itself at its average position (the science PSF's
        # when not decorrelated); with the science PSF as the second, fluxes were off by
        # up to 4% (bench/README.md, session 16)
        # (a cut kernel: the label correlated with that kernel, decorrelated as it is)
        kernel = preconvolution_kernel
        measured = replace(output, psf=_point_source_in_score(output.require_psf(), kernel))
        if matched_science is not None and matched_science.psf is not None:
            # both matched images, not decorrelated, carry the science PSF's label: a
            # point source in them is that PSF correlated with the preconvolution kernel
            matched_science = matched_science.with_psf(
                _point_source_in_score(matched_science.psf, kernel)
            )
            if matched_template is not None:
                # shares the planes: its deferred variance stays deferred
                matched_template = matched_template.with_psf(matched_science.psf)
        elif matched_template is not None and matched_template.psf is not None:
            matched_template = matched_template.with_psf(
                _point_source_in_score(matched_template.psf, kernel)
            )
    return _measure_beside(
        measured,
        lambda: detect_dia_sources(output, config, is_score),
        config,
        matched_science,
        matched_template,
        kernel_sources,
        is_score,
        inputs,
    )


#: Table meta -> FITS header keyword of a written catalog.
_META_KEYS = {
    "threshold": "THRESH",
    "cutout_size": "CUTSIZE",
    "noise_factor": "NOISEFAC",
    "noise_scale": "NOISESCL",
    "psf_fwhm": "PSFFWHM",
    "n_positive": "NPOS",
    "n_negative": "NNEG",
    "n_dipoles": "NDIPOLE",
    "n_sidelobes": "NSIDELOB",
    "mjd_obs": "MJD-OBS",
    "date_obs": "DATE-OBS",
    "band": "FILTER",
    "exptime": "EXPTIME",
    "bunit": "BUNIT",
    "photcal": "PHOTCAL",
    "flux_ratio": "FLUXRAT",
}
#: Header comments of the cards whose meta name does not say enough.
_META_COMMENTS = {
    "photcal": "nJy per count of the fluxes",
    "flux_ratio": "science / template flux ratio (the kernel's)",
    "mjd_obs": "start of the science exposure (MJD)",
    "date_obs": "start of the science exposure",
    "exptime": "science exposure time (s)",
    "bunit": "pixel unit of the difference: fluxes sum pixels",
    "n_sidelobes": "detections dropped as PSF side lobes",
    "cutout_size": "alert cutout side (px), dia.cutout_size",
}
#: Units (FITS TUNIT) of the columns that have them whatever the image's unit.
_COLUMN_UNITS = {
    "x": "pix",
    "y": "pix",
    "ra": "deg",
    "dec": "deg",
    "ixx": "pix2",
    "iyy": "pix2",
    "ixy": "pix2",
    "dipole_separation": "pix",
    "dipole_angle": "deg",
}
#: Pixel units (BUNIT, lower case) that are counts: a sum of such pixels has the same unit.
_COUNT_UNITS = frozenset({"adu", "count", "counts", "ct", "dn", "electron", "electrons", "e-"})
_FLUX_SUFFIXES = ("_flux", "_flux_err")


#: EXTNAME of a written forced-photometry table (a DIA catalog's is ``DIASOURCES``).
FORCED_EXTNAME = "FORCED"


def catalog_hdulist(table: Table, extname: str = "DIASOURCES") -> fits.HDUList:
    """A DIA-source (or forced-photometry, ``extname`` `FORCED_EXTNAME`) table as FITS:
    primary + ``extname`` binary table; the table's figures, the science exposure's epoch,
    band and pixel unit where known (`observation_meta`) and the flag bits
    (``FLAG_<NAME>``) in its header. Positions, moments and angles have units (TUNIT);
    fluxes too when the pixels are counts."""
    hdu = fits.table_to_hdu(Table(table, meta={}))
    hdu.name = extname
    # as cards, not astropy units: a count unit such as ADU or DN is the image's own word
    units = dict(_COLUMN_UNITS)
    bunit = str(table.meta.get("bunit", "")).strip()
    if bunit.lower() in _COUNT_UNITS:
        units.update({name: bunit for name in table.colnames if name.endswith(_FLUX_SUFFIXES)})
    for index, name in enumerate(table.colnames, start=1):
        if name in units:
            hdu.header[f"TUNIT{index}"] = units[name]
    for key, card in _META_KEYS.items():
        if key in table.meta:
            comment = _META_COMMENTS.get(key, key.replace("_", " "))
            hdu.header[card] = (table.meta[key], comment)
    for name, (bit, _) in FLAG_BITS.items():
        hdu.header[f"HIERARCH FLAG_{name.upper()}"] = (bit, f"flags bit: {name}")
    return fits.HDUList([fits.PrimaryHDU(), hdu])


def read_dia_sources(path) -> Table:
    """Read a catalog written by `catalog_hdulist` (meta restored)."""
    table = Table.read(path, hdu="DIASOURCES", unit_parse_strict="silent")
    header = {v: k for k, v in _META_KEYS.items()}
    table.meta = {header[k]: v for k, v in table.meta.items() if k in header}
    for column in table.itercols():  # units belong to the file; the rows are numbers
        column.unit = None
    # astropy reads NaN floats back as masked values: NaN again, as written (a CSV of
    # the catalog had empty cells where the forced rows' have nan)
    for name in table.colnames:
        column = table[name]
        if isinstance(column, MaskedColumn) and column.dtype.kind == "f":
            table[name] = Column(column.filled(np.nan), name=name)
    return table
