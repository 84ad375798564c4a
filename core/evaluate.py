"""Scoring a subtraction against simulation truth: the numbers tests and benchmarks assert.

- ``noise_ratio`` / ``noise_mean``: robust std and median of D/sqrt(V) on empty sky
  (pixels far from every simulated star, transient and defect);
- ``transient_flux_ratio``: median of measured/true flux of injected transients,
  PSF photometry on the difference; ``transient_pull_std``: robust scatter
  of (measured - true)/error, 1 when the variance plane is right;
- ``star_chi2_median``: median reduced chi^2 in an aperture of radius one FWHM
  around constant stars of 1e3-1e5 counts;
- for a score image: ``transient_snr_ratio``, peak S/N over the ideal matched-filter S/N.

On real data there is no truth; `reference_figures` measures any difference (alsub's,
HOTPANTS's, ...) exactly as ``data/real/REFERENCE.md`` defines its figures, from plain
arrays, so different codes are compared on the same pixels, positions and stars:

- ``noise``: 1.4826 MAD of D/sqrt(V) on sky pixels (valid in every compared output, away
  from the border, from saturation and from sources detected on either input);
- ``target_snr``: D correlated with a Gaussian of the science FWHM at the target, over the
  robust std of the same statistic at random valid positions (a score image is sampled
  directly), so correlated noise counts;
- ``star_chi2``: median over the brightest unsaturated template stars of mean(D^2/V)
  within one science FWHM (a blended footprint is not "a star": its summed flux would
  rank it first; with blends kept the figures move away from REFERENCE.md's on SAAO).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import median_abs_deviation

from .config import DetectionConfig, ReferenceFiguresConfig
from .detection import detect_sources
from .exposure import Exposure
from .io import estimate_variance
from .metrics import NOISE_MASK_PLANES, footprint_means, robust_sigma_median
from .photometry import psf_flux

__all__ = [
    "sky_mask",
    "measure_quality",
    "Output",
    "ReferenceField",
    "output_valid",
    "detected_footprints",
    "reference_field",
    "noise_figure",
    "target_snr",
    "star_chi2",
    "reference_figures",
]

#: Planes of an alsub product whose pixels hold no usable difference: no data, the
#: convolution border, and values that depend on saturated (clipped or filled) input
#: pixels through the kernel footprint, as HOTPANTS masks its own (REFERENCE.md compares
#: only pixels valid in every output)
INVALID_OUTPUT_PLANES = ("NO_DATA", "EDGE", "SAT", "SAT_TEMPLATE")

#: Below this fraction of the stars' flux/peak area a detection is a cosmic ray, not a star.
_SHARP_AREA_FRACTION = 2.0 / 3.0
#: Peak S/N above which noise no longer lifts a peak enough to matter for that area.
_LOCUS_PEAK_SNR = 20.0


def _discs(shape, x, y, radius) -> np.ndarray:
    """Boolean image, True within ``radius`` (scalar or per-point) of the points."""
    out = np.zeros(shape, dtype=bool)
    radius = np.broadcast_to(np.asarray(radius, float), np.shape(x))
    for xc, yc, r in zip(np.asarray(x, float), np.asarray(y, float), radius, strict=True):
        ri = int(math.ceil(r))
        x0, x1 = max(0, int(xc) - ri), min(shape[1], int(xc) + ri + 2)
        y0, y1 = max(0, int(yc) - ri), min(shape[0], int(yc) + ri + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (xx - xc) ** 2 + (yy - yc) ** 2 <= r * r
    return out


def sky_mask(truth: dict, shape, fwhm: float, noise_sigma: float) -> np.ndarray:
    """True on empty sky: away from stars (radius growing with brightness), transients, defects."""
    stars = truth["stars"]
    flux = np.asarray(stars["flux_science"], float)
    # a star's wing falls below 0.1 sigma of one pixel roughly where its flux density does;
    # grow the radius with log flux so bright stars' wings and residuals are excluded
    f0 = max(noise_sigma * fwhm, 1e-9)
    radius = 1.5 * fwhm * (1.0 + np.log10(np.maximum(1.0, flux / f0)))
    near = _discs(shape, stars["x"], stars["y"], radius)
    transients = truth.get("transients", {})
    if len(transients.get("x", [])):
        near |= _discs(shape, transients["x"], transients["y"], 4 * fwhm)
    margin = int(3 * fwhm)
    for columns in (truth.get("bad_columns") or {}).values():
        for column in columns:
            col = int(column["x"])
            near[:, max(0, col - margin) : col + margin + 1] = True
    for hits in (truth.get("cosmic_rays") or {}).values():
        for hit in hits:
            near |= _discs(shape, hit["x"], hit["y"], margin)
    return ~near


def measure_quality(result, pair) -> dict[str, float]:
    """Quality figures of ``result`` (a `SubtractionResult`) against ``pair.truth``."""
    out = result.output
    truth = pair.truth
    fwhm = float(pair.science.psf.fwhm())
    bad = out.masked(NOISE_MASK_PLANES) | ~np.isfinite(out.image) | ~(out.variance > 0)
    sky_sigma = float(np.sqrt(np.median(pair.science.variance)))
    empty = sky_mask(truth, out.shape, fwhm, sky_sigma) & ~bad
    z = out.image[empty] / np.sqrt(out.variance[empty])
    noise_ratio, noise_mean = robust_sigma_median(z)
    quality: dict[str, float] = {
        "noise_ratio": noise_ratio,
        "noise_mean": noise_mean,
        "sky_pixels": float(z.size),
    }
    transients = truth["transients"]
    tx, ty = np.asarray(transients["x"]), np.asarray(transients["y"])
    tflux = np.asarray(transients["flux_science"])
    clean = ~np.asarray(transients.get("near_defect", np.zeros(len(tx), bool)), bool)
    if result.score is None:
        fluxes = np.array([psf_flux(out, x, y) for x, y in zip(tx, ty, strict=True)])
        ok = clean & np.isfinite(fluxes[:, 0]) if len(tx) else np.zeros(0, bool)
        if ok.any():
            ratio = fluxes[ok, 0] / tflux[ok]
            pull = (fluxes[ok, 0] - tflux[ok]) / fluxes[ok, 1]
            quality["transient_flux_ratio"] = float(np.median(ratio))
            # robust: a transient on a bright star's residual should not dominate
            quality["transient_pull_std"] = robust_sigma_median(pull)[0]
            quality["n_transients"] = float(ok.sum())
        quality["star_chi2_median"] = _star_chi2(out, truth, fwhm, bad)
    else:
        quality.update(_score_detection(result, pair, tx, ty, tflux, clean))
    return quality


def _star_chi2(out: Exposure, truth: dict, fwhm: float, bad: np.ndarray) -> float:
    """Median reduced chi^2 of D in radius-FWHM apertures around 1e3-1e5 count stars."""
    stars = truth["stars"]
    flux = np.asarray(stars["flux_science"])
    sel = (flux >= 1e3) & (flux <= 1e5) & ~np.asarray(stars.get("saturated", False), bool)
    chi2 = np.where(bad, np.nan, out.image.astype(np.float64) ** 2 / out.variance)
    values = []
    r = max(1.0, fwhm)
    ri = int(math.ceil(r))
    dy, dx = np.mgrid[-ri : ri + 1, -ri : ri + 1]
    disc = dx * dx + dy * dy <= r * r
    for x, y in zip(np.asarray(stars["x"])[sel], np.asarray(stars["y"])[sel], strict=True):
        ix, iy = int(round(x)), int(round(y))
        if ix - ri < 0 or iy - ri < 0 or ix + ri >= out.width or iy + ri >= out.height:
            continue
        pix = chi2[iy - ri : iy + ri + 1, ix - ri : ix + ri + 1][disc]
        if np.isfinite(pix).all():
            values.append(pix.mean())
    return float(np.median(values)) if values else math.nan


def _score_detection(result, pair, tx, ty, tflux, clean) -> dict[str, float]:
    """Peak S/N of transients on score/sqrt(V) against the ideal matched-filter S/N."""
    score = result.score
    snr = np.where(score.variance > 0, score.image / np.sqrt(score.variance), 0.0)
    psf = pair.science.psf
    measured, ideal = [], []
    ratio2 = float(pair.truth["flux_ratio"]) ** 2
    for x, y, f in zip(tx[clean], ty[clean], tflux[clean], strict=True):
        ix, iy = int(round(x)), int(round(y))
        if ix < 3 or iy < 3 or ix + 3 >= score.width or iy + 3 >= score.height:
            continue
        measured.append(snr[iy - 2 : iy + 3, ix - 2 : ix + 3].max())
        # ideal: optimal PSF photometry with the per-pixel noise of science + matched template
        stamp, x_min, y_min = psf.image_at(x, y)
        n = stamp.shape[0]
        if x_min < 0 or y_min < 0 or x_min + n > score.width or y_min + n > score.height:
            measured.pop()
            continue
        window = (slice(y_min, y_min + n), slice(x_min, x_min + n))
        var = pair.science.variance[window] + pair.template.variance[window] * ratio2
        ideal.append(f * math.sqrt(np.sum(stamp.astype(np.float64) ** 2 / var)))
    measured_arr, ideal_arr = np.array(measured), np.array(ideal)
    return {
        "transient_snr_ratio": float(np.median(measured_arr / ideal_arr)) if ideal else math.nan,
        "transient_detected_fraction": float(np.mean(measured_arr[ideal_arr >= 7] >= 5))
        if np.any(ideal_arr >= 7)
        else math.nan,
    }


# ---------------------------------------------------------------- real data (REFERENCE.md)
@dataclass
class Output:
    """One difference to measure, as plain arrays.

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx)
        Difference D (or score image when ``score``), counts.
    variance : `numpy.ndarray` (ny, nx)
        Its variance V, counts^2 (for HOTPANTS the square of its ``-oni`` noise image).
    valid : `numpy.ndarray` (ny, nx), bool, or None
        Pixels holding a usable value; None: finite image and positive, finite variance.
    score : bool
        A preconvolved (score) image: the target S/N samples it without filtering again.
    """

    image: np.ndarray
    variance: np.ndarray
    valid: np.ndarray | None = None
    score: bool = False

    def usable(self) -> np.ndarray:
        """``valid`` and finite image, positive finite variance (bool (ny, nx))."""
        image = np.asarray(self.image)
        variance = np.asarray(self.variance)
        ok = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
        return ok if self.valid is None else ok & np.asarray(self.valid, bool)


@dataclass
class ReferenceField:
    """What every difference of one pair is measured on (the same for all of them).

    Attributes
    ----------
    sky : `numpy.ndarray` (ny, nx), bool
        Pixels of the noise figure.
    random_rows, random_cols : `numpy.ndarray` (n,), int
        Positions calibrating the target S/N.
    stars : `numpy.ndarray` (n, 2), float
        (row, col) of the chi^2 stars, brightest template flux first.
    fwhm : float
        Science FWHM (px).
    target : (float, float) or None
        (row, col) of the known variable.
    """

    sky: np.ndarray
    random_rows: np.ndarray
    random_cols: np.ndarray
    stars: np.ndarray
    fwhm: float
    target: tuple[float, float] | None
    config: ReferenceFiguresConfig


def output_valid(exposure: Exposure, planes=INVALID_OUTPUT_PLANES) -> np.ndarray:
    """Usable pixels of an alsub product: not NO_DATA/EDGE, finite, positive variance."""
    return Output(exposure.image, exposure.variance, ~exposure.masked(planes)).usable()


def detected_footprints(
    image: np.ndarray,
    variance: np.ndarray | None = None,
    saturated: np.ndarray | None = None,
    detection: DetectionConfig | None = None,
):
    """Sources detected on one input with alsub's own detection (`core.sources.detect_sources`).

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx)
        Input image (counts; NaN allowed: not searched).
    variance : `numpy.ndarray` (ny, nx) or None
        Its variance; None: modelled from the pixels (`core.io.estimate_variance`).
    saturated : `numpy.ndarray` (ny, nx), bool, or None
        Saturated pixels (flags the sources that touch them).
    detection : `DetectionConfig` or None

    Returns
    -------
    footprints : `numpy.ndarray` (ny, nx), bool
        Grown positive and negative footprints.
    table : `astropy.table.Table`
        The detection table (x = column, y = row, flux, flag_saturated, ...).
    """
    image = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(image)
    clean = np.where(finite, image, np.float32(0.0))
    if variance is None:
        variance = estimate_variance(clean, finite)[0]
    variance = np.where(np.isfinite(variance) & (variance > 0), variance, np.nanmedian(variance))
    exposure = Exposure.from_arrays(clean, variance)
    exposure.set_plane("NO_DATA", ~finite)
    if saturated is not None:
        exposure.set_plane("SAT", np.asarray(saturated, bool))
    table = detect_sources(exposure, detection, set_mask=False)
    footprints = (table.meta["segmentation"] != 0) | (table.meta["segmentation_negative"] != 0)
    return footprints, table


def _sharper_than_stars(table, candidates: np.ndarray) -> np.ndarray:
    """Detections whose flux/peak (an effective area) is under 2/3 of the stars'.

    A cosmic ray or hot pixel puts most of its flux in one or two pixels; a star
    spreads it over the PSF. The stars' area is the densest cluster of the areas of
    the candidates whose peak has S/N of at least `_LOCUS_PEAK_SNR` (noise lifts faint
    peaks, so faint areas run small), or of all candidates when fewer than 4 are that
    bright: stars share one profile, cosmic rays (energy, track) and galaxies do not.
    """
    flux = np.asarray(table["flux"], float)
    peak = np.asarray(table["peak"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        area = flux / peak
    usable = candidates & np.isfinite(area) & (area > 0)
    bright = usable & (np.asarray(table["peak_snr"], float) >= _LOCUS_PEAK_SNR)
    if np.count_nonzero(bright) < 4:
        bright = usable
    if np.count_nonzero(bright) < 4:
        return np.zeros(len(flux), bool)
    stars = _densest(area[bright])
    # a peak high by twice its noise shrinks the area as much: only a sharpness the
    # noise cannot explain marks a cosmic ray
    with np.errstate(divide="ignore", invalid="ignore"):
        lifted = 1.0 + 2.0 / np.asarray(table["peak_snr"], float)
    return usable & (area * lifted < _SHARP_AREA_FRACTION * stars)


def _densest(values: np.ndarray, width: float = 0.08) -> float:
    """Median of the densest cluster of positive ``values`` (within ``width`` in log)."""
    log_values = np.log(values)
    counts = (np.abs(log_values[:, None] - log_values[None, :]) < width).sum(axis=1)
    centre = log_values[np.argmax(counts)]
    return float(np.exp(np.median(log_values[np.abs(log_values - centre) < width])))


def _within(mask: np.ndarray, radius: float) -> np.ndarray:
    """True within ``radius`` px of any True pixel of ``mask`` (all False if none)."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    return ndimage.distance_transform_edt(~mask) <= radius


