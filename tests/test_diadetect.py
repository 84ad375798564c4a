"""The fast DIA detection (core.diadetect) and stamp helpers against straightforward
whole-frame references."""

from __future__ import annotations

import numpy as np
import pytest

from core.convolve import correlate_image
from core.detection import _find_peaks, _footprints
from core.diadetect import (
    DifferenceSnr,
    _block_reduce,
    block_size,
    crop_kernel,
    matched_numerator,
    prepare_difference,
    sparse_peaks,
)
from core.diasources import _APERTURE_SUBSAMPLE, _aperture_weights
from core.measure import _negative_side_sigma, _stack
from core.stamps import stamps

THRESHOLD, MIN_PIXELS, PROMINENCE = 5.0, 3, 3.0
NO_DATA_BIT = 1


def _gaussian(sigma: float, half: int) -> np.ndarray:
    g = np.arange(-half, half + 1)
    k = np.exp(-(g[:, None] ** 2 + g[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def _frame(seed: int = 3, shape=(651, 703), negatives: bool = True):
    """A difference with a varying variance (gradient and bright-star bumps), positive
    and negative sources (some blended, some on the edge), a NO_DATA band and NaNs."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    variance = 100.0 + 60.0 * xx / nx + 30.0 * yy / ny
    psf = _gaussian(1.8, 12)
    image = np.zeros(shape)
    for _ in range(25):  # stars: only their Poisson noise is left
        x, y = rng.uniform(0, nx), rng.uniform(0, ny)
        variance += 4e4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8**2)) / 20
    points = [(rng.uniform(0, nx), rng.uniform(0, ny), rng.uniform(100, 3000)) for _ in range(60)]
    # a blended pair (deblended), and sources on the frame's edges
    points += [(200.0, 300.0, 6000.0), (207.0, 301.0, 5000.0), (2.0, 100.0, 2000.0)]
    points += [(nx - 1.5, ny - 2.0, 2000.0)]
    for k, (x, y, flux) in enumerate(points):
        sign = -1 if k % 3 == 0 and k < 60 and negatives else 1
        profile = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.8**2)) / (2 * np.pi * 1.8**2)
        image += sign * flux * profile
    image += rng.normal(size=shape) * np.sqrt(variance)
    mask = np.zeros(shape, dtype=np.int32)
    mask[:, :9] = NO_DATA_BIT
    mask[-5:, :] = NO_DATA_BIT
    image[400, 500] = np.nan
    variance[410:412, 100:104] = 0.0
    return image.astype(np.float32), variance.astype(np.float32), mask, psf


def _whole_frame(image, variance, no_data, kernel, floor, factor):
    """The S/N map on the whole frame (two full correlations) and its peaks, as the
    detection did before: positive footprints, then negative ones, raster order."""
    smoothed = correlate_image(image, kernel, single=True)
    noise = correlate_image(variance, kernel**2, single=True)
    snr = smoothed / np.sqrt(np.maximum(noise, np.float32(floor)))
    if no_data is not None:
        snr[no_data] = 0.0
    snr /= np.float32(factor)
    peaks = []
    offset = 0
    for sign in (1, -1):
        signed = snr * sign
        labels, n = _footprints(signed, THRESHOLD, MIN_PIXELS)
        if n:
            found = _find_peaks(signed, labels, n, 1.8, PROMINENCE)
            count = np.bincount(found[:, 2], minlength=n + 1)[found[:, 2]]
            for (row, col, label), c in zip(found, count, strict=True):
                peaks.append((col, row, sign, label + offset, c, signed[row, col]))
            offset += n
    return snr, peaks


def _fast(image, variance, mask, psf, sample_pixels, factor=None):
    kernel = crop_kernel(psf)
    size = block_size(kernel.shape[0] // 2)
    image, variance, no_data, fill, vmin = prepare_difference(
        image, variance, mask, NO_DATA_BIT, size
    )
    smoothed = correlate_image(image, kernel, single=True)
    snr = DifferenceSnr(smoothed, variance, no_data, kernel, 1e-30 * fill, vmin)
    snr.noise_factor(sample_pixels)
    if factor is not None:
        snr.factor = factor
    candidate = snr.candidates(THRESHOLD)
    peaks = sparse_peaks(
        image.shape, size, candidate, snr.blocks, THRESHOLD, MIN_PIXELS, 1.8, PROMINENCE
    )
    return snr, candidate, peaks, (image, variance, no_data, kernel, 1e-30 * fill)


@pytest.mark.parametrize("sample_pixels", [2**21, 60_000])
def test_sparse_detection_equals_whole_frame(sample_pixels):
    """Same footprints, peaks, numbering and S/N as the whole-frame map (same noise
    factor), whether the noise factor used every block or a lattice of windows."""
    image, variance, mask, psf = _frame()
    snr, candidate, peaks, prepared = _fast(image, variance, mask, psf, sample_pixels)
    full, expected = _whole_frame(*prepared, snr.factor)
    assert len(expected) > 40
    got = list(zip(peaks.col, peaks.row, peaks.sign, peaks.footprint, peaks.n_peaks, strict=True))
    assert got == [p[:5] for p in expected]
    np.testing.assert_allclose(peaks.value, [p[5] for p in expected], rtol=1e-4)
    assert np.any(np.asarray(peaks.n_peaks) > 1)  # the blended pair was deblended
    # no pixel above threshold outside the candidate blocks (the bound holds)
    s = snr.size
    ys, xs = np.nonzero(np.abs(full) >= THRESHOLD)
    assert candidate[ys // s, xs // s].all()
    assert candidate.mean() < 0.5  # and it does spare blocks
    # the S/N of the blocks computed equals the whole-frame map
    by, bx = np.nonzero(candidate)
    blocks = snr.blocks(by, bx)
    ny, nx = full.shape
    for k in range(by.size):
        h, w = min(s, ny - by[k] * s), min(s, nx - bx[k] * s)
        ref = full[by[k] * s : by[k] * s + h, bx[k] * s : bx[k] * s + w]
        np.testing.assert_allclose(blocks[k, :h, :w], ref, rtol=1e-4, atol=1e-4)


def test_noise_factor_whole_and_sampled():
    """Measured on every block it is the whole-frame estimate; on a lattice of windows
    it agrees within the sampling noise."""
    image, variance, mask, psf = _frame(seed=5, shape=(990, 1000))
    whole, *_, prepared = _fast(image, variance, mask, psf, 2**21)
    full, _ = _whole_frame(*prepared, 1.0)
    expected = _negative_side_sigma(full, ~prepared[2])
    assert whole.factor == pytest.approx(expected, rel=1e-4)
    sampled, *_ = _fast(image, variance, mask, psf, 200_000)
    assert sampled.factor == pytest.approx(expected, rel=0.03)


def test_crop_kernel_keeps_energy():
    psf = _gaussian(2.0, 35)
    cropped = crop_kernel(psf)
    assert cropped.shape[0] % 2 == 1 and cropped.shape[0] < psf.shape[0]
    assert 1 - (cropped**2).sum() / (psf**2).sum() <= 1e-6
    c = psf.shape[0] // 2
    h = cropped.shape[0] // 2
    assert np.array_equal(cropped, psf[c - h : c + h + 1, c - h : c + h + 1])
    # one pixel less loses more than allowed
    smaller = psf[c - h + 1 : c + h, c - h + 1 : c + h]
    assert 1 - (smaller**2).sum() / (psf**2).sum() > 1e-6


def test_crop_kernel_keeps_its_least_half_width():
    """A point-like kernel (all its power in the centre pixel) is cut to that pixel, or to
    ``min_half`` around it (the preconvolution kernel's 3 x 3), as far as it reaches."""
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    assert crop_kernel(delta).shape == (1, 1)
    assert crop_kernel(delta, min_half=1).shape == (3, 3)
    assert crop_kernel(delta, min_half=6).shape == (9, 9)


@pytest.mark.parametrize("shape", [(128, 96), (100, 77)])
def test_block_reduce(shape):
    a = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = _block_reduce(a, 32, np.maximum, -np.inf)
    for by in range(got.shape[0]):
        for bx in range(got.shape[1]):
            assert got[by, bx] == a[by * 32 : by * 32 + 32, bx * 32 : bx * 32 + 32].max()


def test_stamps_equal_fancy_indexing():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(60, 45)).astype(np.float32)
    cx = np.array([0, 3, 22, 44, 44, 10, -2])
    cy = np.array([0, 59, 30, 0, 59, 2, 5])
    for half in (0, 3, 7):
        np.testing.assert_array_equal(
            stamps(a, cx, cy, half, fill=np.nan), _stack(a, cx, cy, half, fill=np.nan)
        )
    m = rng.integers(0, 8, size=(60, 45)).astype(np.int32)
    np.testing.assert_array_equal(stamps(m, cx, cy, 4, fill=-1), _stack(m, cx, cy, 4, fill=-1))


@pytest.mark.parametrize("radius", [0.4, 1.3, 2.0, 6.6, 6.62])
def test_aperture_weights_equal_subpixel_grid(radius):
    """The closed-form coverage equals counting the s x s sub-pixel centres."""
    rng = np.random.default_rng(2)
    fx, fy = rng.uniform(-0.5, 0.5, 500), rng.uniform(-0.5, 0.5, 500)
    half = int(np.ceil(radius)) + 1
    s = _APERTURE_SUBSAMPLE
    sub = (np.arange(s) + 0.5) / s - 0.5
    grid = np.arange(-half, half + 1)
    ox = grid[None, :, None] + sub[None, None, :] - fx[:, None, None]
    oy = grid[None, :, None] + sub[None, None, :] - fy[:, None, None]
    inside = oy[:, :, None, :, None] ** 2 + ox[:, None, :, None, :] ** 2 <= radius**2
    np.testing.assert_array_equal(_aperture_weights(fx, fy, half, radius), inside.mean(axis=(3, 4)))


def _reference_detect(exposure, config, is_score):
    """The whole-frame detection as it was before core.diadetect: the S/N map of the
    full frame (core.measure._Filtered, or score / sqrt(variance)), then footprints
    and peaks of each sign over the whole frame."""
    from dataclasses import replace

    from core.background import _BackgroundMesh
    from core.diasources import footprint_min_pixels
    from core.forced import profile_sigma
    from core.measure import _Filtered

    psf = exposure.require_psf()
    sigma = profile_sigma(psf)
    bits = exposure.bitmask(["EDGE"])
    mask = np.where(
        exposure.mask & bits, exposure.mask | exposure.bitmask(["NO_DATA"]), exposure.mask
    )
    exposure = replace(exposure, mask=mask)
    if is_score:
        image = np.where(np.isfinite(exposure.image), exposure.image, np.float32(0))
        var = exposure.variance
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.where(np.isfinite(var) & (var > 0), image / np.sqrt(var), np.float32(0))
        snr = snr.astype(np.float32)
        unusable = exposure.masked(["NO_DATA"]) | ~np.isfinite(exposure.image)
        with np.errstate(invalid="ignore"):
            unusable |= ~(np.isfinite(var) & (var > 0))
        snr[unusable] = 0.0
        factor = _negative_side_sigma(snr, ~unusable)
        snr /= np.float32(factor)
    else:
        ny, nx = exposure.shape
        filtered = _Filtered(exposure, psf, _BackgroundMesh.constant(ny, nx, 0.0, 1.0))
        snr, factor = filtered.snr, filtered.noise_factor
    found = []
    offset = 0
    for sign in (1, -1):
        signed = snr * sign
        labels, n = _footprints(signed, config.threshold, footprint_min_pixels(psf, config))
        if n:
            peaks = _find_peaks(signed, labels, n, sigma, config.peak_prominence)
            count = np.bincount(peaks[:, 2], minlength=n + 1)[peaks[:, 2]]
            for (row, col, label), c in zip(peaks, count, strict=True):
                found.append((col, row, sign, label + offset, c, signed[row, col]))
            offset += n
    found.sort(key=lambda p: -p[5])
    return found, factor


@pytest.mark.parametrize("is_score", [False, True])
def test_detect_dia_sources_equals_whole_frame(is_score):
    """`detect_dia_sources` on an exposure (EDGE band, NaNs, a bad variance patch)
    finds what the whole-frame map finds, in the same order, with the same S/N."""
    from core.config import DiaSourceConfig
    from core.diasources import detect_dia_sources
    from core.exposure import Exposure
    from core.psf import GaussianPsf

    image, variance, mask, _ = _frame(seed=7, shape=(700, 760))
    exposure = Exposure.from_arrays(image, variance, psf=GaussianPsf(1.8))
    edge = np.zeros(image.shape, dtype=bool)
    edge[:12], edge[:, -12:] = True, True
    exposure.mask[edge] |= exposure.bitmask(["EDGE"])
    exposure.mask[mask != 0] |= exposure.bitmask(["NO_DATA"])
    config = DiaSourceConfig()
    expected, factor = _reference_detect(exposure, config, is_score)
    det = detect_dia_sources(exposure, config, is_score=is_score)
    assert det.noise_factor == pytest.approx(factor, rel=1e-4)
    assert len(expected) > 40
    got = list(zip(det.col, det.row, det.sign, det.footprint, det.n_peaks, strict=True))
    assert got == [p[:5] for p in expected]
    np.testing.assert_allclose(np.abs(det.peak_snr), [p[5] for p in expected], rtol=1e-3)


def test_score_noise_factor_ignores_unusable_pixels():
    """A score whose frame is 40% no data (a mosaic's uncovered corner) and has a few
    bad variances: its S/N's noise factor is the scatter of the covered pixels (1 for
    unit-variance noise), not narrowed by the zeros it holds elsewhere (was 0.6)."""
    from core.config import DiaSourceConfig
    from core.diasources import detect_dia_sources
    from core.exposure import Exposure
    from core.psf import GaussianPsf

    rng = np.random.default_rng(11)
    shape = (1200, 1000)
    image = rng.normal(0.0, 2.0, shape).astype(np.float32)
    variance = np.full(shape, 4.0, dtype=np.float32)
    exposure = Exposure.from_arrays(image, variance, psf=GaussianPsf(1.8))
    exposure.mask[:, :400] |= exposure.bitmask(["NO_DATA"])
    exposure.image[:, :400] = 0.0
    exposure.variance[500:520] = 0.0
    exposure.image[700:710] = np.nan
    det = detect_dia_sources(exposure, DiaSourceConfig(), is_score=True)
    assert det.noise_factor == pytest.approx(1.0, abs=0.02)


def test_lazy_variance_windows_equal_the_filled_frame():
    """Windows of the lazily filled variance (plain copies where no block holds a
    replaced pixel, filled ones elsewhere and off the frame) equal the filled frame's."""
    image, variance, mask, psf = _frame(seed=7)
    variance[300, 350] = np.nan
    size = 32
    frame = prepare_difference(image, variance, mask, NO_DATA_BIT, size)[1]
    lazy = prepare_difference(image, variance, mask, NO_DATA_BIT, size, lazy_variance=True)[1]
    rng = np.random.default_rng(1)
    side = 60
    y0 = rng.integers(-side, image.shape[0], 400)
    x0 = rng.integers(-side, image.shape[1], 400)
    got = lazy.windows(y0, x0, side)
    expected = stamps(frame, x0 + side // 2, y0 + side // 2, side // 2, fill=0)[:, :side, :side]
    np.testing.assert_array_equal(got, expected)
    # both paths ran: windows touching a replaced pixel and windows that do not
    touched = [
        (y0[k], x0[k])
        for k in range(y0.size)
        if 0 <= y0[k] <= 300 < y0[k] + side and 0 <= x0[k] <= 350 < x0[k] + side
    ]
    assert touched and lazy._dirty_sum[-1, -1] < lazy._dirty_sum.size / 2
    # windows all on the frame and clear of the replaced pixel: one plain gather
    y0, x0 = rng.integers(0, 200, 50), rng.integers(400, image.shape[1] - side, 50)
    expected = stamps(frame, x0 + side // 2, y0 + side // 2, side // 2)[:, :side, :side]
    lazy._filled = None  # (no window may take the filling path)
    np.testing.assert_array_equal(lazy.windows(y0, x0, side), expected)


@pytest.mark.parametrize("shape", [(651, 703), (420, 1100), (415, 1201)])
def test_matched_numerator_equals_correlation_of_zeroed_frame(shape):
    """The tiled numerator (unusable pixels zeroed tile by tile) equals correlate_image
    of prepare_difference's zeroed frame, with and without unusable pixels."""
    image, variance, mask, psf = _frame(seed=11, shape=shape)
    kernel = crop_kernel(psf)
    zeroed, _, no_data, *_ = prepare_difference(image, variance, mask, NO_DATA_BIT, 32)
    assert no_data is not None
    expected = correlate_image(zeroed, kernel, single=True)
    np.testing.assert_allclose(
        matched_numerator(image, no_data, kernel), expected, rtol=1e-5, atol=1e-4
    )
    clean = np.nan_to_num(image)
    np.testing.assert_allclose(
        matched_numerator(clean, None, kernel),
        correlate_image(clean, kernel, single=True),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("sign", [1, -1])
def test_filler_blocks_drawn_where_a_prominence_line_reads_them(sign):
    """A group's rectangle holds a block that is no candidate (all below threshold):
    it stays -inf on the canvas unless a deblending line can read it. Here the line
    between the two peaks of an L-shaped footprint crosses it, and its values (just
    below threshold) make the second peak not prominent: the result must be the
    whole-frame one (with -inf there it would be a second source)."""
    size, thr = 32, 5.0
    snr = np.zeros((128, 160), dtype=np.float32)
    snr[:64, :64] = 4.9  # the rectangle's four blocks; block (1, 1) stays below thr
    snr[19:22, 20:61] = 5.2  # ridge along row 20 ...
    snr[20:61, 19:22] = 5.2  # ... and down column 20
    snr[20, 60] = snr[60, 20] = 5.5  # the two peaks at its ends
    snr[100:103, 120:124] = 7.0  # an isolated source elsewhere
    snr *= sign
    candidate = _block_reduce(np.abs(snr), size, np.maximum, 0) >= thr
    assert not candidate[1, 1] and candidate[0, 0] and candidate[0, 1] and candidate[1, 0]

    def blocks(by, bx):
        return stamps(snr, bx * size + size // 2, by * size + size // 2, size // 2)[:, :size, :size]

    peaks = sparse_peaks(snr.shape, size, candidate, blocks, thr, 3, 1.0, 1.0)
    signed = snr * sign
    labels, n = _footprints(signed, thr, 3)
    expected = _find_peaks(signed, labels, n, 1.0, 1.0)
    assert n == 2 and len(expected) == 2  # the L is one source: its far end is not prominent
    got = sorted(zip(peaks.row.tolist(), peaks.col.tolist(), strict=True))
    assert got == sorted((int(r), int(c)) for r, c, _ in expected)
    assert set(peaks.sign.tolist()) == {sign}
    # the same map with the line's block really at -inf would deblend the L
    holed = signed.copy()
    holed[32:64, 32:64] = -np.inf
    labels, n = _footprints(holed, thr, 3)
    assert len(_find_peaks(holed, labels, n, 1.0, 1.0)) == 3


def test_whole_frame_noise_factor_samples_blocks_in_raster_order():
    """Over 4 million pixels the whole-frame estimate samples every other value: they
    must be taken block by block (raster order of the blocks, then of their pixels),
    as when every block was transformed on its own, for the same factor."""
    rng = np.random.default_rng(12)
    shape = (2090, 2050)
    variance = (100.0 + 50.0 * rng.random(shape)).astype(np.float32)
    image = (rng.normal(size=shape) * np.sqrt(variance)).astype(np.float32)
    mask = np.zeros(shape, dtype=np.int32)
    mask[:, :7] = NO_DATA_BIT
    kernel = crop_kernel(_gaussian(1.8, 12))
    size = block_size(kernel.shape[0] // 2)
    _, var, no_data, fill, vmin = prepare_difference(
        image, variance, mask, NO_DATA_BIT, size, lazy_variance=True, keep_image=False
    )
    smoothed = matched_numerator(image, no_data, kernel)
    snr = DifferenceSnr(smoothed, var, no_data, kernel, 1e-30 * fill, vmin)
    factor = snr.noise_factor(2**22)
    # the reference: each block's S/N by its own transform, concatenated block by block
    nby, nbx = snr.grid
    by, bx = np.divmod(np.arange(nby * nbx), nbx)
    values = snr._snr_windows(by * size, bx * size, size)
    keep = ~stamps(no_data, bx * size + size // 2, by * size + size // 2, size // 2, fill=True)
    keep = keep[:, :size, :size]
    for k in range(by.size):
        keep[k, max(shape[0] - by[k] * size, 0) :, :] = False
        keep[k, :, max(shape[1] - bx[k] * size, 0) :] = False
    assert keep.sum() > 4_000_000  # every other value is sampled
    assert factor == pytest.approx(_negative_side_sigma(values[keep]), rel=1e-6)
    np.testing.assert_allclose(snr.blocks(by, bx), values / factor, rtol=1e-4, atol=1e-4)


def test_snr_batches_on_threads_equal_one_batch():
    """DifferenceSnr._snr splits its windows into batches on the thread pool: the values
    of one batch in the calling thread, bit for bit (on and off the frame)."""
    image, variance, mask, psf = _frame(seed=9)
    kernel = crop_kernel(psf)
    size = block_size(kernel.shape[0] // 2)
    _, var, no_data, fill, vmin = prepare_difference(
        image, variance, mask, NO_DATA_BIT, size, lazy_variance=True, keep_image=False
    )
    snr = DifferenceSnr(matched_numerator(image, no_data, kernel), var, no_data, kernel, fill, vmin)
    rng = np.random.default_rng(4)
    y0 = rng.integers(-size, image.shape[0], 150)
    x0 = rng.integers(-size, image.shape[1], 150)
    one = snr._snr_windows(y0, x0, size)
    assert np.isfinite(one).all() and (one != 0).mean() > 0.5
    for batch in (1, 7, 64, 10**6):
        np.testing.assert_array_equal(snr._snr(y0, x0, size, batch), one)
    assert snr._snr(y0[:0], x0[:0], size, 8).shape == (0, size, size)


@pytest.mark.parametrize("negatives", [True, False])
def test_sparse_detection_without_negative_side_equals_whole_frame(negatives):
    """Without a value down to -threshold the negative side is not searched: the peaks
    are still those of the whole-frame map (positive and negative footprints)."""
    image, variance, mask, psf = _frame(seed=7, negatives=negatives)
    snr, candidate, peaks, prepared = _fast(image, variance, mask, psf, 2**21)
    full, expected = _whole_frame(*prepared, snr.factor)
    assert (full.min() <= -THRESHOLD) == negatives
    got = list(zip(peaks.col, peaks.row, peaks.sign, peaks.footprint, peaks.n_peaks, strict=True))
    assert got == [p[:5] for p in expected]
    assert (np.asarray(peaks.sign) < 0).any() == negatives


@pytest.mark.parametrize("sample_pixels", [2**21, 60_000])
def test_search_equals_noise_factor_then_candidates(sample_pixels):
    """`DifferenceSnr.search` (the candidates' bound beside the factor's statistics) sets
    the same factor and finds the same candidate blocks as `noise_factor` and then
    `candidates`."""
    image, variance, mask, psf = _frame(seed=11)
    snr, candidate, _, prepared = _fast(image, variance, mask, psf, sample_pixels)
    image, variance, no_data, kernel, floor = prepared
    fresh = DifferenceSnr(snr.smoothed, variance, no_data, kernel, floor, snr.vmin)
    np.testing.assert_array_equal(fresh.search(THRESHOLD, sample_pixels), candidate)
    assert fresh.factor == snr.factor


def test_sparse_peaks_with_candidate_snr_made_elsewhere():
    """The candidate blocks' S/N handed in (raster order) gives the peaks of the S/N
    asked of ``snr_blocks``."""
    image, variance, mask, psf = _frame(seed=13)
    snr, candidate, peaks, _ = _fast(image, variance, mask, psf, 2**21)
    values = snr.blocks(*np.nonzero(candidate))
    given = sparse_peaks(
        image.shape,
        snr.size,
        candidate,
        snr.blocks,
        THRESHOLD,
        MIN_PIXELS,
        1.8,
        PROMINENCE,
        lambda: values,
    )
    for name in ("col", "row", "sign", "footprint", "n_peaks", "value"):
        np.testing.assert_array_equal(getattr(given, name), getattr(peaks, name))


@pytest.mark.parametrize("sigma", [0.8, 1.8, 3.1])
def test_find_peaks_among_3x3_maxima_equals_all_pixels(sigma):
    """`_find_peaks` with the footprints' 3 x 3 maxima given searches its (larger) boxes
    among them: the same peaks, in the same order, as searching every pixel."""
    from core.detection import _footprint_pixels, _local_maxima

    rng = np.random.default_rng(21)
    snr = np.zeros((300, 340), dtype=np.float32)
    yy, xx = np.mgrid[:300, :340]
    for _ in range(70):
        x, y, a = rng.uniform(0, 340), rng.uniform(0, 300), rng.uniform(4, 40)
        snr += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.2**2)).astype(np.float32)
    snr += rng.normal(size=snr.shape).astype(np.float32)
    pixels, labels, n, _ = _footprint_pixels(snr, THRESHOLD, MIN_PIXELS)
    rows, cols = _local_maxima(snr, pixels, 1)
    near = rows * snr.shape[1] + cols
    expected = _find_peaks(snr, None, n, sigma, PROMINENCE, pixels, labels)
    got = _find_peaks(snr, None, n, sigma, PROMINENCE, pixels, labels, near_maxima=near)
    assert len(expected) > n  # some footprints were deblended
    np.testing.assert_array_equal(got, expected)
