"""The alsub command line: subtract, warp, forced, cutouts, simulate, config, info, serve,
worker.

User errors print one line naming the problem and exit with status 2; no
traceback and no partial output file. Warnings go through `logging` in one
format (``alsub: warning: ...``) on stderr; on a terminal a progress line shows
the stage and the fraction done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import AlsubError
from core.parallel import set_memory_policy

__all__ = ["main"]

EXIT_USER_ERROR = 2

_DESCRIPTION = """\
Alard-Lupton image subtraction for time-domain astronomy.

Subtract a PSF-matched template from a science exposure (FITS), simulate a test
pair, describe a file, print the configuration, or run the HTTP service.
Run 'alsub COMMAND --help' for the options of a command."""

_EPILOG = """\
examples:
  alsub simulate pair/ --size 1024 --seed 3
  alsub subtract pair/science.fits pair/template.fits -o diff.fits --products prod/
  alsub subtract sci.fits tmpl.fits -o diff.fits --science-noise sci_err.fits \\
      --template-noise tmpl_err.fits --science-psf sci_psf.fits --template-psf tmpl_psf.fits
  alsub config > my-config.json        (edit, then: alsub subtract ... --config my-config.json)"""

_PLANE_KINDS = ("variance", "noise", "weight", "mask", "psf")


class UsageError(AlsubError):
    """A command-line argument that cannot work (checked before any computing)."""

    code = "usage"


# output ---------------------------------------------------------------------------------------
class _Progress:
    """One self-overwriting status line on stderr: stage name and percentage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._shown = False

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        sys.stderr.write(f"\r\033[Kalsub: [{100 * fraction:3.0f}%] {stage}")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False


class _LogHandler(logging.StreamHandler):
    """stderr handler that first clears the progress line, so messages never overlap it."""

    def __init__(self, progress: _Progress):
        super().__init__(sys.stderr)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.clear()
        super().emit(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()
        return super().format(record)


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, progress: _Progress):
    """All messages, core's warnings and Python warnings alike, as ``alsub: <level>: ...``.

    Undone on exit, so calling `main` from Python leaves the caller's logging alone.
    """
    handler = _LogHandler(progress)
    handler.setFormatter(_Formatter("alsub: %(level)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.setLevel(level)
        root.removeHandler(handler)


# checks before computing ----------------------------------------------------------------------
def _check_output_file(path: str) -> None:
    """Exit 2 at once when the file cannot be created: its directory is missing or read-only."""
    directory = Path(path).expanduser().absolute().parent
    if not directory.is_dir():
        raise UsageError(f"output directory {directory} does not exist: create it first")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable")
    if Path(path).is_dir():
        raise UsageError(f"output {path} is a directory: give a file name")


def _check_output_dir(path: str, what: str = "products directory") -> None:
    """Exit 2 at once when ``path`` is a file or cannot be created under its nearest parent."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{what} {target} is a file")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {target} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {target} cannot be written (in {existing})")


def _check_cutout_size(size: int, what: str) -> None:
    """Exit 2 unless ``size`` is a cutout side the HTTP route takes (odd, 5 to 1023)."""
    from core.config import MAX_CUTOUT_SIZE, MIN_CUTOUT_SIZE

    if size % 2 == 0 or not MIN_CUTOUT_SIZE <= size <= MAX_CUTOUT_SIZE:
        raise UsageError(
            f"{what} must be an odd number from {MIN_CUTOUT_SIZE} to {MAX_CUTOUT_SIZE} "
            f"(the source's pixel at the centre), got {size}"
        )


def _check_input(path: str | None, what: str) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{what} {path}: no such file")


# commands -------------------------------------------------------------------------------------
def _cmd_simulate(args) -> int:
    from core.simulate import simulate_command

    try:
        overrides = json.loads(args.set) if args.set else {}
    except ValueError as exc:
        raise UsageError(f"--set is not valid JSON: {exc}") from None
    if not isinstance(overrides, dict):
        raise UsageError("--set must be a JSON object, e.g. '{\"n_transients\": 10}'")
    # size and seed are SimulationConfig fields too: given in --set, they win over the
    # flags (a non-square frame has no flag: '{"size": [1536, 768]}')
    size, seed = overrides.pop("size", args.size), overrides.pop("seed", args.seed)
    paths = simulate_command(args.outdir, size=size, seed=seed, preset=args.preset, **overrides)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_info(args) -> int:
    from core.io import describe_exposure

    print(json.dumps(describe_exposure(args.file), indent=2, default=str))
    return 0


def _config_lines(model, prefix: str = "") -> list[str]:
    """``name = value  # description`` for every field of a pydantic model, sections nested."""
    from pydantic import BaseModel

    lines = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            lines.append(f"\n[{key}]  # {field.description or ''}".rstrip(" #"))
            lines.extend(_config_lines(value, f"{key}."))
            continue
        bounds = [
            f"{op} {getattr(m, attr)}"
            for m in field.metadata
            for op, attr in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))
            if getattr(m, attr, None) is not None
        ]
        note = field.description or ""
        if bounds:
            note = f"{note} ({', '.join(bounds)})"
        lines.append(f"{key} = {json.dumps(value)}  # {note}")
    return lines


