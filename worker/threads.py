"""How many threads one job may use: the machine's cores shared among the jobs beside it.

Core sizes its thread pools by the cores it may run on. Two worker processes on a
2-core machine would then run four busy threads on two cores: each job slower, and no
more jobs done. A job therefore takes ``cores // (jobs that can run on this host)``
threads, where that count is the workers of this machine seen alive recently (their
sweeper threads record themselves every few seconds) times the prefork concurrency,
recomputed at the start of each job, so starting or stopping a worker takes effect
at the next job. A machine is known by its kernel's boot id, which every container on
it shares (their host names differ), carried in the worker's node name
(``alsub-<id>.<machine>@<host>``); a worker named otherwise counts by its host name.
``ALSUB_WORKER_THREADS`` fixes the number instead (cores limited by a container
runtime, or a machine shared with other work).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits

from core.parallel import available_cores, set_thread_limit, thread_limit
from store import Settings
from store.errors import UNAVAILABLE_ERRORS

__all__ = [
    "job_threads",
    "thread_share",
    "workers_on_this_machine",
    "machine_key",
    "node_name",
    "at_low_priority",
]

log = logging.getLogger("alsub.worker")

T = TypeVar("T")


def machine_key() -> str:
    """Eight hex digits naming this machine: its kernel's boot id (else its host name)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return boot_id.replace("-", "")[:8]
    except OSError:  # not Linux
        return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def node_name() -> str:
    """A unique Celery node name for a new worker, carrying the machine key."""
    return f"alsub-{uuid.uuid4().hex[:8]}.{machine_key()}@%h"


def workers_on_this_machine(records, settings: Settings) -> int:
    """Live worker processes on this machine (by `machine_key`, else host name); at least 1."""
    max_age = 3 * min(settings.heartbeat_interval, settings.heartbeat_timeout / 3)
    key, host = machine_key(), socket.gethostname()

    def here(name: str) -> bool:
        node, _, node_host = name.rpartition("@")
        tag = node.rpartition(".")[2] if "." in node else ""
        return tag == key if tag else node_host == host

    return max(1, sum(1 for name in records.live_workers(max_age) if here(name)))


def job_threads(records, settings: Settings) -> int:
    """Threads for the next job of this process (see the module docstring)."""
    if settings.worker_threads:
        return settings.worker_threads
    jobs = workers_on_this_machine(records, settings) * settings.worker_concurrency
    return max(1, available_cores() // jobs)


@contextmanager
def thread_share(records, settings: Settings) -> Iterator[int]:
    """Cap core's threads and BLAS threads at `job_threads` inside the block; yield the cap."""
    try:
        threads = job_threads(records, settings)
    except UNAVAILABLE_ERRORS:  # neighbours unknown for now: all cores, as without a cap
        log.warning("worker liveness unavailable; this job uses every core")
        threads = settings.worker_threads or available_cores()
    previous = thread_limit()
    set_thread_limit(threads)
    try:
        # BLAS too: OpenBLAS threads busy-wait after each call, and with a thread per core
        # in every worker they spun beside the other workers' jobs (perf, 2 workers on 2
        # cores: ~6% of the workers' CPU in blas_thread_server).
        with threadpool_limits(limits=threads, user_api="blas"):
            yield threads
    finally:
        set_thread_limit(previous)


#: Nice increment of `at_low_priority`'s thread (Linux: per thread).
LOW_PRIORITY = 10


def at_low_priority(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a thread of its own at a lower CPU priority (nice +10; the
    threads it starts inherit it), waited for: work nobody waits on (the products
    written after the difference is published) yields the cores to work somebody does
    (the API serving that difference). Raised here what it raised; if this thread is
    interrupted (a time limit), the work is still waited for: it writes the job's files.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            me = threading.get_native_id()  # its nice, inherited: the caller's
            os.setpriority(
                os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + LOW_PRIORITY)
            )
        except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
            pass
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="alsub-low-priority")
    thread.start()
    try:
        thread.join()
    except BaseException:
        thread.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
