"""Fast paths of the subtraction stages against straightforward reference implementations.

Each fast path (batched, tiled, blockwise or FFT-based) must give the numbers a plain
loop or direct sum gives: exactly where only the memory traffic changed, to round-off
where the summation order did.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from scipy import ndimage, stats

from core import decorrelate as dmod
from core.basis import make_kernel_basis
from core.config import DecorrelationConfig, KernelConfig
from core.convolve import convolve_exposure
from core.decorrelate import clipped_mean, decorrelate_difference
from core.exposure import Exposure
from core.forced import (
    WHOLE_STAMP_MISSING_LIGHT,
    PsfStamps,
    psf_photometry,
    whole_stamp_fluxes,
)
from core.kernel import _Candidate, _Fitter
from core.metrics import footprint_means
from core.photometry import psf_flux
from core.psf import GaussianPsf, MoffatPsf, Psf
from core.subtract import _working_copy


def _or_mask_reference(target: Exposure, other: Exposure) -> None:
    """The plane-by-plane OR (boolean index per plane), as it was first written."""
    for name, bit in other.mask_planes.as_dict().items():
        has = (other.mask & (1 << bit)) != 0
        target.mask[has] |= target.mask_planes.value(name)


def test_or_mask_from_maps_planes_by_name_like_a_per_plane_loop():
    rng = np.random.default_rng(3)
    for trial in range(10):
        a = Exposure.from_arrays(np.zeros((70, 33)))
        b = Exposure.from_arrays(np.zeros((70, 33)))
        names = [f"P{i}" for i in range(12)]
        rng.shuffle(names)
        for name in names[: rng.integers(2, 8)]:
            a.mask_planes.bit(name)
        rng.shuffle(names)
        for name in names[:10]:
            b.mask_planes.bit(name)
        a.mask[:] = rng.integers(0, 1 << 14, a.shape)
        b.mask[:] = rng.integers(0, 1 << 19, b.shape)
        expected = copy.deepcopy(a)
        _or_mask_reference(expected, b)
        a.or_mask_from(b)
        assert a.mask_planes == expected.mask_planes, trial
        np.testing.assert_array_equal(a.mask, expected.mask)


def test_convolved_mask_is_a_per_bit_box_dilation():
    rng = np.random.default_rng(4)
    shape, k = (90, 75), 7
    h = k // 2
    mask = np.zeros(shape, dtype=np.int32)
    for bit in (0, 1, 8, 20):  # 20: past 16 bits, the int32 path
        mask[rng.random(shape) < 0.002] |= 1 << bit
    exposure = Exposure.from_arrays(rng.normal(size=shape), mask=mask)
    preserved = exposure.mask_planes.get_bitmask(["SAT"])  # bit 1 is not dilated
    kernel = np.ones((k, k)) / k**2
    out = convolve_exposure(exposure, kernel, preserve_planes=["SAT"])
    expected = np.zeros(shape, dtype=np.int32)
    for bit in range(31):
        plane = (mask & (1 << bit)) != 0
        if not plane.any():
            continue
        if (1 << bit) & preserved:
            grown = plane
        else:
            grown = ndimage.binary_dilation(plane, structure=np.ones((k, k), bool))
        expected[grown] |= 1 << bit
    edge = np.ones(shape, bool)
    edge[h:-h, h:-h] = False
    expected[edge] = mask[edge] | exposure.mask_planes.value("EDGE")
    np.testing.assert_array_equal(out.mask, expected)
    np.testing.assert_array_equal(exposure.mask, mask)  # the input is not touched


def test_noise_statistics_equal_the_boolean_gather(monkeypatch):
    """The sampled noise figures (flat indices of the kept pixels, blocks on threads) are
    those of gathering every kept pixel by boolean index and striding the whole set."""
    from core import metrics

    rng = np.random.default_rng(8)
    shape = (1100, 300)
    image = rng.normal(0.0, 3.0, shape).astype(np.float32)
    variance = rng.uniform(4.0, 16.0, shape).astype(np.float32)
    image[rng.random(shape) < 0.01] = np.nan
    variance[rng.random(shape) < 0.01] = 0.0
    exposure = Exposure.from_arrays(image, variance)
    exposure.set_plane("BAD", rng.random(shape) < 0.05)
    exclude = rng.random(shape) < 0.2
    monkeypatch.setattr(metrics, "_NOISE_SAMPLE", 1 << 16)  # a stride of 4
    out = metrics.noise_statistics(exposure, exclude=exclude)
    keep = np.isfinite(image) & (variance > 0) & ~exclude & ~exposure.masked(["BAD"])
    z = (image[keep] / np.sqrt(variance[keep]))[:: keep.sum() // (1 << 16) + 1]
    assert out["noise_pixels"] == keep.sum()
    q25, q75 = np.percentile(z, [25.0, 75.0])
    assert out["noise_ratio"] == (q75 - q25) / 1.3489795003921636
    # scipy's iqr interpolates float32 samples in float32: the same to its rounding
    assert out["noise_ratio"] == pytest.approx(float(stats.iqr(z, scale="normal")), rel=1e-6)
    assert out["noise_mean"] == float(np.median(z))


@pytest.mark.parametrize("order", [1, 2])
def test_grouped_tile_transforms_equal_per_term_correlations(order):
    """The tiled correlation that shares the inverse x transform between terms of equal x
    weights gives sum_t wy_t wx_t (data correlated with K_t), each term a direct sum
    (Chebyshev terms, their squares, and random weights: every term alone)."""
    from core.convolve import _correlate_weighted, _squared_chebyshev_parts
    from core.kernel import SpatialKernel

    rng = np.random.default_rng(21)
    shape, xy0 = (600, 650), (30, 50)  # several tiles along both axes
    data = rng.normal(100.0, 10.0, shape)
    basis = make_kernel_basis(None, None, KernelConfig(kernel_size=11))
    n_spatial = (order + 1) * (order + 2) // 2
    coefficients = rng.normal(0, 0.05, (basis.n_basis, n_spatial))
    coefficients[0, 0] = 1.0
    kernel = SpatialKernel(basis.images, coefficients, order, (0, 0, 700, 700))
    exposure = Exposure.from_arrays(data.astype(np.float32), xy0=xy0)
    spatial = kernel.spatial_images()
    # random weights: every term alone in its group, with weights along both axes
    random_weights = (rng.uniform(0.5, 1.5, (len(spatial), shape[1])),)
    random_weights += (rng.uniform(0.5, 1.5, (len(spatial), shape[0])),)
    for images, wx, wy in (
        (spatial, *kernel.axis_terms(*exposure.pixel_grid())),
        _squared_chebyshev_parts(kernel, exposure),
        (spatial, *random_weights),
    ):
        expected = sum(
            wy[t][:, None] * wx[t][None, :] * ndimage.correlate(data, images[t], mode="constant")
            for t in range(images.shape[0])
        )
        for workers in (1, 2):
            out = _correlate_weighted(data, images, wx, wy, workers=workers, dtype=np.float64)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
        single = _correlate_weighted(data.astype(np.float32), images, wx, wy, workers=2)
        assert np.abs(single - expected).max() < 1e-5 * np.abs(expected).max()


def test_kernel_fit_variance_through_k_equals_the_direct_sum():
    config = KernelConfig()
    basis = make_kernel_basis(2.0, 3.0, config)
    fitter = _Fitter(basis, config)
    k, size = basis.size, 2 * basis.size + 5
    rng = np.random.default_rng(6)
    ref_var = rng.uniform(5, 50, (size, size))
    cand = _Candidate(0, 0.0, 0.0, 1.0, (0, 0), {"ref_var": ref_var})
    kernel = rng.normal(size=k * k)
    got = fitter._convolved_variance(cand, kernel)
    n = size - k + 1
    direct = np.zeros((n, n))
    k2 = kernel.reshape(k, k) ** 2
    for u in range(k):
        for v in range(k):
            direct += k2[u, v] * ref_var[u : u + n, v : v + n]
    np.testing.assert_allclose(got, direct.ravel(), rtol=1e-10)
    # the cached spectrum serves the next kernel too
    kernel2 = rng.normal(size=k * k)
    again = fitter._convolved_variance(cand, kernel2)
    direct2 = sum(
        (kernel2.reshape(k, k)[u, v] ** 2) * ref_var[u : u + n, v : v + n]
        for u in range(k)
        for v in range(k)
    )
    np.testing.assert_allclose(again, direct2.ravel(), rtol=1e-10)


def test_footprint_means_equal_a_loop_over_footprints():
    rng = np.random.default_rng(7)
    shape = (120, 90)
    a = rng.normal(size=shape)
    a[rng.random(shape) < 0.05] = np.nan
    b = rng.random(shape).astype(np.float32)
    x = rng.uniform(-3, 93, 700)
    y = rng.uniform(-3, 123, 700)
    radius = 4.3

    def values(window):
        return np.abs(a[window]), b[window] * 2

    got = footprint_means(values, 2, x, y, radius, shape)
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx * dx + dy * dy <= radius * radius
    for k in range(x.size):
        ix, iy = math.floor(x[k] + 0.5), math.floor(y[k] + 0.5)
        if ix - r < 0 or iy - r < 0 or ix + r + 1 > shape[1] or iy + r + 1 > shape[0]:
            assert np.isnan(got[0][k]) and np.isnan(got[1][k])
            continue
        window = np.s_[iy - r : iy + r + 1, ix - r : ix + r + 1]
        for stamp, means in zip(values(window), got, strict=True):
            pix = stamp[disc]
            pix = pix[np.isfinite(pix)]
            expected = pix.astype(np.float64).mean() if pix.size else np.nan
            np.testing.assert_allclose(means[k], expected, rtol=1e-12)


def test_clipped_mean_equals_the_masked_mean_form():
    rng = np.random.default_rng(8)
    values = rng.normal(100.0, 5.0, (300, 200)).astype(np.float32)
    values[rng.random(values.shape) < 0.01] += 200
    good = rng.random(values.shape) > 0.1
    x = values[good & np.isfinite(values)].astype(np.float64)
    q25, centre, q75 = np.percentile(x, [25, 50, 75])
    half = 3 * 0.741301109252802 * (q75 - q25)
    for _ in range(3):
        kept = np.abs(x - centre) <= half
        centre = np.mean(x, where=kept)
        half = 3 * np.std(x, where=kept, ddof=1)
    assert clipped_mean(values, good) == pytest.approx(centre, rel=1e-12)


def _varying_pair(seed: int, shape=(150, 190)):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    sky = 50.0 + 30.0 * np.linspace(0, 1, nx)[None, :] * np.ones((ny, 1))
    science = Exposure.from_arrays(rng.normal(0, 1, shape) * np.sqrt(sky), sky.copy())
    template = Exposure.from_arrays(rng.normal(0, 1, shape) * 4.0, np.full(shape, 16.0))
    science.mask[rng.random(shape) < 0.01] |= science.mask_planes.value("SAT")

    class Varying:
        """A kernel whose width grows across the frame."""

        def image(self, x, y):
            sigma = 1.0 + 1.5 * x / nx + 0.5 * y / ny
            half = 6
            yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
            g = np.exp(-0.5 * (xx * xx + yy * yy) / sigma**2)
            return 1.1 * g / g.sum()

    difference = Exposure.from_arrays(
        rng.normal(0, 9, shape).astype(np.float32), science.variance + 16.0
    )
    difference.image[40, 50] = np.nan
    return science, template, difference, Varying()


def _grid_reference(difference, science, template, kernel, step, complete):
    """sum_n tent_n(X) (phi_n (*) D)(X) with one whole-frame direct convolution per node."""
    image = np.where(np.isfinite(difference.image), difference.image, 0.0).astype(np.float64)
    image[~np.isfinite(difference.image)] = np.nanmean(difference.image)
    ny, nx = image.shape
    ignore = DecorrelationConfig().ignore_mask_planes
    v_all = clipped_mean(science.variance, ~science.masked(ignore))
    vt_all = clipped_mean(template.variance, ~template.masked(ignore))
    margin = 2 * kernel.image(0, 0).shape[0]
    nodes_x, nodes_y = dmod.node_positions(nx, step), dmod.node_positions(ny, step)
    tent_x, tent_y = dmod._tent_matrix(nx, nodes_x), dmod._tent_matrix(ny, nodes_y)
    win_x, win_y = dmod._node_windows(nx, nodes_x), dmod._node_windows(ny, nodes_y)
    good_s, good_t = ~science.masked(ignore), ~template.masked(ignore)
    corrected = np.zeros((ny, nx))
    variance = np.zeros((ny, nx))
    for jn in range(nodes_y.size):
        for i_n in range(nodes_x.size):
            w = (slice(*win_y[jn]), slice(*win_x[i_n]))
            v = clipped_mean(science.variance[w], good_s[w])
            vt = clipped_mean(template.variance[w], good_t[w])
            v = v if math.isfinite(v) else v_all
            vt = vt if math.isfinite(vt) else vt_all
            # the whole filter on the generous grid (not cut to its extent)
            size = 2 * margin + 1
            filters = dmod.decorrelation_filters(
                kernel.image(nodes_x[i_n], nodes_y[jn]), v, vt, (size, size)
            )
            phi = dmod.filter_kernel_image(filters.phi, size)
            weight = tent_y[:, jn, None] * tent_x[None, :, i_n]
            corrected += weight * ndimage.convolve(image, phi, mode="constant")
            if complete:
                c1 = dmod.filter_kernel_image(filters.c1, size)
                c2 = dmod.filter_kernel_image(filters.c2, size)
                p1 = np.where(np.isfinite(science.variance), science.variance, v)
                p2 = np.where(np.isfinite(template.variance), template.variance, vt)
                variance += weight * (
                    ndimage.convolve(p1.astype(np.float64), c1**2, mode="constant")
                    + ndimage.convolve(p2.astype(np.float64), c2**2, mode="constant")
                )
            else:
                variance += weight * (
                    science.variance * filters.w1 + template.variance * filters.w2
                )
    return corrected, variance


@pytest.mark.parametrize("complete", [False, True])
def test_cell_blended_decorrelation_equals_per_node_whole_frame_filtering(complete):
    science, template, difference, kernel = _varying_pair(9)
    if complete:
        science.variance[70, 100] = np.nan
    config = DecorrelationConfig(grid_step=64, complete_var_plane_propagation=complete)
    out = decorrelate_difference(
        difference, science, template, kernel, spatially_varying=True, config=config
    )
    corrected, variance = _grid_reference(difference, science, template, kernel, 64, complete)
    finite = np.isfinite(difference.image)
    scale = np.abs(corrected).max()
    assert np.abs(out.image - corrected)[finite].max() < 2e-5 * scale
    if complete:
        keep = np.isfinite(science.variance)
        variance = variance[keep]
        got = out.variance[keep]
    else:
        got = out.variance
    np.testing.assert_allclose(got, variance, rtol=2e-5)


@pytest.mark.parametrize("shape", [(20, 30), (1100, 1000)])  # heap; mapped (frame_copy)
def test_working_copy_shares_the_image_read_only_and_never_writes_the_input(shape):
    rng = np.random.default_rng(10)
    exposure = Exposure.from_arrays(rng.normal(size=shape).astype(np.float32), psf=GaussianPsf(1.5))
    exposure.mask[::7] |= 5
    before = exposure.copy()
    work = _working_copy(exposure)
    np.testing.assert_array_equal(work.variance, exposure.variance)
    np.testing.assert_array_equal(work.mask, exposure.mask)
    assert work.variance.dtype == exposure.variance.dtype
    assert work.mask.dtype == exposure.mask.dtype
    assert np.shares_memory(work.image, exposure.image)
    with pytest.raises(ValueError):
        work.image[0, 0] = 1.0
    work.variance *= 2
    work.mask |= 1
    work.metadata["x"] = 1
    np.testing.assert_array_equal(exposure.variance, before.variance)
    np.testing.assert_array_equal(exposure.mask, before.mask)
    assert "x" not in exposure.metadata
    assert exposure.image.flags.writeable  # the caller's array keeps its flags


@pytest.mark.parametrize(
    "case", ["separate", "shared_mask", "variance_is_image", "read_only", "not_consumed"]
)
def test_working_copies_work_in_place_only_on_planes_handed_over_and_unshared(case):
    # the CLI and the worker hand their inputs over: their own variance and mask are
    # worked on, unless a plane is read only or shared (one mask array for both inputs
    # would take both detections), where they are copied as for any caller
    from core.subtract import _working_copies

    rng = np.random.default_rng(11)
    science, template = (
        Exposure.from_arrays(rng.normal(size=(40, 50)).astype(np.float32)) for _ in range(2)
    )
    if case == "shared_mask":
        template.mask = science.mask
    if case == "variance_is_image":  # scaling it in place would scale the image
        science.variance = science.image
    if case == "read_only":
        template.variance.flags.writeable = False
    work_t, work_s = _working_copies(template, science, consume=case != "not_consumed")
    in_place = case == "separate"
    for work, given in ((work_t, template), (work_s, science)):
        for plane in ("variance", "mask"):
            assert np.shares_memory(getattr(work, plane), getattr(given, plane)) == in_place
        assert np.shares_memory(work.image, given.image) and not work.image.flags.writeable
        assert work.mask_planes is not given.mask_planes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_medians_equal_nanmedian_of_each_block(dtype):
    from core.subtract import _block_medians

    rng = np.random.default_rng(12)
    image = (rng.normal(size=(200, 230)) * 5).astype(dtype)
    good = rng.random(image.shape) < np.linspace(0.05, 1.0, 230)  # sparse blocks on the left
    image[rng.random(image.shape) < 0.01] = np.nan
    good &= np.isfinite(image)
    x, y, level, count = _block_medians(image, good, 16)
    data = np.where(good, image, np.nan)
    assert 10 < level.size < (200 // 16) * (230 // 16)
    for xc, yc, value, n in zip(x, y, level, count, strict=True):
        i0, j0 = int(xc - 7.5), int(yc - 7.5)
        block = data[j0 : j0 + 16, i0 : i0 + 16]
        assert n == np.isfinite(block).sum() >= 64
        assert value == np.nanmedian(block)


def test_sky_block_medians_in_bands_equal_the_whole_subsample():
    """The refinement's block medians, taken in bands of block rows on threads, are those
    of `_block_medians` over the whole 2x2 subsample (the same blocks, in order)."""
    from types import SimpleNamespace

    from core.metrics import NOISE_MASK_PLANES
    from core.subtract import _block_medians, _SubtractBase

    rng = np.random.default_rng(13)
    shape = (1101, 901)  # odd: the subsample has a partial last block row and column
    image = rng.normal(0.0, 5.0, shape).astype(np.float32)
    image[rng.random(shape) < 0.01] = np.nan
    variance = rng.uniform(1.0, 2.0, shape).astype(np.float32)
    difference = Exposure.from_arrays(image, variance)
    difference.set_plane("SAT", rng.random(shape) < 0.02)
    source_mask = rng.random(shape) < np.linspace(0.0, 0.9, shape[1])
    task = SimpleNamespace(source_mask=source_mask)
    x, y, level, weight = _SubtractBase._sky_block_medians(task, difference, variance)  # type: ignore[arg-type]
    sub = np.s_[::2, ::2]
    good = (difference.mask[sub] & difference.bitmask(NOISE_MASK_PLANES)) == 0
    good &= ~source_mask[sub] & np.isfinite(image[sub]) & (variance[sub] > 0)
    ex, ey, elevel, eweight = _block_medians(image[sub], good, 16)
    assert level.size > 100
    for got, expected in ((x, 2 * ex), (y, 2 * ey), (level, elevel), (weight, eweight)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("subtract_background", [True, False])
def test_difference_from_the_operands_equals_copy_then_subtract(subtract_background):
    """`_subtract_matched` writes the difference's planes from its operands: the same
    numbers as copying the minuend, subtracting the background and the matched image."""
    from core.config import SubtractionConfig
    from core.kernel import BackgroundModel
    from core.subtract import AlardLuptonSubtractTask, _subtract_in_place

    rng = np.random.default_rng(17)
    shape, xy0 = (300, 260), (40, 70)
    minuend = Exposure.from_arrays(
        rng.normal(100.0, 5.0, shape).astype(np.float32),
        rng.uniform(20.0, 30.0, shape).astype(np.float32),
        xy0=xy0,
    )
    minuend.set_plane("SAT", rng.random(shape) < 0.01)
    matched = Exposure.from_arrays(
        rng.normal(90.0, 5.0, shape).astype(np.float32),
        rng.uniform(10.0, 15.0, shape).astype(np.float32),
        xy0=xy0,
    )
    matched.set_plane("SAT_TEMPLATE", rng.random(shape) < 0.01)  # a bit the minuend lacks
    background = BackgroundModel(np.array([3.0, 0.5, -0.25]), 1, (40, 70, 299, 369))
    config = SubtractionConfig(do_subtract_background=subtract_background)
    config.refine_background = False
    task = AlardLuptonSubtractTask(config=config)
    difference, _ = task._subtract_matched(minuend, matched, background)
    expected = minuend.copy()
    if subtract_background:
        background.add_to(expected.image, expected.xy0, scale=-1.0)
    _subtract_in_place(expected, matched)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(difference, plane), getattr(expected, plane))
    assert difference.mask_planes == expected.mask_planes
    assert not np.shares_memory(difference.mask, minuend.mask)


# --------------------------------------------------------------------------------------
# DIA measurement (core.measure, core.forced, core.diasources)
def _plain_psf_stamps(stamps, x, y):
    """`PsfStamps.at` as first written: node stamps blended bilinearly per position,
    each shifted by its own rfft2 / irfft2, then cropped."""
    from scipy import fft

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    nx_, ny_ = stamps.nodes_x, stamps.nodes_y
    blended = []
    for a, b in zip(x, y, strict=True):
        i = int(np.clip(np.searchsorted(nx_, a) - 1, 0, nx_.size - 2))
        j = int(np.clip(np.searchsorted(ny_, b) - 1, 0, ny_.size - 2))
        tx = np.clip((a - nx_[i]) / (nx_[i + 1] - nx_[i]), 0, 1)
        ty = np.clip((b - ny_[j]) / (ny_[j + 1] - ny_[j]), 0, 1)
        if stamps.constant:
            centre = stamps._node((ny_.size - 1) // 2, (nx_.size - 1) // 2)
            blended.append(centre)
            continue
        blended.append(
            (1 - tx) * (1 - ty) * stamps._node(j, i)
            + tx * (1 - ty) * stamps._node(j, i + 1)
            + (1 - tx) * ty * stamps._node(j + 1, i)
            + tx * ty * stamps._node(j + 1, i + 1)
        )
    blended = np.array(blended)
    # shifted on the blended stamp zero-padded to `padded` px (periodic on that grid)
    size, padded = blended.shape[1], stamps._size
    dx, dy = x - ix, y - iy
    spectrum = fft.rfft2(blended, s=(padded, padded), axes=(1, 2))
    ramp_y = np.exp(-2j * np.pi * dy[:, None] * fft.fftfreq(padded)[None, :])[:, :, None]
    ramp_x = np.exp(-2j * np.pi * dx[:, None] * fft.rfftfreq(padded)[None, :])[:, None, :]
    shifted = fft.irfft2(spectrum * ramp_y * ramp_x, s=(padded, padded), axes=(1, 2))
    c, h = size // 2, stamps.half
    return shifted[:, c - h : c + h + 1, c - h : c + h + 1], ix, iy


@pytest.mark.parametrize("varying", [False, True])
def test_psf_stamps_from_node_spectra_equal_shifted_blends(varying):
    """`PsfStamps.at` blends the nodes' spectra and transforms back only the kept rows:
    the stamps of blending the node images and shifting each one, to round-off."""
    from core.forced import PsfStamps
    from core.psf import GridPsf

    rng = np.random.default_rng(11)
    k = 31
    yy, xx = np.mgrid[:k, :k] - k // 2
    if varying:
        grid = np.empty((3, 4, k, k))
        for j in range(3):
            for i in range(4):
                sx, sy = 1.6 + 0.2 * i, 1.8 + 0.3 * j
                grid[j, i] = np.exp(-0.5 * ((xx - 0.1 * j) ** 2 / sx**2 + yy**2 / sy**2))
        psf = GridPsf(grid, [0.0, 100.0, 200.0, 300.0], [0.0, 150.0, 250.0])
    else:
        psf = MoffatPsf(4.0, 3.0)
    exposure = Exposure.from_arrays(np.zeros((260, 310)), xy0=(5, -7))
    stamps = PsfStamps(psf, exposure)
    assert stamps.constant is not varying
    x = rng.uniform(-10, 320, 300) + 5
    y = rng.uniform(-10, 270, 300) - 7
    x[:3], y[:3] = np.floor(x[:3]), np.floor(y[:3])
    model, ix, iy = stamps.at(x, y)
    expected, ex, ey = _plain_psf_stamps(stamps, x, y)
    np.testing.assert_array_equal(ix, ex - 5)
    np.testing.assert_array_equal(iy, ey + 7)
    np.testing.assert_allclose(model, expected, rtol=0, atol=1e-14)
    assert stamps.at(np.zeros(0), np.zeros(0))[0].shape == (0, *expected.shape[1:])


def _plain_moments(stamps, dx, dy, sigma, iterations=30):
    """Adaptive moments as first written: the full (m, w, w) sums each step, float64."""
    from core.measure import _MOMENTS_CONVERGED

    n, w, _ = stamps.shape
    half = w // 2
    grid = np.arange(w, dtype=np.float64) - half
    xs, ys = grid[None, :] - dx[:, None], grid[None, :] - dy[:, None]
    cxx = np.full(n, sigma * sigma)
    cyy, cxy = cxx.copy(), np.zeros(n)
    total_all = np.full(n, np.nan)
    limit = float(half * half)
    active = np.arange(n)
    for _ in range(iterations):
        if active.size == 0:
            break
        axx, ayy, axy = cxx[active], cyy[active], cxy[active]
        x, y = xs[active], ys[active]
        det = axx * ayy - axy * axy
        expo = (
            (axy / det)[:, None, None] * (y[:, :, None] * x[:, None, :])
            - (axx / (2 * det))[:, None, None] * (y * y)[:, :, None]
            - (ayy / (2 * det))[:, None, None] * (x * x)[:, None, :]
        )
        weighted = stamps[active] * np.exp(expo)
        total = weighted.sum(axis=(1, 2))
        total = np.where(total > 0, total, np.nan)
        mxx = (weighted * (x * x)[:, None, :]).sum(axis=(1, 2)) / total
        myy = (weighted * (y * y)[:, :, None]).sum(axis=(1, 2)) / total
        mxy = (weighted * (y[:, :, None] * x[:, None, :])).sum(axis=(1, 2)) / total
        mdet = mxx * myy - mxy * mxy
        with np.errstate(divide="ignore", invalid="ignore"):
            bxx, byy, bxy = myy / mdet - ayy / det, mxx / mdet - axx / det, -mxy / mdet + axy / det
            bdet = bxx * byy - bxy * bxy
            nxx, nyy, nxy = byy / bdet, bxx / bdet, -bxy / bdet
        bad = ~(np.isfinite(nxx) & np.isfinite(nyy) & (nxx > 0) & (nyy > 0) & (bdet > 0))
        nxx = np.where(bad, 2 * mxx, nxx)
        nyy = np.where(bad, 2 * myy, nyy)
        nxy = np.where(bad, 2 * mxy, nxy)
        nxx = np.clip(np.nan_to_num(nxx, nan=limit), 0.05, limit)
        nyy = np.clip(np.nan_to_num(nyy, nan=limit), 0.05, limit)
        nxy = np.clip(np.nan_to_num(nxy), -0.95 * np.sqrt(nxx * nyy), 0.95 * np.sqrt(nxx * nyy))
        step = np.maximum(np.maximum(np.abs(nxx - axx), np.abs(nyy - ayy)), np.abs(nxy - axy))
        cxx[active], cyy[active], cxy[active] = nxx, nyy, nxy
        total_all[active] = total
        active = active[~(step < _MOMENTS_CONVERGED * (nxx + nyy))]
    failed = ~np.isfinite(total_all) | (cxx >= limit) | (cyy >= limit)
    cxx[failed] = cyy[failed] = cxy[failed] = np.nan
    return cxx, cyy, cxy


def test_moments_equal_the_plain_iteration():
    """`_moments` (row sums of 1, x, x^2 by one product per stamp) gives the moments of
    the plain triple sums, to round-off, including failed (NaN) sources."""
    from core.measure import _centroids, _moments

    rng = np.random.default_rng(12)
    n, half, sigma = 400, 8, 1.9
    grid = np.arange(-half, half + 1)
    cx, cy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    sx, sy = rng.uniform(1.2, 3.5, n), rng.uniform(1.2, 3.5, n)
    rho = rng.uniform(-0.5, 0.5, n)
    gx = (grid[None, None, :] - cx[:, None, None]) / sx[:, None, None]
    gy = (grid[None, :, None] - cy[:, None, None]) / sy[:, None, None]
    q = (gx**2 - 2 * rho[:, None, None] * gx * gy + gy**2) / (1 - rho[:, None, None] ** 2)
    flux = rng.choice([30.0, 300.0, 3000.0], n)
    stamps = flux[:, None, None] * np.exp(-0.5 * q) + rng.normal(
        0, 3.0, (n, 2 * half + 1, 2 * half + 1)
    )
    stamps[:20] = rng.normal(0, 3.0, (20, 2 * half + 1, 2 * half + 1))  # noise only
    stamps[20:25] = -np.abs(stamps[20:25])  # no positive flux: failed
    dx, dy = _centroids(stamps, sigma)
    fast = np.array(_moments(stamps, dx, dy, sigma))
    plain = np.array(_plain_moments(stamps, dx, dy, sigma))
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(plain))
    assert np.isnan(fast[0]).sum() >= 5 and np.isfinite(fast[0]).sum() > 300
    ok = np.isfinite(plain[0])
    trace = plain[0, ok] + plain[1, ok]
    # the iteration amplifies round-off only where it does not settle (noise-only stamps)
    settled = np.abs(fast[:, ok] - plain[:, ok]).max(axis=0) / trace
    assert np.median(settled) < 1e-12
    assert np.mean(settled < 1e-6) > 0.97


def test_order_statistics_and_percentiles_equal_numpys():
    """`core.order` (one-rank selections) equals a full sort, and its medians and
    percentiles equal numpy's bit for bit."""
    from core.order import median_and_percentile, order_statistics, percentiles

    rng = np.random.default_rng(13)
    for trial in range(30):
        n = int(rng.choice([10, 11, 5_000, 200_000, 200_001, 1_234_567]))
        kind = trial % 6
        if kind == 0:
            values = rng.normal(size=n)
        elif kind == 1:
            values = rng.standard_cauchy(size=n)  # far tails
        elif kind == 2:
            values = np.round(rng.normal(size=n) * 3)  # heavy ties
        elif kind == 3:
            values = np.sort(rng.normal(size=n))[::-1].copy()  # a misleading strided sample
        elif kind == 4:
            # one value held by half the array (a flat variance plane), another by a
            # fifth of the rest: ranks on, below and above each
            values = rng.normal(size=n)
            values[rng.random(n) < 0.5] = values[0]
            values[(values != values[0]) & (rng.random(n) < 0.2)] = values[-1]
        else:
            values = np.maximum(rng.normal(size=n), 0.0)  # the tied value is the least
        values = values.astype(np.float32 if trial % 3 else np.float64)
        if trial == 27:  # a strided sample unlike the rest: the whole-array fallback
            values[:: max(1, n // 16_384)] = 1e3
        ranks = np.unique(rng.integers(0, n, 5))
        ranks = np.concatenate([ranks, ranks[:1], [n - 1, 0]])  # a repeat, both ends
        kept = values.copy()
        np.testing.assert_array_equal(order_statistics(values, ranks), np.sort(values)[ranks])
        np.testing.assert_array_equal(values, kept)  # not consumed: left as it was
        median, lower = median_and_percentile(values, 15.865525393145708)
        assert median == np.median(values), trial
        assert lower == np.percentile(values, 15.865525393145708), trial
        wanted = [0.0, 25.0, 50.0, 75.0, 99.9, 100.0]
        got = percentiles(values.copy(), wanted, consume=True)
        np.testing.assert_array_equal(got, np.percentile(values, wanted))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_cutout_stamps_sliced_one_by_one_equal_the_fancy_gather(dtype):
    """`core.cutouts._gather` (slices for stamps on the frame) equals the stamps of one
    fancy-indexed gather, NaN off the frame, near every edge and corner."""
    from core.cutouts import _gather
    from core.stamps import stamps

    rng = np.random.default_rng(14)
    data = (rng.normal(0, 100, (120, 97))).astype(dtype)
    ix = np.concatenate([rng.integers(0, 97, 200), [0, 96, 0, 96, 10, 48]])
    iy = np.concatenate([rng.integers(0, 120, 200), [0, 0, 119, 119, 118, 1]])
    half = 15
    expected = stamps(data.astype(np.float64), ix, iy, half, fill=np.nan).astype(np.float32)
    got = _gather(data, ix, iy, half)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got).any() and np.isfinite(got[:, half, half]).all()


def test_cutouts_equal_one_gather_per_image():
    """`core.cutouts.cutouts` of several images: each stack and header is that image's
    own gather and WCS header; a centre off the frame raises."""
    from astropy.wcs import WCS

    from core.cutouts import _gather, cutouts
    from core.errors import InvalidConfigError

    rng = np.random.default_rng(16)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix, wcs.wcs.crval, wcs.wcs.cdelt = [40.0, 50.0], [150.0, 2.0], [-1e-4, 1e-4]
    images = {
        name: (rng.normal(size=(120, 97)).astype(dtype), wcs if name != "B" else None)
        for name, dtype in (("A", np.float32), ("B", np.float64), ("C", np.int32))
    }
    x, y = rng.uniform(-0.4, 96.4, 300), rng.uniform(-0.4, 119.4, 300)
    cut = cutouts(images, x, y, 21)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    assert list(cut.stamps) == ["A", "B", "C"]
    for name, (data, image_wcs) in images.items():
        np.testing.assert_array_equal(cut.stamps[name], _gather(data, ix, iy, 10))
        expected = image_wcs.to_header(relax=True) if image_wcs is not None else None
        assert cut.headers[name] == expected
    with pytest.raises(InvalidConfigError, match="outside"):
        cutouts(images, [10.0, 97.6], [5.0, 5.0], 21)


def _plain_bright_star(template, ix, iy, radius, limit, saturated_limit):
    """The bright-star test written plainly on the whole frame: the local maxima (stars'
    cores) on each position's disc, their excess over the median of the rest of its box
    against ``limit`` times the PSF's peak (the smaller of it and ``saturated_limit``'s
    for a saturated core)."""
    from scipy import ndimage

    image = template.image.astype(np.float64)
    known = np.where(np.isfinite(image), image, -np.inf)
    cores = known >= ndimage.maximum_filter(known, size=3, mode="constant", cval=-np.inf)
    saturated = template.masked(["SAT"])
    peak = template.psf.kernel_image().max()
    least = np.where(saturated, min(limit, saturated_limit), limit) * peak
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    r = int(math.ceil(radius))
    bright = []
    for x, y in zip(ix, iy, strict=True):
        box = (np.abs(xx - x) <= r) & (np.abs(yy - y) <= r)
        disc = box & ((xx - x) ** 2 + (yy - y) ** 2 <= radius * radius)
        level = np.nanmedian(image[box & ~disc])
        star = cores & ((image - level) > least)
        bright.append(bool(np.any(star[disc])))
    return np.array(bright)


def test_bright_star_on_disc_pixels_equals_the_plain_frame_test():
    """The bright-star test on stamps, in batches, equals it written on the whole frame
    (NaN pixels and positions at the frame's edge included)."""
    from core.position_flags import bright_star_light
    from core.psf import GaussianPsf

    rng = np.random.default_rng(15)
    shape = (150, 170)
    image = rng.normal(50.0, 5.0, shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    stars = rng.uniform([0, 0, 2e2], [170, 150, 2e4], (25, 3))
    for x, y, f in stars:
        image += (f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)).astype(np.float32)
    image[70:73, 20:25] = np.nan
    template = Exposure.from_arrays(image, psf=GaussianPsf(2.0))
    # the cores of stars of 600-3000 peak saturated: bright by the lower limit only
    for x, y, _ in stars[(stars[:, 2] > 600) & (stars[:, 2] < 3000)]:
        cx, cy = int(x + 0.5), int(y + 0.5)
        template.mask[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3] = template.bitmask(["SAT"])
    ix, iy = rng.integers(0, 170, 400), rng.integers(0, 150, 400)
    peak = template.psf.kernel_image().max()
    by_saturation = 0
    for radius, limit in ((6.5, 3.0e3 / peak), (13.2, 1.0e4 / peak), (3.0, 5.0e2 / peak)):
        got = bright_star_light(template, ix, iy, radius, limit, 0.2 * limit)[0]
        plain = _plain_bright_star(template, ix, iy, radius, limit, 0.2 * limit)
        np.testing.assert_array_equal(got, plain)
        assert 0 < got.sum() < got.size
        by_saturation += got.sum() - bright_star_light(template, ix, iy, radius, limit)[0].sum()
    assert by_saturation > 0


def test_stamp_work_in_batches_equals_one_batch_of_all(monkeypatch):
    """PSF stamps and fits, apertures and the bright-star test, run in batches of
    `core.stamps.STAMP_BATCH` positions, equal one batch of every position bit for bit
    (each position's numbers are computed on their own)."""
    import core.stamps
    from core.diasources import _aperture
    from core.forced import PsfStamps, psf_photometry
    from core.position_flags import bright_star_light
    from core.psf import GridPsf

    rng = np.random.default_rng(21)
    shape = (180, 210)
    image = rng.normal(10.0, 4.0, shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y, f in rng.uniform([0, 0, 1e2], [210, 180, 1e4], (30, 3)):
        image += (f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 6.0)).astype(np.float32)
    image[40:44, 60:70] = np.nan
    variance = np.full(shape, 16.0, dtype=np.float32)
    variance[100, 20:40] = 0.0
    mask = np.zeros(shape, dtype=np.int32)
    exposure = Exposure.from_arrays(image, variance, mask)
    mask[120:125, 150:160] = exposure.bitmask(["BAD"])
    k = 25
    ky, kx = np.mgrid[:k, :k] - k // 2
    grid = np.array(
        [[np.exp(-0.5 * (kx**2 + ky**2) / (1.5 + 0.2 * i + 0.3 * j) ** 2) for i in range(3)]
         for j in range(2)]
    )  # fmt: skip
    psf = GridPsf(grid, [0.0, 100.0, 209.0], [0.0, 179.0])
    x = np.concatenate([rng.uniform(-2, 212, 290), [0.0, 209.0, 5.5]])
    y = np.concatenate([rng.uniform(-2, 182, 290), [0.0, 179.0, 5.5]])
    ix, iy = np.clip(np.floor(x + 0.5), 0, 209).astype(int), np.clip(np.floor(y + 0.5), 0, 179)

    def measure():
        stamps = PsfStamps(psf, exposure)
        drawn = stamps.at(x, y)
        out = [
            drawn[0],
            *_aperture(exposure, x, y, 5.3),
            bright_star_light(exposure.with_psf(psf), ix, iy, 5, 2000.0)[0],
        ]
        for background in (True, False):
            out += list(psf_photometry(exposure, x, y, stamps, background).values())
        out += list(psf_photometry(exposure, x, y, stamps, True, drawn=drawn).values())
        return out

    monkeypatch.setattr(core.stamps, "STAMP_BATCH", 10**9)
    whole = measure()
    monkeypatch.setattr(core.stamps, "STAMP_BATCH", 37)
    assert len(core.stamps.batches(x.size)) == 8
    batched = measure()
    for got, expected in zip(batched, whole, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert np.isnan(whole[1]).any() and np.isfinite(whole[1]).sum() > 200
    assert 0 < whole[3].sum() < x.size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_medians_equal_numpys(dtype):
    from core.order import row_medians

    rng = np.random.default_rng(19)
    for shape in ((5, 1), (5, 2), (40, 1225), (40, 1224)):
        values = np.round(rng.normal(100, 3, size=shape) * 2).astype(dtype)  # ties
        expected = np.median(values, axis=1)
        got = row_medians(values)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_nanmedians_equal_numpys(dtype):
    """`row_nanmedians` (the ring skies' median) equals ``np.nanmedian`` of the rows in
    float64, rows of NaN only NaN, the input left as it was unless consumed."""
    import warnings

    from core.order import row_nanmedians

    rng = np.random.default_rng(23)
    for shape in ((5, 1), (5, 2), (40, 368), (40, 367)):
        values = np.round(rng.normal(100, 3, size=shape) * 2).astype(dtype)  # ties
        values[::3, : shape[1] // 2] = np.nan
        values[1] = np.nan
        before = values.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN row
            expected = np.nanmedian(values.astype(np.float64), axis=1)
        np.testing.assert_array_equal(row_nanmedians(values), expected)
        np.testing.assert_array_equal(values, before)
        np.testing.assert_array_equal(row_nanmedians(values, consume=True), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_selected_median_and_mad_std_equal_numpys_and_astropys(dtype):
    """`core.order`'s medians (one-rank selections, not numpy's several-rank partition)
    and its ``mad_std`` (consumed or not) equal numpy's and astropy's bit for bit, type
    included; a NaN gives NaN as in numpy."""
    from astropy.stats import mad_std

    from core.order import mad_std as fast_mad_std
    from core.order import median as _median

    rng = np.random.default_rng(17)
    for n in (1, 2, 7, 8, 10_001, 200_000, 200_001, 1_000_000, 1_000_001):
        values = rng.standard_t(3, size=n).astype(dtype)
        values[: n // 3] = np.round(values[: n // 3] * 4)  # ties
        median = _median(values)
        assert median == np.median(values) and type(median) is type(np.median(values))
        expected = mad_std(values)
        got = fast_mad_std(values.copy(), consume=True)
        assert got == expected and type(got) is type(expected), n
        kept = values.copy()
        assert fast_mad_std(values) == expected
        np.testing.assert_array_equal(values, kept)
        values[n // 2] = np.nan
        assert np.isnan(_median(values)) and type(_median(values)) is type(np.median(values))
    assert np.isnan(_median(np.zeros(0, dtype=dtype)))


def _reference_filter_inputs(exposure: Exposure, estimate):
    """The matched filter's inputs as whole-frame operations: background-subtracted
    image (no-data pixels 0), the no-data map and the filled variance plane."""
    image = (exposure.image - estimate.background()).astype(np.float32)
    no_data = ~np.isfinite(image) | exposure.masked(["NO_DATA"])
    image[no_data] = 0.0
    variance = exposure.variance.astype(np.float32)
    ok = np.isfinite(variance) & (variance > 0) & ~no_data
    if ok.sum() < 0.5 * ok.size:
        variance = np.square(estimate.noise(), dtype=np.float32)
        ok = np.isfinite(variance) & (variance > 0) & ~no_data
    good = variance[ok]
    fill = float(np.median(good[:: good.size // 1_000_000 + 1]))
    return image, no_data, np.where(ok, variance, np.float32(fill)), fill


@pytest.mark.parametrize("case", ["clean", "holes", "bad_variance", "inf_variance", "no_variance"])
def test_matched_filter_blockwise_inputs_equal_whole_frame_ones(case):
    from core.convolve import correlate_image
    from core.detection import background_estimate
    from core.measure import _Filtered

    rng = np.random.default_rng(19)
    shape = (300, 260)  # more than one block of rows
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    variance = np.full(shape, 25.0, dtype=np.float32)
    exposure = Exposure.from_arrays(image, variance)
    if case == "holes":
        exposure.image[10:20, 30:40] = np.nan
        exposure.mask[200:210, 5:50] |= exposure.mask_planes.value("NO_DATA")
    if case in ("bad_variance", "holes"):
        exposure.variance[50, :] = 0.0
        exposure.variance[51, :] = np.inf
        exposure.variance[52, :] = np.nan
        exposure.variance[53, :] = -np.inf
    if case == "inf_variance":  # the only unusable variances: infinite ones
        exposure.variance[51, 7:90] = np.inf
    if case == "no_variance":
        exposure.variance[:200] = 0.0
    psf = GaussianPsf(1.7)
    estimate = background_estimate(exposure)
    filtered = _Filtered(exposure, psf, estimate)
    ref_image, ref_no_data, ref_variance, fill = _reference_filter_inputs(exposure, estimate)
    kernel = filtered.kernel
    np.testing.assert_array_equal(filtered.no_data, ref_no_data)
    np.testing.assert_array_equal(
        filtered.smoothed, correlate_image(ref_image, kernel, single=True)
    )
    smoothed_var = correlate_image(ref_variance, kernel**2, single=True)
    np.maximum(smoothed_var, np.float32(1e-30 * fill), out=smoothed_var)
    np.testing.assert_array_equal(filtered.smoothed_var, smoothed_var)
    assert ref_no_data.any() == (case == "holes")
    # without the maps measurements need, the S/N map is the same, made in place
    bare = _Filtered(exposure, psf, estimate, keep_maps=False)
    np.testing.assert_array_equal(bare.snr, filtered.snr)
    assert not hasattr(bare, "smoothed") and not hasattr(bare, "smoothed_var")


def test_centroids_and_moments_of_two_halves_equal_the_whole_stack():
    """`core.diasources._measure` runs `_centroids` and `_moments` on every other source
    (two threads) and interleaves the results: each source's iterations are its own,
    so the values are those of the whole stack, bit for bit (converged, slow and
    failed sources alike)."""
    from core.diasources import _interleave
    from core.measure import _centroids, _moments

    rng = np.random.default_rng(17)
    n, half, sigma = 301, 8, 1.9
    g = np.arange(-half, half + 1)
    stamps = np.empty((n, 2 * half + 1, 2 * half + 1), dtype=np.float32)
    for k in range(n):
        dx, dy = rng.uniform(-1.5, 1.5, 2)
        sx, sy = rng.uniform(1.2, 3.5, 2)
        flux = rng.choice([0.0, 5.0, 50.0, 5000.0])
        model = np.exp(
            -((g[None, :] - dx) ** 2) / (2 * sx**2) - (g[:, None] - dy) ** 2 / (2 * sy**2)
        )
        stamps[k] = flux * model + rng.normal(size=model.shape)
    dx, dy = _centroids(stamps, sigma)
    whole = _moments(stamps, dx, dy, sigma)
    halves = [_centroids(stamps[0::2], sigma), _centroids(stamps[1::2], sigma)]
    np.testing.assert_array_equal(_interleave([h[0] for h in halves]), dx)
    np.testing.assert_array_equal(_interleave([h[1] for h in halves]), dy)
    parts = [_moments(stamps[p::2], dx[p::2], dy[p::2], sigma) for p in (0, 1)]
    for got, expected in zip(zip(*parts, strict=True), whole, strict=True):
        np.testing.assert_array_equal(_interleave(got), expected)
    assert np.isnan(whole[0]).any() and np.isfinite(whole[0]).sum() > n // 2
    # an odd count and a single source split the same way
    assert _interleave([np.arange(3.0), np.arange(2.0)]).tolist() == [0, 0, 1, 1, 2]
    assert _interleave([np.arange(1.0), np.arange(0.0)]).tolist() == [0]


def test_psf_stamps_node_rows_kept_equal_a_matrix_per_batch():
    """`PsfStamps._centred_spectra` keeps the nodes' spectra as rows filled once (from
    several threads at once too): the blends of a matrix built per batch with only
    the needed nodes' rows, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    from core.forced import PsfStamps
    from core.psf import GridPsf

    k = 31
    yy, xx = np.mgrid[:k, :k] - k // 2
    grid = np.empty((4, 5, k, k))
    for j in range(4):
        for i in range(5):
            sx, sy = 1.5 + 0.2 * i, 1.7 + 0.3 * j
            grid[j, i] = np.exp(-0.5 * ((xx - 0.1 * j) ** 2 / sx**2 + yy**2 / sy**2))
    psf = GridPsf(grid, np.linspace(0, 600, 5), np.linspace(0, 450, 4))
    exposure = Exposure.from_arrays(np.zeros((460, 610)))

    def per_batch(stamps, x, y):
        size = stamps._size  # the transform's (padded) grid
        weights, needed = stamps._weights(x, y)
        spectra = np.zeros((weights.shape[1], size * (size // 2 + 1)), dtype=complex)
        n_x = stamps.nodes_x.size
        for n in needed:
            spectra[n] = stamps._spectrum(int(n) // n_x, int(n) % n_x).ravel()
        return (weights @ spectra).reshape(x.size, size, size // 2 + 1)

    rng = np.random.default_rng(5)
    # batches in one corner first (few nodes), then over the frame
    batches = [(rng.uniform(0, 100, 40), rng.uniform(0, 80, 40))]
    batches += [(rng.uniform(-5, 615, 90), rng.uniform(-5, 465, 90)) for _ in range(6)]
    reference = PsfStamps(psf, exposure)
    expected = [per_batch(reference, x, y) for x, y in batches]
    stamps = PsfStamps(psf, exposure)
    for (x, y), e in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(stamps._centred_spectra(x, y), e)
    shared = PsfStamps(psf, exposure)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: shared._centred_spectra(*b), batches * 3))
    for g, e in zip(got, expected * 3, strict=True):
        np.testing.assert_array_equal(g, e)


def test_psf_stamps_weights_built_as_csr_equal_the_coo_construction():
    """`PsfStamps._weights` builds its CSR matrix directly (four ascending columns a
    row): the same entries, order and explicit zeros (positions on nodes and beyond
    the grid) as built from coordinates, so the blends are the same bit for bit."""
    from scipy import sparse

    from core.forced import PsfStamps
    from core.psf import GridPsf

    k = 21
    yy, xx = np.mgrid[:k, :k] - k // 2
    grid = np.exp(-0.5 * (xx**2 + yy**2) / 2.0)[None, None] * np.linspace(1, 2, 12).reshape(
        3, 4, 1, 1
    )
    psf = GridPsf(grid, np.linspace(0, 900, 4), np.linspace(0, 700, 3))
    stamps = PsfStamps(psf, Exposure.from_arrays(np.zeros((700, 900))))
    rng = np.random.default_rng(8)
    x, y = rng.uniform(-50, 950, 200), rng.uniform(-50, 750, 200)
    x[:5], y[:5] = stamps.nodes_x[[0, 1, 2, 1, 3]], stamps.nodes_y[[0, 1, 2, 2, 1]]
    weights, needed = stamps._weights(x, y)
    nx_, ny_ = stamps.nodes_x, stamps.nodes_y
    i = np.clip(np.searchsorted(nx_, x) - 1, 0, nx_.size - 2)
    j = np.clip(np.searchsorted(ny_, y) - 1, 0, ny_.size - 2)
    tx = np.clip((x - nx_[i]) / (nx_[i + 1] - nx_[i]), 0, 1)
    ty = np.clip((y - ny_[j]) / (ny_[j + 1] - ny_[j]), 0, 1)
    terms = [
        (j * nx_.size + i, (1 - tx) * (1 - ty)),
        (j * nx_.size + i + 1, tx * (1 - ty)),
        ((j + 1) * nx_.size + i, (1 - tx) * ty),
        ((j + 1) * nx_.size + i + 1, tx * ty),
    ]
    columns = np.concatenate([c for c, _ in terms])
    coo = sparse.csr_matrix(
        (np.concatenate([w for _, w in terms]), (np.tile(np.arange(x.size), 4), columns)),
        shape=weights.shape,
    )
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(weights, name), getattr(coo, name))
    np.testing.assert_array_equal(needed, np.unique(columns))
    assert (weights.data == 0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_from_the_extremes_equals_the_per_pixel_test(dtype):
    """`core.order.all_finite` (least and largest values) against ``np.isfinite(...).all()``,
    one odd value anywhere; and decorrelation's fill of non-finite pixels (`_fill_unusable`)
    against the straightforward fill."""
    from core.order import all_finite

    rng = np.random.default_rng(12)
    base = rng.normal(0.0, 1e3, (37, 41)).astype(dtype)
    assert all_finite(base) and all_finite(base[:0])
    for value in (np.nan, np.inf, -np.inf, np.finfo(dtype).max, -np.finfo(dtype).max):
        for index in (0, base.size // 2, base.size - 1):
            odd = base.copy()
            odd.flat[index] = value
            assert all_finite(odd) == bool(np.isfinite(odd).all()), (value, index)
            with np.errstate(over="ignore"):  # float64's largest is inf in float32
                data, where, held = dmod._fill_unusable(odd)
                single = odd.astype(np.float32)
            finite = np.isfinite(single)
            if finite.all():
                assert where is None and held is None
                np.testing.assert_array_equal(data, single)
            else:
                fill = np.float32(np.mean(single[finite], dtype=np.float64))
                np.testing.assert_array_equal(where, np.flatnonzero(~finite))
                np.testing.assert_array_equal(held, single[~finite])
                np.testing.assert_allclose(data, np.where(finite, single, fill), rtol=1e-6)
                assert np.isfinite(data).all()


def test_local_maxima_of_stamps_equal_scipys_maximum_filter():
    """The bright-star test's stars' cores: nine shifted views give the pixels that
    `scipy.ndimage.maximum_filter` (3 x 3 per stamp) says are >= their neighbours,
    ties and -inf (pixels off the frame) included."""
    from scipy import ndimage

    from core.position_flags import _local_maxima

    rng = np.random.default_rng(8)
    for _ in range(20):
        n, ny, nx = rng.integers(1, 12), rng.integers(3, 35), rng.integers(3, 35)
        stack = np.round(rng.normal(size=(n, ny, nx)), 1)  # ties
        stack[rng.random(stack.shape) < 0.1] = -np.inf
        top = ndimage.maximum_filter(stack, size=(1, 3, 3), mode="constant", cval=-np.inf)
        np.testing.assert_array_equal(_local_maxima(stack), (stack >= top)[:, 1:-1, 1:-1])


class _PaddedShiftPsf(Psf):
    """A PSF whose `image_at` shifts its stamp on a grid zero-padded to ``size`` px,
    cropped back and not renormalised (as `core.forced.PsfStamps` draws it)."""

    def __init__(self, psf, size):
        self.psf, self.size = psf, size

    def kernel_image(self, x=None, y=None):
        return self.psf.kernel_image(x, y)

    def image_at(self, x, y):
        from scipy import fft

        stamp = np.asarray(self.kernel_image(x, y), dtype=np.float64)
        k, half = stamp.shape[0], stamp.shape[0] // 2
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        ramp_y = np.exp(-2j * np.pi * (y - iy) * fft.fftfreq(self.size))[:, None]
        ramp_x = np.exp(-2j * np.pi * (x - ix) * fft.rfftfreq(self.size))[None, :]
        spectrum = fft.rfft2(stamp, s=(self.size, self.size)) * ramp_y * ramp_x
        shifted = fft.irfft2(spectrum, s=(self.size, self.size))[:k, :k]
        return shifted, ix - half, iy - half


@pytest.mark.parametrize("fit_background", [True, False])
@pytest.mark.parametrize("psf", [GaussianPsf(1.7), MoffatPsf(4.0, 3.0)])
def test_batched_psf_fit_on_the_whole_stamp_equals_the_one_source_fit(psf, fit_background):
    """`psf_photometry` on the PSF's whole stamp (the variability test of the kernel
    sources, `whole_stamp_fluxes`) against `psf_flux`, source by source."""
    rng = np.random.default_rng(5)
    shape = (160, 140)
    image = rng.normal(10.0, 3.0, shape)
    variance = np.full(shape, 9.0) + rng.random(shape)
    image[40:44, 60:62] = np.nan  # a star with bad pixels
    exposure = Exposure.from_arrays(image, variance, psf=psf, xy0=(7, -3))
    n = 150
    x = rng.uniform(5, 135, n) + 7
    y = rng.uniform(5, 155, n) - 3
    x[:3], y[:3] = np.floor(x[:3]), np.floor(y[:3])  # whole-pixel positions (no shift)
    x[3], y[3] = 61.0 + 7, 42.0 - 3
    whole = PsfStamps(psf, exposure, half=psf.kernel_image().shape[0] // 2)
    fit = psf_photometry(exposure, x - 7, y + 3, whole, fit_background)
    # the one-source fit of the PSF shifted as PsfStamps shifts it (on a zero-padded
    # grid, the light shifted past the stamp's edge lost) ...
    padded = _PaddedShiftPsf(psf, whole._size)
    reference = np.array(
        [psf_flux(exposure, a, b, padded, fit_background) for a, b in zip(x, y, strict=True)]
    )
    ok = np.isfinite(fit["flux"]) & np.isfinite(reference[:, 0])
    assert ok.sum() > 100
    np.testing.assert_allclose(
        fit["flux"][ok], reference[ok, 0], rtol=1e-9, atol=1e-9 * fit["flux_err"][ok].max()
    )
    np.testing.assert_allclose(fit["flux_err"][ok], reference[ok, 1], rtol=1e-9)
    # ... and within 1% of an error of the fit with the PSF's own (periodic) shift
    exact = np.array(
        [psf_flux(exposure, a, b, None, fit_background) for a, b in zip(x, y, strict=True)]
    )
    np.testing.assert_array_equal(np.isfinite(exact[:, 0]), np.isfinite(reference[:, 0]))
    assert np.max(np.abs(fit["flux"][ok] - exact[ok, 0]) / exact[ok, 1]) < 0.01
    if fit_background:  # and NaN where psf_flux is (the stamp leaves the image) unless
        # all but WHOLE_STAMP_MISSING_LIGHT of the PSF's light is on usable pixels
        flux, error = whole_stamp_fluxes(exposure, x, y)
        lit = fit["coverage"] >= 1.0 - WHOLE_STAMP_MISSING_LIGHT
        np.testing.assert_array_equal(np.isnan(flux), np.isnan(reference[:, 0]) & ~lit)
        # both kinds tested: stamps leaving the image measured, and (the Moffat's wings)
        # not measured
        assert (lit & np.isnan(reference[:, 0])).sum() >= 3
        assert np.isnan(flux).sum() >= (3 if isinstance(psf, MoffatPsf) else 0)
        ok = np.isfinite(flux)
        np.testing.assert_array_equal(flux[ok], fit["flux"][ok])
        np.testing.assert_array_equal(error[ok], fit["flux_err"][ok])


def test_aperture_weights_shared_by_equal_offsets_equal_each_positions_own():
    """`_shared_aperture_weights` (one set for positions of one offset: the noise scale's
    whole pixels) equals `_aperture_weights` made for every position."""
    from core.diasources import _aperture_weights, _shared_aperture_weights

    rng = np.random.default_rng(31)
    cases = [
        (np.zeros(40), np.zeros(40)),
        (np.full(40, 0.3), np.full(40, -0.2)),
        (np.full(40, 0.3), np.concatenate([np.full(39, -0.2), [0.1]])),
        (rng.uniform(-0.5, 0.5, 40), rng.uniform(-0.5, 0.5, 40)),
        (np.zeros(1), np.zeros(1)),
    ]
    for radius in (1.3, 6.62):
        half = int(np.ceil(radius)) + 1
        for fx, fy in cases:
            expected = _aperture_weights(fx, fy, half, radius)
            got = _shared_aperture_weights(fx, fy, half, radius)
            assert got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)


def _bright_part_reference(template, ix, iy, radius, least, fraction):
    """`core.position_flags._bright_part` written plainly: float64 maxima, numpy's median
    of each ring, a star's core within the core disc looked for row by row, the
    brightest star core's excess by a loop."""
    from core.order import row_nanmedians
    from core.position_flags import _SATURATED_PLANES, _local_maxima
    from core.stamps import stamps as _stack

    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    squared = (offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel()
    disc = squared <= radius * radius
    wider = _stack(template.image, ix, iy, r + 1, fill=np.nan).astype(np.float64)
    known = np.where(np.isfinite(wider), wider, -np.inf)
    cores = _local_maxima(known).reshape(ix.size, -1)[:, disc]
    data = wider[:, 1:-1, 1:-1].reshape(ix.size, -1)
    bits = template.bitmask(_SATURATED_PLANES)
    mask = _stack(template.mask, ix, iy, r, fill=0).reshape(ix.size, -1)[:, disc]
    clipped = (mask & np.int32(bits)) != 0
    outside = data[:, ~disc]
    level = np.median(outside, axis=1)
    holes = ~np.isfinite(level)
    if holes.any():
        level[holes] = row_nanmedians(outside[holes], consume=True)
    excess = data[:, disc] - level[:, None]
    core = radius / 3.0
    r2 = squared[disc]
    under = np.isfinite(excess) & (r2 <= core * core)
    with np.errstate(invalid="ignore", divide="ignore"):
        light = np.where(under, excess, 0.0).sum(axis=1) / fraction
    inner = r2 <= max(core - 1.0, 0.0) ** 2
    for k in range(ix.size):
        if not np.any(cores[k] & under[k] & inner):
            light[k] = np.nan
    top = np.full(ix.size, np.nan)
    for k in range(ix.size):
        on = cores[k] & np.isfinite(excess[k])
        if on.any():
            top[k] = excess[k][on].max()
    with np.errstate(invalid="ignore"):
        star = excess > least[0][:, None]
        star |= clipped & (excess > least[1][:, None])
        bright = np.any(cores & star, axis=1)
    return bright, light, top


def test_bright_part_equals_its_plain_form():
    """The bright-star stamps' work (maxima in the image's precision, row medians by a
    sort, the star cores looked for at once) equals it written plainly:
    NaN and infinite pixels, stamps over the edge, cores without a finite pixel."""
    from core.position_flags import _bright_part
    from core.psf import GaussianPsf

    rng = np.random.default_rng(33)
    shape = (120, 140)
    image = rng.normal(50.0, 5.0, shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y, f in rng.uniform([0, 0, 2e2], [140, 120, 2e4], (20, 3)):
        image += (f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)).astype(np.float32)
    image[60:66, 20:26] = np.nan  # a core of no finite pixel at (23, 63)
    image[30, 100:104] = np.inf
    image[90, 50] = -np.inf
    image[::7, 80] = np.round(image[::7, 80])  # ties
    template = Exposure.from_arrays(image, psf=GaussianPsf(2.0))
    template.mask[40:45, 40:45] = template.bitmask(["SAT"])
    ix = np.concatenate([rng.integers(0, 140, 300), [23, 0, 139, 101, 50]])
    iy = np.concatenate([rng.integers(0, 120, 300), [63, 0, 119, 30, 90]])
    for radius in (0.9, 2.5, 6.5, 13.2):
        least = (rng.uniform(50, 500, ix.size), rng.uniform(10, 100, ix.size))
        fraction = rng.uniform(0.3, 0.9, ix.size)
        got = _bright_part(template, ix, iy, radius, least, fraction)
        expected = _bright_part_reference(template, ix, iy, radius, least, fraction)
        for k in range(3):
            np.testing.assert_array_equal(got[k], expected[k])
        assert np.isfinite(expected[1]).any()
        if radius > 2:  # discs of several pixels: stars on some, light off the rim NaN
            assert 0 < expected[0].sum() < ix.size and np.isnan(expected[1]).any()


def test_overlap_save_bands_zero_their_margins_whatever_the_buffer_held(monkeypatch):
    """`core.convolve._correlate_bands` zeroes only the margins around the part ``read``
    writes: with every fresh buffer full of NaN the banded correlation still equals the
    direct sum (the frame's edges, a last band past the frame, a width of partial tiles)."""
    import types

    import core.convolve
    from core.convolve import correlate_rows

    class _NanEmpty(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(shape, dtype=float, **kwargs):
            return np.full(shape, np.nan, dtype=dtype)

    monkeypatch.setattr(core.convolve, "np", _NanEmpty("numpy"))
    rng = np.random.default_rng(37)
    image = rng.normal(10.0, 3.0, size=(530, 610)).astype(np.float32)
    kernel = rng.random((15, 15))
    out = correlate_rows(
        image.shape, lambda rows, part: np.copyto(part, image[rows]), kernel, tile=64
    )
    expected = ndimage.correlate(image.astype(np.float64), kernel, mode="constant")
    assert np.isfinite(out).all()
    assert np.abs(out - expected).max() < 2e-6 * np.abs(expected).max()


def test_stellar_locus_counts_from_sorted_sizes_like_every_pair():
    """`core.psf.stellar_locus` counts each size's neighbours from the sorted sizes; the
    straightforward n x n matrix of log differences gives the same locus."""
    from core.psf import stellar_locus

    def every_pair(sizes):
        log_size = np.log(sizes)
        counts = (np.abs(log_size[:, None] - log_size[None, :]) < 0.08).sum(axis=1)
        best = counts >= min(counts.max(), max(4, 0.3 * counts.max()))
        centre = log_size[best].min()
        return float(np.exp(np.median(log_size[np.abs(log_size - centre) < 0.08])))

    rng = np.random.default_rng(41)
    for _ in range(300):
        n = int(rng.integers(3, 300))
        stars = rng.normal(1.5, 0.05, int(rng.integers(1, n + 1)))
        sizes = np.concatenate([stars, rng.uniform(0.6, 6.0, n), np.round(stars[:3], 2)])
        assert stellar_locus(sizes) == every_pair(sizes)


def test_bracketed_selection_reads_a_large_array_only_and_equals_a_sort():
    """`core.order` on an array of `_BRACKET_MIN` values or more: each rank is bracketed by
    a sorted strided sample and only the values in the bracket are selected among, so
    the array itself is read, not partitioned (``consume`` leaves it as it was), and
    the values are a full sort's. A sample unlike the array (every k-th value an
    outlier), ranks at both ends and ranks in more brackets than are worth the passes
    fall back to partitioning it, still exactly."""
    from core import order

    rng = np.random.default_rng(21)
    n = 2**19 + 12_345  # above `_BRACKET_MIN`
    percents = (15.865525393145708, 50.0)
    for kind in range(4):
        if kind == 0:
            values = rng.normal(size=n).astype(np.float32)
        elif kind == 1:
            values = rng.standard_cauchy(size=n)  # far tails
        elif kind == 2:
            values = np.round(rng.normal(size=n) * 30).astype(np.float32)  # ties
        else:
            values = rng.normal(size=n)
            values[::64] = 1e3  # the sample (every `_BRACKET_STEP`-th) sees only outliers
        expected = np.sort(values)
        below = int(math.floor((n - 1) * percents[0] / 100))
        ranks = np.array([(n - 1) // 2, n // 2, below, below + 1])
        kept = values.copy()
        got = order.order_statistics(values, ranks, consume=True)
        np.testing.assert_array_equal(got, expected[ranks])
        if kind < 3:  # bracketed: the array only read
            np.testing.assert_array_equal(values, kept)
        median, lower = order.median_and_percentile(kept.copy(), percents[0], consume=True)
        assert median == np.median(kept) and lower == np.percentile(kept, percents[0])
        # ranks at the ends, and in more brackets than `_BRACKET_MAX`
        many = np.linspace(0, n - 1, 7).astype(int)
        np.testing.assert_array_equal(order.order_statistics(kept, many), expected[many])


def _windows_counter(monkeypatch, arrays):
    """Count the `core.stamps.windows` gathers of each array of ``arrays`` (by identity)
    and how many stamps each gathered."""
    import core.stamps

    counts = {id(a): [0, 0] for a in arrays}
    original = core.stamps.windows

    def counted(array, y0, x0, side, fill=0):
        if id(array) in counts:
            counts[id(array)][0] += 1
            counts[id(array)][1] += np.size(y0)
        return original(array, y0, x0, side, fill)

    monkeypatch.setattr(core.stamps, "windows", counted)
    return counts


def test_sky_ring_fit_cuts_its_stamps_from_the_rings_and_equals_separate_gathers(monkeypatch):
    """`psf_photometry` with a sky ring (the matched images' fluxes) fits the centres of
    the ring's image and mask stamps, gathered once (`core.rings.ring_stamps`), and
    gives the numbers of the fit on stamps gathered on their own (NaN image and -1
    mask off the frame) minus `ring_levels`: positions near every edge, masked and
    non-finite pixels in stamps and rings."""
    from core.rings import ring_levels
    from core.stamps import stamps as gather

    rng = np.random.default_rng(22)
    ny, nx = 90, 110
    image = rng.normal(50.0, 5.0, (ny, nx)).astype(np.float32)
    variance = np.full((ny, nx), 25.0, dtype=np.float32)
    mask = np.zeros((ny, nx), dtype=np.int32)
    exposure = Exposure.from_arrays(image, variance, mask, psf=GaussianPsf(2.0))
    bad, sat = exposure.mask_planes.value("BAD"), exposure.mask_planes.value("SAT")
    exposure.mask[rng.random((ny, nx)) < 0.03] |= bad
    exposure.mask[rng.random((ny, nx)) < 0.02] |= sat
    exposure.image[rng.random((ny, nx)) < 0.01] = np.nan
    exposure.variance[rng.random((ny, nx)) < 0.01] = 0.0
    exposure.mask[10:30, 60:80] |= bad  # a position there has too little coverage
    x = np.concatenate([rng.uniform(0, nx - 1, 60), [0.2, nx - 1.3, 3.0, 55.0, 70.0]])
    y = np.concatenate([rng.uniform(0, ny - 1, 60), [44.0, 2.6, ny - 0.7, 0.1, 20.0]])
    stamps = PsfStamps(exposure.psf, exposure, half=6)
    unusable, ring = ("NO_DATA", "BAD", "SAT"), 4
    counts = _windows_counter(monkeypatch, [exposure.image, exposure.mask])
    fit = psf_photometry(exposure, x, y, stamps, False, 0.5, unusable=unusable, sky_ring=ring)
    # the image and the mask each gathered once, for the rings
    assert counts[id(exposure.image)][0] == 1 and counts[id(exposure.mask)][0] == 1

    model, ix, iy = stamps.at(x, y)
    h = stamps.half
    data = gather(exposure.image, ix, iy, h, fill=np.nan).astype(np.float64)
    data -= ring_levels(exposure, ix, iy, h, ring, unusable)[:, None, None]
    var = gather(exposure.variance, ix, iy, h, fill=np.nan).astype(np.float64)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(data) & np.isfinite(var) & (var > 0)
    good &= (gather(exposure.mask, ix, iy, h, fill=-1) & exposure.bitmask(unusable)) == 0
    p = np.where(good, model, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        spp = np.einsum("nij,nij->n", p, p)
        flux = np.einsum("nij,nij->n", p, np.where(good, data, 0.0)) / spp
        error = np.sqrt(np.einsum("nij,nij->n", p * np.where(good, var, 0.0), p)) / spp
        coverage = p.sum(axis=(1, 2)) / model.sum(axis=(1, 2))
    bad_fit = ~(coverage >= 0.5) | ~np.isfinite(flux) | ~np.isfinite(error)
    flux[bad_fit], error[bad_fit] = np.nan, np.nan
    np.testing.assert_array_equal(fit["flux"], flux)
    np.testing.assert_array_equal(fit["flux_err"], error)
    np.testing.assert_array_equal(fit["coverage"], coverage)
    assert np.isfinite(flux).sum() > 40 and np.isnan(flux).any()


def test_bright_star_light_reads_mask_stamps_only_where_a_clipped_core_can_decide(monkeypatch):
    """`core.position_flags.bright_star_light`: a saturated core's lower limit decides only
    positions with a star's core between the two limits and no core above the ordinary
    one; the template's mask stamps are gathered for those alone, and the flags are the
    rule's on every position (a core above the ordinary limit, or a clipped one above
    the saturated limit)."""
    from core.position_flags import _SATURATED_PLANES, bright_star_light

    rng = np.random.default_rng(23)
    ny, nx, fwhm = 160, 200, 4.0
    psf = GaussianPsf(fwhm / 2.3548)
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = rng.normal(0.0, 1.0, (ny, nx))
    stars = [
        (30 + 35 * (k % 5), 25 + 30 * (k // 5), 10.0 ** rng.uniform(0.9, 3.5)) for k in range(20)
    ]
    for sx, sy, light in stars:
        image += light * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * psf.sigma() ** 2))
    template = Exposure.from_arrays(image.astype(np.float32), psf=psf)
    sat = template.bitmask(["SAT"])
    for sx, sy, _ in stars[::2]:  # half the stars clipped at their cores
        template.mask[sy - 1 : sy + 2, sx - 1 : sx + 2] |= sat
    ix = np.concatenate([[s[0] + 2 for s in stars], rng.integers(5, nx - 5, 40)])
    iy = np.concatenate([[s[1] - 1 for s in stars], rng.integers(5, ny - 5, 40)])
    limit = np.full(ix.size, 3000.0)
    counts = _windows_counter(monkeypatch, [template.mask])
    bright, light = bright_star_light(template, ix, iy, 3 * fwhm, limit, 100.0)
    monkeypatch.undo()

    # the rule on every position, from stamps of every position
    from core.position_flags import _local_maxima, _psf_peak_and_core, _ring_medians
    from core.stamps import stamps as gather

    radius = 3 * fwhm
    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    squared = (offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel()
    disc = squared <= radius * radius
    peak, _ = _psf_peak_and_core(template, ix, iy, radius / 3.0)
    least, clipped_least = limit * peak, np.minimum(limit * peak, 100.0 * peak)
    stack = gather(template.image, ix, iy, r + 1, fill=np.nan)
    cores = _local_maxima(np.where(np.isfinite(stack), stack, -np.inf)).reshape(ix.size, -1)
    data = stack.astype(np.float64)[:, 1:-1, 1:-1].reshape(ix.size, -1)
    excess = data[:, disc] - _ring_medians(data[:, ~disc])[:, None]
    mask = gather(template.mask, ix, iy, r, fill=0).reshape(ix.size, -1)[:, disc]
    clipped = (mask & np.int32(template.bitmask(_SATURATED_PLANES))) != 0
    star = (excess > least[:, None]) | (clipped & (excess > clipped_least[:, None]))
    expected = np.any(cores[:, disc] & star, axis=1)
    np.testing.assert_array_equal(bright, expected)
    by_clipped = expected & ~np.any(cores[:, disc] & (excess > least[:, None]), axis=1)
    assert by_clipped.sum() >= 2 and (expected & ~by_clipped).sum() >= 2
    # mask stamps for the positions a clipped core could decide, not for all
    assert 0 < counts[id(template.mask)][1] < ix.size
    assert np.isfinite(light).any()


def test_dia_catalog_with_bracketed_selections_equals_the_partitioned_one(monkeypatch):
    """The DIA catalog (every column, the meta) of a simulated auto subtraction with
    `core.order`'s bracketed selections on arrays of a few thousand values up (its noise
    factor, the fills and medians) equals the catalog with whole-array partitions."""
    from core import order
    from core.diasources import dia_sources
    from core.simulate import preset, simulate_pair
    from core.subtract import run_subtraction

    config = preset("varying", size=512, seed=31).model_copy(
        update={"n_transients": 40, "n_negative_transients": 20}
    )
    pair = simulate_pair(config)
    result = run_subtraction(pair.science, pair.template)

    def catalog(least: int):
        monkeypatch.setattr(order, "_BRACKET_MIN", least)
        return dia_sources(
            result.output,
            matched_science=result.matched_science,
            matched_template=result.matched_template,
            kernel_sources=result.kernel_sources,
        )

    partitioned, bracketed = catalog(1 << 40), catalog(4096)
    assert len(partitioned) >= 40
    assert partitioned.colnames == bracketed.colnames
    for name in partitioned.colnames:
        np.testing.assert_array_equal(bracketed[name], partitioned[name], err_msg=name)
    assert dict(bracketed.meta) == dict(partitioned.meta)


def test_source_mask_from_each_input_equals_growing_their_union():
    """Each input's preparation grows its own detections on the science grid
    (`core.subtract.near_sources`); their union must be the grown union of the two
    inputs' DETECTED / DETECTED_NEGATIVE planes, as the source mask was first made.
    The template is larger than the science and offset: its detections just outside
    the science window must not leak in (cropped before growing, as the union was)."""
    from core.dilation import dilate_cross
    from core.subtract import near_sources

    rng = np.random.default_rng(11)
    shape, big = (203, 157), (231, 190)
    science = Exposure.from_arrays(np.zeros(shape, np.float32), np.ones(shape, np.float32))
    template = Exposure.from_arrays(np.zeros(big, np.float32), np.ones(big, np.float32))
    science.xy0, template.xy0 = (40, 30), (27, 12)
    x0, y0 = 40 - 27, 30 - 12
    window = np.s_[y0 : y0 + shape[0], x0 : x0 + shape[1]]
    for exposure in (science, template):
        for plane in ("DETECTED", "DETECTED_NEGATIVE"):
            exposure.set_plane(plane, rng.random(exposure.shape) < 0.005)
        exposure.set_plane("SAT", rng.random(exposure.shape) < 0.05)  # not a detection
    # template detections on the rows and columns just outside the window
    edge = np.zeros(big, dtype=bool)
    edge[y0 - 1, x0 : x0 + shape[1]] = edge[y0 + shape[0], x0 : x0 + shape[1]] = True
    edge[y0 : y0 + shape[0], x0 - 1] = edge[y0 : y0 + shape[0], x0 + shape[1]] = True
    template.set_plane("DETECTED", edge)
    planes = ["DETECTED", "DETECTED_NEGATIVE"]
    reference = dilate_cross(science.masked(planes) | template.masked(planes)[window], 3)
    got = near_sources(science) | near_sources(template, window)
    assert got.shape == shape and 0.05 < reference.mean() < 0.8
    np.testing.assert_array_equal(got, reference)


def test_template_coverage_counted_on_threads_equals_one_pass():
    """`_template_coverage` counts its blocks of rows on threads: the same fraction as
    one whole-frame count of science pixels where either input has no data (NO_DATA
    on either, NaN on the template), on a frame whose rows are no multiple of a block."""
    from core.subtract import _SubtractBase

    rng = np.random.default_rng(5)
    shape, big = (1001, 300), (1040, 333)
    science = Exposure.from_arrays(np.zeros(shape, np.float32), np.ones(shape, np.float32))
    image = rng.normal(size=big).astype(np.float32)
    image[rng.random(big) < 0.03] = np.nan
    template = Exposure.from_arrays(image, np.ones(big, np.float32))
    science.xy0, template.xy0 = (10, 20), (4, 1)
    # the science's last rows: the partial block must count too
    science.set_plane("NO_DATA", (rng.random(shape) < 0.02) | (np.arange(shape[0]) > 990)[:, None])
    template.set_plane("NO_DATA", rng.random(big) < 0.02)
    window = np.s_[19 : 19 + shape[0], 6 : 6 + shape[1]]
    missing = (~np.isfinite(image[window]) | template.masked(["NO_DATA"])[window]) | science.masked(
        ["NO_DATA"]
    )
    expected = 1.0 - np.count_nonzero(missing) / missing.size
    assert _SubtractBase._template_coverage(template, science) == expected


def _neighbour_prediction_reference(mesh: np.ndarray) -> np.ndarray:
    """The despike's prediction as first written: numpy's nanmedian over the eight
    straight-line predictions."""
    import warnings

    from core.background import _directional_predictions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(_directional_predictions(mesh), axis=0)


def test_despike_prediction_is_numpys_nanmedian_over_the_directions():
    """The background mesh's despike prediction (a median over directions by sorting
    each cell's predictions) is numpy's nanmedian of them, bit for bit: odd and even
    counts of finite predictions (edges, corners, holes), ties, all-NaN cells."""
    from core.background import _neighbour_prediction

    rng = np.random.default_rng(11)
    for trial in range(300):
        shape = tuple(int(n) for n in rng.integers(3, 14, 2))
        mesh = rng.normal(rng.uniform(-1e4, 1e4), rng.uniform(1e-3, 1e3), shape)
        if trial % 3 == 0:
            mesh = np.round(mesh)  # ties between directions
        if trial % 4 == 0:
            mesh[rng.random(shape) < 0.3] = np.nan  # cells with few or no predictions
        expected = _neighbour_prediction_reference(mesh)
        np.testing.assert_array_equal(_neighbour_prediction(mesh), expected, err_msg=str(trial))


def test_frames_past_the_huge_page_size_are_grown_and_padded_like_numpys():
    """Boolean frames and meshes made on huge pages (`frame_array`: from 4 MB, a block
    of rows at a time) hold numpy's whole-frame values: the cross dilation is
    scipy's, the disc dilation the distance transform's, the mesh's padded cells the
    image where valid and NaN elsewhere, on a frame whose rows are no multiple of a
    block."""
    from core.background import _mesh_cells
    from core.detection import _disc_dilate
    from core.dilation import dilate_cross
    from core.parallel import HUGE_FRAME_BYTES

    rng = np.random.default_rng(17)
    shape = (2100, 2050)  # bool: past HUGE_FRAME_BYTES; 2100 rows: a partial last block
    assert shape[0] * shape[1] >= HUGE_FRAME_BYTES
    mask = rng.random(shape) < 0.002
    mask[0, 7] = mask[-1, -1] = mask[1000, 0] = True  # on the border
    grown = ndimage.binary_dilation(mask, iterations=3)
    np.testing.assert_array_equal(dilate_cross(mask, 3), grown)
    distance = ndimage.distance_transform_edt(~mask)
    np.testing.assert_array_equal(_disc_dilate(mask, 5), distance <= 5)

    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    image[rng.random(shape) < 0.001] = np.nan
    exposure = Exposure.from_arrays(image, np.ones(shape, np.float32))
    exposure.set_plane("BAD", rng.random(shape) < 0.01)
    _, cells, valid = _mesh_cells(exposure, 64, ("BAD",))
    np.testing.assert_array_equal(valid, np.isfinite(image) & ~exposure.masked(["BAD"]))
    nby, nbx = cells.shape[:2]
    expected = np.full((nby * 64, nbx * 64), np.nan, dtype=np.float32)
    expected[: shape[0], : shape[1]] = np.where(valid, image, np.float32(np.nan))
    padded = cells.transpose(0, 2, 1, 3).reshape(expected.shape)
    np.testing.assert_array_equal(padded, expected)


def test_the_kernel_matched_psf_is_the_direct_correlation_of_the_psf_with_the_kernel():
    """Drawn by FFT (a 41 px kernel on a 23 px stamp: 43 ms directly, 0.25 ms so)."""
    from core.psf import GaussianPsf, KernelMatchedPsf

    class Kernel:
        def __init__(self, image):
            self._image = image

        def image(self, x=None, y=None):
            return self._image

    rng = np.random.default_rng(4)
    kernel = rng.random((41, 41)) * GaussianPsf(5.0, size=41).kernel_image()
    psf = GaussianPsf(2.0, ellipticity=0.3, angle=20.0, size=23)
    drawn = KernelMatchedPsf(psf, Kernel(kernel)).kernel_image(100.0, 200.0)
    reference = ndimage.correlate(np.pad(psf.kernel_image(), 20), kernel, mode="constant")
    np.testing.assert_allclose(drawn, reference / reference.sum(), rtol=0, atol=1e-14)
