"""What an operator and an alert broker meet in production: a full disk, a Redis that
refuses the deployment's URL, settings that cannot work, and the DIA catalog read while
the job still writes its matched images.

Real processes on the real Redis (test database, private prefix): ``alsub serve
--workers 0`` and ``alsub worker``. A full disk is a file-size limit (RLIMIT_FSIZE) on
the process: its writes fail with EFBIG past it, as they fail with ENOSPC on a full
disk, with no root and no extra mount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from store import ExposureRef, JobRecord, Settings, open_store
from store.maintenance import clean_disk, expire_old
from store.records import new_job_id

from .service_fixtures import (
    REPO,
    Process,
    free_port,
    redis_service_env,
    service_env,
    start_server,
    start_worker,
    submit_sim_pair,
    wait_job,
    wait_listed,
    wait_ready,
)

TOKEN = "operations-token-1"

#: Bytes a capped process may write to one file: less than a 256 x 256 product or upload.
FILE_SIZE_CAP = 200_000


def _client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def _capped(command: list[str], env: dict[str, str], log_path) -> Process:
    """``alsub COMMAND`` whose writes fail past `FILE_SIZE_CAP` bytes a file (EFBIG)."""
    code = (
        "import resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_CAP}, {FILE_SIZE_CAP})); "
        "from app.cli import main; "
        f"sys.exit(main({command!r}))"
    )
    return Process([sys.executable, "-c", code], env, log_path)


def _wait_healthy(base: str, process: Process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.alive(), process.log_tail()
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(process.log_tail())


def test_a_full_disk_is_a_507_and_a_failed_job_that_keeps_nothing(tmp_path, redis_prefix, sim_pair):
    """Uploads into a full data directory answer 507 insufficient_storage (they answered
    500 "unexpected server error"); a job that cannot write its products fails with
    that code (it was "internal: unexpected OSError") and leaves no folder behind."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    full_port = free_port()
    full_api = _capped(
        ["serve", "--workers", "0", "--port", str(full_port)], env, tmp_path / "full-api.log"
    )
    worker = _capped(["worker"], env, tmp_path / "worker.log")
    try:
        _wait_healthy(f"http://127.0.0.1:{full_port}", full_api)
        with _client(f"http://127.0.0.1:{full_port}") as full:
            refused = full.post(
                "/v1/exposures",
                content=sim_pair["science"].read_bytes(),
                headers={"Content-Type": "application/fits"},
            )
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["code"] == "insufficient_storage"
            assert "disk is full" in refused.json()["error"]["message"]
            assert str(data_dir) not in refused.text  # no server path
            assert int(refused.headers["retry-after"]) > 0
        assert list((data_dir / "exposures" / ".tmp").iterdir()) == []  # nothing half-written

        with _client(base) as client:
            wait_ready(client)
            submitted = submit_sim_pair(client, sim_pair)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            record = wait_job(client, job_id, timeout=120)
            assert record["state"] == "failed", (record, worker.log_tail())
            assert record["error"]["code"] == "insufficient_storage", record["error"]
            assert "disk is full" in record["error"]["message"]
            assert record["products"] == {}
            assert record["attempts"] == 1
        jobs = data_dir / "jobs"
        assert not (jobs / job_id).exists()
        assert [p.name for p in jobs.iterdir()] == []  # no staging folder either
    finally:
        worker.stop()
        full_api.stop()
        server.stop()


def _stored_job(tmp_path, redis_prefix, sim_pair):
    """(settings, store, record) of a queued job of the simulated pair, stored as the API
    stores one, for `worker.jobs.run_job` to run in this process."""
    url, prefix = redis_prefix
    settings = Settings(data_dir=tmp_path / "data", redis_url=url, redis_prefix=prefix)
    store = open_store(settings)
    ids = {
        role: store.exposures.put_bytes(sim_pair[role].read_bytes())
        for role in ("science", "template")
    }
    record = JobRecord(
        id=new_job_id(),
        owner="operator-test",
        science=ExposureRef(exposure_id=ids["science"]),
        template=ExposureRef(exposure_id=ids["template"]),
    )
    store.records.create(record)
    return settings, store, record


