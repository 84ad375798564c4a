"""CLI contract of DIA sources: the catalog product, `alsub forced` and `alsub cutouts`."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from PIL import Image

from app.cli import main
from core.cutouts import TRIPLET_PANEL
from core.exposure import Exposure

REQUIRED = ("id", "x", "y", "ra", "dec", "psf_flux", "psf_flux_err", "snr")
REQUIRED += ("is_negative", "is_dipole", "flags")
TRIPLET_NAMES = ("SCIENCE", "TEMPLATE", "DIFFERENCE")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A simulated pair subtracted with --products; returns (pair dir, products dir, stdout)."""
    out = tmp_path_factory.mktemp("dia")
    pair = out / "pair"
    overrides = json.dumps({"n_transients": 15, "n_negative_transients": 10})
    argv = ["simulate", str(pair), "--size", "384", "--seed", "31", "--preset", "sharper_template"]
    assert main([*argv, "--set", overrides]) == 0
    products = out / "products"
    science, template = str(pair / "science.fits"), str(pair / "template.fits")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(
            [
                "subtract",
                science,
                template,
                "-o",
                str(out / "diff.fits"),
                "--products",
                str(products),
            ]
        )
    assert code == 0
    return pair, products, buffer.getvalue()


def test_subtract_writes_the_catalog(run):
    pair, products, stdout = run
    table = Table.read(products / "dia_sources.fits", hdu="DIASOURCES")
    for column in REQUIRED:
        assert column in table.colnames, column
    summary = next(line for line in stdout.splitlines() if line.startswith("mode="))
    assert f"dia_sources={len(table)} " in summary
    truth = json.loads((pair / "truth.json").read_text())
    # every bright injected transient of either sign is in the catalog with its sign
    for key, negative in (("transients", False), ("negative_transients", True)):
        x, y, flux = (np.asarray(truth[key][k]) for k in ("x", "y", "flux_science"))
        bright = flux > 5e3
        assert bright.sum() >= 3
        for xs, ys in zip(x[bright], y[bright], strict=True):
            d = np.hypot(table["x"] - xs, table["y"] - ys)
            k = int(np.argmin(d))
            assert d[k] < 1.0
            assert bool(table["is_negative"][k]) is negative
    header = fits.getheader(products / "dia_sources.fits", "DIASOURCES")
    assert header["THRESH"] == 5.0 and header["FLAG_EDGE"] == 1
    # the epoch's scale for a light curve, as the metrics give it
    metrics = json.loads((products / "metrics.json").read_text())
    assert header["FLUXRAT"] == pytest.approx(metrics["flux_ratio"])
    assert header["PHOTCAL"] > 0


def _forced(products, positions, output) -> int:
    """Run ``alsub forced`` on the products' difference in-process."""
    difference = str(products / "difference.fits")
    return main(["forced", difference, "--positions", str(positions), "-o", str(output)])


def test_forced_keeps_input_order(run, tmp_path):
    pair, products, _ = run
    truth = json.loads((pair / "truth.json").read_text())
    x = np.asarray(truth["transients"]["x"])[::-1]
    y = np.asarray(truth["transients"]["y"])[::-1]
    flux = np.asarray(truth["transients"]["flux_science"])[::-1]
    positions = tmp_path / "positions.csv"
    Table({"x": x, "y": y}).write(positions, format="ascii.csv")
    out_csv = tmp_path / "forced.csv"
    code = _forced(products, positions, out_csv)
    assert code == 0
    table = Table.read(out_csv, format="ascii.csv")
    for column in ("x", "y", "psf_flux", "psf_flux_err", "snr", "flags"):
        assert column in table.colnames
    np.testing.assert_allclose(table["x"], x)
    strong = flux > 5e3
    assert abs(np.median(table["psf_flux"][strong] / flux[strong]) - 1) < 0.03
    # the same positions as ra/dec give the same fluxes; FITS output by extension
    sky = tmp_path / "sky.csv"
    Table({"ra": table["ra"], "dec": table["dec"]}).write(sky, format="ascii.csv")
    out_fits = tmp_path / "forced.fits"
    code = _forced(products, sky, out_fits)
    assert code == 0
    again = Table.read(out_fits, hdu="FORCED")
    np.testing.assert_allclose(again["x"], x, atol=1e-6)
    np.testing.assert_allclose(again["psf_flux"], table["psf_flux"], rtol=1e-6, atol=1e-6)
    # the epoch's scale and calibration, read from the difference's header
    header = fits.getheader(out_fits, "FORCED")
    assert header["FLUXRAT"] == pytest.approx(
        fits.getval(products / "difference.fits", "ALSUB FLUXRAT")
    )
    assert header["PHOTCAL"] > 0


