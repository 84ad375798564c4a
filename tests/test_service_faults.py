"""Faults of the distributed deployment: long GIL-bound work, Redis outages and restarts.

Real processes throughout: ``alsub serve --workers 0`` and ``alsub worker`` on
Redis (the shared server's test database with a private prefix, or a private
``redis-server`` this module starts and restarts; the shared one is never touched).
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
import redis

from .service_fixtures import (
    PrivateRedis,
    free_port,
    redis_service_env,
    start_server,
    start_worker,
    submit_sim_pair,
    upload,
    wait_job,
    wait_ready,
)

TOKEN = "faults-token-12"


def redis_env(url: str, prefix: str, data_dir, **extra) -> dict[str, str]:
    return redis_service_env(url, prefix, data_dir, tokens=TOKEN, **extra)


def api_client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_heartbeat_continues_while_the_job_holds_the_gil(tmp_path, redis_prefix, sim_pair):
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_env(
        url,
        prefix,
        data_dir,
        heartbeat_interval=0.5,
        heartbeat_timeout=2.0,
        # Every stage keeps the GIL for 3 s, past the heartbeat timeout: a heartbeat thread
        # cannot run, and the job would be requeued while it still computes.
        test_stage_delay=3.0,
        test_stage_holds_gil="true",
    )
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with api_client(base) as client:
            wait_ready(client)
            submitted = submit_sim_pair(client, sim_pair)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            stages = set()
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                record = client.get(f"/v1/subtractions/{job_id}").json()
                stages.add(record["progress"]["stage"])
                if record["state"] in ("succeeded", "failed"):
                    break
                time.sleep(0.3)
            assert record["state"] == "succeeded", (record, worker.log_tail())
            assert record["attempts"] == 1, record
            assert "requeued" not in stages, stages
    finally:
        worker.stop()
        server.stop()


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_restart_loses_no_job_and_the_api_answers_503_meanwhile(
    tmp_path, private_redis, sim_pair
):
    data_dir = tmp_path / "data"
    env = redis_env(
        private_redis.url,
        "alsub:",
        data_dir,
        heartbeat_interval=0.5,
        heartbeat_timeout=10,
        test_stage_delay=0.3,
        tmp_max_age=20,
        maintenance_interval=1,
    )
    # Leftovers: products of a job whose record is gone, an abandoned upload and staging folder.
    orphan = data_dir / "jobs" / "0123456789abcdef0123456789abcdef"
    orphan.mkdir(parents=True)
    (orphan / "difference.fits").write_bytes(b"x" * 100)
    abandoned = data_dir / "exposures" / ".tmp" / "tmpabandoned.fits"
    abandoned.parent.mkdir(parents=True)
    abandoned.write_bytes(b"x" * 100)
    staging = data_dir / "jobs" / ".tmp-0123456789abcdef-dead"
    staging.mkdir()
    old = time.time() - 60
    for path in (orphan, abandoned, staging):
        os.utime(path, (old, old))

    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with api_client(base) as client:
            wait_ready(client)
            assert not orphan.exists() and not abandoned.exists() and not staging.exists()
            science, template = (
                upload(client, sim_pair["science"]),
                upload(client, sim_pair["template"]),
            )
            body = {"science": {"exposure_id": science}, "template": {"exposure_id": template}}
            jobs = []
            for _ in range(4):
                response = client.post("/v1/subtractions", json=body)
                assert response.status_code == 202, response.text
                jobs.append(response.json()["id"])

            private_redis.stop()
            for response in (
                client.get(f"/v1/subtractions/{jobs[0]}"),
                client.get("/v1/subtractions"),
                client.post("/v1/subtractions", json=body),
            ):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "5"
                assert response.json()["error"]["code"] == "service_unavailable"
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert not ready.json()["checks"]["store"]["ok"]
            assert "onnect" in ready.json()["checks"]["store"]["detail"]  # ConnectionError
            assert client.get("/healthz").status_code == 200
            time.sleep(2.0)

            private_redis.start()  # same port and folder: the append-only file is replayed
            wait_ready(client)
            records = [wait_job(client, job_id, timeout=150) for job_id in jobs]
            assert [r["state"] for r in records] == ["succeeded"] * 4, (records, worker.log_tail())
            listing = client.get("/v1/subtractions", params={"limit": 50}).json()["items"]
            assert sorted(item["id"] for item in listing) == sorted(jobs)  # none lost or doubled
            assert sorted(
                p.name for p in (data_dir / "jobs").iterdir() if not p.name.startswith(".")
            ) == sorted(jobs)
    finally:
        worker.stop()
        server.stop()


def _said_in_one_line(log: str, what: str) -> int:
    """How often ``what`` was logged; asserts none of them came with a trace."""
    lines = log.splitlines()
    said = [number for number, line in enumerate(lines) if what in line]
    for number in said:
        following = lines[number + 1] if number + 1 < len(lines) else ""
        assert not following.startswith("Traceback"), "\n".join(lines[number : number + 8])
    return len(said)


def test_a_redis_outage_is_one_line_per_sweeper_pass(tmp_path, private_redis):
    """While Redis was down each worker logged a full traceback every sweeper pass ("sweeper
    pass failed"): an outage the worker waits out is one line each time."""
    env = redis_env(
        private_redis.url, "alsub:", tmp_path / "data", heartbeat_interval=0.5, heartbeat_timeout=10
    )
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        records = redis.Redis.from_url(private_redis.url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not records.zcard("alsub:workers"):
            time.sleep(0.2)  # its sweeper runs once it has registered
        records.close()
        private_redis.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and worker.log_tail().count("sweeper pass failed") < 3:
            time.sleep(0.2)
        log = worker.log_path.read_text(errors="replace")
        assert _said_in_one_line(log, "sweeper pass failed") >= 3, log[-3000:]
        assert "onnection" in log  # what failed is still said
    finally:
        worker.kill()


def test_a_wrong_redis_port_at_start_is_one_line(tmp_path):
    """`alsub serve` with nothing answering at ALSUB_REDIS_URL printed a full traceback
    under "start-up sweep failed"; it waits for Redis, saying so in one line."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    data_dir = tmp_path / "data"
    env = redis_env(url, "alsub:", data_dir)
    server, _ = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "start-up sweep" not in server.log_tail():
            time.sleep(0.2)
        log = server.log_path.read_text(errors="replace")
        assert _said_in_one_line(log, "start-up sweep failed") == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_readyz_counts_only_workers_of_this_queue(tmp_path, redis_prefix):
    """A worker of another queue on the same broker takes none of this API's jobs: it
    does not make /readyz say ready (it did: any worker answering a ping counted)."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir)
    other = {**env, "ALSUB_QUEUE_NAME": env["ALSUB_QUEUE_NAME"] + "-other"}
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    stranger = start_worker(other, tmp_path / "stranger.log")
    ours = None
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            records = redis.Redis.from_url(url)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not records.zcard(f"{prefix}workers"):
                time.sleep(0.2)  # the stranger is up once it has registered
            records.close()
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "no worker of queue" in ready.json()["checks"]["workers"]["detail"]
            ours = start_worker(env, tmp_path / "ours.log")
            body = wait_ready(client)
            assert "1 worker(s)" in body["checks"]["workers"]["detail"]
    finally:
        for process in (ours, stranger, server):
            if process is not None:
                process.stop()
