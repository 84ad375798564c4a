"""Tests of core.sources (catalogs, kernel-source selection, sky sources) and of the modules it
re-exports: core.background, core.detection, core.measure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from core import detection
from core.background import _cell_stats, background_image, background_images, background_map
from core.config import DetectionConfig, SourcesConfig
from core.detection import (
    _disc_dilate,
    _footprint_pixels,
    _footprints,
    _grow,
    _label_pixels,
    _local_maxima,
    detect_sources,
)
from core.errors import InsufficientSourcesError, InvalidCatalogError
from core.exposure import Exposure
from core.measure import _interp_at, _negative_side_sigma, measure_sources, star_offset
from core.psf import GaussianPsf
from core.sources import read_catalog, select_kernel_sources, sky_sources
from tests.conftest import add_point_source

SKY, READ_NOISE = 100.0, 5.0


def star_field(psf, size=512, spacing=24, seed=1, flux_range=(2.0, 4.7)):
    """Stars on a jittered grid (no unresolvable blends), Poisson-like noise, known truth."""
    rng = np.random.default_rng(seed)
    centres = np.arange(spacing, size - spacing // 2, spacing, dtype=float)
    gx, gy = np.meshgrid(centres, centres)
    x = gx.ravel() + rng.uniform(-5, 5, gx.size)
    y = gy.ravel() + rng.uniform(-5, 5, gy.size)
    flux = 10 ** rng.uniform(*flux_range, x.size)
    model = np.zeros((size, size))
    for xi, yi, fi in zip(x, y, flux, strict=True):
        add_point_source(model, psf, xi, yi, fi)
    variance = SKY + READ_NOISE**2 + model
    image = rng.normal(model + SKY, np.sqrt(variance))
    return Exposure.from_arrays(image, variance), x, y, flux


def true_snr(psf, flux):
    p = psf.kernel_image()
    s2 = np.sum(p**2)
    var = np.array([np.sum(p**2 * (SKY + READ_NOISE**2 + f * p)) for f in flux])
    return flux * s2 / np.sqrt(var)


@pytest.fixture(scope="module")
def field():
    psf = GaussianPsf(1.8)
    exposure, x, y, flux = star_field(psf)
    return psf, exposure, x, y, flux


# --------------------------------------------------------------------------------------
# background
def test_background_map_recovers_gradient():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:256, 0:256]
    sky = 50 + 0.1 * xx + 0.05 * yy
    image = rng.normal(sky, 3.0)
    exposure = Exposure.from_arrays(image, np.full(image.shape, 9.0))
    background, noise = background_map(exposure, mesh=32)
    inner = (slice(16, -16), slice(16, -16))
    assert np.abs(background - sky)[inner].max() < 0.6
    assert np.median(noise) == pytest.approx(3.0, rel=0.05)


def test_background_map_follows_a_curved_sky_and_despikes_a_halo():
    # a bowl of moonlight: its corners rise a cell's change above their neighbours,
    # which a 3x3-median despike took for bright halos (corners off by hundreds)
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:256, 0:256]
    sky = 2000.0 * ((xx - 127.5) ** 2 + (yy - 127.5) ** 2) / (2 * 127.5**2)
    image = rng.normal(sky, 30.0)
    image[144:176, 80:112] += 2000.0  # one cell of halo
    exposure = Exposure.from_arrays(image, np.full(image.shape, 900.0))
    background, _ = background_map(exposure, mesh=32)
    corners = np.s_[:16, :16]
    assert np.abs(background - sky)[corners].max() < 150.0
    assert np.abs(background - sky)[144:176, 80:112].max() < 150.0


# --------------------------------------------------------------------------------------
# detection
def test_detection_completeness_and_purity(field):
    psf, exposure, x, y, flux = field
    work = exposure.copy()
    table = detect_sources(work, psf=psf)
    snr = true_snr(psf, flux)
    bright = snr >= 10
    dist, _ = cKDTree(np.column_stack([table["x"], table["y"]])).query(np.column_stack([x, y]))
    completeness = np.mean(dist[bright] < 1.5)
    assert bright.sum() > 200
    assert completeness >= 0.95
    back, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([table["x"], table["y"]]))
    spurious = np.mean(back > 3.0)
    assert spurious < 0.01
    # the empty-sky S/N scatter is ~1 with a correct variance plane
    assert table.meta["noise_factor"] == pytest.approx(1.0, abs=0.05)


def test_detection_measurements(field):
    psf, exposure, x, y, flux = field
    table = detect_sources(exposure.copy(), psf=psf)
    dist, idx = cKDTree(np.column_stack([x, y])).query(np.column_stack([table["x"], table["y"]]))
    snr = true_snr(psf, flux[idx])
    good = (dist < 1.5) & (snr > 30) & ~table["flag_edge"]
    assert good.sum() > 100
    dx = np.asarray(table["x"])[good] - x[idx][good]
    dy = np.asarray(table["y"])[good] - y[idx][good]
    assert abs(np.mean(dx)) < 0.02 and abs(np.mean(dy)) < 0.02
    assert np.std(dx) < 0.1
    ratio = np.asarray(table["flux"])[good] / flux[idx][good]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert np.median(np.asarray(table["snr"])[good] / snr[good]) == pytest.approx(1.0, abs=0.05)
    # flux errors describe the flux scatter
    pull = (np.asarray(table["flux"])[good] - flux[idx][good]) / np.asarray(table["flux_err"])[good]
    assert np.std(pull) == pytest.approx(1.0, abs=0.15)
    # sizes of point sources equal the PSF's
    assert np.median(np.asarray(table["size"])[good]) == pytest.approx(1.8, rel=0.02)
    assert np.median(np.asarray(table["roundness"])[good]) > 0.9


def test_detection_without_measurement_sets_the_same_planes(field):
    # the template's detection only sets mask planes: skipping peaks and measurement
    # must leave them, and the segmentation images, as a measured detection does
    psf, exposure, x, y, flux = field
    for smooth in (True, False):
        config = DetectionConfig(smooth_with_psf=smooth)
        measured, masks_only = exposure.copy(), exposure.copy()
        masks_only.image[300:310, 100:110] -= 2000.0  # a negative footprint too
        measured.image[300:310, 100:110] -= 2000.0
        table = detect_sources(measured, config, psf=psf)
        bare = detect_sources(masks_only, config, psf=psf, measure=False)
        assert len(table) > 100 and len(bare) == 0
        assert table.meta["n_negative"] >= 1
        np.testing.assert_array_equal(masks_only.mask, measured.mask)
        for key in ("segmentation", "segmentation_negative"):
            np.testing.assert_array_equal(bare.meta[key], table.meta[key])
        for key in ("n_footprints", "n_negative", "noise_factor", "psf_sigma"):
            assert bare.meta[key] == table.meta[key]


@pytest.mark.parametrize("beside_a_star", [False, True])
def test_detection_of_mask_planes_alone_sets_the_labelled_planes(field, monkeypatch, beside_a_star):
    # segmentation=False grows footprints as disc dilations of each sign, unless some
    # pixel is within reach of both (a hole beside a star: the nearest footprint is
    # found as with labels); either way the planes are those of the labelled growth
    psf, exposure, x, y, flux = field
    star = int(np.argmax(flux))
    # else the point of the frame's inner part farthest from every star
    grid = np.mgrid[40:472, 40:472].reshape(2, -1).T
    far = grid[np.argmax(cKDTree(np.column_stack([y, x])).query(grid)[0])]
    hole_at = (x[star] + 6.0, y[star]) if beside_a_star else (far[1] + 0.5, far[0] + 0.5)
    taken = []
    grown_masks = detection._grown_masks
    monkeypatch.setattr(
        detection,
        "_grown_masks",
        lambda *args: taken.append(grown_masks(*args)) or taken[-1],
    )
    labelled, bare = exposure.copy(), exposure.copy()
    hole = np.zeros(exposure.shape)
    add_point_source(hole, psf, *hole_at, -3000.0)
    for work in (labelled, bare):
        work.image += hole.astype(np.float32)
    table = detect_sources(labelled, psf=psf, measure=False)
    masks_only = detect_sources(bare, psf=psf, measure=False, segmentation=False)
    assert table.meta["n_negative"] >= 1 and len(taken) == 1
    # the far hole takes the dilations, the one beside a star the nearest-label growth
    assert (taken[0] is None) == beside_a_star
    assert bare.masked(["DETECTED_NEGATIVE"]).any()
    np.testing.assert_array_equal(bare.mask, labelled.mask)
    assert "segmentation" not in masks_only.meta
    for key in ("n_footprints", "n_negative", "noise_factor", "psf_sigma", "xy0"):
        assert masks_only.meta[key] == table.meta[key]


def test_detection_sets_planes_and_negative(field):
    psf, exposure, x, y, flux = field
    work = exposure.copy()
    # a negative PSF-shaped hole
    hole = np.zeros(work.shape)
    add_point_source(hole, psf, 100.5, 300.5, -20000.0)
    # away from the grid stars: put it between grid nodes
    work.image += hole.astype(np.float32)
    table = detect_sources(work, psf=psf)
    detected = work.masked(["DETECTED"])
    negative = work.masked(["DETECTED_NEGATIVE"])
    bright = true_snr(psf, flux) > 20
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    assert detected[iy[bright], ix[bright]].all()
    assert negative[300, 100]
    assert table.meta["n_negative"] >= 1
    assert not negative[iy[bright], ix[bright]].any()
    # segmentation: each source's label covers its centre
    seg = table.meta["segmentation"]
    cx = np.floor(np.asarray(table["x"]) + 0.5).astype(int)
    cy = np.floor(np.asarray(table["y"]) + 0.5).astype(int)
    assert np.all(seg[cy, cx] == np.asarray(table["label"]))
    # no pixel is detected far from every star and the hole
    assert detected.mean() < 0.5
    # set_mask=False leaves the mask alone
    other = exposure.copy()
    detect_sources(other, psf=psf, set_mask=False)
    assert not other.masked(["DETECTED", "DETECTED_NEGATIVE"]).any()


def test_detection_flags():
    psf = GaussianPsf(1.8)
    rng = np.random.default_rng(7)
    model = np.zeros((200, 200))
    add_point_source(model, psf, 50.0, 50.0, 30000.0)  # saturated below
    add_point_source(model, psf, 2.0, 120.0, 30000.0)  # at the edge
    add_point_source(model, psf, 140.0, 60.0, 20000.0)  # blended pair, 10 px apart
    add_point_source(model, psf, 150.0, 60.0, 15000.0)
    add_point_source(model, psf, 100.0, 150.0, 20000.0)  # masked by a bad column
    add_point_source(model, psf, 150.0, 150.0, 20000.0)  # clean
    variance = SKY + READ_NOISE**2 + model
    exposure = Exposure.from_arrays(rng.normal(model + SKY, np.sqrt(variance)), variance)
    sat = np.zeros(exposure.shape, dtype=bool)
    sat[49:52, 49:52] = True
    exposure.set_plane("SAT", sat)
    bad = np.zeros(exposure.shape, dtype=bool)
    bad[:, 101] = True
    exposure.set_plane("BAD", bad)
    table = detect_sources(exposure, psf=psf)

    def row(x, y):
        d = np.hypot(table["x"] - x, table["y"] - y)
        assert d.min() < 1.5, (x, y)
        return table[int(np.argmin(d))]

    assert row(50, 50)["flag_saturated"] and row(50, 50)["flag_masked"]
    assert row(2, 120)["flag_edge"]
    assert row(140, 60)["flag_blended"] and row(150, 60)["flag_blended"]
    assert row(140, 60)["label"] == row(150, 60)["label"]
    assert row(100, 150)["flag_masked"] and not row(100, 150)["flag_saturated"]
    clean = row(150, 150)
    assert not (
        clean["flag_saturated"]
        or clean["flag_edge"]
        or clean["flag_masked"]
        or clean["flag_blended"]
    )


def test_preparation_measures_the_unscaled_science_and_scales_on_the_final_planes(field):
    # the catalog's S/N is against the variance as given (the science's sources are
    # measured within detection), and the variance scale is measured on DETECTED as
    # detection leaves it, then applied to the whole plane
    from core.config import SubtractionConfig
    from core.subtract import AlardLuptonSubtractTask
    from core.variance import measure_variance_scale

    psf, exposure, x, y, flux = field
    config = SubtractionConfig()
    reference = exposure.copy()
    reference.variance *= np.float32(1.7)  # a plane off by a factor, to be scaled back
    work = reference.copy()
    work.psf = psf
    table = detect_sources(reference, config.sources.detection, psf=psf)
    scale = measure_variance_scale(reference, config.scale_variance)
    assert scale.factor == pytest.approx(1 / 1.7, rel=0.05)
    prepared = AlardLuptonSubtractTask(config=config)._prepare_one((work, "science", np.s_[:, :]))
    assert len(table) > 100 and prepared.detected.colnames == table.colnames
    for name in table.colnames:
        np.testing.assert_array_equal(prepared.detected[name], table[name])
    assert prepared.scale.factor == scale.factor
    np.testing.assert_array_equal(work.mask, reference.mask)
    np.testing.assert_array_equal(work.variance, reference.variance * np.float32(scale.factor))


def test_measurement_split_among_threads_equals_one_pass(field, monkeypatch):
    # sources are measured in batches on several threads: every column must be the one
    # a single pass over all sources gives
    import core.measure as measure

    psf, exposure, x, y, flux = field
    monkeypatch.setattr(measure, "n_threads", lambda workers=None: 1)
    whole = detect_sources(exposure.copy(), psf=psf)
    monkeypatch.setattr(measure, "n_threads", lambda workers=None: workers or 3)
    monkeypatch.setattr(measure, "_SOURCES_PER_THREAD", 50)
    monkeypatch.setattr(measure, "_MEASURE_BATCH", 40)
    chunks = []
    one_chunk = measure._measure_stamps
    monkeypatch.setattr(
        measure, "_measure_stamps", lambda *a: chunks.append(len(a[2])) or one_chunk(*a)
    )
    split = detect_sources(exposure.copy(), psf=psf)
    assert sum(chunks) == len(whole) > 150
    assert len(chunks) == -(-len(whole) // 40) and max(chunks) <= 40
    for name in whole.colnames:
        np.testing.assert_array_equal(split[name], whole[name])


def test_detection_without_psf_and_with_wrong_variance(field):
    psf, exposure, x, y, flux = field
    # a unit variance plane: the S/N is renormalised by the measured noise
    work = Exposure.from_arrays(exposure.image)
    table = detect_sources(work)
    assert table.meta["psf_sigma"] == pytest.approx(1.8, rel=0.05)
    bright = true_snr(psf, flux) >= 10
    dist, _ = cKDTree(np.column_stack([table["x"], table["y"]])).query(np.column_stack([x, y]))
    assert np.mean(dist[bright] < 1.5) >= 0.95
    assert table.meta["noise_factor"] == pytest.approx(np.sqrt(SKY + READ_NOISE**2), rel=0.1)


def test_detection_threshold_config(field):
    psf, exposure, *_ = field
    low = detect_sources(exposure.copy(), DetectionConfig(threshold=5.0), psf=psf)
    high = detect_sources(exposure.copy(), DetectionConfig(threshold=20.0), psf=psf)
    assert len(high) < len(low)
    assert np.all(np.asarray(high["peak_snr"]) >= 20.0)


def test_measure_sources_at_positions(field):
    psf, exposure, x, y, flux = field
    bright = np.nonzero(true_snr(psf, flux) > 30)[0][:50]
    xb, yb = x[bright], y[bright]
    m = measure_sources(exposure, xb + 0.3, yb - 0.2, psf=psf, recentroid=True)
    assert np.max(np.hypot(m["x"] - xb, m["y"] - yb)) < 0.2
    assert np.median(m["flux"] / flux[bright]) == pytest.approx(1.0, abs=0.02)
    assert not np.any(m["flag_edge"] | m["flag_masked"] | m["flag_saturated"])


def regression_field():
    """A fixed-seed field with a sky gradient, a negative hole, a blend and NaN pixels."""
    psf = GaussianPsf(1.6)
    exposure, x, y, flux = star_field(psf, size=320, spacing=20, seed=11, flux_range=(2.3, 4.8))
    yy, xx = np.mgrid[0:320, 0:320]
    exposure.image += (3.0 + 0.01 * xx - 0.006 * yy).astype(np.float32)
    model = np.zeros(exposure.shape)
    add_point_source(model, psf, 200.5, 110.5, -8000.0)
    add_point_source(model, psf, 61.0, 250.0, 6000.0)
    exposure.image += model.astype(np.float32)
    exposure.image[300:304, 10:40] = np.nan
    return psf, exposure, x, y, flux


def test_detection_catalog_regression():
    # figures pinned from the straightforward implementation (full-frame astropy
    # clipping, float64 FFTs, distance-transform growing, full-frame splines); the
    # fast paths must reproduce them, not merely stay plausible
    psf, exposure, x, y, flux = regression_field()
    table = detect_sources(exposure, psf=psf)
    assert len(table) == 191
    assert table.meta["n_footprints"] == 181
    assert table.meta["n_negative"] == 1
    assert int(np.sum(table["flag_blended"])) == 17
    assert table.meta["noise_factor"] == pytest.approx(1.038256, rel=1e-4)
    f = np.asarray(table["flux"])
    assert f.sum() == pytest.approx(2573938.0, rel=1e-5)
    # flux_err scales with noise_factor, a sample percentile: float32 round-off of the
    # (tiled) matched filter moves it by ~1e-5
    assert np.sum(table["flux_err"]) == pytest.approx(26211.01, rel=3e-5)
    assert np.sum(table["x"] * f) / f.sum() == pytest.approx(168.38243, abs=1e-3)
    assert np.sum(table["y"] * f) / f.sum() == pytest.approx(151.29400, abs=1e-3)
    assert np.nanmedian(table["size"]) == pytest.approx(1.592334, rel=1e-4)
    assert int(np.sum(table["npix"])) == pytest.approx(51174, rel=2e-3)
    assert int(exposure.masked(["DETECTED"]).sum()) == pytest.approx(44470, rel=2e-3)
    assert int(exposure.masked(["DETECTED_NEGATIVE"]).sum()) == pytest.approx(187, abs=2)
    # and against the truth (the star next to the added blend is pulled by it)
    snr = true_snr(psf, flux)
    dist, idx = cKDTree(np.column_stack([table["x"], table["y"]])).query(np.column_stack([x, y]))
    assert np.mean(dist[snr > 10] < 0.5) >= 0.98
    assert np.all(dist[snr > 100] < 0.1)
    assert np.median(f[idx][snr > 100] / flux[snr > 100]) == pytest.approx(1.0, abs=0.005)
    sky = sky_sources(exposure, n=30, radius=5, seed=2)
    assert len(sky) == 30
    assert (float(sky["x"][0]), float(sky["y"][0])) == (131.0, 244.0)


def test_search_rows_equals_searchsorted_on_each_rows_finite_values():
    from core.background import _search_rows

    rng = np.random.default_rng(8)
    rows = np.sort(rng.integers(0, 20, (50, 33)).astype(np.float32), axis=1)
    n = rng.integers(0, 34, 50)
    n[:3] = (0, 1, 33)
    for r, k in enumerate(n):
        rows[r, k:] = np.nan
    value = rng.integers(-1, 22, 50).astype(np.float64)
    value[3] = np.nan  # a row without bounds finds nothing below
    for right in (False, True):
        side = "right" if right else "left"
        expected = [
            np.searchsorted(rows[r, :k], value[r], side=side) if np.isfinite(value[r]) else 0
            for r, k in enumerate(n)
        ]
        np.testing.assert_array_equal(_search_rows(rows, n, value, right), expected)


def test_cell_stats_match_astropy():
    rng = np.random.default_rng(5)
    cells = rng.normal(10.0, 2.0, (40, 300))
    cells[:, :12] += rng.uniform(10, 200, (40, 12))  # bright outliers
    cells[:5, -20:] = -50.0  # a block of low outliers
    cells[rng.random(cells.shape) < 0.2] = np.nan
    cells[7] = np.nan  # an empty cell
    cells[8, 3:] = np.nan  # three values only
    median, std, count = _cell_stats(cells.astype(np.float32), chunk=16)
    np.testing.assert_array_equal(count, np.isfinite(cells).sum(axis=1))
    with np.errstate(all="ignore"), pytest.warns(Warning):
        _, ref_median, ref_std = sigma_clipped_stats(
            cells.astype(np.float32).astype(np.float64), axis=1, sigma=3.0, maxiters=5
        )
    ref_median = np.ma.filled(ref_median, np.nan)
    ref_std = np.ma.filled(ref_std, np.nan)
    np.testing.assert_array_equal(np.isnan(median), np.isnan(ref_median))
    np.testing.assert_allclose(median, ref_median, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(std, ref_std, rtol=1e-9, atol=1e-12, equal_nan=True)
    # the block form used on images gives the same numbers
    blocks = cells.astype(np.float32).reshape(8, 5, 15, 20)
    block_median, block_std, _ = _cell_stats(blocks, chunk=10)
    np.testing.assert_array_equal(block_median, median)
    np.testing.assert_array_equal(block_std, std)
    # the block rows are sorted in a copy, never in the image, also where a block of
    # one cell per row reshapes without a copy
    image = cells.astype(np.float32).reshape(40, 1, 300).copy()
    kept = image.copy()
    cell_view = image.reshape(40, 1, 300, 1).transpose(0, 1, 3, 2)
    column_median, _, _ = _cell_stats(cell_view, chunk=10)
    np.testing.assert_array_equal(column_median, median)
    np.testing.assert_array_equal(image, kept)
    as_blocks = cells.astype(np.float32)
    kept = as_blocks.copy()
    _cell_stats(as_blocks.reshape(8, 5, 15, 20), chunk=10)
    np.testing.assert_array_equal(as_blocks, kept)


def test_background_images_of_windows_equal_each_windows_own(field):
    # the windows' cells reduced together give each window the map it has alone
    psf, exposure, x, y, flux = field
    work = exposure.copy()
    work.image[40:60, 200:230] = np.nan  # cells with few valid pixels, filled from others
    windows = [np.s_[0:128, 0:128], np.s_[200:328, 64:192], np.s_[384:512, 300:428]]
    views = [
        Exposure(work.image[w], work.variance[w], work.mask[w], mask_planes=work.mask_planes)
        for w in windows
    ]
    together = background_images(views, 32)
    assert len(together) == 3
    for view, image in zip(views, together, strict=True):
        np.testing.assert_array_equal(image, background_image(view, 32))
    assert background_images([], 32) == []


def test_grow_matches_nearest_label_transform():
    rng = np.random.default_rng(9)
    labels, _ = ndimage.label(ndimage.gaussian_filter(rng.normal(size=(150, 170)), 2) > 0.35)
    assert labels.max() > 20
    for radius in (1, 3, 6):
        distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        np.testing.assert_array_equal(_disc_dilate(labels > 0, radius), distance <= radius)
        grown = _grow(labels, radius)[0]
        ref = np.where(distance <= radius, labels[iy, ix], 0)
        differ = grown != ref
        # only pixels equidistant from two footprints may go either way
        assert differ.mean() < 0.01
        for j, i in zip(*np.nonzero(differ), strict=True):
            own = np.hypot(*np.nonzero(labels == grown[j, i]) - np.array([[j], [i]])).min()
            assert own == pytest.approx(distance[j, i])


def test_grow_by_runs_equals_grow_by_whole_frame_labelling(monkeypatch):
    # the grown area labelled as a graph of runs (sparse) or by ndimage.label (dense)
    rng = np.random.default_rng(4)
    labels, _ = ndimage.label(ndimage.gaussian_filter(rng.normal(size=(300, 260)), 2) > 0.35)
    labels = labels.astype(np.int32)
    assert labels.max() > 20
    for radius in (1, 4):
        grown = {}
        for fraction in (0.0, 1.0):
            monkeypatch.setattr(detection, "_SPARSE_GROW_FRACTION", fraction)
            grown[fraction] = _grow(labels, radius)[0]
            # into a buffer holding other labels, or zeros it is told of
            out = rng.integers(0, 9, labels.shape).astype(np.int32)
            np.testing.assert_array_equal(_grow(labels, radius, out=out)[0], grown[fraction])
            zeros = np.zeros(labels.shape, dtype=np.int32)
            grown_zeros = _grow(labels, radius, out=zeros, out_zeroed=True)[0]
            np.testing.assert_array_equal(grown_zeros, grown[fraction])
        np.testing.assert_array_equal(grown[0.0], grown[1.0])


@pytest.mark.parametrize("with_negative", [False, True])
def test_grow_both_lists_the_grown_positive_pixels(monkeypatch, with_negative):
    # the pixels the sparse path lists are those of the grown positive image
    rng = np.random.default_rng(6)
    smooth = ndimage.gaussian_filter(rng.normal(size=(240, 280)), 2)
    labels, n = ndimage.label(smooth > 0.35, structure=np.ones((3, 3)))
    neg, n_neg = ndimage.label(smooth < -0.35, structure=np.ones((3, 3)))
    if not with_negative:
        neg[:], n_neg = 0, 0
    results = {}
    for fraction in (0.0, 1.0):
        monkeypatch.setattr(detection, "_SPARSE_GROW_FRACTION", fraction)
        args = (labels.astype(np.int32), neg.astype(np.int32), n, n_neg, 3)
        results[fraction] = detection._grow_both(*args)
    (dense, dense_neg, none), (grown, grown_neg, inside) = results[0.0], results[1.0]
    assert none is None
    np.testing.assert_array_equal(grown, dense)
    np.testing.assert_array_equal(grown_neg, dense_neg)
    np.testing.assert_array_equal(inside, np.flatnonzero(grown))
    assert grown_neg.any() == with_negative


def test_clipped_rows_equal_the_per_pixel_gather():
    from core.background import _BackgroundMesh, _interp_matrix, _interp_nodes
    from core.stamps import clipped_rows

    rng = np.random.default_rng(12)
    array = rng.normal(size=(70, 50)).astype(np.float32)
    side = 9
    y0 = rng.integers(-12, 70, 300)
    x0 = np.concatenate([rng.integers(-12, 50, 296), [-8, 41, 45, 0]])
    rows = np.clip(y0[:, None] + np.arange(side), 0, 69)
    cols = np.clip(x0[:, None] + np.arange(side), 0, 49)
    expected = array[rows[:, :, None], cols[:, None, :]]
    np.testing.assert_array_equal(clipped_rows(array, rows, x0, side), expected)
    inside = (x0 >= 0) & (x0 + side <= 50)
    np.testing.assert_array_equal(
        clipped_rows(array, rows[inside], x0[inside], side), expected[inside]
    )
    np.testing.assert_array_equal(
        clipped_rows(array, rows[~inside], x0[~inside], side), expected[~inside]
    )
    # wider than the frame, and no rows
    wide = np.clip(x0[:, None] + np.arange(60), 0, 49)
    np.testing.assert_array_equal(
        clipped_rows(array, rows, x0, 60), array[rows[:, :, None], wide[:, None, :]]
    )
    assert clipped_rows(array, rows[:0], x0[:0], side).shape == (0, side, side)
    # a mesh's background at the same pixels, as its whole map holds it
    median = rng.normal(100.0, 3.0, (4, 3))
    mesh = _BackgroundMesh(
        median, median, _interp_nodes(70, 8.5, 18, 4), _interp_matrix(50, 8.5, 18, 3)
    )
    np.testing.assert_array_equal(
        mesh.background_rows(rows, x0, side),
        mesh.background()[rows[:, :, None], cols[:, None, :]],
    )


def test_interp_at_matches_full_frame_spline():
    rng = np.random.default_rng(2)
    smooth = ndimage.gaussian_filter(rng.normal(size=(120, 90)), 2.5) * 100 + 20
    col = np.concatenate([rng.uniform(0, 89, 200), [0.0, 89.0, 0.4, 88.6]])
    row = np.concatenate([rng.uniform(0, 119, 200), [0.0, 119.0, 118.7, 0.2]])
    ref = ndimage.map_coordinates(smooth, [row, col], order=3, mode="nearest")
    np.testing.assert_allclose(_interp_at(smooth, col, row), ref, atol=1e-5 * smooth.std())


def _plain_negative_side_sigma(values, use):
    plain = values[use]
    plain = plain[np.isfinite(plain)]
    return np.median(plain) - np.percentile(plain, 15.865525393145708)


def test_negative_side_sigma_samples_a_regular_grid():
    rng = np.random.default_rng(6)
    values = rng.normal(0.0, 2.0, (2600, 2000)).astype(np.float32)
    values[:, :80] += 30.0  # a positive tail the lower half ignores
    values[rng.random(values.shape) < 0.01] = np.nan
    use = rng.random(values.shape) < 0.9
    # up to 4 million selected values all count; beyond, every k-th row and column
    # with at least a million selected values: the plain selection of that grid
    small = np.s_[:1300, :1000]
    assert _negative_side_sigma(values[small], use[small]) == pytest.approx(
        _plain_negative_side_sigma(values[small], use[small]), rel=1e-12
    )
    grid = np.s_[::2, ::2]
    fast = _negative_side_sigma(values, use)
    assert fast == pytest.approx(_plain_negative_side_sigma(values[grid], use[grid]), rel=1e-12)
    # the grid stays within the estimate's own sampling noise (~0.15% at 1e6 values)
    # of the estimate from every selected value
    assert fast == pytest.approx(_plain_negative_side_sigma(values, use), rel=0.005)
    assert _negative_side_sigma(values) == pytest.approx(2.0, rel=0.05)
    assert _negative_side_sigma(values[:2, :3]) == 1.0  # too few values


def test_local_maxima_match_maximum_filter():
    rng = np.random.default_rng(4)
    snr = ndimage.gaussian_filter(rng.normal(size=(80, 100)), 1.0).astype(np.float32)
    pixels = np.flatnonzero(snr > 0.1)
    for half in (1, 2, 3):
        rows, cols = _local_maxima(snr, pixels, half)
        ref = (snr == ndimage.maximum_filter(snr, size=2 * half + 1)).ravel()[pixels]
        np.testing.assert_array_equal(rows * 100 + cols, pixels[ref])


# --------------------------------------------------------------------------------------
# catalogs
def test_read_catalog_formats(tmp_path):
    rows = [{"x": 10.5, "y": 20.0, "flux": 100.0}, {"x": 30.0, "y": 40.25, "flux": 5.0}]
    csv = tmp_path / "cat.csv"
    csv.write_text("X,Y,flux,flux_err\n10.5,20.0,100,10\n30.0,40.25,5,1\n")
    jlist = tmp_path / "list.json"
    jlist.write_text(json.dumps(rows))
    jdict = tmp_path / "dict.json"
    jdict.write_text(json.dumps({"sources": rows}))
    fits_path = tmp_path / "cat.fits"
    Table({"x": [10.5, 30.0], "y": [20.0, 40.25], "flux": [100.0, 5.0]}).write(fits_path)
    # Excel's "CSV UTF-8" and a JSON editor's byte-order mark ('\ufeffX' was no x column)
    marked = b"\xef\xbb\xbf" + csv.read_bytes()
    marked_json = b"\xef\xbb\xbf" + jlist.read_bytes()
    sources = (csv, jlist, jdict, fits_path, str(csv), rows, fits_path.read_bytes())
    for source in (*sources, marked, marked_json):
        table = read_catalog(source)
        np.testing.assert_allclose(table["x"], [10.5, 30.0])
        np.testing.assert_allclose(table["y"], [20.0, 40.25])
        np.testing.assert_allclose(table["flux"], [100.0, 5.0])
    assert list(read_catalog(csv)["flux_err"]) == [10.0, 1.0]


def test_read_catalog_radec_through_wcs(tmp_path):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [129.0, 129.0]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    x = np.array([10.0, 128.0, 200.5])
    y = np.array([15.0, 128.0, 77.25])
    ra, dec = wcs.all_pix2world(x, y, 0)
    path = tmp_path / "radec.csv"
    Table({"RA": ra, "Dec": dec}).write(path, format="ascii.csv")
    table = read_catalog(path, wcs=wcs)
    np.testing.assert_allclose(table["x"], x, atol=1e-6)
    np.testing.assert_allclose(table["y"], y, atol=1e-6)
    with pytest.raises(InvalidCatalogError, match="no WCS"):
        read_catalog(path)


def test_read_catalog_errors(tmp_path):
    with pytest.raises(InvalidCatalogError, match="does not exist"):
        read_catalog(tmp_path / "missing.csv")
    nopos = tmp_path / "nopos.csv"
    nopos.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidCatalogError, match="no position columns"):
        read_catalog(nopos)
    text = tmp_path / "text.json"
    text.write_text(json.dumps([{"x": "left", "y": 3}]))
    with pytest.raises(InvalidCatalogError, match="non-numeric"):
        read_catalog(text)
    csv = tmp_path / "text.csv"
    csv.write_text("x,y\nabc,3\n")
    with pytest.raises(InvalidCatalogError, match="not numeric"):
        read_catalog(csv)
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(InvalidCatalogError):
        read_catalog(broken)
    with pytest.raises(InvalidCatalogError, match="sources"):
        read_catalog({"stars": []})


# --------------------------------------------------------------------------------------
# kernel-source selection
def _pair(size=256):
    science = Exposure.from_arrays(np.zeros((size, size)), np.ones((size, size)))
    template = Exposure.from_arrays(np.zeros((size, size)), np.ones((size, size)))
    return science, template


def _catalog(x, y, snr, **columns):
    n = len(x)
    table = Table({"x": np.asarray(x, float), "y": np.asarray(y, float), "snr": snr})
    table["size"] = columns.pop("size", np.full(n, 1.8))
    for flag in ("flag_saturated", "flag_edge", "flag_masked", "flag_blended"):
        table[flag] = columns.pop(flag, np.zeros(n, dtype=bool))
    return table


def test_selection_cuts_each():
    science, template = _pair()
    ksize = 10  # stamps 21 x 21, which must lie inside the image
    x = [60, 100, 140, 180, 60, 100, 140, 180, 8, 60, 100, 104, 180]
    y = [60, 60, 60, 60, 120, 120, 120, 120, 120, 180, 180, 180, 180]
    snr = [50, 50, 50, 50, 5, 600, 50, 50, 50, 50, 50, 50, 50]
    size = np.full(len(x), 1.8)
    size[3] = 4.0  # resolved
    saturated = np.zeros(len(x), dtype=bool)
    saturated[6] = True
    table = _catalog(x, y, snr, size=size, flag_saturated=saturated)
    bad = np.zeros(science.shape, dtype=bool)
    bad[118:122, 185] = True  # inside the box of (180, 120) in the science
    science.set_plane("BAD", bad)
    tbad = np.zeros(science.shape, dtype=bool)
    tbad[175, 55] = True  # inside the box of (60, 180) in the template
    template.set_plane("NO_DATA", tbad)
    config = SourcesConfig(min_kernel_sources=1)
    result = select_kernel_sources(table, science, template, ksize, config, psf_fwhm=4.24)
    rx, ry = np.asarray(result["x"]).astype(int), np.asarray(result["y"]).astype(int)
    chosen = set(zip(rx.tolist(), ry.tolist(), strict=True))
    assert chosen == {(60, 60), (100, 60), (140, 60), (180, 180)}
    rejected = result.meta["rejected"]
    assert rejected["snr"] == 2  # 5 and 600
    assert rejected["flags"] == 1
    assert rejected["resolved"] == 1
    assert rejected["isolation"] == 2  # 100 and 104 are 4 px apart (< 2 FWHM)
    assert rejected["edge"] == 1  # x = 8: box starts at -2, outside
    assert rejected["mask"] == 2
    # stamp boxes are 2 ksize + 1 wide, centred on the rounded position
    assert all(result["stamp_x1"] - result["stamp_x0"] == 2 * ksize)
    assert list(result["stamp_x0"]) == [50, 90, 130, 170]


def test_selection_edge_rule_is_rubins_one_kernel_size():
    science, template = _pair()
    table = _catalog([9, 10, 25, 35], [128, 128, 128, 128], [50, 50, 50, 50])

    def xs(**kwargs):
        config = SourcesConfig(min_kernel_sources=1)
        return list(select_kernel_sources(table, science, template, 10, config, **kwargs)["x"])

    # the centre one kernel size (10) from the edge, i.e. the stamp box inside the
    # image, as Rubin's restrictKernelEdgeSources; no second kernel size of margin
    assert xs() == [10.0, 25.0, 35.0]
    assert xs(edge_buffer=10) == [25.0, 35.0]  # plus the preconvolution buffer


def test_selection_cap_keeps_bright_and_spread():
    science, template = _pair(512)
    rng = np.random.default_rng(2)
    # a bright cluster in one corner and fainter sources everywhere
    gx, gy = np.meshgrid(np.arange(40, 480, 20.0), np.arange(40, 480, 20.0))
    x, y = gx.ravel(), gy.ravel()
    snr = rng.uniform(15, 30, x.size)
    corner = (x < 150) & (y < 150)
    snr[corner] += 200
    table = _catalog(x, y, snr)
    config = SourcesConfig(max_kernel_sources=32, min_kernel_sources=3, isolation_radius_fwhm=0)
    result = select_kernel_sources(table, science, template, 10, config)
    assert len(result) == 32
    assert result.meta["rejected"]["cap"] == x.size - 32
    # not all in the bright corner: every quadrant is represented
    rx, ry = np.asarray(result["x"]), np.asarray(result["y"])
    for qx in (rx < 256, rx >= 256):
        for qy in (ry < 256, ry >= 256):
            assert np.sum(qx & qy) >= 4
    # within the corner the brightest are kept
    kept_corner = np.asarray(result["snr"])[(rx < 150) & (ry < 150)]
    assert kept_corner.min() > 200


def test_selection_too_few_raises_with_advice():
    science, template = _pair()
    table = _catalog([60, 100, 140], [60, 60, 60], [5, 6, 50])
    with pytest.raises(InsufficientSourcesError) as info:
        select_kernel_sources(table, science, template, 10, SourcesConfig())
    message = str(info.value)
    assert "Only 1 sources were selected for PSF matching, but 3 are required." in message
    assert "min_snr" in message


def test_selection_plain_catalog_is_measured(field):
    psf, exposure, x, y, flux = field
    exposure = exposure.copy()
    exposure.psf = psf
    template = exposure.copy()
    plain = Table({"x": x, "y": y})
    result = select_kernel_sources(plain, exposure, template, 10, SourcesConfig())
    snr = true_snr(psf, flux)
    interior = (x > 21) & (x < 490) & (y > 21) & (y < 490)
    expected = interior & (snr > 11) & (snr < 450)
    assert len(result) >= 0.9 * expected.sum()
    # the window is on the S/N against the variance plane (what the kernel fit sees)
    assert np.all((result["snr_pixel"] > 10) & (result["snr_pixel"] < 500))


# --------------------------------------------------------------------------------------
# sky sources
def test_sky_sources_avoid_detections(field):
    psf, exposure, *_ = field
    work = exposure.copy()
    detect_sources(work, psf=psf)
    sky = sky_sources(work, n=40, radius=6, seed=3)
    assert len(sky) == 40
    assert np.all(sky["sky_source"])
    detected = work.masked(["DETECTED", "DETECTED_NEGATIVE"])
    yy, xx = np.mgrid[-6:7, -6:7]
    disc = xx**2 + yy**2 <= 36
    for sx, sy in zip(sky["x"].astype(int), sky["y"].astype(int), strict=True):
        assert not detected[sy - 6 : sy + 7, sx - 6 : sx + 7][disc].any()
    pts = np.column_stack([sky["x"], sky["y"]])
    d, _ = cKDTree(pts).query(pts, k=2)
    assert d[:, 1].min() >= 12
    # reproducible with the seed; another seed moves them
    again = sky_sources(work, n=40, radius=6, seed=3)
    np.testing.assert_array_equal(again["x"], sky["x"])
    other = sky_sources(work, n=40, radius=6, seed=4)
    assert not np.array_equal(other["x"], sky["x"])


def test_sky_sources_detect_when_no_plane(field):
    psf, exposure, x, y, flux = field
    bright = true_snr(psf, flux) > 8
    x, y = x[bright], y[bright]
    sky = sky_sources(exposure, n=20, radius=8, seed=0)
    assert len(sky) == 20
    assert not exposure.masked(["DETECTED"]).any()  # the input is not modified
    d, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([sky["x"], sky["y"]]))
    assert d.min() > 8


def test_fits_catalog_bytes_without_fits_suffix(tmp_path):
    hdu = fits.BinTableHDU(Table({"x": [1.0], "y": [2.0]}))
    path = tmp_path / "cat.dat"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    assert float(read_catalog(path)["y"][0]) == 2.0


def _reference_footprints(snr, threshold, min_pixels, negative=False):
    above = snr <= -threshold if negative else snr >= threshold
    labels, n = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1)
    return relabel[labels], int(keep.sum())


def test_footprints_match_plain_labelling():
    # sparse pieces are labelled as a pixel graph, dense ones by ndimage.label: both
    # must give the plain labelling (raster-order numbers, small pieces dropped)
    rng = np.random.default_rng(12)
    snr = ndimage.gaussian_filter(rng.normal(size=(180, 150)), 1.5) * 6.0
    snr[0, :] = 9.0  # a piece along the top edge
    snr[:, -1] = -9.0  # and a negative one down the right edge (no wrap to column 0)
    snr[90, 0] = 9.0
    for threshold in (1.2, 2.0, 3.0):  # from dense (ndimage) to sparse (graph) pieces
        for negative in (False, True):
            for min_pixels in (1, 5):
                out = np.full(snr.shape, 7, dtype=np.int32)
                for buffer in (None, out):
                    labels, n = _footprints(snr, threshold, min_pixels, negative, out=buffer)
                    ref, n_ref = _reference_footprints(snr, threshold, min_pixels, negative)
                    assert n == n_ref
                    np.testing.assert_array_equal(labels, ref)
                # the kept pixels alone (detection's first pass) are the same pieces
                where, values, n, _ = _footprint_pixels(snr, threshold, min_pixels, negative)
                kept = values > 0
                assert kept.all()  # only the kept pieces' pixels are listed
                np.testing.assert_array_equal(where[kept], np.flatnonzero(ref))
                np.testing.assert_array_equal(values[kept], ref.ravel()[np.flatnonzero(ref)])
    # both paths were taken, on either side
    assert max(np.mean(snr >= 3.0), np.mean(snr <= -3.0)) < 0.02 < np.mean(snr <= -1.2)


def test_run_labelling_equals_ndimage_label():
    # runs that end on the last column must not join runs starting the next row, runs
    # touching only diagonally must join; numbering is by first pixel in raster order
    rng = np.random.default_rng(5)
    shapes = [(1, 1), (1, 9), (9, 1), (2, 2)] + [tuple(rng.integers(1, 40, 2)) for _ in range(300)]
    structure = np.ones((3, 3), dtype=bool)
    for shape in shapes:
        mask = rng.random(shape) < rng.random()
        mask.ravel()[0] = True
        where = np.flatnonzero(mask)
        values, n = _label_pixels(where, mask.shape)
        labels, n_ref = ndimage.label(mask, structure=structure)
        assert n == n_ref
        np.testing.assert_array_equal(values, labels.ravel()[where])
    stairs = np.eye(6, dtype=bool)[::-1].copy()  # one piece, joined only diagonally
    stairs[5, 5] = True  # and a lone pixel
    values, n = _label_pixels(np.flatnonzero(stairs), stairs.shape)
    assert n == 2
    np.testing.assert_array_equal(values, [1, 1, 1, 1, 1, 1, 2])


def test_disc_dilate_matches_distance_transform_on_word_widths():
    # rows are packed 64 pixels to a word: widths on and off a word boundary, pixels
    # on the first and last columns (carries across words, no wrap between rows)
    rng = np.random.default_rng(21)
    for shape in ((60, 128), (5, 64), (40, 65), (3, 200)):
        mask = rng.random(shape) < 0.03
        mask[1, 0] = mask[2, -1] = True
        for radius in (1, 2, 4, 7):
            distance = ndimage.distance_transform_edt(~mask)
            np.testing.assert_array_equal(_disc_dilate(mask, radius), distance <= radius)


def _gaussian_stars(shape, x, y, fwhm, sky, rng, flux=2e4):
    sigma = fwhm / 2.3548
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.full(shape, sky, dtype=np.float64)
    for cx, cy in zip(x, y, strict=True):
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        image += flux / (2 * np.pi * sigma**2) * np.exp(-r2 / (2 * sigma**2))
    return Exposure.from_arrays((image + rng.normal(0, 5, shape)).astype(np.float32))


def test_star_offset_measures_the_shift_of_the_same_stars():
    """Stars 0.37, -0.52 px apart in two images of different PSF widths and skies: the
    median offset within 0.03 px and 3 errors, which are about as small; fewer than three
    clean stars give none."""
    rng = np.random.default_rng(5)
    x = rng.uniform(20, 180, 12)
    y = rng.uniform(20, 180, 12)
    first = _gaussian_stars((200, 200), x, y, 3.0, 100.0, rng)
    second = _gaussian_stars((200, 200), x + 0.37, y - 0.52, 4.5, 2000.0, rng)
    offset = star_offset(first, second, x, y, 4.5)
    assert offset is not None and offset.n == 12 and offset.significant
    assert abs(offset.dx - 0.37) < 0.03 and abs(offset.dy + 0.52) < 0.03
    assert abs(offset.dx - 0.37) < 3 * offset.error + 0.01 and offset.error < 0.03
    # the same image twice: no offset, and not significant
    alike = star_offset(first, first, x, y, 4.5)
    assert alike is not None and not alike.significant
    # stars off the frame or on non-finite pixels are left out
    second.image[int(y[0]) - 2 : int(y[0]) + 3, int(x[0]) - 2 : int(x[0]) + 3] = np.nan
    assert star_offset(first, second, x, y, 4.5).n == 11
    assert star_offset(first, second, x[1:3], y[1:3], 4.5) is None


def test_star_offset_ignores_a_sky_gradient_in_one_image():
    """A sky ramp of 6 counts per pixel in one image only (+-1500 over 512 px): the local
    sky is a plane, so the stars do not lean to its bright side (with the rim's median
    alone they moved 0.33 px in the simulated pairs)."""
    rng = np.random.default_rng(6)
    x = rng.uniform(20, 180, 12)
    y = rng.uniform(20, 180, 12)
    first = _gaussian_stars((200, 200), x, y, 3.0, 100.0, rng, flux=5e3)
    second = _gaussian_stars((200, 200), x, y, 4.5, 2000.0, rng, flux=5e3)
    yy, xx = np.mgrid[:200, :200]
    second.image += (6.0 * xx - 4.0 * yy).astype(np.float32)
    offset = star_offset(first, second, x, y, 4.5)
    assert offset is not None and offset.n == 12
    assert np.hypot(offset.dx, offset.dy) < 0.05, offset


def test_catalog_bytes_are_parsed_as_content_never_as_a_path_or_url(tmp_path):
    """An uploaded or inline catalog of one line is CSV text: astropy takes a lone string
    for a file name or URL, and the service read server files and fetched URLs so."""
    import http.server
    import threading

    secret = tmp_path / "secret.csv"
    secret.write_text("x,y\n1,2\n3,4\n")
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's name
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x,y\n5,6\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.csv"
        for text in (str(secret), url, "garbage"):
            with pytest.raises(InvalidCatalogError, match="x, y|ra, dec|column"):
                read_catalog(text.encode())
    finally:
        server.shutdown()
    assert requests == []
    # named once ("catalog uploaded catalog ..." before)
    with pytest.raises(InvalidCatalogError, match=r"^catalog \(uploaded\) has no position"):
        read_catalog(b"garbage")
    # real CSV text still reads, CRLF line ends too
    table = read_catalog(b"x,y\r\n10.5,20.25\r\n30,40\r\n")
    assert list(table["x"]) == [10.5, 30.0] and list(table["y"]) == [20.25, 40.0]
