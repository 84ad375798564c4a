"""The Alard-Lupton kernel basis: Gaussians times polynomials (algorithm.md section 2).

`make_kernel_basis` picks the Gaussian widths from the two PSF widths
(convolution, deconvolution or the configured fallback), sizes the kernel and
builds the renormalised basis images, so that only the first image has a
non-zero sum and the kernel sum is the coefficient of that image.

Basis image pixel (j, i) holds the kernel value at offset (v, u) = (j - h, i - h)
(row offset v, column offset u), the orientation every alsub kernel uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import KernelConfig

__all__ = ["KernelBasis", "make_kernel_basis", "kernel_size_for", "basis_sigmas", "FWHM_TO_SIGMA"]

#: sigma = FWHM * FWHM_TO_SIGMA for a Gaussian.
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))

# A basis term whose raw sum is below float32 epsilon is treated as zero-sum (afw's test).
_ZERO_SUM = float(np.finfo(np.float32).eps)


@dataclass
class KernelBasis:
    """A set of Alard-Lupton basis images.

    Attributes
    ----------
    images : `numpy.ndarray` (nb, K, K), float64
        Renormalised basis images: sum of ``images[0]`` is 1, every other image
        sums to 0 and has unit L2 norm.
    sigmas : tuple of float
        Gaussian sigmas in pixels, in basis order.
    degrees : tuple of int
        Polynomial degree attached to each Gaussian.
    mode : str
        ``"config"``, ``"convolution"`` or ``"deconvolution"``.
    size : int
        Kernel width K (odd).
    half : int
        Half-width h = K // 2.
    transform : `numpy.ndarray` (nb, nb) or None
        ``images[k] = sum_n transform[k, n] raw[n]`` where raw[n] is the n-th
        separable product ``gauss_i(v) gauss_i(u) (u/h)^p (v/h)^q`` (see
        `separable_factors`); lets the solver correlate with 1-D passes.
    """

    images: np.ndarray
    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    mode: str
    size: int
    half: int
    transform: np.ndarray | None = None

    @property
    def n_basis(self) -> int:
        """Number of basis images."""
        return int(self.images.shape[0])

    def separable_factors(self) -> list[tuple[np.ndarray, list[tuple[int, int]]]]:
        """1-D factors of the raw (pre-renormalisation) basis, one entry per Gaussian.

        Returns
        -------
        factors : list of (f, powers)
            ``f`` is (d+1, K): f[p](o) = g(o) (o/h)^p with g the unit-sum 1-D Gaussian;
            ``powers`` lists the (x power, y power) of that Gaussian's raw images in
            basis order, raw = f[py](v) * f[px](u).
        """
        offsets = np.arange(-self.half, self.half + 1, dtype=np.float64)
        out = []
        for sigma, degree in zip(self.sigmas, self.degrees, strict=True):
            g = np.exp(-(offsets**2) / (2.0 * sigma * sigma))
            g /= g.sum()
            f = np.array([g * (offsets / self.half) ** p for p in range(degree + 1)])
            out.append((f, _monomial_powers(degree)))
        return out

    def metadata(self) -> dict:
        """The AL* keys Rubin's makeKernel writes for this basis."""
        return {
            "ALBasisNGauss": len(self.sigmas),
            "ALBasisDegGauss": list(self.degrees),
            "ALBasisSigGauss": list(self.sigmas),
            "ALKernelSize": self.size,
            "ALBasisMode": self.mode,
        }


def basis_sigmas(
    convolved_fwhm: float | None, matched_fwhm: float | None, config: KernelConfig
) -> tuple[list[float], str]:
    """Gaussian sigmas and basis mode for a pair of PSF widths (section 2.2).

    Parameters
    ----------
    convolved_fwhm : float or None
        FWHM (pixels) of the image that will be convolved (Rubin's "target").
    matched_fwhm : float or None
        FWHM (pixels) of the image being matched to (Rubin's "reference").
    config : `core.config.KernelConfig`

    Returns
    -------
    sigmas : list of float
    mode : str
        ``"config"`` when either width is missing, scaling is off or the widths
        are equal; ``"convolution"`` when the matched-to image is broader;
        ``"deconvolution"`` otherwise.
    """
    n_gauss = config.alard_n_gauss
    if convolved_fwhm is None or matched_fwhm is None or not config.scale_by_fwhm:
        return [float(s) for s in config.alard_sig_gauss], "config"
    sigma_convolved = convolved_fwhm * FWHM_TO_SIGMA
    sigma_matched = matched_fwhm * FWHM_TO_SIGMA
    if sigma_convolved == sigma_matched:
        return [float(s) for s in config.alard_sig_gauss], "config"
    if sigma_matched > sigma_convolved:
        mode, min_sig = "convolution", config.alard_min_sig
        sigma_k = math.sqrt(sigma_matched**2 - sigma_convolved**2)
    else:
        mode, min_sig = "deconvolution", config.alard_min_sig_deconv
        sigma_k = math.sqrt(sigma_convolved**2 - sigma_matched**2)
    sigma_k = max(sigma_k, min_sig)
    if n_gauss == 1:
        return [sigma_k], mode
    beta = config.alard_gauss_beta
    sigmas = [max(min_sig, sigma_k / beta)]
    for _ in range(n_gauss - 1):
        sigmas.append(sigmas[-1] * beta)
    return sigmas, mode


