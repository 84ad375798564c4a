"""The distributed deployment: Redis broker and records, separate ``alsub worker`` processes.

The API runs alone (``alsub serve --workers 0``) with ``ALSUB_REDIS_URL`` on a
test database and a private key prefix; workers are real Celery processes. A
worker is SIGKILLed in the middle of a job; another one finishes it, once.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import redis

from .service_fixtures import (
    difference_quality,
    free_port,
    redis_service_env,
    start_server,
    start_worker,
    upload,
    wait_job,
    wait_ready,
)

TOKEN = "redis-flow-token"


def test_worker_killed_mid_job_is_completed_once_by_another(tmp_path, redis_prefix, sim_pair):
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(
        url,
        prefix,
        data_dir,
        tokens=TOKEN,
        heartbeat_interval=0.5,
        heartbeat_timeout=3,
        soft_time_limit=50,
        hard_time_limit=60,
        # Debug delay: one second per stage makes the job last long enough to be killed.
        test_stage_delay=1.0,
    )
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    workers = []
    try:
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        ) as client:
            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503
            checks = not_ready.json()["checks"]
            assert checks["broker"]["ok"] and checks["store"]["ok"]
            assert not checks["workers"]["ok"]

            workers.append(start_worker(env, tmp_path / "worker-a.log"))
            ready = wait_ready(client)
            assert ready["checks"]["broker"]["detail"] == "redis"

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

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                record = client.get(f"/v1/subtractions/{job_id}").json()
                if record["state"] == "running" and record["progress"]["fraction"] >= 0.15:
                    break
                time.sleep(0.1)
            assert record["state"] == "running", record
            workers[0].kill()  # SIGKILL, with its pool child, in the middle of the job
            assert not workers[0].alive()
            assert client.get(f"/v1/subtractions/{job_id}").json()["state"] == "running"

            workers.append(start_worker(env, tmp_path / "worker-b.log"))
            record = wait_job(client, job_id, timeout=120)
            assert record["state"] == "succeeded", (record, workers[1].log_tail())
            assert record["attempts"] == 2
            assert record["progress"] == {"stage": "done", "fraction": 1.0}

            difference = client.get(record["products"]["difference"])
            noise, flux_ratios = difference_quality(difference.content, sim_pair["truth"])
            assert 0.9 < noise < 1.1, noise
            assert np.allclose(flux_ratios, 1.0, atol=0.10), flux_ratios

            # Completed once: the record does not change any more and is the only job.
            time.sleep(4.0)
            again = client.get(f"/v1/subtractions/{job_id}").json()
            assert again["finished_at"] == record["finished_at"]
            assert again["attempts"] == 2
            listing = client.get("/v1/subtractions").json()
            assert [item["id"] for item in listing["items"]] == [job_id]
            assert sorted(p.name for p in (data_dir / "jobs").iterdir()) == [job_id]

            prometheus = client.get("/metrics").text  # tokens are set: /metrics needs one
            assert 'alsub_jobs{state="succeeded"} 1.0' in prometheus

        # Everything alsub wrote to the test database is under the prefix.
        keys = [k.decode() for k in redis.Redis.from_url(url).scan_iter(count=1000)]
        ours = [k for k in keys if job_id in k]
        assert ours and all(k.startswith(prefix) for k in ours)
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
