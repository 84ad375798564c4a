"""Sources: user catalogs, kernel-source selection and sky positions.

alsub does not need a measured catalog (algorithm.md, decision 5): `detect_sources`
(`core.detection`) finds sources with a matched filter and measures what
kernel-source selection cuts on (S/N, size, flags); `read_catalog` reads a user's
FITS/CSV/JSON catalog; `select_kernel_sources` applies the cuts of section 3.1;
`sky_sources` places empty-sky positions for the metrics of section 6. Background
maps live in `core.background`, measurement in `core.measure`; their public names
are re-exported here for existing callers.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree
from scipy.stats import qmc

from .background import BACKGROUND_IGNORE_PLANES, background_map
from .config import SourcesConfig
from .detection import detect_sources
from .errors import InsufficientSourcesError, InvalidCatalogError
from .exposure import Exposure
from .measure import MASKED_FLAG_PLANES, measure_sources
from .parallel import row_blocks
from .psf import SIGMA_TO_FWHM, GaussianPsf, adaptive_moments
from .psf_sampling import is_constant, memo
from .sky import radec_to_pixel

__all__ = [
    "background_map",
    "detect_sources",
    "measure_sources",
    "read_table",
    "read_catalog",
    "select_kernel_sources",
    "kernel_snr_column",
    "sky_sources",
    "BACKGROUND_IGNORE_PLANES",
    "MASKED_FLAG_PLANES",
]


# --------------------------------------------------------------------------------------
# user catalogs
_ALIASES = {
    "x": ("x", "xcentroid", "x_pix", "xpos", "col"),
    "y": ("y", "ycentroid", "y_pix", "ypos", "row"),
    "ra": ("ra", "ra_deg", "alpha"),
    "dec": ("dec", "dec_deg", "delta"),
    "flux": ("flux", "instflux", "psf_flux"),
    "flux_err": ("flux_err", "fluxerr", "flux_error", "instflux_err", "psf_flux_err"),
}


def _load_table(source: Any, name: str) -> Table:
    """The catalog ``source`` as a table; ``name`` is how messages call it."""
    if isinstance(source, Table):
        return source.copy()
    if isinstance(source, list | tuple):
        return _table_from_records(list(source), name)
    if isinstance(source, dict):
        return _table_from_json(source, name)
    if isinstance(source, bytes | bytearray):
        return _load_bytes(bytes(source), name)
    return read_table(source)


def read_table(path: str | Path) -> Table:
    """A user's table file as it is: FITS (told by its first bytes, whatever the file's
    extension), JSON (a list of objects or ``{"sources": [...]}``) or CSV with a header
    line; a UTF-8 byte-order mark is ignored."""
    path = Path(path)
    if not path.is_file():
        raise InvalidCatalogError(f"catalog file {str(path)!r} does not exist")
    return _load_bytes(path.read_bytes(), str(path))


def _load_bytes(data: bytes, name: str) -> Table:
    try:
        if data.startswith(b"SIMPLE"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return Table.read(io.BytesIO(data), format="fits")
        # a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
        text = data.decode("utf-8-sig")
        if text.lstrip()[:1] in ("{", "["):
            return _table_from_json(json.loads(text), name)
        # as lines: a one-line string is taken by astropy for a file name or a URL, and
        # an uploaded catalog "/etc/passwd" or "http://..." was read or fetched
        return Table.read(text.splitlines(), format="ascii.csv")
    except InvalidCatalogError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes a typed error
        raise InvalidCatalogError(f"cannot read catalog {name}: {exc}") from None


def _table_from_json(obj: Any, name: str) -> Table:
    if isinstance(obj, dict):
        if "sources" not in obj:
            raise InvalidCatalogError(
                f"JSON catalog {name} must be a list of objects or {{'sources': [...]}}"
            )
        obj = obj["sources"]
    if not isinstance(obj, list):
        raise InvalidCatalogError(f"JSON catalog {name}: 'sources' must be a list")
    return _table_from_records(obj, name)


def _table_from_records(records: list, name: str) -> Table:
    if not records:
        return Table()
    if not all(isinstance(r, dict) for r in records):
        raise InvalidCatalogError(f"catalog {name}: every source must be an object")
    keys: list[str] = []
    for record in records:
        keys.extend(k for k in record if k not in keys)
    columns = {k: [r.get(k) for r in records] for k in keys}
    try:
        return Table({k: np.array(v, dtype=float) for k, v in columns.items()})
    except (TypeError, ValueError):
        bad = [k for k, v in columns.items() if not _all_numbers(v)]
        raise InvalidCatalogError(
            f"catalog {name}: non-numeric or missing values in column(s) {', '.join(bad)}"
        ) from None


def _all_numbers(values) -> bool:
    try:
        np.array(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


def _find(table: Table, key: str) -> str | None:
    lower = {name.lower(): name for name in table.colnames}
    for alias in _ALIASES[key]:
        if alias in lower:
            return lower[alias]
    return None


def _numeric(table: Table, column: str, name: str) -> np.ndarray:
    try:
        values = np.ma.filled(np.ma.asarray(table[column]).astype(float), np.nan)
    except (TypeError, ValueError):
        raise InvalidCatalogError(f"catalog {name}: column {column!r} is not numeric") from None
    return np.asarray(values, dtype=np.float64)


def read_catalog(source, wcs=None) -> Table:
    """Read a user's source catalog into a table with parent ``x``, ``y``.

    Parameters
    ----------
    source : path, bytes, `astropy.table.Table`, list of dict or dict
        A FITS binary table, a CSV file with a header line, or JSON (a list of
        objects or ``{"sources": [...]}``). Column names are case-insensitive;
        ``x``/``y`` (0-based parent pixel positions) or ``ra``/``dec`` (degrees,
        converted through ``wcs``), optional ``flux`` and ``flux_err``.
    wcs : `astropy.wcs.WCS` or None
        Needed when the catalog has only ra/dec.

    Returns
    -------
    `astropy.table.Table`
        Columns ``x``, ``y`` (float64), ``flux`` and ``flux_err`` when given
        (float64), ``ra``/``dec`` when given, and every other input column.

    Raises
    ------
    InvalidCatalogError
        Missing or unreadable file, no position columns, non-numeric or
        non-finite positions, ra/dec without a WCS.
    """
    # the file's name, or what kind of catalog (messages read "catalog <name> ...")
    name = (
        str(source)
        if isinstance(source, str | Path)
        else "(uploaded)"
        if isinstance(source, bytes | bytearray)
        else "(given)"
    )
    table = _load_table(source, name)
    xcol, ycol = _find(table, "x"), _find(table, "y")
    racol, deccol = _find(table, "ra"), _find(table, "dec")
    out = Table(meta=dict(table.meta))
    if xcol and ycol:
        x = _numeric(table, xcol, name)
        y = _numeric(table, ycol, name)
    elif racol and deccol:
        if wcs is None:
            raise InvalidCatalogError(
                f"catalog {name} has ra/dec but no x/y, and the exposure has no WCS to convert them"
            )
        ra = _numeric(table, racol, name)
        dec = _numeric(table, deccol, name)
        x, y = radec_to_pixel(wcs, ra, dec) if len(ra) else (ra.copy(), dec.copy())
    else:
        raise InvalidCatalogError(
            f"catalog {name} has no position columns: need x and y (pixels) or ra and dec "
            f"(degrees); found {', '.join(table.colnames) or 'no columns'}"
        )
    if len(x) == 0:
        raise InvalidCatalogError(f"catalog {name} has no rows: give at least one source")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InvalidCatalogError(f"catalog {name} has missing or non-finite positions")
    out["x"] = x
    out["y"] = y
    for key in ("flux", "flux_err"):
        col = _find(table, key)
        if col is not None:
            out[key] = _numeric(table, col, name)
    for col in table.colnames:
        if col not in (xcol, ycol) and col.lower() not in ("x", "y", "flux", "flux_err"):
            if col not in out.colnames and col not in (
                _find(table, "flux"),
                _find(table, "flux_err"),
            ):
                out[col] = table[col]
    return out


# --------------------------------------------------------------------------------------
# kernel-source selection
def _box_counts(bad: np.ndarray, x0: int, y0: int, bx0, by0, bx1, by1) -> np.ndarray:
    """Number of ``bad`` pixels inside inclusive parent boxes.

    Boxes are stamp-sized and a few thousand at most, so slicing each is far
    cheaper than a summed-area table of the whole frame.
    """
    ny, nx = bad.shape
    counts = np.zeros(len(np.atleast_1d(bx0)), dtype=np.int64)
    if not bad.any():
        return counts
    i0 = np.clip(np.asarray(bx0) - x0, 0, nx)
    j0 = np.clip(np.asarray(by0) - y0, 0, ny)
    i1 = np.clip(np.asarray(bx1) - x0 + 1, 0, nx)
    j1 = np.clip(np.asarray(by1) - y0 + 1, 0, ny)
    for k in range(counts.size):
        counts[k] = np.count_nonzero(bad[j0[k] : j1[k], i0[k] : i1[k]])
    return counts


def _spread_order(x: np.ndarray, y: np.ndarray, snr: np.ndarray, bbox, n_keep: int) -> np.ndarray:
    """Indices of ``n_keep`` sources, best S/N first within each cell of a coarse grid,
    taken round-robin across cells so the selection covers the frame."""
    cells = int(np.clip(math.floor(math.sqrt(max(n_keep, 1) / 2.0)), 1, 8))
    min_x, min_y, max_x, max_y = bbox
    cx = np.clip(((x - min_x) / (max_x - min_x + 1) * cells).astype(int), 0, cells - 1)
    cy = np.clip(((y - min_y) / (max_y - min_y + 1) * cells).astype(int), 0, cells - 1)
    cell = cy * cells + cx
    order = np.lexsort((-snr, cell))
    rank = np.empty(len(x), dtype=int)
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank[order] = np.arange(len(x)) - starts
    final = np.lexsort((-snr, rank))
    return final[:n_keep]


def kernel_snr_column(table: Table) -> str:
    """The S/N column the kernel sources' window (``min_snr`` < S/N < ``max_snr``) judges:
    the kernel fit sees pixel noise, so the variance plane's S/N (``snr_pixel``) where the
    catalog has it, else ``snr``."""
    return "snr_pixel" if "snr_pixel" in table.colnames else "snr"


#: Draws per axis of a varying PSF's width for the size cut, and the spread of widths
#: over them (fraction of the mean) below which the PSF counts as one width.
_WIDTH_NODES = 5
_WIDTH_SPREAD = 0.05


def _local_sigma(psf, bbox, x: np.ndarray, y: np.ndarray, sigma: float):
    """The PSF's trace radius at each position (bilinear between a `_WIDTH_NODES` grid
    of draws) where its width varies over the field, else ``sigma``: a wide-field PSF
    twice as wide in the corners as at the centre had every corner star cut as resolved
    by the centre's width, and the kernel was extrapolated there."""
    if psf is None:
        return sigma
    min_x, min_y, max_x, max_y = bbox
    xs, ys = np.linspace(min_x, max_x, _WIDTH_NODES), np.linspace(min_y, max_y, _WIDTH_NODES)
    draw = memo(psf.kernel_image)
    try:
        if is_constant(draw, xs, ys):
            return sigma
        moments = [[adaptive_moments(draw(u, v)) for u in xs] for v in ys]
        widths = np.sqrt(0.5 * np.array([[m[0] + m[1] for m in row] for row in moments]))
    except Exception:  # noqa: BLE001 - a profile without moments somewhere: one width
        return sigma
    if not np.all(np.isfinite(widths)) or np.ptp(widths) <= _WIDTH_SPREAD * widths.mean():
        return sigma
    from scipy.interpolate import RegularGridInterpolator

    at = RegularGridInterpolator((ys, xs), widths)
    return at(np.column_stack([np.clip(y, min_y, max_y), np.clip(x, min_x, max_x)]))


