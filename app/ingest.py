"""Getting bytes into the store: streamed uploads, multipart parts and file:// URIs.

Every exposure is validated by the core reader before it is committed, so the
store never holds a file the workers cannot read; invalid files answer 422 with
the reader's message. Stored blobs are content-addressed (sha256).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from core.errors import AlsubError, InvalidCatalogError
from store import BlobWriter, Settings, Store, UploadTooLargeError

from .errors import ApiError

__all__ = [
    "stream_body",
    "limited_request",
    "ingest_exposure",
    "ingest_catalog",
    "writer_from_upload",
    "writer_from_file",
    "read_capped",
]

_CHUNK = 1 << 20


def check_content_length(request: Request, limit: int) -> None:
    """Answer 413 early when the declared body size is above ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadTooLargeError(limit)


async def stream_body(request: Request, store: Store, settings: Settings) -> BlobWriter:
    """Stream a raw request body into a new blob writer (413 past the cap)."""
    check_content_length(request, settings.max_upload_bytes)
    writer = await _fill(store.exposures.writer(settings.max_upload_bytes), request.stream())
    if writer.size == 0:
        writer.abort()
        raise ApiError(422, "invalid_exposure", "the request body is empty: send the FITS bytes")
    return writer


def limited_request(request: Request, limit: int) -> Request:
    """A view of ``request`` whose body stream raises `UploadTooLargeError` past ``limit`` bytes.

    Multipart parsing spools file parts to disk; counting the raw bytes on the
    way in bounds what it can write.
    """
    check_content_length(request, limit)
    received = 0
    receive = request.receive

    async def counting_receive():
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLargeError(limit)
        return message

    return Request(request.scope, counting_receive)


async def _fill(writer: BlobWriter, chunks: AsyncIterator[bytes]) -> BlobWriter:
    """Write ``chunks`` into ``writer`` and close it; delete its file on any failure."""
    try:
        async for chunk in chunks:
            writer.write(chunk)
        await run_in_threadpool(writer.close)  # fsync of up to the upload cap: off the loop
    except BaseException:
        writer.abort()
        raise
    return writer


async def _upload_chunks(upload) -> AsyncIterator[bytes]:
    while chunk := await upload.read(_CHUNK):
        yield chunk


async def writer_from_upload(upload, store_blobs, limit: int) -> BlobWriter:
    """Copy a multipart `UploadFile` into a new blob writer."""
    return await _fill(store_blobs.writer(limit), _upload_chunks(upload))


def read_capped(handle: BinaryIO, limit: int, what: str) -> bytes:
    """The bytes of an open file; 413 when it holds more than ``limit`` (never reads past it)."""
    with handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "upload_too_large", f"{what} exceeds the upload limit")
    return data


async def writer_from_file(handle: BinaryIO, blobs, limit: int) -> BlobWriter:
    """Copy an open file into a new blob writer (413 past the cap); closes ``handle``."""

    def copy() -> BlobWriter:
        with handle:
            return blobs.copy_file(handle, limit)

    return await run_in_threadpool(copy)


def _describe(path: Path, settings: Settings, label: str) -> dict:
    from core.io import describe_exposure

    description = describe_exposure(path, max_pixels=settings.max_pixels, name=label)
    description.pop("file", None)  # a server path is nobody's business
    return description


async def ingest_exposure(
    writer: BlobWriter, store: Store, settings: Settings, owner: str, label: str = "upload"
) -> tuple[str, dict]:
    """Validate a filled writer with the core reader and commit it; record ``owner``.

    Returns
    -------
    exposure_id, meta : `str`, `dict`
        The sha256 id and the stored metadata (``size_bytes``, ``description``).

    Raises
    ------
    core.errors.AlsubError
        The reader's error (answered as 422 with its message); nothing is stored.
    """
    sha = writer.sha256
    meta = store.exposures.read_meta(sha) if store.exposures.exists(sha) else None
    if meta is not None:
        writer.abort()  # the same bytes were validated and stored before
    else:
        try:
            description = await run_in_threadpool(_describe, writer.path, settings, label)
        except AlsubError:
            writer.abort()
            raise
        except Exception as exc:  # any reader crash is still the file's fault
            writer.abort()
            raise ApiError(
                422, "invalid_exposure", f"{label}: cannot read as FITS ({type(exc).__name__})"
            ) from None
        meta = {"size_bytes": writer.size, "description": description}
        writer.commit()
        store.exposures.write_meta(sha, meta)
    await run_in_threadpool(store.records.add_owner, "exposure", sha, owner)
    return sha, meta


def _check_catalog(data: bytes) -> None:
    from astropy.wcs import WCS

    from core.sources import read_catalog

    # A placeholder WCS lets ra/dec-only catalogs pass the column checks here;
    # the worker converts them with the science exposure's real WCS.
    placeholder = WCS(naxis=2)
    placeholder.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    read_catalog(data, wcs=placeholder)


async def ingest_catalog(data: bytes, store: Store, owner: str, uri: str | None = None) -> str:
    """Validate and store a source catalog's bytes; return its sha256 id.

    A catalog read from a ``uri`` is a file other tenants may share: its errors
    name the URI and never quote its content.
    """
    if not data.strip():
        raise InvalidCatalogError("the source catalog is empty")
    try:
        await run_in_threadpool(_check_catalog, data)
    except AlsubError:
        if uri is None:
            raise
        raise InvalidCatalogError(
            f"{uri} is not a readable catalog: give a FITS table, CSV with a header line or "
            "JSON, with x/y (pixels) or ra/dec (degrees) columns"
        ) from None
    sha = await run_in_threadpool(store.catalogs.put_bytes, data)
    await run_in_threadpool(store.records.add_owner, "catalog", sha, owner)
    return sha
