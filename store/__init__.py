"""Shared storage of the alsub service: exposures, catalogs, products and job records.

Used by both the API (``app``) and the workers (``worker``); free of FastAPI and
Celery imports. `open_store` builds the right backends from `Settings`:
content-addressed blob stores and product directories under ``data_dir``, and
job records in SQLite (embedded) or Redis (``ALSUB_REDIS_URL`` set).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from .blobs import BlobStore, BlobWriter, UploadTooLargeError
from .datadir import data_folders, free_bytes, probe_folders
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
    #: every folder the service writes under the data directory (`store.datadir`)
    folders: list[Path] = field(default_factory=list)

    def check_writable(self, min_free_bytes: int = 0) -> None:
        """Raise `OSError` when a folder the service writes cannot be written, or when fewer
        than ``min_free_bytes`` are free on the data directory's disk (``/readyz``)."""
        # every folder: jobs/ read-only beside writable uploads said ready, and every job failed
        probe_folders(self.folders or [self.exposures.tmp_dir])
        free = free_bytes(self.products.root)
        if free < min_free_bytes:
            # a disk this full fails the next upload or job with 507: not ready before that
            raise OSError(
                errno.ENOSPC,
                f"{free} bytes free on the data directory's disk, below "
                f"ALSUB_MIN_FREE_BYTES ({min_free_bytes})",
            )


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
        folders=data_folders(root, embedded=not settings.distributed),
    )
