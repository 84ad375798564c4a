"""Variance rescaling (algorithm.md 1.6) and the mesh background."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.config import ScaleVarianceConfig
from core.exposure import Exposure
from core.variance import (
    PHYSICAL_VARIANCE_PREFIX,
    measure_noise_correlation,
    measure_variance_scale,
    scale_variance,
    second_difference_gain,
    variance_scale_factor,
)


def _noise_exposure(sigma, variance, shape=(512, 512), seed=0, sky=None):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, sigma, shape)
    if sky is not None:
        image += sky
    return Exposure.from_arrays(image, np.full(shape, variance))


def test_factor_recovers_wrong_variance_despite_a_sky_gradient():
    yy, xx = np.mgrid[0:512, 0:512]
    exposure = _noise_exposure(3.0, 4.0, sky=100 + 0.2 * xx - 0.1 * yy)
    assert variance_scale_factor(exposure) == pytest.approx(9.0 / 4.0, rel=0.02)


def test_masked_pixels_are_ignored():
    exposure = _noise_exposure(2.0, 4.0)
    exposure.image[:100] += 1000 * np.random.default_rng(1).random((100, 512))
    exposure.set_plane("BAD", np.zeros(exposure.shape, bool))
    exposure.mask[:100] |= exposure.mask_planes.value("BAD")
    assert variance_scale_factor(exposure) == pytest.approx(1.0, rel=0.02)


def test_scale_variance_multiplies_in_place_and_returns_factor():
    exposure = _noise_exposure(1.0, 0.25)
    scale = scale_variance(exposure)
    assert scale.factor == pytest.approx(4.0, rel=0.02) and scale.method == "sky"
    assert np.median(exposure.variance) == pytest.approx(0.25 * scale.factor)


def test_implausible_factor_is_a_warning_not_a_refusal():
    exposure = _noise_exposure(10.0, 1.0)  # 100x too small a variance
    scale = measure_variance_scale(exposure, ScaleVarianceConfig(limit=10.0))
    assert scale.factor == 1.0 and scale.method == "none"
    assert any("implausible factor" in text for text in scale.warnings)
    assert variance_scale_factor(exposure, ScaleVarianceConfig(limit=200.0)) == pytest.approx(
        100.0, rel=0.03
    )


def _crowded_field(shape=(512, 512), seed=2, noise=3.0):
    """White noise of sigma ``noise`` on a sky of thousands of faint PSF-smooth stars."""
    rng = np.random.default_rng(seed)
    stars = np.zeros(shape)
    n = 20000
    stars[rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)] = rng.exponential(300, n)
    sky = ndimage.gaussian_filter(stars, 2.0) + 500.0
    return sky + rng.normal(0.0, noise, shape)


def test_confusion_does_not_inflate_a_physical_variance():
    image = _crowded_field()
    exposure = Exposure.from_arrays(
        image, np.full(image.shape, 9.0), variance_source=PHYSICAL_VARIANCE_PREFIX + " (test)"
    )
    scale = measure_variance_scale(exposure)
    # the unresolved stars make the sky scatter several times the noise, yet the
    # pixel-scale estimate sees the true noise: the right variance stays
    assert scale.sky > 3.0
    assert scale.method == "pixel_scale"
    assert scale.factor == pytest.approx(1.0, abs=0.05)
    assert any("confusion" in text for text in scale.notes) and not scale.warnings


def test_correlated_noise_is_measured_and_keeps_the_marginal_variance():
    rng = np.random.default_rng(5)
    white = rng.normal(0.0, 1.0, (600, 600))
    kernel = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    smooth = ndimage.correlate(white, kernel)
    marginal = float(np.sum(kernel**2))
    exposure = Exposure.from_arrays(smooth, np.full(smooth.shape, marginal))
    scale_variance(exposure)
    # a given plane that is right per pixel keeps its scale, and the correlation is recorded
    assert exposure.variance.mean() == pytest.approx(marginal, rel=0.05)
    expected = ndimage.correlate(np.pad(kernel, 3), kernel, mode="constant")[1:-1, 1:-1]
    expected /= expected[3, 3]
    np.testing.assert_allclose(exposure.noise_correlation, expected, atol=0.02)
    # and the pixel-scale estimate, corrected for that correlation, agrees
    gain = second_difference_gain(exposure.noise_correlation)
    assert gain < 0.5
    exposure.variance_source = PHYSICAL_VARIANCE_PREFIX
    exposure.variance[:] = marginal
    assert measure_variance_scale(exposure).pixel_scale == pytest.approx(1.0, abs=0.08)


@pytest.mark.parametrize("physical", [False, True])
def test_estimates_made_at_once_equal_those_made_one_after_the_other(physical, monkeypatch):
    # sky, pixel-scale and (for a plane not modelled from photon statistics) the noise
    # correlation run side by side on the cores there are: the same numbers as in turn
    from core import parallel

    rng = np.random.default_rng(6)
    smooth = ndimage.correlate(rng.normal(0.0, 1.0, (600, 600)), np.full((2, 2), 0.5))
    exposure = Exposure.from_arrays(smooth, np.full(smooth.shape, 0.8))
    if physical:
        exposure.variance_source = PHYSICAL_VARIANCE_PREFIX
    at_once = measure_variance_scale(exposure)
    monkeypatch.setattr(parallel, "_limit", 1)  # one thread: the estimates in turn
    assert parallel.n_threads() == 1
    in_turn = measure_variance_scale(exposure)
    assert (at_once.factor, at_once.sky, at_once.pixel_scale, at_once.method) == (
        in_turn.factor,
        in_turn.sky,
        in_turn.pixel_scale,
        in_turn.method,
    )
    assert (at_once.noise_correlation is None) == physical
    if not physical:
        np.testing.assert_array_equal(at_once.noise_correlation, in_turn.noise_correlation)


def test_broad_noise_correlation_is_not_cut_by_the_plateau():
    """Noise correlated out to the last recorded lag keeps it: the sky plateau is taken
    beyond the noise's reach (at the recorded lags it removed real correlation, 20%)."""
    sigma = 1.0
    noise = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(512, 512)), sigma)
    noise /= noise.std()
    rho = measure_noise_correlation(Exposure.from_arrays(noise, np.ones(noise.shape)))
    lags = np.arange(-3, 4)
    truth = np.exp(-(lags[:, None] ** 2 + lags[None, :] ** 2) / (4 * sigma**2))
    assert rho.sum() == pytest.approx(truth.sum(), rel=0.06)
    np.testing.assert_allclose(rho, truth, atol=0.03)


