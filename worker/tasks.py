"""Celery tasks of alsub: run a subtraction job, deliver a job's webhook.

Tasks are thin: they carry a job id, open the store and call
`worker.jobs.run_job`; state lives in the job record. The worker's main
process also runs a sweeper thread that requeues jobs of lost workers and
records this worker's liveness (used by ``/readyz``).

Start a worker with ``alsub worker`` (or ``python -m worker.main``, or
``celery -A worker.tasks worker``); settings come from ``ALSUB_*`` variables.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial

import httpx
from celery.signals import worker_ready, worker_shutdown
from kombu.exceptions import OperationalError as KombuOperationalError

from core.parallel import set_memory_policy
from store import JobRecord, Settings, Store, open_store
from store.callbacks import CallbackRefusedError, resolve_callback
from store.errors import expected_outage
from store.maintenance import clean_disk
from store.records import job_view
from store.sweeper import reach, sweep_stale_jobs

from .celery_app import CALLBACK_TASK, RUN_TASK, enqueue_callback, enqueue_job, make_celery
from .jobs import run_job

__all__ = ["app", "settings", "run_subtraction_job", "deliver_callback", "get_store"]

log = logging.getLogger("alsub.worker")
# the worker process is an application: it sets how it gets memory (core.parallel)
set_memory_policy()

settings = Settings()
app = make_celery(settings)

_stores: dict[int, Store] = {}


def get_store() -> Store:
    """The store of this process (opened once per process, after any fork)."""
    pid = os.getpid()
    if pid not in _stores:
        _stores[pid] = open_store(settings)
    return _stores[pid]


def _on_final(record: JobRecord) -> None:
    if record.callback_url:
        enqueue_callback(app, settings, record.id)


@app.task(name=RUN_TASK, ignore_result=True)
def run_subtraction_job(job_id: str) -> str:
    """Run subtraction job ``job_id`` (idempotent: a redelivery skips or reruns it cleanly)."""
    return run_job(get_store(), settings, job_id, on_final=_on_final)


@app.task(name=CALLBACK_TASK, bind=True, ignore_result=True, max_retries=settings.webhook_retries)
def deliver_callback(self, job_id: str) -> bool:
    """POST the final record of ``job_id`` to its ``callback_url``, retrying with backoff."""
    store = get_store()
    record = store.records.get(job_id)
    if record is None or not record.callback_url:
        return False
    attempt = self.request.retries + 1
    status_code, refused = _post_record(record)
    delivered = status_code is not None and 200 <= status_code < 300

    def mutate(current: JobRecord) -> bool:
        # Only the outcome: the receiver's error text, headers or redirect target are not
        # ours to show (they would make the service a probe of other hosts).
        current.callback = {"delivered": delivered, "attempts": attempt, "status_code": status_code}
        return True

    store.records.update(job_id, mutate)
    if not delivered:
        if refused or self.request.retries >= settings.webhook_retries:
            log.warning("job %s: webhook gave up after %d attempt(s)", job_id, attempt)
            return False
        raise self.retry(countdown=settings.webhook_backoff * 2**self.request.retries)
    return True


def _post_record(record: JobRecord) -> tuple[int | None, bool]:
    """POST ``record`` to its callback; (status code or None, refused for good)."""
    try:
        # Checked again at delivery (DNS may have changed since submission), and the POST goes
        # to the address just checked, with the URL's host as Host header and TLS server name.
        target = resolve_callback(record.callback_url, settings.callback_allowed_networks)
    except CallbackRefusedError as exc:
        log.warning("job %s: callback refused: %s", record.id, exc)
        return None, True
    host = f"[{target.host}]" if ":" in target.host else target.host
    default_port = 443 if target.scheme == "https" else 80
    headers = {"Host": host if target.port == default_port else f"{host}:{target.port}"}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False) as client:
            request = client.build_request(
                "POST",
                target.pinned_url(),
                json=job_view(record),
                headers=headers,
                extensions=extensions,
            )
            # Streamed and closed unread: the receiver's body may be arbitrarily large.
            response = client.send(request, stream=True)
            response.close()
        return response.status_code, False
    except httpx.HTTPError:
        return None, False


def _log_failure(what: str, exc: Exception) -> None:
    """One line for an outage the sweeper waits out (a Redis outage logged a full trace
    every 5 s from each worker), the trace for anything unexpected."""
    outage = expected_outage(exc) or isinstance(exc, KombuOperationalError)
    log.warning("%s: %r", what, exc, exc_info=None if outage else exc)


class _Sweeper(threading.Thread):
    """Main-process thread: mark this worker alive, requeue jobs of lost workers, clean disk."""

    def __init__(self, name: str):
        super().__init__(name="alsub-sweeper", daemon=True)
        self.worker_name = name
        self.stop = threading.Event()

    def run(self) -> None:
        period = min(settings.heartbeat_interval, settings.heartbeat_timeout / 3)
        store: Store | None = None
        next_clean = 0.0
        while True:
            try:
                # Opened inside the loop: a store that cannot be opened yet must not end the
                # thread (no liveness, no sweeping) without a retry.
                store = store or open_store(settings)
                # through `reach`: a pass that finds the store away holds off the judging
                reach(store.records, settings, partial(store.records.worker_seen, self.worker_name))
                sweep_stale_jobs(store.records, settings, lambda i: enqueue_job(app, settings, i))
                if time.monotonic() >= next_clean:
                    clean_disk(store, settings)
                    next_clean = time.monotonic() + settings.maintenance_interval
            except Exception as exc:
                _log_failure("sweeper pass failed", exc)
            if self.stop.wait(period):
                break
        # Shut down: stop counting as alive at once, so the workers left take this one's
        # share of the cores from their next job (worker.threads), not a liveness period later.
        try:
            (store or open_store(settings)).records.worker_gone(self.worker_name)
        except Exception as exc:
            _log_failure("could not record this worker's shutdown", exc)


_sweeper: _Sweeper | None = None


@worker_ready.connect
def _start_sweeper(sender=None, **_):
    global _sweeper
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    _sweeper = _Sweeper(name)
    _sweeper.start()
    log.info("worker %s ready at %.0f", name, time.time())


@worker_shutdown.connect
def _stop_sweeper(**_):
    if _sweeper is not None:
        _sweeper.stop.set()
        _sweeper.join(timeout=10)  # its last act forgets this worker's liveness
