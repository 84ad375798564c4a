"""BUNIT spellings read as a rate and/or electrons (core.units)."""

from __future__ import annotations

import pytest

from core.units import rate_and_electrons


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
