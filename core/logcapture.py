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
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collect_warnings"]

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
