"""BUNIT spellings read as a rate and/or electrons (core.units)."""

from __future__ import annotations

import pytest

from core.units import in_units_of, rate_and_electrons


@pytest.mark.parametrize(
    "bunit, expected",
    [
        ("electron/s", (True, True)),
        ("ELECTRONS/S", (True, True)),
        ("e-/s", (True, True)),
        ("electron s-1", (True, True)),
        ("ELECTRONS", (False, True)),
        ("DN/s", (True, False)),
        ("counts/s", (True, False)),
        ("adu", (False, False)),
        ("MJy/sr", (False, False)),
        ("erg/s/cm2/A", (False, False)),
        ("nJy", (False, False)),
        (None, (False, False)),
        ("", (False, False)),
    ],
)
def test_rate_and_electrons(bunit, expected):
    assert rate_and_electrons(bunit) == expected


def test_in_units_of_takes_the_references_scale_and_drops_a_stale_saturation():
    template = {"BUNIT": "electron", "gain": 1.0, "SATLEVEL": 6e4, "MJD-OBS": 1.0, "ZP": 26.0}
    science = {"EXPTIME": 30.0, "MAGZPT": 25.0}  # no BUNIT, no gain: none carried over
    out = in_units_of(template, science)
    assert out == {"MJD-OBS": 1.0, "MAGZPT": 25.0}
    assert template["BUNIT"] == "electron"  # the input is left alone
