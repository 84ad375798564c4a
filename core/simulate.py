"""Simulated science/template pairs with known truth, for tests, benchmarks and demos.

`simulate_pair` draws one star field (power-law fluxes, optional galaxies) through two
PSFs (Gaussian or Moffat, elliptical, optionally varying across the frame), adds sky
with gradients, Poisson and read noise, a photometric scale between the two images,
optional bad columns, cosmic rays and saturation, and transients in the science image
only. Both images are aligned (same WCS, no pixel offset) unless the template_* geometry
fields put the template on its own grid (rotated, scaled, shifted, with its own WCS,
deliberately wrong if asked), as real templates are. Everything drawn is recorded
in a JSON-serialisable truth dictionary.

Photometric convention: a constant source has ``science_counts = flux_ratio *
template_counts``. Star fluxes are given in science counts; a star's flux is the sum of
its rendered PSF stamp (the stamp is normalised, so truncated wings are not lost).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.fft
from astropy.wcs import WCS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from scipy import ndimage
from scipy.signal import fftconvolve

from .errors import InvalidConfigError
from .exposure import Exposure, MaskPlanes, PhotoCalib
from .psf import SIGMA_TO_FWHM, GaussianPsf, GridPsf, MoffatPsf, Psf, _moffat_alpha

__all__ = [
    "PsfModelConfig",
    "SkyConfig",
    "SimulationConfig",
    "SimulatedPair",
    "simulate_pair",
    "write_pair",
    "simulate_command",
    "preset",
    "PRESETS",
    "demo_transients",
]

#: Names accepted by `preset`.
PRESETS = (
    "sharper_template",
    "sharper_science",
    "equal",
    "varying",
    "defects",
    "noisy_template",
    "wide_field",
)

_CHUNK = 512  # stars rendered per vectorised batch (bounds the temporary memory)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PsfModelConfig(_Model):
    """True PSF of one image.

    The FWHM varies linearly along the direction ``variation_angle``:
    ``fwhm(x, y) = fwhm * (1 + variation * t)`` with ``t`` running from -0.5 to +0.5
    between the two opposite corners (or edges) of the frame along that direction, so
    ``variation = 0.25`` makes the FWHM change by 25% of its central value across the
    frame.
    """

    type: Literal["gaussian", "moffat"] = Field("gaussian", description="Profile family.")
    fwhm: float = Field(
        3.5, gt=0.5, le=50, description="True FWHM along the major axis at the frame centre (px)."
    )
    beta: float = Field(3.0, gt=1.2, le=20, description="Moffat index (moffat only).")
    ellipticity: float = Field(0.0, ge=0, lt=0.9, description="1 - b/a of the profile.")
    angle: float = Field(0.0, description="Major-axis position angle from +x (degrees).")
    variation: float = Field(
        0.0, ge=0, lt=1.5, description="Fractional FWHM change across the frame (0.25 = 25%)."
    )
    variation_angle: float = Field(
        30.0, description="Direction of increasing FWHM, from +x (degrees)."
    )
    stamp_size: int | None = Field(
        None,
        ge=5,
        le=201,
        description="Odd PSF stamp width; default holds all but ~1e-3 of the untruncated flux.",
    )

    @field_validator("stamp_size")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError("stamp_size must be odd")
        return value


class SkyConfig(_Model):
    """Sky of one image in its own counts.

    ``sky(x, y) = level + gradient_x X + gradient_y Y + curvature_xx X^2 + curvature_xy X Y
    + curvature_yy Y^2`` with ``X = 2 (x - xc) / nx`` and ``Y = 2 (y - yc) / ny``
    (``xc = (nx - 1) / 2``): the domain convention of the spatial Chebyshev fits, so each
    coefficient is the sky change at the frame edge.
    """

    level: float = Field(1000.0, ge=0, description="Sky level at the centre (counts/pixel).")
    gradient_x: float = Field(0.0, description="Linear term in X (counts).")
    gradient_y: float = Field(0.0, description="Linear term in Y (counts).")
    curvature_xx: float = Field(0.0, description="Quadratic term in X^2 (counts).")
    curvature_xy: float = Field(0.0, description="Cross term in X Y (counts).")
    curvature_yy: float = Field(0.0, description="Quadratic term in Y^2 (counts).")
    subtracted: bool = Field(
        False,
        description="Remove the sky model from the image (a background-subtracted exposure); "
        "its Poisson noise stays in the image and the variance.",
    )

    def coefficients(self) -> dict[str, float]:
        """The polynomial coefficients by name (for the truth record)."""
        return {
            "c0": self.level,
            "cx": self.gradient_x,
            "cy": self.gradient_y,
            "cxx": self.curvature_xx,
            "cxy": self.curvature_xy,
            "cyy": self.curvature_yy,
        }


class SimulationConfig(_Model):
    """Everything `simulate_pair` draws; every number of the simulator lives here."""

    size: int | tuple[int, int] = Field(
        512, description="Image size: one int for a square, or (nx, ny) in pixels."
    )
    seed: int = Field(0, ge=0, description="Seed of every random draw (same seed, same pair).")
    # stars and galaxies -------------------------------------------------------------
    n_stars: int | None = Field(
        None, ge=0, description="Number of stars; None means star_density x area."
    )
    star_density: float = Field(
        1000.0, ge=0, description="Stars per megapixel when n_stars is None."
    )
    star_flux_slope: float = Field(
        2.0, gt=0, description="Power-law index of dN/dF ~ F^-slope for star fluxes."
    )
    star_flux_min: float = Field(200.0, gt=0, description="Faintest star (science counts).")
    star_flux_max: float = Field(2.0e5, gt=0, description="Brightest star (science counts).")
    n_galaxies: int = Field(0, ge=0, description="Number of Sersic galaxies (off by default).")
    galaxy_flux_min: float = Field(2.0e3, gt=0, description="Faintest galaxy (science counts).")
    galaxy_flux_max: float = Field(5.0e4, gt=0, description="Brightest galaxy (science counts).")
    galaxy_radius_min: float = Field(1.5, gt=0, description="Smallest half-light radius (px).")
    galaxy_radius_max: float = Field(5.0, gt=0, description="Largest half-light radius (px).")
    galaxy_sersic_indices: list[float] = Field(
        [1.0, 4.0], description="Sersic indices drawn from (1 = exponential, 4 = de Vaucouleurs)."
    )
    # PSFs -----------------------------------------------------------------------------
    science_psf: PsfModelConfig = Field(
        default_factory=lambda: PsfModelConfig(fwhm=4.0),
        description="True PSF of the science image.",
    )
    template_psf: PsfModelConfig = Field(
        default_factory=lambda: PsfModelConfig(fwhm=3.0),
        description="True PSF of the template image.",
    )
    psf_node_spacing: float = Field(
        256.0, gt=8, description="Largest spacing of the GridPsf nodes of a varying PSF (px)."
    )
    # sky, noise and photometry ---------------------------------------------------------
    science_sky: SkyConfig = Field(default_factory=SkyConfig, description="Science sky.")
    template_sky: SkyConfig = Field(default_factory=SkyConfig, description="Template sky.")
    gain: float = Field(1.0, gt=0, description="Science gain (electrons per count).")
    read_noise: float = Field(5.0, ge=0, description="Science read noise (electrons).")
    exposure_time: float = Field(30.0, gt=0, description="Science exposure time (s).")
    template_depth: float = Field(
        4.0,
        gt=0,
        description="Template effective exposure / science exposure: the template's noise "
        "variance is that of the science settings divided by this (4 = twice less noise).",
    )
    flux_ratio: float = Field(
        1.0, gt=0, description="Photometric scale: science_counts = flux_ratio x template_counts."
    )
    science_zero_point: float = Field(27.0, description="AB magnitude of 1 science count.")
    noise: Literal["poisson", "gaussian", "none"] = Field(
        "poisson",
        description="Pixel noise: exact Poisson + Gaussian read noise, a Gaussian of the "
        "same variance, or none (the variance plane is filled either way).",
    )
    # defects ---------------------------------------------------------------------------
    n_bad_columns: int = Field(0, ge=0, description="Bad columns in the science image.")
    n_bad_columns_template: int = Field(0, ge=0, description="Bad columns in the template.")
    hot_column_counts: float = Field(5000.0, description="Offset added along a hot column.")
    n_cosmic_rays: int = Field(0, ge=0, description="Cosmic-ray tracks in the science image.")
    n_cosmic_rays_template: int = Field(
        0, ge=0, description="Cosmic-ray tracks in the template (coadds usually reject them)."
    )
    cosmic_ray_counts_min: float = Field(300.0, gt=0, description="Faintest CR pixel (counts).")
    cosmic_ray_counts_max: float = Field(5000.0, gt=0, description="Brightest CR pixel (counts).")
    cosmic_ray_length_max: float = Field(8.0, ge=0, description="Longest CR track (px).")
    mask_cosmic_rays: bool = Field(
        False, description="Set the CR plane at the true CR pixels (a pipeline would not know)."
    )
    saturation_level: float | None = Field(
        None, gt=0, description="Raw counts where pixels saturate (clipped, SAT); None = off."
    )
    n_saturated_stars: int = Field(
        0, ge=0, description="Extra stars whose science peak is 2-20x the saturation level."
    )
    # transients ------------------------------------------------------------------------
    n_transients: int = Field(0, ge=0, description="Point sources added to the science only.")
    transient_flux_min: float = Field(1.0e3, gt=0, description="Faintest (science counts).")
    transient_flux_max: float = Field(2.0e4, gt=0, description="Brightest (science counts).")
    transient_margin: int = Field(20, ge=0, description="Transients keep this far from edges.")
    n_negative_transients: int = Field(
        0,
        ge=0,
        description="Point sources in the template only (faded by the science epoch; "
        "positions on the science grid, placed on the template through its geometry); "
        "fluxes drawn like the transients' (science counts).",
    )
    # labels and geometry ---------------------------------------------------------------
    band: str = Field("r", description="Band label of both images.")
    pixel_scale: float = Field(0.2, gt=0, description="Pixel scale (arcsec) of the TAN WCS.")
    ra: float = Field(150.0, ge=0, lt=360, description="Right ascension at the centre (deg).")
    dec: float = Field(2.0, ge=-90, le=90, description="Declination at the centre (deg).")
    template_size: int | tuple[int, int] | None = Field(
        None, description="Template size (one int or (nx, ny)); None = the science size."
    )
    template_rotation: float = Field(
        0.0, ge=-180, le=180, description="Template grid rotated by this angle (deg) on the sky."
    )
    template_scale: float = Field(
        1.0, gt=0.5, lt=2.0, description="Template pixel scale / science pixel scale."
    )
    template_shift: tuple[float, float] = Field(
        (0.0, 0.0), description="Template pixel of the science centre minus the centre (px)."
    )
    template_wcs_error: tuple[float, float] = Field(
        (0.0, 0.0), description="Template WCS deliberately off by this (template px, x and y)."
    )

    @field_validator("size")
    @classmethod
    def _size(cls, value):
        nx, ny = (value, value) if isinstance(value, int) else value
        if nx < 32 or ny < 32:
            raise ValueError(f"size must be at least 32 pixels, got {nx}x{ny}")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> SimulationConfig:
        for lo, hi in (
            ("star_flux_min", "star_flux_max"),
            ("galaxy_flux_min", "galaxy_flux_max"),
            ("galaxy_radius_min", "galaxy_radius_max"),
            ("cosmic_ray_counts_min", "cosmic_ray_counts_max"),
            ("transient_flux_min", "transient_flux_max"),
        ):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} exceeds {hi}")
        if self.n_saturated_stars and self.saturation_level is None:
            raise ValueError("n_saturated_stars needs a saturation_level")
        return self

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of both images."""
        nx, ny = (self.size, self.size) if isinstance(self.size, int) else self.size
        return int(ny), int(nx)

    @property
    def template_shape(self) -> tuple[int, int]:
        """(ny, nx) of the template image."""
        if self.template_size is None:
            return self.shape
        size = self.template_size
        nx, ny = (size, size) if isinstance(size, int) else size
        return int(ny), int(nx)

    @property
    def template_geometry(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(matrix, offset) taking science pixels to template pixels; None when aligned."""
        if (
            self.template_rotation == 0
            and self.template_scale == 1
            and tuple(self.template_shift) == (0.0, 0.0)
            and self.template_shape == self.shape
        ):
            return None
        ny, nx = self.shape
        centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
        ty, tx = self.template_shape
        template_centre = np.array([(tx - 1) / 2.0, (ty - 1) / 2.0])
        phi = math.radians(self.template_rotation)
        matrix = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
        matrix = matrix / self.template_scale
        offset = template_centre + np.asarray(self.template_shift, float) - matrix @ centre
        return matrix, offset

    @property
    def star_count(self) -> int:
        """Number of power-law stars drawn."""
        if self.n_stars is not None:
            return self.n_stars
        ny, nx = self.shape
        return int(round(self.star_density * nx * ny / 1e6))


@dataclass
class SimulatedPair:
    """A simulated science/template pair and what was put in it.

    Attributes
    ----------
    science, template : `core.exposure.Exposure`
        Aligned exposures with true variance, masks, PSF, WCS and calibration.
    truth : dict
        JSON-serialisable record of everything drawn (see `simulate_pair`).
    science_model, template_model : `numpy.ndarray` (ny, nx), float32
        Noise-free images in the same convention as ``.image`` (sky included unless
        subtracted), without defects: ``image - model`` is pure noise where unmasked.
    config : `SimulationConfig`
    """

    science: Exposure
    template: Exposure
    truth: dict[str, Any]
    science_model: np.ndarray
    template_model: np.ndarray
    config: SimulationConfig = field(default_factory=SimulationConfig)


# PSF fields ---------------------------------------------------------------------------------


def _default_stamp_size(cfg: PsfModelConfig, fwhm_max: float) -> int:
    """Odd width whose inscribed circle holds all but ~1e-3 of the untruncated profile."""
    if cfg.type == "gaussian":
        radius = 4.0 * fwhm_max / SIGMA_TO_FWHM  # exp(-8): 3e-4 outside
    else:
        # Moffat: fraction outside r is (1 + (r/alpha)^2)^(1 - beta)
        alpha = _moffat_alpha(fwhm_max, cfg.beta)
        radius = alpha * math.sqrt(1e-3 ** (1.0 / (1.0 - cfg.beta)) - 1.0)
    size = max(15, int(math.ceil(2.0 * radius)) + 1)
    return min(size + 1 - size % 2, 151)


class _PsfField:
    """The true PSF of one image: node stamps, the attached Psf and a batch evaluator."""

    def __init__(self, cfg: PsfModelConfig, shape: tuple[int, int], node_spacing: float):
        ny, nx = shape
        self.cfg = cfg
        phi = math.radians(cfg.variation_angle)
        self._dir = (math.cos(phi), math.sin(phi))
        self._length = max(abs(self._dir[0]) * (nx - 1) + abs(self._dir[1]) * (ny - 1), 1.0)
        self._centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
        if cfg.variation > 0:
            self.x_nodes = _nodes(nx, node_spacing)
            self.y_nodes = _nodes(ny, node_spacing)
        else:
            self.x_nodes = np.array([self._centre[0]])
            self.y_nodes = np.array([self._centre[1]])
        gx, gy = np.meshgrid(self.x_nodes, self.y_nodes)
        self.node_fwhm = self.fwhm_at(gx, gy)
        self.size = cfg.stamp_size or _default_stamp_size(cfg, float(self.node_fwhm.max()))
        models = [[self._model(f) for f in row] for row in self.node_fwhm]
        self.stamps = np.array([[m.kernel_image() for m in row] for row in models])
        if cfg.variation > 0:
            self.psf: Psf = GridPsf(self.stamps, self.x_nodes, self.y_nodes)
        else:
            self.psf = models[0][0]
        self.stamps = self.stamps / self.stamps.sum(axis=(2, 3), keepdims=True)

    def fwhm_at(self, x, y):
        """True FWHM (major axis, pixels) of the analytic model at (x, y)."""
        t = (
            (np.asarray(x) - self._centre[0]) * self._dir[0]
            + (np.asarray(y) - self._centre[1]) * self._dir[1]
        ) / self._length
        return self.cfg.fwhm * (1.0 + self.cfg.variation * t)

    def _model(self, fwhm: float) -> Psf:
        cfg = self.cfg
        angle = math.radians(cfg.angle)
        if cfg.type == "gaussian":
            return GaussianPsf(fwhm / SIGMA_TO_FWHM, cfg.ellipticity, angle, size=self.size)
        return MoffatPsf(fwhm, cfg.beta, cfg.ellipticity, angle, size=self.size)

    def stamps_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Unit-sum stamps (n, k, k) at each position, interpolated as `GridPsf` does."""
        i0, i1, wx = _bracket(self.x_nodes, x)
        j0, j1, wy = _bracket(self.y_nodes, y)
        s = self.stamps
        if s.shape[:2] == (1, 1):
            return np.broadcast_to(s[0, 0], (len(x),) + s.shape[2:]).copy()
        wx = wx[:, None, None]
        wy = wy[:, None, None]
        out = (1 - wy) * ((1 - wx) * s[j0, i0] + wx * s[j0, i1]) + wy * (
            (1 - wx) * s[j1, i0] + wx * s[j1, i1]
        )
        return out / out.sum(axis=(1, 2), keepdims=True)

    def truth(self) -> dict[str, Any]:
        return {
            **self.cfg.model_dump(mode="json"),
            "stamp_size": self.size,
            "x_nodes": self.x_nodes.tolist(),
            "y_nodes": self.y_nodes.tolist(),
            "fwhm_at_nodes": self.node_fwhm.tolist(),
            "fwhm_definition": "fwhm(x,y) = fwhm * (1 + variation * t), t in [-0.5, 0.5] "
            "between opposite corners along variation_angle; GridPsf interpolates node stamps",
        }


def _nodes(n: int, spacing: float) -> np.ndarray:
    """An odd number of nodes (the centre is one) from 0 to n - 1, at most ``spacing`` apart."""
    count = int(math.ceil((n - 1) / spacing)) + 1
    count = max(3, count + 1 - count % 2)
    return np.linspace(0.0, n - 1.0, count)


def _bracket(nodes: np.ndarray, values: np.ndarray):
    """Vectorised `GridPsf._bracket`: lower/upper node index and upper weight, clamped."""
    values = np.clip(np.asarray(values, dtype=np.float64), nodes[0], nodes[-1])
    if len(nodes) == 1:
        zero = np.zeros(values.shape, dtype=np.intp)
        return zero, zero, np.zeros(values.shape)
    hi = np.clip(np.searchsorted(nodes, values, side="right"), 1, len(nodes) - 1)
    lo = hi - 1
    w = (values - nodes[lo]) / (nodes[hi] - nodes[lo])
    return lo, hi, np.clip(w, 0.0, 1.0)


# rendering ----------------------------------------------------------------------------------


def _render_points(image: np.ndarray, field_: _PsfField, x, y, flux) -> None:
    """Add point sources of total ``flux`` at sub-pixel (x, y) into ``image`` (in place).

    Each star is its local PSF stamp shifted by a Fourier phase ramp (the stamp sum, hence
    the flux, is preserved exactly); batches of stars share one FFT call.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    if x.size == 0:
        return
    ny, nx = image.shape
    k = field_.size
    half = k // 2
    ix = np.floor(x + 0.5).astype(np.intp)
    iy = np.floor(y + 0.5).astype(np.intp)
    fy = scipy.fft.fftfreq(k)[None, :, None]
    fx = scipy.fft.rfftfreq(k)[None, None, :]
    for start in range(0, x.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        stamps = field_.stamps_at(x[sl], y[sl]) * flux[sl, None, None]
        dx = (x[sl] - ix[sl])[:, None, None]
        dy = (y[sl] - iy[sl])[:, None, None]
        ramp = np.exp(-2j * np.pi * fy * dy) * np.exp(-2j * np.pi * fx * dx)
        shifted = scipy.fft.irfft2(scipy.fft.rfft2(stamps) * ramp, s=(k, k))
        for n, stamp in enumerate(shifted):
            x0, y0 = ix[start + n] - half, iy[start + n] - half
            ax0, ay0 = max(x0, 0), max(y0, 0)
            ax1, ay1 = min(x0 + k, nx), min(y0 + k, ny)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            image[ay0:ay1, ax0:ax1] += stamp[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]


def _sersic_stamp(r_e: float, index: float, ellipticity: float, angle: float, dx, dy):
    """Unit-sum Sersic profile on an odd stamp, centred at (dx, dy) from the middle pixel."""
    b = 2.0 * index - 1.0 / 3.0 + 4.0 / (405.0 * index)
    half = int(math.ceil(5.0 * r_e)) + 2
    oversample = 4
    sub = (np.arange(oversample) - (oversample - 1) / 2.0) / oversample
    axis = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
    yy, xx = np.meshgrid(axis - dy, axis - dx, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u = c * xx + s * yy
    v = (-s * xx + c * yy) / (1.0 - ellipticity)
    r = np.hypot(u, v) / r_e
    fine = np.exp(-b * (r ** (1.0 / index) - 1.0))
    fine[r > 5.0] = 0.0
    k = 2 * half + 1
    stamp = fine.reshape(k, oversample, k, oversample).mean(axis=(1, 3))
    return stamp / stamp.sum()


def _render_galaxies(image: np.ndarray, field_: _PsfField, galaxies: dict, scale: float) -> None:
    ny, nx = image.shape
    for i in range(len(galaxies["x"])):
        x, y = galaxies["x"][i], galaxies["y"][i]
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        intrinsic = _sersic_stamp(
            galaxies["half_light_radius"][i],
            galaxies["sersic_index"][i],
            galaxies["ellipticity"][i],
            math.radians(galaxies["angle"][i]),
            x - ix,
            y - iy,
        )
        psf = field_.stamps_at(np.array([x]), np.array([y]))[0]
        # full convolution keeps every bit of flux
        stamp = fftconvolve(intrinsic, psf, mode="full") * galaxies["flux_science"][i] * scale
        half = stamp.shape[0] // 2
        x0, y0 = ix - half, iy - half
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + stamp.shape[1], nx), min(y0 + stamp.shape[0], ny)
        if ax1 > ax0 and ay1 > ay0:
            image[ay0:ay1, ax0:ax1] += stamp[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]


def _sky_model(sky: SkyConfig, shape: tuple[int, int]) -> np.ndarray:
    ny, nx = shape
    xs = 2.0 * (np.arange(nx) - (nx - 1) / 2.0) / nx
    ys = 2.0 * (np.arange(ny) - (ny - 1) / 2.0) / ny
    X, Y = xs[None, :], ys[:, None]
    model = (
        sky.level
        + sky.gradient_x * X
        + sky.gradient_y * Y
        + sky.curvature_xx * X * X
        + sky.curvature_xy * X * Y
        + sky.curvature_yy * Y * Y
    )
    return np.broadcast_to(model, shape).astype(np.float32)


# drawing the scene ---------------------------------------------------------------------


def _power_law(rng: np.random.Generator, n: int, slope: float, lo: float, hi: float):
    """Draw n values from dN/dF ~ F^-slope on [lo, hi] by inverting the CDF."""
    u = rng.random(n)
    if abs(slope - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    a = 1.0 - slope
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def _draw_stars(cfg: SimulationConfig, rng, science_field: _PsfField) -> dict[str, np.ndarray]:
    ny, nx = cfg.shape
    n = cfg.star_count
    x = rng.uniform(-0.5, nx - 0.5, n)
    y = rng.uniform(-0.5, ny - 0.5, n)
    flux = _power_law(rng, n, cfg.star_flux_slope, cfg.star_flux_min, cfg.star_flux_max)
    if cfg.n_saturated_stars:
        m = cfg.n_saturated_stars
        margin = min(science_field.size, nx // 4, ny // 4)
        sx = rng.uniform(margin, nx - 1 - margin, m)
        sy = rng.uniform(margin, ny - 1 - margin, m)
        peak_fraction = science_field.stamps_at(sx, sy).max(axis=(1, 2))
        peaks = cfg.saturation_level * 10 ** rng.uniform(math.log10(2), math.log10(20), m)
        x, y = np.concatenate([x, sx]), np.concatenate([y, sy])
        flux = np.concatenate([flux, peaks / peak_fraction])
    return {"x": x, "y": y, "flux_science": flux}


def _draw_galaxies(cfg: SimulationConfig, rng) -> dict[str, np.ndarray]:
    ny, nx = cfg.shape
    n = cfg.n_galaxies
    return {
        "x": rng.uniform(0, nx - 1, n),
        "y": rng.uniform(0, ny - 1, n),
        "flux_science": np.exp(
            rng.uniform(math.log(cfg.galaxy_flux_min), math.log(cfg.galaxy_flux_max), n)
        ),
        "half_light_radius": rng.uniform(cfg.galaxy_radius_min, cfg.galaxy_radius_max, n),
        "sersic_index": rng.choice(np.asarray(cfg.galaxy_sersic_indices, dtype=float), n),
        "ellipticity": rng.uniform(0.0, 0.6, n),
        "angle": rng.uniform(0.0, 180.0, n),
    }


def _draw_transients(cfg: SimulationConfig, rng, n: int | None = None) -> dict[str, np.ndarray]:
    ny, nx = cfg.shape
    n = cfg.n_transients if n is None else n
    m = min(cfg.transient_margin, nx // 4, ny // 4)
    return {
        "x": rng.uniform(m, nx - 1 - m, n),
        "y": rng.uniform(m, ny - 1 - m, n),
        "flux_science": np.exp(
            rng.uniform(math.log(cfg.transient_flux_min), math.log(cfg.transient_flux_max), n)
        ),
    }


def _draw_bad_columns(rng, n: int, shape: tuple[int, int]) -> list[dict[str, Any]]:
    ny, nx = shape
    if n == 0:
        return []
    columns = rng.choice(np.arange(2, nx - 2), size=min(n, nx - 4), replace=False)
    out = []
    for i, col in enumerate(columns):
        start = int(rng.integers(0, ny // 2))
        # bad columns run from a trap to the readout edge, alternately dead and hot
        out.append(
            {"x": int(col), "y_start": start, "y_end": ny - 1, "kind": "dead" if i % 2 else "hot"}
        )
    return out


def _draw_cosmic_rays(rng, cfg: SimulationConfig, n: int, shape) -> list[dict[str, Any]]:
    ny, nx = shape
    out = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        length = rng.uniform(0.0, cfg.cosmic_ray_length_max)
        theta = rng.uniform(0.0, math.pi)
        t = np.linspace(0.0, length, max(2, int(math.ceil(2 * length)) + 1))
        px = np.clip(np.floor(x0 + t * math.cos(theta) + 0.5), 0, nx - 1).astype(int)
        py = np.clip(np.floor(y0 + t * math.sin(theta) + 0.5), 0, ny - 1).astype(int)
        pixels = np.unique(np.stack([py, px], axis=1), axis=0)
        counts = rng.uniform(cfg.cosmic_ray_counts_min, cfg.cosmic_ray_counts_max, len(pixels))
        out.append(
            {
                "x": pixels[:, 1].tolist(),
                "y": pixels[:, 0].tolist(),
                "counts": counts.tolist(),
            }
        )
    return out


def _make_wcs(cfg: SimulationConfig) -> WCS:
    ny, nx = cfg.shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [cfg.ra, cfg.dec]
    # FITS pixels are 1-based: the frame centre (nx - 1) / 2 is CRPIX (nx + 1) / 2
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    wcs.wcs.cdelt = [-cfg.pixel_scale / 3600.0, cfg.pixel_scale / 3600.0]
    wcs.wcs.cunit = ["deg", "deg"]
    return wcs


def _template_wcs(cfg: SimulationConfig, wcs: WCS) -> WCS:
    """The science WCS seen from the template grid (plus any deliberate error)."""
    out = copy.deepcopy(wcs)
    geometry = cfg.template_geometry
    if geometry is not None:
        matrix, offset = geometry
        cd = np.diag(wcs.wcs.cdelt) @ wcs.wcs.get_pc()
        ny, nx = cfg.shape
        centre = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
        out.wcs.cdelt = [1.0, 1.0]
        out.wcs.pc = cd @ np.linalg.inv(matrix)
        out.wcs.crpix = list(matrix @ centre + offset + 1.0)
    if any(cfg.template_wcs_error):
        out.wcs.crpix = list(np.asarray(out.wcs.crpix) + np.asarray(cfg.template_wcs_error))
    out.wcs.set()
    return out


def _to_template(sources: dict, geometry, cfg: SimulationConfig) -> dict:
    """Sources with positions (and galaxy shapes) on the template grid."""
    if geometry is None or len(sources.get("x", [])) == 0:
        return sources
    matrix, offset = geometry
    x, y = np.asarray(sources["x"], float), np.asarray(sources["y"], float)
    out = dict(sources)
    out["x"] = matrix[0, 0] * x + matrix[0, 1] * y + offset[0]
    out["y"] = matrix[1, 0] * x + matrix[1, 1] * y + offset[1]
    if "angle" in out:
        out["angle"] = np.asarray(out["angle"], float) + cfg.template_rotation
    if "half_light_radius" in out:
        out["half_light_radius"] = np.asarray(out["half_light_radius"], float) / cfg.template_scale
    return out


@dataclass
class _ImageSpec:
    """Noise and defect settings of one image."""

    name: str
    sky: SkyConfig
    gain: float
    read_noise: float  # electrons
    exposure_time: float
    calibration: float
    n_bad_columns: int
    n_cosmic_rays: int


def _observe(cfg, spec: _ImageSpec, model: np.ndarray, rng, field_: _PsfField, wcs: WCS):
    """Turn a noise-free model (sky included) into an exposure and its defect truth."""
    shape = model.shape
    rn_counts = spec.read_noise / spec.gain
    variance = (np.maximum(model, 0.0) / spec.gain + rn_counts**2).astype(np.float32)
    if cfg.noise == "poisson":
        electrons = rng.poisson(np.maximum(model, 0.0).astype(np.float64) * spec.gain)
        raw = electrons.astype(np.float32) / np.float32(spec.gain)
        raw += rng.standard_normal(shape, dtype=np.float32) * np.float32(rn_counts)
    elif cfg.noise == "gaussian":
        raw = model + rng.standard_normal(shape, dtype=np.float32) * np.sqrt(variance)
    else:
        raw = model.copy()
    planes = MaskPlanes()
    mask = np.zeros(shape, dtype=np.int32)

    cosmic_rays = _draw_cosmic_rays(rng, cfg, spec.n_cosmic_rays, shape)
    for cr in cosmic_rays:
        raw[cr["y"], cr["x"]] += np.asarray(cr["counts"], dtype=np.float32)
        if cfg.mask_cosmic_rays:
            mask[cr["y"], cr["x"]] |= planes.value("CR")

    if cfg.saturation_level is not None:
        saturated = raw >= cfg.saturation_level
        raw[saturated] = cfg.saturation_level
        mask[saturated] |= planes.value("SAT")

    bad_columns = _draw_bad_columns(rng, spec.n_bad_columns, shape)
    for col in bad_columns:
        rows = slice(col["y_start"], col["y_end"] + 1)
        if col["kind"] == "dead":
            raw[rows, col["x"]] = 0.0
        else:
            raw[rows, col["x"]] += cfg.hot_column_counts
        mask[rows, col["x"]] |= planes.value("BAD")

    sky = None
    if spec.sky.subtracted:
        sky = _sky_model(spec.sky, shape)
        raw -= sky
    metadata: dict[str, Any] = {
        "GAIN": spec.gain,
        "RDNOISE": spec.read_noise,
        "EXPTIME": spec.exposure_time,
        "FILTER": cfg.band,
    }
    if cfg.saturation_level is not None:
        metadata["SATURATE"] = cfg.saturation_level
    exposure = Exposure(
        image=raw,
        variance=variance,
        mask=mask,
        mask_planes=planes,
        psf=field_.psf,
        wcs=wcs,
        photo_calib=PhotoCalib(spec.calibration),
        band=cfg.band,
        metadata=metadata,
        variance_source="simulation truth",
    )
    defects = {"bad_columns": bad_columns, "cosmic_rays": cosmic_rays}
    return exposure, defects, sky


def simulate_pair(config: SimulationConfig | None = None) -> SimulatedPair:
    """Simulate an aligned science/template pair with known truth.

    Parameters
    ----------
    config : `SimulationConfig`, optional
        What to draw; defaults to a 512x512 pair with a sharper template.

    Returns
    -------
    pair : `SimulatedPair`
        ``science`` and ``template`` exposures (float32 image, true variance
        ``model / gain + (read_noise / gain)^2`` without cosmic rays, SAT and BAD masks,
        the true PSF as `GridPsf` when it varies, otherwise `GaussianPsf`/`MoffatPsf`,
        the same TAN WCS, band, `PhotoCalib` with ``template = science x flux_ratio``
        nJy per count, GAIN/RDNOISE/EXPTIME/SATURATE metadata) and ``truth``: ``stars``,
        ``transients`` and ``galaxies`` as columns (x, y, flux_science, flux_template,
        flags), ``negative_transients`` (x, y, flux_science: the science-unit flux the
        source had in the template, seen as -flux_science in the difference), ``psf``
        per image, ``sky`` coefficients per image, ``bad_columns`` and ``cosmic_rays``
        per image, ``flux_ratio``, ``seed`` and the ``config``.

    Raises
    ------
    InvalidConfigError
        If the sky model goes negative somewhere (Poisson noise needs a positive mean).
    """
    cfg = config if config is not None else SimulationConfig()
    shape = cfg.shape
    # independent streams: changing one ingredient does not redraw the others
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(6)]
    rng_stars, rng_galaxies, rng_transients, rng_science, rng_template, rng_faded = streams

    science_field = _PsfField(cfg.science_psf, shape, cfg.psf_node_spacing)
    template_field = _PsfField(cfg.template_psf, cfg.template_shape, cfg.psf_node_spacing)
    stars = _draw_stars(cfg, rng_stars, science_field)
    galaxies = _draw_galaxies(cfg, rng_galaxies)
    transients = _draw_transients(cfg, rng_transients)
    faded = _draw_transients(cfg, rng_faded, cfg.n_negative_transients)
    inverse_ratio = 1.0 / cfg.flux_ratio

    science_model = _sky_model(cfg.science_sky, shape).astype(np.float64)
    template_model = _sky_model(cfg.template_sky, cfg.template_shape).astype(np.float64)
    for name, model in (("science", science_model), ("template", template_model)):
        if model.min() < 0:
            raise InvalidConfigError(
                f"{name} sky goes negative ({model.min():.1f} counts): raise its level "
                "or lower its gradient terms"
            )
    _render_points(science_model, science_field, stars["x"], stars["y"], stars["flux_science"])
    template_star_flux = stars["flux_science"] * inverse_ratio
    geometry = cfg.template_geometry
    template_stars = _to_template(stars, geometry, cfg)
    _render_points(
        template_model, template_field, template_stars["x"], template_stars["y"], template_star_flux
    )
    _render_galaxies(science_model, science_field, galaxies, 1.0)
    _render_galaxies(
        template_model, template_field, _to_template(galaxies, geometry, cfg), inverse_ratio
    )
    _render_points(
        science_model, science_field, transients["x"], transients["y"], transients["flux_science"]
    )
    # drawn (and recorded) on the science grid, as everything else: placed through the
    # template's geometry like the stars
    template_faded = _to_template(faded, geometry, cfg)
    _render_points(
        template_model,
        template_field,
        template_faded["x"],
        template_faded["y"],
        faded["flux_science"] * inverse_ratio,
    )
    science_model = science_model.astype(np.float32)
    template_model = template_model.astype(np.float32)

    calibration = 10 ** ((31.4 - cfg.science_zero_point) / 2.5)
    depth = cfg.template_depth
    specs = {
        "science": _ImageSpec(
            "science",
            cfg.science_sky,
            cfg.gain,
            cfg.read_noise,
            cfg.exposure_time,
            calibration,
            cfg.n_bad_columns,
            cfg.n_cosmic_rays,
        ),
        # a template of `depth` times the exposure, scaled back to one exposure's counts:
        # effective gain x depth, read noise (electrons) x sqrt(depth), and the exposure
        # time of the counts (depth x it made plain files' exposure times predict a kernel
        # sum of 1 / depth, and the verdict said suspect)
        "template": _ImageSpec(
            "template",
            cfg.template_sky,
            cfg.gain * depth,
            cfg.read_noise * math.sqrt(depth),
            cfg.exposure_time,
            calibration * cfg.flux_ratio,
            cfg.n_bad_columns_template,
            cfg.n_cosmic_rays_template,
        ),
    }
    wcs = _make_wcs(cfg)
    science, science_defects, science_sky = _observe(
        cfg, specs["science"], science_model, rng_science, science_field, wcs
    )
    template, template_defects, template_sky = _observe(
        cfg,
        specs["template"],
        template_model,
        rng_template,
        template_field,
        _template_wcs(cfg, wcs),
    )
    if science_sky is not None:
        science_model -= science_sky
    if template_sky is not None:
        template_model -= template_sky

    defects = _defect_map(science, science_defects["cosmic_rays"]) | _on_science_grid(
        _defect_map(template, template_defects["cosmic_rays"]), cfg
    )
    star_truth, galaxy_truth, transient_truth = _source_truth(
        cfg, stars, galaxies, transients, science, template, defects
    )
    truth: dict[str, Any] = {
        "seed": cfg.seed,
        "shape": list(shape),
        "flux_ratio": cfg.flux_ratio,
        "flux_ratio_definition": "science_counts = flux_ratio * template_counts",
        "stars": star_truth,
        "galaxies": galaxy_truth,
        "transients": transient_truth,
        "negative_transients": {key: np.asarray(value).tolist() for key, value in faded.items()},
    }
    truth["psf"] = {"science": science_field.truth(), "template": template_field.truth()}
    truth["sky"] = {
        "science": {**cfg.science_sky.model_dump(mode="json"), **cfg.science_sky.coefficients()},
        "template": {
            **cfg.template_sky.model_dump(mode="json"),
            **cfg.template_sky.coefficients(),
        },
        "definition": "sky = c0 + cx X + cy Y + cxx X^2 + cxy X Y + cyy Y^2, "
        "X = 2 (x - (nx-1)/2) / nx, Y = 2 (y - (ny-1)/2) / ny",
    }
    truth["bad_columns"] = {
        "science": science_defects["bad_columns"],
        "template": template_defects["bad_columns"],
    }
    truth["cosmic_rays"] = {
        "science": science_defects["cosmic_rays"],
        "template": template_defects["cosmic_rays"],
    }
    if cfg.template_geometry is not None:
        matrix, offset = cfg.template_geometry
        truth["template_geometry"] = {
            "matrix": matrix.tolist(),
            "offset": offset.tolist(),
            "definition": "template pixel = matrix @ science pixel + offset (0-based)",
        }
    truth["config"] = cfg.model_dump(mode="json")
    return SimulatedPair(
        science=science,
        template=template,
        truth=truth,
        science_model=science_model,
        template_model=template_model,
        config=cfg,
    )


def _defect_map(exposure: Exposure, cosmic_rays: list[dict[str, Any]]) -> np.ndarray:
    """SAT/BAD/CR pixels of an exposure plus its true cosmic-ray pixels."""
    bad = exposure.masked(["SAT", "BAD", "CR"])
    for cr in cosmic_rays:
        bad[cr["y"], cr["x"]] = True
    return bad


def _on_science_grid(template_map: np.ndarray, cfg: SimulationConfig) -> np.ndarray:
    """A boolean template-grid map sampled at the nearest template pixel of each science pixel."""
    geometry = cfg.template_geometry
    if geometry is None:
        return template_map
    matrix, offset = geometry
    ny, nx = cfg.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    u = np.floor(matrix[0, 0] * x + matrix[0, 1] * y + offset[0] + 0.5).astype(int)
    v = np.floor(matrix[1, 0] * x + matrix[1, 1] * y + offset[1] + 0.5).astype(int)
    tny, tnx = template_map.shape
    inside = (u >= 0) & (u < tnx) & (v >= 0) & (v < tny)
    return inside & template_map[np.clip(v, 0, tny - 1), np.clip(u, 0, tnx - 1)]


def _near(defects: np.ndarray, x, y, radius: int = 3) -> np.ndarray:
    """True for positions with a defect pixel within ``radius`` pixels."""
    if len(x) == 0 or not defects.any():
        return np.zeros(len(x), dtype=bool)
    grown = ndimage.binary_dilation(defects, iterations=radius)
    ny, nx = defects.shape
    ix = np.clip(np.floor(np.asarray(x) + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(np.asarray(y) + 0.5).astype(int), 0, ny - 1)
    return grown[iy, ix]


def _source_truth(cfg, stars, galaxies, transients, science, template, defects):
    """Columns of the stars, galaxies and transients with template fluxes and flags."""
    inverse_ratio = 1.0 / cfg.flux_ratio
    ny, nx = cfg.shape

    def columns(d):
        return {key: np.asarray(value).tolist() for key, value in d.items()}

    # a star is saturated when its centre pixel is SAT in either image
    ix = np.clip(np.floor(stars["x"] + 0.5).astype(int), 0, nx - 1)
    iy = np.clip(np.floor(stars["y"] + 0.5).astype(int), 0, ny - 1)
    geometry = _to_template(stars, cfg.template_geometry, cfg)
    tny, tnx = cfg.template_shape
    tx = np.clip(np.floor(geometry["x"] + 0.5).astype(int), 0, tnx - 1)
    ty = np.clip(np.floor(geometry["y"] + 0.5).astype(int), 0, tny - 1)
    saturated = science.masked(["SAT"])[iy, ix] | template.masked(["SAT"])[ty, tx]
    star_truth = columns(stars)
    star_truth["flux_template"] = (stars["flux_science"] * inverse_ratio).tolist()
    star_truth["saturated"] = saturated.tolist()
    galaxy_truth = columns(galaxies)
    galaxy_truth["flux_template"] = (galaxies["flux_science"] * inverse_ratio).tolist()
    transient_truth = columns(transients)
    transient_truth["near_defect"] = _near(defects, transients["x"], transients["y"]).tolist()
    return star_truth, galaxy_truth, transient_truth


# files and CLI ------------------------------------------------------------------------------


def write_pair(pair: SimulatedPair, outdir: str | Path) -> dict[str, Path]:
    """Write ``science.fits`` and ``template.fits`` (MEF layout) and ``truth.json``.

    Returns
    -------
    paths : dict
        ``{"science": ..., "template": ..., "truth": ...}``.
    """
    from .io import write_exposure

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "science": outdir / "science.fits",
        "template": outdir / "template.fits",
        "truth": outdir / "truth.json",
    }
    write_exposure(pair.science, paths["science"])
    write_exposure(pair.template, paths["template"])
    paths["truth"].write_text(json.dumps(pair.truth, indent=1))
    return paths


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def demo_transients(config: SimulationConfig) -> int:
    """Transients of a demonstration pair: about 20 per 512x512, at least 5."""
    ny, nx = config.shape
    return max(5, int(round(20 * nx * ny / 512.0**2)))


def preset(name: str, size: int | tuple[int, int] = 512, seed: int = 0) -> SimulationConfig:
    """A named scenario used by tests and benchmarks.

    ``sharper_template`` (template FWHM 3.0 < science 4.0), ``sharper_science`` (the
    reverse), ``equal`` (nearly equal: 3.5 and 3.4), ``varying`` (science Moffat whose
    FWHM changes 25% across the frame, a sky gradient, flux ratio 0.8), ``defects`` (bad
    columns, cosmic rays, saturated stars), ``noisy_template`` (template depth 0.25,
    twice the science noise) and ``wide_field`` (science Moffat whose FWHM runs 2.4-6 px
    from one corner to the other, as on a wide-field camera). All have transients (about
    20 per 512x512).
    """
    if name not in PRESETS:
        raise InvalidConfigError(f"unknown simulation preset {name!r}; choose from {PRESETS}")
    base = SimulationConfig(size=size, seed=seed)
    ny, nx = base.shape
    per_area = nx * ny / 512.0**2
    settings: dict[str, Any] = {"n_transients": demo_transients(base)}
    if name == "sharper_template":
        settings |= {
            "science_psf": {"fwhm": 4.0, "ellipticity": 0.05, "angle": 20.0},
            "template_psf": {"fwhm": 3.0},
        }
    elif name == "sharper_science":
        settings |= {"science_psf": {"fwhm": 3.0}, "template_psf": {"fwhm": 4.0}}
    elif name == "equal":
        settings |= {"science_psf": {"fwhm": 3.5}, "template_psf": {"fwhm": 3.4}}
    elif name == "varying":
        settings |= {
            "science_psf": {
                "type": "moffat",
                "fwhm": 4.0,
                "beta": 3.0,
                "variation": 0.25,
                "ellipticity": 0.05,
                "angle": 30.0,
            },
            "template_psf": {"type": "moffat", "fwhm": 3.0, "beta": 3.5},
            "science_sky": {
                "level": 1200.0,
                "gradient_x": 60.0,
                "gradient_y": -40.0,
                "curvature_xx": 25.0,
                "curvature_xy": 10.0,
                "curvature_yy": -15.0,
            },
            "flux_ratio": 0.8,
        }
    elif name == "defects":
        settings |= {
            "n_bad_columns": max(2, int(round(3 * math.sqrt(per_area)))),
            "n_bad_columns_template": max(1, int(round(2 * math.sqrt(per_area)))),
            "n_cosmic_rays": max(10, int(round(40 * per_area))),
            "saturation_level": 30000.0,
            "n_saturated_stars": max(3, int(round(5 * per_area))),
        }
    elif name == "noisy_template":
        settings |= {"template_depth": 0.25}
    elif name == "wide_field":
        # a wide-field camera's PSF: 2.5x wider on one corner than on the other
        settings |= {
            "science_psf": {
                "type": "moffat",
                "fwhm": 3.6,
                "beta": 3.0,
                "variation": 0.9,
                "variation_angle": 45.0,
            },
            "template_psf": {"type": "moffat", "fwhm": 2.2, "beta": 3.5},
            "psf_node_spacing": 64.0,
        }
    return SimulationConfig.model_validate(_merge(base.model_dump(), settings))


def simulate_command(
    outdir: str | Path,
    size: int = 512,
    seed: int = 0,
    preset: str | None = None,
    **overrides: Any,
) -> dict[str, Path]:
    """Simulate a pair and write it to ``outdir`` (the ``alsub simulate`` command).

    Parameters
    ----------
    outdir : str or Path
        Directory for science.fits, template.fits and truth.json (created).
    size, seed : int
        Image size and random seed.
    preset : str, optional
        One of `PRESETS` as the starting configuration.
    **overrides
        Any `SimulationConfig` field; nested sections merge (``science_psf={"fwhm": 5}``).
        Without a preset the pair gets `demo_transients` transients unless
        ``n_transients`` is given (a demo pair should have something to find).

    Raises
    ------
    InvalidConfigError
        Unknown preset or field, or a value out of range.
    """
    try:
        if preset:
            base = _preset(preset, size, seed)
        else:
            base = SimulationConfig(size=size, seed=seed)
            base = base.model_copy(update={"n_transients": demo_transients(base)})
        config = SimulationConfig.model_validate(_merge(base.model_dump(), overrides))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "simulation config"
        raise InvalidConfigError(f"simulation {where}: {first['msg']}") from None
    return write_pair(simulate_pair(config), outdir)


_preset = preset
