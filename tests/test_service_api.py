"""The embedded service end to end: ``alsub serve`` subprocess, real HTTP, real worker.

One server (filesystem broker, SQLite records, one embedded worker) serves the
whole module; tokens alice, bob, carol and dave keep the tests' jobs apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from .service_fixtures import (
    difference_quality,
    free_port,
    service_env,
    start_server,
    upload,
    wait_job,
    wait_ready,
)

# Shared fixtures (sim_pair, other_field_template) live in tests/service_fixtures.py.

TOKENS = {"alice": "alice-token-1", "bob": "bob-token-2", "carol": "carol-3", "dave": "dave-4"}
MAX_UPLOAD = 2_000_000
RATE_LIMIT = 400
MAX_JOBS = 2
MAX_PIXELS = 100_000  # the 256x256 pairs pass, a 320x320 image does not


@pytest.fixture(scope="module")
def service(tmp_path_factory, sim_pair):
    data_dir = tmp_path_factory.mktemp("data")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.fits").write_bytes(sim_pair["science"].read_bytes())
    env = service_env(
        tokens=",".join(TOKENS.values()),
        max_upload_bytes=MAX_UPLOAD,
        max_pixels=MAX_PIXELS,
        rate_limit_per_minute=RATE_LIMIT,
        read_rate_limit_per_minute=RATE_LIMIT,  # test_request_rate_is_limited polls with GET
        max_concurrent_jobs=MAX_JOBS,
        allowed_roots=str(sim_pair["dir"]),
        heartbeat_interval=1,
        heartbeat_timeout=20,
        webhook_backoff=0.2,
        callback_allowed_networks="127.0.0.1/32",  # the test's hook listens on loopback
        open_health_endpoints="true",  # probes without a token (closed by default)
        # Debug delay per stage so cancellation and concurrency limits meet running jobs.
        test_stage_delay=0.25,
    )
    process, base = start_server(free_port(), data_dir, env, tmp_path_factory.mktemp("logs"))
    try:
        yield {"base": base, "data": data_dir, "outside": outside, "process": process}
    finally:
        process.stop()


def client_for(service, who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
    return httpx.Client(base_url=service["base"], headers=headers, timeout=60)


@pytest.fixture(scope="module")
def alice(service):
    with client_for(service, "alice") as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def bob(service):
    with client_for(service, "bob") as client:
        yield client


@pytest.fixture(scope="module")
def alice_inputs(alice, sim_pair):
    return upload(alice, sim_pair["science"]), upload(alice, sim_pair["template"])


def submit(client, science_id, template_id, **extra) -> httpx.Response:
    body = {"science": {"exposure_id": science_id}, "template": {"exposure_id": template_id}}
    return client.post("/v1/subtractions", json={**body, **extra})


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


# health, docs, auth ---------------------------------------------------------------------------
def test_health_readiness_and_openapi(service, alice):
    with client_for(service, None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200
        checks = ready.json()["checks"]
        assert checks["workers"]["ok"] and checks["broker"]["ok"] and checks["store"]["ok"]
        schema = anonymous.get("/openapi.json").json()
    for path in (
        "/v1/exposures",
        "/v1/subtractions",
        "/v1/subtractions/{job_id}",
        "/v1/subtractions/{job_id}/products/{name}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in schema["paths"], path
    request_schema = schema["components"]["schemas"]["SubtractionRequest"]
    assert {"science", "template", "mode", "config", "idempotency_key", "callback_url"} <= set(
        request_schema["properties"]
    )
    assert "examples" in request_schema
    submit_op = schema["paths"]["/v1/subtractions"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(submit_op["requestBody"]["content"])
    assert all(op.get("description") for op in schema["paths"]["/v1/subtractions"].values())


def test_missing_or_wrong_token_is_401(service):
    with client_for(service, None) as anonymous:
        assert_error(anonymous.get("/v1/subtractions"), 401, "unauthorized")
        response = anonymous.get("/v1/subtractions", headers={"Authorization": "Bearer nope"})
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


# uploads --------------------------------------------------------------------------------------
def test_upload_is_content_addressed(service, alice, bob, sim_pair):
    data = sim_pair["science"].read_bytes()
    first = alice.post("/v1/exposures", content=data, headers={"Content-Type": "application/fits"})
    assert first.status_code == 201, first.text
    exposure_id = first.json()["id"]
    assert exposure_id == hashlib.sha256(data).hexdigest()
    assert first.headers["location"] == f"/v1/exposures/{exposure_id}"
    second = alice.post("/v1/exposures", files={"file": ("science.fits", data)})
    assert second.status_code == 201 and second.json()["id"] == exposure_id
    stored = list((service["data"] / "exposures").rglob(f"{exposure_id}*.fits"))
    assert len(stored) == 1 and stored[0].read_bytes() == data
    description = alice.get(f"/v1/exposures/{exposure_id}").json()["description"]
    assert description["shape"] == [256, 256]
    assert description["psf"]["fwhm_pixels"] == pytest.approx(4.0, rel=0.05)
    assert description["wcs"]["present"] is True
    assert "file" not in description
    # bob has not uploaded it: he cannot see it, nor use it.
    assert_error(bob.get(f"/v1/exposures/{exposure_id}"), 404, "not_found")
    # a body declared JSON or text is no FITS file (it was stored whatever it said)
    for declared in ("application/json", "text/plain"):
        wrong = alice.post("/v1/exposures", content=data, headers={"Content-Type": declared})
        assert_error(wrong, 415, "unsupported_media_type")
    plain = alice.post("/v1/exposures", content=data)  # an HTTP client's default: accepted
    assert plain.status_code == 201 and plain.json()["id"] == exposure_id
    assert_error(submit(bob, exposure_id, exposure_id), 404, "not_found")


def test_upload_too_large_is_413(service, alice):
    too_big = b"\0" * (MAX_UPLOAD + 1)
    response = alice.post(
        "/v1/exposures", content=too_big, headers={"Content-Type": "application/fits"}
    )
    assert_error(response, 413, "upload_too_large")

    def chunks():  # no Content-Length: the cap must hold while streaming
        for _ in range(5):
            yield b"\0" * (MAX_UPLOAD // 4)

    streamed = alice.post(
        "/v1/exposures", content=chunks(), headers={"Content-Type": "application/fits"}
    )
    assert_error(streamed, 413, "upload_too_large")
    multipart = alice.post("/v1/exposures", files={"file": ("big.fits", too_big)})
    assert_error(multipart, 413, "upload_too_large")
    leftovers = list((service["data"] / "exposures" / ".tmp").iterdir())
    assert leftovers == []


def test_invalid_uploads_are_422_with_the_reader_message(service, alice):
    error = assert_error(
        alice.post(
            "/v1/exposures",
            content=b"not a FITS file at all " * 100,
            headers={"Content-Type": "application/fits"},
        ),
        422,
        "invalid_exposure",
    )
    assert "FITS" in error["message"] or "fits" in error["message"]
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.ones(3))])
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer)
    assert_error(
        alice.post(
            "/v1/exposures", content=buffer.getvalue(), headers={"Content-Type": "application/fits"}
        ),
        422,
        "invalid_exposure",
    )
    assert_error(
        alice.post("/v1/exposures", content=b"", headers={"Content-Type": "application/fits"}),
        422,
        "invalid_exposure",
    )
    buffer = io.BytesIO()
    fits.PrimaryHDU(np.zeros((320, 320), dtype=np.float32)).writeto(buffer)
    error = assert_error(
        alice.post(
            "/v1/exposures", content=buffer.getvalue(), headers={"Content-Type": "application/fits"}
        ),
        422,
        "invalid_exposure",
    )
    assert "pixels" in error["message"], error
    assert list((service["data"] / "exposures" / ".tmp").iterdir()) == []


def test_uris_outside_the_roots_are_refused(service, alice, sim_pair, alice_inputs):
    root = sim_pair["dir"]
    template = {"exposure_id": alice_inputs[1]}
    refused = [
        f"file://{service['outside']}/secret.fits",
        f"file://{root}/../{service['outside'].name}/secret.fits",
        f"file://{root}/../../../../../../etc/passwd",
        "file:///etc/passwd",
        f"file://{root}/science%00.fits",
        "http://example.org/science.fits",
        "https://127.0.0.1/science.fits",
        "s3://bucket/science.fits",
        "ftp://example.org/science.fits",
    ]
    for uri in refused:
        response = alice.post(
            "/v1/subtractions", json={"science": {"uri": uri}, "template": template}
        )
        assert_error(response, 422, "uri_not_allowed")
    accepted = alice.post(
        "/v1/subtractions",
        json={"science": {"uri": f"file://{sim_pair['science']}"}, "template": template},
    )
    assert accepted.status_code == 202, accepted.text
    record = accepted.json()
    assert record["science"]["exposure_id"] == alice_inputs[0]  # same bytes, same id
    assert record["science"]["uri"] == f"file://{sim_pair['science']}"
    assert alice.delete(f"/v1/subtractions/{record['id']}").status_code in (200, 204)


# the main flow --------------------------------------------------------------------------------
def test_end_to_end_difference_noise_and_transient_flux(service, alice, alice_inputs, sim_pair):
    response = submit(alice, *alice_inputs, mode="auto")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/subtractions/{job_id}"
    assert response.json()["state"] == "queued"
    seen_stages = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        record = alice.get(f"/v1/subtractions/{job_id}").json()
        seen_stages.add(record["progress"]["stage"])
        if record["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert record["state"] == "succeeded", record
    assert len(seen_stages & {"prepare", "select", "fit", "convolve", "decorrelate"}) >= 2
    assert record["progress"] == {"stage": "done", "fraction": 1.0}
    assert record["attempts"] == 1
    assert record["timings"]["subtraction"] > 0 and record["timings"]["queue_wait"] >= 0
    assert record["metrics"]["mode"] == "convolveTemplate"
    # the verdict stands beside the state, the same as in the metrics
    assert record["quality"] == record["metrics"]["quality"]
    assert record["quality"]["verdict"] in ("good", "suspect")
    assert set(record["products"]) >= {"difference", "matched_template", "kernel", "background"}

    difference = alice.get(record["products"]["difference"])
    assert difference.status_code == 200
    assert difference.headers["content-type"] == "application/fits"
    # HEAD answers every GET route with its headers alone (it was 405)
    head = alice.head(record["products"]["difference"])
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(difference.content)
    job_head = alice.head(f"/v1/subtractions/{job_id}")
    assert job_head.status_code == 200 and job_head.content == b""
    for url in (f"/v1/subtractions/{job_id}/products/nothing", "/v1/subtractions/no-such-job"):
        assert alice.head(url).status_code == alice.get(url).status_code >= 400  # as GET
    assert client_for(service, None).head(f"/v1/subtractions/{job_id}").status_code == 401
    paths = alice.get("/openapi.json").json()["paths"]
    assert not any("head" in operations for operations in paths.values())  # one operation each
    noise, flux_ratios = difference_quality(difference.content, sim_pair["truth"])
    assert 0.9 < noise < 1.1, noise
    assert np.allclose(flux_ratios, 1.0, atol=0.10), flux_ratios

    metrics = alice.get(f"/v1/subtractions/{job_id}/metrics").json()
    assert metrics["noise_ratio"] == pytest.approx(record["metrics"]["noise_ratio"])
    assert 0.8 < metrics["noise_ratio"] < 1.2

    preview = alice.get(f"/v1/subtractions/{job_id}/products/difference", params={"format": "png"})
    assert preview.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(preview.content))
    assert image.size == (256, 256)
    assert 10 < np.asarray(image).std() < 120  # a stretched picture, not flat or binary

    x, y = (
        int(round(v))
        for v in (sim_pair["truth"]["transients"]["x"][0], sim_pair["truth"]["transients"]["y"][0])
    )
    params = {"x": x, "y": y, "size": 31}
    cutout = alice.get(f"/v1/subtractions/{job_id}/products/difference", params=params)
    with fits.open(io.BytesIO(cutout.content)) as hdul:
        stamp = hdul["IMAGE"].data
    assert stamp.shape == (31, 31)
    assert np.unravel_index(np.argmax(stamp), stamp.shape) in [
        (15 + a, 15 + b) for a in (-1, 0, 1) for b in (-1, 0, 1)
    ]
    png_cutout = alice.get(
        f"/v1/subtractions/{job_id}/products/difference", params={**params, "format": "png"}
    )
    assert Image.open(io.BytesIO(png_cutout.content)).size == (31, 31)
    assert_error(alice.get(f"/v1/subtractions/{job_id}/products/score"), 404, "not_found")
    assert_error(
        alice.get(f"/v1/subtractions/{job_id}/products/difference", params={"x": 9999, "y": 5}),
        422,
        "cutout_outside",
    )

    prometheus = httpx.get(f"{service['base']}/metrics").text
    succeeded = [
        line for line in prometheus.splitlines() if line.startswith('alsub_jobs{state="succeeded"}')
    ]
    assert succeeded and float(succeeded[0].split()[-1]) >= 1
    count = [
        line
        for line in prometheus.splitlines()
        if line.startswith("alsub_job_duration_seconds_count")
    ]
    assert count and float(count[0].split()[-1]) >= 1
    assert "alsub_queue_depth" in prometheus


def test_one_shot_multipart_form_with_a_source_catalog(alice, sim_pair):
    stars = sim_pair["truth"]["stars"]
    brightest = np.argsort(stars["flux_science"])[::-1][:60]
    catalog = "x,y,flux\n" + "".join(
        f"{stars['x'][i]:.2f},{stars['y'][i]:.2f},{stars['flux_science'][i]:.1f}\n"
        for i in brightest
    )
    response = alice.post(
        "/v1/subtractions",
        files={
            "science": ("science.fits", sim_pair["science"].read_bytes()),
            "template": ("template.fits", sim_pair["template"].read_bytes()),
            "sources": ("stars.csv", catalog.encode()),
        },
        data={"config": json.dumps({"do_decorrelation": True}), "mode": "convolveTemplate"},
    )
    assert response.status_code == 202, response.text
    record = wait_job(alice, response.json()["id"])
    assert record["state"] == "succeeded", record
    assert record["mode"] == "convolveTemplate"
    assert record["sources_id"] == hashlib.sha256(catalog.encode()).hexdigest()
    assert record["metrics"]["n_kernel_sources"] >= 3


def test_one_shot_form_refuses_unknown_fields_and_reads_config_and_sources_either_way(
    alice, sim_pair
):
    """A review's silent drops: a misspelt plane field, a mode sent as a file and stray
    fields were ignored (202, the job ran without them); a config sent as a file part
    (`-F config=@cfg.json`) and a catalog sent as text were ignored too."""
    pair = {
        "science": ("science.fits", sim_pair["science"].read_bytes()),
        "template": ("template.fits", sim_pair["template"].read_bytes()),
    }
    misspelt = alice.post("/v1/subtractions", files={**pair, "science_nosie": ("n.fits", b"x")})
    assert_error(misspelt, 422, "invalid_request")
    assert "science_nosie" in misspelt.json()["error"]["message"]
    stray = alice.post("/v1/subtractions", files=pair, data={"bogus": "1"})
    assert_error(stray, 422, "invalid_request")
    as_file = alice.post("/v1/subtractions", files={**pair, "mode": ("m.txt", b"preconvolve")})
    assert_error(as_file, 422, "invalid_request")
    assert "'mode' must be text" in as_file.json()["error"]["message"]
    stars = sim_pair["truth"]["stars"]
    brightest = np.argsort(stars["flux_science"])[::-1][:60]
    catalog = "x,y\n" + "".join(f"{stars['x'][i]:.2f},{stars['y'][i]:.2f}\n" for i in brightest)
    config = json.dumps({"dia": {"threshold": 7.0}}).encode()
    response = alice.post(
        "/v1/subtractions",
        files={**pair, "config": ("cfg.json", config)},
        data={"sources": catalog},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    record = alice.get(f"/v1/subtractions/{job_id}?include=config").json()
    assert record["config"]["dia"]["threshold"] == 7.0
    assert record["sources_id"] == hashlib.sha256(catalog.encode()).hexdigest()
    assert wait_job(alice, job_id)["state"] == "succeeded"


def test_core_error_fails_the_job_with_its_code(alice, alice_inputs, other_field_template):
    template_id = upload(alice, other_field_template)
    response = submit(alice, alice_inputs[0], template_id)
    assert response.status_code == 202
    record = wait_job(alice, response.json()["id"])
    assert record["state"] == "failed"
    # its stars do not match the science's where the WCSs say the two overlap
    assert record["error"]["code"] == "misregistration", record["error"]
    # a code of its own: the product will never come (a poller stops), the job's code named
    refused = alice.get(f"/v1/subtractions/{record['id']}/products/difference")
    assert_error(refused, 409, "job_failed")
    assert "(misregistration)" in refused.json()["error"]["message"]
    assert_error(alice.get(f"/v1/subtractions/{record['id']}/sources"), 409, "job_failed")


def test_what_reading_an_input_said_is_in_the_job_metrics(alice, alice_inputs, sim_pair, tmp_path):
    """A template whose WCS cannot be parsed is read without it, with a warning: the
    worker logged it and the job's metrics did not hold it (the CLI's metrics.json
    does)."""
    broken = tmp_path / "template-bad-wcs.fits"
    with fits.open(sim_pair["template"]) as hdul:
        hdul["IMAGE"].header["CTYPE1"] = "RA---FOO"
        hdul.writeto(broken)
    response = submit(alice, alice_inputs[0], upload(alice, broken))
    assert response.status_code == 202, response.text
    record = wait_job(alice, response.json()["id"])
    assert record["state"] == "succeeded", record
    said = [w for w in record["metrics"]["warnings"] if "WCS ignored" in w]
    assert len(said) == 1 and said[0].startswith("template exposure: WCS ignored"), said
    assert "Unrecognized projection code (FOO in CTYPE1)" in said[0]


def test_registered_job_records_its_figures_and_serves_the_warped_template(alice, tmp_path_factory):
    """A template on its own grid (10 deg, 2%, WCS 0.4 px off): registered by the worker."""
    from core.io import read_exposure
    from core.simulate import SimulationConfig, simulate_pair, write_pair

    config = SimulationConfig(
        size=256,
        seed=12,
        star_density=3000,
        n_transients=3,
        transient_flux_min=2e4,
        transient_flux_max=3e4,
        template_size=300,
        template_rotation=10.0,
        template_scale=1.02,
        template_shift=(3.3, -2.6),
        template_wcs_error=(0.4, 0.0),
    )
    pair = simulate_pair(config)
    paths = write_pair(pair, tmp_path_factory.mktemp("rotated"))
    response = submit(
        alice,
        upload(alice, paths["science"]),
        upload(alice, paths["template"]),
        config={"registration": {"write_warped_template": True}},
    )
    assert response.status_code == 202, response.text
    record = wait_job(alice, response.json()["id"])
    assert record["state"] == "succeeded", record
    figures = record["metrics"]["registration"]
    assert figures["method"] == "wcs+stars" and figures["star_correction"] == "applied"
    assert figures["n_matched"] >= 10 and figures["rms_px"] < 0.5
    assert figures["rotation_deg"] == pytest.approx(10.0, abs=0.05)
    assert figures["wcs_correction_px"][0] == pytest.approx(-0.4, abs=0.15)
    warped = alice.get(record["products"]["warped_template"])
    assert warped.status_code == 200
    warped_template = read_exposure(io.BytesIO(warped.content))
    assert warped_template.shape == (256, 256)
    assert warped_template.masked(["NO_DATA"]).mean() < 0.1  # corners the template misses
    difference = alice.get(record["products"]["difference"])
    noise, flux_ratios = difference_quality(difference.content, pair.truth)
    assert 0.9 < noise < 1.1, noise
    assert np.allclose(flux_ratios, 1.0, atol=0.10), flux_ratios


def test_invalid_requests_are_422(alice, alice_inputs):
    assert_error(submit(alice, *alice_inputs, mode="sideways"), 422, "invalid_request")
    assert_error(
        submit(alice, *alice_inputs, config={"kernel": {"spatial_kernel_order": 9}}),
        422,
        "invalid_request",
    )
    assert_error(
        alice.post("/v1/subtractions", json={"science": {"exposure_id": alice_inputs[0]}}),
        422,
        "invalid_request",
    )
    assert_error(
        submit(alice, *alice_inputs, sources={"inline": "a,b\n1,2\n"}), 422, "invalid_catalog"
    )
    assert_error(
        alice.post("/v1/subtractions", content=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )


def test_form_config_that_is_not_json_names_the_field(alice, sim_pair):
    response = alice.post(
        "/v1/subtractions",
        files={
            "science": ("science.fits", sim_pair["science"].read_bytes()),
            "template": ("template.fits", sim_pair["template"].read_bytes()),
        },
        data={"config": "do_decorrelation=true"},
    )
    message = assert_error(response, 422, "invalid_request")["message"]
    assert message.startswith("config: not valid JSON"), message


# idempotency, listing, cancel, isolation, limits ---------------------------------------------
def test_idempotency_key_gives_the_same_job(alice, bob, alice_inputs, sim_pair):
    key = "visit-1234-ccd-17"
    first = submit(alice, *alice_inputs, idempotency_key=key)
    second = submit(alice, *alice_inputs, idempotency_key=key)
    assert first.status_code == 202 and second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers.get("idempotent-replayed") == "true"
    header = alice.post(
        "/v1/subtractions",
        json={
            "science": {"exposure_id": alice_inputs[0]},
            "template": {"exposure_id": alice_inputs[1]},
        },
        headers={"Idempotency-Key": key},
    )
    assert header.json()["id"] == first.json()["id"]
    assert_error(
        submit(alice, *alice_inputs, idempotency_key=key, config={"do_decorrelation": False}),
        409,
        "idempotency_conflict",
    )
    bob_inputs = upload(bob, sim_pair["science"]), upload(bob, sim_pair["template"])
    other = submit(bob, *bob_inputs, idempotency_key=key)  # keys are per token
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert bob.delete(f"/v1/subtractions/{other.json()['id']}").status_code in (200, 204)
    assert wait_job(alice, first.json()["id"])["state"] == "succeeded"


def test_cursor_listing_newest_first(service, sim_pair):
    with client_for(service, "dave") as dave:
        inputs = upload(dave, sim_pair["science"]), upload(dave, sim_pair["template"])
        created = []
        for _ in range(5):
            job = submit(dave, *inputs).json()
            created.append(job["id"])
            dave.delete(f"/v1/subtractions/{job['id']}")  # cancel: listing needs no compute
        pages, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            body = dave.get("/v1/subtractions", params=params).json()
            pages.append([item["id"] for item in body["items"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for page in pages for i in page] == created[::-1]
        cancelled = dave.get("/v1/subtractions", params={"state": "cancelled"}).json()["items"]
        assert len(cancelled) == 5
        gone = dave.get(f"/v1/subtractions/{created[0]}/products/difference")
        # a cancelled job has no error to see (the message said to see it)
        assert assert_error(gone, 409, "job_cancelled")["message"].endswith("resubmit it")
        assert dave.get("/v1/subtractions", params={"state": "succeeded"}).json()["items"] == []
        since = dave.get(f"/v1/subtractions/{created[3]}").json()["created_at"]
        recent = dave.get("/v1/subtractions", params={"since": since}).json()["items"]
        assert [item["id"] for item in recent] == created[:2:-1]
        assert_error(
            dave.get("/v1/subtractions", params={"cursor": "garbage!"}), 422, "invalid_cursor"
        )


def test_cancel_running_job_and_delete_finished(service, alice, alice_inputs):
    job_id = submit(alice, *alice_inputs).json()["id"]
    wait_job(alice, job_id, until=("running",), timeout=60)
    cancelled = alice.delete(f"/v1/subtractions/{job_id}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    time.sleep(2.0)  # the worker notices at its next progress report and stops
    record = alice.get(f"/v1/subtractions/{job_id}").json()
    assert record["state"] == "cancelled" and record["products"] == {}
    assert not (service["data"] / "jobs" / job_id).exists()
    assert alice.delete(f"/v1/subtractions/{job_id}").status_code == 204
    assert_error(alice.get(f"/v1/subtractions/{job_id}"), 404, "not_found")

    done = wait_job(alice, submit(alice, *alice_inputs).json()["id"])
    assert done["state"] == "succeeded"
    assert (service["data"] / "jobs" / done["id"] / "difference.fits").is_file()
    assert alice.delete(f"/v1/subtractions/{done['id']}").status_code == 204
    assert not (service["data"] / "jobs" / done["id"]).exists()
    assert_error(alice.get(f"/v1/subtractions/{done['id']}"), 404, "not_found")


def test_an_exposure_is_deleted_by_its_owners_once_no_job_of_theirs_runs_on_it(
    service, alice, bob, alice_inputs, sim_pair, tmp_path
):
    """Review (operations): an exposure could never be deleted (no route). DELETE removes
    the caller's exposure (404 for anyone else), refuses with 409 while a queued or running
    job of the caller uses it, and removes the file only once no other tenant uploaded it."""
    with fits.open(sim_pair["science"]) as hdus:
        hdus[0].header["OBSERVER"] = "retention test"  # bytes of this test alone
        unique = tmp_path / "science.fits"
        hdus.writeto(unique)
    exposure_id = upload(alice, unique)
    stored = service["data"] / "exposures" / exposure_id[:2] / f"{exposure_id}.fits"
    assert stored.is_file()
    assert_error(bob.delete(f"/v1/exposures/{exposure_id}"), 404, "not_found")
    with client_for(service, None) as anonymous:
        assert anonymous.delete(f"/v1/exposures/{exposure_id}").status_code == 401

    job_id = submit(alice, exposure_id, alice_inputs[1]).json()["id"]
    wait_job(alice, job_id, until=("running",), timeout=60)
    assert_error(alice.delete(f"/v1/exposures/{exposure_id}"), 409, "exposure_in_use")
    assert upload(bob, unique) == exposure_id  # the same bytes, now bob's too
    assert wait_job(alice, job_id)["state"] == "succeeded"

    assert alice.delete(f"/v1/exposures/{exposure_id}").status_code == 204
    assert_error(alice.get(f"/v1/exposures/{exposure_id}"), 404, "not_found")
    assert stored.is_file() and bob.get(f"/v1/exposures/{exposure_id}").status_code == 200
    assert bob.delete(f"/v1/exposures/{exposure_id}").status_code == 204
    assert not stored.exists() and not stored.with_suffix(".json").exists()
    assert_error(bob.delete(f"/v1/exposures/{exposure_id}"), 404, "not_found")
    assert alice.get(f"/v1/subtractions/{job_id}").json()["state"] == "succeeded"


def test_tokens_see_only_their_own_jobs(alice, bob, alice_inputs):
    job_id = submit(alice, *alice_inputs).json()["id"]
    for response in (
        bob.get(f"/v1/subtractions/{job_id}"),
        bob.get(f"/v1/subtractions/{job_id}/products/difference"),
        bob.get(f"/v1/subtractions/{job_id}/metrics"),
        bob.delete(f"/v1/subtractions/{job_id}"),
    ):
        assert_error(response, 404, "not_found")
    assert job_id not in [j["id"] for j in bob.get("/v1/subtractions").json()["items"]]
    assert alice.get(f"/v1/subtractions/{job_id}").json()["state"] != "cancelled"
    alice.delete(f"/v1/subtractions/{job_id}")
    # a made-up id of any length is not quoted whole (a review's 5000 characters were)
    for route in ("/v1/subtractions/", "/v1/exposures/"):
        message = assert_error(bob.get(route + "x" * 5000), 404, "not_found")["message"]
        assert len(message) < 200, len(message)


def test_concurrent_jobs_per_token_are_limited(bob, sim_pair):
    inputs = upload(bob, sim_pair["science"]), upload(bob, sim_pair["template"])
    accepted = [submit(bob, *inputs) for _ in range(MAX_JOBS)]
    assert all(r.status_code == 202 for r in accepted)
    error = assert_error(submit(bob, *inputs), 429, "too_many_jobs")
    assert str(MAX_JOBS) in error["message"]
    for response in accepted:
        bob.delete(f"/v1/subtractions/{response.json()['id']}")
    assert submit(bob, *inputs).status_code == 202  # room again once cancelled


def test_request_rate_is_limited(service):
    with client_for(service, "carol") as carol:
        statuses = []
        for _ in range(2 * RATE_LIMIT + 2):  # a window boundary resets the count at most once
            response = carol.get("/v1/subtractions")
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[-1] == 429, statuses[-5:]
        assert_error(response, 429, "rate_limited")
        assert response.headers["retry-after"] == "60"
        assert statuses.count(200) >= RATE_LIMIT - 1


# webhook --------------------------------------------------------------------------------------
def test_callback_url_receives_the_final_record(alice, alice_inputs):
    received: list[dict] = []
    calls = {"n": 0}

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            calls["n"] += 1
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if calls["n"] == 1:  # fail once: the worker must retry
                self.send_response(503)
            else:
                received.append(json.loads(body))
                self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/done"
        job_id = submit(alice, *alice_inputs, callback_url=url).json()["id"]
        assert wait_job(alice, job_id)["state"] == "succeeded"
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received, "no webhook delivered"
        assert received[0]["id"] == job_id and received[0]["state"] == "succeeded"
        assert "difference" in received[0]["products"]
        assert calls["n"] == 2
        time.sleep(0.3)
        callback = alice.get(f"/v1/subtractions/{job_id}").json()["callback"]
        assert callback["delivered"] is True and callback["attempts"] == 2
    finally:
        server.shutdown()
    assert_error(submit(alice, *alice_inputs, callback_url="ftp://x/y"), 422, "invalid_request")


def test_a_head_routed_as_get_does_not_read_the_product_file(tmp_path):
    """HEAD is answered as a GET (app.head), whose body is dropped: a product file, up to
    hundreds of MB, is not read for it; a GET still streams it."""
    import asyncio

    from app.head import HEAD_AS_GET
    from app.routers.subtractions import _ProductFile

    path = tmp_path / "difference.fits"
    path.write_bytes(b"x" * 3_000_000)

    def sent(extra: dict) -> tuple[int, int]:
        scope = {"type": "http", "method": "GET", "headers": [], **extra}
        messages: list[dict] = []

        async def receive() -> dict:  # no disconnect: waits until the response is sent
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            messages.append(message)

        asyncio.run(_ProductFile(path)(scope, receive, send))
        start = next(m for m in messages if m["type"] == "http.response.start")
        length = int(dict(start["headers"])[b"content-length"])
        body = sum(len(m.get("body", b"")) for m in messages if m["type"] == "http.response.body")
        return length, body

    assert sent({HEAD_AS_GET: True}) == (3_000_000, 0)
    assert sent({}) == (3_000_000, 3_000_000)