def _cmd_config(args) -> int:
    from core.config import SubtractionConfig

    config = SubtractionConfig()
    if args.list:
        print("# SubtractionConfig defaults: field = value  # description (bounds)")
        print("# A --config file is JSON with any subset of these, nested by section, e.g.")
        print('#   {"mode": "convolveScience", "kernel": {"spatial_kernel_order": 2}}')
        print("\n".join(_config_lines(config)))
    else:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def _load_config(path, mode):
    from pydantic import ValidationError

    from core.config import SubtractionConfig
    from core.errors import InvalidConfigError

    data = {}
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidConfigError(f"config {path} must hold a JSON object (see `alsub config`)")
    if mode:
        data["mode"] = mode
    try:
        return SubtractionConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidConfigError(f"config {where}: {first['msg']}") from None


def _extension_names(path: str) -> set[str]:
    """Names of the HDUs of the FITS file ``path`` (upper case; none if it cannot be read)."""
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            return {hdu.name.upper() for hdu in hdul}
    except (OSError, ValueError):
        return set()


def _planes(args, role: str) -> dict[str, Any]:
    """The per-input planes given for ``role`` (science or template): files checked to
    exist, or the name of an extension of the input itself (``--science-mask DQ``), and
    its gain when given."""
    planes = {}
    for kind in _PLANE_KINDS:
        value = getattr(args, f"{role}_{kind}")
        if value is not None:
            source = getattr(args, role)
            if not Path(value).is_file() and value.upper() not in _extension_names(source):
                raise UsageError(
                    f"--{role}-{kind} {value}: no such file, nor an extension of {source}"
                )
            planes[kind] = value
    given = [k for k in ("variance", "noise", "weight") if k in planes]
    if len(given) > 1:
        raise UsageError(f"give only one of --{role}-{given[0]} and --{role}-{given[1]}")
    gain = getattr(args, f"{role}_gain", None)
    if gain is not None:
        if given:
            raise UsageError(
                f"--{role}-gain models the variance: it has no use with --{role}-{given[0]}"
            )
        if not (math.isfinite(gain) and gain > 0):
            raise UsageError(f"--{role}-gain must be a positive number, got {gain}")
        planes["gain"] = gain
    return planes


def _cmd_subtract(args) -> int:
    config = _load_config(args.config, args.mode)  # bad configs fail before any reading
    _check_input(args.science, "science")
    _check_input(args.template, "template")
    _check_input(args.sources, "--sources")
    science_planes, template_planes = _planes(args, "science"), _planes(args, "template")
    _check_output_file(args.output)
    if args.products:
        _check_output_dir(args.products)

    from core.io import read_exposure
    from core.logcapture import said_first, saying
    from core.parallel import thread_map
    from core.products import write_difference, write_products
    from core.sources import read_catalog
    from core.subtract import run_subtraction

    progress = args.progress_display
    t0 = time.perf_counter()
    progress("read", 0.0)
    # both inputs at once, as the worker reads them: the reader spends its time in numpy
    # and file reads, which release the GIL (4096 plain pair: 1.38 -> 0.76 s)
    (science, said), (template, said_too) = thread_map(
        lambda job: saying(read_exposure, job[0], **job[1]),
        [(args.science, science_planes), (args.template, template_planes)],
    )
    sources = read_catalog(args.sources, wcs=science.wcs) if args.sources else None
    # the inputs were read for this run only: worked on in place, not copied
    result = run_subtraction(
        science, template, config, sources=sources, progress=progress, consume_inputs=True
    )
    # what reading said (a WCS ignored) is the run's too: counted and kept in metrics.json
    result.metrics["warnings"] = said_first(said + said_too, result.metrics["warnings"])
    progress("write", 1.0)
    write_difference(result, args.output)
    if args.products:
        write_products(result, args.products)
    progress.clear()
    m = result.metrics
    quality = m.get("quality", {})
    print(
        f"mode={m.get('mode')} kernel_sum={m.get('kernel_sum', float('nan')):.4f} "
        f"kernel_sources={m.get('n_kernel_sources')} "
        f"noise_ratio={m.get('noise_ratio', float('nan')):.3f} "
        f"verdict={quality.get('verdict')} warnings={len(m.get('warnings', []))} "
        f"dia_sources={m.get('n_dia_sources', 'off')} seconds={time.perf_counter() - t0:.2f}"
    )
    for reason in quality.get("reasons", []):
        print(f"  {reason}")
    return 0


