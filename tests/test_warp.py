"""Lanczos-3 warping (core/warp.py): positions, flux, variance, noise correlation, masks, PSF."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.wcs import WCS

from core.exposure import Exposure
from core.psf import GaussianPsf
from core.warp import (
    PixelMap,
    _jacobian_determinant,
    _warp_affine,
    lanczos_weights,
    warp_exposure,
    warp_noise_correlation,
)
from tests.conftest import add_point_source


def _rotation(degrees: float, scale: float = 1.0) -> np.ndarray:
    phi = math.radians(degrees)
    return scale * np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])


def _autocorrelation(image: np.ndarray, radius: int) -> np.ndarray:
    """Empirical normalised autocorrelation of a (noise) image."""
    data = image.astype(np.float64) - image.mean()
    ny, nx = data.shape
    out = np.zeros((2 * radius + 1, 2 * radius + 1))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            a = data[max(0, dy) : ny + min(0, dy), max(0, dx) : nx + min(0, dx)]
            b = data[max(0, -dy) : ny + min(0, -dy), max(0, -dx) : nx + min(0, -dx)]
            out[dy + radius, dx + radius] = np.mean(a * b)
    return out / out[radius, radius]


def _centroid(image: np.ndarray, x: float, y: float, half: int = 9):
    """First-moment centroid and sum in a box around (x, y)."""
    ix, iy = int(round(x)), int(round(y))
    cut = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
    yy, xx = np.mgrid[iy - half : iy + half + 1, ix - half : ix + half + 1]
    return (cut * xx).sum() / cut.sum(), (cut * yy).sum() / cut.sum(), cut.sum()


def _white_noise(size: int, seed: int = 1) -> Exposure:
    rng = np.random.default_rng(seed)
    return Exposure.from_arrays(rng.standard_normal((size, size)).astype(np.float32))


def test_lanczos_weights_interpolate_and_sum_to_one():
    frac = np.array([0.0, 0.25, 0.5, 0.9])
    weights = lanczos_weights(frac)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(weights[:, 0], [0, 0, 1, 0, 0, 0], atol=1e-4)
    # symmetric about the half-pixel: weights at t and 1 - t mirror each other
    np.testing.assert_allclose(weights[:, 2], weights[::-1, 2], atol=1e-6)
    # the nearer tap dominates, the far ones are negative lobes
    assert weights[2, 1] > weights[3, 1] > 0 > weights[1, 1]


@pytest.mark.parametrize(
    ("matrix", "offset"),
    [
        (np.eye(2), (0.3, 0.7)),  # pure sub-pixel translation
        (_rotation(30.0, 1.02), (180.3, -90.6)),  # rotated, scaled, shifted grid
    ],
)
def test_noise_correlation_predicts_warped_white_noise(matrix, offset):
    pixel_map = PixelMap.affine(matrix, offset)
    predicted = warp_noise_correlation(pixel_map, (512, 512), radius=3)
    box = np.s_[106:406, 106:406]  # inside the template for both maps
    measured = np.zeros_like(predicted)
    for seed in (1, 2, 3):
        warped = warp_exposure(_white_noise(640, seed), pixel_map, (512, 512))
        assert np.all(warped.mask[box] == 0)
        measured += _autocorrelation(warped.image[box], 3) / 3
    np.testing.assert_allclose(predicted, warped.noise_correlation[2:-2, 2:-2], atol=1e-12)
    # each measured lag scatters by ~0.006 (3 x 300^2 correlated pixels)
    np.testing.assert_allclose(measured, predicted, atol=0.02)
    off_centre = np.abs(predicted - np.eye(7)[3][:, None] * np.eye(7)[3][None, :])
    assert off_centre.max() > 0.1  # the interpolation does correlate neighbours
    # the variance plane is honest pixel by pixel: sum of squared weights times 1
    z = warped.image[box] / np.sqrt(warped.variance[box])
    assert np.std(z) == pytest.approx(1.0, abs=0.01)
    assert np.mean(warped.variance[box]) < 0.9  # interpolation averages noise down


def test_translation_moves_stars_and_conserves_flux():
    psf = GaussianPsf(1.5)
    image = np.zeros((200, 220), dtype=np.float32)
    stars = [(60.3, 70.8, 1000.0), (150.6, 120.2, 5000.0)]
    for x, y, flux in stars:
        add_point_source(image, psf, x, y, flux)
    template = Exposure.from_arrays(image, psf=psf)
    # output pixel (x, y) sits at template (x + 12.37, y - 5.61)
    pixel_map = PixelMap.affine(np.eye(2), (12.37, -5.61))
    warped = warp_exposure(template, pixel_map, (190, 190))
    for x, y, flux in stars:
        xc, yc, total = _centroid(image, x, y)
        xo, yo, warped_total = _centroid(warped.image, x - 12.37, y + 5.61)
        assert warped_total == pytest.approx(total, rel=2e-3)
        assert total == pytest.approx(flux, rel=2e-3)
        # Lanczos-3 reproduces a linear ramp only to ~0.02 px (phase dependent)
        assert xo == pytest.approx(xc - 12.37, abs=0.02)
        assert yo == pytest.approx(yc + 5.61, abs=0.02)


def test_rotated_scaled_grid_conserves_flux_and_positions_and_transforms_psf():
    psf = GaussianPsf(1.6, ellipticity=0.2, angle=0.3)
    image = np.zeros((300, 300), dtype=np.float32)
    stars = [(120.4, 130.7, 3000.0), (180.2, 170.9, 8000.0), (140.6, 190.1, 2000.0)]
    for x, y, flux in stars:
        add_point_source(image, psf, x, y, flux)
    template = Exposure.from_arrays(image, psf=psf)
    matrix = _rotation(30.0, 1.0 / 1.02)  # template pixels 2% larger, grid turned 30 deg
    offset = np.array([150.0, 150.0]) - matrix @ np.array([128.0, 128.0])
    pixel_map = PixelMap.affine(matrix, offset)
    warped = warp_exposure(template, pixel_map, (256, 256))
    inverse = np.linalg.inv(matrix)
    for x, y, _flux in stars:
        xc, yc, total = _centroid(image, x, y)
        xo, yo = inverse @ (np.array([xc, yc]) - offset)
        xw, yw, warped_total = _centroid(warped.image, xo, yo, half=10)
        # counts are conserved: the warped image carries the Jacobian
        assert warped_total == pytest.approx(total, rel=3e-3)
        assert xw == pytest.approx(xo, abs=0.02)
        assert yw == pytest.approx(yo, abs=0.02)
    # the warped PSF describes the warped stars: same second moments
    x, y, flux = stars[1]
    xo, yo = inverse @ (np.array([x, y]) - offset)
    star = warped.image[int(round(yo)) - 10 : int(round(yo)) + 11, :][
        :, int(round(xo)) - 10 : int(round(xo)) + 11
    ]
    from core.psf import adaptive_moments

    star_moments = adaptive_moments(star)
    psf_moments = warped.psf.moments(xo, yo)
    np.testing.assert_allclose(star_moments, psf_moments, atol=0.03 * star_moments[0])
    # and differs from the template's own PSF (turned by 30 degrees)
    assert abs(psf_moments[2] - psf.moments()[2]) > 0.1


def test_masks_no_data_outside_and_bits_grown_by_the_footprint():
    rng = np.random.default_rng(3)
    template = Exposure.from_arrays(rng.normal(100, 1, (100, 100)).astype(np.float32))
    template.set_plane("BAD", np.zeros((100, 100), bool) | (np.arange(100) == 40)[None, :])
    template.image[70, 20] = np.nan  # a non-finite pixel: NO_DATA around it after the warp
    # output 120x120 grid starting 10 px left/below the template: a frame of it is uncovered
    pixel_map = PixelMap.affine(np.eye(2), (-10.5, -10.5))
    warped = warp_exposure(template, pixel_map, (130, 130))
    no_data = warped.masked(["NO_DATA"])
    bad = warped.masked(["BAD"])
    # uncovered pixels (and those whose 6x6 taps leave the template) are NO_DATA with image 0
    assert no_data[:, :12].all() and no_data[:12, :].all() and no_data[:, 108:].all()
    assert not no_data[30:70, 35:45].any()
    assert np.all(warped.image[no_data] == 0)
    assert np.all(np.isfinite(warped.image)) and np.all(warped.variance > 0)
    # the NaN at template (20, 70) -> output (30.5, 80.5): its whole footprint is NO_DATA
    assert no_data[78:84, 28:34].all()
    # the bad column at template x=40 (output x=50.5) is grown over the interpolation taps
    assert bad[40:90, 48:54].all() and not bad[40:90, 44].any() and not bad[40:90, 57].any()
    # coverage counts against the template fraction: about (100 - 6)^2 / 130^2
    assert 1 - no_data.mean() == pytest.approx(94**2 / 130**2, abs=0.03)


def _tangent_points_apart():
    """(science, template WCS): TAN projections, tangent points 1 deg apart, 20"/px."""
    science_wcs = WCS(naxis=2)
    science_wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    science_wcs.wcs.crval = [150.0, 2.0]
    science_wcs.wcs.crpix = [128.5, 128.5]
    science_wcs.wcs.cdelt = [-20 / 3600, 20 / 3600]  # 20"/px: a wide field bends
    template_wcs = science_wcs.deepcopy()
    template_wcs.wcs.crval = [151.0, 3.0]
    template_wcs.wcs.crpix = [128.5 - 180.0, 128.5 + 180.0]  # roughly the same sky
    return science_wcs, template_wcs


