"""PNG previews and cutouts of image products.

The stretch and the PNG encoding live in `core.display` (the DIA-source cutout
triplets use them too); large frames are block-averaged to at most
``max_size`` pixels a side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from core.display import BLANK_PLANES, blanked, png_bytes

from .errors import ApiError

__all__ = ["png_bytes", "image_plane", "cutout_fits", "cutout_png", "EXPOSURE_PRODUCTS"]

#: Products stored in the exposure (MEF) layout, which support cutouts.
EXPOSURE_PRODUCTS = (
    "difference",
    "score",
    "matched_template",
    "matched_science",
    "warped_template",
)


def image_plane(path: Path) -> np.ndarray:
    """The image plane of a product file to preview: the IMAGE HDU, else the first 2-D
    image HDU; NaN (drawn blank) where its MASK HDU has `BLANK_PLANES`."""
    from core.cutouts import product_blank

    with fits.open(path, memmap=False) as hdul:
        # Chosen from the headers, so only the chosen HDU's data is read (not variance...).
        hdus = [h for h in hdul if h.is_image and h.size > 0]
        named = [h for h in hdus if h.name == "IMAGE"]
        chosen = (named or [h for h in hdus if len(h.shape) == 2] or [None])[0]
        if chosen is None:
            raise ApiError(422, "no_image", f"{path.name} has no 2-D image to preview")
        image = np.asarray(chosen.data, dtype=np.float32)
        mask, bits = product_blank(hdul, image.shape) or (None, 0)
        return blanked(image, (mask & bits) != 0 if bits else None)


def _box(x: int, y: int, size: int, bbox) -> tuple[int, int, int, int]:
    min_x, min_y, max_x, max_y = bbox
    half = size // 2
    box = (
        max(x - half, min_x),
        max(y - half, min_y),
        min(x - half + size - 1, max_x),
        min(y - half + size - 1, max_y),
    )
    if box[0] > box[2] or box[1] > box[3]:
        raise ApiError(
            422, "cutout_outside", f"cutout centre ({x}, {y}) is outside the image box {bbox}"
        )
    return box


def _exposure_cutout(path: Path, x: int, y: int, size: int):
    from core.io import read_exposure

    exposure = read_exposure(path, name=path.stem)
    return exposure.cutout(_box(x, y, size, exposure.bbox))


def cutout_fits(path: Path, x: int, y: int, size: int) -> bytes:
    """MEF bytes of a ``size`` x ``size`` cutout centred on parent pixel (x, y), clipped."""
    from core.io import exposure_to_bytes

    return exposure_to_bytes(_exposure_cutout(path, x, y, size))


def cutout_png(path: Path, x: int, y: int, size: int) -> bytes:
    """PNG preview of the same cutout as `cutout_fits` (`BLANK_PLANES` drawn blank)."""
    cut = _exposure_cutout(path, x, y, size)
    return png_bytes(blanked(cut.image, cut.masked(BLANK_PLANES)))
