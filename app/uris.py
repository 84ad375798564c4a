"""``file://`` URIs: open a file under an allowed root, once, without following links.

Checking a path and opening it later lets a symbolic link swapped in between
redirect the open outside the root. `open_uri` instead opens the root
directory and then every component of the path relative to the one before
(``openat`` with ``O_NOFOLLOW``), so a link anywhere on the way is refused and
the file read is the file checked. Error messages name the URI, never the
file's content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from store import Settings

from .errors import ApiError

__all__ = ["open_uri", "MAX_URI_PATH"]

#: Longest accepted path (Linux PATH_MAX); longer answers 422 instead of ENAMETOOLONG.
MAX_URI_PATH = 4096
_NAME_MAX = 255
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _refuse(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)


def _path_of(uri: str) -> PurePosixPath:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        raise _refuse("uri_not_allowed", "s3:// URIs need an object store, and none is configured")
    if scheme != "file":
        raise _refuse(
            "uri_not_allowed",
            f"URI scheme {scheme or '(none)'!r} is not fetched: use file:// under an allowed root "
            "or upload the file to /v1/exposures",
        )
    if parts.netloc not in ("", "localhost"):
        raise _refuse("uri_not_allowed", "file:// URIs must not name a host")
    raw = unquote(parts.path)
    if len(raw) > MAX_URI_PATH:
        raise _refuse("uri_not_allowed", f"the URI path is longer than {MAX_URI_PATH} characters")
    if "\x00" in raw:
        raise _refuse("uri_not_allowed", "the URI path contains a NUL byte")
    path = PurePosixPath(raw)
    if not path.is_absolute():
        raise _refuse("uri_not_allowed", "file:// URIs need an absolute path")
    if ".." in path.parts:
        raise _refuse("uri_not_allowed", "file:// URIs must not contain '..'")
    if any(len(part) > _NAME_MAX for part in path.parts):
        raise _refuse("uri_not_allowed", f"a path component is longer than {_NAME_MAX} characters")
    return path


def _walk(root: str, relative: tuple[str, ...], uri: str) -> int:
    """File descriptor of ``root/relative``, opened component by component without links."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for depth, name in enumerate(relative):
            last = depth == len(relative) - 1
            flags = os.O_RDONLY | _NOFOLLOW | (0 if last else os.O_DIRECTORY)
            try:
                child = os.open(name, flags | os.O_NONBLOCK, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK) or (
                    exc.errno == errno.ENOTDIR and _is_link(fd, name)
                ):
                    raise _refuse(
                        "uri_not_allowed", f"{uri}: symbolic links are not followed"
                    ) from None
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise _refuse("uri_not_found", f"no file at {uri}") from None
                raise _refuse("uri_not_found", f"{uri} cannot be opened") from None
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse("uri_not_found", f"{uri} is not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_uri(uri: str, settings: Settings) -> BinaryIO:
    """Open the regular file a ``file://`` URI names under one of ``settings.allowed_roots``.

    Parameters
    ----------
    uri : `str`
        ``file:///absolute/path``.
    settings : `store.Settings`
        ``allowed_roots`` (absolute, symlink-free directories).

    Returns
    -------
    handle : binary file object
        Open for reading; the caller closes it.

    Raises
    ------
    app.errors.ApiError
        422 ``uri_not_allowed`` for another scheme, a host, ``..``, a too long
        path, a path outside every root or through a symbolic link; 422
        ``uri_not_found`` for a missing or non-regular file.
    """
    path = _path_of(uri)
    if not settings.allowed_roots:
        raise _refuse(
            "uri_not_allowed",
            "file:// URIs are disabled on this server (ALSUB_ALLOWED_ROOTS is empty): upload "
            "the file to POST /v1/exposures and give its exposure_id",
        )
    for root in settings.allowed_roots:
        root_parts = PurePosixPath(root).parts
        if path.parts[: len(root_parts)] == root_parts and len(path.parts) > len(root_parts):
            relative = tuple(p for p in path.parts[len(root_parts) :] if p not in ("", "."))
            try:
                fd = _walk(str(root), relative, uri)
            except OSError:
                raise _refuse("uri_not_found", f"the root of {uri} cannot be opened") from None
            return os.fdopen(fd, "rb")
    raise _refuse("uri_not_allowed", f"{uri} is outside the allowed roots")
