"""Tests of core.decorrelate: whitening, variance planes, flux, score form, spatial blending."""

import numpy as np
import pytest
from astropy.stats import mad_std
from scipy import ndimage, signal

from core.config import DecorrelationConfig
from core.decorrelate import (
    DecorrelatedPsf,
    clipped_mean,
    decorrelate_difference,
    decorrelation_filter,
    decorrelation_filters,
)
from core.exposure import Exposure
from core.psf import GaussianPsf, ImagePsf

N = 256
INNER = (slice(32, -32), slice(32, -32))


def gaussian(sigma: float, size: int = 21, total: float = 1.0) -> np.ndarray:
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    g = np.exp(-0.5 * (x * x + y * y) / sigma**2)
    return total * g / g.sum()


class ConstantKernel:
    """Test double of core.kernel.SpatialKernel: the same stamp everywhere."""

    def __init__(self, stamp):
        self.stamp = stamp
        self.size = stamp.shape[0]

    def image(self, x, y):
        return self.stamp.copy()


class LinearKernel:
    """Test double: stamp interpolated linearly in x between k0 (x=0) and k1 (x=n-1)."""

    def __init__(self, k0, k1, n):
        self.k0, self.k1, self.n = k0, k1, n
        self.size = k0.shape[0]

    def image(self, x, y):
        a = x / (self.n - 1)
        return (1 - a) * self.k0 + a * self.k1


def correlate(image, kernel):
    """alsub's operator: out(X) = sum_u K(u) in(X + u)."""
    return ndimage.correlate(image, kernel, mode="constant")


def lag_correlations(image, lags=(1, 2, 3)):
    """Largest |normalised autocorrelation| along x and y at each lag."""
    a = image - image.mean()
    var = (a * a).mean()
    return np.array(
        [
            max(
                abs((a[:, :-lag] * a[:, lag:]).mean() / var),
                abs((a[:-lag] * a[lag:]).mean() / var),
            )
            for lag in lags
        ]
    )


def exposures(science, template, difference, vs, vt, psf_s=1.5, psf_t=1.0):
    shape = science.shape
    sci = Exposure.from_arrays(science, np.full(shape, vs), psf=GaussianPsf(psf_s))
    tmp = Exposure.from_arrays(template, np.full(shape, vt), psf=GaussianPsf(psf_t))
    dif = Exposure.from_arrays(difference, np.ones(shape), psf=sci.psf)
    return sci, tmp, dif


@pytest.fixture(scope="module")
def noisy_template_pair():
    """Template 20x noisier than the science, matched by a 0.8-sum Gaussian kernel."""
    rng = np.random.default_rng(11)
    vs, vt = 1.0, 20.0
    science = rng.normal(0.0, np.sqrt(vs), (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    kernel = gaussian(2.0, 21, 0.8)
    difference = science - correlate(template, kernel)
    return exposures(science, template, difference, vs, vt) + (kernel, vs, vt)


# ----------------------------------------------------------------------------------------
def test_clipped_mean_rejects_outliers_and_masks():
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 1.0, 10000)
    values[:200] = 1e4  # outliers
    good = np.ones(values.size, bool)
    good[200:400] = False
    values[200:400] = -1e6  # masked, would ruin the mean
    assert clipped_mean(values, good) == pytest.approx(5.0, abs=0.03)
    assert clipped_mean(np.full(100, 0.1)) == pytest.approx(0.1, rel=1e-12)
    assert np.isnan(clipped_mean(np.full(10, np.nan)))


def test_filter_is_one_at_zero_frequency_and_real():
    kernel = gaussian(1.7, 21, 0.8)
    for preconv in (None, gaussian(1.5, 15)):
        filt = decorrelation_filters(kernel, 1.0, 7.0, (64, 64), preconv)
        assert filt.phi[0, 0] == pytest.approx(1.0, abs=1e-12)
        assert np.all(np.isfinite(filt.phi))
        assert filt.phi.dtype == np.float64
    phi = decorrelation_filter(kernel, 1.0, 7.0, (64, 64))
    # whitening boosts high frequencies: at Nyquist phi = sqrt((1 + 7 * 0.64) / (1 + ~0))
    assert phi[32, 32] == pytest.approx(np.sqrt(1 + 7 * 0.64), rel=1e-3)


def test_flux_preserved_and_psf_attached(noisy_template_pair):
    sci, tmp, _, kernel, vs, vt = noisy_template_pair
    flux = 1000.0
    psf = sci.psf.kernel_image()
    image = np.zeros((N, N))
    h = psf.shape[0] // 2
    image[128 - h : 128 + h + 1, 100 - h : 100 + h + 1] = flux * psf
    dif = Exposure.from_arrays(image, np.ones((N, N)), psf=sci.psf)
    out = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel))
    assert out.image.astype(np.float64).sum() == pytest.approx(flux, rel=1e-6)
    # the attached PSF is the decorrelated point source
    assert isinstance(out.psf, DecorrelatedPsf)
    stamp = out.psf.kernel_image(100, 128)
    assert stamp.sum() == pytest.approx(1.0, abs=1e-9)
    hs = stamp.shape[0] // 2
    cut = out.image[128 - hs : 128 + hs + 1, 100 - hs : 100 + hs + 1] / flux
    assert np.abs(cut - stamp).max() < 1e-3 * stamp.max()
    # and differs from the input PSF (decorrelation sharpens it)
    assert stamp.max() > 1.05 * psf.max()
    # inputs not mutated
    assert dif.image.sum() == pytest.approx(flux, rel=1e-6)


