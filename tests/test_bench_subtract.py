"""The subtraction bench end to end on a small pair: the round's pair simulated once in a
process of its own, each case started from its files in a fresh process."""

from __future__ import annotations

import pytest

from bench.subtract import run


def test_bench_cases_start_from_the_round_files_and_measure_quality(capsys):
    rows = run([1024], ["auto", "plain"], repeat=1, seed=1000, spatial=False, hotpants=None)
    by_mode = {row["mode"]: row for row in rows}
    assert set(by_mode) == {"auto", "plain", "fft floor"}
    for mode in ("auto", "plain"):
        row = by_mode[mode]
        assert row["chosen_mode"] == "convolveTemplate"
        assert 0 < row["wall_s"] < 60 and row["peak_rss_gb"] > 0 and row["fft_passes"] > 0
        # the difference is at the noise floor and the transients' fluxes come back
        assert row["quality"]["noise_ratio"] == pytest.approx(1.0, abs=0.1)
        assert row["quality"]["transient_flux_ratio"] == pytest.approx(1.0, abs=0.1)
    assert by_mode["plain"]["stages"]["read"] > 0  # the plain FITS read inside the timed part
    assert "read" not in by_mode["auto"]["stages"]
    assert "1024 auto" in capsys.readouterr().out


def _ends_without_a_row(queue) -> None:  # module level: the spawned process imports it
    raise SystemExit(3)


def test_a_case_that_ends_without_a_row_stops_the_bench_instead_of_hanging():
    from bench.subtract import _in_process

    with pytest.raises(RuntimeError, match=r"_ends_without_a_row\(\) ended \(exit 3\)"):
        _in_process(_ends_without_a_row)
