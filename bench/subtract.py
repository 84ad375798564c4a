"""Benchmark: whole subtractions of simulated pairs, with per-stage times, peak memory,
FFT passes and quality, beside HOTPANTS and the FFT floor measured in the same run.

    python -m bench.subtract        # 2048 and 4096; auto and preconvolve; uniform and spatially
                                    # varying decorrelation
    python -m bench.subtract --sizes 4096 --modes auto plain preconvolve --repeat 3 --no-spatial
    python -m bench.subtract --hotpants /path/to/hotpants   # default: `hotpants` on PATH
    python -m bench.subtract --baseline /path/to/main/checkout  # before/after, interleaved

Each round's pair is simulated once (per checkout compared), in a process of its own, and
written to files; each case then runs in a fresh process that starts as the CLI does, from
those files (the exposures unpickled before the timed part; in ``plain`` mode the FITS
read in it), with no simulation before it in the same process: freed memory a run would
reuse cheaply is not there, as for a user (HOTPANTS, a process of its own, is measured the
same way). A round's cases start after its files are flushed and a pause (`_SETTLE_S`),
every other round in reverse order, so that no case pays for the simulation before it
(an even ``--repeat`` puts each case as often early as late).
Peak resident memory is measured from the start of the run: the inputs plus what the
subtraction allocates. The inputs are handed over (``consume_inputs``), as the CLI and
the worker hand over what they read. Modes:
``auto``, ``preconvolve`` (and the other task modes) take the simulated exposures as
they are (variance planes and PSFs given); ``plain`` writes both images as bare
single-HDU FITS (GAIN/RDNOISE in the header, no variance, no PSF) and times
``read_exposure`` + the auto subtraction, as a user with plain files would run it.
Quality figures: noise ratio (robust std of D/sqrt(V) on empty sky), median flux ratio
of injected transients measured on the difference, median reduced chi^2 at constant
stars. ``fft`` counts the FFTs a run made, in full-frame equivalents (transformed
pixels / frame pixels, forward and inverse counted separately; a 1-D transform along
one axis of an image counts half).

DIA sources: ``detect`` is the stage inside the subtraction (detection and
measurement); ``gather`` cuts the alert triplets (science, matched template,
difference; ``dia.cutout_size`` px) of every DIA source from the in-memory
images; ``encode`` is one triplet as FITS + PNG, done per request (HTTP route,
``alsub cutouts``), not during a subtraction. ``added`` = wall with the catalog over
wall without it (a ``[DIA off]`` case of each mode, same pair, interleaved; skipped
with ``--no-dia-off``), minus 1: what the DIA products add to a subtraction (issue 10:
<= 10%). ``detect/rest%`` = (detect + gather) / (wall - detect), the figure quoted
before session 27, reads less: 15.5% on the 4096 auto pair where runs without the
catalog gave +19% (session 27, 8 alternating rounds). The measurement grows with the
sources measured: ``--transients N`` injects N instead of the preset's dense test field
(about 20 per 512 x 512, ~1100 DIA sources at 4096).

Reference rows measured in the same run: ``hotpants`` (HOTPANTS on the same bare
FITS, -r 10 -rss 15, its default kernel and background orders; wall and peak memory
of the process; skipped when no binary is found) and ``fft floor`` (8 forward +
inverse float32 real-FFT pairs of the full frame, and the same pixels in 512-px tiles
on all cores: what any FFT-based subtraction of this frame must at least spend).
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from queue import Empty

TASK_MODES = ("auto", "convolveTemplate", "convolveScience", "preconvolve")

#: Seconds between a round's simulation and its first case at 4096 x 4096, in proportion
#: to the pixels at other sizes (as the files and the memory are). Without, the 4096 auto
#: case with the DIA catalog, first in its round, prepared in 1.95 s against 1.61 s for
#: the catalog-off case after it (5 rounds; the code before detection is the same), and
#: the catalog read as +32%; with the rounds alternating in order and a flush alone, 1.87
#: / 1.70 s over 5 rounds; with 5 s more, 1.80 / 1.92 s and walls of 3.24-3.51 /
#: 2.90-3.28 s (6 rounds, session 29).
_SETTLE_S = 5.0


def _count_ffts(counter: list[float], frame_pixels: int) -> None:
    """Wrap scipy.fft's transforms so every call adds its pixels / frame pixels."""
    import numpy as np
    import scipy.fft as sfft

    two_d = ("rfft2", "irfft2", "rfftn", "irfftn", "fft2", "ifft2", "fftn", "ifftn")
    one_d = ("rfft", "irfft", "fft", "ifft")
    for name in two_d + one_d:
        original = getattr(sfft, name)
        # a transform along one axis of an image is half of a 2-D pass over it
        weight = 0.5 if name in one_d else 1.0

        def counted(x, *args, _original=original, _name=name, _weight=weight, **kwargs):
            out = _original(x, *args, **kwargs)
            real = out if _name.startswith("i") else x
            counter.append(_weight * np.asarray(real).size / frame_pixels)
            return out

        setattr(sfft, name, counted)


