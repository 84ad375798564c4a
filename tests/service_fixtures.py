"""Fixtures and helpers of the service tests: real processes, real HTTP, real Redis.

Imported by ``tests/test_service_*.py`` and ``tests/test_store.py``. Servers and
workers are started with ``python -m app.cli serve|worker`` (the ``alsub``
command) on free loopback ports, each in its own process group so a test can
SIGKILL a worker with its pool children; everything is torn down afterwards.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from astropy.stats import mad_std

REPO = Path(__file__).resolve().parents[1]
FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(**settings) -> dict[str, str]:
    """The current environment without ALSUB_* variables, plus ``settings`` as ALSUB_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSUB_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["ALSUB_LOG_LEVEL"] = "WARNING"
    for key, value in settings.items():
        env[f"ALSUB_{key.upper()}"] = str(value)
    return env


def redis_service_env(url: str, prefix: str, data_dir, **settings) -> dict[str, str]:
    """`service_env` of a distributed deployment whose every Redis key starts with ``prefix``."""
    return service_env(
        redis_url=url,
        redis_prefix=prefix,
        broker_key_prefix=f"{prefix}broker:",
        queue_name=f"alsub-{prefix.strip(':')}",
        data_dir=data_dir,
        **settings,
    )


class Process:
    """A subprocess in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker and its pool children)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL of the group if it does not exit in time."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers of the group, if any
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)
        self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def start_server(port: int, data_dir: Path, env: dict[str, str], log_dir: Path, workers=None):
    """``alsub serve`` on 127.0.0.1:``port``; returns once /healthz answers."""
    args = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
    ]
    if workers is not None:
        args += ["--workers", str(workers)]
    process = Process(args, env, log_dir / f"server-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"server exited:\n{process.log_tail()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.stop()
    raise RuntimeError(f"server did not start:\n{process.log_tail()}")


def start_worker(env: dict[str, str], log_path: Path) -> Process:
    """``alsub worker`` (a real Celery worker process)."""
    return Process([sys.executable, "-m", "app.cli", "worker"], env, log_path)


def wait_ready(client: httpx.Client, timeout: float = 60.0) -> dict:
    """Poll /readyz until it answers 200 (a worker answers pings)."""
    deadline = time.monotonic() + timeout
    body = {}
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        body = response.json()
        if response.status_code == 200:
            return body
        time.sleep(0.5)
    raise AssertionError(f"service not ready: {body}")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 90.0, until=FINAL) -> dict:
    """Poll a job until its state is in ``until``; return the record."""
    deadline = time.monotonic() + timeout
    record = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/subtractions/{job_id}")
        assert response.status_code == 200, response.text
        record = response.json()
        if record["state"] in until:
            return record
        if record["state"] in FINAL:
            raise AssertionError(f"job {job_id} ended {record['state']}, not {until}: {record}")
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {record.get('state')}: {record}")


def wait_listed(client: httpx.Client, job_id: str, product: str, timeout: float = 120.0) -> dict:
    """Poll a job until ``product`` is in its record's products or it ends (polled every
    50 ms: a product is listed a stage before the job ends); return the record."""
    deadline = time.monotonic() + timeout
    record: dict = {}
    while time.monotonic() < deadline:
        record = client.get(f"/v1/subtractions/{job_id}").json()
        if product in record["products"] or record["state"] in FINAL:
            break
        time.sleep(0.05)
    return record


def upload(client: httpx.Client, path: Path) -> str:
    """Upload a FITS file as the raw body; return its id."""
    response = client.post(
        "/v1/exposures", content=path.read_bytes(), headers={"Content-Type": "application/fits"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def submit_sim_pair(client: httpx.Client, pair: dict, **extra) -> httpx.Response:
    """Upload a simulated pair's two exposures and submit their subtraction."""
    science, template = upload(client, pair["science"]), upload(client, pair["template"])
    body = {"science": {"exposure_id": science}, "template": {"exposure_id": template}}
    return client.post("/v1/subtractions", json={**body, **extra})


def difference_quality(fits_bytes: bytes, truth: dict) -> tuple[float, list[float]]:
    """Robust std of D/sqrt(V) on unmasked pixels, and measured/true flux of each transient."""
    from core.io import read_exposure

    difference = read_exposure(io.BytesIO(fits_bytes))
    good = (difference.mask == 0) & (difference.variance > 0)
    z = difference.image[good] / np.sqrt(difference.variance[good])
    noise = float(mad_std(z))
    yy, xx = np.mgrid[: difference.height, : difference.width]
    ratios = []
    t = truth["transients"]
    for x, y, flux in zip(t["x"], t["y"], t["flux_science"], strict=True):
        r2 = (xx - x) ** 2 + (yy - y) ** 2
        aperture, annulus = r2 < 10**2, (r2 > 15**2) & (r2 < 22**2)
        background = np.median(difference.image[annulus])
        ratios.append(float((difference.image[aperture] - background).sum() / flux))
    return noise, ratios


class PrivateRedis:
    """A redis-server of this test on a free loopback port, append-only file in ``folder``."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.process: Process | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server is needed to restart a Redis"
        args = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
        ]
        args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.process = Process(args, service_env(), self.folder / f"redis-{time.time():.0f}.log")
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(self.process.log_tail())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()  # SIGTERM: Redis closes its append-only file and exits
            self.process = None


@pytest.fixture(scope="session")
def sim_pair(tmp_path_factory) -> dict:
    """A 256x256 simulated pair (science FWHM 4, template 3) with three bright transients."""
    from core.simulate import SimulationConfig, simulate_pair, write_pair

    config = SimulationConfig(
        size=256,
        seed=7,
        star_density=3000,
        n_transients=3,
        transient_flux_min=2e4,
        transient_flux_max=3e4,
    )
    pair = simulate_pair(config)
    paths = write_pair(pair, tmp_path_factory.mktemp("pair"))
    return {
        "science": paths["science"],
        "template": paths["template"],
        "truth": pair.truth,
        "dir": paths["science"].parent,
    }


@pytest.fixture(scope="session")
def other_field_template(tmp_path_factory) -> Path:
    """A template of another star field on a grid shifted by (5.5, -3.2) px: no stars match."""
    from core.simulate import SimulationConfig, simulate_pair, write_pair

    config = SimulationConfig(size=256, seed=8, star_density=3000, template_shift=(5.5, -3.2))
    pair = simulate_pair(config)
    return write_pair(pair, tmp_path_factory.mktemp("other"))["template"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """(host, port) of a Redis: the local one on 6379, else a private redis-server subprocess."""
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
        yield "127.0.0.1", 6379
        return
    except redis.RedisError:
        pass
    executable = shutil.which("redis-server")
    assert executable, "no Redis on 127.0.0.1:6379 and no redis-server to start"
    port = free_port()
    process = Process(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ],
        dict(os.environ),
        tmp_path_factory.mktemp("redis") / "redis.log",
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    yield "127.0.0.1", port
    process.stop()


REDIS_TEST_DB = 13


@pytest.fixture
def redis_prefix(redis_server):
    """(url, prefix) on the test database; every key under the prefix is deleted afterwards."""
    host, port = redis_server
    prefix = f"alsubtest-{uuid.uuid4().hex[:10]}:"
    url = f"redis://{host}:{port}/{REDIS_TEST_DB}"
    yield url, prefix
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
