"""Job records: the state of every subtraction job, and the backend interface.

A record is a small JSON document (state, progress, timings, metrics, error,
product names, attempt bookkeeping). It is the only place job state lives: the
broker carries job ids, the blob stores hold bytes. Two backends implement
`RecordBackend`: `store.sqlite_backend.SqliteRecords` (embedded, a SQLite file
in the data directory) and `store.redis_backend.RedisRecords` (distributed).
"""

from __future__ import annotations

import base64
import time
import uuid
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "JobState",
    "ACTIVE_STATES",
    "FINAL_STATES",
    "JOB_STATES",
    "DURATION_BUCKETS",
    "ExposureRef",
    "JobRecord",
    "RecordBackend",
    "IdempotencyConflictError",
    "new_job_id",
    "sort_key",
    "encode_cursor",
    "decode_cursor",
    "time_key",
    "histogram_from_counts",
    "bucket_index",
    "job_view",
]

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = frozenset({"queued", "running"})
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Upper bounds (seconds) of the job-duration histogram buckets.
DURATION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class IdempotencyConflictError(Exception):
    """An idempotency key was reused with a different request."""

    def __init__(self, job_id: str):
        super().__init__(f"idempotency key already used for job {job_id} with another request")
        self.job_id = job_id


class ExposureRef(BaseModel):
    """An input exposure of a job: its stored id and, if given by URI, the URI."""

    exposure_id: str
    uri: str | None = None


class JobRecord(BaseModel):
    """Everything known about one subtraction job."""

    id: str
    owner: str
    state: JobState = "queued"
    created_at: float = Field(default_factory=lambda: round(time.time(), 6))
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    science: ExposureRef
    template: ExposureRef
    sources_id: str | None = None
    mode: str = "auto"
    config: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    callback_url: str | None = None
    progress: dict[str, Any] = Field(default_factory=lambda: {"stage": "queued", "fraction": 0.0})
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, str] | None = None
    products: list[str] = Field(default_factory=list)
    attempts: int = 0
    worker: str | None = None
    heartbeat_at: float | None = None
    callback: dict[str, Any] | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def run_by(self, token: str) -> bool:
        """True while the worker run ``token`` owns the job (running, claimed by it)."""
        return self.state == "running" and self.worker == token

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.model_validate_json(text)


def new_job_id() -> str:
    """A fresh, URL-safe, unguessable job id."""
    return uuid.uuid4().hex


def sort_key(record: JobRecord) -> str:
    """Lexicographic key ordering records by creation time, then id."""
    return f"{round(record.created_at * 1e6):017d}:{record.id}"


def time_key(seconds: float) -> str:
    """The sort-key prefix of a creation time (for ``since`` filters)."""
    return f"{round(seconds * 1e6):017d}"


