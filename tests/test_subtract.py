"""Acceptance of the AL subtraction on simulated pairs (issue 3) and task behaviour."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from core.config import SubtractionConfig
from core.errors import (
    IncompatibleInputsError,
    InsufficientSourcesError,
    TemplateCoverageError,
)
from core.evaluate import measure_quality, sky_mask
from core.photometry import psf_flux
from core.subtract import AlardLuptonSubtractTask, run_subtraction
from tests.conftest import add_point_source, bright_transient_pair, simulated_pair

# seeds differ from the simulator's own tests
SCENARIOS = {
    "sharper_template": ("sharper_template", 1024, 101, "convolveTemplate"),
    "sharper_science": ("sharper_science", 1024, 102, "convolveScience"),
    "equal": ("equal", 512, 103, "convolveTemplate"),
    "varying": ("varying", 1024, 104, None),
    "defects": ("defects", 1024, 105, None),
}


@lru_cache(maxsize=8)
def subtracted(scenario: str, mode: str = "auto"):
    name, size, seed, _ = SCENARIOS[scenario]
    pair = simulated_pair(name, size, seed)
    return pair, run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_difference_noise_matches_variance(scenario):
    pair, result = subtracted(scenario)
    quality = measure_quality(result, pair)
    assert 0.95 <= quality["noise_ratio"] <= 1.05, quality
    assert abs(quality["noise_mean"]) <= 0.05, quality


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_transient_fluxes_recovered(scenario):
    pair, result = subtracted(scenario)
    quality = measure_quality(result, pair)
    assert quality["n_transients"] >= 5
    assert abs(quality["transient_flux_ratio"] - 1.0) <= 0.02, quality
    # scatter of (measured - true) / error is what the variance plane predicts
    assert 0.7 <= quality["transient_pull_std"] <= 1.4, quality


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_constant_stars_vanish(scenario):
    pair, result = subtracted(scenario)
    quality = measure_quality(result, pair)
    assert quality["star_chi2_median"] < 1.3, quality


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kernel_sum_is_the_flux_ratio(scenario):
    pair, result = subtracted(scenario)
    ratio = pair.truth["flux_ratio"]  # science counts per template count
    expected = ratio if result.mode == "convolveTemplate" else 1.0 / ratio
    # the 512 px pair's 24 stamps fix the sum to 0.6% (formal error of the spatial fit):
    # 1.0064 as fitted before the reference noise was removed from the fit, 1.0122 after
    tolerance = 0.01 if SCENARIOS[scenario][1] >= 1024 else 0.02
    assert result.metrics["kernel_sum"] == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_auto_chooses_direction(scenario):
    expected = SCENARIOS[scenario][3]
    _, result = subtracted(scenario)
    if expected is not None:
        assert result.mode == expected


def test_difference_carries_science_calibration_and_matched_psf():
    pair = simulated_pair("sharper_science", 512, 111)
    raw = run_subtraction(pair.science, pair.template, SubtractionConfig(do_decorrelation=False))
    assert raw.mode == "convolveScience"
    assert raw.difference.photo_calib == pair.science.photo_calib
    assert raw.difference.wcs is not None
    # convolveScience: the science PSF seen through K, which matches the template PSF
    assert raw.difference.psf.fwhm() == pytest.approx(pair.template.psf.fwhm(), rel=0.05)
    pair = simulated_pair("sharper_template", 512, 111)
    raw = run_subtraction(pair.science, pair.template, SubtractionConfig(do_decorrelation=False))
    assert raw.difference.psf.fwhm() == pytest.approx(pair.science.psf.fwhm(), rel=0.01)
    # decorrelation sharpens the PSF (it undoes the matched template's smoothing of noise)
    white = run_subtraction(pair.science, pair.template)
    assert white.difference.psf.fwhm() < raw.difference.psf.fwhm()
    assert white.difference.psf.fwhm() > 0.8 * raw.difference.psf.fwhm()
    # the difference's variance is propagated, not the science's own (a gain model)
    for result in (raw, white):
        assert result.difference.variance_source.startswith("propagated")
        assert result.difference.variance_source != pair.science.variance_source


def test_defects_masked_and_finite():
    pair, result = subtracted("defects")
    difference = result.difference
    bad = difference.masked(["NO_DATA"])
    assert np.all(np.isfinite(difference.image[~bad]))
    assert np.all(np.isfinite(difference.variance[~bad]))
    # saturated science pixels stay flagged; template saturation arrives as SAT_TEMPLATE
    assert np.all(difference.masked(["SAT"])[pair.science.masked(["SAT"])])
    if pair.template.masked(["SAT"]).any():
        assert difference.masked(["SAT_TEMPLATE"]).any()
    # the bad columns of both images are flagged in the difference
    assert np.all(difference.masked(["BAD"])[pair.science.masked(["BAD"])])
    assert np.all(difference.masked(["BAD"])[pair.template.masked(["BAD"])])


def test_directions_agree_on_equal_psfs():
    pair, forward = subtracted("equal", "convolveTemplate")
    _, backward = subtracted("equal", "convolveScience")
    fwhm = pair.science.psf.fwhm()
    sigma = float(np.sqrt(np.median(pair.science.variance)))
    empty = sky_mask(pair.truth, pair.science.shape, fwhm, sigma)
    empty[:40] = empty[-40:] = False
    empty[:, :40] = empty[:, -40:] = False
    a, b = forward.difference, backward.difference
    delta = (a.image - b.image)[empty]
    scale = np.sqrt(a.variance[empty] + b.variance[empty])
    # they share the science noise, so they differ less than independent images would
    assert np.std(delta / scale) < 0.9
    assert abs(np.median(delta / scale)) < 0.05
    # and transients measure the same in both, within their errors
    agree = []
    for x, y in zip(pair.truth["transients"]["x"], pair.truth["transients"]["y"], strict=True):
        fa, ea = psf_flux(a, x, y)
        fb, eb = psf_flux(b, x, y)
        if np.isfinite(fa) and np.isfinite(fb):
            agree.append(abs(fa - fb) < 3 * np.hypot(ea, eb))
    assert len(agree) >= 10 and np.mean(agree) >= 0.9


def test_inputs_not_mutated():
    pair = simulated_pair("equal", 256, 107)
    before = [
        x.copy() for e in (pair.science, pair.template) for x in (e.image, e.variance, e.mask)
    ]
    planes = (pair.science.mask_planes.as_dict(), pair.template.mask_planes.as_dict())
    run_subtraction(pair.science, pair.template)
    after = [x for e in (pair.science, pair.template) for x in (e.image, e.variance, e.mask)]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert planes == (pair.science.mask_planes.as_dict(), pair.template.mask_planes.as_dict())


@pytest.mark.parametrize("case", ["auto", "preconvolve", "warped"])
def test_consumed_inputs_give_the_same_subtraction(case):
    # the CLI and the worker hand their inputs over: worked on in place, not copied
    if case == "warped":  # a template on another grid: the task works on its warp
        from tests.test_register import _rotated_pair

        pair = _rotated_pair()
    else:
        pair = simulated_pair("equal", 256, 107)
    config = SubtractionConfig(mode="preconvolve" if case == "preconvolve" else "auto")
    copies = pair.science.copy(), pair.template.copy()
    kept = run_subtraction(pair.science, pair.template, config)
    handed = run_subtraction(*copies, config, consume_inputs=True)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(handed.output, plane), getattr(kept.output, plane))
    center = pair.science.bbox_center()
    np.testing.assert_array_equal(
        handed.psf_matching_kernel.image(*center), kept.psf_matching_kernel.image(*center)
    )
    # the science handed over was worked on: its variance plane was scaled in place (the
    # template too, unless it was warped: then the warp was)
    assert not np.array_equal(copies[0].variance, pair.science.variance)
    template_same = np.array_equal(copies[1].variance, pair.template.variance)
    assert template_same == (case == "warped")


def test_metadata_and_metrics():
    pair, result = subtracted("sharper_template")
    meta = result.metadata
    for key in (
        "templateCoveragePercent",
        "scaleScienceVarianceFactor",
        "sciencePsfSize",
        "templatePsfSize",
        "nPsfSources",
        "convolvedExposure",
        "differenceFootprintRatioMean",
    ):
        assert f"alardLuptonSubtract.{key}" in meta
    assert "alardLuptonSubtract:makeKernel.ALKernelSize" in meta
    assert meta["alardLuptonSubtract.templateCoveragePercent"] == pytest.approx(100.0)
    metrics = result.metrics
    assert metrics["n_kernel_sources"] >= 3
    for stage in ("prepare", "select", "fit", "convolve", "metrics"):
        assert metrics["timings"][stage] > 0


def test_update_masks_clears_and_renames():
    pair = simulated_pair("defects", 256, 108)
    task = AlardLuptonSubtractTask()
    science, template = pair.science.copy(), pair.template.copy()
    science.set_plane("DETECTED", np.ones(science.shape, bool))
    template.set_plane("CR", np.ones(template.shape, bool))
    sat = template.masked(["SAT"]).copy()
    task.update_masks(template, science)
    assert not science.masked(["DETECTED"]).any()
    assert not template.masked(["CR", "SAT"]).any()
    np.testing.assert_array_equal(template.masked(["SAT_TEMPLATE"]), sat)
    assert template.masked(["BAD"]).any()  # preserved


def test_template_not_covering_science_is_refused_without_registration():
    pair = simulated_pair("equal", 256, 109)
    small = pair.template.cutout((10, 10, 200, 200))
    with pytest.raises(IncompatibleInputsError, match="does not contain.*registration"):
        run_subtraction(pair.science, small, SubtractionConfig(registration={"mode": "none"}))


def test_band_mismatch_is_refused():
    pair = simulated_pair("equal", 256, 109)
    template = pair.template.copy()
    template.band = "z"
    with pytest.raises(IncompatibleInputsError, match="different bands"):
        run_subtraction(pair.science, template)


def test_wcs_mismatch_is_refused():
    pair = simulated_pair("equal", 256, 109)
    template = pair.template.copy()
    template.wcs = pair.template.wcs.deepcopy()
    template.wcs.wcs.crpix = template.wcs.wcs.crpix + [2.0, 0.0]
    with pytest.raises(IncompatibleInputsError, match="WCS.*Turn registration on"):
        run_subtraction(pair.science, template, SubtractionConfig(registration={"mode": "none"}))


def test_low_template_coverage_is_a_typed_error():
    pair = simulated_pair("equal", 256, 109)
    template = pair.template.copy()
    template.set_plane("NO_DATA", np.ones(template.shape, bool))
    template.mask[:, :20] &= ~template.mask_planes.value("NO_DATA")
    with pytest.raises(TemplateCoverageError, match="Insufficient Template Coverage"):
        run_subtraction(pair.science, template)


def test_too_few_sources_is_a_typed_error():
    from astropy.table import Table

    pair = simulated_pair("equal", 256, 109)
    catalog = Table({"x": [128.0], "y": [128.0]})
    with pytest.raises((InsufficientSourcesError, TemplateCoverageError), match="required"):
        run_subtraction(pair.science, pair.template, sources=catalog)


def test_a_psf_that_is_no_point_source_names_the_input():
    """A decorrelation kernel given as the template's PSF (a delta with a negative ring:
    no FWHM anywhere) is refused naming the input and what a PSF must be."""
    from core.errors import PsfError
    from core.psf import ImagePsf

    pair = simulated_pair("equal", 256, 109)
    yy, xx = np.mgrid[-10:11, -10:11]
    ring = np.exp(-(xx**2 + yy**2) / 8.0)
    kernel = -ring / ring.sum()
    kernel[10, 10] += 2.0
    template = pair.template.copy()
    template.psf = ImagePsf(kernel)
    with pytest.raises(PsfError, match="the template PSF given is no point-source profile"):
        run_subtraction(pair.science, template)


def _blas_threads() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_progress_reports_stages(mode):
    from threadpoolctl import threadpool_limits

    pair = simulated_pair("equal", 512, 110)
    stages = []
    blas = []

    def progress(stage, fraction):
        stages.append((stage, fraction))
        blas.append((stage, _blas_threads()))

    # two BLAS threads outside: the run works with one (core threads its own work;
    # OpenBLAS's idle threads busy-wait) and gives the caller's setting back
    with threadpool_limits(limits=2, user_api="blas"):
        run_subtraction(
            pair.science, pair.template, SubtractionConfig(mode=mode), progress=progress
        )
        assert _blas_threads() <= {2}
    names = [s for s, _ in stages]
    assert names[:2] == ["register", "prepare"] and names[-1] == "done"
    assert {"fit", "convolve", "decorrelate", "metrics"} <= set(names)
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions)
    assert all(threads <= {1} for stage, threads in blas if stage != "done"), blas


def test_user_catalog_drives_kernel_sources():
    from astropy.table import Table

    pair = simulated_pair("sharper_template", 512, 112)
    stars = pair.truth["stars"]
    catalog = Table({"x": stars["x"], "y": stars["y"]})  # positions only, no fluxes
    result = run_subtraction(pair.science, pair.template, sources=catalog)
    used = result.kernel_sources
    assert len(used) >= 3
    # every kernel source is one of the catalog's stars, none of the transients
    distance = np.hypot(
        np.asarray(used["x"])[:, None] - np.asarray(stars["x"])[None],
        np.asarray(used["y"])[:, None] - np.asarray(stars["y"])[None],
    )
    assert np.all(distance.min(axis=1) < 0.5)
    quality = measure_quality(result, pair)
    assert 0.95 <= quality["noise_ratio"] <= 1.05
    assert abs(quality["transient_flux_ratio"] - 1) <= 0.03


@pytest.mark.parametrize("name", ["sharper_template", "sharper_science"])
def test_plain_images_give_unbiased_transient_fluxes(name):
    """Images without PSF or variance-derived PSF (a user's plain FITS): the PSF is
    estimated, and PSF photometry on the difference with it recovers injected transients
    within 3% with honest errors. (The estimate once carried a wing pedestal that biased
    these fluxes 8-12% high with pulls of 1.6-2.1.)"""
    from core.exposure import Exposure

    pair = simulated_pair(name, 1024, 1)

    def plain(exposure: Exposure) -> Exposure:
        return Exposure(
            exposure.image, exposure.variance, exposure.mask.copy(), metadata=exposure.metadata
        )

    result = run_subtraction(plain(pair.science), plain(pair.template))
    quality = measure_quality(result, pair)
    assert quality["n_transients"] >= 40
    assert quality["transient_flux_ratio"] == pytest.approx(1.0, abs=0.03), quality
    assert 0.8 <= quality["transient_pull_std"] <= 1.25, quality


def test_one_thread_cap_prepares_on_the_calling_thread_with_the_same_pixels(monkeypatch):
    """A service worker beside another runs its job under a one-thread cap: science and
    template are then prepared one after the other (two threads would only contend for
    the GIL and the other worker's core), with the same result bit for bit."""
    import threading

    from core.parallel import set_thread_limit

    pair = simulated_pair("sharper_template", 512, 111)
    free = run_subtraction(pair.science, pair.template, SubtractionConfig())
    started: list[str] = []
    start = threading.Thread.start

    def counted(self):
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counted)
    try:
        set_thread_limit(1)
        capped = run_subtraction(pair.science, pair.template, SubtractionConfig())
    finally:
        set_thread_limit(None)
    assert started == []
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(
            getattr(capped.difference, plane), getattr(free.difference, plane)
        )
    assert len(capped.dia_sources) == len(free.dia_sources)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_a_template_pedestal_subtracts_as_without_it(offset):
    """A template 1e4 or 1e5 above its sky, as plain files carry it (no calibration):
    kernel sum 0.09 and 0.01 for 0.99 before, a noise ratio of 1.1 and 152 DIA sources
    for 19; now the kernel, the noise and the catalog of the pair without it."""
    pair = simulated_pair("sharper_template", 512, 4)
    science, template = pair.science.copy(), pair.template.copy()
    science.photo_calib = template.photo_calib = None
    plain = run_subtraction(science.copy(), template.copy())
    template.image = template.image.astype(np.float64) + offset
    raised = run_subtraction(science, template)
    assert raised.metrics["kernel_sum"] == pytest.approx(plain.metrics["kernel_sum"], rel=1e-4)
    assert raised.metrics["noise_ratio"] == pytest.approx(plain.metrics["noise_ratio"], abs=0.005)
    assert abs(len(raised.dia_sources) - len(plain.dia_sources)) <= 1


def test_kernel_sources_are_stars_the_template_holds():
    """A sparse field of 5 stars among 20 transients: the transients, new in the science,
    are not in the template and are no stars to match on. They were kept whenever fewer
    than 3 sources were in the template, and the kernel (sum -0.77, a 'bad' verdict and
    a junk catalog) was fitted on them; now the subtraction is refused saying so. In a
    normal field no kernel source sits on a transient."""
    from core.simulate import preset, simulate_pair

    sparse = simulate_pair(
        preset("sharper_template", size=512, seed=4).model_copy(update={"n_stars": 5})
    )
    with pytest.raises(InsufficientSourcesError, match="not in the template"):
        run_subtraction(sparse.science, sparse.template)
    pair = simulated_pair("varying", 512, 7)
    result = run_subtraction(pair.science, pair.template)
    sources = result.kernel_sources
    transients = pair.truth["transients"]
    gap = np.hypot(
        np.asarray(sources["x"])[:, None] - np.asarray(transients["x"])[None, :],
        np.asarray(sources["y"])[:, None] - np.asarray(transients["y"])[None, :],
    )
    assert len(sources) >= 10 and gap.min() > 3.0


def test_a_psf_stamp_drawn_wider_than_the_frame_leaves_its_stars_to_match_on():
    """A Moffat science PSF (beta 2, FWHM 4 px) is drawn 151 px wide, on a 256 px frame:
    the variability test's whole-stamp fluxes were NaN for every star whose stamp left
    the frame, 5 of 6 though each had 98-99.9% of its light on it, and the subtraction
    was refused saying they were not in the template. Where the light lies decides
    now: the pair subtracts, its noise as predicted, the transients at their flux."""
    from core.forced import forced_photometry

    pair = _moffat_science_with_few_stars(3, keep_psf=True, beta=2.0, transient_flux=(2e4, 4e4))
    assert pair.science.psf.kernel_image().shape == (151, 151)
    result = run_subtraction(pair.science, pair.template)
    assert result.metrics["n_kernel_sources"] >= 3
    assert measure_quality(result, pair)["noise_ratio"] == pytest.approx(1.0, abs=0.05)
    transients = pair.truth["transients"]
    fluxes = forced_photometry(result.difference, x=transients["x"], y=transients["y"])
    ratio = np.asarray(fluxes["psf_flux"]) / np.asarray(transients["flux_science"])
    assert np.all(np.abs(ratio - 1.0) < 0.05), ratio


def test_a_refusal_names_the_image_a_flux_could_not_be_measured_in():
    """Kernel sources the variability test drops: a flux NaN in the science (its PSF's
    light off the frame) is not a star missing from the template, as the refusal said
    of every one."""
    from core.subtract import _unmatched

    f_s = np.array([np.nan, 1.0, 1.0, 1.0, 2.0])
    f_t = np.array([1.0, np.nan, 0.1, 1.0, 1.0])
    detected = np.array([False, False, False, True, True])
    keep = np.array([False, False, False, True, False])
    words = _unmatched(f_s, f_t, detected, keep)
    assert "1 have no flux measurable in the science" in words
    assert "1 have none measurable in the template" in words
    assert "1 are not in the template at S/N 5" in words
    assert words.endswith("1 changed flux between the two")
    # the shift tests' drops are named beside them, not counted as changed fluxes
    from core.subtract import _moved_words

    counts = {"nMovedSourcesRejected": 2, "nChangedNeighbourStampsRejected": 1}
    assert _moved_words(np.zeros(5, dtype=bool), counts) == ""
    moved_words = _moved_words(np.array([True, True, True, False, False]), counts)
    assert moved_words == (
        ", 2 moved between the two, 1 held a brighter star in their stamp that changed"
    )


def _star_field():
    """A 512 px pair of 300 stars (fluxes 500-1e5, science FWHM 4, template 3), made anew
    (the tests change its images)."""
    from core.simulate import SimulationConfig, simulate_pair

    return simulate_pair(
        SimulationConfig(
            size=512,
            seed=0,
            n_stars=300,
            star_flux_min=500.0,
            star_flux_max=1e5,
            science_psf={"fwhm": 4.0},
            template_psf={"fwhm": 3.0},
        )
    )


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
@pytest.mark.parametrize("change", [0.15, -0.15])
def test_a_bright_star_that_varied_is_no_kernel_source(mode, change):
    """The brightest star changed by 15% between template and science (a variable).
    The variability test's scale was the ratios' raw spread, mostly the faint stars'
    errors (5x it: 22%), so the star stayed the heaviest kernel source: kernel sum
    1.074 (+15%) / 0.949 (-15%) for 1.0, unchanged bright stars at -5.8 / +5.3 sigma,
    the change measured 24% / 43% short, a 'good' verdict. Now its ratio (1.167) is
    judged on its own error (0.007): it is left out of the fit and is a DIA source of
    its change."""
    pair = _star_field()
    stars = pair.truth["stars"]
    flux, x, y = (np.asarray(stars[k]) for k in ("flux_science", "x", "y"))
    inside = (x > 40) & (x < 472) & (y > 40) & (y < 472)
    varied, *others = np.argsort(-np.where(inside, flux, -1.0))[:6]
    science = pair.science
    add_point_source(
        science.image, science.psf, x[varied], y[varied], np.float32(change * flux[varied])
    )
    result = run_subtraction(science, pair.template, SubtractionConfig(mode=mode))

    used = result.kernel_sources
    assert np.hypot(used["x"] - x[varied], used["y"] - y[varied]).min() > 2.0
    assert result.metrics["kernel_sum"] == pytest.approx(pair.truth["flux_ratio"], rel=0.01)
    out = result.output
    if result.score is None:
        snr = [np.divide(*psf_flux(out, x[k], y[k])) for k in others]
    else:  # the score is a matched filter: its S/N at the star's pixel
        ix, iy = np.floor(x[others] + 0.5).astype(int), np.floor(y[others] + 0.5).astype(int)
        snr = out.image[iy, ix] / np.sqrt(out.variance[iy, ix])
    assert np.all(np.abs(snr) < 5.0), snr
    catalog = result.dia_sources
    k = int(np.argmin(np.hypot(catalog["x"] - x[varied], catalog["y"] - y[varied])))
    assert np.hypot(catalog["x"][k] - x[varied], catalog["y"][k] - y[varied]) < 1.0
    # the change, to the star's own residual on the unchanged pair (1-2% of its flux)
    assert abs(catalog["psf_flux"][k] - change * flux[varied]) < 0.03 * flux[varied]
    assert result.metrics["quality"]["verdict"] == "good"


def test_a_moved_bright_star_beside_a_kernel_star_leaves_the_kernel_alone():
    """A star too bright to be a kernel source (S/N > 500), 0.5 px further along x in the
    science, 13 px from a kernel source of 1/46 its flux: inside that source's stamp it
    outweighed the source, and the kernel learnt its shift: kernel sum 0.948 for 1.015
    on the pair without it, spatial order 0 -> 1, no dipole, a 'good' verdict. Its shift
    against the kernel sources' (`core.stamp_neighbours`) leaves that stamp out."""
    pair = _star_field()
    clean = run_subtraction(pair.science.copy(), pair.template.copy())
    stars = pair.truth["stars"]
    sx, sy = np.asarray(stars["x"]), np.asarray(stars["y"])
    hosts = clean.kernel_sources
    # the first kernel source with no star near the spot 13 px along x from it
    for host in hosts:
        px, py = host["x"] + 13.0, host["y"] + 0.3
        if np.hypot(sx - px, sy - py).min() > 8 and 40 < px < 472 and 40 < py < 472:
            break
    science, template = pair.science.copy(), pair.template.copy()
    ratio = pair.truth["flux_ratio"]
    for exposure, dx, flux in ((science, 0.5, 4e5), (template, 0.0, 4e5 / ratio)):
        add_point_source(exposure.image, exposure.require_psf(), px + dx, py, np.float32(flux))
        add_point_source(
            exposure.variance, exposure.require_psf(), px + dx, py, np.float32(flux / 4.0)
        )
    result = run_subtraction(science, template)
    assert result.metadata["alardLuptonSubtract.nChangedNeighbourStampsRejected"] >= 1
    used = result.kernel_sources
    assert np.hypot(used["x"] - host["x"], used["y"] - host["y"]).min() > 2.0
    assert result.metrics["kernel_sum"] == pytest.approx(clean.metrics["kernel_sum"], abs=0.005)
    catalog = result.dia_sources
    k = int(np.argmin(np.hypot(catalog["x"] - px - 0.25, catalog["y"] - py)))
    assert catalog["is_dipole"][k]
    assert abs(catalog["dipole_separation"][k] - 0.5) < 0.2


def test_faded_bright_stars_beside_kernel_stars_are_judged_as_neighbours():
    """Stars in the template only (faded: transients of the template's epoch) beside
    kernel sources: the neighbour test read the science catalog, which lacks them, so
    they went into the kernel stamps unseen. 30 faded transients of 2e5-1e6 counts on a
    1024 px pair left 6 constant stars as DIA sources (3 unflagged) and no stamp was
    left out. The template's peaks the catalog lacks (`template_only_peaks`) are now
    judged as its neighbours are: no constant star is a DIA source. On a 512 px field
    with every star known, a faded star of 4e5 counts 13 px from a kernel source is the
    only such peak, in that source's box."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from bench.diasources import transient_truth
    from core.stamp_neighbours import template_only_peaks

    pair = bright_transient_pair(0, 30)
    result = run_subtraction(pair.science, pair.template)
    assert result.metadata["alardLuptonSubtract.nChangedNeighbourStampsRejected"] >= 1
    catalog = result.dia_sources
    where = np.column_stack([catalog["x"], catalog["y"]])
    fwhm = catalog.meta["psf_fwhm"]
    stars = pair.truth["stars"]
    at_star = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(where)[0] < 2 * fwhm
    fx, fy, _ = transient_truth(pair)
    beside = cKDTree(np.column_stack([fx, fy])).query(where)[0] < 5 * fwhm
    assert not (at_star & ~beside).any()

    field = _star_field()
    hosts = run_subtraction(field.science.copy(), field.template.copy()).kernel_sources
    sx, sy = np.asarray(field.truth["stars"]["x"]), np.asarray(field.truth["stars"]["y"])
    for k, host in enumerate(hosts):  # noqa: B007 - the host found is used below
        px, py = host["x"] + 13.0, host["y"] + 0.3
        if np.hypot(sx - px, sy - py).min() > 8 and 40 < px < 472 and 40 < py < 472:
            break
    template = field.template.copy()
    add_point_source(template.image, template.require_psf(), px, py, np.float32(4e5))
    add_point_source(template.variance, template.require_psf(), px, py, np.float32(1e5))
    known = Table({"x": sx, "y": sy})
    tx, ty, held = template_only_peaks(hosts, known, template, 4.0)
    assert tx.size == 1 and np.hypot(tx[0] - px, ty[0] - py) < 1.0 and k in held[0]
    assert template_only_peaks(hosts, known, field.template, 4.0)[0].size == 0


def test_a_selection_too_small_to_test_reports_no_rejection_counts():
    """`_reject_variable_sources` clears its counts first: a later selection too small to
    test (a fit made again, `_fitted`, with ``sources.min_kernel_sources`` below 3)
    reports none (the keys absent: not tested), not the previous selection's."""
    from core.subtract import _REJECTION_COUNTS

    pair = _star_field()
    task = AlardLuptonSubtractTask(SubtractionConfig())
    task.science_fwhm, task.template_fwhm = 4.0, 3.0  # the pair's, as preparation sets them
    sources = run_subtraction(pair.science.copy(), pair.template.copy()).kernel_sources
    kept = task._reject_variable_sources(sources, pair.science, pair.template, sources)
    assert len(kept) >= 3
    assert set(_REJECTION_COUNTS) <= set(task.metadata)
    few = sources[:2]
    assert len(task._reject_variable_sources(few, pair.science, pair.template, sources)) == 2
    assert not set(_REJECTION_COUNTS) & set(task.metadata)


def test_bright_neighbours_and_moved_stars():
    """`bright_neighbours`: catalog rows at or above the S/N cap centred in another row's
    stamp box (edges inclusive), with the boxes holding each; `moved`: a shift from the
    ensemble's median beyond 0.05 FWHM, 0.25 px and 5 times its error (the ensemble's
    scatter at the star's S/N), clean stamps only."""
    from astropy.table import Table

    from core.stamp_neighbours import bright_neighbours, holders_of, moved

    selected = Table(
        {
            "x": [100.0, 140.0, 300.0],
            "y": [100.0, 100.0, 300.0],
            "stamp_x0": [79, 119, 279],
            "stamp_y0": [79, 79, 279],
            "stamp_x1": [121, 161, 321],
            "stamp_y1": [121, 161, 321],
        }
    )
    catalog = Table(
        {
            # in both of the first two boxes; on the third's edge; too faint; far away;
            # the third source itself
            "x": [120.4, 321.0, 105.0, 500.0, 300.0],
            "y": [110.0, 300.0, 100.0, 500.0, 300.0],
            "snr": [900.0, 600.0, 400.0, 2000.0, 800.0],
        }
    )
    rows, held = bright_neighbours(selected, catalog, 500.0, "snr")
    assert rows.tolist() == [0, 1]
    assert [h.tolist() for h in held] == [[0, 1], [2]]
    assert holders_of(np.array([False, True]), held, 3).tolist() == [False, False, True]
    # an ensemble whose centroids scatter 2 / (S/N) px per axis about a shift of +0.3 in x
    rng = np.random.default_rng(4)
    snr = np.concatenate([rng.uniform(10.0, 400.0, 40), [1000.0, 10.0, 1000.0, 1000.0]])
    shift_x = 0.3 + rng.normal(0.0, 2.0 / snr)
    shift_y = rng.normal(0.0, 2.0 / snr)
    shift_x[40:] = 0.3 + np.array([0.3, 0.6, 0.15, 0.5])  # bright, faint, bright, bright
    clean = np.ones(snr.size, dtype=bool)
    clean[43] = False
    # FWHM 4: the floor is 0.25 px (0.2 by the FWHM); at S/N 10 the error is ~0.2 px
    flagged = moved(shift_x, shift_y, clean, snr, np.arange(40), 4.0, 5.0)
    assert np.flatnonzero(flagged).tolist() == [40]


def test_a_flux_change_is_judged_on_the_stars_own_error():
    """The variability test on three ensembles of (flux ratio, error). A bright star's
    15% change stands out of its own error (0.7%) whatever the faint stars' (2-12%).
    DECam epoch b's kernel sources: the faint ones sit 8% above the three bright ones
    (a ratio of noisy fluxes), which are no variables (a centre at the median of all
    made two of them so). SAAO 0015's (9 px seeing in a crowded field): the ratios
    scatter 40% for errors of 0.5%, so that scatter is the scale and only the three
    beyond 5 times it are variables (each error alone would make none so)."""
    from core.config import SourcesConfig
    from core.subtract import _changed_flux

    def changed(ratio, sigma):
        ratio, sigma = np.asarray(ratio), np.asarray(sigma)
        detected = np.ones(ratio.size, dtype=bool)
        return np.flatnonzero(_changed_flux(ratio, sigma, detected, SourcesConfig())).tolist()

    rng = np.random.default_rng(3)
    sigma = np.concatenate([[0.007], rng.uniform(0.02, 0.12, 40)])
    ratio = 1.0 + rng.normal(0.0, sigma)
    ratio[0] = 1.15
    assert changed(ratio, sigma) == [0]
    decam_b = (
        [1.057, 1.046, 1.085, 1.136, 1.010, 1.198, 1.233, 1.248, 1.548],
        [0.004, 0.010, 0.010, 0.041, 0.136, 0.164, 0.169, 0.201, 0.321],
    )
    assert changed(*decam_b) == []
    saao_0015 = (
        [1.259, 0.868, 1.403, 1.011, 1.293, 1.266, 1.495, 0.561, 1.253, 1.563, 1.153, 0.987]
        + [1.277, 1.293, 1.311, 1.860, -0.124, 1.105, 1.160, 1.734, 1.365, 0.796, 1.701]
        + [0.771, 2.099, 2.790, 4.198, 6.460],
        [0.004] * 7 + [0.005] * 7 + [0.006] * 8 + [0.008, 0.012, 0.014, 0.015, 0.026, 0.060],
    )
    assert changed(*saao_0015) == [25, 26, 27]


@pytest.mark.parametrize("name, seed", [("sharper_template", 101), ("sharper_science", 102)])
def test_a_sky_ramp_in_the_science_only_leaves_a_good_subtraction(name, seed):
    """A linear sky of +-1500 counts across a 512 px science frame (sky 1000; moonlight,
    twilight), the template flat: the kernel still matches the PSFs. It followed the ramp
    inside the kernel stamps once: kernel shifted 1.3 px (convolveTemplate, suspect) or
    its sum 0.03 for 1 (convolveScience, bad)."""
    pair = simulated_pair(name, 512, seed)
    science = pair.science.copy()
    ny, nx = science.shape
    x = 2.0 * (np.arange(nx) - (nx - 1) / 2.0) / nx
    y = 2.0 * (np.arange(ny) - (ny - 1) / 2.0) / ny
    science.image += (1500.0 * (0.6 * x[None, :] - 0.8 * y[:, None])).astype(np.float32)
    result = run_subtraction(science, pair.template)
    ratio = pair.truth["flux_ratio"]
    expected = ratio if result.mode == "convolveTemplate" else 1.0 / ratio
    assert result.metrics["kernel_sum"] == pytest.approx(expected, rel=0.02)
    quality = measure_quality(result, pair)
    assert 0.9 <= quality["noise_ratio"] <= 1.1, quality
    assert result.metrics["quality"]["verdict"] == "good", result.metrics["quality"]


@lru_cache(maxsize=1)
def _undersampled_pair():
    """Both images undersampled and the science the sharper (FWHM 1.4 and 1.7 px): the
    robustness sweep's pair that 6c18615 subtracted with kernel sum 0.922, 15% of the
    kernel stars' flux left in the difference, star chi^2 2.4, and called good."""
    from core.simulate import SimulationConfig, preset, simulate_pair

    base = preset("sharper_science", 512, seed=1).model_dump()
    base |= {"science_psf": {"fwhm": 1.4}, "template_psf": {"fwhm": 1.7}}
    return simulate_pair(SimulationConfig.model_validate(base))


def test_an_undersampled_sharper_science_subtracts_its_stars():
    """The science (the noisier image) is convolved: its own noise in the fit's normal
    equations pulled the kernel to a broader one of smaller sum (errors in variables).
    With that noise's expected part removed the constant stars vanish."""
    pair = _undersampled_pair()
    result = run_subtraction(pair.science, pair.template)
    assert result.mode == "convolveScience"
    quality = measure_quality(result, pair)
    assert quality["star_chi2_median"] < 1.3, quality  # was 2.38
    assert result.metrics["kernel_sum"] == pytest.approx(1.0, abs=0.05)  # was 0.922
    assert abs(quality["transient_flux_ratio"] - 1.0) <= 0.02, quality
    assert 0.93 <= quality["noise_ratio"] <= 1.07, quality  # was 0.912
    # the kernel stars keep no more of their flux than its error (they kept -15.4%)
    fraction = result.metrics["star_residual_fraction"]
    assert abs(fraction) < 3 * result.metrics["star_residual_fraction_error"] + 0.01
    assert result.metrics["quality"]["verdict"] == "good", result.metrics["quality"]


def test_a_kernel_that_misses_the_stars_flux_is_not_reported_good():
    """The same pair fitted as before (no correction of the convolved image's noise): the
    kernel sum 0.92 is within the calibrations' 10% tolerance, but the kernel stars keep
    15-18% of their flux, which the verdict now names."""
    pair = _undersampled_pair()
    config = SubtractionConfig(kernel={"correct_reference_noise": False})
    result = run_subtraction(pair.science, pair.template, config)
    assert result.metrics["kernel_sum"] == pytest.approx(0.922, abs=0.01)
    quality = result.metrics["quality"]
    assert quality["verdict"] == "suspect"
    reason = next(r for r in quality["reasons"] if "kernel stars keep" in r)
    ksum = result.metrics["kernel_sum"]
    assert "of their flux in the difference" in reason and f"kernel sum {ksum:.3f}" in reason
    assert result.metrics["star_residual_fraction"] < -0.1


def test_arrays_without_a_variance_subtract_on_the_measured_sky_noise():
    # Exposure.from_arrays(image) made a variance of ones, which the variance scaling
    # refused as an implausible factor: a library user's pair came out "bad" (noise 31x)
    from core.exposure import Exposure

    pair = simulated_pair("equal", 512, 103)
    science = Exposure.from_arrays(pair.science.image, wcs=pair.science.wcs)
    template = Exposure.from_arrays(pair.template.image, wcs=pair.template.wcs)
    result = run_subtraction(science, template)
    assert 0.85 <= result.metrics["noise_ratio"] <= 1.2
    warnings = result.metrics["warnings"]
    assert not any("implausible factor" in w for w in warnings)
    assert any("no variance was given" in w for w in warnings)  # suspect: no photon noise
    assert result.metrics["quality"]["verdict"] != "bad"


def test_write_products_refuses_a_name_that_is_no_product(tmp_path):
    # names=["dia_source"] (for "dia_sources") wrote nothing and said nothing
    from core.errors import InvalidConfigError
    from core.products import write_products

    _, result = subtracted("equal")
    with pytest.raises(InvalidConfigError, match="dia_source'.*dia_sources"):
        write_products(result, tmp_path, names=["difference", "dia_source"])
    assert not list(tmp_path.iterdir())
    written = write_products(result, tmp_path, names=["difference", "metrics"])
    assert sorted(written) == ["difference", "metrics"]


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_a_bad_variance_from_arrays_is_a_typed_error_naming_the_input(bad):
    # read_exposure refuses such a file; an exposure built from arrays reached the
    # kernel solver (a bare LinAlgError for NaN, "too few sources" for negative)
    from core.errors import InvalidExposureError
    from core.exposure import Exposure

    pair = simulated_pair("equal", 512, 103)
    variance = pair.science.variance.copy()
    variance[100:110, 200:210] = bad
    science = Exposure.from_arrays(pair.science.image, variance, wcs=pair.science.wcs)
    with pytest.raises(InvalidExposureError, match="science: variance is negative or not"):
        run_subtraction(science, pair.template)
    # on pixels masked BAD the variance is not read: no error there
    mask = np.zeros(science.shape, np.int32)
    mask[100:110, 200:210] = science.mask_planes.value("BAD")
    masked = Exposure.from_arrays(pair.science.image, variance, mask, wcs=pair.science.wcs)
    from core.subtract import check_variance

    check_variance(masked, "science")


def test_run_subtraction_takes_a_config_dict_and_names_a_wrong_input():
    from core.errors import InvalidExposureError

    pair = simulated_pair("equal", 512, 103)
    result = run_subtraction(pair.science, pair.template, {"dia": {"enabled": False}})
    assert result.dia_sources is None
    with pytest.raises(InvalidExposureError, match="science is a str.*read_exposure"):
        run_subtraction("science.fits", pair.template)  # type: ignore[arg-type]


def _moffat_science_with_few_stars(
    n_transients: int,
    keep_psf: bool = False,
    science_fwhm: float = 4.0,
    template_fwhm: float = 2.5,
    beta: float = 3.0,
    transient_flux: tuple[float, float] = (1000.0, 1000.0),
):
    """Science PSF a Moffat (wings a Gaussian lacks) with too few stars to estimate it
    (6 stars; a FWHM keyword instead, unless ``keep_psf`` leaves the true PSF given);
    the template's (Gaussian) given. The sharper of the two is convolved."""
    from core.simulate import SimulationConfig, simulate_pair

    config = SimulationConfig(
        size=256,
        seed=2,
        n_stars=6,
        star_flux_min=1e4,
        star_flux_max=4e4,
        noise="gaussian",
        science_psf={"type": "moffat", "fwhm": science_fwhm, "beta": beta},
        template_psf={"fwhm": template_fwhm},
        n_transients=n_transients,
        transient_flux_min=transient_flux[0],
        transient_flux_max=transient_flux[1],
    )
    pair = simulate_pair(config)
    if not keep_psf:
        pair.science.psf = None
        pair.science.metadata["FWHM"] = science_fwhm
    return pair


def _transient_flux_ratio(keep_psf: bool = False, **fwhms) -> tuple[float, dict]:
    """Median forced PSF flux over true flux of the transients, the same pair without
    them (same noise draw) subtracted, so that the noise leaves the ratio; and the
    metrics."""
    from core.forced import forced_photometry

    with_transients, without = (
        _moffat_science_with_few_stars(n, keep_psf, **fwhms) for n in (25, 0)
    )
    result = run_subtraction(with_transients.science, with_transients.template)
    empty = run_subtraction(without.science, without.template)
    truth = with_transients.truth["transients"]
    x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    measured = forced_photometry(result.difference, x, y)["psf_flux"]
    blank = forced_photometry(empty.difference, x, y)["psf_flux"]
    excess = np.asarray(measured) - np.asarray(blank)
    return float(np.median(excess / np.asarray(truth["flux_science"], float))), result.metrics


def test_a_stand_in_science_psf_gives_way_to_the_kernel_matched_template_psf():
    """Convolving the template, the fitted kernel K makes K * P_T the science PSF on the
    kernel stars: with a Gaussian of the header FWHM standing in for the science's
    Moffat, forced PSF fluxes of the transients read 0.74 of theirs; with K * P_T, 0.978,
    as with the true PSF given (0.980: the rest is light beyond the fitted stamp)."""
    ratio, metrics = _transient_flux_ratio()
    true_ratio, _ = _transient_flux_ratio(keep_psf=True)
    assert metrics["mode"] == "convolveTemplate"
    assert ratio == pytest.approx(true_ratio, abs=0.01)
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert not any("stands in" in w for w in metrics["warnings"])
    assert metrics["science_psf_source"] == "kernel-matched template PSF"
    assert metrics["template_psf_source"] == "given"


def test_a_stand_in_science_psf_gives_way_to_the_template_psf_when_the_science_is_convolved():
    """Convolving the (sharper) science, K * S has the template's PSF on the stars, what
    K was fitted to; seen through K, a Gaussian standing in for the science's Moffat
    made the difference's PSF too narrow-winged: transients' forced fluxes read 0.78 of
    theirs, 1.00 with the true PSF given. P_T takes its place, and the stand-in's
    warning goes."""
    fwhms = {"science_fwhm": 2.5, "template_fwhm": 4.0}
    ratio, metrics = _transient_flux_ratio(**fwhms)
    true_ratio, _ = _transient_flux_ratio(keep_psf=True, **fwhms)
    assert metrics["mode"] == "convolveScience"
    assert ratio == pytest.approx(true_ratio, abs=0.03)
    assert ratio == pytest.approx(1.0, abs=0.03)
    assert not any("stands in" in w for w in metrics["warnings"])
    assert any("the difference's PSF is the template's" in n for n in metrics["notes"])


def test_a_stand_in_science_psf_does_not_make_a_real_profile_look_wrong():
    """End to end: a Moffat (beta 2) science with too few stars for a PSF, its FWHM
    keyword standing in; the kernel-matched template PSF reads its FWHM (the check's
    ratio 1.46 by effective width said "a PSF model is wrong")."""
    pair = _moffat_science_with_few_stars(0, beta=2.0)
    metrics = run_subtraction(pair.science, pair.template).metrics
    assert metrics["mode"] == "convolveTemplate"
    assert metrics["kernel_psf_width_ratio"] == pytest.approx(1.0, abs=0.1)
    assert not any("PSF model" in r for r in metrics["quality"]["reasons"])


def _score_catalog_fluxes(keep_psf: bool) -> tuple[dict, dict]:
    """Preconvolve mode on the Moffat science (the template sharper: K fitted between
    the images): each transient the score's catalog finds within 1.5 px, its PSF flux
    over its true flux; and the metrics. Transients of 3000 (S/N ~10), still too
    faint for a PSF estimate."""
    pair = _moffat_science_with_few_stars(25, keep_psf, transient_flux=(3000.0, 3000.0))
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode="preconvolve"))
    truth = pair.truth["transients"]
    found = result.dia_sources
    fx, fy = np.asarray(found["x"], float), np.asarray(found["y"], float)
    ratios = {}
    columns = (truth["x"], truth["y"], truth["flux_science"])
    for k, (x, y, flux) in enumerate(zip(*columns, strict=True)):
        distance = np.hypot(fx - x, fy - y)
        if distance.size and distance.min() < 1.5:
            ratios[k] = float(found["psf_flux"][int(np.argmin(distance))]) / float(flux)
    return ratios, result.metrics


