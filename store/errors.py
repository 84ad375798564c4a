"""What "the store is unavailable" looks like, for callers that answer 503 or retry.

Redis down, restarting or still loading its append-only file, or SQLite busy
past its timeout: a transient condition, not a bug, so the API answers 503
with ``Retry-After`` and workers retry instead of failing the job.
"""

from __future__ import annotations

import sqlite3

import redis

__all__ = ["UNAVAILABLE_ERRORS"]

#: Exceptions meaning "try again shortly" (redis-py reconnects by itself on the next call).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    sqlite3.OperationalError,
)
