"""Benchmark: registration of the raw SAAO frames onto 0100, against the same pairs shifted by hand.

    python -m bench.register

For each frame: the offset the registration finds (template pixel minus science pixel
at the frame centre) beside the one in frames.csv, matched stars and their rms, then
noise ratio, microlensing-target S/N (matched filter over its empirical scatter, as
../shared/data/real/REFERENCE.md measures it) and star chi2 of a default subtraction
(variance scaling off until the lead's fix lands) beside the same subtraction of the
template warped by the frames.csv offset with registration off, and the wall time.
"""

from __future__ import annotations

import time

import numpy as np

from core.config import SubtractionConfig
from core.io import read_exposure
from core.subtract import run_subtraction
from core.warp import PixelMap, warp_exposure
from tests.test_register import SAAO, SAAO_CONFIG, _frames, _matched_filter_snr


def main() -> None:
    frames = _frames()
    template = read_exposure(SAAO / "AKB13475I0100.fits.gz")
    print(
        "| frame | found shift (x, y) px | frames.csv | matched | rms px | register s | "
        "subtract s | noise | by hand | target S/N | by hand | star chi2 | by hand |"
    )
    print("|" + "---|" * 13)
    for frame in ("0101", "0103", "0156", "0028", "0015"):
        row = frames[frame]
        science = read_exposure(SAAO / f"AKB13475I{frame}.fits.gz")
        t0 = time.perf_counter()
        ours = run_subtraction(science, template, SubtractionConfig.model_validate(SAAO_CONFIG))
        wall = time.perf_counter() - t0
        shift = PixelMap.affine(np.eye(2), (-float(row["dx_pix"]), -float(row["dy_pix"])))
        hand = run_subtraction(
            science,
            warp_exposure(template, shift, science.shape),
            SubtractionConfig.model_validate({**SAAO_CONFIG, "registration": {"mode": "none"}}),
        )
        x, y, fwhm = (float(row[k]) for k in ("target_col0", "target_row0", "pfwhm_pix"))
        g = ours.metrics["registration"]
        print(
            f"| {frame} | {g['shift_at_centre'][0]:.3f}, {g['shift_at_centre'][1]:.3f} | "
            f"{-float(row['dx_pix']):.2f}, {-float(row['dy_pix']):.2f} | {g['n_matched']} | "
            f"{g['rms_px']:.3f} | {ours.timings['register']:.2f} | {wall:.1f} | "
            f"{ours.metrics['noise_ratio']:.3f} | {hand.metrics['noise_ratio']:.3f} | "
            f"{_matched_filter_snr(ours.difference, x, y, fwhm):.1f} | "
            f"{_matched_filter_snr(hand.difference, x, y, fwhm):.1f} | "
            f"{ours.metrics['star_residual_chi2_median']:.2f} | "
            f"{hand.metrics['star_residual_chi2_median']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
