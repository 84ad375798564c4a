"""Flags of positions that need more than the image measured: near a bright star of
the matched template or within reach of a saturated one's light, measured on its
unsaturated wings (their residuals fake sources there), outside the hull of the kernel
sources (the matching kernel is extrapolated there). The DIA catalog and forced
photometry at given positions raise them alike (`core.forced.FLAG_BITS`; the rules:
docs/DIA_FLAGS.md)."""

from __future__ import annotations

import math

import numpy as np
from scipy import signal, sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import ConvexHull, QhullError, cKDTree

from .config import DiaSourceConfig
from .exposure import Exposure
from .order import row_medians, row_nanmedians
from .psf import Psf
from .rings import ring_levels
from .stamps import batches, centred_reach
from .stamps import stamps as _stack

__all__ = [
    "EXTRAPOLATED_ORDER",
    "bright_star_light",
    "bright_star_limit",
    "changed_star",
    "outside_kernel_hull",
    "KERNEL_REACH",
    "bright_star",
    "halo_reach",
    "residual_snr",
    "response_profile",
    "saturated_residual",
    "saturated_stars",
    "saturated_stars_reach",
    "saturated_search",
]

#: Mask planes of the matched template's saturated pixels (the template's own, renamed).
_SATURATED_PLANES = ("SAT", "SAT_TEMPLATE")

#: Meta key of a kernel-source table (`core.subtract`, kept in kernel.fits): the highest
#: spatial order of what was fitted on those sources alone and applied to the whole
#: frame (0: a constant kernel and background, nothing to extrapolate beyond them).
EXTRAPOLATED_ORDER = "extrapolated_order"
#: Meta key of a kernel-source table (`core.subtract`, kept in kernel.fits): the reach (px)
#: of the matching kernel applied, as far as a star's residual reaches beyond its PSF
#: (`halo_reach`; `core.kernel.SpatialKernel.reach`).
KERNEL_REACH = "kernel_reach"


def changed_star(flux, light, saturated, fraction: float, sign=None) -> np.ndarray:
    """Sources on a bright star (`bright_star_light`) that are a change of the star, not
    its residual: the flux in the source's ``sign`` (+-1 per position, the detection's;
    0 or None: the flux's own) reaches ``fraction`` of the template's ``light`` on the
    disc (a variable star), and no pixel near is ``saturated`` (a clipped core leaves a
    residual of any size). A fit of the other sign is not the source's change: it read
    a neighbour's light (a +5 sigma crescent of kernel residual 3.5 px from a faded
    star fitted -86000 counts, S/N -404). All False when ``fraction`` is 0."""
    flux = np.asarray(flux, dtype=np.float64)
    signed = np.abs(flux)
    if sign is not None:
        sign = np.sign(np.asarray(sign, dtype=np.float64))
        signed = np.where(sign == 0, signed, flux * sign)
    with np.errstate(invalid="ignore"):
        change = signed >= fraction * light
    return change & ~np.asarray(saturated, dtype=bool) & (fraction > 0)


def bright_star_limit(flux_err, threshold: float, residual: float) -> np.ndarray:
    """The light (flux units) from which a star is bright at each position: its
    ``residual`` (a fraction of its light) reaches ``threshold`` times the position's
    point-source flux error ``flux_err`` (a source at the detection threshold); where
    that error is unknown (a fit off the frame), the median of the known ones."""
    noise = np.array(flux_err, dtype=np.float64, ndmin=1)
    unknown = ~np.isfinite(noise)
    if unknown.any() and not unknown.all():
        noise[unknown] = np.median(noise[~unknown])
    return threshold * noise / residual


