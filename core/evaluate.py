"""Scoring a subtraction against simulation truth: the numbers tests and benchmarks assert.

- ``noise_ratio`` / ``noise_mean``: robust std and median of D/sqrt(V) on empty sky
  (pixels far from every simulated star, transient and defect);
- ``transient_flux_ratio``: median of measured/true flux of injected transients,
  PSF photometry on the difference; ``transient_pull_std``: robust scatter
  of (measured - true)/error, 1 when the variance plane is right;
- ``star_chi2_median``: median reduced chi^2 in an aperture of radius one FWHM
  around constant stars of 1e3-1e5 counts;
- for a score image: ``transient_snr_ratio``, peak S/N over the ideal matched-filter S/N.
"""

from __future__ import annotations

import math

import numpy as np

from .exposure import Exposure
from .metrics import NOISE_MASK_PLANES, robust_sigma_median
from .photometry import psf_flux

__all__ = ["sky_mask", "measure_quality"]


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
