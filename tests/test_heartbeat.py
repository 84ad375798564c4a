"""The heartbeat helper of worker processes (worker.heartbeat): one forked helper per
process, beating the job of the current block only, and gone with its parent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from store import Settings, open_records
from store.records import ExposureRef, JobRecord, new_job_id
from worker import heartbeat
from worker.heartbeat import Heartbeat

REPO = Path(__file__).resolve().parents[1]


def _running_job(records, token: str) -> str:
    record = JobRecord(
        id=new_job_id(),
        owner="alice",
        science=ExposureRef(exposure_id="a" * 64),
        template=ExposureRef(exposure_id="b" * 64),
        state="running",
        worker=token,
        heartbeat_at=0.0,
    )
    records.create(record)
    return record.id


def _beaten(records, job_id: str) -> bool:
    return records.get(job_id).heartbeat_at > 0.0


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_one_helper_beats_each_block_s_job_and_only_while_it_runs(tmp_path):
    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.1)
    records = open_records(settings)
    first, second = _running_job(records, "run-1"), _running_job(records, "run-2")
    with Heartbeat(settings, first, "run-1"):
        assert _wait_until(lambda: _beaten(records, first))
        helper = heartbeat._helper[1]
    time.sleep(0.3)  # a beat already under way may still land
    after = records.get(first).heartbeat_at
    with Heartbeat(settings, second, "run-2"):
        assert _wait_until(lambda: _beaten(records, second))
        # the same process, not one forked per job (whose copy-on-write faults cost ~13%)
        assert heartbeat._helper[1] is helper and helper.alive()
        time.sleep(0.3)
        assert records.get(first).heartbeat_at == after  # the finished block's job: no beats
    # a record carrying another run's token is not beaten
    third = _running_job(records, "someone-else")
    with Heartbeat(settings, third, "run-3"):
        time.sleep(0.4)
        assert not _beaten(records, third)
    helper.close()
    heartbeat._helper = None
    records.close()


def test_the_helper_exits_when_its_process_dies(tmp_path):
    script = (
        "import os, sys, time\n"
        "from store import Settings\n"
        "from worker import heartbeat\n"
        f"settings = Settings(data_dir={str(tmp_path)!r}, heartbeat_interval=0.1)\n"
        "with heartbeat.Heartbeat(settings, 'job', 'token'):\n"
        "    print(heartbeat._helper[1].pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        helper_pid = int(process.stdout.readline())
        os.kill(helper_pid, 0)  # running
    finally:
        process.kill()
        process.wait()

    def gone() -> bool:
        try:
            os.kill(helper_pid, 0)
        except ProcessLookupError:
            return True
        # orphaned, then reaped by init; a zombie still answers kill(0)
        return Path(f"/proc/{helper_pid}/stat").read_text().split(") ")[1].startswith("Z")

    assert _wait_until(gone)


def test_a_forked_child_does_not_keep_the_helper_alive(tmp_path):
    """A process forked after the helper (Celery replacing a pool process, core forking)
    closes its copy of the helper's pipe, so the helper still ends with its parent."""
    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.1)
    with Heartbeat(settings, "job", "token"):
        helper = heartbeat._helper[1]
    child = os.fork()
    if child == 0:
        time.sleep(5.0)  # holds every inherited descriptor meanwhile
        os._exit(0)
    try:
        started = time.monotonic()
        helper.close()  # EOF unless the child's copy of the pipe is still open
        assert time.monotonic() - started < 2.0
    finally:
        heartbeat._helper = None
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_jobs_side_by_side_in_one_process_are_all_beaten(tmp_path):
    """A thread pool runs jobs side by side in one process: the helper beats each until
    its own block ends."""
    import threading

    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.1)
    records = open_records(settings)
    first, second = _running_job(records, "run-1"), _running_job(records, "run-2")
    first_done = threading.Event()

    def run_first():
        with Heartbeat(settings, first, "run-1"):
            first_done.wait(10)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        with Heartbeat(settings, second, "run-2"):
            assert _wait_until(lambda: _beaten(records, first) and _beaten(records, second))
            first_done.set()
            thread.join()
            time.sleep(0.3)  # a beat already under way may still land
            ended = records.get(first).heartbeat_at
            beaten = records.get(second).heartbeat_at
            time.sleep(0.4)
            assert records.get(first).heartbeat_at == ended  # its block ended
            assert records.get(second).heartbeat_at > beaten  # still beaten
    finally:
        first_done.set()
        thread.join()
        heartbeat._helper[1].close()
        heartbeat._helper = None
        records.close()


def test_jobs_starting_at_once_share_one_helper_that_ends_promptly(tmp_path):
    """Blocks entered by several threads at the same moment fork one helper, not one each
    (a helper forked beside another kept a copy of its pipe, and closing the other then
    waited forever); closing it returns at once."""
    import threading

    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.1)
    start = threading.Barrier(8)
    seen = []

    def run(k: int) -> None:
        start.wait()
        with Heartbeat(settings, f"job-{k}", "token"):
            seen.append(heartbeat._helper[1])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(seen) == 8 and all(helper is seen[0] for helper in seen)
    finally:
        started = time.monotonic()
        heartbeat._helper[1].close()
        heartbeat._helper = None
    assert time.monotonic() - started < 2.0
