"""Alert cutouts: science, matched template and difference stamps around a DIA source.

As in ZTF and Rubin alert packets, each DIA source gets a triplet of stamps
centred on it: a FITS file of three image HDUs (SCIENCE, TEMPLATE, DIFFERENCE,
each with its WCS) and a PNG of the three side by side for dashboards. Stamps
that run off the frame are padded with NaN (`astropy.nddata.Cutout2D`,
``mode="partial"``), so every stamp has the requested size and its centre pixel
is the source's pixel.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.nddata.utils import NoOverlapError
from astropy.wcs import WCS

from .display import png_bytes
from .errors import InvalidConfigError

__all__ = [
    "TRIPLET",
    "Stamp",
    "cutout_triplet",
    "triplet_fits",
    "triplet_png",
    "triplet_from_files",
    "result_images",
]

#: HDU names of a triplet, in order, and the products they come from.
TRIPLET = ("SCIENCE", "TEMPLATE", "DIFFERENCE")

Stamp = tuple[np.ndarray, WCS | None]


def _stamp(data: np.ndarray, wcs: WCS | None, x: float, y: float, size: int) -> Stamp:
    try:
        cut = Cutout2D(
            data, (x, y), (size, size), wcs=wcs, mode="partial", fill_value=np.nan, copy=True
        )
    except NoOverlapError:
        raise InvalidConfigError(
            f"cutout centre ({x:.1f}, {y:.1f}) is outside the {data.shape[1]}x{data.shape[0]} image"
        ) from None
    return np.asarray(cut.data, dtype=np.float32), cut.wcs


def cutout_triplet(
    images: Mapping[str, tuple[np.ndarray, WCS | None]], x: float, y: float, size: int
) -> dict[str, Stamp]:
    """Stamps of ``size`` x ``size`` px centred on array position (x, y).

    Parameters
    ----------
    images : mapping
        ``TRIPLET`` name -> (image (ny, nx), WCS or None); the three share a pixel grid.
    x, y : float
        0-based column and row of the source.
    size : int
        Side of each stamp (odd keeps the source on the centre pixel).

    Returns
    -------
    dict
        Name -> (stamp (size, size) float32 with NaN off the frame, WCS or None).
    """
    if size < 1:
        raise InvalidConfigError(f"cutout size must be positive, got {size}")
    return {name: _stamp(data, wcs, x, y, size) for name, (data, wcs) in images.items()}


def result_images(result) -> dict[str, tuple[np.ndarray, WCS | None]]:
    """``TRIPLET`` name -> (image, WCS) of a `core.subtract.SubtractionResult`: the matched
    science, the matched template and the difference (or score)."""
    exposures = (result.matched_science, result.matched_template, result.output)
    return {name: (e.image, e.wcs) for name, e in zip(TRIPLET, exposures, strict=True)}


def triplet_fits(stamps: Mapping[str, Stamp], header: Mapping | None = None) -> bytes:
    """FITS bytes: an empty primary HDU (``header`` cards) and one image HDU per stamp."""
    primary = fits.PrimaryHDU()
    for key, value in (header or {}).items():
        primary.header[key] = value
    hdus: list = [primary]
    for name, (data, wcs) in stamps.items():
        hdu_header = wcs.to_header(relax=True) if wcs is not None else fits.Header()
        hdus.append(fits.ImageHDU(data, header=hdu_header, name=name))
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def triplet_png(stamps: Mapping[str, Stamp]) -> bytes:
    """PNG of the stamps side by side (science, template, difference), each stretched alone."""
    return png_bytes([data for data, _ in stamps.values()])


def triplet_from_files(paths: Mapping[str, Path], x: float, y: float, size: int):
    """`cutout_triplet` from product files, reading only the stamps' rows (memory map).

    Parameters
    ----------
    paths : mapping
        ``TRIPLET`` name -> product file (matched science, matched template,
        difference or score); the image is the MEF ``IMAGE`` HDU, else the first
        2-D image HDU.
    x, y : float
        0-based column and row.
    size : int
    """
    out = {}
    for name, path in paths.items():
        with fits.open(path, memmap=True) as hdul:
            hdus = [h for h in hdul if h.is_image and h.header.get("NAXIS") == 2]
            named = [h for h in hdus if h.name == "IMAGE"]
            if not (named or hdus):
                raise InvalidConfigError(f"{Path(path).name} has no 2-D image for a cutout")
            chosen = (named or hdus)[0]
            try:
                wcs = WCS(chosen.header) if chosen.header.get("CTYPE1") else None
            except Exception:  # noqa: BLE001 - an unreadable WCS: stamps without one
                wcs = None
            out[name] = _stamp(chosen.data, wcs, x, y, size)
    return out
