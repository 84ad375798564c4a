"""Tests of the pair simulator: noise, fluxes, positions, PSFs, defects, truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.stats import mad_std

from core.errors import InvalidConfigError
from core.psf import SIGMA_TO_FWHM, GaussianPsf, GridPsf, MoffatPsf
from core.simulate import (
    PRESETS,
    SimulationConfig,
    SkyConfig,
    preset,
    simulate_command,
    simulate_pair,
    write_pair,
)


def _config(base: SimulationConfig, **changes) -> SimulationConfig:
    return SimulationConfig.model_validate({**base.model_dump(), **changes})


def _sky(sky: SkyConfig, shape) -> np.ndarray:
    """The truth's sky polynomial, written independently of the simulator."""
    ny, nx = shape
    X = (2.0 * (np.arange(nx) - (nx - 1) / 2.0) / nx)[None, :]
    Y = (2.0 * (np.arange(ny) - (ny - 1) / 2.0) / ny)[:, None]
    return (
        sky.level
        + sky.gradient_x * X
        + sky.gradient_y * Y
        + sky.curvature_xx * X**2
        + sky.curvature_xy * X * Y
        + sky.curvature_yy * Y**2
    )


def _isolated(truth_stars, shape, flux_min, radius=30.0, margin=30):
    """Indices of stars brighter than flux_min with no other star within radius."""
    x = np.asarray(truth_stars["x"])
    y = np.asarray(truth_stars["y"])
    f = np.asarray(truth_stars["flux_science"])
    ny, nx = shape
    keep = []
    for i in np.flatnonzero(f > flux_min):
        if not (margin < x[i] < nx - 1 - margin and margin < y[i] < ny - 1 - margin):
            continue
        d = np.hypot(x - x[i], y - y[i])
        d[i] = np.inf
        if d.min() > radius:
            keep.append(i)
    return np.array(keep, dtype=int)


@pytest.fixture(scope="module")
def varying():
    return simulate_pair(preset("varying", 384, seed=11))


@pytest.fixture(scope="module")
def defects():
    return simulate_pair(preset("defects", 384, seed=12))


@pytest.mark.parametrize("which", ["science", "template"])
def test_sky_noise_matches_variance_plane(varying, which):
    exposure = getattr(varying, which)
    cfg = varying.config
    sky = _sky(cfg.science_sky if which == "science" else cfg.template_sky, exposure.shape)
    model = getattr(varying, f"{which}_model")
    # empty sky: the noise-free image is within 0.5 count of the sky polynomial
    empty = np.abs(model - sky) < 0.5
    assert empty.mean() > 0.3
    pulls = (exposure.image - sky)[empty] / np.sqrt(exposure.variance[empty])
    assert 0.97 < mad_std(pulls) < 1.03
    assert abs(np.median(pulls)) < 0.03
    # and over the whole frame, stars included (Poisson term in the variance)
    pulls = (exposure.image - model) / np.sqrt(exposure.variance)
    assert 0.97 < mad_std(pulls) < 1.03


def test_template_depth_sets_noise_ratio(varying):
    science_noise = np.sqrt(np.median(varying.science.variance))
    template_noise = np.sqrt(np.median(varying.template.variance))
    cfg = varying.config
    expected = math.sqrt(
        (
            cfg.template_sky.level / (cfg.gain * cfg.template_depth)
            + cfg.read_noise**2 / cfg.gain**2 / cfg.template_depth
        )
        / (cfg.science_sky.level / cfg.gain + cfg.read_noise**2 / cfg.gain**2)
    )
    assert template_noise / science_noise == pytest.approx(expected, rel=0.02)
    assert varying.template.metadata["GAIN"] == pytest.approx(cfg.gain * cfg.template_depth)


