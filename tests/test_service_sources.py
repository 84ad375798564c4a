"""DIA sources, forced photometry and cutouts over HTTP: real API, real worker, real Redis.

The API runs alone (``alsub serve --workers 0``) with Redis records and broker on
the test database under a private prefix, and one ``alsub worker`` process runs
the job, as in tests/test_service_redis.py.
"""

from __future__ import annotations

import io
import json
import uuid

import httpx
import numpy as np
import pytest
import redis
from astropy.io import fits
from astropy.table import Table
from PIL import Image

from core.cutouts import TRIPLET_PANEL

from .service_fixtures import (
    REDIS_TEST_DB,
    free_port,
    service_env,
    start_server,
    start_worker,
    upload,
    wait_job,
    wait_ready,
)

TOKENS = {"alice": "sources-alice-token", "bob": "sources-bob-token"}


@pytest.fixture(scope="module")
def deployment(redis_server, sim_pair, tmp_path_factory):
    """A job subtracted by a real worker; yields (base url, job id, record, truth)."""
    host, port = redis_server
    prefix = f"alsubtest-{uuid.uuid4().hex[:10]}:"
    url = f"redis://{host}:{port}/{REDIS_TEST_DB}"
    data_dir = tmp_path_factory.mktemp("data")
    logs = tmp_path_factory.mktemp("logs")
    env = service_env(
        redis_url=url,
        redis_prefix=prefix,
        broker_key_prefix=f"{prefix}broker:",
        queue_name=f"alsub-{prefix.strip(':')}",
        tokens=",".join(TOKENS.values()),
        data_dir=data_dir,
    )
    server, base = start_server(free_port(), data_dir, env, logs, workers=0)
    worker = start_worker(env, logs / "worker.log")
    try:
        with httpx.Client(base_url=base, headers=_auth("alice"), timeout=60) as client:
            wait_ready(client)
            science = upload(client, sim_pair["science"])
            template = upload(client, sim_pair["template"])
            submitted = client.post(
                "/v1/subtractions",
                json={
                    "science": {"exposure_id": science},
                    "template": {"exposure_id": template},
                    # the cutouts' default size is the job's (test_cutout_triplets)
                    "config": {"dia": {"cutout_size": 31}},
                },
            )
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            record = wait_job(client, job_id, timeout=120)
            assert record["state"] == "succeeded", (record, worker.log_tail())
        yield base, job_id, record, sim_pair["truth"]
    finally:
        worker.stop()
        server.stop()
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


def _auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture(scope="module")
def alice(deployment):
    with httpx.Client(base_url=deployment[0], headers=_auth("alice"), timeout=60) as client:
        yield client


def _transients(truth):
    t = truth["transients"]
    return np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["flux_science"])


def test_catalog_is_a_product_with_its_count(deployment, alice):
    _, job_id, record, truth = deployment
    assert "dia_sources" in record["products"]
    sources = alice.get(f"/v1/subtractions/{job_id}/sources")
    assert sources.status_code == 200, sources.text
    rows = sources.json()
    assert record["metrics"]["n_dia_sources"] == len(rows) >= 3
    # the three injected transients, at their positions with their fluxes
    x, y, flux = _transients(truth)
    for xs, ys, fs in zip(x, y, flux, strict=True):
        d = [np.hypot(r["x"] - xs, r["y"] - ys) for r in rows]
        best = rows[int(np.argmin(d))]
        assert min(d) < 0.5
        assert not best["is_negative"] and not best["is_dipole"]
        assert abs(best["psf_flux"] / fs - 1) < 0.1
    # the FITS product download is the same catalog
    product = alice.get(record["products"]["dia_sources"])
    assert product.status_code == 200
    table = Table.read(io.BytesIO(product.content), hdu="DIASOURCES")
    assert len(table) == len(rows)


