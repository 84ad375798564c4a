"""The alsub command line: subtract, simulate, info; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pty
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData, VarianceUncertainty

from app.cli import _parser, main
from core.config import SubtractionConfig
from core.io import read_exposure
from core.simulate import PRESETS

REPO = Path(__file__).resolve().parents[1]


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
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mode="))
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


@pytest.mark.parametrize("bad_role", ["science", "template"])
def test_bad_input_is_one_line_exit_2_and_no_output(pair_dir, tmp_path, bad_role):
    """Either input unreadable (the two are read at once): one line naming it, exit 2."""
    not_fits = tmp_path / "notes.fits"
    not_fits.write_text("this is not a FITS file")
    output = tmp_path / "diff.fits"
    inputs = {"science": pair_dir / "science.fits", "template": pair_dir / "template.fits"}
    inputs[bad_role] = not_fits
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "subtract",
            str(inputs["science"]),
            str(inputs["template"]),
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


# the newcomer's first hour: help, version, config, early errors, logs, modes, progress -----
JWST = Path(__file__).parent / "data" / "real" / "jwst_nircam_a2744"
JWST_SCIENCE = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
JWST_TEMPLATE = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_argument_and_option_has_help(capsys):
    parser = _parser()
    commands = _subparsers(parser)
    assert set(commands) == {
        "subtract",
        "warp",
        "forced",
        "cutouts",
        "simulate",
        "config",
        "info",
        "serve",
        "worker",
    }
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {action.dest}")
    assert missing == []
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "alsub" in text
    for name in commands:
        assert f"    {name}  " in text or f"    {name}\n" in text or f"  {name} " in text


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"alsub {importlib.metadata.version('alsub')}"


def test_simulate_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in PRESETS:
        assert name in text


def test_the_parser_offers_every_simulator_preset():
    from app.cli import SIMULATE_PRESETS

    assert tuple(SIMULATE_PRESETS) == tuple(PRESETS)


@pytest.mark.parametrize("argv", [["--help"], ["subtract", "--help"], ["--version"]])
def test_help_imports_no_science_library(argv):
    """`alsub --help` answers before numpy, scipy and astropy are imported (they take seconds)."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('numpy', 'scipy', 'astropy', 'core.io') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in done.stderr, done.stderr