def encode_cursor(key: str) -> str:
    """Opaque cursor from a sort key."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Sort key from a cursor; raises ValueError when malformed."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        key = base64.urlsafe_b64decode(padded.encode()).decode()
    except Exception as exc:  # binascii.Error, UnicodeDecodeError
        raise ValueError("malformed cursor") from exc
    stamp, sep, job_id = key.partition(":")
    if not sep or not stamp.isdigit() or not job_id:
        raise ValueError("malformed cursor")
    return key


Mutator = Callable[[JobRecord], bool]


class RecordBackend(ABC):
    """Storage of job records, idempotency keys, ownership, rate counters and worker liveness."""

    @abstractmethod
    def create(self, record: JobRecord, fingerprint: str | None = None) -> tuple[JobRecord, bool]:
        """Store a new record, honouring its idempotency key.

        When ``record.idempotency_key`` was already used by the same owner for a
        job that still exists, nothing is stored and that job is returned with
        ``False``; a different ``fingerprint`` raises `IdempotencyConflictError`.
        Otherwise the record is stored and returned with ``True``.
        """

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The record of ``job_id``, or None."""

    @abstractmethod
    def update(self, job_id: str, mutate: Mutator) -> tuple[JobRecord | None, bool]:
        """Atomically read, modify and write a record.

        ``mutate(record)`` changes the record in place and returns True to write
        it, False to leave the stored record alone. Returns the record as stored
        afterwards (None when missing) and whether it was written.
        """

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Delete a record (and its idempotency key); True when it existed."""

    @abstractmethod
    def list(
        self,
        owner: str,
        state: str | None = None,
        since: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of ``owner``'s records, newest first, and the cursor of the next page."""

    @abstractmethod
    def count_active(self, owner: str) -> int:
        """Number of ``owner``'s queued or running jobs."""

    @abstractmethod
    def state_counts(self) -> dict[str, int]:
        """Number of jobs in each state (all owners)."""

    @abstractmethod
    def in_state(self, state: str) -> list[JobRecord]:
        """Every record in ``state`` (all owners), for sweepers."""

    @abstractmethod
    def observe_duration(self, seconds: float) -> None:
        """Add one finished job's duration to the histogram."""

    @abstractmethod
    def duration_histogram(self) -> tuple[list[int], float, int]:
        """Cumulative counts per `DURATION_BUCKETS` bound (plus +Inf), sum and count."""

    @abstractmethod
    def add_owner(self, kind: str, blob_id: str, owner: str) -> None:
        """Record that ``owner`` uploaded blob ``blob_id`` of ``kind``."""

    @abstractmethod
    def is_owner(self, kind: str, blob_id: str, owner: str) -> bool:
        """True when ``owner`` uploaded blob ``blob_id`` of ``kind``."""

    @abstractmethod
    def remove_owner(self, kind: str, blob_id: str, owner: str) -> int:
        """Forget that ``owner`` uploaded blob ``blob_id``; return how many owners are left."""

    @abstractmethod
    def forget_blob(self, kind: str, blob_id: str) -> None:
        """Forget every owner of blob ``blob_id`` (its file was removed)."""

    @abstractmethod
    def hit(self, key: str, window: float) -> int:
        """Count one request for ``key`` in the current fixed window; return the count."""

    @abstractmethod
    def count(self, key: str, window: float) -> int:
        """Requests counted for ``key`` in the current fixed window (without counting one)."""

    @abstractmethod
    def worker_seen(self, name: str) -> None:
        """Record that worker ``name`` is alive now."""

    @abstractmethod
    def worker_gone(self, name: str) -> None:
        """Forget worker ``name`` (it shut down): it no longer counts as alive."""

    @abstractmethod
    def live_workers(self, max_age: float) -> list[str]:
        """Workers seen within the last ``max_age`` seconds."""

    @abstractmethod
    def ping(self) -> None:
        """Raise when the backend cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def histogram_from_counts(bucket_counts: list[int], total: float, count: int):
    """Cumulative bucket counts from per-bucket counts (last entry is +Inf)."""
    return list(accumulate(bucket_counts)), total, count


def bucket_index(seconds: float) -> int:
    """Index of the histogram bucket holding ``seconds`` (len(DURATION_BUCKETS) is +Inf)."""
    return bisect_left(DURATION_BUCKETS, seconds)


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


def job_view(
    record: JobRecord, base: str = "/v1/subtractions", include_config: bool = False
) -> dict[str, Any]:
    """The public JSON form of a record (API responses and webhook bodies).

    ``mode`` is the direction the run chose once it has one (``requested_mode`` is
    what was asked, e.g. ``auto``); the config is left out unless asked for.
    """
    links = {name: f"{base}/{record.id}/products/{name}" for name in record.products}
    links.pop("metrics", None)
    return {
        "id": record.id,
        "state": record.state,
        # a succeeded job is never shown without the verdict on its result
        "quality": record.metrics.get("quality"),
        "mode": record.mode,
        "requested_mode": record.config.get("mode", record.mode),
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "science": record.science.model_dump(),
        "template": record.template.model_dump(),
        "sources_id": record.sources_id,
        "config": record.config if include_config else None,
        "progress": record.progress,
        "timings": record.timings,
        "metrics": record.metrics,
        "error": record.error,
        "products": links,
        # the record's metrics are written when the job succeeds (products may come earlier)
        "metrics_url": f"{base}/{record.id}/metrics"
        if record.state == "succeeded" and "metrics" in record.products
        else None,
        "attempts": record.attempts,
        "idempotency_key": record.idempotency_key,
        "callback_url": record.callback_url,
        "callback": record.callback,
    }
