"""Recovery of jobs whose worker was lost: no job stays ``running`` forever.

A running job's worker writes a heartbeat into its record every few seconds.
When the heartbeat is older than ``heartbeat_timeout`` the worker is gone
(killed, machine lost): the job is put back to ``queued`` and enqueued again,
or failed as ``worker_lost`` once it has used ``max_attempts`` deliveries.
Updates are conditional, so several sweepers (every worker, the API) can run
at once and a job is requeued only once.

While the store is unreachable no heartbeat lands, so its age says nothing about the
worker over that time: each process judges staleness only from when it last regained
the store (`reach`, `StoreWatch`). An outage longer than the timeout requeued live jobs
a second after Redis came back, before their workers' next beat.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

from .errors import UNAVAILABLE_ERRORS
from .records import JobRecord, RecordBackend
from .settings import Settings

__all__ = [
    "StoreWatch",
    "reach",
    "judged_from",
    "is_stale",
    "fail_worker_lost",
    "requeue_if_stale",
    "sweep_stale_jobs",
    "requeue_all",
    "release_running",
    "resend_waiting_jobs",
]

log = logging.getLogger("alsub.sweeper")

Enqueue = Callable[[str], None]
T = TypeVar("T")


class StoreWatch:
    """Since when this process has had the store in view without a break.

    A break is a call that found the store unreachable, or a silence longer than
    ``gap`` (an idle API cannot tell whether the store was away meanwhile). The first
    call of a process is no break: it has nothing to compare with.
    """

    def __init__(self) -> None:
        self.since = 0.0
        self._last: float | None = None  # the last call that reached the store

    def lost(self) -> None:
        self._last = float("-inf")

    def judged_from(self, now: float, gap: float) -> float:
        """``since`` as it stands if the store is reached at ``now``."""
        if self._last is not None and now - self._last > gap:
            return now
        return self.since

    def reached(self, now: float, gap: float) -> None:
        self.since = self.judged_from(now, gap)
        self._last = now


_watches: weakref.WeakKeyDictionary[RecordBackend, StoreWatch] = weakref.WeakKeyDictionary()


def _watch(records: RecordBackend) -> StoreWatch:
    return _watches.setdefault(records, StoreWatch())


def reach(records: RecordBackend, settings: Settings, call: Callable[[], T]) -> T:
    """``call()`` (a use of ``records``), noting in this process's `StoreWatch` whether
    it reached the store; unavailable errors propagate."""
    try:
        result = call()
    except UNAVAILABLE_ERRORS:
        _watch(records).lost()
        raise
    _watch(records).reached(time.time(), settings.heartbeat_timeout)
    return result


def judged_from(records: RecordBackend, settings: Settings, now: float | None = None) -> float:
    """Earliest time a heartbeat's age counts from in this process: heartbeats could not be
    written before this process last regained the store (0.0 when it never lost it)."""
    now = time.time() if now is None else now
    return _watch(records).judged_from(now, settings.heartbeat_timeout)


def is_stale(
    record: JobRecord, timeout: float, now: float | None = None, since: float = 0.0
) -> bool:
    """True when ``record`` is running but its heartbeat is older than ``timeout`` seconds,
    its age counted from ``since`` at the earliest (`judged_from`)."""
    if record.state != "running":
        return False
    now = time.time() if now is None else now
    last = record.heartbeat_at or record.started_at or record.updated_at
    return now - max(last, since) > timeout


#: What `fail_worker_lost` advises, by reason (else `_LOST_ADVICE`): a restart of the
#: service is no sign of a job too large for its worker.
_ADVICE = {"service restarted": "resubmit it once the service runs steadily"}
_LOST_ADVICE = "try a smaller image or a longer time limit"


def fail_worker_lost(record: JobRecord, reason: str, now: float | None = None) -> None:
    """Mark ``record`` failed as ``worker_lost`` after too many interrupted deliveries."""
    record.state = "failed"
    record.finished_at = time.time() if now is None else now
    record.error = {
        "code": "worker_lost",
        "message": f"the job was interrupted {record.attempts} times ({reason}); "
        + _ADVICE.get(reason, _LOST_ADVICE),
    }
    record.progress = {"stage": "failed", "fraction": record.progress.get("fraction", 0.0)}
    record.products = []  # a lost attempt's products are not this job's result
    record.worker = None
    record.heartbeat_at = None


def _requeue(record: JobRecord) -> None:
    record.state = "queued"
    record.progress = {"stage": "requeued", "fraction": 0.0}
    record.products = []  # the lost attempt's links answered 409 while the job waited
    record.worker = None
    record.heartbeat_at = None


def _recover(record: JobRecord, settings: Settings, reason: str) -> None:
    if record.attempts >= settings.max_attempts:
        fail_worker_lost(record, reason)
        return
    _requeue(record)


def _each_running(records: RecordBackend, change: Callable[[JobRecord], None]) -> list[str]:
    """``change`` every job still running when its record is written; their ids."""
    ids = []
    for record in records.in_state("running"):

        def mutate(current: JobRecord) -> bool:
            if current.state != "running":
                return False
            change(current)
            return True

        if records.update(record.id, mutate)[1]:
            ids.append(record.id)
    return ids


def requeue_if_stale(
    records: RecordBackend, job_id: str, settings: Settings, enqueue: Enqueue
) -> JobRecord | None:
    """Requeue (or fail) ``job_id`` when its heartbeat is stale; return the record after."""

    def mutate(record: JobRecord) -> bool:
        now = time.time()
        since = judged_from(records, settings, now)
        if not is_stale(record, settings.heartbeat_timeout, now, since):
            return False
        _recover(record, settings, "worker lost")
        return True

    record, written = reach(records, settings, lambda: records.update(job_id, mutate))
    if written and record is not None:
        if record.state == "queued":
            log.warning("job %s: worker lost, requeued (attempt %d)", job_id, record.attempts)
            enqueue(job_id)
        else:
            log.error("job %s: worker lost too often, failed", job_id)
    return record


def resend_waiting_jobs(records: RecordBackend, settings: Settings, enqueue: Enqueue) -> list[str]:
    """Send again the message of every job queued, untouched, for ``queued_resend_after`` s.

    A message can be lost with the broker (an outage while a worker held it); the job
    record then waits forever. A duplicate message is harmless: the task skips a job
    that is running or finished.
    """
    now = time.time()
    resent = []
    for record in records.in_state("queued"):
        if now - record.updated_at <= settings.queued_resend_after:
            continue

        def touch(current: JobRecord) -> bool:
            # Conditional, so several sweepers resend once; writing refreshes updated_at.
            return current.state == "queued" and now - current.updated_at > (
                settings.queued_resend_after
            )

        _, written = records.update(record.id, touch)
        if written:
            log.warning("job %s: queued for long, message sent again", record.id)
            enqueue(record.id)
            resent.append(record.id)
    return resent


def sweep_stale_jobs(records: RecordBackend, settings: Settings, enqueue: Enqueue) -> list[str]:
    """Requeue or fail every stale running job, resend long-waiting ones; return their ids."""
    swept = resend_waiting_jobs(records, settings, enqueue)
    running = reach(records, settings, lambda: records.in_state("running"))
    since = judged_from(records, settings)
    for record in running:
        if is_stale(record, settings.heartbeat_timeout, since=since):
            after = requeue_if_stale(records, record.id, settings, enqueue)
            if after is not None and after.state != "running":
                swept.append(record.id)
    return swept


def requeue_all(records: RecordBackend, settings: Settings, enqueue: Enqueue) -> list[str]:
    """Embedded start-up: no worker is alive yet, so every unfinished job is enqueued again.

    Running jobs go back to queued; queued ones are re-sent in case their message
    was taken by a worker that died (a duplicate message is harmless: the task
    skips jobs that are already running or finished).
    """
    _each_running(records, lambda record: _recover(record, settings, "service restarted"))
    ids = []
    for record in records.in_state("queued"):
        enqueue(record.id)
        ids.append(record.id)
    return ids


def release_running(records: RecordBackend) -> list[str]:
    """Orderly stop of an embedded service, its worker stopped: every running job goes back
    to queued, the interrupted attempt not counted (the service stopped, the job did not
    fail; three restarts of `alsub serve` failed a job as ``worker_lost``). A service that
    dies without this (killed) leaves them running: `requeue_all` counts those attempts,
    so a job that brings the whole service down is not retried forever. Returns the ids."""

    def release(record: JobRecord) -> None:
        record.attempts = max(0, record.attempts - 1)
        _requeue(record)

    return _each_running(records, release)
