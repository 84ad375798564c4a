"""DIA sources and forced photometry against simulation truth (issue 10 acceptance)."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from scipy import ndimage
from scipy.spatial import cKDTree

from bench.diasources import evaluate, transient_truth
from core.config import DiaSourceConfig, SubtractionConfig
from core.diasources import dia_sources, score_profile
from core.errors import IncompatibleInputsError
from core.exposure import Exposure
from core.forced import forced_photometry
from core.simulate import preset, simulate_pair
from core.subtract import run_subtraction
from tests.conftest import add_point_source, bright_transient_pair

#: The three scenarios of the acceptance: sharper template, sharper science, and a
#: Moffat PSF varying 25% across the frame on a sky gradient.
SCENARIOS = ("sharper_template", "sharper_science", "varying")
SIZE = 1024
#: Transients of each sign per 1024x1024 (a few per 100x100 px: not crowded).
N_TRANSIENTS = 60


@lru_cache(maxsize=8)
def _subtracted(name: str, mode: str = "auto"):
    """(pair, result) for a scenario with positive and negative transients; cached."""
    config = preset(name, size=SIZE, seed=1000 + SCENARIOS.index(name))
    config = config.model_copy(
        update={"n_transients": N_TRANSIENTS, "n_negative_transients": N_TRANSIENTS}
    )
    pair = simulate_pair(config)
    return pair, run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))


@pytest.fixture(scope="module")
def evaluations():
    return {name: evaluate(*_subtracted(name)) for name in SCENARIOS}


def test_evaluation_of_an_empty_catalog_finds_nothing():
    """The acceptance bench's matching on a run that found nothing (too faint transients):
    no transient found, no false detection, no flux figure (an empty tree's query
    pointed past the end of the catalog)."""
    import copy

    from bench.diasources import summarise

    pair, result = _subtracted(SCENARIOS[0])
    empty = copy.copy(result)
    empty.dia_sources = result.dia_sources[:0]
    ev = evaluate(pair, empty)
    assert ev["found"].size == len(transient_truth(pair)[0]) and not ev["found"].any()
    assert ev["false_sky"] == ev["false_star"] == 0
    figures = summarise([ev])
    assert figures["completeness_pos"] == 0.0 and figures["n_bright_pos"] > 0
    assert np.isnan(figures["flux_ratio_snr20"]) and figures["n_found_sharp"] == 0


def test_completeness_positive_and_negative(evaluations):
    """>= 98% of isolated transients with expected S/N >= 7 found with their sign, pooled
    over the scenarios (one scenario's ~45 per sign cannot resolve 98%: at expected S/N 7
    a 5-sigma threshold loses 2% to noise alone); each scenario >= 95%."""
    pooled = {False: [], True: []}
    for name, ev in evaluations.items():
        bright = (ev["expected_snr"] >= 7) & ev["isolated"]
        for negative in (False, True):
            sample = bright & ((ev["flux"] < 0) == negative)
            assert sample.sum() >= 30
            assert ev["found"][sample].mean() >= 0.95, (name, negative)
            pooled[negative].append(ev["found"][sample])
        # and the faint ones are mostly not found: the threshold means something
        faint = ev["expected_snr"] < 3
        if faint.sum() >= 5:
            assert ev["found"][faint].mean() < 0.5
    for negative, found in pooled.items():
        completeness = np.concatenate(found).mean()
        assert completeness >= 0.98, (negative, completeness)


@pytest.mark.parametrize("fwhm", [(1.7, 1.5), (1.6, 1.8)])
def test_barely_sampled_pair_subtracts_and_finds_its_transients(fwhm):
    """Science and template PSFs of FWHM 1.5-1.8 px (the PSF's adaptive moments
    collapsed there: the subtraction failed or crashed): widths measured to 5%, the
    difference at the noise floor, every bright isolated transient found, no false
    detection."""
    config = preset("sharper_template", size=512, seed=7)
    config = config.model_copy(
        update={
            "n_transients": 30,
            "n_negative_transients": 30,
            "science_psf": config.science_psf.model_copy(update={"fwhm": fwhm[0]}),
            "template_psf": config.template_psf.model_copy(update={"fwhm": fwhm[1]}),
        }
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template)
    metrics = result.metrics
    assert metrics["science_psf_fwhm"] == pytest.approx(fwhm[0], rel=0.05)
    assert metrics["template_psf_fwhm"] == pytest.approx(fwhm[1], rel=0.05)
    assert metrics["quality"]["verdict"] == "good"
    assert 0.95 <= metrics["noise_ratio"] <= 1.05
    ev = evaluate(pair, result)
    bright = (ev["expected_snr"] >= 7) & ev["isolated"]
    assert bright.sum() >= 40
    assert ev["found"][bright].all()
    # away from the brightest stars' matching-kernel wings (S/N 5-6 blobs 7-8 px out from
    # stars of S/N ~1000, which the former fixed 3-pixel minimum hid on these PSFs) at
    # most what noise gives: a 5-sigma threshold lets ~0.5 noise peaks a frame through at
    # this sampling (Gaussian random field, u exp(-u^2 / 2) A / ((2 pi)^1.5 s^2), s^2
    # ~1.2 px^2 the correlation of the S/N map)
    assert _false_beyond_bright_stars(pair, result, ev) <= 1
    # a PSF barely a pixel wide is no sharper than a point source under it: no transient
    # is flagged (false detections on the ringing of the brightest stars' rendered cores,
    # pixels alternating +-10 sigma along a row of the science as read, are:
    # core.input_rays)
    sharp = np.asarray(result.dia_sources["flag_sharp"])
    assert not sharp[ev["index"][ev["found"]]].any()


def test_elongated_science_psf_against_a_round_template():
    """A science PSF elongated by tracking or wind (ellipticity 0.4, 5 px along its major
    axis at 30 degrees) against a round 2.5 px template: the kernel must carry the
    elongation, or every star leaves a quadrupole of residuals that passes for pairs of
    sources. Measured (1024 px, seeds 11-13): 0 false rows at stars, completeness 1.000,
    flux ratio 1.001."""
    config = preset("sharper_template", size=SIZE, seed=11)
    config = config.model_copy(
        update={
            "n_transients": N_TRANSIENTS,
            "n_negative_transients": N_TRANSIENTS,
            "science_psf": config.science_psf.model_copy(
                update={"fwhm": 5.0, "ellipticity": 0.4, "angle": 30.0}
            ),
            "template_psf": config.template_psf.model_copy(update={"fwhm": 2.5}),
        }
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template)
    assert result.metrics["quality"]["verdict"] == "good"
    ev = evaluate(pair, result)
    bright = (ev["expected_snr"] >= 7) & ev["isolated"]
    assert bright.sum() >= 40
    assert ev["found"][bright].mean() >= 0.98
    assert ev["false_star"] <= 3 and ev["false_sky"] <= 1
    strong = ev["found"] & ev["isolated"] & (ev["expected_snr"] >= 20)
    ratio = np.asarray(ev["catalog"]["psf_flux"])[ev["index"][strong]] / ev["flux"][strong]
    assert abs(np.median(ratio) - 1) < 0.02


def _false_beyond_bright_stars(pair, result, ev) -> int:
    """False detections farther than the matching kernel's half-width plus a FWHM from
    every bright star (`core.position_flags.bright_star_limit` at the typical noise)."""
    from core.position_flags import bright_star_limit

    catalog = ev["catalog"]
    fwhm = catalog.meta["psf_fwhm"]
    x, y, _ = transient_truth(pair)
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    false = cKDTree(np.column_stack([x, y])).query(cxy)[0] >= 0.5 * fwhm
    stars = pair.truth["stars"]
    noise = np.median(np.asarray(ev["forced"]["psf_flux_err"]))
    dia = DiaSourceConfig()
    limit = bright_star_limit(noise, dia.threshold, dia.bright_star_residual)
    bright = np.asarray(stars["flux_science"]) >= limit
    if bright.any():
        where = np.column_stack([np.asarray(stars["x"])[bright], np.asarray(stars["y"])[bright]])
        reach = result.psf_matching_kernel.half + fwhm
        false &= cKDTree(where).query(cxy)[0] > reach
    return int(np.count_nonzero(false))


@lru_cache(maxsize=1)
def _undersampled_evaluations():
    """Three 512 px pairs with a 2.0 px FWHM science PSF (1.8 px template), about as
    sampled as JWST's short-wavelength NIRCam, with transients of S/N ~6-15."""
    evaluations = []
    for seed in (21, 22, 23):
        config = preset("sharper_template", size=512, seed=seed)
        config = config.model_copy(
            update={
                "n_transients": 50,
                "n_negative_transients": 50,
                "transient_flux_min": 600.0,
                "transient_flux_max": 1600.0,
                "science_psf": config.science_psf.model_copy(update={"fwhm": 2.0}),
                "template_psf": config.template_psf.model_copy(update={"fwhm": 1.8}),
            }
        )
        pair = simulate_pair(config)
        evaluations.append(evaluate(pair, run_subtraction(pair.science, pair.template)))
    return evaluations


def test_undersampled_pairs_find_their_faint_transients():
    """>= 98% of isolated transients with expected S/N >= 7 found on 2 px PSFs: a fixed
    minimum of 3 pixels above threshold is ~1/3 of such a PSF's noise-equivalent area
    (8 px) and asked S/N ~7 at the peak, losing 4% at S/N >= 7 and 8-11% at 7-10 (as
    on JWST's frames: 51% there). The minimum is a fraction of that area instead, the
    same margin at every sampling (`footprint_min_pixels`); no false detection."""
    found, expected, found_7_10 = [], [], []
    for ev in _undersampled_evaluations():
        bright = (ev["expected_snr"] >= 7) & ev["isolated"]
        found.append(ev["found"][bright])
        band = bright & (ev["expected_snr"] < 10)
        found_7_10.append(ev["found"][band])
        expected.append(ev["expected_snr"][ev["isolated"]])
        assert ev["false_sky"] + ev["false_star"] == 0
    found = np.concatenate(found)
    assert found.size >= 200 and np.concatenate(found_7_10).size >= 80
    assert found.mean() >= 0.98, found.mean()
    assert np.concatenate(found_7_10).mean() >= 0.95
    # the sample is near the threshold: half of it below S/N 10
    assert np.median(np.concatenate(expected)) < 10


def test_footprint_minimum_is_a_fraction_of_the_psf_area():
    """3 px at a DECam-like 4.7 px FWHM (NEA ~50 px), 7 at 8 px (SAAO's worst seeing), 1
    at 2 px; ``min_pixels`` stays a floor."""
    from core.diasources import footprint_min_pixels
    from core.psf import GaussianPsf

    config = DiaSourceConfig()
    assert footprint_min_pixels(GaussianPsf(4.7 / 2.3548), config) == 3
    assert footprint_min_pixels(GaussianPsf(2.0 / 2.3548), config) == 1
    assert footprint_min_pixels(GaussianPsf(8.0 / 2.3548), config) == 7
    assert footprint_min_pixels(GaussianPsf(0.85), DiaSourceConfig(min_pixels=4)) == 4
    assert footprint_min_pixels(GaussianPsf(3.0), DiaSourceConfig(min_area_fraction=0)) == 1


def _ringing_psf(sigma: float = 1.0, depth: float = 0.8):
    """A PSF that rings below zero as a decorrelated difference's does: a Gaussian
    sharpened by subtracting a twice wider one (``depth`` of each's unit sum); its
    matched-filter response dips to -5% of its peak 3 px out."""
    from core.psf import ImagePsf

    y, x = np.mgrid[-20:21, -20:21]

    def gaussian(s):
        g = np.exp(-(x * x + y * y) / (2 * s * s))
        return g / g.sum()

    stamp = (1 + depth) * gaussian(sigma) - depth * gaussian(2 * sigma)
    return ImagePsf(stamp / stamp.sum())


def test_bright_sources_make_no_detections_of_their_psf_rings():
    """Point sources of S/N 150-3000 on a difference whose PSF rings (-5% in the matched
    filter): one detection each, none of the ring (which made peaks of either sign, and
    dipoles of them, around every source above S/N ~100); fainter sources beside them,
    of either sign, are kept."""
    psf = _ringing_psf()
    rng = np.random.default_rng(5)
    shape = (480, 480)
    image = rng.normal(size=shape)
    grid = np.arange(40, 480, 80) + 0.3
    bx, by = (g.ravel() for g in np.meshgrid(grid, grid))
    area = psf.noise_equivalent_area()
    bright_flux = np.exp(rng.uniform(np.log(150), np.log(3000), bx.size)) * np.sqrt(area)
    bright_flux *= rng.choice([-1, 1], bx.size)
    # every other bright source has a companion of S/N 12, either sign, 10-12 px away
    # (within the filtered PSF's reach, clear of the ring's peaks: a source on them
    # is no peak of its own, found neither with the ring nor without it)
    k = np.arange(0, bx.size, 2)
    angle = rng.uniform(0, 2 * np.pi, k.size)
    distance = rng.uniform(10, 12, k.size)
    fx, fy = bx[k] + distance * np.cos(angle), by[k] + distance * np.sin(angle)
    faint_flux = 12 * np.sqrt(area) * rng.choice([-1, 1], k.size)
    for x, y, flux in zip(
        np.r_[bx, fx], np.r_[by, fy], np.r_[bright_flux, faint_flux], strict=True
    ):
        add_point_source(image, psf, x, y, flux)
    difference = Exposure.from_arrays(image, psf=psf)
    catalog = dia_sources(difference)
    truth = np.column_stack([np.r_[bx, fx], np.r_[by, fy]])
    signs = np.sign(np.r_[bright_flux, faint_flux])
    distance, index = cKDTree(truth).query(np.column_stack([catalog["x"], catalog["y"]]))
    # every detection is a planted source, of its sign, and none is found twice
    assert (distance < 1.0).all(), catalog[distance >= 1.0]["x", "y", "detection_snr"]
    assert (np.where(catalog["is_negative"], -1, 1) == signs[index]).all()
    assert not np.asarray(catalog["is_dipole"]).any()
    assert np.unique(index).size == index.size == truth.shape[0]
    assert catalog.meta["n_sidelobes"] > 0