def select_kernel_sources(
    catalog: Table,
    science: Exposure,
    template: Exposure,
    kernel_size: int,
    config: SourcesConfig | None = None,
    psf_fwhm: float | None = None,
    edge_buffer: int = 0,
) -> Table:
    """Choose the sources whose stamps fit the PSF-matching kernel (algorithm.md 3.1).

    Cuts, in order (the count each removed goes to ``meta['rejected']``):
    non-finite or out-of-window S/N (``min_snr < snr < max_snr``); saturated,
    edge or masked flags (when the columns exist; a blend is the same in both images,
    so it stays a good stamp unless the isolation cut removes it); resolved sources,
    size > ``max_size_ratio`` x PSF sigma; a neighbour in the input catalog
    closer than ``isolation_radius_fwhm`` x FWHM; a stamp box of side
    ``2 kernel_size + 1`` centred on round(x, y) not inside the science box
    shrunk by ``edge_buffer`` (the centre a kernel size from the edge, Rubin's
    ``restrictKernelEdgeSources``); a box touching ``exclude_mask_planes``
    in the science or template mask (or leaving the template). Then, above
    ``max_kernel_sources``, the highest-S/N sources are kept round-robin over
    a coarse grid so they spread across the frame.

    Parameters
    ----------
    catalog : `astropy.table.Table`
        Needs ``x``, ``y`` (parent). ``snr`` (or ``flux`` and ``flux_err``),
        sizes and flags are measured on ``science`` when missing.
    science, template : `Exposure`
    kernel_size : int
        Kernel basis width (kSize); stamps are ``2 kernel_size + 1`` wide.
    config : `SourcesConfig` or None
    psf_fwhm : float or None
        Science PSF FWHM (px) for the size and isolation cuts; default from
        the science PSF (skipped if neither is known).
    edge_buffer : int
        Extra margin (kSize for the preconvolution task).

    Returns
    -------
    `astropy.table.Table`
        The selected rows, with ``snr`` and ``stamp_x0``, ``stamp_y0``,
        ``stamp_x1``, ``stamp_y1`` (inclusive parent box of each stamp).

    Raises
    ------
    InsufficientSourcesError
        Fewer than ``min_kernel_sources`` remain.
    """
    config = config or SourcesConfig()
    # columns copied, meta shallow: a detection catalog's meta holds frame-sized
    # segmentation images that a deep copy would duplicate (read here, never written)
    table = Table(
        [catalog[name].copy() for name in catalog.colnames],
        names=catalog.colnames,
        meta=dict(catalog.meta),
        copy=False,
    )
    if "x" not in table.colnames or "y" not in table.colnames:
        raise InvalidCatalogError("kernel-source catalog needs x and y columns")
    n_input = len(table)
    x_all = np.asarray(table["x"], dtype=np.float64)
    y_all = np.asarray(table["y"], dtype=np.float64)
    fwhm = psf_fwhm
    if fwhm is None and science.psf is not None:
        try:
            fwhm = science.psf.fwhm()
        except Exception:  # noqa: BLE001 - size and isolation cuts are then skipped
            fwhm = None
    needs = [c for c in ("snr", "size", "flag_saturated", "flag_edge", "flag_masked")]
    has_snr = "snr" in table.colnames or {"flux", "flux_err"} <= set(table.colnames)
    if n_input and (not has_snr or any(c not in table.colnames for c in needs[1:])):
        psf = science.psf or (GaussianPsf(fwhm / SIGMA_TO_FWHM) if fwhm else None)
        measured = measure_sources(science, x_all, y_all, psf=psf)
        for col in measured.colnames:
            if col in ("x", "y"):
                continue
            if col == "snr" and has_snr:
                continue
            if col in ("flux", "flux_err") and col in table.colnames:
                continue
            if col not in table.colnames:
                table[col] = measured[col]
        if fwhm is None:
            fwhm = SIGMA_TO_FWHM * float(measured.meta["psf_sigma"])
    if "snr" not in table.colnames:
        with np.errstate(divide="ignore", invalid="ignore"):
            table["snr"] = np.asarray(table["flux"], float) / np.asarray(table["flux_err"], float)
    snr = np.asarray(table[kernel_snr_column(table)], dtype=np.float64)
    keep = np.ones(n_input, dtype=bool)
    rejected: dict[str, int] = {}

    def cut(reason: str, bad: np.ndarray) -> None:
        newly = keep & bad
        rejected[reason] = int(newly.sum())
        keep[newly] = False

    cut("snr", ~(np.isfinite(snr) & (snr > config.min_snr) & (snr < config.max_snr)))
    flags = np.zeros(n_input, dtype=bool)
    for col in ("flag_saturated", "flag_edge", "flag_masked"):
        if col in table.colnames:
            flags |= np.asarray(table[col], dtype=bool)
    cut("flags", flags)
    if fwhm and "size" in table.colnames:
        size = np.asarray(table["size"], dtype=np.float64)
        sigma = _local_sigma(science.psf, science.bbox, x_all, y_all, fwhm / SIGMA_TO_FWHM)
        cut("resolved", ~np.isfinite(size) | (size > config.max_size_ratio * sigma))
    else:
        rejected["resolved"] = 0
    radius = config.isolation_radius_fwhm * (fwhm or 0.0)
    if radius > 0 and n_input > 1:
        tree = cKDTree(np.column_stack([x_all, y_all]))
        pairs = tree.query_pairs(radius, output_type="ndarray")
        crowded = np.zeros(n_input, dtype=bool)
        crowded[pairs.ravel()] = True
        cut("isolation", crowded)
    else:
        rejected["isolation"] = 0
    half = int(kernel_size)
    ix = np.floor(x_all + 0.5).astype(int)
    iy = np.floor(y_all + 0.5).astype(int)
    bx0, by0, bx1, by1 = ix - half, iy - half, ix + half, iy + half
    # Rubin keeps centres a kernel size from the edge, which is exactly the stamp box
    # fitting inside: no second kernel size of margin on top of the box
    margin = int(edge_buffer)
    min_x, min_y, max_x, max_y = science.bbox
    inside = (bx0 >= min_x + margin) & (by0 >= min_y + margin)
    inside &= (bx1 <= max_x - margin) & (by1 <= max_y - margin)
    cut("edge", ~inside)
    bad_sci = science.masked(config.exclude_mask_planes)
    bad_tpl = template.masked(config.exclude_mask_planes)
    touching = _box_counts(bad_sci, *science.xy0, bx0, by0, bx1, by1) > 0
    touching |= _box_counts(bad_tpl, *template.xy0, bx0, by0, bx1, by1) > 0
    t_min_x, t_min_y, t_max_x, t_max_y = template.bbox
    touching |= (bx0 < t_min_x) | (by0 < t_min_y) | (bx1 > t_max_x) | (by1 > t_max_y)
    cut("mask", touching)
    selected = np.nonzero(keep)[0]
    cap = config.max_kernel_sources
    if cap > 0 and selected.size > cap:
        chosen = _spread_order(x_all[selected], y_all[selected], snr[selected], science.bbox, cap)
        rejected["cap"] = int(selected.size - cap)
        selected = np.sort(selected[chosen])
    else:
        rejected["cap"] = 0
    n = int(selected.size)
    if n < config.min_kernel_sources:
        raise InsufficientSourcesError(
            f"Only {n} sources were selected for PSF matching, but "
            f"{config.min_kernel_sources} are required. {_advice(n_input, rejected)}"
        )
    result = table[selected]
    result["stamp_x0"] = bx0[selected]
    result["stamp_y0"] = by0[selected]
    result["stamp_x1"] = bx1[selected]
    result["stamp_y1"] = by1[selected]
    result.meta["rejected"] = rejected
    result.meta["n_input"] = n_input
    result.meta["kernel_size"] = half
    return result


