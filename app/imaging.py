"""PNG previews and cutouts of image products.

Previews use a zscale interval and an asinh stretch (astropy.visualization),
the usual display for difference images: faint residuals visible, bright
stars not saturated into blobs. Large frames are block-averaged to at most
``max_size`` pixels a side.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.visualization import AsinhStretch, ZScaleInterval
from PIL import Image

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
    """The image plane of a product file: the IMAGE HDU, else the first 2-D image HDU."""
    with fits.open(path, memmap=False) as hdul:
        # Chosen from the headers, so only the chosen HDU's data is read (not mask, variance...).
        hdus = [h for h in hdul if h.is_image and h.size > 0]
        named = [h for h in hdus if h.name == "IMAGE"]
        chosen = (named or [h for h in hdus if len(h.shape) == 2] or [None])[0]
        if chosen is None:
            raise ApiError(422, "no_image", f"{path.name} has no 2-D image to preview")
        return np.asarray(chosen.data, dtype=np.float32)


def _block_mean(image: np.ndarray, max_size: int) -> np.ndarray:
    factor = int(np.ceil(max(image.shape) / max_size))
    if factor <= 1:
        return image
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    return np.nanmean(blocks, axis=(1, 3))


def png_bytes(image: np.ndarray, max_size: int = 1024) -> bytes:
    """8-bit PNG of ``image`` with a zscale + asinh stretch, north (row 0) at the bottom."""
    image = _block_mean(np.asarray(image, dtype=np.float32), max_size)
    finite = np.isfinite(image)
    if not finite.any():
        scaled = np.zeros(image.shape, dtype=np.uint8)
    else:
        filled = np.where(finite, image, np.nanmedian(image[finite]))
        vmin, vmax = ZScaleInterval().get_limits(filled)
        span = vmax - vmin if vmax > vmin else 1.0
        unit = np.clip((filled - vmin) / span, 0.0, 1.0)
        scaled = (AsinhStretch(0.1)(unit, clip=True) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    # FITS row 0 is the bottom of the picture.
    Image.fromarray(scaled[::-1]).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


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
    """PNG preview of the same cutout as `cutout_fits`."""
    return png_bytes(_exposure_cutout(path, x, y, size).image)