def test_a_stand_in_science_psf_gives_way_to_the_kernel_matched_template_psf_in_the_score():
    """Preconvolving, K fitted between the images as they are: P = K * P_T, not the
    Gaussian of the header FWHM, filters the score and is its science PSF, and the
    catalog's fluxes of the transients read what they do with the true Moffat given
    (median ratio to true 0.76 with the stand-in, 1.00 with the true PSF, 1.02 with
    K * P_T; on the transients both runs find)."""
    ratios, metrics = _score_catalog_fluxes(keep_psf=False)
    true_ratios, _ = _score_catalog_fluxes(keep_psf=True)
    both = sorted(set(ratios) & set(true_ratios))
    assert len(both) >= 10
    ratio = float(np.median([ratios[k] for k in both]))
    true_ratio = float(np.median([true_ratios[k] for k in both]))
    assert metrics["mode"] == "preconvolve"
    assert ratio == pytest.approx(true_ratio, abs=0.03)
    assert not any("stands in" in w for w in metrics["warnings"])
    assert metrics["science_psf_source"] == "kernel-matched template PSF"
    assert metrics["template_psf_source"] == "given"


def _comparable(metrics: dict) -> dict:
    """The metrics a run's timing cannot change."""
    out = {k: v for k, v in metrics.items() if k != "timings" and not k.startswith("n_dia_")}
    out["registration"] = {k: v for k, v in out["registration"].items() if k != "seconds"}
    return out


