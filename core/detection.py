"""Detection of sources: matched-filter S/N, thresholded 8-connected footprints split
into peaks, the peaks measured (`core.measure`), the footprints grown by the PSF, the
sources flagged.

Why not a library: ``sep.extract`` with the same semantics (matched filter with
the PSF, S/N threshold against the variance plane, deblending) was measured 2-3x
slower than this module on 4096 x 4096 frames (issue 11's findings; not re-measured
here). photutils' ``detect_sources``/``deblend_sources`` were not measured (not
installed here). Labelling, distance transforms and filters are `scipy.ndimage`'s.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .background import BACKGROUND_IGNORE_PLANES, _background_mesh
from .config import DetectionConfig
from .dilation import packed_dilate
from .exposure import Exposure
from .measure import (
    _DEFAULT_SMOOTH_SIGMA,
    MASKED_FLAG_PLANES,
    _Filtered,
    _measure,
    _negative_side_sigma,
    _psf_sigma,
    _resolve_psf,
)
from .parallel import alongside, frame_array, frame_zeros, row_blocks
from .psf import LOCUS_SNR, GaussianPsf, Psf, point_like, star_size

__all__ = ["detect_sources", "background_estimate", "DetectionMemo"]

#: A secondary peak in a footprint counts as a source when it rises this many noise
#: sigmas (smoothed S/N units) above the saddle towards a brighter peak.
_PEAK_PROMINENCE = 3.0


# --------------------------------------------------------------------------------------
# detection
def _footprints(
    snr: np.ndarray,
    threshold: float,
    min_pixels: int,
    negative: bool = False,
    out: np.ndarray | None = None,
    out_zeroed: bool = False,
) -> tuple[np.ndarray, int]:
    """Labels of 8-connected pieces with ``snr >= threshold`` (``<= -threshold`` when
    ``negative``) of at least ``min_pixels`` pixels, numbered in raster order; written
    into ``out`` (int32, reused between passes) when given (``out_zeroed``: it holds
    zeros, which are then not written again)."""
    where, values, n, labels = _footprint_pixels(snr, threshold, min_pixels, negative, out)
    if labels is None:
        labels = _label_image(where, values, snr.shape, out, out_zeroed)
    return labels, n


def _label_image(
    where: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int],
    out: np.ndarray | None = None,
    out_zeroed: bool = False,
) -> np.ndarray:
    """The int32 label image holding ``values`` at flat indices ``where`` (0 elsewhere),
    in ``out`` when given (cleared first unless ``out_zeroed``)."""
    if out is None:
        labels = np.zeros(shape, dtype=np.int32)  # calloc: only touched pages cost
    else:
        labels = out
        if not out_zeroed:
            labels.fill(0)
    labels.ravel()[where] = values
    return labels


def _footprint_pixels(snr, threshold, min_pixels, negative=False, out=None):
    """Flat indices of the pixels of the pieces `_footprints` keeps, their labels, the
    number of pieces and, when the whole frame had to be labelled, that label image
    (complete: the dropped pieces cleared; else None: no frame was made)."""
    # found a block of rows at a time: no frame-sized mask unless it is labelled whole
    ncols = snr.shape[1]
    where = np.concatenate(
        [
            np.flatnonzero(snr[rows] <= -threshold if negative else snr[rows] >= threshold)
            + rows.start * ncols
            for rows in row_blocks(snr.shape[0])
        ]
    )
    if where.size == 0:
        # nothing to label (often the negative side): skip the full-frame scan
        return where, np.zeros(0, dtype=np.int32), 0, None
    labels = None
    if where.size <= _SPARSE_LABEL_FRACTION * snr.size:
        # few pixels: label them as a graph, not the whole frame
        values, n = _label_pixels(where, snr.shape)
    else:
        above = snr <= -threshold if negative else snr >= threshold
        structure = np.ones((3, 3), dtype=bool)
        # the label image is written whole: on huge pages unless a buffer is given
        labels = frame_array(snr.shape, np.int32) if out is None else out
        n = ndimage.label(above, structure=structure, output=labels)
        values = labels.ravel()[where]
        del above
    # count and relabel only the (few) pixels above threshold, not the whole frame
    keep = np.bincount(values, minlength=n + 1) >= min_pixels
    keep[0] = False
    n_keep = int(keep.sum())
    if n_keep < n:
        relabel = np.zeros(n + 1, dtype=np.int32)
        relabel[keep] = np.arange(1, n_keep + 1, dtype=np.int32)
        values = relabel[values]
        if labels is not None:
            labels.ravel()[where] = values  # dropped pieces cleared, kept ones renumbered
        kept = values > 0
        where, values = where[kept], values[kept]
    return where, values, n_keep, labels


#: Pixel pieces are labelled as a graph of their runs (`_label_pixels`) when they
#: cover at most this fraction of the frame (typical: the negative side, difference
#: images), else by `scipy.ndimage.label` over the whole frame (the two cost the same
#: near 8% at 4096 x 4096).
_SPARSE_LABEL_FRACTION = 0.05


def _label_pixels(where: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """8-connected labels (1..n, numbered by first pixel in raster order, as
    `scipy.ndimage.label` numbers them) of the pixels at sorted flat indices ``where``.

    The pixels form runs (consecutive pixels of a row); a run touches the runs of the
    next row that overlap its columns widened by one, which are a contiguous range of
    runs: the graph of runs is ~10x smaller than that of pixels.
    """
    ny, nx = shape
    rows = where // nx
    breaks = np.flatnonzero((np.diff(where) != 1) | (np.diff(rows) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [where.size]]))
    first = where[starts]
    last = first + (lengths - 1)
    run_row = rows[starts]
    col0 = first - run_row * nx
    col1 = col0 + (lengths - 1)
    # runs of the next row holding a column in [col0 - 1, col1 + 1] (clipped to the
    # row, so no run of another row qualifies): their ends reach col0 - 1, their
    # starts col1 + 1
    below = (run_row + 1) * nx
    lo = np.searchsorted(last, below + np.maximum(col0 - 1, 0), "left")
    hi = np.searchsorted(first, below + np.minimum(col1 + 1, nx - 1), "right")
    count = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(starts.size), count)
    # each run's range lo..hi-1, laid end to end: lo less the run's offset in that list
    dst = np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(src.size)
    m = starts.size
    graph = coo_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(m, m))
    # components are numbered by their lowest node, i.e. their first run in raster order
    n, component = connected_components(graph.tocsr(), directed=False)
    return np.repeat((component + 1).astype(np.int32), lengths), int(n)


def _disc_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Euclidean distance ``radius`` of a True pixel of ``mask``.

    Equal to ``distance_transform_edt(~mask) <= radius`` but built from shifted ORs:
    rows of the disc are horizontal dilations of increasing half-width, each made
    from the previous one and OR-ed in at the vertical offsets that use it. The
    rows are packed 64 pixels to a word, so each OR touches 1/8 of the bytes.
    """
    if radius <= 0:
        return mask.copy()
    return packed_dilate(mask, [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)])


