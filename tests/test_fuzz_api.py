"""Property-based fuzzing of the upload and submit routes (hypothesis, bounded budget).

An API (no worker: submitted jobs simply stay queued) with two tokens answers
generated FITS-like uploads and JSON submissions. Properties: never a 5xx,
every answer within a few seconds, and the server's resident memory does not
grow with the number of requests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .service_fixtures import free_port, service_env, start_server, upload
from .test_fits_structure import naxis_bomb

TOKEN = "fuzz-token"
PER_REQUEST_SECONDS = 5.0
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same requests on every run: CI failures reproduce locally
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def api(tmp_path_factory, sim_pair):
    root = tmp_path_factory.mktemp("fuzzroot")
    (root / "ok.fits").write_bytes(sim_pair["template"].read_bytes())
    env = service_env(
        tokens=TOKEN,
        max_upload_bytes=2_000_000,
        max_pixels=70_000,
        rate_limit_per_minute=0,
        read_rate_limit_per_minute=0,
        max_concurrent_jobs=10_000,
        allowed_roots=str(root),
    )
    data_dir = tmp_path_factory.mktemp("fuzzdata")
    process, base = start_server(free_port(), data_dir, env, data_dir, workers=0)
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    try:
        ids = upload(client, sim_pair["science"]), upload(client, sim_pair["template"])
        yield {"client": client, "pid": process.pid, "ids": ids, "root": root}
    finally:
        client.close()
        process.stop()


def check(response: httpx.Response, started: float) -> None:
    assert response.status_code < 500, response.text
    assert time.perf_counter() - started < PER_REQUEST_SECONDS
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


# uploads --------------------------------------------------------------------------------------
_KEYS = [
    "SIMPLE",
    "BITPIX",
    "NAXIS",
    "NAXIS1",
    "NAXIS2",
    "NAXIS3",
    "EXTEND",
    "XTENSION",
    "PCOUNT",
    "GCOUNT",
    "EXTNAME",
    "TFIELDS",
    "ZIMAGE",
    "ZNAXIS",
    "BZERO",
    "BSCALE",
]
_VALUES = st.one_of(
    st.integers(-(2**63), 2**63),
    st.sampled_from(["T", "F", "'IMAGE   '", "'BINTABLE'", "-32", "16", "0", "999", "1000"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)


@st.composite
def fits_like(draw) -> bytes:
    cards = [f"SIMPLE  = {'T':>20}"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 12))):
        cards.append(f"{draw(st.sampled_from(_KEYS)):<8}= {str(draw(_VALUES)):>20}"[:80])
    if draw(st.booleans()):
        cards.append("END")
    header = b"".join(c.ljust(80).encode("ascii", "replace") for c in cards)
    header = header.ljust(-(-max(len(header), 1) // 2880) * 2880, b" ")
    data = bytes(draw(st.integers(0, 3)) * 2880 + draw(st.integers(0, 2879)))
    repeat = draw(st.integers(1, 3))  # extensions: the same header again
    return (header + data) * repeat


@FUZZ
@given(body=st.one_of(fits_like(), st.binary(max_size=4000)))
@example(body=naxis_bomb())  # issue 12's reproducer is always among the cases
def test_fuzzed_uploads_never_5xx(api, body):
    started = time.perf_counter()
    response = api["client"].post(
        "/v1/exposures", content=body, headers={"Content-Type": "application/fits"}
    )
    check(response, started)


# submissions ----------------------------------------------------------------------------------
_NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0, -1, 1, 3, 21, 1e308, -1e308, 10_000_000]),
)
_CONFIG_FIELDS = [
    ("kernel", "kernel_size"),
    ("kernel", "kernel_size_fwhm_scaling"),
    ("kernel", "alard_n_gauss"),
    ("kernel", "size_cell_x"),
    ("kernel", "spatial_kernel_order"),
    ("sources", "n_sky_sources"),
    ("sources", "sky_source_radius"),
    ("sources", "min_snr"),
    ("sources", "max_kernel_sources"),
    ("decorrelation", "grid_step"),
    ("scale_variance", "limit"),
    ("metrics", "footprint_radius_fwhm"),
]
_TEXT = st.text(max_size=60)


@st.composite
def submissions(draw, ids, root) -> object:
    science = draw(
        st.sampled_from(
            [
                {"exposure_id": ids[0]},
                {"exposure_id": draw(_TEXT)},
                {
                    "uri": draw(
                        st.sampled_from(
                            [f"file://{root}/ok.fits", f"file://{root}/../x", "file:///etc/passwd"]
                        )
                    )
                },
                {"uri": "file://" + draw(_TEXT)},
                {},
            ]
        )
    )
    config: dict = {}
    for section, name in draw(st.lists(st.sampled_from(_CONFIG_FIELDS), max_size=4)):
        config.setdefault(section, {})[name] = draw(_NUMBERS)
    body: dict = {"science": science, "template": {"exposure_id": ids[1]}, "config": config}
    if draw(st.booleans()):
        body["callback_url"] = draw(
            st.one_of(
                _TEXT,
                st.sampled_from(["http://[::1", "http://127.1/", "http://x:99999/", "https://"]),
            )
        )
    if draw(st.booleans()):
        body["sources"] = {
            "inline": draw(st.sampled_from(["x,y\n", "x,y\n1,2\n", "", "{}", "[]"]) | _TEXT)
        }
    if draw(st.booleans()):
        body["mode"] = draw(st.sampled_from(["auto", "preconvolve", "nope", 3]))
    if draw(st.booleans()):
        body["idempotency_key"] = draw(st.text(max_size=250))
    return draw(st.sampled_from([body, science, [body], None, "text"]))


def test_fuzzed_submissions_never_5xx_nor_grow_memory(api):
    client, ids, root = api["client"], api["ids"], api["root"]

    @FUZZ
    @given(body=submissions(ids, root))
    def submit(body):
        started = time.perf_counter()
        response = client.post(
            "/v1/subtractions",
            content=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        check(response, started)

    submit()  # warm-up: imports, caches and the allocator reach their working size
    before = rss_bytes(api["pid"])
    submit()
    submit()
    growth = rss_bytes(api["pid"]) - before
    assert growth < 30 * 2**20, f"the API grew by {growth / 2**20:.1f} MB in 240 requests"