def test_non_affine_wcs_pair_is_followed_exactly():
    """Two TAN projections with tangent points 1 deg apart: the map is not affine."""
    science_wcs, template_wcs = _tangent_points_apart()
    science = Exposure.from_arrays(np.zeros((256, 256)), wcs=science_wcs)
    psf = GaussianPsf(1.5)
    image = np.zeros((400, 400), dtype=np.float32)
    grid = [(x, y) for x in (40.0, 128.0, 215.0) for y in (40.0, 128.0, 215.0)]
    targets = []
    for x, y in grid:
        sky = science_wcs.pixel_to_world_values(x, y)
        u, v = (float(c) for c in template_wcs.world_to_pixel_values(*sky))
        add_point_source(image, psf, u, v, 1000.0)
        targets.append((x, y))
    template = Exposure.from_arrays(image, wcs=template_wcs, psf=psf)
    pixel_map = PixelMap.from_wcs(science, template)
    assert not pixel_map.is_affine  # 1 deg off the tangent point, 20"/px: not linear
    warped = warp_exposure(template, pixel_map, science.shape, wcs=science_wcs)
    for x, y in targets:
        ix, iy = int(round(x)), int(round(y))
        cut = warped.image[iy - 7 : iy + 8, ix - 7 : ix + 8].astype(np.float64)
        yy, xx = np.mgrid[iy - 7 : iy + 8, ix - 7 : ix + 8]
        assert (cut * xx).sum() / cut.sum() == pytest.approx(x, abs=0.02)
        assert (cut * yy).sum() / cut.sum() == pytest.approx(y, abs=0.02)
        assert cut.sum() == pytest.approx(
            1000.0 * abs(np.linalg.det(pixel_map.jacobian(x, y))), rel=5e-3
        )