def test_info_imports_no_scipy(pair_dir):
    """`alsub info` on a file with its variance reads FITS and WCS only: scipy (a third of
    the start-up) stays unimported."""
    code = (
        "import sys\n"
        "from app.cli import main\n"
        f"main(['info', {str(pair_dir / 'science.fits')!r}])\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'),"
        " file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in done.stderr, done.stderr


def test_config_prints_a_usable_default_config(tmp_path, capsys, pair_dir):
    assert main(["config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == SubtractionConfig().model_dump(mode="json")
    # the printed JSON, edited, is a valid --config file
    printed["mode"] = "convolveScience"
    config = tmp_path / "mine.json"
    config.write_text(json.dumps(printed))
    assert _subtract(pair_dir, tmp_path / "d.fits", "--config", str(config)) == 0
    assert "mode=convolveScience" in capsys.readouterr().out


def test_config_list_describes_every_field(capsys):
    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if " = " in ln and not ln.startswith("#")]

    def leaves(model, prefix=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    names = list(leaves(SubtractionConfig()))
    assert [ln.split(" = ")[0] for ln in lines] == names
    assert all(len(ln.split("  # ", 1)[1]) > 5 for ln in lines)  # a description each
    assert any("(>= 1, <= " in ln for ln in lines)  # both bounds shown


def test_simulate_takes_size_and_seed_from_set(tmp_path, capsys):
    """--set takes any SimulationConfig field, size and seed too (a non-square frame has
    no flag for it), and they win over --size and --seed; a bad one exits 2 with one
    line naming it."""
    wide, same = tmp_path / "wide", tmp_path / "same"
    overrides = '{"size": [96, 64], "seed": 3}'
    assert main(["simulate", str(wide), "--size", "128", "--set", overrides]) == 0
    assert main(["simulate", str(same), "--seed", "3", "--set", '{"size": [96, 64]}']) == 0
    image = fits.getdata(wide / "science.fits")
    assert image.shape == (64, 96)
    np.testing.assert_array_equal(image, fits.getdata(same / "science.fits"))
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "bad"), "--set", '{"size": "wide"}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "size" in err[0]


def test_simulate_makes_transients_by_default(tmp_path):
    assert main(["simulate", str(tmp_path), "--size", "256", "--seed", "4"]) == 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    fluxes = truth["transients"]["flux_science"]
    assert len(fluxes) >= 5 and min(fluxes) > 0
    # the science image holds them: more flux near each transient than in the template
    science, template = (
        read_exposure(tmp_path / "science.fits"),
        read_exposure(tmp_path / "template.fits"),
    )
    for x, y, flux in zip(truth["transients"]["x"], truth["transients"]["y"], fluxes, strict=True):
        j, i = int(round(y)), int(round(x))
        box = np.s_[j - 6 : j + 7, i - 6 : i + 7]
        excess = float((science.image[box] - template.image[box]).sum())
        assert excess > 0.3 * flux


def test_missing_output_directory_fails_before_reading(tmp_path, capsys):
    not_fits = tmp_path / "broken.fits"
    not_fits.write_text("not FITS")  # reading it would fail: the output must be checked first
    out = tmp_path / "missing" / "dir" / "x.fits"
    code = main(["subtract", str(not_fits), str(not_fits), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "missing" / "dir") in err and "broken" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["warp", "forced"])
def test_missing_output_directory_of_warp_and_forced_fails_before_reading(
    command, tmp_path, capsys
):
    not_fits = tmp_path / "broken.fits"
    not_fits.write_text("not FITS")  # reading it would fail: the output must be checked first
    positions = tmp_path / "positions.csv"
    positions.write_text("x,y\n10,10\n")
    out = tmp_path / "missing" / "dir" / "x.fits"
    inputs = {
        "warp": [str(not_fits), "--onto", str(not_fits)],
        "forced": [str(not_fits), "--positions", str(positions)],
    }
    code = main([command, *inputs[command], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    # the directory to create, not a temporary file the user never named
    assert f"output directory {tmp_path / 'missing' / 'dir'} does not exist" in err, err
    assert "broken" not in err and ".tmp" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (["--science-gain", "-2"], "--science-gain must be a positive number"),
        (["--template-gain", "nan"], "--template-gain must be a positive number"),
        (["--science-gain", "4", "--science-noise", "n.fits"], "no use with --science-noise"),
    ],
)
def test_a_gain_that_cannot_model_the_variance_is_a_user_error(
    pair_dir, tmp_path, capsys, options, said
):
    (tmp_path / "n.fits").write_bytes((pair_dir / "science.fits").read_bytes())
    options = [str(tmp_path / o) if o == "n.fits" else o for o in options]
    assert _subtract(pair_dir, tmp_path / "d.fits", *options) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "d.fits").exists()


def test_identical_inputs_exit_2(pair_dir, tmp_path, capsys):
    science = str(pair_dir / "science.fits")
    assert main(["subtract", science, science, "-o", str(tmp_path / "d.fits")]) == 2
    assert "same image" in capsys.readouterr().err
    assert not (tmp_path / "d.fits").exists()


def test_warnings_are_logged_in_one_format_and_kept_in_metrics(tmp_path):
    # a spatial condition-number limit no solution meets: the kernel fit warns (a sparse
    # field's lowered spatial orders are a note, not a warning)
    pair = tmp_path / "pair"
    assert main(["simulate", str(pair), "--size", "256", "--seed", "2"]) == 0
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"kernel": {"max_spatial_condition_number": 1}}))
    products = tmp_path / "prod"
    science, template = str(pair / "science.fits"), str(pair / "template.fits")
    proc = _run_cli(
        "subtract",
        science,
        template,
        "-o",
        str(tmp_path / "d.fits"),
        "--products",
        str(products),
        "--config",
        str(config),
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((products / "metrics.json").read_text())
    lines = proc.stderr.strip().splitlines()
    assert len(metrics["warnings"]) >= 1
    assert all(line.startswith("alsub: warning: ") for line in lines)
    logged = [line.removeprefix("alsub: warning: ") for line in lines]
    assert logged and set(logged) <= set(metrics["warnings"])
    assert f"warnings={len(metrics['warnings'])}" in proc.stdout
    assert any("kernel stamps support spatial orders" in n for n in metrics["notes"])


def test_warnings_said_while_reading_are_the_runs_too(tmp_path):
    """A template WCS that cannot be parsed is ignored with a warning: it was printed
    beside `warnings=0` and lost from metrics.json, and named wcslib's C source line
    instead of the problem."""
    pair = tmp_path / "pair"
    assert main(["simulate", str(pair), "--size", "256", "--seed", "2"]) == 0
    with fits.open(pair / "template.fits", mode="update") as hdul:
        hdul["IMAGE"].header["CTYPE1"] = "RA---FOO"
    products = tmp_path / "prod"
    science, template = str(pair / "science.fits"), str(pair / "template.fits")
    proc = _run_cli(
        "subtract", science, template, "-o", str(tmp_path / "d.fits"), "--products", str(products)
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((products / "metrics.json").read_text())
    said = [w for w in metrics["warnings"] if "WCS ignored" in w]
    assert len(said) == 1 and "Unrecognized projection code (FOO in CTYPE1)" in said[0]
    assert said[0] in proc.stderr and "wcs.c" not in proc.stderr
    assert f"warnings={len(metrics['warnings'])}" in proc.stdout


def test_all_products_share_one_mode_from_the_umask(pair_dir, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "d.fits"
        assert _subtract(pair_dir, out, "--products", str(tmp_path / "p")) == 0
    finally:
        os.umask(old)
    files = [out, *sorted((tmp_path / "p").iterdir())]
    assert len(files) == 8  # with dia_sources.fits
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o640}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """The ``alsub`` command in a subprocess, stdout and stderr captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300
    )


def _run_on_tty(args: list[str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        stdin=subprocess.DEVNULL,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_only(pair_dir, tmp_path):
    science, template = str(pair_dir / "science.fits"), str(pair_dir / "template.fits")
    shown = _run_on_tty(["subtract", science, template, "-o", str(tmp_path / "a.fits")])
    percents = [int(p) for p in re.findall(r"\[\s*(\d+)%\]", shown)]
    assert percents[0] == 0 and percents[-1] == 100 and len(percents) >= 5
    assert percents == sorted(percents)
    for stage in ("read", "convolve", "write"):
        assert f"] {stage}" in shown
    quiet = _run_on_tty(["subtract", science, template, "-o", str(tmp_path / "b.fits"), "-q"])
    assert "%]" not in quiet
    piped = _run_cli("subtract", science, template, "-o", str(tmp_path / "c.fits"))
    assert piped.returncode == 0 and "%]" not in piped.stderr


# astropy's CCDData.read below notes the JWST header's OBSGEO cards it fixes (the CLI's
# own readers keep that quiet)
@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
def test_jwst_with_noise_maps_and_psfs_from_the_flags(tmp_path, capsys):
    out, products = tmp_path / "diff.fits", tmp_path / "prod"
    code = main(
        [
            "subtract",
            str(JWST / f"{JWST_SCIENCE}.fits.gz"),
            str(JWST / f"{JWST_TEMPLATE}.fits.gz"),
            "-o",
            str(out),
            "--products",
            str(products),
            "--science-noise",
            str(JWST / f"{JWST_SCIENCE}.noise.fits.gz"),
            "--science-psf",
            str(JWST / f"{JWST_SCIENCE}.WebbPSF.fits.gz"),
            "--template-noise",
            str(JWST / f"{JWST_TEMPLATE}.noise.fits.gz"),
            "--template-psf",
            str(JWST / f"{JWST_TEMPLATE}.WebbPSF.fits.gz"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((products / "metrics.json").read_text())
    assert 0.9 <= metrics["noise_ratio"] <= 1.15
    # the product reads as astropy CCDData, in the science image's unit
    ccd = CCDData.read(out, hdu="IMAGE")
    assert ccd.unit == u.MJy / u.sr
    full = CCDData.read(out, hdu="IMAGE", hdu_uncertainty="VARIANCE", hdu_mask="MASK")
    difference = read_exposure(out)
    assert isinstance(full.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(full.uncertainty.array, difference.variance)
    np.testing.assert_array_equal(full.mask, difference.mask != 0)
    np.testing.assert_array_equal(full.data, difference.image)
    assert full.wcs is not None
    assert (
        full.wcs.pixel_to_world(450, 450).separation(difference.wcs.pixel_to_world(450, 450)).arcsec
        < 1e-6
    )


def test_plane_flags_must_name_files(pair_dir, tmp_path, capsys):
    code = _subtract(pair_dir, tmp_path / "d.fits", "--template-noise", str(tmp_path / "no.fits"))
    assert code == 2
    assert "--template-noise" in capsys.readouterr().err


def test_a_plane_flag_may_name_an_extension_of_the_input(pair_dir, tmp_path, capsys):
    """`--science-mask FLAGS` reads the science file's own FLAGS extension (a review: an
    extension name was refused as 'no such file', though the library reads it)."""
    with fits.open(pair_dir / "science.fits") as hdul:
        flags = np.zeros(hdul["IMAGE"].data.shape, np.int16)
        flags[:, 300] = 1
        hdul.append(fits.ImageHDU(flags, name="FLAGS"))
        hdul.writeto(tmp_path / "science.fits")
    template = str(pair_dir / "template.fits")
    argv = ["subtract", str(tmp_path / "science.fits"), template, "-o", str(tmp_path / "d.fits")]
    assert main([*argv, "--science-mask", "FLAGS"]) == 0
    difference = read_exposure(tmp_path / "d.fits")
    assert difference.masked(["BAD"])[:, 300].all()
    assert main([*argv, "--science-mask", "NOPE"]) == 2
    assert "nor an extension of" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["config", "--list"], ["config"]])
def test_a_reader_that_leaves_early_gets_no_traceback(args):
    # `alsub config --list | head` closes the pipe before alsub has written everything
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first write: deterministic
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as a tool the signal stopped
