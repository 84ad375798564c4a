"""An exposure's epoch as its two FITS cards, MJD-OBS and DATE-OBS, each giving the other.

Catalogs and alert stamps state both (an alert needs the epoch, brokers read either);
astropy's WCS writes DATE-OBS from MJD-OBS, and an image may carry only one of them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["full_epoch"]


def full_epoch(mjd: Any, date: Any) -> dict[str, Any]:
    """``{"MJD-OBS": ..., "DATE-OBS": ...}`` from either (ISO UTC, as astropy writes it);
    unreadable or unknown ones left out (a date astropy cannot read is kept as it is,
    nothing derived from it)."""
    from astropy.time import Time

    mjd = float(mjd) if isinstance(mjd, int | float) and math.isfinite(mjd) else None
    date = date.strip() if isinstance(date, str) and date.strip() else None
    try:
        if mjd is None and date is not None:
            mjd = float(Time(date, scale="utc").mjd)
        elif date is None and mjd is not None:
            date = Time(mjd, format="mjd", scale="utc").isot
    except ValueError:
        pass
    out = {"MJD-OBS": mjd, "DATE-OBS": date}
    return {key: value for key, value in out.items() if value is not None}
