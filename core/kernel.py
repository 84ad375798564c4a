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

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from numpy.polynomial import chebyshev

__all__ = [
    "SpatialKernel",
    "BackgroundModel",
    "chebyshev_terms",
    "term_degrees",
    "n_spatial_terms",
]

Box = tuple[int, int, int, int]

_ORIENTATION_COMMENT = (
    "out(X,Y)=sum_uv K(u,v)*in(X+u,Y+v); pixel (j,i) <-> (v,u)=(j-h,i-h)",
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
    """(x degree, y degree) of each term: (0,0), (1,0), (0,1), (2,0), (1,1), (0,2), ..."""
    return [(n - k, k) for n in range(order + 1) for k in range(n + 1)]


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


def _atomic_write(hdul: fits.HDUList, path: str | os.PathLike) -> None:
    """Write to a temporary file beside ``path`` and rename, so readers never see half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".fits")
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
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
        ny, nx = shape
        tx = _axis_terms(np.arange(nx) + xy0[0], self.domain[0], self.domain[2], self.order)
        ty = _axis_terms(np.arange(ny) + xy0[1], self.domain[1], self.domain[3], self.order)
        return (ty.T @ self._matrix().T @ tx).astype(np.float32)

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
