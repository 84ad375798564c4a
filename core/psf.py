"""PSF models: Gaussian, image stamp and spatially varying grid of stamps.

Every PSF answers `kernel_image(x, y)`: an odd, square, unit-sum stamp of the
PSF at parent position (x, y), centred on the stamp's central pixel. Sizes
(sigma, FWHM) come from adaptive second moments, as Rubin's SdssShape does.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from .errors import PsfError

__all__ = [
    "Psf",
    "GaussianPsf",
    "MoffatPsf",
    "ImagePsf",
    "GridPsf",
    "KernelMatchedPsf",
    "DrawnOncePsf",
    "SIGMA_TO_FWHM",
    "adaptive_moments",
    "shift_stamp",
    "minor_axis_sigma",
    "star_shaped",
    "stellar_locus",
    "point_like",
    "star_size",
]

SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def adaptive_moments(stamp: np.ndarray, max_iter: int = 50, tol: float = 1e-6):
    """Gaussian-weighted (adaptive) second moments of a centred stamp.

    Returns (ixx, iyy, ixy) in pixels squared, about the stamp centroid. The
    weight is iterated to match the object, so for a Gaussian the moments are
    exact and for wide-winged profiles (Moffat) they stay finite.

    The iteration collapses on a profile barely a pixel wide (a sampled Gaussian of
    FWHM 1.5-1.8 px read 1e-117-0.05 px): for a profile with little negative light
    (`_NEGATIVE_LIGHT`), the round moments of the Gaussian whose half-maximum area is
    the stamp's (`_half_maximum_sigma`). A stamp with more (a decorrelation kernel, a
    peak in a deep negative ring) keeps what the iteration gives.
    """
    stamp = np.asarray(stamp, dtype=np.float64)
    ixx, iyy, ixy = _iterated_moments(stamp, max_iter, tol)
    if not _collapsed(ixx, iyy):
        return ixx, iyy, ixy
    positive = stamp[stamp > 0].sum()
    if -stamp[stamp < 0].sum() > _NEGATIVE_LIGHT * positive:
        return ixx, iyy, ixy
    sigma = _half_maximum_sigma(stamp)
    return sigma * sigma, sigma * sigma, 0.0


#: Most negative light (fraction of the positive) of a stamp whose collapsed moments
#: `adaptive_moments` replaces by its half-maximum width: a sampled PSF has none (or
#: its noise's), a decorrelation kernel given as a PSF half as much as positive.
_NEGATIVE_LIGHT = 0.25


#: Second moment (px^2) of a pixel's own extent: no sampled profile has less.
_PIXEL_MOMENT = 1.0 / 12.0


def _collapsed(ixx: float, iyy: float) -> bool:
    """Moments whose iteration collapsed or ran off: an axis below a pixel's own second
    moment, or not finite."""
    return not (_PIXEL_MOMENT <= ixx < math.inf and _PIXEL_MOMENT <= iyy < math.inf)


#: Upsampling of the stamp whose half-maximum area `_half_maximum_sigma` counts.
_HALF_MAX_UPSAMPLE = 8


def upsampled(stamp: np.ndarray, factor: int) -> tuple[np.ndarray, tuple[float, float]]:
    """``stamp`` upsampled ``factor`` times by a cubic spline, and the (row, column)
    spacing of its pixels in the stamp's (zoom maps the end pixels onto each other)."""
    from scipy import ndimage

    fine = ndimage.zoom(stamp, factor, order=3)
    rows, cols = ((n - 1) / max(m - 1, 1) for n, m in zip(stamp.shape, fine.shape, strict=True))
    return fine, (rows, cols)


def _half_maximum_sigma(stamp: np.ndarray) -> float:
    """sigma of the Gaussian whose FWHM is the stamp's: 2 sqrt(area / pi) of the region
    at or above half its peak, counted on a cubic-spline upsampling of the central 21 x
    21 pixels (Gaussians of sigma 0.8 to 3 px to 2%, of 0.5 px 6% wide)."""
    c = stamp.shape[0] // 2
    h = min(c, 10)
    fine, (step, _) = upsampled(stamp[c - h : c + h + 1, c - h : c + h + 1], _HALF_MAX_UPSAMPLE)
    area = np.count_nonzero(fine >= 0.5 * fine.max()) * step * step
    return 2.0 * math.sqrt(area / math.pi) / SIGMA_TO_FWHM