def _scales(convolved_fwhm: float | None, matched_fwhm: float | None, config: KernelConfig) -> bool:
    """Whether the basis follows the PSF widths (both known, scaling on)."""
    return convolved_fwhm is not None and matched_fwhm is not None and config.scale_by_fwhm


def _size_from_sigmas(sigmas: list[float], config: KernelConfig) -> int:
    size = int(config.kernel_size_fwhm_scaling * sigmas[-1])
    if size % 2 == 0:
        size += 1
    return int(min(max(size, config.kernel_size_min), config.kernel_size_max))


def kernel_size_for(
    convolved_fwhm: float | None, matched_fwhm: float | None, config: KernelConfig
) -> int:
    """Kernel width for a pair of PSF widths (section 2.3).

    ``config.kernel_size`` when either width is missing or scaling is off;
    otherwise int(kernel_size_fwhm_scaling * widest sigma), made odd and
    clipped to [kernel_size_min, kernel_size_max].
    """
    if not _scales(convolved_fwhm, matched_fwhm, config):
        return int(config.kernel_size)
    sigmas, _ = basis_sigmas(convolved_fwhm, matched_fwhm, config)
    return _size_from_sigmas(sigmas, config)


def _monomial_powers(degree: int) -> list[tuple[int, int]]:
    """(x power, y power) in afw order: 1, x, y, x^2, xy, y^2, x^3, x^2 y, ..."""
    return [(n - k, k) for n in range(degree + 1) for k in range(n + 1)]


def _raw_basis(sigmas: list[float], degrees: list[int], half: int) -> np.ndarray:
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    u = offsets[np.newaxis, :]  # column offset (x)
    v = offsets[:, np.newaxis]  # row offset (y)
    # the polynomial runs over [-1, 1] across the kernel, not scaled by sigma
    xs, ys = u / half, v / half
    images = []
    for sigma, degree in zip(sigmas, degrees, strict=True):
        gauss = np.exp(-(u * u + v * v) / (2.0 * sigma * sigma))
        gauss /= gauss.sum()
        for px, py in _monomial_powers(degree):
            images.append(gauss * xs**px * ys**py)
    return np.array(images)


def _renormalise(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put all the flux in the first image (section 2.4); no orthogonalisation.

    Returns the images and the matrix T with images = T @ raw (flattened).
    """
    nb = raw.shape[0]
    out = np.empty_like(raw)
    transform = np.zeros((nb, nb))
    out[0] = raw[0] / raw[0].sum()
    transform[0, 0] = 1.0 / raw[0].sum()
    for k in range(1, nb):
        image = raw[k].copy()
        row = np.zeros(nb)
        row[k] = 1.0
        total = image.sum()
        if abs(total) > _ZERO_SUM:
            image = image / total - out[0]
            row = row / total - transform[0]
        norm = math.sqrt(float((image * image).sum()))
        out[k] = image / norm
        transform[k] = row / norm
    return out, transform


def make_kernel_basis(
    convolved_fwhm: float | None, matched_fwhm: float | None, config: KernelConfig
) -> KernelBasis:
    """Build the Alard-Lupton basis for convolving one image to match another.

    Parameters
    ----------
    convolved_fwhm : float or None
        FWHM (pixels) of the image that will be convolved.
    matched_fwhm : float or None
        FWHM (pixels) of the image it is matched to.
    config : `core.config.KernelConfig`

    Returns
    -------
    basis : `KernelBasis`
        With the defaults, 27 images (15 + 6 + 6) of size 21 to 35.

    Raises
    ------
    ValueError
        If the configured kernel size is even or the sigma/degree lists do not
        have ``alard_n_gauss`` entries (the config validator normally catches
        these first).
    """
    if config.kernel_size % 2 == 0:
        raise ValueError("Only odd-sized Alard-Lupton bases allowed")
    degrees = [int(d) for d in config.alard_deg_gauss]
    if len(degrees) != config.alard_n_gauss:
        raise ValueError(
            f"len(basisDegGauss) != basisNGauss : {len(degrees)} vs {config.alard_n_gauss}"
        )
    sigmas, mode = basis_sigmas(convolved_fwhm, matched_fwhm, config)
    # same rule as `kernel_size_for`, reusing the sigmas already computed
    if _scales(convolved_fwhm, matched_fwhm, config):
        size = _size_from_sigmas(sigmas, config)
    else:
        size = int(config.kernel_size)
    half = size // 2
    images, transform = _renormalise(_raw_basis(sigmas, degrees, half))
    return KernelBasis(
        images=images,
        sigmas=tuple(float(s) for s in sigmas),
        degrees=tuple(degrees),
        mode=mode,
        size=size,
        half=half,
        transform=transform,
    )