def _empty_sky(result, fwhm: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random positions at least 10 FWHM apart with no detection in the science or
    the matched template within 3 FWHM, and no DIA source within 10 FWHM."""
    from scipy import ndimage

    from core.detection import detect_sources

    busy = np.zeros(result.output.shape, dtype=bool)
    for exposure in (result.matched_science.copy(), result.matched_template.copy()):
        detect_sources(exposure, set_mask=True, measure=False)
        busy |= exposure.masked(["DETECTED", "DETECTED_NEGATIVE"])
    busy = ndimage.distance_transform_edt(~busy) < 3 * fwhm
    margin = int(10 * fwhm)
    busy[:margin], busy[-margin:], busy[:, :margin], busy[:, -margin:] = True, True, True, True
    catalog = result.dia_sources
    sources = cKDTree(np.column_stack([catalog["x"], catalog["y"]]))
    free = np.argwhere(~busy)[:, ::-1] + np.array([0.3, -0.2])
    free = free[sources.query(free)[0] > 10 * fwhm]
    picked = np.zeros((0, 2))
    for spot in free[np.random.default_rng(seed).permutation(free.shape[0])]:
        if not picked.size or np.hypot(*(picked - spot).T).min() > 10 * fwhm:
            picked = np.vstack([picked, spot])
        if len(picked) == n:
            break
    return picked[:, 0], picked[:, 1]


@pytest.mark.slow
def test_bright_sources_on_jwst_make_no_ring_detections(real_data):
    """PSF-shaped sources injected into JWST NIRCam's science on empty sky (its WebbPSF
    model), S/N 100-2000: the decorrelated difference's PSF rings at -9% then +6%, which
    made ~8 detections of either sign within 5 FWHM of each (dipoles among them); now
    none, every source found once. Sources of S/N 7-12 are found too (a fixed 3-pixel
    minimum lost half of them: a 2 px FWHM footprint has 1-2 pixels above 5 sigma)."""
    from bench.real_data import load_pair

    pair = load_pair("jwst_noise", real_data)
    base = run_subtraction(pair.science.copy(), pair.template.copy())
    fwhm = base.dia_sources.meta["psf_fwhm"]
    x, y = _empty_sky(base, fwhm, 40, seed=3)
    rng = np.random.default_rng(4)
    target = np.r_[np.exp(rng.uniform(np.log(100), np.log(2000), 20)), rng.uniform(7, 12, 20)]
    error = np.asarray(forced_photometry(base.output, x, y)["psf_flux_err"])
    flux = target * error * rng.choice([-1, 1], x.size)
    science = pair.science.copy()
    for xs, ys, f in zip(x, y, flux, strict=True):
        add_point_source(science.image, pair.science.psf, xs, ys, f)
    result = run_subtraction(science, pair.template.copy())
    catalog = result.dia_sources
    expected = np.abs(flux) / np.asarray(forced_photometry(result.output, x, y)["psf_flux_err"])
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    to_fake, fake = cKDTree(np.column_stack([x, y])).query(cxy)
    negative = np.asarray(catalog["is_negative"])
    found = np.zeros(x.size, dtype=int)
    match = (to_fake < 1.5) & (negative == (flux[fake] < 0))
    np.add.at(found, fake[match], 1)
    base_xy = np.column_stack([base.dia_sources["x"], base.dia_sources["y"]])
    new = (to_fake >= 1.5) & (cKDTree(base_xy).query(cxy)[0] >= 1.5)
    bright = expected >= 100
    assert bright.sum() >= 15
    assert (found[bright] == 1).all()
    assert not (new & bright[fake] & (to_fake < 5 * fwhm)).any()
    assert catalog.meta["n_sidelobes"] > 0
    faint = (expected >= 7) & (expected < 12)
    assert faint.sum() >= 15
    assert (found[faint] > 0).mean() >= 0.9


@pytest.mark.parametrize(("name", "seed"), [("sharper_template", 11), ("varying", 12)])
def test_cosmic_rays_are_flagged_sharp_and_transients_are_not(name, seed):
    """Unmasked cosmic rays in the science image pass into the difference as sources
    narrower than its PSF: flagged ``sharp`` (SAAO frames: 12 of 19 unflagged sources
    were single hot pixels), the transients never; forced photometry on a ray flags it
    too."""
    config = preset(name, size=SIZE, seed=seed).model_copy(
        update={
            "n_cosmic_rays": 150,
            "mask_cosmic_rays": False,
            "n_transients": N_TRANSIENTS,
            "n_negative_transients": N_TRANSIENTS,
        }
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template)
    catalog = result.dia_sources
    rays = pair.truth["cosmic_rays"]["science"]
    rx = np.array([np.mean(ray["x"]) for ray in rays])
    ry = np.array([np.mean(ray["y"]) for ray in rays])
    xy = np.column_stack([catalog["x"], catalog["y"]])
    on_ray = cKDTree(np.column_stack([rx, ry])).query(xy)[0] < 4
    x, y, _ = transient_truth(pair)
    on_transient = (cKDTree(np.column_stack([x, y])).query(xy)[0] < 1.5) & ~on_ray
    sharp = np.asarray(catalog["flag_sharp"])
    assert on_ray.sum() >= 100 and on_transient.sum() >= 80
    assert sharp[on_ray].mean() >= 0.95
    assert not sharp[on_transient].any()
    rows = forced_photometry(result.output, catalog["x"][on_ray], catalog["y"][on_ray])
    assert np.asarray(rows["flag_sharp"]).mean() >= 0.95


def _rays_on_science_grid(pair, image: str) -> np.ndarray:
    """(n, 2) centres (x, y) of the true cosmic rays of ``image`` on the science grid."""
    rays = pair.truth["cosmic_rays"][image]
    xy = np.array([[np.mean(ray["x"]), np.mean(ray["y"])] for ray in rays])
    if image == "science":
        return xy
    sky = pair.template.wcs.pixel_to_world(xy[:, 0], xy[:, 1])
    return np.column_stack(pair.science.wcs.world_to_pixel(sky))


@pytest.mark.parametrize(
    ("mode", "image", "seed"),
    [("preconvolve", "science", 21), ("preconvolve", "template", 22), ("auto", "template", 23)],
)
def test_rays_a_convolution_widened_are_flagged_sharp(mode, image, seed):
    """A cosmic ray in an input that the subtraction convolves (the science by the
    preconvolution filter of a score, the template by the matching kernel) comes out as
    wide as a point source and passed unflagged (SAAO 0103 in preconvolve mode: 16 of
    19 rays); in the input as read it is still narrower than the PSF: flagged
    ``sharp``, the transients of either sign never."""
    key = "n_cosmic_rays" if image == "science" else "n_cosmic_rays_template"
    config = preset("sharper_template", size=512, seed=seed).model_copy(
        update={
            key: 80,
            "mask_cosmic_rays": False,
            "n_transients": 25,
            "n_negative_transients": 25,
        }
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))
    catalog = result.dia_sources
    xy = np.column_stack([catalog["x"], catalog["y"]])
    # a ray is light in its own image: positive in the science's, negative in the template's
    of_ray = np.asarray(catalog["is_negative"]) == (image == "template")
    on_ray = (cKDTree(_rays_on_science_grid(pair, image)).query(xy)[0] < 4) & of_ray
    x, y, _ = transient_truth(pair)
    on_transient = (cKDTree(np.column_stack([x, y])).query(xy)[0] < 1.5) & ~on_ray
    sharp = np.asarray(catalog["flag_sharp"])
    assert on_ray.sum() >= 30 and on_transient.sum() >= 25
    assert sharp[on_ray].mean() >= 0.9
    assert not sharp[on_transient].any()


def test_false_detection_rates(evaluations):
    """<= 1 per million pixels on empty sky, <= 3 per million at constant stars."""
    pixels = sum(ev["pixels"] for ev in evaluations.values())
    false_sky = sum(ev["false_sky"] for ev in evaluations.values())
    false_star = sum(ev["false_star"] for ev in evaluations.values())
    assert false_sky / (pixels / 1e6) <= 1.0, false_sky
    assert false_star / (pixels / 1e6) <= 3.0, false_star


@pytest.mark.parametrize("name", SCENARIOS)
def test_flux_and_position_of_bright_detections(evaluations, name):
    """PSF flux of detections with S/N >= 20 unbiased within 2%; positions 0.2 px rms."""
    ev = evaluations[name]
    catalog = ev["catalog"]
    matched = ev["found"]
    snr = np.abs(np.asarray(catalog["snr"])[ev["index"]])
    sample = matched & (snr >= 20) & ev["isolated"]
    assert sample.sum() >= 20
    ratio = np.asarray(catalog["psf_flux"])[ev["index"][sample]] / ev["flux"][sample]
    assert abs(np.median(ratio) - 1) < 0.02, np.median(ratio)
    rms = np.sqrt(np.mean(ev["distance"][sample] ** 2))
    assert rms < 0.2, rms
    # the errors describe the scatter: pulls of the bright sample near 1
    err = np.asarray(catalog["psf_flux_err"])[ev["index"][sample]]
    pull = (np.asarray(catalog["psf_flux"])[ev["index"][sample]] - ev["flux"][sample]) / err
    # bright sources in convolveScience show ~1% PSF-model scatter on top of the noise
    assert 0.6 < mad_std(pull) < 1.6


@pytest.mark.parametrize(
    ("beta", "fwhm"), [(2.5, 4.0), (3.0, 6.0)], ids=["moffat2.5", "moffat3-wide"]
)
def test_fluxes_of_plain_images_with_winged_psfs(beta, fwhm):
    """Plain images (no PSF given: both estimated from their stars) with Moffat PSFs:
    DIA and forced PSF fluxes of S/N >= 20 transients within 2% of the truth (the
    stars' own wings raised the sky their stamps were cut on: 0.97 and 0.93 before)."""
    ratios, forced_ratios = [], []
    for seed in (11, 12):
        config = preset("sharper_template", size=1024, seed=seed).model_copy(
            update={"n_transients": 60, "n_negative_transients": 60}
        )
        settings = config.model_dump()
        settings["science_psf"] |= {"type": "moffat", "fwhm": fwhm, "beta": beta}
        settings["template_psf"] |= {"type": "moffat", "fwhm": 0.75 * fwhm, "beta": beta}
        pair = simulate_pair(type(config).model_validate(settings))
        result = run_subtraction(
            pair.science.with_psf(None), pair.template.with_psf(None), SubtractionConfig()
        )
        ev = evaluate(pair, result)
        snr = np.abs(np.asarray(ev["catalog"]["snr"])[ev["index"]])
        sample = ev["found"] & (snr >= 20) & ev["isolated"]
        ratios.append(
            np.asarray(ev["catalog"]["psf_flux"])[ev["index"][sample]] / ev["flux"][sample]
        )
        strong = (ev["expected_snr"] >= 20) & ev["isolated"]
        forced_ratios.append(np.asarray(ev["forced"]["psf_flux"])[strong] / ev["flux"][strong])
    ratio, forced = np.concatenate(ratios), np.concatenate(forced_ratios)
    assert ratio.size >= 40 and forced.size >= 40
    assert abs(np.median(ratio) - 1) < 0.02, np.median(ratio)
    assert abs(np.median(forced) - 1) < 0.02, np.median(forced)


@pytest.mark.parametrize("name", SCENARIOS)
def test_forced_photometry_at_true_positions(evaluations, name):
    """Median flux ratio within 2% of 1; robust std of the pulls 0.8-1.25."""
    ev = evaluations[name]
    forced = ev["forced"]
    flux = np.asarray(forced["psf_flux"])
    err = np.asarray(forced["psf_flux_err"])
    strong = (ev["expected_snr"] >= 20) & ev["isolated"]
    assert abs(np.median(flux[strong] / ev["flux"][strong]) - 1) < 0.02
    pull = ((flux - ev["flux"]) / err)[ev["isolated"]]
    assert 0.8 <= mad_std(pull) <= 1.25, mad_std(pull)
    assert len(forced) == ev["flux"].size
    np.testing.assert_allclose(forced["x"], transient_truth(_subtracted(name)[0])[0])


def test_catalog_columns_and_sky_positions(evaluations):
    ev = evaluations["varying"]
    catalog = ev["catalog"]
    pair, result = _subtracted("varying")
    for column in ("id", "x", "y", "ra", "dec", "psf_flux", "psf_flux_err", "snr"):
        assert column in catalog.colnames
    assert list(catalog["id"]) == list(range(len(catalog)))
    ra, dec = pair.science.wcs.pixel_to_world_values(catalog["x"], catalog["y"])
    np.testing.assert_allclose(catalog["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(catalog["dec"], dec, atol=1e-9)
    assert result.metrics["n_dia_sources"] == len(catalog)
    assert result.timings["detect"] > 0
    # science and template fluxes tell a brightening from a new source: for a new
    # positive transient the template has ~nothing and science - template ~ psf_flux
    sample = ev["found"] & (ev["flux"] > 0) & (ev["expected_snr"] > 30)
    rows = catalog[ev["index"][sample]]
    change = (rows["science_flux"] - rows["template_flux"]) / rows["psf_flux"]
    assert abs(np.median(change) - 1) < 0.05
    assert np.median(np.abs(rows["template_flux"]) / rows["psf_flux"]) < 0.1


def test_forced_positions_off_the_frame_or_the_sky_get_rows_of_their_own():
    """One row per position whatever it is: far off the frame (1e19 px answered a 500
    over HTTP: the integer pixel overflowed) or a sky position the tangent plane cannot
    project (it refused the whole list as "not finite") is unmeasured, flagged edge and
    no_data; a NaN coordinate or a dec beyond 90 is refused naming its position."""
    from core.errors import InvalidCatalogError

    _, result = _subtracted("varying")
    difference = result.output
    x = np.array([1e19, -1e19, 500.0, -60.0])
    y = np.array([20.0, 20.0, 500.0, 20.0])
    rows = forced_photometry(difference, x, y)
    assert len(rows) == 4 and list(rows["x"]) == list(x)
    off = np.array([True, True, False, True])
    assert np.all(np.isnan(rows["psf_flux"][off])) and np.isfinite(rows["psf_flux"][2])
    assert np.all(rows["flag_edge"][off] & rows["flag_no_data"][off])
    assert not rows["flag_no_data"][2]
    ra, dec = difference.wcs.pixel_to_world_values(500.0, 500.0)
    sky = forced_photometry(difference, ra=[ra, ra + 180.0, ra], dec=[dec, -dec, dec])
    assert len(sky) == 3
    assert np.isnan(sky["x"][1]) and np.isnan(sky["psf_flux"][1]) and sky["flag_no_data"][1]
    np.testing.assert_allclose(sky["psf_flux"][[0, 2]], rows["psf_flux"][2], rtol=1e-6)
    with pytest.raises(InvalidCatalogError, match="position 1"):
        forced_photometry(difference, [1.0, np.nan], [2.0, 3.0])
    with pytest.raises(InvalidCatalogError, match="dec must be within"):
        forced_photometry(difference, ra=[10.0, 20.0], dec=[0.0, 95.0])
    # one code for bad positions (dec 95 said invalid_catalog), and an ra of 510 or -10
    # is refused as a dec of 95 is (it was wrapped to 150, or 350, unsaid)
    from core.errors import InvalidPositionsError

    for bad in ([ra, 510.0], [ra, -10.0], [ra, 360.0]):
        with pytest.raises(InvalidPositionsError, match="ra must be within 0..360") as caught:
            forced_photometry(difference, ra=bad, dec=[dec, dec])
        assert caught.value.code == "invalid_positions" and "position 1" in str(caught.value)
    with pytest.raises(InvalidPositionsError):
        forced_photometry(difference, ra=[10.0, 20.0], dec=[0.0, 95.0])
    assert len(forced_photometry(difference, ra=[ra, 0.0], dec=[dec, dec])) == 2


@pytest.mark.parametrize("name", SCENARIOS)
def test_preconvolve_detects_on_the_score(name):
    """Score mode: fluxes of bright transients unbiased (2%) with the profile of a point
    source in the decorrelated score (with the science PSF in its second factor they
    were 0.959, 1.022 and 1.016 of the truth); the PSF fits' S/N that of detection
    (fitted over the whole profile, its median ratio was 0.91, 1.06 and 0.80); on the
    sharper template, the same completeness as on the difference."""
    pair, result = _subtracted(name, "preconvolve")
    assert result.score is not None
    ev = evaluate(pair, _subtracted(name)[1])  # expected S/N on the difference
    catalog = result.dia_sources
    x, y, flux = transient_truth(pair)
    distance, index = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([x, y])
    )
    found = (distance < 0.5 * catalog.meta["psf_fwhm"]) & (
        np.asarray(catalog["is_negative"])[index] == (flux < 0)
    )
    bright = (ev["expected_snr"] >= 7) & ev["isolated"]
    if name == "sharper_template":
        assert found[bright].mean() >= 0.98
    strong = found & (ev["expected_snr"] >= 20) & ev["isolated"]
    assert strong.sum() >= 20
    ratio = np.asarray(catalog["psf_flux"])[index[strong]] / flux[strong]
    # a fit with too little of the PSF off the score's EDGE band (wider than the
    # difference's) is NaN and flagged
    unmeasured = ~np.isfinite(ratio)
    assert np.asarray(catalog["flag_edge"])[index[strong]][unmeasured].all()
    assert abs(np.median(ratio[~unmeasured]) - 1) < 0.02
    single = ~np.asarray(catalog["is_dipole"])
    snr = np.abs(np.asarray(catalog["snr"])[single] / catalog["detection_snr"][single])
    assert abs(np.nanmedian(snr) - 1) < 0.08


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_science_and_template_flux_errors_match_their_scatter(mode):
    """The catalog's science and template fluxes come from the matched images, whose
    noise the matching (and preconvolution) kernels correlate: on empty sky (15 px from
    any star or transient) their flux / error scatters by 1 (robust std; it was 3.3 for
    the auto template and 6.6 / 8.9 in preconvolve mode on the 4096 pair)."""
    from core.diasources import _matched_photometry

    pair, result = _subtracted("varying", mode)
    science, template = result.matched_science, result.matched_template
    if mode == "preconvolve":  # as dia_sources measures them
        profile = score_profile(science.psf, science.psf)
        science, template = science.with_psf(profile), template.with_psf(profile)
    measure = _matched_photometry(result.output, science, template, DiaSourceConfig().forced)
    truth = pair.truth
    sources = np.concatenate(
        [np.column_stack([truth[k]["x"], truth[k]["y"]]) for k in ("stars", "transients")]
    )
    rng = np.random.default_rng(5)
    x, y = rng.uniform(40, SIZE - 40, 6000), rng.uniform(40, SIZE - 40, 6000)
    empty = cKDTree(sources).query(np.column_stack([x, y]))[0] > 15
    assert empty.sum() >= 1000
    for future in measure(x[empty], y[empty]):
        flux, error = future.result()
        pull = flux / error
        assert 0.88 < mad_std(pull[np.isfinite(pull)]) < 1.12


def test_matched_flux_errors_do_not_count_stars_as_noise():
    """In a crowded field most random stamps hold starlight: the matched images' errors
    are their (correlated) pixel noise's. On a dense field of stars (3000 per 512^2)
    plus kernel-correlated noise, the noise's part of the fluxes (with noise - without)
    scatters by about 1 error at random positions, the fluxes by 16 (the factor measured
    from that scatter made the science and template flux errors of the SAAO bulge frames
    9-85x the difference's)."""
    from scipy.signal import fftconvolve

    from core.convolve import convolved_noise_correlation
    from core.diasources import _MATCHED_UNUSABLE, _matched_scale, _sky_ring
    from core.forced import PsfStamps, psf_photometry
    from core.psf import GaussianPsf

    rng = np.random.default_rng(3)
    n = 512
    yy, xx = np.mgrid[-8:9, -8:9]
    kernel = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    kernel /= kernel.sum()
    noise = fftconvolve(rng.normal(size=(n, n)), kernel, mode="same")
    stars = np.zeros((n, n))
    positions, fluxes = rng.uniform(0, n, (2, 3000)), rng.uniform(20, 400, 3000)
    for cx, cy, flux in zip(*positions, fluxes, strict=True):
        near = np.s_[int(max(cy - 12, 0)) : int(cy + 13), int(max(cx - 12, 0)) : int(cx + 13)]
        r2 = (np.arange(n)[near[0], None] - cy) ** 2 + (np.arange(n)[None, near[1]] - cx) ** 2
        stars[near] += flux * np.exp(-r2 / 8.0) / (8.0 * np.pi)
    variance = np.full((n, n), np.sum(kernel**2), np.float32)
    rho = convolved_noise_correlation(None, kernel)
    noisy, clean = (
        Exposure.from_arrays(image, variance, psf=GaussianPsf(2.0), noise_correlation=rho)
        for image in (stars + noise, stars)
    )
    stamps = PsfStamps(noisy.psf, noisy)
    x, y = rng.uniform(30, n - 30, (2, 2000))
    ring = {"unusable": _MATCHED_UNUSABLE, "sky_ring": _sky_ring(stamps)}
    with_noise = psf_photometry(noisy, x, y, stamps, False, **ring)
    without = psf_photometry(clean, x, y, stamps, False, **ring)
    error = with_noise["flux_err"] * _matched_scale(noisy, stamps)
    # 1.0 without the stars; a crowded ring's median sky scatters more than the noise's
    # alone (1.07, 1.09, 1.15 with 300, 1000, 3000 stars)
    assert 0.9 < mad_std((with_noise["flux"] - without["flux"]) / error) < 1.2
    # the stars are most of the flux scatter: a scale measured from it is far off
    assert mad_std(with_noise["flux"] / error) > 3


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_aperture_flux_errors_match_their_scatter(mode):
    """Aperture sums on the output: on a score its noise is correlated (the errors were
    6.2x too small on the 4096 pair); with `_aperture_scale` the sum / error at random
    positions scatters by 1 (robust std) in both modes."""
    from core.diasources import _aperture, _aperture_scale

    _, result = _subtracted("varying", mode)
    radius = DiaSourceConfig().aperture_radius_fwhm * result.dia_sources.meta["psf_fwhm"]
    scale = _aperture_scale(result.output, radius, DiaSourceConfig().forced)
    rng = np.random.default_rng(6)
    x, y = rng.uniform(40, SIZE - 40, 1500), rng.uniform(40, SIZE - 40, 1500)
    flux, error = _aperture(result.output, x, y, radius)
    pull = flux / (error * scale)
    assert 0.85 < mad_std(pull[np.isfinite(pull)]) < 1.2


def test_aperture_sums_leave_no_data_out():
    """A band of NO_DATA holding junk beside a source: its aperture sum is NaN (it read
    331 for 10000, unflagged), its PSF flux (which leaves the band out) and a far
    source's sum hold."""
    from core.psf import GaussianPsf

    rng = np.random.default_rng(3)
    psf = GaussianPsf(1.5)
    image = rng.normal(0.0, 10.0, (200, 200))
    for cx, cy in ((100.0, 100.0), (40.0, 60.0)):
        add_point_source(image, psf, cx, cy, 1e4)
    exposure = Exposure.from_arrays(image, np.full(image.shape, 100.0), psf=psf)
    exposure.mask[:, 104:144] |= exposure.bitmask(["NO_DATA"])
    exposure.image[:, 104:144] = -500.0
    catalog = dia_sources(exposure)
    near = catalog[np.argmin(np.hypot(catalog["x"] - 100, catalog["y"] - 100))]
    far = catalog[np.argmin(np.hypot(catalog["x"] - 40, catalog["y"] - 60))]
    assert np.hypot(near["x"] - 100, near["y"] - 100) < 0.5
    assert np.isnan(near["aperture_flux"]) and np.isnan(near["aperture_flux_err"])
    assert abs(near["psf_flux"] / 1e4 - 1) < 0.03
    assert abs(far["aperture_flux"] / 1e4 - 1) < 0.05


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_centroids_beside_the_edge_band_stay_on_their_sources(mode):
    """11 px PSFs on a 512 px pair: the score's EDGE band holds values far above its
    noise (mean 52, sky noise 7), and the centroids of sources 8-11 px beside it were
    drawn 9-11 px into it (preconvolve). A transient of S/N >= 7.5 at least 0.7 FWHM
    from the band is placed within 2 px (the positional error there is <= 1 px).
    Sources inside the band are flagged ``edge``."""
    from scipy import ndimage

    config = preset("sharper_template", size=512, seed=2)
    config = config.model_copy(
        update={
            "science_psf": config.science_psf.model_copy(update={"fwhm": 11.0, "ellipticity": 0.0}),
            "template_psf": config.template_psf.model_copy(update={"fwhm": 9.0}),
            "transient_flux_min": 3000.0,
            "transient_flux_max": 4e4,
        }
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))
    catalog = result.dia_sources
    output = result.output
    band = (output.mask & output.bitmask(["EDGE"])) != 0
    from_band = ndimage.distance_transform_edt(~band)
    x, y, flux = transient_truth(pair)
    at = from_band[np.round(y).astype(int), np.round(x).astype(int)]
    distance, nearest = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(
        np.column_stack([x, y])
    )
    bright = (at >= 0.7 * 11.0) & (flux > 5000)
    assert bright.sum() >= 8
    assert np.all(distance[bright] < 2.0), distance[bright]
    inside = (at == 0) & (distance < 11.0)
    assert np.all(np.asarray(catalog["flag_edge"])[nearest[inside]])


def _empty_spots(pair, n: int, clearance: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions spread over a 5 x 5 grid of the 512 px pair, ``clearance`` px from
    any of its stars (off pixel centres by 0.3 px)."""
    stars = pair.truth["stars"]
    tree = cKDTree(np.column_stack([stars["x"], stars["y"]]))
    grid = np.linspace(60, 452, 5)
    spots = [
        (gx, gy) for gy in grid for gx in grid if not tree.query_ball_point([gx, gy], clearance)
    ]
    spread = spots[:: max(1, len(spots) // n)][:n]
    x, y = (np.array(v) + 0.3 for v in zip(*spread, strict=True))
    return x, y


def _misregistered_pair(
    n_stars: int, shift: float, flux: float = 2e5, name: str = "sharper_template", seed: int = 77
):
    """A pair with ``n_stars`` extra bright stars placed ``shift`` px further along x in
    the science than in the template (a local misregistration); returns their positions.

    They are brighter than the kernel sources' S/N cap in the default pair, so the
    matching kernel does not learn (absorb) their shift, as with a real local
    misregistration; in others they may be in the window (`core.stamp_neighbours`)."""
    config = preset(name, size=512, seed=seed)
    if name != "sharper_template":
        config = config.model_copy(update={"n_transients": 0})
    pair = simulate_pair(config)
    science, template = pair.science.copy(), pair.template.copy()
    x, y = _empty_spots(pair, n_stars, 12.0)
    for exposure, dx, scale in (
        (science, shift, 1.0),
        (template, 0.0, 1.0 / pair.truth["flux_ratio"]),
    ):
        psf = exposure.require_psf()
        for xs, ys in zip(x, y, strict=True):
            add_point_source(exposure.image, psf, xs + dx, ys, flux * scale)
            add_point_source(exposure.variance, psf, xs + dx, ys, flux * scale / 4.0)
    return science, template, x + 0.5 * shift, y


def _transients_on_star_wings(n: int, offset_fwhm: float, star: float, transient: float):
    """A pair with ``n`` bright constant stars on empty spots (in both images) and, in the
    science only, a transient ``offset_fwhm`` science FWHMs from each along +x; returns
    the transients' positions."""
    pair = simulate_pair(preset("sharper_template", size=512, seed=79))
    science, template = pair.science.copy(), pair.template.copy()
    x, y = _empty_spots(pair, n, 25.0)
    offset = offset_fwhm * science.require_psf().fwhm()
    for exposure, scale, extra in (
        (science, 1.0, transient),
        (template, 1.0 / pair.truth["flux_ratio"], 0.0),
    ):
        psf = exposure.require_psf()
        for xs, ys in zip(x, y, strict=True):
            for dx, flux in ((0.0, star * scale), (offset, extra)):
                if flux:
                    add_point_source(exposure.image, psf, xs + dx, ys, flux)
                    add_point_source(exposure.variance, psf, xs + dx, ys, flux / 4)
    return science, template, x + offset, y


def test_science_and_template_fluxes_of_a_transient_on_a_star_wing():
    """A transient 1.5 FWHM from a bright star: the matched images' PSF fluxes there are
    the light above the ring sky around the fit, so both hold the star's wing (> 0)
    and their difference is the transient's flux. With a constant fitted inside the
    stamp the wing's slope was taken up and the fluxes off the star's peak came out
    negative (the JWST pair: science flux S/N down to -284)."""
    transient = 2e4
    science, template, x, y = _transients_on_star_wings(5, 1.5, 2e5, transient)
    catalog = run_subtraction(science, template).dia_sources
    tree = cKDTree(np.column_stack([catalog["x"], catalog["y"]]))
    distance, index = tree.query(np.column_stack([x, y]))
    assert np.all(distance < 1.0)
    rows = catalog[index]
    assert np.all(rows["template_flux"] > 5 * rows["template_flux_err"])
    assert np.all(rows["science_flux"] > rows["template_flux"])
    change = (rows["science_flux"] - rows["template_flux"]) / transient
    np.testing.assert_allclose(change, 1.0, atol=0.1)
    np.testing.assert_allclose(rows["psf_flux"] / transient, 1.0, atol=0.05)


def test_ring_levels_are_the_sky_around_the_stamp():
    """`ring_levels`: the median of the ring's usable pixels, a bright star inside the
    stamp and one in the ring notwithstanding; NaN for a ring with no usable pixel."""
    from core.exposure import Exposure
    from core.rings import ring_levels

    rng = np.random.default_rng(11)
    image = 100.0 + rng.normal(0.0, 1.0, (80, 80))
    image[40, 40] += 5e4  # the source itself
    image[40, 52] += 5e4  # a star in the ring (half 9, width 4: 10-13 px out)
    mask = np.zeros(image.shape, dtype=np.int32)
    exposure = Exposure.from_arrays(image, np.ones_like(image), mask)
    level = ring_levels(exposure, np.array([40, 2]), np.array([40, 40]), 9, 4, ("BAD",))
    assert abs(level[0] - 100.0) < 0.15
    assert abs(level[1] - 100.0) < 0.2  # the ring half off the frame
    mask[26:55, 26:55] = exposure.mask_planes.get_bitmask(["BAD"]) or 1
    mask[31:50, 31:50] = 0
    masked = Exposure.from_arrays(
        image, np.ones_like(image), mask, mask_planes=exposure.mask_planes
    )
    assert np.isnan(ring_levels(masked, np.array([40]), np.array([40]), 9, 4, ("BAD",))[0])
    assert ring_levels(exposure, np.array([], int), np.array([], int), 9, 4, ()).shape == (0,)


def test_saturated_pixels_are_left_out_of_the_matched_images_fits():
    """A clipped (SAT) core fits no PSF: the matched images' fits leave it out, and with
    too little of the PSF left the flux is NaN, not a clipped star's garbage."""
    from core.diasources import _MATCHED_UNUSABLE
    from core.exposure import Exposure
    from core.forced import PsfStamps, psf_photometry
    from core.psf import GaussianPsf

    psf = GaussianPsf(1.5)
    image = np.full((64, 64), 10.0)
    stamp, x_min, y_min = psf.image_at(32.0, 32.0)
    h, w = stamp.shape
    image[y_min : y_min + h, x_min : x_min + w] += np.minimum(1e6 * stamp, 2e4)  # clipped
    exposure = Exposure.from_arrays(image, np.ones_like(image), psf=psf)
    sat = exposure.mask_planes.get_bitmask(["SAT"])
    assert sat
    exposure.mask[image >= 2e4 + 10.0 - 1e-3] |= sat
    stamps = PsfStamps(psf, exposure)
    kept = psf_photometry(exposure, [32.0], [32.0], stamps, True)
    left_out = psf_photometry(
        exposure, [32.0], [32.0], stamps, False, unusable=_MATCHED_UNUSABLE, sky_ring=4
    )
    assert np.isfinite(kept["flux"][0]) and kept["flux"][0] < 0.5e6  # clipped: far too low
    assert np.isnan(left_out["flux"][0]) and left_out["coverage"][0] < 0.5


def test_misregistered_stars_are_dipoles():
    """0.5 px misregistration of a few stars: one dipole each, not two sources."""
    science, template, x, y = _misregistered_pair(5, 0.5)
    assert x.size == 5
    catalog = run_subtraction(science, template).dia_sources
    for row in _dipole_rows(catalog, x, y):
        assert row["is_dipole"]
        assert not row["is_negative"]
        # the positive lobe is on the +x side: angle from negative to positive ~ 0 deg
        assert abs(row["dipole_angle"]) < 30
        assert row["dipole_pos_flux"] > 0 > row["dipole_neg_flux"]
        assert abs(row["dipole_separation"] - 0.5) < 0.2, row["dipole_separation"]
        # net flux ~ 0 compared with a lobe
        assert abs(row["psf_flux"]) < 0.2 * row["dipole_pos_flux"]


def test_misregistered_stars_in_the_kernel_sources_window_are_dipoles():
    """The same stars in the varying pair (Moffat PSF): there they are within the kernel
    sources' S/N window, and one was a kernel source whose shift the kernel learnt (3 of
    the 5 dipoles found). A kernel source whose shift departs from the others' median by
    more than 0.05 FWHM, 0.25 px and 5 times its error is left out: none is a kernel
    source, 5 dipoles."""
    science, template, x, y = _misregistered_pair(5, 0.5, name="varying", seed=2)
    result = run_subtraction(science, template)
    used = result.kernel_sources
    distance = cKDTree(np.column_stack([used["x"], used["y"]])).query(np.column_stack([x, y]))[0]
    assert np.all(distance > 2.0)
    assert result.metadata["alardLuptonSubtract.nMovedSourcesRejected"] >= 1
    for row in _dipole_rows(result.dia_sources, x, y):
        assert row["is_dipole"]
        assert abs(row["dipole_separation"] - 0.5) < 0.2, row["dipole_separation"]


def test_a_profile_an_unusable_band_cuts_is_cut_alike_on_its_other_side():
    """Point sources 0.3-0.9 FWHM beside a band of EDGE pixels (a convolution's edge,
    which the search and the centroids leave out): the profile the band cuts on one side
    is cut alike on the other (the mirrored pixels), so the weighted centroid leans less
    away from the band. Cut on one side only: 0.62 and 0.24 px off at 2.3 and 3.6 px
    from it (mirrored: 0.39 and 0.13)."""
    from core.psf import GaussianPsf

    rng = np.random.default_rng(5)
    psf = GaussianPsf(3.0)  # FWHM 7.1 px
    ny, nx, band = 160, 200, 30
    image = rng.normal(0.0, 10.0, (ny, nx))
    x = band + np.array([2.3, 3.6, 5.1, 6.7])
    y = np.array([30.2, 65.7, 100.4, 135.9])
    for xs, ys in zip(x, y, strict=True):
        add_point_source(image, psf, xs, ys, 4e4)  # S/N ~380
    exposure = Exposure.from_arrays(image, np.full(image.shape, 100.0), psf=psf)
    exposure.mask[:, :band] |= exposure.mask_planes.get_bitmask(["EDGE"])
    catalog = dia_sources(exposure)
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    distance, index = cKDTree(cxy).query(np.column_stack([x, y]))
    assert np.all(distance[1:] < 0.15), distance
    assert distance[0] < 0.45, distance  # within half a FWHM of the cut


def _opposite_pairs(n_pairs: int, separation: float, flux: float):
    """A pair whose science holds ``n_pairs`` point sources of +``flux`` and -``flux``,
    ``separation`` px apart along x, on empty sky: a dipole with no star under it (the
    images before subtraction give its lobes no flux to lean on); returns the pairs'
    midpoints."""
    pair = simulate_pair(preset("sharper_template", size=512, seed=78))
    science = pair.science.copy()
    x, y = _empty_spots(pair, n_pairs, 15.0)
    psf = science.require_psf()
    for xs, ys in zip(x, y, strict=True):
        for dx, sign in ((0.5 * separation, 1.0), (-0.5 * separation, -1.0)):
            add_point_source(science.image, psf, xs + dx, ys, sign * flux)
    return science, pair.template.copy(), x, y


def _dipole_rows(catalog, x, y):
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    fwhm = catalog.meta["psf_fwhm"]
    rows = []
    for xs, ys in zip(x, y, strict=True):
        near = np.hypot(cxy[:, 0] - xs, cxy[:, 1] - ys) < 2 * fwhm
        assert near.sum() == 1, catalog[near]
        rows.append(catalog[near][0])
    return rows


def test_close_lobes_without_a_star_leave_separation_and_lobe_fluxes_unmeasured():
    """0.6 px apart, nothing under them in the images before subtraction: only flux times
    separation is measured. The fit neither slides to coincident lobes of unbounded
    opposite fluxes (it did: +-3e8 counts on real frames) nor swaps their signs:
    separation and lobe fluxes are NaN, the angle still points to the positive lobe."""
    science, template, x, y = _opposite_pairs(4, 0.6, 2e5)
    catalog = run_subtraction(science, template).dia_sources
    for row in _dipole_rows(catalog, x, y):
        assert row["is_dipole"]
        assert np.isnan(row["dipole_separation"])
        assert np.isnan(row["dipole_pos_flux"]) and np.isnan(row["dipole_neg_flux"])
        assert abs(row["dipole_angle"]) < 30, row["dipole_angle"]
        assert np.isfinite(row["x"]) and np.isfinite(row["y"])
        # the net flux (well determined) ~ 0 against the lobes
        assert abs(row["psf_flux"]) < 0.05 * 2e5 and np.isfinite(row["psf_flux_err"])


def test_separated_lobes_without_a_star_are_fitted_freely():
    """1.6 FWHM apart, nothing under them: the two lobes are measured (separation,
    fluxes of both signs, angle) by the free fit."""
    science, template, x, y = _opposite_pairs(4, 6.4, 3e4)
    catalog = run_subtraction(science, template).dia_sources
    for row in _dipole_rows(catalog, x, y):
        assert row["is_dipole"]
        assert abs(row["dipole_separation"] - 6.4) < 0.3, row["dipole_separation"]
        assert abs(row["dipole_pos_flux"] / 3e4 - 1) < 0.1, row["dipole_pos_flux"]
        assert abs(row["dipole_neg_flux"] / -3e4 - 1) < 0.1, row["dipole_neg_flux"]
        assert abs(row["dipole_angle"]) < 10, row["dipole_angle"]


def test_a_pair_without_a_lobe_of_each_sign_has_no_lobes_or_separation():
    """The fit of a 'dipole' whose two lobes both come out positive (its negative peak
    was noise beside a second source): no lobe fluxes or separation are reported (the
    old fit gave one 41 px away with a positive 'negative' lobe on a real frame)."""
    from core.diasources import _fit_dipole
    from core.forced import PsfStamps

    exposure = simulate_pair(preset("sharper_template", size=128, seed=5)).science.copy()
    exposure.image[...] = 0.0
    exposure.variance[...] = 1.0
    exposure.mask[...] = 0
    psf = exposure.require_psf()
    for xs in (58.2, 66.2):  # two positive sources 8 px apart
        add_point_source(exposure.image, psf, xs, 64.3, 1e4)
    fit = _fit_dipole(exposure, PsfStamps(psf, exposure), (66, 64), (58, 64), None, 20.0)
    assert np.isnan(fit["separation"])
    assert np.isnan(fit["pos_flux"]) and np.isnan(fit["neg_flux"])
    assert fit["flux"] == pytest.approx(2e4, rel=0.05)  # the net flux stays measured


@pytest.mark.parametrize("plane", ["BAD", "NO_DATA", "EDGE"])
def test_a_dipole_fit_leaves_out_the_pixels_single_fits_leave_out(plane):
    """A review's find: the dipole fit read masked pixels, where single sources' PSF fits
    and apertures leave them out: a hot column masked BAD 4 px from a net-zero dipole
    read as net +27000 +- 73 (lobes +41000 / -14000), unflagged."""
    from core.diasources import _fit_dipole
    from core.forced import PsfStamps

    exposure = simulate_pair(preset("sharper_template", size=128, seed=5)).science.copy()
    rng = np.random.default_rng(3)
    exposure.image[...] = rng.normal(0.0, 10.0, exposure.shape)
    exposure.variance[...] = 100.0
    exposure.mask[...] = 0
    psf = exposure.require_psf()
    for xs, flux in ((66.0, 2e4), (62.0, -2e4)):
        add_point_source(exposure.image, psf, xs, 64.0, flux)
    stamps = PsfStamps(psf, exposure)
    clean = _fit_dipole(exposure, stamps, (66, 64), (62, 64), None, 20.0)
    exposure.image[:, 70] += 5000.0  # values nothing should read: masked
    exposure.mask[:, 70] |= exposure.bitmask([plane])
    masked = _fit_dipole(exposure, stamps, (66, 64), (62, 64), None, 20.0)
    assert abs(clean["flux"]) < 3 * clean["flux_err"]
    assert abs(masked["flux"] - clean["flux"]) < clean["flux_err"], (masked, clean)
    assert masked["pos_flux"] == pytest.approx(2e4, rel=0.02)
    assert masked["neg_flux"] == pytest.approx(-2e4, rel=0.02)


@pytest.mark.parametrize(
    ("lobe_fluxes", "held"),
    [
        (((2e4, 100.0), (2e4, 100.0)), True),  # the star's fluxes: the lobes are held
        (((2e5, 100.0), (3e3, 100.0)), False),  # fluxes that cannot make this dipole
        (((3e3, 100.0), (2e5, 100.0)), False),
    ],
)
def test_lobes_held_at_the_images_fluxes_stay_on_the_dipole(lobe_fluxes, held):
    """A close dipole (+-2e4, 0.6 px apart): held at fluxes that describe it, the lobes
    and separation are measured; held at fluxes that do not, the fit wandered off (2 px,
    the angle 77-100 deg off, a net flux of 2900 for 0) and reported those lobes: now
    they are not measured and the position and net flux are the free fit's."""
    from core.diasources import _fit_dipole
    from core.forced import PsfStamps

    exposure = simulate_pair(preset("sharper_template", size=128, seed=5)).science.copy()
    exposure.image[...] = np.random.default_rng(2).normal(0.0, 1.0, exposure.shape)
    exposure.variance[...] = 1.0
    exposure.mask[...] = 0
    psf = exposure.require_psf()
    for xs, flux in ((64.6, 2e4), (64.0, -2e4)):
        add_point_source(exposure.image, psf, xs, 64.3, flux)
    fit = _fit_dipole(exposure, PsfStamps(psf, exposure), (65, 64), (64, 64), lobe_fluxes, 20.0)
    assert abs(fit["x"] - 64.3) < 0.1 and abs(fit["y"] - 64.3) < 0.1
    assert abs(fit["angle"]) < 30
    assert abs(fit["flux"]) < 5 * fit["flux_err"]
    if held:
        assert fit["pos_flux"] == 2e4 and fit["neg_flux"] == -2e4
        assert fit["separation"] == pytest.approx(0.6, abs=0.05)
    else:
        assert np.isnan(fit["pos_flux"]) and np.isnan(fit["separation"])


@pytest.mark.parametrize("batch", [None, 8])
@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_measurements_beside_detection_equal_one_thread_and_the_two_steps(mode, batch, monkeypatch):
    """dia_sources measures on a pool of threads, the output's PSF stamps and noise
    scale beside the detection: the catalog equals, bit for bit, the one made with
    every call in the caller's thread (thread cap 1) and detect then measure (the two
    public steps). Misregistered stars give dipoles (their lobe fluxes are futures).
    With small stamp batches the work runs in many batches and the matched template's
    fit is split over the threads: the same catalog again."""
    import core.diasources
    import core.stamps
    from core.diasources import detect_dia_sources, measure_dia_sources, score_profile
    from core.parallel import set_thread_limit

    if batch is not None:
        monkeypatch.setattr(core.stamps, "STAMP_BATCH", batch)
        monkeypatch.setattr(core.diasources, "STAMP_BATCH", batch)

    science, template, _, _ = _misregistered_pair(5, 0.5)
    result = run_subtraction(science, template, SubtractionConfig(mode=mode))
    is_score = result.score is not None
    assert is_score is (mode == "preconvolve")
    config = DiaSourceConfig()
    matched = {
        "matched_science": result.matched_science,
        "matched_template": result.matched_template,
    }
    kwargs = {**matched, "kernel_sources": result.kernel_sources}
    pooled = dia_sources(result.output, config, is_score, **kwargs)
    try:
        set_thread_limit(1)
        inline = dia_sources(result.output, config, is_score, **kwargs)
    finally:
        set_thread_limit(None)
    measured = result.output
    if is_score:  # as dia_sources does: the profile of a point source in the score
        science_psf = result.matched_science.psf
        measured = replace(result.output, psf=score_profile(result.output.psf, result.output.psf))
        profile = score_profile(science_psf, science_psf)
        kwargs["matched_science"] = result.matched_science.with_psf(profile)
        kwargs["matched_template"] = result.matched_template.with_psf(profile)
    detections = detect_dia_sources(result.output, config, is_score)
    steps = measure_dia_sources(measured, detections, config, **kwargs, is_score=is_score)
    assert len(pooled) > 20 and pooled["is_dipole"].sum() >= 3
    for other in (inline, steps):
        assert other.colnames == pooled.colnames and other.meta == pooled.meta
        for name in pooled.colnames:
            np.testing.assert_array_equal(other[name], pooled[name], err_msg=name)


def test_disabled_and_threshold():
    """Off by config; a higher threshold keeps a subset of the detections."""
    pair = simulate_pair(preset("equal", size=256, seed=5))
    off = run_subtraction(
        pair.science, pair.template, SubtractionConfig(dia=DiaSourceConfig(enabled=False))
    )
    assert off.dia_sources is None
    assert "detect" not in off.timings
    on = run_subtraction(pair.science, pair.template)
    strict = dia_sources(on.difference, DiaSourceConfig(threshold=10.0))
    assert len(strict) < len(on.dia_sources)
    assert np.all(np.abs(strict["detection_snr"]) >= 10.0)


def test_suspect_and_streak_planes_raise_their_own_bits():
    """A review's find: Rubin's SUSPECT plane (past the linearity limit) raised
    suspect_kernel, which says the kernel is extrapolated; it raises `suspect` now. A
    STREAK pixel (a trail masked in the inputs) raises `streak`, as documented."""
    from core.forced import FLAG_BITS
    from core.psf import GaussianPsf

    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 10.0, (256, 256)).astype(np.float32)
    psf = GaussianPsf(1.5)
    add_point_source(image, psf, 100.0, 120.0, 5000.0)
    exposure = Exposure.from_arrays(image, np.full(image.shape, 100.0, np.float32), psf=psf)
    for plane, (row, col) in (("SUSPECT", (120, 101)), ("STREAK", (60, 61))):
        marked = np.zeros(image.shape, bool)
        marked[row, col] = True
        exposure.set_plane(plane, marked)
    forced = forced_photometry(exposure, x=[100.0, 60.0, 200.0], y=[120.0, 60.0, 200.0])
    suspect, streak = FLAG_BITS["suspect"][0], FLAG_BITS["streak"][0]
    assert list(forced["flags"]) == [suspect, streak, 0]
    assert not forced["flag_suspect_kernel"].any()
    catalog = dia_sources(exposure)
    assert len(catalog) == 1 and catalog["flags"][0] == suspect


def test_pixel_flags_reach_one_difference_fwhm_in_both_modes():
    """A review's find: on a score the pixel flags reached 1 FWHM of the score's profile
    (sqrt(2) wider than the difference's PSF): an INTRP pixel 5 px from a transient
    flagged it in preconvolve mode, not in auto. Now the reach is the difference's in
    both; a pixel inside it flags both."""
    pair = simulate_pair(preset("sharper_template", size=512, seed=1))
    flagged = {}
    for mode in ("auto", "preconvolve"):
        result = run_subtraction(pair.science, pair.template, {"mode": mode})
        catalog = result.dia_sources
        k = int(np.argmin(np.hypot(catalog["x"] - 256, catalog["y"] - 256)))
        x, y = float(catalog["x"][k]), float(catalog["y"][k])
        reach = catalog.meta["psf_fwhm"] / (np.sqrt(2.0) if mode == "preconvolve" else 1.0)
        for distance in (0.6 * reach, 1.4 * reach):
            output = result.output.copy()
            marked = np.zeros(output.shape, bool)
            marked[int(np.floor(y + 0.5)), int(np.floor(x + distance + 0.5))] = True
            output.set_plane("INTRP", marked)
            again = dia_sources(
                output,
                is_score=mode == "preconvolve",
                matched_science=result.matched_science,
                matched_template=result.matched_template,
            )
            j = int(np.argmin(np.hypot(again["x"] - x, again["y"] - y)))
            flagged[mode, distance < reach] = bool(again["flag_interpolated"][j])
    assert flagged == {
        ("auto", True): True,
        ("auto", False): False,
        ("preconvolve", True): True,
        ("preconvolve", False): False,
    }


def test_flags_from_masks_kernel_hull_and_bright_stars():
    """Mask planes near a source raise its flags; so do bright template stars and
    positions far outside the kernel sources' hull."""
    from astropy.table import Table

    from core.forced import FLAG_BITS

    pair = simulate_pair(preset("defects", size=512, seed=9))
    result = run_subtraction(pair.science, pair.template)
    difference = result.difference
    # forced photometry on a bad column and next to a saturated pixel
    bad_rows, bad_cols = np.nonzero(difference.masked(["BAD"]))
    sat_rows, sat_cols = np.nonzero(difference.masked(["SAT"]))
    assert bad_rows.size and sat_rows.size
    forced = forced_photometry(
        difference, [bad_cols[0], sat_cols[0] + 1.0, 128.0], [bad_rows[0], sat_rows[0], 128.0]
    )
    assert forced["flag_bad"][0] and forced["flags"][0] & FLAG_BITS["bad"][0]
    assert forced["flag_saturated"][1]
    edge = forced_photometry(difference, [1.0], [128.0])
    assert edge["flag_edge"][0]
    # a kernel "hull" in one corner: sources beyond it (plus the margin) are suspect
    corner = Table({"x": [0.0, 40.0, 0.0], "y": [0.0, 0.0, 40.0]})
    catalog = dia_sources(
        difference,
        DiaSourceConfig(suspect_kernel_margin=10.0),
        matched_science=result.matched_science,
        matched_template=result.matched_template,
        kernel_sources=corner,
    )
    far = (catalog["x"] + catalog["y"]) > 40 + 10 * np.sqrt(2) + 1
    near = (catalog["x"] + catalog["y"]) < 40
    assert far.any()
    assert np.all(catalog["flag_suspect_kernel"][far])
    assert not np.any(catalog["flag_suspect_kernel"][near])
    # the clipped cores of saturated stars (either image's) are left out of the search:
    # their residuals, thousands of sigma, made ~20 detections within 20 px of them
    # (and cost 3 of the 20 transients); no more than 2 now, every transient found
    saturated = np.asarray(catalog["flag_saturated"])
    assert np.mean(np.asarray(catalog["flag_bright_star"])[~saturated]) < 0.5
    truth = pair.truth["transients"]
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    to_truth = np.hypot(x[:, None] - np.asarray(truth["x"]), y[:, None] - np.asarray(truth["y"]))
    found = to_truth.min(axis=0) <= 2.0
    assert found.sum() >= 19
    clipped = difference.masked(["SAT", "SAT_TEMPLATE"])
    to_clipped = ndimage.distance_transform_edt(~clipped)
    false = to_truth.min(axis=1) > 2.0
    near = to_clipped[np.round(y).astype(int), np.round(x).astype(int)] < 20.0
    # cosmic rays of the preset that fall there are no residuals (flagged sharp)
    residual = ~np.asarray(catalog["flag_sharp"])
    assert np.count_nonzero(false & near & residual) <= 2


def test_score_profile_equals_fftconvolve_of_the_stamp():
    """The correlated PSF (its kernel's transform made once) draws the stamps of
    ``scipy.signal.fftconvolve`` of each stamp with the flipped kernel, unit sum (to
    round-off: the same transforms, products possibly vectorised differently)."""
    from scipy.signal import fftconvolve

    from core.diasources import score_profile
    from core.psf import GaussianPsf, MoffatPsf

    base = MoffatPsf(2.2, 3.0)
    pre = GaussianPsf(1.6)
    profile = score_profile(base, pre)
    kernel = np.asarray(pre.kernel_image(), dtype=np.float64)
    kernel = (kernel / kernel.sum())[::-1, ::-1]
    for x, y in [(10.0, 20.0), (500.5, 3.25), (None, None)]:
        expected = fftconvolve(base.kernel_image(x, y), kernel, mode="full")
        np.testing.assert_allclose(
            profile.kernel_image(x, y), expected / expected.sum(), rtol=0, atol=1e-15
        )


def test_deferred_matched_template_variance_gives_the_same_catalog():
    """With decorrelation the matched template's variance is deferred: the run does not
    make it, and the bright-star flags (from its image) and template flux errors made
    from its stamps equal those from the made plane."""
    from core.diasources import _MATCHED_UNUSABLE, _matched_scale, _sky_ring
    from core.forced import PsfStamps, psf_photometry
    from core.position_flags import bright_star_light, bright_star_limit, changed_star

    pair = simulate_pair(preset("defects", size=512, seed=9))
    result = run_subtraction(pair.science, pair.template)
    template = result.matched_template
    assert template.variance_deferred
    catalog = result.dia_sources
    ix = np.floor(np.asarray(catalog["x"]) + 0.5).astype(int)
    iy = np.floor(np.asarray(catalog["y"]) + 0.5).astype(int)
    fwhm = float(catalog.meta["psf_fwhm"])
    stamps = PsfStamps(template.psf, template)
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    config = DiaSourceConfig()
    radius = config.bright_star_radius_fwhm * fwhm
    errors = catalog["psf_flux_err"]
    limit = bright_star_limit(errors, config.threshold, config.bright_star_residual)

    def flagged():  # as the catalog flags: a bright star's light near, no more than its residual
        near, light = bright_star_light(template, ix, iy, radius, limit)
        saturated = np.asarray(catalog["flag_saturated"])
        fraction = config.bright_star_residual_fraction
        return near & ~changed_star(catalog["psf_flux"], light, saturated, fraction)

    # and beside the brightest template stars, where the flag must be raised too (the
    # catalog holds few such sources since saturated cores are left out of its search)
    stars = pair.truth["stars"]
    brightest = np.argsort(stars["flux_template"])[-10:]
    px = np.floor(np.asarray(stars["x"])[brightest] + 2.5).astype(int)
    py = np.floor(np.asarray(stars["y"])[brightest] + 0.5).astype(int)

    # (at the catalog's typical noise)
    typical = bright_star_limit([np.median(errors)], config.threshold, config.bright_star_residual)

    def beside():
        return bright_star_light(template, px, py, radius, typical)[0]

    bright, bright_beside = flagged(), beside()
    assert bright_beside.sum() >= 3
    # as the catalog fits the matched images: on the ring sky, saturated pixels left out
    matched = {"unusable": _MATCHED_UNUSABLE, "sky_ring": _sky_ring(stamps)}
    fit = psf_photometry(template, x, y, stamps, False, **matched)
    # the catalog's errors carry the matched template's noise scale (its noise is
    # correlated by the kernel), measured on the same stamps
    scale = _matched_scale(template, stamps)
    assert template.variance_deferred
    np.testing.assert_array_equal(bright, np.asarray(catalog["flag_bright_star"]))
    np.testing.assert_allclose(fit["flux_err"] * scale, catalog["template_flux_err"], rtol=1e-12)
    made = template.variance  # now made: the same flags, errors to float32 round-off
    assert made.dtype == np.float32 and not template.variance_deferred
    np.testing.assert_array_equal(flagged(), bright)
    np.testing.assert_array_equal(beside(), bright_beside)
    again = psf_photometry(template, x, y, stamps, False, **matched)
    np.testing.assert_allclose(again["flux_err"], fit["flux_err"], rtol=1e-5)


@pytest.mark.parametrize(("bunit", "flux_unit"), [("ADU", "ADU"), ("MJy/sr", None)])
def test_catalog_file_says_when_in_which_band_and_in_which_units(tmp_path, bunit, flux_unit):
    """An alert needs the epoch: the science exposure's MJD-OBS, DATE-OBS, FILTER,
    EXPTIME and BUNIT go into the DIA and forced tables' meta and FITS headers; positions,
    moments and angles carry TUNIT, fluxes too when the pixels are counts (a sum of
    MJy/sr pixels is not in MJy/sr)."""
    from core.diasources import catalog_hdulist, read_dia_sources

    pair = simulate_pair(preset("sharper_template", size=256, seed=4))
    observed = {"MJD-OBS": 60123.25, "DATE-OBS": "2023-07-09T06:00:00", "EXPTIME": 30.0}
    pair.science.metadata.update({**observed, "FILTER": "r", "BUNIT": bunit})
    result = run_subtraction(pair.science, pair.template)
    x, y = pair.truth["stars"]["x"][:3], pair.truth["stars"]["y"][:3]
    for table in (result.dia_sources, forced_photometry(result.output, x=x, y=y)):
        assert table.meta["mjd_obs"] == 60123.25 and table.meta["band"] == "r"
        path = tmp_path / "table.fits"
        catalog_hdulist(table).writeto(path, overwrite=True)
        header = fits.getheader(path, "DIASOURCES")
        assert header["MJD-OBS"] == 60123.25 and header["DATE-OBS"] == observed["DATE-OBS"]
        assert header["FILTER"] == "r" and header["EXPTIME"] == 30.0 and header["BUNIT"] == bunit
        units = {
            header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, len(table.columns) + 1)
        }
        assert units["x"] == "pix" and units["ra"] == "deg"
        assert units["psf_flux"] == flux_unit and units["psf_flux_err"] == flux_unit
        back = read_dia_sources(path)
        assert back.meta["mjd_obs"] == 60123.25 and back.meta["bunit"] == bunit
        assert back["psf_flux"].unit is None  # numbers, as written
        # NaN read back as NaN, not as masked values (empty cells in a CSV)
        table["psf_flux"][0] = np.nan
        catalog_hdulist(table).writeto(path, overwrite=True)
        back = read_dia_sources(path)
        assert not back.has_masked_columns and np.isnan(back["psf_flux"][0])


