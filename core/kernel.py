"""The PSF-matching kernel: its spatial model, its FITS product and the solver.

`SpatialKernel` is a linear combination of fixed basis images whose
coefficients vary over the image as 2-D Chebyshev polynomials;
`BackgroundModel` is the differential background, a 2-D Chebyshev polynomial
on the same domain. `fit_psf_matching_kernel` finds both so that
``K * reference + b ~= target`` (algorithm.md sections 2.5 and 3).

Orientation (decision 1): every alsub kernel is applied as a correlation,
``out(X, Y) = sum_{u,v} K(u, v) in(X + u, Y + v)``, and kernel image pixel
(row j, column i) holds K at offset (u, v) = (i - h, j - h).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import scipy.fft as sp_fft
import scipy.linalg
from astropy.io import fits
from astropy.stats import mad_std
from astropy.table import Table
from numpy.polynomial import chebyshev
from scipy import ndimage, signal

from .basis import KernelBasis, _monomial_powers
from .config import KernelConfig
from .errors import InvalidCatalogError, KernelSolutionError, NoKernelCandidatesError
from .exposure import Exposure
from .io import file_mode
from .order import percentiles, row_medians
from .parallel import one_blas_thread, thread_map
from .stamps import centred_reach
from .task import Task

__all__ = [
    "SpatialKernel",
    "KernelSolution",
    "fit_psf_matching_kernel",
    "clipped_mean_std",
    "BackgroundModel",
    "chebyshev_terms",
    "term_degrees",
    "n_spatial_terms",
]

Box = tuple[int, int, int, int]

#: Pixels per block of frame-wide background evaluation (temporaries stay a few MB).
_BLOCK_PIXELS = 1 << 20

_ORIENTATION_COMMENT = (
    "out(X,Y)=sum K(u,v)in(X+u,Y+v);(j,i)=(v+h,u+h)",
    "Kernels are applied as correlations (no flip): out(X,Y) = sum over u,v of",
    "K(u,v) * in(X+u, Y+v), x = column, y = row. Kernel pixel (row j, col i)",
    "holds K at offset (u,v) = (i-h, j-h) with h = KHALF. Basis image n has",
    "spatial coefficient a_n(x,y) = sum_t C[n,t] T_t(x',y'), x' = 2(x-xc)/W,",
    "y' = 2(y-yc)/H, xc = (DMINX+DMAXX)/2, W = DMAXX-DMINX+1 (parent pixels);",
    "T_t = T_a(x') T_b(y') (Chebyshev, first kind) in the order of the",
    "COEFFICIENTS columns: T0, T1(x'), T1(y'), T2(x'), T1(x')T1(y'), T2(y'), ...",
)


# -- Chebyshev spatial terms -------------------------------------------------------------


def n_spatial_terms(order: int) -> int:
    """Number of 2-D terms of total degree <= order: (o+1)(o+2)/2."""
    return (order + 1) * (order + 2) // 2


def term_degrees(order: int) -> list[tuple[int, int]]:
    """(x degree, y degree) of each term: (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ...

    The same afw order as the monomials of the AL basis.
    """
    return _monomial_powers(order)


def _normalised(coord, low: int, high: int) -> np.ndarray:
    """Map parent pixel coordinates onto [-1, 1] over the pixel edges of [low, high]."""
    centre = 0.5 * (low + high)
    width = high - low + 1
    return 2.0 * (np.asarray(coord, dtype=np.float64) - centre) / width


def chebyshev_terms(x, y, order: int, domain: Box) -> np.ndarray:
    """Evaluate the 2-D Chebyshev terms at parent positions.

    Parameters
    ----------
    x, y : float or `numpy.ndarray`
        Parent coordinates (x = column, y = row), broadcastable together.
    order : int
        Total degree.
    domain : (min_x, min_y, max_x, max_y)
        Inclusive integer box; the polynomials run over its pixel edges.

    Returns
    -------
    terms : `numpy.ndarray` (n_terms,) + broadcast shape of x and y
    """
    xp = _normalised(x, domain[0], domain[2])
    yp = _normalised(y, domain[1], domain[3])
    xp, yp = np.broadcast_arrays(xp, yp)
    shape = xp.shape
    # chebvander promotes scalars to 1-D, hence the reshape back to the input shape
    vx = chebyshev.chebvander(xp, order).reshape(shape + (order + 1,))
    vy = chebyshev.chebvander(yp, order).reshape(shape + (order + 1,))
    return np.stack([vx[..., a] * vy[..., b] for a, b in term_degrees(order)])


def _axis_terms(coords: np.ndarray, low: int, high: int, order: int) -> np.ndarray:
    """T_0..T_order of one normalised axis: (order+1, n)."""
    return chebyshev.chebvander(_normalised(coords, low, high), order).T


def _local_monomials(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Monomials u^a v^b of total degree <= order at the points: (n_terms, n_points)."""
    return np.stack([u**a * v**b for a, b in term_degrees(order)])


def _atomic_write(hdul: fits.HDUList, path: str | os.PathLike) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".fits")
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
        os.chmod(tmp, file_mode())  # the mode of every other product, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_domain(header: fits.Header, domain: Box) -> None:
    header["DMINX"] = (int(domain[0]), "spatial domain min x (parent pixel, inclusive)")
    header["DMINY"] = (int(domain[1]), "spatial domain min y (parent pixel, inclusive)")
    header["DMAXX"] = (int(domain[2]), "spatial domain max x (parent pixel, inclusive)")
    header["DMAXY"] = (int(domain[3]), "spatial domain max y (parent pixel, inclusive)")


def _read_domain(header: fits.Header) -> Box:
    return (int(header["DMINX"]), int(header["DMINY"]), int(header["DMAXX"]), int(header["DMAXY"]))


def _term_name(a: int, b: int) -> str:
    return f"T{a}X_T{b}Y"


# -- spatial kernel ------------------------------------------------------------------------


