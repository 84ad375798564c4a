"""The shared store: content-addressed blobs, atomic product directories, job records.

Record backends run against SQLite and against the real Redis (test database,
private key prefix), with the same assertions.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from store import BlobStore, ExposureRef, JobRecord, ProductStore, Settings, UploadTooLargeError
from store.errors import UNAVAILABLE_ERRORS
from store.records import IdempotencyConflictError, new_job_id
from store.redis_backend import RedisRecords
from store.sqlite_backend import SqliteRecords
from store.sweeper import (
    StoreWatch,
    release_running,
    requeue_all,
    requeue_if_stale,
    resend_waiting_jobs,
    sweep_stale_jobs,
)
from tests.service_fixtures import PrivateRedis


# blobs and products -------------------------------------------------------------------------
def test_blob_store_is_content_addressed(tmp_path):
    blobs = BlobStore(tmp_path / "exposures", ".fits")
    data = b"SIMPLE  = T" + bytes(range(256)) * 40
    first = blobs.put_stream([data[:1000], data[1000:]], max_bytes=len(data))
    second = blobs.put_bytes(data)
    assert first == second == hashlib.sha256(data).hexdigest()
    stored = list((tmp_path / "exposures").rglob("*.fits"))
    assert stored == [blobs.path(first)] and stored[0].read_bytes() == data
    assert list(blobs.tmp_dir.iterdir()) == []
    blobs.write_meta(first, {"size_bytes": len(data)})
    assert blobs.read_meta(first) == {"size_bytes": len(data)}
    with pytest.raises(KeyError):
        blobs.path("../../etc/passwd")
    assert not blobs.exists("0" * 63)


def test_blob_writer_enforces_the_cap_and_leaves_nothing(tmp_path):
    blobs = BlobStore(tmp_path / "exposures", ".fits")
    writer = blobs.writer(max_bytes=100)
    writer.write(b"x" * 60)
    with pytest.raises(UploadTooLargeError) as info:
        writer.write(b"x" * 41)
    assert info.value.limit == 100
    assert list(blobs.tmp_dir.iterdir()) == []
    assert list((tmp_path / "exposures").rglob("*.fits")) == []


def test_products_are_published_atomically_and_replaced_whole(tmp_path):
    products = ProductStore(tmp_path / "jobs")

    def first_run(directory):
        (directory / "difference.fits").write_bytes(b"one")
        (directory / "kernel.fits").write_bytes(b"k1")

    def second_run(directory):
        (directory / "difference.fits").write_bytes(b"two")

    assert products.publish("job1", first_run) == ["difference", "kernel"]
    assert products.publish("job1", second_run) == ["difference"]  # redelivery: same dir, rewritten
    assert products.path("job1", "difference").read_bytes() == b"two"
    assert products.path("job1", "kernel") is None

    def crash(directory):
        (directory / "difference.fits").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        products.publish("job1", crash)
    assert products.path("job1", "difference").read_bytes() == b"two"
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["job1"]
    products.delete("job1")
    assert products.names("job1") == []
    with pytest.raises(KeyError):
        products.job_dir("../escape")


def test_products_added_after_publishing_join_the_published_folder(tmp_path):
    products = ProductStore(tmp_path / "jobs")
    assert products.publish("job1", lambda d: (d / "difference.fits").write_bytes(b"d")) == [
        "difference"
    ]
    seen_while_writing = []

    def rest(directory):
        tmp = directory / ".matched_template.fits.x.tmp"  # core's writers: temp name, rename
        tmp.write_bytes(b"m")
        seen_while_writing.append(products.names("job1"))
        tmp.rename(directory / "matched_template.fits")

    assert products.add("job1", rest) == ["difference", "matched_template"]
    assert seen_while_writing == [["difference"]]  # a file being written is not a product
    assert products.path("job1", "matched_template").read_bytes() == b"m"


# record backends ----------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "redis"])
def records(request, tmp_path):
    if request.param == "sqlite":
        backend = SqliteRecords(tmp_path / "records.sqlite")
    else:
        url, prefix = request.getfixturevalue("redis_prefix")
        backend = RedisRecords(url, prefix)
    yield backend
    backend.close()


def make_record(owner="alice", created_at=None, **fields) -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        owner=owner,
        science=ExposureRef(exposure_id="a" * 64),
        template=ExposureRef(exposure_id="b" * 64),
        created_at=created_at if created_at is not None else time.time(),
        **fields,
    )


def test_create_get_update_delete(records):
    record = make_record()
    stored, created = records.create(record)
    assert created and records.get(record.id) == stored

    def start(r):
        r.state, r.attempts = "running", r.attempts + 1
        return True

    after, written = records.update(record.id, start)
    assert written and after.state == "running" and records.get(record.id).attempts == 1
    unchanged, written = records.update(record.id, lambda r: False)
    assert not written and unchanged.state == "running"
    assert records.update("missing", start) == (None, False)
    assert records.state_counts().get("running") == 1
    assert [r.id for r in records.in_state("running")] == [record.id]
    assert records.delete(record.id) and records.get(record.id) is None
    assert not records.delete(record.id)
    assert records.state_counts().get("running", 0) == 0


def test_concurrent_updates_do_not_lose_writes(records):
    record = make_record()
    records.create(record)

    def bump(r):
        r.attempts += 1
        return True

    threads = [
        threading.Thread(target=lambda: [records.update(record.id, bump) for _ in range(20)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert records.get(record.id).attempts == 80


def test_idempotency_keys_are_per_owner(records):
    first = make_record(idempotency_key="k1")
    stored, created = records.create(first, fingerprint="f1")
    assert created
    replay, created = records.create(make_record(idempotency_key="k1"), fingerprint="f1")
    assert not created and replay.id == first.id
    with pytest.raises(IdempotencyConflictError) as info:
        records.create(make_record(idempotency_key="k1"), fingerprint="f2")
    assert info.value.job_id == first.id
    other, created = records.create(make_record(owner="bob", idempotency_key="k1"), "f1")
    assert created and other.id != first.id
    records.delete(first.id)  # a deleted job frees its key
    fresh, created = records.create(make_record(idempotency_key="k1"), fingerprint="f3")
    assert created and fresh.id != first.id


def test_listing_is_newest_first_with_cursor_and_filters(records):
    t0 = 1_700_000_000.0
    made = [make_record(created_at=t0 + i) for i in range(7)]
    made[3].state = "failed"
    for record in made:
        records.create(record)
    records.create(make_record(owner="bob", created_at=t0 + 100))
    seen, cursor = [], None
    while True:
        page, cursor = records.list("alice", limit=3, cursor=cursor)
        assert len(page) <= 3
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == [r.id for r in reversed(made)]
    failed, _ = records.list("alice", state="failed")
    assert [r.id for r in failed] == [made[3].id]
    recent, cursor = records.list("alice", since=t0 + 5)
    assert [r.id for r in recent] == [made[6].id, made[5].id] and cursor is None
    assert records.count_active("alice") == 6 and records.count_active("bob") == 1


def test_owners_are_forgotten_one_by_one_or_all_at_once(records):
    """What DELETE /v1/exposures and the retention clean-up need of both backends."""
    for owner in ("alice", "bob"):
        records.add_owner("exposure", "d" * 64, owner)
    assert records.remove_owner("exposure", "d" * 64, "alice") == 1
    assert not records.is_owner("exposure", "d" * 64, "alice")
    assert records.is_owner("exposure", "d" * 64, "bob")
    assert records.remove_owner("exposure", "d" * 64, "alice") == 1  # twice: no change
    records.add_owner("catalog", "e" * 64, "alice")
    records.forget_blob("catalog", "e" * 64)
    assert not records.is_owner("catalog", "e" * 64, "alice")


def test_owners_rate_counters_workers_and_durations(records):
    records.add_owner("exposure", "c" * 64, "alice")
    assert records.is_owner("exposure", "c" * 64, "alice")
    assert not records.is_owner("exposure", "c" * 64, "bob")
    # An hour-long window: the three hits land in one window barring an hour boundary.
    assert [records.hit("rate:alice", 3600.0) for _ in range(3)] == [1, 2, 3]
    assert records.hit("rate:bob", 3600.0) == 1
    records.worker_seen("w1")
    records.worker_seen("w2")
    assert sorted(records.live_workers(10.0)) == ["w1", "w2"]
    records.worker_gone("w2")  # shut down: no longer counted, before its liveness ages out
    assert records.live_workers(10.0) == ["w1"]
    for seconds in (0.3, 4.0, 4.5, 5000.0):
        records.observe_duration(seconds)
    cumulative, total, count = records.duration_histogram()
    assert count == 4 and total == pytest.approx(5008.8)
    assert cumulative[0] == 1 and cumulative[3] == 3 and cumulative[-1] == 4


def test_sweeper_requeues_stale_jobs_then_fails_them(records, tmp_path):
    settings = Settings(
        data_dir=tmp_path, heartbeat_interval=1, heartbeat_timeout=5, max_attempts=2
    )
    stale = make_record(state="running", attempts=1, heartbeat_at=time.time() - 60)
    fresh = make_record(state="running", attempts=1, heartbeat_at=time.time())
    worn_out = make_record(state="running", attempts=2, heartbeat_at=time.time() - 60)
    for record in (stale, fresh, worn_out):
        records.create(record)
    enqueued: list[str] = []
    swept = sweep_stale_jobs(records, settings, enqueued.append)
    assert sorted(swept) == sorted([stale.id, worn_out.id])
    assert enqueued == [stale.id]
    assert records.get(stale.id).state == "queued"
    assert records.get(fresh.id).state == "running"
    failed = records.get(worn_out.id)
    assert failed.state == "failed" and failed.error["code"] == "worker_lost"
    assert sweep_stale_jobs(records, settings, enqueued.append) == []  # nothing twice
    # Embedded restart: every unfinished job goes back to the queue.
    assert sorted(requeue_all(records, settings, enqueued.append)) == sorted([stale.id, fresh.id])
    assert records.get(fresh.id).state == "queued"


def test_a_redis_outage_longer_than_the_timeout_does_not_make_a_live_job_lost(tmp_path):
    """Review (operations): a minute-long Redis outage, then the sweeper requeued a running
    job a second after Redis came back, before its live worker's next heartbeat (it ran
    again from scratch; three outages failed it as worker_lost). The outage's time no longer
    counts against the worker; a worker really gone is still found a timeout later."""
    server = PrivateRedis(tmp_path)
    server.start()
    settings = Settings(data_dir=tmp_path, heartbeat_interval=0.5, heartbeat_timeout=1.0)
    records = RedisRecords(server.url, "outage:")
    live = make_record(state="running", attempts=1, heartbeat_at=time.time())
    records.create(live)
    enqueued: list[str] = []
    try:
        assert sweep_stale_jobs(records, settings, enqueued.append) == []
        server.stop()
        with pytest.raises(UNAVAILABLE_ERRORS):
            sweep_stale_jobs(records, settings, enqueued.append)
        time.sleep(1.5)  # longer than the timeout: no heartbeat can land
        server.start()
        back = time.monotonic()
        assert requeue_if_stale(records, live.id, settings, enqueued.append).state == "running"
        # polled as a worker's sweeper does; the heartbeat stays as it was before the outage
        while not sweep_stale_jobs(records, settings, enqueued.append):
            assert time.monotonic() - back < 3.0
            time.sleep(0.2)
        assert time.monotonic() - back > settings.heartbeat_timeout
        assert enqueued == [live.id] and records.get(live.id).state == "queued"
    finally:
        records.close()
        server.stop()


def test_a_long_silence_counts_as_a_break_but_a_first_call_does_not():
    """An idle API cannot tell whether the store was away while it made no call."""
    watch = StoreWatch()
    assert watch.judged_from(now=1000.0, gap=60.0) == 0.0  # a new process judges at once
    watch.reached(1000.0, gap=60.0)
    watch.reached(1030.0, gap=60.0)
    assert watch.since == 0.0
    assert watch.judged_from(now=1100.0, gap=60.0) == 1100.0
    watch.lost()
    watch.reached(1101.0, gap=60.0)
    assert watch.since == 1101.0


def test_an_orderly_stop_requeues_running_jobs_without_counting_the_attempt(records, tmp_path):
    """A review's find: three orderly restarts of `alsub serve` failed a running job as
    worker_lost, advising a smaller image. An orderly stop releases its jobs; a restart
    after a crash still counts the attempt, and the message says what happened."""
    settings = Settings(data_dir=tmp_path, max_attempts=2)
    running = make_record(state="running", attempts=2, heartbeat_at=time.time())
    done = make_record(state="succeeded", attempts=1)
    for record in (running, done):
        records.create(record)
    assert release_running(records) == [running.id]
    released = records.get(running.id)
    assert (released.state, released.attempts, released.worker) == ("queued", 1, None)
    assert records.get(done.id).state == "succeeded"
    assert release_running(records) == []  # nothing twice

    # killed, not stopped: the restart counts the attempt, and then fails it
    def crashed(record) -> bool:
        record.state, record.attempts = "running", 2
        return True

    records.update(running.id, crashed)
    requeue_all(records, settings, lambda job_id: None)
    failed = records.get(running.id)
    assert failed.state == "failed" and failed.error["code"] == "worker_lost"
    assert "service restarted" in failed.error["message"]
    assert "smaller image" not in failed.error["message"]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALSUB_TOKENS", "one, two,three")
    monkeypatch.setenv("ALSUB_ALLOWED_ROOTS", f"{tmp_path},{tmp_path}/sub")
    monkeypatch.setenv("ALSUB_HARD_TIME_LIMIT", "100")
    monkeypatch.setenv("ALSUB_SOFT_TIME_LIMIT", "90")
    settings = Settings()
    assert settings.tokens == ["one", "two", "three"]
    assert settings.allowed_roots[0] == tmp_path.resolve()
    assert settings.broker_visibility_timeout > settings.hard_time_limit
    monkeypatch.setenv("ALSUB_SOFT_TIME_LIMIT", "120")
    with pytest.raises(ValueError, match="ALSUB_SOFT_TIME_LIMIT .* ALSUB_HARD_TIME_LIMIT") as bad:
        Settings()
    # the error names the settings, never another one's value (a token, a Redis password)
    assert "three" not in str(bad.value)
    monkeypatch.setenv("ALSUB_SOFT_TIME_LIMIT", "90")
    monkeypatch.setenv("ALSUB_TOKENS", " , ")  # separators only: a mistake, not "open"
    with pytest.raises(ValueError, match="holds no token"):
        Settings()
    monkeypatch.setenv("ALSUB_TOKENS", "")  # empty: no authentication, as documented
    assert Settings().tokens == []


def test_no_time_setting_takes_infinity_nan_or_an_absurd_value(monkeypatch, tmp_path):
    """ALSUB_READINESS_TIMEOUT=inf made /readyz fail forever (OverflowError) and
    ALSUB_HEARTBEAT_TIMEOUT=inf turned lost-job recovery off: every float setting refuses
    inf, nan and values past its ceiling, the error on that variable alone."""
    from pydantic import ValidationError

    floats = [
        name
        for name, field in Settings.model_fields.items()
        if field.annotation in (float, float | None)
    ]
    assert {"readiness_timeout", "heartbeat_timeout", "soft_time_limit"} <= set(floats)
    monkeypatch.setenv("ALSUB_DATA_DIR", str(tmp_path))
    for name in floats:
        for text in ("inf", "-inf", "nan", "1e300"):
            monkeypatch.setenv(f"ALSUB_{name.upper()}", text)
            with pytest.raises(ValidationError) as bad:
                Settings()
            assert [error["loc"] for error in bad.value.errors()] == [(name,)], (name, text)
        monkeypatch.delenv(f"ALSUB_{name.upper()}")
    assert Settings().readiness_timeout == 1.5


def test_unknown_variables_name_the_closest_setting(tmp_path):
    """Misspelt ALSUB_* names were ignored silently; the deployment's own (compose,
    the embedded worker's) and other programs' variables are not warned about."""
    from store.settings import unknown_variables

    environ = {
        "ALSUB_TOKEN": "s3cr3t",
        "alsub_heartbeat_timout": "30",
        "ALSUB_ZZZ": "1",
        "ALSUB_TOKENS": "a",
        "ALSUB_PORT": "8000",
        "ALSUB_EMBEDDED_PARENT": "1",
        "HOME": "/root",
    }
    warnings = unknown_variables(environ)
    assert warnings == [
        "ALSUB_TOKEN is not an alsub setting and is ignored; did you mean ALSUB_TOKENS?",
        "ALSUB_ZZZ is not an alsub setting and is ignored",
        "alsub_heartbeat_timout is not an alsub setting and is ignored; did you mean "
        "ALSUB_HEARTBEAT_TIMEOUT?",
    ], warnings
    assert "s3cr3t" not in " ".join(warnings)


def test_service_commands_report_a_bad_setting_in_one_line(monkeypatch, capsys, tmp_path):
    """`alsub serve` / `alsub worker` with a bad ALSUB_* value: exit 2, the variable named,
    no traceback and no token in the output (it was a pydantic dump of every input)."""
    from app.cli import main

    monkeypatch.setenv("ALSUB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ALSUB_TOKENS", "s3cr3t-token")
    monkeypatch.setenv("ALSUB_HARD_TIME_LIMIT", "300")
    for command in (["serve", "--workers", "0", "--port", "0"], ["worker"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "ALSUB_HARD_TIME_LIMIT" in err and "Traceback" not in err
        assert "s3cr3t" not in err


def test_jobs_waiting_queued_too_long_are_resent_once_per_period(records, tmp_path):
    settings = Settings(data_dir=tmp_path, queued_resend_after=30)
    lost = make_record(updated_at=time.time() - 120)  # its message vanished with a worker
    waiting = make_record()
    for record in (lost, waiting):
        records.create(record)
    enqueued: list[str] = []
    assert resend_waiting_jobs(records, settings, enqueued.append) == [lost.id]
    assert enqueued == [lost.id]
    assert resend_waiting_jobs(records, settings, enqueued.append) == []  # not again at once
    assert records.get(lost.id).state == "queued"
    assert records.count("rate:x", 60.0) == 0  # counting without a hit
    records.hit("rate:x", 60.0)
    assert records.count("rate:x", 60.0) == 1


def test_clean_tmp_and_staging_spare_fresh_files(tmp_path):
    blobs = BlobStore(tmp_path / "blobs", ".fits")
    products = ProductStore(tmp_path / "jobs")
    old, fresh = blobs.tmp_dir / "old.fits", blobs.tmp_dir / "fresh.fits"
    stale_staging = products.root / ".tmp-job-1"
    for path in (old, fresh):
        path.write_bytes(b"x")
    stale_staging.mkdir()
    past = time.time() - 600
    os.utime(old, (past, past))
    os.utime(stale_staging, (past, past))
    assert blobs.clean_tmp(older_than=60) == 1
    assert products.clean_staging(older_than=60) == 1
    assert not old.exists() and fresh.exists() and not stale_staging.exists()


def test_empty_or_cut_sidecar_reads_as_missing(tmp_path):
    blobs = BlobStore(tmp_path, ".fits")
    blob_id = blobs.put_bytes(b"data")
    blobs.write_meta(blob_id, {"size_bytes": 4})
    assert blobs.read_meta(blob_id) == {"size_bytes": 4}
    for broken in ("", '{"size_by', "[1, 2]"):
        blobs.meta_path(blob_id).write_text(broken)
        assert blobs.read_meta(blob_id) is None


def test_a_worker_without_the_stored_inputs_blames_the_deployment(tmp_path):
    """A worker whose ALSUB_DATA_DIR is not the API's finds no input: the job fails as
    the service's fault, saying why (it was invalid_exposure "no such file", the
    client's), and the worker's log names its data directory."""
    from store import open_store
    from worker.jobs import run_job

    settings = Settings(data_dir=tmp_path / "not-the-apis")
    store = open_store(settings)
    record = make_record()
    store.records.create(record)
    assert run_job(store, settings, record.id) == "failed"
    error = store.records.get(record.id).error
    assert error["code"] == "internal"
    assert "data directory" in error["message"] and "science and template" in error["message"]
    assert str(tmp_path) not in error["message"]  # no server path for the client


def test_a_worker_without_redis_says_where_it_takes_jobs(tmp_path):
    """`alsub worker` without ALSUB_REDIS_URL takes jobs from the local broker; it says
    so (it reported ready on a queue no API fed, and jobs waited forever)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ALSUB_") or k == "ALSUB_TOKENS"}
    env["ALSUB_DATA_DIR"] = str(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main(['worker'])"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(process.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("ALSUB_REDIS_URL is not" in t for t in seen):
            time.sleep(0.2)
        assert any("ALSUB_REDIS_URL is not set" in line for line in seen), seen[-5:]
        assert any(str(tmp_path) in line for line in seen)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_redis_that_keeps_nothing_on_disk_is_reported(redis_prefix):
    """The API warns at start when the Redis of its records keeps nothing on disk: a
    restart would forget every job, and the disk cleaning then deletes their products.
    Judged on the real server's own settings; a server that does not answer is not
    judged."""
    import redis

    from store.redis_backend import persistence_warning

    url, _ = redis_prefix
    client = redis.Redis.from_url(url)
    try:
        appendonly = client.config_get("appendonly")["appendonly"]
        save = client.config_get("save")["save"]
        message = persistence_warning(client)
    finally:
        client.close()
    keeps_nothing = appendonly != "yes" and not save.strip()
    assert (message is not None) == keeps_nothing
    if message:
        assert "appendonly" in message and "forgets every job" in message
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    assert persistence_warning(gone) is None
