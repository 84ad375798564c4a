"""The local sky around stamps: the median of a square ring just outside each (forced
photometry's sky, a saturated star's sky in the bright-star test)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .exposure import Exposure
from .order import row_nanmedians
from .stamps import stamps as _stack

__all__ = ["ring_levels"]


def ring_levels(
    exposure: Exposure, ix, iy, half: int, width: int, unusable: Sequence[str]
) -> np.ndarray:
    """Median of the usable pixels in the square ring of ``width`` px around each
    (2 half + 1)^2 stamp centred on array pixels (ix, iy): a local sky (robust to the
    stars in it). NaN where the ring has no usable pixel.

    Pixels with a mask plane in ``unusable`` and non-finite ones count as unusable
    (`core.order.row_nanmedians`)."""
    outer = half + width
    offsets = np.abs(np.arange(-outer, outer + 1))
    ring = (np.maximum(offsets[:, None], offsets[None, :]) > half).ravel()
    n = np.size(ix)
    if n == 0:
        return np.zeros(0)
    values = _stack(exposure.image, ix, iy, outer, fill=np.nan).reshape(n, -1)[:, ring]
    bits = exposure.bitmask(unusable)
    if bits:
        masked = (_stack(exposure.mask, ix, iy, outer, fill=0).reshape(n, -1)[:, ring] & bits) != 0
        values[masked] = np.nan
    values[np.isinf(values)] = np.nan
    return row_nanmedians(values, consume=True)
