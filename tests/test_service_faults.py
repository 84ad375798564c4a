"""Faults of the distributed deployment: long GIL-bound work, Redis outages and restarts.

Real processes throughout: ``alsub serve --workers 0`` and ``alsub worker`` on
Redis (the shared server's test database with a private prefix, or a private
``redis-server`` this module starts and restarts; the shared one is never touched).
"""

from __future__ import annotations

import time

import httpx

from .service_fixtures import (
    free_port,
    service_env,
    start_server,
    start_worker,
    upload,
    wait_ready,
)

TOKEN = "faults-token-12"


def redis_env(url: str, prefix: str, data_dir, **extra) -> dict[str, str]:
    return service_env(
        redis_url=url,
        redis_prefix=prefix,
        broker_key_prefix=f"{prefix}broker:",
        queue_name=f"alsub-{prefix.strip(':')}",
        tokens=TOKEN,
        data_dir=data_dir,
        **extra,
    )


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
            science, template = (
                upload(client, sim_pair["science"]),
                upload(client, sim_pair["template"]),
            )
            submitted = client.post(
                "/v1/subtractions",
                json={"science": {"exposure_id": science}, "template": {"exposure_id": template}},
            )
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
