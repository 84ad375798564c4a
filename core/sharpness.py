"""Sources narrower than the PSF: cosmic rays and hot pixels left in a difference.

A point source's pixels are the PSF's: its pixel nearest the centre can exceed the mean
of a pair of opposite neighbours at most by the PSF's own contrast in that direction
(the largest over the sub-pixel positions of the source). A cosmic ray deposits its
charge in one pixel or a short track, with dark neighbours across it. So (the third
condition of SDSS photo's and Rubin's cosmic-ray finder) a source is sharp when that
pixel exceeds the contrast bound on the mean of its two neighbours along a row, a column
or a diagonal, or on the mean of all eight, by more than the noise allows. The bound
comes from the PSF, the margin from the variance plane; nothing depends on the sampling.
The former test, a brightest pixel twice the fitted PSF's, told them apart at FWHM
4.8 px but not under 2.5 px, where one pixel holds a third of a point source's light.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SHARP_SIGMA",
    "SHARP_SIGMA_ASIDE",
    "SHARP_PIXEL_SIGMA",
    "SHARP_TOLERANCE",
    "contrast_bounds",
    "sharper_than_psf",
]

#: The centre pixel's excess over the PSF's bound, in sigma of the difference's noise:
#: five tests a source, each passed by noise alone at 2.3e-4 for a point source at the
#: bound's worst sub-pixel position: ~0.1% of point sources (at 3 sigma, 0.3-0.5% were
#: flagged at FWHM 2-4 px, a few a frame of hundreds).
SHARP_SIGMA = 3.5
#: The same for the brightest central pixel beside the centre, the largest of up to
#: eight noisy values (a broad PSF's are near equal): 40 tests at 3.2e-5.
SHARP_SIGMA_ASIDE = 4.0
#: ... with the pixel itself this many sigma above nothing: a ray is a detection in its
#: pixel, where a noise pixel passes 3.5 sigma over the bound on 0.1-0.15% of empty
#: forced positions.
SHARP_PIXEL_SIGMA = 5.0
#: ... and the centre at least this times the bound: a PSF model somewhat broader than
#: the stars (a 10% wider Gaussian at FWHM 2 px lowers the bound by 20%) does not flag
#: bright point sources, whose noise margin is small beside their light.
SHARP_TOLERANCE = 1.5

#: The tests' neighbours (row, column offsets): a row, a column, the two diagonals, the ring.
_TESTS = (
    ((0, -1), (0, 1)),
    ((-1, 0), (1, 0)),
    ((-1, -1), (1, 1)),
    ((-1, 1), (1, -1)),
    tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx),
)
#: Source positions (px from the pixel, each axis) over which a PSF's contrasts are
#: maximised: on eighths of a pixel, the largest between them (a tilted elliptical
#: PSF's diagonals, where quarters missed 9%) is within 3% of theirs.
_OFFSETS = np.linspace(-1.0, 1.0, 17)


def _bounds_of(stack: np.ndarray) -> np.ndarray:
    """The largest contrast (centre over neighbours' mean) of each test over the shifts
    of a PSF stamp that keep the centre pixel the nearest or the brightest of its 3 x 3
    (a tilted elliptical PSF's brightest pixel can lie beyond the half pixel); infinite
    where the neighbours can sum to nothing. ``stack``: (m, size, size) stamps, bounds
    (m, tests), done together: a PSF's nodes share the phases and two matrix products
    each replace an einsum (the 25 nodes of a 2048 px frame's PSF: 11.5 -> 2.2 ms;
    bounds equal to 1e-15)."""
    stack = np.asarray(stack, dtype=np.float64)
    m, size = stack.shape[0], stack.shape[1]
    c, n = size // 2, _OFFSETS.size
    # only the central 3 x 3 of each shifted stamp: its inverse transform's three rows
    # and columns (f (m - shift) the phase of output pixel m), not whole transforms;
    # the rows' product with the spectrum depends on the row shift alone, so it is made
    # once per row shift and paired with every column shift in one product
    freq = np.fft.fftfreq(size)
    pixels = np.arange(c - 1, c + 2)
    phases = np.exp(2j * np.pi * freq * (pixels[None, :, None] - _OFFSETS[:, None, None]))
    flat = phases.reshape(3 * n, size)
    # (row shift, row) x (column shift, column) of every stamp: one matrix product each
    products = (flat @ np.fft.fft2(stack)) @ flat.T
    core = products.real.reshape(m, n, 3, n, 3).transpose(0, 1, 3, 2, 4) / size**2
    core = core.reshape(m, n * n, 3, 3)
    dy, dx = (a.ravel() for a in np.meshgrid(_OFFSETS, _OFFSETS, indexing="ij"))
    nearest = (np.abs(dy) <= 0.5) & (np.abs(dx) <= 0.5)
    kept = nearest | (core.reshape(m, n * n, 9).argmax(axis=2) == 4)
    bounds = np.empty((m, len(_TESTS)))
    for t, offsets in enumerate(_TESTS):
        mean = np.mean([core[:, :, 1 + oy, 1 + ox] for oy, ox in offsets], axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrast = np.where(mean > 0, core[:, :, 1, 1] / mean, np.inf)
        bounds[:, t] = np.where(kept, contrast, -np.inf).max(axis=1)
    return bounds


def contrast_bounds(stamps, x, y) -> np.ndarray:
    """(n, 5) contrast bounds of `_TESTS` at parent positions (x, y) of a
    `core.forced.PsfStamps`: the largest of the four PSF nodes around each (the bounds
    of a node are computed once, those of the nodes first needed together)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if stamps.constant:
        last_j, last_i = stamps.nodes_y.size - 1, stamps.nodes_x.size - 1
        key = (last_j // 2, last_i // 2)
        _fill_nodes(stamps, [key])
        return np.broadcast_to(stamps.contrasts[key], (x.size, len(_TESTS)))
    i = np.clip(np.searchsorted(stamps.nodes_x, x) - 1, 0, stamps.nodes_x.size - 2)
    j = np.clip(np.searchsorted(stamps.nodes_y, y) - 1, 0, stamps.nodes_y.size - 2)
    keys = sorted(
        {
            (int(b + dj), int(a + di))
            for b, a in zip(j, i, strict=True)
            for dj in (0, 1)
            for di in (0, 1)
        }
    )
    _fill_nodes(stamps, keys)
    grid = np.full((stamps.nodes_y.size, stamps.nodes_x.size, len(_TESTS)), np.nan)
    for key in keys:
        grid[key] = stamps.contrasts[key]
    return np.max([grid[j + dj, i + di] for dj in (0, 1) for di in (0, 1)], axis=0)


def _fill_nodes(stamps, keys) -> None:
    """The contrast bounds of the nodes ``keys`` ((row, column) of the grid) not yet in
    ``stamps.contrasts``, in one `_bounds_of` call per stamp size."""
    by_shape: dict[tuple[int, ...], list] = {}
    for j, i in keys:
        if (j, i) in stamps.contrasts:
            continue
        kernel = stamps.psf.kernel_image(float(stamps.nodes_x[i]), float(stamps.nodes_y[j]))
        # cropped as the fit's stamps are drawn: the far wings move no core pixel
        c, h = kernel.shape[0] // 2, min(kernel.shape[0] // 2, stamps.half + 4)
        core = np.asarray(kernel[c - h : c + h + 1, c - h : c + h + 1], dtype=np.float64)
        by_shape.setdefault(core.shape, []).append(((j, i), core))
    for group in by_shape.values():
        bounds = _bounds_of(np.stack([core for _, core in group]))
        for (key, _), values in zip(group, bounds, strict=True):
            stamps.contrasts[key] = values


def sharper_than_psf(data, var, good, bounds, flux) -> np.ndarray:
    """Stamps (n, k, k; sky off, unusable pixels False in ``good``, centred on the pixel
    nearest each source) whose centre pixel, or the brightest of the central 3 x 3 (a
    track across a pixel corner centres on a dark pixel between two), in the sign of
    the fitted ``flux``, beats a point source's ``bounds`` (`contrast_bounds`) in any
    test; tests on unusable pixels are skipped."""
    n, k, _ = data.shape
    h = k // 2
    if n == 0 or h < 2:
        return np.zeros(n, dtype=bool)
    signed = np.where(flux < 0, -1.0, 1.0)[:, None, None] * data
    core = np.s_[:, h - 1 : h + 2, h - 1 : h + 2]
    brightest = np.where(good[core], signed[core], -np.inf).reshape(n, 9).argmax(axis=1)
    aside = brightest != 4
    sharp = _beats(signed, var, good, bounds, np.full(n, h), np.full(n, h), SHARP_SIGMA)
    py, px = h - 1 + brightest // 3, h - 1 + brightest % 3
    sharp |= aside & _beats(signed, var, good, bounds, py, px, SHARP_SIGMA_ASIDE)
    return sharp & np.isfinite(flux)


def _beats(signed, var, good, bounds, py, px, sigmas: float) -> np.ndarray:
    """Pixels (py, px) of each stamp at `SHARP_PIXEL_SIGMA` above the bound of any test
    by ``sigmas`` and `SHARP_TOLERANCE`."""
    n = signed.shape[0]
    at = np.arange(n)
    centre = signed[at, py, px]
    sharp = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", over="ignore"):
        detected = centre > SHARP_PIXEL_SIGMA * np.sqrt(var[at, py, px])
        for t, offsets in enumerate(_TESTS):
            rows = py[:, None] + np.array([oy for oy, _ in offsets])
            cols = px[:, None] + np.array([ox for _, ox in offsets])
            mean = signed[at[:, None], rows, cols].mean(axis=1)
            usable = good[at, py, px] & good[at[:, None], rows, cols].all(axis=1)
            bound = bounds[:, t]
            spread = var[at[:, None], rows, cols].sum(axis=1) / len(offsets) ** 2
            noise = np.sqrt(var[at, py, px] + bound**2 * spread)
            sharp |= (
                detected
                & usable
                & np.isfinite(bound)
                & (centre - bound * mean > sigmas * noise)
                & (centre > SHARP_TOLERANCE * bound * mean)
            )
    return sharp
