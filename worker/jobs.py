"""Running one subtraction job: load inputs, call core, publish products, record the outcome.

`run_job` is what the Celery task calls; it holds everything except Celery's
own plumbing. A job is *claimed* by a conditional update of its record (state
``running``, attempt count, a token naming this run); every later write
(progress, heartbeat, final state) only applies while the record still carries
that token, so a cancelled job or a job taken over by another worker after a
lost heartbeat is never overwritten by a stale run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial

from celery.exceptions import SoftTimeLimitExceeded

# Imported here, in the worker's main process, so prefork children start with core loaded.
from core.config import SubtractionConfig
from core.errors import AlsubError
from core.io import read_exposure
from core.products import json_safe, write_products
from core.sources import read_catalog
from core.subtract import run_subtraction
from store import FINAL_STATES, JobRecord, Settings, Store
from store.sweeper import fail_worker_lost, is_stale

__all__ = ["run_job", "JobCancelled", "Heartbeat"]

log = logging.getLogger("alsub.worker")


class JobCancelled(Exception):
    """The job's record no longer belongs to this run (cancelled or taken over)."""


def _run_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Background thread refreshing ``heartbeat_at`` while a job runs.

    Parameters
    ----------
    store : `store.Store`
    job_id, token : `str`
        The job and the token of this run; the heartbeat stops writing when the
        record no longer carries the token.
    interval : `float`
        Seconds between beats.
    """

    def __init__(self, store: Store, job_id: str, token: str, interval: float):
        self._store, self._job_id, self._token, self._interval = store, job_id, token, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):

            def mutate(record: JobRecord) -> bool:
                if record.state != "running" or record.worker != self._token:
                    return False
                record.heartbeat_at = time.time()
                return True

            try:
                _, written = self._store.records.update(self._job_id, mutate)
            except Exception:  # a transient store error must not kill the job
                log.warning("job %s: heartbeat failed", self._job_id, exc_info=True)
                continue
            if not written:
                return  # cancelled or taken over: the next progress report stops the job

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _claim(store: Store, settings: Settings, job_id: str, token: str) -> JobRecord | None:
    """Mark the job running for this run; None when it must not run here."""
    now = time.time()
    outcome: dict[str, str] = {}

    def mutate(record: JobRecord) -> bool:
        if record.state in FINAL_STATES:
            outcome["skip"] = f"already {record.state}"
            return False
        if record.state == "running" and not is_stale(record, settings.heartbeat_timeout, now):
            # Another worker holds it (a duplicate delivery): leave it alone.
            outcome["skip"] = f"running on {record.worker}"
            return False
        if record.attempts >= settings.max_attempts:
            fail_worker_lost(record, "worker lost or hard time limit", now)
            outcome["skip"] = "too many attempts"
            return True
        record.state = "running"
        record.attempts += 1
        record.worker = token
        record.heartbeat_at = now
        if record.started_at is None:
            record.started_at = now
            record.timings["queue_wait"] = round(now - record.created_at, 4)
        record.progress = {"stage": "starting", "fraction": 0.0}
        record.error = None
        return True

    record, written = store.records.update(job_id, mutate)
    if record is None:
        log.warning("job %s: no record, message dropped", job_id)
        return None
    if not written or record.state != "running" or record.worker != token:
        log.info("job %s: not run here (%s)", job_id, outcome.get("skip", "not claimed"))
        return None
    return record


def _finish(store: Store, job_id: str, token: str, **fields) -> JobRecord | None:
    """Write the final state if this run still owns the job; return the record if written."""

    def mutate(record: JobRecord) -> bool:
        if record.state != "running" or record.worker != token:
            return False
        now = time.time()
        for name, value in fields.items():
            setattr(record, name, value)
        record.finished_at = now
        record.heartbeat_at = now
        return True

    record, written = store.records.update(job_id, mutate)
    if not written or record is None:
        return None
    if record.duration is not None:
        store.records.observe_duration(record.duration)
    return record


def run_job(
    store: Store,
    settings: Settings,
    job_id: str,
    on_final: Callable[[JobRecord], None] | None = None,
) -> str:
    """Run one subtraction job to a final state.

    Parameters
    ----------
    store : `store.Store`
        Inputs, products and records.
    settings : `store.Settings`
        Limits (max pixels, heartbeat, attempts) and the debug stage delay.
    job_id : `str`
    on_final : callable or None
        Called with the final record when this run wrote it (webhook delivery).

    Returns
    -------
    outcome : `str`
        The final state written, or ``"skipped"`` when this delivery did not run the job.
    """
    token = _run_token()
    record = _claim(store, settings, job_id, token)
    if record is None:
        return "skipped"
    log.info("job %s: attempt %d on %s", job_id, record.attempts, token)

    def progress(stage: str, fraction: float) -> None:
        def mutate(current: JobRecord) -> bool:
            if current.state != "running" or current.worker != token:
                return False
            current.progress = {"stage": stage, "fraction": round(float(fraction), 4)}
            current.heartbeat_at = time.time()
            return True

        _, written = store.records.update(job_id, mutate)
        if not written:
            raise JobCancelled(job_id)
        if settings.test_stage_delay > 0 and stage != "done":
            time.sleep(settings.test_stage_delay)

    timings: dict[str, float] = dict(record.timings)
    final: JobRecord | None = None
    with Heartbeat(store, job_id, token, settings.heartbeat_interval):
        try:
            t0 = time.perf_counter()
            science = read_exposure(
                store.exposures.path(record.science.exposure_id),
                max_pixels=settings.max_pixels,
                name="science exposure",
            )
            template = read_exposure(
                store.exposures.path(record.template.exposure_id),
                max_pixels=settings.max_pixels,
                name="template exposure",
            )
            sources = None
            if record.sources_id is not None:
                # Bytes, not the path: error messages must not name server paths.
                catalog = store.catalogs.path(record.sources_id).read_bytes()
                sources = read_catalog(catalog, wcs=science.wcs)
            config = SubtractionConfig.model_validate({**record.config, "mode": record.mode})
            timings["load_inputs"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            result = run_subtraction(science, template, config, sources=sources, progress=progress)
            timings["subtraction"] = time.perf_counter() - t0
            timings.update({f"stage.{k}": float(v) for k, v in (result.timings or {}).items()})

            t0 = time.perf_counter()
            names = store.products.publish(job_id, partial(write_products, result))
            timings["write_products"] = time.perf_counter() - t0
            final = _finish(
                store,
                job_id,
                token,
                state="succeeded",
                mode=str(result.metrics.get("mode") or record.mode),  # the chosen direction
                products=names,
                metrics=json_safe(result.metrics),
                timings={k: round(v, 4) for k, v in timings.items()},
                progress={"stage": "done", "fraction": 1.0},
            )
        except JobCancelled:
            log.info("job %s: cancelled or taken over, stopping", job_id)
        except SoftTimeLimitExceeded:
            final = _fail(
                store,
                job_id,
                token,
                timings,
                "time_limit_exceeded",
                f"the job ran longer than {settings.soft_time_limit:g} s",
            )
        except AlsubError as exc:
            log.info("job %s: failed: %s: %s", job_id, exc.code, exc.message)
            final = _fail(store, job_id, token, timings, exc.code, exc.message)
        except Exception as exc:
            log.exception("job %s: unexpected error", job_id)
            final = _fail(
                store,
                job_id,
                token,
                timings,
                "internal",
                f"unexpected {type(exc).__name__}; the service logs have the trace",
            )

    if final is not None:
        if on_final is not None:
            on_final(final)
        return final.state
    after = store.records.get(job_id)
    if after is None or after.state == "cancelled":
        store.products.delete(job_id)  # cancelled or deleted while the job ran
    return "skipped" if after is None else after.state


def _fail(store, job_id, token, timings, code, message):
    return _finish(
        store,
        job_id,
        token,
        state="failed",
        error={"code": code, "message": message},
        progress={"stage": "failed", "fraction": 1.0},
        timings={k: round(v, 4) for k, v in timings.items()},
    )
