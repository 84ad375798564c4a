"""core.parallel: the per-process thread cap that service workers set."""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np
import pytest

from core.convolve import correlate_image
from core.parallel import (
    alongside,
    n_threads,
    set_thread_limit,
    split_map,
    task_pool,
    thread_limit,
    thread_map,
)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_the_cap_bounds_the_threads_and_lifts():
    try:
        set_thread_limit(1)
        assert thread_limit() == 1
        assert n_threads() == 1
        assert n_threads(3) == 1  # an explicit count stays within the worker's share too
        set_thread_limit(10 * _cores())
        assert n_threads() == _cores()  # a cap never adds threads
    finally:
        set_thread_limit(None)
    assert thread_limit() is None
    assert n_threads() == _cores()
    assert n_threads(3) == 3  # without a cap an explicit count is the caller's choice


def test_capped_work_runs_on_one_thread_and_gives_the_same_numbers():
    seen: set[int] = set()

    def record(i: int) -> int:
        seen.add(threading.get_ident())
        return i * i

    rng = np.random.default_rng(3)
    image = rng.normal(size=(1500, 1300)).astype(np.float32)
    kernel = rng.normal(size=(15, 15))
    free = correlate_image(image, kernel)
    try:
        set_thread_limit(1)
        assert thread_map(record, range(8)) == [i * i for i in range(8)]
        assert seen == {threading.get_ident()}  # no pool: the calling thread did it all
        capped = correlate_image(image, kernel)
    finally:
        set_thread_limit(None)
    np.testing.assert_allclose(capped, free, rtol=1e-5, atol=1e-4 * float(np.abs(free).max()))