@dataclass
class SpatialKernel:
    """A kernel that is a linear combination of basis images with spatially varying weights.

    K(x, y) = sum_n a_n(x, y) B_n, with a_n(x, y) = sum_t C[n, t] T_t(x', y').

    Parameters
    ----------
    basis_images : `numpy.ndarray` (nb, K, K), float64
        Odd, square basis images (orientation in the module docstring).
    coefficients : `numpy.ndarray` (nb, n_spatial)
        Chebyshev coefficients per basis image. For a fitted AL kernel row 0 is
        [a0, 0, ...]: the kernel sum is constant.
    order : int
        Chebyshev total degree of the coefficients.
    domain : (min_x, min_y, max_x, max_y)
        Inclusive parent box the Chebyshev polynomials are defined on.
    basis_info : dict
        Optional description of the basis (mode, sigmas, degrees) kept in the FITS header.
    """

    basis_images: np.ndarray
    coefficients: np.ndarray
    order: int
    domain: Box
    basis_info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # the dataclass's repr printed every basis image: pages of numbers in a notebook
        return (
            f"SpatialKernel(size={self.size}, n_basis={self.n_basis}, order={self.order}, "
            f"sum={self.sum():.6g}, domain={self.domain})"
        )

    def __post_init__(self) -> None:
        self.basis_images = np.asarray(self.basis_images, dtype=np.float64)
        if self.basis_images.ndim == 2:
            self.basis_images = self.basis_images[np.newaxis]
        nb, ky, kx = self.basis_images.shape
        if ky != kx or ky % 2 == 0:
            raise ValueError(f"kernel images must be odd and square, got {ky}x{kx}")
        self.order = int(self.order)
        self.coefficients = np.asarray(self.coefficients, dtype=np.float64).reshape(
            nb, n_spatial_terms(self.order)
        )
        self.domain = tuple(int(v) for v in self.domain)  # type: ignore[assignment]

    # construction --------------------------------------------------------------------
    @classmethod
    def constant(cls, image: np.ndarray, domain: Box = (0, 0, 0, 0)) -> SpatialKernel:
        """A fixed kernel (order 0, one basis image with coefficient 1), e.g. a PSF."""
        return cls(np.asarray(image, dtype=np.float64)[np.newaxis], np.ones((1, 1)), 0, domain)

    def followed_by(self, image: np.ndarray) -> SpatialKernel:
        """The kernel whose correlation equals correlating with this one, then with ``image``.

        Correlating by K and then by P is correlating by the convolution K * P; the
        kernel is linear in its basis, so each basis image is convolved with P and the
        spatial coefficients stay as they are (exact, whatever the spatial variation).
        """
        image = np.asarray(image, dtype=np.float64)
        images = np.array([signal.convolve(b, image, mode="full") for b in self.basis_images])
        return SpatialKernel(images, self.coefficients, self.order, self.domain, self.basis_info)

    # geometry ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Kernel width K (odd)."""
        return int(self.basis_images.shape[1])

    @property
    def half(self) -> int:
        """Half-width h = K // 2."""
        return self.size // 2

    @property
    def n_basis(self) -> int:
        return int(self.basis_images.shape[0])

    @property
    def n_spatial(self) -> int:
        return int(self.coefficients.shape[1])

    @property
    def is_spatially_varying(self) -> bool:
        """True when some coefficient other than the constant terms is non-zero."""
        return self.order > 0 and bool(np.any(self.coefficients[:, 1:] != 0))

    def domain_center(self) -> tuple[float, float]:
        """((min_x + max_x) / 2, (min_y + max_y) / 2) of the domain."""
        return (
            0.5 * (self.domain[0] + self.domain[2]),
            0.5 * (self.domain[1] + self.domain[3]),
        )

    # evaluation ----------------------------------------------------------------------
    def spatial_terms(self, x, y) -> np.ndarray:
        """Chebyshev terms at parent (x, y): (n_spatial,) or (n_spatial,) + shape."""
        return chebyshev_terms(x, y, self.order, self.domain)

    def coefficients_at(self, x, y) -> np.ndarray:
        """Basis weights a_n at parent (x, y): (nb,) or (nb,) + shape for arrays."""
        terms = self.spatial_terms(x, y)
        return np.tensordot(self.coefficients, terms, axes=(1, 0))

    def _position(self, x, y) -> tuple[float, float]:
        cx, cy = self.domain_center()
        return (cx if x is None else float(x), cy if y is None else float(y))

    def image(self, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Kernel image (K, K) at parent (x, y); the domain centre by default."""
        x, y = self._position(x, y)
        return np.tensordot(self.coefficients_at(x, y), self.basis_images, axes=(0, 0))

    def reach(self, fraction: float) -> int:
        """Half-width (px) of the smallest centred square outside which the kernel image at
        the domain centre stays below ``fraction`` of its largest absolute value."""
        image = self.image()
        return centred_reach(image, fraction * np.abs(image).max())

    def sum(self, x: float | None = None, y: float | None = None) -> float:
        """Sum of the kernel image at (x, y) (the flux ratio); the domain centre by default."""
        x, y = self._position(x, y)
        sums = self.basis_images.sum(axis=(1, 2))
        return float(sums @ self.coefficients_at(x, y))

    def spatial_images(self) -> np.ndarray:
        """Images K_t = sum_n C[n, t] B_n, so that K(x, y) = sum_t T_t(x', y') K_t.

        Returns
        -------
        images : `numpy.ndarray` (n_spatial, K, K)
        """
        return np.tensordot(self.coefficients, self.basis_images, axes=(0, 0))

    def axis_polynomials(
        self, xs: np.ndarray, ys: np.ndarray, degree: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """T_0..T_degree of the normalised x' and y' on a pixel grid: (degree + 1, len(xs))
        and (degree + 1, len(ys)); products of spatial terms expand in these."""
        tx = _axis_terms(xs, self.domain[0], self.domain[2], degree)
        ty = _axis_terms(ys, self.domain[1], self.domain[3], degree)
        return tx, ty

    def axis_terms(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Separable factors of the spatial terms on a pixel grid.

        Returns (wx, wy) with shapes (n_spatial, len(xs)) and (n_spatial, len(ys)) such
        that T_t(x', y') = wx[t, i] * wy[t, j] at (xs[i], ys[j]).
        """
        tx = _axis_terms(xs, self.domain[0], self.domain[2], self.order)
        ty = _axis_terms(ys, self.domain[1], self.domain[3], self.order)
        degrees = term_degrees(self.order)
        wx = np.stack([tx[a] for a, _ in degrees])
        wy = np.stack([ty[b] for _, b in degrees])
        return wx, wy

    # FITS ----------------------------------------------------------------------------
    def to_hdulist(self) -> fits.HDUList:
        """FITS product: basis images, coefficient table, kernel image at the centre.

        HDU 0 holds the basis cube (nb, K, K) and the orientation and domain keys;
        HDU ``COEFFICIENTS`` a table with one row per basis image and one column per
        Chebyshev term; HDU ``KERNEL`` the kernel image at the domain centre.
        """
        primary = fits.PrimaryHDU(self.basis_images)
        header = primary.header
        header["KORIENT"] = ("CORRELATION", _ORIENTATION_COMMENT[0])
        for line in _ORIENTATION_COMMENT[1:]:
            header["COMMENT"] = line
        header["KSIZE"] = (self.size, "kernel width K (pixels, odd)")
        header["KHALF"] = (self.half, "kernel half-width h")
        header["NBASIS"] = (self.n_basis, "number of basis images")
        header["SPTYPE"] = ("CHEBYSHEV1", "spatial model: 2-D Chebyshev, first kind")
        header["SPORDER"] = (self.order, "spatial order (total degree)")
        _write_domain(header, self.domain)
        header["KSUM"] = (self.sum(), "kernel sum at the domain centre")
        if "mode" in self.basis_info:
            header["BMODE"] = (str(self.basis_info["mode"]), "AL basis mode")
        for i, sigma in enumerate(self.basis_info.get("sigmas", ())):
            header[f"BSIG{i + 1}"] = (float(sigma), f"sigma of Gaussian {i + 1} (pixels)")
        for i, degree in enumerate(self.basis_info.get("degrees", ())):
            header[f"BDEG{i + 1}"] = (int(degree), f"polynomial degree of Gaussian {i + 1}")
        columns = [fits.Column(name="BASIS", format="J", array=np.arange(self.n_basis))]
        for t, (a, b) in enumerate(term_degrees(self.order)):
            columns.append(
                fits.Column(name=_term_name(a, b), format="D", array=self.coefficients[:, t])
            )
        table = fits.BinTableHDU.from_columns(columns, name="COEFFICIENTS")
        _write_domain(table.header, self.domain)
        table.header["SPORDER"] = self.order
        centre = fits.ImageHDU(self.image(), name="KERNEL")
        centre.header["KORIENT"] = "CORRELATION"
        cx, cy = self.domain_center()
        centre.header["KPOSX"] = (cx, "parent x where this image is evaluated")
        centre.header["KPOSY"] = (cy, "parent y where this image is evaluated")
        return fits.HDUList([primary, table, centre])

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList) -> SpatialKernel:
        """Read the product written by `to_hdulist`."""
        header = hdul[0].header
        if header.get("KORIENT", "CORRELATION") != "CORRELATION":
            raise ValueError(f"unsupported kernel orientation {header['KORIENT']!r}")
        order = int(header["SPORDER"])
        images = np.asarray(hdul[0].data, dtype=np.float64)
        table = hdul["COEFFICIENTS"].data
        coefficients = np.stack(
            [np.asarray(table[_term_name(a, b)], dtype=np.float64) for a, b in term_degrees(order)],
            axis=1,
        )
        info: dict = {}
        if "BMODE" in header:
            info["mode"] = header["BMODE"]
        sigmas = [header[f"BSIG{i}"] for i in range(1, 100) if f"BSIG{i}" in header]
        degrees = [header[f"BDEG{i}"] for i in range(1, 100) if f"BDEG{i}" in header]
        if sigmas:
            info["sigmas"] = sigmas
        if degrees:
            info["degrees"] = degrees
        return cls(images, coefficients, order, _read_domain(header), info)

    def write(self, path: str | os.PathLike) -> None:
        """Write the FITS product atomically (temporary file, then rename)."""
        _atomic_write(self.to_hdulist(), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> SpatialKernel:
        """Read a kernel written by `write`."""
        with fits.open(path) as hdul:
            return cls.from_hdulist(hdul)


# -- background ------------------------------------------------------------------------------


@dataclass
class BackgroundModel:
    """Differential background b(x, y) = sum_t d_t T_t(x', y') (Chebyshev, section 2.5).

    Parameters
    ----------
    coefficients : `numpy.ndarray` (n_terms,)
        In the order T0, T1(x'), T1(y'), T2(x'), T1(x')T1(y'), T2(y'), ...
    order : int
    domain : (min_x, min_y, max_x, max_y)
        Inclusive parent box of the Chebyshev domain.
    """

    coefficients: np.ndarray
    order: int
    domain: Box

    def __post_init__(self) -> None:
        self.order = int(self.order)
        self.coefficients = np.asarray(self.coefficients, dtype=np.float64).reshape(
            n_spatial_terms(self.order)
        )
        self.domain = tuple(int(v) for v in self.domain)  # type: ignore[assignment]

    @classmethod
    def zero(cls, order: int, domain: Box) -> BackgroundModel:
        """A background that is zero everywhere."""
        return cls(np.zeros(n_spatial_terms(order)), order, domain)

    def raised(self, order: int) -> BackgroundModel:
        """The same background written with the terms of a higher ``order`` (zeros added)."""
        if order <= self.order:
            return self
        index = {degrees: i for i, degrees in enumerate(term_degrees(order))}
        coefficients = np.zeros(n_spatial_terms(order))
        for d, degrees in zip(self.coefficients, term_degrees(self.order), strict=True):
            coefficients[index[degrees]] = d
        return BackgroundModel(coefficients, order, self.domain)

    def _matrix(self) -> np.ndarray:
        """Coefficients as c[a, b] of T_a(x') T_b(y')."""
        c = np.zeros((self.order + 1, self.order + 1))
        for d, (a, b) in zip(self.coefficients, term_degrees(self.order), strict=True):
            c[a, b] = d
        return c

    def evaluate(self, x, y) -> np.ndarray | float:
        """Background at parent positions (scalar or array)."""
        xp = _normalised(x, self.domain[0], self.domain[2])
        yp = _normalised(y, self.domain[1], self.domain[3])
        value = chebyshev.chebval2d(xp, yp, self._matrix())
        return float(value) if np.ndim(value) == 0 else value

    def image(self, shape: tuple[int, int], xy0: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Background on a full pixel grid (separable evaluation).

        Parameters
        ----------
        shape : (ny, nx)
        xy0 : (x0, y0)
            Parent position of pixel [0, 0].

        Returns
        -------
        image : `numpy.ndarray` (ny, nx), float32
        """
        out = np.zeros(shape, dtype=np.float32)
        self.add_to(out, xy0)
        return out

    def add_to(
        self,
        array: np.ndarray,
        xy0: tuple[int, int] = (0, 0),
        scale: float = 1.0,
        source: np.ndarray | None = None,
    ):
        """``array += scale * background`` in place, a block of rows at a time.

        The separable terms are combined in float64 along y and applied in float32
        along x: no frame-sized float64 temporary, rounding far below the noise.

        Parameters
        ----------
        array : `numpy.ndarray` (ny, nx), float32
        xy0 : (x0, y0)
            Parent position of pixel [0, 0].
        scale : float
        source : `numpy.ndarray` (ny, nx) or None
            When given, ``array = source + scale * background`` (``array`` is only
            written): the same numbers as copying ``source`` into it first, in one pass
            fewer.
        """
        ny, nx = array.shape
        tx = _axis_terms(np.arange(nx) + xy0[0], self.domain[0], self.domain[2], self.order)
        ty = _axis_terms(np.arange(ny) + xy0[1], self.domain[1], self.domain[3], self.order)
        left = (scale * (ty.T @ self._matrix().T)).astype(np.float32)  # (ny, order + 1)
        right = tx.astype(np.float32)
        step = max(1, _BLOCK_PIXELS // max(nx, 1))
        term = np.empty((min(step, ny), nx), dtype=np.float32)
        for y in range(0, ny, step):
            block = array[y : y + step]
            part = term[: block.shape[0]]
            # order + 1 broadcast products: a (rows, 3) @ (3, nx) matmul is 4x slower
            for t in range(right.shape[0]):
                np.multiply(left[y : y + step, t : t + 1], right[t], out=part)
                if t == 0 and source is not None:
                    np.add(source[y : y + step], part, out=block)
                else:
                    block += part

    def negated(self) -> BackgroundModel:
        """The model with every coefficient negated."""
        return BackgroundModel(-self.coefficients, self.order, self.domain)

    def to_hdulist(self) -> fits.HDUList:
        """FITS product: empty primary with the domain, table ``BACKGROUND`` of coefficients."""
        primary = fits.PrimaryHDU()
        primary.header["SPTYPE"] = ("CHEBYSHEV1", "b(x,y) = sum_t d_t T_a(x') T_b(y')")
        primary.header["SPORDER"] = (self.order, "Chebyshev total degree")
        _write_domain(primary.header, self.domain)
        primary.header["COMMENT"] = "x' = 2(x-xc)/W, xc = (DMINX+DMAXX)/2, W = DMAXX-DMINX+1;"
        primary.header["COMMENT"] = "likewise y'. x = column, y = row, parent pixel coordinates."
        degrees = term_degrees(self.order)
        table = fits.BinTableHDU.from_columns(
            [
                fits.Column(name="X_DEGREE", format="J", array=[a for a, _ in degrees]),
                fits.Column(name="Y_DEGREE", format="J", array=[b for _, b in degrees]),
                fits.Column(name="COEFFICIENT", format="D", array=self.coefficients),
            ],
            name="BACKGROUND",
        )
        return fits.HDUList([primary, table])

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList) -> BackgroundModel:
        """Read the product written by `to_hdulist`."""
        header = hdul[0].header
        order = int(header["SPORDER"])
        table = hdul["BACKGROUND"].data
        lookup = {
            (int(a), int(b)): float(c)
            for a, b, c in zip(
                table["X_DEGREE"], table["Y_DEGREE"], table["COEFFICIENT"], strict=True
            )
        }
        coefficients = [lookup.get(ab, 0.0) for ab in term_degrees(order)]
        return cls(np.array(coefficients), order, _read_domain(header))

    def write(self, path: str | os.PathLike) -> None:
        """Write the FITS product atomically."""
        _atomic_write(self.to_hdulist(), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> BackgroundModel:
        with fits.open(path) as hdul:
            return cls.from_hdulist(hdul)


# -- the solver ------------------------------------------------------------------------------

_log = logging.getLogger("alsub.kernel")

# afw's IQR -> sigma factor for the first clipping pass (section 0.4)
_IQR_TO_SIGMA = 0.741301109252802

_GOOD, _BAD, _UNUSED = "GOOD", "BAD", "UNUSED"

#: Candidates per batch of the single-kernel fits (stacks of a few MB each).
_CHUNK = 32


@dataclass
class KernelSolution:
    """Result of `fit_psf_matching_kernel`.

    Attributes
    ----------
    kernel : `SpatialKernel`
        K such that K * reference + b ~= target (correlation).
    background : `BackgroundModel`
        b, the differential background (zero when not fitted).
    candidates : `astropy.table.Table`
        Every kernel source: x, y, rating, cell, status (GOOD: used in the final
        spatial fit; BAD: rejected, see ``reason``; UNUSED: not needed, its cell
        already had ``n_star_per_cell`` usable candidates), ksum (single-kernel
        sum), resid_mean and resid_std (of D/sigma, last assessment), reason.
    n_good : int
        Candidates used in the final spatial fit.
    condition_number : float
        max/min eigenvalue of the spatial normal matrix scaled to a unit diagonal
        (`_scaled_condition_number`; Rubin's is of the matrix as it is, in mixed units).
    kernel_sum : float
        Kernel sum at the centre of the fit region (the flux ratio target/reference).
    basis : `core.basis.KernelBasis`
    orders : (int, int)
        Spatial orders of the kernel and the background actually fitted (lowered
        from the configured ones when the stamps do not support them).
    notes : list of str
        What a user should know about the solution (conditioning, rejections,
        lowered orders); the quality verdict judges the conditioning itself.
    """

    kernel: SpatialKernel
    background: BackgroundModel
    candidates: Table
    n_good: int
    condition_number: float
    kernel_sum: float
    basis: KernelBasis | None = None
    orders: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def clipped_mean_std(values, n_sigma: float = 3.0, n_iter: int = 3) -> tuple[float, float]:
    """afw MEANCLIP and STDEVCLIP (algorithm.md 0.4).

    The first pass keeps values within n_sigma * 0.7413 * IQR of the median, later
    passes within n_sigma clipped standard deviations of the clipped mean;
    unbiased variance. One value gives (value, 0); none gives (nan, nan).
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), 0.0
    q25, median, q75 = percentiles(x, [25.0, 50.0, 75.0])
    centre, half_width = median, n_sigma * _IQR_TO_SIGMA * (q75 - q25)
    mean = std = math.nan
    for _ in range(n_iter):
        kept = x[np.abs(x - centre) <= half_width]
        if kept.size == 0:
            return math.nan, math.nan
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
        centre, half_width = mean, n_sigma * std
    return mean, std


def _solve_normal(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """LU when the matrix is clearly invertible, else an eigen pseudo-inverse (section 3.3.4)."""
    n = matrix.shape[0]
    if np.all(np.isfinite(matrix)) and np.all(np.isfinite(vector)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            lu, piv = scipy.linalg.lu_factor(matrix, check_finite=False)
        pivots = np.abs(np.diag(lu))
        if pivots.min() > pivots.max() * n * np.finfo(np.float64).eps:
            solution = scipy.linalg.lu_solve((lu, piv), vector, check_finite=False)
            if np.all(np.isfinite(solution)):
                return solution
        values, vectors = scipy.linalg.eigh(matrix, check_finite=False)
        keep = np.abs(values) > np.abs(values).max() * n * np.finfo(np.float64).eps
        inverse = np.zeros_like(values)
        inverse[keep] = 1.0 / values[keep]
        return vectors @ (inverse * (vectors.T @ vector))
    return np.full(n, np.nan)


def _solve_normal_many(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """`_solve_normal` for a stack (n, m, m) and (n, m): one batched LU (the same LAPACK
    factorisation per matrix), the rare singular or non-finite ones one by one."""
    n = matrices.shape[1]
    out = np.full(vectors.shape, np.nan)
    finite = np.isfinite(matrices).all(axis=(1, 2)) & np.isfinite(vectors).all(axis=1)
    rows = np.flatnonzero(finite)
    if rows.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            lu, piv = scipy.linalg.lu_factor(matrices[rows], check_finite=False)
        pivots = np.abs(np.diagonal(lu, axis1=1, axis2=2))
        clear = pivots.min(axis=1) > pivots.max(axis=1) * n * np.finfo(np.float64).eps
        if clear.any():
            solved = scipy.linalg.lu_solve(
                (lu[clear], piv[clear]), vectors[rows[clear]][:, :, None], check_finite=False
            )[:, :, 0]
            ok = np.isfinite(solved).all(axis=1)
            out[rows[clear][ok]] = solved[ok]
            clear[np.flatnonzero(clear)[~ok]] = False
        for i in rows[~clear]:  # eigen pseudo-inverse, as the single solve does
            out[i] = _solve_normal(matrices[i], vectors[i])
    return out


def _renormalisation(transform: np.ndarray) -> bool:
    """Whether ``transform`` only rescales each image and subtracts multiples of the
    first (what `core.basis` builds), so that applying it is two broadcast products."""
    if transform.ndim != 2 or transform.shape[0] != transform.shape[1]:
        return False
    rest = transform - np.diag(np.diagonal(transform))
    rest[:, 0] = 0.0
    return not np.any(rest)


def _condition_number(matrix: np.ndarray) -> float:
    values = scipy.linalg.eigvalsh(matrix)
    if values.min() == 0:
        return math.inf
    return float(values.max() / values.min())


def _scaled_condition_number(matrix: np.ndarray) -> float:
    """`_condition_number` of ``matrix`` scaled to a unit diagonal (each unknown in its
    own unit). The spatial fit's unknowns are in different units: the kernel's are
    pure numbers, the background's the image's, so the raw eigenvalue ratio grows with
    the square of the image's scale (a pair in counts x 1000 read 1e12 for 1e7, and was
    refitted with a constant kernel and sky). Scaled, the number measures only how near
    the columns come to collinear (a pedestal under the stars, stamps in a line)."""
    diagonal = np.diagonal(matrix)
    if not np.all(diagonal > 0):
        return math.inf
    scale = 1.0 / np.sqrt(diagonal)
    return _condition_number(matrix * scale[:, None] * scale[None, :])


class _Candidate:
    """One kernel source: its stamps, single-kernel fit and status.

    ``centre`` is the parent position of the stamp's central pixel (default the source's),
    the origin of the stamp's local background terms.
    """

    def __init__(self, index, x, y, rating, cell, stamps, centre=None):
        self.index, self.x, self.y, self.rating, self.cell = index, x, y, rating, cell
        self.stamps = stamps  # dict of reference/target image/variance/mask stamps
        self.centre = (float(x), float(y)) if centre is None else centre
        self.status = ""
        self.reason = ""
        self.built = False
        self.ksum = math.nan
        self.resid_mean = math.nan
        self.resid_std = math.nan
        self.design: np.ndarray | None = None
        self.normal: np.ndarray | None = None
        self.rhs: np.ndarray | None = None
        # (domain, normal, rhs) with the background unknowns the global terms (`_stamp_systems`)
        self.system: tuple[Box, np.ndarray, np.ndarray] | None = None
        #: expected part of ``normal``'s kernel block made by the reference's own noise
        self.noise_gram: np.ndarray | None = None

    def reject(self, reason: str) -> None:
        self.status, self.reason = _BAD, reason


class _Fitter:
    """State of one fit: the basis, stamps geometry and the per-candidate algebra."""

    def __init__(
        self,
        basis: KernelBasis,
        config: KernelConfig,
        noise_area: float = 1.0,
        noise_correlation: np.ndarray | None = None,
    ):
        self.basis = basis
        self.config = config
        # the mean of D/sigma over a stamp of correlated noise scatters sqrt(area) times
        # more than over white noise: Rubin's absolute mean limit assumes white noise
        self.mean_floor = config.candidate_residual_mean_max * math.sqrt(max(noise_area, 1.0))
        self.nb = basis.n_basis
        self.k = basis.size
        self.h = basis.half
        self.flat_basis = basis.images.reshape(self.nb, -1)
        self.basis_sums = basis.images.sum(axis=(1, 2))
        self.with_bg = config.fit_for_background
        # Each stamp's background is a polynomial of the background's order in the
        # stamp's own coordinates, not Rubin's one constant: its normal equations then
        # hold the global background exactly at every pixel (`_stamp_systems`), and a
        # sky gradient in one image only no longer leaks into the kernel (a ramp of
        # +-1500 counts over 512 px moved the kernel 5 px, or took its sum to 0.05 for 1
        # when the ramp was in the convolved image). The single-kernel solve, which
        # feeds the clipping, takes the plane of those terms (constant, x, y): with a
        # constant the ramp still spoilt it in the convolved image.
        bg_order = config.spatial_bg_order
        self.n_local = n_spatial_terms(bg_order) if self.with_bg else 0
        self.n_stamp_bg = n_spatial_terms(min(1, bg_order)) if self.with_bg else 0
        self.n_solved = self.nb + self.n_stamp_bg  # the leading unknowns of each stamp
        # principal lattice of the local order (unisolvent for its polynomials) and the
        # inverse of the local terms there: global Chebyshev terms sampled on it give
        # their local coefficients exactly
        lattice = 2.0 * np.array(term_degrees(bg_order), dtype=np.float64) / max(bg_order, 1)
        self._lattice = lattice - 1.0
        self._lattice_inverse = np.linalg.inv(
            _local_monomials(self._lattice[:, 0], self._lattice[:, 1], bg_order).T
        )
        # the basis seen through the convolved image's noise correlation: what its noise
        # adds to the normal equations (`noise_grams`); None when that is not corrected
        self.noise_basis = (
            _correlated_basis(basis.images, noise_correlation).reshape(self.nb, -1)
            if config.correct_reference_noise
            else None
        )
        self.mean_centre = 0.0
        self.mean_limit = self.mean_floor
        self.std_limit = config.candidate_residual_std_max
        # basis spectra per stamp shape, for `correlate_basis`
        self._spectra: dict[tuple[int, ...], tuple[tuple[int, ...], np.ndarray]] = {}
        # band matrices of the separable design passes, for `_toeplitz`
        self._bands: dict[tuple, np.ndarray] = {}
        #: spatial fits left uncorrected for the reference's noise (a singular matrix)
        self.uncorrected_fits = 0
        # local background terms per side of the fitted region, for `local_background`
        self._local: dict[int, np.ndarray] = {}

    def local_background(self, good: int) -> np.ndarray:
        """(n_local, good^2): the stamp's background terms u^a v^b over its fitted region
        (u, v from -1 to 1 across it, in the order of `term_degrees`)."""
        cached = self._local.get(good)
        if cached is None:
            offsets = np.arange(good) - 0.5 * (good - 1)
            axis = offsets / max(0.5 * (good - 1), 1.0)
            u, v = np.meshgrid(axis, axis)  # rows y, columns x
            cached = _local_monomials(u.ravel(), v.ravel(), self.config.spatial_bg_order)
            self._local[good] = cached
        return cached

    def background_maps(self, cands: list[_Candidate], domain: Box, order: int) -> np.ndarray:
        """(n, n_local, n_terms(order)): column t of stamp i holds the global Chebyshev
        term T_t over that stamp in its local terms (exact: both are polynomials of
        degree <= order, which is at most the configured background order)."""
        centres = np.array([c.centre for c in cands], dtype=np.float64).reshape(-1, 2)
        scale = np.array(
            [max(0.5 * (c.stamps["ref"].shape[0] - self.k), 1.0) for c in cands]
        ).reshape(-1, 1)
        x = centres[:, :1] + scale * self._lattice[:, 0]  # (n, lattice points)
        y = centres[:, 1:] + scale * self._lattice[:, 1]
        terms = chebyshev_terms(x, y, order, domain)  # (n_terms, n, lattice points)
        return self._lattice_inverse @ terms.transpose(1, 2, 0)

    def background_in_stamps(
        self, cands: list[_Candidate], background: BackgroundModel
    ) -> np.ndarray:
        """(n, n_local): the local background coefficients of ``background`` in each stamp."""
        if not self.with_bg:
            return np.zeros((len(cands), 0))
        maps = self.background_maps(cands, background.domain, background.order)
        return maps @ background.coefficients

    def _convolved_variance(self, cand: _Candidate, kernel: np.ndarray) -> np.ndarray:
        """The reference variance correlated with K^2 over the fitted pixels, by FFT.

        The direct sum is sum_{u,v} ref_var[i + u, j + v] K[u, v]^2; with the stamp's
        spectrum kept with the candidate an assessment costs one small product and
        inverse transform instead of a (good^2, K^2) window matrix (equal to round-off).
        """
        s = cand.stamps
        shape = s["ref_var"].shape
        size = tuple(sp_fft.next_fast_len(n, real=True) for n in shape)
        spectrum = s.get("ref_var_hat")
        if spectrum is None:
            spectrum = s["ref_var_hat"] = sp_fft.rfft2(s["ref_var"].astype(np.float64), s=size)
        squared = (kernel.reshape(self.k, self.k) ** 2)[::-1, ::-1]
        full = sp_fft.irfft2(spectrum * sp_fft.rfft2(squared, s=size), s=size)
        k = self.k
        return full[k - 1 : shape[0], k - 1 : shape[1]].ravel()

    def correlate_basis(self, stamp: np.ndarray) -> np.ndarray:
        """(good^2, nb): column n = (B_n correlated with the stamp) over the fitted region.

        One real FFT of the stamp, a product with the (cached) spectra of the
        reflected basis images and one batched inverse transform: the same numbers
        as the direct windowed product (to ~1e-15 relative) at about a seventh of the
        cost of the separable passes for the default basis (1 ms vs 7 ms a stamp).
        """
        shape = stamp.shape
        spectra = self._spectra.get(shape)
        if spectra is None:
            size = tuple(sp_fft.next_fast_len(n, real=True) for n in shape)
            reflected = self.basis.images[:, ::-1, ::-1]
            spectra = (size, sp_fft.rfft2(reflected, s=size, axes=(1, 2)))
            self._spectra[shape] = spectra
        size, basis_spectra = spectra
        full = sp_fft.irfft2(basis_spectra * sp_fft.rfft2(stamp, s=size), s=size, axes=(1, 2))
        # linear convolution with the reflected image = correlation, valid part only
        k = self.k
        valid = full[:, k - 1 : shape[0], k - 1 : shape[1]]
        return valid.reshape(self.nb, -1).T

    def _inner(self, stamp: np.ndarray) -> np.ndarray:
        h = self.h
        return stamp[h : stamp.shape[0] - h, h : stamp.shape[1] - h].ravel()

    def noise_grams(self, ref_variances: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(n, nb, nb): what each stamp's reference noise adds, on average, to the kernel
        block of its normal matrix (errors in variables).

        Design column i is B_i correlated with the reference; the reference's noise e
        puts sum_p w_p (B_i . e)(p) (B_j . e)(p) into the normal matrix, whose mean is
        sum_u B_i(u) S(u) (B_j correlated with rho)(u) with S(u) = sum_p w_p var(p + u)
        over the fitted pixels p and rho the noise's normalised autocorrelation. Left
        in, it acts as a penalty on sum K^2 weighted by the reference's noise: the fit
        prefers broader kernels of smaller sum (an undersampled science convolved to a
        template 1.2x wider: sum 0.92 for 1.0, 15% of the kernel stars' flux left).

        Parameters
        ----------
        ref_variances : `numpy.ndarray` (n, S, S)
            Variance stamps of the reference.
        weights : `numpy.ndarray` (n,) or (n, good * good)
            The fit's weight of each stamp (constant weighting) or of each fitted pixel.
        """
        assert self.noise_basis is not None  # set when the correction is configured
        variances = np.nan_to_num(np.asarray(ref_variances, dtype=np.float64), nan=0.0)
        n, side = variances.shape[0], variances.shape[1]
        good = side - self.k + 1
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim == 1:
            sums = weights[:, None, None] * _window_sums(variances, good)
        else:
            sums = np.stack(
                [
                    signal.correlate(v, w.reshape(good, good), mode="valid")
                    for v, w in zip(variances, weights, strict=True)
                ]
            )
        weighted = self.flat_basis[None] * sums.reshape(n, 1, -1)
        grams = weighted @ self.noise_basis.T
        return 0.5 * (grams + grams.transpose(0, 2, 1))

    def build(self, cand: _Candidate, bad_bits: tuple[int, int]) -> None:
        """Single-kernel least squares for one candidate (section 3.3), with the stamp's
        background plane (its normal equations keep every local background term)."""
        cand.built = True
        s = cand.stamps
        target = self._inner(s["tgt"])
        design = self.correlate_basis(s["ref"])
        if self.with_bg:
            good = s["ref"].shape[0] - self.k + 1
            design = np.hstack([design, self.local_background(good).T])
        if not (np.all(np.isfinite(design)) and np.all(np.isfinite(target))):
            cand.reject("non-finite pixels in the stamp")
            return
        if self.config.constant_variance_weighting:
            median = float(np.nanmedian(s["tgt_var"] + s["ref_var"]))
            weight = 1.0 / median if np.isfinite(median) and median > 0 else 1.0
            normal = weight * (design.T @ design)
            rhs = weight * (design.T @ target)
        else:
            variance = self._inner(s["tgt_var"] + s["ref_var"])
            if not np.all(variance > 0):
                cand.reject("variance less than or equal to 0.0")
                return
            weighted = design / variance[:, np.newaxis]
            normal = design.T @ weighted
            rhs = weighted.T @ target
        m = self.n_solved
        solution = _solve_normal(normal[:m, :m], rhs[:m])
        if not np.all(np.isfinite(solution)):
            cand.reject(f"Unable to determine kernel solution {cand.index} (nan)")
            return
        if self.config.check_condition_number:
            condition = _condition_number(normal[:m, :m])
            if not condition <= self.config.max_condition_number:
                cand.reject(f"condition number {condition:.3g} too large")
                return
        cand.design, cand.normal, cand.rhs = design, normal, rhs
        if self.noise_basis is not None:
            weights = (
                np.array([weight])
                if self.config.constant_variance_weighting
                else (1.0 / variance)[None]
            )
            cand.noise_gram = self.noise_grams(s["ref_var"][None], weights)[0]
        coefficients = solution[: self.nb]
        background = np.zeros(self.n_local)
        background[: self.n_stamp_bg] = solution[self.nb :]
        cand.ksum = float(self.basis_sums @ coefficients)
        # pixels with a bad plane in the target, or in the reference under the kernel
        tgt_bad = (s["tgt_mask"] & bad_bits[0]) != 0
        ref_bad = (s["ref_mask"] & bad_bits[1]) != 0
        if ref_bad.any():  # (most stamps have no bad pixel: no filter then)
            ref_bad = ndimage.maximum_filter(ref_bad, size=self.k, mode="constant")
        s["bad"] = self._inner(tgt_bad | ref_bad)
        self.assess(cand, coefficients, background, clip=False)

    def assess(self, cand: _Candidate, coefficients, background, clip: bool) -> bool:
        """Residual statistics of D/sigma on the stamp (section 3.3.7); True if rejected.

        ``background`` holds the stamp's local background coefficients (n_local,).
        """
        s = cand.stamps
        assert cand.design is not None  # set by build() before any assessment
        kernel = coefficients @ self.flat_basis
        model = cand.design @ np.concatenate([coefficients, background])
        diff = self._inner(s["tgt"]) - model
        variance = self._inner(s["tgt_var"]) + self._convolved_variance(cand, kernel)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = diff / np.sqrt(variance)
        use = ~s["bad"] & np.isfinite(z) & (variance > 0)
        if self.config.use_core_stats:
            r = self.config.candidate_core_radius
            good = s["ref"].shape[0] - 2 * self.h  # side of the fitted region
            core = np.zeros((good, good), dtype=bool)
            c = good // 2
            core[c - r : c + r + 1, c - r : c + r + 1] = True
            use &= core.ravel()
        values = z[use]
        mean = float(values.mean()) if values.size else math.nan
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        cand.resid_mean, cand.resid_std = mean, std
        if not clip:
            cand.status = _GOOD
            return False
        return self.judge(cand)

    # -- batched path: what the solver runs ------------------------------------------------
    # `build` and `assess` above are the per-stamp reference; the methods below do the
    # same algebra for a stack of stamps at once (hundreds of stamps at 4096: the Python
    # and FFT-call overhead per stamp, not the arithmetic, was the cost).

    def _toeplitz(self, factors: np.ndarray, side: int) -> np.ndarray:
        """(side, good * m) band matrix: a line of ``side`` pixels times it is the line
        correlated with each of the m 1-D ``factors``, column o * m + p = output o, factor p.
        Kept per factors and side (the same few serve every stamp)."""
        key = (factors.tobytes(), factors.shape, side)
        cached = self._bands.get(key)
        if cached is None:
            cached = self._bands[key] = self._band(factors, side)
        return cached

    @staticmethod
    def _band(factors: np.ndarray, side: int) -> np.ndarray:
        m, k = factors.shape
        good = side - k + 1
        out = np.zeros((side, good, m))
        for o in range(good):
            out[o : o + k, o, :] = factors.T
        return out.reshape(side, good * m)

    def design_matrices(
        self, stamps: np.ndarray, extra_rows: np.ndarray | None = None
    ) -> np.ndarray:
        """(n, nb, good^2): `correlate_basis` of each of a stack of (n, S, S) stamps,
        transposed (one row per basis image, the layout the normal equations use),
        followed by ``extra_rows`` (m, good^2) when given (the background terms).

        The AL basis is a fixed linear mix (``basis.transform``) of separable images
        g(v) v^q g(u) u^p, so each row is two 1-D correlation passes, each pass one
        matrix product with a band matrix for the whole stack (about 0.5 M multiply-adds
        a default stamp, against 27 inverse FFTs); other bases take the FFT.
        """
        n, side = stamps.shape[0], stamps.shape[1]
        transform = self.basis.transform
        nb = self.nb
        if transform is None or stamps.shape[2] != side or not _renormalisation(transform):
            rows = [self.correlate_basis(stamp).T for stamp in stamps]
            if extra_rows is not None:
                rows = [np.vstack([r, extra_rows]) for r in rows]
            return np.stack(rows)
        good = side - self.k + 1
        # rows y, then stamps, then columns x: both passes are plain 2-D matrix products
        lines = stamps.transpose(1, 0, 2).reshape(side * n, side)
        raw = np.empty((nb, good, n, good))  # raw image, y, stamp, x
        order: list[int] = []  # raw images in the order computed
        column = 0
        for f, powers in self.basis.separable_factors():
            degree = f.shape[0] - 1
            for px in range(degree + 1):
                # pass along x (columns u), then along y (rows v) for each y power
                along_x = (lines @ self._toeplitz(f[px : px + 1], side)).reshape(side, n * good)
                q = degree - px + 1
                start = len(order)
                along_y = self._toeplitz(f[:q], side).T.reshape(good, q, side).transpose(1, 0, 2)
                raw[start : start + q] = (
                    np.ascontiguousarray(along_y).reshape(q * good, side) @ along_x
                ).reshape(q, good, n, good)
                order.extend(column + powers.index((px, py)) for py in range(q))
            column += len(powers)
        position = np.argsort(order)  # basis raw index -> where it was computed
        n_extra = 0 if extra_rows is None else extra_rows.shape[0]
        out = np.empty((n, nb + n_extra, good, good))
        view = out[:, :nb].transpose(1, 2, 0, 3)  # (nb, y, stamp, x)
        # the renormalisation rescales each raw image and subtracts a multiple of the first
        for k in range(nb):
            np.multiply(raw[position[k]], transform[k, k], out=view[k])
            if k > 0 and transform[k, 0] != 0.0:
                view[k] += transform[k, 0] * raw[position[0]]
        if extra_rows is not None:
            out[:, nb:] = extra_rows.reshape(n_extra, good, good)
        return out.reshape(n, out.shape[1], good * good)

    def _convolved_variances(self, cands: list[_Candidate], kernels: np.ndarray) -> np.ndarray:
        """`_convolved_variance` for same-shape candidates and (n, K^2) kernels at once."""
        shape = cands[0].stamps["ref_var"].shape
        size = tuple(sp_fft.next_fast_len(n, real=True) for n in shape)
        missing = [c for c in cands if c.stamps.get("ref_var_hat") is None]
        if missing:
            stack = np.stack([c.stamps["ref_var"] for c in missing]).astype(np.float64)
            for c, spectrum in zip(missing, sp_fft.rfft2(stack, s=size, axes=(1, 2)), strict=True):
                c.stamps["ref_var_hat"] = spectrum
        spectra = np.stack([c.stamps["ref_var_hat"] for c in cands])
        squared = (kernels.reshape(-1, self.k, self.k) ** 2)[:, ::-1, ::-1]
        full = sp_fft.irfft2(
            spectra * sp_fft.rfft2(squared, s=size, axes=(1, 2)), s=size, axes=(1, 2)
        )
        k = self.k
        return full[:, k - 1 : shape[0], k - 1 : shape[1]].reshape(len(cands), -1)

    def _chunks(self, cands: list[_Candidate]) -> list[list[_Candidate]]:
        """Same-shape groups of at most _CHUNK candidates (stacks stay a few MB; the
        chunks run on all cores)."""
        by_shape: dict[tuple[int, ...], list[_Candidate]] = {}
        for cand in cands:
            by_shape.setdefault(cand.stamps["ref"].shape, []).append(cand)
        return [
            members[i : i + _CHUNK]
            for members in by_shape.values()
            for i in range(0, len(members), _CHUNK)
        ]

    def build_many(self, cands: list[_Candidate], bad_bits: tuple[int, int]) -> None:
        """`build` for every candidate, batched by stamp shape."""
        thread_map(lambda chunk: self._build_chunk(chunk, bad_bits), self._chunks(cands))

    def _build_chunk(self, cands: list[_Candidate], bad_bits: tuple[int, int]) -> None:
        n = len(cands)
        for cand in cands:
            cand.built = True
        target = np.stack([self._inner(c.stamps["tgt"]) for c in cands])
        # (n, nb [+ n_local], pixels): one row per design column
        stamps = np.stack([c.stamps["ref"] for c in cands])
        good = stamps.shape[1] - self.k + 1
        rows = self.design_matrices(stamps, self.local_background(good) if self.with_bg else None)
        # a non-finite reference pixel spoils the FFT design of `build` everywhere; the
        # band products may leave it where a Gaussian tail underflows: tested directly
        finite = (
            np.isfinite(rows).all(axis=(1, 2))
            & np.isfinite(target).all(axis=1)
            & np.isfinite(stamps).all(axis=(1, 2))
        )
        columns = rows.transpose(0, 2, 1)
        positive = np.ones(n, dtype=bool)
        if self.config.constant_variance_weighting:
            total = np.stack([c.stamps["tgt_var"] + c.stamps["ref_var"] for c in cands])
            total = total.reshape(n, -1)
            if np.isfinite(total).all():  # the same medians, without nanmedian's row loop
                median = row_medians(total)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stamps
                    median = np.nanmedian(total, axis=1)
            ok = np.isfinite(median) & (median > 0)
            weight = np.where(ok, 1.0 / np.where(ok, median, 1.0), 1.0)
            normal = weight[:, None, None] * (rows @ columns)
            rhs = weight[:, None] * (rows @ target[:, :, None])[:, :, 0]
        else:
            variance = np.stack(
                [self._inner(c.stamps["tgt_var"] + c.stamps["ref_var"]) for c in cands]
            )
            positive = np.asarray((variance > 0).all(axis=1))
            # stamps with a variance <= 0 give inf/nan here; they are rejected below
            with np.errstate(divide="ignore", invalid="ignore"):
                weighted = rows / variance[:, None, :]
                normal = rows @ weighted.transpose(0, 2, 1)
                rhs = (weighted @ target[:, :, None])[:, :, 0]
        grams = None
        if self.noise_basis is not None:
            ref_variances = np.stack([c.stamps["ref_var"] for c in cands])
            if self.config.constant_variance_weighting:
                grams = self.noise_grams(ref_variances, weight)
            else:
                with np.errstate(divide="ignore"):
                    grams = self.noise_grams(ref_variances, np.where(variance > 0, 1 / variance, 0))
        solvable = finite & positive
        m = self.n_solved
        solution = np.full((n, m), np.nan)
        if solvable.any():
            solution[solvable] = _solve_normal_many(normal[solvable, :m, :m], rhs[solvable, :m])
        fitted = []
        for i, cand in enumerate(cands):
            if not finite[i]:
                cand.reject("non-finite pixels in the stamp")
                continue
            if not positive[i]:
                cand.reject("variance less than or equal to 0.0")
                continue
            if not np.all(np.isfinite(solution[i])):
                cand.reject(f"Unable to determine kernel solution {cand.index} (nan)")
                continue
            if self.config.check_condition_number:
                condition = _condition_number(normal[i, :m, :m])
                if not condition <= self.config.max_condition_number:
                    cand.reject(f"condition number {condition:.3g} too large")
                    continue
            cand.design, cand.normal, cand.rhs = columns[i], normal[i], rhs[i]
            if grams is not None:
                cand.noise_gram = grams[i]
            cand.ksum = float(self.basis_sums @ solution[i, : self.nb])
            s = cand.stamps
            tgt_bad = (s["tgt_mask"] & bad_bits[0]) != 0
            ref_bad = (s["ref_mask"] & bad_bits[1]) != 0
            if ref_bad.any():  # (most stamps have no bad pixel: no filter then)
                ref_bad = ndimage.maximum_filter(ref_bad, size=self.k, mode="constant")
            s["bad"] = self._inner(tgt_bad | ref_bad)
            fitted.append(i)
        if fitted:
            background = np.zeros((len(fitted), self.n_local))
            background[:, : self.n_stamp_bg] = solution[fitted, self.nb :]
            self._assess_chunk([cands[i] for i in fitted], solution[fitted, : self.nb], background)

    def assess_many(self, cands: list[_Candidate], coefficients, backgrounds) -> None:
        """`assess` (clip=False) for every candidate: (n, nb) coefficients, (n, n_local)
        local background coefficients."""
        position = {id(c): i for i, c in enumerate(cands)}
        coefficients = np.asarray(coefficients, dtype=np.float64)
        backgrounds = np.asarray(backgrounds, dtype=np.float64)

        def run(chunk):
            rows = [position[id(c)] for c in chunk]
            self._assess_chunk(chunk, coefficients[rows], backgrounds[rows])

        thread_map(run, self._chunks(cands))

    def _assess_chunk(self, cands: list[_Candidate], coefficients, backgrounds) -> None:
        kernels = coefficients @ self.flat_basis
        convolved = self._convolved_variances(cands, kernels)
        unknowns = np.hstack([coefficients, backgrounds])
        model = np.stack(
            [cast(np.ndarray, c.design) @ a for c, a in zip(cands, unknowns, strict=True)]
        )
        diff = np.stack([self._inner(c.stamps["tgt"]) for c in cands]) - model
        variance = np.stack([self._inner(c.stamps["tgt_var"]) for c in cands]) + convolved
        with np.errstate(divide="ignore", invalid="ignore"):
            z = diff / np.sqrt(variance)
        bad = np.stack([c.stamps["bad"] for c in cands])
        use = ~bad & np.isfinite(z) & (variance > 0)
        if self.config.use_core_stats:
            r = self.config.candidate_core_radius
            good = cands[0].stamps["ref"].shape[0] - 2 * self.h
            core = np.zeros((good, good), dtype=bool)
            c = good // 2
            core[c - r : c + r + 1, c - r : c + r + 1] = True
            use &= core.ravel()
        count = use.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(use, z, 0.0).sum(axis=1) / count
            deviation = np.where(use, z - mean[:, None], 0.0)
            std = np.sqrt((deviation * deviation).sum(axis=1) / (count - 1))
        mean[count == 0] = np.nan
        std[count <= 1] = np.nan
        for cand, m, s in zip(cands, mean, std, strict=True):
            cand.resid_mean, cand.resid_std = float(m), float(s)
            cand.status = _GOOD

    def judge(self, cand: _Candidate) -> bool:
        """Reject ``cand`` if its residual statistics pass the current limits; True if so."""
        mean, std = cand.resid_mean, cand.resid_std
        if not (np.isfinite(mean) and np.isfinite(std)):
            cand.reject("residual statistics are NaN")
        elif abs(mean - self.mean_centre) > self.mean_limit:
            cand.reject(
                f"|mean(D/sigma) - {self.mean_centre:.3f}| = {abs(mean - self.mean_centre):.3f} "
                f"> {self.mean_limit:.3f}"
            )
        elif std > self.std_limit:
            cand.reject(f"std(D/sigma) = {std:.3f} > {self.std_limit:.3f}")
        else:
            cand.status, cand.reason = _GOOD, ""
            return False
        return True

    def set_limits(self, candidates: list[_Candidate]) -> None:
        """Residual limits from the ensemble of fitted candidates (never below the config's).

        Rubin's limits are absolute (|mean| 0.25, std 1.5 in units of the pixel noise).
        Real PSFs are matched to a fraction of a percent, so residuals grow with
        flux and correlated noise widens them: absolute limits reject the brightest,
        best stars first. A candidate is an outlier when its statistics stand more
        than ``candidate_clip_sigma`` robust spreads beyond the ensemble's.
        """
        config = self.config
        self.mean_centre = 0.0
        self.mean_limit = self.mean_floor
        self.std_limit = config.candidate_residual_std_max
        means = np.array([c.resid_mean for c in candidates], dtype=np.float64)
        stds = np.array([c.resid_std for c in candidates], dtype=np.float64)
        ok = np.isfinite(means) & np.isfinite(stds)
        if np.count_nonzero(ok) < config.min_ensemble_candidates:
            return
        means, stds = means[ok], stds[ok]
        k = config.candidate_clip_sigma
        centre = float(np.median(means))
        spread = float(mad_std(means))
        if abs(centre) <= self.mean_floor:
            centre = 0.0
        self.mean_centre = centre
        self.mean_limit = max(self.mean_limit, k * spread)
        self.std_limit = max(self.std_limit, float(np.median(stds)) + k * float(mad_std(stds)))


def _window_sums(images: np.ndarray, size: int) -> np.ndarray:
    """(n, S - size + 1, S - size + 1): sums of each (n, S, S) image over every size x size
    window (summed-area tables)."""
    table = np.zeros((images.shape[0], images.shape[1] + 1, images.shape[2] + 1))
    table[:, 1:, 1:] = images.cumsum(axis=1).cumsum(axis=2)
    return (
        table[:, size:, size:]
        - table[:, :-size, size:]
        - table[:, size:, :-size]
        + table[:, :-size, :-size]
    )


def _correlated_basis(images: np.ndarray, correlation: np.ndarray | None) -> np.ndarray:
    """The basis images correlated with a noise autocorrelation (copies for white noise)."""
    if correlation is None:
        return np.array(images, dtype=np.float64)
    rho = np.asarray(correlation, dtype=np.float64)
    return np.stack([ndimage.correlate(image, rho, mode="constant") for image in images])


#: Least share of the normal matrix kept in any direction by `_without_noise`. Where the
#: reference's noise makes much of it, the data hold little of that direction's signal
#: (a wide kernel's faint wings) and a full correction divides by a difference of
#: near-equal numbers. On 48 simulated fits (science 1.2-3 px against 1.5-4 px, noisy
#: templates) 0.5 scattered the preconvolution kernels' sums to 11% off, 0.9 left the
#: bright stars' residuals up to 4%; 0.75 keeps sums within 6.5%, residuals within 2.2%.
_MIN_SIGNAL_SHARE = 0.75


def _without_noise(matrix: np.ndarray, noise: np.ndarray) -> np.ndarray | None:
    """``matrix - noise``, with the correction limited to keep at least
    `_MIN_SIGNAL_SHARE` of ``matrix`` in every direction (None when ``matrix`` is not
    positive definite: nothing is corrected then).

    In the metric of ``matrix`` = L L^T, noise = L A L^T with A = V diag(nu) V^T, so
    matrix - noise = L V diag(1 - nu) V^T L^T; each factor 1 - nu is floored.
    """
    try:
        lower = scipy.linalg.cholesky(matrix, lower=True, check_finite=True)
    except (np.linalg.LinAlgError, ValueError):
        return None
    half = scipy.linalg.solve_triangular(lower, noise, lower=True)
    share = scipy.linalg.solve_triangular(lower, half.T, lower=True)
    nu, vectors = scipy.linalg.eigh(0.5 * (share + share.T))
    kept = np.maximum(1.0 - nu, _MIN_SIGNAL_SHARE)
    factor = lower @ vectors
    return (factor * kept) @ factor.T


def _rating(sources: Table, rating_column: str | None, n: int) -> np.ndarray:
    names = {name.lower(): name for name in sources.colnames}
    for key in ([rating_column] if rating_column else []) + ["flux", "psf_flux", "snr"]:
        if key and key.lower() in names:
            values = np.asarray(sources[names[key.lower()]], dtype=np.float64)
            return np.where(np.isfinite(values), values, -np.inf)
    return np.zeros(n)


def _stamp(exposure: Exposure, box: Box) -> dict | None:
    x0, y0 = exposure.xy0
    i0, j0, i1, j1 = box[0] - x0, box[1] - y0, box[2] - x0 + 1, box[3] - y0 + 1
    if i0 < 0 or j0 < 0 or i1 > exposure.width or j1 > exposure.height:
        return None
    window = np.s_[j0:j1, i0:i1]
    return {
        "image": exposure.image[window].astype(np.float64),
        "variance": exposure.variance[window].astype(np.float64),
        "mask": exposure.mask[window],
    }


_BOX_COLUMNS = ("stamp_x0", "stamp_y0", "stamp_x1", "stamp_y1")


def _make_candidates(
    reference, target, sources, bbox, stamp_size, config, rating_column, half, pedestal=0.0
):
    """Candidates with stamps, grouped in cells of size_cell_x x size_cell_y (section 3.2);
    the reference's stamps less ``pedestal``."""
    n = len(sources)
    xs = np.asarray(sources["x"], dtype=np.float64) if n else np.zeros(0)
    ys = np.asarray(sources["y"], dtype=np.float64) if n else np.zeros(0)
    ratings = _rating(sources, rating_column, n) if n else np.zeros(0)
    # the selection's stamp boxes as one (n, 4) array: no per-row table look-ups
    boxes = (
        np.column_stack([np.asarray(sources[name]) for name in _BOX_COLUMNS])
        if stamp_size is None and n
        else None
    )
    all_candidates, cells = [], {}
    for index in range(n):
        x, y = float(xs[index]), float(ys[index])
        cand = _Candidate(index, x, y, float(ratings[index]), (-1, -1), {})
        all_candidates.append(cand)
        if not (np.isfinite(x) and np.isfinite(y)):
            cand.reject("non-finite position")
            continue
        ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
        if not (bbox[0] <= ix <= bbox[2] and bbox[1] <= iy <= bbox[3]):
            cand.reject(f"Unable to insert a candidate at ({x:.1f}, {y:.1f}): outside {bbox}")
            continue
        if boxes is not None:  # the selection's stamp box
            box = tuple(int(v) for v in boxes[index])
            side = box[2] - box[0] + 1
            if side != box[3] - box[1] + 1 or side % 2 == 0 or side <= 2 * half:
                cand.reject(f"stamp box {box} is not odd, square and larger than the kernel")
                continue
        else:
            r = stamp_size // 2
            box = (ix - r, iy - r, ix + r, iy + r)
        ref, tgt = _stamp(reference, box), _stamp(target, box)
        if ref is None or tgt is None:
            cand.reject("stamp not fully inside both images")
            continue
        cand.stamps = {
            "ref": ref["image"] - pedestal if pedestal else ref["image"],
            "ref_var": ref["variance"],
            "ref_mask": ref["mask"],
            "tgt": tgt["image"],
            "tgt_var": tgt["variance"],
            "tgt_mask": tgt["mask"],
        }
        cand.centre = (0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3]))
        cand.cell = ((ix - bbox[0]) // config.size_cell_x, (iy - bbox[1]) // config.size_cell_y)
        cells.setdefault(cand.cell, []).append(cand)
    for members in cells.values():
        members.sort(key=lambda c: -c.rating)  # stable: catalog order breaks ties
    return all_candidates, cells


def _visit(cells: dict, n_per_cell: int) -> list[_Candidate]:
    """The first n_per_cell non-BAD candidates of each cell, by rating."""
    chosen = []
    for key in sorted(cells):
        usable = [c for c in cells[key] if c.status != _BAD]
        chosen.extend(usable[:n_per_cell])
    return chosen


def _hint() -> str:
    return (
        " Provide more (or brighter, isolated, unsaturated) kernel sources, check that the "
        "PSF sizes are right, or relax kernel.candidate_residual_mean_max / "
        "candidate_residual_std_max."
    )


def _supported_order(x, y, order: int, domain: Box, per_term: float, max_condition: float) -> int:
    """Highest order <= ``order`` the positions constrain: enough and well spread.

    Order o needs ``per_term`` stamps per Chebyshev term and a design matrix of
    those terms at the stamps whose condition number stays below ``max_condition``
    (three stamps in a line cannot fit a plane).
    """
    while order > 0:
        if len(x) >= per_term * n_spatial_terms(order):
            design = chebyshev_terms(x, y, order, domain).T
            if np.linalg.cond(design) < max_condition:
                return order
        order -= 1
    return 0


def _kernel_order_cap(config: KernelConfig) -> int:
    """The highest kernel order the configuration allows."""
    if config.choose_spatial_kernel_order:
        return config.max_spatial_kernel_order
    return config.spatial_kernel_order


def _supported_background_order(fitter: _Fitter, used: list[_Candidate], domain: Box) -> int:
    """Highest background order <= the configured one the stamps' pixels determine.

    The background terms enter the fit at every pixel of the stamps (`_stamp_systems`),
    so each stamp constrains its own plane, not one value: an order is supported when
    the design of its terms over those pixels is conditioned within
    ``max_spatial_design_condition``, however few the stamps. (Lowered by the stamp
    count, as the kernel's order is, a curved sky on 8 stamps was fitted with a
    constant that the kernel absorbed: kernel sum -5.9 for 1.)
    """
    order = fitter.config.spatial_bg_order
    if not fitter.with_bg or order == 0:
        return 0
    maps = fitter.background_maps(used, domain, order)  # (n, n_local, n_terms)
    sides = np.array([c.stamps["ref"].shape[0] - fitter.k + 1 for c in used])
    gram = np.zeros((maps.shape[2], maps.shape[2]))
    for good in np.unique(sides):  # sum over stamps of (terms at its pixels)^2
        local = fitter.local_background(int(good))
        same = maps[sides == good]
        gram += np.tensordot(same, (local @ local.T) @ same, axes=([0, 1], [0, 1]))
    while order > 0:
        values = scipy.linalg.eigvalsh(gram[: n_spatial_terms(order), : n_spatial_terms(order)])
        if values[0] > 0 and values[-1] < fitter.config.max_spatial_design_condition**2 * values[0]:
            return order
        order -= 1
    return 0


def _spatial_orders(fitter: _Fitter, used: list[_Candidate], domain: Box) -> tuple[int, int]:
    """Kernel and background orders the good stamps support (at most the configured ones)."""
    config = fitter.config
    x = np.array([c.x for c in used])
    y = np.array([c.y for c in used])
    per, cond = config.min_stamps_per_spatial_term, config.max_spatial_design_condition
    return (
        _supported_order(x, y, _kernel_order_cap(config), domain, per, cond),
        _supported_background_order(fitter, used, domain),
    )


def _held_out_scores(fitter, used, domain, orders, folds) -> dict[int, np.ndarray]:
    """Per-stamp residual score, for every kernel order up to ``orders[0]``, of fits that
    did not see the stamp (orders whose fits fail are left out).

    A stamp's chi^2 under coefficients a is c - 2 a.b + a.N.a (N, b its normal
    equations): c is the same for every model, so a.N.a - 2 a.b ranks them. The
    folds' systems are assembled once at the highest order: a training system is the
    total less its fold's, and a lower order's unknowns are a subset of a higher's
    (its Chebyshev terms come first).
    """
    top, bg_order = orders
    nb, n_top = fitter.nb, n_spatial_terms(top)
    fold_of = np.arange(len(used)) % folds
    members = [np.flatnonzero(fold_of == f) for f in range(folds)]
    systems = [_spatial_system(fitter, [used[i] for i in m], domain, orders) for m in members]
    total_matrix = sum(matrix for matrix, _ in systems)
    total_rhs = sum(rhs for _, rhs in systems)
    xs = np.array([c.x for c in used])
    ys = np.array([c.y for c in used])
    # the stamps' systems in the global background terms: a fit's own coefficients
    normals, rhs_single = _stamp_systems(fitter, used, domain, bg_order)
    n_bg = n_spatial_terms(bg_order) if fitter.with_bg else 0
    scores: dict[int, np.ndarray] = {}
    for order in range(top + 1):
        n_sp = n_spatial_terms(order)
        kernel_rows = (1 + np.arange(nb - 1)[:, None] * n_top + np.arange(n_sp)).ravel()
        keep = np.concatenate([[0], kernel_rows, total_rhs.size - n_bg + np.arange(n_bg)]).astype(
            int
        )
        terms = chebyshev_terms(xs, ys, order, domain).T  # (n, n_sp)
        score = np.empty(len(used))
        for (matrix, rhs), test in zip(systems, members, strict=True):
            train = (total_matrix - matrix)[np.ix_(keep, keep)]
            train = 0.5 * (train + train.T)
            # (no condition check: a noise-driven fit predicts held-out stamps badly, and
            # the final fit at the chosen order is checked by `_conditioned_fit`)
            solution = _solve_normal(train, (total_rhs - rhs)[keep])
            if not np.all(np.isfinite(solution)):
                break
            # single-kernel coefficients the fit predicts at the held-out stamps
            kernel = solution[1 : 1 + (nb - 1) * n_sp].reshape(nb - 1, n_sp)
            predicted = [np.full((test.size, 1), solution[0]), terms[test] @ kernel.T]
            if n_bg:
                predicted.append(np.broadcast_to(solution[-n_bg:], (test.size, n_bg)))
            a = np.hstack(predicted)
            score[test] = np.einsum("ij,ijk,ik->i", a, normals[test], a) - 2.0 * np.einsum(
                "ij,ij->i", a, rhs_single[test]
            )
        else:
            if np.all(np.isfinite(score)):
                scores[order] = score
    return scores


def _chosen_orders(fitter, used, config: KernelConfig, domain: Box, previous=None):
    """Spatial orders for the fit, the orders the stamps support, and a note when the
    kernel's was chosen by cross-validation.

    With ``choose_spatial_kernel_order`` every kernel order the stamps support (up to
    ``max_spatial_kernel_order``) is fitted without each fold of stamps and scored on
    it; the lowest order whose held-out chi^2 is within one unit per stamp of the best
    is taken. (A standard-error margin was tried: the gains sit on the few bright stamps,
    so it was wide and kept order 0 where order 1 took 76 from 22 stamps' held-out chi^2
    and halved the residuals at bright stars.)
    """
    supported = _spatial_orders(fitter, used, domain)
    kernel_order, bg_order = supported
    if not config.choose_spatial_kernel_order or kernel_order == 0:
        return supported, supported, None
    if previous is not None:
        # a later spatial iteration (a few outliers clipped) keeps the first choice
        order, note = previous
        return (min(order, kernel_order), bg_order), supported, note
    folds = min(config.cross_validation_folds, len(used))
    scores = _held_out_scores(fitter, used, domain, supported, folds)
    if not scores:
        return (0, bg_order), supported, None
    # the lowest order within one unit of chi^2 per stamp of the best: a smaller gain is
    # beyond what any stamp's residual shows, and each term costs a frame convolution
    best = min(scores[o].sum() for o in scores)
    chosen = min(o for o in scores if scores[o].sum() <= best + len(used))
    lowest = min(scores)
    gains = ", ".join(
        f"order {o} {scores[o].sum() - scores[lowest].sum():+.4g}" for o in sorted(scores)
    )
    note = (
        f"kernel spatial order {chosen} chosen by {folds}-fold cross-validation on "
        f"{len(used)} stamps (held-out chi^2 against order {lowest}: {gains})"
    )
    return (chosen, bg_order), supported, note


def _stamp_systems(fitter: _Fitter, used: list[_Candidate], domain: Box, bg_order: int):
    """Each stamp's normal equations with its background unknowns the global background's
    Chebyshev terms at ``bg_order``, evaluated at every pixel: (n, m, m) and (n, m), m =
    nb + n_terms(bg_order) (nb without a background).

    Rubin evaluates the background terms at the stamp centre (one constant per stamp);
    a differential sky gradient is then left in every stamp for the kernel to absorb.
    Each stamp's system is transformed once, at the configured order, and kept with it:
    a lower order's terms come first, so its system is a leading block.
    """
    nb = fitter.nb
    missing = [c for c in used if c.system is None or c.system[0] != domain]
    if missing:
        # fitted candidates all carry their normal equations (set by _Fitter.build)
        normals = np.stack([cast(np.ndarray, c.normal) for c in missing])
        rhs = np.stack([cast(np.ndarray, c.rhs) for c in missing])
        if fitter.with_bg:
            maps = fitter.background_maps(missing, domain, fitter.config.spatial_bg_order)
            to_local = maps.transpose(0, 2, 1)
            normals[:, :nb, nb:] = normals[:, :nb, nb:] @ maps
            normals[:, nb:, :nb] = normals[:, :nb, nb:].transpose(0, 2, 1)
            normals[:, nb:, nb:] = to_local @ normals[:, nb:, nb:] @ maps
            rhs[:, nb:] = (to_local @ rhs[:, nb:, None])[:, :, 0]
        for cand, normal, vector in zip(missing, normals, rhs, strict=True):
            cand.system = (domain, normal, vector)
    m = nb + n_spatial_terms(bg_order) if fitter.with_bg else nb
    systems = [cast(tuple, c.system) for c in used]
    return np.stack([s[1][:m, :m] for s in systems]), np.stack([s[2][:m] for s in systems])


def _spatial_system(
    fitter: _Fitter, used: list[_Candidate], domain: Box, orders, noise: bool = False
):
    """Normal matrix and right-hand side of the global fit at ``orders`` (section 3.5).

    Unknowns: the constant coefficient of basis 0, then basis k's Chebyshev terms at
    ``1 + (k - 1) * n_terms + t``, then the background's terms. ``noise``: the matrix
    assembled from the stamps' noise grams (`_Fitter.noise_grams`) instead of their
    normal matrices (the part of the global matrix the reference's noise makes).
    """
    nb = fitter.nb
    kernel_order, bg_order = orders
    x = np.array([c.x for c in used])
    y = np.array([c.y for c in used])
    p = chebyshev_terms(x, y, kernel_order, domain).T  # (n, n_sp)
    normals, rhs_single = _stamp_systems(fitter, used, domain, bg_order)
    n = len(used)
    # Single-kernel unknown k of candidate n stands for the global unknowns w_n^k times
    # its coefficient: a_0 is constant (w = 1), a_k varies as the kernel terms p_n, and
    # the background unknowns of `_stamp_systems` are the global ones (w = 1). The
    # global normal matrix sum_n E_n^T N_n E_n is then, block by block,
    # sum_n N_n[k, l] w_n^k (w_n^l)^T: one small matrix product per pair of kinds
    # instead of a (n, n_single, n_unknown) expansion.
    kinds = [(slice(0, 1), np.ones((n, 1)))]
    if nb > 1:
        kinds.append((slice(1, nb), p))
    if fitter.with_bg:
        kinds.append((slice(nb, normals.shape[1]), np.ones((n, 1))))
    if noise:  # the noise grams in the kernel block of the stamps' systems
        grams = np.stack([cast(np.ndarray, c.noise_gram) for c in used])
        normals = np.zeros_like(normals)
        normals[:, :nb, :nb] = grams
    blocks = []
    rhs_parts = []
    for rows_a, wa in kinds:
        size_a = rows_a.stop - rows_a.start
        rhs_parts.append((rhs_single[:, rows_a].T @ wa).ravel())
        row = []
        for rows_b, wb in kinds:
            size_b = rows_b.stop - rows_b.start
            pair = normals[:, rows_a, rows_b].reshape(n, -1)
            outer = (wa[:, :, np.newaxis] * wb[:, np.newaxis, :]).reshape(n, -1)
            block = (pair.T @ outer).reshape(size_a, size_b, wa.shape[1], wb.shape[1])
            row.append(block.transpose(0, 2, 1, 3).reshape(size_a * wa.shape[1], -1))
        blocks.append(row)
    return np.block(blocks), np.concatenate(rhs_parts)


def _spatial_fit(
    fitter: _Fitter,
    used: list[_Candidate],
    config: KernelConfig,
    domain: Box,
    orders: tuple[int, int] | None = None,
):
    """Global fit from the per-candidate normal equations (section 3.5).

    ``orders`` (kernel, background) default to the configured ones.
    """
    nb = fitter.nb
    kernel_order, bg_order = orders or (config.spatial_kernel_order, config.spatial_bg_order)
    n_sp = n_spatial_terms(kernel_order)
    n_bg = n_spatial_terms(bg_order) if fitter.with_bg else 0
    n_unknown = 1 + (nb - 1) * n_sp + n_bg
    matrix, rhs = _spatial_system(fitter, used, domain, (kernel_order, bg_order))
    assert matrix.shape == (n_unknown, n_unknown)
    matrix = 0.5 * (matrix + matrix.T)
    if fitter.noise_basis is not None:
        # errors in variables: the reference's own noise is part of the normal matrix
        noise, _ = _spatial_system(fitter, used, domain, (kernel_order, bg_order), noise=True)
        corrected = _without_noise(matrix, 0.5 * (noise + noise.T))
        if corrected is None:
            fitter.uncorrected_fits += 1
        else:
            matrix = 0.5 * (corrected + corrected.T)
    solution = _solve_normal(matrix, rhs)
    condition = _scaled_condition_number(matrix) if np.all(np.isfinite(matrix)) else math.nan
    if not np.all(np.isfinite(solution[: n_unknown - n_bg])):
        raise KernelSolutionError(
            f"Unable to determine spatial kernel solution (nan). Condition number = "
            f"{condition:.3g}; the kernel sources do not constrain the kernel, give more "
            "sources spread over the image or lower kernel.spatial_kernel_order."
        )
    if not np.all(np.isfinite(solution[n_unknown - n_bg :])):
        raise KernelSolutionError(
            "Unable to determine spatial background solution (nan); lower "
            "kernel.spatial_bg_order or give more kernel sources."
        )
    coefficients = np.zeros((nb, n_sp))
    coefficients[0, 0] = solution[0]
    coefficients[1:] = solution[1 : 1 + (nb - 1) * n_sp].reshape(nb - 1, n_sp)
    kernel = SpatialKernel(
        fitter.basis.images,
        coefficients,
        kernel_order,
        domain,
        {
            "mode": fitter.basis.mode,
            "sigmas": list(fitter.basis.sigmas),
            "degrees": list(fitter.basis.degrees),
        },
    )
    if fitter.with_bg:
        background = BackgroundModel(solution[n_unknown - n_bg :], bg_order, domain)
    else:
        background = BackgroundModel.zero(bg_order, domain)
    return kernel, background, condition


def _spatial_warnings(n_good, n_bad, config, condition, orders, planned, supported) -> list[str]:
    """What a user should know about the spatial solution (returned; logged as warnings
    but for routinely lowered orders).

    ``orders`` were fitted, ``planned`` chosen before the conditioning check,
    ``supported`` what the stamps allow. The conditioning itself is judged by the
    quality verdict; these are notes.
    """
    notes = []
    if not (0 <= condition <= config.max_spatial_condition_number):
        notes.append(f"spatial kernel condition number {condition:.3g} is large or negative")
    if n_bad > 2 * n_good:
        notes.append(f"many more kernel candidates rejected ({n_bad}) than accepted ({n_good})")
    if tuple(orders) != tuple(planned):
        notes.append(
            f"the spatial solution at orders {planned[0]} (kernel) and {planned[1]} "
            f"(background) was ill-conditioned; refitted at {orders[0]} and {orders[1]}"
        )
    for note in notes:
        _log.warning("%s", note)
    # below the nominal orders the kernel may not follow real variation, but few stamps
    # (a small frame) routinely support no more: a note, not a warning (the background
    # is refitted at its configured order on all sky pixels afterwards)
    configured = (config.spatial_kernel_order, config.spatial_bg_order)
    if supported[0] < configured[0] or supported[1] < configured[1]:
        lowered = (
            f"{n_good} kernel stamps support spatial orders {supported[0]} (kernel) and "
            f"{supported[1]} (background) in the kernel fit, lowered from {configured[0]} "
            f"and {configured[1]}"
        )
        _log.info("%s", lowered)
        notes.append(lowered)
    return notes


def _build_until_stable(fitter: _Fitter, cells: dict, config: KernelConfig, bad_bits) -> None:
    """Build single kernels for the visited candidates until a pass rejects nothing.

    Each pass fits the candidates now first in their cells, sets the residual limits
    from all fitted candidates, and rejects the outliers among the visited ones.
    """
    while True:
        todo = [c for c in _visit(cells, config.n_star_per_cell) if not c.built]
        # candidates are independent: built on all cores (FFTs and small solves release
        # the GIL); the warning filter is set once around them (catch_warnings inside
        # threads would race on the global filter list)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            fitter.build_many(todo, bad_bits)
        rejected = sum(cand.status == _BAD for cand in todo)
        if config.single_kernel_clipping:
            fitted = [
                c for cells_ in cells.values() for c in cells_ if c.built and c.design is not None
            ]
            fitter.set_limits(fitted)
            for cand in _visit(cells, config.n_star_per_cell):
                rejected += fitter.judge(cand)
        if rejected == 0:
            return


def fit_psf_matching_kernel(
    reference: Exposure,
    target: Exposure,
    sources: Table,
    basis: KernelBasis,
    config: KernelConfig,
    *,
    bbox: Box | None = None,
    task: Task | None = None,
    stamp_size: int | None = None,
    rating_column: str | None = None,
    noise_area: float = 1.0,
) -> KernelSolution:
    """Fit the spatially varying kernel K and background b with K * reference + b ~= target.

    Sections 3.2-3.5: candidates in cells of ``size_cell_x`` x ``size_cell_y``,
    single-kernel weighted least squares per stamp with residual clipping,
    kernel-sum clipping, then a global spatial fit from the per-stamp normal
    equations with spatial assessment, up to ``max_spatial_iterations``. Unlike
    Rubin's, the background's terms are evaluated at every pixel of the stamps (and
    each single-kernel fit has a plane, not a constant), so a smooth sky in one image
    only is the background's and does not bend the kernel.

    Parameters
    ----------
    reference : `core.exposure.Exposure`
        The image that is convolved.
    target : `core.exposure.Exposure`
        The image it is matched to.
    sources : `astropy.table.Table`
        Kernel sources with parent ``x``, ``y`` and optionally ``flux`` / ``snr``
        (the rating that orders candidates within a cell, brightest first).
    basis : `core.basis.KernelBasis`
    config : `core.config.KernelConfig`
    bbox : (min_x, min_y, max_x, max_y) or None
        Fit region and Chebyshev domain; default the overlap of the two images.
    task : `core.task.Task` or None
        Receives the AL* basis keys, spatialConditionNum, spatialKernelSum,
        nGoodCandidates and the ``_solve`` timer.
    stamp_size : int or None
        Side of the candidate stamps (odd). Default: the boxes of the selection
        (columns stamp_x0, stamp_y0, stamp_x1, stamp_y1, inclusive parent) when
        present, else 2 * basis.size + 1 centred on round(x), round(y).
    rating_column : str or None
        Column used as the rating instead of flux / psf_flux / snr.
    noise_area : float
        Sum of the normalised noise autocorrelation of the stamps (pixels per
        independent noise sample; 1 for white noise): widens the residual-mean
        limit by its square root (preconvolved or resampled images).

    Returns
    -------
    solution : `KernelSolution`

    Raises
    ------
    InvalidCatalogError
        The sources have no ``x`` / ``y`` columns.
    NoKernelCandidatesError
        No usable candidate, or all rejected (section 7 messages plus a hint).
    KernelSolutionError
        The spatial system has NaN solutions.
    """
    if "x" not in sources.colnames or "y" not in sources.colnames:
        raise InvalidCatalogError(
            f"kernel sources need 'x' and 'y' columns (parent pixels); found {sources.colnames}"
        )
    if bbox is None:
        rb, tb = reference.bbox, target.bbox
        bbox = (max(rb[0], tb[0]), max(rb[1], tb[1]), min(rb[2], tb[2]), min(rb[3], tb[3]))
    bbox = tuple(int(v) for v in bbox)  # type: ignore[assignment]
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise NoKernelCandidatesError("The reference and target images do not overlap.")
    if stamp_size is None and not all(name in sources.colnames for name in _BOX_COLUMNS):
        stamp_size = 2 * basis.size + 1
    if stamp_size is not None and (stamp_size % 2 == 0 or stamp_size <= 2 * basis.half):
        raise ValueError(f"stamp_size {stamp_size} must be odd and larger than the kernel")
    if task is not None:
        for key, value in basis.metadata().items():
            task.add_metadata(key, value)
    timer = task.timer("_solve") if task is not None else contextlib.nullcontext()
    # hundreds of small per-stamp products and solves: BLAS threads only contend (on a
    # busy 2-core machine the preconvolve fit took 21 s with them, 3.6 s without)
    with timer, one_blas_thread():
        solution = _solve(
            reference, target, sources, basis, config, bbox, stamp_size, rating_column, noise_area
        )
    if task is not None:
        task.metadata["spatialConditionNum"] = solution.condition_number
        task.metadata["spatialKernelSum"] = solution.kernel_sum
        task.metadata["nGoodCandidates"] = solution.n_good
        task.metadata["spatialKernelOrder"] = solution.orders[0]
        task.metadata["spatialBgOrder"] = solution.orders[1]
    return solution


def _solve(reference, target, sources, basis, config, bbox, stamp_size, rating_column, noise_area):
    fitter = _Fitter(basis, config, noise_area, reference.noise_correlation)
    bad_bits = (
        target.mask_planes.get_bitmask(config.bad_mask_planes),
        reference.mask_planes.get_bitmask(config.bad_mask_planes),
    )
    # the fit sees the reference less its pedestal: a constant under the stars is what
    # the background term fits, and the first basis image's column, nearly that constant
    # times the stamp, made the two near collinear (a template 1e4 above its sky: kernel
    # sum 0.09 for 0.99, raw condition number 1e10 for 4e6 on a sky of 1000)
    # (without a background term nothing could take it up: the reference as it is)
    pedestal = _pedestal(reference, bad_bits[1]) if config.fit_for_background else 0.0
    candidates, cells = _make_candidates(
        reference, target, sources, bbox, stamp_size, config, rating_column, basis.half, pedestal
    )
    if not cells:
        raise NoKernelCandidatesError(
            f"All spatial cells are empty of candidates: none of the {len(candidates)} kernel "
            "sources has a full stamp inside both images and its centre in the fit region "
            f"{bbox}." + _hint()
        )
    n_per_cell = config.n_star_per_cell
    iteration = 0
    rejected_spatial = 0
    kernel = background = None
    condition = math.nan
    used: list[_Candidate] = []
    choice = None  # (kernel order, note) of the first cross-validation
    while iteration < config.max_spatial_iterations:
        _build_until_stable(fitter, cells, config, bad_bits)
        visited = _visit(cells, n_per_cell)
        if not visited:
            raise NoKernelCandidatesError(
                "All spatial cells are empty of candidates: every kernel source was rejected "
                "by its single-kernel fit." + _hint()
            )
        mean, std = clipped_mean_std([c.ksum for c in visited])
        if not (np.isfinite(mean) and np.isfinite(std)):
            raise NoKernelCandidatesError(
                f"Unable to calculate the kernel sum ({len(visited)} points)." + _hint()
            )
        if config.kernel_sum_clipping:
            clipped = [c for c in visited if abs(c.ksum - mean) > config.max_ksum_sigma * std]
            for cand in clipped:
                cand.reject(
                    f"kernel sum {cand.ksum:.4f} is more than {config.max_ksum_sigma} sigma "
                    f"from the clipped mean {mean:.4f} (sigma {std:.4f})"
                )
            if clipped:
                continue
        used = visited
        planned, supported, order_note = _chosen_orders(fitter, used, config, bbox, choice)
        if order_note is not None:
            choice = (planned[0], order_note)
        kernel, background, condition, orders = _conditioned_fit(
            fitter, used, config, bbox, planned
        )
        n_good = rejected_spatial = 0

        xs = np.array([c.x for c in used])
        ys = np.array([c.y for c in used])
        fitter.assess_many(
            used, kernel.coefficients_at(xs, ys).T, fitter.background_in_stamps(used, background)
        )
        if config.spatial_kernel_clipping:
            fitter.set_limits(used)
        for cand in used:
            if config.spatial_kernel_clipping and fitter.judge(cand):
                rejected_spatial += 1
            else:
                n_good += 1
        if n_good == 0 and rejected_spatial == 0:
            raise NoKernelCandidatesError("No kernel candidates for spatial fit." + _hint())
        if rejected_spatial == 0:
            break
        iteration += 1
    if rejected_spatial > 0 and iteration == config.max_spatial_iterations:
        # final spatial fit without assessment, on the candidates now first in their cells
        _build_until_stable(fitter, cells, config, bad_bits)
        used = _visit(cells, n_per_cell)
        if not used:
            raise NoKernelCandidatesError(
                "No kernel candidates remain after max iterations." + _hint()
            )
        planned, supported, order_note = _chosen_orders(fitter, used, config, bbox, choice)
        if order_note is not None:
            choice = (planned[0], order_note)
        kernel, background, condition, orders = _conditioned_fit(
            fitter, used, config, bbox, planned
        )
    if not used or kernel is None:
        raise NoKernelCandidatesError("No kernel candidates remain after max iterations." + _hint())
    used_ids = {c.index for c in used}
    for cand in candidates:
        if cand.index in used_ids:
            cand.status = _GOOD
        elif cand.status != _BAD:
            cand.status = _UNUSED
    n_good = len(used)
    n_bad = sum(c.status == _BAD for c in candidates)
    notes = _spatial_warnings(n_good, n_bad, config, condition, orders, planned, supported)
    if order_note:
        _log.info("%s", order_note)
        notes.append(order_note)
    if fitter.uncorrected_fits:
        notes.append(
            "the kernel's normal matrix was singular: the kernel was fitted without removing "
            "the convolved image's noise from it (it may be broader, and its sum lower, than "
            "the PSFs need)"
        )
    table = Table(
        {
            "x": [c.x for c in candidates],
            "y": [c.y for c in candidates],
            "rating": [c.rating for c in candidates],
            "cell_x": [c.cell[0] for c in candidates],
            "cell_y": [c.cell[1] for c in candidates],
            "status": [c.status for c in candidates],
            "ksum": [c.ksum for c in candidates],
            "resid_mean": [c.resid_mean for c in candidates],
            "resid_std": [c.resid_std for c in candidates],
            "reason": [c.reason for c in candidates],
        },
        dtype=[float, float, float, int, int, "U8", float, float, float, "U160"],
    )
    kernel_sum = kernel.sum(*kernel.domain_center())
    if not np.isfinite(kernel_sum):
        raise KernelSolutionError("The fitted kernel sum is not finite.")
    background = _with_pedestal(background, kernel, fitter.basis_sums, pedestal)
    return KernelSolution(
        kernel, background, table, n_good, condition, kernel_sum, basis, orders, notes
    )


#: Pixels of the reference whose median is its pedestal (every k-th row and column).
_PEDESTAL_SAMPLE = 1 << 18


def _pedestal(reference: Exposure, bad_bits: int) -> float:
    """The reference's typical level: the median of its usable pixels on a grid of about
    `_PEDESTAL_SAMPLE` (0 when it has none)."""
    step = max(1, math.isqrt(reference.image.size // _PEDESTAL_SAMPLE))
    grid = np.s_[::step, ::step]
    values = np.asarray(reference.image[grid], dtype=np.float64)
    usable = np.isfinite(values)
    if bad_bits:
        usable &= (reference.mask[grid] & bad_bits) == 0
    return float(np.median(values[usable])) if usable.any() else 0.0


def _with_pedestal(
    background: BackgroundModel, kernel: SpatialKernel, basis_sums: np.ndarray, pedestal: float
) -> BackgroundModel:
    """b of K * reference + b from b' fitted to the reference less ``pedestal``:
    b = b' - pedestal * sum(K)(x, y) (a constant for an AL kernel, whose sum is)."""
    if pedestal == 0.0:
        return background
    total = basis_sums @ kernel.coefficients  # the kernel sum's Chebyshev coefficients
    if background.domain != kernel.domain:
        raise KernelSolutionError("kernel and background fitted on different domains")
    varying = bool(np.any(total[1:]))
    order = max(background.order, kernel.order) if varying else background.order
    out = background.raised(order)
    out = BackgroundModel(out.coefficients.copy(), out.order, out.domain)
    if varying:
        out.coefficients -= (
            pedestal
            * BackgroundModel(total, kernel.order, kernel.domain).raised(order).coefficients
        )
    else:
        out.coefficients[0] -= pedestal * total[0]
    return out


def _conditioned_fit(fitter, used, config: KernelConfig, domain: Box, orders):
    """Spatial fit at ``orders``; an ill-conditioned solution is refitted at lower orders.

    Rubin only warns when the condition number passes ``max_spatial_condition_number``;
    a solution that ill-conditioned is noise-driven (kernel sums of 5 seen), so the
    kernel order, then the background order, is lowered until it is not.
    """
    kernel_order, bg_order = orders
    while True:
        kernel, background, condition = _spatial_fit(
            fitter, used, config, domain, (kernel_order, bg_order)
        )
        if 0 <= condition <= config.max_spatial_condition_number:
            break
        if kernel_order > 0:
            kernel_order -= 1
        elif bg_order > 0:
            bg_order -= 1
        else:
            break
    return kernel, background, condition, (kernel_order, bg_order)
