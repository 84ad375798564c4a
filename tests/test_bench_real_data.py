"""The real-data bench's pre-registration (bench.real_data.register_by_offset, load_pair)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.real_data import load_pair, register_by_offset
from core.exposure import Exposure


def _star_field(shape, rows, cols, sigma=2.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape)
    for r, c in zip(rows, cols, strict=True):
        image += 1e4 * np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2))
    return image


@pytest.mark.parametrize("dy, dx", [(12.3, -7.6), (-4.0, 9.5)])
def test_shifted_template_lands_on_the_science_stars(dy, dx):
    shape = (160, 170)
    rng = np.random.default_rng(2)
    rows, cols = rng.uniform(30, 130, 12), rng.uniform(30, 140, 12)
    template = Exposure.from_arrays(_star_field(shape, rows, cols), np.full(shape, 4.0))
    template.set_plane("SAT", np.pad(np.ones((1, 1), bool), [(50, 109), (60, 109)]))
    science = Exposure.from_arrays(_star_field(shape, rows + dy, cols + dx))
    cut, shifted = register_by_offset(science, template, dy, dx)
    assert cut.shape == shifted.shape and cut.xy0 == shifted.xy0
    # the overlap: rows r with 0 <= r - dy <= ny - 1, inside the science frame
    r0, r1 = max(0, math.ceil(dy)), min(shape[0] - 1, math.floor(shape[0] - 1 + dy))
    assert cut.shape[0] == r1 - r0 + 1 and cut.xy0[1] == r0
    # cubic resampling of a 2 px Gaussian: residual below 1% of the peak
    assert np.max(np.abs(shifted.image - cut.image)) < 0.01 * 1e4
    # uniform, reduced by the interpolation (checked on noise below)
    assert np.ptp(shifted.variance) < 1e-4 and 2.0 < shifted.variance[0, 0] <= 4.0
    sat_rows, sat_cols = np.nonzero(shifted.masked(["SAT"]))
    assert np.all(np.abs(sat_rows + cut.xy0[1] - (50 + dy)) < 1.0)
    assert np.all(np.abs(sat_cols + cut.xy0[0] - (60 + dx)) < 1.0)


@pytest.mark.parametrize("dy, dx", [(3.5, 2.5), (-1.2, 0.3)])
def test_shifted_noise_keeps_an_honest_variance_and_records_its_correlation(dy, dx):
    shape = (300, 300)
    rng = np.random.default_rng(5)
    template = Exposure.from_arrays(rng.normal(0.0, 3.0, shape), np.full(shape, 9.0))
    science = Exposure.from_arrays(np.zeros(shape))
    _, shifted = register_by_offset(science, template, dy, dx)
    # interpolation smooths the noise: the plane must follow (0.57x at half a pixel)
    pull = shifted.image / np.sqrt(shifted.variance)
    assert np.std(pull) == pytest.approx(1.0, abs=0.02)
    rho = shifted.noise_correlation
    c = rho.shape[0] // 2
    assert rho[c, c] == 1.0
    z = shifted.image - shifted.image.mean()
    for lag_y, lag_x in ((0, 1), (1, 0), (1, 1), (0, 2)):
        measured = np.mean(z[: z.shape[0] - lag_y, : z.shape[1] - lag_x] * z[lag_y:, lag_x:])
        assert measured / np.var(z) == pytest.approx(rho[c + lag_y, c + lag_x], abs=0.02)


def test_saao_pair_is_registered_and_the_target_is_on_it(real_data):
    pair = load_pair("saao_0156", real_data)
    assert pair.science.shape == pair.template.shape
    row, col = pair.target
    assert 0 < row < pair.science.height and 0 < col < pair.science.width
    # the images line up: their cross-correlation peaks at zero lag
    a, b = (np.log(np.maximum(e.image, 1.0)) for e in (pair.science, pair.template))
    a, b = a - a.mean(), b - b.mean()
    corr = np.fft.ifft2(np.fft.fft2(a) * np.conj(np.fft.fft2(b))).real
    lag = np.unravel_index(np.argmax(corr), corr.shape)
    assert lag == (0, 0)
    # and the microlensing star is at the target of the template (the brightest within 6 px)
    r, c = int(round(row)), int(round(col))
    image = pair.template.image
    assert image[r - 1 : r + 2, c - 1 : c + 2].max() == image[r - 6 : r + 7, c - 6 : c + 7].max()
