"""Is the preconvolve score worse than the difference, or does the figure differ?

    python -m bench.score_vs_difference                 # the 12 REFERENCE.md pairs
    python -m bench.score_vs_difference --pairs decam_d saao_0156
    python -m bench.score_vs_difference --hotpants /tmp/hotpants/hotpants   # and HOTPANTS's

REFERENCE.md's star chi2 (median over bright stars of mean(D^2/V) within one FWHM)
was made for differences. A score image is a matched filter: a star residual of
matched-filter S/N s gives chi2 ~ 1 + s^2 at the star whatever the pixel noise, so
the score's chi2 grows with the residual's *integrated* significance, about the
noise-equivalent area (NEA) times a difference's per-pixel excess. The comparable
figure for a score is the auto-mode difference seen through the same filter: D
correlated with the science PSF P that preconvolve mode used, its variance V
correlated with P^2 (exact for the decorrelated, white difference). This prints,
for each pair, the three figures of alsub's auto difference, of that filtered
difference and of the preconvolve score, all measured on the same sky, stars and
target (`core.evaluate.reference_figures`). With ``--hotpants`` HOTPANTS's difference
is filtered the same way; its noise image ignores the correlation its convolution
made, so its filtered variance is scaled to unit scatter on the sky first (the
empirical calibration REFERENCE.md uses for its S/N). When the score's figures match the
filtered difference's, the score is as good as the subtraction it came from and
any shortfall against HOTPANTS's difference is the figure's, not the score's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench.real_data import HOTPANTS_REFERENCE, PAIRS, load_pair, pair_figures, run_hotpants
from core.config import SubtractionConfig
from core.evaluate import Output, output_valid, reference_field
from core.subtract import run_subtraction


def _through(output: Output, p: np.ndarray) -> Output:
    """``output`` correlated with ``p``, its variance with ``p**2`` (exact for white noise)."""
    valid = output.usable()
    d = np.where(valid, output.image, 0.0).astype(np.float64)
    v = np.where(valid, output.variance, np.median(output.variance[valid])).astype(np.float64)
    return Output(
        ndimage.correlate(d, p, mode="constant"),
        ndimage.correlate(v, p * p, mode="constant"),
        ndimage.minimum_filter(valid, size=p.shape, mode="constant"),
        score=True,
    )


def figures(name: str, hotpants: str | None = None) -> dict[str, dict[str, float]]:
    """Figures of the auto difference, the P-filtered auto difference and the score."""
    pair = load_pair(name)
    base = {"registration": {"mode": "none"}} if pair.preregistered else {}
    runs = {
        mode: run_subtraction(
            pair.science.copy(),
            pair.template.copy(),
            SubtractionConfig.model_validate({**base, "mode": mode}),
        )
        for mode in ("auto", "preconvolve")
    }
    score = runs["preconvolve"]
    psf = score.matched_science.psf  # the science PSF preconvolve mode filtered with
    position = psf.average_position or pair.science.bbox_center()
    p = np.asarray(psf.kernel_image(*position), np.float64)
    p /= p.sum()
    diff = runs["auto"].output
    auto = Output(diff.image, diff.variance, output_valid(diff))
    outputs = {
        "auto": auto,
        "auto through P": _through(auto, p),
        "preconvolve": Output(
            score.output.image, score.output.variance, output_valid(score.output), score=True
        ),
    }
    if hotpants:
        work = Path(tempfile.mkdtemp(prefix="alsub-svd-"))
        try:
            run = run_hotpants(pair, hotpants, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if run["status"] == "ok":
            filtered = _through(run["output"], p)
            field = reference_field(
                pair.science.image,
                pair.template.image,
                pair.fwhm,
                valid=filtered.usable(),
                saturated=pair.saturated,
            )
            sky = field.sky & filtered.usable()
            z = filtered.image[sky] / np.sqrt(filtered.variance[sky])
            scale = float(np.median(np.abs(z - np.median(z)))) * 1.4826
            filtered.variance = filtered.variance * scale**2
            outputs["HOTPANTS through P"] = filtered
    return pair_figures(pair, outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*", default=[p for p in PAIRS if p != "jwst_plain"])
    parser.add_argument("--hotpants", default=None, help="HOTPANTS binary: filter its too")
    args = parser.parse_args(argv)
    head = "| pair | HOTPANTS chi2 (REFERENCE.md) | auto | auto through P | preconvolve |"
    if args.hotpants:
        head += " HOTPANTS through P |"
    print("noise / star chi2 of each output, measured on the same sky and stars")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in args.pairs:
        f = figures(name, args.hotpants)
        cells = [f"{f[k]['noise']:.3f} / {f[k]['star_chi2']:.3g}" for k in f]
        print(
            f"| {name} | {HOTPANTS_REFERENCE[name][2]:.3g} | " + " | ".join(cells) + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