def _iterated_moments(stamp: np.ndarray, max_iter: int, tol: float):
    """The fixed point of `adaptive_moments`' iteration (or where it stopped)."""
    ny, nx = stamp.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    total = stamp.sum()
    if not np.isfinite(total) or total <= 0:
        raise PsfError("PSF stamp has no positive flux")
    xc = (stamp * x).sum() / total
    yc = (stamp * y).sum() / total
    ixx = iyy = max(1.0, min(nx, ny) / 8.0) ** 2
    ixy = 0.0
    for _ in range(max_iter):
        det = ixx * iyy - ixy * ixy
        if det <= 0:
            break
        dx, dy = x - xc, y - yc
        # weight has the current moments; the weighted moments of a Gaussian
        # under a matched Gaussian weight are half its own, hence the factor 2.
        w = np.exp(-0.5 * (iyy * dx * dx - 2 * ixy * dx * dy + ixx * dy * dy) / det)
        wi = stamp * w
        s = wi.sum()
        if s <= 0:
            break
        xc_new = (wi * x).sum() / s
        yc_new = (wi * y).sum() / s
        dx, dy = x - xc_new, y - yc_new
        mxx = (wi * dx * dx).sum() / s
        myy = (wi * dy * dy).sum() / s
        mxy = (wi * dx * dy).sum() / s
        # invert "measured = (C^-1 + W^-1)^-1" to get the object's moments C
        m = np.array([[mxx, mxy], [mxy, myy]])
        wm = np.array([[ixx, ixy], [ixy, iyy]])
        try:
            c = np.linalg.inv(np.linalg.inv(m) - np.linalg.inv(wm))
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(c)) or c[0, 0] <= 0 or c[1, 1] <= 0:
            # fall back to a weight twice the measured moments (converges for Gaussians)
            c = 2.0 * m
        new = (c[0, 0], c[1, 1], c[0, 1])
        done = abs(new[0] - ixx) + abs(new[1] - iyy) < tol * (ixx + iyy)
        ixx, iyy, ixy = new
        xc, yc = xc_new, yc_new
        if done:
            break
    return float(ixx), float(iyy), float(ixy)


class Psf(ABC):
    """A PSF that can be evaluated anywhere on the exposure (parent coordinates)."""

    #: Position where a single representative PSF is evaluated (the image centre for
    #: models built from a file); None means "any position gives the same PSF".
    average_position: tuple[float, float] | None = None

    @abstractmethod
    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Odd, square, unit-sum stamp of the PSF at (x, y), centred on its middle pixel."""

    def image_at(self, x: float, y: float) -> tuple[np.ndarray, int, int]:
        """PSF stamp shifted to sub-pixel position (x, y).

        Returns (stamp, x_min, y_min): the stamp's pixel [0, 0] sits at parent
        pixel (x_min, y_min) and the stamp's centroid at (x, y). Used to draw or
        fit point sources.
        """
        stamp = self.kernel_image(x, y)
        half = stamp.shape[0] // 2
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        shifted = shift_stamp(stamp, x - ix, y - iy)
        return shifted, ix - half, iy - half

    def moments(self, x: float | None = None, y: float | None = None):
        """Adaptive second moments (ixx, iyy, ixy) of the PSF at (x, y)."""
        return adaptive_moments(self.kernel_image(x, y))

    def sigma(self, x: float | None = None, y: float | None = None) -> float:
        """Trace radius sqrt((ixx + iyy) / 2) in pixels."""
        ixx, iyy, _ = self.moments(x, y)
        return math.sqrt(0.5 * (ixx + iyy))

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM in pixels = 2 sqrt(2 ln 2) x trace radius."""
        return SIGMA_TO_FWHM * self.sigma(x, y)

    def noise_equivalent_area(self, x: float | None = None, y: float | None = None) -> float:
        """1 / sum(P^2): the area whose noise a PSF-weighted flux sees."""
        stamp = self.kernel_image(x, y)
        return float(1.0 / np.sum(stamp.astype(np.float64) ** 2))

    def shifted(self, dx: float, dy: float) -> Psf:
        """The same PSF for an exposure whose parent origin moved by (dx, dy).

        PSFs are evaluated in parent coordinates, which cutouts keep, so by
        default nothing changes; models tied to array positions override this.
        """
        return self


