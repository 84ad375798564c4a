"""Subtraction of the real DECam pairs (tests/data/real/decam_sfft_decorr)."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import SubtractionConfig
from core.io import read_exposure
from core.photometry import psf_flux
from core.subtract import run_subtraction

SMALL_IMAGE: dict = {}
CENTRE = (128, 129)  # (row, col) of the brightened source, from the data README


def _subtract(real_data, science, template, **config):
    folder = real_data / "decam_sfft_decorr"
    return run_subtraction(
        read_exposure(folder / science),
        read_exposure(folder / template),
        SubtractionConfig.model_validate({**SMALL_IMAGE, **config}),
    )


def _centre_snr(difference) -> float:
    """S/N of a PSF fit at the centre source with the difference's own PSF."""
    row, col = CENTRE
    flux, error = psf_flux(difference, col, row)
    return flux / error


@pytest.mark.parametrize("epoch", ["a", "b", "d", "e"])
def test_single_epoch_pairs_subtract_to_their_noise(real_data, epoch):
    result = _subtract(
        real_data, f"DEC-OBS04{epoch}.mini.fits.gz", f"DEC-OBS18{epoch}.mini.fits.gz"
    )
    assert result.mode == "convolveTemplate"  # the 2016 template had the better seeing
    assert 0.9 <= result.metrics["noise_ratio"] <= 1.1
    assert abs(result.metrics["noise_mean"]) < 0.1
    # the source at the stamp centre brightened: a positive residual
    assert _centre_snr(result.difference) > 3


def test_coadd_pair_shows_the_brightened_source(real_data):
    result = _subtract(
        real_data, "Stack-DEC-OBS04.fits.gz", "Stack-DEC-OBS18.fits.gz", do_decorrelation=False
    )
    assert _centre_snr(result.difference) > 5
    # SFFT's reference difference has the same sign and a similar flux there
    from astropy.io import fits

    reference = fits.getdata(real_data / "decam_sfft_decorr" / "FinalDifference.fits.gz")
    row, col = CENTRE
    box = np.s_[row - 6 : row + 7, col - 6 : col + 7]
    ours, theirs = result.difference.image[box].sum(), reference[box].sum()
    assert ours == pytest.approx(theirs, rel=0.3)
