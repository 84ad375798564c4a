"""Heartbeats of running jobs, written by a helper process beside the process running them.

A thread is not enough: a long library call that keeps the GIL (scipy's Halton
generator for ten million sky sources ran for minutes) would stop it, and the
job would be requeued while it still runs. A helper process refreshes the
running job's ``heartbeat_at`` instead, so a heartbeat means "the process
running this job is alive"; the hard time limit bounds how long that is.

The helper is forked once per worker process, at its first job, and kept: it is
told over a pipe which jobs to beat, and exits when the pipe closes (its parent
ended or died). Forking a helper at every job made the first write to every page
of the worker's grown heap a copy-on-write fault, with a TLB flush on every core
the job's threads ran on (perf, 1024 pairs on one worker: ~13% of its CPU).
"""

from __future__ import annotations

import os
import select
import threading
import time

from store import JobRecord, Settings, open_records

__all__ = ["Heartbeat", "beat_once"]


def beat_once(records, job_id: str, token: str) -> bool:
    """Refresh ``heartbeat_at`` if run ``token`` still owns the job; False when it does not."""

    def mutate(record: JobRecord) -> bool:
        if not record.run_by(token):
            return False
        record.heartbeat_at = time.time()
        return True

    _, written = records.update(job_id, mutate)
    return written


class _Helper:
    """A forked process beating the running jobs named on its pipe (``"+ <job> <token>"``
    starts one, ``"- <job> <token>"`` ends it; one per line) every ``heartbeat_interval``
    seconds. Several at once: a thread pool may run jobs side by side in one process."""

    def __init__(self, settings: Settings):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            self._serve(read_end, settings)
        os.close(read_end)
        self.pid, self.pipe = pid, write_end
        _pipes.add(write_end)  # closed in every process forked from now on

    @staticmethod
    def _serve(read_end: int, settings: Settings) -> None:
        status = 0
        try:
            records = open_records(settings)
            jobs: dict[tuple[str, str], float] = {}  # (job, token) -> when to beat next
            pending = b""
            while True:
                soonest = min(jobs.values(), default=None)
                timeout = None if soonest is None else max(0.0, soonest - time.monotonic())
                if select.select([read_end], [], [], timeout)[0]:
                    data = os.read(read_end, 4096)
                    if not data:
                        break  # the parent closed the pipe or died
                    *lines, pending = (pending + data).split(b"\n")
                    for sign, job_id, token in (line.decode().split() for line in lines):
                        if sign == "+":
                            jobs[job_id, token] = time.monotonic() + settings.heartbeat_interval
                        else:
                            jobs.pop((job_id, token), None)
                    continue
                now = time.monotonic()
                for job, due in list(jobs.items()):
                    if due > now:
                        continue
                    jobs[job] = now + settings.heartbeat_interval
                    try:
                        if not beat_once(records, *job):
                            # cancelled or taken over: its next progress report stops it
                            del jobs[job]
                    except Exception:  # a transient store error must not end the heartbeat
                        pass
        except BaseException:
            status = 1
        finally:
            os._exit(status)  # never run the parent's cleanup (Celery, atexit) in this copy

    def alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def send(self, line: str) -> None:
        os.write(self.pipe, f"{line}\n".encode())

    def close(self) -> None:
        _pipes.discard(self.pipe)
        os.close(self.pipe)  # EOF: the helper exits
        # bounded: a process that still holds a copy of the pipe would keep it waiting
        deadline = time.monotonic() + _CLOSE_WAIT
        try:
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, 9)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.01)
        except ChildProcessError:  # already reaped by alive()
            pass


#: Seconds `_Helper.close` waits for the helper to see the end of its pipe.
_CLOSE_WAIT = 5.0
#: Write ends of this process's helper pipes: a forked process must not keep them open
#: (a helper exits only when every copy of its pipe's write end is closed).
_pipes: set[int] = set()
#: One helper per process even when a thread pool starts jobs at once.
_lock = threading.Lock()


#: (settings key, helper) of this process
_helper: tuple[tuple, _Helper] | None = None


def _helper_for(settings: Settings) -> _Helper:
    """This process's helper for ``settings``' records and interval (forked when needed)."""
    global _helper
    key = (settings.redis_url, settings.redis_prefix, settings.data_dir)
    key += (settings.heartbeat_interval,)
    with _lock:
        if _helper is not None:
            helper_key, helper = _helper
            if helper_key == key and helper.alive():
                return helper
            helper.close()  # other settings (tests), or it died: start another
            _helper = None
        _helper = (key, _Helper(settings))
        return _helper[1]


def _forget_parent_helper() -> None:
    """In a forked child: drop the parent's helpers, closing this copy of their pipes,
    which would otherwise keep them alive past the parent."""
    global _helper, _lock
    for pipe in _pipes:
        try:
            os.close(pipe)
        except OSError:
            pass
    _pipes.clear()
    _helper = None
    _lock = threading.Lock()  # the parent's may have been held by another thread


os.register_at_fork(after_in_child=_forget_parent_helper)


class Heartbeat:
    """Keep ``heartbeat_at`` of a running job fresh while the block runs.

    Parameters
    ----------
    settings : `store.Settings`
        Where the records are (the helper has its own connection) and the interval.
    job_id, token : `str`
        The job and the token of this run; beating stops when the record no
        longer carries the token.
    """

    def __init__(self, settings: Settings, job_id: str, token: str):
        self._settings, self._job_id, self._token = settings, job_id, token
        self._helper: _Helper | None = None

    def __enter__(self) -> Heartbeat:
        self._helper = _helper_for(self._settings)
        self._helper.send(f"+ {self._job_id} {self._token}")
        return self

    def __exit__(self, *exc) -> None:
        if self._helper is None:
            return
        try:
            self._helper.send(f"- {self._job_id} {self._token}")
        except OSError:  # the helper died; the next job starts another
            pass