def test_a_job_failing_after_its_first_products_lists_and_keeps_none(
    tmp_path, redis_prefix, sim_pair, monkeypatch
):
    """The disk fills while the matched images are written, after the difference and
    its catalog were published: the failed job listed those three (each link answered
    409) and their folder stayed on the full disk until the job was deleted."""
    from worker.jobs import run_job

    settings, store, record = _stored_job(tmp_path, redis_prefix, sim_pair)
    published = []

    def full_disk(job_id, build):
        published.extend(store.products.names(job_id))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.products, "add", full_disk)
    try:
        assert run_job(store, settings, record.id) == "failed"
        assert {"difference", "kernel", "dia_sources"} <= set(published)  # published first
        failed = store.records.get(record.id)
        assert failed.error["code"] == "insufficient_storage", failed.error
        assert failed.products == []
        assert not store.products.job_dir(record.id).exists()
    finally:
        store.records.close()


def _end_lines(caplog, job_id: str) -> list[tuple[int, str]]:
    """(level, message) of the worker's lines about ``job_id`` that give a duration."""
    pattern = re.compile(rf"job {job_id}: (.+) in \d+\.\d\d s \(attempt \d+\)$")
    return [
        (r.levelno, match.group(1))
        for r in caplog.records
        if r.name == "alsub.worker" and (match := pattern.match(r.getMessage()))
    ]


def test_every_run_of_a_job_ends_with_one_line_of_its_outcome_and_duration(
    tmp_path, redis_prefix, sim_pair, monkeypatch, caplog
):
    """Review (operations): the worker logged only "attempt 1 on <node>"; the end was
    Celery's "Task ... succeeded in 18.65s: 'failed'" with the Celery task id, and at
    ALSUB_LOG_LEVEL=WARNING nothing. Each run now ends with one line: the job id, the
    outcome (failed with its code, at WARNING; cancelled; requeued) and its duration."""
    from worker.jobs import run_job

    settings, store, record = _stored_job(tmp_path, redis_prefix, sim_pair)
    write_rest = store.products.add

    def change_state(state: str):
        def write(job_id, build):
            def mutate(current: JobRecord) -> bool:
                current.state = state  # what a DELETE or the sweeper does meanwhile
                current.worker = None if state == "queued" else current.worker
                return True

            store.records.update(job_id, mutate)
            return write_rest(job_id, build)

        return write

    try:
        with caplog.at_level(logging.INFO, logger="alsub"):
            assert run_job(store, settings, record.id) == "succeeded"
            assert _end_lines(caplog, record.id) == [(logging.INFO, "succeeded")]

            caplog.clear()
            failing = record.model_copy(update={"id": new_job_id(), "template": record.science})
            store.records.create(failing)
            assert run_job(store, settings, failing.id) == "failed"
            code = store.records.get(failing.id).error["code"]
            assert _end_lines(caplog, failing.id) == [(logging.WARNING, f"failed ({code})")]

            for state, outcome, level in [
                ("cancelled", "cancelled", logging.INFO),
                ("queued", "requeued", logging.WARNING),
            ]:
                caplog.clear()
                job = record.model_copy(update={"id": new_job_id(), "state": "queued"})
                store.records.create(job)
                monkeypatch.setattr(store.products, "add", change_state(state))
                assert run_job(store, settings, job.id) == state
                assert _end_lines(caplog, job.id) == [(level, outcome)]
    finally:
        store.records.close()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_a_job_whose_storage_refuses_writes_fails_as_storage_unavailable(
    tmp_path, redis_prefix, sim_pair, monkeypatch, code
):
    """The data directory turns read-only (a remount after disk errors) or its
    permissions change while a job writes its matched images: the job failed as
    "internal: unexpected OSError"; it fails as storage_unavailable, keeping nothing."""
    from worker.jobs import run_job

    settings, store, record = _stored_job(tmp_path, redis_prefix, sim_pair)

    def refused(job_id, build):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store.products, "add", refused)
    try:
        assert run_job(store, settings, record.id) == "failed"
        failed = store.records.get(record.id)
        assert failed.error["code"] == "storage_unavailable", failed.error
        assert "refuses writes" in failed.error["message"]
        assert str(tmp_path) not in failed.error["message"]
        assert failed.products == []
        assert not store.products.job_dir(record.id).exists()
    finally:
        store.records.close()