def _direct_lanczos(image, variance, pixel_map, shape):
    """Reference: the plain per-pixel 6 x 6 Lanczos-3 sum with exactly evaluated weights."""
    ny, nx = shape
    out_image = np.full(shape, np.nan)
    out_var = np.full(shape, np.nan)
    h, w = image.shape
    for y in range(ny):
        for x in range(nx):
            u, v = (float(c) for c in pixel_map(x, y))
            bu, bv = math.floor(u), math.floor(v)
            if bu - 2 < 0 or bv - 2 < 0 or bu + 3 >= w or bv + 3 >= h:
                continue
            wu = lanczos_weights(np.array([u - bu]))[:, 0]
            wv = lanczos_weights(np.array([v - bv]))[:, 0]
            weights = np.outer(wv, wu).astype(np.float64)
            cut = np.s_[bv - 2 : bv + 4, bu - 2 : bu + 4]
            out_image[y, x] = (weights * image[cut]).sum()
            out_var[y, x] = (weights**2 * variance[cut]).sum()
    return out_image, out_var


@pytest.mark.parametrize(
    ("kind", "matrix", "offset", "image_tol"),
    [
        # a shift is separable: the fast path is the direct sum (weights tabulated every 1/8192 px)
        ("shift", np.eye(2), (3.37, -2.61), 2e-4),
        # two passes (Catmull-Smith) differ from the 2-D sum by interpolation error only
        ("affine", _rotation(30.0, 1 / 1.02), (20.3, -8.6), 5e-3),
        ("near identity", _rotation(0.3, 1.001), (2.3, 1.6), 2e-3),
        # past 45 degrees: the input is read transposed and flipped (frame-wide copy)
        (
            "turned 100",
            _rotation(100.0, 1.01),
            tuple(np.array([23.6, 24.2]) - _rotation(100.0, 1.01) @ np.array([19.5, 19.5])),
            5e-3,
        ),
    ],
)
def test_fast_paths_match_a_direct_per_pixel_lanczos_sum(kind, matrix, offset, image_tol):
    rng = np.random.default_rng(7)
    size = 48
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size))
    centres = rng.uniform(8, 40, (12, 2))
    for (x0, y0), flux in zip(centres, rng.uniform(1, 5, 12), strict=True):
        image += flux * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 2.0**2)
    image += rng.normal(0, 0.002, image.shape)  # some high-frequency content too
    variance = rng.uniform(0.5, 2.0, image.shape)  # non-uniform: each pixel's weight^2 counts
    template = Exposure.from_arrays(image.astype(np.float32), variance=variance.astype(np.float32))
    pixel_map = PixelMap.affine(matrix, offset)
    warped = warp_exposure(template, pixel_map, (40, 40))
    expected_image, expected_var = _direct_lanczos(image, variance, pixel_map, (40, 40))
    det = abs(np.linalg.det(matrix))
    covered = np.isfinite(expected_image) & ~warped.masked(["NO_DATA"])
    assert covered.sum() > 400
    peak = np.abs(image).max()
    error = np.abs(warped.image[covered] - det * expected_image[covered]).max() / peak
    assert error < image_tol, (kind, error)
    if kind == "shift":  # the same weights as the 2-D sum: the same variance
        np.testing.assert_allclose(warped.variance[covered], expected_var[covered], rtol=1e-4)
        return
    # two passes apply other weights than the 2-D sum; the variance must be the exact
    # sum of squares of the weights they do apply: measured here with unit impulses
    weights = np.zeros((40, 40, size, size))
    for j in range(size):
        for i in range(size):
            impulse = np.zeros((size, size), np.float32)
            impulse[j, i] = 1.0
            weights[:, :, j, i], _, _ = _warp_affine(
                impulse, impulse, pixel_map.matrix, pixel_map.offset, 40, 40
            )
    exact = np.einsum("yxji,ji->yx", np.nan_to_num(weights) ** 2, variance) * det**2
    np.testing.assert_allclose(warped.variance[covered], exact[covered], rtol=2e-4)