def _pair_with_static_sky(static_flux: float, n: int = 384, seed: int = 3):
    """Correlated noise (given, right planes), 40 stars, and optionally a faint static sky
    of unresolved sources that both images share at their own PSF (sigma 2 and 1.4 px)."""
    rng = np.random.default_rng(seed)
    stars = rng.uniform(20, n - 20, (2, 40)), 10 ** rng.uniform(3.5, 4.3, 40)
    m = int(0.08 * n * n)
    faint = rng.uniform(0, n - 1, (2, m)), static_flux * rng.exponential(1.0, m)
    out = []
    for psf_sigma, noise_sigma, correlation in ((2.0, 10.0, 1.0), (1.4, 7.0, 0.7)):
        points = np.zeros((n, n))
        for (x, y), flux in (stars, faint):
            np.add.at(points, (np.round(y).astype(int), np.round(x).astype(int)), flux)
        image = ndimage.gaussian_filter(points, psf_sigma, mode="constant", truncate=5)
        noise = ndimage.gaussian_filter(rng.normal(size=(n, n)), correlation)
        image += noise * noise_sigma / noise.std()
        out.append(Exposure.from_arrays(image, np.full((n, n), noise_sigma**2)))
    (x, y), _ = stars
    yy, xx = np.mgrid[:n, :n]
    sky = np.ones((n, n), bool)
    for xs, ys in zip(x, y, strict=True):
        sky &= (xx - xs) ** 2 + (yy - ys) ** 2 >= 15**2
    sky[:40] = sky[-40:] = False
    sky[:, :40] = sky[:, -40:] = False
    return out[0], out[1], sky


