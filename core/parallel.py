"""Threads for frame-wide numpy work: numpy and scipy.fft release the GIL in their loops,
so independent blocks of rows (or tiles) run on all cores from one process.

`set_memory_policy` sets how this process gets memory for large arrays (glibc's mmap
threshold, numpy's huge-page advice); the CLI and the worker call it at start (a
process-wide setting: an application's choice, not a library import's).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits

__all__ = [
    "n_threads",
    "thread_map",
    "split_map",
    "alongside",
    "task_pool",
    "InlineExecutor",
    "set_thread_limit",
    "thread_limit",
    "available_cores",
    "large_blocks_to_mmap",
    "small_pages_for_arrays",
    "set_memory_policy",
    "release_free_memory",
    "one_blas_thread",
    "frame_array",
    "frame_copy",
    "frame_zeros",
    "row_blocks",
    "HUGE_FRAME_BYTES",
    "MMAP_THRESHOLD",
]

T = TypeVar("T")
R = TypeVar("R")


_limit: int | None = None


def set_thread_limit(limit: int | None) -> None:
    """Cap the threads of this process's frame-wide work at ``limit`` (None or 0: no cap).

    Several processes sharing a machine (service workers) each take their share of the
    cores this way, instead of each starting a thread per core and oversubscribing them.
    """
    global _limit
    _limit = max(1, int(limit)) if limit else None


def thread_limit() -> int | None:
    """The cap set by `set_thread_limit` (None: none)."""
    return _limit


_local = threading.local()


def n_threads(workers: int | None = None) -> int:
    """Threads to use: ``workers`` if given, else the cores this process may run on; at
    most the `set_thread_limit` cap either way (a service worker's share of the cores),
    and at most the calling thread's share when it is one of `split_map`'s."""
    limit = _limit
    split = getattr(_local, "split", None)
    if split is not None:
        share = split.share()
        limit = min(limit, share) if limit else share
    if workers:
        workers = max(1, int(workers))
        return min(workers, limit) if limit else workers
    cores = available_cores()
    return min(cores, limit) if limit else cores


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Split:
    """The cores of a `split_map` call, shared among its jobs still running."""

    def __init__(self, cores: int, jobs: int, workers: int) -> None:
        self.cores, self.running, self.workers = cores, jobs, workers
        self._lock = threading.Lock()

    def share(self) -> int:
        return max(1, self.cores // max(1, min(self.running, self.workers)))

    def finished(self) -> None:
        with self._lock:
            self.running -= 1


def split_map(function: Callable[[T], R], items: Iterable[T]):
    """`thread_map` of a few large independent jobs that each thread their own frame
    passes: the cores are split between the jobs still running (a job's nested
    `thread_map` calls get its share; once the others are done, all of them) instead of
    each job starting a thread per core. Nested pools on busy cores only add switching
    and cache misses: two detections at once, each with two threads, took 25% more CPU
    than each with one."""
    items = list(items)
    count = min(n_threads(), len(items))
    if count <= 1:
        return [function(item) for item in items]
    split = _Split(n_threads(), len(items), count)
    return _shared_map(lambda item: _in_share(split, lambda: function(item)), items, count)


def _in_share(split: _Split, job: Callable[[], R]) -> R:
    """``job()`` with its share of ``split``'s cores, given back after (on the caller's
    thread too, whose own share it restores)."""
    previous = getattr(_local, "split", None)
    _local.split = split
    try:
        return job()
    finally:
        _local.split = previous
        split.finished()


@contextmanager
def alongside(function: Callable[[], R]) -> Iterator[Future]:
    """Run ``function`` on another thread while the caller's block runs, the cores split
    between the two as `split_map` splits them (whichever is left takes all); the
    future of its result is waited for on leaving. The caller's block stays on the
    calling thread (progress reports, for one, are made there). With one thread
    allowed, ``function`` runs first, in the caller's thread."""
    count = min(n_threads(), 2)
    if count <= 1:
        yield InlineExecutor().submit(function)
        return
    split = _Split(n_threads(), 2, 2)
    previous = getattr(_local, "split", None)
    made = _Task(lambda: _in_share(split, function))
    _local.split = split
    try:
        yield made
    finally:
        _local.split = previous
        split.finished()
        made.settle()


def thread_map(function: Callable[[T], R], items: Iterable[T], workers: int | None = None):
    """``[function(item) for item in items]``, on the calling thread and up to ``workers``
    - 1 (default `n_threads` - 1) threads of the process's shared pool beside it."""
    items = list(items)
    count = min(n_threads(workers), len(items))
    if count <= 1:
        return [function(item) for item in items]
    return _shared_map(function, items, count)


