"""Benchmark: DIA-source quality against simulation truth on many pixels.

    python -m bench.diasources                    # 3 scenarios x 2048^2 x 2 seeds (25 Mpx)
    python -m bench.diasources --size 1024 --seeds 1

Each scenario (sharper template, sharper science, varying Moffat PSF on a sky
gradient) gets positive and negative transients; the catalog of every
subtraction is matched to the truth. Printed per scenario and in total:
completeness of isolated transients with expected S/N >= 7 (expected S/N = true
flux over the forced-photometry error at the true position) and how many of those found
are flagged ``sharp`` (a broker drops them as cosmic rays), false detections
per million pixels on empty sky and within 2 FWHM of a constant star, median
flux ratio and position rms of detections with S/N >= 20, and forced photometry
at the true positions (median flux ratio at expected S/N >= 20, robust std of
the pulls). `evaluate` is also what tests/test_diasources.py asserts on.
With ``--mode preconvolve`` the expected S/N and forced figures are measured on an
auto subtraction of the same pair (a score is no difference).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from astropy.stats import mad_std
from scipy.spatial import cKDTree

__all__ = ["evaluate", "summarise", "transient_truth", "SCENARIOS"]

SCENARIOS = ("sharper_template", "sharper_science", "varying", "wide_field")
#: Transients of each sign per million pixels.
TRANSIENTS_PER_MPX = 57


def transient_truth(pair):
    """Positions, signed fluxes on the difference (science counts) of every transient."""
    pos, neg = pair.truth["transients"], pair.truth["negative_transients"]
    x = np.concatenate([pos["x"], neg["x"]])
    y = np.concatenate([pos["y"], neg["y"]])
    flux = np.concatenate([pos["flux_science"], -np.asarray(neg["flux_science"])])
    return x, y, flux


def evaluate(pair, result, reference=None) -> dict:
    """Match a result's DIA sources to the pair's truth.

    Expected S/N and forced photometry come from ``result``'s difference, or from
    ``reference``'s (a difference of the same pair) when given: a score is no
    difference (`alsub forced` and the HTTP route refuse one).

    A transient is found when a non-dipole source of its sign lies within half a
    PSF FWHM; it is isolated when no other transient lies within 3 FWHM (closer
    ones blend, and opposite signs cancel). Detections with no transient within
    half a FWHM are false, counted as at a constant star when one is within 2 FWHM.
    """
    from core.forced import forced_photometry

    catalog = result.dia_sources
    x, y, flux = transient_truth(pair)
    forced = forced_photometry((reference or result).output, x, y)
    expected_snr = np.abs(flux) / np.asarray(forced["psf_flux_err"])
    fwhm = catalog.meta["psf_fwhm"]
    radius = 0.5 * fwhm
    cxy = np.column_stack([catalog["x"], catalog["y"]])
    txy = np.column_stack([x, y])
    if len(catalog):
        distance, index = cKDTree(cxy).query(txy)
        sign_ok = np.asarray(catalog["is_negative"])[index] == (flux < 0)
        found = (distance < radius) & sign_ok & ~np.asarray(catalog["is_dipole"])[index]
    else:  # nothing found (an empty tree's query points past the end)
        distance, index = np.full(len(x), np.inf), np.zeros(len(x), dtype=int)
        found = np.zeros(len(x), dtype=bool)
    tree = cKDTree(txy)
    isolated = tree.query(txy, k=2)[0][:, 1] > 3.0 * fwhm
    near_transient = tree.query(cxy)[0] < radius
    stars = pair.truth["stars"]
    near_star = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(cxy)[0] < 2.0 * fwhm
    return {
        "catalog": catalog,
        "forced": forced,
        "flux": flux,
        "expected_snr": expected_snr,
        "isolated": isolated,
        "found": found,
        "index": index,
        "distance": distance,
        "false_sky": int(np.count_nonzero(~near_transient & ~near_star)),
        "false_star": int(np.count_nonzero(~near_transient & near_star)),
        "pixels": pair.science.image.size,
    }


def summarise(evaluations: list[dict]) -> dict[str, float]:
    """The acceptance figures of one or several evaluations pooled."""

    def cat(key):
        return np.concatenate([np.asarray(e[key]) for e in evaluations])

    flux, snr_expected, isolated, found = (
        cat(k) for k in ("flux", "expected_snr", "isolated", "found")
    )

    def nearest(column):
        """``column`` of each transient's nearest source (NaN or False: an empty catalog)."""
        parts = []
        for e in evaluations:
            values = np.asarray(e["catalog"][column])
            if values.size:
                parts.append(values[e["index"]])
            else:
                parts.append(np.full(len(e["index"]), False if values.dtype == bool else np.nan))
        return np.concatenate(parts)

    measured_flux = nearest("psf_flux")
    measured_snr = np.abs(nearest("snr"))
    distance = cat("distance")
    sharp = nearest("flag_sharp").astype(bool)
    forced_flux = np.concatenate([np.asarray(e["forced"]["psf_flux"]) for e in evaluations])
    forced_err = np.concatenate([np.asarray(e["forced"]["psf_flux_err"]) for e in evaluations])
    mpx = sum(e["pixels"] for e in evaluations) / 1e6
    bright = (snr_expected >= 7) & isolated
    strong = found & isolated & (measured_snr >= 20)
    forced_strong = isolated & (snr_expected >= 20)

    def of(function, values) -> float:
        """``function(values)``; NaN for none (a pair without such transients)."""
        return float(function(values)) if values.size else math.nan

    return {
        "mpx": mpx,
        "n_bright_pos": int(np.count_nonzero(bright & (flux > 0))),
        "completeness_pos": of(np.mean, found[bright & (flux > 0)]),
        "n_bright_neg": int(np.count_nonzero(bright & (flux < 0))),
        "completeness_neg": of(np.mean, found[bright & (flux < 0)]),
        "n_found_sharp": int(np.count_nonzero(found & bright & sharp)),
        "false_sky_per_mpx": sum(e["false_sky"] for e in evaluations) / mpx,
        "false_star_per_mpx": sum(e["false_star"] for e in evaluations) / mpx,
        "flux_ratio_snr20": of(np.median, measured_flux[strong] / flux[strong]),
        "position_rms_snr20": of(lambda d: np.sqrt(np.mean(d**2)), distance[strong]),
        "forced_ratio": of(np.median, forced_flux[forced_strong] / flux[forced_strong]),
        "forced_pull_std": of(mad_std, ((forced_flux - flux) / forced_err)[isolated]),
    }