def test_whitens_noise_and_variance_matches(noisy_template_pair):
    sci, tmp, dif, kernel, vs, vt = noisy_template_pair
    before = dif.image.copy()
    raw = lag_correlations(dif.image[INNER])
    assert raw[0] > 0.1  # the test can fail: the raw difference is correlated
    out = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel))
    assert np.array_equal(dif.image, before)
    assert np.all(lag_correlations(out.image[INNER]) < 0.05)
    expected = vs + vt * kernel.sum() ** 2  # section 4.3 expected outcome
    assert np.median(out.variance) == pytest.approx(expected, rel=1e-5)
    ratio = out.image[INNER] / np.sqrt(out.variance[INNER])
    assert 0.97 < mad_std(ratio) < 1.03
    assert abs(np.mean(ratio)) < 0.05


def test_convolve_science_units_and_variance():
    """Decision 2: D = (K * S - T) / ksum is in science units; V' divided by ksum^2."""
    rng = np.random.default_rng(5)
    vs, vt = 20.0, 1.0  # science much noisier: it is the image that gets convolved
    science = rng.normal(0.0, np.sqrt(vs), (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    kernel = gaussian(2.0, 21, 0.8)
    ksum = kernel.sum()
    difference = (correlate(science, kernel) - template) / ksum
    sci, tmp, dif = exposures(science, template, difference, vs, vt)
    assert lag_correlations(difference[INNER])[0] > 0.1
    out = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel), template_matched=False)
    assert np.all(lag_correlations(out.image[INNER]) < 0.05)
    assert np.median(out.variance) == pytest.approx(vs + vt / ksum**2, rel=1e-5)
    assert 0.97 < mad_std(out.image[INNER] / np.sqrt(out.variance[INNER])) < 1.03
    # complete propagation agrees away from the edges
    cfg = DecorrelationConfig(complete_var_plane_propagation=True)
    full = decorrelate_difference(
        dif, sci, tmp, ConstantKernel(kernel), template_matched=False, config=cfg
    )
    assert np.allclose(full.variance[INNER], out.variance[INNER], rtol=1e-4)


