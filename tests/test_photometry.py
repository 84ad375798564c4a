"""PSF photometry at given positions."""

from __future__ import annotations

import numpy as np
import pytest

from core.exposure import Exposure
from core.photometry import psf_flux
from core.psf import GaussianPsf
from tests.conftest import add_point_source


def _field(fluxes, positions, sky=10.0, sigma=2.0, seed=0):
    psf = GaussianPsf(2.0)
    image = np.full((128, 128), sky)
    for flux, (x, y) in zip(fluxes, positions, strict=True):
        add_point_source(image, psf, x, y, flux)
    image += np.random.default_rng(seed).normal(0, sigma, image.shape)
    return Exposure.from_arrays(image, np.full(image.shape, sigma**2), psf=psf)


def test_flux_with_local_background_and_error():
    positions = [(30.3, 40.7), (90.0, 90.5), (60.6, 20.2)]
    exposure = _field([1000.0, 500.0, 2000.0], positions)
    fluxes, errors = np.array(
        [psf_flux(exposure, x, y, fit_background=True) for x, y in positions]
    ).T
    assert fluxes == pytest.approx([1000.0, 500.0, 2000.0], abs=4 * errors.max())
    # error of a PSF fit: sigma / sqrt(sum P^2), inflated a little by the background term
    ideal = 2.0 / np.sqrt(np.sum(exposure.psf.kernel_image() ** 2))
    assert ideal <= errors[0] < 1.3 * ideal


def test_pulls_have_unit_scatter():
    pulls = []
    for seed in range(40):
        exposure = _field([300.0], [(64.2, 63.7)], seed=seed)
        flux, error = psf_flux(exposure, 64.2, 63.7, fit_background=True)
        pulls.append((flux - 300.0) / error)
    assert 0.7 < np.std(pulls) < 1.3
    assert abs(np.mean(pulls)) < 0.5


def test_off_image_gives_nan():
    exposure = _field([100.0], [(64, 64)])
    flux, error = psf_flux(exposure, 2.0, 2.0)
    assert np.isnan(flux) and np.isnan(error)
