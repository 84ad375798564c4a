"""Running one subtraction job: load inputs, call core, publish products, record the outcome.

`run_job` is what the Celery task calls; it holds everything except Celery's
own plumbing. A job is *claimed* by a conditional update of its record (state
``running``, attempt count, a token naming this run); every later write
(progress, heartbeat, final state) only applies while the record still carries
that token, so a cancelled job or a job taken over by another worker after a
lost heartbeat is never overwritten by a stale run. The token names the process of the
run: a redelivery seeing that process gone on its own machine (a pool child killed)
takes the job over at once instead of waiting for the heartbeat to go stale.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

# Imported here, in the worker's main process, so prefork children start with core loaded.
from core.config import SubtractionConfig
from core.errors import AlsubError
from core.io import read_exposure
from core.logcapture import said_first, saying
from core.parallel import thread_map
from core.products import PRODUCT_NAMES, json_safe, write_products
from core.sources import read_catalog
from core.subtract import run_subtraction
from store import FINAL_STATES, JobRecord, Settings, Store
from store.errors import (
    STORAGE_FULL_MESSAGE,
    STORAGE_UNAVAILABLE_MESSAGE,
    UNAVAILABLE_ERRORS,
    storage_full,
    storage_unavailable,
)
from store.sweeper import fail_worker_lost, is_stale, judged_from, reach

from .heartbeat import Heartbeat
from .threads import at_low_priority, thread_share

__all__ = ["run_job", "JobCancelled"]

log = logging.getLogger("alsub.worker")


class JobCancelled(Exception):
    """The job's record no longer belongs to this run (cancelled or taken over)."""