def test_forced_keeps_the_inputs_own_columns(run, tmp_path):
    # a broker's ids: the light curve is joined to its objects by them (they were dropped)
    _, products, _ = run
    positions = tmp_path / "positions.csv"
    positions.write_text("name,X,y,snr\nSN-b,40.5,30.0,7\nSN-a,200.0,100.5,9\n")
    for out in (tmp_path / "forced.csv", tmp_path / "forced.fits"):
        assert _forced(products, positions, out) == 0
        table = Table.read(out, hdu="FORCED") if out.suffix == ".fits" else Table.read(out)
        # first, in input order; a name the output has is kept under input_<name>
        assert table.colnames[:2] == ["name", "input_snr"]
        assert [str(v) for v in table["name"]] == ["SN-b", "SN-a"]
        assert list(table["input_snr"]) == [7, 9]
        np.testing.assert_allclose(table["x"], [40.5, 200.0])
        assert "X" not in table.colnames and "snr" in table.colnames


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n", "x,y"),
        # a header and no rows: refused, as over HTTP (it wrote an empty table, exit 0)
        ("x,y\n", "at least one position"),
        # an empty cell: the 0 under its mask was measured, flagged edge (a review)
        ("id,x,y\n1,100.0,120.0\n2,,120.0\n", "position 1 (counting from 0) has no x"),
        ("ra,dec\n150.0,\n", "position 0 (counting from 0) has no dec"),
    ],
)
def test_forced_bad_positions_exit_2(run, tmp_path, capsys, text, message):
    _, products, _ = run
    positions = tmp_path / "positions.csv"
    positions.write_text(text)
    code = _forced(products, positions, tmp_path / "o.csv")
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_forced_reads_a_byte_order_mark_and_fits_tables_by_their_content(run, tmp_path):
    """A review's finds: Excel's "CSV UTF-8" starts with a byte-order mark, which became
    part of the first column's name ('\\ufeffx': refused; '\\ufeffid': written so); a
    positions table named .FITS or .fit was parsed as CSV."""
    _, products, _ = run
    expected = None
    for name, write in (
        ("plain.csv", lambda p: p.write_text("id,x,y\n7,100.0,120.0\n")),
        ("marked.csv", lambda p: p.write_bytes(b"\xef\xbb\xbfid,x,y\r\n7,100.0,120.0\r\n")),
        (
            "table.FITS",
            lambda p: Table({"id": [7], "x": [100.0], "y": [120.0]}).write(p, format="fits"),
        ),
        (
            "table.fit",
            lambda p: Table({"id": [7], "x": [100.0], "y": [120.0]}).write(p, format="fits"),
        ),
    ):
        positions = tmp_path / name
        write(positions)
        out = tmp_path / f"{name}.csv"
        assert _forced(products, positions, out) == 0, name
        table = Table.read(out)
        assert table.colnames[:3] == ["id", "x", "y"], (name, table.colnames)
        assert int(table["id"][0]) == 7
        if expected is None:
            expected = float(table["psf_flux"][0])
        assert float(table["psf_flux"][0]) == expected, name


