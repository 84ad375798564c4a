"""PSF photometry at given positions: flux and local background fitted together.

Small and local (one PSF stamp per source), so measuring a few thousand
sources costs well under a second on any frame size.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft as sp_fft

from .exposure import Exposure
from .psf import Psf

__all__ = ["psf_fluxes", "psf_flux"]

#: Sources fitted together by `psf_fluxes`.
_BATCH = 32


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


def psf_fluxes(
    exposure: Exposure, x, y, psf: Psf | None = None, fit_background: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`psf_flux` for arrays of positions; returns (fluxes, errors).

    The same fit as `psf_flux` source by source, with the stamps shifted, cut out and
    fitted in batches (the normal equations in closed form): equal to its results to
    round-off, and some ten times faster for the thousands of kernel sources of a frame.
    """
    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    if xs.size != ys.size:
        raise ValueError(f"x and y differ in length: {xs.size} and {ys.size}")
    if xs.size == 0:
        return np.zeros(0), np.zeros(0)
    psf = psf or exposure.require_psf()
    if type(psf).image_at is not Psf.image_at:  # a model with its own drawing: one by one
        out = np.array(
            [
                psf_flux(exposure, float(a), float(b), psf, fit_background)
                for a, b in zip(xs, ys, strict=True)
            ]
        )
        return out[:, 0], out[:, 1]
    flux = np.full(xs.size, math.nan)
    error = np.full(xs.size, math.nan)
    stamps = [
        np.asarray(psf.kernel_image(a, b), dtype=np.float64) for a, b in zip(xs, ys, strict=True)
    ]
    for shape in {stamp.shape for stamp in stamps}:
        same = np.array([i for i, stamp in enumerate(stamps) if stamp.shape == shape])
        # batches small enough to stay in cache (large ones are memory bound)
        for start in range(0, same.size, _BATCH):
            index = same[start : start + _BATCH]
            stack = np.stack([stamps[i] for i in index])
            f, e = _fit_batch(exposure, xs[index], ys[index], stack, fit_background)
            flux[index], error[index] = f, e
    return flux, error


def _shifted_stamps(stack: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """`core.psf.shift_stamp` of each stamp by its (dx, dy), in one batched transform."""
    n, ny, nx = stack.shape
    out = stack.copy()
    moving = ~((np.abs(dx) < 1e-9) & (np.abs(dy) < 1e-9))
    if moving.any():
        spectrum = sp_fft.rfft2(stack[moving], axes=(1, 2))
        ramp_y = np.exp(-2j * np.pi * dy[moving, None] * sp_fft.fftfreq(ny))[:, :, None]
        ramp_x = np.exp(-2j * np.pi * dx[moving, None] * sp_fft.rfftfreq(nx))[:, None, :]
        shifted = sp_fft.irfft2(spectrum * ramp_y * ramp_x, s=(ny, nx), axes=(1, 2))
        total = shifted.sum(axis=(1, 2))
        nonzero = total != 0
        shifted[nonzero] /= total[nonzero, None, None]
        out[moving] = shifted
    return out


def _fit_batch(exposure: Exposure, xs, ys, stack: np.ndarray, fit_background: bool):
    """`psf_flux` for sources whose PSF stamps (unshifted) share one shape."""
    n, ny, nx = stack.shape
    half = ny // 2
    ix, iy = np.floor(xs + 0.5).astype(int), np.floor(ys + 0.5).astype(int)
    i0 = ix - half - exposure.xy0[0]
    j0 = iy - half - exposure.xy0[1]
    inside = (i0 >= 0) & (j0 >= 0) & (i0 + nx <= exposure.width) & (j0 + ny <= exposure.height)
    flux = np.full(n, math.nan)
    error = np.full(n, math.nan)
    if not inside.any():
        return flux, error
    take = np.nonzero(inside)[0]
    stamp = _shifted_stamps(stack[take], xs[take] - ix[take], ys[take] - iy[take])
    rows = (j0[take, None] + np.arange(ny))[:, :, None]
    cols = (i0[take, None] + np.arange(nx))[:, None, :]
    data = exposure.image[rows, cols].astype(np.float64)
    var = exposure.variance[rows, cols].astype(np.float64)
    good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    n_good = good.sum(axis=(1, 2))
    p = np.where(good, stamp, 0.0)
    data = np.where(good, data, 0.0)
    var = np.where(good, var, 0.0)
    spp = np.sum(p * p, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        if fit_background:
            # inverse of [[sum P^2, sum P], [sum P, n]]: first row (n, -sum P) / det
            sp = p.sum(axis=(1, 2))
            det = spp * n_good - sp * sp
            weights = (n_good[:, None, None] * p - sp[:, None, None] * good) / det[:, None, None]
            solvable = det != 0
        else:
            weights = p / spp[:, None, None]
            solvable = spp != 0
        f = np.sum(weights * data, axis=(1, 2))
        e = np.sqrt(np.sum(weights**2 * var, axis=(1, 2)))
    ok = (n_good >= ny * nx // 2) & solvable & np.isfinite(f)
    flux[take[ok]], error[take[ok]] = f[ok], e[ok]
    return flux, error
