"""Tests of core.fits_structure: hostile FITS headers and cut files are refused before astropy."""

from __future__ import annotations

import io
import time
import tracemalloc

import numpy as np
import pytest
from astropy.io import fits

from core.errors import InvalidExposureError
from core.io import MIN_IMAGE_SIDE, describe_exposure, read_exposure


def _card(text: str) -> bytes:
    return text.ljust(80).encode()


def naxis_bomb(naxis: str = "2147483648") -> bytes:
    """The reproducer of issue 12: NAXIS = 2**31 in a 20 KB file."""
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        f"NAXIS   = {naxis:>20}",
        "NAXIS1  =                   64",
        "NAXIS2  =                   64",
        "END",
    ]
    header = b"".join(_card(c) for c in cards).ljust(2880, b" ")
    return header + bytes(17280)


def mef_bytes(psf: np.ndarray | None = None, size: int = 64) -> bytes:
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 10.0, (size, size)).astype(np.float32)
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(image, name="IMAGE"),
        fits.ImageHDU(np.full_like(image, 100.0), name="VARIANCE"),
    ]
    if psf is not None:
        hdus.append(fits.ImageHDU(psf.astype(np.float32), name="PSF"))
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("naxis", ["2147483648", "1000", "-1", "1.5E3"])
def test_structural_values_out_of_range_are_refused_fast_and_small(naxis):
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(InvalidExposureError, match="NAXIS"):
        describe_exposure(naxis_bomb(naxis))
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # astropy alone runs for minutes and grows by ~4 MB/s on the first one.
    assert elapsed < 1.0, elapsed
    assert peak < 5 * 2**20, peak


def test_axis_lengths_beyond_the_file_are_truncated_not_allocated():
    wide = _card("NAXIS1  =           2147483647")
    data = naxis_bomb("2").replace(_card("NAXIS1  =                   64"), wide)
    with pytest.raises(InvalidExposureError, match="truncated"):
        read_exposure(data)


@pytest.mark.parametrize("cut_from_end", [100 + 2880, 2880 * 2 - 10, 5000])
def test_mef_cut_inside_its_last_hdus_is_refused(cut_from_end):
    psf = np.outer(np.hanning(15), np.hanning(15))
    data = mef_bytes(psf)
    whole = describe_exposure(data)
    assert whole["planes"]["PSF"] and whole["planes"]["VARIANCE"]
    with pytest.raises(InvalidExposureError, match="truncated"):
        describe_exposure(data[:-cut_from_end])


def test_missing_final_padding_only_is_still_read():
    psf = np.outer(np.hanning(15), np.hanning(15))
    data = mef_bytes(psf)
    # The PSF's 900 data bytes end 1980 bytes before the padded end of the file.
    exposure = read_exposure(data[: len(data) - 1900])
    assert exposure.psf is not None
    assert exposure.image.shape == (64, 64)


@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (64, 1), (MIN_IMAGE_SIDE - 1, 64)])
def test_images_too_small_for_a_psf_are_refused(shape):
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.ones(shape, np.float32)).writeto(buffer)
    with pytest.raises(InvalidExposureError, match=f"at least {MIN_IMAGE_SIDE} pixels"):
        describe_exposure(buffer.getvalue())


@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_all_nan_or_all_zero_psf_is_refused(fill):
    with pytest.raises(InvalidExposureError, match="PSF"):
        describe_exposure(mef_bytes(np.full((15, 15), fill)))


def test_not_fits_is_named():
    with pytest.raises(InvalidExposureError, match="not a FITS file"):
        describe_exposure(b"GIF89a" + bytes(3000))


def _header(cards: list[str]) -> bytes:
    header = b"".join(_card(c) for c in [*cards, "END"])
    return header.ljust(-(-len(header) // 2880) * 2880, b" ")


def test_huge_headers_and_hdu_counts_are_refused_before_astropy():
    base = [
        "SIMPLE  =                    T",
        "BITPIX  =                  -32",
        "NAXIS   =                    0",
    ]
    filler = [f"KEY{i:05d} = {i:20d}" for i in range(10_001)]  # astropy: ~1 s per 10 000
    started = time.perf_counter()
    with pytest.raises(InvalidExposureError, match="more than 10000 cards"):
        describe_exposure(_header(base + filler))
    extension = [
        "XTENSION= 'IMAGE   '",
        "BITPIX  =                  -32",
        "NAXIS   =                    0",
    ]
    many = _header(base + ["EXTEND  =                    T"]) + _header(extension) * 1001
    with pytest.raises(InvalidExposureError, match="more than 1000 HDUs"):
        describe_exposure(many)
    assert time.perf_counter() - started < 2.0
