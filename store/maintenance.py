"""Disk housekeeping: abandoned upload files, product staging folders and orphan products.

Uploads stream into ``<store>/.tmp`` and products are built in ``.tmp-*``
folders; a process killed mid-way leaves them behind. A job whose record was
lost (a Redis without persistence, a deleted record) leaves its product
folder behind, and so does a job that failed after an attempt published (its worker
lost). `clean_disk` removes each of these once it is older than
``tmp_max_age``, so files being written right now are never touched; the API
runs it at start-up and every worker every ``maintenance_interval`` seconds.
"""

from __future__ import annotations

import logging

from . import Store
from .settings import Settings

__all__ = ["clean_disk"]

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
        or a failed one) removed.
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
    if any(removed.values()):
        log.warning("disk clean-up removed %s", removed)
    return removed