def test_forced_refuses_a_score_exit_2(run, tmp_path, capsys):
    """A preconvolve score is not a difference: its fluxes would be biased (as over
    HTTP, it is refused)."""
    pair, products, _ = run
    score = tmp_path / "score.fits"
    science, template = str(pair / "science.fits"), str(pair / "template.fits")
    assert main(["subtract", science, template, "-o", str(score), "--mode", "preconvolve"]) == 0
    positions = tmp_path / "positions.csv"
    positions.write_text("x,y\n100.0,120.5\n")
    capsys.readouterr()
    code = main(
        ["forced", str(score), "--positions", str(positions), "-o", str(tmp_path / "o.csv")]
    )
    assert code == 2
    assert "is a preconvolve score, not a difference" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_cutouts_triplets(run, tmp_path):
    _, products, _ = run
    table = Table.read(products / "dia_sources.fits", hdu="DIASOURCES")
    ids = [int(i) for i in table["id"][:3]]
    outdir = tmp_path / "cutouts"
    code = main(["cutouts", str(products), str(outdir), "--ids", ",".join(map(str, ids))])
    assert code == 0
    assert len(list(outdir.glob("*.fits"))) == 3 and len(list(outdir.glob("*.png"))) == 3
    row = table[0]
    with fits.open(outdir / f"dia_source_{ids[0]:06d}.fits") as hdul:
        assert [h.name for h in hdul[1:]] == ["SCIENCE", "TEMPLATE", "DIFFERENCE", "MASK"]
        for hdu in hdul[1:4]:
            assert hdu.data.shape == (63, 63)
            # the centre pixel of each stamp is the source's pixel, on the sky too
            ra, dec = WCS(hdu.header).pixel_to_world_values(
                31 + row["x"] - round(row["x"]), 31 + row["y"] - round(row["y"])
            )
            assert abs(ra - row["ra"]) < 1e-7 and abs(dec - row["dec"]) < 1e-7
        # each stamp states its unit, as its product does
        products_of = ("matched_science", "matched_template", "difference")
        for hdu, product in zip(hdul[1:4], products_of, strict=True):
            assert (
                hdu.header["BUNIT"]
                == fits.getheader(products / f"{product}.fits", "IMAGE")["BUNIT"]
            )
        difference = fits.getdata(products / "difference.fits", "IMAGE")
        cx, cy = int(round(row["x"])), int(round(row["y"]))
        np.testing.assert_array_equal(hdul["DIFFERENCE"].data[31, 31], difference[cy, cx])
    with Image.open(outdir / f"dia_source_{ids[0]:06d}.png") as image:
        side = 63 * -(-TRIPLET_PANEL // 63)  # enlarged by a whole factor, labelled above
        assert image.size == (3 * side + 4, side + 14)


def test_triplet_png_is_enlarged_pixel_for_pixel_and_labelled():
    """A 63 px stamp is a thumbnail on a dashboard: each panel is drawn at a whole
    multiple of its pixels (no interpolation: a stamp pixel stays a square of equal
    values) under a strip naming it."""
    from core.cutouts import cutouts, triplet_png
    from core.display import stretch_8bit

    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 1.0, (120, 120)).astype(np.float32)
    image[60, 60] = 40.0
    names = ("SCIENCE", "TEMPLATE", "DIFFERENCE")
    cut = cutouts({name: (image * (k + 1), None) for k, name in enumerate(names)}, [60], [60], 63)
    zoom = -(-TRIPLET_PANEL // 63)
    with Image.open(io.BytesIO(triplet_png(cut, 0))) as png:
        drawn = np.asarray(png)
    side = 63 * zoom
    assert drawn.shape == (side + 14, 3 * side + 4)
    for k, name in enumerate(names):
        panel = drawn[14:, k * (side + 2) : k * (side + 2) + side][::-1]  # row 0 at the bottom
        expected = stretch_8bit(cut.stamps[name][0])
        np.testing.assert_array_equal(panel[::zoom, ::zoom], expected)
        np.testing.assert_array_equal(panel, np.kron(expected, np.ones((zoom, zoom), np.uint8)))
        strip = drawn[:14, k * (side + 2) : k * (side + 2) + side]
        assert (strip > 128).sum() > 20  # the label's lit pixels
    assert not drawn[:14, side : side + 2].any()  # the gap between labels stays dark


def test_cutouts_of_an_unknown_id_exit_2(run, tmp_path, capsys):
    """An id the catalog does not hold is named (it was dropped without a word, exit 0);
    over HTTP it is a 404."""
    _, products, _ = run
    n = len(Table.read(products / "dia_sources.fits", hdu="DIASOURCES"))
    outdir = tmp_path / "cutouts"
    capsys.readouterr()
    code = main(["cutouts", str(products), str(outdir), "--ids", f"0,{n + 5}"])
    assert code == 2
    assert f"no DIA source with id {n + 5}" in capsys.readouterr().err
    assert not outdir.exists()


def test_forced_with_products_flags_as_the_catalog(run, tmp_path, capsys):
    """With --products, forced photometry raises the catalog's bright_star and
    suspect_kernel flags: at the catalog's positions the same bits, at the brightest
    stars bright_star (with the config's residual fraction, half a star's light, any of
    them is bright; without --products it never did);
    a products directory without the matched template exits 2."""
    pair, products, _ = run
    catalog = Table.read(products / "dia_sources.fits", hdu="DIASOURCES")
    single = catalog[~np.asarray(catalog["is_dipole"])]
    difference = str(products / "difference.fits")

    def forced(x, y, *options) -> np.ndarray:
        positions, out = tmp_path / "positions.csv", tmp_path / "forced.fits"
        Table({"x": x, "y": y}).write(positions, format="ascii.csv", overwrite=True)
        argv = ["forced", difference, "--positions", str(positions), "-o", str(out)]
        assert main([*argv, *options]) == 0
        return np.asarray(Table.read(out, hdu="FORCED")["flags"])

    context = 32 | 64  # bright_star, suspect_kernel
    flags = forced(single["x"], single["y"], "--products", str(products))
    np.testing.assert_array_equal(flags & context, single["flags"] & context)
    stars = json.loads((pair / "truth.json").read_text())["stars"]
    brightest = np.argsort(np.asarray(stars["flux_template"]))[-3:]
    x, y = np.asarray(stars["x"])[brightest], np.asarray(stars["y"])[brightest]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dia": {"bright_star_residual": 0.5}}))
    assert np.all(forced(x, y, "--products", str(products), "--config", str(config)) & 32)
    assert not np.any(forced(x, y, "--config", str(config)) & 32)
    code = main(
        ["forced", difference, "--positions", str(tmp_path / "positions.csv")]
        + ["-o", str(tmp_path / "o.csv"), "--products", str(tmp_path)]
    )
    assert code == 2
    assert "matched_template.fits is missing" in capsys.readouterr().err


def test_cutouts_keep_astropys_header_fixes_quiet(run, tmp_path, capsys):
    """A product whose WCS header astropy fixes on reading (OBSGEO-X/Y/Z, as JWST's
    carry) had astropy's note printed bare ("Set OBSGEO-H to ...") by `alsub cutouts`."""
    import shutil
    import warnings

    _, products, _ = run
    copy = tmp_path / "products"
    shutil.copytree(products, copy)
    with fits.open(copy / "difference.fits", mode="update") as hdul:
        header = hdul["IMAGE"].header
        header["OBSGEO-X"], header["OBSGEO-Y"], header["OBSGEO-Z"] = 1.0e6, 2.0e6, 3.0e6
        header["MJD-OBS"] = 60000.0
    table = Table.read(copy / "dia_sources.fits", hdu="DIASOURCES")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["cutouts", str(copy), str(tmp_path / "out"), "--ids", str(table["id"][0])])
    assert code == 0
    assert not [w for w in caught if "OBSGEO" in str(w.message)]
    assert "OBSGEO" not in capsys.readouterr().err


