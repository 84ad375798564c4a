"""Real survey pairs subtract well with default settings (issue 8).

Every pair of ``data/real/REFERENCE.md`` (fixtures in tests/data/real) is subtracted
in both modes with default settings and measured exactly as HOTPANTS's reference
figures were (`core.evaluate.reference_figures`, through `bench.real_data`): noise
0.9-1.15, the known variable's matched-filter S/N at least 0.9x HOTPANTS's with the
same sign, star chi2 at most 1.1x HOTPANTS's (JWST with its noise maps: below 3.85;
without them: a kernel sum within 10% of 1 or a verdict that says why not).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.real_data import (
    CHI2_FACTOR,
    HOTPANTS_REFERENCE,
    NOISE_RANGE,
    PAIRS,
    SNR_FRACTION,
    acceptance,
    load_pair,
    measure_pair,
    run_alsub,
)
from core.config import SubtractionConfig
from core.errors import InsufficientSourcesError
from core.io import read_exposure
from core.photometry import psf_flux
from core.psf import SIGMA_TO_FWHM, GaussianPsf
from core.subtract import run_subtraction

MODES = ("auto", "preconvolve")
CENTRE = (128, 129)  # (row, col) of the DECam source that brightened, from the data README


@pytest.fixture(scope="module", params=PAIRS)
def measured(request):
    """Both modes run on one pair and measured on the same pixels, positions and stars."""
    pair = load_pair(request.param)
    runs = {mode: run_alsub(pair, mode) for mode in MODES}
    measure_pair(pair, runs)
    return request.param, runs


#: Where alsub does not yet meet issue 8's acceptance: the criterion that fails, the
#: bound it is held to instead, and the measured cause. Everything not listed here is
#: held to the issue's own criteria. (Empty since the kernel's spatial order is chosen by
#: cross-validation and cosmic rays of single-exposure templates are no longer taken for
#: chi^2 stars; bench/README.md "Real data, session 6".)
SHORTFALLS: dict[tuple[str, str], dict[str, float]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_defaults_meet_the_acceptance_beside_hotpants(measured, mode):
    name, runs = measured
    run = runs[mode]
    assert run["status"] == "ok", run["status"]
    figures = run["figures"]
    if name == "jwst_plain":
        assert acceptance(name, figures, run) == "yes", (mode, run["quality"])
        return
    bounds = {"noise_low": NOISE_RANGE[0], "noise_high": NOISE_RANGE[1]}
    bounds.update(chi2_factor=CHI2_FACTOR, snr_fraction=SNR_FRACTION)
    bounds.update(SHORTFALLS.get((name, mode), {}))
    ref_noise, ref_snr, ref_chi2 = HOTPANTS_REFERENCE[name]
    context = (name, mode, figures, run["quality"])
    assert bounds["noise_low"] <= figures["noise"] <= bounds["noise_high"], context
    if math.isfinite(ref_snr):
        snr = figures["target_snr"]
        assert np.sign(snr) == np.sign(ref_snr), context
        assert abs(snr) >= bounds["snr_fraction"] * abs(ref_snr), context
    if name == "jwst_noise":
        assert figures["star_chi2"] < ref_chi2, context
    else:
        assert figures["star_chi2"] <= bounds["chi2_factor"] * ref_chi2, context


@pytest.mark.parametrize("mode", MODES)
def test_every_result_carries_a_verdict_with_reasons(measured, mode):
    _, runs = measured
    quality = runs[mode]["quality"]
    assert quality["verdict"] in ("good", "suspect", "bad")
    # a verdict other than good always says why
    assert quality["verdict"] == "good" or quality["reasons"]


@pytest.mark.parametrize("mode", MODES)
def test_plain_jwst_template_psf_comes_from_its_faint_stars(mode):
    """The template of the cluster field without its WebbPSF model: its few stars bright
    enough for S/N 20 were two, and the galaxies' sizes (3x a star's) made the stellar
    locus, so its PSF came out 7.9 px wide for the science's 2.6 and the verdict said
    bad (auto, kernel sum 0.79) or suspect. The fainter stars (S/N 10-20) show the
    locus (`core.psf.star_size`): the template PSF is as wide as the science's (the same
    camera and filter), the kernel turns one into the other and the stars vanish."""
    pair = load_pair("jwst_plain")
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=mode))
    metrics = result.metrics
    assert metrics["template_psf_fwhm"] == pytest.approx(metrics["science_psf_fwhm"], rel=0.15)
    ratio = metrics["kernel_psf_width_ratio"]
    assert max(ratio, 1 / ratio) < SubtractionConfig().quality.max_kernel_psf_width_ratio
    reasons = metrics["quality"]["reasons"]
    assert not any("PSF model" in reason or "keep" in reason for reason in reasons), reasons


def test_jwst_with_its_psfs_has_a_kernel_that_matches_them():
    """The same pixels with their WebbPSF models: the kernel turns the template's PSF into
    P * S's to a few percent, so the PSF rule says nothing (it is about the models)."""
    pair = load_pair("jwst_noise")
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode="preconvolve"))
    assert result.metrics["kernel_psf_width_ratio"] == pytest.approx(1.0, abs=0.05)
    assert not any("PSF model" in r for r in result.metrics["quality"]["reasons"])


