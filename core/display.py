"""Display stretch and PNG encoding of images: previews, cutouts and alert triplets.

A zscale interval and an asinh stretch (astropy.visualization), the usual
display for difference images: faint residuals visible, bright stars not
saturated into blobs. FITS row 0 is drawn at the bottom.
"""

from __future__ import annotations

import io

import numpy as np
from astropy.visualization import AsinhStretch, ZScaleInterval
from PIL import Image, ImageDraw, ImageFont

__all__ = ["png_bytes", "stretch_8bit", "block_mean", "BLANK_PLANES", "blanked"]

#: Mask planes whose pixels a picture leaves blank (drawn as NaN, at the median): they
#: hold no difference, only input values copied there (the convolutions' unreachable
#: band, no template coverage: a strip of science stars on the SAAO frames' previews).
BLANK_PLANES = ("NO_DATA", "EDGE")


def blanked(image: np.ndarray, blank: np.ndarray | None) -> np.ndarray:
    """float32 ``image`` with NaN where ``blank`` (None: as it is)."""
    image = np.asarray(image, dtype=np.float32)
    if blank is None or not blank.any():
        return image
    return np.where(blank, np.float32(np.nan), image)


def block_mean(image: np.ndarray, max_size: int) -> np.ndarray:
    """Block-average ``image`` so that neither side exceeds ``max_size`` pixels."""
    factor = int(np.ceil(max(image.shape) / max_size))
    if factor <= 1:
        return image
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    # sum over count, not np.nanmean: a block wholly off the frame or blank is NaN
    # without "Mean of empty slice" on every such block
    finite = np.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def stretch_8bit(image: np.ndarray) -> np.ndarray:
    """uint8 display values of ``image`` (zscale + asinh); NaNs drawn at the median.

    The interval is taken from the finite pixels alone: blanks filled first (a stamp
    half off the frame, a no-template strip) made zscale's sorted samples a plateau
    whose narrow slope clipped most real pixels to black or white.
    """
    image = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, dtype=np.uint8)
    real = image[finite]
    filled = np.where(finite, image, np.median(real))
    vmin, vmax = ZScaleInterval().get_limits(real)
    span = vmax - vmin if vmax > vmin else 1.0
    unit = np.clip((filled - vmin) / span, 0.0, 1.0)
    return (AsinhStretch(0.1)(unit, clip=True) * 255).astype(np.uint8)


def png_bytes(
    image: np.ndarray | list[np.ndarray],
    max_size: int = 1024,
    labels: list[str] | None = None,
    min_panel: int = 0,
) -> bytes:
    """8-bit PNG of ``image`` with a zscale + asinh stretch, row 0 at the bottom.

    ``image`` may be a list of equally tall images: each is stretched on its
    own and they are drawn side by side, 2 px apart (a cutout triplet).
    ``min_panel``: small images are enlarged by the whole factor that makes them at
    least this tall (each pixel a square of pixels, nothing interpolated);
    ``labels``: one per image, written in a strip above it.
    """
    images = image if isinstance(image, list | tuple) else [image]
    panels = [stretch_8bit(block_mean(np.asarray(i, dtype=np.float32), max_size)) for i in images]
    zoom = max(1, -(-min_panel // panels[0].shape[0]))
    if zoom > 1:
        panels = [np.kron(panel, np.ones((zoom, zoom), dtype=np.uint8)) for panel in panels]
    gap = np.zeros((panels[0].shape[0], 2), dtype=np.uint8) if len(panels) > 1 else None
    row: list[np.ndarray] = []
    for k, panel in enumerate(panels):
        if k and gap is not None:
            row.append(gap)
        row.append(panel)
    scaled = np.concatenate(row, axis=1) if len(row) > 1 else row[0]
    picture = Image.fromarray(np.ascontiguousarray(scaled[::-1]))
    if labels:
        picture = _with_labels(picture, [panel.shape[1] for panel in panels], labels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


#: Height (px) of the strip `png_bytes` writes labels in (Pillow's default font is ~11 px).
_LABEL_STRIP = 14


def _with_labels(picture: Image.Image, widths: list[int], labels: list[str]) -> Image.Image:
    """``picture`` below a black strip holding each panel's label at its left edge."""
    out = Image.new("L", (picture.width, picture.height + _LABEL_STRIP), 0)
    out.paste(picture, (0, _LABEL_STRIP))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    left = 0
    for width, label in zip(widths, labels, strict=True):
        draw.text((left + 2, 1), label, fill=255, font=font)
        left += width + 2
    return out
