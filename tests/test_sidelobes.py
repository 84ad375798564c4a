"""Detections a brighter source's PSF explains (core.sidelobes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.exposure import Exposure
from core.psf import GaussianPsf
from core.sidelobes import FilteredPsf, close_pairs, explained


@pytest.mark.parametrize("filtered", [True, False])
def test_filtered_psf_values_equal_the_filtered_image_of_a_drawn_source(filtered):
    """A unit-flux source drawn at a sub-pixel position and correlated with the filter
    (or not, for a score) reads what `FilteredPsf.values` predicts, at every pixel of its
    reach, for sources anywhere on the frame (one across its edge)."""
    psf = GaussianPsf(1.3, ellipticity=0.2, angle=30.0)
    exposure = Exposure.from_arrays(np.zeros((90, 80)))
    kernel = psf.kernel_image() if filtered else np.ones((1, 1))
    half = psf.kernel_image().shape[0] // 2
    response = FilteredPsf(psf, exposure, kernel, half)
    assert response.reach == half + kernel.shape[0] // 2
    xs, ys = np.array([40.3, 12.7, 3.2]), np.array([44.6, 70.1, 30.5])
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        image = np.zeros((90 + 80, 80 + 80))  # room for the whole stamp off the frame
        stamp, x_min, y_min = psf.image_at(x + 40, y + 40)
        h, w = stamp.shape
        image[y_min : y_min + h, x_min : x_min + w] = stamp
        expected = ndimage.correlate(image, kernel, mode="constant")[40:-40, 40:-40]
        rows, cols = np.mgrid[0:90, 0:80]
        near = (np.abs(cols - round(x)) <= response.reach) & (
            np.abs(rows - round(y)) <= response.reach
        )
        source = np.full(near.sum(), k)
        got = response.values(xs, ys, source, cols[near], rows[near])
        np.testing.assert_allclose(got, expected[near], atol=1e-6 * expected.max())


def test_close_pairs_are_within_reach_on_either_axis_brightest_second():
    col = np.array([10, 14, 30, 10])
    row = np.array([10, 13, 10, 26])
    fainter, brighter = close_pairs(col, row, 4)
    assert sorted(zip(fainter.tolist(), brighter.tolist(), strict=True)) == [(1, 0)]
    fainter, brighter = close_pairs(col, row, 16)
    assert (fainter > brighter).all() and fainter.size == 4


def test_explained_subtracts_kept_brighter_predictions_and_allows_their_error():
    """S/N 1000 at peak 0 predicts -80 at peak 2 (a ring: explained) and -60 at peak 1,
    where the data hold 40 more: a source. Peak 4 is predicted only by peak 2, itself
    explained, so it is kept; peak 3 holds its prediction (40) plus 7 sigma: kept without
    a model error, explained when the model is trusted to 10% (7 < 5 sqrt(1 + 4^2))."""
    snr = np.array([1000.0, -100.0, -79.0, 47.0, 30.0])
    observed = snr * 2.0  # the numerator: any positive scale of the S/N
    fainter = np.array([1, 2, 3, 4])
    brighter = np.array([0, 0, 0, 2])
    predicted = np.array([-60.0, -80.0, 40.0, 30.0]) * 2.0
    gone = explained(snr, observed, fainter, brighter, predicted, 5.0, 0.0)
    assert gone.tolist() == [False, False, True, False, False]
    gone = explained(snr, observed, fainter, brighter, predicted, 5.0, 0.1)
    assert gone.tolist() == [False, False, True, True, False]
    # predictions of the other sign explain nothing; no pair, nothing
    assert not explained(snr, observed, fainter, brighter, -predicted, 5.0, 0.1).any()
    empty = np.zeros(0, dtype=int)
    assert not explained(snr, observed, empty, empty, np.zeros(0), 5.0, 0.1).any()
