"""Typed errors a user can cause, each with a stable machine-readable code.

The service maps ``code`` to an HTTP status or a failed job; the CLI prints the
message on one line and exits with status 2.
"""

__all__ = [
    "AlsubError",
    "InvalidExposureError",
    "InvalidCatalogError",
    "InvalidPositionsError",
    "InvalidConfigError",
    "IncompatibleInputsError",
    "IdenticalInputsError",
    "PsfError",
    "InsufficientSourcesError",
    "NoKernelCandidatesError",
    "TemplateCoverageError",
    "KernelSolutionError",
    "RegistrationError",
]


class AlsubError(Exception):
    """Base of every error a user's input can cause."""

    code = "alsub_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidExposureError(AlsubError):
    """A file or array cannot be read as an exposure."""

    code = "invalid_exposure"


class InvalidCatalogError(AlsubError):
    """A source catalog cannot be read or lacks the required columns."""

    code = "invalid_catalog"


class InvalidPositionsError(InvalidCatalogError):
    """Positions for forced photometry that cannot be measured at: of neither or both
    kinds, non-finite, off the sky (dec beyond +-90, ra outside [0, 360))."""

    code = "invalid_positions"


class InvalidConfigError(AlsubError):
    """A configuration value is out of range or inconsistent."""

    code = "invalid_config"


class IncompatibleInputsError(AlsubError):
    """Science and template cannot be subtracted (shape, WCS or band differ)."""

    code = "incompatible_inputs"


class IdenticalInputsError(IncompatibleInputsError):
    """Science and template hold the same pixels: their difference says nothing."""

    code = "identical_inputs"


class PsfError(AlsubError):
    """A PSF could not be evaluated or estimated."""

    code = "psf_error"


class InsufficientSourcesError(AlsubError):
    """Too few sources to estimate a PSF or fit a kernel."""

    code = "insufficient_sources"


class NoKernelCandidatesError(AlsubError):
    """Every kernel candidate was rejected during the fit."""

    code = "no_kernel_candidates"


class TemplateCoverageError(AlsubError):
    """The template covers too little of the science image."""

    code = "insufficient_template_coverage"


class KernelSolutionError(AlsubError):
    """The kernel least-squares system could not be solved (NaN coefficients)."""

    code = "kernel_solution_failed"


class RegistrationError(AlsubError):
    """The template could not be registered onto the science image (misregistration)."""

    code = "misregistration"
