"""Tests of the Alard-Lupton basis (algorithm.md section 2)."""

import math

import numpy as np
import pytest

from core.basis import FWHM_TO_SIGMA, kernel_size_for, make_kernel_basis
from core.config import KernelConfig

S2F = 1.0 / FWHM_TO_SIGMA
ROOT2 = math.sqrt(2.0)

# (convolved sigma, matched-to sigma, mode, basis sigmas, size): the worked table of 2.3
TABLE = [
    (2.0, 2.4, "convolution", (0.7, 1.4, 2.8), 21),
    (2.4, 2.4, "config", (0.7, 1.5, 3.0), 21),
    (2.4, 2.8, "convolution", (0.721, 1.442, 2.884), 21),
    (2.4, 2.0, "deconvolution", (0.663, 1.327, 2.653), 21),
    (9.5, 2.8, "deconvolution", (4.539, 9.078, 18.156), 35),
    (2.0, 2.4 * ROOT2, "convolution", (1.371, 2.742, 5.485), 33),
    (2.4, 2.4 * ROOT2, "convolution", (1.2, 2.4, 4.8), 29),
    (2.8, 2.4 * ROOT2, "convolution", (0.959, 1.918, 3.837), 23),
]


@pytest.mark.parametrize(("s_conv", "s_match", "mode", "sigmas", "size"), TABLE)
def test_worked_table(s_conv, s_match, mode, sigmas, size):
    config = KernelConfig()
    basis = make_kernel_basis(s_conv * S2F, s_match * S2F, config)
    assert basis.mode == mode
    np.testing.assert_allclose(basis.sigmas, sigmas, atol=6e-4)
    assert basis.size == size
    assert basis.half == size // 2
    assert basis.images.shape == (27, size, size)
    assert kernel_size_for(s_conv * S2F, s_match * S2F, config) == size


def test_config_fallback_uses_configured_size():
    # scaling named on: kernel_size alone would turn it off (the size is then the caller's)
    config = KernelConfig(kernel_size=25, scale_by_fwhm=True)
    basis = make_kernel_basis(None, 3.0, config)
    assert basis.mode == "config"
    assert basis.size == 25
    assert basis.sigmas == (0.7, 1.5, 3.0)
    assert kernel_size_for(3.0, None, config) == 25
    # equal PSFs: configured sigmas but the size is recomputed from them (int(18) -> 19 -> 21)
    assert make_kernel_basis(4.0, 4.0, config).size == 21


def test_scale_by_fwhm_off():
    config = KernelConfig(scale_by_fwhm=False, kernel_size=23)
    basis = make_kernel_basis(3.0, 6.0, config)
    assert basis.mode == "config" and basis.size == 23


def test_renormalisation():
    basis = make_kernel_basis(2.0 * S2F, 2.8 * S2F, KernelConfig())
    sums = basis.images.sum(axis=(1, 2))
    l2 = (basis.images**2).sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(l2[1:], 1.0, atol=1e-12)
    # B0 is the first unit-sum Gaussian
    half = basis.half
    o = np.arange(-half, half + 1)
    g = np.exp(-(o[None, :] ** 2 + o[:, None] ** 2) / (2 * basis.sigmas[0] ** 2))
    np.testing.assert_allclose(basis.images[0], g / g.sum(), atol=1e-14)


def test_orientation_and_term_order():
    """Term 1 is G1*x (odd in the column offset), term 2 is G1*y (odd in the row offset)."""
    basis = make_kernel_basis(None, None, KernelConfig())
    h = basis.half
    bx, by = basis.images[1], basis.images[2]
    assert bx[h, h + 3] > 0 > bx[h, h - 3]
    np.testing.assert_allclose(bx, -bx[:, ::-1], atol=1e-15)
    assert by[h + 3, h] > 0 > by[h - 3, h]
    np.testing.assert_allclose(by, -by[::-1, :], atol=1e-15)
    np.testing.assert_allclose(bx, by.T, atol=1e-15)
    # the sixteenth image starts the second Gaussian: unit-sum G2 minus B0, L2-normalised
    assert basis.images[15].sum() == pytest.approx(0.0, abs=1e-12)
    assert basis.images[15][h, h] < 0  # narrow B0 dominates the centre


def test_custom_gaussians_and_bad_lists():
    config = KernelConfig(alard_n_gauss=2, alard_deg_gauss=[2, 1], alard_sig_gauss=[1.0, 2.0])
    basis = make_kernel_basis(None, None, config)
    assert basis.n_basis == 6 + 3
    single = make_kernel_basis(
        2.0 * S2F,
        3.0 * S2F,
        KernelConfig(alard_n_gauss=1, alard_deg_gauss=[2], alard_sig_gauss=[1.0]),
    )
    assert single.sigmas == pytest.approx((math.sqrt(5.0),))
    with pytest.raises(ValueError, match="odd"):
        KernelConfig(kernel_size=20)
    with pytest.raises(ValueError, match="alard_n_gauss"):
        KernelConfig(alard_deg_gauss=[4, 2])


def test_metadata_keys():
    meta = make_kernel_basis(4.0, 5.0, KernelConfig()).metadata()
    assert meta["ALBasisNGauss"] == 3
    assert meta["ALBasisDegGauss"] == [4, 2, 2]
    assert meta["ALBasisMode"] == "convolution"
    assert meta["ALKernelSize"] == 21


def test_separable_factors_and_transform_rebuild_the_images():
    basis = make_kernel_basis(2.4 * S2F, 2.0 * S2F, KernelConfig())
    raw = []
    for factor, powers in basis.separable_factors():
        raw.extend(np.outer(factor[py], factor[px]) for px, py in powers)
    raw = np.array(raw)
    assert raw.shape == basis.images.shape
    rebuilt = np.tensordot(basis.transform, raw, axes=(1, 0))
    np.testing.assert_allclose(rebuilt, basis.images, atol=1e-12)
    # raw term 1 is G1 * (u/h): odd in the column offset
    assert raw[1][basis.half, -1] > 0 > raw[1][basis.half, 0]


def test_a_given_kernel_size_is_the_size_used():
    # {"kernel": {"kernel_size": 15}} was silently replaced by the size scaled from the
    # PSFs (scale_by_fwhm stayed on): a library user's kernel stayed 21 px
    config = KernelConfig(kernel_size=15)
    assert not config.scale_by_fwhm
    assert kernel_size_for(4.0, 3.0, config) == 15
    assert make_kernel_basis(4.0, 3.0, config).images.shape[1:] == (15, 15)
    # both named: the caller's choice stands (the dump of `alsub config` names both)
    assert KernelConfig(kernel_size=15, scale_by_fwhm=True).scale_by_fwhm
    assert kernel_size_for(4.0, 3.0, KernelConfig()) != 15
