"""The difference can be downloaded before the job ends: the worker publishes it (with the
metrics, kernel and DIA sources) first, lists it in the running job's ``products``, and
then writes the frame-sized rest (matched images, background).

Real processes: ``alsub serve`` with its embedded worker; the debug stage delay holds the
job in each state long enough to look at it.
"""

from __future__ import annotations

import httpx

from .service_fixtures import (
    difference_quality,
    free_port,
    service_env,
    start_server,
    submit_sim_pair,
    wait_job,
    wait_listed,
    wait_ready,
)


def test_difference_is_downloadable_while_the_rest_is_written(tmp_path, sim_pair):
    data_dir = tmp_path / "data"
    env = service_env(data_dir=data_dir, test_stage_delay=1.5)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=1)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_ready(client)
            submitted = submit_sim_pair(client, sim_pair)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            # Before anything is published, no product can be downloaded.
            early = client.get(f"/v1/subtractions/{job_id}/products/difference")
            assert early.status_code == 409, early.text

            record = wait_listed(client, job_id, "difference")
            # The job is still running, writing the rest; the difference is there already.
            assert record["state"] == "running", record
            assert record["progress"]["stage"] == "writing products", record
            assert set(record["products"]) == {"difference", "kernel", "dia_sources"}, record
            assert record["metrics_url"] is None  # the metrics come with the final state
            difference = client.get(record["products"]["difference"])
            assert difference.status_code == 200, difference.text
            noise, flux_ratios = difference_quality(difference.content, sim_pair["truth"])
            assert 0.9 < noise < 1.1, noise
            not_yet = client.get(f"/v1/subtractions/{job_id}/products/matched_template")
            assert not_yet.status_code == 409, not_yet.text

            record = wait_job(client, job_id, timeout=120)
            assert record["state"] == "succeeded", record
            assert {"matched_template", "matched_science", "background"} <= set(record["products"])
            again = client.get(record["products"]["difference"])
            assert again.content == difference.content  # the one published early, unchanged
            for name in ("matched_template", "matched_science", "background"):
                assert client.get(record["products"][name]).status_code == 200
    finally:
        server.stop()