def _token_of(process_code: str) -> tuple[subprocess.Popen, str]:
    """A process that prints the run token it would write, then runs ``process_code``."""
    code = "from worker.jobs import _run_token; print(_run_token(), flush=True)\n" + process_code
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    return process, process.stdout.readline().strip()


def test_a_job_whose_process_was_killed_is_taken_over_at_once_and_only_then(
    tmp_path, redis_prefix, sim_pair
):
    """Review (operations): a pool child killed with -9, Celery redelivered at once, and the
    job refused it ("not run here (running on <node>)"), waiting a heartbeat timeout (60 s).
    A run whose process is gone on this machine is taken over at once, the attempt counted;
    a live one, or one another machine's pids name, is still left alone."""
    from worker.jobs import run_job

    settings, store, record = _stored_job(tmp_path, redis_prefix, sim_pair)
    live, live_token = _token_of("import time; time.sleep(60)")
    zombie, zombie_token = _token_of("import time; time.sleep(60)")
    dead, dead_token = _token_of("")
    dead.wait()
    zombie.kill()  # not waited for: killed, not yet reaped
    elsewhere = dead_token.rsplit(":", 1)[0] + ":0123456789abcdef-4026531836"

    def running_on(token: str) -> str:
        job = record.model_copy(update={"id": new_job_id()})
        job.state, job.attempts, job.worker, job.heartbeat_at = "running", 1, token, time.time()
        store.records.create(job)
        return job.id

    try:
        for token in (live_token, elsewhere):
            job_id = running_on(token)
            assert run_job(store, settings, job_id) == "skipped"
            left = store.records.get(job_id)
            assert (left.state, left.attempts, left.worker) == ("running", 1, token)
        for token in (dead_token, zombie_token):
            job_id = running_on(token)
            started = time.monotonic()
            assert run_job(store, settings, job_id) == "succeeded"
            assert time.monotonic() - started < settings.heartbeat_timeout / 2
            assert store.records.get(job_id).attempts == 2
    finally:
        for process in (live, zombie):
            process.kill()
            process.wait()
        store.records.close()


def test_a_job_deleted_while_writing_products_stops_without_an_error(
    tmp_path, redis_prefix, sim_pair, monkeypatch, caplog
):
    """DELETE of a running job while its worker writes the matched images removes its
    folder under the writer: the write's FileNotFoundError was logged as an unexpected
    error with its trace, for a job that ended as the client asked."""
    import logging

    from worker.jobs import run_job

    settings, store, record = _stored_job(tmp_path, redis_prefix, sim_pair)
    write_rest = store.products.add

    def deleted_first(job_id, build):
        # what the API's DELETE does to a running job, then the real write
        store.products.delete(job_id)
        store.records.delete(job_id)
        return write_rest(job_id, build)

    monkeypatch.setattr(store.products, "add", deleted_first)
    try:
        with caplog.at_level(logging.INFO, logger="alsub"):
            assert run_job(store, settings, record.id) == "skipped"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        assert any("deleted or cancelled while running" in r.getMessage() for r in caplog.records)
        assert store.records.get(record.id) is None
        assert not store.products.job_dir(record.id).exists()
    finally:
        store.records.close()


def test_disk_cleaning_removes_the_products_of_failed_jobs(tmp_path, redis_prefix):
    """A job that failed after a lost attempt had published (worker_lost) kept its
    folder for good: only folders without a record were cleaned."""
    url, prefix = redis_prefix
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=url, redis_prefix=prefix, tmp_max_age=1
    )
    store = open_store(settings)
    try:
        records = {}
        for state in ("failed", "succeeded"):
            record = JobRecord(
                id=new_job_id(),
                owner="operator-test",
                science=ExposureRef(exposure_id="a" * 64),
                template=ExposureRef(exposure_id="b" * 64),
                state=state,
            )
            store.records.create(record)
            store.products.publish(record.id, lambda d: (d / "difference.fits").write_bytes(b"x"))
            records[state] = record.id
        time.sleep(1.5)
        clean_disk(store, settings)
        assert not store.products.job_dir(records["failed"]).exists()
        assert store.products.names(records["succeeded"]) == ["difference"]
    finally:
        store.records.close()