@pytest.mark.parametrize("mode", ["preconvolve", "auto"])
def test_static_sky_in_sky_measured_noise_does_not_bias_the_output_noise(mode):
    """The inputs' noise and its correlation, measured on sky, also hold faint static
    sources; they cancel in the difference, where the correction measures them: the
    output noise is as honest with that sky as without it (without the correction,
    preconvolve: 0.95 instead of 1.03, auto: 0.91 instead of 0.93)."""
    from astropy.stats import mad_std

    from core.config import SubtractionConfig
    from core.subtract import run_subtraction

    # the score's own noise floor is an unrelated (upward) correction: kept out
    config = SubtractionConfig(mode=mode, registration={"mode": "none"}, score_noise_tolerance=100)
    figures = []
    for static_flux in (0.0, 60.0):
        science, template, sky = _pair_with_static_sky(static_flux)
        result = run_subtraction(science, template, config)
        out = result.output
        good = sky & (out.mask == 0) & np.isfinite(out.image)
        figures.append(float(mad_std(out.image[good] / np.sqrt(out.variance[good]))))
        if static_flux:
            ratio = [v for k, v in result.metadata.items() if k.endswith("staticStructureRatio")]
            assert ratio and ratio[0] < 0.95
    assert 0.9 <= figures[0] <= 1.1
    assert figures[1] == pytest.approx(figures[0], abs=0.03)


def test_in_place_helpers_match_their_plain_versions():
    """The consumed-input MAD and the in-place stencil sums give the plain code's
    numbers to the bit (float32 and float64 inputs)."""
    from astropy.stats import mad_std as plain_mad_std

    from core.order import mad_std
    from core.variance import _second_difference_pulls

    rng = np.random.default_rng(21)
    for dtype in (np.float32, np.float64):
        values = rng.standard_t(4, 100_001).astype(dtype)
        expected = plain_mad_std(values) ** 2
        got = mad_std(values.copy(), consume=True) ** 2
        assert type(got) is type(expected) and got == expected
    image = rng.normal(size=(60, 70))
    variance = rng.uniform(0.5, 2.0, image.shape)
    good = rng.random(image.shape) > 0.1
    for axis in (1, 0):
        np.testing.assert_array_equal(
            _second_difference_pulls(image, variance, good, axis),
            _plain_stencil_pulls(image, variance, good, axis),
        )


def _plain_stencil_pulls(image, variance, good, axis):
    """The stencil's pulls along ``axis`` as plain whole-window sums (the reference)."""
    from core.variance import _STENCIL

    n = _STENCIL.size
    width = image.shape[axis] - n + 1
    parts = [np.s_[:, i : i + width] if axis else np.s_[i : i + width] for i in range(n)]
    use = np.logical_and.reduce([good[p] for p in parts])
    value = sum(w * image[p] for w, p in zip(_STENCIL, parts, strict=True))
    expected = sum(w * w * variance[p] for w, p in zip(_STENCIL, parts, strict=True))
    return value[use] / np.sqrt(expected[use])


def test_blockwise_stencil_pulls_of_float32_planes_follow_the_plain_float64_sums():
    # several blocks of output rows (and a partial last one), float32 planes on a sky
    # level summed in float32: the plain float64 sums to ~1e-4 of the noise
    from core.order import mad_std
    from core.variance import _PULL_BLOCK_ROWS, _second_difference_pulls

    rng = np.random.default_rng(23)
    shape = (2 * _PULL_BLOCK_ROWS + 37, 90)
    image = (1000.0 + 3.0 * rng.normal(size=shape)).astype(np.float32)
    variance = rng.uniform(8.0, 10.0, shape).astype(np.float32)
    good = rng.random(shape) > 0.1
    wide, wide_var = image.astype(np.float64), variance.astype(np.float64)
    for axis in (1, 0):
        fast = _second_difference_pulls(image, variance, good, axis)
        plain = _plain_stencil_pulls(wide, wide_var, good, axis)
        assert fast.dtype == np.float32 and fast.shape == plain.shape
        np.testing.assert_allclose(fast, plain, rtol=0, atol=5e-4)
        assert mad_std(fast) == pytest.approx(mad_std(plain), rel=1e-4)


def test_sky_estimate_of_a_large_frame_is_not_biased_by_its_background_bins():
    # White noise whose variance plane is right, on a sky gradient: the sky estimate is
    # 1 to its precision (~0.25% for a million pixels). A strided subsample (stride 4
    # at 4096^2) left 8 x 8-pixel background bins that followed the noise: 0.979.
    from core.variance import _sky_estimate

    rng = np.random.default_rng(29)
    side = 4096
    y = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
    image = rng.standard_normal((side, side), dtype=np.float32) * np.float32(3.0)
    image += np.float32(50.0) * y
    exposure = Exposure.from_arrays(image, np.full((side, side), 9.0, dtype=np.float32))
    sky = _sky_estimate(exposure, ScaleVarianceConfig())
    assert sky == pytest.approx(1.0, abs=0.008)