def test_pictures_leave_pixels_without_a_difference_blank(tmp_path):
    """Pixels of a product's NO_DATA or EDGE planes hold input values copied there (a
    strip of science stars where the template has no coverage): its preview and its
    cutout pictures draw them blank (at the stamp's median, as NaN), the FITS stamps
    keep the values."""
    from app.imaging import image_plane
    from core.cutouts import triplet_from_files, triplet_png
    from core.display import blanked
    from core.io import write_exposure

    rng = np.random.default_rng(6)
    image = rng.normal(0.0, 1.0, (80, 80)).astype(np.float32)
    image[:, :20] += 500.0  # the strip without a template: the science's own light
    exposure = Exposure.from_arrays(image, np.ones_like(image))
    strip = np.zeros(image.shape, dtype=bool)
    strip[:, :20] = True
    exposure.mask[strip] |= exposure.mask_planes.value("NO_DATA")
    exposure.mask[:, 20] |= exposure.mask_planes.value("EDGE")
    path = tmp_path / "difference.fits"
    write_exposure(exposure, path)
    preview = image_plane(path)
    assert np.isnan(preview[:, :21]).all() and np.isfinite(preview[:, 21:]).all()
    cut = triplet_from_files({"DIFFERENCE": path}, [25.0], [40.0], 21)
    np.testing.assert_array_equal(cut.stamps["DIFFERENCE"][0], image[30:51, 15:36])
    expected = np.zeros((21, 21), dtype=bool)
    expected[:, :6] = True
    np.testing.assert_array_equal(cut.blank["DIFFERENCE"][0], expected)
    drawn = triplet_png(cut, 0)
    cut.blank.clear()
    assert triplet_png(cut, 0) != drawn  # the strip was drawn before
    cut.stamps["DIFFERENCE"][0] = blanked(image[30:51, 15:36], expected)
    assert triplet_png(cut, 0) == drawn


