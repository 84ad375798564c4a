"""What a pixel value counts, from BUNIT: a rate or a total, electrons or ADU.

One reading for the variance model (`core.io`) and the flux ratio the exposure
times predict (`core.quality`), so the two never disagree about an image.
"""

from __future__ import annotations

from typing import Any

__all__ = ["rate_and_electrons"]

_RATE_ENDINGS = ("/s", "/sec", "/second", "s-1", "s**-1", "s^-1")
_ELECTRON_STARTS = ("e-", "electron", "e/")


def rate_and_electrons(bunit: Any) -> tuple[bool, bool]:
    """(per second, in electrons) of a BUNIT value.

    Parameters
    ----------
    bunit : str or None
        The card's value, e.g. 'electron/s', 'ELECTRONS/S', 'e-', 'DN/s', 'adu'.

    Returns
    -------
    rate, electrons : bool
        Counts per second; electrons rather than ADU (unknown units: both False).
    """
    unit = str(bunit or "").strip().lower().replace(" ", "")
    return unit.endswith(_RATE_ENDINGS), unit.startswith(_ELECTRON_STARTS)