def test_score_form_noise_and_matched_filter_snr():
    rng = np.random.default_rng(7)
    vs, vt = 1.0, 4.0
    sigma_p, sigma_m, msum = 1.6, 1.2, 0.9
    psf = gaussian(sigma_p, 21)
    match = gaussian(sigma_m, 21, msum)
    kernel = signal.convolve2d(psf, match)  # K^ = P^ M^: template matched to P * S
    science = rng.normal(0.0, np.sqrt(vs), (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    score = correlate(science, psf) - correlate(template, kernel)
    sci, tmp, dif = exposures(science, template, score, vs, vt)
    sci.psf = dif.psf = ImagePsf(psf)
    out = decorrelate_difference(
        dif, sci, tmp, ConstantKernel(kernel), preconv_mode=True, preconv_kernel=psf
    )
    snr_map = out.image[INNER] / np.sqrt(out.variance[INNER])
    assert 0.97 < mad_std(snr_map) < 1.03
    assert abs(np.mean(snr_map)) < 0.05

    # a transient (only in the science) of flux F: score response is linear
    flux = 300.0
    source = np.zeros((N, N))
    h = psf.shape[0] // 2
    source[128 - h : 128 + h + 1, 128 - h : 128 + h + 1] = flux * psf
    dif_src = Exposure.from_arrays(correlate(source, psf), np.ones((N, N)), psf=ImagePsf(psf))
    resp = decorrelate_difference(
        dif_src, sci, tmp, ConstantKernel(kernel), preconv_mode=True, preconv_kernel=psf
    )
    snr = resp.image[128, 128] / np.sqrt(resp.variance[128, 128])
    # ideal matched-filter S/N for noise spectrum vs + vt |M^|^2 (continuous Gaussians)
    k = (np.arange(512) - 256) / 512.0
    kk = k[:, None] ** 2 + k[None, :] ** 2
    p_hat2 = np.exp(-4 * np.pi**2 * sigma_p**2 * kk)
    m_hat2 = msum**2 * np.exp(-4 * np.pi**2 * sigma_m**2 * kk)
    ideal = flux * np.sqrt(np.mean(p_hat2 / (vs + vt * m_hat2)))
    assert snr == pytest.approx(ideal, rel=0.01)
    # the attached PSF explains the peak: score peak = F * sum(P_D^2)
    p_d = resp.psf.kernel_image()
    assert resp.image[128, 128] == pytest.approx(flux * np.sum(p_d**2), rel=0.01)


def test_preconv_kernel_needs_score_mode(noisy_template_pair):
    sci, tmp, dif, kernel, _, _ = noisy_template_pair
    psf = sci.psf.kernel_image()
    with pytest.raises(ValueError, match="Pre-convolution kernel"):
        decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel), preconv_kernel=psf)
    with pytest.raises(ValueError, match="Pre-convolution kernel"):
        decorrelate_difference(
            dif,
            sci,
            tmp,
            ConstantKernel(kernel),
            template_matched=False,
            preconv_mode=True,
            preconv_kernel=psf,
        )


def test_nonfinite_pixels_restored(noisy_template_pair):
    sci, tmp, dif, kernel, _, _ = noisy_template_pair
    dirty = dif.copy()
    dirty.image[50, 60:70] = np.nan
    dirty.image[200, 10] = np.inf
    dirty.image[201, 11] = -np.inf
    out = decorrelate_difference(dirty, sci, tmp, ConstantKernel(kernel))
    assert np.all(np.isnan(out.image[50, 60:70]))
    assert out.image[200, 10] == np.inf and out.image[201, 11] == -np.inf
    bad = ~np.isfinite(dirty.image)
    assert np.all(np.isfinite(out.image[~bad]))
    # elsewhere the result is the same as for the clean image, apart from the filled pixels'
    # neighbourhood
    clean = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel))
    assert np.allclose(out.image[150:, 100:], clean.image[150:, 100:], atol=1e-3)


def test_spatial_equals_uniform_for_constant_kernel(noisy_template_pair):
    sci, tmp, dif, kernel, _, _ = noisy_template_pair
    cfg = DecorrelationConfig(grid_step=64)
    for kwargs in ({}, {"template_matched": False}):
        uniform = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel), **kwargs)
        spatial = decorrelate_difference(
            dif, sci, tmp, ConstantKernel(kernel), spatially_varying=True, config=cfg, **kwargs
        )
        scale = np.abs(uniform.image).max()
        assert np.abs(spatial.image - uniform.image).max() < 1e-4 * scale
        assert np.allclose(spatial.variance, uniform.variance, rtol=1e-4)
        assert np.allclose(spatial.psf.kernel_image(10, 200), uniform.psf.kernel_image(), atol=1e-6)


