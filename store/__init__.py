"""Shared storage of the alsub service: exposures, catalogs, products and job records.

Used by both the API (``app``) and the workers (``worker``); free of FastAPI and
Celery imports. `open_store` builds the right backends from `Settings`:
content-addressed blob stores and product directories under ``data_dir``, and
job records in SQLite (embedded) or Redis (``ALSUB_REDIS_URL`` set).
"""

from __future__ import annotations

from dataclasses import dataclass

from .blobs import BlobStore, BlobWriter, UploadTooLargeError
from .products import PRODUCT_FILES, ProductStore
from .records import (
    ACTIVE_STATES,
    FINAL_STATES,
    JOB_STATES,
    ExposureRef,
    IdempotencyConflictError,
    JobRecord,
    RecordBackend,
    new_job_id,
)
from .settings import Settings

__all__ = [
    "Store",
    "open_store",
    "open_records",
    "Settings",
    "BlobStore",
    "BlobWriter",
    "UploadTooLargeError",
    "ProductStore",
    "PRODUCT_FILES",
    "RecordBackend",
    "JobRecord",
    "ExposureRef",
    "IdempotencyConflictError",
    "new_job_id",
    "JOB_STATES",
    "ACTIVE_STATES",
    "FINAL_STATES",
]


@dataclass
class Store:
    """Everything a job touches: input blobs, products and records."""

    exposures: BlobStore
    catalogs: BlobStore
    products: ProductStore
    records: RecordBackend

    def check_writable(self) -> None:
        """Raise OSError when the data directory cannot be written."""
        probe = self.exposures.tmp_dir / ".probe"
        probe.write_bytes(b"ok")
        probe.unlink()


def open_records(settings: Settings) -> RecordBackend:
    """The job-record backend of ``settings``: Redis when ``redis_url`` is set, else SQLite."""
    if settings.redis_url:
        from .redis_backend import RedisRecords

        return RedisRecords(settings.redis_url, settings.redis_prefix)
    from .sqlite_backend import SqliteRecords

    return SqliteRecords(settings.data_dir / "records.sqlite")


def open_store(settings: Settings) -> Store:
    """Open (and create if needed) the store described by ``settings``.

    Parameters
    ----------
    settings : `Settings`
        ``data_dir`` holds the files; ``redis_url`` selects Redis records.

    Returns
    -------
    store : `Store`
    """
    root = settings.data_dir
    records = open_records(settings)
    return Store(
        exposures=BlobStore(root / "exposures", ".fits"),
        catalogs=BlobStore(root / "catalogs", ".cat"),
        products=ProductStore(root / "jobs"),
        records=records,
    )