def test_star_flux_and_centroid_noise_free():
    cfg = _config(
        preset("varying", 512, seed=5),
        noise="none",
        n_transients=0,
        n_stars=30,
        star_flux_min=2e3,
    )
    pair = simulate_pair(cfg)
    residual = pair.science_model - _sky(cfg.science_sky, pair.science.shape)
    stars = pair.truth["stars"]
    half = pair.truth["psf"]["science"]["stamp_size"] // 2
    # no other stamp overlaps the box of this one
    chosen = _isolated(stars, pair.science.shape, 0.0, radius=2 * half + 2, margin=half + 1)
    assert len(chosen) >= 3
    for i in chosen:
        x, y, flux = stars["x"][i], stars["y"][i], stars["flux_science"][i]
        ix, iy = int(round(x)), int(round(y))
        box = residual[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
        yy, xx = np.mgrid[iy - half : iy + half + 1, ix - half : ix + half + 1]
        assert box.sum() == pytest.approx(flux, rel=1e-3)
        assert abs((box * xx).sum() / box.sum() - x) < 0.01
        assert abs((box * yy).sum() / box.sum() - y) < 0.01


def test_star_aperture_flux_with_noise():
    cfg = _config(
        preset("varying", 384, seed=6),
        n_transients=0,
        n_stars=40,
        star_flux_slope=1.0,
        star_flux_min=2e4,
        science_sky={"level": 300.0},
    )
    pair = simulate_pair(cfg)
    science = pair.science
    sky = _sky(cfg.science_sky, science.shape)
    stars = pair.truth["stars"]
    chosen = _isolated(stars, science.shape, 0.0, radius=30.0, margin=15)
    assert len(chosen) >= 8
    half = 12
    ratios = []
    for i in chosen:
        x, y = stars["x"][i], stars["y"][i]
        ix, iy = int(round(x)), int(round(y))
        box = (science.image - sky)[iy - half : iy + half + 1, ix - half : ix + half + 1]
        # fraction of the attached PSF inside the same box, at the star's sub-pixel position
        stamp, x0, y0 = science.psf.image_at(x, y)
        c = stamp.shape[0] // 2
        ox, oy = ix - (x0 + c), iy - (y0 + c)
        inside = stamp[c + oy - half : c + oy + half + 1, c + ox - half : c + ox + half + 1].sum()
        ratios.append(box.sum() / (stars["flux_science"][i] * inside))
    assert abs(np.median(ratios) - 1.0) < 0.01


def test_flux_ratio_applied(varying):
    stars = varying.truth["stars"]
    ratio = np.asarray(stars["flux_science"]) / np.asarray(stars["flux_template"])
    assert np.allclose(ratio, 0.8)
    # the images themselves: total source counts scale by the ratio
    cfg = varying.config
    science_sources = varying.science_model - _sky(cfg.science_sky, varying.science.shape)
    template_sources = varying.template_model - _sky(cfg.template_sky, varying.science.shape)
    transients = sum(varying.truth["transients"]["flux_science"])
    # edge losses differ slightly between the PSFs; transients are far from edges
    ratio = (science_sources.sum() - transients) / template_sources.sum()
    assert ratio == pytest.approx(0.8, rel=0.01)
    calib = varying.template.photo_calib.calibration / varying.science.photo_calib.calibration
    assert calib == pytest.approx(0.8)


def test_psf_fwhm_matches_config_and_varies():
    cfg = preset("varying", 512, seed=1)
    cfg = _config(
        cfg,
        science_psf={**cfg.science_psf.model_dump(), "type": "gaussian", "ellipticity": 0.0},
        n_stars=0,
    )
    pair = simulate_pair(cfg)
    psf = pair.science.psf
    assert isinstance(psf, GridPsf)
    assert psf.fwhm(255.5, 255.5) == pytest.approx(4.0, rel=0.01)
    # variation_angle 30 deg: lowest at (0, 0), highest at (511, 511)
    low, high = psf.fwhm(0, 0), psf.fwhm(511, 511)
    assert low == pytest.approx(4.0 * 0.875, rel=0.01)
    assert high == pytest.approx(4.0 * 1.125, rel=0.01)
    assert (high - low) / psf.fwhm(255.5, 255.5) == pytest.approx(0.25, rel=0.03)


def test_moffat_psf_varies_and_stars_match_it(varying):
    psf = varying.science.psf
    assert isinstance(psf, GridPsf)
    assert isinstance(varying.template.psf, MoffatPsf)
    n = varying.science.width - 1
    # the adaptive-moment FWHM of a Moffat is ~1.1x its true FWHM, the same factor everywhere
    assert psf.fwhm(0, 0) / psf.fwhm(n, n) == pytest.approx(0.875 / 1.125, rel=0.02)
    truth = varying.truth["psf"]["science"]
    assert truth["fwhm_at_nodes"][0][0] == pytest.approx(4.0 * 0.875)
    assert truth["fwhm_at_nodes"][-1][-1] == pytest.approx(4.0 * 1.125)


def test_constant_psf_types():
    pair = simulate_pair(preset("sharper_template", 128, seed=2))
    assert isinstance(pair.science.psf, GaussianPsf)
    assert pair.science.psf.fwhm() == pytest.approx(4.0 * math.sqrt((1 + 0.95**2) / 2), rel=0.01)
    assert pair.template.psf.fwhm() == pytest.approx(3.0, rel=0.01)
    assert pair.science.psf.sigma_major * SIGMA_TO_FWHM == pytest.approx(4.0)


def test_transients_only_in_science():
    base = preset("sharper_template", 256, seed=3)
    with_transients = simulate_pair(base)
    without = simulate_pair(_config(base, n_transients=0))
    transients = with_transients.truth["transients"]
    assert len(transients["x"]) == base.n_transients
    np.testing.assert_array_equal(with_transients.template.image, without.template.image)
    np.testing.assert_array_equal(with_transients.template_model, without.template_model)
    added = with_transients.science_model.astype(np.float64) - without.science_model
    assert added.sum() == pytest.approx(sum(transients["flux_science"]), rel=1e-3)
    # the added light sits at the recorded positions
    for x, y, flux in zip(
        transients["x"], transients["y"], transients["flux_science"], strict=True
    ):
        ix, iy = int(round(x)), int(round(y))
        assert added[iy - 8 : iy + 9, ix - 8 : ix + 9].sum() > 0.9 * flux


def test_defects_present_and_masked(defects):
    cfg = defects.config
    science, template = defects.science, defects.template
    level = cfg.saturation_level
    sat = science.masked(["SAT"])
    assert sat.any()
    np.testing.assert_array_equal(sat, science.image >= level)
    assert np.all(science.image <= level + 1e-3)
    assert science.metadata["SATURATE"] == level
    stars = defects.truth["stars"]
    assert sum(stars["saturated"]) >= cfg.n_saturated_stars
    # bad columns: recorded, masked BAD, dead ones are zero
    columns = defects.truth["bad_columns"]["science"]
    assert len(columns) == cfg.n_bad_columns
    bad = science.masked(["BAD"])
    for col in columns:
        rows = slice(col["y_start"], col["y_end"] + 1)
        assert bad[rows, col["x"]].all()
        if col["kind"] == "dead":
            assert np.all(science.image[rows, col["x"]] == 0)
    assert bad.sum() == sum(c["y_end"] - c["y_start"] + 1 for c in columns)
    assert len(defects.truth["bad_columns"]["template"]) == cfg.n_bad_columns_template
    assert template.masked(["BAD"]).any()
    # cosmic rays: bright in the image, recorded, but not in the mask by default
    rays = defects.truth["cosmic_rays"]["science"]
    assert len(rays) == cfg.n_cosmic_rays
    assert not science.masked(["CR"]).any()
    pulls = []
    for ray in rays:
        ys, xs = np.asarray(ray["y"]), np.asarray(ray["x"])
        clean = ~(sat[ys, xs] | bad[ys, xs])
        excess = (science.image - defects.science_model)[ys, xs]
        pulls.extend((excess / np.sqrt(science.variance[ys, xs]))[clean])
    assert np.median(pulls) > 5
    assert defects.truth["cosmic_rays"]["template"] == []
    assert np.all(np.isfinite(science.image)) and np.all(science.variance > 0)


def test_cosmic_rays_masked_on_request():
    pair = simulate_pair(_config(preset("defects", 128, seed=4), mask_cosmic_rays=True))
    cr = pair.science.masked(["CR"])
    expected = np.zeros_like(cr)
    for ray in pair.truth["cosmic_rays"]["science"]:
        expected[ray["y"], ray["x"]] = True
    np.testing.assert_array_equal(cr, expected)


def test_deterministic_for_seed():
    cfg = preset("defects", 128, seed=7)
    a, b = simulate_pair(cfg), simulate_pair(cfg)
    np.testing.assert_array_equal(a.science.image, b.science.image)
    np.testing.assert_array_equal(a.template.image, b.template.image)
    np.testing.assert_array_equal(a.science.mask, b.science.mask)
    assert a.truth == b.truth
    c = simulate_pair(_config(cfg, seed=8))
    assert not np.array_equal(a.science.image, c.science.image)


def test_truth_json_round_trip(defects):
    text = json.dumps(defects.truth)
    assert json.loads(text) == defects.truth
    assert SimulationConfig.model_validate(defects.truth["config"]) == defects.config


def test_wcs_band_metadata(varying):
    science, template = varying.science, varying.template
    assert science.band == template.band == "r"
    assert science.wcs.to_header() == template.wcs.to_header()
    ra, dec = science.wcs.pixel_to_world_values((science.width - 1) / 2, (science.height - 1) / 2)
    assert ra == pytest.approx(150.0) and dec == pytest.approx(2.0)
    for key in ("GAIN", "RDNOISE", "EXPTIME"):
        assert key in science.metadata and key in template.metadata


def test_galaxies_keep_their_flux():
    # the first seed whose galaxies lie well inside the frame (no light lost at edges)
    for seed in range(50):
        cfg = _config(preset("equal", 256, seed=seed), n_stars=0, n_transients=0, n_galaxies=2)
        pair = simulate_pair(cfg)
        galaxies = pair.truth["galaxies"]
        if all(60 < v < 195 for v in galaxies["x"] + galaxies["y"]):
            break
    assert len(galaxies["x"]) == 2
    for which, sky in (("science", cfg.science_sky), ("template", cfg.template_sky)):
        light = getattr(pair, f"{which}_model") - _sky(sky, pair.science.shape)
        assert light.sum() == pytest.approx(sum(galaxies[f"flux_{which}"]), rel=1e-3)
    # extended: the peak is well below that of a star of the same flux
    star_peak = pair.science.psf.kernel_image().max() * max(galaxies["flux_science"])
    assert (pair.science_model - _sky(cfg.science_sky, pair.science.shape)).max() < star_peak


def test_presets_and_bad_configs():
    for name in PRESETS:
        cfg = preset(name, 64, seed=0)
        assert cfg.shape == (64, 64)
    assert (
        preset("sharper_science", 64).science_psf.fwhm < preset("sharper_science").template_psf.fwhm
    )
    assert preset("noisy_template", 64).template_depth < 1
    with pytest.raises(InvalidConfigError, match="unknown simulation preset"):
        preset("nope")
    with pytest.raises(ValueError):
        SimulationConfig(n_saturated_stars=2)
    with pytest.raises(InvalidConfigError, match="sky goes negative"):
        simulate_pair(
            SimulationConfig(size=64, science_sky=SkyConfig(level=10.0, gradient_x=-50.0))
        )
    with pytest.raises(InvalidConfigError):
        simulate_command("/nonexistent/never", size=64, no_such_field=1)
    rect = simulate_pair(SimulationConfig(size=(96, 64), n_transients=2))
    assert rect.science.shape == (64, 96)


def test_write_pair_and_command(tmp_path):
    from core.io import read_exposure

    pair = simulate_pair(preset("varying", 128, seed=13))
    paths = write_pair(pair, tmp_path / "pair")
    assert json.loads(paths["truth"].read_text()) == pair.truth
    for which in ("science", "template"):
        original = getattr(pair, which)
        back = read_exposure(paths[which])
        np.testing.assert_array_equal(back.image, original.image)
        np.testing.assert_array_equal(back.variance, original.variance)
        np.testing.assert_array_equal(back.mask, original.mask)
        assert back.band == "r"
        assert back.metadata["GAIN"] == pytest.approx(original.metadata["GAIN"])
        assert back.psf.fwhm(10, 100) == pytest.approx(original.psf.fwhm(10, 100), rel=1e-3)
    written = simulate_command(
        tmp_path / "cli", size=96, seed=3, preset="defects", science_psf={"fwhm": 5.0}
    )
    truth = json.loads(written["truth"].read_text())
    assert truth["config"]["science_psf"]["fwhm"] == 5.0
    assert truth["config"]["saturation_level"] == 30000.0
    assert truth["shape"] == [96, 96]
    assert read_exposure(written["science"]).masked(["BAD"]).any()


def test_background_subtracted_sky_keeps_its_noise():
    cfg = SimulationConfig(
        size=128, seed=14, n_stars=0, science_sky={"level": 800.0, "subtracted": True}
    )
    pair = simulate_pair(cfg)
    science = pair.science
    assert abs(np.median(science.image)) < 2.0
    assert np.median(science.variance) == pytest.approx(800.0 + 25.0, rel=1e-3)
    assert mad_std(science.image) == pytest.approx(math.sqrt(825.0), rel=0.03)
    # the template keeps its sky
    assert np.median(pair.template.image) == pytest.approx(1000.0, abs=2.0)


def test_transients_near_defects_are_flagged(defects):
    transients = defects.truth["transients"]
    bad = defects.science.masked(["SAT", "BAD"]) | defects.template.masked(["SAT", "BAD"])
    for x, y, flag in zip(transients["x"], transients["y"], transients["near_defect"], strict=True):
        ix, iy = int(round(x)), int(round(y))
        if bad[iy - 3 : iy + 4, ix - 3 : ix + 4].any():
            assert flag


def test_faded_sources_follow_the_template_geometry():
    """Template-only (faded) sources are recorded on the science grid, as the truth's
    other positions are, and sit on the template where its geometry maps them."""
    base = _config(
        preset("sharper_template", 256, seed=3),
        noise="none",
        n_transients=0,
        n_negative_transients=6,
        template_shift=(7.37, -4.61),
        template_rotation=0.35,
    )
    with_faded = simulate_pair(base)
    without = simulate_pair(_config(base, n_negative_transients=0))
    added = with_faded.template_model.astype(np.float64) - without.template_model
    matrix, offset = base.template_geometry
    faded = with_faded.truth["negative_transients"]
    inverse_ratio = 1.0 / base.flux_ratio
    for x, y, flux in zip(faded["x"], faded["y"], faded["flux_science"], strict=True):
        tx, ty = matrix @ np.array([x, y]) + offset
        ix, iy = int(round(tx)), int(round(ty))
        box = added[iy - 8 : iy + 9, ix - 8 : ix + 9]
        yy, xx = np.mgrid[iy - 8 : iy + 9, ix - 8 : ix + 9]
        assert box.sum() == pytest.approx(flux * inverse_ratio, rel=0.02)
        assert abs((box * xx).sum() / box.sum() - tx) < 0.05
        assert abs((box * yy).sum() / box.sum() - ty) < 0.05


def test_a_deeper_templates_exposure_time_is_that_of_its_counts():
    """The template of `template_depth` exposures is scaled back to one exposure's counts,
    so its EXPTIME is one exposure's: with depth x that, plain files' exposure times
    predicted a kernel sum of 1 / depth and every plain pair's verdict was suspect."""
    config = preset("sharper_template", size=128, seed=3)
    config.template_depth = 4.0
    pair = simulate_pair(config)
    assert pair.template.metadata["EXPTIME"] == pair.science.metadata["EXPTIME"]
    assert pair.template.metadata["GAIN"] == 4.0 * pair.science.metadata["GAIN"]
