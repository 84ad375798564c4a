"""Exposure and mask planes: registry, cutouts, copies, merging masks by name."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from core.errors import InvalidExposureError
from core.exposure import DEFAULT_MASK_PLANES, Exposure, MaskPlanes, PhotoCalib


def test_default_planes_have_rubin_bits():
    planes = MaskPlanes()
    assert [planes.bit(n) for n in DEFAULT_MASK_PLANES] == list(range(9))
    assert planes.bit("INJECTED") == 9  # new planes get the next free bit
    assert planes.get_bitmask(["BAD", "NO_SUCH"]) == 1  # unknown names are skipped


def test_mask_plane_bits_must_be_unique_and_in_range():
    with pytest.raises(InvalidExposureError):
        MaskPlanes({"A": 1, "B": 1})
    with pytest.raises(InvalidExposureError):
        MaskPlanes({"A": 31})


def test_shapes_must_agree():
    with pytest.raises(InvalidExposureError, match="shape"):
        Exposure(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4), int))
    with pytest.raises(InvalidExposureError, match="2-D"):
        Exposure.from_arrays(np.zeros(4))


def test_cutout_keeps_planes_parent_coordinates_and_sky():
    image = np.arange(100.0).reshape(10, 10)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, 20.0]
    wcs.wcs.crpix = [5.0, 5.0]
    wcs.wcs.cdelt = [-1e-4, 1e-4]
    exposure = Exposure.from_arrays(image, wcs=wcs, xy0=(100, 200))
    exposure.set_plane("SAT", image > 90)
    cut = exposure.cutout((102, 203, 105, 207))
    assert cut.shape == (5, 4) and cut.xy0 == (102, 203)
    assert cut.image[0, 0] == image[3, 2]
    assert cut.bbox == (102, 203, 105, 207)
    # the same pixel has the same sky position in both
    assert np.allclose(cut.wcs.pixel_to_world_values(1, 2), wcs.pixel_to_world_values(3, 5))
    with pytest.raises(InvalidExposureError, match="not inside"):
        exposure.cutout((95, 200, 105, 205))


def test_copy_is_deep_for_pixels_and_planes():
    exposure = Exposure.from_arrays(np.ones((3, 3)))
    other = exposure.copy()
    other.image[0, 0] = 5
    other.set_plane("NEW", np.ones((3, 3), bool))
    assert exposure.image[0, 0] == 1 and "NEW" not in exposure.mask_planes


def test_or_mask_from_maps_planes_by_name():
    a = Exposure.from_arrays(np.zeros((2, 2)))
    b = Exposure.from_arrays(np.zeros((2, 2)), mask_planes=MaskPlanes({"SAT_TEMPLATE": 3}))
    b.mask[0, 1] = 1 << 3
    a.or_mask_from(b)
    assert a.masked(["SAT_TEMPLATE"])[0, 1] and not a.masked(["CR"])[0, 1]
    assert a.plane_counts()["SAT_TEMPLATE"] == 1


def test_photo_calib_zero_point_round_trip():
    calib = PhotoCalib.from_zero_point(27.0)
    assert calib.zero_point == pytest.approx(27.0)
    assert PhotoCalib(1.0).zero_point == pytest.approx(31.4)


@pytest.mark.parametrize("shape", [(40, 30), (2100, 2050)])  # heap; huge-page frame
def test_masked_and_any_masked_equal_the_per_pixel_bit_test(shape):
    exposure = Exposure.from_arrays(np.zeros(shape, np.float32))
    sat, det = exposure.mask_planes.value("SAT"), exposure.mask_planes.value("DETECTED")
    assert not exposure.any_masked(["SAT", "DETECTED"])
    assert not exposure.any_masked(["NOT_A_PLANE"])
    exposure.mask[-1, -1] |= det  # the last pixel of the last block only
    exposure.mask[::7, ::5] |= sat
    for names in (["SAT"], ["DETECTED"], ["SAT", "DETECTED"], ["CR"]):
        bits = exposure.bitmask(names)
        expected = (exposure.mask & bits) != 0
        np.testing.assert_array_equal(exposure.masked(names), expected)
        assert exposure.any_masked(names) == bool(expected.any())


def test_deferred_variance_is_made_once_on_first_read_and_by_copies():
    import copy
    import pickle
    import threading
    import time

    from core.exposure import DeferredPlane

    calls = []

    def make():
        calls.append(1)
        return np.full((4, 5), 3.0)

    exposure = Exposure.from_arrays(np.ones((4, 5)), np.full((4, 5), 2.0))
    exposure.defer_variance(DeferredPlane(make))
    assert exposure.variance_deferred and not calls
    # stamps without a maker of their own are cut from the made plane
    assert exposure.variance_stamps([1], [1], 1, fill=0.0)[0, 1, 1] == 3.0
    assert calls == [1] and not exposure.variance_deferred
    deferred = Exposure.from_arrays(np.ones((4, 5)))
    deferred.defer_variance(DeferredPlane(make))
    copied = copy.deepcopy(deferred)  # a copy holds the plane, not its maker
    assert not copied.variance_deferred and copied.variance[0, 0] == 3.0
    assert pickle.loads(pickle.dumps(deferred)).variance.dtype == np.float32
    assert len(calls) == 2

    def make_slowly():
        time.sleep(0.05)  # readers arrive while it is being made
        return make()

    shared = Exposure.from_arrays(np.ones((4, 5)))
    shared.defer_variance(DeferredPlane(make_slowly))
    relabelled = shared.with_psf(None)  # shares the plane, still deferred
    assert relabelled.variance_deferred
    threads = [threading.Thread(target=lambda: shared.variance) for _ in range(4)]
    threads.append(threading.Thread(target=lambda: relabelled.variance))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 3  # made once for all its readers, through either exposure
    assert relabelled.variance is shared.variance


def test_a_masked_array_image_sets_its_masked_pixels_bad():
    # np.asarray alone drops a masked array's mask: its masked pixels were used as data
    image = np.ma.masked_array(np.ones((6, 6)), mask=np.zeros((6, 6), bool))
    image[2, 3] = np.ma.masked
    mask = np.zeros((6, 6), np.int32)
    for exposure in (Exposure.from_arrays(image), Exposure(image, np.ones((6, 6)), mask)):
        assert exposure.masked(["BAD"])[2, 3]
        assert exposure.masked(["BAD"]).sum() == 1
        assert type(exposure.image) is np.ndarray
    assert not mask.any()  # the caller's mask is not changed


def test_from_arrays_marks_a_missing_variance_as_unit():
    from core.exposure import UNIT_VARIANCE

    assert Exposure.from_arrays(np.zeros((4, 4))).variance_source == UNIT_VARIANCE
    given = Exposure.from_arrays(np.zeros((4, 4)), np.full((4, 4), 2.0))
    assert given.variance_source == "given"


def test_a_complex_plane_is_refused():
    # float32 of a complex array silently kept the real part (a ComplexWarning only)
    with pytest.raises(InvalidExposureError, match="image is complex"):
        Exposure.from_arrays(np.ones((8, 8), complex))