def test_catalog_file_of_an_image_without_bunit_says_the_image_files_unit(tmp_path):
    """No BUNIT in the science header: the catalog says the unit the difference file
    says (adu, raw counts), and its fluxes carry it."""
    from core.diasources import catalog_hdulist
    from core.products import write_products

    pair = simulate_pair(preset("sharper_template", size=256, seed=4))
    pair.science.metadata.pop("BUNIT", None)
    result = run_subtraction(pair.science, pair.template)
    write_products(result, tmp_path, names=["difference"])
    catalog_hdulist(result.dia_sources).writeto(tmp_path / "dia.fits")
    header = fits.getheader(tmp_path / "dia.fits", "DIASOURCES")
    assert header["BUNIT"] == fits.getheader(tmp_path / "difference.fits", "IMAGE")["BUNIT"]
    units = {header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, header["TFIELDS"] + 1)}
    assert units["psf_flux"] == header["BUNIT"] == "adu"


def test_sources_along_a_satellite_trail_are_flagged_streak():
    """A trail across the science image is one footprint, a ridge whose local maxima the
    saddle test folds into a few sources (11 before it); those are flagged ``streak``
    (the folded maxima still trace the line), the transients off it are not."""
    pair = simulate_pair(preset("sharper_template", size=512, seed=5))
    science = pair.science
    yy, xx = np.mgrid[:512, :512]
    (x0, y0), (x1, y1) = (40.0, 100.0), (470.0, 380.0)
    length = np.hypot(x1 - x0, y1 - y0)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    along = (xx - x0) * ux + (yy - y0) * uy
    across = -(xx - x0) * uy + (yy - y0) * ux
    trail = 1000.0 * np.exp(-(across**2) / 8.0) / np.sqrt(8.0 * np.pi)
    trail *= (along > 0) & (along < length)
    science.image += trail.astype(np.float32)
    science.variance += (trail / 4.0).astype(np.float32)
    catalog = run_subtraction(science, pair.template).dia_sources
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    on_trail = np.abs(-(x - x0) * uy + (y - y0) * ux) < 3
    streak = np.asarray(catalog["flag_streak"])
    assert 1 <= on_trail.sum() < 8
    assert streak[on_trail].all()
    assert not streak[~on_trail].any()


