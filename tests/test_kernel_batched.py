"""The batched single-kernel fits equal the straightforward per-stamp ones.

The solver builds and assesses hundreds of stamps as stacks (separable design
matrices, one batched LU, stacked FFTs of the variance). `_Fitter.build`,
`_Fitter.assess`, `_Fitter.correlate_basis` and `_solve_normal` are the per-stamp
reference; every figure the clipping loop reads must agree with them.
"""

import copy
import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from core.basis import KernelBasis, make_kernel_basis
from core.config import KernelConfig
from core.kernel import _Candidate, _Fitter, _solve_normal, _solve_normal_many

BAD_BITS = (1, 1)


def _bases():
    config = KernelConfig()
    yield make_kernel_basis(2.5, 4.0, config)  # convolution, default degrees
    yield make_kernel_basis(4.0, 2.5, config)  # deconvolution
    yield make_kernel_basis(None, None, config.model_copy(update={"alard_deg_gauss": [3, 1, 0]}))


@pytest.mark.parametrize("basis", list(_bases()), ids=["conv", "deconv", "config"])
def test_separable_design_matrices_equal_the_direct_product(basis):
    fitter = _Fitter(basis, KernelConfig())
    rng = np.random.default_rng(3)
    k = basis.size
    flat = basis.images.reshape(basis.n_basis, -1)
    for side in (2 * k + 1, k + 4):
        stamps = rng.normal(size=(5, side, side)) * 100.0 + 50.0
        got = fitter.design_matrices(stamps)
        for stamp, rows in zip(stamps, got, strict=True):
            design = rows.T
            direct = sliding_window_view(stamp, (k, k)).reshape(-1, k * k) @ flat.T
            np.testing.assert_allclose(design, direct, rtol=0, atol=1e-12 * np.abs(direct).max())
            np.testing.assert_allclose(
                design, fitter.correlate_basis(stamp), rtol=0, atol=1e-12 * np.abs(direct).max()
            )


def test_design_matrices_without_a_separable_form_use_the_fft():
    basis = make_kernel_basis(2.5, 4.0, KernelConfig())
    plain = KernelBasis(
        basis.images, basis.sigmas, basis.degrees, basis.mode, basis.size, basis.half
    )
    fitter = _Fitter(plain, KernelConfig())
    stamps = np.random.default_rng(4).normal(size=(3, 2 * basis.size + 1, 2 * basis.size + 1))
    got = fitter.design_matrices(stamps)
    for stamp, rows in zip(stamps, got, strict=True):
        np.testing.assert_array_equal(rows.T, fitter.correlate_basis(stamp))
    good = stamps.shape[1] - basis.size + 1
    extra = np.random.default_rng(5).normal(size=(3, good * good))
    with_rows = fitter.design_matrices(stamps, extra)
    np.testing.assert_array_equal(with_rows[:, :-3], got)
    assert np.all(with_rows[:, -3:] == extra)


def test_batched_solves_equal_single_solves():
    rng = np.random.default_rng(5)
    m = 12
    matrices, vectors = [], []
    for _ in range(6):
        a = rng.normal(size=(40, m))
        matrices.append(a.T @ a)
        vectors.append(rng.normal(size=m))
    singular = rng.normal(size=(m, 3))
    matrices.append(singular @ singular.T)  # rank 3: the eigen pseudo-inverse
    vectors.append(rng.normal(size=m))
    matrices.append(np.full((m, m), np.nan))
    vectors.append(np.ones(m))
    matrices.append(np.eye(m))
    vectors.append(np.full(m, np.inf))
    got = _solve_normal_many(np.array(matrices), np.array(vectors))
    for a, b, x in zip(matrices, vectors, got, strict=True):
        expected = _solve_normal(a, b)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(expected))
        ok = np.isfinite(expected)
        np.testing.assert_allclose(x[ok], expected[ok], rtol=1e-9, atol=1e-12)
    assert np.isfinite(got[6]).all() and np.isnan(got[7]).all() and np.isnan(got[8]).all()


