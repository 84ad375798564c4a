"""Tests of core.psf: PSF models, adaptive moments and PSF estimation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import PsfError
from core.psf import (
    SIGMA_TO_FWHM,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    adaptive_moments,
    shift_stamp,
)


# --------------------------------------------------------------------------------------
# models and moments
@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0, 4.5])
def test_gaussian_adaptive_sigma_exact(sigma):
    psf = GaussianPsf(sigma)
    assert psf.sigma() == pytest.approx(sigma, rel=1e-4)
    assert psf.fwhm() == pytest.approx(SIGMA_TO_FWHM * sigma, rel=1e-4)


def test_undersampled_gaussian_sigma_close():
    # sigma = 1 px: the matched-weight product is sampled at 0.7 px, which biases
    # the discrete moments by about 0.2%
    assert GaussianPsf(1.0).sigma() == pytest.approx(1.0, rel=3e-3)


def test_elliptical_gaussian_moments():
    sigma, e, angle = 2.5, 0.3, 0.6
    psf = GaussianPsf(sigma, ellipticity=e, angle=angle, size=31)
    ixx, iyy, ixy = psf.moments()
    a2, b2 = sigma**2, (sigma * (1 - e)) ** 2
    c, s = math.cos(angle), math.sin(angle)
    assert ixx == pytest.approx(a2 * c * c + b2 * s * s, rel=1e-4)
    assert iyy == pytest.approx(a2 * s * s + b2 * c * c, rel=1e-4)
    assert ixy == pytest.approx((a2 - b2) * c * s, rel=1e-4)


def test_adaptive_moments_off_centre_gaussian():
    # a Gaussian shifted by a sub-pixel offset keeps its moments
    stamp = shift_stamp(GaussianPsf(2.0, size=31).kernel_image(), 0.3, -0.4)
    ixx, iyy, ixy = adaptive_moments(stamp)
    assert ixx == pytest.approx(4.0, rel=1e-3)
    assert iyy == pytest.approx(4.0, rel=1e-3)
    assert abs(ixy) < 4e-3


def test_moffat_stamp_properties():
    psf = MoffatPsf(5.0, beta=3.0)
    stamp = psf.kernel_image()
    assert stamp.shape[0] % 2 == 1 and stamp.shape[0] >= 35
    assert stamp.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(np.argmax(stamp), stamp.shape) == (stamp.shape[0] // 2,) * 2
    # the true FWHM: half maximum at r = fwhm/2 along the x axis of the profile
    alpha = 5.0 / (2 * math.sqrt(2 ** (1 / 3) - 1))
    assert (1 + (2.5 / alpha) ** 2) ** -3 == pytest.approx(0.5, rel=1e-12)
    # the central row of the stamp crosses half its peak near +-2.5 px (pixel-integrated)
    row = stamp[stamp.shape[0] // 2]
    half = row.max() / 2
    centre = len(row) // 2
    k = centre + np.nonzero(row[centre:] < half)[0][0]
    r_half = (k - 1) + (row[k - 1] - half) / (row[k - 1] - row[k]) - centre
    assert r_half == pytest.approx(2.5, rel=0.03)


@pytest.mark.parametrize("beta,ratio", [(3.0, 1.14), (4.765, 1.085)])
def test_moffat_adaptive_fwhm_relation(beta, ratio):
    # documented relation between Rubin's adaptive FWHM and the true Moffat FWHM
    psf = MoffatPsf(5.23, beta=beta)
    assert psf.fwhm() / psf.true_fwhm == pytest.approx(ratio, rel=0.01)


def test_moffat_elliptical_axes():
    psf = MoffatPsf(6.0, ellipticity=0.25, angle=0.0)
    ixx, iyy, ixy = psf.moments()
    assert math.sqrt(iyy / ixx) == pytest.approx(0.75, rel=0.02)
    assert abs(ixy) < 1e-6 * ixx


def test_bad_parameters_raise():
    with pytest.raises(PsfError):
        MoffatPsf(-1.0)
    with pytest.raises(PsfError):
        MoffatPsf(3.0, beta=1.0)
    with pytest.raises(PsfError):
        MoffatPsf(3.0, size=20)
    with pytest.raises(PsfError):
        GridPsf(np.ones((2, 2, 5, 5)), [0, 10, 20], [0, 10])
    with pytest.raises(PsfError):
        GridPsf(np.ones((2, 2, 4, 4)), [0, 10], [0, 10])
    with pytest.raises(PsfError):
        GridPsf(np.ones((2, 2, 5, 5)), [10, 0], [0, 10])


def _grid(sigmas_yx, size=25):
    return np.array([[GaussianPsf(s, size=size).kernel_image() for s in row] for row in sigmas_yx])


def test_grid_psf_interpolation():
    stamps = _grid([[1.5, 2.0], [2.5, 3.0]])
    psf = GridPsf(stamps, [0.0, 100.0], [0.0, 200.0])
    assert psf.average_position == (50.0, 100.0)
    # at nodes: the node stamp exactly
    np.testing.assert_allclose(psf.kernel_image(0, 0), stamps[0, 0], atol=1e-15)
    np.testing.assert_allclose(psf.kernel_image(100, 200), stamps[1, 1], atol=1e-15)
    # clamped outside the node range
    np.testing.assert_allclose(psf.kernel_image(-50, 500), stamps[1, 0], atol=1e-15)
    # bilinear in between
    expected = 0.75 * (0.7 * stamps[0, 0] + 0.3 * stamps[0, 1]) + 0.25 * (
        0.7 * stamps[1, 0] + 0.3 * stamps[1, 1]
    )
    np.testing.assert_allclose(psf.kernel_image(30, 50), expected / expected.sum(), atol=1e-14)
    # default position: the centre of the node range, an equal blend of the four
    centre = stamps.mean(axis=(0, 1))
    np.testing.assert_allclose(psf.kernel_image(), centre / centre.sum(), atol=1e-14)
    assert psf.kernel_image(30, 50).sum() == pytest.approx(1.0, abs=1e-12)
    # size grows from corner to corner
    assert psf.fwhm(0, 0) < psf.fwhm(50, 100) < psf.fwhm(100, 200)


def test_grid_psf_single_node_axis():
    stamps = _grid([[1.5, 3.0]])
    psf = GridPsf(stamps, [0.0, 100.0], [50.0])
    np.testing.assert_allclose(psf.kernel_image(0, -1000), stamps[0, 0], atol=1e-15)
    assert psf.average_position == (50.0, 50.0)


def test_image_psf_shift_keeps_centroid():
    psf = ImagePsf(GaussianPsf(2.0, size=25).kernel_image())
    stamp, x_min, y_min = psf.image_at(10.3, 20.8)
    yy, xx = np.mgrid[0 : stamp.shape[0], 0 : stamp.shape[1]]
    assert (stamp * xx).sum() + x_min == pytest.approx(10.3, abs=1e-3)
    assert (stamp * yy).sum() + y_min == pytest.approx(20.8, abs=1e-3)