def _bent_map(amplitude: float) -> PixelMap:
    """10 deg turn plus a quadratic bend of ``amplitude`` px over a 40 px box."""
    from scipy.interpolate import RectBivariateSpline

    affine = PixelMap.affine(_rotation(10.0), (6.2, -1.7))
    nodes = np.linspace(0, 39, 4)  # one cubic piece holding the quadratic
    bend = amplitude * (nodes[None, :] / 39) ** 2 + 0.0 * nodes[:, None]
    residual = (
        RectBivariateSpline(nodes, nodes, bend, kx=3, ky=3),
        RectBivariateSpline(nodes, nodes, -bend.T, kx=3, ky=3),
    )
    return PixelMap(affine.matrix, affine.offset, residual)


def test_strongly_bent_map_takes_the_direct_sum():
    """Jacobian 15% off its affine part: the direct 6 x 6 path, equal to the reference."""
    rng = np.random.default_rng(8)
    image = rng.normal(10, 1, (48, 48))
    variance = rng.uniform(0.5, 2.0, image.shape)
    template = Exposure.from_arrays(image.astype(np.float32), variance=variance.astype(np.float32))
    pixel_map = _bent_map(3.0)
    warped = warp_exposure(template, pixel_map, (40, 40))
    expected_image, expected_var = _direct_lanczos(image, variance, pixel_map, (40, 40))
    covered = np.isfinite(expected_image) & ~warped.masked(["NO_DATA"])
    assert covered.sum() > 400
    # the warp multiplies by its Jacobian determinant (flux tests above check it): divide it out
    det = _jacobian_determinant(pixel_map, 40, 40).image().astype(np.float64)
    np.testing.assert_allclose((warped.image / det)[covered], expected_image[covered], rtol=2e-3)
    np.testing.assert_allclose(
        (warped.variance / det**2)[covered], expected_var[covered], rtol=5e-3
    )


