"""The real-data figures of core.evaluate (REFERENCE.md) on differences of known noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from core.evaluate import Output, reference_field, reference_figures, star_chi2, target_snr
from tests.conftest import simulated_pair

SIGMA = 10.0  # noise of the synthetic differences (counts)
TARGET = (200.0, 180.0)  # (row, col), away from the border


@pytest.fixture(scope="module")
def pair():
    return simulated_pair("sharper_template", 384, 3)


@pytest.fixture(scope="module")
def field(pair):
    return reference_field(
        pair.science.image,
        pair.template.image,
        pair.science.psf.fwhm(),
        science_variance=pair.science.variance,
        template_variance=pair.template.variance,
        target=TARGET,
    )


def _noise(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, SIGMA, shape)


def test_noise_is_one_when_the_variance_is_right_and_two_when_four_times_too_small(pair):
    science = pair.science
    # residuals at every star (10% of the science stars): the sky mask must leave them out
    residual = 0.1 * (pair.science_model - np.median(pair.science_model))
    difference = _noise(1, science.shape) + residual
    variance = np.full(science.shape, SIGMA**2)
    figures = reference_figures(
        {"right": Output(difference, variance), "small": Output(difference, variance / 4)},
        science.image,
        pair.template.image,
        science.psf.fwhm(),
        science_variance=science.variance,
        template_variance=pair.template.variance,
    )
    assert figures["right"]["noise"] == pytest.approx(1.0, abs=0.03)
    assert figures["small"]["noise"] == pytest.approx(2.0, abs=0.06)
    # the residuals do matter where the sky mask does not remove them
    z = difference / SIGMA
    assert np.mean(np.abs(z) > 5) > 10 * 5.7e-7  # far more 5-sigma pixels than noise gives


def test_sky_mask_avoids_stars_border_and_saturation(pair):
    science = pair.science
    fwhm = science.psf.fwhm()
    saturated = np.zeros(science.shape, bool)
    saturated[100, 300] = True
    field = reference_field(
        science.image,
        pair.template.image,
        fwhm,
        science_variance=science.variance,
        template_variance=pair.template.variance,
        saturated=saturated,
    )
    stars = pair.truth["stars"]
    bright = np.asarray(stars["flux_science"]) > 50 * SIGMA * fwhm
    rows = np.round(np.asarray(stars["y"])[bright]).astype(int)
    cols = np.round(np.asarray(stars["x"])[bright]).astype(int)
    inside = (rows >= 0) & (rows < 384) & (cols >= 0) & (cols < 384)
    assert not field.sky[rows[inside], cols[inside]].any()
    border = int(math.ceil(2.5 * fwhm)) + 12
    assert not field.sky[:border].any() and not field.sky[:, -border:].any()
    assert field.sky[border:-border, border:-border].mean() > 0.3  # mostly sky in between
    yy, xx = np.mgrid[:384, :384]
    assert not field.sky[np.hypot(yy - 100, xx - 300) <= 2 * fwhm].any()
    # no chi^2 star within 2 FWHM of saturation either
    assert np.all(np.hypot(field.stars[:, 0] - 100, field.stars[:, 1] - 300) > 2 * fwhm)


def test_chi2_stars_are_the_brightest_unsaturated_template_stars_away_from_the_target(field):
    assert len(field.stars) == 30
    assert np.all(np.hypot(field.stars[:, 0] - TARGET[0], field.stars[:, 1] - TARGET[1]) > 8)
    border = int(math.ceil(2.5 * field.fwhm)) + 12
    assert field.stars.min() >= border and field.stars.max() < 384 - border


def test_cosmic_rays_of_the_template_are_not_chi2_stars(pair):
    """Spikes of one or two pixels, as bright as bright stars, are not stars.

    Like real cosmic rays they differ in energy and track (stars share one profile:
    that is how the stellar locus tells them apart).
    """
    template = pair.template.image.copy()
    peak = float(template.max())
    rng = np.random.default_rng(5)
    spikes = []
    for _ in range(12):
        row, col = rng.integers(40, 344, size=2)
        template[row, col] += rng.uniform(5.0, 30.0) * peak
        drow, dcol = [(0, 1), (1, 0), (1, 1)][rng.integers(3)]
        template[row + drow, col + dcol] += rng.uniform(0.0, 0.8) * template[row, col]
        spikes.append((row, col))
    fwhm = pair.science.psf.fwhm()
    options = dict(science_variance=pair.science.variance, template_variance=pair.template.variance)
    field = reference_field(pair.science.image, template, fwhm, **options)
    clean = reference_field(pair.science.image, pair.template.image, fwhm, **options)
    near = [np.hypot(*(field.stars - np.array(spike)).T).min() for spike in spikes]
    assert min(near) > 3, "a cosmic ray was taken for a star"
    # the stars are the clean field's, less those the spikes' footprints touch or blend
    kept = {tuple(np.round(star)) for star in field.stars}
    assert len(kept & {tuple(np.round(star)) for star in clean.stars}) >= 25
    # without the cut the spikes, brightest of all, lead the list
    from core.config import ReferenceFiguresConfig

    config = ReferenceFiguresConfig(exclude_sharp_sources=False)
    loose = reference_field(pair.science.image, template, fwhm, config=config, **options)
    assert sum(np.hypot(*(loose.stars - np.array(s)).T).min() < 3 for s in spikes) >= 6


def _expected_snr(amplitude: float, fwhm: float, sigma: float) -> float:
    """Matched-filter S/N of a Gaussian star (FWHM ``fwhm``) in white noise, discrete sums."""
    s = fwhm / (2 * math.sqrt(2 * math.log(2)))
    delta = np.zeros((81, 81))
    delta[40, 40] = 1.0
    g = ndimage.gaussian_filter(delta, s)  # the statistic's weights
    return amplitude * float(np.sum(g * g)) / (sigma * math.sqrt(np.sum(g * g)))


def _gaussian_star(shape, row, col, flux, fwhm) -> np.ndarray:
    s = fwhm / (2 * math.sqrt(2 * math.log(2)))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return flux * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * s * s)) / (2 * math.pi * s * s)


@pytest.mark.parametrize("flux", [3000.0, -1500.0])
def test_target_snr_of_an_injected_source(pair, field, flux):
    shape = pair.science.shape
    star = _gaussian_star(shape, TARGET[0], TARGET[1], flux, field.fwhm)
    variance = np.full(shape, SIGMA**2)
    ratios = [
        target_snr(Output(_noise(seed, shape) + star, variance), field)
        / _expected_snr(flux, field.fwhm, SIGMA)
        for seed in range(10, 18)
    ]
    # one realisation scatters ~6% (MAD of 500 samples); the median of eight, ~3%
    assert np.median(ratios) == pytest.approx(1.0, abs=0.05)
    assert min(ratios) > 0.8  # and the sign is always right


def test_target_snr_counts_correlated_noise(pair, field):
    """Smoothed noise: the empirical calibration follows the filtered noise, not V."""
    shape = pair.science.shape
    smooth = ndimage.gaussian_filter(_noise(4, shape), 1.5)
    white = _noise(4, shape)
    star = _gaussian_star(shape, TARGET[0], TARGET[1], 3000.0, field.fwhm)
    v = np.full(shape, SIGMA**2)
    # the same star over noise of a smaller pixel sigma but larger correlated scatter
    snr_smooth = target_snr(Output(smooth + star, v), field)
    snr_white = target_snr(Output(white + star, v), field)
    filtered_scatter = lambda d: np.std(ndimage.gaussian_filter(d, field.fwhm / 2.3548))  # noqa: E731
    expected_ratio = filtered_scatter(white) / filtered_scatter(smooth)
    assert snr_smooth / snr_white == pytest.approx(expected_ratio, rel=0.12)


def test_score_image_is_sampled_as_it_is(pair, field):
    shape = pair.science.shape
    difference = _noise(7, shape) + _gaussian_star(shape, *TARGET, 3000.0, field.fwhm)
    score = ndimage.gaussian_filter(difference, field.fwhm / (2 * math.sqrt(2 * math.log(2))))
    v = np.full(shape, SIGMA**2)
    from_difference = target_snr(Output(difference, v), field)
    from_score = target_snr(Output(score, v, score=True), field)
    assert from_score == pytest.approx(from_difference, rel=1e-6)


def test_star_chi2_is_one_on_noise_and_grows_with_star_residuals(pair, field):
    shape = pair.science.shape
    noise = _noise(9, shape)
    variance = np.full(shape, SIGMA**2)
    assert star_chi2(Output(noise, variance), field) == pytest.approx(1.0, abs=0.1)
    assert star_chi2(Output(noise, variance / 4), field) == pytest.approx(4.0, abs=0.4)
    residual = 0.5 * (pair.science_model - np.median(pair.science_model))
    assert star_chi2(Output(noise + residual, variance), field) > 2.0


def test_saturation_touched_product_pixels_are_not_valid():
    """SAT / SAT_TEMPLATE (spread by the kernel) mark values that depend on saturated input:
    not a usable difference, as HOTPANTS masks its own."""
    from core.evaluate import output_valid
    from core.exposure import Exposure

    out = Exposure.from_arrays(np.zeros((20, 20)), np.ones((20, 20)))
    touched = np.zeros((20, 20), bool)
    touched[5:9, 5:9] = True
    out.set_plane("SAT_TEMPLATE", touched)
    out.set_plane("DETECTED", np.ones((20, 20), bool))  # a plane that leaves pixels valid
    valid = output_valid(out)
    assert not valid[touched].any() and valid[~touched].all()
