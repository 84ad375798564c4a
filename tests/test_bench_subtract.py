"""The subtraction bench end to end on a small pair: the round's pair simulated once in a
process of its own, each case started from its files in a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.subtract import run


def test_bench_cases_start_from_the_round_files_and_measure_quality(capsys):
    # this checkout as its own baseline: each checkout's cases start from its own files
    here = str(Path(__file__).resolve().parents[1])
    rows = run([1024], ["auto", "plain"], 1, 1000, False, None, baseline=here, dia_off=False)
    cases = {(row["mode"], row.get("code")): row for row in rows}
    assert set(cases) == {
        (mode, code) for mode in ("auto", "plain") for code in (here, "this checkout")
    } | {("fft floor", None)}
    for (mode, _), row in cases.items():
        if mode == "fft floor":
            continue
        assert row["chosen_mode"] == "convolveTemplate"
        assert row["wall_s"] > 0 and row["peak_rss_gb"] > 0 and row["fft_passes"] > 0
        # started as the CLI starts: no simulation in the process of the run
        assert row["simulated_in_process"] is False
        # the difference is at the noise floor and the transients' fluxes come back
        assert row["quality"]["noise_ratio"] == pytest.approx(1.0, abs=0.1)
        assert row["quality"]["transient_flux_ratio"] == pytest.approx(1.0, abs=0.1)
        # the plain FITS are read inside the timed part, the pickled exposures before it
        assert ("read" in row["stages"]) == (mode == "plain")
    # both checkouts ran the same pair: the same figures
    for mode in ("auto", "plain"):
        assert cases[(mode, here)]["quality"] == cases[(mode, "this checkout")]["quality"]
    assert "1024 auto" in capsys.readouterr().out


def test_the_bench_injects_the_transients_asked_for():
    # a sparser field than the preset's ~20 per 512 x 512: the DIA cost at another density
    (auto, off, _) = run([1024], ["auto"], 1, 1000, False, None, transients=6)
    assert auto["mode"] == "auto"
    assert 0 < auto["quality"]["n_transients"] <= 6
    # the catalog holds the injected transients, not the preset's ~80
    assert 4 <= auto["n_dia"] < 30
    # the same run without the catalog, on the same pair: what the catalog adds
    assert off["mode"] == "auto" and off["dia"] is False and "n_dia" not in off
    assert off["quality"] == auto["quality"]
    assert auto["dia_off_wall_s"] == off["wall_s"]
    assert auto["dia_added"] == pytest.approx(auto["wall_s"] / off["wall_s"] - 1.0)


def _ends_without_a_row(queue) -> None:  # module level: the spawned process imports it
    raise SystemExit(3)


def test_a_case_that_ends_without_a_row_stops_the_bench_instead_of_hanging():
    from bench.subtract import _in_process

    with pytest.raises(RuntimeError, match=r"_ends_without_a_row\(\) ended \(exit 3\)"):
        _in_process(_ends_without_a_row)
