"""Forced PSF photometry on a difference image: fluxes, errors and pixel flags at positions.

Alert brokers ask for light curves of known objects: the PSF flux of the
difference at a fixed position in every epoch, detected or not. The fit is
linear (amplitude of the difference's PSF, optionally a local constant) and
vectorised over positions; a spatially varying PSF is drawn on a coarse grid of
nodes and interpolated bilinearly. Errors come from the variance plane, scaled
by the flux scatter at random positions so that correlated noise (a difference
without decorrelation, a warped template) does not make them too small.
Positions are 0-based array coordinates: x the column, y the row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from astropy.stats import mad_std
from astropy.table import Table
from scipy import fft, sparse

from .config import DiaSourceConfig, ForcedPhotometryConfig
from .epoch import full_epoch
from .errors import IncompatibleInputsError, InvalidPositionsError, PsfError
from .exposure import Exposure
from .io import bunit_card
from .position_flags import (
    bright_star,
    bright_star_light,
    bright_star_limit,
    outside_kernel_hull,
    saturated_search,
    saturated_stars,
)
from .psf import SIGMA_TO_FWHM, Psf, _collapsed, _half_maximum_sigma
from .psf_sampling import is_constant, memo, refined_nodes
from .rings import ring_stamps
from .sharpness import contrast_bounds, sharper_than_psf
from .sky import pixel_to_radec, radec_to_pixel
from .stamps import batches
from .stamps import stamps as _stack

__all__ = [
    "FLAG_BITS",
    "UNUSABLE_PLANES",
    "WHOLE_STAMP_MISSING_LIGHT",
    "PsfStamps",
    "flag_columns",
    "forced_photometry",
    "noise_positions",
    "noise_scale",
    "observation_meta",
    "pixel_flags",
    "profile_sigma",
    "psf_photometry",
    "pull_scale",
    "sky_positions",
    "whole_stamp_fluxes",
]

#: Bits of the ``flags`` column and the mask planes that raise each (empty: set by
#: the caller). The schema of every DIA-source and forced-photometry table.
FLAG_BITS = {
    "edge": (1, ("EDGE",)),
    "saturated": (2, ("SAT", "SAT_TEMPLATE")),
    "bad": (4, ("BAD", "CR", "BAD_TEMPLATE")),
    "interpolated": (8, ("INTRP",)),
    "no_data": (16, ("NO_DATA",)),
    "bright_star": (32, ()),
    "suspect_kernel": (64, ()),
    "streak": (128, ("STREAK",)),
    "sharp": (256, ()),
    # Rubin's SUSPECT plane (pixels past the linearity limit): it raised suspect_kernel,
    # which says the kernel is extrapolated there
    "suspect": (512, ("SUSPECT",)),
}
#: Pixels left out of every fit: no data, the convolution's edge band, dead or hot pixels.
UNUSABLE_PLANES = ("NO_DATA", "EDGE", "BAD")
#: Extra margin (px) of the drawn stamps beyond the fitted box, so that what the Fourier
#: sub-pixel shift moves across the drawn stamp's edge (lost in its zero padding, or
#: wrapped where the stamp is already a fast length) is only the far wings.
_SHIFT_PAD = 4
#: Most of a PSF's light a whole-stamp fit may miss (off the frame, or on non-finite
#: pixels) where its stamp leaves the frame: the model stands in for that light, so
#: an error in it moves the flux by no more than this fraction.
WHOLE_STAMP_MISSING_LIGHT = 0.01


def profile_sigma(psf: Psf) -> float:
    """Trace radius (px) of a PSF, robust to negative side lobes and undersampling.

    A decorrelated PSF can ring below zero, where the adaptive moments of the stamp
    diverge, deeper than `core.psf.adaptive_moments` replaces; and the moments of a
    profile barely a pixel wide collapse (the whitened JWST difference's PSF read ixx
    8e-13, a FWHM of 0.81 px against 1.89 at half maximum, and its DIA sources were
    centroided, deblended and measured with that). Then the width comes from the
    half-maximum contour (`core.psf._half_maximum_sigma`).

    Raises
    ------
    PsfError
        The PSF cannot be evaluated or has no positive flux.
    """
    try:
        with np.errstate(all="ignore"):
            ixx, iyy, _ = psf.moments()
        if _collapsed(ixx, iyy):
            sigma = _half_maximum_sigma(np.asarray(psf.kernel_image(), dtype=np.float64))
        else:
            sigma = math.sqrt(0.5 * (ixx + iyy))
    except PsfError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a user PSF is a PSF error
        raise PsfError(f"the PSF cannot be evaluated: {exc}") from None
    if not (math.isfinite(sigma) and sigma > 0):
        raise PsfError("the PSF has no measurable width")
    return sigma


class PsfStamps:
    """Unit-sum PSF stamps at sub-pixel positions, cropped to a fitting box.

    Parameters
    ----------
    psf : `core.psf.Psf`
    exposure : `Exposure`
        Gives the parent origin and the extent of the node grid.
    half : int or None
        Half-width of the returned stamps (px); None sizes it from ``fit_radius_fwhm``.
    config : `ForcedPhotometryConfig` or None
    """

    def __init__(
        self,
        psf: Psf,
        exposure: Exposure,
        half: int | None = None,
        config: ForcedPhotometryConfig | None = None,
    ):
        config = config or ForcedPhotometryConfig()
        self.psf = psf
        self.xy0 = exposure.xy0
        self.fwhm = SIGMA_TO_FWHM * profile_sigma(psf)
        full = psf.kernel_image().shape[0] // 2
        if half is None:
            half = int(math.ceil(config.fit_radius_fwhm * self.fwhm))
        self.half = int(min(half, full))
        self._draw_half = int(min(self.half + _SHIFT_PAD, full))
        # the drawn stamps are shifted on a grid zero-padded to a fast transform length:
        # a 101 px stamp is a prime length, transformed 3.4x slower than 108 px
        self._size = fft.next_fast_len(2 * self._draw_half + 1, real=True)
        ny, nx = exposure.shape
        step, most = config.psf_grid_step, config.psf_grid_max_nodes
        count_x = min(most, max(2, math.ceil((nx - 1) / step) + 1))
        count_y = min(most, max(2, math.ceil((ny - 1) / step) + 1))
        self._draw = memo(psf.kernel_image)
        self.nodes_x, self.nodes_y = refined_nodes(
            psf,
            (self.xy0[0], self.xy0[1], self.xy0[0] + nx - 1, self.xy0[1] + ny - 1),
            count_x,
            count_y,
            max(most, config.psf_grid_refined_nodes),
            config.psf_blend_tolerance,
            draw=self._draw,
        )
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self._spectra: dict[tuple[int, int], np.ndarray] = {}
        #: per node, the PSF's contrast bounds (`core.sharpness.contrast_bounds`)
        self.contrasts: dict[tuple[int, int], np.ndarray] = {}
        # every node's spectrum as a row, filled as batches need them: threads that
        # draw at once only ever write a row's same values, before they flag it
        size = self._size
        nodes = self.nodes_y.size * self.nodes_x.size
        self._rows = np.zeros((nodes, size * (size // 2 + 1)), dtype=complex)
        self._filled = np.zeros(nodes, dtype=bool)
        self.constant = is_constant(self._draw, self.nodes_x, self.nodes_y)

    def _node(self, j: int, i: int) -> np.ndarray:
        key = (j, i)
        if key not in self._cache:
            stamp = self._draw(self.nodes_x[i], self.nodes_y[j])
            c, h = stamp.shape[0] // 2, self._draw_half
            self._cache[key] = np.asarray(stamp[c - h : c + h + 1, c - h : c + h + 1], float)
        return self._cache[key]

    def _spectrum(self, j: int, i: int) -> np.ndarray:
        key = (j, i)
        if key not in self._spectra:
            self._spectra[key] = fft.rfft2(self._node(j, i), s=(self._size, self._size))
        return self._spectra[key]

    def _weights(self, x: np.ndarray, y: np.ndarray):
        """Bilinear weights (sparse, positions x nodes) of the nodes at parent positions
        and the nodes any position needs."""
        i = np.clip(np.searchsorted(self.nodes_x, x) - 1, 0, self.nodes_x.size - 2)
        j = np.clip(np.searchsorted(self.nodes_y, y) - 1, 0, self.nodes_y.size - 2)
        tx = np.clip((x - self.nodes_x[i]) / (self.nodes_x[i + 1] - self.nodes_x[i]), 0, 1)
        ty = np.clip((y - self.nodes_y[j]) / (self.nodes_y[j + 1] - self.nodes_y[j]), 0, 1)
        n_y, n_x = self.nodes_y.size, self.nodes_x.size
        bilinear = (
            (0, 0, (1 - tx) * (1 - ty)),
            (0, 1, tx * (1 - ty)),
            (1, 0, (1 - tx) * ty),
            (1, 1, tx * ty),
        )
        # four entries a row, their columns ascending (n_x >= 2): built as CSR directly,
        # the matrix a COO construction sorts them into
        columns = np.stack([(j + dj) * n_x + i + di for dj, di, _ in bilinear], axis=1)
        values = np.stack([weight for _, _, weight in bilinear], axis=1)
        weights = sparse.csr_matrix(
            (values.ravel(), columns.ravel(), np.arange(0, 4 * x.size + 1, 4)),
            shape=(x.size, n_y * n_x),
        )
        return weights, np.unique(columns)

    def _centred_spectra(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``rfft2`` of the node stamps interpolated bilinearly at parent positions
        (n, s, s // 2 + 1) on the padded grid of side s: the nodes' spectra blended (the
        transform is linear), so no stamp is transformed per position; each node is
        drawn once."""
        size = self._size
        if self.constant:
            centre = self._spectrum((self.nodes_y.size - 1) // 2, (self.nodes_x.size - 1) // 2)
            return np.broadcast_to(centre, (x.size, *centre.shape))
        weights, needed = self._weights(x, y)
        n_x = self.nodes_x.size
        for k in needed[~self._filled[needed]].tolist():
            self._rows[k] = self._spectrum(k // n_x, k % n_x).ravel()
            self._filled[k] = True
        # the product reads only the rows of the nodes with a weight
        return (weights @ self._rows).reshape(x.size, size, size // 2 + 1)

    def at(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stamps centred on parent positions (x, y).

        Returns
        -------
        stamps : `numpy.ndarray` (n, 2 half + 1, 2 half + 1), float64
            Pixel [half, half] of stamp k is the pixel nearest (x[k], y[k]); the
            PSF is shifted there by the sub-pixel remainder (unit sum before cropping).
        ix, iy : `numpy.ndarray` (n,), int
            Array column and row of each stamp's centre pixel.
        """
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        ix = np.floor(x + 0.5).astype(int)
        iy = np.floor(y + 0.5).astype(int)
        c, h = self._draw_half, self.half
        stamps = np.empty((x.size, 2 * h + 1, 2 * h + 1))
        for part in batches(x.size):
            spectra = self._centred_spectra(x[part], y[part])
            stamps[part] = _shift_spectra(
                spectra, (x - ix)[part], (y - iy)[part], self._size, slice(c - h, c + h + 1)
            )
        return stamps, ix - self.xy0[0], iy - self.xy0[1]


def _shift_spectra(spectra: np.ndarray, dx, dy, size: int, keep: slice) -> np.ndarray:
    """Square stamps (side ``size``, the drawn stamp in its first rows and columns, zeros
    after) given by their ``rfft2``, shifted by (dx[k], dy[k]) each (Fourier phase
    ramps) and cropped to rows and columns ``keep``: only the kept rows are transformed
    back along x."""
    ramp_y = np.exp(-2j * np.pi * dy[:, None] * fft.fftfreq(size)[None, :])[:, :, None]
    ramp_x = np.exp(-2j * np.pi * dx[:, None] * fft.rfftfreq(size)[None, :])[:, None, :]
    shifted = spectra * ramp_y
    shifted *= ramp_x
    rows = fft.ifft(shifted, axis=1, overwrite_x=True)[:, keep]
    return fft.irfft(rows, n=size, axis=2)[:, :, keep]


def psf_photometry(
    exposure: Exposure,
    x,
    y,
    stamps: PsfStamps,
    fit_background: bool = False,
    min_coverage: float = 0.5,
    drawn: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    unusable: tuple[str, ...] = UNUSABLE_PLANES,
    sky_ring: int = 0,
    sharpness: bool = False,
) -> dict[str, np.ndarray]:
    """Linear PSF fit at array positions, vectorised.

    The fit is unweighted within the stamp (bright sources' own Poisson noise
    does not bias it); the error propagates the per-pixel variance.

    Parameters
    ----------
    exposure : `Exposure`
    x, y : array-like (n,)
        Array column and row of each position.
    stamps : `PsfStamps`
        The PSF to fit (its ``xy0`` must be the exposure's).
    fit_background : bool
        Fit a constant with the amplitude.
    min_coverage : float
        Least fraction of the stamp's PSF sum on usable pixels; NaN below.
    drawn : tuple or None
        ``stamps.at`` at these positions when already drawn (several exposures on
        one pixel grid and PSF).
    unusable : tuple of str
        Mask planes whose pixels the fit leaves out.
    sky_ring : int
        Width (px) of a square ring just outside the fitted stamp whose median
        (`ring_levels`) is subtracted as the local sky before the fit (an image that
        still carries sky); 0: none. Not with ``fit_background``: a constant fitted
        inside the stamp takes up a bright neighbour's or host's light, and the PSF
        amplitude off its peak came out strongly negative (a JWST galaxy: S/N -284).
    sharpness : bool
        Also return ``sharp``: the source is narrower than the PSF
        (`core.sharpness.sharper_than_psf`).

    Returns
    -------
    dict of `numpy.ndarray` (n,)
        ``flux``, ``flux_err`` (counts, variance-plane errors), ``coverage`` and
        ``ix``, ``iy`` (centre pixels); ``sharp`` (bool) when asked.
    """
    if sky_ring and fit_background:
        raise ValueError("psf_photometry: a sky ring and a fitted background exclude each other")
    x0, y0 = exposure.xy0
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    parts = batches(x.size)
    if len(parts) > 1:  # in batches that stay in the caches (`core.stamps.STAMP_BATCH`)
        fits = [
            psf_photometry(
                exposure,
                x[part],
                y[part],
                stamps,
                fit_background,
                min_coverage,
                None if drawn is None else (drawn[0][part], drawn[1][part], drawn[2][part]),
                unusable,
                sky_ring,
                sharpness,
            )
            for part in parts
        ]
        return {key: np.concatenate([f[key] for f in fits]) for key in fits[0]}
    model, ix, iy = drawn if drawn is not None else stamps.at(x + x0, y + y0)
    h = stamps.half
    # in place where it can be: the whole-stamp fits of the verdict hold 200 stamps of
    # 101 x 101 px, and each further array of them costs as much as a reduction
    wide_mask = None
    if sky_ring:
        # the fitted stamps are the centres of the ring's: cut, not gathered again
        sky, wide, wide_mask = ring_stamps(exposure, ix, iy, h, sky_ring, unusable)
        inner = np.s_[:, sky_ring : sky_ring + 2 * h + 1, sky_ring : sky_ring + 2 * h + 1]
        data = wide[inner].astype(np.float64)
    else:
        data = _stack(exposure.image, ix, iy, h, fill=np.nan).astype(np.float64)
    var = exposure.variance_stamps(ix, iy, h, fill=np.nan).astype(np.float64, copy=False)
    if sky_ring:
        data -= sky[:, None, None]
    with np.errstate(invalid="ignore"):
        good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    bitmask = exposure.bitmask(unusable)
    if bitmask:
        # off the frame the ring's mask is 0, not -1, but the image there is NaN: unusable
        mask = _stack(exposure.mask, ix, iy, h, fill=-1) if wide_mask is None else wide_mask[inner]
        good &= mask & bitmask == 0
    bad_pixel = ~good
    data[bad_pixel] = 0.0
    var[bad_pixel] = 0.0
    p = np.where(good, model, 0.0)
    total = model.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        sp = p.sum(axis=(1, 2))
        coverage = sp / total
        spp = np.einsum("nij,nij->n", p, p)
        spd = np.einsum("nij,nij->n", p, data)
        pv = p * var
        sppv = np.einsum("nij,nij->n", pv, p)
        if fit_background:
            n1 = good.sum(axis=(1, 2)).astype(float)
            sd = data.sum(axis=(1, 2))
            det = spp * n1 - sp * sp
            flux = (n1 * spd - sp * sd) / det
            # the estimator's weights per pixel are (n1 p - sp) / det: the sum of their
            # squares times the variance, expanded into three sums
            spv, sv = pv.sum(axis=(1, 2)), var.sum(axis=(1, 2))
            flux_err = np.sqrt(n1 * n1 * sppv - 2.0 * n1 * sp * spv + sp * sp * sv) / np.abs(det)
            level = (sd - flux * sp) / n1
        else:
            flux = spd / spp
            flux_err = np.sqrt(sppv) / spp
            level = np.zeros(flux.size)
    bad = ~(coverage >= min_coverage) | ~np.isfinite(flux) | ~np.isfinite(flux_err)
    flux[bad] = np.nan
    flux_err[bad] = np.nan
    out = {"flux": flux, "flux_err": flux_err, "coverage": coverage, "ix": ix, "iy": iy}
    if sharpness:
        bounds = contrast_bounds(stamps, x + x0, y + y0)
        out["sharp"] = sharper_than_psf(data - level[:, None, None], var, good, bounds, flux)
    return out


def whole_stamp_fluxes(exposure: Exposure, x, y, psf: Psf | None = None):
    """PSF fluxes and errors at parent positions (x, y) of an image that may still carry
    sky (a constant fitted with each), on the PSF's whole stamp; only non-finite pixels
    are left out. The kernel sources' variability test and the stars' residual measure
    of the verdict: within the forced fit's radius (2 FWHM) the variability test chose
    other stars in SAAO 0015's crowded 9 px seeing, whose kernel left star residuals of
    chi2 1.80 in preconvolve mode (acceptance: 1.63).

    NaN where the stamp leaves the image and more than `WHOLE_STAMP_MISSING_LIGHT` of
    the PSF's light is off it (or on non-finite pixels): where it lies, not the stamp's
    drawn size, decides. A stamp is often drawn far wider than its light (a simulated
    Moffat beta 2 of FWHM 4 px: 151 px, a WebbPSF model: 205 px); NaN wherever the
    stamp left the frame, 3 of the 4 kernel candidates of a 256 px simulated frame were
    lost, and 5 of the 11 of a 640 px cut of the JWST pair (99.3-99.9% of their light
    on it): both subtractions were refused. On the whole JWST frame 8 stars 30-85 px
    from the edge join the 11 kernel sources: kernel sum 1.062 -> 0.987 (the same
    filter and units: 1), the stars' residual +14.7% -> +12.8% (the rule this replaces
    came from an earlier kernel fit, whose sum they moved from 0.995 to 0.937).

    ``psf``: the profile to fit (default the exposure's).
    """
    psf = psf or exposure.require_psf()
    whole = PsfStamps(psf, exposure, half=psf.kernel_image().shape[0] // 2)
    x0, y0 = exposure.xy0
    x = np.asarray(x, dtype=np.float64) - x0
    y = np.asarray(y, dtype=np.float64) - y0
    fit = psf_photometry(exposure, x, y, whole, True, unusable=())
    h, ix, iy = whole.half, fit["ix"], fit["iy"]
    ny, nx = exposure.shape
    inside = (ix >= h) & (iy >= h) & (ix + h < nx) & (iy + h < ny)
    # a stamp within the frame keeps the fit's own coverage rule (its holes are the
    # image's, not the stamp's size)
    measured = inside | (fit["coverage"] >= 1.0 - WHOLE_STAMP_MISSING_LIGHT)
    return np.where(measured, fit["flux"], np.nan), np.where(measured, fit["flux_err"], np.nan)


#: Positions per axis of the grid whose drawn stamps `noise_scale` fits with.
_NOISE_MODEL_GRID = 5


def noise_positions(shape, half: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``n`` random whole pixels (columns, rows) at least ``half`` inside the frame, or
    None when fewer than 30 are asked for or the frame holds room for fewer than 30
    separate (2 half + 1)^2 stamps: measurements there would share their noise (a
    16 x 16 frame of white noise read a PSF-flux scale of 0.3)."""
    ny, nx = shape
    if n < 30 or nx <= 2 * half or ny <= 2 * half:
        return None
    if (nx - 2 * half) * (ny - 2 * half) < 30 * (2 * half + 1) ** 2:
        return None
    rng = np.random.default_rng(seed)
    return rng.integers(half, nx - half, n), rng.integers(half, ny - half, n)


def pull_scale(pull: np.ndarray) -> float:
    """Normalised median absolute deviation of the finite ``pull`` values (measured /
    error at random sky positions): the factor the errors need; 1.0 from fewer than 30."""
    pull = pull[np.isfinite(pull)]
    if pull.size < 30:
        return 1.0
    scale = float(mad_std(pull))
    return scale if scale > 0 else 1.0


def noise_scale(
    exposure: Exposure,
    stamps: PsfStamps,
    config: ForcedPhotometryConfig,
    unusable: tuple[str, ...] = UNUSABLE_PLANES,
    sky_ring: int = 0,
) -> float:
    """Robust scatter of flux / error at random positions: the factor errors need.

    The variance plane describes each pixel, not the covariance between
    pixels; a PSF fit sums many pixels, so correlated noise makes its true
    error larger. Fitting at ``config.n_noise_positions`` random positions (a
    difference is empty sky almost everywhere) and taking the normalised median
    absolute deviation of flux / error measures that factor directly (`pull_scale`;
    1.0 where `noise_positions` gives none).

    The positions are whole pixels, each fitted with the stamp drawn at the nearest
    node of a `_NOISE_MODEL_GRID` grid over the frame: a few dozen stamps drawn
    instead of one per position. The default 2000 positions give the scale to 2-3%
    (400 positions with a stamp drawn for each, at about half the cost: 3-6%).
    ``unusable`` and ``sky_ring``: as `psf_photometry` is called for the fluxes scaled
    (a ring needs a ``config`` without ``fit_background``).
    """
    return pull_scale(random_pulls(exposure, stamps, config, unusable, sky_ring))


def random_pulls(
    exposure: Exposure,
    stamps: PsfStamps,
    config: ForcedPhotometryConfig,
    unusable: tuple[str, ...] = UNUSABLE_PLANES,
    sky_ring: int = 0,
) -> np.ndarray:
    """flux / error at `noise_scale`'s random positions (empty without them)."""
    ny, nx = exposure.shape
    h = stamps.half
    positions = noise_positions(exposure.shape, h, config.n_noise_positions, config.seed)
    if positions is None:
        return np.zeros(0)
    ix, iy = positions
    g = _NOISE_MODEL_GRID
    gx = np.rint(np.linspace(h, nx - 1 - h, g)).astype(int)
    gy = np.rint(np.linspace(h, ny - 1 - h, g)).astype(int)
    x0, y0 = exposure.xy0
    models, _, _ = stamps.at(np.tile(gx, g) + x0, np.repeat(gy, g) + y0)
    node = np.abs(iy[:, None] - gy).argmin(axis=1) * g + np.abs(ix[:, None] - gx).argmin(axis=1)
    pulls = []
    for part in batches(ix.size):
        drawn = (models[node[part]], ix[part], iy[part])
        fit = psf_photometry(
            exposure,
            ix[part],
            iy[part],
            stamps,
            config.fit_background,
            config.min_psf_coverage,
            drawn=drawn,
            unusable=unusable,
            sky_ring=sky_ring,
        )
        pulls.append(fit["flux"] / fit["flux_err"])
    return np.concatenate(pulls)


#: Median flux / error at random positions beyond which an image has a sky level a PSF
#: fit without a background takes for flux (a difference reads a few hundredths; a
#: matched template with its sky, about a hundred).
SKY_PULL = 2.0


def has_sky(pulls: np.ndarray) -> bool:
    """True when random positions' `random_pulls` say the image is no sky-free difference."""
    pulls = pulls[np.isfinite(pulls)]
    return pulls.size >= 30 and abs(float(np.median(pulls))) > SKY_PULL


def pixel_flags(
    exposure: Exposure, ix: np.ndarray, iy: np.ndarray, radius: float, fit_half: int
) -> np.ndarray:
    """`FLAG_BITS` raised by mask planes within ``radius`` px of centre pixels (ix, iy).

    ``edge`` is also raised where the fitting box (half-width ``fit_half``) leaves
    the array, and ``no_data`` where the centre pixel is not finite.
    """
    ix = np.asarray(ix, dtype=int)
    iy = np.asarray(iy, dtype=int)
    flags = np.zeros(ix.size, dtype=np.int32)
    if ix.size == 0:
        return flags
    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    disc = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius
    masks = _stack(exposure.mask, ix, iy, r, fill=0)
    hits = np.bitwise_or.reduce(np.where(disc, masks, 0).reshape(ix.size, -1), axis=1)
    for bit, planes in FLAG_BITS.values():
        bits = exposure.bitmask([p for p in planes if p in exposure.mask_planes])
        if bits:
            flags[(hits & bits) != 0] |= bit
    ny, nx = exposure.shape
    outside = (ix - fit_half < 0) | (iy - fit_half < 0)
    outside |= (ix + fit_half > nx - 1) | (iy + fit_half > ny - 1)
    flags[outside] |= FLAG_BITS["edge"][0]
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    centre = np.full(ix.size, np.nan, dtype=np.float32)
    centre[inside] = exposure.image[iy[inside], ix[inside]]
    flags[~np.isfinite(centre)] |= FLAG_BITS["no_data"][0]
    return flags


def flag_columns(flags: np.ndarray) -> dict[str, np.ndarray]:
    """One boolean ``flag_<name>`` column per `FLAG_BITS` entry."""
    return {f"flag_{name}": (flags & bit) != 0 for name, (bit, _) in FLAG_BITS.items()}


def forced_photometry(
    difference: Exposure,
    x=None,
    y=None,
    ra=None,
    dec=None,
    config: ForcedPhotometryConfig | None = None,
    psf: Psf | None = None,
    matched_template: Exposure | None = None,
    kernel_sources: Table | None = None,
    dia: DiaSourceConfig | None = None,
) -> Table:
    """PSF photometry of a difference at given positions, one row per position, in order.

    Parameters
    ----------
    difference : `Exposure`
        A difference image with its PSF (the difference's, e.g. decorrelated).
    x, y : array-like (n,), optional
        0-based array column and row.
    ra, dec : array-like (n,), optional
        Sky positions (degrees), used when x and y are not given; need a WCS.
    config : `ForcedPhotometryConfig` or None
    psf : `core.psf.Psf` or None
        Overrides the difference's PSF.
    matched_template : `Exposure` or None
        The subtraction's matched template (its PSF; without one, the difference's):
        raises ``bright_star`` as the DIA catalog does (``dia``'s radius, residual
        fraction and detection threshold, in each position's flux error).
    kernel_sources : `astropy.table.Table` or None
        The subtraction's kernel sources (parent ``x``, ``y``): raises
        ``suspect_kernel`` beyond ``dia.suspect_kernel_margin`` outside their hull,
        unless their meta says the solution fitted on them is constant
        (`core.position_flags.EXTRAPOLATED_ORDER` 0, as `core.products.read_kernel_sources`
        restores it).
    dia : `DiaSourceConfig` or None
        The thresholds of those two flags (default: the catalog's defaults).

    Returns
    -------
    `astropy.table.Table`
        ``x``, ``y``, ``ra``, ``dec`` (NaN without a WCS), ``psf_flux``,
        ``psf_flux_err`` (counts of the difference, i.e. science units), ``snr``,
        ``flags`` (`FLAG_BITS`) and one boolean ``flag_<name>`` per bit. Meta:
        ``noise_scale`` applied to the errors; ``fit_background``, True also when the
        image turned out to have a sky level (``sky_found``: random positions' fluxes
        a median `SKY_PULL` errors from zero, as on a matched template), which a fit
        without a background would have measured as flux. A position whose fitting box misses
        the frame, or a sky position the WCS cannot project (x, y NaN), is not
        measured: NaN fluxes, flagged ``edge`` and ``no_data``.

    Raises
    ------
    InvalidPositionsError
        (an `InvalidCatalogError`, code ``invalid_positions``) Neither x/y nor ra/dec,
        lengths differ, ra/dec without a WCS, a NaN or infinite coordinate, a dec beyond
        +-90 degrees or an ra outside [0, 360) (the first such position named).
    IncompatibleInputsError
        The matched template is not on the difference's grid.
    PsfError
        The difference has no PSF.
    """
    config = config or ForcedPhotometryConfig()
    if matched_template is not None and (
        matched_template.shape != difference.shape or matched_template.xy0 != difference.xy0
    ):
        raise IncompatibleInputsError(
            f"the matched template ({matched_template.shape[1]}x{matched_template.shape[0]} "
            f"at {matched_template.xy0}) is not on the difference's grid "
            f"({difference.shape[1]}x{difference.shape[0]} at {difference.xy0}): give the "
            "products of the subtraction that made this difference"
        )
    x, y, ra, dec = _positions(difference, x, y, ra, dec)
    psf = psf or difference.require_psf()
    stamps = PsfStamps(psf, difference, config=config)
    pulls = random_pulls(difference, stamps, config)
    sky = not config.fit_background and has_sky(pulls)
    if sky:
        # not a difference (a matched template, a science frame): a local background
        # fitted with each flux, or its sky would be measured as the flux
        config = config.model_copy(update={"fit_background": True})
        pulls = random_pulls(difference, stamps, config)
    scale = pull_scale(pulls)
    # positions whose fitting box misses the frame (or that no pixel has: a sky position
    # the WCS cannot project) are not fitted: no data, at the edge
    ny, nx = difference.shape
    reach = stamps.half + 1
    near = (x > -reach) & (x < nx - 1 + reach) & (y > -reach) & (y < ny - 1 + reach)
    flux = np.full(x.size, np.nan)
    flux_err = np.full(x.size, np.nan)
    flags = np.full(x.size, FLAG_BITS["edge"][0] | FLAG_BITS["no_data"][0], dtype=np.int32)
    fit = psf_photometry(
        difference,
        x[near],
        y[near],
        stamps,
        config.fit_background,
        config.min_psf_coverage,
        sharpness=True,
    )
    flux[near], flux_err[near] = fit["flux"], fit["flux_err"] * scale
    flags[near] = pixel_flags(
        difference, fit["ix"], fit["iy"], config.flag_radius_fwhm * stamps.fwhm, stamps.half
    )
    fitted = np.flatnonzero(near)
    flags[fitted[fit["sharp"]]] |= FLAG_BITS["sharp"][0]
    dia = dia or DiaSourceConfig()
    radius = dia.bright_star_radius_fwhm * stamps.fwhm
    if matched_template is not None and matched_template.psf is None:
        # a star in it has the difference's PSF: the subtraction matched it so
        matched_template = matched_template.with_psf(psf)
    # as the catalog: near a star whose residual can reach the detection threshold in
    # the position's noise (a saturated one's in the typical position's), and no more
    # than its residual
    limits = bright_star_limit(flux_err[near], dia.threshold, dia.bright_star_residual)
    typical = float(np.median(limits)) if limits.size else None
    light = bright_star_light(matched_template, fit["ix"], fit["iy"], radius, limits, typical)
    profile, halo, search, template = saturated_search(
        psf, kernel_sources, stamps.fwhm, matched_template, dia
    )
    saturated = saturated_stars(difference, template, fit["ix"], fit["iy"], search)
    with np.errstate(invalid="ignore", divide="ignore"):
        position_snr = np.abs(fit["flux"] / flux_err[near])
    bright = bright_star(
        fit["ix"],
        fit["iy"],
        fit["flux"],
        flux_err[near],
        position_snr,
        (flags[near] & FLAG_BITS["saturated"][0]) != 0,
        light,
        saturated,
        profile,
        halo,
        dia,
    )
    flags[fitted[bright]] |= FLAG_BITS["bright_star"][0]
    known = np.isfinite(x) & np.isfinite(y)
    outside = np.zeros(x.size, dtype=bool)
    outside[known] = outside_kernel_hull(
        kernel_sources, difference.xy0, x[known], y[known], dia.suspect_kernel_margin
    )
    flags[outside] |= FLAG_BITS["suspect_kernel"][0]
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / flux_err
    table = Table(
        {
            "x": x,
            "y": y,
            "ra": ra,
            "dec": dec,
            "psf_flux": flux,
            "psf_flux_err": flux_err,
            "snr": snr,
            "flags": flags,
            **flag_columns(flags),
        }
    )
    table.meta["noise_scale"] = scale
    table.meta["fit_background"] = config.fit_background
    table.meta["sky_found"] = sky
    table.meta.update(observation_meta(difference))
    return table


#: Table meta -> the exposure's header keywords it comes from (first present wins).
_OBSERVATION_KEYS = {
    "mjd_obs": ("MJD-OBS",),
    "date_obs": ("DATE-OBS",),
    "band": ("FILTER", "BAND"),
    "exptime": ("EXPTIME",),
    "bunit": ("BUNIT",),
    "flux_ratio": ("ALSUB FLUXRAT",),
}


def observation_meta(exposure: Exposure) -> dict:
    """When and how the measured image was taken, for a catalog's meta: ``mjd_obs``,
    ``date_obs`` (from ``mjd_obs`` when the header has only that), ``band`` and
    ``exptime``, those the exposure's header holds (an alert needs the epoch);
    ``flux_ratio`` (a difference product's ``ALSUB FLUXRAT``) and ``photcal`` (nJy per
    count) where known, which put epochs on one scale; and ``bunit``, the unit of its
    pixels (fluxes are sums of them): the header's, else the one the products write for
    the image (`core.io.bunit_card`)."""
    meta = {}
    header = exposure.metadata
    for key, cards in _OBSERVATION_KEYS.items():
        found: list[Any] = [exposure.band] if key == "band" and exposure.band else []
        found += [header.get(card) for card in cards]
        value = next((v for v in found if isinstance(v, str | int | float | np.number)), None)
        if isinstance(value, np.number):
            value = value.item()
        if isinstance(value, str):
            value = value.strip()
            # a FITS card holds printable ASCII only
            if not (value and value.isascii() and value.isprintable()):
                continue
        elif isinstance(value, bool) or not (value is not None and math.isfinite(value)):
            continue
        meta[key] = value
    if "mjd_obs" in meta and "date_obs" not in meta:
        # as the image's own WCS header writes it: an alert's epoch both ways
        meta["date_obs"] = full_epoch(meta["mjd_obs"], None)["DATE-OBS"]
    if exposure.photo_calib is not None:
        meta["photcal"] = float(exposure.photo_calib.calibration)
    # none in the header: the unit the products write for the image (adu)
    meta.setdefault("bunit", bunit_card(exposure))
    return meta


def _positions(exposure: Exposure, x, y, ra, dec):
    """(x, y, ra, dec) float arrays from either array or sky positions."""
    if x is not None and y is not None:
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        if x.shape != y.shape or x.ndim != 1:
            raise InvalidPositionsError(f"x and y differ in length ({x.size} vs {y.size})")
        ra, dec = sky_positions(exposure, x, y)
    elif ra is not None and dec is not None:
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        if ra.shape != dec.shape or ra.ndim != 1:
            raise InvalidPositionsError(f"ra and dec differ in length ({ra.size} vs {dec.size})")
        if exposure.wcs is None:
            raise InvalidPositionsError(
                "positions are given as ra/dec but the difference has no WCS; give x/y instead"
            )
        _require_finite(ra, dec, "ra", "dec")
        beyond = np.flatnonzero(np.abs(dec) > 90)
        if beyond.size:
            raise InvalidPositionsError(
                f"dec must be within -90..90 degrees (position {beyond[0]}, counting from 0: "
                f"{dec[beyond[0]]:g})"
            )
        # as dec is: an ra of 510 is a mistake the projection would wrap to 150 unsaid
        outside = np.flatnonzero((ra < 0) | (ra >= 360))
        if outside.size:
            raise InvalidPositionsError(
                f"ra must be within 0..360 degrees, 360 excluded (position {outside[0]}, "
                f"counting from 0: {ra[outside[0]]:g})"
            )
        # a position the projection cannot reach (the far side of a tangent plane) is
        # NaN: a row of its own, unmeasured, not a refusal of the whole list
        x, y = radec_to_pixel(exposure.wcs, ra, dec)
        return x, y, ra, dec
    else:
        raise InvalidPositionsError("give positions as x and y (pixels) or as ra and dec (degrees)")
    _require_finite(x, y, "x", "y")
    return x, y, ra, dec


def _require_finite(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Refuse a list of positions holding a NaN or infinite coordinate, naming the first."""
    bad = np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)))
    if bad.size:
        k = bad[0]
        raise InvalidPositionsError(
            f"positions must be finite numbers ({name_a}, {name_b} of position {k}, "
            f"counting from 0: {a[k]:g}, {b[k]:g})"
        )


def sky_positions(exposure: Exposure, x: np.ndarray, y: np.ndarray):
    """(ra, dec) in degrees of array positions; NaN without a WCS."""
    if exposure.wcs is None or x.size == 0:
        nan = np.full(x.size, np.nan)
        return nan, nan.copy()
    return pixel_to_radec(exposure.wcs, x, y)