def _candidates(basis, n, rng):
    """Star stamps: the reference star blurred by a Gaussian, plus noise and a sloped background,
    with a NaN stamp, a zero-variance stamp and masked pixels among them."""
    side = 2 * basis.size + 1
    o = np.arange(side) - side // 2
    cands = []
    for i in range(n):
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        r2 = (o[None, :] - dx) ** 2 + (o[:, None] - dy) ** 2
        flux = rng.uniform(1e3, 1e5)
        ref = flux * np.exp(-r2 / (2 * 1.5**2)) / (2 * math.pi * 1.5**2)
        # a background with a gradient: the stamp's plane
        tgt = 1.2 * ndimage.gaussian_filter(ref, 1.3) + 7.0 + 0.3 * o[None, :] - 0.2 * o[:, None]
        ref_var = np.full((side, side), 4.0) + 0.01 * np.abs(ref)
        tgt_var = np.full((side, side), 25.0) + 0.01 * np.abs(tgt)
        ref = ref + rng.normal(size=ref.shape) * np.sqrt(ref_var)
        tgt = tgt + rng.normal(size=tgt.shape) * np.sqrt(tgt_var)
        ref_mask = np.zeros((side, side), dtype=np.int32)
        tgt_mask = np.zeros((side, side), dtype=np.int32)
        if i == 1:
            ref[3, 5] = np.nan
        if i == 2:
            tgt_var[side // 2, side // 2] = ref_var[side // 2, side // 2] = 0.0
        if i == 3:
            ref_mask[side // 2 + 4, side // 2 - 3] = 1
            tgt_mask[side // 2, side // 2 + 2] = 1
        stamps = {
            "ref": ref,
            "ref_var": ref_var,
            "ref_mask": ref_mask,
            "tgt": tgt,
            "tgt_var": tgt_var,
            "tgt_mask": tgt_mask,
        }
        cands.append(_Candidate(i, 0.0, 0.0, flux, (0, 0), stamps))
    return cands


@pytest.mark.parametrize("constant", [True, False], ids=["constant-weight", "pixel-weight"])
@pytest.mark.parametrize("core_stats", [False, True], ids=["stamp", "core"])
def test_batched_builds_and_assessments_equal_the_per_stamp_ones(constant, core_stats):
    config = KernelConfig(constant_variance_weighting=constant, use_core_stats=core_stats)
    basis = make_kernel_basis(2.5, 4.0, config)
    rng = np.random.default_rng(8)
    cands = _candidates(basis, 45, rng)  # more than one chunk
    reference = copy.deepcopy(cands)
    single = _Fitter(basis, config)
    for cand in reference:
        single.build(cand, BAD_BITS)
    batched = _Fitter(basis, config)
    batched.build_many(cands, BAD_BITS)
    n_fitted = 0
    for got, want in zip(cands, reference, strict=True):
        assert got.built and want.built
        assert (got.status, got.reason) == (want.status, want.reason)
        if want.design is None:
            assert got.design is None
            continue
        n_fitted += 1
        np.testing.assert_allclose(got.design, want.design, rtol=0, atol=1e-11 * 1e5)
        scale = np.abs(want.normal).max()
        np.testing.assert_allclose(got.normal, want.normal, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(
            got.rhs, want.rhs, rtol=1e-10, atol=1e-12 * np.abs(want.rhs).max()
        )
        np.testing.assert_allclose(got.ksum, want.ksum, rtol=1e-8)
        np.testing.assert_allclose(got.resid_mean, want.resid_mean, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.resid_std, want.resid_std, rtol=1e-7)
        np.testing.assert_array_equal(got.stamps["bad"], want.stamps["bad"])
    assert n_fitted >= 40
    assert cands[1].status == "BAD" and "non-finite" in cands[1].reason
    if not constant:
        assert cands[2].status == "BAD" and "variance" in cands[2].reason
    assert cands[3].stamps["bad"].sum() > 1  # the reference mask grown under the kernel

    # an assessment with other coefficients (as the spatial fit makes)
    fitted = [i for i, c in enumerate(cands) if c.design is not None]
    coefficients = rng.normal(size=(len(fitted), basis.n_basis)) * 0.01
    coefficients[:, 0] = 1.2
    backgrounds = rng.normal(size=(len(fitted), batched.n_local))  # local terms
    backgrounds[:, 0] += 7.0
    batched.assess_many([cands[i] for i in fitted], coefficients, backgrounds)
    for row, i in enumerate(fitted):
        single.assess(reference[i], coefficients[row], backgrounds[row], clip=False)
        np.testing.assert_allclose(cands[i].resid_mean, reference[i].resid_mean, rtol=1e-9)
        np.testing.assert_allclose(cands[i].resid_std, reference[i].resid_std, rtol=1e-9)
        assert cands[i].status == reference[i].status == "GOOD"