def test_spatial_equals_uniform_score_and_complete_variance():
    rng = np.random.default_rng(9)
    vs, vt = 1.0, 5.0
    psf = gaussian(1.6, 15)
    kernel = signal.convolve2d(psf, gaussian(1.0, 11, 0.9))
    science = rng.normal(0.0, 1.0, (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    score = correlate(science, psf) - correlate(template, kernel)
    sci, tmp, dif = exposures(science, template, score, vs, vt)
    sci.psf = dif.psf = ImagePsf(psf)
    kwargs = dict(preconv_mode=True, preconv_kernel=psf)
    cfg = DecorrelationConfig(complete_var_plane_propagation=True)
    uniform = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel), config=cfg, **kwargs)
    cfg = DecorrelationConfig(complete_var_plane_propagation=True, grid_step=100)
    spatial = decorrelate_difference(
        dif, sci, tmp, ConstantKernel(kernel), spatially_varying=True, config=cfg, **kwargs
    )
    assert np.abs(spatial.image - uniform.image).max() < 1e-4 * np.abs(uniform.image).max()
    assert np.allclose(spatial.variance, uniform.variance, rtol=1e-4)
    # complete propagation of a flat variance equals the simple weights away from edges
    simple = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel), **kwargs)
    assert np.allclose(uniform.variance[INNER], simple.variance[INNER], rtol=1e-4)
    # and is lower at the frame edge, where the zero padding has no noise
    assert uniform.variance[0, 0] < 0.9 * simple.variance[0, 0]


def test_template_cutout_and_metadata(noisy_template_pair):
    from core.task import Task

    sci, tmp, dif, kernel, vs, vt = noisy_template_pair
    big = Exposure.from_arrays(np.zeros((N + 20, N + 30)), np.full((N + 20, N + 30), vt))
    big.xy0 = (-10, -5)
    big.image[5 : 5 + N, 10 : 10 + N] = tmp.image
    task = Task(name="decorrelate")
    out = decorrelate_difference(dif, sci, big, ConstantKernel(kernel), task=task)
    ref = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel))
    assert np.array_equal(out.image, ref.image)
    assert task.metadata["decorrelationVarianceTemplate"] == pytest.approx(vt)
    assert task.metadata["decorrelationKernelSum"] == pytest.approx(0.8)
    assert task.metadata["decorrelationNodes"] == 1


