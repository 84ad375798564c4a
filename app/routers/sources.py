"""``/v1/subtractions/{id}/sources``, ``/forced`` and cutouts: what alert brokers consume.

The DIA-source catalog of a succeeded job (JSON, CSV or FITS, with filters),
forced PSF photometry on its difference at positions the caller gives, and
science / template / difference cutout triplets around a DIA source (FITS or
PNG). Same bearer-token auth and tenant isolation as the job routes: another
owner's job is a 404.
"""

from __future__ import annotations

import io
import math
from typing import Annotated, Any, Literal

import numpy as np
from astropy.table import Table
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from core.config import DiaSourceConfig
from store import Settings, Store

from ..deps import Caller, get_caller, get_settings, get_store
from ..errors import ApiError
from ..schemas import ErrorResponse
from .subtractions import NOT_DONE, _finished_job, _job_with_product

__all__ = ["router"]

router = APIRouter(prefix="/v1/subtractions", tags=["sources"])

#: Most positions one forced-photometry request may carry.
_MAX_POSITIONS = 10_000

_AUTH = {401: {"model": ErrorResponse, "description": "Missing or invalid bearer token."}}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown job or source, or not yours."}}
_NOT_DONE = {409: {"model": ErrorResponse, "description": NOT_DONE}}

_SOURCE_EXAMPLE = {
    "id": 0,
    "x": 311.42,
    "y": 87.03,
    "ra": 150.0123,
    "dec": 2.0071,
    "psf_flux": 10422.5,
    "psf_flux_err": 212.3,
    "snr": 49.1,
    "detection_snr": 48.7,
    "is_negative": False,
    "is_dipole": False,
    "science_flux": 10398.0,
    "template_flux": -12.4,
    "flags": 0,
}


class ForcedPosition(BaseModel):
    """One position: ``x`` and ``y`` (0-based column and row of the science array) or
    ``ra`` and ``dec`` (degrees; needs a WCS). All positions of a request use one kind."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"x": 311.4, "y": 87.0}]}
    )

    x: float | None = Field(None, description="Column (pixels, 0-based).")
    y: float | None = Field(None, description="Row (pixels, 0-based).")
    ra: float | None = Field(None, description="Right ascension (degrees).")
    dec: float | None = Field(None, description="Declination (degrees).")
    id: (
        Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
        | Annotated[str, StringConstraints(max_length=200, pattern=r"^[ -~]*$")]
        | None
    ) = Field(
        None,
        description="The caller's id of the object, returned in its row as `id` (every "
        "position with one, or none): an integer of 64 bits or printable ASCII text, as "
        "a FITS table holds them.",
    )

    @field_validator("x", "y", "ra", "dec", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # lax floats take true as 1.0: a position of `true` is a client's mistake
        if isinstance(value, bool):
            raise ValueError("a coordinate must be a number, not a boolean")
        return value


def _json_body(request: Request) -> None:
    """Refuse a body that is not declared JSON (415, as job submission does): read as
    text, it failed as "Input should be a valid list"."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "unsupported_media_type", "send the positions as application/json")


async def _not_too_many(request: Request) -> None:
    """Refuse a list of more than `_MAX_POSITIONS` before its items are validated: a
    million positions took 7 s of the API's CPU in pydantic (its health check stalled
    with it) to be refused for their number. The body is parsed once: FastAPI parsed it
    already and the request keeps it."""
    try:
        body = await request.json()
    except ValueError:  # empty or not JSON: the body's validation names it
        return
    if isinstance(body, list) and len(body) > _MAX_POSITIONS:
        raise ApiError(422, "invalid_positions", f"at most {_MAX_POSITIONS} positions per request")


def _catalog(store: Store, job_id: str) -> Table:
    from core.diasources import read_dia_sources

    path = store.products.path(job_id, "dia_sources")
    if path is None:
        raise ApiError(
            404,
            "no_dia_sources",
            f"job {job_id} has no DIA-source catalog (it ran with dia.enabled = false); "
            "resubmit with DIA sources enabled",
        )
    return read_dia_sources(path)