#: Threads the shared pool may hold, per core: nested calls (a job beside the caller, the
#: DIA stage's pools inside it) each take some; a call that finds none free does its
#: items itself.
_POOL_THREADS_PER_CORE = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    """The process's pool of worker threads, started on first use. Under load a fresh
    pool per call cost ~2 ms (its threads wait for the GIL to start), a shared one
    ~0.7 ms per call; a 4096 x 4096 subtraction made ~25 such calls."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(
                    max_workers=_POOL_THREADS_PER_CORE * available_cores(),
                    thread_name_prefix="alsub",
                )
    return _pool


def _forget_pool() -> None:
    """In a forked child (a prefork service worker) the parent's threads do not exist."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _shared_map(function: Callable[[T], R], items: list[T], count: int) -> list[R]:
    """``function`` over ``items`` by the calling thread and ``count`` - 1 pool threads,
    each taking the next item until none is left. A helper no thread has started when
    the caller is done is cancelled, so a call nested in a busy pool never waits on
    the pool's queue (no deadlock); the lowest item's error is raised."""
    results: list[Any] = [None] * len(items)
    errors: dict[int, BaseException] = {}
    taken = itertools.count()  # next() is atomic: each item is taken once

    def drain() -> None:
        while not errors:
            i = next(taken)
            if i >= len(items):
                return
            try:
                results[i] = function(items[i])
            except BaseException as exc:  # noqa: BLE001 - raised by the caller below
                errors[i] = exc

    pool = _shared_pool()
    helpers = [pool.submit(drain) for _ in range(count - 1)]
    drain()
    for helper in helpers:
        if not helper.cancel():
            helper.result()
    if errors:
        raise errors[min(errors)]
    return results


class _Task(Future):
    """A call on the shared pool whose result, when asked for before any thread has
    started it, is computed by the asking thread instead (a nested wait on the pool's
    queue could otherwise deadlock when every pool thread is waiting)."""

    def __init__(self, function: Callable[[], Any]) -> None:
        super().__init__()
        self._function = function
        self._lock = threading.Lock()
        self._queued: Future | None = _shared_pool().submit(function)

    def settle(self) -> None:
        """Make the result: wait for the pool's thread, or run the call here."""
        with self._lock:
            queued, self._queued = self._queued, None
            if queued is None:
                return
            if queued.cancel():
                queued = InlineExecutor().submit(self._function)
        exc = queued.exception()
        if exc is None:
            self.set_result(queued.result())
        else:
            self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self.settle()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.settle()
        return super().exception(timeout)


class InlineExecutor(Executor):
    """Runs each submitted call at once in the caller's thread (one thread allowed)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed back by result(), as a pool does
            future.set_exception(exc)
        return future


class _Beside(Executor):
    """`task_pool`'s executor: each call a `_Task` of the shared pool, all settled on
    leaving."""

    def __init__(self) -> None:
        self.tasks: list[_Task] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        task = _Task(lambda: fn(*args, **kwargs))
        self.tasks.append(task)
        return task


@contextmanager
def task_pool() -> Iterator[Executor]:
    """An executor for independent calls that run beside the caller's own work (numpy
    releases the GIL), on the shared pool's threads, or calls run at once in the
    caller's thread when only one is allowed (`set_thread_limit`). Every call has ended
    on leaving: a call no thread has started by then (or by its ``result()``) runs in
    the caller's thread."""
    if n_threads() <= 1:
        yield InlineExecutor()
        return
    beside = _Beside()
    try:
        yield beside
    finally:
        for task in beside.tasks:
            task.settle()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS (OpenBLAS, MKL) at one thread inside the block.

    core spreads its work over its own threads; BLAS calls inside them (batched small
    solves and products) gain nothing from more threads, and OpenBLAS's idle threads
    busy-wait after every call, taking the cores those threads need (4096 auto: ~1 s of
    CPU, about 20% of the run). The setting is process-wide while the block lasts.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


#: Blocks of at least this many bytes get their own mapping, returned to the system when
#: freed; smaller ones (rows blocks of frame-wide passes: 4-8 MB) stay on the heap for reuse.
MMAP_THRESHOLD = 12 << 20
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters
_M_MMAP_THRESHOLD = -3


