"""Detections that a brighter source's PSF explains: its rings, wings and side lobes.

A decorrelated difference's PSF rings below zero (JWST's: -9% of its peak at 1.6
FWHM, then +6%), and through the matched filter every point source's S/N map
carries that ring: a source of S/N 1000 makes peaks of S/N -80 and +60 around it,
detections of either sign that are no source. The difference's PSF is known, so
the S/N a source of fitted flux F at offset d puts on a pixel is F times the PSF
correlated with the detection filter, at d, over the noise. Detections are tested
from the most significant down: one whose S/N, less what the brighter detections
kept so far predict there, falls below the threshold (in units of the noise and of
the model's own error) is theirs, not a source.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import signal
from scipy.spatial import cKDTree

from .exposure import Exposure
from .forced import PsfStamps
from .psf import Psf
from .stamps import batches

__all__ = ["FilteredPsf", "close_pairs", "explained"]

#: Sources per batch of filtered PSF stamps (`FilteredPsf.values`): a stamp reaches twice
#: the PSF's crop, 141 x 141 px on JWST's difference, 160 kB each.
_RESPONSE_BATCH = 64


class FilteredPsf:
    """Response of the detection filter to a unit-flux point source, at sub-pixel positions.

    Parameters
    ----------
    psf : `core.psf.Psf`
        The profile of a point source in the searched image, normalised as the PSF fits
        that give the fluxes (unit sum before cropping).
    exposure : `Exposure`
        Gives the parent origin and the node grid of a varying PSF.
    kernel : `numpy.ndarray` (2k + 1, 2k + 1)
        The detection's matched filter (correlated with the image); ``[[1.0]]`` for a
        score, which is already filtered.
    half : int
        Half-width (px) of the drawn PSF: the response reaches ``half + k`` px.
    config : `ForcedPhotometryConfig` or None
        The PSF node grid.
    """

    def __init__(self, psf: Psf, exposure: Exposure, kernel: np.ndarray, half: int, config=None):
        self.stamps = PsfStamps(psf, exposure, half=half, config=config)
        self.kernel = np.asarray(kernel, dtype=np.float64)
        self.reach = self.stamps.half + self.kernel.shape[0] // 2

    def values(self, x, y, source: np.ndarray, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        """The filtered image of a unit-flux source at array position (x[k], y[k]) read at
        pixel (col, row), for every (source k, col, row); 0 beyond `reach`."""
        x0, y0 = self.stamps.xy0
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        out = np.zeros(source.size)
        reach, flipped = self.reach, self.kernel[::-1, ::-1]
        order = np.argsort(source, kind="stable")
        bounds = np.searchsorted(source[order], [p.start for p in batches(x.size, _RESPONSE_BATCH)])
        for part, first in zip(batches(x.size, _RESPONSE_BATCH), bounds.tolist(), strict=True):
            model, ix, iy = self.stamps.at(x[part] + x0, y[part] + y0)
            if flipped.shape != (1, 1):
                # correlation with the kernel = convolution with it flipped; "full" spans
                # every offset where the two overlap
                model = signal.fftconvolve(model, flipped[None], mode="full", axes=(1, 2))
            else:
                model = model * flipped[0, 0]
            last = int(np.searchsorted(source[order], part.stop))
            pick = order[first:last]
            k = source[pick] - part.start
            dy = row[pick] - iy[k] + reach
            dx = col[pick] - ix[k] + reach
            inside = (dy >= 0) & (dy <= 2 * reach) & (dx >= 0) & (dx <= 2 * reach)
            out[pick[inside]] = model[k[inside], dy[inside], dx[inside]]
        return out


def close_pairs(col: np.ndarray, row: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """(fainter, brighter) indices of the detections within ``reach`` px of each other
    (either axis), for detections sorted most significant first."""
    if col.size < 2:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    pairs = cKDTree(np.column_stack([col, row])).query_pairs(reach, p=np.inf, output_type="ndarray")
    if pairs.size == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    return pairs.max(axis=1), pairs.min(axis=1)


def explained(
    snr: np.ndarray,
    observed: np.ndarray,
    fainter: np.ndarray,
    brighter: np.ndarray,
    predicted: np.ndarray,
    threshold: float,
    model_error: float,
) -> np.ndarray:
    """Which detections the PSF of brighter ones explains.

    Parameters
    ----------
    snr : `numpy.ndarray` (n,)
        Signed S/N at the peaks, most significant first.
    observed : `numpy.ndarray` (n,)
        The filtered image at the peaks (the S/N's numerator; read where a detection
        is ``fainter``).
    fainter, brighter : `numpy.ndarray` (m,), int
        `close_pairs`.
    predicted : `numpy.ndarray` (m,)
        What the brighter detection of each pair puts in the filtered image at the
        fainter's peak (its fitted flux times `FilteredPsf.values`; NaN: nothing).
    threshold : float
        Detection threshold (S/N).
    model_error : float
        Fractional error of the predicted S/N, added in quadrature to the unit noise.

    Returns
    -------
    `numpy.ndarray` (n,), bool
        True where the detection's S/N, less the prediction of the brighter
        detections that are themselves kept, is below ``threshold`` times
        sqrt(1 + (model_error x prediction)^2).
    """
    out = np.zeros(snr.size, dtype=bool)
    if fainter.size == 0:
        return out
    # each pair's prediction in S/N: its share of the observed numerator
    with np.errstate(divide="ignore", invalid="ignore"):
        share = snr[fainter] * predicted / observed[fainter]
    share = np.where(np.isfinite(share), share, 0.0)
    order = np.lexsort((brighter, fainter))
    fainter, brighter, share = fainter[order], brighter[order], share[order]
    starts = np.flatnonzero(np.r_[True, fainter[1:] != fainter[:-1]])
    ends = np.r_[starts[1:], fainter.size]
    sign = np.sign(snr)
    # most significant first: a detection found to be a side lobe predicts nothing itself
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        i = int(fainter[a])
        expected = float(share[a:b][~out[brighter[a:b]]].sum())
        left = sign[i] * (snr[i] - expected)
        out[i] = left < threshold * math.sqrt(1.0 + (model_error * expected) ** 2)
    return out