def _fresh_peak() -> float:
    """Hand the memory loading the inputs freed back to the system (``malloc_trim``) and
    restart this process's peak resident memory (Linux ``clear_refs``), so the peak read
    after the run is the run's: the inputs it is given plus what it allocates. Returns
    the resident memory now, in GB."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak stays the process's own, loading included
        pass
    return _status_gb("VmRSS")


def _status_gb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _peak_gb() -> float:
    """Peak resident memory since `_fresh_peak` (the process's, where it cannot be reset)."""
    return _status_gb("VmHWM")


def _plain_paths(directory: Path) -> tuple[Path, Path]:
    """The bare FITS of science and template in a round's ``directory``."""
    return directory / "science.fits", directory / "template.fits"


def _use_checkout(root: str | None) -> None:
    """Import ``core`` from the checkout ``root`` (a baseline), or this one (None)."""
    if root:
        import sys

        sys.path.insert(0, root)


def _write_plain(pair, directory: Path) -> tuple[Path, Path]:
    """Science and template as bare single-HDU FITS (image and header keywords only)."""
    import numpy as np
    from astropy.io import fits

    paths = _plain_paths(directory)
    for path, exposure in zip(paths, (pair.science, pair.template), strict=True):
        header = fits.Header()
        for key in ("GAIN", "RDNOISE", "EXPTIME", "FILTER", "SATURATE"):
            if key in exposure.metadata:
                header[key] = exposure.metadata[key]
        fits.writeto(path, np.asarray(exposure.image, dtype=np.float32), header, overwrite=True)
    return paths


def _pair_files(
    size: int, seed: int, directory: str, root: str | None, transients: int | None, queue
) -> None:
    """Simulate a pair once, in a process of its own, into ``directory`` with the core of
    ``root`` (None: this checkout): the two exposures a run is given (``inputs.pkl``),
    the whole pair for the quality figures (``truth.pkl``) and both images as bare FITS
    for ``plain`` and HOTPANTS (`_write_plain`). ``transients``: how many to inject
    (default: the preset's, about 20 per 512 x 512)."""
    _use_checkout(root)
    import pickle

    from core.simulate import preset, simulate_pair

    config = preset("varying", size=size, seed=seed)
    if transients is not None:
        config = config.model_copy(update={"n_transients": transients})
    pair = simulate_pair(config)
    folder = Path(directory)
    with open(folder / "truth.pkl", "wb") as handle:
        pickle.dump(pair, handle, protocol=pickle.HIGHEST_PROTOCOL)
    with open(folder / "inputs.pkl", "wb") as handle:
        pickle.dump((pair.science, pair.template), handle, protocol=pickle.HIGHEST_PROTOCOL)
    _write_plain(pair, folder)
    queue.put({})


def _run_case(
    size: int,
    mode: str,
    pair_dir: str,
    spatially_varying: bool,
    root: str | None,
    dia: bool,
    queue,
) -> None:
    """One subtraction in this (fresh) process, started as the CLI starts: the inputs
    come from files (``plain``: read in the timed part; else unpickled before it) and
    no simulation ran here, so the run's fresh memory costs what it costs a user's
    process (on a VM that hands freed memory back to its host, ~2.5 s of CPU per GB
    on the development machine)."""
    import pickle
    import sys

    _use_checkout(root)  # another checkout's core: the baseline of a before/after comparison
    from core import parallel
    from core.config import SubtractionConfig
    from core.evaluate import measure_quality
    from core.subtract import run_subtraction

    # as the CLI and the worker do at start (a baseline from before it has no such call)
    policy = getattr(parallel, "set_memory_policy", None)
    (policy or getattr(parallel, "large_blocks_to_mmap", lambda: None))()
    folder = Path(pair_dir)
    config = SubtractionConfig(mode="auto" if mode == "plain" else mode)
    config.decorrelation.spatially_varying = spatially_varying
    if not dia:
        config.dia.enabled = False
    if mode != "plain":
        with open(folder / "inputs.pkl", "rb") as handle:
            science, template = pickle.load(handle)
    rss_before = _fresh_peak()
    ffts: list[float] = []
    _count_ffts(ffts, size * size)
    # handed over, as the CLI and the worker hand over what they read (a baseline
    # from before the option copies them)
    handed = "consume_inputs" in inspect.signature(run_subtraction).parameters
    handover = {"consume_inputs": True} if handed else {}
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if mode == "plain":
        from core.io import read_exposure
        from core.parallel import thread_map

        # both at once, as `alsub subtract` and the worker read them
        science, template = thread_map(read_exposure, _plain_paths(folder))
    t_read = time.perf_counter() - t0
    result = run_subtraction(science, template, config, **handover)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    peak = _peak_gb()
    passes = sum(ffts)  # the run's own (not the quality measurement's)
    simulated_here = "core.simulate" in sys.modules  # (the truth, unpickled below, is)
    del science, template
    with open(folder / "truth.pkl", "rb") as handle:
        pair = pickle.load(handle)
    quality = measure_quality(result, pair)
    # a baseline from before DIA sources existed has neither the config nor the catalog
    dia_config = getattr(config, "dia", None)
    dia_costs = (
        _dia_costs(result, dia_config.cutout_size)
        if dia_config is not None and dia_config.enabled
        else {}
    )
    stages = dict(result.timings)
    if mode == "plain":
        stages = {"read": t_read, **stages}
    queue.put(
        {
            "size": size,
            "mode": mode,
            "spatially_varying": spatially_varying,
            "wall_s": wall,
            "cpu_s": cpu,
            "stages": stages,
            "fft_passes": passes,
            "peak_rss_gb": peak,
            "rss_before_gb": rss_before,
            "quality": quality,
            "chosen_mode": result.mode,
            "simulated_in_process": simulated_here,
            "code": root or "this checkout",
            "dia": dia,
            **dia_costs,
        }
    )


def _dia_costs(result, size: int) -> dict:
    """Number of DIA sources, seconds to gather the cutout triplets of all of them, and
    milliseconds to encode one triplet as FITS + PNG (median of up to 20 sources)."""
    from core.cutouts import cutouts, result_images, triplet_fits, triplet_png

    catalog = getattr(result, "dia_sources", None)
    if catalog is None or len(catalog) == 0:
        return {"n_dia": 0, "gather_s": 0.0, "encode_ms": 0.0}
    images = result_images(result)
    t0 = time.perf_counter()
    cut = cutouts(images, catalog["x"], catalog["y"], size)
    gather = time.perf_counter() - t0
    encode = []
    for k in range(min(20, len(catalog))):
        t0 = time.perf_counter()
        triplet_fits(cut, k)
        triplet_png(cut, k)
        encode.append(time.perf_counter() - t0)
    return {
        "n_dia": len(catalog),
        "gather_s": gather,
        "encode_ms": 1e3 * statistics.median(encode),
    }


def _dia_share(run: dict) -> float:
    """(detect + gather) / (wall - detect): the detect stage over the rest of the run.
    What the catalog adds is ``dia_added``, from the runs without it (`_added_by_dia`)."""
    detect = run["stages"].get("detect", 0.0)
    return (detect + run.get("gather_s", 0.0)) / max(run["wall_s"] - detect, 1e-9)


def _hotpants_case(size: int, pair_dir: str, binary: str, queue) -> None:
    """HOTPANTS on the round's bare FITS (`_write_plain`); wall and peak RSS of its process."""
    import numpy as np
    from astropy.io import fits

    folder = Path(pair_dir)
    science_path, template_path = _plain_paths(folder)
    with tempfile.TemporaryDirectory() as tmp:
        args = [binary]
        for flag, path in (("i", science_path), ("t", template_path)):
            image, header = fits.getdata(path, header=True)
            args += [
                f"-{flag}g", str(float(header.get("GAIN", 1.0))),
                f"-{flag}r", str(float(header.get("RDNOISE", 0.0))),
                f"-{flag}l", str(float(np.nanmin(image)) - 1.0),
                f"-{flag}u", str(float(header.get("SATURATE", np.nanmax(image) + 1.0))),
            ]  # fmt: skip
        args += ["-inim", str(science_path), "-tmplim", str(template_path)]
        args += ["-outim", str(Path(tmp) / "diff.fits"), "-r", "10", "-rss", "15", "-v", "0"]
        timer = shutil.which("time") or "/usr/bin/time"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [timer, "-f", "%M", *args], capture_output=True, text=True, timeout=3600
        )
        wall = time.perf_counter() - t0
    lines = (proc.stderr or "").strip().splitlines()
    peak_kb = float(lines[-1]) if lines and lines[-1].isdigit() else float("nan")
    queue.put(
        {
            "size": size,
            "mode": "hotpants",
            "wall_s": wall,
            "peak_rss_gb": peak_kb / 1024**2,
            "status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
        }
    )


