"""Streaming an upload into the blob store (`app.ingest._fill`): the batches hashed and
written on a thread while the next is received give the bytes and id of the upload,
and a failure at any point leaves no file behind."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from app.ingest import _BATCH_BYTES, _fill
from store import BlobStore, UploadTooLargeError


async def _chunks(data: bytes, size: int = 65536, fail_after: int | None = None):
    for start in range(0, len(data), size):
        if fail_after is not None and start >= fail_after:
            raise ConnectionResetError("client went away")
        yield data[start : start + size]
        await asyncio.sleep(0)


def test_batched_upload_keeps_every_byte_in_order(tmp_path):
    blobs = BlobStore(tmp_path / "exposures", ".fits")
    data = os.urandom(3 * _BATCH_BYTES + 12345)  # three full batches and a remainder
    writer = asyncio.run(_fill(blobs.writer(len(data)), _chunks(data)))
    blob_id = writer.commit()
    assert blob_id == hashlib.sha256(data).hexdigest()
    assert blobs.path(blob_id).read_bytes() == data
    assert list(blobs.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("failure", ["too_large", "client_gone"])
def test_batched_upload_failing_midway_leaves_nothing(tmp_path, failure):
    blobs = BlobStore(tmp_path / "exposures", ".fits")
    data = os.urandom(3 * _BATCH_BYTES)
    if failure == "too_large":
        cap, chunks, error = 2 * _BATCH_BYTES, _chunks(data), UploadTooLargeError
    else:
        cap, chunks, error = len(data), _chunks(data, fail_after=2 * _BATCH_BYTES + 1), OSError
    with pytest.raises(error):
        asyncio.run(_fill(blobs.writer(cap), chunks))
    assert list(blobs.tmp_dir.iterdir()) == []
    assert not any(path.is_file() for path in (tmp_path / "exposures").rglob("*"))


def test_cancelled_upload_waits_for_the_batch_being_written(tmp_path):
    """A request cancelled while a batch is written on its thread: the file is deleted
    only after that thread is done with it (it wrote to a closed file before)."""
    import threading
    import time

    events: list[str] = []
    lock = threading.Lock()

    class SlowWriter:
        def write(self, chunk: bytes) -> None:
            time.sleep(0.005)
            with lock:
                events.append("write")

        def close(self) -> None:
            events.append("close")

        def abort(self) -> None:
            with lock:
                events.append("abort")

    async def main():
        data = bytes(3 * _BATCH_BYTES)
        task = asyncio.ensure_future(_fill(SlowWriter(), _chunks(data)))
        while "write" not in events:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # the next batch received: waiting for this one
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert events[-1] == "abort" and "close" not in events


def _store(tmp_path, redis_prefix):
    from store import Settings, open_store

    url, prefix = redis_prefix
    settings = Settings(data_dir=tmp_path / "data", redis_url=url, redis_prefix=prefix)
    return open_store(settings), settings


def _fits_bytes(tmp_path) -> bytes:
    from core.io import write_exposure
    from core.simulate import preset, simulate_pair

    pair = simulate_pair(preset("sharper_template", size=64, seed=2))
    return write_exposure(pair.science, tmp_path / "science.fits").read_bytes()


def test_upload_is_synced_while_it_is_validated_and_then_stored(tmp_path, redis_prefix):
    """`_fill` leaves the file flushed, not yet synced; `ingest_exposure` syncs it beside
    the validation and commits it: stored whole, under its sha256."""
    from app.ingest import ingest_exposure

    store, settings = _store(tmp_path, redis_prefix)
    data = _fits_bytes(tmp_path)
    writer = asyncio.run(_fill(store.exposures.writer(len(data)), _chunks(data)))
    assert writer.path.read_bytes() == data  # readable by path before the sync
    sha, meta = asyncio.run(ingest_exposure(writer, store, settings, "alice"))
    assert sha == hashlib.sha256(data).hexdigest() and meta["size_bytes"] == len(data)
    assert store.exposures.path(sha).read_bytes() == data
    assert list(store.exposures.tmp_dir.iterdir()) == []


def test_failed_sync_is_the_disks_fault_not_the_files(tmp_path, redis_prefix, monkeypatch):
    """A disk that fails the sync: raised as the OSError it is (not a 422 about the
    file), nothing stored; a file the reader cannot read is still the file's 422."""
    from app.ingest import ingest_exposure
    from core.errors import InvalidExposureError

    store, settings = _store(tmp_path, redis_prefix)
    data = _fits_bytes(tmp_path)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", no_space)
        writer = asyncio.run(_fill(store.exposures.writer(len(data)), _chunks(data)))
        with pytest.raises(OSError, match="No space left"):
            asyncio.run(ingest_exposure(writer, store, settings, "alice"))
    assert list(store.exposures.tmp_dir.iterdir()) == []
    assert not store.exposures.exists(hashlib.sha256(data).hexdigest())
    broken = data[: len(data) // 2]
    writer = asyncio.run(_fill(store.exposures.writer(len(broken)), _chunks(broken)))
    with pytest.raises(InvalidExposureError, match="truncated"):  # answered 422
        asyncio.run(ingest_exposure(writer, store, settings, "alice"))
    assert list(store.exposures.tmp_dir.iterdir()) == []