def _rows(table: Table) -> list[dict]:
    """Table rows as JSON objects (NaN as null, numpy scalars as Python numbers)."""
    columns = {name: table[name].tolist() for name in table.colnames}
    out = []
    for k in range(len(table)):
        row = {}
        for name, values in columns.items():
            value = values[k]
            row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        out.append(row)
    return out


def _table_response(table: Table, format: str, filename: str, extname: str) -> Response:
    from core.diasources import catalog_hdulist

    if format == "csv":
        buffer = io.StringIO()
        table.write(buffer, format="ascii.csv")
        return Response(
            buffer.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'},
        )
    if format == "fits":
        buffer = io.BytesIO()
        catalog_hdulist(table, extname).writeto(buffer)
        return Response(
            buffer.getvalue(),
            media_type="application/fits",
            headers={"Content-Disposition": f'attachment; filename="{filename}.fits"'},
        )
    return JSONResponse(_rows(table))


_TABLE_CONTENT = {
    "application/json": {"example": [_SOURCE_EXAMPLE]},
    "text/csv": {"schema": {"type": "string"}},
    "application/fits": {"schema": {"type": "string", "format": "binary"}},
}


@router.get(
    "/{job_id}/sources",
    summary="DIA sources of a subtraction",
    description="The catalog of what changed: one object per DIA source (positive, negative or "
    "dipole), most significant first (by |detection_snr|, the S/N the detection found; "
    "`min_snr` filters on |snr|, the PSF fit's, which a dipole's lobes or an edge can set "
    "apart from it). Columns: `id`, `x`, `y` (0-based column and row of the "
    "science array), `ra`, `dec` (degrees; null without WCS), `psf_flux`, `psf_flux_err` "
    "(science counts), `snr`, `detection_snr`, `aperture_flux` and its error (null where the "
    "aperture touches no-data, edge or bad pixels), moments `ixx`, `iyy`, `ixy`, `footprint` "
    "and `n_peaks` (the detection footprint's number and its peaks: more than one, deblended), "
    "`is_negative`, `is_dipole`, `dipole_separation`, `dipole_angle`, `dipole_pos_flux`, "
    "`dipole_neg_flux` (separation and lobe fluxes null where the fit cannot tell them: lobes "
    "closer than a PSF FWHM with no star under them), `science_flux`, `template_flux` (PSF "
    "fluxes on the matched science and template above the median of a ring around the fit, "
    "to tell a brightening from a new source; null where saturated pixels leave too little "
    "of the PSF) and their errors (pixel noise, correlations included; not the confusion of a "
    "crowded field), `flags` (bits: edge 1, saturated 2, bad 4, interpolated 8, no_data 16, "
    "bright_star 32: within 3 PSF FWHM of a template star bright enough that its residual "
    "(dia.bright_star_residual of its light, 2%) reaches the detection threshold, whose "
    "residual it may be (not a change of the star's own light by a fifth or more), or "
    "where a saturated star's residual (its light fitted on its unsaturated wings, through "
    "the detection filter; 0.4% of it within the kernel's reach) can reach the threshold "
    "and the source is no brighter (docs/DIA_FLAGS.md), "
    "suspect_kernel 64: far outside the kernel sources the fit used, where a spatially "
    "varying kernel or background is extrapolated, streak 128: one "
    "of five or more sources strung along "
    "a line, a trail or a saturated star's row, or a STREAK pixel within 1 FWHM; sharp 256: "
    "narrower than the PSF, a cosmic ray or hot pixel, not raised on a preconvolve score; "
    "suspect 512: a SUSPECT pixel, past the linearity limit, within 1 FWHM) and a boolean "
    "`flag_<name>` per bit. "
    "`format=csv` or `fits` gives the same rows as a table file (FITS: the `DIASOURCES` "
    "extension); its header also gives "
    "the science exposure's MJD-OBS, DATE-OBS, FILTER, EXPTIME and BUNIT, and column units "
    "(TUNIT). Served as soon as `dia_sources` is in the job's `products`, while the job still "
    "writes its matched images.",
    responses={
        200: {"content": _TABLE_CONTENT, "description": "The DIA sources."},
        **_AUTH,
        **_NOT_FOUND,
        **_NOT_DONE,
    },
)
def list_sources(
    job_id: str,
    format: Literal["json", "csv", "fits"] = Query("json", description="json, csv or fits."),
    min_snr: float | None = Query(
        None, ge=0, description="Keep sources with |snr| (the PSF fit's) >= this."
    ),
    sign: Literal["positive", "negative", "dipole"] | None = Query(
        None, description="Keep only positive, negative or dipole sources."
    ),
    exclude_flags: int = Query(
        0, ge=0, description="Drop sources with any of these flag bits (e.g. 1 = edge)."
    ),
    limit: int | None = Query(
        None,
        ge=1,
        description="At most this many, the first in the catalog's order (largest "
        "|detection_snr| first).",
    ),
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
) -> Response:
    # as soon as the catalog is published (the job still running): it answered 409 while
    # /products/dia_sources served the same file
    _job_with_product(store, job_id, caller, "dia_sources")
    table = _catalog(store, job_id)
    keep = np.ones(len(table), dtype=bool)
    if min_snr is not None:
        keep &= np.abs(np.nan_to_num(np.asarray(table["snr"], dtype=float))) >= min_snr
    if sign == "positive":
        keep &= ~np.asarray(table["is_negative"]) & ~np.asarray(table["is_dipole"])
    elif sign == "negative":
        keep &= np.asarray(table["is_negative"])
    elif sign == "dipole":
        keep &= np.asarray(table["is_dipole"])
    from core.forced import FLAG_BITS

    # bits no flag uses cannot match: masked off, a value beyond the column's integer
    # (2^31 and up) filters as its defined bits do
    bits = exclude_flags & sum(bit for bit, _ in FLAG_BITS.values())
    if bits:
        keep &= (np.asarray(table["flags"], dtype=np.int64) & bits) == 0
    table = table[keep]
    if limit is not None:
        table = table[:limit]
    return _table_response(table, format, f"{job_id}-dia_sources", "DIASOURCES")


