"""JSON errors: every failure answers ``{"error": {"code": ..., "message": ...}}``.

Core's typed errors (`core.errors.AlsubError`) map to 422 with their own code;
store errors map to 413 (upload too large) and 409 (idempotency conflict); an
unreachable store or broker maps to 503, a full data directory to 507 and one that
refuses writes (read-only, permissions) to 503 ``storage_unavailable``, all with
``Retry-After``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as KombuOperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.errors import AlsubError
from store import IdempotencyConflictError, UploadTooLargeError
from store.errors import (
    STORAGE_FULL_MESSAGE,
    STORAGE_UNAVAILABLE_MESSAGE,
    UNAVAILABLE_ERRORS,
    storage_full,
    storage_unavailable,
)

__all__ = ["ApiError", "install_error_handlers", "error_body", "RETRY_AFTER_SECONDS"]

#: Retry-After of a 503 while the store or broker is unreachable (seconds).
RETRY_AFTER_SECONDS = 5
#: Retry-After of a 507 while the data directory is full, or a 503 while it refuses writes
#: (seconds): an operator must act.
STORAGE_FULL_RETRY_AFTER_SECONDS = 60

log = logging.getLogger("alsub.api")

#: Status of a request whose client closed the connection before the answer (nginx's
#: "client closed request"): no one reads it, and it is no server error.
CLIENT_CLOSED = 499


def shown(text: str, limit: int = 80) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters (an id a client made
    up may be any length: a review's 5000-character id came back whole in the 404)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


class ApiError(Exception):
    """An error answer: HTTP status, machine-readable code and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    """The JSON body of an error answer."""
    return {"error": {"code": code, "message": message}}


def _answer(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":  # its loc holds the character offset, not a field
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"body: Invalid JSON: {detail} at character {err['loc'][-1]}")
            continue
        where = _location(err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _location(loc) -> str:
    """A validation error's place as a caller writes it: ``mode``, ``query.size``, and
    list items by index (``body[0].x``, the first forced position, where a dotted
    ``0.x`` left the caller guessing); the body itself as ``body`` (a missing or
    mistyped body said only "Field required")."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where = f"{where or 'body'}[{part}]"
        elif part != "body":
            where = f"{where}.{part}" if where else str(part)
    return where or ("body" if "body" in loc else "")


def install_error_handlers(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _answer(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(AlsubError)
    async def _core_error(request: Request, exc: AlsubError):
        return _answer(422, exc.code, exc.message)

    @app.exception_handler(UploadTooLargeError)
    async def _too_large(request: Request, exc: UploadTooLargeError):
        return _answer(413, "upload_too_large", f"the upload exceeds {exc.limit} bytes")

    @app.exception_handler(IdempotencyConflictError)
    async def _idempotency(request: Request, exc: IdempotencyConflictError):
        return _answer(
            409,
            "idempotency_conflict",
            f"this idempotency key was already used for job {exc.job_id} with a different "
            "request; use a new key",
        )

    def _storage_full(request: Request, exc: Exception) -> JSONResponse:
        log.error("data directory full on %s %s: %r", request.method, request.url.path, exc)
        return _answer(
            507,
            "insufficient_storage",
            STORAGE_FULL_MESSAGE,
            {"Retry-After": str(STORAGE_FULL_RETRY_AFTER_SECONDS)},
        )

    def _storage_refused(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "data directory refuses writes on %s %s: %r", request.method, request.url.path, exc
        )
        return _answer(
            503,
            "storage_unavailable",
            STORAGE_UNAVAILABLE_MESSAGE,
            {"Retry-After": str(STORAGE_FULL_RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        # a full disk answered 500 "unexpected server error" to every upload
        if storage_full(exc):
            return _storage_full(request, exc)
        if storage_unavailable(exc):  # read-only or permissions: 500 "unexpected" too
            return _storage_refused(request, exc)
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(500, "internal", "unexpected server error; the service logs have the trace")

    async def _unavailable(request: Request, exc: Exception):
        if storage_full(exc):  # SQLite's "database or disk is full": not a restart
            return _storage_full(request, exc)
        if storage_unavailable(exc):  # SQLite's "readonly database": nor is this
            return _storage_refused(request, exc)
        log.warning(
            "store or broker unavailable on %s %s: %r", request.method, request.url.path, exc
        )
        return _answer(
            503,
            "service_unavailable",
            "the job store or queue is unreachable (restarting?); retry after a few seconds "
            "(GET /readyz says which part)",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    for exc_class in (*UNAVAILABLE_ERRORS, KombuOperationalError):
        app.add_exception_handler(exc_class, _unavailable)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _answer(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return _answer(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        # an upload dropped half-way was logged with a traceback and counted as a 500,
        # the status operators alert on
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return _answer(CLIENT_CLOSED, "client_closed_request", "the client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _answer(500, "internal", "unexpected server error; the service logs have the trace")
