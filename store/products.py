"""Per-job product directories, published atomically.

A worker builds the first products of a job (the difference, its metrics) in a
fresh temporary directory and then renames it to ``<root>/<job_id>``; the
frame-sized products clients download less often (matched images, background)
are added to the published folder afterwards, each file renamed into place when
complete (`ProductStore.add`). A redelivered job therefore rewrites its products
from scratch, and readers never see a half-written file.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from .blobs import fsync_dir

__all__ = ["ProductStore", "PRODUCT_FILES"]

#: Product name -> file name inside the job directory.
PRODUCT_FILES = {
    "difference": "difference.fits",
    "score": "score.fits",
    "matched_template": "matched_template.fits",
    "matched_science": "matched_science.fits",
    "kernel": "kernel.fits",
    "background": "background.fits",
    "warped_template": "warped_template.fits",
    "dia_sources": "dia_sources.fits",
    "metrics": "metrics.json",
}

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _fsync_tree(directory: Path, skip: frozenset[str] = frozenset()) -> None:
    # Core's writers do not all fsync (kernel, metrics); one pass here covers every product
    # (but the files named in ``skip``, already durable from an earlier pass).
    for entry in os.scandir(directory):
        if entry.name not in skip and entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


class ProductStore:
    """Directory of job products.

    Parameters
    ----------
    root : `pathlib.Path`
        Directory holding one sub-directory per job (created if missing).
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        """Final directory of ``job_id``'s products."""
        if not _JOB_ID_RE.match(job_id):
            raise KeyError(job_id)
        return self.root / job_id

    def publish(self, job_id: str, build: Callable[[Path], object]) -> list[str]:
        """Build products in a temporary directory, then swap it in atomically.

        Parameters
        ----------
        job_id : `str`
            Job the products belong to.
        build : callable
            ``build(directory)`` writes the product files into ``directory``.

        Returns
        -------
        names : `list` of `str`
            Names (keys of `PRODUCT_FILES`) of the products now published.
        """
        final = self.job_dir(job_id)
        staging = self.root / f".tmp-{job_id}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            build(staging)
            _fsync_tree(staging)  # every product on disk before the folder is published
            if final.exists():
                # A previous delivery of the same job published already: replace it whole.
                trash = self.root / f".old-{job_id}-{uuid.uuid4().hex}"
                os.rename(final, trash)
                os.rename(staging, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(staging, final)
            fsync_dir(self.root)  # the rename itself survives a crash
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.names(job_id)

    def add(self, job_id: str, build: Callable[[Path], object]) -> list[str]:
        """Write more products into the published folder of ``job_id``; return all names.

        ``build(directory)`` must write each file atomically (a temporary name, then a
        rename, as core's writers do), so a reader sees a product whole or not at all.
        """
        final = self.job_dir(job_id)
        before = frozenset(entry.name for entry in os.scandir(final))
        build(final)
        _fsync_tree(final, skip=before)
        return self.names(job_id)

    def names(self, job_id: str) -> list[str]:
        """Names of the published products of ``job_id`` (empty when none)."""
        directory = self.job_dir(job_id)
        return [name for name, file in PRODUCT_FILES.items() if (directory / file).is_file()]

    def path(self, job_id: str, name: str) -> Path | None:
        """File of product ``name`` of ``job_id``, or None when it does not exist."""
        file = PRODUCT_FILES.get(name)
        if file is None:
            return None
        path = self.job_dir(job_id) / file
        return path if path.is_file() else None

    def job_ids(self, older_than: float = 0.0) -> list[str]:
        """Ids of the published job folders not modified for ``older_than`` seconds."""
        limit = time.time() - older_than
        ids = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not _JOB_ID_RE.match(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < limit:
                    ids.append(entry.name)
            except FileNotFoundError:
                continue
        return ids

    def clean_staging(self, older_than: float) -> int:
        """Remove staging (``.tmp-*``) and replaced (``.old-*``) folders older than that."""
        limit = time.time() - older_than
        removed = 0
        for entry in os.scandir(self.root):
            if not entry.name.startswith((".tmp-", ".old-")):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def delete(self, job_id: str) -> None:
        """Delete every product of ``job_id``."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