def test_forced_photometry_flags_as_the_catalog():
    """Given the subtraction's matched template and kernel sources, forced photometry at
    the catalog's positions raises the catalog's bright_star and suspect_kernel bits;
    a position far from the kernel sources given is suspect_kernel when the solution
    fitted on them varies over the frame, not under this run's constant one."""
    from core.position_flags import EXTRAPOLATED_ORDER

    pair = simulate_pair(preset("defects", size=512, seed=9))
    result = run_subtraction(pair.science, pair.template)
    catalog = result.dia_sources
    single = catalog[~np.asarray(catalog["is_dipole"])]
    context = {"matched_template": result.matched_template}
    context["kernel_sources"] = result.kernel_sources
    forced = forced_photometry(result.output, x=single["x"], y=single["y"], **context)
    bits = 32 | 64  # bright_star, suspect_kernel
    np.testing.assert_array_equal(forced["flags"] & bits, single["flags"] & bits)
    # beside the brightest template stars (few catalog sources are, now that saturated
    # cores are left out of the search) bright_star is raised as well
    stars = pair.truth["stars"]
    brightest = np.argsort(stars["flux_template"])[-10:]
    beside = forced_photometry(
        result.output,
        x=np.asarray(stars["x"])[brightest] + 2.0,
        y=np.asarray(stars["y"])[brightest],
        **context,
    )
    assert np.count_nonzero(beside["flags"] & 32) >= 3
    sources = result.kernel_sources
    # a constant kernel, the background refitted on every sky pixel: nothing extrapolated
    assert sources.meta[EXTRAPOLATED_ORDER] == 0
    left = sources[np.asarray(sources["x"]) < 200]
    far = forced_photometry(result.output, x=[470.0], y=[256.0], kernel_sources=left)
    assert not far["flags"][0] & 64
    left.meta[EXTRAPOLATED_ORDER] = 1  # as a linearly varying solution's sources say
    far = forced_photometry(result.output, x=[470.0], y=[256.0], kernel_sources=left)
    assert far["flags"][0] & 64
    assert not forced_photometry(result.output, x=[470.0], y=[256.0])["flags"][0] & 64
    other = result.matched_template.cutout((0, 0, 255, 255))  # not the difference's grid
    with pytest.raises(IncompatibleInputsError, match="not on the difference's grid"):
        forced_photometry(result.output, x=[10.0], y=[10.0], matched_template=other)


