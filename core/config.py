"""Configuration tree: one pydantic model per task, nested like Rubin's config fields.

The same models are the library's arguments, the CLI's ``--config`` JSON and
the HTTP request schema, so every default lives here and only here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "KernelConfig",
    "SourcesConfig",
    "DetectionConfig",
    "DecorrelationConfig",
    "ScaleVarianceConfig",
    "MetricsConfig",
    "DiaSourceConfig",
    "ForcedPhotometryConfig",
    "QualityConfig",
    "SubtractionConfig",
    "ReferenceFiguresConfig",
    "RegistrationConfig",
    "WarpConfig",
    "Mode",
    "MIN_CUTOUT_SIZE",
    "MAX_CUTOUT_SIZE",
]

Mode = Literal["auto", "convolveTemplate", "convolveScience", "preconvolve"]

#: Widest kernel basis (pixels): 99 px is over 16 sigma of a 14 px FWHM PSF.
_MAX_KERNEL = 99
#: Sides (px) of an alert cutout: odd, so the source's pixel is the centre; at most the
#: odd number below the service's default ALSUB_MAX_CUTOUT_SIZE (1024), the same limits
#: as the HTTP route's `size` (a 10001 px triplet was a 1.2 GB file).
MIN_CUTOUT_SIZE, MAX_CUTOUT_SIZE = 5, 1023
#: A mask-plane list: at most 64 names of at most 32 characters.
PlaneList = Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=64)]
#: A noise ratio (robust std of D/sqrt(V)) in a verdict range.
_NoiseRatio = Annotated[float, Field(ge=0, le=100)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class KernelConfig(_Config):
    """Alard-Lupton basis and solver (algorithm.md section 9.3)."""

    kernel_size: int = Field(
        21,
        ge=3,
        le=_MAX_KERNEL,
        description="Kernel width when not scaling by FWHM (odd; giving it without "
        "scale_by_fwhm turns the scaling off).",
    )
    scale_by_fwhm: bool = Field(
        True,
        description="Size the basis from the two PSF widths (kernel_size_fwhm_scaling, "
        "clipped to kernel_size_min..kernel_size_max), not kernel_size.",
    )
    kernel_size_fwhm_scaling: float = Field(
        6.0, gt=0, le=20, description="Kernel size in widest sigma."
    )
    kernel_size_min: int = Field(21, ge=3, le=_MAX_KERNEL, description="Smallest kernel width.")
    kernel_size_max: int = Field(35, ge=3, le=_MAX_KERNEL, description="Largest kernel width.")
    alard_n_gauss: int = Field(3, ge=1, le=6, description="Number of Gaussians in the basis.")
    alard_deg_gauss: list[Annotated[int, Field(ge=0, le=8)]] = Field(
        [4, 2, 2], max_length=6, description="Polynomial degree per Gaussian."
    )
    alard_sig_gauss: list[Annotated[float, Field(gt=0, le=20)]] = Field(
        [0.7, 1.5, 3.0],
        max_length=6,
        description="Gaussian sigmas used when the PSFs are equal (pixels).",
    )
    alard_gauss_beta: float = Field(
        2.0, gt=0, le=10, description="Ratio of successive Gaussian sigmas."
    )
    alard_min_sig: float = Field(0.7, gt=0, le=10, description="Smallest sigma when convolving.")
    alard_min_sig_deconv: float = Field(
        0.4, gt=0, le=10, description="Smallest sigma when deconvolving."
    )
    spatial_kernel_order: int = Field(
        1,
        ge=0,
        le=4,
        description="Chebyshev order of the kernel when choose_spatial_kernel_order is off "
        "(giving this order without choose_spatial_kernel_order turns the choice off).",
    )
    choose_spatial_kernel_order: bool = Field(
        True,
        description="Choose the kernel's spatial order (0 to max_spatial_kernel_order) by "
        "cross-validation on the kernel stamps: the lowest order whose fits predict the "
        "held-out stamps within one unit of chi^2 per stamp of the best. A fixed order "
        "either leaves dipoles "
        "where the kernel varies (a template registered by a shift only) or fits noise "
        "where it does not.",
    )
    max_spatial_kernel_order: int = Field(
        2, ge=0, le=4, description="Highest kernel order choose_spatial_kernel_order tries."
    )
    cross_validation_folds: int = Field(
        5, ge=2, le=20, description="Folds of the kernel stamps for the order choice."
    )
    spatial_bg_order: int = Field(
        2,
        ge=0,
        le=4,
        description="Chebyshev order of the background (fitted at every pixel of the kernel "
        "stamps; each stamp's own fit takes its plane).",
    )
    fit_for_background: bool = Field(True, description="Fit a differential background.")
    size_cell_x: int = Field(128, ge=16, le=8192, description="Spatial cell width (pixels).")
    size_cell_y: int = Field(128, ge=16, le=8192, description="Spatial cell height (pixels).")
    n_star_per_cell: int = Field(5, ge=1, le=100, description="Candidates used per cell.")
    max_spatial_iterations: int = Field(3, ge=1, le=5, description="Spatial fit iterations.")
    single_kernel_clipping: bool = Field(True, description="Reject candidates by residuals.")
    kernel_sum_clipping: bool = Field(True, description="Reject candidates by kernel sum.")
    spatial_kernel_clipping: bool = Field(True, description="Reject by spatial-fit residuals.")
    candidate_residual_mean_max: float = Field(
        0.25, gt=0, le=100, description="Max |mean| of D/sigma."
    )
    candidate_residual_std_max: float = Field(1.5, gt=0, le=100, description="Max std of D/sigma.")
    candidate_clip_sigma: float = Field(
        4.0,
        gt=0,
        le=100,
        description="Residual limits widen to the candidates' median + this many robust "
        "spreads (never below the absolute limits above).",
    )
    min_ensemble_candidates: int = Field(
        5, ge=2, le=10000, description="Fewest fitted candidates for ensemble residual limits."
    )
    max_ksum_sigma: float = Field(
        3.0, gt=0, le=100, description="Kernel-sum clip, in clipped sigmas."
    )
    use_core_stats: bool = Field(False, description="Residual stats on the stamp core only.")
    candidate_core_radius: int = Field(
        3, ge=1, le=50, description="Core half-width for core stats."
    )
    bad_mask_planes: PlaneList = Field(
        ["NO_DATA", "EDGE", "SAT"], description="Ignored in candidate residual statistics."
    )
    constant_variance_weighting: bool = Field(True, description="Weight stamps by median var.")
    correct_reference_noise: bool = Field(
        True,
        description="Remove from the global fit's normal equations the part the convolved "
        "image's own noise adds (errors in variables; its variance plane and noise "
        "correlation): left in, it biases the kernel towards broader kernels of smaller sum.",
    )
    check_condition_number: bool = Field(False, description="Reject ill-conditioned stamps.")
    max_condition_number: float = Field(5.0e7, gt=0, le=1e20, description="Stamp condition limit.")
    max_spatial_condition_number: float = Field(
        1.0e10,
        gt=0,
        le=1e30,
        description="Above this the spatial solution is refitted at lower orders (Rubin: a "
        "warning only). The condition number is that of the spatial normal matrix scaled to a "
        "unit diagonal, which does not change with the images' units.",
    )
    min_stamps_per_spatial_term: float = Field(
        3.0,
        ge=1,
        le=100,
        description="Good stamps needed per Chebyshev term of the kernel (order 1: 9, "
        "order 2: 18); fewer lower its spatial order (down to 0: a constant kernel). Each "
        "term multiplies every basis coefficient, so a few stamps per term overfit. (The "
        "background's terms enter at every pixel of the stamps, each stamp constraining "
        "a plane: only max_spatial_design_condition limits their order.)",
    )
    max_spatial_design_condition: float = Field(
        100.0,
        gt=1,
        le=1e12,
        description="Stamps whose Chebyshev design matrix is worse conditioned than this "
        "(too clustered or in a line) lower the spatial order: the kernel's terms at the "
        "stamp positions, the background's at every pixel of the stamps.",
    )

    @model_validator(mode="before")
    @classmethod
    def _explicit_order_is_fixed(cls, data):
        # a caller who names the kernel's spatial order wants that order, not a choice;
        # one who names its size wants that size, not one scaled from the PSFs
        if isinstance(data, dict):
            for given, choice in (
                ("spatial_kernel_order", "choose_spatial_kernel_order"),
                ("kernel_size", "scale_by_fwhm"),
            ):
                if given in data and choice not in data:
                    data = {**data, choice: False}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.kernel_size % 2 == 0:
            raise ValueError("Only odd-sized Alard-Lupton bases allowed (kernel_size)")
        if len(self.alard_deg_gauss) != self.alard_n_gauss:
            raise ValueError(
                f"len(alard_deg_gauss) != alard_n_gauss : "
                f"{len(self.alard_deg_gauss)} vs {self.alard_n_gauss}"
            )
        if len(self.alard_sig_gauss) != self.alard_n_gauss:
            raise ValueError(
                f"len(alard_sig_gauss) != alard_n_gauss : "
                f"{len(self.alard_sig_gauss)} vs {self.alard_n_gauss}"
            )
        if self.kernel_size_min > self.kernel_size_max:
            raise ValueError("kernel_size_min must not exceed kernel_size_max")
        return self


class DetectionConfig(_Config):
    """Source detection on an exposure (core.sources)."""

    threshold: float = Field(
        5.0, gt=0, le=1000, description="Detection threshold in local noise sigmas."
    )
    min_pixels: int = Field(5, ge=1, le=100_000, description="Smallest footprint kept (pixels).")
    background_mesh: int = Field(64, ge=8, le=8192, description="Background mesh size (pixels).")
    smooth_with_psf: bool = Field(True, description="Detect on the PSF-smoothed image.")


class SourcesConfig(_Config):
    """Kernel-source selection (algorithm.md sections 3.1 and 9.2, decision 5)."""

    detection: DetectionConfig = Field(
        default_factory=DetectionConfig, description="Source detection on the science image."
    )
    min_snr: float = Field(
        10.0, gt=0, le=1e6, description="Lowest S/N of a kernel source (exclusive)."
    )
    max_snr: float = Field(
        500.0, gt=0, le=1e9, description="Highest S/N of a kernel source (exclusive)."
    )
    isolation_radius_fwhm: float = Field(
        2.0,
        ge=0,
        le=20,
        description="Reject sources with a detected neighbour within this many FWHM.",
    )
    max_size_ratio: float = Field(
        1.5,
        gt=0,
        le=100,
        description="Reject sources larger than the PSF by this factor (resolved).",
    )
    max_kernel_sources: int = Field(
        1000, le=100_000, description="Cap on kernel sources (<= 0 disables)."
    )
    min_kernel_sources: int = Field(
        3, ge=1, le=10_000, description="Fewest kernel sources to proceed."
    )
    exclude_mask_planes: PlaneList = Field(
        ["NO_DATA", "BAD", "SAT", "EDGE", "FAKE", "HIGH_VARIANCE"],
        description="Reject kernel sources whose stamp touches these planes.",
    )
    variability_sigma: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="Reject kernel sources whose science/template flux ratio departs "
        "from the better-measured half's median by more than this many times its error, "
        "widened by the ensemble's scatter beyond the errors (transients, variables), or "
        "whose shift between the images departs from the others' by more than this many "
        "times its error (moved stars); and those whose stamp holds a star above max_snr "
        "that did either (core.stamp_neighbours).",
    )
    variability_floor: float = Field(
        0.05, ge=0, le=10, description="...and by more than this fraction of the median ratio."
    )
    n_sky_sources: int = Field(
        100, ge=0, le=10_000, description="Sky positions placed for metrics."
    )
    sky_source_radius: float = Field(
        8.0, gt=0, le=100, description="Sky-source footprint radius (px)."
    )


class DecorrelationConfig(_Config):
    """Noise decorrelation afterburner (algorithm.md section 4, decision 4)."""

    ignore_mask_planes: PlaneList = Field(
        ["INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA", "DETECTED_NEGATIVE"],
        description="Ignored when averaging the input variance planes.",
    )
    complete_var_plane_propagation: bool = Field(
        False, description="Convolve variance planes with the squared filters."
    )
    spatially_varying: bool = Field(False, description="Vary the filter across the image.")
    grid_step: int = Field(
        256, ge=16, le=8192, description="Spacing of spatial decorrelation nodes (px)."
    )


class ScaleVarianceConfig(_Config):
    """Rescaling of variance planes to the measured pixel noise (section 1.6)."""

    mask_planes: PlaneList = Field(
        ["DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP"],
        description="Ignored in the variance-scale estimate.",
    )
    limit: float = Field(
        10.0,
        gt=1,
        le=1e6,
        description="Largest factor (or 1/smallest) applied; beyond it, a warning.",
    )
    background_bin_size: int = Field(
        32, ge=4, le=4096, description="Background mesh for the estimate."
    )
    source_dilation: int = Field(
        2, ge=0, le=50, description="Pixels by which detected sources are grown out of the sky."
    )
    excess_ratio: float = Field(
        1.5,
        gt=1,
        le=100,
        description="Sky-to-pixel-scale noise ratio above which the sky holds more than noise "
        "(confusion or correlated noise).",
    )
    white_tolerance: float = Field(
        0.05, gt=0, lt=1, description="Largest |autocorrelation| at a lag for noise called white."
    )
    correlation_radius: int = Field(
        3, ge=1, le=16, description="Largest lag (px) of a measured noise autocorrelation."
    )
    correlation_consistency: float = Field(
        0.15,
        gt=0,
        le=1,
        description="A measured noise autocorrelation is kept only if the pixel-scale to sky "
        "noise ratio it predicts is within this of the measured ratio.",
    )
    correlation_window: int = Field(
        1024,
        ge=64,
        le=65536,
        description="Side of the central window the pixel-scale noise and its correlation "
        "are measured in.",
    )
    min_sky_pixels: int = Field(
        10000, ge=100, le=10**8, description="Fewest sky pixels to measure a noise correlation."
    )


class MetricsConfig(_Config):
    """Quality metrics of the difference image (section 6)."""

    footprint_radius_fwhm: float = Field(
        1.0, gt=0, le=20, description="Star footprint radius in FWHM."
    )


class ForcedPhotometryConfig(_Config):
    """PSF photometry at given positions on a difference (core.forced)."""

    fit_background: bool = Field(
        False, description="Fit a local constant with the flux (a difference has none)."
    )
    fit_radius_fwhm: float = Field(
        2.0, gt=0.5, le=20, description="Half-width of the fitted PSF stamp, in PSF FWHM."
    )
    min_psf_coverage: float = Field(
        0.5, gt=0, le=1, description="Least PSF weight on usable pixels for a flux (else NaN)."
    )
    psf_grid_step: int = Field(
        256,
        ge=8,
        le=4096,
        description="Spacing (px) of the nodes where a varying PSF is drawn and then "
        "interpolated bilinearly to each position.",
    )
    psf_grid_max_nodes: int = Field(
        5,
        ge=2,
        le=100,
        description="Most nodes per axis at first (large frames get a wider spacing: drawing "
        "a PSF costs milliseconds and most PSFs vary smoothly).",
    )
    psf_blend_tolerance: float = Field(
        0.005,
        gt=0,
        le=1,
        description="Largest PSF-flux error the blend of four nodes may make at a cell's "
        "centre (a narrow profile blended with a broad one is broader than the PSF "
        "between them); the grid is refined while it is exceeded.",
    )
    psf_grid_refined_nodes: int = Field(
        17,
        ge=2,
        le=257,
        description="Most nodes per axis the refinement may reach (17: cells of 128 px on "
        "a 2048 px frame). Products store a varying PSF on a grid refined the same way.",
    )
    n_noise_positions: int = Field(
        2000,
        ge=0,
        le=100_000,
        description="Random positions whose flux scatter calibrates the errors for correlated "
        "noise (0 = trust the variance plane).",
    )
    flag_radius_fwhm: float = Field(
        1.0, ge=0, le=10, description="Radius (PSF FWHM) in which mask planes raise flags."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the noise-calibration positions.")


class DiaSourceConfig(_Config):
    """Detection and measurement of sources on the difference or score (core.diasources)."""

    enabled: bool = Field(True, description="Detect and measure DIA sources in every subtraction.")
    threshold: float = Field(
        5.0, gt=0, le=1000, description="Detection threshold in S/N of the matched filter."
    )
    min_pixels: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Fewest connected pixels above threshold, whatever the PSF (the floor of "
        "``min_area_fraction``'s count).",
    )
    min_area_fraction: float = Field(
        0.05,
        ge=0,
        le=10,
        description="Fewest connected pixels above threshold as a fraction of the PSF's "
        "noise-equivalent area (to the nearest pixel): a point source's footprint is about "
        "that area times ln(peak S/N / threshold), so this asks for a peak e^fraction above "
        "the threshold at any sampling (0.05: 3 px at a 4.7 px FWHM, 1 px at 2 px).",
    )
    drop_psf_sidelobes: bool = Field(
        True,
        description="Drop detections that brighter sources' PSF (its rings, wings and "
        "side lobes, through the matched filter) explains (`sidelobe_model_error`).",
    )
    sidelobe_model_error: float = Field(
        0.1,
        ge=0,
        le=10,
        description="Fractional error allowed on the PSF model's prediction of brighter "
        "sources' light at a detection: a detection is dropped when its S/N, less that "
        "prediction, is below the threshold in units of the noise and this error together "
        "(a bright source's PSF rings and wings are not new sources).",
    )
    peak_prominence: float = Field(
        3.0,
        gt=0,
        le=1000,
        description="A second peak in a footprint is its own source when it rises this many "
        "S/N, plus the dip the pixel grid alone leaves on a crest (`core.saddles`), above "
        "its saddle: the highest path inside the footprint to higher ground (deblending).",
    )
    dipole_max_separation_fwhm: float = Field(
        2.0,
        ge=0,
        le=20,
        description="A positive and a negative peak closer than this (PSF FWHM), each the "
        "other's nearest, form one dipole (0 = no dipoles).",
    )
    aperture_radius_fwhm: float = Field(
        1.5, gt=0, le=20, description="Radius of the aperture flux, in PSF FWHM."
    )
    bright_star_residual: float = Field(
        0.02,
        gt=0,
        le=1,
        description="Fraction of a template star's light its subtraction may leave as a "
        "residual (the largest PSF flux within a FWHM of the SAAO frames' bright stars: "
        "0.5-0.9% median, 1.4-2.3% at the 95th percentile; 3-8% on DECam and JWST). A "
        "star is bright, and sources within bright_star_radius_fwhm of its core flagged, "
        "where this fraction of its light reaches the detection threshold in their noise.",
    )
    bright_star_radius_fwhm: float = Field(
        3.0, ge=0, le=50, description="Radius (PSF FWHM) of the bright-star flag."
    )
    bright_star_residual_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="A source whose flux reaches this fraction of the template's light on "
        "the bright-star disc, with no saturated pixel near, is a change of the star (a "
        "variable), not its residual, which is a few percent of it (7% at a frame's edge): "
        "not flagged (0: flagged whatever its flux).",
    )
    saturated_star_residual: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Fraction of a saturated star's light (fitted on its unsaturated wings) "
        "at a source's position, through the detection filter, that its residual may be: "
        "its clipped core is left out and its kernel matched on other stars. Sources where "
        "that reaches the detection threshold in their noise, and no brighter, are flagged "
        "bright_star at any distance (0: off).",
    )
    saturated_star_halo: float = Field(
        0.004,
        ge=0,
        le=1,
        description="Fraction of a saturated star's light its residual may hold anywhere "
        "within the matching kernel's reach plus a FWHM of it (the kernel, matched on "
        "fainter stars, left 0.02-0.3% of such stars' light there on simulated pairs): "
        "sources there where it reaches the detection threshold, and no brighter, are "
        "flagged bright_star (0: off; needs the kernel's reach, from the kernel sources).",
    )
    suspect_kernel_margin: float = Field(
        64.0,
        ge=0,
        le=100_000,
        description="Sources farther than this (px) outside the hull of the kernel sources "
        "sit where the matching kernel is extrapolated (flagged).",
    )
    cutout_size: int = Field(
        63,
        ge=MIN_CUTOUT_SIZE,
        le=MAX_CUTOUT_SIZE,
        description="Side (px) of the alert cutout stamps, odd (the source's pixel at the "
        "centre); the default size of the run's cutouts (`alsub cutouts`, the HTTP route).",
    )
    max_sources: int = Field(
        20_000,
        ge=1,
        le=10_000_000,
        description="Cap on measured sources (the most significant kept) so that a failed "
        "subtraction cannot make the catalog unbounded.",
    )
    forced: ForcedPhotometryConfig = Field(
        default_factory=ForcedPhotometryConfig, description="PSF photometry settings."
    )

    @field_validator("cutout_size")
    @classmethod
    def _odd_cutout(cls, value: int) -> int:
        # an even side has no centre pixel: the route refused it where the config took it
        if value % 2 == 0:
            raise ValueError(
                f"cutout_size must be odd (the source's pixel at the centre), got {value}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _retired_peak_snr(cls, data):
        # a per-pixel S/N meant a 3x fainter star on a preconvolve score: say what replaced it
        if isinstance(data, dict) and "bright_star_peak_snr" in data:
            raise ValueError(
                "bright_star_peak_snr is retired: a bright star is now judged by its light "
                "against the detection threshold in each source's noise; set "
                "bright_star_residual (the fraction of a star's light its residual may be)"
            )
        return data


class QualityConfig(_Config):
    """Thresholds of the quality verdict (core.quality): good, suspect or bad."""

    noise_ratio_range: tuple[_NoiseRatio, _NoiseRatio] = Field(
        (0.85, 1.2), description="Noise of D/sqrt(V) on sky outside this range: suspect."
    )
    noise_ratio_bad: tuple[_NoiseRatio, _NoiseRatio] = Field(
        (0.5, 2.0), description="Noise of D/sqrt(V) on sky outside this range: bad."
    )
    identical_noise_ratio: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Below this noise ratio science and template are the same data: bad.",
    )
    kernel_sum_tolerance: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Fractional departure of the kernel sum from the ratio of the "
        "photometric calibrations above which the fit is suspect.",
    )
    kernel_sum_bad_factor: float = Field(
        2.0, gt=1, le=1000, description="...and the factor beyond which it is bad."
    )
    exposure_time_factor: float = Field(
        3.0,
        gt=1,
        le=1000,
        description="Factor (either way) between the kernel sum and the exposure-time ratio "
        "beyond which the fit is suspect (uncalibrated images; clouds change it too).",
    )
    min_good_stamps: int = Field(
        5, ge=1, le=10000, description="Fewer fitted kernel stamps than this: suspect."
    )
    coverage_cells: int = Field(
        3, ge=1, le=100, description="Grid (cells per side) for the stamp-spread check."
    )
    min_stamp_coverage: float = Field(
        0.34, ge=0, le=1, description="Fewer grid cells holding a stamp than this: suspect."
    )
    max_kernel_shift: float = Field(
        0.5,
        gt=0,
        le=100,
        description="A kernel whose centroid moves the image by more than this (px) means "
        "the images look misaligned: suspect.",
    )
    bad_kernel_shift: float = Field(
        2.0, gt=0, le=1000, description="...and beyond this shift (px) the fit is bad."
    )
    max_condition_number: float = Field(
        1.0e10,
        gt=0,
        le=1e30,
        description="Spatial condition number (of the normal matrix scaled to a unit "
        "diagonal: unit-free) above which the fit is suspect.",
    )
    max_score_excess: float = Field(
        1.5,
        ge=1,
        le=100,
        description="Score scatter on sky above this many times its propagated noise "
        "(before the noise floor was added): suspect.",
    )
    max_registration_rms: float = Field(
        0.3,
        gt=0,
        le=100,
        description="Registration error (px rms, beyond the matched stars' centroid noise) "
        "above which: suspect.",
    )
    max_star_residual: float = Field(
        0.05,
        gt=0,
        le=10,
        description="Fraction of their PSF flux the kernel stars keep in the difference (median, "
        "either sign) above which, and above star_residual_sigma errors, the fit is suspect.",
    )
    star_residual_sigma: float = Field(
        3.0, gt=0, le=100, description="...in standard errors of that median."
    )
    max_kernel_psf_width_ratio: float = Field(
        1.3,
        gt=1,
        le=100,
        description="The convolved image's PSF model seen through the kernel this many times "
        "wider or narrower than the PSF it should match: a PSF model is wrong, suspect.",
    )
    bad_kernel_psf_width_ratio: float = Field(
        2.0, gt=1, le=1000, description="...and beyond this factor the fit is bad."
    )
    max_sharpening_ratio: float = Field(
        1.3,
        gt=1,
        le=100,
        description="The convolved image's PSF this many times as wide as the target's along "
        "some direction (psf_sharpening_ratio: PSFs of different elongation): the kernel "
        "would have to sharpen it there, suspect.",
    )
    bad_sharpening_ratio: float = Field(
        1.5, gt=1, le=100, description="...and beyond this factor the fit is bad."
    )
    max_preconvolve_width_ratio: float = Field(
        1.05,
        gt=1,
        le=100,
        description="Preconvolve mode: psf_sharpening_ratio, the template's PSF against the "
        "science's seen through the preconvolution (the PSF the kernel matches the template "
        "to), beyond which the kernel would have to sharpen the template, suspect.",
    )
    bad_preconvolve_width_ratio: float = Field(
        1.1, gt=1, le=100, description="...and beyond this factor the fit is bad."
    )


class WarpConfig(_Config):
    """Resampling of the template onto the science grid (core.warp, Lanczos-3)."""

    grid_step: int = Field(
        64, ge=8, le=1024, description="Spacing of exact WCS evaluations of the pixel map (px)."
    )
    affine_tolerance: float = Field(
        0.005,
        gt=0,
        le=0.1,
        description="Largest departure from an affine map (px) resampled as affine (two "
        "separable passes); beyond it the direct 6x6 Lanczos sum follows the WCS exactly.",
    )
    noise_correlation_radius: int = Field(
        5, ge=1, le=15, description="Half-size of the recorded noise autocorrelation (px)."
    )


class RegistrationConfig(_Config):
    """Bringing the template onto the science pixel grid (core.register)."""

    mode: Literal["auto", "wcs", "stars", "none"] = Field(
        "auto",
        description="auto: WCS (corrected on matched stars) when both images have one, "
        "else stars; wcs: WCS only; stars: star matching only; none: inputs must already "
        "share a pixel grid.",
    )
    same_grid_tolerance: float = Field(
        0.01, gt=0, le=1, description="WCSs agreeing this well (px) everywhere mean one grid."
    )
    transform: Literal["auto", "translation", "similarity", "affine"] = Field(
        "auto",
        description="Star-fitted transform; auto picks the simplest the matches support "
        "(Bayesian information criterion).",
    )
    correction_transform: Literal["auto", "translation", "similarity", "affine"] = Field(
        "translation",
        description="Correction fitted to a WCS map on matched stars: an offset by default "
        "(what pipeline WCSs get wrong); auto lets the matches choose.",
    )
    max_stars: int = Field(
        300, ge=10, le=5000, description="Brightest detected stars per image used to match."
    )
    triangle_stars: int = Field(
        40, ge=5, le=200, description="Brightest stars per image forming matching triangles."
    )
    triangle_neighbours: int = Field(
        5, ge=2, le=10, description="Nearest neighbours of each star forming its triangles."
    )
    match_radius: float = Field(
        2.0, gt=0, le=50, description="Inlier radius (px) when verifying a trial transform."
    )
    min_matches: int = Field(
        6, ge=3, le=1000, description="Fewest matched stars to accept a registration."
    )
    max_rms: float = Field(
        0.5,
        gt=0,
        le=10,
        description="Largest position error (px) of the fitted transform at the matched "
        "stars: the rms a star without centroid noise would show (the residuals regressed on "
        "1/S/N^2), or the plain residual rms when the stars' S/N are unknown.",
    )
    min_snr: float = Field(
        10.0, gt=0, le=1e6, description="Faintest star (detection S/N) used for registration."
    )
    false_match_probability: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Chance that the best trial transform's matches are all coincidences.",
    )
    clip_sigma: float = Field(
        3.5, gt=1, le=10, description="Matched pairs beyond this many sigma are dropped."
    )
    identity_sigma: float = Field(
        3.0,
        gt=0,
        le=20,
        description="A star-measured shift below this many standard errors is taken as none.",
    )
    star_patches: int = Field(
        3,
        ge=0,
        le=10,
        description="With a WCS, stars are detected in this many patches per axis (0: the "
        "whole frame); frames under twice the patches' area are searched whole.",
    )
    star_patch_size: int = Field(
        512, ge=128, le=4096, description="Side of each star-detection patch (px)."
    )
    write_warped_template: bool = Field(
        False, description="Keep the warped template as a product (warped_template.fits)."
    )
    warp: WarpConfig = Field(default_factory=WarpConfig, description="Lanczos-3 resampling.")


class SubtractionConfig(_Config):
    """Everything a subtraction takes besides its images."""

    mode: Mode = Field("auto", description="Which image is convolved, or preconvolve (score).")
    do_decorrelation: bool = Field(True, description="Whiten the difference noise.")
    do_scale_variance: bool = Field(True, description="Rescale input variances to the noise.")
    do_subtract_background: bool = Field(
        True,
        description="Subtract the fitted differential background. Rubin's default is False "
        "because its inputs are sky-subtracted; alsub's inputs often still carry sky.",
    )
    refine_background: bool = Field(
        True,
        description="Refit the subtracted background on every sky pixel of the difference, "
        "not only the kernel stamps (same Chebyshev order); the score image, smoothed by the "
        "PSF, shows stamp-only background errors at several sigma.",
    )
    score_noise_tolerance: float = Field(
        1.1,
        ge=1,
        le=100,
        description="When the score's scatter on sky exceeds its propagated noise by more than "
        "this factor, the excess is added to its variance as a constant floor.",
    )
    preconvolution_power_fraction: float = Field(
        0.99999,
        gt=0.5,
        le=1,
        description="Cut the preconvolution kernel (science PSF) to the box holding this "
        "fraction of its squared sum (matched-filter S/N kept: its square root); 1: no cut. "
        "The catalog's fluxes use the kernel as cut (a point source's profile in the score "
        "is the PSF correlated with it): a cut costs S/N, not flux. The default keeps S/N "
        "0.999995 and makes the score's EDGE band (the kernel's half-width) the core's, not "
        "the stamp's: a Moffat (beta 3, FWHM 4.5 px) drawn on 51 px is cut to 23, and the "
        "band (with the matching kernel's half-width) narrows from 35 px to 21.",
    )
    preconvolution_width_fwhm: float | None = Field(
        8.0,
        gt=0,
        description="Cut the preconvolution kernel to at most this many science PSF FWHMs "
        "either side of its centre (a stamp already smaller is kept whole); None: no cut. "
        "The score's EDGE band is the kernel's half-width: a 205 px JWST PSF stamp (2 px "
        "FWHM) lost 44% of a 900 px frame to wings holding 2e-5 of its power.",
    )
    preconvolve_via_difference: bool = Field(
        True,
        description="In preconvolve mode, when the template is the sharper image, fit the "
        "kernel between the images as they are and follow it by the science PSF (the same "
        "score, a smaller and better constrained kernel); off: always fit K * T ~ P * S.",
    )
    required_template_fraction: float = Field(
        0.1, ge=0, le=1, description="Least template coverage to attempt subtraction."
    )
    min_template_fraction_for_expected_success: float = Field(
        0.2, ge=0, le=1, description="Below this a kernel failure is reported as coverage."
    )
    bad_mask_planes: PlaneList = Field(
        ["NO_DATA", "BAD", "SAT", "EDGE"],
        description="Pixels median-filled before preconvolution.",
    )
    preserve_template_mask: PlaneList = Field(
        ["NO_DATA", "BAD", "HIGH_VARIANCE"], description="Template planes kept by update_masks."
    )
    rename_template_mask: PlaneList = Field(
        ["SAT", "INJECTED", "INJECTED_CORE"], description="Template planes renamed X_TEMPLATE."
    )
    preserve_mask_planes: PlaneList = Field(
        ["INJECTED", "INJECTED_CORE", "INJECTED_TEMPLATE", "INJECTED_CORE_TEMPLATE"],
        description="Planes not dilated by convolution.",
    )
    fwhm_exposure_grid: int = Field(
        10, ge=1, le=100, description="Grid for mean PSF FWHM fallback."
    )
    fwhm_exposure_buffer: float = Field(0.05, ge=0, lt=0.5, description="Grid edge buffer.")
    kernel: KernelConfig = Field(
        default_factory=KernelConfig, description="AL basis and kernel solver."
    )
    sources: SourcesConfig = Field(
        default_factory=SourcesConfig, description="Detection and kernel-source selection."
    )
    decorrelation: DecorrelationConfig = Field(
        default_factory=DecorrelationConfig, description="Noise decorrelation afterburner."
    )
    scale_variance: ScaleVarianceConfig = Field(
        default_factory=ScaleVarianceConfig, description="Input variance rescaling."
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Quality metrics of the difference."
    )
    dia: DiaSourceConfig = Field(
        default_factory=DiaSourceConfig,
        description="DIA sources: detection and measurement on the difference or score.",
    )
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="Thresholds of the quality verdict."
    )

    registration: RegistrationConfig = Field(
        default_factory=RegistrationConfig,
        description="Registration and warping of the template onto the science grid.",
    )


class ReferenceFiguresConfig(_Config):
    """Measurement of a difference on real data (core.evaluate.reference_figures).

    The defaults are the definitions of ``data/real/REFERENCE.md`` (the figures HOTPANTS
    was measured with); change them only to study the measurement itself.
    """

    border_fwhm: float = Field(
        2.5, ge=0, le=20, description="Border margin: this many science FWHM ..."
    )
    border_pixels: int = Field(12, ge=0, le=1000, description="... plus this many pixels.")
    saturation_radius_fwhm: float = Field(
        2.0, ge=0, le=20, description="Skip pixels and stars within this many FWHM of saturation."
    )
    source_dilation: int = Field(
        2, ge=0, le=100, description="Grow the detected sources of both inputs by this (px)."
    )
    n_random: int = Field(
        500, ge=20, le=100_000, description="Random positions that calibrate the target S/N."
    )
    target_radius_fwhm: float = Field(
        2.0, ge=0, le=50, description="Random positions and stars keep this many FWHM from it."
    )
    n_stars: int = Field(30, ge=1, le=10_000, description="Brightest template stars for chi^2.")
    exclude_blended_stars: bool = Field(
        True, description="Skip footprints with several peaks: their flux is not one star's."
    )
    exclude_sharp_sources: bool = Field(
        True,
        description="Skip detections whose flux/peak area is under 2/3 of the stars' (cosmic "
        "rays and hot pixels of a single exposure): they are not stars.",
    )
    star_radius_fwhm: float = Field(
        1.0, gt=0, le=10, description="Radius of the chi^2 aperture in science FWHM."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the random positions (fixed: same figures)."
    )
