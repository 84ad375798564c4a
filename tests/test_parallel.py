"""core.parallel: the per-process thread cap that service workers set."""

from __future__ import annotations

import os
import threading

import numpy as np

from core.convolve import correlate_image
from core.parallel import n_threads, set_thread_limit, thread_limit, thread_map


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_the_cap_bounds_the_threads_and_lifts():
    try:
        set_thread_limit(1)
        assert thread_limit() == 1
        assert n_threads() == 1
        assert n_threads(3) == 3  # an explicit count is the caller's choice
        set_thread_limit(10 * _cores())
        assert n_threads() == _cores()  # a cap never adds threads
    finally:
        set_thread_limit(None)
    assert thread_limit() is None
    assert n_threads() == _cores()


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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_blocks_are_returned_to_the_system_when_freed():
    import sys

    import pytest

    from core.parallel import MMAP_THRESHOLD, large_blocks_to_mmap

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux only")
    assert large_blocks_to_mmap()
    # a block above the threshold, then a small one after it (on the heap it would be
    # pinned below the small one): freeing the large one must give its pages back
    large = np.ones(MMAP_THRESHOLD + (4 << 20), dtype=np.uint8)
    small = np.ones(1 << 16, dtype=np.uint8)
    before = _rss_bytes()
    del large
    assert before - _rss_bytes() >= MMAP_THRESHOLD
    del small