def test_a_variable_star_is_not_its_own_residual():
    """On a bright star's core, a source brighter than `bright_star_residual_fraction`
    of the template's light there is a change of the star (a variable: the SAAO
    microlensing source, -50% and more, was flagged bright_star in 3 of 5 frames, as
    these two were); a fainter one may be its residual and stays flagged, as one beside
    the star's core does whatever its flux; forced photometry says the same."""
    from core.position_flags import bright_star_light, bright_star_limit, changed_star

    pair = simulate_pair(preset("sharper_template", size=512, seed=21))
    stars = pair.truth["stars"]
    flux, x, y = (np.asarray(stars[k]) for k in ("flux_science", "x", "y"))
    inside = (x > 40) & (x < 472) & (y > 40) & (y < 472) & ~np.asarray(stars["saturated"])
    first, second = np.argsort(-np.where(inside, flux, -1.0))[:2]
    science = pair.science
    for k, change in ((first, 0.25), (second, -0.4)):
        add_point_source(science.image, science.psf, x[k], y[k], np.float32(change * flux[k]))
    result = run_subtraction(science, pair.template)
    catalog = result.dia_sources
    rows = [
        int(np.argmin(np.hypot(catalog["x"] - x[k], catalog["y"] - y[k]))) for k in (first, second)
    ]
    at = catalog[rows]
    assert np.all(np.hypot(at["x"] - x[[first, second]], at["y"] - y[[first, second]]) < 0.5)
    assert not np.any(at["flag_bright_star"])
    template = result.matched_template
    ix = np.floor(np.asarray(at["x"]) + 0.5).astype(int)
    iy = np.floor(np.asarray(at["y"]) + 0.5).astype(int)
    config = DiaSourceConfig()
    radius = config.bright_star_radius_fwhm * catalog.meta["psf_fwhm"]
    # the first is bright by the catalog's limit (2% of its light reaches 5 sigma in the
    # source's noise); on their cores both are stars of at least half their own light,
    # the light under them within 5% of true (the PSF's fraction in the core made up)
    limit = bright_star_limit(at["psf_flux_err"], config.threshold, config.bright_star_residual)
    assert bright_star_light(template, ix, iy, radius, limit)[0][0]
    true_light = np.asarray(stars["flux_template"])[[first, second]]
    near, light = bright_star_light(template, ix, iy, radius, 0.5 * true_light)
    assert near.all()
    np.testing.assert_allclose(light, true_light, rtol=0.05)
    fraction, clear = config.bright_star_residual_fraction, np.zeros(2, dtype=bool)
    # the same sources at a tenth of the fraction: residual-like, flagged
    assert not changed_star(0.1 * fraction * light, light, clear, fraction).any()
    assert changed_star(at["psf_flux"], light, clear, fraction).all()
    # beside the core (its wing, 1.5 FWHM out) the light is no star's own: flagged
    beside, light_beside = bright_star_light(template, ix + 5, iy, radius, 0.5 * true_light)
    assert beside.all() and np.isnan(light_beside).all()
    forced = forced_photometry(
        result.output,
        at["x"],
        at["y"],
        matched_template=template,
        kernel_sources=result.kernel_sources,
    )
    assert not np.any(forced["flag_bright_star"])


