"""How many threads one job may use: the machine's cores shared among the jobs beside it.

Core sizes its thread pools by the cores it may run on. Two worker processes on a
2-core machine would then run four busy threads on two cores: each job slower, and no
more jobs done. A job therefore takes ``cores // (jobs that can run on this host)``
threads, where that count is the workers of this host seen alive recently (their
sweeper threads record themselves every few seconds) times the prefork concurrency,
recomputed at the start of each job, so starting or stopping a worker takes effect
at the next job. ``ALSUB_WORKER_THREADS`` fixes the number instead (containers whose
host names differ but which share cores, or a machine shared with other work).
"""

from __future__ import annotations

import os
import socket

from store import Settings

__all__ = ["job_threads", "workers_on_this_host"]


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def workers_on_this_host(records, settings: Settings) -> int:
    """Live worker processes whose node name (``name@host``) is on this host; at least 1."""
    max_age = 3 * min(settings.heartbeat_interval, settings.heartbeat_timeout / 3)
    host = socket.gethostname()
    names = records.live_workers(max_age)
    return max(1, sum(1 for name in names if name.rpartition("@")[2] == host))


def job_threads(records, settings: Settings) -> int:
    """Threads for the next job of this process (see the module docstring)."""
    if settings.worker_threads:
        return settings.worker_threads
    jobs = workers_on_this_host(records, settings) * settings.worker_concurrency
    return max(1, _cores() // jobs)
