"""Noise decorrelation of difference and score images (algorithm.md sections 4.3 and 4.4).

Convolving one image of a pair by the matching kernel correlates the noise of the
difference. This afterburner whitens it with a Fourier filter that is 1 at zero
frequency (fluxes are preserved), propagates the variance planes, and attaches the
PSF of the corrected image (decision 3). With ``spatially_varying`` the filter is
computed on a grid of nodes from the local kernel and local variances and the
filtered images are blended with bilinear (tent) weights (decision 4).

Operator convention
-------------------
alsub's "convolution" is a correlation (algorithm.md 0.2):
``out(X, Y) = sum_{u,v} K(u, v) in(X + u, Y + v)``, as `core.convolve` applies
kernels. A kernel stamp is embedded "centre at origin" (its middle pixel at FFT
index 0) and ``K^ = FFT(embedded stamp)``. Correlating with K then multiplies
the image spectrum by ``conj(K^)``, not by ``K^`` as a true convolution would.
The whitening filter ``phi`` depends only on ``|K^|^2`` (and ``|P^|^2``), so it
is real, even and the same under either convention; its image-space kernel is
point symmetric. Where the orientation matters (the per-input transfer functions
``c1``, ``c2`` used for complete variance propagation) this module uses the
correlation form: the score's science part is ``conj(P^) phi S^`` and the matched
template part ``conj(K^) phi T^``; Rubin writes ``c2 = K^ phi``, which differs by
this conjugate and has the same ``|c2|^2`` (so the default variance is identical).

Forms
-----
* difference: ``phi = sqrt((v + vt ksum^2) / (v + vt |K^|^2))``, ``c1 = phi``,
  ``c2 = conj(K^) phi``. The corrected PSF is the difference PSF convolved with
  the image-space kernel of ``phi``.
* score (``preconv_mode``): ``phi = (v + vt ksum^2) / (v + vt |K^|^2 / |P^|^2)``
  (no square root), ``c1 = conj(P^) phi``, ``c2 = conj(K^) phi``. The score is
  then the matched-filter output of a whitened difference whose PSF is the input
  PSF filtered by ``sqrt(phi)``; that PSF is what is attached to the score, so a
  point source of flux F has score peak ``F sum(P_D^2)`` and
  ``score / sqrt(variance)`` is its detection S/N.

Here (v, vt) are the clipped-mean variances of the unconvolved and convolved
input (science and template when the template was matched, swapped otherwise).
In convolveScience mode the difference arrives divided by the kernel sum
(decision 2), ``D = (K * S + b - T) / ksum``; its whitened noise is
``(v + vt ksum^2) / ksum^2`` with v = template and vt = science variance, which is
exactly section 4.3.8's extra division of the variance by ``ksum^2``.

Implementation
--------------
* Filters are computed on a small (L, L) frequency grid, from the fast size >= 2 k + 1
  for the widest stamp k (matching or preconvolution kernel) up, until L >= 4 h (at
  most 4 k + 1), and applied as finite, centred image-space stamps cut to their real
  extent: the smallest half-width h outside which the stamp's absolute values sum to
  at most 1e-7 of its total (`_TAIL_FRACTION`), the cut stamp rescaled to the full
  stamp's sum (unit flux for phi, the variance weight for c^2). A filtered pixel then
  differs from the uncut filter's by at most ~2e-7 of the largest |value| within its
  reach. h follows the filter, not the kernels: about 20 px for the 4-px FWHM
  "varying" pair, where k is 21 (auto) or 71 (preconvolve). Images are zero padded
  by at least h before the FFT, so filtering is linear convolution without wrap-around.
* Image filtering uses float32 FFTs (noise-dominated differences); filters, weights
  and statistics are computed in float64.
* Spatially varying: nodes evenly spaced at most ``grid_step`` apart, corners
  included. Each node's filter uses the kernel at the node and the clipped-mean
  variances of the pixels nearest to it; the filtered node support (two spacings
  per axis, plus the widest node's h) is weighted by the node's bilinear tent. Tents sum to
  1, so a constant kernel with constant variances gives the uniform result, and
  the blend (image, variance and PSF) is continuous: no cell edges.
* Whole-frame mean variances use a regular sub-grid of at most 2**21 pixels.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import fft as sfft
from scipy.signal import fftconvolve

from . import order
from .config import DecorrelationConfig
from .convolve import correlate_image
from .errors import IncompatibleInputsError, InvalidExposureError
from .exposure import Exposure
from .parallel import frame_array, frame_zeros, n_threads, thread_map
from .psf import DrawnOncePsf, Psf

__all__ = [
    "decorrelate_difference",
    "decorrelation_filter",
    "decorrelation_filters",
    "DecorrelationFilters",
    "DecorrelatedPsf",
    "clipped_mean",
    "filter_kernel_image",
    "node_positions",
    "noise_power",
]

log = logging.getLogger(__name__)

#: 0.741301109252802 * IQR is the sigma of a Gaussian (afw Statistics, section 0.4).
_IQR_TO_SIGMA = 0.741301109252802
#: Floor of |P^|^2 in the score filter: 1000 x the smallest positive normal double.
_PSF_POWER_FLOOR = 1000.0 * np.finfo(np.float64).tiny
#: Floor of a measured noise power spectrum (relative to its mean, 1): where resampling
#: left almost no noise power, the filter must not amplify by more than ~1/sqrt(floor)
_NOISE_POWER_FLOOR = 0.05
#: Ratio vt / v above which the correction diverges (section 4.3 step 4).
_DIVERGING_RATIO = 1e8
_FFT_WORKERS = 2
#: Largest side (px) filtered by one padded FFT; larger frames go through threaded tiles.
_WHOLE_FFT_MAX = 1024
#: Pixels used for a whole-frame mean variance (a regular sub-grid beyond this): a
#: clipped mean of 262k values of a smooth plane is good to ~1e-4, and the filter
#: depends on it weakly (2M cost 0.1 s per plane at 2048^2, 2/3 of the decorrelation)
_STATS_MAX_PIXELS = 1 << 18
#: A filter's image-space stamps are cut to the smallest centred box outside which their
#: absolute values sum to at most this fraction of the whole stamp's, then rescaled to
#: their full sums: a filtered pixel then moves by at most ~2e-7 of the largest |value|
#: within the filter's reach (float32 rounding is 6e-8)
_TAIL_FRACTION = 1e-7
#: The same for a node's local mean variances (a smooth plane's mean over 16k pixels is
#: good to ~1e-3 and the filter depends on it weakly; 2 x 289 windows of 65k at 4k / 256)
_NODE_STATS_MAX_PIXELS = 1 << 14


# ----------------------------------------------------------------------------------------
# statistics
def clipped_mean(
    values: np.ndarray,
    good: np.ndarray | None = None,
    n_sigma: float = 3.0,
    n_iter: int = 3,
    max_pixels: int | None = None,
) -> float:
    """Clipped mean as afw ``MEANCLIP`` (algorithm.md section 0.4).

    Parameters
    ----------
    values : `numpy.ndarray`
        Pixel values, any shape.
    good : `numpy.ndarray` of bool or None
        Pixels to use (unmasked); non-finite values are always ignored.
    n_sigma : float
        Clipping half-width in sigmas.
    n_iter : int
        Clipping passes. The first is centred on the median with sigma
        ``0.7413 x IQR``; later ones on the previous clipped mean with its
        unbiased standard deviation.
    max_pixels : int or None
        If set and a 2-D array has more pixels, use a regular sub-grid of about
        this many pixels (every s-th row and column): the mean of a smooth
        variance plane does not need all 16 million pixels of a 4k frame.

    Returns
    -------
    mean : float
        NaN when no pixel is usable.
    """
    x = np.asarray(values)
    if max_pixels is not None and x.ndim == 2:
        grid = _sub_grid(x.shape, max_pixels)
        x = x[grid]
        good = None if good is None else np.asarray(good)[grid]
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    keep = np.isfinite(x) if good is None else (np.asarray(good, dtype=bool) & np.isfinite(x))
    x = x[keep]
    if x.size == 0:
        return math.nan
    q25, centre, q75 = order.percentiles(x, [25.0, 50.0, 75.0])  # numpy's, faster
    centre = float(centre)
    half_width = n_sigma * _IQR_TO_SIGMA * float(q75 - q25)
    x = x.astype(np.float64, copy=False)
    for _ in range(n_iter):
        kept = x[np.abs(x - centre) <= half_width]
        if kept.size == 0:
            # a constant plane can lose its pixels to rounding of the mean; stop there
            break
        # the kept pixels compressed: contiguous (pairwise) sums, faster than where= masks
        centre = float(kept.mean())
        spread = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
        half_width = n_sigma * spread
    return float(centre)


def _sub_grid(shape: tuple[int, ...], max_pixels: int) -> tuple[slice, slice]:
    """Every s-th row and column: about ``max_pixels`` of a larger 2-d array (all of a
    smaller one)."""
    size = math.prod(shape)
    stride = math.ceil(math.sqrt(size / max_pixels)) if size > max_pixels else 1
    return np.s_[::stride, ::stride]


# ----------------------------------------------------------------------------------------
# filters
def _embed(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Place a stamp with its middle pixel (index n//2) at FFT index 0, wrapping the rest."""
    ky, kx = stamp.shape
    if ky > shape[0] or kx > shape[1]:
        raise ValueError(f"stamp {stamp.shape} does not fit in FFT shape {shape}")
    out = np.zeros(shape, dtype=np.float64)
    rows = (np.arange(ky) - ky // 2) % shape[0]
    cols = (np.arange(kx) - kx // 2) % shape[1]
    out[np.ix_(rows, cols)] = stamp
    return out


#: Transforms of fewer points than this run on the calling thread: a filter's grid (at
#: most a few hundred px a side) costs less than the threads' start-up.
_SMALL_FFT_POINTS = 1 << 18


def _spectrum(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    padded = _embed(np.asarray(stamp, dtype=np.float64), shape)
    workers = 1 if padded.size < _SMALL_FFT_POINTS else min(_FFT_WORKERS, n_threads())
    return sfft.rfft2(padded, workers=workers)


def _rfft_mean(power: np.ndarray, shape: tuple[int, int]) -> float:
    """Mean over the full frequency plane of a Hermitian-symmetric quantity given on the
    rfft half plane (columns other than 0 and Nyquist stand for two frequencies)."""
    column_sums = power.sum(axis=0)
    total = 2.0 * column_sums.sum() - column_sums[0]
    if shape[1] % 2 == 0:
        total -= column_sums[-1]
    return float(total / (shape[0] * shape[1]))


@dataclass
class DecorrelationFilters:
    """Whitening filter and per-input transfer functions on one rfft grid.

    Attributes
    ----------
    shape : (int, int)
        Real-space FFT shape; arrays below have shape (shape[0], shape[1] // 2 + 1).
    phi : `numpy.ndarray`, float64
        Filter applied to the difference (or score) spectrum; ``phi[0, 0] == 1``.
    kernel_hat : `numpy.ndarray`, complex128
        Spectrum of the centre-at-origin matching kernel.
    preconv_hat : `numpy.ndarray`, complex128, or None
        Spectrum of the preconvolution kernel (score form only).
    w1, w2 : float
        Mean of ``|c1|^2`` and ``|c2|^2`` over frequency, the variance weights.
    score_form : bool
        True for the score (preconvolution) form.
    """

    shape: tuple[int, int]
    phi: np.ndarray
    kernel_hat: np.ndarray
    preconv_hat: np.ndarray | None
    w1: float
    w2: float

    @property
    def score_form(self) -> bool:
        return self.preconv_hat is not None

    @property
    def c1(self) -> np.ndarray:
        """Transfer function from the unconvolved input to the output (correlation form)."""
        return self.phi if self.preconv_hat is None else np.conj(self.preconv_hat) * self.phi

    @property
    def c2(self) -> np.ndarray:
        """Transfer function from the convolved input to the output (correlation form)."""
        return np.conj(self.kernel_hat) * self.phi

    @property
    def psf_filter(self) -> np.ndarray:
        """Filter from the input PSF to the attached PSF: phi, or sqrt(phi) for the score."""
        return np.sqrt(self.phi) if self.score_form else self.phi


def noise_power(noise_correlation: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | float:
    """Power spectrum shape of noise with normalised autocorrelation ``noise_correlation``.

    Its mean over frequency is 1 (the autocorrelation is 1 at lag 0), so a variance
    times it is the noise power spectrum; 1.0 (white) when None. Measured
    autocorrelations can give slightly negative powers: they are set to 0.
    """
    if noise_correlation is None:
        return 1.0
    return np.maximum(_spectrum(noise_correlation, shape).real, 0.0)


def _at_zero(power: np.ndarray | float) -> float:
    return float(power[0, 0]) if isinstance(power, np.ndarray) else float(power)


def decorrelation_filters(
    kernel_image: np.ndarray,
    v_unconvolved: float,
    v_convolved: float,
    shape: tuple[int, int],
    preconv_image: np.ndarray | None = None,
    correlations: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> DecorrelationFilters:
    """Decorrelation filter and variance weights (algorithm.md section 4.3 step 6).

    Parameters
    ----------
    kernel_image : `numpy.ndarray` (k, k)
        Matching kernel stamp, not normalised (its sum is the flux ratio).
    v_unconvolved, v_convolved : float
        Mean variance of the image that was not convolved and of the one that was.
    shape : (int, int)
        Real-space FFT shape, at least the stamp sizes.
    preconv_image : `numpy.ndarray` or None
        Preconvolution kernel (unit sum) for the score form; None for the
        difference form.
    correlations : (array or None, array or None)
        Noise autocorrelations of the unconvolved and the convolved input
        (`Exposure.noise_correlation`); None is white. Correlated inputs (resampled
        or coadded images) replace ``v`` and ``vt`` by their power spectra
        ``v C1(f)`` and ``vt C2(f)`` in the filter and the variance weights, so the
        output is white and its variance honest whatever the input correlation.

    Returns
    -------
    filters : `DecorrelationFilters`
    """
    v, vt = float(v_unconvolved), float(v_convolved)
    shape = (int(shape[0]), int(shape[1]))
    kernel_hat = _spectrum(kernel_image, shape)
    kernel_sum = float(np.sum(kernel_image, dtype=np.float64))
    kernel_power = kernel_hat.real**2 + kernel_hat.imag**2
    power1 = noise_power(correlations[0], shape)
    power2 = noise_power(correlations[1], shape)
    # phi is 1 at zero frequency (fluxes kept): the output noise is white at the level
    # of the inputs' zero-frequency power, v + vt ksum^2 for white inputs
    numerator = v * _at_zero(power1) + vt * kernel_sum**2 * _at_zero(power2)
    # the filter sees a floored power (it must not amplify frequencies resampling left
    # almost empty); the variance weights below use the true power
    floor1 = np.maximum(power1, _NOISE_POWER_FLOOR)
    floor2 = np.maximum(power2, _NOISE_POWER_FLOOR)
    preconv_hat = None
    if preconv_image is None:
        phi = np.sqrt(numerator / (v * floor1 + vt * kernel_power * floor2))
        phi2 = phi * phi
        w1 = _rfft_mean(phi2 * power1, shape)
    else:
        preconv_hat = _spectrum(preconv_image, shape)
        preconv_power = np.maximum(preconv_hat.real**2 + preconv_hat.imag**2, _PSF_POWER_FLOOR)
        phi = numerator / (v * floor1 + vt * kernel_power * floor2 / preconv_power)
        phi2 = phi * phi
        w1 = _rfft_mean(preconv_power * phi2 * power1, shape)
    w2 = _rfft_mean(kernel_power * phi2 * power2, shape)
    return DecorrelationFilters(
        shape=shape, phi=phi, kernel_hat=kernel_hat, preconv_hat=preconv_hat, w1=w1, w2=w2
    )


def decorrelation_filter(
    kernel_image: np.ndarray,
    v_unconvolved: float,
    v_convolved: float,
    shape: tuple[int, int],
    preconv_image: np.ndarray | None = None,
) -> np.ndarray:
    """The filter ``phi`` alone on the rfft half plane; see `decorrelation_filters`.

    Returns
    -------
    phi : `numpy.ndarray` (shape[0], shape[1] // 2 + 1), float64
        Real filter, 1 at zero frequency (index [0, 0]).
    """
    return decorrelation_filters(kernel_image, v_unconvolved, v_convolved, shape, preconv_image).phi


def filter_kernel_image(filter_rfft: np.ndarray, size: int) -> np.ndarray:
    """Image-space kernel of a filter sampled on a (size, size) rfft grid.

    Parameters
    ----------
    filter_rfft : `numpy.ndarray` (size, size // 2 + 1)
        Half plane of a Hermitian spectrum (a real kernel); real and even for ``phi``.
    size : int
        Odd stamp width.

    Returns
    -------
    stamp : `numpy.ndarray` (size, size), float64
        Centred on its middle pixel; sums to the filter's zero-frequency value.
    """
    return sfft.fftshift(sfft.irfft2(filter_rfft, s=(size, size)))


def node_positions(length: int, step: int) -> np.ndarray:
    """Evenly spaced node positions (array indices) spanning 0..length-1, spacing <= step."""
    if length <= 1:
        return np.zeros(1)
    n_intervals = max(1, math.ceil((length - 1) / step))
    return np.linspace(0.0, length - 1.0, n_intervals + 1)


def _tent(positions: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """(n_positions, n_nodes) bilinear weights of evenly spaced nodes (positions in range)."""
    if nodes.size == 1:
        return np.ones((positions.size, 1))
    spacing = nodes[1] - nodes[0]
    return np.clip(1.0 - np.abs(positions[:, None] - nodes[None, :]) / spacing, 0.0, None)


def _tent_matrix(length: int, nodes: np.ndarray) -> np.ndarray:
    """(length, n_nodes) bilinear interpolation weights; every row sums to 1."""
    return _tent(np.arange(length, dtype=np.float64), nodes)


def _interp_stamps(stamps: np.ndarray, nodes_x, nodes_y, x: float, y: float) -> np.ndarray:
    """Bilinear blend of per-node stamps (ny_nodes, nx_nodes, L, L) at parent (x, y)."""

    def weights(nodes, p):
        return _tent(np.array([min(max(p, nodes[0]), nodes[-1])]), nodes)[0]

    wy, wx = weights(nodes_y, y), weights(nodes_x, x)
    # at most 2 x 2 nodes have weight: the blend reads those stamps, not the whole grid
    jy, ix = np.flatnonzero(wy), np.flatnonzero(wx)
    return np.einsum("j,i,jikl->kl", wy[jy], wx[ix], stamps[jy[:, None], ix[None, :]])


# ----------------------------------------------------------------------------------------
# corrected PSF
class DecorrelatedPsf(DrawnOncePsf):
    """PSF of a decorrelated image: an input PSF convolved with the decorrelation kernel.

    Parameters
    ----------
    base : `core.psf.Psf`
        PSF of the image before decorrelation.
    filter_stamps : `numpy.ndarray` (ny_nodes, nx_nodes, L, L)
        Image-space decorrelation kernels (odd L, point symmetric, unit sum) at
        the nodes; one node for a uniform decorrelation.
    nodes_x, nodes_y : `numpy.ndarray`
        Parent positions of the node columns and rows (evenly spaced).
    extra_size : int
        Growth of the stamp width over the base PSF stamp (even).
    """

    def __init__(
        self,
        base: Psf,
        filter_stamps: np.ndarray,
        nodes_x: np.ndarray,
        nodes_y: np.ndarray,
        extra_size: int,
    ):
        self.base = base
        self.filter_stamps = np.asarray(filter_stamps, dtype=np.float64)
        self.nodes_x = np.asarray(nodes_x, dtype=np.float64)
        self.nodes_y = np.asarray(nodes_y, dtype=np.float64)
        self.extra_size = int(extra_size) // 2 * 2
        self.average_position = base.average_position

    def with_base(self, base: Psf) -> DecorrelatedPsf:
        """``base`` seen through the same decorrelation filter."""
        filters = (self.filter_stamps, self.nodes_x, self.nodes_y)
        return DecorrelatedPsf(base, *filters, self.extra_size)

    def _draw(self, x: float | None, y: float | None) -> np.ndarray:
        if x is None or y is None:
            if self.average_position is not None:
                x, y = self.average_position
            else:
                x, y = float(np.mean(self.nodes_x)), float(np.mean(self.nodes_y))
        base = self.base.kernel_image(x, y)
        filt = _interp_stamps(self.filter_stamps, self.nodes_x, self.nodes_y, x, y)
        full = fftconvolve(base, filt, mode="full")
        size = base.shape[0] + self.extra_size
        # a filter cut to its extent can be narrower than the growth: zeros beyond it
        full = np.pad(full, max(0, (size - full.shape[0]) // 2))
        start = (full.shape[0] - size) // 2
        stamp = full[start : start + size, start : start + size]
        return stamp / stamp.sum()

    def __repr__(self) -> str:
        return f"DecorrelatedPsf(base={self.base!r}, nodes={self.filter_stamps.shape[:2]})"


# ----------------------------------------------------------------------------------------
# applying filters
@dataclass
class _NodeFilter:
    """Image-space kernels of one node's filters on a (L, L) grid, centred on pixel L // 2."""

    image: np.ndarray  # kernel of phi (point symmetric, unit sum)
    psf: np.ndarray  # kernel of the PSF filter (unit sum)
    variance1: np.ndarray | None  # squared kernels of c1 and c2 (complete propagation)
    variance2: np.ndarray | None
    w1: float
    w2: float
    v1: float = math.nan  # the mean variances the filter was made for
    v2: float = math.nan
    grid: int = 0  # side of the frequency grid it was computed on

    @property
    def half(self) -> int:
        return self.image.shape[0] // 2

    def padded(self, half: int) -> _NodeFilter:
        """The same filter with its stamps zero padded to (2 half + 1) pixels."""

        def pad(stamp):
            return None if stamp is None else np.pad(stamp, half - stamp.shape[0] // 2)

        return replace(
            self,
            image=pad(self.image),
            psf=pad(self.psf),
            variance1=pad(self.variance1),
            variance2=pad(self.variance2),
        )


def _node_filter(
    kernel_image, v, vt, preconv_image, complete: bool, correlations=(None, None), size=None
) -> _NodeFilter:
    """A node's filter with its image-space stamps cut to their real extent h (`_extent`):
    filtering costs then follow the filter, not the kernels.

    The filter is sampled on an (L, L) grid, which folds its tails with period L; L
    starts at the smallest fast size holding twice the widest stamp k and doubles until
    L >= 4 h (the folded tails then come from >= 3 h away, far below the cut), up to
    4 k + 1, where a filter whose tails do not decay (strongly correlated inputs) keeps
    stamps as wide as they reach. ``size`` starts the search elsewhere (a neighbouring
    node's grid: one pass instead of two).
    """
    widest = max(kernel_image.shape[0], 0 if preconv_image is None else preconv_image.shape[0])
    limit = 4 * widest + 1
    size = min(size or sfft.next_fast_len(2 * widest + 1, real=True), limit)
    while True:
        filters = decorrelation_filters(
            kernel_image, v, vt, (size, size), preconv_image, correlations
        )
        stamps = [filter_kernel_image(filters.phi, size)]
        stamps.append(filter_kernel_image(filters.psf_filter, size))
        if complete:
            stamps += [filter_kernel_image(c, size) ** 2 for c in (filters.c1, filters.c2)]
        half = max(_extent(stamp, _TAIL_FRACTION) for stamp in stamps)
        if 4 * half <= size or size >= limit:
            break
        size = min(sfft.next_fast_len(2 * size, real=True), limit)
    stamps = [_crop(stamp, half) for stamp in stamps]
    return _NodeFilter(
        image=stamps[0],
        psf=stamps[1],
        variance1=stamps[2] if complete else None,
        variance2=stamps[3] if complete else None,
        w1=filters.w1,
        w2=filters.w2,
        v1=float(v),
        v2=float(vt),
        grid=size,
    )


def _extent(stamp: np.ndarray, fraction: float) -> int:
    """Smallest half-width h such that the values outside the centred (2h + 1) box of a
    square stamp sum, in absolute value, to at most ``fraction`` of the stamp's."""
    centre = stamp.shape[0] // 2
    offsets = np.abs(np.arange(stamp.shape[0]) - centre)
    ring = np.maximum(offsets[:, None], offsets[None, :])  # box half-width holding a pixel
    weight = np.abs(stamp)
    inside = np.cumsum(np.bincount(ring.ravel(), weights=weight.ravel()))
    outside = inside[-1] - inside
    return int(np.argmax(outside <= fraction * inside[-1]))


def _crop(stamp: np.ndarray, half: int) -> np.ndarray:
    """The centred (2 half + 1) box of a stamp, rescaled to the stamp's sum (the filter's
    zero-frequency value: unit flux for phi, the variance weight for c^2)."""
    centre = stamp.shape[0] // 2
    box = stamp[centre - half : centre + half + 1, centre - half : centre + half + 1]
    return box * (stamp.sum() / box.sum())


def _kernel_at(kernel, x: float, y: float) -> np.ndarray:
    if isinstance(kernel, np.ndarray):
        return kernel.astype(np.float64)
    return np.asarray(kernel.image(x, y), dtype=np.float64)


def _on_bbox(exposure: Exposure, bbox, what: str) -> Exposure:
    if exposure.bbox == bbox:
        return exposure
    try:
        return exposure.cutout(bbox)
    except InvalidExposureError as exc:
        raise IncompatibleInputsError(
            f"{what} does not cover the difference box {bbox}: {exc.message}"
        ) from exc


def _fill_unusable(
    image: np.ndarray, mask: np.ndarray | None = None, bits: int = 0, in_place: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Float32 image for the filter with NaN/inf pixels, and those with any of ``bits``
    set in ``mask``, at the mean of the rest (section 4.3 step 7); the flat indices of
    those pixels and their values, to restore (None, None when there are none). In
    threaded bands of rows, and in ``image`` itself when ``in_place`` (a consumed
    difference): a frame-sized copy, boolean image and gather each cost a decorrelation
    as much as its filter (4096 auto pair: 0.12 -> 0.27 s)."""
    data = np.asarray(image, dtype=np.float32)
    ny, nx = data.shape
    rows = max(1, -(-ny // (4 * n_threads())))

    def band(start: int) -> tuple[np.ndarray, float, int]:
        part = slice(start, min(start + rows, ny))
        block = data[part]
        bad = ~np.isfinite(block)
        if bits and mask is not None:
            bad |= (mask[part] & bits) != 0
        where = np.flatnonzero(bad)
        total = float(np.sum(block, where=~bad, dtype=np.float64))
        return where + start * nx, total, bad.size - where.size

    parts = thread_map(band, range(0, ny, rows))
    where = np.concatenate([p[0] for p in parts])
    if where.size == 0:
        return data, None, None
    count = sum(p[2] for p in parts)
    fill = sum(p[1] for p in parts) / count if count else 0.0
    flat = data.reshape(-1)
    values = flat[where]  # (a copy: fancy indexing)
    writable = in_place and data is image and data.flags.c_contiguous and data.flags.writeable
    out = data if writable else data.copy()
    out.reshape(-1)[where] = np.float32(fill)
    return out, where, values


#: Mask planes whose pixels hold no difference for the filter to spread: the
#: convolution's edge band (the science minus the unconvolved template), no data, and
#: what the detector clipped, lost or was hit by. Rubin's edge band is NaN and its
#: saturated and cosmic-ray pixels are interpolated before subtraction; here, held at
#: their values, a template 1000x the science's scale put +43000 (noise 35) into the
#: pixels beside the edge band, a saturated block -2751 beside it: false DIA sources.
#: (A difference's mean is ~0, as its pixels beside them are: no step to ring.)
_FILTER_UNUSABLE = ("EDGE", "NO_DATA", "SAT", "BAD", "CR")


def _mean_variance(exposure: Exposure, ignore) -> float:
    """Clipped mean of the variance plane on unmasked pixels of a regular sub-grid
    (`_STATS_MAX_PIXELS`); the mask is read only on that sub-grid."""
    grid = _sub_grid(exposure.shape, _STATS_MAX_PIXELS)
    variance, mask = exposure.variance[grid], exposure.mask[grid]
    good = (mask & np.int32(exposure.bitmask(ignore))) == 0
    return clipped_mean(variance, good)


def _weighted_sum(a: np.ndarray, wa, b: np.ndarray, wb, out=None) -> np.ndarray:
    """a * wa + b * wb into one output array (each product rounded as numpy would); a
    new one is a frame on huge pages (`frame_array`)."""
    if out is None:
        out = frame_array(a.shape, np.result_type(a, wa))
    np.multiply(a, wa, out=out)
    step = max(1, (1 << 20) // max(out.shape[-1], 1))
    for y in range(0, out.shape[0], step):
        out[y : y + step] += b[y : y + step] * wb
    return out


def _reusable(plane: np.ndarray, *inputs: np.ndarray) -> np.ndarray | None:
    """``plane`` if it can take an output computed from ``inputs``, else None."""
    if plane.dtype != np.float32 or not (plane.flags.writeable and plane.flags.c_contiguous):
        return None
    if any(np.shares_memory(plane, other) for other in inputs):
        return None
    return plane


def _fft_shape(data_shape, margin: int) -> tuple[int, int]:
    """FFT shape leaving ``margin`` zeros after the data, so the filter tails do not wrap,
    and holding a (2 margin + 1) stamp."""
    return (
        sfft.next_fast_len(max(data_shape[0] + margin, 2 * margin + 1), real=True),
        sfft.next_fast_len(max(data_shape[1] + margin, 2 * margin + 1), real=True),
    )


def _convolve(
    data: Sequence[np.ndarray],
    stamps: Sequence[np.ndarray],
    shape: tuple[int, int],
    workers: int = _FFT_WORKERS,
) -> np.ndarray:
    """Zero-padded linear convolution by centred stamps, summed: sum_i data_i (*) stamp_i.

    ``data`` and ``stamps`` are sequences of equal length (one forward FFT per pair).
    Float32 FFTs: the filtered images are noise-dominated differences, where single
    precision (1e-7 relative) is far below the noise. Frames larger than
    `_WHOLE_FFT_MAX` go through `core.convolve.correlate_image` (overlap-save tiles
    on a thread pool, the same sum) instead of one padded whole-frame transform.
    """
    if max(data[0].shape) > _WHOLE_FFT_MAX:
        out = None
        for image, stamp in zip(data, stamps, strict=True):
            # convolution by a centred stamp = correlation with the stamp reflected
            term = correlate_image(
                np.asarray(image, dtype=np.float32), stamp[::-1, ::-1], single=True
            )
            out = term if out is None else np.add(out, term, out=out)
        assert out is not None
        return out
    spec = None
    workers = min(workers, n_threads())  # within this process's thread cap, if any
    for image, stamp in zip(data, stamps, strict=True):
        transfer = sfft.rfft2(_embed(stamp, shape).astype(np.float32), workers=workers)
        term = sfft.rfft2(image, s=shape, workers=workers) * transfer
        spec = term if spec is None else spec + term
    ny, nx = data[0].shape
    return sfft.irfft2(spec, s=shape, workers=workers)[:ny, :nx]


def _complete_variance(
    plane1, plane2, v1, v2, node: _NodeFilter, shape, workers: int = _FFT_WORKERS
) -> np.ndarray:
    """V1 (*) c1^2 + V2 (*) c2^2, non-finite V replaced by the mean variance (4.3 step 8)."""
    filled1 = np.where(np.isfinite(plane1), plane1, np.float32(v1)).astype(np.float32, copy=False)
    filled2 = np.where(np.isfinite(plane2), plane2, np.float32(v2)).astype(np.float32, copy=False)
    # the node filter carries the squared kernels whenever complete propagation is on
    assert node.variance1 is not None and node.variance2 is not None
    return _convolve((filled1, filled2), (node.variance1, node.variance2), shape, workers)


# ----------------------------------------------------------------------------------------
# entry point
def decorrelate_difference(
    difference: Exposure,
    science: Exposure,
    template: Exposure,
    kernel,
    *,
    template_matched: bool = True,
    preconv_mode: bool = False,
    preconv_kernel: np.ndarray | None = None,
    spatially_varying: bool | None = None,
    config: DecorrelationConfig | None = None,
    task=None,
    kernel_sum_norm: float | None = None,
    consume: bool = False,
) -> Exposure:
    """Whiten the noise of a difference or score exposure (algorithm.md 4.2-4.4).

    Parameters
    ----------
    difference : `core.exposure.Exposure`
        Difference (``S - K * T``, or ``(K * S - T) / ksum`` when the science was
        convolved) or score exposure; not modified.
    science, template : `core.exposure.Exposure`
        The inputs (unconvolved, unpreconvolved); cut to the difference box if larger.
    kernel : object with ``image(x, y) -> (k, k) array`` (parent coordinates), or an array
        The matching kernel as applied (correlation semantics, not normalised).
    template_matched : bool
        True when the template was convolved (convolveTemplate, preconvolve).
    preconv_mode : bool
        Score form (the science was correlated with ``preconv_kernel``).
    preconv_kernel : `numpy.ndarray` or None
        Preconvolution kernel as applied; default the science PSF at its average
        position. Only allowed with ``template_matched`` and ``preconv_mode``.
    spatially_varying : bool or None
        Decorrelate on a grid of nodes ``config.grid_step`` apart and blend (decision 4);
        None takes ``config.spatially_varying``.
    config : `core.config.DecorrelationConfig` or None
    task : `core.task.Task` or None
        If given, the variances and kernel sum used are written to its metadata.
    kernel_sum_norm : float or None
        Factor the difference was divided by in convolveScience mode (decision 2);
        default the kernel sum at the difference's bbox centre.
    consume : bool
        The caller discards ``difference`` afterwards: the result takes over its mask
        array instead of a copy, and may write its variance into the difference's
        variance array (frame-sized savings); ``difference`` is then not to be used.

    Returns
    -------
    corrected : `core.exposure.Exposure`
        New exposure: decorrelated image and variance (float32), the input mask,
        and the corrected PSF (`DecorrelatedPsf`, see the module docstring).

    Raises
    ------
    ValueError
        If ``preconv_kernel`` is given without ``template_matched`` and ``preconv_mode``.
    IncompatibleInputsError
        If the science or template does not cover the difference.
    """
    if preconv_kernel is not None and not (template_matched and preconv_mode):
        raise ValueError(
            "Pre-convolution kernel is allowed only if preconv_mode==True and "
            "template_matched==True."
        )
    config = config or DecorrelationConfig()
    if spatially_varying is None:
        spatially_varying = config.spatially_varying
    science = _on_bbox(science, difference.bbox, "science")
    template = _on_bbox(template, difference.bbox, "template")
    x0, y0 = difference.xy0
    ny, nx = difference.shape
    # (begin + end) / 2 with an exclusive end, as section 4.3 step 1
    xc, yc = x0 + nx / 2.0, y0 + ny / 2.0
    kernel_image = _kernel_at(kernel, xc, yc)

    preconv_image = None
    if preconv_mode:
        if preconv_kernel is None:
            if science.psf is None:
                raise ValueError("score decorrelation needs the science PSF or a preconv_kernel")
            pos = science.psf.average_position or science.bbox_center()
            preconv_kernel = science.psf.kernel_image(*pos)
        preconv_image = np.asarray(preconv_kernel, dtype=np.float64)
        preconv_image = preconv_image / preconv_image.sum()

    ignore = config.ignore_mask_planes
    # independent sub-grid statistics of the two planes: one per core
    var_science, var_template = thread_map(
        lambda exposure: _mean_variance(exposure, ignore), (science, template)
    )
    if not (math.isfinite(var_science) and math.isfinite(var_template)):
        log.warning(
            "decorrelation skipped: mean variance is not finite (science %s, template %s)",
            var_science,
            var_template,
        )
        return difference.copy()

    if template_matched:
        v, vt = var_science, var_template
        correlations = (science.noise_correlation, template.noise_correlation)
        plane1, plane2 = science.variance, template.variance
        exposure1, exposure2 = science, template
        scale = 1.0
        base_psf = difference.psf or science.psf
    else:
        v, vt = var_template, var_science
        correlations = (template.noise_correlation, science.noise_correlation)
        plane1, plane2 = template.variance, science.variance
        exposure1, exposure2 = template, science
        if kernel_sum_norm is None:
            kernel_sum_norm = float(_kernel_at(kernel, *difference.bbox_center()).sum())
        scale = 1.0 / kernel_sum_norm**2
        base_psf = difference.psf or template.psf
    if v > 0 and vt / v > _DIVERGING_RATIO:
        log.warning("Diverging correction: convolved/unconvolved variance ratio %g", vt / v)

    complete = config.complete_var_plane_propagation
    # a score's band and bad pixels were filled smoothly before it was made (a constant
    # there rings along the band): only a difference's are its raw values
    bits = 0
    if not preconv_mode:
        bits = difference.bitmask([p for p in _FILTER_UNUSABLE if p in difference.mask_planes])
    image, unusable, held = _fill_unusable(difference.image, difference.mask, bits, consume)
    # a consumed difference's own variance plane is reused (no fresh frame); a deferred
    # one is not made for that
    reuse = consume and not difference.variance_deferred

    if not spatially_varying:
        node = _node_filter(kernel_image, v, vt, preconv_image, complete, correlations)
        shape = _fft_shape(image.shape, node.half)
        corrected = _convolve((image,), (node.image,), shape)
        if complete:
            variance = _complete_variance(plane1, plane2, v, vt, node, shape)
        else:
            variance = _weighted_sum(
                plane1,
                np.float32(node.w1),
                plane2,
                np.float32(node.w2),
                out=_reusable(difference.variance, plane1, plane2) if reuse else None,
            )
        psf_stamps = node.psf[None, None]
        nodes_x, nodes_y = np.array([xc]), np.array([yc])
    else:
        corrected, variance, psf_stamps, nodes_x, nodes_y = _decorrelate_on_grid(
            image,
            (plane1, plane2),
            (
                (exposure1.mask, exposure1.bitmask(ignore)),
                (exposure2.mask, exposure2.bitmask(ignore)),
            ),
            (v, vt),
            kernel,
            (x0, y0),
            preconv_image,
            config.grid_step,
            complete,
            correlations,
            variance_out=_reusable(difference.variance, plane1, plane2) if reuse else None,
        )

    if complete:
        # restore non-finite input variances (section 4.3 step 8)
        nonfinite = ~(np.isfinite(plane1) & np.isfinite(plane2))
        variance[nonfinite] = plane1[nonfinite] + plane2[nonfinite]
    corrected = np.ascontiguousarray(corrected, dtype=np.float32)
    if unusable is not None:
        corrected.reshape(-1)[unusable] = held
    variance = np.ascontiguousarray(variance, dtype=np.float32)
    if scale != 1.0:
        variance *= np.float32(scale)

    result = replace(
        difference,
        image=corrected,
        variance=variance,
        # it still read "the sum of the two matched inputs' variances": a decorrelated
        # coadd pair's pixels scatter 3.7x what that sum says (alsub info shows it)
        variance_source="propagated through the decorrelation: the matched inputs' "
        "variances weighted by its filter (white noise: per pixel above their sum where "
        "the inputs' noise was correlated)",
        # a consumed difference gives up its mask: no frame-sized copy
        mask=difference.mask if consume else difference.mask.copy(),
        mask_planes=difference.mask_planes.copy(),
        metadata=copy.deepcopy(difference.metadata),
    )
    if base_psf is not None:
        result.psf = DecorrelatedPsf(
            base_psf, psf_stamps, nodes_x, nodes_y, extra_size=2 * (kernel_image.shape[0] // 2)
        )
    if task is not None:
        md = task.metadata
        md["decorrelationVarianceScience"] = var_science
        md["decorrelationVarianceTemplate"] = var_template
        md["decorrelationKernelSum"] = float(kernel_image.sum())
        md["decorrelationSpatiallyVarying"] = spatially_varying
        md["decorrelationNodes"] = int(nodes_x.size * nodes_y.size)
    return result


def _node_windows(length: int, nodes: np.ndarray) -> list[tuple[int, int]]:
    """Per node: (start, end) of the pixels nearest to it (its local-statistics window;
    the windows tile the axis)."""
    spacing = nodes[1] - nodes[0] if nodes.size > 1 else float(length)
    nearest = np.clip(np.rint(np.arange(length) / spacing), 0, nodes.size - 1).astype(int)
    out = []
    for n in range(nodes.size):
        window = np.nonzero(nearest == n)[0]
        out.append((int(window[0]), int(window[-1]) + 1))
    return out


def _cells(length: int, nodes: np.ndarray) -> list[tuple[int, int, list[int]]]:
    """The axis cut at the nodes: (start, end, nodes whose tent is > 0 there) per cell.

    Between two neighbouring nodes only their two tents are non-zero, so a cell is
    blended from (at most) its 2 x 2 corner nodes.
    """
    if nodes.size == 1:
        return [(0, length, [0])]
    bounds = [int(math.ceil(node)) for node in nodes[:-1]] + [length]
    return [(bounds[i], bounds[i + 1], [i, i + 1]) for i in range(nodes.size - 1)]


def _decorrelate_on_grid(
    image,
    planes,
    masks,
    mean_vars,
    kernel,
    xy0,
    preconv_image,
    step,
    complete,
    correlations=(None, None),
    variance_out=None,
):
    """Decorrelation on a grid of nodes blended with tent weights (decision 4).

    Each node's filter comes from the kernel at the node and the clipped-mean variances
    of the pixels nearest to it. The blend sum_n tent_n(X) (phi_n (*) D)(X) is computed
    cell by cell (a cell lies between 2 x 2 nodes, the only ones whose tents are
    non-zero in it): one forward FFT of the cell plus a margin holding the filters' extent,
    and one inverse per corner node, each weighted by the node's bilinear tent. The
    weights sum to 1 everywhere and the blend is continuous: no cell edges.
    """
    plane1, plane2 = planes
    v_default, vt_default = mean_vars
    ny, nx = image.shape
    x0, y0 = xy0
    nodes_x = node_positions(nx, step)
    nodes_y = node_positions(ny, step)
    tent_x = _tent_matrix(nx, nodes_x).astype(np.float32)
    tent_y = _tent_matrix(ny, nodes_y).astype(np.float32)
    windows_x = _node_windows(nx, nodes_x)
    windows_y = _node_windows(ny, nodes_y)

    def node_filter(index: int, size: int | None = None) -> _NodeFilter:
        jn, i_n = divmod(index, nodes_x.size)
        window = (slice(*windows_y[jn]), slice(*windows_x[i_n]))
        grid = _sub_grid(plane1[window].shape, _NODE_STATS_MAX_PIXELS)
        # unmasked pixels of the window's sub-grid only: no frame-sized boolean per input
        v, vt = (
            clipped_mean(plane[window][grid], (mask[window][grid] & np.int32(bits)) == 0)
            for plane, (mask, bits) in zip(planes, masks, strict=True)
        )
        v = v if math.isfinite(v) else v_default
        vt = vt if math.isfinite(vt) else vt_default
        kernel_image = _kernel_at(kernel, x0 + nodes_x[i_n], y0 + nodes_y[jn])
        return _node_filter(kernel_image, v, vt, preconv_image, complete, correlations, size)

    # the central node's grid starts the others' search (neighbours' filters are alike)
    n_nodes = nodes_y.size * nodes_x.size
    grid = node_filter(n_nodes // 2).grid
    # in this thread: each node is many small numpy calls, and threads only queue for the
    # GIL between them (4096 pair, 289 nodes: 0.43 s on one thread, 0.70 s on two)
    filters = [node_filter(index, grid) for index in range(n_nodes)]
    # the cells' margin holds the widest node filter
    h = max(f.half for f in filters)
    filters = [f.padded(h) for f in filters]
    psf_stamps = np.array([f.psf for f in filters]).reshape(
        nodes_y.size, nodes_x.size, 2 * h + 1, 2 * h + 1
    )
    cells_y, cells_x = _cells(ny, nodes_y), _cells(nx, nodes_x)
    shape = (
        sfft.next_fast_len(max(c1 - c0 for c0, c1, _ in cells_y) + 2 * h, real=True),
        sfft.next_fast_len(max(c1 - c0 for c0, c1, _ in cells_x) + 2 * h, real=True),
    )
    # summed into cell by cell: zeroed frames on huge pages (`frame_zeros`)
    corrected = frame_zeros(image.shape, np.float32)
    if variance_out is None:
        variance = frame_zeros(image.shape, np.float32)
    else:
        variance = variance_out
        variance.fill(0.0)
    if complete:
        bad1, bad2 = ~np.isfinite(plane1), ~np.isfinite(plane2)
        zeroed1 = np.where(bad1, np.float32(0), plane1).astype(np.float32, copy=False)
        zeroed2 = np.where(bad2, np.float32(0), plane2).astype(np.float32, copy=False)

    def transfer(stamp: np.ndarray) -> np.ndarray:
        return sfft.rfft2(_embed(stamp, shape).astype(np.float32), workers=1)

    def node_spectrum(index: int) -> list:
        """Transfer functions of a node at the cell FFT shape."""
        node = filters[index]
        entry = [transfer(node.image)]
        if complete:
            assert node.variance1 is not None and node.variance2 is not None
            entry += [transfer(node.variance1), transfer(node.variance2)]
        return entry

    def node_spectra(jn: int) -> list:
        """Transfer functions of the nodes of row jn (threaded: 17 FFTs of a cell each)."""
        return thread_map(node_spectrum, range(jn * nodes_x.size, (jn + 1) * nodes_x.size))

    def tile_spectrum(data: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
        """rFFT of data rows r0 - h .. r1 + h - 1 (zero outside the frame) at ``shape``."""
        buffer = np.zeros(shape, dtype=np.float32)
        a0, a1 = max(r0 - h, 0), min(r1 + h, ny)
        b0, b1 = max(c0 - h, 0), min(c1 + h, nx)
        oy, ox = a0 - (r0 - h), b0 - (c0 - h)
        buffer[oy : oy + a1 - a0, ox : ox + b1 - b0] = data[a0:a1, b0:b1]
        return sfft.rfft2(buffer, workers=1)

    spectra: dict[int, list] = {}
    for r0, r1, row_nodes in cells_y:
        for jn in [j for j in spectra if j not in row_nodes]:
            del spectra[jn]  # node rows are visited in order: keep two rows of transfers
        for jn in row_nodes:
            if jn not in spectra:
                spectra[jn] = node_spectra(jn)

        def blend_cell(cell, r0=r0, r1=r1, row_nodes=row_nodes):
            c0, c1, col_nodes = cell
            core = np.s_[h : h + r1 - r0, h : h + c1 - c0]
            data = tile_spectrum(image, r0, r1, c0, c1)
            if complete:
                parts = [tile_spectrum(zeroed1, r0, r1, c0, c1)]
                parts.append(tile_spectrum(zeroed2, r0, r1, c0, c1))
                # a node fills non-finite variances with its own mean: V0 + v * indicator
                near = np.s_[max(r0 - h, 0) : r1 + h, max(c0 - h, 0) : c1 + h]
                holes = [
                    tile_spectrum(bad, r0, r1, c0, c1) if bad[near].any() else None
                    for bad in (bad1, bad2)
                ]
            image_out = corrected[r0:r1, c0:c1]  # cells do not overlap: safe across threads
            variance_out = variance[r0:r1, c0:c1]
            # the tents are separable: the corner nodes of a column share the inverse
            # transform along x (each one's along y, cut to the cell's rows and weighted
            # by its tent in y, is summed first): half the x passes, on the core rows only
            for i_n in col_nodes:
                rows_sum = None
                for jn in row_nodes:
                    part = sfft.ifft(data * spectra[jn][i_n][0], axis=0, workers=1)
                    part = part[h : h + r1 - r0]
                    part *= tent_y[r0:r1, jn, None]
                    if rows_sum is None:
                        rows_sum = part
                    else:
                        rows_sum += part
                filtered = sfft.irfft(rows_sum, n=shape[1], axis=1, workers=1)
                filtered = filtered[:, h : h + c1 - c0]
                filtered *= tent_x[None, c0:c1, i_n]
                image_out += filtered
            if complete:
                for jn in row_nodes:
                    for i_n in col_nodes:
                        weight = tent_y[r0:r1, jn, None] * tent_x[None, c0:c1, i_n]
                        node = filters[jn * nodes_x.size + i_n]
                        total = None
                        for part, hole, mean, spectrum in zip(
                            parts, holes, (node.v1, node.v2), spectra[jn][i_n][1:], strict=True
                        ):
                            filled = part if hole is None else part + np.float32(mean) * hole
                            term = filled * spectrum
                            total = term if total is None else total + term
                        variance_out += weight * sfft.irfft2(total, s=shape, workers=1)[core]
            else:
                # the blended weights of the two variance planes: sum over the corners of
                # tent_y tent_x w, one (rows, 2) x (2, 2) x (2, cols) product per plane
                rows, cols = tent_y[r0:r1][:, row_nodes], tent_x[c0:c1][:, col_nodes].T
                for plane, attribute in ((plane1, "w1"), (plane2, "w2")):
                    corners = np.array(
                        [
                            [getattr(filters[j * nodes_x.size + i], attribute) for i in col_nodes]
                            for j in row_nodes
                        ],
                        dtype=np.float32,
                    )
                    variance_out += plane[r0:r1, c0:c1] * (rows @ corners @ cols)

        thread_map(blend_cell, cells_x)
    return corrected, variance, psf_stamps, nodes_x + x0, nodes_y + y0
