"""Benchmark: warping a template onto another grid, against scipy's cubic spline in the same run.

    python -m bench.warp                      # 2048 and 4096, four kinds of map
    python -m bench.warp --sizes 4096 --repeat 3
    python -m bench.warp --sizes 4096 --kinds translation rotated --baseline /work/main

Times are wall and CPU seconds (all threads; less sensitive to a busy machine), each
beside same-run references: ``scipy.ndimage.map_coordinates`` (order 3) on the same
frame and an FFT floor (one forward and one inverse real 2-D FFT of the frame,
float32, scipy.fft on all cores), the cost of a single Fourier convolution.
``--baseline`` runs another source tree's warp in the same session (e.g. main's).
The plain kinds' template has no mask bits; ``masked`` (the rotated map) times the mask
path too: 3000 saturated and 1000 bad pixels, a bad column and a 16 px NO_DATA border,
and ``detected`` adds DETECTED footprints over a fifth of the pixels (8 x 8 blocks: a
dense mask, as a template with its detections in the mask has).

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
    if kind in ("masked", "detected"):
        kind = "rotated"
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


def _add_mask_bits(template, rng, detected: bool) -> None:
    """Saturated and bad pixels, a bad column, a NO_DATA border (and DETECTED footprints)."""
    ny, nx = template.shape
    mask = template.mask
    mask.ravel()[rng.integers(0, ny * nx, 3000)] |= template.bitmask(["SAT"])
    mask.ravel()[rng.integers(0, ny * nx, 1000)] |= template.bitmask(["BAD"])
    mask[:, nx // 3] |= template.bitmask(["BAD"])
    no_data = template.bitmask(["NO_DATA"])
    for edge in (np.s_[:16], np.s_[-16:], np.s_[:, :16], np.s_[:, -16:]):
        mask[edge] |= no_data
    if detected:  # footprints as 8 x 8 blocks, a fifth of them
        blocks = rng.random((-(-ny // 8), -(-nx // 8))) < 0.2
        footprints = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:ny, :nx]
        mask[footprints] |= template.bitmask(["DETECTED"])


def _timed(function, repeat: int):
    """(median wall s, median CPU s, last result) of ``repeat`` calls."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = function()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def _run_case(size: int, kind: str, repeat: int, queue, root: str | None = None) -> None:
    if root is not None:  # another tree's core (a baseline), imported before ours
        import sys

        sys.path.insert(0, root)
    from scipy import fft, ndimage

    from core.exposure import Exposure
    from core.psf import GaussianPsf
    from core.warp import warp_exposure

    rng = np.random.default_rng(1)
    x, y, flux = _stars(rng, size)
    image = _draw((size, size), x, y, flux)
    template = Exposure.from_arrays(
        image, variance=np.full(image.shape, 4.0, np.float32), psf=GaussianPsf(_SIGMA)
    )
    if kind in ("masked", "detected"):
        _add_mask_bits(template, rng, kind == "detected")
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

    ours_wall, ours_cpu, warped = _timed(
        lambda: warp_exposure(template, pixel_map, (size, size)), repeat
    )
    rss_ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    def scipy_cubic():
        u, v = pixel_map.on_grid(np.arange(size, dtype=float), np.arange(size, dtype=float))
        out = ndimage.map_coordinates(image, [v, u], order=3, mode="constant", cval=np.nan)
        out *= det
        return out

    theirs_wall, theirs_cpu, reference = _timed(scipy_cubic, repeat)

    def fft_floor():
        return fft.irfft2(fft.rfft2(image, workers=-1), s=image.shape, workers=-1)

    fft_wall, fft_cpu, _ = _timed(fft_floor, repeat)
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
            "tree": root or "this",
            "ours_s": ours_wall,
            "ours_cpu_s": ours_cpu,
            "scipy_s": theirs_wall,
            "scipy_cpu_s": theirs_cpu,
            "fft_s": fft_wall,
            "fft_cpu_s": fft_cpu,
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
        "--kinds",
        nargs="+",
        default=["translation", "near_identity", "rotated", "wcs", "masked", "detected"],
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument(
        "--baseline", help="another source tree whose warp runs in the same session"
    )
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    trees = [None] + ([args.baseline] if args.baseline else [])
    for size in args.sizes:
        for kind in args.kinds:
            for root in trees:
                queue = ctx.Queue()
                proc = ctx.Process(target=_run_case, args=(size, kind, args.repeat, queue, root))
                proc.start()
                row = queue.get()
                proc.join()
                rows.append(row)
                print(
                    f"{row['size']:>5} {row['kind']:<14} {row['tree']:<12} "
                    f"alsub wall={row['ours_s']:.2f}s cpu={row['ours_cpu_s']:.2f}s | "
                    f"scipy-cubic wall={row['scipy_s']:.2f}s cpu={row['scipy_cpu_s']:.2f}s | "
                    f"fft-floor wall={row['fft_s']:.2f}s cpu={row['fft_cpu_s']:.2f}s | "
                    f"cpu/scipy={row['ours_cpu_s'] / row['scipy_cpu_s']:.2f} "
                    f"cpu/fft={row['ours_cpu_s'] / row['fft_cpu_s']:.1f} "
                    f"peak={row['peak_rss_gb']:.2f}GB | "
                    f"error alsub={row['ours_error']:.2e} scipy={row['scipy_error']:.2e} | "
                    f"flux alsub={row['ours_flux']:.4f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