def test_a_jwst_cut_smaller_than_its_psf_light_needs_no_more_frame():
    """A 640 px cut of the JWST pair with its WebbPSF models (205 px stamps): the
    variability test's fluxes were NaN wherever a stamp left the cut, 5 of its 11 kernel
    candidates though each had 99.3-99.9% of its light on it; 2 were left and the
    subtraction was refused as if the 9 were not in the template. A 300 px cut has 3
    candidates: the refusal says which flux could not be measured, and in which image."""
    pair = load_pair("jwst_noise")
    x0, y0 = pair.science.xy0
    for side, start in ((640, 130), (300, 300)):
        box = (x0 + start, y0 + start, x0 + start + side - 1, y0 + start + side - 1)
        science, template = pair.science.cutout(box), pair.template.cutout(box)
        if side == 300:
            with pytest.raises(InsufficientSourcesError, match="measurable in the science"):
                run_subtraction(science, template)
            continue
        result = run_subtraction(science, template)
        assert result.metrics["n_kernel_sources"] >= 5
        assert result.metrics["kernel_sum"] == pytest.approx(1.0, abs=0.05)
        assert result.metrics["quality"]["verdict"] == "good"


def test_jwst_correlated_noise_is_not_taken_for_static_structure():
    """Resampled frames of a cluster field: their sky-measured noise is correlated, and
    the WebbPSF probe (205 px) leaves few pixels all-sky. Measured on the 1098 farthest
    from any source (one or two clumps), the difference looked 0.81x as noisy as
    predicted and both variances were cut ~11% (noise 1.004 -> 1.027); on the box that
    trades the probe's wing for pixels it is 0.95x, a 3% cut (noise 1.008)."""
    pair = load_pair("jwst_noise")
    result = run_subtraction(pair.science, pair.template, SubtractionConfig())
    metadata = {k.rsplit(".", 1)[-1]: v for k, v in result.metadata.items()}
    assert metadata.get("staticStructureRatio", 1.0) > 0.9
    assert min(metadata.get("staticStructureFactors", [1.0])) > 0.95


def test_same_data_twice_is_bad(real_data):
    """A template that is the science again (to 1% of its noise) leaves no noise at all."""
    science = read_exposure(real_data / "decam_sfft_decorr" / "DEC-OBS04a.mini.fits.gz")
    template = science.copy()
    noise = np.sqrt(np.median(science.variance))
    template.image += np.random.default_rng(1).normal(0, 0.01 * noise, science.shape)
    result = run_subtraction(science, template, SubtractionConfig(mode="convolveTemplate"))
    quality = result.metrics["quality"]
    assert quality["verdict"] == "bad"
    assert any("same data" in reason for reason in quality["reasons"])