def _read_positions(path):
    """x,y (or ra,dec) columns of a positions CSV (or FITS table), in file order, and the
    table's other columns (an id, a name: carried into the output)."""
    import numpy as np
    from astropy.table import Table

    from core.errors import InvalidCatalogError
    from core.sources import read_table

    table = read_table(path)
    names = {name.lower(): name for name in table.colnames}
    for pair in (("x", "y"), ("ra", "dec")):
        if all(k in names for k in pair):
            if len(table) == 0:  # as the HTTP route answers
                raise InvalidCatalogError(f"{path} has no rows: give at least one position")
            try:
                positions = {k: table[names[k]].astype(float) for k in pair}
            except (TypeError, ValueError):
                raise InvalidCatalogError(f"{path}: columns {pair} must be numbers") from None
            for k, column in positions.items():
                # an empty cell is masked, and the value under its mask (0) was measured
                blank = np.flatnonzero(np.ma.getmaskarray(column))
                if blank.size:
                    raise InvalidCatalogError(
                        f"{path}: position {blank[0]} (counting from 0) has no {k}: an empty "
                        "cell (every position needs both coordinates)"
                    )
            others = [c for c in table.colnames if c.lower() not in {"x", "y", "ra", "dec"}]
            return positions, Table([table[c] for c in others])
    raise InvalidCatalogError(
        f"{path} needs columns x,y (pixels, 0-based) or ra,dec (degrees); has {table.colnames}"
    )


def _require_difference(path) -> None:
    """Refuse a preconvolve score (as the HTTP route does): a point source there has
    another profile and the PSF it carries would bias every flux (~0.66 on the test
    pairs)."""
    from astropy.io import fits

    from core.errors import InvalidExposureError

    try:
        mode = fits.getheader(path, 0).get("HIERARCH ALSUB MODE")
    except Exception:  # noqa: BLE001 - read_exposure names what is wrong with the file
        return
    if mode == "preconvolve":
        raise InvalidExposureError(
            f"{path} is a preconvolve score, not a difference; forced photometry needs a "
            "difference (subtract with another mode)"
        )


def _forced_context(products: Path) -> dict:
    """The matched template and kernel sources of a --products directory, for the
    bright_star and suspect_kernel flags of forced photometry."""
    from core.errors import InvalidConfigError
    from core.io import read_exposure
    from core.products import read_kernel_sources

    template, kernel = products / "matched_template.fits", products / "kernel.fits"
    for path in (template, kernel):
        if not path.is_file():
            raise InvalidConfigError(
                f"{path.name} is missing in {products}: give the --products directory of "
                "`alsub subtract`"
            )
    sources = read_kernel_sources(kernel)
    if sources is None:
        print(
            f"alsub: warning: {kernel} holds no kernel sources (written by an older alsub): "
            "suspect_kernel is not raised",
            file=sys.stderr,
        )
    return {
        "matched_template": read_exposure(template, name="matched template"),
        "kernel_sources": sources,
    }