def _glibc(name: str) -> Any:
    """The C library's function ``name`` on Linux, None where there is none (not glibc:
    musl has no mallopt or malloc_trim; not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def large_blocks_to_mmap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc map blocks of ``threshold`` bytes or more (fixed, not adaptive) and
    keep up to twice that much free memory on top of a heap for reuse; True when set
    (glibc only).

    By default glibc raises its threshold to the largest block freed so far (up to
    32 MB), after which partial frames (boolean frames, 16 MB FFT and statistics
    chunks) come from the heaps of whichever thread made them, and freed ones stay
    resident there between stages: at 4096 x 4096 that held 0.3 GB of the peak
    (1.69 GB -> 1.35 GB for read + auto with a fixed 8 MB threshold), at no time cost
    measurable on a shared machine.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not mallopt(_M_MMAP_THRESHOLD, int(threshold)):
        return False
    # a fixed mmap threshold also fixes the trim threshold at glibc's 128 kB: every
    # freed block of rows at a heap's top would go back to the system and fault in
    # again at the next allocation (2048 pair, preparation: 140k -> 28k page faults)
    return bool(mallopt(_M_TRIM_THRESHOLD, 2 * int(threshold)))


def small_pages_for_arrays() -> bool:
    """Stop numpy advising transparent huge pages for its large arrays; True when set.

    With the advice (numpy's default where the kernel's THP mode is ``madvise``) the
    first touch of any byte zeroes a whole 2 MB page. Calloc'd frames that are only
    partly written (sparse label images, no-data maps) then cost their full size,
    and page zeroing took ~30% of a 4096 x 4096 subtraction's CPU (perf): without it,
    system time 1.9 -> 1.25 s and the preconvolve peak 1.55 -> 1.49 GB.
    """
    import numpy as np

    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:  # numpy < 2 keeps it in np.core
        setter = getattr(getattr(np, "core", None), "multiarray", None)
        setter = getattr(setter, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    setter(False)
    return True


def release_free_memory() -> bool:
    """Give the free memory of every malloc arena back to the system (glibc's
    ``malloc_trim``); True when called (glibc only).

    Each thread that allocates gets an arena of its own, and freed blocks below the
    mmap threshold stay in it, up to the trim threshold each: after a stage that ran on
    extra threads (a job `alongside` the caller's, with its tile pools) that was ~70 MB
    of a 4096 x 4096 preconvolve subtraction's peak, held through the stages after it.
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)
    return True


def set_memory_policy() -> None:
    """The process-wide memory settings of an alsub application (CLI, worker, bench):
    `large_blocks_to_mmap` and `small_pages_for_arrays`."""
    large_blocks_to_mmap()
    small_pages_for_arrays()


#: Least size (bytes) of a `frame_array` on huge pages: a few of them, so the partly
#: used pages at its ends are a small share. Smaller arrays come from the heap, but
#: heap blocks of MBs are trimmed and faulted in again between calls as often as not.
HUGE_FRAME_BYTES = 4 << 20


#: Rows per block for frame-wide elementwise work: temporaries stay a few MB (reused
#: by the allocator) instead of frame-sized arrays that each cost fresh page faults.
BLOCK_ROWS = 256


def row_blocks(ny: int) -> list[slice]:
    """Row slices covering 0..ny in blocks of `BLOCK_ROWS`."""
    return [slice(y, min(y + BLOCK_ROWS, ny)) for y in range(0, ny, BLOCK_ROWS)]


def frame_array(shape: tuple[int, ...], dtype) -> Any:
    """An uninitialised array for a frame whose every element is written (a correlated
    image, a map of unusable pixels): from `HUGE_FRAME_BYTES` on, mapped with
    transparent huge pages advised (Linux), so its first writes fault once per 2 MB
    page instead of once per 4 kB one (a 4096 x 4096 float32 frame: ~27 -> ~4 ms of
    CPU here). Not for frames written only in part: each page touched is zeroed whole
    (`small_pages_for_arrays`). Smaller arrays, or without the advice, `numpy.empty`."""
    import numpy as np

    dtype = np.dtype(dtype)
    if not _mapped(shape, dtype):
        return np.empty(shape, dtype=dtype)
    count = math.prod(int(n) for n in shape)
    # private: a shared anonymous mapping is shmem, which takes no huge pages by default
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_HUGEPAGE)
    # the array holds the mapping: it is unmapped when the array is freed
    return np.frombuffer(pages, dtype=dtype, count=count).reshape(shape)


def frame_copy(array: Any) -> Any:
    """A copy of ``array`` in a `frame_array` (the copy writes it whole): a 4096 x 4096
    float32 plane in ~10 ms instead of ~40 ms of 4 kB page faults."""
    import numpy as np

    out = frame_array(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def frame_zeros(shape: tuple[int, ...], dtype) -> Any:
    """A zero-filled `frame_array`, for a frame read before it is written whole (a label
    buffer written sparsely first): fresh anonymous pages are zero (a large one), or
    `numpy.zeros` (a small one)."""
    import numpy as np

    dtype = np.dtype(dtype)
    if not _mapped(shape, dtype):
        return np.zeros(shape, dtype=dtype)
    return frame_array(shape, dtype)


def _mapped(shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether `frame_array` maps a frame of this shape and (numpy) dtype: from
    `HUGE_FRAME_BYTES` on, where huge pages can be advised."""
    size = math.prod(int(n) for n in shape) * dtype.itemsize
    return size >= HUGE_FRAME_BYTES and hasattr(mmap, "MADV_HUGEPAGE")