def test_a_variable_star_beside_a_brighter_one_is_not_its_residual():
    """A star 1.2 FWHM from one 1.8x brighter (the SAAO microlensing star in 7 px seeing,
    flagged bright_star at -58%): the brighter one's wing outshines the fainter core's
    rim, yet the source sits on a star of its own; a change of half its light is the
    star's, one of a third of it is not (less than a fifth of its neighbour's: that
    one's residual may be it), nor one of 5%; on an isolated bright star's wing, where
    a noise bump may pass for a core, a source of a few percent of the star stays its
    residual whatever the noise draw."""
    from core.position_flags import bright_star_light, changed_star
    from core.psf import GaussianPsf

    fwhm, light = 7.0, 1e5
    psf = GaussianPsf(fwhm / 2.3548)
    config = DiaSourceConfig()
    fraction = config.bright_star_residual_fraction
    radius = config.bright_star_radius_fwhm * fwhm
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 1.0, (128, 128)).astype(np.float32)
    faint, bright = (60.0, 64.0), (60.0 + 1.2 * fwhm, 64.0)
    add_point_source(image, psf, *faint, light)
    add_point_source(image, psf, *bright, 1.8 * light)
    template = Exposure.from_arrays(image, np.ones_like(image), psf=psf)
    ix, iy = np.array([60, 60 + 2 * 8]), np.array([64, 64])  # the faint star; the wing
    near, under = bright_star_light(template, ix, iy, radius, 0.1 * light)
    assert near.all()
    assert 1.8 * light < under[0] < 2.8 * light  # at least its neighbour's light
    assert np.isnan(under[1])
    clear = np.zeros(1, dtype=bool)
    for change, star in ((-0.5, True), (-1 / 3, False), (-0.05, False)):
        assert changed_star(np.array([change * light]), under[:1], clear, fraction)[0] == star
    # an isolated star (2e5) on a noisy sky: positions 1.6 and 2 FWHM out on its wing
    for seed in range(20):
        rng = np.random.default_rng(seed)
        image = rng.normal(100.0, 10.0, (128, 128)).astype(np.float32)
        add_point_source(image, psf, 64.0, 64.0, 2e5)
        template = Exposure.from_arrays(image, np.ones_like(image), psf=psf)
        ix = np.array([64 + round(1.6 * fwhm), 64 + round(2.0 * fwhm)])
        near, under = bright_star_light(template, ix, np.array([64, 64]), radius, 0.1 * light)
        assert near.all()
        residual = np.full(2, 0.05 * 2e5)  # 5% of the star's light, of DECam's 3-8%
        assert not changed_star(residual, under, np.zeros(2, dtype=bool), fraction).any()