def test_gently_bent_map_rides_on_the_two_passes():
    """A 0.3 px bend: two passes with the departures, against the direct sum (smooth image)."""
    rng = np.random.default_rng(9)
    size = 48
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size))
    centres = rng.uniform(8, 40, (12, 2))
    for (x0, y0), flux in zip(centres, rng.uniform(1, 5, 12), strict=True):
        image += flux * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 2.0**2)
    variance = rng.uniform(0.5, 2.0, image.shape)
    template = Exposure.from_arrays(image.astype(np.float32), variance=variance.astype(np.float32))
    pixel_map = _bent_map(0.3)
    warped = warp_exposure(template, pixel_map, (40, 40))
    expected_image, _ = _direct_lanczos(image, variance, pixel_map, (40, 40))
    covered = np.isfinite(expected_image) & ~warped.masked(["NO_DATA"])
    assert covered.sum() > 400
    det = _jacobian_determinant(pixel_map, 40, 40).image().astype(np.float64)
    error = np.abs(warped.image / det - expected_image)[covered].max() / image.max()
    assert error < 2e-3
    # without the departures (the affine part alone) the same comparison fails
    affine = PixelMap.affine(pixel_map.matrix, pixel_map.offset)
    plain = warp_exposure(template, affine, (40, 40))
    assert np.abs(plain.image / det - expected_image)[covered].max() / image.max() > 5 * error
    # the variance is the exact sum of squared applied weights (unit impulses)
    weights = np.zeros((40, 40, size, size))
    for j in range(size):
        for i in range(size):
            impulse = np.zeros((size, size), np.float32)
            impulse[j, i] = 1.0
            weights[:, :, j, i], _, _ = _warp_affine(
                impulse, impulse, pixel_map.matrix, pixel_map.offset, 40, 40, pixel_map
            )
    exact = np.einsum("yxji,ji->yx", np.nan_to_num(weights) ** 2, variance) * det**2
    np.testing.assert_allclose(warped.variance[covered], exact[covered], rtol=2e-4)