def test_cutouts_of_a_result_in_memory_blank_what_the_product_files_do(tmp_path):
    """The library's triplet (`result_images` with `result_masks`) leaves the same pixels
    blank as the one cut from the written products."""
    from core.cutouts import cutouts, result_images, result_masks, triplet_from_files
    from core.products import write_products
    from core.simulate import preset, simulate_pair
    from core.subtract import run_subtraction

    pair = simulate_pair(preset("sharper_template", size=384, seed=5))
    pair.template.mask[:, :20] |= pair.template.mask_planes.value("NO_DATA")
    result = run_subtraction(pair.science, pair.template)
    write_products(result, tmp_path)
    x, y = [20.0, 192.0], [100.0, 192.0]
    memory = cutouts(result_images(result), x, y, 31, masks=result_masks(result))
    files = triplet_from_files(
        {
            "SCIENCE": tmp_path / "matched_science.fits",
            "TEMPLATE": tmp_path / "matched_template.fits",
            "DIFFERENCE": tmp_path / "difference.fits",
        },
        x,
        y,
        31,
    )
    assert memory.blank["DIFFERENCE"][0].any() and not memory.blank["DIFFERENCE"][1].any()
    for name in ("SCIENCE", "TEMPLATE", "DIFFERENCE"):
        np.testing.assert_array_equal(memory.blank[name], files.blank[name])


def test_a_score_in_a_triplet_says_so(tmp_path, monkeypatch):
    """A preconvolve job's third stamp is its score: the triplet's HDU keeps the name
    DIFFERENCE (the stamp's place in an alert), its PRODUCT card says score and the PNG
    panel is labelled score (a review: both said difference)."""
    from core import cutouts as module

    image = np.zeros((50, 50), np.float32)
    for stem in ("score", "difference"):
        fits.PrimaryHDU(image).writeto(tmp_path / f"{stem}.fits")
    seen: list[list[str]] = []
    drawn = module.png_bytes

    def recorded(panels, labels=None, **kw):
        seen.append(labels)
        return drawn(panels, labels=labels, **kw)

    monkeypatch.setattr(module, "png_bytes", recorded)
    for stem in ("score", "difference"):
        path = tmp_path / f"{stem}.fits"
        cut = module.triplet_from_files({"DIFFERENCE": path}, [25.0], [25.0], 21)
        module.triplet_png(cut, 0)
        with fits.open(io.BytesIO(module.triplet_fits(cut, 0))) as hdul:
            assert hdul["DIFFERENCE"].header["PRODUCT"] == stem
    assert seen == [["score"], ["difference"]]


