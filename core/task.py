"""A small task framework in the style of Rubin's pipe.base Task.

Tasks have a name, a hierarchical full name ("top.sub"), subtasks, a config
(pydantic model) and metadata shared with their subtasks, so a user can read
where the time went and what was measured from one dictionary.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

__all__ = ["Task"]


class Task:
    """Base of every core task.

    Parameters
    ----------
    config : `pydantic.BaseModel` or None
        The task's configuration; None gives ``ConfigClass()``.
    name : str or None
        Task name; default ``_default_name``.
    parent : `Task` or None
        Parent task; subtasks share the top task's metadata store.
    """

    ConfigClass: type[BaseModel] | None = None
    _default_name = "task"

    def __init__(self, config: BaseModel | None = None, name: str | None = None, parent=None):
        if config is None and self.ConfigClass is not None:
            config = self.ConfigClass()
        self.config = config
        self._name = name or self._default_name
        self._parent = parent
        self._full_name = f"{parent.get_full_name()}.{self._name}" if parent else self._name
        self._subtasks: dict[str, Task] = {}
        # one store for the whole tree, keyed by full name
        self._store: dict[str, dict[str, Any]] = parent._store if parent else {}
        self._store.setdefault(self._full_name, {})

    # names ------------------------------------------------------------------------
    def get_name(self) -> str:
        return self._name

    def get_full_name(self) -> str:
        return self._full_name

    # subtasks -----------------------------------------------------------------------
    def make_subtask(self, name: str, task_class: type[Task] | None = None, config=None) -> Task:
        """Create and register a subtask called ``name`` (a plain `Task` by default)."""
        cls = task_class or Task
        sub = cls(config=config, name=name, parent=self)
        self._subtasks[name] = sub
        setattr(self, name, sub)
        return sub

    def get_task_dict(self) -> dict[str, Task]:
        """Every task in this tree by full name, this one included."""
        tasks: dict[str, Task] = {self._full_name: self}
        for sub in self._subtasks.values():
            tasks.update(sub.get_task_dict())
        return tasks

    # metadata ---------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        return self._store[self._full_name]

    def get_full_metadata(self) -> dict[str, Any]:
        """Metadata of this task and its subtasks, keyed ``top:sub.item``.

        The task path uses ':' between levels (Rubin's convention) and '.'
        before the item name.
        """
        out: dict[str, Any] = {}
        for full_name, task in self.get_task_dict().items():
            prefix = full_name.replace(".", ":")
            for key, value in task.metadata.items():
                out[f"{prefix}.{key}"] = value
        return out

    def empty_metadata(self) -> None:
        """Clear the metadata of this task and all its subtasks."""
        for task in self.get_task_dict().values():
            task.metadata.clear()

    def add_metadata(self, key: str, value: Any) -> None:
        """Append ``value`` to the list under ``key`` (Rubin's ``metadata.add``)."""
        self.metadata.setdefault(key, [])
        if not isinstance(self.metadata[key], list):
            self.metadata[key] = [self.metadata[key]]
        self.metadata[key].append(value)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Record start, end and duration of a block as ``{name}Start*``/``{name}End*``.

        Besides the UTC time and CPU times, the block's wall duration goes in
        ``{name}Duration`` (seconds), which the service reports as stage timings.
        """
        start = _snapshot()
        t0 = time.perf_counter()
        for key, value in start.items():
            self.metadata[f"{name}Start{key}"] = value
        try:
            yield
        finally:
            end = _snapshot()
            for key, value in end.items():
                self.metadata[f"{name}End{key}"] = value
            self.metadata[f"{name}Duration"] = time.perf_counter() - t0

    def durations(self) -> dict[str, float]:
        """Wall durations recorded by `timer` in this tree, keyed ``task.block``."""
        out = {}
        for full_name, task in self.get_task_dict().items():
            for key, value in task.metadata.items():
                if key.endswith("Duration"):
                    out[f"{full_name}.{key[: -len('Duration')]}"] = value
        return out


def _snapshot() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "Utc": datetime.now(UTC).isoformat(),
        "CpuTime": time.process_time(),
        "UserTime": usage.ru_utime,
        "SystemTime": usage.ru_stime,
        "MaxResidentSetSize": usage.ru_maxrss * 1024,
        "MinorPageFaults": usage.ru_minflt,
        "MajorPageFaults": usage.ru_majflt,
        "NodeName": os.uname().nodename,
    }