def test_retention_removes_old_finished_jobs_and_inputs_no_job_uses(tmp_path, redis_prefix):
    """Review (operations): nothing was ever removed by age, so the disk only grew.
    With ALSUB_RETENTION_DAYS the workers' clean-up removes finished jobs older than
    that (record and products), then exposures and catalogs last uploaded before then
    that no job left uses; by default everything is kept, as before."""
    url, prefix = redis_prefix
    keep = Settings(data_dir=tmp_path / "data", redis_url=url, redis_prefix=prefix)
    settings = keep.model_copy(update={"retention_days": 1.0})
    store = open_store(settings)
    now, days_ago = time.time(), lambda days: time.time() - days * 86400
    exposures = {name: store.exposures.put_bytes(name.encode() * 100) for name in "abcde"}
    catalogs = {name: store.catalogs.put_bytes(name.encode() * 50) for name in "xy"}
    for blobs, ids in ((store.exposures, exposures), (store.catalogs, catalogs)):
        for blob_id in ids.values():
            os.utime(blobs.path(blob_id), (days_ago(3), days_ago(3)))
    store.exposures.put_bytes(b"e" * 100)  # uploaded again today: young again

    def job(state, finished_days_ago, science, template, sources=None) -> str:
        record = JobRecord(
            id=new_job_id(),
            owner="operator-test",
            science=ExposureRef(exposure_id=exposures[science]),
            template=ExposureRef(exposure_id=exposures[template]),
            sources_id=catalogs.get(sources),
            state=state,
            finished_at=None if finished_days_ago is None else days_ago(finished_days_ago),
        )
        store.records.create(record)
        store.products.publish(record.id, lambda d: (d / "difference.fits").write_bytes(b"x"))
        return record.id

    try:
        old = job("succeeded", 2, "a", "b", sources="x")  # removed, and so are a, b and x
        recent = job("failed", 0.5, "c", "c")  # kept, and keeps c
        running = job("running", None, "d", "d")  # kept whatever its age, and keeps d
        expected_expired = {"expired_jobs": 1, "expired_exposures": 2, "expired_catalogs": 2}
        assert not any(expire_old(store, keep, now).values())  # default: kept forever
        removed = clean_disk(store, settings)
        assert {k: removed[k] for k in expected_expired} == expected_expired
        assert store.records.get(old) is None and not store.products.job_dir(old).exists()
        for job_id in (recent, running):
            assert store.records.get(job_id) is not None
            assert store.products.names(job_id) == ["difference"]
        gone = {name for name, blob_id in exposures.items() if not store.exposures.exists(blob_id)}
        assert gone == {"a", "b"}  # c and d are used, e was uploaded again
        assert not store.catalogs.exists(catalogs["x"]) and not store.catalogs.exists(catalogs["y"])
        assert not any(expire_old(store, settings).values())  # nothing twice
    finally:
        store.records.close()