def test_noise_correlation_of_a_bent_wcs_map_predicts_warped_white_noise():
    science_wcs, template_wcs = _tangent_points_apart()
    science = Exposure.from_arrays(np.zeros((256, 256)), wcs=science_wcs)
    measured = np.zeros((7, 7))
    for seed in (1, 2, 3, 4):
        template = _white_noise(400, seed)
        template.wcs = template_wcs
        pixel_map = PixelMap.from_wcs(science, template)
        assert not pixel_map.is_affine
        warped = warp_exposure(template, pixel_map, science.shape, wcs=science_wcs)
        box = np.s_[20:236, 20:236]
        assert np.all(warped.mask[box] == 0)
        measured += _autocorrelation(warped.image[box], 3) / 4
        z = warped.image[box] / np.sqrt(warped.variance[box])
        assert np.std(z) == pytest.approx(1.0, abs=0.02)
    predicted = warped.noise_correlation[2:-2, 2:-2]
    np.testing.assert_allclose(measured, predicted, atol=0.025)


@pytest.mark.parametrize("bent", [False, True])
def test_pass_two_tiles_match_whole_rows(bent, monkeypatch):
    """A turned grid's second pass runs in tiles: the same pixels as whole rows, bit for bit."""
    import core.warp as warp

    rng = np.random.default_rng(11)
    image = rng.normal(0, 1, (420, 440)).astype(np.float32)
    variance = rng.uniform(0.5, 2.0, image.shape).astype(np.float32)
    matrix = _rotation(30.0, 1 / 1.02)  # pass 2 drifts sin 30 deg rows per column
    offset = np.array([220.0, 210.0]) - matrix @ np.array([180.0, 170.0])
    pixel_map = PixelMap.affine(matrix, offset)
    if bent:
        from scipy.interpolate import RectBivariateSpline

        nodes = np.linspace(0, 399, 5)
        bend = 0.4 * (nodes[None, :] / 399) ** 2 + 0.0 * nodes[:, None]
        residual = (
            RectBivariateSpline(nodes, nodes, bend),
            RectBivariateSpline(nodes, nodes, -bend.T),
        )
        pixel_map = PixelMap(matrix, offset, residual)
    results = []
    for drift in (8, 128, 10**9):  # 16 px wide tiles, 256 px, whole rows (400 x 0.5 < 10^9)
        monkeypatch.setattr(warp, "_TILE_DRIFT", drift)
        results.append(
            _warp_affine(image, variance, matrix, offset, 360, 400, pixel_map if bent else None)
        )
    covered = np.isfinite(results[-1][0])
    assert covered.mean() > 0.5
    for out_image, out_var, _ in results[:-1]:
        np.testing.assert_array_equal(out_image, results[-1][0])
        np.testing.assert_array_equal(out_var, results[-1][1])


