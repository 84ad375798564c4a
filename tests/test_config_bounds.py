"""Every numeric config field is bounded: hostile values fail validation, in the CLI with exit 2."""

from __future__ import annotations

import json
import typing

import pytest
from pydantic import BaseModel, ValidationError

from app.cli import main as cli_main
from core import config as config_module
from core.config import SubtractionConfig

#: The values issue 12 sent: minutes of work, gigabytes, or an ``internal`` failure each.
HOSTILE = [
    {"sources": {"n_sky_sources": 10_000_000}},
    {"kernel": {"kernel_size": -1, "scale_by_fwhm": False}},
    {"kernel": {"kernel_size_fwhm_scaling": 1e308}},
    {"sources": {"sky_source_radius": 1e9}},
    {"kernel": {"alard_deg_gauss": [400, 2, 2]}},
    {"kernel": {"size_cell_x": 10**9}},
    {"decorrelation": {"grid_step": 10**9}},
    {"metrics": {"footprint_radius_fwhm": "NaN"}},
    {"kernel": {"bad_mask_planes": ["X" * 10_000]}},
]


def _numeric_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _numeric_fields(annotation, f"{prefix}{name}.")
        elif annotation in (int, float):
            yield f"{prefix}{name}", field


def test_every_numeric_field_has_an_upper_bound():
    models = [
        model
        for model in vars(config_module).values()
        if isinstance(model, type) and issubclass(model, BaseModel) and model is not BaseModel
    ]
    assert SubtractionConfig in models
    unbounded = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in _numeric_fields(model)
        if not any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata)
    ]
    assert unbounded == []
    assert typing.get_origin(SubtractionConfig.model_fields["mode"].annotation) is typing.Literal


@pytest.mark.parametrize("overrides", HOSTILE)
def test_hostile_values_fail_validation(overrides):
    with pytest.raises(ValidationError):
        SubtractionConfig.model_validate(overrides)


@pytest.mark.parametrize("overrides", HOSTILE[:4])
def test_cli_refuses_them_with_exit_2(overrides, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(overrides))
    missing = str(tmp_path / "never-read.fits")
    code = cli_main(
        ["subtract", missing, missing, "-o", str(tmp_path / "d.fits"), "--config", str(config)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "config" in err and "Traceback" not in err


def test_cutout_size_is_odd_and_within_the_routes_limits():
    """dia.cutout_size 64 was accepted (a cutout has no centre pixel then; the route
    refused 64) and 1023, the route's largest, refused (le=1001)."""
    assert SubtractionConfig(dia={"cutout_size": 1023}).dia.cutout_size == 1023
    for bad in (64, 3, 1025):
        with pytest.raises(ValidationError, match="cutout_size"):
            SubtractionConfig(dia={"cutout_size": bad})
