"""The data directory: the folders the service writes under it, and proof that it can.

`alsub serve` and `alsub worker` call `check_data_dir` before anything else touches the
directory (a read-only or misnamed one was a traceback, or a worker that said "ready" and
then failed every 5 s); ``/readyz`` probes the same folders (`probe_folders`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import SettingsError
from .settings import Settings

__all__ = ["data_folders", "probe_folders", "check_data_dir", "free_bytes"]

#: Folders under the data directory every deployment writes: uploads, catalogs, products.
_SHARED = ("exposures/.tmp", "catalogs/.tmp", "jobs")
#: And those of the embedded one: the SQLite records (the directory itself), the broker.
_EMBEDDED = (".", "broker")

#: What an operator should read for an errno (the strerror of EEXIST, "File exists", hid
#: that a plain file stands where the directory must be).
_REASONS = {
    errno.EEXIST: "a file stands where a directory must be",
    errno.ENOTDIR: "a file stands where a directory must be",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def data_folders(data_dir: Path, embedded: bool) -> list[Path]:
    """Every folder the service writes into under ``data_dir`` (``embedded``: no Redis)."""
    names = _SHARED + (_EMBEDDED if embedded else ())
    return [data_dir / name for name in names]


def probe_folders(folders: list[Path]) -> None:
    """Write and remove a file in each of ``folders``; raise the first `OSError`."""
    for folder in folders:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(name)


def free_bytes(data_dir: Path) -> int:
    """Bytes an unprivileged writer may still use on the data directory's file system."""
    stats = os.statvfs(data_dir)
    return stats.f_bavail * stats.f_frsize


def check_data_dir(settings: Settings) -> None:
    """Create the data directory's folders if missing and prove each writable.

    Raises
    ------
    store.errors.SettingsError
        One line naming ``ALSUB_DATA_DIR``, the folder (relative to it) and the reason;
        the path itself is not shown.
    """
    root = settings.data_dir
    folders = data_folders(root, embedded=not settings.distributed)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe_folders([folder])
        except OSError as exc:
            where = "the directory" if folder == root else f"its {folder.relative_to(root)} folder"
            reason = _REASONS.get(exc.errno, exc.strerror or type(exc).__name__)
            raise SettingsError(
                f"ALSUB_DATA_DIR cannot be written ({where}: {reason}): give a directory this "
                "user can create and write"
            ) from None
