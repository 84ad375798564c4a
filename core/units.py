"""What a pixel value counts, from BUNIT: a rate or a total, electrons or ADU.

One reading for the variance model (`core.io`) and the flux ratio the exposure
times predict (`core.quality`), so the two never disagree about an image; and the
header cards that go with an image's pixel scale (`in_units_of`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GAIN_KEYS",
    "SATURATION_KEYS",
    "ZERO_POINT_KEYS",
    "in_units_of",
    "rate_and_electrons",
]

#: Header keywords of the detector gain (electrons per pixel unit).
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN", "EFFGAIN")
#: Header keywords of the saturation level (pixel units).
SATURATION_KEYS = ("SATURATE", "SATLEVEL")
#: Header keywords of the photometric zero point (magnitude of one pixel unit).
ZERO_POINT_KEYS = ("MAGZERO", "MAGZPT", "MAGZP", "ZEROPT", "PHOTZP", "ZP")

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


def in_units_of(metadata: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` of an image rescaled into ``reference``'s pixel units (a matched template).

    The cards that say what a pixel value means become the reference's: BUNIT, the
    gain and the zero point (absent there: removed, not left as the original's). The
    saturation level is removed: the original's is in its old units, the reference's
    is not where these pixels saturate, and the SAT mask plane already marks them (read
    back, a stale level re-marked pixels SAT). The rest (epoch, filter, exposure time,
    read noise in electrons) still describes the image's own observation.

    Parameters
    ----------
    metadata, reference : dict
        Header keyword -> value (`core.exposure.Exposure.metadata`); keys of any case.

    Returns
    -------
    dict
        A new dict; neither argument is changed.
    """
    scale = {"BUNIT", *GAIN_KEYS, *ZERO_POINT_KEYS}
    dropped = scale | set(SATURATION_KEYS)
    out = {k: v for k, v in metadata.items() if str(k).upper() not in dropped}
    out.update({k: v for k, v in reference.items() if str(k).upper() in scale})
    return out
