"""The alsub command line: subtract, simulate, info; user errors exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.cli import main
from core.io import read_exposure


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    assert (
        main(
            ["simulate", str(out), "--size", "512", "--seed", "21", "--preset", "sharper_template"]
        )
        == 0
    )
    return out


def _subtract(pair_dir, output, *options) -> int:
    """Run ``alsub subtract`` on the simulated pair in-process."""
    science, template = str(pair_dir / "science.fits"), str(pair_dir / "template.fits")
    return main(["subtract", science, template, "-o", str(output), *options])


def test_simulate_writes_pair(pair_dir):
    assert (pair_dir / "science.fits").is_file()
    assert (pair_dir / "template.fits").is_file()
    truth = json.loads((pair_dir / "truth.json").read_text())
    assert truth["shape"] == [512, 512]


def test_subtract_writes_difference_and_products(pair_dir, tmp_path, capsys):
    output = tmp_path / "diff.fits"
    products = tmp_path / "products"
    code = _subtract(pair_dir, output, "--products", str(products))
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("mode=convolveTemplate") and "kernel_sum=" in line
    difference = read_exposure(output)
    assert difference.shape == (512, 512)
    assert difference.metadata["ALSUB MODE"] == "convolveTemplate"
    assert 0.9 < difference.metadata["ALSUB KSUM"] < 1.1
    for name in (
        "matched_template.fits",
        "matched_science.fits",
        "kernel.fits",
        "background.fits",
        "metrics.json",
    ):
        assert (products / name).is_file(), name
    metrics = json.loads((products / "metrics.json").read_text())
    assert 0.9 < metrics["noise_ratio"] < 1.1
    assert metrics["mode"] == "convolveTemplate"


def test_subtract_preconvolve_writes_score(pair_dir, tmp_path, capsys):
    output = tmp_path / "score.fits"
    code = _subtract(pair_dir, output, "--mode", "preconvolve")
    assert code == 0
    assert "mode=preconvolve" in capsys.readouterr().out
    score = read_exposure(output)
    assert score.masked(["EDGE"])[0].all()  # frame outside the inner box


def test_bad_input_is_one_line_exit_2_and_no_output(pair_dir, tmp_path):
    not_fits = tmp_path / "notes.fits"
    not_fits.write_text("this is not a FITS file")
    output = tmp_path / "diff.fits"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "subtract",
            str(not_fits),
            str(pair_dir / "template.fits"),
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "notes.fits" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not output.exists()


def test_bad_config_is_a_user_error(pair_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"kernel": {"kernel_size": 20}}))
    code = _subtract(pair_dir, tmp_path / "d.fits", "--config", str(config))
    assert code == 2
    assert "odd" in capsys.readouterr().err


def test_missing_file_is_a_user_error(tmp_path, capsys):
    code = main(["info", str(tmp_path / "nope.fits")])
    assert code == 2
    assert "nope.fits" in capsys.readouterr().err


def test_info_describes_file(pair_dir, capsys):
    assert main(["info", str(pair_dir / "science.fits")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [512, 512]
    assert set(info["planes"]) >= {"IMAGE", "VARIANCE", "MASK", "PSF"}
    assert info["psf"]["fwhm_pixels"] == pytest.approx(3.9, abs=0.1)
    assert info["wcs"]["present"] is True
