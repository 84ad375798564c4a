"""Writing a subtraction's products: the CLI and the worker share this one writer.

Every file is written atomically (temporary file, then rename), so a failure
never leaves a partial product behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from astropy.io import fits

from .diasources import catalog_hdulist
from .io import file_mode, write_exposure, write_hdulist_atomic

__all__ = ["write_difference", "write_products", "metrics_header", "json_safe", "PRODUCT_NAMES"]

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
    "n_kernel_sources": "NKSRC",
    "kernel_size": "KSIZE",
    "science_psf_fwhm": "SCIFWHM",
    "template_psf_fwhm": "TMPFWHM",
    "template_coverage_percent": "COVERAGE",
    "noise_ratio": "NOISERAT",
    "noise_mean": "NOISEMEA",
    "star_residual_chi2_median": "STARCHI2",
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


def _background_hdulist(background, exposure) -> fits.HDUList:
    """Coefficient table plus the model evaluated on the output's pixel grid (``IMAGE``)."""
    hdul = background.to_hdulist()
    image = fits.ImageHDU(background.image(exposure.shape, exposure.xy0), name="IMAGE")
    image.header["LTV1"], image.header["LTV2"] = -exposure.xy0[0], -exposure.xy0[1]
    hdul.append(image)
    return hdul


def write_products(result, outdir) -> dict[str, Path]:
    """Write every product of ``result`` into ``outdir``; return name -> path.

    Files: ``difference.fits`` or ``score.fits``, ``matched_template.fits``,
    ``matched_science.fits``, ``kernel.fits``, ``background.fits``, ``metrics.json``,
    ``dia_sources.fits`` when DIA sources were measured, and ``warped_template.fits``
    when the result keeps it (``registration.write_warped_template``).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths[result.output_name] = write_difference(result, outdir / f"{result.output_name}.fits")
    for name in ("matched_template", "matched_science", "warped_template"):
        exposure = getattr(result, name, None)
        if exposure is not None:
            paths[name] = outdir / f"{name}.fits"
            write_exposure(exposure, paths[name])
    if result.psf_matching_kernel is not None:
        paths["kernel"] = outdir / "kernel.fits"
        result.psf_matching_kernel.write(paths["kernel"])
    if result.fitted_background is not None:
        paths["background"] = outdir / "background.fits"
        write_hdulist_atomic(
            _background_hdulist(result.fitted_background, result.output), paths["background"]
        )
    if getattr(result, "dia_sources", None) is not None:
        paths["dia_sources"] = outdir / "dia_sources.fits"
        write_hdulist_atomic(catalog_hdulist(result.dia_sources), paths["dia_sources"])
    paths["metrics"] = outdir / "metrics.json"
    _write_json_atomic(result.metrics, paths["metrics"])
    return paths