def test_spline_shortcuts_match_fitpack_and_bilinear_reference():
    """The basis-product evaluations of a bent map equal scipy's direct ones."""
    from scipy.interpolate import RectBivariateSpline, RegularGridInterpolator

    from core.warp import _ColumnSpline, _Determinant, _GridRows, _Positions

    rng = np.random.default_rng(12)
    ys, xs = np.linspace(0, 299, 7), np.linspace(0, 399, 9)
    spline = RectBivariateSpline(ys, xs, 1 + 0.01 * rng.normal(size=(7, 9)))
    # the Jacobian determinant read back from nodes, against central differences at
    # every pixel (a gently bent map: a quadratic bend of 0.4 px over 400 px)
    bend = 0.4 * (xs[None, :] / 399) ** 2 * (1 + 0.5 * ys[:, None] / 299)
    bent = PixelMap(
        _rotation(5.0),
        np.array([2.0, -3.0]),
        (RectBivariateSpline(ys, xs, bend), RectBivariateSpline(ys, xs, -0.5 * bend)),
    )
    gx, gy = np.meshgrid(np.arange(400.0), np.arange(300.0))
    (u1, v1), (u2, v2) = bent(gx + 0.5, gy), bent(gx - 0.5, gy)
    (u3, v3), (u4, v4) = bent(gx, gy + 0.5), bent(gx, gy - 0.5)
    direct = np.abs((u1 - u2) * (v3 - v4) - (u3 - u4) * (v1 - v2))
    determinant = _Determinant(bent, 300, 400)
    # (within a node of the edges the differences step past the spline's knots)
    inner = np.s_[8:-8, 8:-8]
    np.testing.assert_allclose(determinant.image()[inner], direct[inner], rtol=2e-6)
    np.testing.assert_array_equal(determinant.rows(37, 52), determinant.image()[37:52])
    # along fixed columns at any rows, rows beyond the knots clamped (as fitpack does)
    columns = np.linspace(0, 399, 11)
    rows = rng.uniform(-20, 320, (13, 11))
    expected = spline.ev(np.clip(rows, 0, 299), np.broadcast_to(columns, rows.shape))
    np.testing.assert_allclose(_ColumnSpline(spline, columns)(rows), expected, atol=1e-12)
    # the map on the output grid a block of rows at a time, rows beyond the knots included
    pixel_map = PixelMap(_rotation(5.0), np.array([2.0, -3.0]), (spline, spline))
    block = np.arange(290.0, 310.0)
    u, v = _GridRows(pixel_map, np.arange(400.0))(block)
    u_ref, v_ref = pixel_map.on_grid(np.arange(400.0), block)
    np.testing.assert_allclose(u, u_ref, atol=1e-11)
    np.testing.assert_allclose(v, v_ref, atol=1e-11)
    # positions slope x + start(row) + node values read back bilinearly, in fixed point
    # (2^-20 px), a block of rows and a slice of columns at a time
    values = rng.normal(size=(7, 9))
    positions = _Positions(1.37, 400, ys, xs, values)
    at = np.arange(40.0, 47.0)
    start = 3.3 - 0.21 * at
    reference = RegularGridInterpolator((ys, xs), values)
    gy, gx = np.meshgrid(at, np.arange(100.0, 180.0), indexing="ij")
    expected = reference((gy, gx)) + 1.37 * gx + start[:, None]
    np.testing.assert_allclose(positions.values(at, start, 100, 180), expected, atol=2e-6)
    # affine: no correction, exact to the two roundings
    plain = _Positions(-0.8, 400).values(at, start, 100, 180)
    np.testing.assert_allclose(plain, -0.8 * gx + start[:, None], atol=1.01 / 2**20)


def test_doubling_dilation_equals_shifted_ors():
    """The mask's growth by doubling windows ORs exactly the bits the taps reach."""
    from core.warp import _or_dilate

    rng = np.random.default_rng(13)
    for shape in [(1, 1), (9, 4), (3, 40), (150, 170)]:
        mask = rng.integers(0, 1 << 12, shape) * (rng.random(shape) < 0.05)
        mask = mask.astype(np.int32)
        for reach_x, reach_y in [
            ((2, 3), (2, 3)),
            ((5, 5), (3, 4)),
            ((0, 0), (0, 1)),
            ((7, 2), (1, 6)),
        ]:
            expected = mask.copy()
            for s in range(1, reach_x[0] + 1):
                expected[:, s:] |= mask[:, :-s]
            for s in range(1, reach_x[1] + 1):
                expected[:, :-s] |= mask[:, s:]
            rows = expected.copy()
            for s in range(1, reach_y[0] + 1):
                expected[s:] |= rows[:-s]
            for s in range(1, reach_y[1] + 1):
                expected[:-s] |= rows[s:]
            np.testing.assert_array_equal(_or_dilate(mask, reach_x, reach_y), expected)


def _mask_reference(mask, keep, index_map, ny, nx, footprint):
    """Per output pixel: the OR of the kept bits over its taps' box around floor(u), floor(v)."""
    (lo_x, hi_x), (lo_y, hi_y) = footprint
    h, w = mask.shape
    out = np.zeros((ny, nx), dtype=np.int32)
    for y in range(ny):
        for x in range(nx):
            u, v = index_map(float(x), float(y))
            bu, bv = int(math.floor(u)), int(math.floor(v))
            if 0 <= bu < w and 0 <= bv < h:
                box = mask[max(bv - lo_y, 0) : bv + hi_y + 1, max(bu - lo_x, 0) : bu + hi_x + 1]
                out[y, x] = np.bitwise_or.reduce(box & keep, axis=None)
    return out