def test_forced_measures_a_template_given_its_psf_file(run, tmp_path, capsys):
    """The template's baseline fluxes: an image without a PSF extension and with a sky
    (`--psf` gives its PSF; the message pointed at a PSF file no option took), measured
    with a local background fitted, as the note says."""
    pair, _, _ = run
    with fits.open(pair / "template.fits") as hdul:
        image, psf = hdul["IMAGE"].data, hdul["PSF"].data
        header = hdul["IMAGE"].header
    plain, psf_file = tmp_path / "template.fits", tmp_path / "psf.fits"
    fits.PrimaryHDU(image, header=header).writeto(plain)
    fits.PrimaryHDU(psf).writeto(psf_file)
    truth = json.loads((pair / "truth.json").read_text())["stars"]
    x, y, flux = (np.asarray(truth[k], dtype=float) for k in ("x", "y", "flux_template"))
    bright = np.argsort(-flux)[3:13]  # bright, below the brightest (saturation)
    positions = tmp_path / "p.csv"
    Table({"x": x[bright], "y": y[bright]}).write(positions, format="ascii.csv")
    out = tmp_path / "f.csv"
    assert main(["forced", str(plain), "--positions", str(positions), "-o", str(out)]) == 2
    assert "no PSF" in capsys.readouterr().err
    argv = ["forced", str(plain), "--psf", str(psf_file), "--positions", str(positions)]
    assert main([*argv, "-o", str(out)]) == 0
    assert "a local background was fitted" in capsys.readouterr().out
    measured = Table.read(out, format="ascii.csv")
    assert np.median(np.asarray(measured["psf_flux"]) / flux[bright]) == pytest.approx(1, abs=0.03)
    missing = [*argv[:3], str(tmp_path / "none.fits"), *argv[4:], "-o", str(out)]
    assert main(missing) == 2
    assert "--psf" in capsys.readouterr().err


def test_stretch_of_a_stamp_off_the_frame_comes_from_its_real_pixels():
    """A 63 px stamp at a frame corner is three quarters NaN: filled with the median
    before zscale, its sorted samples were a plateau and every on-frame pixel was
    clipped to 0 or 255 (a review: 95% of a corner stamp's template). The interval
    comes from the finite pixels; blanks are still drawn at their median."""
    import warnings

    from astropy.visualization import AsinhStretch, ZScaleInterval

    from core.display import block_mean, stretch_8bit

    rng = np.random.default_rng(2)
    stamp = np.full((63, 63), np.nan, np.float32)
    stamp[31:, 31:] = rng.normal(1000.0, 10.0, (32, 32))
    drawn = stretch_8bit(stamp)
    on = np.isfinite(stamp)
    assert ((drawn == 0) | (drawn == 255))[on].mean() < 0.01  # was 1.0
    assert np.ptp(drawn[~on]) == 0 and 0 < drawn[~on][0] < 255  # one grey, as before
    # a stamp without blanks stretches as before: the same samples, the same interval
    whole = rng.normal(0.0, 1.0, (63, 63)).astype(np.float32)
    lo, hi = ZScaleInterval().get_limits(whole)
    unit = np.clip((whole - lo) / (hi - lo), 0.0, 1.0)
    expected = (AsinhStretch(0.1)(unit, clip=True) * 255).astype(np.uint8)
    np.testing.assert_array_equal(stretch_8bit(whole), expected)
    # a preview of 1025 px halves it: its blocks wholly off the data are NaN, unwarned
    image = np.full((1025, 1025), np.nan, np.float32)
    image[:600, :600] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was "Mean of empty slice"
        blocks = block_mean(image, 1024)
    assert blocks.shape == (512, 512)
    assert np.all(blocks[:300, :300] == 1.0) and np.isnan(blocks[300:, :]).all()