def reference_field(
    science: np.ndarray,
    template: np.ndarray,
    fwhm: float,
    *,
    valid: np.ndarray | None = None,
    science_variance: np.ndarray | None = None,
    template_variance: np.ndarray | None = None,
    saturated: np.ndarray | None = None,
    target: tuple[float, float] | None = None,
    config: ReferenceFiguresConfig | None = None,
) -> ReferenceField:
    """Sky pixels, random positions and chi^2 stars shared by all differences of a pair.

    Parameters
    ----------
    science, template : `numpy.ndarray` (ny, nx)
        The two inputs on the difference's grid (counts).
    fwhm : float
        Science PSF FWHM (px).
    valid : `numpy.ndarray` (ny, nx), bool, or None
        Pixels valid in every compared output (AND of `Output.usable`).
    science_variance, template_variance : `numpy.ndarray` (ny, nx) or None
        Variances of the inputs for the detection (None: modelled from the pixels).
    saturated : `numpy.ndarray` (ny, nx), bool, or None
        Saturated pixels of either input.
    target : (row, col) or None
        Known variable: kept out of the random positions and the star list.
    config : `ReferenceFiguresConfig` or None

    Returns
    -------
    `ReferenceField`
    """
    config = config or ReferenceFiguresConfig()
    shape = np.shape(science)
    valid = np.ones(shape, bool) if valid is None else np.asarray(valid, bool)
    valid = valid & np.isfinite(science) & np.isfinite(template)
    sat = np.zeros(shape, bool) if saturated is None else np.asarray(saturated, bool)
    border = int(math.ceil(config.border_fwhm * fwhm)) + config.border_pixels
    inside = np.zeros(shape, bool)
    inside[border : shape[0] - border, border : shape[1] - border] = True
    near_sat = _within(sat, config.saturation_radius_fwhm * fwhm)
    sources = np.zeros(shape, bool)
    template_table = None
    for image, variance in ((science, science_variance), (template, template_variance)):
        footprints, table = detected_footprints(image, variance, sat)
        sources |= footprints
        template_table = table  # the template's, after the loop
    sources = _within(sources, config.source_dilation)
    usable = valid & inside
    sky = usable & ~near_sat & ~sources

    rows, cols = np.nonzero(usable)
    if target is not None:
        far = np.hypot(rows - target[0], cols - target[1]) > config.target_radius_fwhm * fwhm
        rows, cols = rows[far], cols[far]
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(rows.size, size=min(config.n_random, rows.size), replace=False)

    assert template_table is not None
    star_rows = np.asarray(template_table["y"], float) - template_table.meta["xy0"][1]
    star_cols = np.asarray(template_table["x"], float) - template_table.meta["xy0"][0]
    flux = np.asarray(template_table["flux"], float)
    ir = np.clip(np.round(star_rows).astype(int), 0, shape[0] - 1)
    ic = np.clip(np.round(star_cols).astype(int), 0, shape[1] - 1)
    ok = ~np.asarray(template_table["flag_saturated"], bool) & np.isfinite(flux)
    if config.exclude_blended_stars:
        ok &= ~np.asarray(template_table["flag_blended"], bool)
    if config.exclude_sharp_sources:
        ok &= ~_sharper_than_stars(template_table, ok)
    ok &= inside[ir, ic] & ~near_sat[ir, ic]
    if target is not None:
        distance = np.hypot(star_rows - target[0], star_cols - target[1])
        ok &= distance > config.target_radius_fwhm * fwhm
    # the aperture must be valid in every output, so every output is measured on the same stars
    radius = config.star_radius_fwhm * fwhm
    (aperture_valid,) = footprint_means(
        lambda window: [valid[window].astype(float)], 1, star_cols, star_rows, radius, shape
    )
    ok &= aperture_valid == 1.0
    order = np.argsort(-flux[ok], kind="stable")[: config.n_stars]
    stars = np.column_stack([star_rows[ok][order], star_cols[ok][order]])
    return ReferenceField(
        sky=sky,
        random_rows=rows[pick],
        random_cols=cols[pick],
        stars=stars,
        fwhm=float(fwhm),
        target=None if target is None else (float(target[0]), float(target[1])),
        config=config,
    )