def test_filters_and_formats(deployment, alice):
    _, job_id, _, _ = deployment
    rows = alice.get(f"/v1/subtractions/{job_id}/sources").json()
    strong = alice.get(f"/v1/subtractions/{job_id}/sources", params={"min_snr": 20}).json()
    assert len(strong) == sum(abs(r["snr"] or 0) >= 20 for r in rows)
    assert all(abs(r["snr"]) >= 20 for r in strong)
    negative = alice.get(f"/v1/subtractions/{job_id}/sources", params={"sign": "negative"}).json()
    assert all(r["is_negative"] for r in negative)
    clean = alice.get(f"/v1/subtractions/{job_id}/sources", params={"exclude_flags": 1}).json()
    assert all(r["flags"] & 1 == 0 for r in clean)
    # bits beyond the flags' (the column is int32) filter as the defined ones do
    wide = alice.get(f"/v1/subtractions/{job_id}/sources", params={"exclude_flags": (1 << 40) | 1})
    assert wide.status_code == 200, wide.text
    assert wide.json() == clean
    unused = alice.get(f"/v1/subtractions/{job_id}/sources", params={"exclude_flags": 1 << 31})
    assert unused.status_code == 200 and unused.json() == rows
    csv = alice.get(f"/v1/subtractions/{job_id}/sources", params={"format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    table = Table.read(csv.text, format="ascii.csv")
    np.testing.assert_allclose(table["x"], [r["x"] for r in rows])
    fits_answer = alice.get(f"/v1/subtractions/{job_id}/sources", params={"format": "fits"})
    assert len(Table.read(io.BytesIO(fits_answer.content), hdu="DIASOURCES")) == len(rows)


def test_forced_photometry_in_order(deployment, alice):
    _, job_id, _, truth = deployment
    x, y, flux = _transients(truth)
    order = [2, 0, 1]
    positions = [{"x": float(x[k]), "y": float(y[k])} for k in order]
    positions.append({"x": 60.0, "y": 200.0})  # empty sky: consistent with zero
    answer = alice.post(f"/v1/subtractions/{job_id}/forced", json=positions)
    assert answer.status_code == 200, answer.text
    rows = answer.json()
    assert [r["x"] for r in rows] == [p["x"] for p in positions]
    for row, k in zip(rows, order, strict=False):
        assert abs(row["psf_flux"] / flux[k] - 1) < 0.1
        assert row["psf_flux_err"] > 0 and row["snr"] > 20
    assert abs(rows[-1]["snr"]) < 5
    # by sky position: the same fluxes
    sky = [{"ra": r["ra"], "dec": r["dec"]} for r in rows]
    again = alice.post(f"/v1/subtractions/{job_id}/forced", json=sky).json()
    np.testing.assert_allclose([r["psf_flux"] for r in again], [r["psf_flux"] for r in rows])
    # bad input: 422 with the error body
    mixed = alice.post(f"/v1/subtractions/{job_id}/forced", json=[{"x": 1, "y": 2}, {"ra": 1}])
    assert mixed.status_code == 422
    assert mixed.json()["error"]["code"] == "invalid_positions"
    empty = alice.post(f"/v1/subtractions/{job_id}/forced", json=[])
    assert empty.status_code == 422 and "error" in empty.json()
    # far off the frame (a 500 before) and beyond the sky's projection: rows of their own
    far = alice.post(
        f"/v1/subtractions/{job_id}/forced",
        json=[{"x": 1e19, "y": 20.0}, {"x": float(x[0]), "y": float(y[0])}],
    )
    assert far.status_code == 200, far.text
    assert far.json()[0]["psf_flux"] is None and far.json()[0]["flags"] & 16
    assert far.json()[1]["psf_flux"] == pytest.approx(rows[1]["psf_flux"])
    unreachable = [{"ra": sky[0]["ra"] + 180.0, "dec": -sky[0]["dec"]}, sky[0]]
    both = alice.post(f"/v1/subtractions/{job_id}/forced", json=unreachable)
    assert both.status_code == 200, both.text
    assert both.json()[0]["psf_flux"] is None
    assert both.json()[1]["psf_flux"] == pytest.approx(rows[0]["psf_flux"])
    pole = alice.post(f"/v1/subtractions/{job_id}/forced", json=[{"ra": 1.0, "dec": 95.0}])
    assert pole.status_code == 422 and "dec must be within" in pole.json()["error"]["message"]
    text = alice.post(
        f"/v1/subtractions/{job_id}/forced",
        content=b'[{"x": 1, "y": 2}]',
        headers={"Content-Type": "text/plain"},
    )
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"


def test_forced_positions_may_carry_ids(deployment, alice):
    # a broker joins the light curve to its objects by its own ids
    _, job_id, _, _ = deployment
    url = f"/v1/subtractions/{job_id}/forced"
    named = [{"x": 40.5, "y": 30.0, "id": "ZTF21abc"}, {"x": 200.0, "y": 100.5, "id": 7}]
    rows = alice.post(url, json=named).json()
    assert [r["id"] for r in rows] == ["ZTF21abc", "7"]
    numbered = alice.post(url, json=[{"x": 40.5, "y": 30.0, "id": 3}]).json()
    assert numbered[0]["id"] == 3 and numbered[0]["x"] == 40.5
    text = alice.post(f"{url}?format=csv", json=named).text
    assert text.splitlines()[0].startswith("id,") and "ZTF21abc" in text
    # without ids the rows have none; with some only, the request is refused
    assert "id" not in alice.post(url, json=[{"x": 40.5, "y": 30.0}]).json()[0]
    partial = alice.post(url, json=[named[0], {"x": 1.0, "y": 2.0}])
    assert partial.status_code == 422
    assert "position 1 has no id" in partial.json()["error"]["message"]


def test_a_bad_forced_position_is_named_by_its_index(deployment, alice):
    # the message said "0.x: ..." and left the caller guessing which list item was meant
    _, job_id, _, _ = deployment
    answer = alice.post(
        f"/v1/subtractions/{job_id}/forced", json=[{"x": 1.0, "y": 2.0}, {"x": "left", "y": 3}]
    )
    assert answer.status_code == 422, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("body[1].x: "), message


def test_forced_positions_refuse_what_they_cannot_hold(deployment, alice):
    """A review's 500s and silent choices: ids a FITS table cannot hold (beyond 64 bits,
    non-ASCII text) answered 500 for format=fits; x/y and ra/dec together measured at x/y
    and dropped ra/dec; a coordinate `true` was read as 1.0. Each is a 422 naming it."""
    _, job_id, _, _ = deployment
    url = f"/v1/subtractions/{job_id}/forced?format=fits"
    for bad_id in (2**70, -(2**63) - 1, "é-ü"):
        answer = alice.post(url, json=[{"x": 100.0, "y": 100.0, "id": bad_id}])
        assert answer.status_code == 422, (bad_id, answer.status_code, answer.text)
        assert answer.json()["error"]["message"].startswith("body[0].id"), answer.text
    fine = alice.post(url, json=[{"x": 100.0, "y": 100.0, "id": 2**63 - 1}])
    assert fine.status_code == 200 and fine.content.startswith(b"SIMPLE")
    # a light curve's table, named as one (it was DIASOURCES, the catalog's name)
    assert list(Table.read(io.BytesIO(fine.content), hdu="FORCED")["id"]) == [2**63 - 1]
    both = alice.post(url, json=[{"x": 1.0, "y": 2.0}, {"x": 1.0, "y": 2.0, "ra": 150, "dec": 2}])
    assert both.status_code == 422
    assert "position 1 gives both x/y and ra/dec" in both.json()["error"]["message"]
    boolean = alice.post(url, json=[{"x": True, "y": 2.0}])
    assert boolean.status_code == 422
    assert "not a boolean" in boolean.json()["error"]["message"]


def test_a_forced_body_of_the_wrong_kind_is_named_body(deployment, alice):
    # "Input should be a valid list" and "Field required" said nothing of where
    _, job_id, _, _ = deployment
    url = f"/v1/subtractions/{job_id}/forced"
    for body in (b"{}", b""):
        answer = alice.post(url, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["message"].startswith("body: "), answer.text


def test_forced_body_that_is_not_json_says_so(deployment, alice):
    _, job_id, _, _ = deployment
    answer = alice.post(
        f"/v1/subtractions/{job_id}/forced",
        content=b'[{"x": 311.4, "y": 87.0},]',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith("body: Invalid JSON") and "at character 25" in message, message


def test_cutout_triplets(deployment, alice):
    _, job_id, _, _ = deployment
    rows = alice.get(f"/v1/subtractions/{job_id}/sources").json()
    source = rows[0]
    # without a size, the job's dia.cutout_size (31; it was the class default, 63)
    default = alice.get(f"/v1/subtractions/{job_id}/sources/{source['id']}/cutouts")
    assert default.status_code == 200, default.text
    with fits.open(io.BytesIO(default.content)) as hdul:
        assert all(h.data.shape == (31, 31) for h in hdul[1:])
    answer = alice.get(
        f"/v1/subtractions/{job_id}/sources/{source['id']}/cutouts", params={"size": 63}
    )
    assert answer.status_code == 200, answer.text
    with fits.open(io.BytesIO(answer.content)) as hdul:
        assert [h.name for h in hdul[1:]] == ["SCIENCE", "TEMPLATE", "DIFFERENCE", "MASK"]
        assert all(h.data.shape == (63, 63) for h in hdul[1:])
        # the source's sky position with its id (the primary said id, x and y only)
        assert (hdul[0].header["DIASRCID"], hdul[0].header["RA"]) == (source["id"], source["ra"])
        difference = hdul["DIFFERENCE"].data
        # the source sits on the centre pixel of the difference stamp
        assert difference[31, 31] > 0.6 * np.nanmax(difference)
        assert hdul["SCIENCE"].header["CTYPE1"].startswith("RA")
    png = alice.get(
        f"/v1/subtractions/{job_id}/sources/{source['id']}/cutouts",
        params={"format": "png", "size": 31},
    )
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        side = 31 * -(-TRIPLET_PANEL // 31)  # enlarged by a whole factor, labelled above
        assert image.size == (3 * side + 4, side + 14)
    missing = alice.get(f"/v1/subtractions/{job_id}/sources/99999/cutouts")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    huge = alice.get(f"/v1/subtractions/{job_id}/sources/0/cutouts", params={"size": 100000})
    assert huge.status_code == 422
    # the limit said is the largest size that works (it said 1024, which is even)
    limit = int(huge.json()["error"]["message"].rsplit("at most ", 1)[1].split(",")[0])
    assert limit % 2 == 1
    largest = alice.get(f"/v1/subtractions/{job_id}/sources/0/cutouts", params={"size": limit})
    assert largest.status_code == 200, largest.text
    # an even size is the request's fault, said as such (it was "invalid_config")
    even = alice.get(f"/v1/subtractions/{job_id}/sources/0/cutouts", params={"size": 64})
    assert even.status_code == 422 and even.json()["error"]["code"] == "invalid_request"
    assert "odd" in even.json()["error"]["message"]


def test_tenant_isolation_and_auth(deployment):
    base, job_id, _, _ = deployment
    paths = [
        ("get", f"/v1/subtractions/{job_id}/sources", None),
        ("post", f"/v1/subtractions/{job_id}/forced", [{"x": 1.0, "y": 1.0}]),
        ("get", f"/v1/subtractions/{job_id}/sources/0/cutouts", None),
    ]
    with httpx.Client(base_url=base, headers=_auth("bob"), timeout=60) as bob:
        for method, path, body in paths:
            answer = bob.request(method, path, json=body)
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
    with httpx.Client(base_url=base, timeout=60) as anonymous:
        for method, path, body in paths:
            assert anonymous.request(method, path, json=body).status_code == 401


def test_openapi_documents_the_routes(deployment):
    schema = httpx.get(f"{deployment[0]}/openapi.json").json()
    for path in (
        "/v1/subtractions/{job_id}/sources",
        "/v1/subtractions/{job_id}/forced",
        "/v1/subtractions/{job_id}/sources/{source_id}/cutouts",
    ):
        assert path in schema["paths"], path
        operation = next(iter(schema["paths"][path].values()))
        assert len(operation["description"]) > 100
    forced = schema["paths"]["/v1/subtractions/{job_id}/forced"]["post"]
    assert "example" in forced["responses"]["200"]["content"]["application/json"]
    # the PNG's orientation is said: pixel order, row 0 at the bottom, not north up
    cutout = schema["paths"]["/v1/subtractions/{job_id}/sources/{source_id}/cutouts"]["get"]
    assert "row 0 (y = 0) at the bottom" in cutout["description"]
    assert "not turned north up" in cutout["description"]


def test_forced_flags_match_the_catalog(deployment, alice, tmp_path):
    """Forced photometry raises bright_star and suspect_kernel from the job's matched
    template and kernel sources (it never raised either): at the catalog's positions
    the catalog's bits; at the brightest stars and the corners those the job's products
    give."""
    from core.config import DiaSourceConfig
    from core.io import read_exposure
    from core.position_flags import bright_star_light, bright_star_limit, outside_kernel_hull
    from core.products import read_kernel_sources

    _, job_id, _, truth = deployment
    catalog = alice.get(f"/v1/subtractions/{job_id}/sources").json()
    single = [row for row in catalog if not row["is_dipole"]]
    context = 32 | 64  # bright_star, suspect_kernel
    positions = [{"x": row["x"], "y": row["y"]} for row in single]
    forced = alice.post(f"/v1/subtractions/{job_id}/forced", json=positions).json()
    assert [row["flags"] & context for row in forced] == [row["flags"] & context for row in single]

    stars = truth["stars"]
    brightest = np.argsort(np.asarray(stars["flux_template"]))[-5:]
    x = np.r_[np.asarray(stars["x"])[brightest], 2.0, 253.0, 2.0, 253.0]
    y = np.r_[np.asarray(stars["y"])[brightest], 2.0, 2.0, 253.0, 253.0]
    positions = [{"x": float(a), "y": float(b)} for a, b in zip(x, y, strict=True)]
    forced = alice.post(f"/v1/subtractions/{job_id}/forced", json=positions).json()
    got = np.array([row["flags"] & context for row in forced])
    for name in ("matched_template", "kernel"):
        content = alice.get(f"/v1/subtractions/{job_id}/products/{name}").content
        (tmp_path / f"{name}.fits").write_bytes(content)
    fits_catalog = alice.get(f"/v1/subtractions/{job_id}/sources", params={"format": "fits"})
    fwhm = fits.getheader(io.BytesIO(fits_catalog.content), "DIASOURCES")["PSFFWHM"]
    template = read_exposure(tmp_path / "matched_template.fits")
    sources = read_kernel_sources(tmp_path / "kernel.fits")
    assert sources is not None and len(sources) >= 3
    dia = DiaSourceConfig()
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    radius = dia.bright_star_radius_fwhm * fwhm
    errors = [np.nan if row["psf_flux_err"] is None else row["psf_flux_err"] for row in forced]
    limits = bright_star_limit(errors, dia.threshold, dia.bright_star_residual)
    bright = bright_star_light(template, ix, iy, radius, limits, float(np.median(limits)))[0]
    outside = outside_kernel_hull(sources, template.xy0, x, y, dia.suspect_kernel_margin)
    np.testing.assert_array_equal(got, np.where(bright, 32, 0) | np.where(outside, 64, 0))
    assert got.any()  # some of these positions raise a flag that needs the products


def test_a_forced_list_too_long_is_refused_before_its_items_are_read(deployment, alice):
    """A million positions were validated one by one (7 s of the API's CPU, its health
    check stalled) before the 10000 limit refused them: the count is checked first, with
    the same answer (an invalid item past the limit was named instead of the limit)."""
    import time

    _, job_id, _, _ = deployment
    url = f"/v1/subtractions/{job_id}/forced"
    over = [{"x": 1.0, "y": 2.0}] * 10_000 + [{"x": "left", "y": 2.0}]
    answer = alice.post(url, json=over)
    assert answer.status_code == 422
    assert answer.json()["error"] == {
        "code": "invalid_positions",  # one code for bad positions (test_forced_position_codes)
        "message": "at most 10000 positions per request",
    }  # was "body[10000].x: Input should be a valid number, ..."
    content = b"[" + b",".join([b'{"x": 1.0, "y": 2.0}'] * 1_000_000) + b"]"
    start = time.perf_counter()
    answer = alice.post(url, content=content, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    assert answer.status_code == 422 and "at most 10000" in answer.json()["error"]["message"]
    assert elapsed < 3.0, elapsed  # parsing alone; with every item validated, 7 s
    assert len(alice.post(url, json=[{"x": 1.0, "y": 2.0}] * 10_000).json()) == 10_000


def test_forced_position_codes_are_one_and_ra_is_range_checked(deployment, alice):
    """The same mistake answered three codes: NaN or dec 91 invalid_catalog, mixed kinds
    invalid_positions, none or too many invalid_request; and an ra of 510 was wrapped to
    150 without a word. All are 422 invalid_positions naming what is wrong."""
    _, job_id, _, _ = deployment
    url = f"/v1/subtractions/{job_id}/forced"
    fine = {"ra": 150.0, "dec": 2.0}
    bodies = {
        "ra must be within 0..360 degrees": [fine, {"ra": 510.0, "dec": 2.0}],  # was 200
        "ra must be within": [{"ra": -10.0, "dec": 2.0}],
        "dec must be within": [fine, {"ra": 150.0, "dec": 91.0}],  # was invalid_catalog
        "must be finite": [{"x": 1.0, "y": 2.0}, {"x": 1.0, "y": float("nan")}],
        "every position needs": [{"x": 1.0, "y": 2.0}, {"ra": 1.0, "dec": 2.0}],
        "at least one position": [],  # was invalid_request
    }
    headers = {"Content-Type": "application/json"}
    for said, body in bodies.items():
        # as Python's json writes NaN (httpx's json= refuses it)
        answer = alice.post(url, content=json.dumps(body).encode(), headers=headers)
        assert answer.status_code == 422, (said, answer.text)
        assert answer.json()["error"]["code"] == "invalid_positions", (said, answer.text)
        assert said in answer.json()["error"]["message"], (said, answer.text)
    named = alice.post(url, json=[fine, {"ra": 510.0, "dec": 2.0}]).json()["error"]["message"]
    assert "position 1" in named and "510" in named
