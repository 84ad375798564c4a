"""The verdict's reasons name the likely cause (core.quality)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.exposure import Exposure
from core.quality import BAD, GOOD, SUSPECT, assess_quality


def _shifted_kernel(dx: float, size: int = 21) -> np.ndarray:
    """A unit-sum Gaussian kernel whose centroid sits ``dx`` px along +x."""
    offsets = np.arange(size) - size // 2
    kernel = np.exp(-((offsets[None, :] - dx) ** 2 + offsets[:, None] ** 2) / 4.0)
    return kernel / kernel.sum()


def _verdict(dx: float, registration: dict | None):
    image = Exposure.from_arrays(np.zeros((64, 64)))
    metrics = {"noise_ratio": 1.0, "kernel_sum": 1.0}
    if registration is not None:
        metrics["registration"] = registration
    return assess_quality(metrics, image, image, _shifted_kernel(dx), None, []).as_dict()


@pytest.mark.parametrize(("dx", "level"), [(0.2, GOOD), (1.0, SUSPECT), (3.0, BAD)])
def test_kernel_shift_grades_the_verdict(dx, level):
    verdict = _verdict(dx, {"method": "stars"})
    assert verdict["verdict"] == level
    shifted = [r for r in verdict["reasons"] if "kernel shifts the image" in r]
    assert bool(shifted) == (level != GOOD)
    if shifted:
        assert f"{dx:.2f} px" in shifted[0] and "check the registration" in shifted[0]
        # a kernel fitted on galaxies or sized by a wrong PSF moves too (plain JWST pair)
        assert "check the PSFs" in shifted[0]


@pytest.mark.parametrize("resampled", [True, False])
def test_registration_residual_counts_where_a_map_was_applied(resampled):
    """Stars found on one grid leave the template unresampled: their scatter about the
    identity is centroid noise, no misregistration (aligned pairs of faint or wide
    stars read 0.31-0.43 px)."""
    registration = {"method": "stars", "rms_px": 0.4, "resampled": resampled}
    if not resampled:
        registration["method"] = "stars: same grid"
    verdict = _verdict(0.0, registration)
    assert (verdict["verdict"] == SUSPECT) == resampled
    assert any("registration residual is 0.40 px" in r for r in verdict["reasons"]) == resampled


def test_kernel_shift_on_one_wcs_grid_points_at_star_registration():
    """WCSs that put the images on one grid were not checked on the stars (the DECam
    stamps' are 0.6 px off): the reason says how to measure it."""
    reason = _verdict(1.0, {"method": "same grid"})["reasons"][0]
    assert "registration.mode 'stars'" in reason
    assert "check the registration" not in reason


@pytest.mark.parametrize(
    ("dx", "stars", "level"),
    [
        (0.9, (0.9, 0.0), GOOD),
        (0.9, (0.1, 0.0), SUSPECT),
        (0.1, (0.9, 0.0), SUSPECT),
        (2.6, (2.6, 0.0), SUSPECT),
        (3.0, (0.0, 0.0), BAD),
    ],
)
def test_kernel_shift_is_judged_against_the_stars_offset(dx, stars, level):
    """A kernel that follows the kernel stars' offset absorbs a misalignment (good); one
    that moves where the stars do not, or stays where they moved, follows something else;
    a shift beyond `bad_kernel_shift` is not trusted to hold the stars' shape."""
    image = Exposure.from_arrays(np.zeros((64, 64)))
    metrics = {"noise_ratio": 1.0, "kernel_sum": 1.0, "registration": {"method": "same grid"}}
    verdict = assess_quality(
        metrics, image, image, _shifted_kernel(dx), None, [], star_shift=stars
    ).as_dict()
    assert verdict["verdict"] == level, verdict["reasons"]
    if level != GOOD:
        reason = verdict["reasons"][0]
        assert f"kernel stars are {math.hypot(*stars):.2f} px apart" in reason
        assert "registration.mode 'stars'" in reason or "not the stars" in reason
