"""Where to draw a varying PSF so that bilinear blends between the draws stay true to it.

Photometry draws a varying PSF on a grid of nodes and blends the four nodes around each
source (a draw costs up to milliseconds); products store a varying model as such a grid.
A blend of a narrow profile with a broad one is broader than the PSF between them: on a
field whose FWHM doubles from centre to corner, nodes 512 px apart made PSF fluxes 3.4%
high, a 3 x 3 grid in a product 12%. The grid is refined until the blend at every
cell's centre, where four nodes mix, fits a source of the PSF there within a tolerance.
"""

from __future__ import annotations

import numpy as np

from .psf import Psf

__all__ = ["blend_flux_bias", "is_constant", "memo", "refined_nodes"]


def blend_flux_bias(draw, x0: float, x1: float, y0: float, y1: float) -> float:
    """Fractional PSF-flux error at the centre of the cell (x0..x1, y0..y1) when the
    profile fitted is the even blend of the cell's four corner stamps: the fitted flux
    of a source of the true profile t with profile b (sky-limited) is sum(b t) / sum(b b).
    ``draw(x, y)`` gives the PSF's stamp at a position (``psf.kernel_image``)."""
    corners = [draw(x, y) for y in (y0, y1) for x in (x0, x1)]
    truth = draw(0.5 * (x0 + x1), 0.5 * (y0 + y1))
    size = max(stamp.shape[0] for stamp in [*corners, truth])
    blend = np.sum([_padded(stamp, size) for stamp in corners], axis=0)
    blend = blend / blend.sum()
    truth = _padded(truth, size)
    return float(np.sum(blend * truth) / np.sum(blend * blend) - 1.0)


def refined_nodes(
    psf: Psf, bbox, count_x: int, count_y: int, most: int, tolerance: float, draw=None
) -> tuple[np.ndarray, np.ndarray]:
    """Node positions (x, y) over ``bbox`` (min_x, min_y, max_x, max_y): ``count_x`` x
    ``count_y`` evenly spaced, each axis's count doubled (n -> 2n - 1, the old nodes
    kept) while some cell's `blend_flux_bias` exceeds ``tolerance``, up to ``most``.
    A PSF that does not vary keeps the first grid, drawn at its centre and corners only.
    ``draw(x, y)`` gives a stamp, remembered by position (default: `memo` of
    ``psf.kernel_image``): the caller's own memo keeps the stamps for its use.
    """
    draw = draw or memo(psf.kernel_image)
    min_x, min_y, max_x, max_y = bbox
    while True:
        xs = np.linspace(min_x, max_x, count_x)
        ys = np.linspace(min_y, max_y, count_y)
        if count_x >= most and count_y >= most:
            return xs, ys
        if is_constant(draw, xs, ys):
            return xs, ys
        cells = (
            (xs[i], xs[i + 1], ys[j], ys[j + 1])
            for j in range(count_y - 1)
            for i in range(count_x - 1)
        )
        if all(abs(blend_flux_bias(draw, *cell)) <= tolerance for cell in cells):
            return xs, ys
        count_x = min(most, 2 * count_x - 1) if count_x > 1 else 1
        count_y = min(most, 2 * count_y - 1) if count_y > 1 else 1


def is_constant(draw, xs: np.ndarray, ys: np.ndarray) -> bool:
    """True when the stamps ``draw`` gives at the grid's corners equal its centre's."""
    centre = draw(xs[len(xs) // 2], ys[len(ys) // 2])
    corners = [draw(x, y) for x in (xs[0], xs[-1]) for y in (ys[0], ys[-1])]
    return all(
        stamp.shape == centre.shape and np.allclose(stamp, centre, rtol=0, atol=1e-7)
        for stamp in corners
    )


def memo(draw):
    """``draw`` remembering its stamps by position: a refined grid keeps the old nodes."""
    stamps: dict[tuple[float, float], np.ndarray] = {}

    def drawn(x: float, y: float) -> np.ndarray:
        key = (float(x), float(y))
        if key not in stamps:
            stamps[key] = np.asarray(draw(key[0], key[1]), dtype=np.float64)
        return stamps[key]

    return drawn


def _padded(stamp: np.ndarray, size: int) -> np.ndarray:
    pad = (size - stamp.shape[0]) // 2
    return np.pad(stamp, pad) if pad else stamp