_ADVICE = {
    "snr": "lower sources.min_snr (or raise sources.max_snr), or give a deeper catalog",
    "flags": "most sources are saturated, masked or at the edge; check the mask planes",
    "resolved": "most sources look resolved; raise sources.max_size_ratio or check the PSF",
    "isolation": "the field is crowded; lower sources.isolation_radius_fwhm",
    "edge": "stamps do not fit; use a smaller kernel (kernel.kernel_size_max)",
    "mask": "stamps touch masked pixels; check sources.exclude_mask_planes and template coverage",
}


def _advice(n_input: int, rejected: dict[str, int]) -> str:
    if n_input == 0:
        return "The catalog is empty: give sources or let alsub detect them."
    counts = {k: v for k, v in rejected.items() if k in _ADVICE and v > 0}
    summary = ", ".join(f"{v} by {k}" for k, v in counts.items())
    if not counts:
        return f"Of {n_input} input sources none was rejected by a cut."
    worst = max(counts, key=lambda name: counts[name])
    return f"Of {n_input} input sources, rejected {summary}; to fix: {_ADVICE[worst]}."


# --------------------------------------------------------------------------------------
# sky sources
def sky_sources(
    exposure: Exposure,
    n: int = 100,
    radius: float = 8.0,
    seed: int = 0,
    avoid_planes=("DETECTED", "DETECTED_NEGATIVE", "BAD", "NO_DATA", "EDGE", "SAT"),
    detect_if_needed: bool = True,
) -> Table:
    """Positions on empty sky for metrics (algorithm.md 6.3).

    Candidate centres come from a scrambled 2-D Halton sequence (seeded); a
    candidate is kept when its disc of ``radius`` lies inside the image and
    touches no ``avoid_planes`` pixel; each kept disc, grown to twice the radius,
    joins the avoid mask so positions do not overlap. Stops at ``n`` positions
    or after ``50 n`` candidates.

    Parameters
    ----------
    exposure : `Exposure`
        Not modified.
    n : int
        Positions wanted.
    radius : float
        Disc radius (pixels).
    seed : int
        Halton scrambling seed (reproducible positions).
    avoid_planes : sequence of str
    detect_if_needed : bool
        When no DETECTED pixel exists, detect sources on a copy first.

    Returns
    -------
    `astropy.table.Table`
        Columns ``x``, ``y`` (parent), ``radius``, ``sky_source`` (True).
    """
    if detect_if_needed and not exposure.any_masked(["DETECTED"]):
        work = exposure.copy()
        detect_sources(work, set_mask=True)
        avoid = work.masked(avoid_planes)
    else:
        avoid = exposure.masked(avoid_planes)
    for rows in row_blocks(avoid.shape[0]):  # no frame-sized temporary
        avoid[rows] |= ~np.isfinite(exposure.image[rows])
    ny, nx = exposure.shape
    x0, y0 = exposure.xy0
    r_in = int(math.ceil(radius))
    r_out = int(math.ceil(2 * radius))
    yy, xx = np.mgrid[-r_out : r_out + 1, -r_out : r_out + 1]
    disc_in = (xx**2 + yy**2 <= radius**2)[
        r_out - r_in : r_out + r_in + 1, r_out - r_in : r_out + r_in + 1
    ]
    disc_out = xx**2 + yy**2 <= (2 * radius) ** 2
    xs: list[float] = []
    ys: list[float] = []
    if n > 0 and nx > 2 * r_in and ny > 2 * r_in:
        sampler = qmc.Halton(d=2, scramble=True, seed=seed)
        candidates = sampler.random(50 * n)
        for u, v in candidates:
            cx = int(r_in + u * (nx - 2 * r_in - 1) + 0.5)
            cy = int(r_in + v * (ny - 2 * r_in - 1) + 0.5)
            window = avoid[cy - r_in : cy + r_in + 1, cx - r_in : cx + r_in + 1]
            if window[disc_in].any():
                continue
            xs.append(cx + x0)
            ys.append(cy + y0)
            j0, j1 = max(cy - r_out, 0), min(cy + r_out + 1, ny)
            i0, i1 = max(cx - r_out, 0), min(cx + r_out + 1, nx)
            avoid[j0:j1, i0:i1] |= disc_out[
                j0 - (cy - r_out) : j1 - (cy - r_out), i0 - (cx - r_out) : i1 - (cx - r_out)
            ]
            if len(xs) >= n:
                break
    return Table(
        {
            "x": np.array(xs, dtype=np.float64),
            "y": np.array(ys, dtype=np.float64),
            "radius": np.full(len(xs), float(radius)),
            "sky_source": np.ones(len(xs), dtype=bool),
        }
    )