@router.post(
    "/{job_id}/forced",
    summary="Forced photometry on the difference",
    description="PSF photometry of the job's difference at the given positions (light curves "
    "of known objects): one object per position, in the order given (with its `id` when the "
    "positions carry one), with `x`, `y`, `ra`, "
    "`dec`, `psf_flux`, `psf_flux_err` (science counts; errors include correlated noise), "
    f"`snr` and `flags` (bits as for the sources; bright_star and suspect_kernel from the "
    f"job's matched template and kernel sources, as in its catalog) with a boolean "
    "`flag_<name>` per bit. A position whose fitting box misses the frame, or a sky position "
    "the WCS cannot project (`x`, `y` null), gets its row with null fluxes, flagged edge and "
    "no_data. Between 1 and "
    f"{_MAX_POSITIONS} positions; no positions or more, positions of neither or both kinds, "
    "a non-finite coordinate, a dec beyond 90 degrees or an ra outside [0, 360) (not "
    "wrapped) are refused with 422 `invalid_positions`, naming the position; a body "
    "that is not a list of such objects (a coordinate that is no number) with 422 "
    "`invalid_request`. "
    "`format=csv` or `fits` returns a table file (FITS: the rows in the `FORCED` "
    "extension; the catalog's is `DIASOURCES`).",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": [
                        {
                            "x": 311.4,
                            "y": 87.0,
                            "ra": 150.0123,
                            "dec": 2.0071,
                            "psf_flux": 10420.1,
                            "psf_flux_err": 211.9,
                            "snr": 49.2,
                            "flags": 0,
                        }
                    ]
                },
                "text/csv": {"schema": {"type": "string"}},
                "application/fits": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "One row per position, in order.",
        },
        **_AUTH,
        **_NOT_FOUND,
        **_NOT_DONE,
        415: {"model": ErrorResponse, "description": "The body is not JSON."},
        422: {"model": ErrorResponse, "description": "Bad positions, or no difference."},
    },
)
def forced(
    job_id: str,
    _: None = Depends(_json_body),
    __: None = Depends(_not_too_many),
    positions: list[ForcedPosition] = Body(
        ...,
        description="Positions: all with x and y, or all with ra and dec.",
        examples=[[{"x": 311.4, "y": 87.0}, {"x": 20.0, "y": 400.5}]],
    ),
    format: Literal["json", "csv", "fits"] = Query("json", description="json, csv or fits."),
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
) -> Response:
    from pydantic import ValidationError

    from core.config import SubtractionConfig
    from core.diasources import FORCED_EXTNAME
    from core.forced import forced_photometry
    from core.io import read_exposure
    from core.products import read_kernel_sources

    record = _finished_job(store, job_id, caller)
    if not positions:
        raise ApiError(422, "invalid_positions", "give at least one position")
    if len(positions) > _MAX_POSITIONS:
        raise ApiError(422, "invalid_positions", f"at most {_MAX_POSITIONS} positions per request")
    kind = _position_kind(positions)
    path = store.products.path(job_id, "difference")
    if path is None:
        raise ApiError(
            422,
            "no_difference",
            f"job {job_id} made a {record.mode} score, not a difference; forced photometry "
            "needs a difference (submit with another mode)",
        )
    values = {k: [getattr(p, k) for p in positions] for k in kind}
    ids = _ids(positions)
    difference = read_exposure(path, name="difference")
    # flagged as the job's catalog is: near its matched template's bright stars, far
    # outside its kernel sources, with the job's thresholds
    try:
        config = SubtractionConfig.model_validate({**record.config, "mode": record.mode})
    except ValidationError:  # a job stored under an older schema: the defaults
        config = SubtractionConfig()
    template = store.products.path(job_id, "matched_template")
    kernel = store.products.path(job_id, "kernel")
    table = forced_photometry(
        difference,
        config=config.dia.forced,
        dia=config.dia,
        matched_template=read_exposure(template, name="matched template") if template else None,
        kernel_sources=read_kernel_sources(kernel) if kernel else None,
        **values,
    )
    if ids is not None:  # a light curve is joined to its objects by their ids
        table.add_column(ids, name="id", index=0)
    return _table_response(table, format, f"{job_id}-forced", FORCED_EXTNAME)


