"""The local sky around stamps: the median of a square ring just outside each (forced
photometry's sky, a saturated star's sky in the bright-star test)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .exposure import Exposure
from .order import row_nanmedians
from .stamps import stamps as _stack

__all__ = ["ring_levels", "ring_stamps"]


def ring_levels(
    exposure: Exposure, ix, iy, half: int, width: int, unusable: Sequence[str]
) -> np.ndarray:
    """Median of the usable pixels in the square ring of ``width`` px around each
    (2 half + 1)^2 stamp centred on array pixels (ix, iy): a local sky (robust to the
    stars in it). NaN where the ring has no usable pixel.

    Pixels with a mask plane in ``unusable`` and non-finite ones count as unusable
    (`core.order.row_nanmedians`)."""
    return ring_stamps(exposure, ix, iy, half, width, unusable)[0]


def ring_stamps(
    exposure: Exposure, ix, iy, half: int, width: int, unusable: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`ring_levels`, with the stamps it read: the image's (n, 2 outer + 1, 2 outer + 1),
    outer = ``half`` + ``width``, NaN off the frame, and the mask's (0 off the frame;
    None when no plane of ``unusable`` exists or no position is given). A fit of the
    inner (2 half + 1)^2 stamps cuts them from these instead of gathering them again."""
    outer = half + width
    offsets = np.abs(np.arange(-outer, outer + 1))
    ring = (np.maximum(offsets[:, None], offsets[None, :]) > half).ravel()
    n = np.size(ix)
    image = _stack(exposure.image, ix, iy, outer, fill=np.nan)
    bits = exposure.bitmask(unusable)
    mask = _stack(exposure.mask, ix, iy, outer, fill=0) if bits and n else None
    if n == 0:
        return np.zeros(0), image, mask
    values = image.reshape(n, -1)[:, ring]  # a copy: the stamps stay as read
    if mask is not None:
        values[(mask.reshape(n, -1)[:, ring] & bits) != 0] = np.nan
    values[np.isinf(values)] = np.nan
    return row_nanmedians(values, consume=True), image, mask
