"""What "the store is unavailable" looks like, for callers that answer 503 or retry.

Redis down, restarting or still loading its append-only file, or SQLite busy
past its timeout: a transient condition, not a bug, so the API answers 503
with ``Retry-After`` and workers retry instead of failing the job. A full data
directory is not transient: the API answers 507 and a job fails as
``insufficient_storage`` (`storage_full`). A data directory that refuses writes (a
read-only file system, permissions) is no client's fault either: 503 and a job failed as
``storage_unavailable`` (`storage_unavailable`). A setting the service cannot run with is a
`SettingsError` at start-up.
"""

from __future__ import annotations

import errno
import sqlite3

import redis

__all__ = [
    "UNAVAILABLE_ERRORS",
    "SettingsError",
    "storage_full",
    "storage_unavailable",
    "expected_outage",
    "STORAGE_FULL_MESSAGE",
    "STORAGE_UNAVAILABLE_MESSAGE",
]

#: Exceptions meaning "try again shortly" (redis-py reconnects by itself on the next call).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    sqlite3.OperationalError,
)


#: errno of a full disk, a disk quota or a file-size limit: the service's storage, not the
#: client's input, is at fault.
_STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: What a client hears when the data directory is full (no server path, no errno text).
STORAGE_FULL_MESSAGE = (
    "the service's disk is full: nothing was stored; try again later (its operator must "
    "free space in the data directory)"
)


def storage_full(exc: BaseException) -> bool:
    """True when ``exc`` says the data directory's disk is full (or a quota or file-size
    limit is reached): a file write's `OSError`, or SQLite's ``database or disk is full``."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in _STORAGE_FULL_ERRNOS


#: errno of a data directory that refuses writes although it has room: a read-only file
#: system (a remount after disk errors), or permissions changed under the service.
_STORAGE_REFUSED_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

#: What a client hears then (no server path, no errno text).
STORAGE_UNAVAILABLE_MESSAGE = (
    "the service's storage refuses writes (read-only or permission denied): nothing was "
    "stored; try again later (its operator must make the data directory writable)"
)


def storage_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the data directory refuses writes (`_STORAGE_REFUSED_ERRNOS`),
    or SQLite's ``attempt to write a readonly database``."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY
    return isinstance(exc, OSError) and exc.errno in _STORAGE_REFUSED_ERRNOS


def expected_outage(exc: BaseException) -> bool:
    """True when ``exc`` is an outage the service is built to wait out (the store
    unreachable, the disk full or refusing writes): worth one log line, not a trace
    (a Redis outage logged a full traceback every 5 s from each worker)."""
    return isinstance(exc, UNAVAILABLE_ERRORS) or storage_full(exc) or storage_unavailable(exc)


class SettingsError(Exception):
    """A setting the service cannot run with, found when it starts (`alsub serve` and
    `alsub worker` print it as one line and exit 2); the message quotes no value."""