def _grow(
    labels: np.ndarray, radius: int, out: np.ndarray | None = None, out_zeroed: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Grow labelled footprints by ``radius`` pixels (nearest label wins contested pixels);
    also the sorted flat indices of the grown image's labelled pixels when they were
    listed (a sparse grown area), else None.

    The grown area is a disc dilation of all footprints; its connected pieces
    that hold a single footprint take that label outright, and only pieces
    shared by several footprints need a nearest-pixel (distance) transform, on
    their own bounding box. A footprint pixel from another piece lies farther
    than ``radius`` from every pixel of this one, so the result equals a
    whole-frame nearest-label transform (up to ties between equidistant pixels).
    ``out`` (int32, not ``labels``) receives the result when given (``out_zeroed``:
    it holds zeros).
    """
    if radius <= 0 or labels.max() == 0:
        return labels, None
    seeds = np.greater(labels, 0, out=frame_array(labels.shape, bool))
    reach = _disc_dilate(seeds, radius)
    where = np.flatnonzero(seeds)
    del seeds
    area: np.ndarray | None = None
    pieces: np.ndarray
    if np.count_nonzero(reach) <= _SPARSE_GROW_FRACTION * reach.size:
        # few pixels: the pieces labelled as a graph of runs, and only their pixels
        # written (no whole-frame labelling, nor a lookup over every pixel)
        area = np.flatnonzero(reach)
        del reach
        area_pieces, n_pieces = _label_pixels(area, labels.shape)
        pieces = _label_image(area, area_pieces, labels.shape, out, out_zeroed)
    else:
        structure = np.ones((3, 3), dtype=bool)
        if out is None:
            pieces, n_pieces = ndimage.label(reach, structure=structure)
        else:
            pieces, n_pieces = out, ndimage.label(reach, structure=structure, output=out)
        del reach
    seed_labels = labels.ravel()[where]
    seed_pieces = pieces.ravel()[where]
    # a piece holds one footprint when all its seeds carry the label one of them has
    # (gathers and a count: no unbuffered ufunc.at over millions of seeds)
    some = np.zeros(n_pieces + 1, dtype=labels.dtype)
    some[seed_pieces] = seed_labels
    mixed = np.bincount(seed_pieces[seed_labels != some[seed_pieces]], minlength=n_pieces + 1)
    single = mixed == 0
    lookup = np.where(single, some, 0).astype(labels.dtype)
    lookup[0] = 0
    shared = np.flatnonzero(~single[1:]) + 1
    # a piece is its seeds dilated by the disc: its box is theirs grown by the radius
    ny, nx = labels.shape
    in_shared = ~single[seed_pieces]
    seed_rows, seed_cols = np.divmod(where[in_shared], nx)
    box_lo = np.full((n_pieces + 1, 2), np.iinfo(np.int64).max, dtype=np.int64)
    box_hi = np.full((n_pieces + 1, 2), -1, dtype=np.int64)
    np.minimum.at(box_lo, seed_pieces[in_shared], np.column_stack([seed_rows, seed_cols]))
    np.maximum.at(box_hi, seed_pieces[in_shared], np.column_stack([seed_rows, seed_cols]))
    boxes = {
        piece: (
            slice(max(box_lo[piece, 0] - radius, 0), min(box_hi[piece, 0] + radius + 1, ny)),
            slice(max(box_lo[piece, 1] - radius, 0), min(box_hi[piece, 1] + radius + 1, nx)),
        )
        for piece in shared
    }
    insides = [pieces[boxes[piece]] == piece for piece in shared]
    # the piece image becomes the grown label image
    grown = pieces
    if area is not None:
        grown.ravel()[area] = lookup[area_pieces]
    else:
        for rows in row_blocks(grown.shape[0]):
            grown[rows] = lookup[grown[rows]]
    if shared.size:
        for piece, inside in zip(shared, insides, strict=True):
            box = boxes[piece]
            window = labels[box]
            _, (iy, ix) = ndimage.distance_transform_edt(
                ~((window > 0) & inside), return_indices=True
            )
            grown[box][inside] = window[iy, ix][inside]
    # every pixel of a piece is labelled: of a single one by its footprint, of a shared
    # one by the nearest
    return grown, area


#: The grown area of `_grow` is labelled as a graph of runs (`_label_pixels`) when it
#: covers at most this fraction of the frame, else by `scipy.ndimage.label` over the
#: whole frame (4096 x 4096, radius 5: the same cost near 12%; the 4096 pair's 5%
#: 122 -> 76 ms).
_SPARSE_GROW_FRACTION = 0.1


def detect_sources(
    exposure: Exposure,
    config: DetectionConfig | None = None,
    psf: Psf | None = None,
    set_mask: bool = True,
    grow_sigma: float = 2.4,
    background=None,
    measure: bool = True,
    segmentation: bool = True,
) -> Table:
    """Detect sources above a threshold in units of the local noise.

    The background and its noise come from `background_map`. With a PSF (given,
    or the exposure's) and ``config.smooth_with_psf`` the background-subtracted
    image is correlated with the PSF (matched filter) and divided by the square
    root of the equally filtered variance plane, giving an S/N image whose
    empty-sky scatter is renormalised to 1 (robust lower-half estimate). Without
    a PSF a Gaussian of sigma 1 px is used (on the central quarter of frames of
    2048 px or more a side, when it holds 30 clean sources), then the sources'
    stellar-locus size defines a Gaussian PSF for a second pass. Connected
    pixels (8-way) at or above ``threshold`` with at least ``min_pixels`` form
    footprints, which are then grown by ``grow_sigma`` PSF sigmas (as Rubin's detection does); the
    same is done on the negated S/N image for negative sources.

    Parameters
    ----------
    exposure : `Exposure`
        Searched; its DETECTED and DETECTED_NEGATIVE planes are replaced when
        ``set_mask`` (the only change made to it).
    config : `DetectionConfig` or None
        Threshold, minimum footprint size, background mesh, smoothing switch.
    psf : `Psf` or None
        Overrides the exposure's PSF for the matched filter and photometry.
    set_mask : bool
        Write the grown footprints into the DETECTED / DETECTED_NEGATIVE planes.
    grow_sigma : float
        Footprint growth in PSF sigmas.
    background : optional
        `background_estimate` of this exposure (computed when None): lets several
        detections of an exposure whose masks did not change share one mesh.
    measure : bool
        Find peaks and measure them; when False only the footprints are made (mask
        planes and segmentation images) and the table has no rows.
    segmentation : bool
        Put the segmentation images in ``meta``. False without ``measure``: the
        mask planes are made without labelling the grown footprints where it can
        be (it costs a frame-wide labelling and a nearest-footprint pass).

    Returns
    -------
    `astropy.table.Table`
        One row per positive footprint: ``id``, ``label`` (value in the
        segmentation image), ``x``, ``y`` (parent coordinates, weighted
        centroid), ``flux``, ``flux_err`` (PSF flux and its error, counts),
        ``snr``, ``peak`` (background-subtracted, counts), ``peak_snr``,
        ``npix``, ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (inclusive
        parent box of the footprint), ``n_peaks``, ``ixx``, ``iyy``, ``ixy``
        (adaptive moments, px^2), ``size`` (trace radius, px), ``roundness``
        (minor/major axis ratio), ``flag_saturated``, ``flag_edge``,
        ``flag_masked``, ``flag_blended``. ``meta`` holds ``segmentation``
        (int32 label image of grown positive footprints, array indices) and
        ``segmentation_negative`` (with ``segmentation``), ``n_footprints``,
        ``n_negative``, ``threshold``, ``noise_factor``, ``psf_sigma`` and ``xy0``.
    """
    config = config or DetectionConfig()
    given = _resolve_psf(exposure, psf)
    if background is None:
        background = background_estimate(exposure, config)
    estimate = background
    if given is not None and config.smooth_with_psf:
        table = _detect_pass(
            exposure, config, given, estimate, grow_sigma, set_mask, measure, segmentation
        )
    else:
        first = GaussianPsf(_DEFAULT_SMOOTH_SIGMA)
        # the first pass only measures the sources' sizes: on a large frame, the
        # central quarter holds stars enough for their locus (else the whole frame)
        locus, table = _first_pass_locus(exposure, config, first, estimate, grow_sigma)
        sigma = locus if locus is not None else _DEFAULT_SMOOTH_SIGMA
        if not config.smooth_with_psf:
            sigma = max(0.5, min(sigma, 20.0))
        if table is None or abs(sigma / _DEFAULT_SMOOTH_SIGMA - 1) > 0.15 or set_mask:
            model = GaussianPsf(max(0.5, min(sigma, 20.0)))
            table = _detect_pass(
                exposure, config, model, estimate, grow_sigma, set_mask, measure, segmentation
            )
        if given is not None:
            table.meta["psf_sigma"] = _psf_sigma(given)
    return table


def background_estimate(exposure: Exposure, config: DetectionConfig | None = None):
    """The background mesh `detect_sources` uses for ``exposure`` (its masks as they are
    now): computed once, it can be passed to several detections of the same exposure."""
    mesh = (config or DetectionConfig()).background_mesh
    return _background_mesh(exposure, mesh, BACKGROUND_IGNORE_PLANES)


class DetectionMemo:
    """Background meshes and generic (no-PSF, default settings) detections of exposures,
    kept by one step for a later one while the exposure's pixels and masks stay as they
    were: registration detects stars on plain inputs, PSF estimation needs the same
    catalog, and detection the same mesh.

    Entries are keyed by the exposure object itself (identity, not equality): an
    exposure that was cut, padded or warped in between is a new object and misses.
    """

    def __init__(self) -> None:
        self._meshes: dict[int, tuple[Exposure, int, object]] = {}
        self._catalogs: dict[int, tuple[Exposure, Table]] = {}

    def mesh(self, exposure: Exposure, config: DetectionConfig | None = None):
        """`background_estimate` of ``exposure`` with ``config``'s mesh, computed once."""
        size = (config or DetectionConfig()).background_mesh
        kept = self._meshes.get(id(exposure))
        if kept is not None and kept[0] is exposure and kept[1] == size:
            return kept[2]
        mesh = background_estimate(exposure, config)
        self._meshes[id(exposure)] = (exposure, size, mesh)
        return mesh

    def generic(self, exposure: Exposure) -> Table | None:
        """The catalog ``detect_sources(exposure, set_mask=False)`` gives (default settings,
        no PSF), if one was kept."""
        kept = self._catalogs.get(id(exposure))
        return kept[1] if kept is not None and kept[0] is exposure else None

    def keep(self, exposure: Exposure, config: DetectionConfig | None, table: Table) -> None:
        """Keep ``table``, a ``set_mask=False`` detection of ``exposure`` with ``config``,
        when it is the generic one (default settings, the exposure has no PSF)."""
        if exposure.psf is not None or (config is not None and config != DetectionConfig()):
            return
        table.meta.pop("segmentation", None)
        table.meta.pop("segmentation_negative", None)
        self._catalogs[id(exposure)] = (exposure, table)


#: Frames with both sides at least this long measure source sizes (first pass of a
#: detection without a PSF) on their central quarter.
_SIZE_WINDOW_MIN_SIDE = 2048
#: Fewest clean sizes the central quarter must give; else the whole frame is used.
_SIZE_WINDOW_MIN_STARS = 30


def _first_pass_locus(exposure, config, psf, estimate, grow_sigma):
    """The stars' size (`core.psf.star_size`, None without enough bright clean sources)
    from a detection pass with a generic PSF, and that pass's catalog when it covered
    the whole frame (None when it covered the central quarter)."""
    ny, nx = exposure.shape
    if min(ny, nx) >= _SIZE_WINDOW_MIN_SIDE:
        rows = slice(ny // 4, ny // 4 + ny // 2)
        cols = slice(nx // 4, nx // 4 + nx // 2)
        window = Exposure(
            exposure.image[rows, cols],
            exposure.variance[rows, cols],
            exposure.mask[rows, cols],
            mask_planes=exposure.mask_planes,
            metadata=exposure.metadata,
        )
        table = _detect_pass(window, config, psf, estimate.window(rows, cols), grow_sigma, False)
        clean = point_like(table)
        if (clean & (np.asarray(table["snr"]) >= LOCUS_SNR)).sum() >= _SIZE_WINDOW_MIN_STARS:
            return star_size(table, clean), None
    table = _detect_pass(exposure, config, psf, estimate, grow_sigma, False)
    return star_size(table, point_like(table)), table


def _local_maxima(snr: np.ndarray, pixels: np.ndarray, half: int):
    """(rows, cols) of the flat indices ``pixels`` whose value is the maximum of the
    (2 half + 1)^2 box around them (clipped to the frame), in ``pixels`` order.

    Same as comparing with ``ndimage.maximum_filter`` (whose reflected border
    repeats in-frame values) but only at the given pixels; the nearest ring is
    tested first, so most pixels drop out after eight comparisons.
    """
    ny, nx = snr.shape
    rows, cols = np.divmod(pixels, nx)
    value = snr.ravel()[pixels]
    keep = np.arange(pixels.size)
    offsets = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]
    offsets.sort(key=lambda o: max(abs(o[0]), abs(o[1])))
    for dy, dx in offsets[1:]:
        r = np.clip(rows[keep] + dy, 0, ny - 1)
        c = np.clip(cols[keep] + dx, 0, nx - 1)
        keep = keep[value[keep] >= snr[r, c]]
        if keep.size == 0:
            break
    return rows[keep], cols[keep]


def _find_peaks(
    snr: np.ndarray,
    labels: np.ndarray | None,
    n: int,
    sigma: float,
    prominence: float,
    pixels: np.ndarray | None = None,
    pixel_labels: np.ndarray | None = None,
    near_maxima: np.ndarray | None = None,
):
    """Peaks (row, col, label) of each footprint: its maximum, plus other local maxima
    that rise ``prominence`` above the lowest S/N on the line to a brighter peak.

    ``pixels`` (sorted flat indices) and ``pixel_labels``, the footprints' pixels and
    labels when known, stand for the label image (``labels`` may then be None).
    ``near_maxima``, when given, are the footprint pixels (sorted flat indices) that
    are the maximum of their 3 x 3 box: the local maxima are searched among them."""
    if pixels is None or pixel_labels is None:
        assert labels is not None
        pixels = np.flatnonzero(labels)
        pixel_labels = labels.ravel()[pixels]
    nx = snr.shape[1]
    values = snr.ravel()[pixels]
    # brightest pixel of each footprint (the first in raster order on ties)
    best = np.full(n + 1, -np.inf, dtype=values.dtype)
    np.maximum.at(best, pixel_labels, values)
    top = np.flatnonzero(values == best[pixel_labels])
    _, first = np.unique(pixel_labels[top], return_index=True)
    main_flat = pixels[top[first]]
    main = np.column_stack(np.divmod(main_flat, nx)).astype(int)
    size = max(3, 2 * int(round(sigma)) + 1)
    # a maximum of a larger box is one of its 3 x 3 box (same order: that of pixels)
    rows, cols = _local_maxima(snr, pixels if near_maxima is None else near_maxima, size // 2)
    secondary = ~np.isin(rows * nx + cols, main_flat)
    rows, cols = rows[secondary], cols[secondary]
    plabel = pixel_labels[np.searchsorted(pixels, rows * nx + cols)]
    # peaks of footprints with candidate secondaries (brightest first), main peak first
    peaks: dict[int, list[tuple[int, int]]] = {}
    order = np.argsort(-snr[rows, cols])
    for k in order:
        r, c, lab = int(rows[k]), int(cols[k]), int(plabel[k])
        known = peaks.setdefault(lab, [(int(main[lab - 1, 0]), int(main[lab - 1, 1]))])
        brighter = np.array(known, dtype=float)
        dist = np.hypot(brighter[:, 0] - r, brighter[:, 1] - c)
        near = brighter[int(np.argmin(dist))]
        steps = max(2, int(math.ceil(dist.min() * 2)))
        t = np.linspace(0.0, 1.0, steps + 1)
        line = ndimage.map_coordinates(
            snr, [r + t * (near[0] - r), c + t * (near[1] - c)], order=1, mode="nearest"
        )
        if snr[r, c] - line.min() >= prominence:
            known.append((r, c))
    extra = [(r, c, lab, k) for lab, found in peaks.items() for k, (r, c) in enumerate(found) if k]
    out = np.column_stack([main, np.arange(1, n + 1), np.zeros(n, dtype=int)])
    if extra:
        out = np.concatenate([out, np.array(extra, dtype=int)])
    # by footprint, main peak then secondaries in the order they were accepted
    out = out[np.lexsort((out[:, 3], out[:, 2]))]
    return out[:, :3]


def _detect_pass(
    exposure,
    config,
    psf,
    estimate,
    grow_sigma,
    set_mask,
    measure: bool = True,
    segmentation: bool = True,
) -> Table:
    # without measurements the filtered maps go once the S/N map is made
    filtered = _Filtered(exposure, psf, estimate, keep_maps=measure)
    sigma = _psf_sigma(psf)
    grow = int(round(grow_sigma * sigma))
    # re-measure the S/N scatter on sky outside every footprint (sources and faint
    # wings inflate the first estimate), then detect again; the first pass needs only
    # which pixels its footprints cover, not label images
    footprints = frame_zeros(filtered.snr.shape, bool)  # read whole by the dilation
    for negative in (False, True):
        where, values, _, _ = _footprint_pixels(
            filtered.snr, config.threshold, config.min_pixels, negative
        )
        footprints.ravel()[where] = True
        del where, values
    sky = _disc_dilate(footprints, grow) if grow > 0 else footprints
    np.logical_not(sky, out=sky)
    for rows in row_blocks(sky.shape[0]):
        sky[rows] &= ~filtered.no_data[rows]
    if np.count_nonzero(sky) > 1000:
        factor = _negative_side_sigma(filtered.snr, sky)
        filtered.snr /= factor
        filtered.noise_factor *= factor
    del footprints, sky
    if not (measure or segmentation):
        masks = _grown_masks(filtered.snr, config.threshold, config.min_pixels, grow)
        if masks is not None:
            grown, grown_neg, n, n_neg = masks
            if set_mask:
                _set_detected(exposure, grown, grown_neg)
            table = _empty_detection_table()
            table.meta.update(_detection_meta(exposure, config, n, n_neg, filtered, sigma))
            return table
    # the footprints as pixel lists while the S/N map is needed (the peaks): a label
    # image is made of the positive ones only then, in the S/N map's frame, whose
    # pages are in use (a fresh frame's first touch costs more than clearing it)
    pixels, pixel_labels, n, labels = _footprint_pixels(
        filtered.snr, config.threshold, config.min_pixels
    )
    # the negative labels' buffer is written whole later (the grown labels): on huge
    # pages, fresh (zero) ones, which its few negative footprints leave mostly untouched
    neg_labels, n_neg = _footprints(
        filtered.snr,
        config.threshold,
        config.min_pixels,
        True,
        out=frame_zeros(filtered.snr.shape, np.int32),
        out_zeroed=True,
    )
    # peaks and their S/N first: then the S/N map is no longer needed, and the
    # measurements (on the filtered maps) are made while the footprints grow (the
    # label buffers reused for the grown images), a core each
    peaks = None
    if n and measure:
        peaks = _find_peaks(filtered.snr, labels, n, sigma, _PEAK_PROMINENCE, pixels, pixel_labels)
    peak_snr = filtered.snr[peaks[:, 0], peaks[:, 1]] if peaks is not None else None
    if labels is None:
        labels = _label_image(pixels, pixel_labels, filtered.snr.shape, filtered.snr.view(np.int32))
    del pixels, pixel_labels, filtered.snr, filtered.no_data

    grown_labels = partial(_grow_both, labels, neg_labels, n, n_neg, grow)
    measured = None
    if peaks is not None:
        with alongside(grown_labels) as growing:
            measured = _measure(
                filtered, exposure, peaks[:, 1].astype(float), peaks[:, 0].astype(float), True
            )
        grown, grown_neg, inside = growing.result()
    else:
        grown, grown_neg, inside = grown_labels()
    if measure:
        del filtered.smoothed, filtered.smoothed_var
    if set_mask:
        _set_detected(exposure, grown, grown_neg if n_neg else None)
    x0, y0 = exposure.xy0
    table = _empty_detection_table()
    table.meta.update(_detection_meta(exposure, config, n, n_neg, filtered, sigma))
    if segmentation:
        table.meta["segmentation"] = grown.astype(np.int32, copy=False)
        table.meta["segmentation_negative"] = grown_neg.astype(np.int32, copy=False)
    if peaks is None:
        return table
    assert measured is not None
    plabel = peaks[:, 2]
    n_peaks = np.bincount(plabel, minlength=n + 1)[plabel]
    # per-footprint sums over the grown footprints' pixels only
    if inside is None:
        inside = np.flatnonzero(grown)
    inside_label = grown.ravel()[inside]
    inside_mask = exposure.mask.ravel()[inside]
    npix = np.bincount(inside_label, minlength=n + 1)[plabel]
    inside_row, inside_col = np.divmod(inside, grown.shape[1])
    boxes = np.empty((n + 1, 4), dtype=np.int64)
    boxes[:, :2] = np.iinfo(np.int64).max
    boxes[:, 2:] = -1
    np.minimum.at(boxes[:, 0], inside_label, inside_col)
    np.minimum.at(boxes[:, 1], inside_label, inside_row)
    np.maximum.at(boxes[:, 2], inside_label, inside_col)
    np.maximum.at(boxes[:, 3], inside_label, inside_row)
    bbox = boxes[plabel]

    def any_in(planes) -> np.ndarray:
        bits = exposure.bitmask(planes)
        hit = (inside_mask & bits) != 0 if bits else np.zeros(inside.size, dtype=bool)
        return (np.bincount(inside_label[hit], minlength=n + 1) > 0)[plabel]

    saturated = any_in(["SAT"])
    saturate_level = exposure.metadata.get("SATURATE")
    if isinstance(saturate_level, int | float) and saturate_level > 0:
        values = exposure.image.ravel()[inside]
        above = np.isfinite(values) & (values >= saturate_level)
        saturated |= (np.bincount(inside_label[above], minlength=n + 1) > 0)[plabel]
    ny, nx = exposure.shape
    half = measured["half"]
    edge = (
        any_in(["EDGE"])
        | (bbox[:, 0] == 0)
        | (bbox[:, 1] == 0)
        | (bbox[:, 2] == nx - 1)
        | (bbox[:, 3] == ny - 1)
        | (measured["col"] < half)
        | (measured["row"] < half)
        | (measured["col"] > nx - 1 - half)
        | (measured["row"] > ny - 1 - half)
    )
    columns = {
        "id": np.arange(len(peaks)),
        "label": plabel.astype(np.int32),
        "x": measured["col"] + x0,
        "y": measured["row"] + y0,
        "flux": measured["flux"],
        "flux_err": measured["flux_err"],
        "snr": measured["snr"],
        "snr_pixel": measured["snr_pixel"],
        "peak": measured["peak"],
        "peak_snr": peak_snr,
        "npix": npix,
        "bbox_x0": bbox[:, 0] + x0,
        "bbox_y0": bbox[:, 1] + y0,
        "bbox_x1": bbox[:, 2] + x0,
        "bbox_y1": bbox[:, 3] + y0,
        "n_peaks": n_peaks,
        "ixx": measured["ixx"],
        "iyy": measured["iyy"],
        "ixy": measured["ixy"],
        "size": measured["size"],
        "roundness": measured["roundness"],
        "flag_saturated": saturated,
        "flag_edge": edge,
        "flag_masked": any_in(MASKED_FLAG_PLANES),
        "flag_blended": n_peaks > 1,
    }
    # copy=False: the meta's segmentation images are fresh, no need to deep-copy them
    return Table(columns, meta=table.meta, copy=False)


def _grow_both(labels, neg_labels, n: int, n_neg: int, grow: int):
    """Positive and negative footprints grown together (one transform; the nearest
    wins), in the buffers of ``labels`` and ``neg_labels`` (negative labels folded in
    after the positive ones, split again after); with the flat indices of the grown
    positive pixels when `_grow` knew them (else None)."""
    if not n_neg:
        grown, area = _grow(labels, grow, out=neg_labels, out_zeroed=True)
        return grown, np.zeros(grown.shape, dtype=grown.dtype), area  # calloc: no pages touched
    both = labels
    for rows in row_blocks(both.shape[0]):
        neg = neg_labels[rows]
        np.copyto(both[rows], neg + np.int32(n), where=neg > 0)
    result, area = _grow(both, grow, out=neg_labels)
    if area is not None:
        area = area[result.ravel()[area] <= n]
    grown, grown_neg = both, neg_labels
    for rows in row_blocks(result.shape[0]):
        block = result[rows]
        grown[rows] = np.where(block <= n, block, 0)
        grown_neg[rows] = np.where(block > n, block - n, 0)
    return grown, grown_neg, area


def _detection_meta(exposure, config, n: int, n_neg: int, filtered, sigma: float) -> dict:
    """A detection table's meta besides the segmentation images."""
    return {
        "n_footprints": n,
        "n_negative": n_neg,
        "threshold": float(config.threshold),
        "noise_factor": float(filtered.noise_factor),
        "psf_sigma": float(sigma),
        "xy0": tuple(exposure.xy0),
    }


def _set_detected(exposure, positive: np.ndarray, negative: np.ndarray | None) -> None:
    """Replace the DETECTED and DETECTED_NEGATIVE planes by where ``positive`` and
    ``negative`` (grown footprints: labels or booleans) are set, in one pass over the
    mask, a block of rows at a time."""
    det_bit = np.int32(exposure.mask_planes.value("DETECTED"))
    neg_bit = np.int32(exposure.mask_planes.value("DETECTED_NEGATIVE"))
    for rows in row_blocks(positive.shape[0]):
        block = exposure.mask[rows]
        block &= ~(det_bit | neg_bit)
        np.bitwise_or(block, det_bit, out=block, where=positive[rows] > 0)
        if negative is not None:
            np.bitwise_or(block, neg_bit, out=block, where=negative[rows] > 0)


def _grown_masks(snr: np.ndarray, threshold: float, min_pixels: int, grow: int):
    """Where `_grow` puts positive and negative labels, and the footprint counts, made
    without label images: every pixel within ``grow`` of a footprint takes the nearest
    one's label, so when no pixel is within reach of both signs the grown planes are
    the two signs' disc dilations. None when some pixel is (the nearest must be found)."""
    reach, counts = [], []
    for negative in (False, True):
        where, _, n, _ = _footprint_pixels(snr, threshold, min_pixels, negative)
        seeds = frame_zeros(snr.shape, bool)  # read whole by the dilation
        seeds.ravel()[where] = True
        reach.append(_disc_dilate(seeds, grow) if n else seeds)
        counts.append(n)
    if all(counts):
        for rows in row_blocks(snr.shape[0]):
            if np.any(reach[0][rows] & reach[1][rows]):
                return None
    return reach[0], (reach[1] if counts[1] else None), counts[0], counts[1]


_DETECTION_COLUMNS = {
    "id": int,
    "label": np.int32,
    "x": float,
    "y": float,
    "flux": float,
    "flux_err": float,
    "snr": float,
    "snr_pixel": float,
    "peak": float,
    "peak_snr": float,
    "npix": int,
    "bbox_x0": int,
    "bbox_y0": int,
    "bbox_x1": int,
    "bbox_y1": int,
    "n_peaks": int,
    "ixx": float,
    "iyy": float,
    "ixy": float,
    "size": float,
    "roundness": float,
    "flag_saturated": bool,
    "flag_edge": bool,
    "flag_masked": bool,
    "flag_blended": bool,
}


def _empty_detection_table() -> Table:
    return Table(
        [np.zeros(0, dtype=t) for t in _DETECTION_COLUMNS.values()],
        names=list(_DETECTION_COLUMNS),
    )