def _pid_space() -> str | None:
    """This machine's boot and this process's pid namespace, None where /proc cannot say:
    a pid in a token is checked only by a process that sees the same pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot[:16]}-{namespace}"


_PID_SPACE = _pid_space()


def _run_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{_PID_SPACE}"


def _runner_gone(token: str | None) -> bool:
    """True when run ``token`` was a process that this one can see and that no longer runs
    (a pool child killed with -9): nothing of that run can write again, so its job is taken
    over at once instead of after the heartbeat timeout. Any doubt (another machine or
    container, a pid reused) leaves the job to the heartbeat."""
    parts = (token or "").rsplit(":", 3)
    if _PID_SPACE is None or len(parts) != 4 or parts[3] != _PID_SPACE:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    return not _process_runs(pid)


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: the pid was reused
        return True
    try:
        # a zombie (killed, not yet reaped by its parent) runs nothing either
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _claim(store: Store, settings: Settings, job_id: str, token: str) -> JobRecord | None:
    """Mark the job running for this run; None when it must not run here."""
    now = time.time()
    outcome: dict[str, str] = {}

    def mutate(record: JobRecord) -> bool:
        outcome.clear()  # called again when a concurrent write came first
        if record.state in FINAL_STATES:
            outcome["skip"] = f"already {record.state}"
            return False
        since = judged_from(store.records, settings, now)
        if record.state == "running" and not is_stale(
            record, settings.heartbeat_timeout, now, since
        ):
            if not _runner_gone(record.worker):
                # Another worker holds it (a duplicate delivery): leave it alone.
                outcome["skip"] = f"running on {record.worker}"
                return False
            outcome["gone"] = str(record.worker)
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
        record.products = []  # a lost earlier attempt's products are not shown for this one
        record.error = None
        return True

    record, written = reach(store.records, settings, lambda: store.records.update(job_id, mutate))
    if record is None:
        log.warning("job %s: no record, message dropped", job_id)
        return None
    if written and record.state == "failed":  # the end of the job: said like a run's end
        log.warning("job %s: failed (worker_lost) after %d attempts", job_id, record.attempts)
        return None
    if not written or not record.run_by(token):
        log.info("job %s: not run here (%s)", job_id, outcome.get("skip", "not claimed"))
        return None
    if "gone" in outcome:
        gone = outcome["gone"]
        log.warning("job %s: its run %s ended with its process, taken over", job_id, gone)
    return record


#: Products published before the others (besides the difference or score): small, and what
#: an alert broker reads first. The frame-sized rest is written after their links appear.
FIRST_PRODUCTS = ("metrics", "kernel", "dia_sources")


def _show_products(store: Store, job_id: str, token: str, names: list[str]) -> None:
    """List the products published so far in the running job's record (they can be
    downloaded from now on); raise `JobCancelled` if this run no longer owns the job."""

    def mutate(record: JobRecord) -> bool:
        if not record.run_by(token):
            return False
        record.products = names
        record.progress = {"stage": "writing products", "fraction": 0.99}
        record.heartbeat_at = time.time()
        return True

    _, written = _retry_unavailable(lambda: store.records.update(job_id, mutate), job_id)
    if not written:
        raise JobCancelled(job_id)


def _finish(store: Store, job_id: str, token: str, **fields) -> JobRecord | None:
    """Write the final state if this run still owns the job; return the record if written."""

    def mutate(record: JobRecord) -> bool:
        if not record.run_by(token):
            return False
        now = time.time()
        for name, value in fields.items():
            setattr(record, name, value)
        record.finished_at = now
        record.heartbeat_at = now
        return True

    record, written = _retry_unavailable(lambda: store.records.update(job_id, mutate), job_id)
    if not written or record is None:
        return None
    if record.duration is not None:
        store.records.observe_duration(record.duration)
    return record


def _retry_unavailable(call, job_id: str, attempts: int = 8, first_wait: float = 0.5):
    """``call()``, retried with doubling waits (~2 min in all) while the store is unreachable.

    A final state written late beats a job rerun from scratch; if the store stays away,
    the error propagates and the stale-heartbeat sweep requeues the job later.
    """
    wait = first_wait
    for attempt in range(attempts):
        try:
            return call()
        except UNAVAILABLE_ERRORS:
            if attempt == attempts - 1:
                raise
            log.warning("job %s: store unavailable, retrying in %.1f s", job_id, wait)
            time.sleep(wait)
            wait = min(2 * wait, 30.0)
    raise AssertionError("unreachable")


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
    record = _retry_unavailable(lambda: _claim(store, settings, job_id, token), job_id)
    if record is None:
        return "skipped"
    log.info("job %s: attempt %d on %s", job_id, record.attempts, token)
    started = time.monotonic()
    end = partial(_log_end, job_id, record.attempts, started)

    def progress(stage: str, fraction: float) -> None:
        def mutate(current: JobRecord) -> bool:
            if not current.run_by(token):
                return False
            current.progress = {"stage": stage, "fraction": round(float(fraction), 4)}
            current.heartbeat_at = time.time()
            return True

        try:
            _, written = store.records.update(job_id, mutate)
        except UNAVAILABLE_ERRORS:
            # Progress is informative: an unreachable store must not end a job that can still
            # publish its products once the store is back.
            log.warning("job %s: progress not recorded (store unavailable)", job_id)
            written = True
        if not written:
            raise JobCancelled(job_id)
        if settings.test_stage_delay > 0 and stage != "done":
            _debug_delay(settings.test_stage_delay, settings.test_stage_holds_gil)

    timings: dict[str, float] = dict(record.timings)
    final: JobRecord | None = None
    with Heartbeat(settings, job_id, token), thread_share(store.records, settings) as threads:
        timings["threads"] = threads  # not a time, but how the job ran: kept beside its timings
        try:
            t0 = time.perf_counter()
            _require_inputs(store, record, settings)
            # Both inputs at once: the reader spends its time in numpy and file reads,
            # which release the GIL, so the two files overlap on two cores.
            (science, said), (template, said_too) = thread_map(
                lambda role: saying(
                    read_exposure,
                    store.exposures.path(getattr(record, role).exposure_id),
                    max_pixels=settings.max_pixels,
                    name=f"{role} exposure",
                ),
                ("science", "template"),
            )
            sources = None
            if record.sources_id is not None:
                # Bytes, not the path: error messages must not name server paths.
                catalog = store.catalogs.path(record.sources_id).read_bytes()
                sources = read_catalog(catalog, wcs=science.wcs)
            config = SubtractionConfig.model_validate({**record.config, "mode": record.mode})
            timings["load_inputs"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            # read for this job only: worked on in place, not copied
            result = run_subtraction(
                science, template, config, sources=sources, progress=progress, consume_inputs=True
            )
            timings["subtraction"] = time.perf_counter() - t0
            # what reading said (a WCS ignored) is the job's too
            result.metrics["warnings"] = said_first(said + said_too, result.metrics["warnings"])
            timings.update({f"stage.{k}": float(v) for k, v in (result.timings or {}).items()})

            t0 = time.perf_counter()
            first = {result.output_name, *FIRST_PRODUCTS}
            names = store.products.publish(job_id, partial(write_products, result, names=first))
            timings["write_first_products"] = time.perf_counter() - t0
            _show_products(store, job_id, token, names)
            if settings.test_stage_delay > 0:  # a progress report too: tests see this state
                _debug_delay(settings.test_stage_delay, settings.test_stage_holds_gil)
            rest = set(PRODUCT_NAMES) - first
            # below the API serving the difference, which clients fetch at once (a 4096
            # pair's 200 MB took 1.0-1.3 s to download beside these writes, at the
            # same priority, where an upload of as much took 0.5 s)
            names = at_low_priority(
                store.products.add, job_id, partial(write_products, result, names=rest)
            )
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
        except UNAVAILABLE_ERRORS:
            # the final state could not be written: the stale-heartbeat sweep reruns it
            end("interrupted (store unavailable)")
            raise
        except MissingInputsError as exc:
            log.error("job %s: %s", job_id, exc.detail)
            final = _fail(store, job_id, token, timings, "internal", str(exc))
        except Exception as exc:
            if storage_full(exc):
                # the service's disk, not the input: said so (it was "unexpected OSError")
                log.error("job %s: the data directory is full: %s", job_id, exc)
                final = _fail(
                    store, job_id, token, timings, "insufficient_storage", STORAGE_FULL_MESSAGE
                )
            elif storage_unavailable(exc):
                # read-only or permissions: the service's storage too, not "unexpected"
                log.error("job %s: the data directory refuses writes: %s", job_id, exc)
                final = _fail(
                    store,
                    job_id,
                    token,
                    timings,
                    "storage_unavailable",
                    STORAGE_UNAVAILABLE_MESSAGE,
                )
            elif (owned := store.records.get(job_id)) is None or not owned.run_by(token):
                # deleted or cancelled while it wrote: its folder went, and a write into it
                # failed (a FileNotFoundError logged as an unexpected error with its trace)
                log.info("job %s: deleted or cancelled while running, stopping", job_id)
            else:
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
        end(_outcome(final))
        if final.state == "failed":
            # a failed job serves no product: the ones published before it failed (the
            # difference, its catalog) only held disk space, the scarcest when it was full
            store.products.delete(job_id)
        if on_final is not None:
            on_final(final)
        return final.state
    after = store.records.get(job_id)
    end(_outcome(after))
    if after is None or after.state == "cancelled":
        store.products.delete(job_id)  # cancelled or deleted while the job ran
    return "skipped" if after is None else after.state


#: Ends of a run said at INFO; every other (failed, requeued, interrupted) is a WARNING.
_QUIET_ENDS = ("succeeded", "cancelled", "deleted")


def _outcome(record: JobRecord | None) -> str:
    """What came of a run, from the record after it (None: deleted meanwhile)."""
    if record is None:
        return "deleted"
    if record.state == "failed":
        return f"failed ({(record.error or {}).get('code', 'unknown')})"
    # a run that did not write the end: another run holds the job, or it waits again
    return {"queued": "requeued", "running": "taken over"}.get(record.state, record.state)


def _log_end(job_id: str, attempt: int, started: float, outcome: str) -> None:
    """The one line that ends every run of a job (Celery's own says "succeeded" for a job
    that failed and names its task id, not the job)."""
    level = logging.INFO if outcome in _QUIET_ENDS else logging.WARNING
    seconds = time.monotonic() - started
    log.log(level, "job %s: %s in %.2f s (attempt %d)", job_id, outcome, seconds, attempt)


def _debug_delay(seconds: float, hold_gil: bool) -> None:
    if not hold_gil:
        time.sleep(seconds)
        return
    # No other thread of this process runs until the loop ends: a long switch interval and
    # a loop that never blocks keep the GIL, as a long C call holding it does.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 1.0)
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    finally:
        sys.setswitchinterval(interval)


class MissingInputsError(Exception):
    """A job's stored inputs are not where this worker looks: a deployment fault (a worker
    whose ALSUB_DATA_DIR is not the API's), not the client's."""

    def __init__(self, roles: list[str], data_dir) -> None:
        what = f"{' and '.join(roles)} exposure{'s' if len(roles) > 1 else ''}"
        super().__init__(
            f"the service cannot find the stored {what}: a worker does not share the API's "
            "data directory (an operator's fault, not the input's)"
        )
        self.detail = (
            f"{what} missing under ALSUB_DATA_DIR={data_dir}: every worker must use the "
            "API's data directory"
        )


def _require_inputs(store, record, settings) -> None:
    """Raise `MissingInputsError` when an input the API stored is not in this worker's
    store (it answered "no such file", an invalid_exposure, blaming the client)."""
    missing = [
        role
        for role in ("science", "template")
        if not store.exposures.exists(getattr(record, role).exposure_id)
    ]
    if missing:
        raise MissingInputsError(missing, settings.data_dir)


def _fail(store, job_id, token, timings, code, message):
    return _finish(
        store,
        job_id,
        token,
        state="failed",
        error={"code": code, "message": message},
        products=[],  # none is served: no links (they answered 409)
        progress={"stage": "failed", "fraction": 1.0},
        timings={k: round(v, 4) for k, v in timings.items()},
    )
