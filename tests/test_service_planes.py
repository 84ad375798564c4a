"""Per-input planes, the job record's shape and local API docs, through the real service.

One ``alsub serve`` (embedded Celery worker, SQLite records) runs the JWST pair
with its noise maps and WebbPSF models given as planes: uploaded with the image,
as one-shot form fields, and as file:// URIs.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .service_fixtures import free_port, service_env, start_server, wait_job, wait_ready

JWST = Path(__file__).parent / "data" / "real" / "jwst_nircam_a2744"
NAMES = {
    "science": "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp",
    "template": "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp",
}
TOKEN = "planes-token-1"


def _file(role: str, kind: str = "") -> Path:
    suffix = {"": ".fits.gz", "noise": ".noise.fits.gz", "psf": ".WebbPSF.fits.gz"}[kind]
    return JWST / f"{NAMES[role]}{suffix}"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    env = service_env(tokens=TOKEN, allowed_roots=str(JWST.resolve()), heartbeat_interval=1)
    data_dir = tmp_path_factory.mktemp("data")
    process, base = start_server(free_port(), data_dir, env, tmp_path_factory.mktemp("logs"))
    try:
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        ) as http:
            wait_ready(http)
            yield {"client": http, "env": {**env, "ALSUB_DATA_DIR": str(data_dir)}}
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(service):
    return service["client"]


def test_worker_health_check_pings_the_local_worker(service, tmp_path):
    # the container health check of a worker (python -m worker.health), on the live worker
    ok = subprocess.run(
        [sys.executable, "-m", "worker.health", "5"],
        env=service["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"@{socket.gethostname()}" in ok.stdout
    # a data directory no worker serves: nobody answers, unhealthy
    empty = {**service["env"], "ALSUB_DATA_DIR": str(tmp_path)}
    none = subprocess.run(
        [sys.executable, "-m", "worker.health", "1"],
        env=empty,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert none.returncode == 1 and "no worker" in none.stderr


def _upload(client, role: str, noise: str | None = "noise", psf: bool = True) -> str:
    files = {"file": (f"{role}.fits.gz", _file(role).read_bytes())}
    if noise:
        files["noise"] = (
            "noise.fits.gz",
            _file(noise if noise != "noise" else role, "noise").read_bytes(),
        )
    if psf:
        files["psf"] = ("psf.fits.gz", _file(role, "psf").read_bytes())
    response = client.post("/v1/exposures", files=files)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def plane_ids(client) -> dict[str, str]:
    return {role: _upload(client, role) for role in ("science", "template")}


def test_planes_are_part_of_an_exposures_identity(client, plane_ids):
    again = _upload(client, "science")
    bare = _upload(client, "science", noise=None, psf=False)
    other_noise = _upload(client, "science", noise="template")  # same image, other noise map
    assert again == plane_ids["science"]
    assert len({plane_ids["science"], bare, other_noise}) == 3
    description = client.get(f"/v1/exposures/{plane_ids['science']}").json()["description"]
    assert description["shape"] == [900, 900]
    assert "PSF" in description["planes"] and "VARIANCE" in description["planes"]


def test_a_bad_plane_is_a_422_naming_it(client):
    files = {
        "file": ("science.fits.gz", _file("science").read_bytes()),
        "noise": ("noise.fits", b"SIMPLE  = not really a FITS file"),
    }
    response = client.post("/v1/exposures", files=files)
    assert response.status_code == 422, response.text
    assert "noise" in response.json()["error"]["message"]


def _assert_jwst_job(client, job_id: str) -> dict:
    record = wait_job(client, job_id, timeout=300)
    assert record["state"] == "succeeded", record
    assert 0.9 <= record["metrics"]["noise_ratio"] <= 1.15
    return record


def test_jwst_with_uploaded_planes_meets_the_noise_figure(client, plane_ids):
    response = client.post(
        "/v1/subtractions",
        json={
            "science": {"exposure_id": plane_ids["science"]},
            "template": {"exposure_id": plane_ids["template"]},
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["config"] is None  # the config only on request
    record = _assert_jwst_job(client, response.json()["id"])
    # the record names the direction the run chose, not "auto", and no config by default
    assert record["requested_mode"] == "auto"
    assert record["mode"] == record["metrics"]["mode"]
    assert record["mode"] in ("convolveTemplate", "convolveScience")
    assert record["config"] is None
    full = client.get(f"/v1/subtractions/{record['id']}", params={"include": "config"}).json()
    assert full["config"]["mode"] == "auto"
    assert (
        full["config"]["kernel"]["kernel_size_max"] >= full["config"]["kernel"]["kernel_size_min"]
    )
    assert len(json.dumps(record)) < len(json.dumps(full))
    listed = client.get("/v1/subtractions", params={"include": "config"}).json()["items"]
    assert all(item["config"] is not None for item in listed)
    assert (
        client.get(f"/v1/subtractions/{record['id']}", params={"include": "x"}).status_code == 422
    )


def test_jwst_planes_as_one_shot_form_fields(client, plane_ids):
    files = {}
    for role in ("science", "template"):
        files[role] = (f"{role}.fits.gz", _file(role).read_bytes())
        files[f"{role}_noise"] = ("n.fits.gz", _file(role, "noise").read_bytes())
        files[f"{role}_psf"] = ("p.fits.gz", _file(role, "psf").read_bytes())
    response = client.post("/v1/subtractions", files=files, data={"mode": "convolveTemplate"})
    assert response.status_code == 202, response.text
    # the form stores the same exposures as the upload with planes
    assert response.json()["science"]["exposure_id"] == plane_ids["science"]
    assert response.json()["template"]["exposure_id"] == plane_ids["template"]
    _assert_jwst_job(client, response.json()["id"])


def test_jwst_planes_as_uris(client, plane_ids):
    def ref(role):
        return {
            "uri": _file(role).resolve().as_uri(),
            "planes": {
                "noise": _file(role, "noise").resolve().as_uri(),
                "psf": _file(role, "psf").resolve().as_uri(),
            },
        }

    response = client.post(
        "/v1/subtractions",
        json={"science": ref("science"), "template": ref("template"), "mode": "convolveTemplate"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["science"]["exposure_id"] == plane_ids["science"]
    record = _assert_jwst_job(client, response.json()["id"])
    assert record["mode"] == "convolveTemplate"


def test_same_exposure_as_science_and_template_is_422(client, plane_ids):
    same = {"exposure_id": plane_ids["science"]}
    response = client.post("/v1/subtractions", json={"science": same, "template": same})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "identical_inputs" and "same exposure" in error["message"]


def test_docs_load_only_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert len(urls) >= 3
    assert not [u for u in urls if "//" in u], urls  # no scheme, no host: nothing remote
    for url in urls:
        assert client.get(url).status_code == 200, url
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "//" not in "".join(
        re.findall(r"""src=['"]([^'"]+)['"]""", redoc.text)
    )
