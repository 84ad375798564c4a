"""Workers side by side share the machine's cores: each job's thread count follows the
number of live worker processes on the host (or ``ALSUB_WORKER_THREADS``).

Real processes: the API alone on Redis (test database, private prefix) and real Celery
workers; the thread count a job ran with is in its record's ``timings["threads"]``.
"""

from __future__ import annotations

import os
import socket
import time

import httpx

from .service_fixtures import (
    free_port,
    redis_service_env,
    start_server,
    start_worker,
    submit_sim_pair,
    wait_job,
)


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _wait_workers(client: httpx.Client, count: int, timeout: float = 90.0) -> None:
    """Until ``count`` workers answer pings and their sweepers have recorded them alive."""
    deadline = time.monotonic() + timeout
    detail = ""
    while time.monotonic() < deadline:
        detail = client.get("/readyz").json()["checks"]["workers"]["detail"]
        if detail.startswith(f"{count} worker(s)"):
            time.sleep(1.5)  # the sweeper records itself right after "ready"
            return
        time.sleep(0.3)
    raise AssertionError(f"not {count} workers: {detail}")


def _threads_of_one_job(client: httpx.Client, sim_pair: dict) -> float:
    submitted = submit_sim_pair(client, sim_pair)
    assert submitted.status_code == 202, submitted.text
    record = wait_job(client, submitted.json()["id"], timeout=180)
    assert record["state"] == "succeeded", record
    return record["timings"]["threads"]


def test_two_workers_on_one_host_take_half_the_cores_each(tmp_path, redis_prefix, sim_pair):
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    # liveness recorded every 2 s, counted for 6 s: a stopped worker's share of the cores
    # must come back at once (it forgets itself on shutdown), not when its record ages out
    env = redis_service_env(url, prefix, data_dir, heartbeat_interval=2, heartbeat_timeout=30)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    workers = []
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            workers.append(start_worker(env, tmp_path / "worker-a.log"))
            _wait_workers(client, 1)
            assert _threads_of_one_job(client, sim_pair) == _cores()

            workers.append(start_worker(env, tmp_path / "worker-b.log"))
            _wait_workers(client, 2)
            assert _threads_of_one_job(client, sim_pair) == max(1, _cores() // 2)

            workers.pop().stop()
            assert _threads_of_one_job(client, sim_pair) == _cores()
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


def test_worker_threads_setting_fixes_the_count(tmp_path, redis_prefix, sim_pair):
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, worker_threads=3)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            _wait_workers(client, 1)
            assert _threads_of_one_job(client, sim_pair) == 3
    finally:
        worker.stop()
        server.stop()


def test_workers_are_counted_per_machine_not_per_host_name(tmp_path, redis_prefix):
    """Containers on one machine have their own host names but share the kernel's boot id."""
    from store import Settings
    from store.redis_backend import RedisRecords
    from worker.threads import job_threads, machine_key, workers_on_this_machine

    url, prefix = redis_prefix
    records = RedisRecords(url, prefix)
    settings = Settings(data_dir=tmp_path, heartbeat_interval=5, heartbeat_timeout=60)
    here, elsewhere = machine_key(), "0badcafe" if machine_key() != "0badcafe" else "1badcafe"
    try:
        assert workers_on_this_machine(records, settings) == 1  # none seen yet: this one
        for name in (
            f"alsub-aaaaaaaa.{here}@container-1",  # same machine, other container
            f"alsub-bbbbbbbb.{here}@container-2",
            f"alsub-cccccccc.{elsewhere}@container-3",  # another machine
            f"celery@{socket.gethostname()}",  # a worker named by Celery: counted by host
            "celery@some-other-host",
        ):
            records.worker_seen(name)
        assert workers_on_this_machine(records, settings) == 3
        assert job_threads(records, settings) == max(1, _cores() // 3)
    finally:
        records.close()


def test_products_written_after_the_difference_run_at_low_priority():
    """`at_low_priority`: the function runs on a thread niced by `LOW_PRIORITY` (the
    threads it starts too), its value or exception comes back to the caller."""
    import threading

    import pytest

    from worker.threads import LOW_PRIORITY, at_low_priority

    def nice_of_this_thread() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice_of_this_thread()
    assert at_low_priority(nice_of_this_thread) == min(19, mine + LOW_PRIORITY)
    started: list[int] = []

    def spawns() -> int:
        child = threading.Thread(target=lambda: started.append(nice_of_this_thread()))
        child.start()
        child.join()
        return started[0]

    assert at_low_priority(spawns) == min(19, mine + LOW_PRIORITY)
    assert nice_of_this_thread() == mine  # the caller's own priority is untouched

    def fails(name: str) -> None:
        raise FileNotFoundError(name)

    with pytest.raises(FileNotFoundError, match="kernel.fits"):
        at_low_priority(fails, "kernel.fits")
