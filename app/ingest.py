"""Getting bytes into the store: streamed uploads, multipart parts and file:// URIs.

Every exposure is validated by the core reader before it is committed, so the
store never holds a file the workers cannot read; invalid files answer 422 with
the reader's message. Stored blobs are content-addressed (sha256).
"""

from __future__ import annotations

import asyncio
import io
import zlib
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
    "PLANE_KINDS",
    "combine_planes",
    "with_form_planes",
]

#: Per-input planes an exposure can be given with (`core.io.read_exposure` keywords).
PLANE_KINDS = ("variance", "noise", "weight", "mask", "psf")

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
    """Write ``chunks`` into ``writer`` and flush it (readable by path; `ingest_exposure`
    or `BlobWriter.commit` syncs and closes it); delete its file on any failure.

    The chunks are handed over in batches of about `_BATCH_BYTES`, hashed and written on
    a thread while the next batch is received: on the loop, the sha256 and the page
    cache took as long as receiving (a 200 MB upload spent 80% of the API's samples in
    `BlobWriter.write`).
    """
    pending: asyncio.Future | None = None
    batch: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= _BATCH_BYTES:
                if pending is not None:
                    # one batch in flight: memory stays bounded. Shielded: cancelling
                    # the request must not cancel the batch, whose thread runs on
                    await asyncio.shield(pending)
                pending = asyncio.ensure_future(run_in_threadpool(_write_all, writer, batch))
                batch, size = [], 0
        if pending is not None:
            await asyncio.shield(pending)
        pending = None
        _write_all(writer, batch)
        # readable by path now; synced to disk (up to the upload cap) when closed, which
        # `ingest_exposure` does while the reader validates it
        writer.flush()
    except BaseException:
        if pending is not None:
            # the thread cannot be stopped: let it finish before the file goes
            await asyncio.wait([pending])
        writer.abort()
        raise
    return writer


#: Bytes received before a batch is handed to the writing thread.
_BATCH_BYTES = 4 << 20


def _write_all(writer: BlobWriter, chunks: list[bytes]) -> None:
    for chunk in chunks:
        writer.write(chunk)


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
        # the sync to disk beside the validation, which reads the page cache (a 200 MB
        # upload: 0.09 s of fsync and 0.13 s of reading, one after the other before)
        synced = asyncio.ensure_future(run_in_threadpool(writer.close))
        try:
            try:
                description = await run_in_threadpool(_describe, writer.path, settings, label)
            finally:
                await asyncio.wait([synced])
        except AlsubError:
            writer.abort()
            raise
        except Exception as exc:  # any reader crash is still the file's fault
            writer.abort()
            raise ApiError(
                422, "invalid_exposure", f"{label}: cannot read as FITS ({type(exc).__name__})"
            ) from None
        except BaseException:  # cancelled: nothing half-stored stays
            writer.abort()
            raise
        failed = synced.exception()
        if failed is not None:  # the disk's fault, not the file's: raised as it came
            writer.abort()
            raise failed
        meta = {"size_bytes": writer.size, "description": description}
        writer.commit()
        store.exposures.write_meta(sha, meta)
    await run_in_threadpool(store.records.add_owner, "exposure", sha, owner)
    return sha, meta


class _NamedBytes(io.BytesIO):
    """In-memory file whose name the reader's messages use (never a server path)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name


def _combined_bytes(image: Path, planes: dict[str, Path], settings: Settings, label: str) -> bytes:
    from core.io import exposure_to_bytes, read_exposure

    given = [kind for kind in ("variance", "noise", "weight") if kind in planes]
    if len(given) > 1:
        raise ApiError(422, "invalid_request", f"{label}: give only one of {', '.join(given)}")
    # planes of up to max_pixels 8-byte values, plus headers
    limit = 8 * settings.max_pixels + (1 << 20)
    specs = {
        kind: _NamedBytes(
            _gunzipped(
                read_capped(open(path, "rb"), settings.max_upload_bytes, f"the {label} {kind}"),
                limit,
            ),
            f"{kind} plane",  # not the label: it is recorded in the file, which must not
        )  # depend on how the planes arrived (upload, form field or URI)
        for kind, path in planes.items()
    }
    exposure = read_exposure(image, max_pixels=settings.max_pixels, name=label, **specs)
    return exposure_to_bytes(exposure)


def _gunzipped(data: bytes, limit: int) -> bytes:
    """``data`` decompressed when gzipped (astropy gunzips paths, not file objects), capped."""
    if data[:2] != b"\x1f\x8b":
        return data
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ApiError(422, "invalid_exposure", f"a plane is not valid gzip data ({exc})") from None
    if len(out) > limit:
        raise ApiError(413, "upload_too_large", "a gzipped plane decompresses past the pixel limit")
    return out


async def combine_planes(
    writer: BlobWriter,
    planes: dict[str, Path],
    store: Store,
    settings: Settings,
    label: str,
) -> BlobWriter:
    """One exposure file from an image and its separate planes, in a new uncommitted writer.

    The image and planes are read by the core reader (``planes`` maps a `PLANE_KINDS`
    name to a file) and written in the MEF layout (IMAGE, MASK, VARIANCE[, PSF]); the
    result is content-addressed like any upload, so the same image with another noise
    map, mask or PSF is another exposure. ``writer`` is consumed (aborted).

    Raises
    ------
    core.errors.AlsubError
        A plane cannot be read or does not fit the image (answered 422).
    """
    try:
        data = await run_in_threadpool(_combined_bytes, writer.path, planes, settings, label)
    finally:
        writer.abort()
    combined = store.exposures.writer(len(data))  # our own output: the upload cap is not its
    return await _fill(combined, _once(data))


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def with_form_planes(
    writer: BlobWriter, form, prefix: str, store: Store, settings: Settings, label: str
) -> BlobWriter:
    """``writer`` combined with the plane files of a multipart form (fields ``prefix + kind``).

    Returns ``writer`` itself when the form has no plane; else a new writer from
    `combine_planes` (``writer`` is then consumed). On any error ``writer`` is aborted.
    """
    planes: dict[str, Path] = {}
    plane_writers: list[BlobWriter] = []
    try:
        for kind in PLANE_KINDS:
            part = form.get(prefix + kind)
            if part is None:
                continue
            if isinstance(part, str):
                raise ApiError(
                    422, "invalid_request", f"form field {prefix + kind!r} must be a file"
                )
            plane = await writer_from_upload(part, store.exposures, settings.max_upload_bytes)
            plane_writers.append(plane)
            planes[kind] = plane.path
        if not planes:
            return writer
        return await combine_planes(writer, planes, store, settings, label)
    except BaseException:
        writer.abort()
        raise
    finally:
        for plane in plane_writers:
            plane.abort()


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