def test_a_fit_of_the_other_sign_is_no_change_of_the_star(monkeypatch):
    """A source's change of a star has the detection's sign: a +5 sigma crescent of
    kernel residual beside a bright faded source fitted that source's wing (-86000
    counts, S/N -404) and passed for the star's change, unflagged. Fluxes of the
    detection's sign are judged as before; without a sign (forced photometry), or a
    dipole's (0), the flux's own. The residuals are made as they were found: with the
    faded stars left in the kernel stamps (the kernel's screening of them, which
    removed these crescents, off)."""
    import core.subtract
    from core.position_flags import changed_star

    light, clear = np.array([1e5, 1e5]), np.zeros(2, dtype=bool)
    flux = np.array([-5e4, 5e4])
    assert changed_star(flux, light, clear, 0.2).all()
    assert not changed_star(flux, light, clear, 0.2, sign=[1, -1]).any()
    assert changed_star(flux, light, clear, 0.2, sign=[-1, 1]).all()
    assert changed_star(flux, light, clear, 0.2, sign=[0, 0]).all()
    # transients of 2e5-1e6 counts, half of them faded: crescents beside the faded ones
    pair = bright_transient_pair(30, 30)
    none = (np.zeros(0), np.zeros(0), [])
    monkeypatch.setattr(core.subtract, "template_only_peaks", lambda *args: none)
    catalog = run_subtraction(pair.science, pair.template).dia_sources
    opposite = (
        (np.sign(catalog["psf_flux"]) != np.sign(catalog["detection_snr"]))
        & ~catalog["is_dipole"]
        & (np.abs(catalog["snr"]) > 5)
    )
    assert opposite.sum() >= 2
    assert catalog["flag_bright_star"][opposite].all()


def _plant(exposure: Exposure, x: float, y: float, flux: float, rng) -> None:
    """A point source of ``flux`` at (x, y) with its photon noise (gain 1) in the image
    and variance."""
    stamp, x0, y0 = exposure.psf.image_at(x, y)
    h, w = stamp.shape
    light = np.clip(flux * stamp, 0.0, None)
    noisy = light + rng.normal(size=light.shape) * np.sqrt(light)
    exposure.image[y0 : y0 + h, x0 : x0 + w] += noisy.astype(np.float32)
    exposure.variance[y0 : y0 + h, x0 : x0 + w] += light.astype(np.float32)


def test_bright_star_light_is_judged_the_same_on_a_smoothed_template():
    """A star's light, not its pixels' S/N: the same template smoothed further (as the
    preconvolve mode's matched template is, by the science PSF) has 3.5x the per-pixel
    S/N on a star's peak, where the old per-pixel limit flagged around 3x fainter stars.
    By their light, the same positions are near a bright star in both: beside its core
    (1.5 and 2.5 FWHM), not 3.5 FWHM out (the smoothed star's wider wing reaches in),
    nor beside a star of 40% of the limit; the light under the star within 3% of true."""
    from core.convolve import convolve_exposure
    from core.position_flags import bright_star_light
    from core.psf import GaussianPsf

    rng = np.random.default_rng(31)
    template = Exposure.from_arrays(
        rng.normal(0.0, 10.0, (200, 200)), np.full((200, 200), 100.0), psf=GaussianPsf(1.5)
    )
    fwhm = 1.5 * 2.3548
    bright, moderate, limit = (60.3, 100.4), (140.6, 100.2), 5.0e4
    _plant(template, *bright, 1.0e5, rng)
    _plant(template, *moderate, 0.4 * limit, rng)
    smoothing = GaussianPsf(2.0).kernel_image()
    smoothed = convolve_exposure(template, smoothing / smoothing.sum())
    smoothed.psf = GaussianPsf(2.5)
    x = np.array([bright[0] + 1.5 * fwhm, bright[0], bright[0] - 3.5 * fwhm, moderate[0], 30.0])
    y = np.array([bright[1], bright[1] + 2.5 * fwhm, bright[1], moderate[1] + 2 * fwhm, 30.0])
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    expected = [True, True, False, False, False]
    centre = (np.array([60]), np.array([100]))
    peak_snr = []
    for image in (template, smoothed):
        near, _ = bright_star_light(image, ix, iy, 3.0 * fwhm, limit)
        assert near.tolist() == expected
        _, light = bright_star_light(image, *centre, 3.0 * fwhm, limit)
        assert light[0] == pytest.approx(1.0e5, rel=0.03)
        peak_snr.append(image.image[100, 60] / np.sqrt(image.variance[100, 60]))
    assert peak_snr[1] > 3.0 * peak_snr[0]


def test_bright_star_flags_the_same_neighbourhood_in_auto_and_preconvolve_modes():
    """Transients planted around a bright template star (300000 counts: its 2% residual
    is 26 sigma in their noise, the threshold 5) and a fainter one (42000: 3.6 sigma)
    are flagged alike in both modes: within 3 difference-PSF FWHM of the bright star's
    core, not 3.6 FWHM out, nor beside the fainter star or on empty sky. On the score
    the catalog's PSF is the preconvolved profile, 1.4x wider: its radius and the
    matched template's extra smoothing flagged the 3.6 FWHM one there."""
    pair = simulate_pair(
        preset("sharper_template", size=256, seed=3).model_copy(update={"n_transients": 0})
    )
    rng = np.random.default_rng(1)
    fwhm = 4.0  # the science PSF's
    bright, fainter = (80.5, 120.3), (180.2, 70.6)
    for (x, y), flux in ((bright, 3.0e5), (fainter, 4.2e4)):
        _plant(pair.science, x, y, flux, rng)
        _plant(pair.template, x, y, flux, rng)
    planted = np.array(
        [
            (bright[0] + 1.5 * fwhm, bright[1]),
            (bright[0], bright[1] - 2.5 * fwhm),
            (bright[0] - 3.6 * fwhm, bright[1] + 1.0),
            (fainter[0] + 2.0 * fwhm, fainter[1]),
            (200.0, 200.0),
        ]
    )
    for x, y in planted:
        _plant(pair.science, x, y, 8000.0, rng)
    expected = [True, True, False, False, False]
    widths = []
    for mode in ("auto", "preconvolve"):
        result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))
        catalog = result.dia_sources
        distance, row = cKDTree(np.column_stack([catalog["x"], catalog["y"]])).query(planted)
        assert np.all(distance < 1.0), mode
        assert np.all(np.asarray(catalog["snr"])[row] > 25), mode
        assert np.asarray(catalog["flag_bright_star"])[row].tolist() == expected, mode
        widths.append(catalog.meta["psf_fwhm"])
    assert widths[1] > 1.3 * widths[0]


def test_outside_kernel_hull_only_where_the_solution_varies():
    """Far outside the kernel sources' hull is suspect only where a polynomial fitted on
    them is extrapolated: their meta's `EXTRAPOLATED_ORDER` 0 (a constant solution)
    raises nothing, 1 raises beyond the margin, and none known raises as before."""
    from astropy.table import Table

    from core.position_flags import EXTRAPOLATED_ORDER, outside_kernel_hull

    x, y = np.array([10.0, 45.0, 80.0, 300.0]), np.array([10.0, 10.0, 10.0, 300.0])
    corner = Table({"x": [100.0, 140.0, 100.0], "y": [100.0, 100.0, 140.0]})  # parent
    xy0 = (90, 90)  # array (10, 10) is parent (100, 100)
    expected = [False, False, True, True]  # 0, 35 (the edge of the hull) and 70 px out
    assert outside_kernel_hull(corner, xy0, x, y, 20.0).tolist() == expected
    corner.meta[EXTRAPOLATED_ORDER] = 1
    assert outside_kernel_hull(corner, xy0, x, y, 20.0).tolist() == expected
    corner.meta[EXTRAPOLATED_ORDER] = 0
    assert not outside_kernel_hull(corner, xy0, x, y, 20.0).any()


