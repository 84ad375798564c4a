"""Collecting the warnings core logs during one call, so results can carry them.

Core modules report doubtful fits with `logging` (never `warnings.warn`), so a
command line or a service decides how they look. `collect_warnings` gathers the
WARNING-and-above records emitted by core's own modules in the calling thread
while it is active; `run_subtraction` stores them in ``metrics["warnings"]``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["collect_warnings", "saying", "said_first"]

T = TypeVar("T")

_CORE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _Collector(logging.Handler):
    """Keeps the messages of core's records from one thread (other jobs may share loggers)."""

    def __init__(self, thread: int):
        super().__init__(level=logging.WARNING)
        self.thread = thread
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if logging.lastResort is not None and logging.getLogger().handlers == [self]:
            # Nobody configured logging: keep Python's default of printing warnings.
            logging.lastResort.handle(record)
        if record.thread != self.thread or not record.pathname.startswith(_CORE_DIR):
            return
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call must not break a subtraction
            message = str(record.msg)
        if message not in self.messages:
            self.messages.append(message)


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collect core's warning messages (deduplicated, in order) while the block runs.

    Yields
    ------
    messages : `list` of `str`
        Filled as warnings are logged; complete when the block exits. The
        records still reach the usual handlers (console, service log).
    """
    collector = _Collector(threading.get_ident())
    # Core's loggers are named after their module or "alsub.<stage>": listen on the root,
    # filtered by source file, so a record is caught whatever its logger's name.
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector.messages
    finally:
        root.removeHandler(collector)


def saying(call: Callable[..., T], *args, **kwargs) -> tuple[T, list[str]]:
    """``call(*args, **kwargs)`` and the warnings core logged in this thread meanwhile
    (reading an input in a thread of its own: a WCS it ignored)."""
    with collect_warnings() as said:
        result = call(*args, **kwargs)
    return result, said


def said_first(said: list[str], warnings: list[str]) -> list[str]:
    """``said`` (deduplicated) then the ``warnings`` it does not hold: a run's warnings
    behind what reading its inputs said."""
    first = list(dict.fromkeys(said))
    return first + [w for w in warnings if w not in first]