def _triplet_result():
    """A result of three 80 px images on one grid whose WCS states the science's epoch
    (as a template resampled onto the science grid has it); the template lacks a strip
    (NO_DATA) and the difference has an EDGE band beside it."""
    from core.subtract import SubtractionResult

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix, wcs.wcs.cdelt = [150.0, 2.0], [40.5, 40.5], [-7e-5, 7e-5]
    wcs.wcs.mjdobs = 60000.5
    rng = np.random.default_rng(8)
    made = []
    for epoch in (60000.5, 59000.5, 60000.5):
        image = rng.normal(0.0, 1.0, (80, 80)).astype(np.float32)
        exposure = Exposure.from_arrays(image, np.ones_like(image), wcs=wcs.deepcopy())
        exposure.metadata.update({"BUNIT": "adu", "MJD-OBS": epoch})
        made.append(exposure)
    science, template, difference = made
    no_data, edge = template.mask_planes.value("NO_DATA"), difference.mask_planes.value("EDGE")
    template.mask[:, :20] |= no_data
    difference.mask[:, :20] |= no_data
    difference.mask[:, 20:22] |= edge
    return SubtractionResult(
        difference=difference, matched_template=template, matched_science=science
    )


def test_triplet_stamps_carry_their_own_epoch_unit_and_a_mask(tmp_path):
    """A triplet's TEMPLATE stamp said the science's MJD-OBS (its WCS is the science
    grid's) and its library cut had no BUNIT or PRODUCT; the FITS marked no invalid pixel
    (EDGE and NO_DATA hold input values) and its primary gave the id, x and y only. Cut
    from memory (the README's path) and from the product files alike: each stamp its own
    image's epoch, unit and product, a MASK HDU with the products' bits (NO_DATA off the
    frame too) and the source's sky position and the science's epoch and filter."""
    from core.cutouts import (
        cutouts,
        result_images,
        result_masks,
        source_header,
        triplet_fits,
        triplet_from_files,
    )
    from core.io import write_exposure

    result = _triplet_result()
    stems = ("matched_science", "matched_template", "difference")
    paths = {}
    exposures = (result.matched_science, result.matched_template, result.output)
    for name, stem, exposure in zip(TRIPLET_NAMES, stems, exposures, strict=True):
        paths[name] = tmp_path / f"{stem}.fits"
        write_exposure(exposure, paths[name])
    catalog = Table({"id": [7], "x": [5.2], "y": [40.0], "ra": [150.0025], "dec": [2.0]})
    catalog.meta = {"mjd_obs": 60000.5, "date_obs": None, "band": "r"}
    memory = cutouts(result_images(result), [5.2], [40.0], 21, masks=result_masks(result))
    files = triplet_from_files(paths, [5.2], [40.0], 21)
    for cut in (memory, files):
        with fits.open(
            io.BytesIO(triplet_fits(cut, 0, source_header(catalog[0], catalog.meta)))
        ) as hdul:
            epochs = [hdul[name].header.get("MJD-OBS") for name in TRIPLET_NAMES]
            assert epochs == [60000.5, 59000.5, 60000.5]  # TEMPLATE was 60000.5
            assert hdul["TEMPLATE"].header["DATE-OBS"] == "2020-05-31T12:00:00.000"
            assert [hdul[name].header.get("BUNIT") for name in TRIPLET_NAMES] == ["adu"] * 3
            assert [hdul[name].header.get("PRODUCT") for name in TRIPLET_NAMES] == list(stems)
            primary = hdul[0].header
            assert (primary["DIASRCID"], primary["X"], primary["Y"]) == (7, 5.2, 40.0)
            assert (primary["RA"], primary["DEC"], primary["FILTER"]) == (150.0025, 2.0, "r")
            assert (primary["MJD-OBS"], primary["DATE-OBS"]) == (60000.5, "2023-02-25T12:00:00.000")
            mask = hdul["MASK"].data
            no_data, edge = (
                1 << hdul["MASK"].header["MP_NO_DATA"],
                1 << hdul["MASK"].header["MP_EDGE"],
            )
            # stamp columns 0-4 off the frame, 5-24 the template's strip, 25-26 EDGE
            assert np.all(mask[:, :25] & no_data) and not np.any(mask[:, 25:] & no_data)
            assert np.all(mask[:, 25:27] & edge) and not np.any(mask[:, 27:] & edge)
            assert np.isnan(hdul["DIFFERENCE"].data[:, :5]).all()
            assert np.isfinite(hdul["DIFFERENCE"].data[:, 5:]).all()  # the values are kept


