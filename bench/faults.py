"""Fault suite: load, worker SIGKILLs and Redis restarts against the distributed service.

    python -m bench.faults                       # 60 jobs, 2 workers, 15 kills, 2 restarts
    python -m bench.faults --jobs 20 --kills 5 --restarts 1

Starts its own redis-server (append-only file, on a free loopback port: the
shared Redis is never touched), an API (``alsub serve --workers 0``) and
worker processes, all real. A client submits jobs with idempotency keys
(retrying on errors and 503, as an alert broker does) while the script
SIGKILLs a random worker (with its pool children) at intervals and restarts
Redis. Then it waits for every job and prints:

- submitted / succeeded / failed (by error code) / lost (acknowledged with 202,
  later unknown or never finished) / duplicated (more records than keys, or
  product folders without a job);
- HTTP answers: 5xx other than 503, 503 (expected during Redis restarts),
  connection errors;
- attempts per job (the budget is ``ALSUB_MAX_ATTEMPTS``).
Not a test: figures go to bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.service_fixtures import (
    PrivateRedis,
    free_port,
    service_env,
    start_server,
    start_worker,
)

TOKEN = "faults-bench-token"


class Client:
    """An HTTP client that counts answers by class and retries like a careful broker."""

    def __init__(self, base: str):
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def request(self, method: str, url: str, **kwargs) -> httpx.Response | None:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.HTTPError:
            self._count("connection_error")
            return None
        status = response.status_code
        self._count("5xx_other" if status >= 500 and status != 503 else str(status))
        return response

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def until_ok(self, method: str, url: str, ok=(200, 201, 202), deadline=300.0, **kwargs):
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            response = self.request(method, url, **kwargs)
            if response is not None and response.status_code in ok:
                return response
            time.sleep(1.0)
        return None


def _simulate(folder: Path) -> dict:
    from core.simulate import SimulationConfig, simulate_pair, write_pair

    pair = simulate_pair(SimulationConfig(size=256, seed=7, star_density=3000, n_transients=3))
    return write_pair(pair, folder)


def run(n_jobs: int, n_workers: int, kills: int, restarts: int, seed: int) -> dict:
    rng = random.Random(seed)
    folder = Path(tempfile.mkdtemp(prefix="alsub-faults-"))
    redis_server = PrivateRedis(folder)
    redis_server.start()
    data_dir = folder / "data"
    max_attempts = 3
    env = service_env(
        redis_url=redis_server.url,
        data_dir=data_dir,
        tokens=TOKEN,
        max_concurrent_jobs=n_jobs,
        heartbeat_interval=1,
        heartbeat_timeout=6,
        max_attempts=max_attempts,
        soft_time_limit=100,
        hard_time_limit=120,
        # Long enough jobs (a few seconds) that kills land mid-job.
        test_stage_delay=0.3,
        # A message the broker lost (a worker killed between taking it and recording it as
        # unacknowledged) is resent after a minute instead of the default five.
        queued_resend_after=60,
    )
    server, base = start_server(free_port(), data_dir, env, folder, workers=0)
    workers = [start_worker(env, folder / f"worker-{i}.log") for i in range(n_workers)]
    client = Client(base)
    started = time.perf_counter()
    try:
        client.until_ok("GET", "/readyz", ok=(200,))
        paths = _simulate(folder / "pair")
        ids = [
            client.until_ok(
                "POST",
                "/v1/exposures",
                content=paths[role].read_bytes(),
                headers={"Content-Type": "application/fits"},
            ).json()["id"]
            for role in ("science", "template")
        ]
        body = {"science": {"exposure_id": ids[0]}, "template": {"exposure_id": ids[1]}}
        accepted: dict[str, str] = {}

        def submit_all() -> None:
            for n in range(n_jobs):
                key = f"job-{n}"
                response = client.until_ok(
                    "POST", "/v1/subtractions", json={**body, "idempotency_key": key}
                )
                if response is not None:
                    accepted[key] = response.json()["id"]
                time.sleep(0.2)

        submitter = threading.Thread(target=submit_all)
        submitter.start()
        # Faults spread over the submission period and a little after it.
        span = 0.2 * n_jobs + 30.0
        events = sorted(
            [(rng.uniform(3.0, span), "kill") for _ in range(kills)]
            + [(rng.uniform(5.0, span), "restart") for _ in range(restarts)]
        )
        t0 = time.monotonic()
        for at, what in events:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            if what == "kill":
                index = rng.randrange(len(workers))
                workers[index].kill()  # SIGKILL of the worker and its pool children
                workers[index] = start_worker(env, folder / f"worker-{index}-{at:.0f}.log")
            else:
                redis_server.stop()
                time.sleep(3.0)
                redis_server.start()
        submitter.join()

        final: dict[str, dict] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(final) < len(accepted):
            for key, job_id in accepted.items():
                if key in final:
                    continue
                response = client.request("GET", f"/v1/subtractions/{job_id}")
                if response is None:
                    continue
                if response.status_code == 404:
                    final[key] = {"state": "lost"}
                elif response.status_code == 200 and response.json()["state"] in (
                    "succeeded",
                    "failed",
                    "cancelled",
                ):
                    final[key] = response.json()
            time.sleep(1.0)
        listing, cursor = [], None
        while True:
            params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
            page = client.until_ok("GET", "/v1/subtractions", params=params).json()
            listing += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        job_dirs = [p.name for p in (data_dir / "jobs").iterdir() if not p.name.startswith(".")]
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        redis_server.stop()

    states = collections.Counter(r["state"] for r in final.values())
    errors = collections.Counter(
        r["error"]["code"] for r in final.values() if r.get("state") == "failed"
    )
    attempts = [r["attempts"] for r in final.values() if "attempts" in r]
    listed_ids = [item["id"] for item in listing]
    return {
        "jobs": n_jobs,
        "workers": n_workers,
        "kills": kills,
        "redis_restarts": restarts,
        "submitted": len(accepted),
        "succeeded": states["succeeded"],
        "failed": states["failed"],
        "failed_codes": dict(errors),
        "lost": states["lost"] + (len(accepted) - len(final)),
        "duplicated": max(0, len(set(listed_ids)) - len(accepted))
        + len(set(job_dirs) - set(listed_ids)),
        "over_attempt_budget": sum(a > max_attempts for a in attempts),
        "attempts_median": statistics.median(attempts) if attempts else None,
        "attempts_max": max(attempts) if attempts else None,
        "http": dict(client.counts),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    result = run(args.jobs, args.workers, args.kills, args.restarts, args.seed)
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