def test_sources_are_served_as_soon_as_the_catalog_is_published(tmp_path, redis_prefix, sim_pair):
    """/sources answered 409 "products exist once it has succeeded" while the job wrote its
    matched images, though the record listed dia_sources and /products/dia_sources
    served it: an alert broker waited for frame-sized files it does not read."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN, test_stage_delay=2.0)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with _client(base) as client:
            wait_ready(client)
            submitted = submit_sim_pair(client, sim_pair)
            job_id = submitted.json()["id"]
            early = client.get(f"/v1/subtractions/{job_id}/sources")
            assert early.status_code == 409, early.text
            record = wait_listed(client, job_id, "dia_sources")
            assert record["state"] == "running", record
            sources = client.get(f"/v1/subtractions/{job_id}/sources")
            assert sources.status_code == 200, sources.text
            assert len(sources.json()) >= 3  # the pair's three bright transients at least
            record = wait_job(client, job_id, timeout=120)
            assert record["state"] == "succeeded", (record["error"], record["progress"])
            assert client.get(f"/v1/subtractions/{job_id}/sources").json() == sources.json()
    finally:
        worker.stop()
        server.stop()


def _both_commands_stop_in_one_line(
    env: dict[str, str], named: str, secret: str, wrapper: tuple[str, ...] = ()
) -> list[str]:
    """`alsub serve` and `alsub worker` under ``env`` exit 2 with one line naming the
    variable ``named``, and without the ``secret`` it holds; their lines."""
    said = []
    for command in (["serve", "--workers", "0", "--port", "0"], ["worker"]):
        done = subprocess.run(
            [*wrapper, sys.executable, "-m", "app.cli", *command],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"alsub: error: {named}"), lines
        assert secret not in done.stderr
        said.append(lines[0])
    return said


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"log_level": "verbose"}, "ALSUB_LOG_LEVEL"),
        ({"redis_url": "http://127.0.0.1:6379/0"}, "ALSUB_REDIS_URL"),
        ({"redis_url": "redis://127.0.0.1:6379/first"}, "ALSUB_REDIS_URL"),
        ({"queue_name": ""}, "ALSUB_QUEUE_NAME"),
        ({"heartbeat_interval": 30, "heartbeat_timeout": 20}, "ALSUB_HEARTBEAT_TIMEOUT"),
        ({"readiness_timeout": "inf"}, "ALSUB_READINESS_TIMEOUT"),
        ({"heartbeat_timeout": "inf"}, "ALSUB_HEARTBEAT_TIMEOUT"),
        ({"readiness_timeout": "1e300"}, "ALSUB_READINESS_TIMEOUT"),
        ({"trusted_proxies": "10.0.0.0/8, s3cr3t-proxy"}, "ALSUB_TRUSTED_PROXIES"),
        ({"callback_allowed_networks": "s3cr3t-hook"}, "ALSUB_CALLBACK_ALLOWED_NETWORKS"),
    ],
)
def test_settings_that_cannot_work_stop_both_commands_in_one_line(tmp_path, settings, named):
    """A log level neither logging nor uvicorn knows, a URL that is not Redis's, an empty
    queue (jobs waited forever) and a heartbeat timeout under two intervals (every long
    stage was requeued as lost, then failed worker_lost): exit 2 and one line naming the
    variable, from both `alsub serve` and `alsub worker` (it was a traceback, or a
    service that started and never ran a job); so do infinite and absurd time settings
    (/readyz raised OverflowError forever, an infinite heartbeat timeout turned lost-job
    recovery off)."""
    env = service_env(data_dir=tmp_path, tokens="s3cr3t-token", **settings)
    _both_commands_stop_in_one_line(env, named, "s3cr3t")


#: Runs a command without root's power to ignore permission bits (CAP_DAC_OVERRIDE), so a
#: read-only directory refuses its writes as it refuses an operator's service user
#: (setpriv: util-linux, on every Debian; never skipped).
_NO_DAC = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
@pytest.mark.parametrize("distributed", [False, True])
def test_an_unusable_data_directory_stops_both_commands_in_one_line(
    tmp_path, redis_prefix, case, distributed
):
    """ALSUB_DATA_DIR a plain file, a path under one, or a directory without write
    permission: `alsub serve` died with a traceback (FileExistsError, PermissionError,
    sqlite3.OperationalError; exit 1) and `alsub worker` said "ready", then logged a
    traceback every 5 s. Both stop with one line naming ALSUB_DATA_DIR and why (exit 2)."""
    plain = tmp_path / "plain"
    plain.write_text("not a directory")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    data_dir, reason, wrapper = {
        "a file": (plain, "a file stands where a directory must be", ()),
        "under a file": (plain / "data", "a file stands where a directory must be", ()),
        "read-only": (read_only, "permission denied", _NO_DAC if os.geteuid() == 0 else ()),
    }[case]
    if distributed:
        url, prefix = redis_prefix
        env = redis_service_env(url, prefix, data_dir, tokens=TOKEN)
    else:
        env = service_env(data_dir=data_dir, tokens=TOKEN)
    for line in _both_commands_stop_in_one_line(env, "ALSUB_DATA_DIR", TOKEN, wrapper):
        assert reason in line, line
        assert str(tmp_path) not in line  # no server path
    assert plain.read_text() == "not a directory"
    assert list(read_only.iterdir()) == []


def _api_bound_by_permissions(env: dict[str, str], tmp_path) -> tuple[Process, str]:
    """``alsub serve --workers 0`` that permission bits bind (through setpriv as root)."""
    port = free_port()
    wrapper = _NO_DAC if os.geteuid() == 0 else ()
    command = [*wrapper, sys.executable, "-m", "app.cli", "serve", "--workers", "0"]
    api = Process([*command, "--port", str(port)], env, tmp_path / f"api-{port}.log")
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base, api)
    return api, base


def test_an_upload_into_a_read_only_data_directory_is_a_503(tmp_path, redis_prefix, sim_pair):
    """Uploads into a data directory whose permissions changed under the running API
    answered 500 "internal" (an unexpected PermissionError): they answer 503
    storage_unavailable with Retry-After, and say no server path."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN)
    api, base = _api_bound_by_permissions(env, tmp_path)
    uploads = data_dir / "exposures" / ".tmp"
    uploads.chmod(0o555)
    try:
        with _client(base) as client:
            refused = client.post(
                "/v1/exposures",
                content=sim_pair["science"].read_bytes(),
                headers={"Content-Type": "application/fits"},
            )
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "storage_unavailable"
        assert "refuses writes" in refused.json()["error"]["message"]
        assert str(data_dir) not in refused.text
        assert int(refused.headers["retry-after"]) > 0
    finally:
        uploads.chmod(0o755)
        api.stop()


