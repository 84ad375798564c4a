"""Threads for frame-wide numpy work: numpy and scipy.fft release the GIL in their loops,
so independent blocks of rows (or tiles) run on all cores from one process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["n_threads", "thread_map"]

T = TypeVar("T")
R = TypeVar("R")


def n_threads(workers: int | None = None) -> int:
    """Threads to use: ``workers`` if given, else the cores this process may run on."""
    if workers:
        return max(1, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def thread_map(function: Callable[[T], R], items: Iterable[T], workers: int | None = None):
    """``[function(item) for item in items]``, run on a short-lived pool of threads.

    A fresh pool per call (about 0.1 ms) keeps nested calls free of deadlock.
    """
    items = list(items)
    count = min(n_threads(workers), len(items))
    if count <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(function, items))
