"""The noise scale of PSF fluxes (core.forced.noise_scale) against its analytic value."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, signal

from core.config import ForcedPhotometryConfig
from core.exposure import Exposure
from core.forced import PsfStamps, forced_photometry, noise_scale, whole_stamp_fluxes
from core.psf import GaussianPsf, ImagePsf, MoffatPsf


def test_noise_scale_of_correlated_noise_is_its_analytic_value():
    """White noise smoothed by a Gaussian (sigma 1.2 px), its exact per-pixel variance
    in the variance plane: a PSF flux's true error over its variance-plane error is
    sqrt(sum (P x g)^2 / (sum g^2 sum P^2)) (P the fitted stamp, g the smoothing
    kernel). Measured at the default positions of 5 seeds (each draws others; the
    scale scatters by ~3%): each within 6% and their mean within 2% (here +0.3%;
    400 positions with a stamp drawn for each read 2.4% low on average)."""
    delta = np.zeros((41, 41))
    delta[20, 20] = 1.0
    g = ndimage.gaussian_filter(delta, 1.2, mode="constant", truncate=8.0)
    shape = (1500, 1400)
    ratios = []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        image = signal.fftconvolve(rng.normal(size=shape), g, mode="same").astype(np.float32)
        variance = np.full(shape, (g**2).sum(), dtype=np.float32)
        exposure = Exposure.from_arrays(image, variance, psf=GaussianPsf(2.0))
        config = ForcedPhotometryConfig(fit_background=False, seed=seed)
        stamps = PsfStamps(exposure.psf, exposure, config=config)
        p = stamps.at(np.array([700.0]), np.array([750.0]))[0][0]
        expected = np.sqrt((signal.fftconvolve(p, g) ** 2).sum() / ((g**2).sum() * (p**2).sum()))
        assert expected > 1.5  # the noise is correlated enough to matter
        ratios.append(noise_scale(exposure, stamps, config) / expected)
    assert np.all(np.abs(np.array(ratios) - 1) < 0.06), ratios
    assert abs(np.mean(ratios) - 1) < 0.02, ratios


def test_noise_scale_needs_room_for_separate_stamps():
    """A frame with room for fewer than 30 separate stamps trusts its variance plane
    (1.0): overlapping fits share their noise (a 16 x 16 frame of white noise read 0.3)."""
    rng = np.random.default_rng(3)
    for side, expected in ((16, 1.0), (300, None)):
        image = rng.normal(size=(side, side)).astype(np.float32)
        exposure = Exposure.from_arrays(
            image, np.ones((side, side), np.float32), psf=GaussianPsf(1.5)
        )
        config = ForcedPhotometryConfig()
        stamps = PsfStamps(exposure.psf, exposure, config=config)
        scale = noise_scale(exposure, stamps, config)
        if expected is None:  # white noise: the variance plane is right
            assert scale == pytest.approx(1.0, abs=0.1)
        else:
            assert scale == expected


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.5, 3.0])
def test_profile_sigma_of_sharp_and_ringing_psfs(sigma):
    """The width DIA measures with: adaptive moments where they hold, else the
    half-maximum contour. Moments of a profile barely a pixel wide collapse along an
    axis (a 0.5 px Gaussian read 0); a whitened PSF ringing below zero (the JWST
    difference's) read a FWHM of 0.81 px against 1.89 at half maximum."""
    from core.forced import profile_sigma
    from core.psf import ImagePsf, _iterated_moments, adaptive_moments

    gaussian = GaussianPsf(sigma)
    assert profile_sigma(gaussian) == pytest.approx(sigma, rel=0.07)
    # a sharp core with a negative ring around it, the shape decorrelation gives
    yy, xx = np.mgrid[-15:16, -15:16]
    core = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    ring = np.exp(-(xx**2 + yy**2) / (2 * (2.5 * sigma) ** 2))
    stamp = core / core.sum() - 0.25 * ring / ring.sum()
    stamp /= stamp.sum()
    # the true half maximum of this profile, on a fine grid of the same formula
    fine = np.linspace(0, 5 * sigma, 20001)
    profile = (
        np.exp(-(fine**2) / (2 * sigma**2)) / core.sum()
        - 0.25 * np.exp(-(fine**2) / (2 * (2.5 * sigma) ** 2)) / ring.sum()
    )
    half_width = fine[np.argmax(profile < 0.5 * profile[0])]
    expected = 2 * half_width / 2.3548200450309493
    measured = profile_sigma(ImagePsf(stamp))
    # (a profile barely a pixel wide: its samples widen the contour by up to ~10%)
    assert measured == pytest.approx(expected, rel=0.12 if sigma < 1 else 0.03)
    if sigma == 0.5:  # where the iterated moments alone fail
        with np.errstate(all="ignore"):
            ixx, iyy, _ = _iterated_moments(stamp, 50, 1e-6)
            assert min(ixx, iyy) < 1 / 12
            ixx, iyy, _ = adaptive_moments(stamp)
        assert np.sqrt(0.5 * (ixx + iyy)) == pytest.approx(measured, rel=1e-6)


def test_observation_meta_keeps_only_what_a_fits_card_holds():
    """The catalog header takes the science exposure's epoch, band, exposure time and
    unit; a value no FITS card holds (non-ASCII, NaN) is left out, not an error."""
    from core.diasources import catalog_hdulist
    from core.forced import observation_meta

    rng = np.random.default_rng(2)
    image = rng.normal(size=(64, 64)).astype(np.float32)
    exposure = Exposure.from_arrays(image, np.ones_like(image))
    exposure.metadata.update(
        {"MJD-OBS": float("nan"), "DATE-OBS": " 2024-01-02 ", "FILTER": "r\u00e9", "EXPTIME": 30}
    )
    meta = observation_meta(exposure)
    # no BUNIT in the header: the image file's unit (raw counts)
    assert meta == {"date_obs": "2024-01-02", "exptime": 30, "bunit": "adu"}
    exposure.band = "g"
    assert observation_meta(exposure)["band"] == "g"  # the exposure's band first
    table = forced_photometry(exposure.with_psf(GaussianPsf(1.5)), x=[32.0], y=[32.0])
    header = catalog_hdulist(table)[1].header
    assert header["DATE-OBS"] == "2024-01-02" and "MJD-OBS" not in header
    # only the MJD: the date written from it, as the image's WCS header has it
    exposure.metadata.update({"MJD-OBS": 60000.5, "DATE-OBS": None})
    assert observation_meta(exposure)["date_obs"] == "2023-02-25T12:00:00.000"


def test_sharpness_of_no_positions_is_empty():
    """`psf_photometry` asked for sharpness at no position (a catalog without single
    sources: two identical images) answers an empty array (it raised on the reshape)."""
    from core.exposure import Exposure
    from core.forced import PsfStamps, psf_photometry
    from core.psf import GaussianPsf

    exposure = Exposure.from_arrays(np.zeros((64, 64)), np.ones((64, 64)), psf=GaussianPsf(1.5))
    stamps = PsfStamps(exposure.psf, exposure)
    fit = psf_photometry(exposure, np.zeros(0), np.zeros(0), stamps, sharpness=True)
    assert fit["sharp"].shape == (0,) and fit["flux"].shape == (0,)


def test_whole_stamp_flux_where_the_psf_light_is_on_the_frame():
    """A Moffat (beta 2, FWHM 4 px) drawn 151 px wide on a 200 px frame: a star 50 px
    from the edge has 99.6% of its light on the frame, and its whole-stamp flux was NaN
    because the drawn stamp left the frame (a 256 px simulated pair kept 1 of 6 stars and
    refused to subtract). Now it is measured as the centred star is; one 3 px from the
    edge (over a third of its light off the frame) is not."""
    stamp = MoffatPsf(4.0, beta=2.0, size=151).kernel_image()
    flux = 2.0e4
    rng = np.random.default_rng(0)
    measured = []
    for x, y in ((100, 100), (50, 120), (3, 60)):  # one star a frame: no neighbour's wings
        image = 5.0 + rng.normal(0.0, 1.0, (200, 200))
        rows, cols = np.arange(y - 75, y + 76), np.arange(x - 75, x + 76)
        keep_r, keep_c = (rows >= 0) & (rows < 200), (cols >= 0) & (cols < 200)
        image[np.ix_(rows[keep_r], cols[keep_c])] += flux * stamp[np.ix_(keep_r, keep_c)]
        exposure = Exposure.from_arrays(
            image.astype(np.float32), np.ones(image.shape, np.float32), psf=ImagePsf(stamp)
        )
        measured.append(whole_stamp_fluxes(exposure, [float(x)], [float(y)]))
    fluxes, errors = (np.concatenate(v) for v in zip(*measured, strict=True))
    assert fluxes[:2] == pytest.approx(flux, rel=0.003)
    assert np.all(errors[:2] < 0.003 * flux)
    assert np.isnan(fluxes[2]) and np.isnan(errors[2])


def test_forced_photometry_of_an_image_with_a_sky_level_fits_a_background():
    """An image that is no difference (a science frame, a matched template: sky ~1000
    counts here) was measured as one: its sky read as flux, silently (a review's variable
    on a matched template: 50211 +- 3354 for 8500). The sky is found at random positions
    and a local background fitted with each flux; a difference is measured as before."""
    from scipy.spatial import cKDTree

    from tests.conftest import simulated_pair

    pair = simulated_pair("sharper_template", 1024, 3)
    stars = pair.truth["stars"]
    x, y, flux = (np.asarray(stars[k], dtype=float) for k in ("x", "y", "flux_science"))
    alone = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)[0][:, 1] > 12
    inside = (x > 20) & (x < 1003) & (y > 20) & (y < 1003)
    pick = alone & inside & (flux > 3e3) & ~np.asarray(stars["saturated"], dtype=bool)
    assert pick.sum() >= 8
    measured = forced_photometry(pair.science, x[pick], y[pick])
    assert measured.meta["sky_found"] and measured.meta["fit_background"]
    ratio = np.asarray(measured["psf_flux"]) / flux[pick]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.03)
    # the same pixels without their sky: no background needed, none fitted
    level = float(np.median(pair.science.image))
    flat = Exposure.from_arrays(
        pair.science.image - level, variance=pair.science.variance, psf=pair.science.psf
    )
    steady = forced_photometry(flat, x[pick], y[pick])
    assert not steady.meta["sky_found"] and not steady.meta["fit_background"]