def shift_stamp(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Shift a stamp by a sub-pixel amount with a Fourier phase ramp (band-limited)."""
    if abs(dx) < 1e-9 and abs(dy) < 1e-9:
        return stamp.copy()
    result = _shift_raw(stamp, dx, dy)
    total = result.sum()
    return result / total if total != 0 else result


def _shift_raw(stamp: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Sub-pixel Fourier shift without renormalisation (noisy star cutouts)."""
    from scipy import fft as sp_fft  # here: importing scipy would double `alsub info`'s start

    ny, nx = stamp.shape
    # real FFT and a separable ramp: the same shift as ndimage.fourier_shift, 5x cheaper
    spectrum = sp_fft.rfft2(stamp.astype(np.float64))
    ramp_y = np.exp(-2j * np.pi * dy * sp_fft.fftfreq(ny))[:, None]
    ramp_x = np.exp(-2j * np.pi * dx * sp_fft.rfftfreq(nx))[None, :]
    return sp_fft.irfft2(spectrum * ramp_y * ramp_x, s=(ny, nx))


def _odd(value: float) -> int:
    """Smallest odd integer >= ``value``."""
    size = int(math.ceil(value))
    return size + 1 - size % 2


def _moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha whose profile (1 + (r/alpha)^2)^-beta has this FWHM."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _rotated(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) along and across a major axis at ``angle`` from +x."""
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


class GaussianPsf(Psf):
    """Elliptical Gaussian PSF, the same everywhere.

    Parameters
    ----------
    sigma : float
        Sigma along the major axis, pixels.
    ellipticity : float
        1 - b/a, 0 for round.
    angle : float
        Position angle of the major axis from +x, radians.
    size : int or None
        Odd stamp width; default about 8 sigma, at least 15.
    """

    def __init__(self, sigma: float, ellipticity: float = 0.0, angle: float = 0.0, size=None):
        if not sigma > 0:
            raise PsfError(f"Gaussian PSF sigma must be positive, got {sigma}")
        if not 0 <= ellipticity < 1:
            raise PsfError(f"ellipticity must be in [0, 1), got {ellipticity}")
        self.sigma_major = float(sigma)
        self.ellipticity = float(ellipticity)
        self.angle = float(angle)
        self.size = int(size) if size else max(15, _odd(8.0 * sigma))
        if self.size % 2 == 0:
            raise PsfError(f"PSF stamp size must be odd, got {self.size}")
        self._stamp = self._draw()

    def _draw(self) -> np.ndarray:
        half = self.size // 2
        y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
        a = self.sigma_major
        b = a * (1.0 - self.ellipticity)
        u, v = _rotated(x, y, self.angle)
        img = np.exp(-0.5 * ((u / a) ** 2 + (v / b) ** 2))
        return img / img.sum()

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        return self._stamp.copy()

    def __repr__(self) -> str:
        return f"GaussianPsf(sigma={self.sigma_major}, ellipticity={self.ellipticity})"


class ImagePsf(Psf):
    """PSF given as one odd-sized stamp, the same everywhere."""

    def __init__(self, stamp: np.ndarray, average_position: tuple[float, float] | None = None):
        stamp = np.asarray(stamp, dtype=np.float64)
        if stamp.ndim != 2:
            raise PsfError(f"PSF stamp must be 2-D, got {stamp.ndim}-D")
        ny, nx = stamp.shape
        if ny % 2 == 0 or nx % 2 == 0:
            raise PsfError(f"PSF stamp must have odd dimensions, got {nx}x{ny}")
        if ny != nx:
            size = max(nx, ny)
            padded = np.zeros((size, size))
            padded[
                (size - ny) // 2 : (size - ny) // 2 + ny, (size - nx) // 2 : (size - nx) // 2 + nx
            ] = stamp
            stamp = padded
        if not np.all(np.isfinite(stamp)):
            raise PsfError("PSF stamp has non-finite pixels")
        total = stamp.sum()
        if total <= 0:
            raise PsfError("PSF stamp has no positive flux")
        self.stamp = stamp / total
        self.average_position = average_position

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        return self.stamp.copy()

    def __repr__(self) -> str:
        return f"ImagePsf(size={self.stamp.shape[0]})"


class MoffatPsf(Psf):
    """Elliptical Moffat PSF, the same everywhere, integrated over pixels.

    The profile is ``(1 + (u/a_u)^2 + (v/a_v)^2)^-beta`` in the frame rotated by
    ``angle``, with ``a_u = fwhm / (2 sqrt(2^(1/beta) - 1))`` and ``a_v = a_u (1 -
    ellipticity)``. Each pixel holds the mean of the profile over a 5x5 sub-pixel
    grid (pixel integration, as a detector sees a star), then the stamp is
    normalised to unit sum. Note that the adaptive-moment `Psf.fwhm` (2.355 x
    trace radius, Rubin's definition) of a Moffat is not its true FWHM: the wings
    widen the matched Gaussian. For beta = 3 the adaptive FWHM is about 1.14 times
    the true one (1.16 at FWHM 3 px, where pixel integration adds); for beta =
    4.765 about 1.08. The true value is kept in `true_fwhm`.

    Parameters
    ----------
    fwhm : float
        True full width at half maximum along the major axis, pixels.
    beta : float
        Moffat index (> 1); smaller means stronger wings.
    ellipticity : float
        1 - b/a, 0 for round.
    angle : float
        Position angle of the major axis from +x, radians.
    size : int or None
        Odd stamp width; default about 7 FWHM, at least 15.
    """

    _OVERSAMPLE = 5

    def __init__(
        self,
        fwhm: float,
        beta: float = 3.0,
        ellipticity: float = 0.0,
        angle: float = 0.0,
        size: int | None = None,
    ):
        if not fwhm > 0:
            raise PsfError(f"Moffat PSF FWHM must be positive, got {fwhm}")
        if not beta > 1:
            raise PsfError(f"Moffat beta must exceed 1 (finite flux), got {beta}")
        if not 0 <= ellipticity < 1:
            raise PsfError(f"ellipticity must be in [0, 1), got {ellipticity}")
        self.true_fwhm = float(fwhm)
        self.beta = float(beta)
        self.ellipticity = float(ellipticity)
        self.angle = float(angle)
        self.size = int(size) if size else max(15, _odd(7.0 * fwhm))
        if self.size % 2 == 0:
            raise PsfError(f"PSF stamp size must be odd, got {self.size}")
        self._stamp = self._draw()

    def _draw(self) -> np.ndarray:
        n = self._OVERSAMPLE
        half = self.size // 2
        # sub-pixel centres, symmetric about each pixel centre
        sub = (np.arange(n) - (n - 1) / 2.0) / n
        axis = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
        y, x = np.meshgrid(axis, axis, indexing="ij")
        alpha = _moffat_alpha(self.true_fwhm, self.beta)
        alpha_minor = alpha * (1.0 - self.ellipticity)
        u, v = _rotated(x, y, self.angle)
        fine = (1.0 + (u / alpha) ** 2 + (v / alpha_minor) ** 2) ** (-self.beta)
        img = fine.reshape(self.size, n, self.size, n).mean(axis=(1, 3))
        return img / img.sum()

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        return self._stamp.copy()

    def __repr__(self) -> str:
        return f"MoffatPsf(fwhm={self.true_fwhm}, beta={self.beta}, ellipticity={self.ellipticity})"


class GridPsf(Psf):
    """Spatially varying PSF: stamps on a rectangular grid of nodes, bilinearly interpolated.

    Parameters
    ----------
    stamps : `numpy.ndarray` (n_y, n_x, k, k)
        PSF stamp at node (x_nodes[i], y_nodes[j]) is ``stamps[j, i]``; k odd.
    x_nodes, y_nodes : array-like, ascending
        Parent coordinates of the node columns and rows. A single node along an
        axis means no variation along it.

    Notes
    -----
    ``kernel_image(x, y)`` blends the four surrounding stamps with bilinear
    weights (positions outside the node range are clamped to it) and renormalises
    to unit sum. With no position it is evaluated at `average_position`, the
    centre of the node range.
    """

    def __init__(self, stamps, x_nodes, y_nodes):
        stamps = np.asarray(stamps, dtype=np.float64)
        x_nodes = np.atleast_1d(np.asarray(x_nodes, dtype=np.float64))
        y_nodes = np.atleast_1d(np.asarray(y_nodes, dtype=np.float64))
        if stamps.ndim != 4:
            raise PsfError(f"GridPsf stamps must be 4-D (n_y, n_x, k, k), got {stamps.ndim}-D")
        if stamps.shape[:2] != (len(y_nodes), len(x_nodes)):
            raise PsfError(
                f"GridPsf stamps grid {stamps.shape[:2]} does not match "
                f"{len(y_nodes)} y nodes x {len(x_nodes)} x nodes"
            )
        k = stamps.shape[2]
        if stamps.shape[3] != k or k % 2 == 0:
            raise PsfError(f"GridPsf stamps must be odd and square, got {stamps.shape[2:]}")
        if np.any(np.diff(x_nodes) <= 0) or np.any(np.diff(y_nodes) <= 0):
            raise PsfError("GridPsf nodes must be strictly ascending")
        if not np.all(np.isfinite(stamps)):
            raise PsfError("GridPsf stamps have non-finite pixels")
        sums = stamps.sum(axis=(2, 3))
        if np.any(sums <= 0):
            raise PsfError("a GridPsf stamp has no positive flux")
        self.stamps = stamps / sums[:, :, None, None]
        self.x_nodes = x_nodes
        self.y_nodes = y_nodes
        self.average_position = (
            0.5 * (x_nodes[0] + x_nodes[-1]),
            0.5 * (y_nodes[0] + y_nodes[-1]),
        )

    @staticmethod
    def _bracket(nodes: np.ndarray, value: float) -> tuple[int, int, float]:
        """Indices of the two nodes around ``value`` and the weight of the upper one."""
        if len(nodes) == 1 or value <= nodes[0]:
            return 0, 0, 0.0
        if value >= nodes[-1]:
            last = len(nodes) - 1
            return last, last, 0.0
        hi = int(np.searchsorted(nodes, value, side="right"))
        lo = hi - 1
        return lo, hi, float((value - nodes[lo]) / (nodes[hi] - nodes[lo]))

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        # set to the node-range centre in __init__, never None for a GridPsf
        assert self.average_position is not None
        ax, ay = self.average_position
        x = ax if x is None else float(x)
        y = ay if y is None else float(y)
        i0, i1, wx = self._bracket(self.x_nodes, x)
        j0, j1, wy = self._bracket(self.y_nodes, y)
        stamp = (1 - wy) * ((1 - wx) * self.stamps[j0, i0] + wx * self.stamps[j0, i1]) + wy * (
            (1 - wx) * self.stamps[j1, i0] + wx * self.stamps[j1, i1]
        )
        return stamp / stamp.sum()

    def __repr__(self) -> str:
        return (
            f"GridPsf({len(self.x_nodes)}x{len(self.y_nodes)} nodes, size={self.stamps.shape[2]})"
        )


class PolynomialPsf(Psf):
    """Spatially varying PSF: each pixel a polynomial in (x, y), as fitted over stars.

    Parameters
    ----------
    coefficients : `numpy.ndarray` (terms, k, k)
        Coefficients of the monomials `polynomial_terms` gives, k odd.
    order : int
        Total degree of the polynomial.
    bbox : tuple
        (min_x, min_y, max_x, max_y) parent bounds the positions are scaled over.

    Notes
    -----
    Evaluated exactly at each position and renormalised to unit sum: a grid of stamps
    blended bilinearly between them mixes a narrow profile with a broad one where the
    width changes fast (FWHM 2.5 px at the centre, 5 px in the corners: the blend was
    10% wider than the PSF midway), and biases PSF fluxes.
    """

    def __init__(self, coefficients, order: int, bbox):
        coefficients = np.asarray(coefficients, dtype=np.float64)
        k = coefficients.shape[-1]
        if coefficients.ndim != 3 or coefficients.shape[1] != k or k % 2 == 0:
            raise PsfError(f"PolynomialPsf stamps must be odd and square, got {coefficients.shape}")
        if coefficients.shape[0] != (order + 1) * (order + 2) // 2:
            raise PsfError(f"order {order} needs {(order + 1) * (order + 2) // 2} terms")
        self.coefficients = coefficients
        self.order = int(order)
        self.bbox = tuple(float(b) for b in bbox)
        min_x, min_y, max_x, max_y = self.bbox
        self.average_position = (0.5 * (min_x + max_x), 0.5 * (min_y + max_y))

    def kernel_image(self, x=None, y=None) -> np.ndarray:
        assert self.average_position is not None  # set in __init__
        ax, ay = self.average_position
        # clamped to the frame the stars were on: a polynomial grows wild beyond them
        min_x, min_y, max_x, max_y = self.bbox
        x = ax if x is None else min(max(float(x), min_x), max_x)
        y = ay if y is None else min(max(float(y), min_y), max_y)
        terms = polynomial_terms([x], [y], self.order, self.bbox)[0]
        stamp = np.tensordot(terms, self.coefficients, axes=1)
        total = stamp.sum()
        if not total > 0:
            raise PsfError(f"the PSF model has no positive flux at ({x:.1f}, {y:.1f})")
        return stamp / total

    def __repr__(self) -> str:
        return f"PolynomialPsf(order={self.order}, size={self.coefficients.shape[1]})"


def polynomial_terms(x, y, order: int, bbox) -> np.ndarray:
    """Monomials of total degree <= ``order`` in (x, y) scaled to [-1, 1] over ``bbox``
    (rows: positions; columns: x^i y^j in `numpy.polynomial` order, i + j <= order)."""
    from numpy.polynomial import polynomial as npoly

    min_x, min_y, max_x, max_y = bbox
    cx, cy = 0.5 * (min_x + max_x), 0.5 * (min_y + max_y)
    sx, sy = max(0.5 * (max_x - min_x), 1.0), max(0.5 * (max_y - min_y), 1.0)
    keep = [
        i * (order + 1) + j for i in range(order + 1) for j in range(order + 1) if i + j <= order
    ]
    vander = npoly.polyvander2d((np.asarray(x) - cx) / sx, (np.asarray(y) - cy) / sy, [order] * 2)
    return vander[:, keep]


#: Least trace radius (px) of a star's adaptive moments: below, hot pixels.
MIN_STAR_SIGMA = 0.6
#: Least minor-axis sigma (px, pixel included) of a star: no source is narrower than the
#: PSF along any axis, where a cosmic-ray track one pixel wide is ~0.2-0.5 px across
#: whatever its length (a 512 px frame with 10+ of them: the tracks of a star's trace
#: size formed the stellar locus, and the science PSF came out 2.0 px for 4.0).
MIN_STAR_MINOR_SIGMA = 0.5


def star_shaped(table) -> np.ndarray:
    """Sources of a measured catalog (``size``, ``ixx``, ``iyy``, ``ixy``) that could be
    stars by their shape: wider than a hot pixel and, across, than a cosmic-ray track
    (`MIN_STAR_SIGMA`, `MIN_STAR_MINOR_SIGMA`); the stellar locus picks among them."""
    size = np.asarray(table["size"], dtype=np.float64)
    minor = minor_axis_sigma(table["ixx"], table["iyy"], table["ixy"])
    with np.errstate(invalid="ignore"):
        return (size > MIN_STAR_SIGMA) & (minor > MIN_STAR_MINOR_SIGMA)


#: Sources at or above this S/N define the stellar locus, and down to `LOCUS_FAINT_SNR`
#: when the bright ones' locus is galaxies (`star_size`).
LOCUS_SNR = 20.0
LOCUS_FAINT_SNR = 10.0
#: A star's trace size lies within this fraction of the locus.
LOCUS_TOLERANCE = 0.15


def point_like(table) -> np.ndarray:
    """Sources of a measured catalog that could be stars: not saturated, at the edge,
    masked nor blended, with a finite size and S/N, and `star_shaped`."""
    return (
        ~np.asarray(table["flag_saturated"])
        & ~np.asarray(table["flag_edge"])
        & ~np.asarray(table["flag_masked"])
        & ~np.asarray(table["flag_blended"])
        & np.isfinite(np.asarray(table["snr"], dtype=np.float64))
        & np.isfinite(np.asarray(table["size"], dtype=np.float64))
        & star_shaped(table)
    )


def star_size(table, usable: np.ndarray) -> float | None:
    """The stars' trace size (px) among the ``usable`` sources of a measured catalog.

    The `stellar_locus` of those with S/N >= `LOCUS_SNR`, unless those down to
    `LOCUS_FAINT_SNR` form one smaller by over `LOCUS_TOLERANCE`: the bright compact
    sources are then galaxies (a galaxy cluster; a shallow image with few bright
    stars) and the faint stars, which outnumber them, show the PSF. None from fewer
    than 3 bright sources.
    """
    size = np.asarray(table["size"], dtype=np.float64)
    snr = np.asarray(table["snr"], dtype=np.float64)
    bright = usable & (snr >= LOCUS_SNR)
    if bright.sum() < 3:
        return None
    locus = stellar_locus(size[bright])
    fainter = usable & (snr >= LOCUS_FAINT_SNR)
    if fainter.sum() > bright.sum():
        small = stellar_locus(size[fainter])
        if small < (1.0 - LOCUS_TOLERANCE) * locus:
            return small
    return locus


#: Bright usable stars per cell a local locus (`local_star_size`) needs, and the most
#: cells per axis: a wide-field camera's PSF may double in width from centre to corner.
LOCAL_LOCUS_STARS = 10
LOCAL_LOCUS_MAX_CELLS = 5


def local_star_size(table, usable: np.ndarray, locus: float, bbox) -> np.ndarray | None:
    """The stars' trace size (px) at each source of a measured catalog, where it varies
    over the field; None where it does not (the field's `star_size` serves then).

    The field is cut into cells holding `LOCAL_LOCUS_STARS` bright (S/N >= `LOCUS_SNR`)
    ``usable`` sources each on average (2 to `LOCAL_LOCUS_MAX_CELLS` per axis); each
    cell's `stellar_locus` is taken where it has that many, and a quadratic (a plane
    from 2 x 2 cells) in log size is fitted to them, weighted by their counts. When the
    fit stays within half of `LOCUS_TOLERANCE` of ``locus`` everywhere the size is one
    over the field. A PSF whose width doubles towards the corners otherwise keeps every
    star beyond 15% of the centre's out of the PSF and the kernel stars.
    """
    size = np.asarray(table["size"], dtype=np.float64)
    bright = usable & (np.asarray(table["snr"], dtype=np.float64) >= LOCUS_SNR)
    cells = min(LOCAL_LOCUS_MAX_CELLS, int(math.sqrt(bright.sum() / LOCAL_LOCUS_STARS)))
    if cells < 2:
        return None
    min_x, min_y, max_x, max_y = bbox
    x, y = np.asarray(table["x"], np.float64), np.asarray(table["y"], np.float64)
    # positions scaled to [-1, 1] over the frame
    u = (x - 0.5 * (min_x + max_x)) / max(0.5 * (max_x - min_x), 1.0)
    v = (y - 0.5 * (min_y + max_y)) / max(0.5 * (max_y - min_y), 1.0)
    col = np.clip(((u + 1) * 0.5 * cells).astype(int), 0, cells - 1)
    row = np.clip(((v + 1) * 0.5 * cells).astype(int), 0, cells - 1)
    centres_u, centres_v, logs, counts = [], [], [], []
    for j in range(cells):
        for i in range(cells):
            inside = bright & (col == i) & (row == j)
            if inside.sum() >= LOCAL_LOCUS_STARS:
                centres_u.append(float(np.median(u[inside])))
                centres_v.append(float(np.median(v[inside])))
                logs.append(math.log(stellar_locus(size[inside])))
                counts.append(float(inside.sum()))
    order = 2 if cells >= 3 else 1
    terms = (order + 1) * (order + 2) // 2
    if len(logs) < terms + 1:
        return None

    def design(a, b) -> np.ndarray:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        columns = [np.ones_like(a), a, b] + ([a * a, a * b, b * b] if order == 2 else [])
        return np.column_stack(columns)

    root = np.sqrt(np.asarray(counts))
    coeffs = np.linalg.lstsq(
        design(centres_u, centres_v) * root[:, None], np.asarray(logs) * root, rcond=None
    )[0]
    # judged over the frame's corners, edge midpoints and centre
    grid = np.array([-1.0, 0.0, 1.0])
    gu, gv = np.meshgrid(grid, grid)
    fitted = np.exp(design(gu.ravel(), gv.ravel()) @ coeffs)
    if np.all(np.abs(fitted / locus - 1.0) < 0.5 * LOCUS_TOLERANCE):
        return None
    # within the frame, and no further than the cells' loci reach
    low, high = math.exp(min(logs)), math.exp(max(logs))
    at = np.exp(design(np.clip(u, -1, 1), np.clip(v, -1, 1)) @ coeffs)
    return np.clip(at, low / (1 + LOCUS_TOLERANCE), high * (1 + LOCUS_TOLERANCE))


def minor_axis_sigma(ixx, iyy, ixy) -> np.ndarray:
    """sqrt of the smaller eigenvalue of the second-moment matrices [[ixx, ixy], [ixy, iyy]]
    (px): the source's width across its narrowest direction."""
    ixx, iyy, ixy = (np.asarray(v, dtype=np.float64) for v in (ixx, iyy, ixy))
    half_trace = 0.5 * (ixx + iyy)
    spread = np.hypot(0.5 * (ixx - iyy), ixy)
    return np.sqrt(np.maximum(half_trace - spread, 0.0))


def stellar_locus(sizes: np.ndarray) -> float:
    """Size of the tightest cluster of sizes (stars share one size; galaxies scatter).

    For each size, count the sizes within 8% of it; among the windows holding
    at least 30% of the densest one's count (and 4), the smallest wins: stars are
    the smallest well-populated cluster, above hot pixels and below galaxies.
    Its median is returned.
    """
    log_size = np.log(sizes)
    # the counts from the sorted sizes: a crowded frame's thousands of sources made an
    # n x n matrix of differences (S/N >= 10 on a dense 4096 frame: 2590, 107 MB)
    ordered = np.sort(log_size)
    counts = np.searchsorted(ordered, log_size + 0.08, side="left") - np.searchsorted(
        ordered, log_size - 0.08, side="right"
    )
    best = counts >= min(counts.max(), max(4, 0.3 * counts.max()))
    centre = log_size[best].min()
    return float(np.exp(np.median(log_size[np.abs(log_size - centre) < 0.08])))


class DrawnOncePsf(Psf):
    """A PSF whose stamp costs a convolution: each position's is drawn once (`_draw`)
    and copied out after. The measurements of one catalog ask for the same grid nodes
    in turn (the 4096 preconvolve pair's score PSF: 102 stamps at 42 positions, 0.23 s
    of the catalog's CPU). At most `MEMO_STAMPS` are kept; pickles leave them out."""

    MEMO_STAMPS = 64

    @abstractmethod
    def _draw(self, x: float | None, y: float | None) -> np.ndarray:
        """The stamp at (x, y), as `kernel_image`."""

    def kernel_image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        memo = self.__dict__.setdefault("_memo", {})
        stamp = memo.get((x, y))
        if stamp is None:
            stamp = self._draw(x, y)
            if len(memo) < self.MEMO_STAMPS:  # threads may both draw one: the same stamp
                memo[(x, y)] = stamp
        return stamp.copy()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_memo", None)
        return state


class KernelMatchedPsf(DrawnOncePsf):
    """PSF of an image after correlation with a (spatially varying) matching kernel.

    The image K * S has, at (x, y), the PSF P_S(x, y) correlated with K(x, y),
    normalised to unit sum: the exact profile of a point source in the matched
    image, whether or not K reproduces the other image's PSF.

    Parameters
    ----------
    psf : `Psf`
        PSF of the image before matching.
    kernel : object with ``image(x, y)``
        The matching kernel (e.g. `core.kernel.SpatialKernel`), correlation semantics.
    shift : (dx, dy)
        Moves the drawn stamp (px): a kernel that absorbed an offset between the images'
        stars centres the matched PSF where the other image's stars are not.
    """

    def __init__(self, psf: Psf, kernel, shift: tuple[float, float] = (0.0, 0.0)):
        self.psf = psf
        self.kernel = kernel
        self.shift = shift
        self.average_position = psf.average_position

    def _draw(self, x, y) -> np.ndarray:
        stamp = self.psf.kernel_image(x, y)
        if x is None or y is None:
            x, y = self.average_position or (None, None)
        kimg = np.asarray(
            self.kernel.image(x, y) if x is not None else self.kernel.image(), dtype=np.float64
        )
        half = kimg.shape[0] // 2
        padded = np.pad(stamp, half)
        from scipy import signal  # here: see _shift_raw

        # the correlation as a convolution with the flipped kernel, by FFT: a 41 px kernel
        # on a 23 px stamp took 43 ms directly, 0.25 ms so (equal to 2e-15)
        out = signal.fftconvolve(padded, kimg[::-1, ::-1], mode="same")
        total = out.sum()
        if not np.isfinite(total) or total <= 0:
            raise PsfError("the matching kernel leaves the PSF with no positive flux")
        if self.shift != (0.0, 0.0):
            return shift_stamp(out / total, *self.shift)
        return out / total

    def __repr__(self) -> str:
        return f"KernelMatchedPsf({self.psf!r})"