def _varying_pair(seed, vs=1.0, vt=20.0):
    """Difference with a kernel whose width grows from 0.7 px (x=0) to 3 px (x=N-1)."""
    rng = np.random.default_rng(seed)
    k0, k1 = gaussian(0.7, 21), gaussian(3.0, 21)
    science = rng.normal(0.0, np.sqrt(vs), (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    a = np.arange(N) / (N - 1)
    difference = science - ((1 - a) * correlate(template, k0) + a * correlate(template, k1))
    return exposures(science, template, difference, vs, vt) + (LinearKernel(k0, k1, N),)


def test_spatially_varying_whitens_both_ends():
    sci, tmp, dif, kernel = _varying_pair(3)
    cfg = DecorrelationConfig(grid_step=64)
    uniform = decorrelate_difference(dif, sci, tmp, kernel)
    spatial = decorrelate_difference(dif, sci, tmp, kernel, spatially_varying=True, config=cfg)
    corners = [(slice(16, 96), slice(12, 92)), (slice(160, 240), slice(164, 244))]
    corners += [(slice(160, 240), slice(12, 92)), (slice(16, 96), slice(164, 244))]
    worst_uniform = 0.0
    for box in corners:
        assert np.all(lag_correlations(spatial.image[box]) < 0.05)
        ratio = spatial.image[box] / np.sqrt(spatial.variance[box])
        assert 0.95 < mad_std(ratio) < 1.05
        worst_uniform = max(worst_uniform, lag_correlations(uniform.image[box])[0])
    assert worst_uniform > 0.08  # the uniform filter cannot whiten both ends


def test_spatially_varying_has_no_seams():
    cfg = DecorrelationConfig(grid_step=64)
    stacks = []
    for seed in range(12):
        sci, tmp, dif, kernel = _varying_pair(100 + seed)
        out = decorrelate_difference(dif, sci, tmp, kernel, spatially_varying=True, config=cfg)
        stacks.append(out.image / np.sqrt(out.variance))
        variance = out.variance
    ratio = np.stack(stacks)[:, 16:-16, :]
    # the variance plane is continuous: no jump between neighbouring pixels
    assert np.abs(np.diff(variance, axis=1)).max() < 0.01 * variance.min()
    assert np.abs(np.diff(variance, axis=0)).max() < 0.01 * variance.min()
    # node lines at x = 63.75, 127.5, 191.25 and the cell middles between them
    for x in (64, 96, 128, 160, 191):
        strip = mad_std(ratio[:, :, x - 3 : x + 3])
        left = mad_std(ratio[:, :, x - 15 : x - 9])
        right = mad_std(ratio[:, :, x + 9 : x + 15])
        assert abs(strip / (0.5 * (left + right)) - 1) < 0.03, x


def test_correlated_inputs_are_whitened_with_honest_variance():
    """A resampled/coadded science (noise correlated by a known kernel) and a noisy template:
    with the correlation recorded, D/sqrt(V) has unit scatter; assuming white inputs
    (Rubin) the variance plane is wrong."""
    rng = np.random.default_rng(21)
    smooth = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    science = correlate(rng.normal(0.0, 1.0, (N, N)), smooth)
    vs = float(np.sum(smooth**2))  # per-pixel variance of the correlated science
    vt = 4.0 * vs
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    kernel = gaussian(1.5, 15, 1.0)
    sci, tmp, dif = exposures(science, template, science - correlate(template, kernel), vs, vt)
    rho = correlate(np.pad(smooth, 3), smooth)[1:-1, 1:-1]
    sci.noise_correlation = rho / rho[3, 3]

    white = decorrelate_difference(
        dif, exposures(science, template, dif.image, vs, vt)[0], tmp, ConstantKernel(kernel)
    )
    naive = mad_std(white.image[INNER] / np.sqrt(white.variance[INNER]))
    out = decorrelate_difference(dif, sci, tmp, ConstantKernel(kernel))
    honest = mad_std(out.image[INNER] / np.sqrt(out.variance[INNER]))
    assert abs(naive - 1.0) > 0.1  # the test can fail: ignoring the correlation is wrong
    assert 0.97 < honest < 1.03
    # whiter than before (not white: the smoothing left no power at Nyquist to restore,
    # and the filter is not allowed to amplify by more than 1/sqrt(floor))
    assert lag_correlations(out.image[INNER])[0] < 0.5 * lag_correlations(dif.image[INNER])[0]
    # flux is preserved: the filter is 1 at zero frequency
    assert out.image[INNER].sum() == pytest.approx(dif.image[INNER].sum(), abs=5 * N)


def test_filter_keeps_flux_with_correlated_inputs():
    """phi is 1 at zero frequency whatever the input correlations: fluxes are kept."""
    smooth = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    rho = correlate(np.pad(smooth, 3), smooth)[1:-1, 1:-1]
    rho /= rho[3, 3]
    for correlations in ((rho, None), (None, rho), (rho, rho)):
        filters = decorrelation_filters(
            gaussian(1.5, 15, 0.9), 1.0, 3.0, (64, 64), None, correlations
        )
        assert filters.phi[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_tiled_filtering_matches_one_padded_transform():
    """Frames past one padded FFT are filtered in threaded tiles: same linear convolution."""
    from core import decorrelate as module

    rng = np.random.default_rng(31)
    image = rng.normal(0.0, 5.0, (module._WHOLE_FFT_MAX + 140, 700)).astype(np.float32)
    stamp = rng.random((61, 61))
    stamp = stamp + stamp[::-1, ::-1]  # decorrelation stamps are point symmetric; this
    stamp[10, 40] += 3.0  # one is not, so a reflection error would show
    reference = signal.fftconvolve(image.astype(np.float64), stamp, mode="same")
    got = module._convolve((image,), (stamp,), (0, 0))
    assert np.abs(got - reference).max() < 1e-5 * np.abs(reference).max()


def test_interp_stamps_equals_blend_over_every_node():
    """The blend read from the (at most 2 x 2) weighted nodes equals the tent-weighted
    sum over the whole node grid, inside, between and beyond the nodes."""
    from core.decorrelate import _interp_stamps, _tent

    rng = np.random.default_rng(4)
    stamps = rng.normal(size=(5, 6, 7, 7))
    nodes_y = np.linspace(10.0, 410.0, 5)
    nodes_x = np.linspace(-3.0, 497.0, 6)
    for x, y in [(0.0, 10.0), (130.5, 222.2), (496.9, 409.0), (600.0, -50.0), (97.0, 110.0)]:
        wy = _tent(np.array([np.clip(y, nodes_y[0], nodes_y[-1])]), nodes_y)[0]
        wx = _tent(np.array([np.clip(x, nodes_x[0], nodes_x[-1])]), nodes_x)[0]
        expected = (wy[:, None, None, None] * wx[None, :, None, None] * stamps).sum(axis=(0, 1))
        np.testing.assert_allclose(
            _interp_stamps(stamps, nodes_x, nodes_y, x, y), expected, rtol=1e-12, atol=1e-14
        )


# ----------------------------------------------------------------------------------------
# filters cut to their extent
def _varying_score_case():
    """Noise-only score of a pair whose matching kernel widens across the frame, with a
    star-sized residual (filter tails act on it: what a cut must keep)."""
    rng = np.random.default_rng(31)
    vs, vt = 1.0, 3.0
    psf = gaussian(1.7, 21)
    k0 = signal.convolve2d(psf, gaussian(1.0, 15, 0.9))
    k1 = signal.convolve2d(psf, gaussian(1.6, 15, 0.9))
    science = rng.normal(0.0, 1.0, (N, N))
    template = rng.normal(0.0, np.sqrt(vt), (N, N))
    a = np.arange(N) / (N - 1.0)  # K(x) linear in x: T * K(x) blends T * k0 and T * k1
    matched = (1 - a) * correlate(template, k0) + a * correlate(template, k1)
    score = correlate(science, psf) - matched
    score[100:121, 60:81] += 50.0 * psf  # a 50-sigma-ish residual
    sci, tmp, dif = exposures(science, template, score, vs, vt)
    sci.psf = dif.psf = ImagePsf(psf)
    return sci, tmp, dif, LinearKernel(k0, k1, N), psf, science - matched


@pytest.mark.parametrize("spatially_varying", [False, True])
@pytest.mark.parametrize("complete", [False, True])
@pytest.mark.parametrize("score_form", [False, True])
def test_cut_filters_match_uncut_reference(monkeypatch, spatially_varying, complete, score_form):
    """Stamps cut where every dropped value is below 1e-7 of the peak give the image and
    variance of the uncut filters on the generous (4 k + 1) grid to 1e-5 of the noise
    (or float32 round-off of bright values),
    and the whitened score or difference keeps unit noise ratio."""
    import core.decorrelate as decorrelate

    sci, tmp, dif, kernel, psf, difference = _varying_score_case()
    if not score_form:  # the same pair as a difference: S - K * T
        dif = Exposure.from_arrays(difference, np.ones((N, N)), psf=sci.psf)
    kwargs = dict(
        spatially_varying=spatially_varying,
        config=DecorrelationConfig(complete_var_plane_propagation=complete, grid_step=64),
    )
    if score_form:
        kwargs |= dict(preconv_mode=True, preconv_kernel=psf)
    cut = decorrelate_difference(dif, sci, tmp, kernel, **kwargs)
    monkeypatch.setattr(decorrelate, "_TAIL_FRACTION", 0.0)  # nothing is below 0: no cut
    reference = decorrelate_difference(dif, sci, tmp, kernel, **kwargs)
    sigma = np.sqrt(reference.variance)
    # to 1e-5 of the noise, or a few float32 steps of the value (the residual's peak)
    tolerance = 1e-5 * sigma.min() + 8 * np.finfo(np.float32).eps * np.abs(reference.image)
    assert np.all(np.abs(cut.image - reference.image) < tolerance)
    assert np.abs(cut.variance / reference.variance - 1.0).max() < 1e-5
    assert np.allclose(
        cut.psf.kernel_image(30, 200), reference.psf.kernel_image(30, 200), atol=1e-7
    )
    # a star-sized residual is filtered as by the uncut filter, not just the noise
    assert np.abs(cut.image[90:131, 50:91] - reference.image[90:131, 50:91]).max() < 1e-4
    noise = cut.image[INNER] / np.sqrt(cut.variance[INNER])
    assert 0.97 < mad_std(noise) < 1.03


def test_node_filter_is_cut_to_its_extent():
    """The cut stamps are far narrower than the kernels, keep the full stamps' sums (unit
    flux), and drop only values whose absolute sum is below 1e-7 of the stamp's."""
    import core.decorrelate as decorrelate

    psf = gaussian(1.7, 21)
    kernel = signal.convolve2d(psf, gaussian(1.2, 51, 0.9))  # 71 px: a preconvolve kernel
    node = decorrelate._node_filter(kernel, 1.0, 3.0, psf, complete=True)
    size = 4 * 71 + 1
    full = decorrelation_filters(kernel, 1.0, 3.0, (size, size), psf)
    stamp = decorrelate.filter_kernel_image(full.phi, size)
    half = node.half
    assert half < 71 // 2
    centre = size // 2
    dropped = stamp.copy()
    dropped[centre - half : centre + half + 1, centre - half : centre + half + 1] = 0.0
    assert np.abs(dropped).sum() <= 1e-7 * np.abs(stamp).sum()
    assert node.image.sum() == pytest.approx(1.0, abs=1e-12)
    assert node.psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert node.variance1.sum() == pytest.approx(full.w1, rel=1e-9)
    assert node.variance2.sum() == pytest.approx(full.w2, rel=1e-9)
    inner = stamp[centre - half : centre + half + 1, centre - half : centre + half + 1]
    assert np.abs(node.image - inner).sum() < 2e-7 * np.abs(stamp).sum()


def test_masked_pixels_are_not_spread_by_the_filter():
    """The edge band (science minus the unconvolved template), saturated and other
    masked pixels hold no difference: filtered as they were, a template at 1000x the
    science's scale put false sources along the frame's edges (158 DIA sources for 19,
    noise ratio 1.097) and a saturated block 5 unflagged ones around it."""
    from core.simulate import preset, simulate_pair
    from core.subtract import run_subtraction

    def pair():
        return simulate_pair(preset("sharper_template", size=512, seed=4))

    plain = pair()
    count = len(run_subtraction(plain.science, plain.template).dia_sources)
    scaled = pair()
    scaled.template.image *= 1000
    scaled.template.variance *= 1e6
    scaled.science.photo_calib = scaled.template.photo_calib = None  # plain files carry none
    result = run_subtraction(scaled.science, scaled.template)
    assert len(result.dia_sources) <= count + 2
    assert 0.98 < result.metrics["noise_ratio"] < 1.02
    clipped = pair()
    science = clipped.science
    science.image[100:200, 300:420] = 65535.0
    science.mask[100:200, 300:420] |= science.bitmask(["SAT"])
    catalog = run_subtraction(science, clipped.template).dia_sources
    dx = np.maximum(np.maximum(300 - catalog["x"], catalog["x"] - 419), 0)
    dy = np.maximum(np.maximum(100 - catalog["y"], catalog["y"] - 199), 0)
    around = (np.hypot(dx, dy) > 0) & (np.hypot(dx, dy) < 15)
    assert np.count_nonzero(around & (np.asarray(catalog["flags"]) == 0)) <= 1