def test_reported_background_order_is_the_subtracted_backgrounds(real_data):
    """Stamps that do not determine the background's terms lower the kernel fit's
    background to order 0 (few DECam stamps did when the terms were taken at the stamp
    centres; here a design-condition limit of 1.01 forces it); the refinement on every
    sky pixel then fits the configured order 2. The metrics report the order of the
    background subtracted (they said 0 beside six coefficients) and a note says it was
    refitted."""
    from core.kernel import n_spatial_terms

    folder = real_data / "decam_sfft_decorr"
    result = run_subtraction(
        read_exposure(folder / "DEC-OBS04a.mini.fits.gz"),
        read_exposure(folder / "DEC-OBS18a.mini.fits.gz"),
        SubtractionConfig(kernel={"max_spatial_design_condition": 1.01}),
    )
    metrics = result.metrics
    order = metrics["spatial_bg_order"]
    assert order == SubtractionConfig().kernel.spatial_bg_order == 2
    assert len(metrics["background_coefficients"]) == n_spatial_terms(order)
    assert any("refitted at order 2" in note for note in metrics["notes"])


def test_coadd_difference_carries_sffts_flux(real_data):
    """The brightened source in the coadd pair: same sign and flux as SFFT's difference."""
    folder = real_data / "decam_sfft_decorr"
    result = run_subtraction(
        read_exposure(folder / "Stack-DEC-OBS04.fits.gz"),
        read_exposure(folder / "Stack-DEC-OBS18.fits.gz"),
        SubtractionConfig(do_decorrelation=False),
    )
    from astropy.io import fits

    reference = fits.getdata(folder / "FinalDifference.fits.gz")
    row, col = CENTRE
    box = np.s_[row - 6 : row + 7, col - 6 : col + 7]
    ours, theirs = result.difference.image[box].sum(), reference[box].sum()
    assert ours == pytest.approx(theirs, rel=0.3)
    flux, error = psf_flux(result.difference, col, row)
    assert flux / error > 5 and math.isfinite(flux)


def test_a_gaussian_standing_in_for_the_psf_is_said(real_data):
    """DECam epoch c has 4 usable PSF stars (5 needed): a Gaussian of its FWHM keyword
    stands in, whose PSF fluxes of real stars read 0.82-0.86 of theirs (a review's
    injections). Preconvolving before the fit (K * T ~ P * S) the score is made with
    it, and the verdict says so; epoch a, whose PSF is estimated, says nothing of the
    kind."""
    folder = real_data / "decam_sfft_decorr"
    verdicts = {}
    config = SubtractionConfig(mode="preconvolve", preconvolve_via_difference=False)
    for epoch in ("a", "c"):
        result = run_subtraction(
            read_exposure(folder / f"DEC-OBS04{epoch}.mini.fits.gz"),
            read_exposure(folder / f"DEC-OBS18{epoch}.mini.fits.gz"),
            config,
        )
        verdicts[epoch] = result.metrics["quality"]
    said = [r for r in verdicts["c"]["reasons"] if "a Gaussian of its FWHM stands in" in r]
    assert verdicts["c"]["verdict"] == "suspect" and len(said) == 1
    assert said[0].startswith("suspect: science: no PSF given") and "4 suitable stars" in said[0]
    assert not any("Gaussian" in r for r in verdicts["a"]["reasons"])


