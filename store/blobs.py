"""Content-addressed file store: the same bytes get the same sha256 id and one copy.

Uploads are streamed into a temporary file under the store's root while being
hashed and counted, so a size cap is enforced before the disk fills; the
caller validates the temporary file and then commits it, which renames it to
``<root>/<sha[:2]>/<sha><suffix>`` (or drops it when that copy already exists).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["BlobStore", "BlobWriter", "UploadTooLargeError", "fsync_dir"]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UploadTooLargeError(Exception):
    """An upload exceeded the configured byte cap."""

    def __init__(self, limit: int):
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


class BlobWriter:
    """A temporary file being filled with an upload, hashed as it is written.

    Parameters
    ----------
    store : `BlobStore`
        Store the blob will be committed to.
    max_bytes : `int`
        Cap on the total size; `write` raises `UploadTooLargeError` past it
        (and deletes what was written).
    """

    def __init__(self, store: BlobStore, max_bytes: int):
        self._store = store
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, suffix=store.suffix)
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raise `UploadTooLargeError` when the cap is passed."""
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.abort()
            raise UploadTooLargeError(self.max_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    def flush(self) -> None:
        """Hand what was written to the OS (it can then be read by path), not yet to the
        disk: `close` syncs it, and can run while it is read."""
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        """Flush, sync to disk and close the temporary file (it can then be read for
        validation)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    @property
    def sha256(self) -> str:
        """Hex sha256 of everything written so far."""
        return self._hash.hexdigest()

    def commit(self) -> str:
        """Move the temporary file to its content address; return the sha256 id."""
        self.close()
        return self._store._adopt(self.path, self.sha256)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    """Files addressed by the sha256 of their bytes, with a JSON sidecar each.

    Parameters
    ----------
    root : `pathlib.Path`
        Directory of this store (created if missing).
    suffix : `str`
        File-name suffix of the stored blobs, e.g. ``".fits"``.
    """

    def __init__(self, root: Path, suffix: str = ""):
        self.root = Path(root)
        self.suffix = suffix
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def valid_id(blob_id: str) -> bool:
        """True when ``blob_id`` looks like a sha256 hex digest (nothing else is a path)."""
        return bool(_SHA256_RE.match(blob_id or ""))

    def path(self, blob_id: str) -> Path:
        """Path of the blob ``blob_id`` (whether or not it exists)."""
        if not self.valid_id(blob_id):
            raise KeyError(blob_id)
        return self.root / blob_id[:2] / f"{blob_id}{self.suffix}"

    def exists(self, blob_id: str) -> bool:
        """True when the blob is stored."""
        return self.valid_id(blob_id) and self.path(blob_id).is_file()

    def writer(self, max_bytes: int) -> BlobWriter:
        """Start a streamed upload capped at ``max_bytes``."""
        return BlobWriter(self, max_bytes)

    def put_stream(self, chunks: Iterable[bytes], max_bytes: int) -> str:
        """Store an iterable of byte chunks without validation; return its id."""
        writer = self.writer(max_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def put_bytes(self, data: bytes, max_bytes: int | None = None) -> str:
        """Store ``data``; return its id."""
        return self.put_stream([data], max_bytes if max_bytes is not None else len(data))

    def copy_file(self, source: BinaryIO, max_bytes: int) -> BlobWriter:
        """Copy an open file into a new (uncommitted) writer, enforcing the cap while copying."""
        writer = self.writer(max_bytes)
        try:
            while chunk := source.read(_CHUNK):
                writer.write(chunk)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return writer

    def _adopt(self, tmp_path: Path, blob_id: str) -> str:
        final = self.path(blob_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            tmp_path.unlink(missing_ok=True)  # same bytes already stored: keep one copy
            os.utime(final)  # uploaded again: its age for ALSUB_RETENTION_DAYS starts anew
        else:
            os.replace(tmp_path, final)
            fsync_dir(final.parent)
        return blob_id

    def meta_path(self, blob_id: str) -> Path:
        """Path of the JSON sidecar of ``blob_id``."""
        return self.path(blob_id).with_suffix(".json")

    def write_meta(self, blob_id: str, meta: dict) -> None:
        """Atomically write the JSON sidecar of a stored blob."""
        target = self.meta_path(blob_id)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".json")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(meta, handle, default=str)
                handle.flush()
                os.fsync(handle.fileno())  # a crash must not leave an empty sidecar behind
            os.replace(name, target)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)

    def read_meta(self, blob_id: str) -> dict | None:
        """The JSON sidecar of ``blob_id``, or None when missing or unreadable.

        An empty or truncated sidecar (a crash before it reached the disk) counts as
        missing: uploading the same bytes again validates the blob and rewrites it.
        """
        try:
            meta = json.loads(self.meta_path(blob_id).read_text())
        except (FileNotFoundError, KeyError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def delete(self, blob_id: str) -> None:
        """Remove a blob and its sidecar (missing is fine)."""
        if self.valid_id(blob_id):
            self.path(blob_id).unlink(missing_ok=True)
            self.meta_path(blob_id).unlink(missing_ok=True)

    def stored(self) -> Iterator[tuple[str, float]]:
        """(id, time of the last upload) of every stored blob."""
        for folder in self.root.glob("[0-9a-f][0-9a-f]"):
            for path in folder.glob(f"*{self.suffix}"):
                blob_id = path.name.removesuffix(self.suffix)
                if not self.valid_id(blob_id):
                    continue
                try:
                    yield blob_id, path.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted meanwhile

    def clean_tmp(self, older_than: float) -> int:
        """Remove temporary files not modified for ``older_than`` seconds; return how many.

        Uploads in flight are written continuously, so they are younger than any sane age.
        """
        limit = time.time() - older_than
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # committed or aborted meanwhile
        return removed
