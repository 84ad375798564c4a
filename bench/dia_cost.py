"""Benchmark: what the DIA products add to a subtraction as a user runs it (issue 10).

    python -m bench.dia_cost                       # 4096 x 4096, 4 rounds
    python -m bench.dia_cost --sizes 2048 4096 --rounds 6

``alsub subtract SCIENCE TEMPLATE -o OUT --products DIR`` (a fresh process, files in
and out, as the CLI runs for a user) with the DIA catalog on (the default) and off
(``dia.enabled`` false in a ``--config`` file), on one simulated pair per size
(``alsub simulate``: MEF files with variance, mask and PSF; about 20 transients per
512 x 512, ~1200 DIA sources at 4096). Each round runs on, off, off, on (ABBA: a drift
of the machine's load hits both alike). Printed per size, medians of the rounds:

* ``wall``: the process from start to exit (imports, reading, subtraction, writing);
* ``run``: the summary line's ``seconds=`` (reading, subtraction and products written,
  imports excluded);
* ``added``: (on - off) / off of each.

`bench.subtract`'s ``dia%`` is the stricter figure: the DIA stage over the core
subtraction alone, from exposures already in memory (no reading, no writing).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.service import PY, REPO, _env, bench_folder, make_pair

_SECONDS = re.compile(r"seconds=([0-9.]+)")


def _no_dia_config(folder: Path) -> Path:
    """The default config with the DIA catalog off, as JSON for ``--config``."""
    shown = subprocess.run(
        [PY, "-m", "app.cli", "config"],
        env=_env(),
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    config = json.loads(shown.stdout)
    config["dia"]["enabled"] = False
    path = folder / "no_dia.json"
    path.write_text(json.dumps(config))
    return path


def _subtract(pair: dict[str, Path], folder: Path, config: Path | None) -> tuple[float, float]:
    """One ``alsub subtract --products`` in a fresh process: (wall s, its ``seconds=``)."""
    products = folder / "products"
    shutil.rmtree(products, ignore_errors=True)
    command = [PY, "-m", "app.cli", "subtract", str(pair["science"]), str(pair["template"])]
    command += ["-o", str(folder / "difference.fits"), "--products", str(products)]
    if config is not None:
        command += ["--config", str(config)]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=_env(), cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = _SECONDS.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no seconds= in the summary line: {done.stdout!r}")
    return wall, float(found.group(1))


def run(sizes: list[int], rounds: int, root: Path) -> list[dict]:
    off_config = _no_dia_config(root)
    rows = []
    for size in sizes:
        pair = make_pair(root / f"pair-{size}", size, seed=size % 97)
        times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
        for k in range(rounds):
            for label in ("on", "off", "off", "on"):
                config = None if label == "on" else off_config
                times[label].append(_subtract(pair, root, config))
            print(
                f"{size} round {k}: on "
                + ", ".join(f"{w:.2f}/{s:.2f}" for w, s in times["on"][-2:])
                + " off "
                + ", ".join(f"{w:.2f}/{s:.2f}" for w, s in times["off"][-2:])
                + " (wall/run s)",
                flush=True,
            )
        row = {"size": size}
        for index, name in ((0, "wall"), (1, "run")):
            on = statistics.median(t[index] for t in times["on"])
            off = statistics.median(t[index] for t in times["off"])
            row[name] = (on, off, (on - off) / off)
        rows.append(row)
        print(
            f"{size} medians of {2 * rounds}: "
            + "  ".join(
                f"{name} on {row[name][0]:.2f} s off {row[name][1]:.2f} s "
                f"added {100 * row[name][2]:.1f}%"
                for name in ("wall", "run")
            ),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dia_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096])
    parser.add_argument("--rounds", type=int, default=4, help="ABBA rounds per size")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (pairs kept between runs)")
    args = parser.parse_args(argv)
    with bench_folder(args.keep, "alsub-bench-dia-") as root:
        run(args.sizes, args.rounds, root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
