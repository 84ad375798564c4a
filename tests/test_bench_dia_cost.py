"""The DIA-cost bench end to end on a small pair: the CLI with the catalog on and off."""

from __future__ import annotations

from bench.dia_cost import _no_dia_config, _subtract, run
from bench.service import make_pair


def test_the_catalog_is_written_with_it_on_and_not_with_it_off(tmp_path):
    pair = make_pair(tmp_path / "pair", 256, seed=3)
    off = _no_dia_config(tmp_path)
    for config, written in ((None, True), (off, False)):
        wall, seconds = _subtract(pair, tmp_path, config)
        # the summary line's seconds exclude the imports the wall includes
        assert 0 < seconds < wall
        assert (tmp_path / "products" / "dia_sources.fits").exists() is written
        assert (tmp_path / "products" / "difference.fits").exists()


def test_the_bench_prints_both_medians_and_the_share_added(tmp_path, capsys):
    (row,) = run([256], 1, tmp_path)
    for name in ("wall", "run"):
        on, off, added = row[name]
        assert on > 0 and off > 0
        assert added == (on - off) / off
    assert "added" in capsys.readouterr().out