def _ids(positions: list[ForcedPosition]) -> list | None:
    """The positions' ids (all integers, else all as text), or None when none has one."""
    ids = [p.id for p in positions]
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        missing = next(k for k, i in enumerate(ids) if i is None)
        raise ApiError(
            422,
            "invalid_positions",
            f"position {missing} has no id: give an id for every position or for none",
        )
    return ids if all(isinstance(i, int) for i in ids) else [str(i) for i in ids]


def _job_cutout_size(config: dict) -> int:
    """dia.cutout_size of a job's stored config; the default where it has none (a job of
    an older schema)."""
    value = (config.get("dia") or {}).get("cutout_size")
    return value if isinstance(value, int) and value > 0 else DiaSourceConfig().cutout_size


def _position_kind(positions: list[ForcedPosition]) -> tuple[str, str]:
    both = [i for i, p in enumerate(positions) if p.x is not None and p.ra is not None]
    if both:
        # which of the two to measure at would be a guess: they rarely agree exactly
        raise ApiError(
            422,
            "invalid_positions",
            f"position {both[0]} gives both x/y and ra/dec: give one kind per position",
        )
    for kind in (("x", "y"), ("ra", "dec")):
        if all(None not in (getattr(p, kind[0]), getattr(p, kind[1])) for p in positions):
            return kind
    raise ApiError(
        422,
        "invalid_positions",
        "every position needs x and y (pixels), or every position ra and dec (degrees)",
    )