def noise_figure(output: Output, field: ReferenceField) -> float:
    """1.4826 MAD of D/sqrt(V) over the field's sky pixels (1 when V is right)."""
    sky = field.sky & output.usable()
    if not sky.any():
        return math.nan
    z = np.asarray(output.image, np.float64)[sky] / np.sqrt(np.asarray(output.variance)[sky])
    return float(median_abs_deviation(z, scale="normal"))


def target_snr(output: Output, field: ReferenceField) -> float:
    """Matched-filter S/N at the target, calibrated on the random positions.

    D (invalid pixels 0) is correlated with a unit-sum Gaussian of the science FWHM,
    sampled at the target (bilinear) and divided by 1.4826 MAD of the same statistic at
    the field's random positions; a score image is sampled as it is. NaN without target.
    """
    if field.target is None or field.random_rows.size == 0:
        return math.nan
    image = np.where(output.usable(), np.asarray(output.image, np.float64), 0.0)
    if not output.score:
        image = ndimage.gaussian_filter(image, field.fwhm / (2.0 * math.sqrt(2.0 * math.log(2))))
    at_target = ndimage.map_coordinates(image, [[field.target[0]], [field.target[1]]], order=1)
    scatter = median_abs_deviation(image[field.random_rows, field.random_cols], scale="normal")
    return float(at_target[0] / scatter) if scatter > 0 else math.nan


