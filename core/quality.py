"""The quality verdict every subtraction carries: good, suspect or bad, with reasons.

A subtraction that ran to the end is not necessarily a good one: a kernel fitted
on three stars, a kernel sum of 5 between two calibrated images, a variance plane
that does not describe the noise, constant stars that do not vanish. This module
is the one place that knows the thresholds (`core.config.QualityConfig`); it reads
the metrics a run computed and the warnings it collected, and says what a careful
astronomer would say.

``bad``: the difference should not be used (noise wildly off its variance, the
same data twice, a kernel sum far from any plausible flux ratio).
``suspect``: usable with care; each reason says what to check.
``note``: a reason that does not lower the verdict, something the user should know
(exposure times that disagree with the flux ratio the stars measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import QualityConfig
from .exposure import Exposure
from .units import rate_and_electrons

__all__ = ["NOTE", "Verdict", "assess_quality", "expected_kernel_sum", "kernel_centroid"]

GOOD, SUSPECT, BAD = "good", "suspect", "bad"
#: the level of a reason that is told but leaves the verdict as it is
NOTE = "note"
_RANK = {NOTE: -1, GOOD: 0, SUSPECT: 1, BAD: 2}


@dataclass
class Verdict:
    """Outcome of `assess_quality`: ``verdict`` is the worst level among the reasons."""

    verdict: str = GOOD
    reasons: list[str] = field(default_factory=list)

    def add(self, level: str, reason: str) -> None:
        self.reasons.append(f"{level}: {reason}")
        if _RANK[level] > _RANK[self.verdict]:
            self.verdict = level

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons)}


def expected_kernel_sum(science: Exposure, template: Exposure) -> tuple[float, str] | None:
    """Flux ratio template -> science the calibrations predict, and where it comes from
    (a kernel that convolves the science should sum to its inverse).

    Both photometric calibrations (nJy per count): ``cal_template / cal_science``.
    Otherwise both exposure times: their ratio (transparency can change it, so the
    caller allows a wide tolerance). None when neither is known.
    """
    if science.photo_calib is not None and template.photo_calib is not None:
        ratio = template.photo_calib.calibration / science.photo_calib.calibration
        if math.isfinite(ratio) and ratio > 0:
            return ratio, "calibration"
    t_sci, t_tpl = science.metadata.get("EXPTIME"), template.metadata.get("EXPTIME")
    if isinstance(t_sci, int | float) and isinstance(t_tpl, int | float) and t_sci > 0 < t_tpl:
        science_scale, template_scale = _unit_scales(science, template)
        ratio = float(t_sci) / float(t_tpl) * science_scale / template_scale
        return ratio, "exposure time"
    return None


def _unit_scales(science: Exposure, template: Exposure) -> tuple[float, float]:
    """Factors from the ADU totals the exposure-time ratio assumes to each image's
    units (BUNIT): 1/EXPTIME for a rate; 1/GAIN for an ADU image beside one in
    electrons. Between two ADU images the gains stay out, as before: the tolerance
    is wide (transparency) and a gain card may describe the raw frame only."""
    kinds = [rate_and_electrons(e.metadata.get("BUNIT")) for e in (science, template)]
    with_gain = kinds[0][1] != kinds[1][1]
    scales = []
    for exposure, (rate, electrons) in zip((science, template), kinds, strict=True):
        scale = 1.0
        if rate:
            scale /= float(exposure.metadata["EXPTIME"])
        gain = exposure.metadata.get("GAIN")
        if with_gain and not electrons:
            # ADU = electrons / GAIN: the electron image's values are GAIN times larger
            scale /= float(gain) if isinstance(gain, int | float) and gain > 0 else 1.0
        scales.append(scale)
    return scales[0], scales[1]


def kernel_centroid(kernel_image: np.ndarray) -> tuple[float, float]:
    """Flux-weighted centroid offset (dx, dy) of a kernel stamp from its centre pixel."""
    image = np.asarray(kernel_image, dtype=np.float64)
    total = image.sum()
    if not (math.isfinite(total) and total != 0):
        return math.nan, math.nan
    half_y, half_x = image.shape[0] // 2, image.shape[1] // 2
    yy, xx = np.mgrid[-half_y : half_y + 1, -half_x : half_x + 1]
    return float((image * xx).sum() / total), float((image * yy).sum() / total)


def _kernel_shift(verdict, metrics, kernel_image, reference_shift, star_shift, config) -> None:
    """The kernel's centroid shift beyond its design (``reference_shift``) and beyond the
    stars' offset (``star_shift``, when measured): misalignment or a kernel that follows
    something other than the stars."""
    dx, dy = kernel_centroid(kernel_image)
    dx, dy = dx - reference_shift[0], dy - reference_shift[1]
    sx, sy = star_shift if star_shift is not None else (0.0, 0.0)
    shift = math.hypot(dx - sx, dy - sy)
    if math.isfinite(shift) and shift > config.max_kernel_shift:
        if star_shift is not None:
            cause = (
                f"the kernel stars are {math.hypot(sx, sy):.2f} px apart in the two images: "
                "the kernel follows extended sources or wrong PSF sizes, not the stars (check "
                "the PSFs and the kernel stars)"
            )
        else:
            registration = metrics.get("registration")
            by_wcs = isinstance(registration, dict) and registration.get("method") == "same grid"
            # WCSs that agree say nothing of the stars (the DECam stamps' are 0.6 px off);
            # a kernel fitted on galaxies or sized by a wrong PSF wanders as well
            hint = (
                "their WCSs put them on one grid: registration.mode 'stars' measures it on "
                "the stars"
                if by_wcs
                else "check the registration"
            )
            cause = (
                f"the images look misaligned ({hint}), or the kernel follows extended "
                "sources or wrong PSF sizes (check the PSFs and the kernel stars)"
            )
        verdict.add(
            BAD if shift > config.bad_kernel_shift else SUSPECT,
            f"the kernel shifts the image by {math.hypot(dx, dy):.2f} px "
            f"(dx {dx:+.2f}, dy {dy:+.2f}): {cause}",
        )
    elif star_shift is not None and math.hypot(sx, sy) > config.bad_kernel_shift:
        # a kernel stretched this far to follow the stars may not hold their shape
        verdict.add(
            SUSPECT,
            f"the kernel stars are {math.hypot(sx, sy):.2f} px apart in the two images and "
            "the kernel absorbed it: registration.mode 'stars' resamples the template onto "
            "the stars",
        )


def _stamp_coverage(x: np.ndarray, y: np.ndarray, bbox, cells: int) -> float:
    """Fraction of a cells x cells grid over ``bbox`` holding at least one stamp."""
    if x.size == 0:
        return 0.0
    min_x, min_y, max_x, max_y = bbox
    ix = np.clip(((x - min_x) / (max_x - min_x + 1) * cells).astype(int), 0, cells - 1)
    iy = np.clip(((y - min_y) / (max_y - min_y + 1) * cells).astype(int), 0, cells - 1)
    return len(set(zip(ix.tolist(), iy.tolist(), strict=True))) / cells**2


def assess_quality(
    metrics: dict[str, Any],
    science: Exposure,
    template: Exposure,
    kernel_image: np.ndarray | None,
    stamps: tuple[np.ndarray, np.ndarray] | None,
    warnings: list[str],
    config: QualityConfig | None = None,
    reference_shift: tuple[float, float] = (0.0, 0.0),
    star_shift: tuple[float, float] | None = None,
) -> Verdict:
    """The verdict on one subtraction.

    Parameters
    ----------
    metrics : dict
        The run's metrics (``noise_ratio``, ``kernel_sum``, ``n_good_kernel_candidates``,
        ``spatial_condition_number``, ``mode``, ``star_residual_fraction`` and its error,
        ``kernel_psf_width_ratio``, ``psf_sharpening_ratio``, ``registration`` when
        registered).
    science, template : `Exposure`
        The inputs (for calibrations and exposure times).
    kernel_image : `numpy.ndarray` or None
        The matching kernel at the image centre.
    stamps : (x, y) arrays or None
        Parent positions of the kernel stamps used in the final fit.
    warnings : list of str
        What the run noticed (variance scaling, spatial solution, ...); each becomes
        a ``suspect`` reason.
    config : `QualityConfig` or None
    reference_shift : (dx, dy)
        Centroid offset the kernel has by design (the preconvolution PSF's, which the
        matched science shares); only the rest means misalignment.
    star_shift : (dx, dy) or None
        The shift that moves the convolved image's stars onto the other's, measured on
        the kernel stars (None: not measured). A kernel that follows it absorbs a
        misalignment of the inputs; one that does not follows something else.
    """
    config = config or QualityConfig()
    verdict = Verdict()
    _noise(verdict, metrics, config)
    _kernel_sum(verdict, metrics, science, template, config)
    _star_residuals(verdict, metrics, config)
    _stamps(verdict, metrics, stamps, science.bbox, config)
    if not _sharpening(verdict, metrics, config):
        _psf_consistency(verdict, metrics, config)
    if kernel_image is not None:
        _kernel_shift(verdict, metrics, kernel_image, reference_shift, star_shift, config)
    condition = metrics.get("spatial_condition_number")
    limit = config.max_condition_number
    if isinstance(condition, int | float) and not (0 <= condition <= limit):
        verdict.add(
            SUSPECT,
            f"the kernel solution is ill-conditioned (condition number {condition:.3g})",
        )
    excess = metrics.get("score_noise_ratio_propagated")
    if isinstance(excess, int | float) and excess > config.max_score_excess:
        verdict.add(
            SUSPECT,
            f"the score scattered {excess:.2f}x its propagated noise on empty sky (crowding or "
            "PSF mismatch); its variance includes that floor, so faint detections are fewer",
        )
    registration = metrics.get("registration")
    # the error of a map that was applied; where the stars showed one grid nothing was
    # resampled and the kernel's shift against theirs judges the alignment. The map's
    # error is its stars' scatter beyond their centroids' noise (``misfit_px``): the
    # raw rms of faint or wide stars is that noise (0.31-0.43 px on aligned pairs; a
    # 6 px seeing epoch beside an exact transform read 0.30)
    if isinstance(registration, dict) and registration.get("resampled", True):
        misfit = registration.get("misfit_px")
        rms = registration.get("rms_px", registration.get("rms"))
        if isinstance(misfit, int | float) and misfit > config.max_registration_rms:
            verdict.add(
                SUSPECT,
                f"the registration's error beyond the stars' centroid noise is {misfit:.2f} "
                "px rms (misregistration)",
            )
        elif misfit is None and isinstance(rms, int | float) and rms > config.max_registration_rms:
            verdict.add(SUSPECT, f"the registration residual is {rms:.2f} px rms (misregistration)")
    for text in warnings:
        if not any(text in reason for reason in verdict.reasons):
            verdict.add(SUSPECT, text)
    return verdict


def _noise(verdict: Verdict, metrics: dict, config: QualityConfig) -> None:
    ratio = metrics.get("noise_ratio")
    if not isinstance(ratio, int | float) or not math.isfinite(ratio):
        verdict.add(SUSPECT, "the noise of the difference could not be measured")
        return
    low, high = config.noise_ratio_range
    bad_low, bad_high = config.noise_ratio_bad
    if ratio < config.identical_noise_ratio:
        verdict.add(
            BAD,
            f"the difference is {1 / max(ratio, 1e-9):.0f}x quieter than its variance: "
            "science and template look like the same data",
        )
    elif ratio < bad_low or ratio > bad_high:
        verdict.add(BAD, f"the noise is {ratio:.2f}x what the variance plane predicts")
    elif ratio < low or ratio > high:
        verdict.add(
            SUSPECT,
            f"the noise is {ratio:.2f}x what the variance plane predicts (expected {low}-{high})",
        )
    else:
        _noise_cells(verdict, metrics, config)


def _noise_cells(verdict: Verdict, metrics: dict, config: QualityConfig) -> None:
    """A part of the field whose noise its variance does not describe, judged by the
    range the whole is (a PSF mismatch in the corners raised their noise to 1.065 beside
    1.001 at the centre, 1.038 over the field): suspect at most, the rest may be fine.
    Not a score's: its variance holds one floor for the field's excess scatter, which
    crowding puts in some parts more than others (the real preconvolve pairs' cells read
    0.74-1.35 on fits called good; their differences' 0.92-1.07)."""
    if metrics.get("mode") == "preconvolve":
        return
    low, high = config.noise_ratio_range
    cells = [
        cell
        for cell in metrics.get("noise_ratio_cells") or []
        if isinstance(cell, dict)
        and isinstance(cell.get("noise_ratio"), int | float)
        and cell["noise_ratio"] > 0
    ]
    worst = max(cells, key=lambda c: max(c["noise_ratio"], 1 / c["noise_ratio"]), default=None)
    if worst is None or low <= worst["noise_ratio"] <= high:
        return
    verdict.add(
        SUSPECT,
        f"the noise at x {worst['x'][0]}-{worst['x'][1]}, y {worst['y'][0]}-{worst['y'][1]} "
        f"is {worst['noise_ratio']:.2f}x what the variance plane predicts (expected "
        f"{low}-{high}; {metrics['noise_ratio']:.2f} over the field): check the variance "
        "planes and the PSFs there",
    )


def _kernel_sum(verdict, metrics, science, template, config: QualityConfig) -> None:
    ksum = metrics.get("kernel_sum")
    if not isinstance(ksum, int | float) or not math.isfinite(ksum) or ksum <= 0:
        verdict.add(BAD, f"the kernel sum {ksum} is not a positive flux ratio")
        return
    expected = expected_kernel_sum(science, template)
    if expected is None:
        return
    value, source = expected
    # the sum maps the convolved image onto the other: template -> science, but
    # science -> template when the science is convolved (a 1.2x brighter science
    # gave 0.834, correct, read as "where the calibrations predict 1.200")
    if metrics.get("mode") == "convolveScience":
        value = 1.0 / value
    off = ksum / value
    if source == "calibration":
        tolerance, bad_factor = config.kernel_sum_tolerance, config.kernel_sum_bad_factor
        if off > bad_factor or off < 1 / bad_factor:
            verdict.add(
                BAD,
                f"kernel sum {ksum:.3f} where the calibrations predict {value:.3f}: "
                "the fit did not match the PSFs",
            )
        elif abs(off - 1) > tolerance:
            verdict.add(
                SUSPECT,
                f"kernel sum {ksum:.3f} where the calibrations predict {value:.3f} "
                f"(more than {100 * tolerance:.0f}% off): check the PSFs and the kernel stars",
            )
    elif off > config.exposure_time_factor or off < 1 / config.exposure_time_factor:
        what = f"kernel sum {ksum:.3f} where the exposure times predict {value:.3f}"
        if _stars_confirm_kernel_sum(metrics, config):
            # the stars measured the ratio: the headers (a stack's total EXPTIME beside one
            # exposure's pixels) or clouds differ, not the fit, which every epoch would fail
            fraction = metrics["star_residual_fraction"]
            error = metrics["star_residual_fraction_error"]
            verdict.add(
                NOTE,
                f"{what}, but the kernel stars vanish with it ({100 * fraction:+.1f}% "
                f"+-{100 * error:.1f}% of their flux left): the flux ratio is the stars'; "
                "check the EXPTIME cards (a stack's total beside one exposure's pixel scale?) "
                "or the transparency",
            )
        else:
            verdict.add(SUSPECT, what)


def _stars_confirm_kernel_sum(metrics: dict, config: QualityConfig) -> bool:
    """The kernel stars measured the flux ratio the kernel sum gives: what they keep is
    within the star residual floor and so is three times its error (a residual known
    only to +-10% confirms no ratio)."""
    fraction = metrics.get("star_residual_fraction")
    error = metrics.get("star_residual_fraction_error")
    if not (isinstance(fraction, int | float) and isinstance(error, int | float)):
        return False
    limit = config.max_star_residual
    return abs(fraction) <= limit and 0 <= config.star_residual_sigma * error <= limit


def _star_residuals(verdict: Verdict, metrics: dict, config: QualityConfig) -> None:
    """Constant stars that do not vanish: the kernel stars keep a fraction of their flux
    beyond what a matched pair leaves, and beyond its own error."""
    fraction = metrics.get("star_residual_fraction")
    error = metrics.get("star_residual_fraction_error")
    if not (isinstance(fraction, int | float) and isinstance(error, int | float)):
        return
    if not (math.isfinite(fraction) and math.isfinite(error)):
        return
    if abs(fraction) <= max(config.max_star_residual, config.star_residual_sigma * error):
        _star_residual_cells(verdict, metrics, config)
        return
    output = "score" if metrics.get("mode") == "preconvolve" else "difference"
    chi2 = metrics.get("star_residual_chi2_median")
    at_stars = (
        f", residual chi^2 {chi2:.1f} at the stars"
        if isinstance(chi2, int | float) and math.isfinite(chi2)
        else ""
    )
    ksum = metrics.get("kernel_sum")
    kernel = f" (kernel sum {ksum:.3f})" if isinstance(ksum, int | float) else ""
    verdict.add(
        SUSPECT,
        f"the kernel stars keep {100 * fraction:+.1f}% (+-{100 * error:.1f}%, median of "
        f"{metrics.get('n_residual_stars')}) of their flux in the {output}{at_stars}: the "
        f"kernel does not match the stars' flux or core{kernel}, so constant stars leave "
        "residuals; check the PSFs and the kernel stars",
    )


def _star_residual_cells(verdict: Verdict, metrics: dict, config: QualityConfig) -> None:
    """Stars that keep their flux in part of the field: the same test as over the field,
    in each cell of a coarse grid with that cell's error. A kernel that cannot follow
    the PSF's variation (a constant kernel, PSF 2.5-5 px across a 2048 px field) left
    stars +8.3% at the centre and -5.7% in the corners, a median of +1.0% +- 0.9% over
    the field, and 232 false sources at stars."""
    cells = [cell for cell in metrics.get("star_residual_cells") or [] if _cell_figures(cell)]
    from scipy import stats

    # a cell's error comes from the scatter of its few stars, itself uncertain: the same
    # confidence as star_residual_sigma normal errors takes Student's t of its count (9
    # stars: 4.5 errors, not 3; a good 'equal' pair's cell of 9 at -5.6% +- 1.7% was
    # called suspect)
    level = stats.norm.cdf(config.star_residual_sigma)

    def excess(cell: dict) -> float:
        n = cell.get("n")
        t = stats.t.ppf(level, n - 1) if isinstance(n, int) and n > 1 else math.inf
        limit = max(config.max_star_residual, t * cell["error"])
        return abs(cell["fraction"]) / limit

    worst = max(cells, key=excess, default=None)
    if worst is None or excess(worst) <= 1:
        return
    output = "score" if metrics.get("mode") == "preconvolve" else "difference"
    spread = ", ".join(f"{100 * cell['fraction']:+.1f}%" for cell in cells)
    verdict.add(
        SUSPECT,
        f"the kernel stars at x {worst['x'][0]}-{worst['x'][1]}, y {worst['y'][0]}-"
        f"{worst['y'][1]} keep {100 * worst['fraction']:+.1f}% (+-{100 * worst['error']:.1f}%, "
        f"median of {worst['n']}) of their flux in the {output} (cells of a grid over the "
        f"image: {spread}; over the field {100 * metrics['star_residual_fraction']:+.1f}%): "
        "the kernel does not follow the PSFs' variation over the field, so constant stars "
        "leave residuals there; check the PSFs and the kernel's spatial order",
    )


def _cell_figures(cell: Any) -> bool:
    """A cell of ``star_residual_cells`` with a finite fraction and error."""
    if not isinstance(cell, dict):
        return False
    values = (cell.get("fraction"), cell.get("error"))
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _sharpening(verdict: Verdict, metrics: dict, config: QualityConfig) -> bool:
    """A convolved image whose PSF is wider than the target's along some direction
    (``psf_sharpening_ratio``, `core.psf_consistency.sharpening_ratio`): the kernel would
    have to sharpen it there, which a sum of Gaussians cannot, so constant stars leave
    residuals. Preconvolve mode, whose score turns them into sources most readily, is
    judged tighter (science 2.5 px: a 4 px template, 1.13, left 34 false sources per Mpx
    at stars, a 5 px one 88 and fluxes 14% low); a difference tolerates more (a science
    PSF of ellipticity 0.6 / 0.65 / 0.7 and 5 px against a round 2.5 px template, 1024
    px, 3 seeds: ratio 1.24 / 1.41 / 1.60, false rows at stars 3-4 / 5-14 / 8-49; a round
    template 1.25x the science's width in mode convolveTemplate: 0-2). True when it is
    so: the kernel's width against the PSF models then says nothing of the models."""
    ratio = metrics.get("psf_sharpening_ratio")
    mode = metrics.get("mode")
    limits = (config.max_sharpening_ratio, config.bad_sharpening_ratio)
    if mode == "preconvolve":
        limits = (config.max_preconvolve_width_ratio, config.bad_preconvolve_width_ratio)
    if not (isinstance(ratio, int | float) and ratio > limits[0]):
        return False
    fwhm_s, fwhm_t = metrics.get("science_psf_fwhm"), metrics.get("template_psf_fwhm")
    widths = (
        (fwhm_s, fwhm_t)
        if isinstance(fwhm_s, int | float) and isinstance(fwhm_t, int | float)
        else None
    )
    sizes = f" (PSF FWHM science {fwhm_s:.2f} px, template {fwhm_t:.2f} px)" if widths else ""
    if mode == "preconvolve":
        what = (
            f"the template's PSF is {ratio:.2f}x as wide as the science's seen through its "
            "preconvolution (which the kernel matches the template to) along the direction "
            f"where they differ most{sizes}: the kernel would have to sharpen the template, "
            "so stars leave residuals and fluxes are biased"
        )
        if widths and widths[1] > widths[0]:
            what += "; mode auto convolves the science instead"
    else:
        convolved, target = (
            ("science", "template") if mode == "convolveScience" else ("template", "science")
        )
        what = (
            f"the {convolved}'s PSF is {ratio:.2f}x as wide as the {target}'s along the "
            f"direction where they differ most{sizes}: the PSFs differ in shape (one is "
            "elongated, trailed, across where the other is not), the kernel would have to "
            f"sharpen the {convolved} there, and constant stars leave residuals (pairs of "
            "opposite-sign sources)"
        )
    centre = _at_centre(metrics, "psf_sharpening", ratio)
    level = BAD if centre > limits[1] else SUSPECT
    verdict.add(level, what + _where(metrics, "psf_sharpening"))
    return True


def _at_centre(metrics: dict, check: str, worst: float) -> float:
    """A check's value at the centre when its PSF models vary (``<check>_ratio_centre``),
    else ``worst``, the one value. Bad is judged there as before: a mismatch in part of
    the field makes the verdict suspect, not bad (PSFs crossing over a 2048 px field,
    1.70 in the corners and 0.92 at the centre: false sources at bright stars 16-24 a
    corner ninth against 1-7 elsewhere, fluxes within 2-5%)."""
    centre = metrics.get(f"{check}_ratio_centre")
    return centre if isinstance(centre, int | float) and math.isfinite(centre) else worst


def _factor(ratio: float) -> float:
    """A width ratio's departure from 1 either way."""
    return max(ratio, 1.0 / ratio) if ratio > 0 else math.inf


def _where(metrics: dict, check: str, cause: str = "") -> str:
    """Where on the field a check read its worst, and its value at the centre, when its PSF
    models vary (``<check>_where``, ``<check>_ratio_centre``); empty otherwise."""
    where, centre = metrics.get(f"{check}_where"), metrics.get(f"{check}_ratio_centre")
    if not where or where == "centre":
        return ""
    at_centre = f", {centre:.2f} at the centre" if isinstance(centre, int | float) else ""
    return f" (worst at the {where}{at_centre}: the PSFs vary over the field{cause})"


def _psf_consistency(verdict: Verdict, metrics: dict, config: QualityConfig) -> None:
    """A kernel that does not turn one PSF model into the other: a model is wrong, and the
    kernel's basis and stamps were sized from it (`core.psf_consistency`)."""
    ratio = metrics.get("kernel_psf_width_ratio")
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio > 0):
        return
    factor, bad = _factor(ratio), config.bad_kernel_psf_width_ratio
    if factor <= config.max_kernel_psf_width_ratio:
        return
    mode = metrics.get("mode")
    convolved, target = "template", "science"
    if mode == "convolveScience":
        convolved, target = "science", "template"
    elif mode == "preconvolve":
        target = "preconvolved science"
    sizes = ""
    fwhm_s, fwhm_t = metrics.get("science_psf_fwhm"), metrics.get("template_psf_fwhm")
    if isinstance(fwhm_s, int | float) and isinstance(fwhm_t, int | float):
        sizes = f" (PSF FWHM science {fwhm_s:.2f} px, template {fwhm_t:.2f} px)"
    ksum = metrics.get("kernel_sum")
    kernel = f", kernel sum {ksum:.3f}" if isinstance(ksum, int | float) else ""
    verdict.add(
        BAD if _factor(_at_centre(metrics, "kernel_psf_width", ratio)) > bad else SUSPECT,
        f"the kernel makes the {convolved} PSF model {ratio:.2f}x as wide as the {target} "
        f"PSF it should match{sizes}: a PSF model is wrong, and the kernel's basis and stamps "
        f"were sized from it, so its flux and shape are unreliable{kernel}; check the PSFs "
        "(supply them, or a FWHM)"
        # a kernel of too low an order misses the models' variation as a wrong model does
        + _where(metrics, "kernel_psf_width", ", or the kernel's spatial order is too low"),
    )


def _stamps(verdict, metrics, stamps, bbox, config: QualityConfig) -> None:
    n_good = metrics.get("n_good_kernel_candidates")
    if isinstance(n_good, int) and n_good < config.min_good_stamps:
        verdict.add(
            SUSPECT,
            f"only {n_good} kernel stamps were fitted (fewer than {config.min_good_stamps}): "
            "the kernel is poorly constrained",
        )
    if stamps is not None and len(stamps[0]) >= config.min_good_stamps:
        coverage = _stamp_coverage(
            np.asarray(stamps[0]), np.asarray(stamps[1]), bbox, config.coverage_cells
        )
        if coverage < config.min_stamp_coverage:
            verdict.add(
                SUSPECT,
                f"the kernel stamps cover {100 * coverage:.0f}% of a "
                f"{config.coverage_cells}x{config.coverage_cells} grid over the image: "
                "the kernel is extrapolated elsewhere",
            )