def _fft_floor_case(size: int, queue) -> None:
    """8 float32 real-FFT pairs of the frame: whole, and in 512-px tiles on all cores."""
    import numpy as np
    import scipy.fft as sfft

    from core.parallel import n_threads, thread_map

    rng = np.random.default_rng(0)
    frame = rng.normal(size=(size, size)).astype(np.float32)
    workers = n_threads()
    t0 = time.perf_counter()
    for _ in range(8):
        sfft.irfft2(sfft.rfft2(frame, workers=workers), s=frame.shape, workers=workers)
    whole = time.perf_counter() - t0
    tile = min(512, size)
    corners = [(y, x) for y in range(0, size, tile) for x in range(0, size, tile)]

    def one(corner):
        y, x = corner
        block = frame[y : y + tile, x : x + tile]
        sfft.irfft2(sfft.rfft2(block, workers=1), s=block.shape, workers=1)

    t0 = time.perf_counter()
    for _ in range(8):
        thread_map(one, corners)
    tiled = time.perf_counter() - t0
    queue.put({"size": size, "mode": "fft floor", "wall_s": whole, "tiled_s": tiled})


def _in_process(target, *args) -> dict:
    """``target(*args, queue)`` in a fresh process; the row it puts, or RuntimeError when
    the process ends without one (a crashed case stops the bench instead of hanging it)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        alive = proc.is_alive()  # before the wait: a row put just before the end is read
        try:
            row = queue.get(timeout=1.0)
            break
        except Empty:
            if not alive:
                raise RuntimeError(
                    f"{target.__name__}{args} ended (exit {proc.exitcode}) without a result"
                ) from None
    proc.join()
    return row


def _median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    row["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    row["wall_all_s"] = [round(r["wall_s"], 2) for r in runs]
    if "stages" in row:
        row["stages"] = {
            k: statistics.median(r["stages"].get(k, 0.0) for r in runs) for k in row["stages"]
        }
        row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
        row["dia_share_all"] = [round(100 * _dia_share(r), 1) for r in runs]
        row["dia_share"] = statistics.median(_dia_share(r) for r in runs)
        for key in ("gather_s", "encode_ms"):
            row[key] = statistics.median(r.get(key, 0.0) for r in runs)
    if "tiled_s" in row:
        row["tiled_s"] = statistics.median(r["tiled_s"] for r in runs)
    if "peak_rss_gb" in row:
        row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    return row


def run(
    sizes,
    modes,
    repeat: int,
    seed: int,
    spatial: bool,
    hotpants: str | None,
    baseline: str | None = None,
    transients: int | None = None,
    dia_off: bool = True,
) -> list[dict]:
    rows = []
    trees = [baseline, None] if baseline else [None]
    for size in sizes:
        cases = []
        for mode in modes:
            for spatially_varying in [False, True] if spatial and mode != "plain" else [False]:
                for root in trees:
                    cases.append((_run_case, (size, mode, spatially_varying, root, True)))
            if dia_off:
                # the same run without the DIA catalog: what the catalog adds to the wall
                cases.append((_run_case, (size, mode, False, None, False)))
        if hotpants:
            cases.append((_hotpants_case, (hotpants,)))
        cases.append((_fft_floor_case, (size,)))
        # rounds interleave the cases, so a busy spell of the machine hits all of them;
        # each round's pair is simulated once per checkout (a baseline's exposures are
        # its own classes), in a process of its own, for every case of the round
        runs: list[list[dict]] = [[] for _ in cases]
        for k in range(repeat):
            with tempfile.TemporaryDirectory(prefix="alsub-bench-") as work:
                folders = {root: str(Path(work) / str(i)) for i, root in enumerate(trees)}
                for root, folder in folders.items():
                    Path(folder).mkdir()
                    _in_process(_pair_files, size, seed + k, folder, root, transients)
                # the pair's files (~1.3 GB at 4096) written back and the simulating
                # process's memory handed back before any case is timed: both ran into
                # the round's first case (`_SETTLE_S`)
                os.sync()
                time.sleep(_SETTLE_S * (size / 4096) ** 2)
                # every other round the other way round: with an even --repeat, what a
                # case's place in the round costs or gains falls on every case alike
                order = range(len(cases)) if k % 2 == 0 else reversed(range(len(cases)))
                for i in order:
                    target, args = cases[i]
                    if target is _run_case:
                        size_, mode, spatially_varying, root, dia = args
                        args = (size_, mode, folders[root], spatially_varying, root, dia)
                    elif target is _hotpants_case:
                        args = (size, folders[None], *args)
                    runs[i].append(_in_process(target, *args))
        size_rows = [_median_row(case_runs) for case_runs in runs]
        for row in size_rows:
            _added_by_dia(row, size_rows)
            rows.append(row)
            _print_row(row)
    return rows


def _added_by_dia(row: dict, rows: list[dict]) -> None:
    """On this checkout's catalog-on row, what the catalog adds to the wall over the
    same mode's catalog-off row (medians of the rounds, which interleave the two)."""
    if not row.get("dia") or row.get("code") != "this checkout" or row["spatially_varying"]:
        return
    for off in rows:
        if off.get("dia") is False and off["mode"] == row["mode"] and off["code"] == row["code"]:
            row["dia_off_wall_s"] = off["wall_s"]
            row["dia_added"] = row["wall_s"] / off["wall_s"] - 1.0


