"""Writing a subtraction's products: the CLI and the worker share this one writer.

Every file is written atomically (temporary file, then rename), so a failure
never leaves a partial product behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .diasources import catalog_hdulist
from .errors import InvalidConfigError
from .io import file_mode, write_exposure, write_hdulist_atomic
from .parallel import thread_map
from .position_flags import EXTRAPOLATED_ORDER, KERNEL_REACH

__all__ = [
    "write_difference",
    "write_products",
    "read_kernel_sources",
    "metrics_header",
    "json_safe",
    "PRODUCT_NAMES",
]

#: Products a result can have, besides metrics.json.
PRODUCT_NAMES = (
    "difference",
    "score",
    "matched_template",
    "matched_science",
    "kernel",
    "background",
    "warped_template",
    "dia_sources",
)

# metric -> short header keyword (HIERARCH ALSUB <key>)
_HEADER_KEYS = {
    "mode": "MODE",
    "kernel_sum": "KSUM",
    "flux_ratio": "FLUXRAT",
    "n_kernel_sources": "NKSRC",
    "kernel_size": "KSIZE",
    "science_psf_fwhm": "SCIFWHM",
    "template_psf_fwhm": "TMPFWHM",
    "template_coverage_percent": "COVERAGE",
    "noise_ratio": "NOISERAT",
    "noise_mean": "NOISEMEA",
    "star_residual_chi2_median": "STARCHI2",
    "star_residual_fraction": "STARRES",
    "kernel_psf_width_ratio": "KPSFWID",
    "psf_sharpening_ratio": "SHARPRAT",
    "differenceFootprintRatioMean": "FPRATIO",
    "differenceFootprintSkyRatioMean": "FPSKYRAT",
    "diffim_limiting_magnitude": "MAGLIM",
    "n_dia_sources": "NDIASRC",
}


def json_safe(value: Any) -> Any:
    """Metrics with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_header(metrics: dict[str, Any]) -> fits.Header:
    """The headline metrics as ``HIERARCH ALSUB <KEY>`` cards."""
    header = fits.Header()
    for name, key in _HEADER_KEYS.items():
        value = json_safe(metrics.get(name))
        if value is not None:
            header[f"HIERARCH ALSUB {key}"] = (value, name)
    quality = metrics.get("quality")
    if isinstance(quality, dict):
        header["HIERARCH ALSUB QUALITY"] = (str(quality.get("verdict")), "good, suspect or bad")
        for reason in quality.get("reasons", []):
            header.add_comment(f"alsub quality: {reason}")
    return header


def write_difference(result, path) -> Path:
    """Write the main product (difference or score) in the MEF layout with metrics in its header."""
    path = Path(path)
    write_exposure(result.output, path, extra_header=metrics_header(result.metrics))
    return path


