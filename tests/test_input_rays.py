"""Cosmic rays told in the inputs as read (`core.input_rays`), and what is not one."""

from __future__ import annotations

import numpy as np

from core.config import ForcedPhotometryConfig
from core.exposure import Exposure
from core.input_rays import sharp_in_inputs
from core.psf import GaussianPsf
from tests.conftest import add_point_source

SIZE = 96
SKY, NOISE = 500.0, 10.0
#: The PSF model of both inputs: round, FWHM 3 px.
MODEL = GaussianPsf(3.0 / 2.3548)


def _image(seed: int, psf=None, positions=(), flux: float = 0.0, ray=None) -> Exposure:
    """Sky and noise, point sources of ``psf`` at ``positions``, a one-pixel ``ray``
    (x, y, counts); the PSF model attached is always `MODEL`."""
    rng = np.random.default_rng(seed)
    image = SKY + rng.normal(0.0, NOISE, (SIZE, SIZE))
    for x, y in positions:
        add_point_source(image, psf, x, y, flux)
    if ray is not None:
        image[ray[1], ray[0]] += ray[2]
    exposure = Exposure.from_arrays(image, np.full((SIZE, SIZE), NOISE**2))
    exposure.psf = MODEL
    return exposure


def _test(exposure_science, exposure_template, x, y, flux, light):
    return sharp_in_inputs(
        exposure_science,
        np.atleast_1d(np.asarray(x, dtype=float)),
        np.atleast_1d(np.asarray(y, dtype=float)),
        np.atleast_1d(np.asarray(flux, dtype=float)),
        np.atleast_1d(np.asarray(light, dtype=float)),
        exposure_science,
        exposure_template,
        ForcedPhotometryConfig(),
    )


def test_a_ray_is_sharp_in_the_input_that_holds_it():
    """A one-pixel ray of 30 sigma: flagged in the science for a positive source, in
    the template for a negative one; point sources of the model's shape (S/N ~40) at
    sub-pixel positions, and the other input at the ray's position, are not."""
    ray = (40, 50, 300.0)
    points = [(20.3, 20.7), (70.5, 30.2), (30.8, 75.5), (75.1, 70.9)]
    with_ray = _image(1, MODEL, points, 2000.0, ray)
    plain = _image(2, MODEL, points, 2000.0)
    x = np.array([40.0] + [p[0] for p in points])
    y = np.array([50.0] + [p[1] for p in points])
    flux = np.r_[300.0, np.full(len(points), 2000.0)]
    assert _test(with_ray, plain, x, y, flux, flux).tolist() == [True] + [False] * len(points)
    # a negative source is tested in the template
    assert _test(plain, with_ray, x, y, -flux, flux).tolist() == [True] + [False] * len(points)
    assert not _test(plain, with_ray, x, y, flux, flux).any()


def test_a_star_unlike_its_psf_model_is_tested_only_as_most_of_the_light():
    """Stars half as wide across rows as the round model look sharp in the input as read,
    whatever changed: a source that is all their light is flagged (a ray would be), one
    that is a third of it (a star that brightened by half) is not."""
    narrow = GaussianPsf(3.0 / 2.3548, ellipticity=0.5)
    positions = [(20.0, 20.0), (70.0, 25.0), (25.0, 70.0), (72.0, 72.0)]
    science = _image(3, narrow, positions, 20000.0)
    x, y = (np.array(v) for v in zip(*positions, strict=True))
    light = np.full(x.size, 20000.0)
    assert _test(science, None, x, y, light, light).all()
    change = light / 3.0
    assert not _test(science, None, x, y, change, light).any()
    # a light that could not be measured (NaN) tests nothing
    assert not _test(science, None, x, y, light, np.full(x.size, np.nan)).any()
