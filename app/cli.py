"""The ``alsub`` command line: subtract, simulate, info, serve, worker.

User errors print one line naming the problem and exit with status 2; no
traceback and no partial output file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.errors import AlsubError

__all__ = ["main"]

EXIT_USER_ERROR = 2


def _cmd_simulate(args) -> int:
    from core.simulate import simulate_command

    overrides = json.loads(args.set) if args.set else {}
    paths = simulate_command(
        args.outdir, size=args.size, seed=args.seed, preset=args.preset, **overrides
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_info(args) -> int:
    from core.io import describe_exposure

    print(json.dumps(describe_exposure(args.file), indent=2, default=str))
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
    if mode:
        data["mode"] = mode
    try:
        return SubtractionConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidConfigError(f"config {where}: {first['msg']}") from None


def _cmd_subtract(args) -> int:
    from core.io import read_exposure
    from core.products import write_difference, write_products
    from core.sources import read_catalog
    from core.subtract import run_subtraction

    config = _load_config(args.config, args.mode)
    t0 = time.perf_counter()
    science = read_exposure(args.science)
    template = read_exposure(args.template)
    sources = read_catalog(args.sources, wcs=science.wcs) if args.sources else None
    result = run_subtraction(science, template, config, sources=sources)
    write_difference(result, args.output)
    if args.products:
        write_products(result, args.products)
    m = result.metrics
    quality = m.get("quality", {})
    print(
        f"mode={m.get('mode')} kernel_sum={m.get('kernel_sum', float('nan')):.4f} "
        f"sources={m.get('n_kernel_sources')} noise_ratio={m.get('noise_ratio', float('nan')):.3f} "
        f"verdict={quality.get('verdict')} seconds={time.perf_counter() - t0:.2f}"
    )
    for reason in quality.get("reasons", []):
        print(f"  {reason}")
    return 0


def _cmd_serve(args) -> int:
    from app.server import serve  # the service lives outside core; imported only here

    serve(host=args.host, port=args.port, data_dir=args.data_dir, workers=args.workers)
    return 0


def _cmd_worker(args) -> int:
    from worker.main import run_worker

    return run_worker(args.celery_args) or 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alsub", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("subtract", help="subtract TEMPLATE from SCIENCE")
    p.add_argument("science")
    p.add_argument("template")
    p.add_argument("-o", "--output", required=True, help="difference (or score) FITS to write")
    p.add_argument(
        "--mode",
        choices=["auto", "convolveTemplate", "convolveScience", "preconvolve"],
        default=None,
        help="direction of convolution (default: config, else auto)",
    )
    p.add_argument("--config", help="SubtractionConfig as JSON")
    p.add_argument("--sources", help="catalog (FITS table, CSV or JSON) of kernel sources")
    p.add_argument("--products", help="directory for matched images, kernel, background, metrics")
    p.set_defaults(func=_cmd_subtract)

    p = sub.add_parser("simulate", help="write a simulated science/template pair")
    p.add_argument("outdir")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None, help="named scenario, e.g. sharper_science")
    p.add_argument("--set", default=None, help="JSON object of SimulationConfig overrides")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("info", help="describe an exposure file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("serve", help="run the HTTP service with an embedded worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("worker", help="run a worker for the distributed deployment")
    p.add_argument("celery_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except AlsubError as exc:
        print(f"alsub: error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        print(f"alsub: error: no such file: {exc.filename}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
