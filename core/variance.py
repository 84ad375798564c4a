"""Rescaling of a variance plane to the noise measured in the pixels (algorithm.md 1.6).

Variance planes from headers or upstream pipelines are often off by a constant
factor (wrong gain, resampled images). The kernel fit weights and the
decorrelation use them, so they are rescaled before the fit.

Two estimates are made on sky pixels (no source detected on the image, dilated,
no bad plane), both as robust variances of noise normalised by the plane:

* ``sky``: the spread of the background-subtracted pixel values, as Rubin's
  ScaleVarianceTask measures it. In a crowded field unresolved stars add their
  own, PSF-smooth structure (confusion), which is sky, not noise: it subtracts
  out, yet it inflates this estimate many times (SAAO bulge frames: 29x).
* ``pixel_scale``: the spread of fourth differences (stencil 1, -4, 6, -4, 1)
  along rows and columns. PSF-smooth structure cancels in them, white noise does
  not, so confusion cannot fool it; correlated noise (resampling, coadding)
  lowers it by a factor computable from the noise autocorrelation.

Which one is applied: they agree for white noise, and then ``sky`` is used, as
Rubin does. When ``sky`` is clearly larger, the excess is either confusion or
correlated noise; one image cannot tell them apart, so the plane's provenance
decides. A plane modelled from photon statistics (gain and read noise) is white
unless the exposure says otherwise (``noise_correlation``), so the excess is
confusion and ``pixel_scale`` is used (unless it reads below the model: an image
resampled without saying so, whose model is kept). Any other plane (given by the user or
measured from the sky) keeps ``sky`` and the measured noise autocorrelation is
recorded on the exposure, for the decorrelation. A factor outside the plausible
range is not applied and becomes a warning, never a refusal.

A sky-measured noise and autocorrelation also hold the faint static sources that sky
keeps; one image cannot tell them from correlated noise, the difference can (they
cancel there): `static_structure_correction` measures them on the difference, through
the science PSF, and takes them out of the inputs' estimates before the decorrelation.
It takes out no more than the pixel-scale noise allows (static structure cannot inflate
that, correlated noise only lowers it), and what it takes out is a sky term, not a
scale on the sources' photon noise; when it is most of an input's estimate the caller
fits the kernel again (a crowded frame sky-subtracted upstream: its sky spread is ~4x
its noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage, signal

from . import order
from .background import background_images
from .config import ScaleVarianceConfig
from .dilation import dilate_cross
from .exposure import UNIT_VARIANCE, Exposure
from .io import PHYSICAL_VARIANCE_PREFIX
from .kernel import BackgroundModel, chebyshev_terms, n_spatial_terms
from .parallel import n_threads, thread_map

__all__ = [
    "VarianceScale",
    "measure_variance_scale",
    "variance_scale_factor",
    "scale_variance",
    "measure_noise_correlation",
    "second_difference_gain",
    "static_structure_correction",
    "StaticCorrection",
    "PHYSICAL_VARIANCE_PREFIX",
    "CORRELATED_NOISE_NOTE",
]

#: The note an input's sky-measured correlation leaves (replaced when the
#: static-structure correction finds that sky held unresolved sources instead).
CORRELATED_NOISE_NOTE = (
    "the input noise is correlated (resampled or coadded image): its measured "
    "autocorrelation is used by the decorrelation"
)

_SAMPLE_PIXELS = 1_000_000
#: Output rows per block of `_second_difference_pulls` (a 1024-px row block of float64
#: terms is 0.5 MB, of float32 ones half: it stays in cache through the stencil's passes).
_PULL_BLOCK_ROWS = 64
#: Fourth difference: it cancels cubics, so PSF-smooth sky (confusion) leaves ~nothing,
#: while white noise passes (SAAO bulge frames: 1.00-1.03 x the gain model, where the
#: second difference still showed 1.14 x)
_STENCIL = np.array([1.0, -4.0, 6.0, -4.0, 1.0]) / 6.0


@dataclass
class VarianceScale:
    """The outcome of a variance-scale measurement.

    Attributes
    ----------
    factor : float
        Factor the variance plane is (to be) multiplied by.
    sky, pixel_scale : float
        The two estimates (see the module docstring); NaN when not measurable.
    method : str
        ``"sky"``, ``"pixel_scale"`` or ``"none"`` (nothing applied).
    warnings : list of str
        Concerns (an implausible factor): they make the verdict suspect.
    notes : list of str
        What was found and handled (confusion, correlated noise).
    noise_correlation : `numpy.ndarray` or None
        Noise autocorrelation measured on the sky when the noise is not white.
    """

    factor: float
    sky: float
    pixel_scale: float
    method: str
    warnings: list[str] = field(default_factory=list)
    noise_correlation: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def second_difference_gain(noise_correlation: np.ndarray | None) -> float:
    """Variance of the pixel-scale difference over its white-noise value.

    For noise with normalised autocorrelation rho along an axis, the stencil
    ``a`` has variance ``sigma^2 sum_ij a_i a_j rho(i - j)``; the mean over the two
    axes is returned relative to ``sigma^2 sum a_i^2`` (1 for white noise).
    """
    if noise_correlation is None:
        return 1.0
    rho = np.asarray(noise_correlation, dtype=np.float64)
    c = rho.shape[0] // 2
    n = _STENCIL.size
    lags = np.subtract.outer(np.arange(n), np.arange(n))
    inside = np.abs(lags) <= c
    gains = []
    for axis_rho in (rho[c, :], rho[:, c]):
        r = np.where(inside, axis_rho[np.clip(c + lags, 0, 2 * c)], 0.0)
        gains.append(float(_STENCIL @ r @ _STENCIL) / float(_STENCIL @ _STENCIL))
    return max(float(np.mean(gains)), 1e-3)


def _view(exposure: Exposure, index) -> Exposure:
    """The image, variance and mask planes of ``exposure`` at ``index`` (views, no copy)."""
    return Exposure(
        exposure.image[index],
        exposure.variance[index],
        exposure.mask[index],
        mask_planes=exposure.mask_planes,
    )


def _sky_tiles(shape: tuple[int, int], bin_size: int) -> list[tuple[slice, slice]]:
    """Where the sky estimate looks: the whole frame up to 4 x `_SAMPLE_PIXELS`, else
    a regular grid of full-resolution tiles of 8 x 8 background bins holding about
    `_SAMPLE_PIXELS` in all.

    Not a strided subsample: its background bins would hold step^2 fewer pixels, and
    a mesh of few pixels follows the noise it should leave in the residual (the
    estimate read 2% low at 4096^2 with a stride of 4, ~8% at 8192^2 with 8).
    """
    ny, nx = shape
    side = 8 * bin_size
    per_axis = math.ceil(math.sqrt(_SAMPLE_PIXELS) / side)
    if ny * nx <= 4 * _SAMPLE_PIXELS or per_axis * side > min(ny, nx):
        return [np.s_[:, :]]
    # centred in equal parts of the frame: spread evenly, one tile in the middle
    centres = (np.arange(per_axis) + 0.5) / per_axis
    starts_y = np.clip(np.round(centres * ny - side / 2), 0, ny - side).astype(int)
    starts_x = np.clip(np.round(centres * nx - side / 2), 0, nx - side).astype(int)
    return [np.s_[y : y + side, x : x + side] for y in starts_y for x in starts_x]


def _good(exposure: Exposure, config: ScaleVarianceConfig) -> np.ndarray:
    bad = exposure.masked(config.mask_planes)
    if config.source_dilation > 0:
        detected = exposure.masked(["DETECTED", "DETECTED_NEGATIVE"])
        bad |= dilate_cross(detected, config.source_dilation)
    return (
        ~bad
        & np.isfinite(exposure.image)
        & np.isfinite(exposure.variance)
        & (exposure.variance > 0)
    )


#: A sky whose smooth part changes by less than this fraction of the noise across a cell
#: cannot move a cell's median measurably (flat skies keep the one mesh: no second pass).
_SLOPE_NOISE_FRACTION = 0.1


def _smooth_part(background: np.ndarray, step: int) -> BackgroundModel:
    """The least-squares quadratic surface through a background map, fitted to every
    ``step``-th pixel of it (the map is smooth on the mesh's scale): the differential
    background's Chebyshev model over the map's pixels."""
    ny, nx = background.shape
    domain = (0, 0, nx - 1, ny - 1)
    y, x = np.mgrid[0:ny:step, 0:nx:step]
    design = chebyshev_terms(x, y, 2, domain).reshape(n_spatial_terms(2), -1).T
    sample = background[::step, ::step].ravel()
    return BackgroundModel(np.linalg.lstsq(design, sample, rcond=None)[0], 2, domain)


def _sloped(surface: BackgroundModel, view: Exposure, good: np.ndarray, cell: int) -> bool:
    """Whether ``surface`` changes across a ``cell`` by a `_SLOPE_NOISE_FRACTION` of the
    sky noise or more."""
    y, x = np.mgrid[0 : view.shape[0] : cell, 0 : view.shape[1] : cell]
    coarse = np.asarray(surface.evaluate(x, y))
    change = max(float(np.abs(np.diff(coarse, axis=axis)).max(initial=0.0)) for axis in (0, 1))
    noise = math.sqrt(float(np.median(view.variance[good][::16])))
    return change >= _SLOPE_NOISE_FRACTION * noise


def _sky_estimate(exposure: Exposure, config: ScaleVarianceConfig) -> float:
    views, goods = [], []
    for tile in _sky_tiles(exposure.shape, config.background_bin_size):
        view = _view(exposure, tile)
        good = _good(view, config)
        if good.any():
            views.append(view)
            goods.append(good)
    cell = config.background_bin_size
    backgrounds = background_images(views, cell, ignore_planes=config.mask_planes)
    # a cell's median on a sloped sky moves along the slope with the pixels masked in it
    # (a source off the cell's centre), which the spread then counts as noise (a +50%
    # ramp over 8 cells: 1.16 for 1.04): the mesh is made again once the smooth part of
    # the first one (a quadratic surface: ramps, glows) is off the pixels
    surfaces = [_smooth_part(b, max(1, cell // 4)) for b in backgrounds]
    if any(_sloped(*args, cell) for args in zip(surfaces, views, goods, strict=True)):
        flats = []
        for view, surface in zip(views, surfaces, strict=True):
            flat = np.empty_like(view.image)
            surface.add_to(flat, scale=-1.0, source=view.image)
            flats.append(Exposure(flat, view.variance, view.mask, mask_planes=view.mask_planes))
        views = flats
        backgrounds = background_images(views, cell, ignore_planes=config.mask_planes)
    pieces = []
    for view, good, background in zip(views, goods, backgrounds, strict=True):
        residual = (view.image - background)[good]
        residual /= np.sqrt(view.variance[good])
        pieces.append(residual)
    residual = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    if residual.size < 2:
        return math.nan
    return float(order.mad_std(residual, consume=True) ** 2)


def _second_difference_pulls(image, variance, good, axis: int = 1) -> np.ndarray:
    """Pixel-scale differences along ``axis``, normalised by their predicted sigma (in
    place of a transpose: slices along either axis stay contiguous rows), in the planes'
    precision: float32 planes round at ~1e-7 of their values, ~1e-5 of the noise.

    Made a block of output rows at a time, so that the sums' terms stay in cache."""
    n = _STENCIL.size
    width = image.shape[axis] - n + 1
    if width < 1:
        return np.zeros(0)
    rows_out = image.shape[0] if axis else width
    stencil = _STENCIL.astype(np.result_type(image.dtype, variance.dtype, np.float32))
    pulls = []
    for r0 in range(0, rows_out, _PULL_BLOCK_ROWS):
        r1 = min(r0 + _PULL_BLOCK_ROWS, rows_out)
        parts = [
            np.s_[r0:r1, i : i + width] if axis else np.s_[r0 + i : r1 + i, :] for i in range(n)
        ]
        use = np.logical_and.reduce([good[part] for part in parts])
        # accumulated in place, in the order of a plain sum of the terms
        value = stencil[0] * image[parts[0]]
        expected = stencil[0] ** 2 * variance[parts[0]]
        term = np.empty_like(value)
        for w, part in zip(stencil[1:], parts[1:], strict=True):
            value += np.multiply(w, image[part], out=term)
            expected += np.multiply(w * w, variance[part], out=term)
        value = value[use]
        value /= np.sqrt(expected[use])
        pulls.append(value)
    return np.concatenate(pulls)


def _pixel_scale_estimate(
    exposure: Exposure, config: ScaleVarianceConfig, good: np.ndarray | None = None
) -> float:
    if good is None:
        good = _good(exposure, config)
    values = []
    for axis in (1, 0):
        pulls = _second_difference_pulls(exposure.image, exposure.variance, good, axis)
        if pulls.size >= 100:
            values.append(float(order.mad_std(pulls, consume=True) ** 2))
    return float(np.mean(values)) if values else math.nan


def _central_window(exposure: Exposure, size: int) -> Exposure:
    """The central size x size pixels (1 Mpx measures a noise scale or correlation to ~1e-3)."""
    ny, nx = exposure.shape
    if ny <= size and nx <= size:
        return exposure
    y0, x0 = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    return _view(exposure, np.s_[y0 : y0 + size, x0 : x0 + size])


def measure_noise_correlation(
    exposure: Exposure, config: ScaleVarianceConfig | None = None, radius: int | None = None
) -> np.ndarray | None:
    """Autocorrelation of the normalised sky noise, lags up to ``radius`` (odd square).

    Sources and bad pixels are left out (set to zero and divided out through the
    autocorrelation of the sky mask); the median sky is removed first.
    Returns None when fewer than ``config.min_sky_pixels`` sky pixels remain.
    """
    config = config or ScaleVarianceConfig()
    window = _central_window(exposure, config.correlation_window)
    return _noise_correlation(window, _good(window, config), config, radius)


def _noise_correlation(
    exposure: Exposure, good: np.ndarray, config: ScaleVarianceConfig, radius: int | None = None
) -> np.ndarray | None:
    """`measure_noise_correlation` on a window whose sky pixels ``good`` are known."""
    radius = config.correlation_radius if radius is None else radius
    # measured out to where the noise's own correlation has died (a resampling or
    # coadding kernel reaches ~radius): the plateau there is sky, not noise
    outer = _plateau_radius(radius)
    if np.count_nonzero(good) < config.min_sky_pixels:
        return None
    # a smooth sky left in the window only adds a plateau at every lag (removed below)
    sky = float(order.median(exposure.image[good], consume=True))
    pull = np.where(good, (exposure.image - sky) / np.sqrt(np.where(good, exposure.variance, 1)), 0)
    # clip what is left of sources and cosmic rays: the noise core is what matters
    sigma = order.mad_std(pull[good], consume=True)
    weight = good & (np.abs(pull) < 5 * sigma)
    pull = np.where(weight, pull, 0.0)
    shape = [sp_fft.next_fast_len(n + outer + 1) for n in pull.shape]
    f_pull = sp_fft.rfft2(pull, shape, workers=n_threads())
    # float32 as the pulls: pair counts (~1e6) carry ~1e-6 relative round-off
    f_mask = sp_fft.rfft2(weight.astype(np.float32), shape, workers=n_threads())
    corr = sp_fft.irfft2(f_pull * np.conj(f_pull), shape, workers=n_threads())
    count = sp_fft.irfft2(f_mask * np.conj(f_mask), shape, workers=n_threads())
    lags = np.arange(-outer, outer + 1)
    window = np.ix_(lags % shape[0], lags % shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        acf = corr[window] / np.maximum(count[window], 1.0)
    if not acf[outer, outer] > 0:
        return None
    acf = acf / acf[outer, outer]
    # a plateau at the outer lags is sky structure left by the background mesh, not
    # noise (resampling correlates pixels over a few lags only): remove it
    plateau = _ring_median(acf)
    if 0 < plateau < 0.5:
        acf = (acf - plateau) / (1.0 - plateau)
    cut = outer - radius
    return acf[cut : cut + 2 * radius + 1, cut : cut + 2 * radius + 1]


def _plateau_radius(radius: int) -> int:
    return 2 * radius + 2


def _ring_median(acf: np.ndarray) -> float:
    ring = np.ones(acf.shape, dtype=bool)
    ring[1:-1, 1:-1] = False
    return float(np.median(acf[ring]))


def _is_white(noise_correlation: np.ndarray | None, tolerance: float) -> bool:
    if noise_correlation is None:
        return True
    rho = noise_correlation.copy()
    c = rho.shape[0] // 2
    rho[c, c] = 0.0
    return bool(np.max(np.abs(rho)) < tolerance)


def measure_variance_scale(
    exposure: Exposure, config: ScaleVarianceConfig | None = None
) -> VarianceScale:
    """Measure how much the variance plane of ``exposure`` must be scaled (module docstring).

    Sources should already be flagged DETECTED / DETECTED_NEGATIVE (detection on the
    exposure) so that only sky pixels are used.
    """
    config = config or ScaleVarianceConfig()
    gain = second_difference_gain(exposure.noise_correlation)
    # pixel noise needs neighbours, not the whole frame: the central window
    window = _central_window(exposure, config.correlation_window)
    window_good = _good(window, config)  # shared with the noise correlation
    physical = exposure.variance_source.startswith(PHYSICAL_VARIANCE_PREFIX)
    # the estimates are independent: on the cores the caller has (the noise correlation,
    # needed below for any plane not modelled from photon statistics unless the sky
    # estimate fails, is made beside the two others whenever it may be)
    jobs: list[Callable[[], Any]] = [
        lambda: _sky_estimate(exposure, config),
        lambda: _pixel_scale_estimate(window, config, window_good) / gain,
    ]
    if not physical and exposure.noise_correlation is None:
        jobs.append(lambda: _noise_correlation(window, window_good, config))
    sky, pixel_scale, *correlation = thread_map(lambda job: job(), jobs)
    warnings: list[str] = []
    notes: list[str] = []
    measured_correlation = None
    method, factor = "sky", sky
    excess = (
        math.isfinite(sky)
        and math.isfinite(pixel_scale)
        and sky > config.excess_ratio * pixel_scale
    )
    if excess and physical and exposure.noise_correlation is None and pixel_scale < 1.0:
        # a photon-noise model is not too large; less pixel-scale noise than it
        # predicts means an image resampled without saying so (its noise is
        # correlated), where the pixel-scale estimate reads low: keep the model
        method, factor = "none", 1.0
        notes.append(
            f"the pixel-scale noise is {pixel_scale:.2f}x the gain/read-noise model's "
            "(a resampled image?); the model was kept"
        )
    elif excess and (physical or exposure.noise_correlation is not None):
        method, factor = "pixel_scale", pixel_scale
        notes.append(
            f"the sky varies {math.sqrt(sky / pixel_scale):.1f}x more than its pixel noise "
            "(a crowded, confusion-limited field); the variance was scaled from the "
            "pixel-scale noise"
        )
    elif not physical and exposure.noise_correlation is None and math.isfinite(sky):
        # given or sky-measured planes often belong to resampled or coadded images:
        # per-pixel variances stay right, but sums over pixels (PSF fluxes, the score,
        # the decorrelation) need the correlation
        measured_correlation = correlation[0]
        # the sky's autocorrelation also holds faint sources' wings; it is the noise's
        # only if it predicts how much the pixel-scale differences are suppressed
        consistent = (
            measured_correlation is not None
            and math.isfinite(pixel_scale)
            and abs(second_difference_gain(measured_correlation) - pixel_scale / sky)
            <= config.correlation_consistency
        )
        if consistent and not _is_white(measured_correlation, config.white_tolerance):
            notes.append(CORRELATED_NOISE_NOTE)
        else:
            measured_correlation = None
    if not math.isfinite(sky):
        method, factor = ("pixel_scale", pixel_scale) if math.isfinite(pixel_scale) else ("none", 1)
    limit = config.limit
    unit = exposure.variance_source.startswith(UNIT_VARIANCE)  # also once warped
    if unit and math.isfinite(factor) and factor > 0:
        # a plane of ones says nothing of the noise: any factor is plausible for it, but
        # the sources' photon noise is missing (bright stars' residuals read as sources)
        warnings.append(
            f"no variance was given: the plane of ones was scaled by {factor:.4g} to the "
            "sky noise, without the sources' photon noise; give a variance (e.g. "
            "variance, source, *_ = core.io.estimate_variance(image, gain=...), then "
            "Exposure.from_arrays(image, variance, variance_source=source))"
        )
    elif not (math.isfinite(factor) and 1.0 / limit <= factor <= limit):
        warnings.append(
            f"the variance plane is off from the pixel noise by an implausible factor "
            f"{factor:.3g} (limit {limit}); it was left unscaled: check the gain/read-noise "
            "keywords or the variance file"
        )
        method, factor = "none", 1.0
    return VarianceScale(
        factor=float(factor),
        sky=float(sky),
        pixel_scale=float(pixel_scale),
        method=method,
        warnings=warnings,
        noise_correlation=measured_correlation,
        notes=notes,
    )


def variance_scale_factor(exposure: Exposure, config: ScaleVarianceConfig | None = None) -> float:
    """Factor by which the variance plane must be multiplied to match the pixel noise."""
    return measure_variance_scale(exposure, config).factor


def scale_variance(exposure: Exposure, config: ScaleVarianceConfig | None = None) -> VarianceScale:
    """Scale the variance plane of ``exposure`` in place (and record measured correlation).

    Returns the `VarianceScale` that was applied.
    """
    scale = measure_variance_scale(exposure, config)
    if scale.factor != 1.0:
        exposure.variance *= np.float32(scale.factor)
    if scale.noise_correlation is not None and exposure.noise_correlation is None:
        exposure.noise_correlation = scale.noise_correlation
    return scale


@dataclass
class StaticCorrection:
    """Input noise estimates corrected for static sky structure (`static_structure_correction`).

    Attributes
    ----------
    ratio : float
        Robust variance of the uncorrected difference on sky over its prediction from
        the inputs' noise estimates (below 1: the estimates held static structure).
    power : float
        Static power per unit PSF power in science units (c of the docstring).
    factors : (float, float)
        Factors the science and template variance planes are multiplied by.
    correlations : (array or None, array or None)
        Corrected noise autocorrelations of science and template.
    removed : (float, float)
        Variance (the planes' units) static structure added to each input's sky: a sky
        term, which the sources' photon noise in a plane does not share.
    """

    ratio: float
    power: float
    factors: tuple[float, float]
    correlations: tuple[np.ndarray | None, np.ndarray | None]
    removed: tuple[float, float] = (0.0, 0.0)


def _autocorrelate(stamp: np.ndarray, radius: int) -> np.ndarray:
    """Autocorrelation of ``stamp`` at lags up to ``radius`` ((2r+1) square, zero beyond)."""
    stamp = np.asarray(stamp, dtype=np.float64)
    full = sp_fft.irfft2(
        np.abs(sp_fft.rfft2(stamp, [2 * n for n in stamp.shape])) ** 2,
        [2 * n for n in stamp.shape],
    )
    full = np.fft.fftshift(full)
    cy, cx = stamp.shape[0], stamp.shape[1]
    out = np.zeros((2 * radius + 1, 2 * radius + 1))
    ry, rx = min(radius, cy - 1), min(radius, cx - 1)
    out[radius - ry : radius + ry + 1, radius - rx : radius + rx + 1] = full[
        cy - ry : cy + ry + 1, cx - rx : cx + rx + 1
    ]
    return out


#: Side of the central box of the difference the static-structure probe uses (px).
_PROBE_WINDOW = 1024


#: Fewest sky pixels the static-structure probe is measured on.
_PROBE_MIN_SKY = 1000

#: Variance of a squared MAD-based sigma over sigma^4, times the number of independent
#: Gaussian samples it was measured on (4 x 1.36, the MAD's asymptotic variance).
_MAD_VARIANCE_SPREAD = 5.44


def _correlation_area(
    transfers: list[np.ndarray], correlations: list[np.ndarray], means: list[float]
) -> float:
    """Pixels per independent sample of the probed difference: sum(acf^2) / acf(0)^2 of
    the inputs' noise (``means`` times ``correlations``) seen through ``transfers``."""
    radius = max(max(t.shape) for t in transfers) - 1
    acf = np.zeros((2 * radius + 1, 2 * radius + 1))
    for t, rho, mean in zip(transfers, correlations, means, strict=True):
        acf += mean * signal.fftconvolve(_autocorrelate(t, radius), rho, mode="same")
    peak = float(acf[radius, radius])
    return float(np.sum(acf**2)) / peak**2 if peak > 0 else math.inf


def _probe_sky(sky: np.ndarray, probe: np.ndarray, area: float) -> np.ndarray:
    """Pixels where the probe sees sky alone: over its whole stamp or, in a field too
    crowded to leave `_PROBE_MIN_SKY` of those, over the centred box whose error is
    least: the probe's weight beyond it (which may fall on sources) plus the ratio's
    scatter on the pixels it leaves (``area`` pixels per independent sample). The
    largest box to leave enough kept the few pixels farthest from any source, a clump
    or two: JWST with a 205 px WebbPSF, 1098 pixels and a ratio of 0.81 (scatter about
    0.2) where the box so chosen leaves 85,140 and gives 0.95."""
    half = probe.shape[0] // 2
    # chessboard distance to the nearest pixel that is not sky (off the frame is not):
    # the box of half-width h about a pixel is all sky where it exceeds h
    reach = ndimage.distance_transform_cdt(np.pad(sky, 1), metric="chessboard")[1:-1, 1:-1]
    # pixels whose reach exceeds h, for each h: a reversed cumulative count
    counts = np.bincount(np.minimum(reach, half + 1).ravel(), minlength=half + 2)
    beyond = np.cumsum(counts[::-1])[::-1]
    if beyond[half + 1] >= _PROBE_MIN_SKY:
        return reach > half
    total = float(probe.sum())
    side, least = half, math.inf
    for h in range(half + 1):
        count = int(beyond[h + 1])
        if count < _PROBE_MIN_SKY:
            break
        # the weight outside bounds what sources there may add (they only add), the
        # scatter what a few samples miss by
        outside = 1.0 - float(probe[half - h : half + h + 1, half - h : half + h + 1].sum()) / total
        error = outside + math.sqrt(_MAD_VARIANCE_SPREAD * area / count)
        if error < least:
            side, least = h, error
    return reach > side


def _central_box(shape: tuple[int, ...], size: int) -> tuple[slice, slice]:
    ny, nx = shape[0], shape[1]
    y0, x0 = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    return np.s_[y0 : y0 + size, x0 : x0 + size]


def _static_acf(psf: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """What static sky of unit power through ``psf`` adds to a variance times an
    autocorrelation ``rho`` measured as `_noise_correlation` does (at its lags, less the
    plateau of its outer ring, which that estimate removes and renormalises)."""
    radius = rho.shape[0] // 2
    if radius == 0:
        return _autocorrelate(psf, 0)
    outer = _plateau_radius(radius)
    pp = _autocorrelate(psf, outer)
    plateau = _ring_median(pp)
    cut = outer - radius
    pp = pp[cut : cut + 2 * radius + 1, cut : cut + 2 * radius + 1]
    return pp - plateau + plateau * rho


def _acf_weight(transfer: np.ndarray, correlation: np.ndarray) -> float:
    """sum_lags (t * t)(lag) rho(lag): variance of noise of autocorrelation rho filtered by t."""
    r = correlation.shape[0] // 2
    return float(np.sum(_autocorrelate(transfer, r) * correlation))


def static_structure_correction(
    raw: np.ndarray,
    raw_sky: np.ndarray,
    science: Exposure,
    template: Exposure,
    kernel_image: np.ndarray,
    preconv_image: np.ndarray | None,
    measured: tuple[bool, bool],
    floors: tuple[float, float] = (math.nan, math.nan),
) -> StaticCorrection | None:
    """Remove from the inputs' sky-measured noise what static structure put in it.

    A noise autocorrelation measured on one image's sky also holds the faint sources
    that sky keeps (below detection, wings): one image cannot tell them from
    correlated noise. They are the same sky in both images, so they cancel in the
    difference ``t1 * S - K * T`` (``t1`` the preconvolution kernel or identity), whose
    noise the inputs' estimates predict. Unresolved sources at random positions have a
    flat power spectrum seen through the PSF: an input's measured autocorrelation holds
    ``c (P * P)`` at the lags it was measured (``c / ksum^2`` with the template PSF for
    the template). The one unknown ``c`` follows from the difference's robust variance
    on sky (``raw_sky``: no source on either input), and is removed from the inputs
    whose autocorrelation was measured on sky (``measured``); the others were not
    fooled. ``floors`` are each input's pixel-scale noise over its plane, which static
    structure cannot inflate and correlated noise only lowers: the correction leaves at
    least that much lag-0 variance (half when NaN, unknown), and keeps the corrected
    correlation only if it predicts that noise better than white noise does.
    Returns None when nothing is to correct (the difference is not quieter than
    predicted, no input was measured on sky, or the PSFs are unknown).
    """
    if not any(measured) or science.psf is None or template.psf is None:
        return None
    kernel_image = np.asarray(kernel_image, dtype=np.float64)
    ksum = float(kernel_image.sum())
    transfer1 = np.ones((1, 1)) if preconv_image is None else np.asarray(preconv_image, float)
    psfs = []
    for exposure in (science, template):
        p = exposure.require_psf().kernel_image(*exposure.bbox_center())
        p = np.asarray(p, dtype=np.float64)
        psfs.append(p / p.sum())
    correlations, statics = [], []
    for exposure, psf, scale, fooled in zip(
        (science, template), psfs, (1.0, 1.0 / ksum**2), measured, strict=True
    ):
        rho = exposure.noise_correlation
        rho = np.ones((1, 1)) if rho is None else np.asarray(rho, dtype=np.float64)
        static = scale * _static_acf(psf, rho) if fooled else np.zeros_like(rho)
        correlations.append(rho)
        statics.append(static)
    # the difference is probed through the science PSF: static structure lives at the
    # PSF's frequencies, while the inputs' high-frequency noise (white or resampled) is
    # another matter this correction must not answer for
    probe = psfs[0]
    transfers = [signal.fftconvolve(t, probe) for t in (transfer1, kernel_image)]
    weights = [_acf_weight(t, r) for t, r in zip(transfers, correlations, strict=True)]
    window = _central_box(raw.shape, _PROBE_WINDOW)
    raw, raw_sky = raw[window], raw_sky[window]
    planes = (science.variance[window], template.variance[window])
    finite = np.isfinite(raw)
    filtered = signal.fftconvolve(np.where(finite, raw, 0.0), probe, mode="same")
    sky = raw_sky & finite
    if np.count_nonzero(sky) < _PROBE_MIN_SKY:
        return None
    sky_means = [float(np.mean(p[sky], dtype=np.float64)) for p in planes]
    good = _probe_sky(sky, probe, _correlation_area(transfers, correlations, sky_means))
    predicted = weights[0] * planes[0][good] + weights[1] * planes[1][good]
    use = predicted > 0
    if np.count_nonzero(use) < _PROBE_MIN_SKY:
        return None
    pulls = filtered[good][use] / np.sqrt(predicted[use])
    ratio = float(order.mad_std(pulls - order.median(pulls), consume=True) ** 2)
    if not ratio < 1.0:
        return None
    means = [float(np.mean(p[good][use], dtype=np.float64)) for p in planes]
    static_unit = sum(_acf_weight(t, s) for t, s in zip(transfers, statics, strict=True))
    if not static_unit > 0:
        return None
    power = (1.0 - ratio) * (weights[0] * means[0] + weights[1] * means[1]) / static_unit
    # the corrected lag-0 variance stays at least its floor: no correction makes the
    # noise quieter than its pixel-scale differences show it is
    for v, s, floor in zip(means, statics, floors, strict=True):
        c = s.shape[0] // 2
        least = min(max(floor, 0.0), 1.0) if math.isfinite(floor) else 0.5
        if s[c, c] > 0:
            power = min(power, (1.0 - least) * v / s[c, c])
    factors, corrected, removed = [], [], []
    for v, rho, s in zip(means, correlations, statics, strict=True):
        acf = v * rho - power * s
        c = acf.shape[0] // 2
        factors.append(float(acf[c, c] / v))
        corrected.append(acf / acf[c, c])
        removed.append(float(power * s[c, c]))
    out: list[np.ndarray | None] = []
    for e, r, f, floor in zip((science, template), corrected, factors, floors, strict=True):
        white = e.noise_correlation is None and r.shape == (1, 1)
        if not white and math.isfinite(floor) and f > 0:
            # the correlation left is the noise's only if it explains the pixel-scale
            # noise (floor / f of the corrected pixels') better than white noise does
            kept = abs(second_difference_gain(r) - floor / f)
            white = abs(1.0 - floor / f) < kept
        out.append(None if white else r)
    return StaticCorrection(
        ratio, float(power), (factors[0], factors[1]), (out[0], out[1]), (removed[0], removed[1])
    )