def _cmd_forced(args) -> int:
    from core.config import ForcedPhotometryConfig
    from core.diasources import FORCED_EXTNAME, catalog_hdulist
    from core.forced import forced_photometry
    from core.io import read_exposure, write_hdulist_atomic

    _check_output_file(args.output)
    full = _load_config(args.config, None) if args.config else None
    config = full.dia.forced if full is not None else ForcedPhotometryConfig()
    _require_difference(args.difference)
    if args.psf is not None and not Path(args.psf).is_file():
        raise UsageError(f"--psf {args.psf}: no such file")
    difference = read_exposure(args.difference, psf=args.psf)
    context = _forced_context(Path(args.products)) if args.products else {}
    positions, carried = _read_positions(args.positions)
    table = forced_photometry(
        difference,
        config=config,
        dia=full.dia if full is not None else None,
        **context,
        **positions,
    )
    # the caller's own columns first, as given (renamed where the output has the name):
    # a light curve is matched to its objects by their ids, not by row numbers alone
    for index, name in enumerate(carried.colnames):
        label = f"input_{name}" if name in table.colnames else name
        table.add_column(carried[name], name=label, index=index)
    if str(args.output).lower().endswith((".fits", ".fit", ".fts")):
        write_hdulist_atomic(catalog_hdulist(table, FORCED_EXTNAME), args.output)
    else:
        table.write(args.output, format="ascii.csv", overwrite=True)
    print(f"positions={len(table)} noise_scale={table.meta['noise_scale']:.3f} -> {args.output}")
    if table.meta.get("sky_found"):
        print(
            "  note: the image has a sky level (no difference?): a local background was "
            "fitted with each flux"
        )
    return 0


def _cmd_cutouts(args) -> int:
    from core.config import DiaSourceConfig
    from core.cutouts import (
        TRIPLET,
        source_header,
        triplet_fits,
        triplet_from_files,
        triplet_png,
    )
    from core.diasources import read_dia_sources
    from core.errors import InvalidConfigError

    if args.size is not None:  # refused before any reading (0 was the default, 10001 1.2 GB)
        _check_cutout_size(args.size, "--size")
    _check_output_dir(args.outdir, "output directory")
    products = Path(args.products)
    output = "score" if (products / "score.fits").is_file() else "difference"
    paths = dict(
        zip(
            TRIPLET,
            [products / f"{n}.fits" for n in ("matched_science", "matched_template", output)],
            strict=True,
        )
    )
    catalog_path = products / "dia_sources.fits"
    if not catalog_path.is_file() and (products / f"{output}.fits").is_file():
        # the --products directory it is, of a run that made no catalog
        raise InvalidConfigError(
            f"{products} has no dia_sources.fits: the run that made it had the DIA catalog "
            "off (dia.enabled = false); rerun `alsub subtract` with it on to cut out sources"
        )
    for path in (catalog_path, *paths.values()):
        if not path.is_file():
            raise InvalidConfigError(
                f"{path.name} is missing in {products}: give the --products directory of "
                "`alsub subtract`"
            )
    catalog = read_dia_sources(catalog_path)
    if args.ids:
        try:
            wanted = {int(i) for i in args.ids.split(",")}
        except ValueError:
            message = f"--ids must be comma-separated integers, got {args.ids!r}"
            raise InvalidConfigError(message) from None
        unknown = sorted(wanted - {int(i) for i in catalog["id"]})
        if unknown:  # the HTTP route answers 404 for an unknown id
            held = f"ids 0 to {len(catalog) - 1}" if len(catalog) else "it is empty"
            raise InvalidConfigError(
                f"no DIA source with id {', '.join(map(str, unknown))} in {catalog_path} ({held})"
            )
        catalog = catalog[[int(i) in wanted for i in catalog["id"]]]
    # the run's own dia.cutout_size (its catalog's CUTSIZE), not the class default
    size = args.size
    if size is None:
        size = int(catalog.meta.get("cutout_size", DiaSourceConfig().cutout_size))
        _check_cutout_size(size, f"the run's dia.cutout_size (CUTSIZE of {catalog_path.name})")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamps = triplet_from_files(paths, catalog["x"], catalog["y"], size)
    for k, row in enumerate(catalog):
        stem = outdir / f"dia_source_{int(row['id']):06d}"
        if args.format in ("fits", "both"):
            header = source_header(row, catalog.meta)
            stem.with_suffix(".fits").write_bytes(triplet_fits(stamps, k, header))
        if args.format in ("png", "both"):
            stem.with_suffix(".png").write_bytes(triplet_png(stamps, k))
    print(f"cutouts={len(catalog)} size={size} -> {outdir}")
    return 0


