"""Pixels to sky and back through a WCS in any celestial frame; ``ra``, ``dec`` are ICRS
degrees.

A WCS may be written in another frame (galactic GLON/GLAT, FK4 B1950, ecliptic) or with
latitude first: its raw world values are then not (ra, dec), and two WCSs in different
frames do not share them. A review found a galactic template refused as misregistered
beside an ICRS science, and galactic (l, b) written as a catalog's ra/dec. astropy's
frame transformations convert; a WCS in ICRS, longitude first, takes the raw values
(the usual case, as fast as before).
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy.coordinates import ICRS, SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import pixel_to_pixel as _astropy_pixel_to_pixel
from astropy.wcs.utils import wcs_to_celestial_frame

__all__ = ["pixel_to_radec", "radec_to_pixel", "pixel_to_pixel"]


def _frame(wcs: WCS):
    """The WCS's celestial frame (None when astropy cannot name one)."""
    try:
        return wcs_to_celestial_frame(wcs)
    except ValueError:
        return None


def _raw_is_radec(wcs: WCS) -> bool:
    """Whether the raw world values of ``wcs`` are (ra, dec) in ICRS: its frame is ICRS
    (or unnamed: taken as written) and longitude is its first axis."""
    frame = _frame(wcs)
    ordered = wcs.wcs.lng == 0 and wcs.wcs.lat == 1
    return ordered and (frame is None or isinstance(frame, ICRS))


def pixel_to_radec(wcs: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in degrees of 0-based array positions."""
    if _raw_is_radec(wcs):
        ra, dec = wcs.pixel_to_world_values(x, y)
    else:
        sky = wcs.pixel_to_world(x, y).icrs
        ra, dec = sky.ra.deg, sky.dec.deg
    return np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)


def radec_to_pixel(wcs: WCS, ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """0-based array positions of ICRS (ra, dec) in degrees (NaN where the projection
    does not reach)."""
    with np.errstate(invalid="ignore"):
        if _raw_is_radec(wcs):
            x, y = wcs.world_to_pixel_values(ra, dec)
        else:
            x, y = wcs.world_to_pixel(SkyCoord(ra * u.deg, dec * u.deg, frame="icrs"))
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def pixel_to_pixel(source: WCS, target: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``target``'s pixels of ``source``'s pixels (x, y), through the sky:
    the raw world values where both WCSs share frame and axis order."""
    a, b = _frame(source), _frame(target)
    same_order = source.wcs.lng == target.wcs.lng and source.wcs.lat == target.wcs.lat
    same_frame = (a is None and b is None) or (
        a is not None and b is not None and a.is_equivalent_frame(b)
    )
    with np.errstate(invalid="ignore"):
        if same_order and same_frame:
            u_, v_ = target.world_to_pixel_values(*source.pixel_to_world_values(x, y))
        else:
            u_, v_ = _astropy_pixel_to_pixel(source, target, x, y)
    return np.asarray(u_, dtype=np.float64), np.asarray(v_, dtype=np.float64)