@pytest.mark.parametrize("mode", ["auto", "preconvolve"])
def test_the_dia_catalog_changes_no_metric_but_its_counts(mode, monkeypatch):
    """The metrics are made on a thread of their own beside the DIA sources, on the same
    result (on the caller's thread, first, under a one-thread cap): the same figures as
    with the catalog off and as on one thread, the catalog's counts added, the same
    catalog as on one thread, and progress reports the metrics before the detection."""
    import threading

    import core.subtract
    from core.parallel import set_thread_limit

    threads: list[tuple[str, int]] = []

    def on_thread(name, function):
        def recorded(*args, **kwargs):
            threads.append((name, threading.get_ident()))
            return function(*args, **kwargs)

        monkeypatch.setattr(core.subtract, name, recorded)

    on_thread("noise_statistics", core.subtract.noise_statistics)  # one call, in the metrics
    on_thread("dia_sources", core.subtract.dia_sources)
    pair = simulated_pair("sharper_template", 512, 113)
    stages: list[str] = []
    beside = run_subtraction(
        pair.science,
        pair.template,
        SubtractionConfig(mode=mode),
        progress=lambda stage, fraction: stages.append(stage),
    )
    assert dict(threads)["noise_statistics"] != dict(threads)["dia_sources"]
    off = SubtractionConfig(mode=mode)
    off.dia.enabled = False
    alone = run_subtraction(pair.science, pair.template, off)
    threads.clear()
    try:
        set_thread_limit(1)
        one_thread = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))
    finally:
        set_thread_limit(None)
    assert [name for name, _ in threads] == ["noise_statistics", "dia_sources"]
    assert {ident for _, ident in threads} == {threading.get_ident()}
    assert _comparable(beside.metrics) == _comparable(alone.metrics)
    assert _comparable(beside.metrics) == _comparable(one_thread.metrics)
    catalog = beside.dia_sources
    assert len(catalog) > 0
    assert beside.metrics["n_dia_sources"] == len(catalog)
    assert beside.metrics["n_dia_negative"] == int(np.sum(catalog["is_negative"]))
    assert one_thread.dia_sources.meta == catalog.meta
    for name in catalog.colnames:
        np.testing.assert_array_equal(one_thread.dia_sources[name], catalog[name])
    assert "n_dia_sources" not in alone.metrics and alone.dia_sources is None
    assert stages.index("metrics") < stages.index("detect")


