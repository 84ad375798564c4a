"""A sky that varies across the frame (moonlight ramp, scattered light) is light with its
photon noise where it is: the variance plane read for it and the noise the variance
scaling measures must follow it, so the difference's noise is right on both sides."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.config import SubtractionConfig
from core.io import estimate_variance
from core.metrics import robust_sigma_median
from core.simulate import SimulationConfig, SkyConfig, simulate_pair
from core.subtract import run_subtraction

_QUIET = ("BAD", "SAT", "NO_DATA", "EDGE", "DETECTED", "DETECTED_NEGATIVE")


def _read_as_plain(exposure):
    """The exposure as a plain image is read: its variance modelled from the pixels."""
    metadata = exposure.metadata
    variance, text, _, _ = estimate_variance(
        exposure.image, gain=metadata["GAIN"], read_noise=metadata["RDNOISE"]
    )
    return replace(exposure, variance=variance, variance_source=text)


def _halves(values: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nx = values.shape[1]
    return values[:, : nx // 2][keep[:, : nx // 2]], values[:, nx // 2 :][keep[:, nx // 2 :]]


def _pair(gradient: float):
    # a faint sky (gain 10: 10 counts of noise on 1000) rising by 1800 counts across the
    # frame, ~11 sigma per 32 px cell of the variance scaling's mesh; the template's
    # runs the other way
    config = SimulationConfig(
        size=512,
        seed=1,
        gain=10.0,
        science_sky=SkyConfig(level=1000.0, gradient_x=gradient),
        template_sky=SkyConfig(level=1000.0, gradient_x=-gradient),
    )
    return simulate_pair(config)


def test_gradient_variance_follows_the_sky_and_the_difference_noise_is_right():
    pair = _pair(900.0)
    science, template = _read_as_plain(pair.science), _read_as_plain(pair.template)
    for read, truth in ((science, pair.science), (template, pair.template)):
        for half in _halves(read.variance / truth.variance, np.ones(read.shape, bool)):
            assert np.median(half) == pytest.approx(1.0, abs=0.03)
    result = run_subtraction(science, template, SubtractionConfig())
    metrics = result.metrics
    # before: both planes scaled up (1.14 and 1.46: the mesh's cells on the slope, partly
    # masked by sources, took the slope for noise), noise ratio 0.93 on either side
    assert metrics["science_variance_scale"] == pytest.approx(1.0, abs=0.03)
    assert metrics["template_variance_scale"] == pytest.approx(1.0, abs=0.03)
    out = result.output
    z = out.image / np.sqrt(out.variance)
    keep = np.isfinite(z) & ~out.masked(list(_QUIET))
    for half in _halves(z, keep):
        assert robust_sigma_median(half)[0] == pytest.approx(1.0, abs=0.03)
