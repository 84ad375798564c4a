"""Tests of core.convolve: orientation, spatial variation, variance, masks, edges, NaN."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from core.basis import make_kernel_basis
from core.config import KernelConfig
from core.convolve import (
    convolve_exposure,
    convolved_noise_correlation,
    correlate_image,
    or_filter,
)
from core.dilation import dilate_cross
from core.exposure import Exposure
from core.kernel import SpatialKernel

RNG_SEED = 20240611


def _star_field(shape, rng, n_stars=30, sigma=1.5, sky_noise=5.0):
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    image = rng.normal(0.0, sky_noise, shape)
    for _ in range(n_stars):
        xc, yc = rng.uniform(0, nx), rng.uniform(0, ny)
        flux = 10 ** rng.uniform(2, 5)
        image += (
            flux / (2 * np.pi * sigma**2) * np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / 2 / sigma**2)
        )
    return image


def _varying_kernel(domain, order=1, seed=3):
    """An AL kernel with random spatial coefficients (asymmetric terms included)."""
    rng = np.random.default_rng(seed)
    basis = make_kernel_basis(None, None, KernelConfig(kernel_size=11))
    n_spatial = (order + 1) * (order + 2) // 2
    coefficients = rng.normal(0, 0.05, (basis.n_basis, n_spatial))
    coefficients[0] = 0.0
    coefficients[0, 0] = 1.2
    return SpatialKernel(basis.images, coefficients, order, domain)


def _brute_force(values, kernel, xy0):
    """Per-pixel sum of K(X,Y)(u,v) * values(X+u, Y+v) over the interior."""
    h = kernel.half
    ny, nx = values.shape
    ys = np.arange(h, ny - h) + xy0[1]
    xs = np.arange(h, nx - h) + xy0[0]
    gx, gy = np.meshgrid(xs, ys)
    weights = kernel.coefficients_at(gx, gy)  # (nb, ny', nx')
    kernels = np.einsum("nyx,nij->yxij", weights, kernel.basis_images)
    patches = sliding_window_view(values.astype(np.float64), (kernel.size, kernel.size))
    image = np.einsum("yxij,yxij->yx", kernels, patches)
    return image, kernels, patches


def test_correlate_image_matches_ndimage():
    rng = np.random.default_rng(RNG_SEED)
    image = rng.normal(size=(90, 130))
    kernel = rng.normal(size=(7, 11))
    expected = ndimage.correlate(image, kernel, mode="constant")
    np.testing.assert_allclose(correlate_image(image, kernel), expected, atol=1e-12)
    single = correlate_image(image.astype(np.float32), kernel)
    assert single.dtype == np.float32
    assert np.abs(single - expected).max() < 1e-5 * expected.std()


@pytest.mark.parametrize("kernel_shape", [(13, 9), (15, 15)])
def test_correlate_image_tiles_match_ndimage(kernel_shape):
    """Frames larger than one FFT tile (overlap-save tiles, threaded) give the direct sum;
    single precision stays within float32 round-off of it. A square kernel on a frame
    tiled along both axes takes the banded path (`correlate_rows`), which also carries a
    non-finite pixel to its kernel box only."""
    rng = np.random.default_rng(RNG_SEED + 1)
    image = rng.normal(10.0, 3.0, size=(1100, 700))
    kernel = rng.random(kernel_shape)
    expected = ndimage.correlate(image, kernel, mode="constant")
    np.testing.assert_allclose(correlate_image(image, kernel), expected, atol=1e-9)
    single = correlate_image(image.astype(np.float32), kernel, single=True)
    assert single.dtype == np.float32
    assert np.abs(single - expected).max() < 2e-6 * np.abs(expected).max()
    holed = image.astype(np.float32)
    holed[600, 300] = np.nan
    out = correlate_image(holed, kernel, single=True)
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    box = np.zeros(image.shape, dtype=bool)
    box[600 - hy : 601 + hy, 300 - hx : 301 + hx] = True
    assert np.isnan(out[box]).all() and np.isfinite(out[~box]).all()
    assert np.abs(out[~box] - single[~box]).max() < 2e-6 * np.abs(expected).max()


def test_delta_kernel_orientation():
    """Kernel pixel (j, i) is offset (v, u) = (j - h, i - h): a delta at u=+2, v=-1 shifts."""
    rng = np.random.default_rng(RNG_SEED)
    image = rng.normal(size=(40, 50)).astype(np.float32)
    kernel = np.zeros((7, 7))
    kernel[3 - 1, 3 + 2] = 1.0
    out = convolve_exposure(Exposure.from_arrays(image), kernel).image
    # out(X, Y) = in(X + 2, Y - 1)
    np.testing.assert_allclose(out[3:-3, 3:-3], image[2:-4, 5:-1], atol=1e-6)


def test_asymmetric_kernel_equals_ndimage_correlate_interior():
    rng = np.random.default_rng(RNG_SEED)
    image = _star_field((80, 100), rng).astype(np.float32)
    kernel = np.outer(np.hanning(9), np.linspace(0.2, 1.0, 9))
    kernel[1, 6] += 0.3
    out = convolve_exposure(Exposure.from_arrays(image), SpatialKernel.constant(kernel))
    expected = ndimage.correlate(image.astype(np.float64), kernel, mode="constant")
    interior = np.s_[4:-4, 4:-4]
    assert np.abs(out.image[interior] - expected[interior]).max() < 1e-5 * expected.std()
    # true convolution would differ: the check above can fail
    flipped = ndimage.convolve(image.astype(np.float64), kernel, mode="constant")
    assert np.abs(out.image[interior] - flipped[interior]).max() > 1.0


def test_spatially_varying_matches_brute_force():
    rng = np.random.default_rng(RNG_SEED)
    shape, xy0 = (64, 72), (100, 40)
    image = _star_field(shape, rng, n_stars=10).astype(np.float32)
    variance = rng.uniform(20.0, 40.0, shape).astype(np.float32)
    # domain larger than the image so the linear terms swing far from 0
    kernel = _varying_kernel((90, 30, 200, 130), order=2)
    exposure = Exposure.from_arrays(image, variance, xy0=xy0)
    out = convolve_exposure(exposure, kernel)
    expected, kernels, _ = _brute_force(image, kernel, xy0)
    h = kernel.half
    interior = np.s_[h:-h, h:-h]
    assert np.abs(out.image[interior] - expected).max() < 1e-5 * np.abs(expected).max()
    # variance is the exact squared-kernel sum with the kernel of each pixel
    var_patches = sliding_window_view(variance.astype(np.float64), (kernel.size, kernel.size))
    expected_var = np.einsum("yxij,yxij->yx", kernels**2, var_patches)
    np.testing.assert_allclose(out.variance[interior], expected_var, rtol=1e-5)
    # the kernel really varies: a constant kernel would be far off
    constant = convolve_exposure(exposure, kernel.image()).image
    assert (
        np.abs(constant[interior] - expected).max()
        > 100 * np.abs(out.image[interior] - expected).max()
    )


def test_input_not_mutated_and_metadata_copied():
    rng = np.random.default_rng(RNG_SEED)
    exposure = Exposure.from_arrays(rng.normal(size=(40, 40)), metadata={"EXPTIME": 30.0})
    exposure.mask[20, 20] = exposure.mask_planes.value("BAD")
    before = exposure.copy()
    out = convolve_exposure(exposure, np.ones((5, 5)) / 25)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(exposure, plane), getattr(before, plane))
    out.metadata["EXPTIME"] = 1.0
    assert exposure.metadata["EXPTIME"] == 30.0


def test_mask_dilation_preserved_planes_and_copied_edge():
    shape = (50, 60)
    exposure = Exposure.from_arrays(np.zeros(shape))
    bad = exposure.mask_planes.value("BAD")
    injected = exposure.mask_planes.value("INJECTED")
    exposure.mask[20, 30] = bad | injected
    exposure.mask[1, 1] = bad
    out = convolve_exposure(exposure, np.ones((7, 7)), preserve_planes=["INJECTED", "NOPE"])
    is_bad = (out.mask & bad) != 0
    expected = np.zeros(shape, dtype=bool)
    expected[17:24, 27:34] = True
    expected[0:5, 0:5] = True  # near the corner: border copy keeps (1,1), dilation adds the rest
    edge = np.ones(shape, dtype=bool)
    edge[3:-3, 3:-3] = False
    expected_interior = expected & ~edge
    np.testing.assert_array_equal(is_bad & ~edge, expected_interior)
    assert is_bad[1, 1] and not is_bad[0, 10]
    # INJECTED keeps exactly its input pixel
    np.testing.assert_array_equal(np.argwhere(out.mask & injected), [[20, 30]])
    # the border of half-width carries EDGE and nothing inside does
    edge_bit = out.mask_planes.value("EDGE")
    np.testing.assert_array_equal((out.mask & edge_bit) != 0, edge)


def test_edges_without_copy():
    rng = np.random.default_rng(RNG_SEED)
    exposure = Exposure.from_arrays(rng.normal(size=(30, 40)))
    exposure.mask[0, 0] = exposure.mask_planes.value("SAT")
    out = convolve_exposure(exposure, np.ones((5, 5)) / 25, copy_edge=False)
    edge = np.ones((30, 40), dtype=bool)
    edge[2:-2, 2:-2] = False
    assert np.isnan(out.image[edge]).all() and np.isfinite(out.image[~edge]).all()
    assert np.isposinf(out.variance[edge]).all()
    assert (out.mask[edge] == out.mask_planes.value("NO_DATA")).all()
    assert (out.mask[~edge] & out.mask_planes.value("EDGE") == 0).all()
    copied = convolve_exposure(exposure, np.ones((5, 5)) / 25)
    np.testing.assert_array_equal(copied.image[edge], exposure.image[edge])


def test_nan_and_inf_stay_local():
    rng = np.random.default_rng(RNG_SEED)
    image = rng.normal(size=(60, 60)).astype(np.float32)
    variance = np.ones_like(image)
    image[30, 25] = np.nan
    variance[10, 40] = np.inf
    kernel = rng.uniform(0.0, 1.0, (5, 5))
    out = convolve_exposure(Exposure.from_arrays(image, variance), kernel)
    touched = np.zeros(image.shape, dtype=bool)
    touched[28:33, 23:28] = True
    interior = np.zeros(image.shape, dtype=bool)
    interior[2:-2, 2:-2] = True
    np.testing.assert_array_equal(np.isnan(out.image) & interior, touched)
    filled = np.where(np.isfinite(image), image, 0.0)
    expected = ndimage.correlate(filled.astype(np.float64), kernel, mode="constant")
    ok = interior & ~touched
    assert np.abs(out.image[ok] - expected[ok]).max() < 1e-5
    inf_box = np.zeros(image.shape, dtype=bool)
    inf_box[8:13, 38:43] = True
    np.testing.assert_array_equal(np.isposinf(out.variance) & interior, inf_box)
    expected_var = ndimage.correlate(np.where(inf_box, 0, 1.0), kernel**2, mode="constant")
    np.testing.assert_allclose(out.variance[interior & ~inf_box], (kernel**2).sum(), rtol=1e-5)
    assert expected_var is not None


def test_float32_accuracy_on_star_field():
    rng = np.random.default_rng(RNG_SEED + 1)
    image = _star_field((256, 256), rng, n_stars=80)
    kernel = _varying_kernel((0, 0, 255, 255), order=1)
    exposure32 = Exposure.from_arrays(image.astype(np.float32))
    out = convolve_exposure(exposure32, kernel)
    expected, _, _ = _brute_force(exposure32.image, kernel, (0, 0))
    h = kernel.half
    err = np.abs(out.image[h:-h, h:-h] - expected).max()
    assert err < 1e-5 * image.std()


def test_large_variance_dynamic_range_uses_double_precision():
    variance = np.full((64, 64), 100.0)
    variance[5, 5] = 1.0e12
    out = convolve_exposure(Exposure.from_arrays(np.zeros((64, 64)), variance), np.ones((3, 3)))
    # far from the huge pixel the variance is exactly 9 * 100, no round-off leak
    assert np.abs(out.variance[20:-2, 20:-2] - 900.0).max() < 1e-3
    assert out.variance[5, 5] == pytest.approx(1.0e12 + 800.0, rel=1e-6)


def test_or_filter_matches_maximum_filter_per_bit():
    rng = np.random.default_rng(RNG_SEED)
    mask = np.zeros((70, 90), dtype=np.int32)
    for bit in (0, 3, 9, 20):
        mask[rng.random(mask.shape) < 0.002] |= 1 << bit
    out = or_filter(mask, 4, 6)
    assert out.dtype == np.int32
    for bit in (0, 3, 9, 20):
        plane = ((mask >> bit) & 1).astype(np.uint8)
        grown = ndimage.maximum_filter(plane, size=(9, 13), mode="constant")
        np.testing.assert_array_equal((out >> bit) & 1, grown)


def test_even_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        correlate_image(np.zeros((10, 10)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="odd"):
        convolve_exposure(Exposure.from_arrays(np.zeros((10, 10))), np.ones((3, 4)))


def test_dilate_cross_matches_binary_dilation():
    # bit-packed rows: widths on and off 64-pixel words, views of a larger mask (a
    # window, as near_sources passes the template's), sources on the border
    rng = np.random.default_rng(RNG_SEED + 2)
    whole = rng.random((300, 241)) < 0.01
    whole[0, 5] = whole[-1, -1] = whole[150, 0] = True
    for mask in (whole, whole[:64, :128], whole[3:-4, 7:-2], whole[:33, :61]):
        for iterations in (0, 1, 3, 5):
            expected = ndimage.binary_dilation(mask, iterations=iterations) if iterations else mask
            np.testing.assert_array_equal(dilate_cross(mask, iterations), expected)


def _measured_correlation(noise: np.ndarray, radius: int) -> np.ndarray:
    """Normalised autocorrelation of an image at lags up to ``radius``, by direct products."""
    ny, nx = noise.shape
    core_ = noise[radius : ny - radius, radius : nx - radius]
    out = np.empty((2 * radius + 1, 2 * radius + 1))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = noise[radius + dy : ny - radius + dy, radius + dx : nx - radius + dx]
            out[dy + radius, dx + radius] = np.mean(core_ * shifted)
    return out / out[radius, radius]


@pytest.mark.parametrize("correlated_input", [False, True])
def test_convolved_noise_correlation_matches_convolved_noise(correlated_input):
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[-4:5, -4:5]
    kernel = np.exp(-(xx**2 + (yy / 1.5) ** 2) / 3.0) * (1 + 0.2 * xx)  # asymmetric
    noise = rng.normal(size=(1200, 1200))
    input_correlation = None
    if correlated_input:
        smooth = np.array([[0.0, 0.3, 0.0], [0.3, 1.0, 0.3], [0.0, 0.3, 0.0]])
        noise = ndimage.correlate(noise, smooth, mode="wrap")
        input_correlation = _measured_correlation(noise, 2)
    convolved = ndimage.correlate(noise, kernel, mode="wrap")
    predicted = convolved_noise_correlation(input_correlation, kernel)
    radius = predicted.shape[0] // 2
    assert predicted.shape[0] == predicted.shape[1] and predicted.shape[0] % 2 == 1
    assert predicted[radius, radius] == 1.0
    measured = _measured_correlation(convolved, 4)
    inner = predicted[radius - 4 : radius + 5, radius - 4 : radius + 5]
    np.testing.assert_allclose(inner, measured, atol=0.02)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("copy_edge", [True, False])
def test_deferred_variance_plane_and_stamps_equal_the_eager_plane(spatial, copy_edge):
    """A deferred variance is made on first read as the eager one, and its stamps made
    without it (near NaN, +inf, the border and off the frame) equal the plane's stamps
    to float32 round-off."""
    from core.stamps import stamps

    rng = np.random.default_rng(RNG_SEED + 7)
    ny, nx = 260, 300
    variance = rng.uniform(1.0, 50.0, (ny, nx)).astype(np.float32)
    variance[100, 100] = np.nan
    variance[150, 40] = np.inf
    variance[3, 3] = np.nan
    exposure = Exposure.from_arrays(rng.normal(size=(ny, nx)), variance, xy0=(20, 10))
    kernel = _varying_kernel((20, 10, 20 + nx - 1, 10 + ny - 1)) if spatial else rng.random((9, 7))
    eager = convolve_exposure(exposure, kernel, copy_edge=copy_edge)
    deferred = convolve_exposure(exposure, kernel, copy_edge=copy_edge, defer_variance=True)
    assert deferred.variance_deferred
    np.testing.assert_array_equal(deferred.image, eager.image)
    np.testing.assert_array_equal(deferred.mask, eager.mask)
    cx = np.array([0, 3, 100, 103, 40, nx - 1, 130, 150, -4, nx + 5])
    cy = np.array([0, 5, 100, 96, 150, ny - 1, 20, 130, 10, ny + 3])
    made = deferred.variance_stamps(cx, cy, 8, fill=-1.0)
    assert deferred.variance_deferred  # stamps do not make the plane
    expected = stamps(eager.variance, cx, cy, 8, fill=-1.0)
    np.testing.assert_array_equal(np.isnan(made), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(made), np.isposinf(expected))
    assert np.isnan(expected).sum() > 20 and np.isposinf(expected).sum() > 20
    finite = np.isfinite(expected)
    np.testing.assert_allclose(made[finite], expected[finite], rtol=2e-6)
    assert np.count_nonzero(made == -1.0) == np.count_nonzero(expected == -1.0) > 0
    np.testing.assert_array_equal(deferred.variance, eager.variance)
    assert not deferred.variance_deferred


@pytest.mark.parametrize("shape", [(700, 900), (300, 420)])
def test_correlate_finite_rows_equals_correlate_image_single(shape):
    # bands of a frame tiled both ways, or the frame read whole: correlate_image's values
    from core.convolve import correlate_finite_rows

    rng = np.random.default_rng(3)
    frame = rng.normal(100.0, 10.0, shape).astype(np.float32)
    kernel = np.outer(np.hanning(23), np.hanning(23))[1:-1, 1:-1]
    expected = correlate_image(frame, kernel, single=True)

    def read(rows, part):
        np.copyto(part, frame[rows])

    np.testing.assert_array_equal(correlate_finite_rows(shape, read, kernel), expected)
    written = np.full(shape, np.nan, dtype=np.float32)

    def write(rows, values):
        written[rows] = values

    assert correlate_finite_rows(shape, read, kernel, write=write) is None
    np.testing.assert_array_equal(written, expected)