def test_cutouts_default_to_the_runs_cutout_size(run, tmp_path):
    """`alsub cutouts` without --size took the class default (63) whatever the run's
    dia.cutout_size; the run's catalog now records it (CUTSIZE) and the cutouts take it."""
    pair, _, _ = run
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"dia": {"cutout_size": 31}}))
    products, outdir = tmp_path / "products", tmp_path / "cutouts"
    science, template = str(pair / "science.fits"), str(pair / "template.fits")
    argv = ["subtract", science, template, "-o", str(tmp_path / "d.fits")]
    assert main([*argv, "--products", str(products), "--config", str(config)]) == 0
    assert fits.getheader(products / "dia_sources.fits", "DIASOURCES")["CUTSIZE"] == 31
    assert main(["cutouts", str(products), str(outdir), "--ids", "0", "--format", "fits"]) == 0
    with fits.open(outdir / "dia_source_000000.fits") as hdul:
        assert hdul["DIFFERENCE"].data.shape == (31, 31)  # was (63, 63)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 64, 1025, 10001])
def test_cutouts_refuse_a_size_the_route_refuses(run, tmp_path, capsys, size):
    """--size 0 became the default, 1 and 3 were cut and 10001 wrote a 1.2 GB file; the
    route takes odd sizes from 5 to 1023: anything else exits 2 with one line, before
    anything is written."""
    _, products, _ = run
    outdir = tmp_path / "cutouts"
    capsys.readouterr()
    assert main(["cutouts", str(products), str(outdir), "--size", str(size), "--ids", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alsub: error: --size must be an odd number from 5 to 1023")
    assert err.count("\n") == 1 and f"got {size}" in err
    assert not outdir.exists()


def test_cutouts_name_an_output_directory_that_cannot_be_one(run, tmp_path, capsys):
    """An output directory that is a file, or under one, was a traceback (exit 1); a
    products directory of a run without the DIA catalog was told to give the products
    directory it was."""
    import shutil

    _, products, _ = run
    afile = tmp_path / "afile"
    afile.write_text("")
    for outdir, said in ((afile, "is a file"), (afile / "sub", f"{afile} is a file")):
        capsys.readouterr()
        assert main(["cutouts", str(products), str(outdir), "--ids", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("alsub: error: output directory") and said in err, err
        assert err.count("\n") == 1
    nodia = tmp_path / "nodia"
    shutil.copytree(products, nodia)
    (nodia / "dia_sources.fits").unlink()
    capsys.readouterr()
    assert main(["cutouts", str(nodia), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "had the DIA catalog off (dia.enabled = false)" in err, err
    assert "give the --products directory" not in err


def test_cutouts_help_and_readme_say_how_the_png_is_oriented(capsys):
    """The PNG is drawn in pixel order, row 0 at the bottom, not north up: a broker
    comparing it with a sky survey's picture has to know (nothing said it)."""
    from pathlib import Path

    with pytest.raises(SystemExit):
        main(["cutouts", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "row 0 (y = 0) at the bottom" in said and "not turned north up" in said
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "row 0 (y = 0) at the bottom, column 0 at the left, not turned north up" in readme
