"""The ``sharp`` flag: cosmic rays against point sources at every sampling (core.sharpness)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from bench.cosmic_rays import cosmic_ray_pair, count
from core import sharpness
from core.exposure import Exposure
from core.forced import PsfStamps, forced_photometry, psf_photometry
from core.psf import GaussianPsf, MoffatPsf
from core.subtract import run_subtraction

SEEDS = (300, 301, 302)


@lru_cache(maxsize=4)
def _counts(fwhm: float) -> dict[str, int]:
    """`bench.cosmic_rays.count` pooled over three simulated pairs at a science FWHM."""
    total = {"rays": 0, "rays_unflagged": 0, "transients": 0, "transients_sharp": 0}
    for seed in SEEDS:
        pair, rays = cosmic_ray_pair(fwhm, seed)
        result = run_subtraction(pair.science, pair.template)
        for key, value in count(pair, rays, result.dia_sources).items():
            total[key] += value
    return total


#: Most of the rays of S/N 5-100 that may pass unflagged, and what the former test (the
#: brightest pixel twice the fitted PSF's) let through on these pairs.
MISSED = {1.5: (0.25, 0.954), 2.0: (0.05, 0.540), 2.5: (0.03, 0.108), 3.5: (0.02, 0.006)}


@pytest.mark.parametrize("fwhm", sorted(MISSED))
def test_cosmic_rays_are_sharp_and_transients_are_not_at_every_sampling(fwhm):
    """Rays of one to three pixels in the science (S/N 5-100 on the difference) are
    flagged ``sharp``: at FWHM 2-2.5 px the former test missed 11-54% of them on these
    pairs, at 1.5 px 95%; now 19.5% at 1.5 px (tracks of S/N < 15 there look like a point
    source between pixels, docs/DIA_FLAGS.md), 0-3% above. Isolated point-source
    transients of the same S/N: <= 1% flagged (none here; 0.2% at 3.5 px over ten pairs)."""
    c = _counts(fwhm)
    assert c["rays"] >= 150 and c["transients"] >= 140, c
    assert c["rays_unflagged"] / c["rays"] <= MISSED[fwhm][0], c
    assert c["transients_sharp"] / c["transients"] <= 0.01, c


def _exposure(image: np.ndarray, psf, variance: float) -> Exposure:
    return Exposure.from_arrays(
        image.astype(np.float32), np.full(image.shape, variance, np.float32), psf=psf
    )


@pytest.mark.parametrize(
    "psf",
    [
        GaussianPsf(1.2 / 2.3548),
        GaussianPsf(1.5 / 2.3548),
        GaussianPsf(2.0 / 2.3548, ellipticity=0.3, angle=30.0),
        MoffatPsf(1.5, beta=2.5),
        MoffatPsf(3.5),
    ],
)
def test_a_point_source_is_within_its_psf_bounds_at_any_sub_pixel_position(psf, monkeypatch):
    """The bounds are the PSF's largest contrasts over sub-pixel positions: noise-free
    point sources anywhere on the pixel, measured with a variance of 1e-6 of their peak
    and a tolerance of 5% (the bounds' grid of positions, eighths of a pixel: 3% missed
    on the tilted elliptical PSF), are never sharp; single pixels and two-pixel diagonal
    tracks of 30 sigma are."""
    monkeypatch.setattr(sharpness, "SHARP_TOLERANCE", 1.05)
    rng = np.random.default_rng(5)
    side, step = 400, 20
    centres = np.arange(step, side - step + 1, step, dtype=float)
    cx, cy = (a.ravel() for a in np.meshgrid(centres, centres))
    x, y = cx + rng.uniform(-0.5, 0.5, cx.size), cy + rng.uniform(-0.5, 0.5, cy.size)
    image = np.zeros((side, side))
    blank = _exposure(image, psf, 1.0)
    drawn, ix, iy = PsfStamps(psf, blank).at(x, y)
    h = drawn.shape[1] // 2
    for k in range(x.size):
        image[iy[k] - h : iy[k] + h + 1, ix[k] - h : ix[k] + h + 1] += 1000.0 * drawn[k]
    stars = _exposure(image, psf, 1e-6 * 1000.0 * drawn[:, h, h].max())
    fit = psf_photometry(stars, x, y, PsfStamps(psf, stars), sharpness=True)
    assert not fit["sharp"].any()

    rays = np.zeros((side, side))
    single = cx[: cx.size // 2].astype(int), cy[: cy.size // 2].astype(int)
    rays[single[1], single[0]] = 30.0
    px, py = cx[cx.size // 2 :].astype(int), cy[cy.size // 2 :].astype(int)
    rays[py, px] = rays[py + 1, px + 1] = 30.0
    ray_x = np.concatenate([single[0], px + 0.5])
    ray_y = np.concatenate([single[1], py + 0.5])
    exposure = _exposure(rays, psf, 1.0)
    fit = psf_photometry(exposure, ray_x, ray_y, PsfStamps(psf, exposure), sharpness=True)
    assert fit["sharp"].all()


@pytest.mark.parametrize("fwhm", [1.5, 3.5])
def test_forced_photometry_on_empty_sky_is_not_sharp(fwhm):
    """A noise pixel is no ray: 20000 forced positions on white noise are never flagged
    (without the pixel's own 5 sigma, 0.1-0.15% of empty positions were)."""
    rng = np.random.default_rng(8)
    image = rng.normal(size=(600, 600))
    exposure = _exposure(image, GaussianPsf(fwhm / 2.3548), 1.0)
    x, y = rng.uniform(20, 580, 20000), rng.uniform(20, 580, 20000)
    assert not np.asarray(forced_photometry(exposure, x, y)["flag_sharp"]).any()


def _plain_bounds(kernel: np.ndarray) -> np.ndarray:
    """`sharpness._bounds_of` written plainly: the whole stamp shifted to each offset (a
    periodic Fourier shift), its central 3 x 3 read, each test's largest contrast."""
    from core.psf import _shift_raw

    c = kernel.shape[0] // 2
    best = np.full(len(sharpness._TESTS), -np.inf)
    for dy in sharpness._OFFSETS:
        for dx in sharpness._OFFSETS:
            core = _shift_raw(kernel, dx, dy)[c - 1 : c + 2, c - 1 : c + 2]
            if not (abs(dy) <= 0.5 and abs(dx) <= 0.5) and core.argmax() != 4:
                continue
            for t, offsets in enumerate(sharpness._TESTS):
                mean = np.mean([core[1 + oy, 1 + ox] for oy, ox in offsets])
                best[t] = max(best[t], core[1, 1] / mean if mean > 0 else np.inf)
    return best


@pytest.mark.parametrize(
    "psf",
    [GaussianPsf(0.7), GaussianPsf(1.5, ellipticity=0.3, angle=0.5), MoffatPsf(4.0, 3.0)],
)
def test_contrast_bounds_equal_the_shifted_stamps(psf):
    """The bounds from three rows and columns of the inverse transform, each row shift's
    product made once, equal those of whole shifted stamps."""
    kernel = np.asarray(psf.kernel_image(), dtype=np.float64)
    np.testing.assert_allclose(
        sharpness._bounds_of(kernel[np.newaxis])[0], _plain_bounds(kernel), rtol=1e-10
    )


def test_contrast_bounds_of_a_stack_equal_each_stamps():
    """The bounds of PSF stamps done together (a grid PSF's nodes) are each stamp's own."""
    psfs = [GaussianPsf(0.7), GaussianPsf(1.5, ellipticity=0.3, angle=0.5), MoffatPsf(4.0, 3.0)]
    kernels = [np.asarray(psf.kernel_image(), dtype=np.float64) for psf in psfs]
    stamps = [
        k[k.shape[0] // 2 - 7 : k.shape[0] // 2 + 8, k.shape[1] // 2 - 7 : k.shape[1] // 2 + 8]
        for k in kernels
    ]
    together = sharpness._bounds_of(np.stack(stamps))
    assert together.shape == (3, len(sharpness._TESTS))
    for stamp, bounds in zip(stamps, together, strict=True):
        np.testing.assert_allclose(bounds, _plain_bounds(stamp), rtol=1e-10)