@pytest.mark.parametrize("kind", ["shift", "turned", "flipped", "bent"])
def test_mask_scatter_and_gather_equal_a_per_pixel_or(kind, monkeypatch):
    """The sparse (scatter) and dense (grow and gather) mask paths give the reference's bits."""
    import core.warp as warp

    rng = np.random.default_rng(13)
    h, w, ny, nx = 50, 60, 44, 56
    mask = np.zeros((h, w), dtype=np.int32)
    mask.ravel()[rng.integers(0, h * w, 40)] |= 2
    mask.ravel()[rng.integers(0, h * w, 25)] |= 1 | 256  # BAD and NO_DATA together
    mask[:, 17] |= 4
    mask[:3] |= 256  # NO_DATA only: carried by the image's NaN, not by these bits
    # planes beyond a byte (or two) take the wider types of the gather path
    wide = {"turned": 1 << 20, "flipped": 1 << 12}.get(kind, 0)
    mask.ravel()[rng.integers(0, h * w, 10)] |= wide
    maps = {
        "shift": PixelMap.affine(np.eye(2), (3.37, -2.61)),
        "turned": PixelMap.affine(_rotation(30.0, 1 / 1.02), (12.3, -8.6)),
        "flipped": PixelMap.affine(_rotation(170.0, 1.03), (55.1, 47.4)),
        "bent": _bent_map(0.4),
    }
    index_map = maps[kind]
    footprint = ((5, 5), (2, 3)) if kind != "shift" else ((2, 3), (2, 3))
    keep = ~np.int32(256)
    expected = _mask_reference(mask, keep, index_map, ny, nx, footprint)
    assert expected.any() and (expected & 256 == 0).all()
    results = {}
    for path, share in (("scatter", 1e-6), ("gather", 1e12)):
        monkeypatch.setattr(warp, "_SPARSE_MASK_SHARE", share)
        calls = []
        for name in ("_scatter_mask", "_gather_mask"):
            original = getattr(warp, name)
            monkeypatch.setattr(
                warp, name, lambda *a, _f=original, _n=name, _c=calls: _c.append(_n) or _f(*a)
            )
        results[path] = warp._warp_mask(mask, 256, index_map, ny, nx, footprint)
        assert calls == [f"_{path}_mask"]
        monkeypatch.undo()
    np.testing.assert_array_equal(results["scatter"], expected)
    np.testing.assert_array_equal(results["gather"], expected)


def test_a_warped_image_keeps_its_own_epoch_on_the_grids_wcs():
    """The warped template took the science grid's WCS with the science's MJD-OBS and
    DATE-OBS: matched_template.fits said the science's epoch in its IMAGE header (its
    primary, the template's). The grid's transform, its own epoch."""
    science_wcs, template_wcs = _tangent_points_apart()
    science_wcs.wcs.mjdobs, template_wcs.wcs.mjdobs = 60000.5, 59000.5
    science = Exposure.from_arrays(np.zeros((64, 64)), wcs=science_wcs)
    template = Exposure.from_arrays(np.zeros((400, 400)), wcs=template_wcs, psf=GaussianPsf(1.5))
    pixel_map = PixelMap.from_wcs(science, template)
    warped = warp_exposure(template, pixel_map, science.shape, wcs=science_wcs)
    header = warped.wcs.to_header(relax=True)
    assert header["MJD-OBS"] == 59000.5  # was 60000.5
    assert header["CRVAL1"] == 150.0 and science_wcs.wcs.mjdobs == 60000.5
    template.wcs = None  # no epoch of its own: none stated
    warped = warp_exposure(template, pixel_map, science.shape, wcs=science_wcs)
    assert "MJD-OBS" not in warped.wcs.to_header(relax=True)
