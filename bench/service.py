"""Benchmark: the HTTP service against the command line, worker scaling, CLI start-up.

    python -m bench.service                      # everything, defaults below
    python -m bench.service --latency-sizes 4096 1024 --repeat 3
    python -m bench.service --skip-latency --pairs 8 --workers 1 2   # throughput only
    python -m bench.service --skip-latency --skip-throughput          # start-up only
    python -m bench.service --baseline /path/to/main   # the same for another checkout, interleaved

What it measures, all in one run so load on a shared machine hits both sides alike:

* ``latency``: the CLI (``alsub subtract sci tmpl -o diff.fits``, a fresh process) and
  the service on the same simulated pair, interleaved: a real HTTP client uploads both
  exposures to a real uvicorn API, submits the subtraction, polls the job and downloads
  the difference as soon as its link is listed; ``ratio`` = service wall / CLI wall, per
  repeat, and its median; ``to listed``: the same up to the moment the difference is
  listed as downloadable (issue 11's measure: the CLI's wall ends with the difference on
  disk; the service's download, ~0.7 s for a 4096 difference over loopback, is the
  client's transfer, not the subtraction's). ``cpu ratio`` = CPU seconds of the service
  (API and worker processes up to the download, plus the client) / those of the CLI:
  less sensitive to other work on the machine than wall time. Each service repeat gets a
  fresh data directory and Redis prefix, so uploads are validated as new (no
  content-address shortcut). The job record's ``timings`` (queue wait, input loading, subtraction,
  product writing) show where the service's time goes.
* ``throughput``: N 1024 pairs uploaded beforehand, then submitted at once to 1 and to 2
  worker processes (alternating per repeat); jobs/minute from the first submission to
  the last job done, and the 2-worker/1-worker ratio of the same repeat. By default a
  job's threads are the machine's cores shared among the workers (`worker.threads`), so
  a lone worker's job also uses the second core where it can: the ratio is then at most
  the cores two workers keep busy over those one keeps busy (both printed).
  ``--job-threads 1`` gives every job one thread: the scaling of worker processes alone.
* ``startup``: ``alsub --help`` and ``alsub info FILE`` as fresh processes (wall and
  CPU seconds; CPU is less sensitive to other processes on the machine).

The service uses the Redis at ``--redis`` (default ``redis://127.0.0.1:6379/14``) under
a key prefix of its own, deleted afterwards; pairs come from `core.simulate` (nothing
outside this checkout is needed). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


@contextmanager
def bench_folder(keep: str | None, prefix: str) -> Iterator[Path]:
    """The folder a bench works in: ``keep`` (kept), else a fresh temporary one deleted
    after; the load average printed at the start and the end."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    print(f"start: {_load()}", flush=True)
    try:
        yield root
    finally:
        print(f"end: {_load()}")
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _env(repo: Path = REPO, **alsub) -> dict[str, str]:
    """The environment of a process running the code of ``repo`` with ``alsub`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSUB_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env["ALSUB_LOG_LEVEL"] = "WARNING"
    env.update({f"ALSUB_{k.upper()}": str(v) for k, v in alsub.items()})
    return env


def _timed(args: list[str], repo: Path = REPO) -> tuple[float, float]:
    """Run ``args`` (code of ``repo``) to completion; (wall s, CPU s of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, env=_env(repo), cwd=repo, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def make_pair(folder: Path, size: int, seed: int) -> dict[str, Path]:
    """A simulated pair (science.fits, template.fits) written by `core.simulate`."""
    if not (folder / "template.fits").exists():
        subprocess.run(
            [
                PY,
                "-m",
                "app.cli",
                "simulate",
                str(folder),
                "--size",
                str(size),
                "--seed",
                str(seed),
            ],
            env=_env(),
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return {"science": folder / "science.fits", "template": folder / "template.fits"}


# the service -------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _session_cpu(session: int) -> float:
    """CPU seconds of every live process of ``session`` (a service process started with
    ``start_new_session``), including the children they have waited for."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        # after the command: state ppid pgrp session ... utime(11) stime cutime cstime
        if int(fields[3]) == session:
            total += sum(int(v) for v in fields[11:15])
    return total / _TICK


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """An API (uvicorn, no embedded worker) and worker processes on a private Redis prefix."""

    def __init__(self, redis_url: str, root: Path, repo: Path = REPO, **settings):
        self.redis_url, self.repo = redis_url, repo
        self.prefix = f"alsub-bench-{uuid.uuid4().hex[:8]}:"
        self.data_dir = root / f"data-{self.prefix.strip(':')}"
        self.env = _env(
            repo,
            redis_url=redis_url,
            redis_prefix=self.prefix,
            broker_key_prefix=f"{self.prefix}broker:",
            queue_name=f"q-{self.prefix.strip(':')}",
            data_dir=self.data_dir,
            rate_limit_per_minute=0,
            read_rate_limit_per_minute=0,
            max_concurrent_jobs=1000,
            **settings,
        )
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}-{self.prefix.strip(':')}.log", "wb")
        return subprocess.Popen(
            [PY, "-m", "app.cli", *args],
            env=self.env,
            cwd=self.repo,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: stopping it stops a worker's pool children
        )

    def start_api(self) -> None:
        import httpx

        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "0"]
        self.api = self._spawn(args + ["--data-dir", str(self.data_dir)], "api")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError("the API exited; see its log in " + str(self.logs))
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the API did not start")

    def start_workers(self, count: int) -> None:
        import httpx

        for _ in range(count):
            self.workers.append(self._spawn(["worker"], f"worker{len(self.workers)}"))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # every worker answers a ping
            body = httpx.get(f"{self.base}/readyz", timeout=10).json()
            detail = body["checks"]["workers"]["detail"]
            if detail.startswith(f"{len(self.workers)} worker(s)"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"workers not ready: {body}")

    def cpu(self) -> float:
        """CPU seconds used so far by the API and the workers (with their pool children)."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds used so far by (the API, the workers with their pool children)."""
        api = _session_cpu(self.api.pid) if self.api else 0.0
        return api, sum(_session_cpu(process.pid) for process in self.workers)

    def stop_workers(self) -> None:
        for process in self.workers:
            _stop(process)
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        if self.api is not None:
            _stop(self.api)
        import redis

        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        keys += list(client.scan_iter(match=f"*q-{self.prefix.strip(':')}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _upload(client, path: Path) -> str:
    with open(path, "rb") as handle:
        response = client.post(
            "/v1/exposures", content=handle, headers={"Content-Type": "application/fits"}
        )
    response.raise_for_status()
    return response.json()["id"]


def _submit(client, science: str, template: str) -> str:
    body = {"science": {"exposure_id": science}, "template": {"exposure_id": template}}
    response = client.post("/v1/subtractions", json=body)
    response.raise_for_status()
    return response.json()["id"]


def _wait(client, job_id: str, poll: float = 0.05, timeout: float = 1800, product=None) -> dict:
    """Poll until the job succeeds (or, with ``product``, until that product is listed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/v1/subtractions/{job_id}").json()
        if product is not None and product in (record.get("products") or {}):
            return record
        if record["state"] in ("succeeded", "failed", "cancelled"):
            if record["state"] != "succeeded":
                raise RuntimeError(f"job {job_id} {record['state']}: {record.get('error')}")
            return record
        time.sleep(poll)
    raise RuntimeError(f"job {job_id} not done in {timeout} s")


def service_latency(service: Service, pair: dict[str, Path], out: Path) -> tuple[float, dict]:
    """Upload both, submit, poll, download the difference; (wall s, the job's timings)."""
    import httpx

    with httpx.Client(base_url=service.base, timeout=600) as client:
        cpu0, client0 = service.cpu(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        science = _upload(client, pair["science"])
        t_up1 = time.perf_counter()
        template = _upload(client, pair["template"])
        t_up2 = time.perf_counter()
        job = _submit(client, science, template)
        # A client that wants the difference fetches it as soon as its link is listed
        # (older versions list it only once the job has succeeded).
        _wait(client, job, product="difference")
        t_done = time.perf_counter()
        with client.stream("GET", f"/v1/subtractions/{job}/products/difference") as response:
            response.raise_for_status()
            with open(out, "wb") as handle:
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
        wall = time.perf_counter() - t0
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        # Server CPU up to the download; the rest of the products are written after it.
        server_cpu = service.cpu() - cpu0
        record = _wait(client, job)  # the job's own timings are final once it has succeeded
    timings = {
        "server_cpu": server_cpu,
        "client_cpu": (client1.ru_utime - client0.ru_utime) + (client1.ru_stime - client0.ru_stime),
        "upload_science": t_up1 - t0,
        "upload_template": t_up2 - t_up1,
        "submit_to_difference": t_done - t_up2,
        "download": wall - (t_done - t0),
        **{
            f"job.{k}": v
            for k, v in record["timings"].items()
            if not k.startswith("stage.") and k != "threads"
        },
    }
    return wall, timings


def _trees(args) -> dict[str, Path]:
    """The code trees measured: this checkout, and ``--baseline`` if given."""
    trees = {"this": REPO}
    if args.baseline:
        trees["baseline"] = Path(args.baseline).resolve()
    return trees


def run_latency(args, root: Path) -> list[dict]:
    rows = []
    trees = _trees(args)
    for size in args.latency_sizes:
        pair = make_pair(root / f"pair-{size}", size, seed=size % 97)
        for repeat in range(args.repeat):
            for label, repo in trees.items():  # interleaved: load hits both alike
                out = root / f"cli-{size}.fits"
                command = [PY, "-m", "app.cli", "subtract", str(pair["science"])]
                command += [str(pair["template"]), "-o", str(out), "-q"]
                cli_wall, cli_cpu = _timed(command, repo)
                service = Service(args.redis, root, repo)
                try:
                    service.start_api()
                    service.start_workers(1)
                    wall, timings = service_latency(service, pair, root / f"svc-{size}.fits")
                finally:
                    service.stop()
                row = {
                    "tree": label,
                    "size": size,
                    "repeat": repeat,
                    "cli": cli_wall,
                    "cli_cpu": cli_cpu,
                    "service": wall,
                    "ratio": wall / cli_wall,
                    # the measure: until the difference is downloadable (listed)
                    "listed_ratio": (wall - timings["download"]) / cli_wall,
                    "cpu_ratio": (timings["server_cpu"] + timings["client_cpu"]) / cli_cpu,
                    "timings": timings,
                }
                rows.append(row)
                print(
                    f"latency {label} {size} #{repeat}: cli {cli_wall:.2f} s (cpu {cli_cpu:.1f}), "
                    f"service {wall:.2f} s, ratio {wall / cli_wall:.3f} "
                    f"(to listed {row['listed_ratio']:.3f}), "
                    f"cpu ratio {row['cpu_ratio']:.3f}  "
                    + " ".join(f"{k}={v:.2f}" for k, v in timings.items()),
                    flush=True,
                )
    for size in args.latency_sizes:
        for label in trees:
            mine = [r for r in rows if r["size"] == size and r["tree"] == label]
            print(
                f"latency {label} {size} median: "
                f"cli {statistics.median(r['cli'] for r in mine):.2f} s, "
                f"service {statistics.median(r['service'] for r in mine):.2f} s, "
                f"ratio {statistics.median(r['ratio'] for r in mine):.3f} "
                f"(to listed {statistics.median(r['listed_ratio'] for r in mine):.3f}), "
                f"cpu ratio {statistics.median(r['cpu_ratio'] for r in mine):.3f} (n={len(mine)})"
            )
    return rows


def run_throughput(args, root: Path) -> list[dict]:
    import httpx

    pairs = [make_pair(root / f"pair-1024-{i}", 1024, seed=100 + i) for i in range(args.pairs)]
    rows = []
    trees = _trees(args)
    # --job-threads fixes each job's threads (ALSUB_WORKER_THREADS): the scaling of worker
    # processes alone, without a lone worker's threads already using the other cores
    fixed = {"worker_threads": args.job_threads} if args.job_threads else {}
    services = {label: Service(args.redis, root, repo, **fixed) for label, repo in trees.items()}
    try:
        ids = {}
        for label, service in services.items():
            service.start_api()
            with httpx.Client(base_url=service.base, timeout=600) as client:
                ids[label] = [
                    (_upload(client, p["science"]), _upload(client, p["template"])) for p in pairs
                ]
        for repeat in range(args.repeat):
            for label, service in services.items():
                rates = {}
                with httpx.Client(base_url=service.base, timeout=600) as client:
                    for count in args.workers:
                        service.start_workers(count)
                        try:
                            (api0, work0), own0 = service.cpu_split(), time.process_time()
                            t0 = time.perf_counter()
                            jobs = [_submit(client, s, t) for s, t in ids[label]]
                            for job in jobs:
                                _wait(client, job, poll=0.2)
                            elapsed = time.perf_counter() - t0
                            (api1, work1), own1 = service.cpu_split(), time.process_time()
                        finally:
                            service.stop_workers()
                        rates[count] = 60.0 * len(jobs) / elapsed
                        # CPU seconds per job of each side, and cores kept busy: where the
                        # machine's time goes besides the subtraction's threads.
                        cpu = {
                            "api": (api1 - api0) / len(jobs),
                            "workers": (work1 - work0) / len(jobs),
                            "client": (own1 - own0) / len(jobs),
                        }
                        busy = sum(cpu.values()) * len(jobs) / elapsed
                        print(
                            f"throughput {label} #{repeat}: {count} worker(s), {len(jobs)} jobs "
                            f"in {elapsed:.1f} s = {rates[count]:.2f} jobs/min; cpu s/job "
                            + " ".join(f"{k} {v:.3f}" for k, v in cpu.items())
                            + f", {busy:.2f} cores busy",
                            flush=True,
                        )
                row = {"tree": label, "repeat": repeat, "rates": rates}
                if 1 in rates and 2 in rates:
                    row["scaling"] = rates[2] / rates[1]
                    print(f"throughput {label} #{repeat}: 2 workers / 1 = {row['scaling']:.3f}")
                rows.append(row)
    finally:
        for service in services.values():
            service.stop()
    for label in trees:
        mine = [r for r in rows if r["tree"] == label]
        for count in args.workers:
            print(
                f"throughput {label} median: {count} worker(s) "
                f"{statistics.median(r['rates'][count] for r in mine):.2f} jobs/min"
            )
        if mine and "scaling" in mine[0]:
            print(
                f"throughput {label} median scaling 2/1: "
                f"{statistics.median(r['scaling'] for r in mine):.3f}"
            )
    return rows


def run_startup(args, root: Path) -> None:
    pair = make_pair(root / "pair-512", 512, seed=5)
    commands = {"python (empty)": ([PY, "-c", "pass"], REPO)}
    for label, repo in _trees(args).items():
        commands[f"{label} alsub --help"] = ([PY, "-m", "app.cli", "--help"], repo)
        commands[f"{label} alsub info"] = (
            [PY, "-m", "app.cli", "info", str(pair["science"])],
            repo,
        )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.startup_repeat):
        for name, (command, repo) in commands.items():  # interleaved
            results[name].append(_timed(command, repo))
    for name, runs in results.items():
        print(
            f"startup {name}: wall median {statistics.median(w for w, _ in runs):.3f} s "
            f"(min {min(w for w, _ in runs):.3f}), cpu median "
            f"{statistics.median(c for _, c in runs):.3f} s (n={len(runs)})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--latency-sizes", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--repeat", type=int, default=3, help="repeats of latency and throughput")
    parser.add_argument("--pairs", type=int, default=6, help="1024 pairs of the throughput run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--job-threads",
        type=int,
        default=0,
        help="threads per job in the throughput run (ALSUB_WORKER_THREADS; 0: the default, "
        "the cores shared among the workers)",
    )
    parser.add_argument("--startup-repeat", type=int, default=10)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument(
        "--baseline", metavar="DIR", help="another checkout measured the same way, interleaved"
    )
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (pairs kept between runs)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args(argv)
    # SIGTERM (and SIGINT, which a shell's background job ignores) end the run through the
    # finally blocks below, which stop the API and workers and delete their Redis keys.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with bench_folder(args.keep, "alsub-bench-svc-") as root:
        if not args.skip_startup:
            run_startup(args, root)
        if not args.skip_latency:
            run_latency(args, root)
        if not args.skip_throughput:
            run_throughput(args, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
