"""Benchmark: cosmic rays against point-source transients under the ``sharp`` flag.

    python -m bench.cosmic_rays                        # FWHM 1.5, 2.0, 2.5, 3.5; 3 seeds
    python -m bench.cosmic_rays --fwhm 1.5,2 --seeds 2

Per science FWHM (template 0.9 of it, auto mode), cosmic rays are added to the science
only: one pixel, or a track of two or three, pixel amplitudes log-uniform so that the
difference's PSF fit reads S/N ~3-150; and point-source transients of both signs of the
same S/N range. Counted among the catalog's sources of S/N 5-100: the rays detected and
not flagged ``sharp`` and the transients flagged ``sharp``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.spatial import cKDTree

from core.simulate import preset, simulate_pair
from core.subtract import run_subtraction

__all__ = ["cosmic_ray_pair", "count", "main"]

#: Rays and transients of each sign per 512 x 512 pair (a few per 100 x 100 px).
N_RAYS, N_TRANSIENTS = 80, 40


def _tracks(rng, n: int, shape, margin: int):
    """Pixel lists of ``n`` rays: a third single pixels, a third 2-pixel and a third
    3-pixel tracks along a row, a column or a diagonal."""
    ny, nx = shape
    steps = ((0, 1), (1, 0), (1, 1), (1, -1))
    rays = []
    for k in range(n):
        x0, y0 = int(rng.integers(margin, nx - margin)), int(rng.integers(margin, ny - margin))
        dy, dx = steps[int(rng.integers(4))]
        length = 1 + k % 3
        rays.append([(y0 + i * dy, x0 + i * dx) for i in range(length)])
    return rays


def cosmic_ray_pair(fwhm: float, seed: int, size: int = 512):
    """(pair, rays): a simulated pair with transients and cosmic rays in the science."""
    config = preset("sharper_template", size=size, seed=seed)
    # a point source's PSF-fit S/N is flux sqrt(sum P^2) / sigma, sum P^2 ~ 1 / (4 pi s^2)
    sigma_px = fwhm / 2.3548
    noise = math.sqrt(1.25 * (config.science_sky.level + config.read_noise**2))
    per_snr = noise * math.sqrt(4 * math.pi) * max(sigma_px, 0.45)
    config = config.model_copy(
        update={
            "n_transients": N_TRANSIENTS,
            "n_negative_transients": N_TRANSIENTS,
            "transient_flux_min": 3.0 * per_snr,
            "transient_flux_max": 150.0 * per_snr,
            "science_psf": config.science_psf.model_copy(update={"fwhm": fwhm}),
            "template_psf": config.template_psf.model_copy(update={"fwhm": 0.9 * fwhm}),
        }
    )
    pair = simulate_pair(config)
    rng = np.random.default_rng(seed + 7919)
    rays = _tracks(rng, N_RAYS, pair.science.image.shape, 20)
    # one pixel's PSF-fit S/N is its counts P0 / (sigma sqrt(sum P^2)) ~ counts / sigma
    # at FWHM 1.5 (P0 ~ 0.32, sum P^2 ~ 0.17) and ~ counts / (2.7 sigma) at 3.5
    scale = noise * max(1.0, 2.7 * fwhm / 3.5)
    image = pair.science.image
    amplitudes = []
    for ray in rays:
        snr = math.exp(rng.uniform(math.log(3.0), math.log(150.0)))
        per_pixel = snr * scale / math.sqrt(len(ray))
        counts = per_pixel * rng.uniform(0.7, 1.3, len(ray))
        for (y, x), c in zip(ray, counts, strict=True):
            image[y, x] += c
        amplitudes.append(counts.sum())
    return pair, rays


def count(pair, rays, catalog, sharp=None) -> dict[str, int]:
    """Rays detected (positive source within 2 px of a ray pixel), those unflagged,
    transients detected (within 1 px, isolated as `bench.diasources.evaluate` has it:
    no other transient within 3 FWHM, no ray within 6 px) and those flagged, among
    sources of |S/N| 5-100. ``sharp``: flags to count (default the catalog's)."""
    sharp = np.asarray(catalog["flag_sharp"] if sharp is None else sharp, dtype=bool)
    fwhm = catalog.meta["psf_fwhm"]
    snr = np.abs(np.asarray(catalog["snr"]))
    usable = (snr >= 5) & (snr <= 100) & ~np.asarray(catalog["is_dipole"])
    xy = np.column_stack([catalog["x"], catalog["y"]])
    ray_pixels = np.array([(x, y) for ray in rays for (y, x) in ray], dtype=float)
    on_ray = cKDTree(ray_pixels).query(xy)[0] < 2.0
    on_ray &= ~np.asarray(catalog["is_negative"])
    pos, neg = pair.truth["transients"], pair.truth["negative_transients"]
    tx = np.concatenate([pos["x"], neg["x"]])
    ty = np.concatenate([pos["y"], neg["y"]])
    truth = cKDTree(np.column_stack([tx, ty]))
    isolated = truth.query(np.column_stack([tx, ty]), k=2)[0][:, 1] > 3.0 * fwhm
    distance, index = truth.query(xy)
    on_transient = (distance < 1.0) & isolated[index]
    on_transient &= cKDTree(ray_pixels).query(xy)[0] > 6.0
    rays_found = usable & on_ray & (distance >= 1.0)
    transients_found = usable & on_transient
    return {
        "rays": int(rays_found.sum()),
        "rays_unflagged": int((rays_found & ~sharp).sum()),
        "transients": int(transients_found.sum()),
        "transients_sharp": int((transients_found & sharp).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fwhm", default="1.5,2.0,2.5,3.5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    print("| FWHM | rays S/N 5-100 | rays unflagged | transients S/N 5-100 | flagged sharp |")
    print("|---|---|---|---|---|")
    for fwhm in (float(f) for f in args.fwhm.split(",")):
        total = {"rays": 0, "rays_unflagged": 0, "transients": 0, "transients_sharp": 0}
        for seed in range(args.seeds):
            pair, rays = cosmic_ray_pair(fwhm, 300 + seed, args.size)
            result = run_subtraction(pair.science, pair.template)
            for key, value in count(pair, rays, result.dia_sources).items():
                total[key] += value
        r, t = total["rays"], total["transients"]
        missed, flagged = total["rays_unflagged"], total["transients_sharp"]
        print(
            f"| {fwhm:g} | {r} | {missed} ({missed / max(r, 1):.1%}) "
            f"| {t} | {flagged} ({flagged / max(t, 1):.1%}) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