def star_chi2(output: Output, field: ReferenceField) -> float:
    """Median over the field's stars of mean(D^2/V) within ``star_radius_fwhm`` x FWHM.

    The field's stars have apertures valid in every output it was made for; for another
    output, the valid pixels of each aperture are averaged.
    """
    if not len(field.stars):
        return math.nan
    image, variance = np.asarray(output.image), np.asarray(output.variance)
    usable = output.usable()

    def chi2(window):
        with np.errstate(divide="ignore", invalid="ignore"):
            value = image[window].astype(np.float64) ** 2 / variance[window]
        return [np.where(usable[window], value, np.nan)]

    (means,) = footprint_means(
        chi2,
        1,
        field.stars[:, 1],
        field.stars[:, 0],
        field.config.star_radius_fwhm * field.fwhm,
        np.shape(image),
    )
    means = means[np.isfinite(means)]
    return float(np.median(means)) if means.size else math.nan


def reference_figures(
    outputs: Mapping[str, Output],
    science: np.ndarray,
    template: np.ndarray,
    fwhm: float,
    **field_options,
) -> dict[str, dict[str, float]]:
    """REFERENCE.md's three figures of every output, measured on the same pixels and stars.

    Parameters
    ----------
    outputs : mapping of name to `Output`
        The differences to compare (e.g. alsub auto, alsub preconvolve, HOTPANTS).
    science, template : `numpy.ndarray` (ny, nx)
        The inputs, on the outputs' grid.
    fwhm : float
        Science PSF FWHM (px).
    **field_options
        ``science_variance``, ``template_variance``, ``saturated``, ``target``, ``config``
        of `reference_field`.

    Returns
    -------
    dict
        name -> {"noise", "target_snr", "star_chi2", "n_sky_pixels", "n_stars"}.
    """
    valid = np.ones(np.shape(science), bool)
    for output in outputs.values():
        valid &= output.usable()
    field_ = reference_field(science, template, fwhm, valid=valid, **field_options)
    return {
        name: {
            "noise": noise_figure(output, field_),
            "target_snr": target_snr(output, field_),
            "star_chi2": star_chi2(output, field_),
            "n_sky_pixels": float(np.count_nonzero(field_.sky)),
            "n_stars": float(len(field_.stars)),
        }
        for name, output in outputs.items()
    }