def _cmd_warp(args) -> int:
    from core.io import read_exposure, write_exposure
    from core.parallel import thread_map
    from core.register import register_template

    _check_output_file(args.output)
    config = _load_config(args.config, None)
    if args.registration:
        config.registration.mode = args.registration
    template, science = thread_map(read_exposure, [args.template, args.onto])
    warped, figures = register_template(
        template, science, config.registration, config.sources.detection
    )
    header = {
        "HIERARCH ALSUB REGMETH": (str(figures.get("method")), "how the grids were matched"),
        "HIERARCH ALSUB RESAMPLD": (bool(figures.get("resampled")), "template resampled"),
    }
    if "rms_px" in figures:
        header["HIERARCH ALSUB REGRMS"] = (float(figures["rms_px"]), "matched-star rms (px)")
        header["HIERARCH ALSUB REGERR"] = (
            float(figures["misfit_px"]),
            "map error beyond centroid noise (px)",
        )
        header["HIERARCH ALSUB REGNSTAR"] = (int(figures["n_matched"]), "matched stars")
    write_exposure(warped, args.output, extra_header=header)
    shift = figures.get("shift_at_centre", [0.0, 0.0])
    print(
        f"method={figures.get('method')} resampled={figures.get('resampled')} "
        f"shift=({shift[0]:.3f}, {shift[1]:.3f}) px rotation={figures.get('rotation_deg', 0):.4f} "
        f"deg{' mirrored' if figures.get('mirrored') else ''} "
        f"scale={figures.get('scale', 1):.5f} rms={figures.get('rms_px', float('nan')):.3f} px "
        f"error={figures.get('misfit_px', float('nan')):.3f} px "
        f"matched={figures.get('n_matched', 0)}"
    )
    return 0


def _cmd_serve(args) -> int:
    from app.server import serve

    serve(host=args.host, port=args.port, data_dir=args.data_dir, workers=args.workers)
    return 0


def _cmd_worker(args) -> int:
    from worker.main import run_worker

    return run_worker(args.celery_args) or 0


# the parser -----------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alsub")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_plane_options(p: argparse.ArgumentParser, role: str) -> None:
    group = p.add_argument_group(
        f"{role} planes",
        f"separate files for the {role} exposure (an image HDU each; they override the "
        "planes of the file itself), or the name of an extension of the file itself "
        f"(--{role}-mask DQ). At most one of variance, noise and weight.",
    )
    group.add_argument(
        f"--{role}-variance", metavar="FILE", help=f"{role} variance map (image units squared)"
    )
    group.add_argument(
        f"--{role}-noise", metavar="FILE", help=f"{role} 1-sigma noise map (e.g. JWST's ERR)"
    )
    group.add_argument(
        f"--{role}-weight", metavar="FILE", help=f"{role} inverse-variance weight map"
    )
    group.add_argument(
        f"--{role}-mask",
        metavar="FILE",
        help=f"{role} mask: named bits with MP_<NAME> cards, else any non-zero pixel is BAD",
    )
    group.add_argument(
        f"--{role}-psf",
        metavar="FILE",
        help=f"{role} PSF image (2-D stamp, centred; or a 4-D grid with PSF_NODES)",
    )
    group.add_argument(
        f"--{role}-gain",
        metavar="E_PER_UNIT",
        type=float,
        help=f"{role} gain (electrons per pixel unit) for the variance model of a file with "
        "no variance plane, instead of its GAIN card: a coadd whose card is one exposure's "
        "(a mean of N exposures has N times its gain)",
    )