@pytest.mark.parametrize(
    ("mode", "name"),
    [("convolveTemplate", "sharper_template"), ("convolveScience", "sharper_science")],
)
def test_the_flux_ratio_is_science_over_template_whichever_image_is_convolved(mode, name):
    """A light curve puts epochs on one scale with the science / template flux ratio: the
    kernel sum is it when the template is convolved and its inverse when the science is
    (a review's user had to invert it by mode). The catalogs carry it with PHOTCAL."""

    from core.diasources import catalog_hdulist
    from core.simulate import preset, simulate_pair

    config = preset(name, size=384, seed=5)
    config.flux_ratio = 1.3
    config.n_transients = 10
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template, {"mode": mode})
    ratio = result.metrics["flux_ratio"]
    assert ratio == pytest.approx(1.3, rel=0.08)  # 7-17 kernel stars at 384 px: +-5%
    ksum = result.metrics["kernel_sum"]
    assert ratio == pytest.approx(ksum if mode == "convolveTemplate" else 1 / ksum)
    header = catalog_hdulist(result.dia_sources)[1].header
    assert header["FLUXRAT"] == pytest.approx(ratio)
    assert header["PHOTCAL"] == pytest.approx(pair.science.photo_calib.calibration)


@pytest.mark.parametrize(
    "scenario, mode",
    [
        ("sharper_template", "convolveTemplate"),
        ("sharper_science", "convolveScience"),
        ("sharper_template", "preconvolve"),
    ],
)
def test_the_matched_template_states_the_science_units(scenario, mode, tmp_path):
    """K * T (and T / sum(K)) is in science units: its BUNIT, gain and zero point are the
    science's (a review: matched_template.fits said the raw template's 'electron' over
    pixels in adu); its saturation level, in the template's old units, is dropped; its
    epoch stays the template's."""
    from astropy.io import fits

    from core.products import write_products

    pair = simulated_pair(scenario, 512, 121)
    science, template = pair.science.copy(), pair.template.copy()
    science.metadata.update({"BUNIT": "adu", "GAIN": 2.0, "MAGZERO": 25.0, "MJD-OBS": 60000.5})
    template.metadata.update(
        {"BUNIT": "electron", "GAIN": 1.0, "MAGZERO": 26.0, "SATURATE": 5.0e4, "MJD-OBS": 59000.5}
    )
    template.metadata.pop("EGAIN", None)
    raw_template = dict(template.metadata)
    config = SubtractionConfig(mode=mode, do_decorrelation=False, dia={"enabled": False})
    result = run_subtraction(science, template, config)
    meta = result.matched_template.metadata
    assert (meta["BUNIT"], meta["GAIN"], meta["MAGZERO"]) == ("adu", 2.0, 25.0)  # was electron
    assert "SATURATE" not in meta
    assert meta["MJD-OBS"] == 59000.5  # its own epoch
    assert template.metadata == raw_template  # the input is left alone
    write_products(result, tmp_path, names=["matched_template"])
    with fits.open(tmp_path / "matched_template.fits") as hdul:
        assert hdul["IMAGE"].header["BUNIT"] == "adu"
        assert "SATURATE" not in hdul[0].header