@pytest.mark.parametrize("name", ["decam_c", "decam_coadd"])
def test_the_kernel_gives_the_science_psf_the_stars_did_not(name):
    """Too few science stars for a PSF (4 of the 5 needed); convolving the template, the
    kernel fitted on the stars makes K * P_T the science PSF, and everything after the
    fit takes it: copies of a real science star injected at empty sky read 0.82 (c) and
    0.82 (coadd) of their light in forced PSF photometry with the Gaussian of the
    header FWHM, 0.98 and 0.94 with it. The verdict no longer holds the stand-in
    against the run (it was suspect for that alone)."""
    pair = load_pair(name)
    result = run_subtraction(pair.science, pair.template, SubtractionConfig())
    metrics = result.metrics
    assert metrics["mode"] == "convolveTemplate"
    assert metrics["quality"]["verdict"] == "good", metrics["quality"]
    assert not any("stands in" in w for w in metrics["warnings"])
    # the difference's PSF is the decorrelated K * P_T, and so is the matched template's
    assert "KernelMatchedPsf" in repr(result.difference.psf)
    assert "KernelMatchedPsf" in repr(result.matched_template.psf)
    assert metrics["science_psf_source"] == "kernel-matched template PSF"
    assert metrics["template_psf_source"] == "estimated"
    assert any("seen through the matching kernel" in note for note in metrics["notes"])


@pytest.mark.parametrize("name", ["decam_c", "decam_coadd"])
def test_the_kernel_gives_the_score_its_preconvolution_kernel(name):
    """The same pairs in preconvolve mode, K fitted between the images as they are (the
    template is sharper): K * P_T, not the Gaussian of the header FWHM, is the science
    PSF after the fit and the preconvolution kernel P, cut to the stand-in's stamp at
    most (the score's EDGE band no wider than it was; the default power cut makes it
    narrower). The verdict was suspect for the stand-in alone."""
    pair = load_pair(name)
    result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode="preconvolve"))
    metrics, metadata = result.metrics, result.metadata
    assert metadata["alardLuptonPreconvolveSubtract.preconvolveKernelFit"] == "templateToScience"
    assert metrics["quality"]["verdict"] == "good", metrics["quality"]
    assert not any("stands in" in w for w in metrics["warnings"])
    assert metrics["science_psf_source"] == "kernel-matched template PSF"
    assert any("and the preconvolution kernel" in note for note in metrics["notes"])
    assert "KernelMatchedPsf" in repr(result.matched_science.psf)
    assert "KernelMatchedPsf" in repr(result.score.psf)
    stand_in = GaussianPsf(pair.fwhm / SIGMA_TO_FWHM).size
    size = metadata["alardLuptonPreconvolveSubtract.preconvolutionKernelSize"]
    assert 2 * pair.fwhm < size <= stand_in, (size, stand_in)


@pytest.mark.parametrize("name", ["decam_c", "decam_coadd"])
def test_plain_images_without_a_fwhm_keyword_are_subtracted(name):
    """Too few stars for a PSF estimate (4 of the 5 needed) and no FWHM keyword: a
    Gaussian of the sources' typical size stands in (it was refused: "the science image
    has no PSF and none could be estimated"), within 5% of the header's FWHM; convolving
    the template, only to size the fit (the kernel then gives the PSF); preconvolving
    before the fit, where the score is made with it, the verdict says so."""
    from core.subtract import _HEADER_FWHM_KEYS

    pair = load_pair(name)
    header_fwhm = pair.science.metadata["FWHM"]
    for exposure in (pair.science, pair.template):
        for key in _HEADER_FWHM_KEYS:
            exposure.metadata.pop(key, None)
    result = run_subtraction(pair.science, pair.template, SubtractionConfig())
    assert result.metrics["science_psf_fwhm"] == pytest.approx(header_fwhm, rel=0.05)
    # convolving the template, the stand-in only sizes the fit: the kernel gives the PSF
    assert result.metrics["science_psf_source"] == "kernel-matched template PSF"
    assert abs(result.metrics["noise_ratio"] - 1.0) < 0.1
    config = SubtractionConfig(mode="preconvolve", preconvolve_via_difference=False)
    result = run_subtraction(pair.science, pair.template, config)
    assert result.metrics["science_psf_source"] == "Gaussian of sources' typical size"
    quality = result.metrics["quality"]
    assert quality["verdict"] == "suspect", quality
    assert any("typical size stands in" in reason for reason in quality["reasons"]), quality
