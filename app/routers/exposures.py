"""``/v1/exposures``: upload FITS exposures (content-addressed) and read what was stored."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from store import ACTIVE_STATES, Settings, Store

from ..deps import Caller, get_caller, get_settings, get_store
from ..errors import ApiError, shown
from ..ingest import (
    PLANE_KINDS,
    ingest_exposure,
    limited_request,
    stream_body,
    with_form_planes,
    writer_from_upload,
)
from ..schemas import ErrorResponse, ExposureOut

__all__ = ["router"]

router = APIRouter(prefix="/v1/exposures", tags=["exposures"])

_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or invalid bearer token."},
    413: {"model": ErrorResponse, "description": "Upload larger than ALSUB_MAX_UPLOAD_BYTES."},
    415: {"model": ErrorResponse, "description": "Sent as JSON or text, not FITS."},
    422: {"model": ErrorResponse, "description": "Not a readable exposure (reader's message)."},
    429: {"model": ErrorResponse, "description": "Rate limit exceeded."},
}

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The FITS file: raw bytes (Content-Type: application/fits) or a "
        "multipart/form-data field named `file`, optionally with the exposure's separate planes "
        "as further file fields: `variance` (image units squared), `noise` (1-sigma), `weight` "
        "(inverse variance) - at most one of these three - `mask` (MP_<NAME> cards name its "
        "bits, else non-zero is BAD) and `psf` (a centred 2-D stamp). With planes, the stored "
        "exposure is the image and its planes in one multi-extension file, content-addressed "
        "as a whole: the same image with another noise map, mask or PSF gets another id.",
        "content": {
            "application/fits": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        **{
                            kind: {"type": "string", "format": "binary"}
                            for kind in ("variance", "noise", "weight", "mask", "psf")
                        },
                    },
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ExposureOut,
    summary="Upload an exposure",
    description="Streams the FITS file to the store (size-capped), validates it with the core "
    "reader and stores it under the sha256 of its bytes: uploading the same bytes twice gives "
    "the same id and one stored copy.",
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def upload_exposure(
    request: Request,
    response: Response,
    caller: Caller = Depends(get_caller),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> ExposureOut:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        n_files = 1 + len(PLANE_KINDS)
        limited = limited_request(request, n_files * settings.max_upload_bytes + 64 * 1024)
        async with limited.form(max_files=n_files, max_fields=4) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "invalid_request", "multipart upload needs a file field 'file'")
            unknown = sorted(set(form.keys()) - {"file", *PLANE_KINDS})
            if unknown:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"unknown form field(s) {', '.join(unknown)}: expected file and optionally "
                    f"{', '.join(PLANE_KINDS)}",
                )
            writer = await writer_from_upload(upload, store.exposures, settings.max_upload_bytes)
            writer = await with_form_planes(writer, form, "", store, settings, "upload")
    else:
        if content_type.startswith(("application/json", "text/")):
            # a FITS file is neither (the body is checked as FITS anyway; other types,
            # e.g. curl's default form encoding for --data-binary, are let through)
            raise ApiError(
                415,
                "unsupported_media_type",
                f"an exposure is FITS: send it as application/fits (or multipart/form-data), "
                f"not {content_type.split(';')[0]}",
            )
        writer = await stream_body(request, store, settings)
    sha, meta = await ingest_exposure(writer, store, settings, caller.owner)
    response.headers["Location"] = f"/v1/exposures/{sha}"
    return ExposureOut(id=sha, size_bytes=meta["size_bytes"], description=meta["description"])


@router.get(
    "/{exposure_id}",
    response_model=ExposureOut,
    summary="Describe a stored exposure",
    description="Shape, planes, PSF FWHM, WCS presence: what the reader found at upload.",
    responses={404: {"model": ErrorResponse, "description": "Unknown or not yours."}},
)
def get_exposure(
    exposure_id: str,
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
) -> ExposureOut:
    meta = _owned_meta(store, exposure_id, caller)
    return ExposureOut(
        id=exposure_id, size_bytes=meta["size_bytes"], description=meta["description"]
    )


@router.delete(
    "/{exposure_id}",
    status_code=204,
    summary="Delete an exposure",
    description="Forgets that you uploaded the exposure; its file is removed once no one else "
    "did. Refused with 409 `exposure_in_use` while one of your queued or running jobs uses "
    "it; finished jobs keep their products. `ALSUB_RETENTION_DAYS` removes old exposures "
    "without this call.",
    responses={
        204: {"description": "Deleted."},
        401: _ERRORS[401],
        404: {"model": ErrorResponse, "description": "Unknown or not yours."},
        409: {"model": ErrorResponse, "description": "A queued or running job of yours uses it."},
        429: _ERRORS[429],
    },
)
def delete_exposure(
    exposure_id: str,
    caller: Caller = Depends(get_caller),
    store: Store = Depends(get_store),
) -> Response:
    _owned_meta(store, exposure_id, caller)
    if _active_jobs_using(store, exposure_id, caller.owner):
        raise ApiError(
            409,
            "exposure_in_use",
            f"exposure {shown(exposure_id)} is an input of a queued or running job of yours: "
            "cancel the job or wait for it to finish, then delete the exposure",
        )
    left = store.records.remove_owner("exposure", exposure_id, caller.owner)
    # the same bytes uploaded by another tenant, or an input of any running job, stay
    if left == 0 and not _active_jobs_using(store, exposure_id):
        store.exposures.delete(exposure_id)
    return Response(status_code=204)


def _active_jobs_using(store: Store, exposure_id: str, owner: str | None = None) -> bool:
    """True when a queued or running job (of ``owner``, or anyone's) has the exposure as input."""
    return any(
        exposure_id in (record.science.exposure_id, record.template.exposure_id)
        and (owner is None or record.owner == owner)
        for state in ACTIVE_STATES
        for record in store.records.in_state(state)
    )


def _owned_meta(store: Store, exposure_id: str, caller: Caller) -> dict:
    meta = store.exposures.read_meta(exposure_id) if store.exposures.exists(exposure_id) else None
    if meta is None or not store.records.is_owner("exposure", exposure_id, caller.owner):
        raise ApiError(404, "not_found", f"no exposure {shown(exposure_id)}")
    return meta


async def owned_exposure(store: Store, exposure_id: str, caller: Caller) -> None:
    """Raise 404 unless ``exposure_id`` is stored and ``caller`` uploaded it."""
    await run_in_threadpool(_owned_meta, store, exposure_id, caller)