def _write_json_atomic(data: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(json_safe(data), handle, indent=2, allow_nan=False)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: HDU of kernel.fits with the kernel sources' parent positions (`read_kernel_sources`).
_KERNEL_SOURCES_HDU = "SOURCES"
#: Its header card of the spatial order fitted on them alone (`EXTRAPOLATED_ORDER`).
_EXTRAPOLATED_ORDER_CARD = "EXTORDER"
#: And of the kernel's reach (`KERNEL_REACH`).
_KERNEL_REACH_CARD = "KREACH"


def _kernel_hdulist(result) -> fits.HDUList:
    """The kernel's product, and the positions of the kernel sources its fit used with
    the spatial order fitted on them alone and the kernel's reach: forced photometry
    later flags positions far outside their hull, and around saturated stars, as the
    catalog does."""
    hdul = result.psf_matching_kernel.to_hdulist()
    sources = getattr(result, "kernel_sources", None)
    if sources is not None and {"x", "y"} <= set(sources.colnames):
        columns = {name: np.asarray(sources[name], dtype=np.float64) for name in ("x", "y")}
        hdu = fits.BinTableHDU(Table(columns), name=_KERNEL_SOURCES_HDU)
        order = sources.meta.get(EXTRAPOLATED_ORDER)
        if order is not None:
            comment = "spatial order fitted on these sources alone"
            hdu.header[_EXTRAPOLATED_ORDER_CARD] = (int(order), comment)
        reach = sources.meta.get(KERNEL_REACH)
        if reach is not None:
            hdu.header[_KERNEL_REACH_CARD] = (int(reach), "kernel reach (px): saturated stars")
        hdul.append(hdu)
    return hdul


def read_kernel_sources(path) -> Table | None:
    """The kernel sources (parent ``x``, ``y``) of a kernel.fits product, with the
    spatial order fitted on them alone in meta (`EXTRAPOLATED_ORDER`, when written) and
    the kernel's reach (`KERNEL_REACH`); None when it holds none (written before
    they were kept)."""
    with fits.open(path) as hdul:
        if _KERNEL_SOURCES_HDU not in hdul:
            return None
        hdu = hdul[_KERNEL_SOURCES_HDU]
        table = Table(hdu.data)
        if _EXTRAPOLATED_ORDER_CARD in hdu.header:
            table.meta[EXTRAPOLATED_ORDER] = int(hdu.header[_EXTRAPOLATED_ORDER_CARD])
        if _KERNEL_REACH_CARD in hdu.header:
            table.meta[KERNEL_REACH] = int(hdu.header[_KERNEL_REACH_CARD])
        return table


def _background_hdulist(background, exposure) -> fits.HDUList:
    """Coefficient table plus the model evaluated on the output's pixel grid (``IMAGE``)."""
    hdul = background.to_hdulist()
    image = fits.ImageHDU(background.image(exposure.shape, exposure.xy0), name="IMAGE")
    image.header["LTV1"], image.header["LTV2"] = -exposure.xy0[0], -exposure.xy0[1]
    hdul.append(image)
    return hdul


def write_products(result, outdir, names: Collection[str] | None = None) -> dict[str, Path]:
    """Write every product of ``result`` (or those in ``names``) into ``outdir``; name -> path.

    Files: ``difference.fits`` or ``score.fits``, ``matched_template.fits``,
    ``matched_science.fits``, ``kernel.fits``, ``background.fits``, ``metrics.json``,
    ``dia_sources.fits`` when DIA sources were measured, and ``warped_template.fits``
    when the result keeps it (``registration.write_warped_template``). ``names``
    (product names, ``metrics`` included) lets a caller write the products in turns,
    e.g. the difference first; a name that is no product raises.

    Raises
    ------
    InvalidConfigError
        A name in ``names`` that is neither in `PRODUCT_NAMES` nor ``metrics``.
    """
    unknown = sorted(set(names or ()) - {*PRODUCT_NAMES, "metrics"})
    if unknown:
        # a misspelt name was skipped without a word: the file was simply missing
        raise InvalidConfigError(
            f"no product named {', '.join(map(repr, unknown))}: the names are "
            f"{', '.join(PRODUCT_NAMES)} and metrics"
        )
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    # name -> (file, writer); each writer builds its HDUs only when it runs
    plan: dict[str, tuple[Path, Any]] = {}
    path = outdir / f"{result.output_name}.fits"
    plan[result.output_name] = (path, partial(write_difference, result, path))
    for name in ("matched_template", "matched_science", "warped_template"):
        exposure = getattr(result, name, None)
        if exposure is not None:
            path = outdir / f"{name}.fits"
            plan[name] = (path, partial(write_exposure, exposure, path))
    if result.psf_matching_kernel is not None:
        path = outdir / "kernel.fits"
        plan["kernel"] = (
            path,
            lambda path=path: write_hdulist_atomic(_kernel_hdulist(result), path),
        )
    if result.fitted_background is not None:
        path = outdir / "background.fits"
        plan["background"] = (
            path,
            lambda path=path: write_hdulist_atomic(
                _background_hdulist(result.fitted_background, result.output), path
            ),
        )
    if getattr(result, "dia_sources", None) is not None:
        path = outdir / "dia_sources.fits"
        plan["dia_sources"] = (
            path,
            lambda path=path: write_hdulist_atomic(catalog_hdulist(result.dia_sources), path),
        )
    path = outdir / "metrics.json"
    plan["metrics"] = (path, partial(_write_json_atomic, result.metrics, path))
    if names is not None:
        plan = {name: entry for name, entry in plan.items() if name in names}
    # the files are independent: encode and write them on all cores
    thread_map(lambda entry: entry[1](), list(plan.values()))
    paths = {name: entry[0] for name, entry in plan.items()}
    return paths
