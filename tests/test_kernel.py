"""Tests of core.kernel: spatial kernel and background models, FITS products and the solver."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage

from core.basis import FWHM_TO_SIGMA, make_kernel_basis
from core.config import KernelConfig
from core.convolve import convolve_exposure
from core.errors import InvalidCatalogError, NoKernelCandidatesError
from core.exposure import Exposure
from core.kernel import (
    BackgroundModel,
    SpatialKernel,
    chebyshev_terms,
    clipped_mean_std,
    fit_psf_matching_kernel,
)
from core.quality import kernel_centroid
from core.task import Task

SHAPE = (512, 512)
TEMPLATE_SIGMA = 1.5
KERNEL_SUM = 1.3
SKY_SIGMA_SCI, SKY_SIGMA_TMPL = 5.0, 2.0
TRUE_BACKGROUND = np.array([10.0, 3.0, -2.0, 1.5, 0.7, -1.0])
DOMAIN = (0, 0, SHAPE[1] - 1, SHAPE[0] - 1)


def _gauss(sigma, half=10):
    o = np.arange(-half, half + 1)
    g = np.exp(-(o[None, :] ** 2 + o[:, None] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _true_kernel():
    """K(x, y) = 1.3 * (w_a G(1.0) + w_b G(1.4)), weights linear in x' and y' (sum 1.3)."""
    images = np.array([_gauss(1.0), _gauss(1.4)])
    # Chebyshev coefficients (T0, T1(x'), T1(y')) of each weight
    coefficients = KERNEL_SUM * np.array([[0.5, 0.35, 0.1], [0.5, -0.35, -0.1]])
    return SpatialKernel(images, coefficients, 1, DOMAIN)


def _render_stars(shape, xs, ys, fluxes, sigma):
    image = np.zeros(shape)
    r = int(math.ceil(6 * sigma))
    o = np.arange(-r, r + 1)
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = int(round(x)), int(round(y))
        gx = np.exp(-((ix + o - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((iy + o - y) ** 2) / (2 * sigma**2))
        y0, y1 = max(iy - r, 0), min(iy + r + 1, shape[0])
        x0, x1 = max(ix - r, 0), min(ix + r + 1, shape[1])
        stamp = f / (2 * np.pi * sigma**2) * np.outer(gy, gx)
        image[y0:y1, x0:x1] += stamp[y0 - (iy - r) : y1 - (iy - r), x0 - (ix - r) : x1 - (ix - r)]
    return image


def _make_pair(seed=11, n_stars=400, variable=None, truth=None):
    """Template with Gaussian stars; science = K_true * template + background + noise."""
    rng = np.random.default_rng(seed)
    margin = 30
    xs = rng.uniform(margin, SHAPE[1] - margin, n_stars)
    ys = rng.uniform(margin, SHAPE[0] - margin, n_stars)
    fluxes = 10 ** rng.uniform(3.3, 4.7, n_stars)
    clean = _render_stars(SHAPE, xs, ys, fluxes, TEMPLATE_SIGMA)
    truth = truth or _true_kernel()
    science_clean = convolve_exposure(Exposure.from_arrays(clean), truth).image.astype(float)
    background = BackgroundModel(TRUE_BACKGROUND, 2, DOMAIN)
    science_clean += background.image(SHAPE)
    if variable is not None:
        # one star brightens by 30% in the science image only
        extra = _render_stars(SHAPE, xs[[variable]], ys[[variable]], fluxes[[variable]], 1.0)
        science_clean += (
            KERNEL_SUM
            * 0.3
            * convolve_exposure(Exposure.from_arrays(extra), _gauss(1.5)).image.astype(float)
        )
    template = Exposure.from_arrays(
        clean + rng.normal(0, SKY_SIGMA_TMPL, SHAPE),
        np.full(SHAPE, SKY_SIGMA_TMPL**2),
    )
    science = Exposure.from_arrays(
        science_clean + rng.normal(0, SKY_SIGMA_SCI, SHAPE),
        np.full(SHAPE, SKY_SIGMA_SCI**2),
    )
    sources = Table({"x": xs, "y": ys, "flux": fluxes})
    return template, science, sources, truth


def _basis(config):
    sigma_sci = math.sqrt(TEMPLATE_SIGMA**2 + 1.2**2)
    return make_kernel_basis(TEMPLATE_SIGMA / FWHM_TO_SIGMA, sigma_sci / FWHM_TO_SIGMA, config)


@pytest.fixture(scope="module")
def pair():
    return _make_pair()


@pytest.fixture(scope="module")
def solution(pair):
    template, science, sources, _ = pair
    config = KernelConfig()
    task = Task(name="makeKernel")
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config, task=task)
    return result, task


# -- models and products ----------------------------------------------------------------------


def test_chebyshev_terms_order_and_domain():
    domain = (10, 20, 109, 69)  # width 100, height 50
    t = chebyshev_terms(np.array([10.0, 59.5, 109.0]), np.array([44.5, 44.5, 69.0]), 2, domain)
    assert t.shape == (6, 3)
    xp = 2 * (np.array([10.0, 59.5, 109.0]) - 59.5) / 100
    yp = 2 * (np.array([44.5, 44.5, 69.0]) - 44.5) / 50
    expected = [np.ones(3), xp, yp, 2 * xp**2 - 1, xp * yp, 2 * yp**2 - 1]
    np.testing.assert_allclose(t, expected, atol=1e-14)
    assert chebyshev_terms(3.0, 4.0, 1, domain).shape == (3,)


def test_spatial_kernel_evaluation_and_fits_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    basis = make_kernel_basis(3.0, 4.0, KernelConfig())
    coefficients = rng.normal(0, 0.1, (basis.n_basis, 3))
    coefficients[0] = [1.1, 0.0, 0.0]
    kernel = SpatialKernel(basis.images, coefficients, 1, (5, 7, 204, 106), {"mode": basis.mode})
    assert kernel.size == basis.size and kernel.half == basis.half
    # constant sum (only B0 has a sum), position dependence of the image
    assert kernel.sum(5, 7) == pytest.approx(1.1, abs=1e-12)
    assert kernel.sum() == pytest.approx(1.1, abs=1e-12)
    assert not np.allclose(kernel.image(5, 7), kernel.image(204, 106))
    # at the domain centre x' = y' = 0: only the T0 column contributes
    np.testing.assert_allclose(
        kernel.image(), np.tensordot(coefficients[:, 0], basis.images, 1), atol=1e-14
    )
    grid = kernel.coefficients_at(np.array([[5.0, 50.0]]), np.array([[7.0, 60.0]]))
    assert grid.shape == (basis.n_basis, 1, 2)
    np.testing.assert_allclose(grid[:, 0, 1], kernel.coefficients_at(50.0, 60.0))
    path = tmp_path / "kernel.fits"
    kernel.write(path)
    back = SpatialKernel.read(path)
    np.testing.assert_array_equal(back.basis_images, kernel.basis_images)
    np.testing.assert_array_equal(back.coefficients, kernel.coefficients)
    assert back.domain == kernel.domain and back.order == 1
    assert back.basis_info["mode"] == "convolution"
    with fits.open(path) as hdul:
        assert hdul[0].header["KORIENT"] == "CORRELATION"
        assert "K(u,v)in(X+u,Y+v)" in hdul[0].header.comments["KORIENT"]
        assert hdul["COEFFICIENTS"].columns.names == ["BASIS", "T0X_T0Y", "T1X_T0Y", "T0X_T1Y"]
        np.testing.assert_allclose(hdul["KERNEL"].data, kernel.image())
    assert [p.name for p in tmp_path.iterdir()] == ["kernel.fits"]  # no temporary left


def test_constant_kernel():
    stamp = _gauss(2.0, half=7)
    kernel = SpatialKernel.constant(stamp)
    assert kernel.size == 15 and not kernel.is_spatially_varying
    np.testing.assert_allclose(kernel.image(123.0, -4.0), stamp)
    assert kernel.sum() == pytest.approx(1.0)


def test_spatial_kernel_repr_is_a_line_not_its_basis_images():
    # the dataclass repr printed every basis image: screens of numbers in a notebook
    text = repr(SpatialKernel.constant(_gauss(2.0, half=7)))
    assert "\n" not in text and len(text) < 200
    assert "size=15" in text and "sum=1" in text


def test_background_model(tmp_path):
    model = BackgroundModel(TRUE_BACKGROUND, 2, (10, 0, 73, 39))
    image = model.image((40, 64), xy0=(10, 0))
    assert image.dtype == np.float32 and image.shape == (40, 64)
    ys, xs = np.mgrid[0:40, 10:74]
    np.testing.assert_allclose(image, model.evaluate(xs, ys), rtol=1e-6)
    # in place, block by block (more rows than one block): array += scale * background
    tall = BackgroundModel(TRUE_BACKGROUND, 2, (0, 0, 9, 2999))
    target = np.full((3000, 10), 5.0, dtype=np.float32)
    tall.add_to(target, scale=-0.5)
    ys, xs = np.mgrid[0:3000, 0:10]
    expected = 5.0 - 0.5 * tall.evaluate(xs, ys)
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    xp, yp = 2 * (30 - 41.5) / 64, 2 * (25 - 19.5) / 40
    terms = [1, xp, yp, 2 * xp**2 - 1, xp * yp, 2 * yp**2 - 1]
    assert model.evaluate(30, 25) == pytest.approx(float(np.dot(TRUE_BACKGROUND, terms)))
    assert model.negated().evaluate(30, 25) == pytest.approx(-model.evaluate(30, 25))
    path = tmp_path / "bg.fits"
    model.write(path)
    back = BackgroundModel.read(path)
    np.testing.assert_array_equal(back.coefficients, model.coefficients)
    assert back.domain == model.domain


def test_clipped_mean_std():
    values = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 5.0]
    mean, std = clipped_mean_std(values)
    assert mean == pytest.approx(1.0, abs=1e-9)
    assert std == pytest.approx(np.std(values[:-1], ddof=1))
    assert clipped_mean_std([2.5]) == (2.5, 0.0)
    assert all(math.isnan(v) for v in clipped_mean_std([]))


# -- solver -----------------------------------------------------------------------------------


def test_fit_recovers_kernel_sum_and_shape(solution):
    """The matched PSF (kernel applied to the template PSF) is recovered across the image.

    The kernel's own pixels are not: detail finer than the template PSF is invisible
    in the images (the known AL degeneracy), so the raw images differ from the truth
    by up to ~15% of the peak while their effect on stars agrees to ~0.1%.
    """
    result, _ = solution
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)
    assert result.kernel.order == 1 and result.kernel.coefficients.shape == (27, 3)
    np.testing.assert_array_equal(result.kernel.coefficients[0, 1:], 0.0)
    truth = _true_kernel()
    psf = _gauss(TEMPLATE_SIGMA, half=6)
    peaks = []
    for x, y in [(60, 60), (450, 60), (256, 256), (60, 450), (450, 450)]:
        fitted, expected = result.kernel.image(x, y), truth.image(x, y)
        h = (fitted.shape[0] - expected.shape[0]) // 2
        expected = np.pad(expected, h) if h > 0 else expected
        matched_fit = ndimage.correlate(fitted, psf, mode="constant")
        matched_true = ndimage.correlate(expected, psf, mode="constant")
        peaks.append(matched_true.max())
        assert np.abs(matched_fit - matched_true).max() < 0.01 * matched_true.max(), (x, y)
        assert np.abs(fitted - expected).max() < 0.25 * expected.max(), (x, y)
    # the truth varies by far more than the tolerance across the frame
    assert max(peaks) / min(peaks) > 1.15


def test_fit_recovers_background(solution, pair):
    result, _ = solution
    n_pixels = result.n_good * (2 * 21 + 1 - 2 * result.kernel.half) ** 2
    # a few times the noise of a mean over the fitted pixels (higher terms are noisier)
    tolerance = 5 * 3 * SKY_SIGMA_SCI / math.sqrt(n_pixels)
    assert result.background.order == 2
    np.testing.assert_allclose(result.background.coefficients, TRUE_BACKGROUND, atol=tolerance)


def test_candidates_table_and_metadata(solution):
    result, task = solution
    table = result.candidates
    assert len(table) == 400
    assert set(table["status"]) <= {"GOOD", "BAD", "UNUSED"}
    good = table[table["status"] == "GOOD"]
    assert len(good) == result.n_good
    assert 60 <= result.n_good <= 80  # 16 cells x 5, a few may be rejected
    # residuals of kept candidates are noise-like
    assert np.all(np.abs(good["resid_mean"]) <= 0.25)
    assert np.median(good["resid_std"]) == pytest.approx(1.0, abs=0.15)
    np.testing.assert_allclose(good["ksum"], KERNEL_SUM, rtol=0.03)
    assert all(reason for reason in table[table["status"] == "BAD"]["reason"])
    meta = task.metadata
    assert meta["ALBasisNGauss"] == [3] and meta["ALKernelSize"] == [21]
    assert meta["ALBasisMode"] == ["convolution"]
    assert meta["spatialKernelSum"] == pytest.approx(result.kernel_sum)
    assert meta["nGoodCandidates"] == result.n_good
    assert meta["spatialConditionNum"] == result.condition_number > 1
    assert meta["_solveDuration"] > 0


def test_variable_star_is_rejected():
    template, science, sources, _ = _make_pair(seed=12, n_stars=120, variable=0)
    sources["flux"][0] = 1e9  # top rating in its cell, so it is visited
    config = KernelConfig()
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    row = result.candidates[0]
    assert row["status"] == "BAD"
    assert row["ksum"] > KERNEL_SUM * 1.2
    assert "kernel sum" in row["reason"]
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.01)


def test_fit_and_convolution_share_one_orientation():
    """An off-centre (asymmetric) kernel fitted, then applied, leaves only noise."""
    rng = np.random.default_rng(21)
    shape = (256, 256)
    xs, ys = rng.uniform(25, 231, (2, 150))
    fluxes = 10 ** rng.uniform(3.3, 4.7, 150)
    clean = _render_stars(shape, xs, ys, fluxes, TEMPLATE_SIGMA)
    o = np.arange(-10, 11)
    shifted = np.exp(-((o[None, :] - 0.7) ** 2 + (o[:, None] + 0.5) ** 2) / (2 * 1.2**2))
    truth = KERNEL_SUM * shifted / shifted.sum()
    science_clean = convolve_exposure(Exposure.from_arrays(clean), truth).image
    template = Exposure.from_arrays(clean + rng.normal(0, 1.0, shape), np.ones(shape))
    science = Exposure.from_arrays(
        science_clean + rng.normal(0, SKY_SIGMA_SCI, shape), np.full(shape, SKY_SIGMA_SCI**2)
    )
    sources = Table({"x": xs, "y": ys, "flux": fluxes})
    config = KernelConfig()
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    h = result.kernel.half

    def chi(kernel):
        matched = convolve_exposure(template, kernel)
        bg = result.background.image(shape)
        diff = science.image - matched.image - bg
        z = diff / np.sqrt(science.variance + matched.variance)
        return z[h:-h, h:-h].std()

    assert chi(result.kernel) == pytest.approx(1.0, abs=0.05)
    k = result.kernel
    flipped = SpatialKernel(k.basis_images[:, ::-1, ::-1], k.coefficients, k.order, k.domain)
    assert chi(flipped) > 3.0


def test_per_pixel_variance_weighting():
    template, science, sources, _ = _make_pair(seed=14, n_stars=120)
    config = KernelConfig(constant_variance_weighting=False)
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)
    # no usable variance in either image: every stamp is rejected by its own fit
    science.variance[:] = 0.0
    template.variance[:] = 0.0
    with pytest.raises(NoKernelCandidatesError, match="empty"):
        fit_psf_matching_kernel(template, science, sources, _basis(config), config)


def test_stamp_boxes_from_the_selection():
    template, science, sources, _ = _make_pair(seed=15, n_stars=120)
    ix, iy = np.floor(sources["x"] + 0.5).astype(int), np.floor(sources["y"] + 0.5).astype(int)
    sources["stamp_x0"], sources["stamp_x1"] = ix - 15, ix + 15
    sources["stamp_y0"], sources["stamp_y1"] = iy - 15, iy + 15
    sources["stamp_x1"][3] += 1  # not square: rejected
    config = KernelConfig()
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)
    assert result.candidates["status"][3] == "BAD"
    assert "not odd, square" in result.candidates["reason"][3]
    # an explicit stamp size wins over the columns
    result = fit_psf_matching_kernel(
        template, science, sources, _basis(config), config, stamp_size=51
    )
    assert result.candidates["status"][3] != "BAD"
    with pytest.raises(ValueError, match="stamp_size"):
        fit_psf_matching_kernel(template, science, sources, _basis(config), config, stamp_size=20)


def test_other_spatial_orders_and_no_background(pair):
    template, science, sources, _ = pair
    config = KernelConfig(spatial_kernel_order=0, spatial_bg_order=1)
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.kernel.coefficients.shape == (27, 1)
    assert result.background.coefficients.shape == (3,)
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)
    config = KernelConfig(spatial_kernel_order=2, fit_for_background=False)
    # without a background term the fit sees the true one only through the kernel
    science_no_bg = science.copy()
    science_no_bg.image -= BackgroundModel(TRUE_BACKGROUND, 2, DOMAIN).image(SHAPE)
    result = fit_psf_matching_kernel(template, science_no_bg, sources, _basis(config), config)
    assert result.kernel.coefficients.shape == (27, 6)
    np.testing.assert_array_equal(result.background.coefficients, 0.0)
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)


def _kernel_with_order(order):
    """The test kernel's two Gaussians with weights of the given spatial order (sum 1.3)."""
    images = np.array([_gauss(1.0), _gauss(1.4)])
    # T0, T1(x'), T1(y'), T2(x'), T1(x')T1(y'), T2(y'): weights move between the Gaussians
    varying = np.array([0.0, 0.35, 0.1, 0.3, -0.25, 0.2])[: (order + 1) * (order + 2) // 2]
    coefficients = np.zeros((2, varying.size))
    coefficients[:, 0] = 0.5 * KERNEL_SUM
    coefficients[0] += KERNEL_SUM * varying
    coefficients[1] -= KERNEL_SUM * varying
    return SpatialKernel(images, coefficients, order, DOMAIN)


def _corner_error(result, truth):
    """Largest |PSF_fit - PSF_true| at the fit region's corners and centre, as a fraction
    of the true PSF's peak, where PSF = the kernel applied to a template star."""
    star = _gauss(TEMPLATE_SIGMA, half=15)
    errors = []
    for x, y in [(40, 40), (40, 470), (470, 40), (470, 470), (255, 255)]:
        psfs = [
            ndimage.convolve(np.pad(star, k.shape[0] // 2), k[::-1, ::-1], mode="constant")
            for k in (result.kernel.image(x, y), truth.image(x, y))
        ]
        fitted, true = psfs
        side = min(fitted.shape[0], true.shape[0])
        fitted = fitted[(fitted.shape[0] - side) // 2 :][:side, (fitted.shape[1] - side) // 2 :][
            :, :side
        ]
        true = true[(true.shape[0] - side) // 2 :][:side, (true.shape[1] - side) // 2 :][:, :side]
        errors.append(np.abs(fitted - true).max() / true.max())
    return max(errors)


@pytest.mark.parametrize("true_order", [0, 1, 2])
def test_spatial_order_is_chosen_by_cross_validation(true_order):
    truth = _kernel_with_order(true_order)
    template, science, sources, _ = _make_pair(seed=21, n_stars=300, truth=truth)
    config = KernelConfig()  # choose_spatial_kernel_order is the default
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    # a varying kernel is never held constant, a constant one never given terms it lacks
    assert result.orders[0] == true_order, result.notes
    assert any("cross-validation" in note for note in result.notes)
    if true_order:
        # the order the configuration would have fixed (1) misses a quadratic variation
        fixed = KernelConfig(spatial_kernel_order=true_order - 1)
        assert not fixed.choose_spatial_kernel_order
        lower = fit_psf_matching_kernel(template, science, sources, _basis(fixed), fixed)
        assert lower.orders[0] == true_order - 1
        assert _corner_error(result, truth) < 0.5 * _corner_error(lower, truth)


def test_held_out_scores_equal_refits_without_each_fold():
    """The fast cross-validation (fold systems subtracted from the total, lower orders as
    sub-blocks) against fitting each training set from scratch with `_spatial_fit`."""
    from core import kernel as kmod

    truth = _kernel_with_order(2)
    template, science, sources, _ = _make_pair(seed=22, n_stars=200, truth=truth)
    config = KernelConfig()
    basis = _basis(config)
    fitter = kmod._Fitter(basis, config)
    bad_bits = (0, 0)
    _, cells = kmod._make_candidates(
        template, science, sources, DOMAIN, 2 * basis.size + 1, config, None, basis.half
    )
    kmod._build_until_stable(fitter, cells, config, bad_bits)
    used = kmod._visit(cells, config.n_star_per_cell)
    folds = 5
    fast = kmod._held_out_scores(fitter, used, DOMAIN, (2, 2), folds)
    assert sorted(fast) == [0, 1, 2]
    for order in range(3):
        reference = np.empty(len(used))
        for fold in range(folds):
            train = [c for i, c in enumerate(used) if i % folds != fold]
            kernel, background, _ = kmod._spatial_fit(fitter, train, config, DOMAIN, (order, 2))
            for i in range(fold, len(used), folds):
                c = used[i]
                # the background over the stamp, in its local terms
                local = fitter.background_in_stamps([c], background)[0]
                a = np.append(kernel.coefficients_at(c.x, c.y), local)
                reference[i] = a @ c.normal @ a - 2 * a @ c.rhs
        np.testing.assert_allclose(
            fast[order], reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max()
        )


def test_a_named_spatial_order_is_kept(pair):
    template, science, sources, _ = pair
    config = KernelConfig(spatial_kernel_order=2)
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.orders[0] == 2
    assert not any("cross-validation" in note for note in result.notes)


def test_fit_with_many_candidates(pair):
    # speed is measured in bench/, not here
    template, science, sources, _ = pair
    config = KernelConfig(size_cell_x=32, size_cell_y=32)
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.n_good >= 200
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)


def test_catalog_without_positions():
    template, science, _, _ = _make_pair(seed=13, n_stars=5)
    config = KernelConfig()
    with pytest.raises(InvalidCatalogError, match="'x' and 'y'"):
        fit_psf_matching_kernel(template, science, Table({"ra": [1.0]}), _basis(config), config)


def test_no_candidates_raise():
    template, science, sources, _ = _make_pair(seed=13, n_stars=5)
    config = KernelConfig()
    basis = _basis(config)
    with pytest.raises(NoKernelCandidatesError, match="All spatial cells are empty"):
        fit_psf_matching_kernel(template, science, sources[:0], basis, config)
    edge = Table({"x": [3.0, 508.0], "y": [5.0, 250.0], "flux": [1e4, 1e4]})
    with pytest.raises(NoKernelCandidatesError, match="kernel sources"):
        fit_psf_matching_kernel(template, science, edge, basis, config)
    # pure noise at the positions: every single-kernel fit fails the residual cut
    noise = Exposure.from_arrays(
        np.random.default_rng(1).normal(0, 5, SHAPE) * 10, np.full(SHAPE, 25.0)
    )
    with pytest.raises(NoKernelCandidatesError):
        fit_psf_matching_kernel(template, noise, sources, basis, config)


def test_kernel_followed_by_a_psf_is_exact():
    """Correlating by K then by P equals correlating by K.followed_by(P), K varying."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    basis = rng.normal(0.0, 1.0, (3, 7, 7))
    coefficients = np.array([[1.0, 0.0, 0.0], [0.2, 0.05, -0.03], [0.1, -0.02, 0.04]])
    kernel = SpatialKernel(basis, coefficients, 1, (0, 0, 63, 63))
    psf = np.exp(-0.5 * (np.arange(-4, 5)[:, None] ** 2 + np.arange(-4, 5) ** 2) / 1.5**2)
    psf[3, 6] += 0.3  # not symmetric: the orientation matters
    image = rng.normal(0.0, 1.0, (64, 64))
    composite = kernel.followed_by(psf)
    assert composite.size == 7 + 9 - 1
    for x, y in ((10.0, 50.0), (40.0, 20.0)):
        k = kernel.image(x, y)
        two_steps = ndimage.correlate(
            ndimage.correlate(image, k, mode="constant"), psf, mode="constant"
        )
        one_step = ndimage.correlate(image, composite.image(x, y), mode="constant")
        np.testing.assert_allclose(one_step[12:-12, 12:-12], two_steps[12:-12, 12:-12], atol=1e-10)


def test_fft_design_matrices_match_the_direct_product():
    """The FFT design matrices equal the straightforward ones: each stamp window (under
    the kernel at every fitted pixel) times every flattened basis image."""
    from numpy.lib.stride_tricks import sliding_window_view

    from core.kernel import _Fitter

    config = KernelConfig()
    basis = _basis(config)
    fitter = _Fitter(basis, config)
    rng = np.random.default_rng(12)
    k = basis.size
    flat = basis.images.reshape(basis.n_basis, -1)
    for side in (2 * k + 1, 2 * k + 1, 2 * k + 6, k):
        stamp = rng.normal(size=(side, side)) * 100.0
        direct = sliding_window_view(stamp, (k, k)).reshape(-1, k * k) @ flat.T
        got = fitter.correlate_basis(stamp)
        assert got.shape == direct.shape
        np.testing.assert_allclose(got, direct, rtol=0, atol=1e-12 * np.abs(direct).max())


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_a_pedestal_under_the_reference_goes_into_the_background(pair, offset):
    """A constant under the reference (a template's sky): the kernel is the one fitted
    without it and the background takes -offset * sum(K) (at 1e4 the kernel sum was 0.09
    for 1.3: the first basis image's column and the background's were near collinear)."""
    template, science, sources, _ = pair
    config = KernelConfig()
    plain = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    raised = template.copy()
    # in float64: float32 would round the raised pixels (by 0.008 at 1e5)
    raised.image = raised.image.astype(np.float64) + offset
    result = fit_psf_matching_kernel(raised, science, sources, _basis(config), config)
    assert result.kernel_sum == pytest.approx(plain.kernel_sum, rel=1e-6)
    np.testing.assert_allclose(
        result.kernel.coefficients, plain.kernel.coefficients, rtol=1e-6, atol=1e-9
    )
    expected = plain.background.coefficients.copy()
    expected[0] -= offset * plain.kernel_sum
    np.testing.assert_allclose(result.background.coefficients, expected, rtol=1e-6, atol=1e-6)
    assert result.condition_number == pytest.approx(plain.condition_number, rel=1e-3)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_the_fit_does_not_depend_on_the_images_units(pair, scale):
    """Both images (and their variances) in other units, as a pair in electrons instead
    of counts or in MJy/sr: the same kernel at the same spatial orders, the background
    in the new units, the same condition number (the raw eigenvalue ratio went from
    1e7 to 1e12 at x1000, and the fit was refitted with a constant kernel and sky)."""
    template, science, sources, _ = pair
    config = KernelConfig()
    plain = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    scaled = []
    for exposure in (template, science):
        copy = exposure.copy()
        copy.image = exposure.image.astype(np.float64) * scale
        copy.variance = exposure.variance.astype(np.float64) * scale**2
        scaled.append(copy)
    result = fit_psf_matching_kernel(*scaled, sources, _basis(config), config)
    assert result.orders == plain.orders
    assert result.kernel_sum == pytest.approx(plain.kernel_sum, rel=1e-6)
    np.testing.assert_allclose(
        result.kernel.coefficients, plain.kernel.coefficients, rtol=1e-5, atol=1e-9
    )
    np.testing.assert_allclose(
        result.background.coefficients,
        plain.background.coefficients * scale,
        rtol=1e-5,
        atol=1e-6 * scale * np.abs(plain.background.coefficients).max(),
    )
    assert result.condition_number == pytest.approx(plain.condition_number, rel=1e-3)


@pytest.mark.parametrize("image", ["target", "reference"])
@pytest.mark.parametrize(
    "sky",
    [(0.0, 1500.0, -1000.0, 0.0, 0.0, 0.0), (0.0, 900.0, -600.0, 500.0, 300.0, -400.0)],
    ids=["ramp", "curved"],
)
def test_a_sky_gradient_in_one_image_leaves_the_kernel(image, sky):
    """A smooth sky in one image only (moonlight, twilight, scattered light; order 2 at
    most): the kernel is the one fitted without it. With the background's terms taken at
    each stamp's centre (one constant per stamp, as Rubin) the kernel absorbed the slope
    inside the stamps: kernel sums 1.25 (ramp in the target) and 0.27 (in the reference)
    for 1.3, centroids moved 1.5 and 2.6 px."""
    template, science, sources, _ = _make_pair(n_stars=60)
    config = KernelConfig()
    plain = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    sky_image = BackgroundModel(np.array(sky), 2, DOMAIN).image(SHAPE)
    if image == "target":
        science = science.copy()
        science.image = science.image + sky_image
    else:
        template = template.copy()
        template.image = template.image + sky_image
    result = fit_psf_matching_kernel(template, science, sources, _basis(config), config)
    assert result.kernel_sum == pytest.approx(KERNEL_SUM, rel=0.005)
    assert result.kernel_sum == pytest.approx(plain.kernel_sum, rel=0.002)
    moved = np.subtract(
        kernel_centroid(result.kernel.image()), kernel_centroid(plain.kernel.image())
    )
    assert np.hypot(*moved) < 0.02
    if image == "target":  # the background took the sky
        np.testing.assert_allclose(
            result.background.coefficients, plain.background.coefficients + sky, atol=0.5
        )


@pytest.mark.parametrize("order", [0, 1, 2, 4])
def test_stamp_background_terms_are_the_global_terms_at_every_pixel(order):
    """The stamps' local background terms carry the global Chebyshev terms exactly (the
    kernel fit's background is evaluated at every pixel, not at the stamp centre)."""
    from core import kernel as kmod

    config = KernelConfig(spatial_bg_order=order)
    basis = _basis(config)
    fitter = kmod._Fitter(basis, config)
    side = 2 * basis.size + 1
    good = side - basis.size + 1
    domain = (100, 50, 2147, 1073)
    cands = [
        kmod._Candidate(i, 0.0, 0.0, 1.0, (0, 0), {"ref": np.zeros((side, side))}, centre)
        for i, centre in enumerate([(130.0, 90.0), (1500.0, 700.0), (2100.0, 1050.0)])
    ]
    maps = fitter.background_maps(cands, domain, order)
    local = fitter.local_background(good)
    offsets = np.arange(good) - (good - 1) / 2
    for cand, stamp_map in zip(cands, maps, strict=True):
        x = cand.centre[0] + offsets[None, :]
        y = cand.centre[1] + offsets[:, None]
        direct = chebyshev_terms(x, y, order, domain).reshape(-1, good * good)
        np.testing.assert_allclose(stamp_map.T @ local, direct, rtol=0, atol=1e-12)


def test_background_order_follows_what_the_stamps_pixels_determine():
    """The background's terms enter at every pixel of the stamps, so its order is limited
    by how well those pixels determine them, not by the stamp count (three stamps per
    term, the kernel's rule, lowered a curved sky on 8 stamps to a constant the kernel
    absorbed): four spread stamps on 512 px carry order 2, one stamp its plane, and on
    4096 px one stamp only a constant."""
    from core import kernel as kmod

    config = KernelConfig()
    basis = _basis(config)
    fitter = kmod._Fitter(basis, config)
    side = 2 * basis.size + 1

    def order(centres, width):
        cands = [
            kmod._Candidate(i, x, y, 1.0, (0, 0), {"ref": np.zeros((side, side))}, (x, y))
            for i, (x, y) in enumerate(centres)
        ]
        return kmod._supported_background_order(fitter, cands, (0, 0, width - 1, width - 1))

    spread = [(100.0, 100.0), (410.0, 130.0), (150.0, 410.0), (380.0, 360.0)]
    assert order(spread, 512) == 2
    assert order(spread[:1], 512) == 1
    assert order(spread[:1], 4096) == 0


@pytest.mark.parametrize("correlated", [False, True])
def test_noise_grams_are_what_the_reference_noise_adds_to_the_normal_matrix(correlated):
    """`_Fitter.noise_grams` (errors in variables) is the mean of the normal matrix a
    stamp of pure reference noise makes: its variance plane, varying across the stamp,
    and its noise correlation (a resampled template's) included."""
    from scipy.signal import correlate

    from core.kernel import _Fitter

    config = KernelConfig()
    basis = make_kernel_basis(2.0, 3.0, config)
    k = basis.size
    side = 2 * k + 1
    rng = np.random.default_rng(7)
    filt = np.array([[0.05, 0.1, 0.05], [0.1, 1.0, 0.1], [0.05, 0.1, 0.05]])
    rho = None
    if correlated:
        rho = correlate(filt, filt, mode="full") / np.sum(filt**2)
    fitter = _Fitter(basis, config, noise_correlation=rho)
    # per-pixel variance rising across the stamp (a star's Poisson noise, a gradient)
    yy, xx = np.mgrid[:side, :side]
    variance = 4.0 + 0.2 * xx + 0.1 * yy
    weight = 0.25
    total = np.zeros((basis.n_basis, basis.n_basis))
    draws = 300
    for _ in range(draws):
        white = rng.normal(size=(side + 2, side + 2))
        noise = correlate(white, filt, mode="valid") / math.sqrt(np.sum(filt**2))
        if not correlated:
            noise = white[1:-1, 1:-1]
        design = fitter.correlate_basis(noise * np.sqrt(variance))
        total += weight * design.T @ design
    measured = total / draws
    expected = fitter.noise_grams(variance[None], np.array([weight]))[0]
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    # 300 draws of 23 x 23 fitted pixels: a few percent of sampling noise
    np.testing.assert_allclose(np.diag(measured), np.diag(expected), rtol=0.08)
    assert np.max(np.abs(measured - expected) / scale) < 0.1
    # the correlation matters: white noise of that variance would miss it
    if correlated:
        white_fitter = _Fitter(basis, config)
        white = white_fitter.noise_grams(variance[None], np.array([weight]))[0]
        assert expected[0, 0] > 1.2 * white[0, 0]