@router.get(
    "/{job_id}/sources/{source_id}/cutouts",
    summary="Cutout triplet of a DIA source",
    description="Science (matched), template (matched) and difference (or score) stamps of "
    "`size` x `size` pixels centred on the source, as in alert packets: `format=fits` gives "
    "three image HDUs SCIENCE, TEMPLATE, DIFFERENCE with their WCS (NaN beyond the frame; "
    "each one's PRODUCT card names the product it is cut from: a preconvolve job's third "
    "stamp is its score, and its PNG panel says so; BUNIT its unit, the template's the "
    "science's as its pixels are; MJD-OBS and DATE-OBS its own image's epoch, the "
    "template's on TEMPLATE, none where unknown), then a MASK HDU: one int32 plane for "
    "the three stamps with the products' mask bits (`MP_<NAME>` cards), the OR of their "
    "masks, NO_DATA also beyond the frame. The EDGE band and NO_DATA pixels (no template "
    "coverage) keep the values copied there, as in the products: mask "
    "`MASK & (NO_DATA | EDGE)` before using a stamp. The primary header gives the source's "
    "DIASRCID, X, Y, RA, DEC and the science's MJD-OBS, DATE-OBS and FILTER where known; "
    "`format=png` the three side by side (zscale + asinh each), each enlarged by a whole "
    "factor to at least 180 px and labelled above, in pixel order as ds9 shows the FITS: "
    "row 0 (y = 0) at the bottom, column 0 at the left, not turned north up (the FITS "
    "stamps' WCS gives the sky's orientation).",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/fits": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "The cutout triplet.",
        },
        **_AUTH,
        **_NOT_FOUND,
        **_NOT_DONE,
        422: {"model": ErrorResponse, "description": "Bad size."},
    },
)
def source_cutouts(
    job_id: str,
    source_id: int,
    size: int | None = Query(
        None,
        ge=5,
        description="Stamp side in pixels: odd (the source's pixel at the centre), at most "
        "ALSUB_MAX_CUTOUT_SIZE (the largest odd number up to it). Default: the job's "
        "dia.cutout_size.",
    ),
    format: Literal["fits", "png"] = Query("fits", description="fits or png."),
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> Response:
    from core.cutouts import (
        TRIPLET,
        source_header,
        triplet_fits,
        triplet_from_files,
        triplet_png,
    )

    record = _finished_job(store, job_id, caller)
    what = "size"
    if size is None:  # the job's own dia.cutout_size (it was the class default, always 63)
        size, what = _job_cutout_size(record.config), "the job's dia.cutout_size"
    # odd: the source's pixel at the centre (a query parameter, not the config: the
    # request is what is wrong)
    largest = settings.max_cutout_size - (1 - settings.max_cutout_size % 2)
    if size % 2 == 0 or not 5 <= size <= largest:
        give = "" if what == "size" else "; give size"
        raise ApiError(
            422,
            "invalid_request",
            f"{what} must be odd (the source's pixel at the centre) and at most {largest}, "
            f"got {size}{give}",
        )
    table = _catalog(store, job_id)
    match = np.flatnonzero(np.asarray(table["id"]) == source_id)
    if match.size == 0:
        raise ApiError(404, "not_found", f"job {job_id} has no DIA source {source_id}")
    row = table[int(match[0])]
    output = "difference" if store.products.path(job_id, "difference") else "score"
    paths = {}
    for name, product in zip(TRIPLET, ("matched_science", "matched_template", output), strict=True):
        path = store.products.path(job_id, product)
        if path is None:
            raise ApiError(404, "not_found", f"job {job_id} has no {product} product")
        paths[name] = path
    stamps = triplet_from_files(paths, [float(row["x"])], [float(row["y"])], size)
    if format == "png":
        return Response(triplet_png(stamps), media_type="image/png")
    return Response(
        triplet_fits(stamps, 0, source_header(row, table.meta)),
        media_type="application/fits",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-source-{source_id}.fits"'},
    )