@pytest.mark.parametrize(
    ("size", "overrides", "kernel_order", "order"),
    [
        # order 1 asked, 7 stamps support 0: the solution's order counts, not the config's
        (256, {"kernel": {"spatial_kernel_order": 1}}, 0, 0),
        (512, {}, 0, 0),  # constant kernel, the background refitted on every sky pixel
        (512, {"kernel": {"spatial_kernel_order": 1}}, 1, 1),
        # the background fitted on the stamps, at every pixel of them: its configured order
        (512, {"refine_background": False}, 0, 2),
    ],
)
def test_suspect_kernel_from_the_order_of_the_solution_used(
    tmp_path, size, overrides, kernel_order, order
):
    """The subtraction records the highest spatial order fitted on the kernel sources
    alone (kernel; background unless refitted on all sky), kernel.fits keeps it, and the
    catalog and forced photometry raise suspect_kernel beyond the hull of the leftmost
    third of them only when it is above 0."""
    from core.position_flags import EXTRAPOLATED_ORDER, KERNEL_REACH
    from core.products import read_kernel_sources, write_products

    pair = simulate_pair(preset("sharper_template", size=size, seed=3))
    config = SubtractionConfig.model_validate(overrides)
    result = run_subtraction(pair.science, pair.template, config)
    assert result.psf_matching_kernel.order == kernel_order
    sources = result.kernel_sources
    assert sources.meta[EXTRAPOLATED_ORDER] == order
    write_products(result, tmp_path, names=["kernel"])
    read = read_kernel_sources(tmp_path / "kernel.fits")
    assert read.meta[EXTRAPOLATED_ORDER] == order
    assert read.meta[KERNEL_REACH] == sources.meta[KERNEL_REACH] > 0
    left = sources[np.argsort(np.asarray(sources["x"]))[: max(3, len(sources) // 3)]]
    edge = float(np.max(left["x"])) - result.output.xy0[0]
    catalog = dia_sources(
        result.output,
        config.dia,
        matched_science=result.matched_science,
        matched_template=result.matched_template,
        kernel_sources=left,
    )
    far = np.asarray(catalog["x"]) > edge + config.dia.suspect_kernel_margin + 1
    assert far.sum() >= 2
    assert np.all(np.asarray(catalog["flag_suspect_kernel"])[far] == (order > 0))
    at = (size - 10.0, size / 2)
    forced = forced_photometry(result.output, x=[at[0]], y=[at[1]], kernel_sources=left)
    assert bool(forced["flag_suspect_kernel"][0]) == (order > 0)


def test_kernel_sources_kept_are_the_stamps_the_final_fit_used():
    """The hull of suspect_kernel (and kernel.fits) is the used stamps': sources whose
    stamps the fit rejected (a variable, a blend) constrain nothing. The `defects`
    pair rejects some; before, every selected source was kept."""
    from core.subtract import AlardLuptonSubtractTask

    pair = simulate_pair(preset("defects", size=512, seed=2))
    task = AlardLuptonSubtractTask(config=SubtractionConfig())
    result = task.run(pair.template, pair.science, None, False)
    candidates = task.solution.candidates
    good = np.asarray(candidates["status"]) == "GOOD"
    assert 0 < good.sum() < len(candidates)  # some were rejected
    kept = result.kernel_sources
    assert len(kept) == good.sum()
    np.testing.assert_array_equal(np.asarray(kept["x"]), np.asarray(candidates["x"])[good])
    np.testing.assert_array_equal(np.asarray(kept["y"]), np.asarray(candidates["y"])[good])


def _saturated_stars_pair(seed: int):
    """A 512 px pair (Gaussian PSFs, science FWHM 2.0, template 1.6) with four stars at fixed
    spots whose science peaks are 5-20x its saturation level: clipped there and bled
    along their columns (charge kept), marked SAT; drawn whole on pixel centres (wings to
    30 px, no sub-pixel shift) in both images. Returns science, template, the stars'
    (x, y), their light and the transients' (x, y)."""
    from core.psf import SIGMA_TO_FWHM, GaussianPsf

    config = preset("sharper_template", size=512, seed=seed)
    config = config.model_copy(
        update={
            "science_psf": config.science_psf.model_copy(update={"fwhm": 2.0, "ellipticity": 0}),
            "template_psf": config.template_psf.model_copy(update={"fwhm": 1.6}),
        }
    )
    pair = simulate_pair(config)
    rng = np.random.default_rng(seed)
    level = 30000.0
    x, y = np.array([128, 384, 128, 384]), np.array([128, 128, 384, 384])
    light = None
    for exposure, fwhm, gain in ((pair.science, 2.0, 1.0), (pair.template, 1.6, 4.0)):
        stamp = GaussianPsf(fwhm / SIGMA_TO_FWHM, size=61).kernel_image()
        if light is None:  # science peaks 5-20x the level
            light = level * np.array([5.0, 8.0, 12.0, 20.0]) / stamp.max()
        for xs, ys, flux in zip(x, y, light, strict=True):
            star = flux * stamp
            noisy = star + rng.normal(size=star.shape) * np.sqrt(star / gain)
            box = np.s_[ys - 30 : ys + 31, xs - 30 : xs + 31]
            exposure.image[box] += noisy.astype(np.float32)
            exposure.variance[box] += (star / gain).astype(np.float32)
    science = pair.science
    image = science.image
    clipped = image >= level
    for column in np.unique(np.nonzero(clipped)[1]):
        rows = np.flatnonzero(clipped[:, column])
        spill = int(np.ceil(np.sum(image[rows, column] - level) / level / 2.0))
        clipped[max(rows.min() - spill, 0) : rows.max() + spill + 1, column] = True
    image[clipped] = level
    science.set_plane("SAT", clipped)
    science.metadata["SATURATE"] = level
    transients = transient_truth(pair)[:2]
    return science, pair.template, x.astype(float), y.astype(float), light, transients


def test_saturated_stars_residuals_are_flagged_as_far_as_their_light_reaches():
    """Four stars 5-20x over the science's saturation level (the template unclipped, FWHM
    2 px): their residuals beyond the clipped cores, which the kernel matched on fainter
    stars leaves (0.1-0.3% of their light out to its half-width, 6-9 px here), made 7
    false detections of S/N 5-17 outside the 3-FWHM bright-star disc, unflagged; each
    saturated star's light (fitted on the matched template's unsaturated pixels) now
    bounds them. A transient 15 px from each, brighter than any such residual, stays
    unflagged; forced photometry at the catalog's positions flags the same rows."""
    from core.position_flags import KERNEL_REACH

    science, template, x, y, light, (tx, ty) = _saturated_stars_pair(0)
    rng = np.random.default_rng(1)
    for xs, ys in zip(x, y, strict=True):
        _plant(science, xs + 15.3, ys + 0.2, 2.0e4, rng)
    result = run_subtraction(science, template)
    assert result.metrics["quality"]["verdict"] == "good"
    assert 5 <= result.kernel_sources.meta[KERNEL_REACH] <= result.psf_matching_kernel.half
    catalog = result.dia_sources
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    to_star = cKDTree(np.column_stack([x, y])).query(cxy)[0]
    planted = cKDTree(np.column_stack([x + 15.3, y + 0.2])).query(cxy)[0] < 1.0
    others = cKDTree(np.column_stack([tx, ty])).query(cxy)[0] < 2.0
    residual = (to_star < 25.0) & ~planted & ~others
    assert residual.sum() >= 10
    assert np.all(np.asarray(catalog["flags"])[residual] != 0)
    assert planted.sum() == 4
    assert not np.any(np.asarray(catalog["flags"])[planted])
    single = ~np.asarray(catalog["is_dipole"])
    forced = forced_photometry(
        result.output,
        x=catalog["x"][single],
        y=catalog["y"][single],
        matched_template=result.matched_template,
        kernel_sources=result.kernel_sources,
    )
    np.testing.assert_array_equal(
        forced["flag_bright_star"][planted[single]], catalog["flag_bright_star"][single & planted]
    )


def test_a_clipped_stars_light_is_fitted_on_its_wings():
    """A Moffat star clipped at a 20th of its peak (SAT), beside an unclipped one: its
    light from the unsaturated pixels around the clipped core within 3% of true, where
    the clipped peak implies a 20th of it."""
    from core.position_flags import saturated_stars
    from core.psf import MoffatPsf

    rng = np.random.default_rng(3)
    shape = (160, 160)
    psf = MoffatPsf(3.0, 2.5, size=61)
    exposure = Exposure.from_arrays(
        rng.normal(100.0, 5.0, shape), np.full(shape, 25.0), psf=MoffatPsf(3.0, 2.5, size=31)
    )
    light = 2.0e6
    stamp = psf.kernel_image()
    level = light * stamp.max() / 20.0
    exposure.image[50:111, 20:81] += (light * stamp).astype(np.float32)
    exposure.image[50:111, 80:141] += (light * stamp).astype(np.float32)
    clipped = np.zeros(shape, dtype=bool)
    clipped[:, :80] = exposure.image[:, :80] >= level
    exposure.image[clipped] = level
    exposure.set_plane("SAT", clipped)
    rows, cols, fitted = saturated_stars(exposure, exposure, np.array([62]), np.array([80]), 20)
    assert (rows.tolist(), cols.tolist()) == ([80], [50])
    assert fitted[0] == pytest.approx(light, rel=0.03)
    assert level / stamp.max() == pytest.approx(light / 20.0)


def test_the_peak_of_a_tilted_gaussian_is_found_from_its_central_pixels():
    """`_peak_offsets`: the vertex of the quadratic through the logarithms of the
    central 3 x 3 is a Gaussian's peak exactly, elliptical and tilted; a stamp with a
    pixel at or below 0 there, or a peak farther than a pixel, has none."""
    from core.diasources import _peak_offsets

    yy, xx = np.mgrid[-7:8, -7:8].astype(float)
    truth = [(0.37, -0.21), (-0.48, 0.45), (0.0, 0.0), (0.9, -0.8)]
    angle = np.radians(30.0)
    c, s = np.cos(angle), np.sin(angle)
    stamps = []
    for dx, dy in truth:
        u, v = c * (xx - dx) + s * (yy - dy), -s * (xx - dx) + c * (yy - dy)
        stamps.append(np.exp(-0.5 * ((u / 2.5) ** 2 + (v / 1.6) ** 2)))
    stamps.append(np.where(xx == 1, 0.0, stamps[0]))  # a zeroed (unusable) neighbour
    stamps.append(np.exp(-0.5 * ((xx - 2.5) ** 2 + yy**2) / 4.0))  # peak 2.5 px off
    dx, dy, ok = _peak_offsets(np.array(stamps))
    assert ok.tolist() == [True] * 4 + [False, False]
    np.testing.assert_allclose(np.column_stack([dx, dy])[:4], truth, atol=1e-9)


def test_score_positions_are_its_peaks():
    """On a score (the difference already filtered by the PSF) a source sits at its
    profile's peak: point sources of S/N 25 on white noise, filtered by a Gaussian PSF of
    FWHM 4.7 px, are placed closer to the truth than by the Gaussian-weighted centroid of
    their profile (the estimator of an unfiltered difference, which the filter widened):
    0.165 px rms against 0.191 (the bound for this S/N and PSF: sqrt(2) sigma / S/N = 0.113
    px per axis, 0.16 in radius; 0.86-0.92 of the centroid's on nine seeds)."""
    from scipy import signal

    from core.measure import _centroids
    from core.psf import GaussianPsf
    from core.stamps import stamps

    rng = np.random.default_rng(11)
    psf = GaussianPsf(2.0)
    kernel = psf.kernel_image(0.0, 0.0)
    size, sigma, snr = 480, 10.0, 25.0
    flux = snr * sigma * np.sqrt(1.0 / (kernel**2).sum())  # PSF-fit S/N on white noise
    grid = np.arange(30.0, size - 30.0, 30.0)
    x = (grid[None, :] + rng.uniform(-0.5, 0.5, (grid.size, grid.size))).ravel()
    y = (grid[:, None] + rng.uniform(-0.5, 0.5, (grid.size, grid.size))).ravel()
    image = rng.normal(0.0, sigma, (size, size))
    for xs, ys in zip(x, y, strict=True):
        add_point_source(image, psf, xs, ys, flux)
    score = signal.fftconvolve(image, kernel[::-1, ::-1], mode="same")
    variance = np.full(score.shape, sigma**2 * (kernel**2).sum())
    exposure = Exposure.from_arrays(score, variance, psf=psf)
    catalog = dia_sources(exposure, is_score=True)
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    distance, index = cKDTree(cxy).query(np.column_stack([x, y]))
    assert (distance < 1.0).all()
    # the weighted centroid of the same profiles, about the same peak pixels
    ix = np.floor(cxy[index, 0] + 0.5).astype(int)
    iy = np.floor(cxy[index, 1] + 0.5).astype(int)
    cx, cy = _centroids(stamps(score, ix, iy, 8), 2.0)
    centroid = np.hypot(ix + cx - x, iy + cy - y)
    rms, rms_centroid = np.sqrt(np.mean(distance**2)), np.sqrt(np.mean(centroid**2))
    assert rms < 0.95 * rms_centroid, (rms, rms_centroid)
