"""The FastAPI application: `create_app` builds it from `Settings`.

Routers: ``/v1/exposures``, ``/v1/subtractions``, and ``/healthz``, ``/readyz``,
``/metrics``; documentation at ``/docs`` and ``/redoc`` from local assets. Shared
things (settings, store, queue client, metrics registry) live on ``app.state`` and
reach handlers through ``Depends``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from kombu.exceptions import OperationalError as KombuOperationalError
from starlette.concurrency import run_in_threadpool

from store import Settings, open_store
from store.errors import expected_outage
from store.maintenance import clean_disk
from store.sweeper import sweep_stale_jobs

from .docs import install_docs
from .errors import install_error_handlers
from .head import HeadAsGet
from .metrics import RequestMetricsMiddleware, ServiceMetrics
from .queue import JobQueue
from .routers import exposures, health, sources, subtractions
from .schemas import SubtractionRequest

__all__ = ["create_app"]

log = logging.getLogger("alsub.api")

_DESCRIPTION = """
Alard-Lupton image subtraction as a service.

1. Upload exposures to `POST /v1/exposures` (FITS body or multipart `file`), or reference
   them by `file://` URI under the configured roots. An exposure's separate planes
   (`variance` or `noise` or `weight`, `mask`, `psf`) go as further multipart files with
   the upload, as `planes` URIs of an input, or as `science_noise`-style fields of the
   one-shot form; an image with its planes is stored (and addressed) as one exposure.
2. Submit `POST /v1/subtractions`; poll `GET /v1/subtractions/{id}` until `state` is
   `succeeded` or `failed` (or pass a `callback_url`).
3. Download `GET /v1/subtractions/{id}/products/difference` (FITS, `?format=png`, cutouts).
4. Read what changed: `GET /v1/subtractions/{id}/sources` (DIA sources, JSON/CSV/FITS),
   `POST /v1/subtractions/{id}/forced` (photometry at your positions) and
   `GET /v1/subtractions/{id}/sources/{source_id}/cutouts` (alert triplets).
5. Free disk space: `DELETE /v1/subtractions/{id}` (a finished job and its products) and
   `DELETE /v1/exposures/{id}` (409 while a queued or running job of yours uses it); an
   operator can also set `ALSUB_RETENTION_DAYS`.

When tokens are configured every `/v1` call needs `Authorization: Bearer <token>`; each
token sees only its own exposures and jobs. Errors are `{"error": {"code", "message"}}`.
"""


def _log_failure(what: str, exc: Exception) -> None:
    """One line for an outage the service waits out (a wrong Redis port printed a whole
    trace at start-up), the trace for anything unexpected."""
    outage = expected_outage(exc) or isinstance(exc, KombuOperationalError)
    log.warning("%s: %r", what, exc, exc_info=None if outage else exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the alsub API.

    Parameters
    ----------
    settings : `store.Settings` or None
        None reads the ``ALSUB_*`` environment variables.

    Returns
    -------
    app : `fastapi.FastAPI`
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            swept = sweep_stale_jobs(app.state.store.records, settings, app.state.queue.enqueue)
            if swept:
                log.warning("requeued %d job(s) of lost workers at start-up", len(swept))
        except Exception as exc:
            _log_failure("start-up sweep failed", exc)
        try:
            await run_in_threadpool(clean_disk, app.state.store, settings)
        except Exception as exc:
            _log_failure("start-up disk clean-up failed", exc)
        yield
        app.state.queue.close()
        app.state.store.records.close()

    app = FastAPI(
        title="alsub",
        version="0.1.0",
        summary="Image subtraction for time-domain astronomy",
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # replaced by install_docs: local assets, no CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.store = open_store(settings)
    app.state.queue = JobQueue(settings)
    app.state.metrics = ServiceMetrics(app.state.store)
    install_error_handlers(app)
    app.include_router(exposures.router)
    app.include_router(subtractions.router)
    app.include_router(sources.router)
    app.include_router(health.router)
    install_docs(app)

    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(HeadAsGet)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            # The submit body is parsed by hand (JSON or multipart), so add its model here.
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            extra = SubtractionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            for name, definition in extra.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["SubtractionRequest"] = extra
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
