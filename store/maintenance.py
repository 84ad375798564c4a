"""Disk housekeeping: abandoned upload files, product staging folders and orphan products.

Uploads stream into ``<store>/.tmp`` and products are built in ``.tmp-*``
folders; a process killed mid-way leaves them behind. A job whose record was
lost (a Redis without persistence, a deleted record) leaves its product
folder behind, and so does a job that failed after an attempt published (its worker
lost). `clean_disk` removes each of these once it is older than
``tmp_max_age``, so files being written right now are never touched; the API
runs it at start-up and every worker every ``maintenance_interval`` seconds.

With ``retention_days`` set, `expire_old` also bounds the disk: finished jobs older
than that go (record and products), then exposures and catalogs that no job left uses
and that were last uploaded before then.
"""

from __future__ import annotations

import logging
import time

from . import FINAL_STATES, Store
from .records import JOB_STATES, JobRecord
from .settings import Settings

__all__ = ["clean_disk", "expire_old"]

_DAY = 86400.0

log = logging.getLogger("alsub.maintenance")


def clean_disk(store: Store, settings: Settings) -> dict[str, int]:
    """Remove abandoned temporary files and orphan product folders.

    Parameters
    ----------
    store : `store.Store`
    settings : `store.Settings`
        ``tmp_max_age``: age (seconds since last modification) past which
        leftovers are removed.

    Returns
    -------
    removed : `dict`
        Number of upload temp files, staging folders and orphan job folders (no record,
        or a failed one) removed, and what `expire_old` removed.
    """
    age = settings.tmp_max_age
    removed = {
        "upload_tmp": store.exposures.clean_tmp(age) + store.catalogs.clean_tmp(age),
        "staging": store.products.clean_staging(age),
        "orphans": 0,
    }
    for job_id in store.products.job_ids(older_than=age):
        record = store.records.get(job_id)
        # a failed job serves no product: an attempt lost after publishing (worker_lost)
        # left its folder for good
        if record is None or record.state == "failed":
            store.products.delete(job_id)
            removed["orphans"] += 1
    removed.update(expire_old(store, settings))
    if any(removed.values()):
        log.warning("disk clean-up removed %s", removed)
    return removed


def expire_old(store: Store, settings: Settings, now: float | None = None) -> dict[str, int]:
    """Remove what ``retention_days`` no longer keeps (nothing when it is 0).

    Parameters
    ----------
    store : `store.Store`
    settings : `store.Settings`
        ``retention_days``: age past which finished jobs (by their end), and exposures
        and catalogs no remaining job uses (by their last upload), are removed.
    now : `float` or None
        The time to count ages from (seconds since the epoch); None: now.

    Returns
    -------
    removed : `dict`
        Number of jobs, exposures and catalogs removed.
    """
    removed = {"expired_jobs": 0, "expired_exposures": 0, "expired_catalogs": 0}
    if settings.retention_days <= 0:
        return removed
    before = (time.time() if now is None else now) - settings.retention_days * _DAY
    for state in FINAL_STATES:
        for record in store.records.in_state(state):
            if (record.finished_at or record.updated_at) < before:
                store.products.delete(record.id)
                store.records.delete(record.id)
                removed["expired_jobs"] += 1
    for kind, blobs in (("exposure", store.exposures), ("catalog", store.catalogs)):
        old = [blob_id for blob_id, uploaded in blobs.stored() if uploaded < before]
        # read after the listing: a job submitted meanwhile keeps its inputs
        used = _blobs_in_use(store, kind) if old else set()
        for blob_id in old:
            if blob_id not in used and not _uploaded_since(blobs, blob_id, before):
                blobs.delete(blob_id)
                store.records.forget_blob(kind, blob_id)
                removed[f"expired_{kind}s"] += 1
    return removed


def _blobs_in_use(store: Store, kind: str) -> set[str]:
    """Ids of the exposures (or catalogs) that a job still stored uses, in any state."""
    used: set[str] = set()
    for state in JOB_STATES:
        for record in store.records.in_state(state):
            used.update(_inputs(record, kind))
    return used


def _uploaded_since(blobs, blob_id: str, before: float) -> bool:
    """True when ``blob_id`` was uploaded again (or removed) since it was listed."""
    try:
        return blobs.path(blob_id).stat().st_mtime >= before
    except FileNotFoundError:
        return True


def _inputs(record: JobRecord, kind: str) -> list[str]:
    if kind == "catalog":
        return [record.sources_id] if record.sources_id else []
    return [record.science.exposure_id, record.template.exposure_id]