def _pair(name: str, size: int, seed: int):
    from core.simulate import preset, simulate_pair

    n = max(5, int(round(TRANSIENTS_PER_MPX * size * size / 1e6)))
    config = preset(name, size=size, seed=seed).model_copy(
        update={"n_transients": n, "n_negative_transients": n}
    )
    return simulate_pair(config)


def _print(label: str, s: dict) -> None:
    print(
        f"{label:<18} {s['mpx']:6.1f} Mpx | completeness + {s['completeness_pos']:.3f} "
        f"(n={s['n_bright_pos']}) - {s['completeness_neg']:.3f} (n={s['n_bright_neg']}) "
        f"sharp {s['n_found_sharp']} | "
        f"false/Mpx sky {s['false_sky_per_mpx']:.2f} star {s['false_star_per_mpx']:.2f} | "
        f"flux {s['flux_ratio_snr20']:.4f} pos_rms {s['position_rms_snr20']:.3f} | "
        f"forced {s['forced_ratio']:.4f} pull {s['forced_pull_std']:.3f}",
        flush=True,
    )


def main(argv=None) -> None:
    from core.config import SubtractionConfig
    from core.subtract import run_subtraction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--mode", default="auto")
    args = parser.parse_args(argv)
    pooled = []
    for name in SCENARIOS:
        evaluations = []
        for seed in range(args.seeds):
            pair = _pair(name, args.size, 5000 + seed)
            t0 = time.perf_counter()
            result = run_subtraction(pair.science, pair.template, SubtractionConfig(mode=args.mode))
            wall = time.perf_counter() - t0
            reference = None
            if result.score is not None:  # expected S/N and forced figures on a difference
                reference = run_subtraction(pair.science, pair.template, SubtractionConfig())
            evaluations.append(evaluate(pair, result, reference))
            print(
                f"  {name} seed {seed}: {result.mode} wall {wall:.1f}s "
                f"detect {result.timings.get('detect', 0):.2f}s n_dia {len(result.dia_sources)}",
                flush=True,
            )
        _print(name, summarise(evaluations))
        pooled += evaluations
    _print("all", summarise(pooled))


if __name__ == "__main__":
    main()
