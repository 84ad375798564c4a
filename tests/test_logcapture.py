"""core.logcapture and what run_subtraction does with it; identical inputs are refused."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest
from astropy.io import fits

from core.config import SubtractionConfig
from core.errors import IdenticalInputsError
from core.io import read_exposure
from core.logcapture import collect_warnings
from core.subtract import run_subtraction

from .conftest import simulated_pair


def _bad_wcs_file() -> bytes:
    """A FITS image whose WCS is singular: core.io logs a warning and ignores it."""
    header = fits.Header()
    for key, value in [
        ("CTYPE1", "RA---TAN"),
        ("CTYPE2", "DEC--TAN"),
        ("CRVAL1", 1.0),
        ("CRVAL2", 2.0),
        ("CRPIX1", 1.0),
        ("CRPIX2", 1.0),
        ("CD1_1", 0.0),
        ("CD2_2", 0.0),
    ]:
        header[key] = value
    buffer = io.BytesIO()
    image = np.random.default_rng(1).normal(100, 10, (32, 32)).astype(np.float32)
    fits.PrimaryHDU(image, header=header).writeto(buffer)
    return buffer.getvalue()


def test_collects_core_warnings_of_this_thread_only():
    data = _bad_wcs_file()
    with collect_warnings() as caught:
        read_exposure(data, name="first.fits")  # core warns: collected
        read_exposure(data, name="first.fits")  # the same message again: kept once
        # not from core (logged from this file, even on a logger core uses): not collected
        logging.getLogger("alsub.kernel").warning("not from a core module")
        # another thread (another job of the same process): not collected
        other = threading.Thread(target=read_exposure, args=(data,), kwargs={"name": "x.fits"})
        other.start()
        other.join()
    assert len(caught) == 1
    assert caught[0].startswith("first.fits: WCS ignored")
    with collect_warnings() as after:
        pass
    assert after == []  # nothing left over from the previous block


def test_run_subtraction_keeps_its_warnings_in_the_metrics():
    # a spatial condition-number limit no solution meets: the kernel fit warns
    pair = simulated_pair("sharper_template", 256, 2)
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        config = SubtractionConfig(kernel={"max_spatial_condition_number": 1})
        result = run_subtraction(pair.science, pair.template, config)
    finally:
        logging.getLogger().removeHandler(handler)
    warnings = result.metrics["warnings"]
    assert any("kernel" in w for w in logged), logged  # the kernel fit did warn
    # everything core logged is kept, once each, in order, after the task's own concerns
    kept = [w for w in warnings if w in logged]
    assert kept == list(dict.fromkeys(logged))


def test_identical_images_are_refused_with_a_typed_error():
    pair = simulated_pair("sharper_template", 256, 2)
    with pytest.raises(IdenticalInputsError, match="same image"):
        run_subtraction(pair.science, pair.science, SubtractionConfig())
    same_pixels = pair.science.copy()
    same_pixels.metadata["OBJECT"] = "renamed"  # other header, same pixels: still refused
    with pytest.raises(IdenticalInputsError):
        run_subtraction(same_pixels, pair.science, SubtractionConfig())
