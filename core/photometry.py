"""PSF photometry of one source: flux and local background fitted together, with the
PSF drawn exactly at the position (the reference the tests measure against; many
positions at once: `core.forced.psf_photometry`)."""

from __future__ import annotations

import math

import numpy as np

from .exposure import Exposure
from .psf import Psf

__all__ = ["psf_flux"]


def psf_flux(
    exposure: Exposure, x: float, y: float, psf: Psf | None = None, fit_background: bool = False
) -> tuple[float, float]:
    """PSF-fit flux and its 1-sigma error at parent position (x, y).

    Parameters
    ----------
    exposure : `Exposure`
    x, y : float
        Parent position of the source centre.
    psf : `Psf` or None
        Profile to fit; default the exposure's PSF.
    fit_background : bool
        Fit a constant local background with the flux.

    Returns
    -------
    flux, error : float
        NaN when the stamp leaves the image or has fewer than half its pixels usable.
        Weights are constant over the stamp (the median variance), so bright
        sources' own Poisson noise does not bias the flux; the error uses the
        per-pixel variance.
    """
    psf = psf or exposure.require_psf()
    stamp, x_min, y_min = psf.image_at(x, y)
    ny, nx = stamp.shape
    i0, j0 = x_min - exposure.xy0[0], y_min - exposure.xy0[1]
    if i0 < 0 or j0 < 0 or i0 + nx > exposure.width or j0 + ny > exposure.height:
        return math.nan, math.nan
    window = np.s_[j0 : j0 + ny, i0 : i0 + nx]
    data = exposure.image[window].astype(np.float64)
    var = exposure.variance[window].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    if good.sum() < stamp.size // 2:
        return math.nan, math.nan
    columns = [stamp[good]]
    if fit_background:
        columns.append(np.ones(good.sum()))
    design = np.stack(columns, axis=1)
    normal = design.T @ design
    try:
        inverse = np.linalg.inv(normal)
    except np.linalg.LinAlgError:
        return math.nan, math.nan
    weights = inverse @ design.T  # rows: estimator weights per pixel
    flux = float(weights[0] @ data[good])
    error = float(math.sqrt(np.sum(weights[0] ** 2 * var[good])))
    return flux, error
