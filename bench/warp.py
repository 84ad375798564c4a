"""Benchmark: warping a template onto another grid, against scipy's cubic spline in the same run.

    python -m bench.warp                      # 2048 and 4096, four kinds of map
    python -m bench.warp --sizes 4096 --repeat 3

Each case runs in its own process (its peak resident memory is its own). alsub's
warp does image, variance (sum of squared weights), mask (footprint growth),
PSF and noise correlation; the reference, `scipy.ndimage.map_coordinates`
(cubic B-spline, order 3, with prefilter), does the image only. Accuracy: the
input is a field of Gaussian stars (sigma 1.5 px, well sampled) drawn
analytically; the expected output is the same field drawn at the mapped
positions times the Jacobian; the error is the rms of (warped - expected) on
covered pixels, in units of the brightest star's peak, plus the flux ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import time

import numpy as np

_SIGMA = 1.5
_N_STARS = 4000


def _stars(rng, size: int):
    x = rng.uniform(10, size - 10, _N_STARS)
    y = rng.uniform(10, size - 10, _N_STARS)
    flux = 10 ** rng.uniform(2, 4, _N_STARS)
    return x, y, flux


def _draw(shape, x, y, flux, scale=1.0):
    """Gaussian stars of sigma ``_SIGMA * scale`` (flux each) on an image, in 15 px boxes."""
    image = np.zeros(shape, dtype=np.float64)
    sigma = _SIGMA * scale
    half = 7
    offsets = np.arange(-half, half + 1)
    for xc, yc, f in zip(x, y, flux, strict=True):
        ix, iy = int(round(xc)), int(round(yc))
        if ix - half < 0 or iy - half < 0 or ix + half >= shape[1] or iy + half >= shape[0]:
            continue
        gx = np.exp(-0.5 * ((ix + offsets - xc) / sigma) ** 2)
        gy = np.exp(-0.5 * ((iy + offsets - yc) / sigma) ** 2)
        image[iy - half : iy + half + 1, ix - half : ix + half + 1] += (
            f * np.outer(gy, gx) / (2 * math.pi * sigma * sigma)
        )
    return image.astype(np.float32)


def _maps(kind: str, size: int):
    """(PixelMap, description) of one benchmark case, output grid = input grid size."""
    from astropy.wcs import WCS

    from core.exposure import Exposure
    from core.warp import PixelMap

    c = (size - 1) / 2.0
    if kind == "translation":
        return PixelMap.affine(np.eye(2), (12.37, -5.61))
    if kind in ("near_identity", "rotated"):
        angle, scale = (0.01, 1.0001) if kind == "near_identity" else (30.0, 1 / 1.02)
        phi = math.radians(angle)
        m = scale * np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
        return PixelMap.affine(m, np.array([c + 3.37, c - 5.61]) - m @ np.array([c, c]))
    # two TAN projections 1"/px whose tangent points differ by 2 deg: not affine
    science_wcs = WCS(naxis=2)
    science_wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    science_wcs.wcs.crval = [150.0, 2.0]
    science_wcs.wcs.crpix = [c + 1, c + 1]
    science_wcs.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]
    template_wcs = science_wcs.deepcopy()
    template_wcs.wcs.crval = [152.0, 4.0]
    sky = science_wcs.pixel_to_world_values(c, c)
    u, v = template_wcs.world_to_pixel_values(*sky)
    template_wcs.wcs.crpix = [c + 1 - (float(u) - c) + 3.3, c + 1 - (float(v) - c) - 2.1]
    science = Exposure.from_arrays(np.zeros((8, 8)), wcs=science_wcs)
    science.image = np.zeros((size, size), np.float32)
    science.variance = science.image
    science.mask = np.zeros((size, size), np.int32)
    template = Exposure.from_arrays(np.zeros((8, 8)), wcs=template_wcs)
    template.image = science.image
    return PixelMap.from_wcs(science, template)


def _run_case(size: int, kind: str, repeat: int, queue) -> None:
    from scipy import ndimage

    from core.exposure import Exposure
    from core.psf import GaussianPsf
    from core.warp import warp_exposure

    rng = np.random.default_rng(1)
    x, y, flux = _stars(rng, size)
    image = _draw((size, size), x, y, flux)
    template = Exposure.from_arrays(
        image, variance=np.full(image.shape, 4.0, np.float32), psf=GaussianPsf(_SIGMA)
    )
    pixel_map = _maps(kind, size)
    # expected: the stars where the map puts them, Jacobian included
    inverse = np.linalg.inv(pixel_map.matrix)
    xo, yo = inverse @ (np.vstack([x, y]) - pixel_map.offset[:, None])
    if not pixel_map.is_affine:  # a few Newton steps for the exact inverse
        for _ in range(3):
            u, v = pixel_map(xo, yo)
            dxo, dyo = inverse @ (np.vstack([x - u, y - v]))
            xo, yo = xo + dxo, yo + dyo
    det = abs(np.linalg.det(pixel_map.matrix))
    scale = 1.0 / math.sqrt(det)
    expected = _draw((size, size), xo, yo, flux, scale)

    ours, theirs = [], []
    warped = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        warped = warp_exposure(template, pixel_map, (size, size))
        ours.append(time.perf_counter() - t0)
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    reference = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        u, v = pixel_map.on_grid(np.arange(size, dtype=float), np.arange(size, dtype=float))
        reference = ndimage.map_coordinates(image, [v, u], order=3, mode="constant", cval=np.nan)
        reference *= det
        theirs.append(time.perf_counter() - t0)
    assert warped is not None and reference is not None
    peak = float(expected.max())
    good = (warped.mask == 0) & np.isfinite(reference)
    inner = np.zeros_like(good)
    inner[16:-16, 16:-16] = True
    good &= inner

    def error(result):
        return float(np.sqrt(np.mean((result[good] - expected[good]) ** 2)) / peak)

    def flux_ratio(result):
        return float(result[good].sum() / expected[good].sum())

    queue.put(
        {
            "size": size,
            "kind": kind,
            "affine": pixel_map.is_affine,
            "ours_s": statistics.median(ours),
            "ours_all_s": [round(t, 2) for t in ours],
            "scipy_s": statistics.median(theirs),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "rss_after_ours_gb": rss_ours,
            "ours_error": error(warped.image),
            "scipy_error": error(reference),
            "ours_flux": flux_ratio(warped.image),
            "scipy_flux": flux_ratio(reference),
        }
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument(
        "--kinds", nargs="+", default=["translation", "near_identity", "rotated", "wcs"]
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes:
        for kind in args.kinds:
            queue = ctx.Queue()
            proc = ctx.Process(target=_run_case, args=(size, kind, args.repeat, queue))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(
                f"{row['size']:>5} {row['kind']:<14} affine={int(row['affine'])} "
                f"alsub={row['ours_s']:.2f}s {row['ours_all_s']} scipy-cubic={row['scipy_s']:.2f}s "
                f"ratio={row['ours_s'] / row['scipy_s']:.2f} peak={row['peak_rss_gb']:.2f}GB | "
                f"error alsub={row['ours_error']:.2e} scipy={row['scipy_error']:.2e} | "
                f"flux alsub={row['ours_flux']:.4f} scipy={row['scipy_flux']:.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