def _print_row(row: dict) -> None:
    head = f"{row['size']:>5} {row['mode']:<16}"
    if row["mode"] == "fft floor":
        print(f"{head} 8 pairs whole={row['wall_s']:.2f}s tiled={row['tiled_s']:.2f}s", flush=True)
        return
    if row["mode"] == "hotpants":
        print(
            f"{head} wall={row['wall_s']:.2f}s runs={row['wall_all_s']} "
            f"peak={row['peak_rss_gb']:.2f}GB {row['status']}",
            flush=True,
        )
        return
    stages = " ".join(f"{k}={v:.2f}" for k, v in row["stages"].items() if not k.startswith("run"))
    q = row["quality"]
    if row.get("code") != "this checkout":
        head += f" [{row.get('code')}]"
    if row.get("dia") is False:
        head += " [DIA off]"
    print(
        f"{head} sv={int(row['spatially_varying'])} ({row['chosen_mode']}) "
        f"wall={row['wall_s']:.2f}s runs={row['wall_all_s']} cpu={row['cpu_s']:.1f}s "
        f"peak={row['peak_rss_gb']:.2f}GB fft={row['fft_passes']:.1f} | {stages} | "
        + " ".join(f"{k}={v:.3f}" for k, v in q.items() if isinstance(v, float)),
        flush=True,
    )
    if "n_dia" not in row:
        return  # a baseline without DIA sources
    print(
        f"{head} DIA n={row['n_dia']} detect={row['stages'].get('detect', 0.0):.2f}s "
        f"gather={row['gather_s']:.2f}s encode={row['encode_ms']:.0f}ms/source "
        f"detect/rest%={100 * row['dia_share']:.1f} runs={row['dia_share_all']}"
        + (
            f" | wall off {row['dia_off_wall_s']:.2f}s added={100 * row['dia_added']:.1f}%"
            if "dia_added" in row
            else ""
        ),
        flush=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument(
        "--modes", nargs="+", default=["auto", "preconvolve"], choices=[*TASK_MODES, "plain"]
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--no-spatial",
        dest="spatial",
        action="store_false",
        help="skip the spatially varying decorrelation runs",
    )
    parser.add_argument(
        "--hotpants",
        default=os.environ.get("ALSUB_HOTPANTS") or shutil.which("hotpants"),
        help="HOTPANTS binary to time beside alsub (default: ALSUB_HOTPANTS or PATH)",
    )
    parser.add_argument("--no-hotpants", dest="hotpants", action="store_const", const=None)
    parser.add_argument(
        "--baseline",
        help="also run every alsub case with the code of this checkout (e.g. of main), "
        "interleaved with this one's, for before/after ratios in one run",
    )
    parser.add_argument(
        "--transients",
        type=int,
        help="transients injected per pair (default: about 20 per 512 x 512, a dense test "
        "field; the DIA cost grows with the sources measured)",
    )
    parser.add_argument(
        "--no-dia-off",
        dest="dia_off",
        action="store_false",
        help="skip the runs without the DIA catalog (what the catalog adds to the wall)",
    )
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(
        args.sizes,
        args.modes,
        args.repeat,
        args.seed,
        args.spatial,
        args.hotpants,
        args.baseline,
        args.transients,
        args.dia_off,
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
