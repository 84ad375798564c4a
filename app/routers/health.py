"""Health, readiness and Prometheus metrics, for operators.

``/healthz`` is always open. ``/readyz`` (worker host names) and ``/metrics``
(every tenant's job counts) need a token when tokens are configured, unless
``ALSUB_OPEN_HEALTH_ENDPOINTS`` opens them (probes and Prometheus on a private network).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from store import Settings, Store

from ..deps import get_queue, get_settings, get_store, operator_access
from ..queue import JobQueue
from ..schemas import CheckOut, HealthOut, ReadyOut

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
async def healthz() -> HealthOut:
    # On the event loop, not the thread pool: busy upload threads must not delay liveness.
    return HealthOut()


def _check(func) -> CheckOut:
    try:
        detail = func()
        return CheckOut(ok=True, detail=detail or "ok")
    except Exception as exc:
        return CheckOut(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness: broker, store and at least one worker reachable",
    description="Answers 200 when ready, 503 otherwise; `checks` says which part is missing.",
    responses={
        401: {"description": "Tokens are set and none (or a wrong one) was sent."},
        503: {"model": ReadyOut, "description": "Not ready."},
    },
    dependencies=[Depends(operator_access)],
)
def readyz(
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
    queue: JobQueue = Depends(get_queue),
):
    def store_ok() -> str:
        store.records.ping()
        store.check_writable(settings.min_free_bytes)
        return "records and data directory reachable"

    def workers_ok() -> str:
        names = queue.ping_workers()
        if not names:
            raise RuntimeError(f"no worker of queue {settings.queue_name!r} answered")
        return f"{len(names)} worker(s): {', '.join(names)}"

    def broker_ok() -> str:
        queue.check_broker()
        return "redis" if settings.redis_url else "filesystem"

    checks = {"broker": _check(broker_ok), "store": _check(store_ok)}
    checks["workers"] = (
        _check(workers_ok)
        if checks["broker"].ok
        else CheckOut(ok=False, detail="broker unreachable")
    )
    ready = all(c.ok for c in checks.values())
    body = ReadyOut(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Jobs by state, job durations, queue depth, live workers, HTTP requests.",
    response_class=PlainTextResponse,
    responses={401: {"description": "Tokens are set and none (or a wrong one) was sent."}},
    dependencies=[Depends(operator_access)],
)
def metrics(request: Request) -> PlainTextResponse:
    data = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)