def test_readyz_is_not_ready_while_the_products_folder_refuses_writes(tmp_path, redis_prefix):
    """/readyz probed only the uploads' folder: with jobs/ read-only it said ready while
    every job failed writing its products."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN)
    api, base = _api_bound_by_permissions(env, tmp_path)
    (data_dir / "jobs").chmod(0o555)
    try:
        with _client(base) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        store = ready.json()["checks"]["store"]
        assert store["ok"] is False and "jobs" in store["detail"], store
    finally:
        (data_dir / "jobs").chmod(0o755)
        api.stop()


def test_readyz_is_not_ready_below_the_free_space_floor(tmp_path, redis_prefix):
    """A disk too full for the next upload (every one answered 507) read as ready:
    below ALSUB_MIN_FREE_BYTES the store check fails and says why."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN, min_free_bytes=10**18)
    server, base = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    try:
        with _client(base) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["status"] == "not_ready"
        store = body["checks"]["store"]
        assert store["ok"] is False and "ALSUB_MIN_FREE_BYTES" in store["detail"], store
    finally:
        server.stop()


def test_unknown_variables_and_missing_roots_are_warned_about_at_start(tmp_path, redis_prefix):
    """A misspelt setting (ALSUB_TOKEN for ALSUB_TOKENS: the API ran without
    authentication) and an allowed root that does not exist were ignored without a word:
    `alsub serve` and `alsub worker` warn, naming the variable and the closest setting,
    never its value."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    missing = tmp_path / "no-such-root"
    env = redis_service_env(url, prefix, data_dir, allowed_roots=missing)
    env["ALSUB_TOKEN"] = "misspelt-s3cr3t"
    hint = "ALSUB_TOKEN is not an alsub setting and is ignored; did you mean ALSUB_TOKENS?"
    server, _ = start_server(free_port(), data_dir, env, tmp_path, workers=0)
    server.stop()
    log = server.log_path.read_text(errors="replace")
    assert hint in log, log[-3000:]
    assert f"ALSUB_ALLOWED_ROOTS: {missing} is not a directory" in log, log[-3000:]
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and hint not in worker.log_tail():
            time.sleep(0.2)
        assert hint in worker.log_tail(), worker.log_tail()
    finally:
        worker.stop()
    assert "misspelt-s3cr3t" not in log + worker.log_path.read_text(errors="replace")


def test_a_worker_whose_data_directory_refuses_writes_is_unhealthy(tmp_path, redis_prefix):
    """`python -m worker.health` called a worker healthy while every job it took failed
    writing its products: the data directory must take a file in every folder."""
    url, prefix = redis_prefix
    data_dir = tmp_path / "data"
    env = redis_service_env(url, prefix, data_dir, tokens=TOKEN)
    wrapper = _NO_DAC if os.geteuid() == 0 else ()
    worker = Process([*wrapper, sys.executable, "-m", "app.cli", "worker"], env, tmp_path / "w.log")

    def health() -> subprocess.CompletedProcess:
        command = [*wrapper, sys.executable, "-m", "worker.health", "2"]
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)

    try:
        deadline = time.monotonic() + 60
        while (checked := health()).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checked.returncode == 0, (checked.stderr, worker.log_tail())
        (data_dir / "jobs").chmod(0o555)
        checked = health()
        assert checked.returncode == 1, checked.stdout
        assert checked.stderr.strip().startswith("worker unhealthy: ALSUB_DATA_DIR"), checked.stderr
        assert "jobs" in checked.stderr and "permission denied" in checked.stderr
    finally:
        (data_dir / "jobs").chmod(0o755)
        worker.stop()


def test_a_redis_that_refuses_the_url_stops_both_commands_in_one_line(tmp_path, redis_prefix):
    """Wrong credentials: the API answered 503 "unreachable (restarting?)" to every call
    and the worker retried forever; a refusal is a setting to fix, said at start-up.
    (An unreachable Redis is still waited for: tests/test_service_faults.py.)"""
    url, prefix = redis_prefix
    refused = url.replace("redis://", "redis://no-such-user:no-such-password@", 1)
    env = redis_service_env(refused, prefix, tmp_path, tokens=TOKEN)
    _both_commands_stop_in_one_line(env, "ALSUB_REDIS_URL", "no-such-password")


def test_a_requeued_job_lists_none_of_the_lost_attempts_products(redis_prefix, tmp_path):
    """A worker lost after publishing the difference: the requeued job (state queued, or
    failed worker_lost) kept listing it, and the link answered 409 until a worker took it."""
    from store.redis_backend import RedisRecords
    from store.sweeper import sweep_stale_jobs

    url, prefix = redis_prefix
    records = RedisRecords(url, prefix)
    settings = Settings(data_dir=tmp_path, heartbeat_interval=1, heartbeat_timeout=5)
    try:
        lost = {}
        for attempts in (1, settings.max_attempts):
            record = JobRecord(
                id=new_job_id(),
                owner="operator-test",
                science=ExposureRef(exposure_id="a" * 64),
                template=ExposureRef(exposure_id="b" * 64),
                state="running",
                attempts=attempts,
                heartbeat_at=time.time() - 60,
                products=["difference", "kernel", "dia_sources"],
            )
            records.create(record)
            lost[attempts] = record.id
        enqueued: list[str] = []
        sweep_stale_jobs(records, settings, enqueued.append)
        requeued, failed = records.get(lost[1]), records.get(lost[settings.max_attempts])
        assert requeued.state == "queued" and requeued.products == []
        assert failed.state == "failed" and failed.products == []
        assert enqueued == [lost[1]]
    finally:
        records.close()


def test_an_orderly_stop_of_serve_does_not_use_up_a_running_jobs_attempts(sim_pair, tmp_path):
    """A review's find: three orderly restarts of `alsub serve` (SIGTERM) failed a running
    job as worker_lost ("try a smaller image"). Stopped in order, the service puts its
    running job back in the queue without counting the attempt: with a single attempt
    allowed, the job still runs to the end after a restart. The restart also forgets
    the broadcast queue of the worker gone: each ping wrote a file for every worker ever
    started into the job queue's folder, never read."""
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    # stages long enough that the job is still running when the worker's grace ends
    env = service_env(tokens=TOKEN, test_stage_delay=2.0, max_attempts=1)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    process, base = start_server(free_port(), data_dir, env, logs)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            wait_ready(client)
            response = submit_sim_pair(client, sim_pair)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            wait_job(client, job_id, until={"running"})
        process.stop()
        assert "stopped with 1 job(s) running: queued again" in process.log_tail(), "not cut off"
        # the rerun at full speed (the delays only had to outlast the worker's grace)
        env = service_env(tokens=TOKEN, max_attempts=1)
        process, base = start_server(free_port(), data_dir, env, logs)
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            record = wait_job(client, job_id, timeout=180)
            for _ in range(3):
                assert client.get("/readyz").status_code == 200
        assert record["state"] == "succeeded", (record["error"], record["progress"])
        assert record["attempts"] == 1
        broker = data_dir / "broker"
        bound = json.loads((broker / "control" / "celery.pidbox.exchange").read_text())
        assert len(bound) == 1, bound  # the live worker's queue alone
        live = bound[0][2]
        stale = [p.name for p in (broker / "queue").glob("*.pidbox.msg") if live not in p.name]
        assert not stale
    finally:
        process.stop()
