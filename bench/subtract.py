"""Benchmark: whole subtractions of simulated pairs, with per-stage times, peak memory, quality.

    python -m bench.subtract        # 2048 and 4096; auto and preconvolve; uniform and spatially
                                    # varying decorrelation
    python -m bench.subtract --sizes 2048 --modes auto --repeat 3 --no-spatial

Each case runs in its own process so its peak resident memory is its own.
Quality figures: noise ratio (robust std of D/sqrt(V) on empty sky), median
flux ratio of injected transients measured on the difference, median reduced
chi^2 at constant stars. DIA sources: the ``detect`` stage (detection and
measurement, inside the subtraction's wall time), the time to gather the 63x63
triplets of every DIA source, and the time to encode one triplet as FITS + PNG
(done per request by the HTTP route and the CLI); ``dia%`` is detect + gather over
the wall time without ``detect`` (what the DIA products add to a subtraction).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time


def _run_case(size: int, mode: str, seed: int, spatially_varying: bool, queue) -> None:
    from core.config import SubtractionConfig
    from core.evaluate import measure_quality
    from core.simulate import preset, simulate_pair
    from core.subtract import run_subtraction

    t0 = time.perf_counter()
    pair = simulate_pair(preset("varying", size=size, seed=seed))
    t_sim = time.perf_counter() - t0
    config = SubtractionConfig(mode=mode)
    config.decorrelation.spatially_varying = spatially_varying
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = run_subtraction(pair.science, pair.template, config)
    wall = time.perf_counter() - t0
    quality = measure_quality(result, pair)
    cutout_s, encode_ms, n_dia = _cutouts(result)
    queue.put(
        {
            "size": size,
            "mode": mode,
            "spatially_varying": spatially_varying,
            "simulate_s": t_sim,
            "wall_s": wall,
            "stages": result.timings,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "rss_before_gb": rss_before / 1024**2,
            "quality": quality,
            "chosen_mode": result.mode,
            "n_dia": n_dia,
            "cutouts_s": cutout_s,
            "encode_ms": encode_ms,
        }
    )


def _cutouts(result) -> tuple[float, float, int]:
    """Seconds to gather the 63x63 triplets of every DIA source, milliseconds to encode one
    as FITS + PNG (mean of up to 50; encoding happens per request), number of sources."""
    from core.config import DiaSourceConfig
    from core.cutouts import cutouts, result_images, triplet_fits, triplet_png

    catalog = result.dia_sources
    if catalog is None or len(catalog) == 0:
        return 0.0, 0.0, 0
    t0 = time.perf_counter()
    size = DiaSourceConfig().cutout_size
    stamps = cutouts(result_images(result), catalog["x"], catalog["y"], size)
    gather = time.perf_counter() - t0
    n = min(50, len(catalog))
    t0 = time.perf_counter()
    for k in range(n):
        triplet_fits(stamps, k)
        triplet_png(stamps, k)
    return gather, 1000 * (time.perf_counter() - t0) / n, len(catalog)


def run(sizes, modes, repeat: int, seed: int, spatial: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for size in sizes:
        for mode in modes:
            for spatially_varying in [False, True] if spatial else [False]:
                runs = []
                for k in range(repeat):
                    queue = ctx.Queue()
                    proc = ctx.Process(
                        target=_run_case, args=(size, mode, seed + k, spatially_varying, queue)
                    )
                    proc.start()
                    runs.append(queue.get())
                    proc.join()
                row = dict(runs[0])
                row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
                row["wall_all_s"] = [round(r["wall_s"], 2) for r in runs]
                row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
                row["dia_fraction_all"] = [round(_dia_fraction(r), 4) for r in runs]
                row["dia_fraction"] = statistics.median(_dia_fraction(r) for r in runs)
                rows.append(row)
                _print_row(row)
    return rows


def _dia_fraction(row: dict) -> float:
    """(detect + cutouts) / (wall - detect): the share DIA products add to a subtraction."""
    detect = row["stages"].get("detect", 0.0)
    return (detect + row["cutouts_s"]) / max(row["wall_s"] - detect, 1e-9)


def _print_row(row: dict) -> None:
    stages = " ".join(f"{k}={v:.2f}" for k, v in row["stages"].items() if not k.startswith("run"))
    q = row["quality"]
    print(
        f"{row['size']:>5} {row['mode']:<16} sv={int(row['spatially_varying'])} "
        f"({row['chosen_mode']}) wall={row['wall_s']:.2f}s runs={row['wall_all_s']} "
        f"peak={row['peak_rss_gb']:.2f}GB | {stages} | n_dia={row['n_dia']} "
        f"cutouts={row['cutouts_s']:.2f}s encode={row['encode_ms']:.1f}ms/source "
        f"dia%={100 * row['dia_fraction']:.1f} "
        f"{row['dia_fraction_all']} | "
        + " ".join(f"{k}={v:.3f}" for k, v in q.items() if isinstance(v, float)),
        flush=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--modes", nargs="+", default=["auto", "preconvolve"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--no-spatial",
        dest="spatial",
        action="store_false",
        help="skip the spatially varying decorrelation runs",
    )
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args.sizes, args.modes, args.repeat, args.seed, args.spatial)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