def test_split_map_shares_the_cores_between_its_jobs():
    """Each of split_map's jobs gets its share of the cores for its nested passes (two
    jobs on 2 cores: one thread each), the same results as thread_map, and the share
    ends with the job."""
    cores = _cores()
    parties = min(2, cores)  # one core: the jobs run one after the other
    start, end = threading.Barrier(parties, timeout=10), threading.Barrier(parties, timeout=10)

    def job(i: int) -> tuple[int, int, int]:
        start.wait()  # both running while they read their shares
        inner: set[int] = set()

        def square(k: int) -> int:
            inner.add(threading.get_ident())
            return k * k

        assert thread_map(square, range(16)) == [k * k for k in range(16)]
        seen = n_threads()
        end.wait()
        return i * i, seen, len(inner)

    out = split_map(job, range(2))
    assert [v for v, _, _ in out] == [0, 1]
    share = max(1, cores // 2)
    assert all(seen == share for _, seen, _ in out)
    assert all(used <= share for _, _, used in out)
    assert n_threads() == cores  # the caller's own count is untouched
    try:  # under a cap of one thread the jobs run one after the other, in the caller
        set_thread_limit(1)
        me = threading.get_ident()
        assert split_map(lambda i: (threading.get_ident(), n_threads()), range(2)) == [(me, 1)] * 2
    finally:
        set_thread_limit(None)


def test_split_map_gives_the_last_job_running_all_the_cores():
    """A job still running when the others are done gets their cores for its next passes
    (the science's measurement after the template's detection)."""
    cores = _cores()
    both = threading.Barrier(min(2, cores), timeout=10)

    def job(i: int) -> list[int]:
        seen = [n_threads()]
        both.wait()  # each read its share while the other ran
        if i == 0:
            return seen
        deadline = time.monotonic() + 10
        while n_threads() != cores and time.monotonic() < deadline:
            time.sleep(0.005)
        return seen + [n_threads()]

    first, second = split_map(job, range(2))
    assert first == [max(1, cores // 2)]
    assert second == [max(1, cores // 2), cores]


def test_alongside_shares_the_cores_with_the_callers_block():
    """alongside: the function runs on another thread while the caller's block runs on
    the calling thread, each with its share of the cores; once the block has ended the
    function gets them all. With the cap at 1 it runs first, in the caller's thread.
    Its result and its error come back through the future."""
    cores = _cores()
    me = threading.get_ident()
    both = threading.Barrier(min(2, cores), timeout=10)
    block_done = threading.Event()
    if cores == 1:  # the function runs before the block: nothing to wait for
        block_done.set()

    def background() -> tuple[int, int, int]:
        both.wait()  # the caller's block is running
        during = n_threads()
        both.wait()
        block_done.wait(timeout=10)
        deadline = time.monotonic() + 10
        while n_threads() != cores and time.monotonic() < deadline:
            time.sleep(0.005)
        return threading.get_ident(), during, n_threads()

    previous = n_threads()
    with alongside(background) as made:
        both.wait()
        mine = n_threads()
        both.wait()
        block_done.set()
    assert n_threads() == previous  # the caller's own count is restored
    ident, during, after = made.result()
    if cores > 1:
        assert ident != me
        assert mine == during == max(1, cores // 2)
        assert after == cores
    with alongside(lambda: int("bad")) as failed:
        pass
    with pytest.raises(ValueError, match="bad"):
        failed.result()
    try:
        set_thread_limit(1)
        order: list[str] = []
        with alongside(lambda: order.append("function") or threading.get_ident()) as made:
            order.append("block")
        assert order == ["function", "block"] and made.result() == me
    finally:
        set_thread_limit(None)


def test_task_pool_runs_beside_the_caller_or_in_its_thread_when_capped():
    """task_pool: calls on other threads while the caller works on; with the cap at 1
    each call runs at once in the caller's thread. Results and errors come back through
    the futures either way."""

    def where(i: int) -> tuple[int, int]:
        if i < 0:
            raise ValueError("negative")
        return i * i, threading.get_ident()

    me = threading.get_ident()
    if n_threads() > 1:
        # a call that waits for the caller's signal: it can only end if it runs beside it
        started, go = threading.Event(), threading.Event()

        def handshake() -> int:
            started.set()
            assert go.wait(timeout=10)
            return threading.get_ident()

        with task_pool() as pool:
            made = pool.submit(handshake)
            assert started.wait(timeout=10)
            go.set()
        assert made.result() != me
    with task_pool() as pool:
        futures = [pool.submit(where, i) for i in range(6)]
        failed = pool.submit(where, -1)
    assert [f.result()[0] for f in futures] == [i * i for i in range(6)]
    with pytest.raises(ValueError, match="negative"):
        failed.result()
    try:
        set_thread_limit(1)
        with task_pool() as pool:
            futures = [pool.submit(where, i) for i in range(6)]
            assert all(f.done() for f in futures)  # ran at submission
            failed = pool.submit(where, -1)
    finally:
        set_thread_limit(None)
    assert [f.result() for f in futures] == [(i * i, me) for i in range(6)]
    with pytest.raises(ValueError, match="negative"):
        failed.result()


def test_nested_calls_on_a_busy_shared_pool_finish():
    """Calls nested in jobs that hold every thread of the shared pool finish: a call no
    thread is free for runs in the thread that needs it (with fresh pools per call this
    was free of deadlock by construction; the shared pool must stay so)."""
    from core.parallel import _POOL_THREADS_PER_CORE

    jobs = 3 * _POOL_THREADS_PER_CORE * max(1, os.cpu_count() or 1)
    release = threading.Event()

    def inner(k: int) -> int:
        with task_pool() as pool:
            made = pool.submit(lambda: k + 1)
            doubled = thread_map(lambda v: 2 * v, range(k % 5))
            return made.result() + sum(doubled)

    def outer(i: int) -> int:
        release.wait(timeout=10)  # every job holds its thread until all are queued
        return sum(thread_map(inner, range(i, i + 6)))

    done: list[int] = []
    runner = threading.Thread(target=lambda: done.extend(thread_map(outer, range(jobs), jobs)))
    runner.start()
    time.sleep(0.2)
    release.set()
    runner.join(timeout=60)
    assert not runner.is_alive(), "nested calls on a busy pool deadlocked"

    def expected(i: int) -> int:
        return sum(k + 1 + sum(2 * v for v in range(k % 5)) for k in range(i, i + 6))

    assert done == [expected(i) for i in range(jobs)]


def test_thread_map_keeps_the_order_and_raises_the_first_items_error():
    def job(i: int) -> int:
        if i in (5, 9):
            raise ValueError(f"item {i}")
        time.sleep(0.001 * (i % 3))
        return i * i

    assert thread_map(lambda i: i * i, range(50), 4) == [i * i for i in range(50)]
    with pytest.raises(ValueError, match="item 5"):
        thread_map(job, range(12), 4)


_FREED_BLOCK_SCRIPT = """
import os, sys
import numpy as np
from core.parallel import MMAP_THRESHOLD, large_blocks_to_mmap

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

set_ = large_blocks_to_mmap() if sys.argv[1] == "set" else False
# a large block freed, then the same again with a small block allocated after it
# (on the heap the small one would pin the large one's pages below it)
for _ in range(2):
    large = np.ones(MMAP_THRESHOLD + (4 << 20), dtype=np.uint8)
    small = np.ones(1 << 16, dtype=np.uint8)
    before = rss()
    del large
    dropped = before - rss()
print(int(set_), dropped, MMAP_THRESHOLD)
"""


def _fresh_process(script: str, *args: str) -> list[str]:
    """The words a script prints, run in a fresh interpreter on this checkout (the
    memory settings are process-wide)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    return out.stdout.split()


def test_large_blocks_are_returned_to_the_system_when_freed():
    """In a fresh process (as the CLI and the worker call it, at start)."""
    import sys

    def run(mode):
        return [int(v) for v in _fresh_process(_FREED_BLOCK_SCRIPT, mode)]

    was_set, dropped, threshold = run("set")
    if not sys.platform.startswith("linux"):
        assert not was_set  # glibc's mallopt only: a no-op elsewhere
        return
    assert was_set
    assert dropped >= threshold
    # without it glibc's adaptive threshold keeps the second large block on the heap
    _, dropped_default, _ = run("default")
    assert dropped_default < threshold


_REUSE_SCRIPT = """
import resource, sys
import numpy as np
from core.parallel import large_blocks_to_mmap
if not large_blocks_to_mmap():
    print(-1)
    sys.exit()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up: the heap grows once
    np.ones(4 << 20, dtype=np.uint8)
start = faults()
for _ in range(50):
    np.ones(4 << 20, dtype=np.uint8)  # a 4 MB block of rows, freed at once
print(faults() - start)
"""


def test_freed_heap_blocks_are_reused_without_faulting_again():
    # with a fixed mmap threshold glibc would trim every freed MB-sized block at the
    # top of the heap (128 kB trim threshold), and 50 such blocks would fault in 50 x
    # 1024 pages; a separate process, since the setting is process-wide

    faults = int(_fresh_process(_REUSE_SCRIPT)[-1])
    if faults < 0:
        return  # not glibc: nothing to check
    assert faults < 5 * 1024


_SPARSE_TOUCH_SCRIPT = """
import os, sys
import numpy as np
from core.parallel import set_memory_policy

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

if sys.argv[1] == "set":
    set_memory_policy()
frame = np.zeros(256 << 20, dtype=np.uint8)  # calloc'd: no page touched yet
before = rss()
frame[:: 2 << 20] = 1  # one byte per 2 MB, as a sparse label image is written
print(rss() - before)
"""


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def test_sparsely_written_frames_cost_only_the_pages_touched():
    # numpy advises huge pages for large arrays: one byte written would then zero and
    # hold a whole 2 MB page, and a sparse label image would cost its full size

    def grown(mode: str) -> int:
        return int(_fresh_process(_SPARSE_TOUCH_SCRIPT, mode)[-1])

    assert grown("set") < 16 << 20  # 128 pages touched, not 256 MB
    if _thp_mode() == "madvise":  # where numpy's advice takes effect, it costs it all
        assert grown("default") > 128 << 20


_FRAME_SCRIPT = """
import resource
import numpy as np
from core.parallel import frame_array, set_memory_policy

set_memory_policy()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frame_array((8, 8), np.float32)  # warm up
start = faults()
frame = frame_array((4096, 4096), np.float32)
frame[...] = np.float32(1.5)
print(faults() - start, int(frame.sum(dtype=np.float64)), frame.flags.writeable)
"""


def test_a_frame_written_whole_faults_in_huge_pages():
    # 64 MB in 4 kB pages is 16384 faults; in 2 MB ones (numpy.empty without the
    # advice, as `small_pages_for_arrays` sets) it is a few dozen

    from core.parallel import frame_array

    small = frame_array((3, 5), np.int32)
    assert small.shape == (3, 5) and small.dtype == np.int32
    out = _fresh_process(_FRAME_SCRIPT)
    faults, total, writeable = int(out[0]), int(out[1]), out[2]
    assert total == 4096 * 4096 * 3 // 2 and writeable == "True"
    if _thp_mode() in ("madvise", "always"):
        assert faults < 1024


def test_frame_zeros_and_frame_copy_hold_zeros_and_the_copied_values():
    from core.parallel import frame_copy, frame_zeros

    # small ones come from numpy (a heap block: zeroed explicitly), large ones from fresh
    # anonymous pages (zero); both are writable and independent of their source
    for shape, dtype in (((3, 5), np.int32), ((1100, 1000), np.int32), ((2100, 2050), bool)):
        zeros = frame_zeros(shape, dtype)
        assert zeros.shape == shape and zeros.dtype == dtype and not zeros.any()
        source = np.arange(math.prod(shape)).reshape(shape).astype(dtype)
        copied = frame_copy(source)
        np.testing.assert_array_equal(copied, source)
        copied[0, 0] = 1 - copied[0, 0]
        assert copied[0, 0] != source[0, 0] and copied.dtype == dtype


_TRIM_SCRIPT = """
import threading
import numpy as np
from core.parallel import release_free_memory, set_memory_policy

set_memory_policy()
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
def work():  # 200 blocks of 1 MB, below the mmap threshold: from the thread's arena
    blocks = [np.ones(1 << 17) for _ in range(200)]
    del blocks
thread = threading.Thread(target=work)
thread.start()
thread.join()
before = rss()
print(release_free_memory(), (before - rss()) // 1024)
"""


def test_release_free_memory_returns_what_a_threads_arena_kept():
    called, released_mb = _fresh_process(_TRIM_SCRIPT)
    if sys.platform.startswith("linux") and called == "True":
        assert int(released_mb) > 32  # ~126 MB here: the arena keeps most of the 200
    else:
        assert called == "False"  # not glibc: nothing to trim