#: `core.simulate.PRESETS`, spelled out so that building the parser (``alsub --help``) does
#: not import the simulator and with it scipy and astropy (seconds); tests/test_cli.py checks
#: the two agree.
SIMULATE_PRESETS = (
    "sharper_template",
    "sharper_science",
    "equal",
    "varying",
    "defects",
    "noisy_template",
    "wide_field",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alsub",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alsub {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "subtract",
        help="subtract a PSF-matched TEMPLATE from SCIENCE",
        description="Subtract a PSF-matched template from a science exposure and write the "
        "difference (or, with --mode preconvolve, the detection score image) as a multi-extension "
        "FITS file (IMAGE, MASK, VARIANCE; readable with astropy's CCDData). The template is "
        "registered onto the science pixel grid first (by the WCSs, corrected on matched stars, "
        "or by stars alone; the config's registration section). The summary line gives "
        "the quality verdict (good, suspect or bad), its reasons follow; a bad verdict is "
        "reported, not an error (exit status 0): read it before using the difference.",
    )
    p.add_argument("science", help="science exposure: FITS file (MEF or a single image)")
    p.add_argument(
        "template", help="template exposure of the same field: FITS file (registered if needed)"
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="difference (or score) FITS to write"
    )
    p.add_argument(
        "--mode",
        choices=["auto", "convolveTemplate", "convolveScience", "preconvolve"],
        default=None,
        help="direction of convolution, or preconvolve for the score image "
        "(default: the config's, else auto)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="SubtractionConfig as JSON (`alsub config` shows it)"
    )
    p.add_argument(
        "--sources",
        metavar="FILE",
        help="catalog of kernel sources (FITS table, CSV or JSON; x/y pixels or ra/dec degrees)",
    )
    p.add_argument(
        "--products",
        metavar="DIR",
        help="directory for all products: matched images, kernel, background, metrics.json "
        "and the DIA-source catalog dia_sources.fits",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress line (it shows only on a terminal)"
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)"
    )
    _add_plane_options(p, "science")
    _add_plane_options(p, "template")
    p.set_defaults(func=_cmd_subtract)

    p = sub.add_parser(
        "warp",
        help="register TEMPLATE and resample it onto the grid of SCIENCE",
        description="Register the template onto the pixel grid of another exposure (by the two "
        "WCSs corrected on matched stars, or by stars alone) and resample it with Lanczos-3, as "
        "`alsub subtract` does before subtracting; the summary line gives the shift, rotation, "
        "scale and matched-star rms.",
    )
    p.add_argument("template", help="template FITS to register and resample")
    p.add_argument("--onto", required=True, help="the exposure whose pixel grid is the output")
    p.add_argument("-o", "--output", required=True, help="warped template FITS to write")
    p.add_argument(
        "--registration",
        choices=["auto", "wcs", "stars"],
        default=None,
        help="how to find the map (default: config, else auto)",
    )
    p.add_argument("--config", help="SubtractionConfig as JSON (its registration section)")
    p.set_defaults(func=_cmd_warp)

    p = sub.add_parser(
        "forced",
        help="PSF photometry of a difference at given positions",
        description="PSF flux, error, S/N and flags of a difference at each given position "
        "(one row per input row, in order, the input's other columns such as an id kept "
        "in front), with the difference's PSF. Errors carry the "
        "difference's noise scale (the robust scatter of flux / error at random positions, "
        "printed as noise_scale: above 1 where the noise is correlated).",
    )
    p.add_argument("difference", help="difference FITS (with its PSF; not a preconvolve score)")
    p.add_argument(
        "--positions", required=True, help="CSV with columns x,y (0-based pixels) or ra,dec"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="table to write: .csv, or .fits (the rows in its FORCED extension)",
    )
    p.add_argument(
        "--products",
        help="the --products directory of the `alsub subtract` that made the difference: "
        "positions near a bright star of its matched template, or far outside its kernel "
        "sources, are flagged bright_star and suspect_kernel, as in dia_sources.fits",
    )
    p.add_argument(
        "--psf",
        metavar="FILE",
        help="PSF image (2-D stamp, centred; or a 4-D grid with PSF_NODES) of an image "
        "without one, e.g. the template for its baseline fluxes (an image with a sky level "
        "gets a local background fitted with each flux)",
    )
    p.add_argument("--config", help="SubtractionConfig JSON (its dia section is used)")
    p.set_defaults(func=_cmd_forced)

    p = sub.add_parser(
        "cutouts",
        help="science/template/difference stamps of DIA sources",
        description="Alert triplets of the DIA sources of a subtraction: stamps of the "
        "matched science, the matched template and the difference (or score) centred on "
        "each source, as a FITS file of three image HDUs with WCS (and a MASK HDU) and as a "
        "PNG strip. The PNG is in pixel order as ds9 shows the FITS: row 0 (y = 0) at the "
        "bottom, column 0 at the left, not turned north up (the WCS gives the sky's "
        "orientation).",
    )
    p.add_argument("products", help="the --products directory of `alsub subtract`")
    p.add_argument(
        "outdir", help="directory for dia_source_NNNNNN.fits / .png (the id, six digits)"
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="stamp side in pixels, odd, 5 to 1023 (default: the run's dia.cutout_size, "
        "as its catalog records it)",
    )
    p.add_argument(
        "--format",
        choices=["fits", "png", "both"],
        default="both",
        help="FITS triplets (3 image HDUs with WCS), PNG triplets, or both (default)",
    )
    p.add_argument("--ids", default=None, help="comma-separated source ids (default: all)")
    p.set_defaults(func=_cmd_cutouts)

    p = sub.add_parser(
        "simulate",
        help="write a simulated science/template pair with injected transients",
        description="Write science.fits, template.fits and truth.json (stars, galaxies and the "
        "transients injected into the science image, with their fluxes).",
    )
    p.add_argument("outdir", help="directory to write into (created)")
    p.add_argument(
        "--size",
        type=int,
        default=512,
        help="image side in pixels (default 512; not square: --set '{\"size\": [nx, ny]}')",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--preset",
        default=None,
        choices=SIMULATE_PRESETS,
        metavar="NAME",
        help=f"named scenario: {', '.join(SIMULATE_PRESETS)} (default: plain pair)",
    )
    p.add_argument(
        "--set",
        default=None,
        metavar="JSON",
        help="JSON object of SimulationConfig overrides, e.g. '{\"n_transients\": 0}'",
    )
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "config",
        help="print the default SubtractionConfig (for --config files)",
        description="Print the default configuration as JSON, ready to edit and pass with "
        "`alsub subtract --config FILE` (any subset of fields will do), or with --list every "
        "field with its description and bounds.",
    )
    p.add_argument(
        "--list", action="store_true", help="one line per field: value, description, bounds"
    )
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "info",
        help="describe an exposure file",
        description="Print what the reader finds in a FITS file (JSON): shape, planes, PSF, WCS.",
    )
    p.add_argument("file", help="FITS file to describe")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "serve",
        help="run the HTTP service with an embedded worker",
        description="Run the HTTP API (OpenAPI docs at /docs) and a local worker; no external "
        "server needed. With ALSUB_REDIS_URL set, Redis holds the queue and job records.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="exposures, products and job records (default: ALSUB_DATA_DIR, else ./alsub-data)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="jobs the embedded worker runs in parallel (default: ALSUB_WORKER_CONCURRENCY); "
        "0 runs the API alone",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "worker",
        help="run a worker for the distributed deployment",
        description="Run a Celery worker taking jobs from Redis (ALSUB_REDIS_URL) and sharing "
        "ALSUB_DATA_DIR with the API. Without ALSUB_REDIS_URL it takes them from the local "
        "broker in ALSUB_DATA_DIR (an extra worker beside `alsub serve` on this machine) and "
        "says so when it starts.",
    )
    p.add_argument(
        "celery_args",
        nargs=argparse.REMAINDER,
        metavar="CELERY_ARGS",
        help="extra `celery worker` arguments, e.g. --concurrency 4",
    )
    p.set_defaults(func=_cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``alsub`` command line; return the exit status."""
    args = _parser().parse_args(argv)
    set_memory_policy()  # large frames: fewer resident and fewer zeroed pages (core.parallel)
    show = not getattr(args, "quiet", True) and sys.stderr.isatty()
    args.progress_display = _Progress(show)
    service = args.func in (_cmd_serve, _cmd_worker)  # the service sets up its own logs
    try:
        with (
            contextlib.nullcontext()
            if service
            else _logging_to_stderr(getattr(args, "verbose", 0), args.progress_display)
        ):
            return args.func(args)
    except AlsubError as exc:
        args.progress_display.clear()
        print(f"alsub: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        args.progress_display.clear()
        print(f"alsub: error: no such file: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # the reader left early (`alsub config --list | head`): stop as a tool SIGPIPE stops,
        # with stdout on devnull so the flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        # a bad ALSUB_* setting of `serve` or `worker`: one line each, no values (tokens)
        from pydantic import ValidationError

        from store.errors import SettingsError

        if service and isinstance(exc, SettingsError):
            print(f"alsub: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        if not (service and isinstance(exc, ValidationError)):
            raise
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            name = f"ALSUB_{where.upper()}: " if where and not message.startswith("ALSUB_") else ""
            print(f"alsub: error: {name}{message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        args.progress_display.clear()
        return 130


if __name__ == "__main__":
    sys.exit(main())
