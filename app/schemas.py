"""Request and response bodies of the HTTP API (the OpenAPI contract)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import SubtractionConfig

__all__ = [
    "ErrorDetail",
    "ErrorResponse",
    "ExposureOut",
    "InputRef",
    "SourcesRef",
    "SubtractionRequest",
    "Progress",
    "JobError",
    "JobOut",
    "JobList",
    "HealthOut",
    "CheckOut",
    "ReadyOut",
    "Mode",
    "PlaneKind",
]

Mode = Literal["auto", "convolveTemplate", "convolveScience", "preconvolve"]
PlaneKind = Literal["variance", "noise", "weight", "mask", "psf"]
_SHA = "9f2c3a6b8d1e4f5a7b9c0d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code.", examples=["invalid_exposure"])
    message: str = Field(
        description="What went wrong and what to change.",
        examples=["file has no image data in any HDU"],
    )


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: ErrorDetail


class ExposureOut(BaseModel):
    """A stored exposure: its content address and what the reader found in it."""

    id: str = Field(description="sha256 of the uploaded bytes.", examples=[_SHA])
    size_bytes: int = Field(description="Size of the stored FITS file.", examples=[1056960])
    description: dict[str, Any] = Field(
        description="What the FITS reader found: shape [ny, nx], planes, PSF (FWHM in pixels), "
        "WCS presence and centre, mask-plane counts, band, sky statistics.",
        examples=[
            {
                "shape": [512, 512],
                "planes": {"IMAGE": "IMAGE", "VARIANCE": "VARIANCE", "MASK": "MASK", "PSF": "PSF"},
                "psf": {"type": "ImagePsf", "size": 25, "fwhm_pixels": 3.1},
                "wcs": {"present": True, "center_ra": 150.1, "center_dec": 2.2},
            }
        ],
    )


class InputRef(BaseModel):
    """An input exposure: a stored exposure id, or a URI the service may read."""

    model_config = ConfigDict(extra="forbid")

    exposure_id: str | None = Field(
        None, description="Id returned by POST /v1/exposures.", examples=[_SHA]
    )
    uri: str | None = Field(
        None,
        description="file:// URI under one of the configured roots (ALSUB_ALLOWED_ROOTS). "
        "Other schemes are refused.",
        examples=["file:///data/incoming/visit-1234.fits"],
    )

    planes: dict[PlaneKind, str] | None = Field(
        None,
        description="Separate planes of this input as file:// URIs under the allowed roots: "
        "variance, noise (1-sigma) or weight (at most one), mask, psf. The image and its planes "
        "are stored as one exposure (content-addressed as a whole). To upload planes instead, "
        "send them with the image to POST /v1/exposures and use the id it returns.",
        examples=[{"noise": "file:///data/incoming/visit-1234.err.fits"}],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> InputRef:
        if (self.exposure_id is None) == (self.uri is None):
            raise ValueError("give exactly one of exposure_id or uri")
        if self.planes:
            given = [k for k in ("variance", "noise", "weight") if k in self.planes]
            if len(given) > 1:
                raise ValueError(f"give only one of {', '.join(given)}")
        return self


class SourcesRef(BaseModel):
    """Optional catalog of kernel sources (x/y pixels or ra/dec degrees, optional flux)."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(None, description="file:// URI of a FITS table, CSV or JSON catalog.")
    inline: str | None = Field(
        None,
        max_length=2_000_000,
        description="The catalog itself as CSV (with a header line) or JSON text.",
        examples=["x,y,flux\n120.5,88.2,15300\n301.0,240.7,9800\n"],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> SourcesRef:
        if (self.uri is None) == (self.inline is None):
            raise ValueError("give exactly one of uri or inline")
        return self


class SubtractionRequest(BaseModel):
    """A subtraction job: science minus PSF-matched template."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "science": {"exposure_id": _SHA},
                    "template": {"uri": "file:///data/templates/field-42.fits"},
                    "mode": "auto",
                    "config": {"do_decorrelation": True},
                    "idempotency_key": "visit-1234-ccd-17",
                    "callback_url": "https://broker.example.org/alsub-done",
                }
            ]
        },
    )

    science: InputRef = Field(description="The new (science) exposure.")
    template: InputRef = Field(
        description="The reference (template) exposure of the same field; registered onto the "
        "science pixel grid when it is on another (config.registration)."
    )
    mode: Mode | None = Field(
        None,
        description="Direction of convolution, or preconvolve (score image). Overrides "
        "config.mode when given.",
        examples=["auto"],
    )
    config: SubtractionConfig = Field(
        default_factory=SubtractionConfig,
        description="The same SubtractionConfig the library and the CLI take.",
    )
    sources: SourcesRef | None = Field(None, description="Optional catalog of kernel sources.")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Retrying with the same key returns the same job instead of a new one.",
        examples=["visit-1234-ccd-17"],
    )
    callback_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://",
        description="http(s) URL POSTed the final job record when the job ends (with retries). "
        "Its host must resolve to public addresses (or ALSUB_CALLBACK_ALLOWED_NETWORKS); "
        "redirects are not followed.",
        examples=["https://broker.example.org/alsub-done"],
    )


class Progress(BaseModel):
    stage: str = Field(description="Current stage name.", examples=["convolve"])
    fraction: float = Field(description="Fraction done, 0..1.", examples=[0.5])


class JobError(BaseModel):
    code: str = Field(examples=["insufficient_sources"])
    message: str = Field(examples=["only 2 kernel sources passed the cuts; 3 are needed"])


class Quality(BaseModel):
    """The verdict on a result (core.quality)."""

    verdict: Literal["good", "suspect", "bad"] = Field(
        description="good; suspect: usable with care; bad: do not use.", examples=["suspect"]
    )
    reasons: list[str] = Field(
        description="Why it is not good, each 'level: what to check'; a 'note: ...' "
        "reason tells what the user should know and does not lower the verdict (exposure "
        "times that disagree with the flux ratio the kernel stars measured).",
        examples=[["suspect: only 4 kernel stamps were fitted (fewer than 5)"]],
    )


class JobOut(BaseModel):
    """State and results of one subtraction job."""

    id: str = Field(examples=["3b1f0c2e9a7d4c55b8e2f1a0d9c8b7a6"])
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="queued -> running -> succeeded | failed; cancelled on request."
    )
    quality: Quality | None = Field(
        None,
        description="The verdict on the result once succeeded: a succeeded job with a 'bad' "
        "verdict ran to the end but its difference should not be used.",
    )
    mode: str = Field(
        description="Direction of convolution: the chosen one (convolveTemplate, "
        "convolveScience or preconvolve) once the run has chosen, else the requested one.",
        examples=["convolveTemplate"],
    )
    requested_mode: str = Field(description="The mode the request asked for.", examples=["auto"])
    created_at: str | None = Field(None, examples=["2025-01-31T12:00:00.123456Z"])
    updated_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    science: dict[str, Any] = Field(description="exposure_id (and uri when given by URI).")
    template: dict[str, Any] = Field(description="exposure_id (and uri when given by URI).")
    sources_id: str | None = Field(None, description="sha256 of the stored source catalog.")
    config: dict[str, Any] | None = Field(
        None,
        description="The full SubtractionConfig of the job; only with ?include=config.",
    )
    progress: Progress
    timings: dict[str, float] = Field(
        description="Seconds per stage.", examples=[{"queue_wait": 0.2, "subtraction": 3.1}]
    )
    metrics: dict[str, Any] = Field(
        description="Quality metrics when succeeded.",
        examples=[{"noise_ratio": 1.01, "kernel_sum": 0.998}],
    )
    error: JobError | None = Field(None, description="Why the job failed.")
    products: dict[str, str] = Field(
        description="Product name -> download URL.",
        examples=[{"difference": "/v1/subtractions/3b1f.../products/difference"}],
    )
    metrics_url: str | None = None
    attempts: int = Field(description="Deliveries to a worker so far.", examples=[1])
    idempotency_key: str | None = None
    callback_url: str | None = None
    callback: dict[str, Any] | None = Field(
        None,
        description="Webhook delivery: delivered (bool), attempts, status_code of the last "
        "answer (null when none came).",
    )


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page.")


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class CheckOut(BaseModel):
    ok: bool
    detail: str = Field(examples=["2 worker(s): alsub-1a2b3c4d@host"])


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, CheckOut]
