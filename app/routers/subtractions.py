"""``/v1/subtractions``: submit jobs, poll them, list them, download products, cancel/delete."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core.products import PRODUCT_NAMES
from store import ACTIVE_STATES, ExposureRef, JobRecord, Settings, Store, new_job_id
from store.callbacks import CallbackRefusedError, resolve_callback
from store.records import decode_cursor, job_view
from store.sweeper import is_stale, judged_from, reach, requeue_if_stale

from ..deps import Caller, get_caller, get_queue, get_settings, get_store
from ..errors import ApiError, shown
from ..head import HEAD_AS_GET
from ..imaging import EXPOSURE_PRODUCTS, cutout_fits, cutout_png, image_plane, png_bytes
from ..ingest import (
    PLANE_KINDS,
    combine_planes,
    ingest_catalog,
    ingest_exposure,
    limited_request,
    read_capped,
    with_form_planes,
    writer_from_file,
    writer_from_upload,
)
from ..queue import JobQueue
from ..schemas import ErrorResponse, InputRef, JobList, JobOut, SubtractionRequest
from ..uris import open_uri
from .exposures import owned_exposure

__all__ = ["router"]

router = APIRouter(prefix="/v1/subtractions", tags=["subtractions"])

#: The product names of a route's path, from the one list core writes (an enum in OpenAPI).
ProductName = Literal[PRODUCT_NAMES]  # type: ignore[valid-type]
_MAX_JSON_BYTES = 4 * 1024 * 1024

_AUTH = {401: {"model": ErrorResponse, "description": "Missing or invalid bearer token."}}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown job, or not yours."}}

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON SubtractionRequest, or a one-shot multipart/form-data form with the "
        "two FITS files and the config JSON. Per-input planes go with either: as `planes` "
        "(file:// URIs) of an input in JSON, as `science_noise`, `template_psf`, ... file fields "
        "in the form, or uploaded with the image to POST /v1/exposures beforehand. A form "
        "field of another name, or a text field sent as a file, is refused (422).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/SubtractionRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["science", "template"],
                    "properties": {
                        "science": {"type": "string", "format": "binary"},
                        "template": {"type": "string", "format": "binary"},
                        "sources": {
                            "type": "string",
                            "format": "binary",
                            "description": "Optional catalog (FITS table, CSV or JSON), as a file "
                            "or as text.",
                        },
                        "config": {
                            "type": "string",
                            "description": "SubtractionConfig as JSON (text or a file).",
                            "example": '{"do_decorrelation": true}',
                        },
                        "mode": {
                            "type": "string",
                            "enum": ["auto", "convolveTemplate", "convolveScience", "preconvolve"],
                        },
                        "idempotency_key": {"type": "string"},
                        "callback_url": {"type": "string"},
                        **{
                            f"{role}_{kind}": {
                                "type": "string",
                                "format": "binary",
                                "description": f"Optional {kind} plane of the {role} exposure.",
                            }
                            for role in ("science", "template")
                            for kind in ("variance", "noise", "weight", "mask", "psf")
                        },
                    },
                }
            },
        },
    }
}


def _job_out(record: JobRecord, include: str | None = None) -> JobOut:
    return JobOut.model_validate(job_view(record, include_config=_wants_config(include)))


def _wants_config(include: str | None) -> bool:
    names = {part.strip() for part in (include or "").split(",") if part.strip()}
    unknown = names - {"config"}
    if unknown:
        raise ApiError(422, "invalid_request", f"include accepts only 'config', not {unknown}")
    return "config" in names


_INCLUDE = Query(None, description="`config` to add the job's full SubtractionConfig.")


def _owned_job(store: Store, job_id: str, caller: Caller) -> JobRecord:
    record = store.records.get(job_id) if len(job_id) <= 64 else None
    if record is None or record.owner != caller.owner:
        raise ApiError(404, "not_found", f"no subtraction job {shown(job_id)}")
    return record


# submission -----------------------------------------------------------------------------------
def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where or 'body'}: {first['msg']}"


async def _read_json(request: Request) -> SubtractionRequest:
    limited = limited_request(request, _MAX_JSON_BYTES)
    body = await limited.body()
    try:
        return SubtractionRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _first_error(exc)) from None


#: Text fields of a one-shot submission form; `_FORM_FILES` and their planes are files.
_FORM_TEXT = ("mode", "idempotency_key", "callback_url")
_FORM_FILES = ("science", "template")


def _check_form_fields(form) -> None:
    """Refuse a form field the submission does not know, or a text field sent as a file:
    a misspelt plane (``science_nosie``) or a mode sent as a file was dropped without a
    word and the job ran without it."""
    planes = {f"{role}_{kind}" for role in _FORM_FILES for kind in PLANE_KINDS}
    known = {*_FORM_TEXT, *_FORM_FILES, *planes, "sources", "config"}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise ApiError(
            422,
            "invalid_request",
            f"unknown form field(s) {', '.join(unknown)}: expected science and template "
            f"(files), optionally their planes ({', '.join(sorted(planes))}), sources and "
            f"config (file or text), {', '.join(_FORM_TEXT)} (text)",
        )
    for key in _FORM_TEXT:
        if form.get(key) is not None and not isinstance(form.get(key), str):
            raise ApiError(422, "invalid_request", f"form field {key!r} must be text, not a file")


async def _form_text(part, cap: int, what: str) -> bytes | None:
    """A form field given as a file or as text, as bytes: None when absent, left blank
    (empty text) or no file chosen (an empty part without a file name, as a browser sends
    it); a chosen file that is empty is b"" (the caller refuses what must hold data)."""
    if part is None:
        return None
    data = part.encode() if isinstance(part, str) else await part.read(cap + 1)
    if len(data) > cap:
        raise ApiError(413, "upload_too_large", f"{what} exceeds {cap} bytes")
    if not data and (isinstance(part, str) or not part.filename):
        return None
    return data


async def _read_form(
    request: Request, caller: Caller, settings: Settings, store: Store
) -> tuple[SubtractionRequest, bytes | None]:
    cap = settings.max_upload_bytes
    n_files = 3 + 2 * len(PLANE_KINDS)
    limited = limited_request(request, n_files * cap + 1024 * 1024)
    async with limited.form(max_files=n_files, max_fields=10) as form:
        _check_form_fields(form)
        ids = {}
        for role in _FORM_FILES:
            upload = form.get(role)
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "invalid_request", f"the form needs a file field {role!r}")
            writer = await writer_from_upload(upload, store.exposures, cap)
            writer = await with_form_planes(writer, form, f"{role}_", store, settings, role)
            ids[role], _ = await ingest_exposure(writer, store, settings, caller.owner, role)
        catalog = await _form_text(form.get("sources"), cap, "the catalog")
        fields = {key: form.get(key) for key in _FORM_TEXT if form.get(key)}
        config_text = await _form_text(form.get("config"), cap, "the config")
    try:
        config = json.loads(config_text) if config_text else {}
    except (ValueError, RecursionError) as exc:  # too deep a nesting (it answered 500)
        raise ApiError(
            422,
            "invalid_request",
            f"config: not valid JSON ({exc}); send the SubtractionConfig as JSON text, "
            'e.g. {"do_decorrelation": true}',
        ) from None
    try:
        req = SubtractionRequest.model_validate(
            {
                "science": {"exposure_id": ids["science"]},
                "template": {"exposure_id": ids["template"]},
                "config": config,
                **fields,
            }
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", _first_error(exc)) from None
    return req, catalog


async def _resolve_input(
    ref: InputRef, role: str, caller: Caller, settings: Settings, store: Store
) -> ExposureRef:
    # Every URI is opened once, under a root and without links (app.uris), and copied into
    # the store's temporary area: later reads are of those copies, never of the URI again.
    cap = settings.max_upload_bytes
    plane_writers = []
    try:
        planes = {}
        for kind, uri in (ref.planes or {}).items():
            handle = await run_in_threadpool(open_uri, uri, settings)
            plane_writers.append(await writer_from_file(handle, store.exposures, cap))
            planes[kind] = plane_writers[-1].path
        if ref.exposure_id is not None:
            await owned_exposure(store, ref.exposure_id, caller)
            if not planes:
                return ExposureRef(exposure_id=ref.exposure_id)
            handle = open(store.exposures.path(ref.exposure_id), "rb")  # our own stored blob
        else:
            handle = await run_in_threadpool(open_uri, ref.uri, settings)
        writer = await writer_from_file(handle, store.exposures, cap)
        if planes:
            writer = await combine_planes(writer, planes, store, settings, role)
    finally:
        for plane in plane_writers:
            plane.abort()
    sha, _ = await ingest_exposure(writer, store, settings, caller.owner, role)
    return ExposureRef(exposure_id=sha, uri=ref.uri)


async def _resolve_sources(req: SubtractionRequest, settings: Settings) -> bytes | None:
    if req.sources is None:
        return None
    if req.sources.inline is not None:
        return req.sources.inline.encode()
    handle = await run_in_threadpool(open_uri, req.sources.uri, settings)
    return await run_in_threadpool(read_capped, handle, settings.max_upload_bytes, "the catalog")


def _fingerprint(req: SubtractionRequest, catalog: bytes | None, mode: str) -> str:
    canonical = {
        "science": req.science.model_dump(),
        "template": req.template.model_dump(),
        "mode": mode,
        "config": req.config.model_dump(mode="json"),
        "sources": hashlib.sha256(catalog).hexdigest() if catalog else None,
        "callback_url": req.callback_url,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a subtraction",
    description="Validates the inputs, records the job as `queued` and enqueues it; answers 202 "
    "with `Location: /v1/subtractions/{id}`. With an `idempotency_key` (or an `Idempotency-Key` "
    "header) a retried submission returns the same job.",
    responses={
        **_AUTH,
        404: {"model": ErrorResponse, "description": "Exposure id unknown or not yours."},
        409: {"model": ErrorResponse, "description": "Idempotency key reused, other request."},
        413: {"model": ErrorResponse, "description": "An uploaded file is too large."},
        415: {"model": ErrorResponse, "description": "Neither JSON nor multipart/form-data."},
        422: {"model": ErrorResponse, "description": "Invalid request, exposure, catalog or URI."},
        429: {"model": ErrorResponse, "description": "Too many active jobs or requests."},
    },
    openapi_extra=_SUBMIT_BODY,
)
async def submit_subtraction(
    request: Request,
    response: Response,
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
    queue: JobQueue = Depends(get_queue),
) -> JobOut:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("application/json"):
        req = await _read_json(request)
        catalog = None
    elif content_type.startswith("multipart/form-data"):
        req, catalog = await _read_form(request, caller, settings, store)
    else:
        raise ApiError(
            415, "unsupported_media_type", "send application/json or multipart/form-data"
        )
    if req.callback_url is not None:
        try:
            await run_in_threadpool(
                resolve_callback, req.callback_url, settings.callback_allowed_networks
            )
        except CallbackRefusedError as exc:
            raise ApiError(422, "invalid_callback_url", str(exc)) from None
    key = req.idempotency_key or request.headers.get("idempotency-key") or None
    if key is not None and len(key) > 200:
        raise ApiError(422, "invalid_request", "idempotency key longer than 200 characters")
    science = await _resolve_input(req.science, "science", caller, settings, store)
    template = await _resolve_input(req.template, "template", caller, settings, store)
    if science.exposure_id == template.exposure_id:
        raise ApiError(
            422,
            "identical_inputs",
            "science and template are the same exposure: a difference of an image with itself "
            "is empty; give a template taken at another time",
        )
    if catalog is None:
        catalog = await _resolve_sources(req, settings)
    catalog_uri = req.sources.uri if req.sources is not None else None
    # an empty catalog given (a file, an inline text, a URI) is refused there, not dropped
    sources_id = (
        await ingest_catalog(catalog, store, caller.owner, catalog_uri)
        if catalog is not None
        else None
    )
    mode = req.mode or req.config.mode
    config = req.config.model_dump(mode="json")
    config["mode"] = mode
    record = JobRecord(
        id=new_job_id(),
        owner=caller.owner,
        science=science,
        template=template,
        sources_id=sources_id,
        mode=mode,
        config=config,
        idempotency_key=key,
        callback_url=req.callback_url,
    )
    fingerprint = _fingerprint(req, catalog, mode)
    record, created = await run_in_threadpool(store.records.create, record, fingerprint)
    if created:
        active = await run_in_threadpool(store.records.count_active, caller.owner)
        if active > settings.max_concurrent_jobs:
            await run_in_threadpool(store.records.delete, record.id)
            raise ApiError(
                429,
                "too_many_jobs",
                f"{settings.max_concurrent_jobs} jobs are already queued or running for this "
                "token; wait for one to finish",
                headers={"Retry-After": "5"},
            )
        try:
            await run_in_threadpool(queue.enqueue, record.id)
        except Exception:
            # Without its message nothing would ever run the job (Redis mode has no start-up
            # requeue) and it would count against the token's active jobs forever.
            await run_in_threadpool(store.records.delete, record.id)
            raise
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/subtractions/{record.id}"
    return _job_out(record)


# reading --------------------------------------------------------------------------------------
@router.get(
    "",
    response_model=JobList,
    summary="List jobs",
    description="The caller's jobs, newest first, filtered by state and creation time, one page "
    "at a time: pass the returned `next_cursor` as `cursor` for the next page.",
    responses={**_AUTH, 422: {"model": ErrorResponse, "description": "Bad filter or cursor."}},
)
def list_subtractions(
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(
        None, description="Only jobs in this state."
    ),
    since: datetime | None = Query(
        None, description="Only jobs created at or after this ISO 8601 time."
    ),
    limit: int = Query(50, ge=1, description="Page size (at most ALSUB_MAX_LIST_LIMIT)."),
    cursor: str | None = Query(None, description="next_cursor of the previous page."),
    include: str | None = _INCLUDE,
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> JobList:
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise ApiError(422, "invalid_cursor", "cursor is not one this API returned") from None
    since_ts = None
    if since is not None:
        # A time without a zone is UTC, like the times this API writes.
        since_ts = (since if since.tzinfo else since.replace(tzinfo=UTC)).timestamp()
    records, next_cursor = store.records.list(
        caller.owner, state, since_ts, min(limit, settings.max_list_limit), cursor
    )
    return JobList(items=[_job_out(r, include) for r in records], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Job state",
    description="State, progress (stage and fraction), timings, metrics, error and product links. "
    "`mode` is the direction the run chose once it has run; `?include=config` adds the config.",
    responses={**_AUTH, **_NOT_FOUND},
)
def get_subtraction(
    job_id: str,
    include: str | None = _INCLUDE,
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
    queue: JobQueue = Depends(get_queue),
) -> JobOut:
    # through `reach`: after an outage (or a long silence) heartbeats are judged later
    record = reach(store.records, settings, lambda: _owned_job(store, job_id, caller))
    if is_stale(record, settings.heartbeat_timeout, since=judged_from(store.records, settings)):
        # Sweep on read: a job whose worker died is requeued (or failed) right here. Checked
        # first so polling a live job costs no write transaction.
        record = requeue_if_stale(store.records, job_id, settings, queue.enqueue) or record
    return _job_out(record, include)


#: The 409 of a product asked for before it exists (`_no_products_yet`), for the docs.
NOT_DONE = (
    "The job has not succeeded: `job_not_succeeded` while it is queued or running, "
    "`job_failed` or `job_cancelled` when it never will."
)


def _no_products_yet(record: JobRecord, what: str) -> ApiError:
    """409 for a job without ``what``: ``job_not_succeeded`` while it may still come
    (queued, running), ``job_failed`` or ``job_cancelled`` when it never will, so that a
    poller knows to stop."""
    if record.state in ("failed", "cancelled"):
        code = (record.error or {}).get("code") if record.state == "failed" else None
        why = f" ({code})" if code else ""
        then = "see its error, then resubmit" if record.state == "failed" else "resubmit it"
        return ApiError(
            409,
            f"job_{record.state}",
            f"job {record.id} {record.state}{why}: it has no {what} and never will; {then}",
        )
    message = f"job {record.id} is {record.state}; its {what} is not written yet"
    return ApiError(409, "job_not_succeeded", message)


def _finished_job(store: Store, job_id: str, caller: Caller) -> JobRecord:
    record = _owned_job(store, job_id, caller)
    if record.state != "succeeded":
        raise _no_products_yet(record, "products")
    return record


def _job_with_product(store: Store, job_id: str, caller: Caller, name: str) -> JobRecord:
    """A succeeded job, or a running one whose record lists ``name`` already: the worker
    publishes the difference (and metrics, kernel, DIA sources) before writing the
    frame-sized rest, so the difference can be downloaded before the job ends."""
    record = _owned_job(store, job_id, caller)
    if record.state == "running" and name in record.products:
        return record
    if record.state != "succeeded":
        raise _no_products_yet(record, f"{name} product")
    return record


class _ProductFile(FileResponse):
    """A product file sent in 1 MiB chunks: each chunk is a thread hop, and Starlette's
    64 KiB default made a 200 MB difference take twice as long to download. A HEAD routed
    as a GET (`app.head.HEAD_AS_GET`) gets the headers without the file being read."""

    chunk_size = 1 << 20

    async def __call__(self, scope, receive, send) -> None:
        if scope.get(HEAD_AS_GET):
            scope = {**scope, "method": "HEAD"}
        await super().__call__(scope, receive, send)


@router.get(
    "/{job_id}/products/{name}",
    summary="Download a product",
    description="The product as FITS (MEF layout), or `format=png` for a preview (zscale + asinh "
    "stretch). With `x` and `y` (parent pixel coordinates) a `size`-pixel cutout, FITS or PNG, "
    "clipped at the frame's edges (the DIA-source cutouts pad with NaN instead). "
    "A product can be downloaded as soon as its link is in the job's `products`: the "
    "difference (or score) is published while the job is still `running` and writes the "
    "matched images and background.",
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/fits": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "The product file, preview or cutout.",
        },
        **_AUTH,
        **_NOT_FOUND,
        409: {"model": ErrorResponse, "description": NOT_DONE},
        422: {"model": ErrorResponse, "description": "Bad cutout request."},
    },
)
def get_product(
    job_id: str,
    name: ProductName,
    format: Literal["fits", "png"] = Query("fits", description="fits or png."),
    x: int | None = Query(None, description="Cutout centre column (parent pixels)."),
    y: int | None = Query(None, description="Cutout centre row (parent pixels)."),
    size: int = Query(64, ge=1, description="Cutout side (pixels), at most ALSUB_MAX_CUTOUT_SIZE."),
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
):
    _job_with_product(store, job_id, caller, name)
    path = store.products.path(job_id, name)
    if path is None:
        available = [n for n in store.products.names(job_id) if n != "metrics"]
        raise ApiError(
            404, "not_found", f"job {job_id} has no {name} product; it has {', '.join(available)}"
        )
    if (x is None) != (y is None):
        raise ApiError(422, "invalid_request", "a cutout needs both x and y")
    if x is not None:
        if name not in EXPOSURE_PRODUCTS:
            raise ApiError(
                422, "cutout_not_supported", f"cutouts exist for {', '.join(EXPOSURE_PRODUCTS)}"
            )
        if size > settings.max_cutout_size:
            raise ApiError(
                422, "invalid_request", f"size must be at most {settings.max_cutout_size}"
            )
        if format == "png":
            return Response(cutout_png(path, x, y, size), media_type="image/png")
        return Response(
            cutout_fits(path, x, y, size),
            media_type="application/fits",
            headers={"Content-Disposition": f'attachment; filename="{name}-{x}-{y}.fits"'},
        )
    if format == "png":
        return Response(png_bytes(image_plane(path)), media_type="image/png")
    return _ProductFile(path, media_type="application/fits", filename=f"{job_id}-{name}.fits")


@router.get(
    "/{job_id}/metrics",
    summary="Job metrics",
    description="The quality metrics JSON of a succeeded job.",
    responses={**_AUTH, **_NOT_FOUND, 409: {"model": ErrorResponse}},
)
def get_metrics(
    job_id: str,
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
) -> JSONResponse:
    record = _finished_job(store, job_id, caller)
    return JSONResponse(record.metrics)


@router.delete(
    "/{job_id}",
    summary="Cancel or delete a job",
    description="A queued or running job is cancelled (answers 200 with the record, state "
    "`cancelled`); a finished job is deleted with its products (answers 204).",
    responses={
        200: {"model": JobOut, "description": "Cancelled."},
        204: {"description": "Deleted."},
        **_AUTH,
        **_NOT_FOUND,
    },
)
def delete_subtraction(
    job_id: str,
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
    queue: JobQueue = Depends(get_queue),
):
    _owned_job(store, job_id, caller)

    def cancel(record: JobRecord) -> bool:
        if record.state not in ACTIVE_STATES:
            return False
        record.state = "cancelled"
        record.finished_at = time.time()
        record.progress = {"stage": "cancelled", "fraction": record.progress.get("fraction", 0.0)}
        record.worker = None
        return True

    record, cancelled = store.records.update(job_id, cancel)
    if cancelled and record is not None:
        queue.revoke(job_id)
        if record.callback_url:
            queue.enqueue_callback(job_id)
        return JSONResponse(job_view(record), status_code=200)
    store.products.delete(job_id)
    store.records.delete(job_id)
    return Response(status_code=204)