def bright_star_light(
    template: Exposure | None,
    ix,
    iy,
    radius: float,
    limit,
    saturated_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Where a star at least ``limit`` bright has light near, and the light under each
    position.

    Parameters
    ----------
    template : `Exposure` or None
        The matched template, with the PSF of a star in it (`Exposure.psf`).
    ix, iy : `numpy.ndarray` (n,), int
        Array column and row of the positions.
    radius : float
        Radius (px) of the disc searched around each position.
    limit : float or `numpy.ndarray` (n,)
        Light (the template's units) from which a star is bright, per position.
    saturated_limit : float or None
        The same for a saturated core (``SAT`` or ``SAT_TEMPLATE``), whose clipped
        peak understates its light and whose residual is of any size: a limit at the
        frame's typical noise, not at positions beside it, whose noise the star's own
        inflates (default ``limit``).

    Returns
    -------
    bright : `numpy.ndarray` (n,), bool
        A star's core (a local maximum of the template) on the disc exceeds the level
        around it by more than ``limit`` times the PSF's peak, the most of a star's
        light one pixel holds (a saturated core ``saturated_limit`` times): a star of
        at least that light sits there.
    light : `numpy.ndarray` (n,), float64
        The template's light under the position (its excess within a third of
        ``radius``, over the PSF's fraction there) where a star's core (a local
        maximum of the template) lies within it, off its rim, and at least the light of
        the brightest star whose core is on the disc (by its peak): a change of a star
        beside a brighter one must also be more than that one's residual could be
        (`changed_star`), whatever a noise bump on its wing makes of the core; NaN
        elsewhere.
    """
    if template is None or ix.size == 0 or radius <= 0:
        return np.zeros(ix.size, dtype=bool), np.zeros(ix.size)
    # a star's light, not its pixels' S/N: smoothing the matched template (the more in
    # preconvolve mode, where it matches P * S) lowers its pixel noise more than a
    # star's peak, and a per-pixel S/N limit was passed by stars 3x fainter there (on
    # the SAAO frames 44-58% of injected sources flagged, 5-8% in auto mode). The light
    # a star's peak implies (over the PSF's peak, both smoothed alike), and the residual
    # it can leave, do not depend on the smoothing.
    peak, fraction = _psf_peak_and_core(template, ix, iy, radius / 3.0)
    least = np.broadcast_to(np.asarray(limit, dtype=np.float64), ix.shape) * peak
    at_saturated = least
    if saturated_limit is not None:
        at_saturated = np.minimum(least, saturated_limit * peak)
    # in batches that stay in the caches (`core.stamps.STAMP_BATCH`)
    done = [
        _bright_part(template, ix[p], iy[p], radius, (least[p], at_saturated[p]), fraction[p])
        for p in batches(ix.size)
    ]
    bright, light, top = (np.concatenate([d[k] for d in done]) for k in range(3))
    with np.errstate(invalid="ignore"):
        # NaN stays NaN: no star's core under the position
        light = np.where(np.isnan(light), light, np.fmax(light, top / peak))
    return bright, light


#: Cells per axis in each of which the bright-star flags take the PSF as constant (a PSF
#: varies smoothly, and its peak sets a flag's limit, not a measurement).
_PSF_CELLS = 4


def _psf_peak_and_core(template: Exposure, ix, iy, core: float) -> tuple:
    """(n,) peak (largest pixel) of the template's unit-sum PSF and its fraction within
    ``core`` px of the centre, at array positions (ix, iy): from the PSF's image at the
    centre of the position's cell (`_cell_models`)."""
    peak, fraction = np.empty(np.size(ix)), np.empty(np.size(ix))
    for at, stamp in _cell_models(template, ix, iy):
        h, w = stamp.shape[0] // 2, stamp.shape[1] // 2
        squared = np.arange(-h, h + 1)[:, None] ** 2 + np.arange(-w, w + 1)[None, :] ** 2
        peak[at] = stamp.max()
        fraction[at] = stamp[squared <= core * core].sum()
    return peak, fraction


def _local_maxima(stack: np.ndarray) -> np.ndarray:
    """Pixels of each stamp inside its one-pixel border that are >= their 8 neighbours:
    ``scipy.ndimage.maximum_filter`` (3 x 3 in each stamp) of the inner pixels, as a
    maximum of nine shifted views (no padding, no per-pixel window; 2-3x faster)."""
    n, ny, nx = stack.shape
    inner = stack[:, 1 : ny - 1, 1 : nx - 1]
    top = inner.copy()
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                np.maximum(top, stack[:, dy : ny - 2 + dy, dx : nx - 2 + dx], out=top)
    return inner >= top


def _bright_part(template: Exposure, ix, iy, radius: float, least: tuple, fraction) -> tuple:
    """`bright_star_light` of one batch of positions (and the excess of the brightest star
    core on each disc, NaN without one): ``least``, the excess of a bright star's core
    and of a bright saturated one; ``fraction``, the PSF's light within a third of
    ``radius``."""
    r = int(math.ceil(radius))
    offsets = np.arange(-r, r + 1)
    squared = (offsets[:, None] ** 2 + offsets[None, :] ** 2).ravel()
    disc = squared <= radius * radius
    # a pixel wider, for the local maxima: stars' cores (off the frame: none)
    stack = _stack(template.image, ix, iy, r + 1, fill=np.nan)
    wider = stack.astype(np.float64)
    # the maxima in the image's own precision: the cast to float64 keeps every order
    known = np.where(np.isfinite(stack), stack, -np.inf)
    cores = _local_maxima(known).reshape(ix.size, -1)[:, disc]
    data = wider[:, 1:-1, 1:-1].reshape(ix.size, -1)
    # the level from the pixels around the disc, the excess on the disc's pixels only
    outside = data[:, ~disc]
    level = _ring_medians(outside)
    holes = ~np.isfinite(level)
    if holes.any():  # stamps over the frame's edge: the NaN-aware median (NaN off it)
        level[holes] = row_nanmedians(outside[holes], consume=True)
    excess = data[:, disc] - level[:, None]
    # the light under the source itself (within a third of the radius: a PSF FWHM at
    # the default), not its neighbours' in a crowded field; NaN unless a star's core
    # lies inside it, off its rim (the source is on a star, not on the wings, rings or
    # spikes of one beside it, whose residuals are any fraction of their light there).
    # Not the brightest pixel there: a brighter neighbour's wing outshone the SAAO
    # microlensing star's own core 1.2 FWHM from it in 7 px seeing
    core = radius / 3.0
    r2 = squared[disc]
    finite = np.isfinite(excess)
    under = finite & (r2 <= core * core)
    with np.errstate(invalid="ignore", divide="ignore"):
        light = np.where(under, excess, 0.0).sum(axis=1) / fraction
    own = cores & under & (r2 <= max(core - 1.0, 0.0) ** 2)
    light[~own.any(axis=1)] = np.nan
    with np.errstate(invalid="ignore"):
        top = np.where(cores & finite, excess, -np.inf).max(axis=1, initial=-np.inf)
    top[~np.isfinite(top)] = np.nan
    # a star's core on the disc, not any pixel: the wing of a star beyond it holds more
    # of its peak the wider the PSF, and judged by its light there it flagged 2x the
    # positions on a score of the poor-seeing SAAO frames. A saturated core by its own
    # limit: always bright was no answer, the mask marking every peak the kernel (the
    # wider on a score) spread the clipped pixels to (1.5-3x the SAAO positions there)
    with np.errstate(invalid="ignore"):
        star = cores & (excess > least[0][:, None])
        bright = np.any(star, axis=1)
        # a clipped core's own limit decides only cores below the ordinary one, of
        # positions not bright already: only their mask stamps are read
        lower = cores & ~star & (excess > least[1][:, None])
    bits = template.bitmask(_SATURATED_PLANES)
    need = np.flatnonzero(lower.any(axis=1) & ~bright) if bits else np.zeros(0, dtype=int)
    if need.size:
        mask = _stack(template.mask, ix[need], iy[need], r, fill=0).reshape(need.size, -1)
        clipped = (mask[:, disc] & np.int32(bits)) != 0
        bright[need] = np.any(lower[need] & clipped, axis=1)
    return bright, light, top


def _ring_medians(values: np.ndarray) -> np.ndarray:
    """``np.median(values, axis=1)``: `row_medians` (a sort, ~3x faster than numpy's
    selection of two ranks) of the rows of finite values, numpy's of the others."""
    finite = np.isfinite(values).all(axis=1)
    if finite.all():
        return row_medians(values)
    level = np.empty(values.shape[0], dtype=values.dtype)
    level[finite] = row_medians(values[finite])
    level[~finite] = np.median(values[~finite], axis=1)
    return level


#: Fraction of a point source's S/N-map peak below which its profile is cropped
#: (`response_profile`): a star's light there reaches a 5 sigma threshold only from an
#: S/N of 5 million.
_RESPONSE_FLOOR = 1e-6
#: Planes of a matched template's pixels that its saturated stars' wing fits leave out:
#: clipped (or spread from clipped ones by the matching kernel) and no data.
_WING_UNUSABLE = (*_SATURATED_PLANES, "NO_DATA", "EDGE", "BAD", "CR")
#: Least share of a saturated star's PSF on usable pixels for a wing fit of its light.
_WING_MIN_SHARE = 0.01


def response_profile(psf: Psf, filtered: bool = False) -> np.ndarray:
    """A point source's profile in the detection S/N map, 1 at its centre, cropped where it
    stays below `_RESPONSE_FLOOR` of that: ``psf`` (at its average position) correlated
    with itself, a difference's matched filter, or ``psf`` itself when ``filtered`` (a
    preconvolution score, already filtered). Odd square, float64."""
    stamp = np.asarray(psf.kernel_image(*(psf.average_position or (None, None))), np.float64)
    if not filtered:
        stamp = signal.fftconvolve(stamp, stamp[::-1, ::-1], mode="full")
    cy, cx = stamp.shape[0] // 2, stamp.shape[1] // 2
    peak = stamp[cy, cx] if stamp[cy, cx] > 0 else np.abs(stamp).max()
    stamp = stamp / peak
    half = min(centred_reach(stamp, _RESPONSE_FLOOR), cy, cx)
    return stamp[cy - half : cy + half + 1, cx - half : cx + half + 1]


def saturated_stars(
    difference: Exposure, template: Exposure | None, ix, iy, reach: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The saturated stars within ``reach`` px (either axis) of positions: centres and light.

    A saturated star is a group of 8-connected ``SAT`` / ``SAT_TEMPLATE`` pixels of the
    difference (either image's clipped core and bleed trail, spread by the kernel); its
    centre is the matched template's brightest pixel among them and its light a PSF fit
    of the matched template's usable pixels around them (`_wing_light`): its unsaturated
    wings, where the clipped peak understates it by the factor the star saturated by.

    Parameters
    ----------
    difference : `Exposure`
        The difference or score, whose mask holds both images' saturated pixels.
    template : `Exposure` or None
        The matched template (on the difference's grid, with the PSF of a star in it).
    ix, iy : `numpy.ndarray` (n,), int
        Array column and row of the positions.
    reach : int
        Half-width (px) of the square searched around each position.

    Returns
    -------
    rows, cols : `numpy.ndarray` (m,), int
        Array row and column of each star's centre.
    light : `numpy.ndarray` (m,), float64
        Its light (the template's units).
    """
    ix, iy = np.asarray(ix, dtype=np.intp), np.asarray(iy, dtype=np.intp)
    none = np.zeros(0, dtype=np.intp)
    bits = difference.bitmask([p for p in _SATURATED_PLANES if p in difference.mask_planes])
    if template is None or ix.size == 0 or not bits:
        return none, none, np.zeros(0)
    nx = difference.shape[1]
    found = []
    for part in batches(ix.size):
        stack = _stack(difference.mask, ix[part], iy[part], reach, fill=0)
        # the stamps holding one first (an OR of each: 1128 sources of the 4096 test pair
        # in 65 x 65 stamps, 6 ms; locating the pixels in all of them took 28 ms)
        either = np.bitwise_or.reduce(stack.reshape(stack.shape[0], -1), axis=1)
        hit = np.flatnonzero(either & bits)
        if hit.size:
            k, dy, dx = np.nonzero(stack[hit] & np.int32(bits))
            rows, cols = iy[part][hit[k]] + dy - reach, ix[part][hit[k]] + dx - reach
            found.append(rows.astype(np.int64) * nx + cols)
    if not found:
        return none, none, np.zeros(0)
    rows, cols = np.divmod(np.unique(np.concatenate(found)), nx)
    rows, cols = _saturated_cores(template, rows, cols)
    return rows, cols, _wing_light(template, rows, cols)


def residual_snr(
    stars: tuple[np.ndarray, np.ndarray, np.ndarray],
    ix,
    iy,
    flux_err,
    profile: np.ndarray,
    residual: float,
    halo: float = 0.0,
    halo_reach: float = 0.0,
) -> np.ndarray:
    """The largest S/N the residual of stars can reach at each position: a star of light
    F (``stars``: rows, cols, light, as `saturated_stars` gives them) leaves up to
    ``residual`` of its light at the offset through the detection's filter (F times
    ``profile``, a point source's `response_profile`) and up to ``halo`` of F anywhere
    within ``halo_reach`` px of its centre (the matching kernel's errors, spread that
    far), over the position's point-source flux error ``flux_err``; 0 out of reach."""
    ix, iy = np.asarray(ix, dtype=np.intp), np.asarray(iy, dtype=np.intp)
    out = np.zeros(ix.size)
    rows, cols, light = (np.asarray(v) for v in stars)
    if rows.size == 0 or ix.size == 0:
        return out
    reach = profile.shape[0] // 2
    near = cKDTree(np.column_stack([cols, rows])).query_ball_point(
        np.column_stack([ix, iy]), max(reach, halo_reach), p=np.inf, return_sorted=False
    )
    source = np.repeat(np.arange(ix.size), [len(s) for s in near])
    if source.size == 0:
        return out
    star = np.concatenate([np.asarray(s, dtype=np.intp) for s in near])
    dy, dx = iy[source] - rows[star], ix[source] - cols[star]
    inside = (np.abs(dy) <= reach) & (np.abs(dx) <= reach)
    share = np.zeros(source.size)
    share[inside] = residual * profile[dy[inside] + reach, dx[inside] + reach]
    in_halo = np.hypot(dx, dy) <= halo_reach
    share[in_halo] = np.maximum(share[in_halo], halo)
    error = np.asarray(flux_err, dtype=np.float64)[source]
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = light[star] * share / error
    np.maximum.at(out, source, np.where(np.isfinite(snr), snr, 0.0))
    return out


def halo_reach(kernel_sources, fwhm: float) -> float:
    """Distance (px) from a saturated star's centre within which its residual can hold
    ``saturated_star_halo`` of its light: the matching kernel's reach (meta
    `KERNEL_REACH` of the kernel sources, set by the subtraction) plus the PSF's ``fwhm``
    (on simulated pairs, the false detections around stars 3-30x over saturation that
    their own light does not bound lay 5-10 px from them, under a kernel reaching 9-10
    px at FWHM 2); 0 where that is not known."""
    reach = None if kernel_sources is None else kernel_sources.meta.get(KERNEL_REACH)
    return 0.0 if reach is None else float(reach) + fwhm


def saturated_stars_reach(profile: np.ndarray, reach: float) -> int:
    """Half-width (px) of the square `saturated_stars` searches: the profile's and the
    halo's reach, the more."""
    return int(max(profile.shape[0] // 2, math.ceil(reach)))


def _saturated_rules_on(config: DiaSourceConfig) -> bool:
    return config.saturated_star_residual > 0 or config.saturated_star_halo > 0


def saturated_search(
    psf: Psf,
    kernel_sources,
    fwhm: float,
    matched_template: Exposure | None,
    config: DiaSourceConfig,
    filtered: bool = False,
) -> tuple[np.ndarray, float, int, Exposure | None]:
    """What the catalog and forced photometry search saturated stars with: the
    `response_profile` of ``psf`` (``filtered``: a score's), the halo's reach
    (`halo_reach`), the half-width `saturated_stars` searches (`saturated_stars_reach`)
    and the template it reads, None when ``config`` rules nothing on saturated stars
    (none are looked for)."""
    profile = response_profile(psf, filtered=filtered)
    reach = halo_reach(kernel_sources, fwhm)
    template = matched_template if _saturated_rules_on(config) else None
    return profile, reach, saturated_stars_reach(profile, reach), template


def bright_star(
    ix,
    iy,
    flux,
    flux_err,
    source_snr,
    saturated_pixels,
    bright: tuple[np.ndarray, np.ndarray],
    stars: tuple[np.ndarray, np.ndarray, np.ndarray],
    profile: np.ndarray,
    reach: float,
    config: DiaSourceConfig,
    sign=None,
) -> np.ndarray:
    """Positions flagged ``bright_star`` (the DIA catalog's and forced photometry's rule).

    Near a bright star's light (``bright``: `bright_star_light`) and no brighter than its
    residual can be (`changed_star`: a variable's own change is more), or where a
    saturated star's residual (`residual_snr`: ``config.saturated_star_residual`` of its
    light there, ``config.saturated_star_halo`` of it within ``reach``, `halo_reach`;
    ``stars``: `saturated_stars`) reaches the threshold in the position's noise and the
    source's ``source_snr`` is no more (`saturated_residual`).

    ``flux``, ``flux_err``: the positions' PSF fluxes and errors on the difference;
    ``saturated_pixels``: a saturated pixel near (the ``saturated`` flag); ``profile``:
    `response_profile` of the difference; ``sign``: the detections' (`changed_star`).
    """
    near, light = bright
    fraction = config.bright_star_residual_fraction
    near = near & ~changed_star(flux, light, saturated_pixels, fraction, sign)
    if _saturated_rules_on(config):
        bound = residual_snr(
            stars,
            ix,
            iy,
            flux_err,
            profile,
            config.saturated_star_residual,
            config.saturated_star_halo,
            reach,
        )
        near |= saturated_residual(bound, source_snr, config.threshold)
    return near


def saturated_residual(residual, source_snr, threshold: float) -> np.ndarray:
    """Positions whose source a saturated star's residual may be: the S/N that residual
    can reach there (``residual``, `residual_snr`) reaches ``threshold`` and the
    source's own S/N (``source_snr``, >= 0) is no more (NaN: not measured, flagged)."""
    residual = np.asarray(residual, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (residual >= threshold) & ~(np.asarray(source_snr) > residual)


def _saturated_cores(template: Exposure, rows: np.ndarray, cols: np.ndarray) -> tuple:
    """Centres (rows, columns) of the connected groups of the saturated pixels at (rows,
    cols): each group's brightest matched-template pixel, a clipped core spread by
    the kernel peaking in its middle; where several share the top value (a core clipped
    flat and its bleed trail, unconvolved), the middle of the row they fill most widely
    (the core: a trail is a column or two wide, whichever way it ran)."""
    # connected 2 x 2 blocks of them (pixels 8-connected are in the same or neighbouring
    # blocks; gaps of a pixel or two join too): a kernel-spread core holds hundreds of
    # pixels, 4x fewer blocks (154 stars of a 4096 pair: 24 -> 8 ms)
    span = int(cols.max()) // 2 + 1
    blocks, member = np.unique((rows // 2) * span + cols // 2, return_inverse=True)
    block_rows, block_cols = np.divmod(blocks, span)
    pairs = cKDTree(np.column_stack([block_rows, block_cols])).query_pairs(
        1.5, output_type="ndarray"
    )
    graph = sparse.coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(blocks.size, blocks.size)
    )
    count, block_group = connected_components(graph, directed=False)
    group = block_group[member.ravel()]
    values = np.asarray(template.image[rows, cols], dtype=np.float64)
    values[~np.isfinite(values)] = -np.inf
    top = np.full(count, -np.inf)
    np.maximum.at(top, group, values)
    tied = np.flatnonzero(values == top[group])
    # each group's tied pixels by row: the row holding most (the middle one of several)
    g, r = group[tied], rows[tied]
    keys, first, width = np.unique(
        g * (int(rows.max()) + 1) + r, return_index=True, return_counts=True
    )
    row_group = g[first]
    widest = np.zeros(count, dtype=np.int64)
    np.maximum.at(widest, row_group, width)
    best = np.flatnonzero(width == widest[row_group])  # keys sorted by group, then row
    starts = np.r_[0, np.flatnonzero(np.diff(row_group[best])) + 1]
    ends = np.r_[starts[1:], best.size]
    chosen = best[(starts + ends - 1) // 2]
    centre_rows = np.empty(count, dtype=np.intp)
    centre_rows[row_group[chosen]] = r[first[chosen]]
    # the mean column of the tied pixels on that row
    on_row = r == centre_rows[g]
    total = np.bincount(g[on_row], weights=cols[tied][on_row], minlength=count)
    number = np.bincount(g[on_row], minlength=count)
    centre_cols = np.round(total / np.maximum(number, 1)).astype(np.intp)
    return centre_rows, centre_cols


def _wing_light(template: Exposure, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Light (the template's units) of the stars centred on pixels (rows, cols): the
    amplitude of the template's PSF (at the centre of the star's cell, `_PSF_CELLS`)
    fitted (unweighted) to its usable pixels around each, over the median of the square
    ring around the fitted stamp (the local sky).

    Saturated pixels and those the kernel spread them to (`_WING_UNUSABLE`) are left out
    of the fit: it reads the unsaturated wings. Where the usable pixels hold less than
    `_WING_MIN_SHARE` of the PSF, the light above the sky in the stamp, a lower bound."""
    planes = [p for p in _WING_UNUSABLE if p in template.mask_planes]
    bits = np.int32(template.bitmask(planes))
    light = np.zeros(rows.size)
    for cell, model in _cell_models(template, cols, rows):
        half = model.shape[0] // 2
        data = _stack(template.image, cols[cell], rows[cell], half, fill=np.nan)
        data = data.astype(np.float64)
        usable = np.isfinite(data)
        if bits:
            mask = _stack(template.mask, cols[cell], rows[cell], half, fill=0)
            usable &= (mask & bits) == 0
        ring = max(4, half // 2)
        sky = np.nan_to_num(ring_levels(template, cols[cell], rows[cell], half, ring, planes))
        stamp = data - sky[:, None, None]
        weight = np.where(usable, model, 0.0)
        fitted = np.sum(np.where(usable, stamp, 0.0) * weight, axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            fitted /= np.sum(weight**2, axis=(1, 2))
        bound = np.nansum(stamp, axis=(1, 2))
        light[cell] = np.where(weight.sum(axis=(1, 2)) >= _WING_MIN_SHARE, fitted, bound)
    return light


def _cell_models(template: Exposure, x, y):
    """(indices, unit-sum PSF stamp) of the positions (array x, y) in each of the
    `_PSF_CELLS` x `_PSF_CELLS` cells over the frame that holds any: the template's PSF
    at the cell's centre."""
    psf = template.require_psf()
    ny, nx = template.shape
    cells_x = np.clip(np.asarray(x) * _PSF_CELLS // max(nx, 1), 0, _PSF_CELLS - 1)
    cells_y = np.clip(np.asarray(y) * _PSF_CELLS // max(ny, 1), 0, _PSF_CELLS - 1)
    cell = cells_y * _PSF_CELLS + cells_x
    for k in np.unique(cell).tolist():
        cx = template.xy0[0] + (k % _PSF_CELLS + 0.5) * nx / _PSF_CELLS - 0.5
        cy = template.xy0[1] + (k // _PSF_CELLS + 0.5) * ny / _PSF_CELLS - 0.5
        model = np.asarray(psf.kernel_image(cx, cy), dtype=np.float64)
        yield np.flatnonzero(cell == k), model / model.sum()


def outside_kernel_hull(kernel_sources, xy0, x, y, margin: float) -> np.ndarray:
    """True where array position (x, y) lies more than ``margin`` px outside the hull of
    the kernel sources (a table with parent ``x``, ``y``; ``xy0``: the array's origin),
    unless what was fitted on them is constant (meta `EXTRAPOLATED_ORDER` 0; absent:
    not known, so not assumed)."""
    out = np.zeros(x.size, dtype=bool)
    if kernel_sources is None or x.size == 0 or len(kernel_sources) < 3:
        return out
    if "x" not in kernel_sources.colnames or "y" not in kernel_sources.colnames:
        return out
    # a constant kernel and background are the same outside the hull as in it: no
    # polynomial is extrapolated there, and the position is no reason for suspicion
    # (14-28% of the JWST pair's detections were flagged under a constant kernel)
    if kernel_sources.meta.get(EXTRAPOLATED_ORDER) == 0:
        return out
    points = np.column_stack(
        [np.asarray(kernel_sources["x"]) - xy0[0], np.asarray(kernel_sources["y"]) - xy0[1]]
    )
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) < 3:
        return out
    try:
        hull = ConvexHull(points)
    except QhullError:
        return out
    # signed distance to each facet's line; the largest is the distance outside
    distance = (hull.equations[:, :2] @ np.vstack([x, y]) + hull.equations[:, 2:3]).max(axis=0)
    return distance > margin
