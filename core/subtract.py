"""The subtraction tasks: Alard-Lupton (difference) and preconvolution (score).

`AlardLuptonSubtractTask.run` reads top to bottom as algorithm.md 1.3: prepare
the inputs, choose the direction, fit the matching kernel, convolve, subtract,
decorrelate, measure. `AlardLuptonPreconvolveSubtractTask` (1.4) first
correlates the science image with its own PSF and returns the score image.
Inputs are never mutated (decision 7), unless the caller hands them over
(``consume_inputs``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from astropy.stats import mad_std
from astropy.table import Table
from scipy import ndimage, optimize, signal

from . import order
from .basis import kernel_size_for, make_kernel_basis
from .config import DetectionConfig, SubtractionConfig
from .convolve import convolve_exposure, convolved_noise_correlation
from .decorrelate import _kernel_at, decorrelate_difference
from .detection import DetectionMemo
from .diadetect import crop_kernel
from .diasources import dia_sources
from .dilation import dilate_cross
from .errors import (
    IdenticalInputsError,
    IncompatibleInputsError,
    InsufficientSourcesError,
    InvalidExposureError,
    KernelSolutionError,
    NoKernelCandidatesError,
    PsfError,
    TemplateCoverageError,
)
from .exposure import DeferredPlane, Exposure, invalid_variance
from .forced import WHOLE_STAMP_MISSING_LIGHT, whole_stamp_fluxes
from .kernel import BackgroundModel, SpatialKernel, chebyshev_terms, fit_psf_matching_kernel
from .logcapture import collect_warnings
from .measure import StarOffset, star_offset, star_shifts
from .metrics import (
    NOISE_MASK_PLANES,
    compute_difference_metrics,
    limiting_magnitude,
    noise_statistics,
    star_residual_fraction,
)
from .parallel import (
    alongside,
    frame_array,
    frame_copy,
    one_blas_thread,
    release_free_memory,
    split_map,
    task_pool,
    thread_map,
)
from .position_flags import EXTRAPOLATED_ORDER, KERNEL_REACH
from .psf import SIGMA_TO_FWHM, GaussianPsf, ImagePsf, KernelMatchedPsf, Psf
from .psf_consistency import (
    field_points,
    kernel_psf_width_ratio,
    sharpening_ratio,
    worst_over_field,
)
from .psf_estimate import estimate_psf
from .quality import assess_quality, kernel_centroid
from .register import register_template
from .sky import pixel_to_pixel
from .sources import detect_sources, kernel_snr_column, select_kernel_sources, sky_sources
from .stamp_neighbours import bright_neighbours, holders_of, moved, template_only_peaks
from .task import Task
from .units import in_units_of
from .variance import (
    CORRELATED_NOISE_NOTE,
    VarianceScale,
    scale_variance,
    static_structure_correction,
)

__all__ = [
    "SubtractionResult",
    "AlardLuptonSubtractTask",
    "AlardLuptonPreconvolveSubtractTask",
    "run_subtraction",
    "check_not_identical",
]

log = logging.getLogger("alsub.subtract")

Progress = Callable[[str, float], None]

#: Header keywords giving a PSF FWHM in pixels, used when no PSF can be estimated.
_HEADER_FWHM_KEYS = ("FWHM", "PFWHM", "PSF_FWHM", "FWHM_PIX")
#: Without one, the typical size of the sources detection measured stands in (a plain
#: image of a sparse or galaxy-rich field was refused for want of a FWHM keyword), when
#: at least this many sources gave it.
_SOURCE_SIZE_MIN_SOURCES = 5
#: `_Prepared.psf_header_key` of a PSF from the sources' typical size.
_SOURCE_SIZE = "sources' typical size"
#: `_SubtractBase.psf_sources` of a science PSF derived from the template's and the kernel.
_KERNEL_MATCHED = "kernel-matched template PSF"

#: Metadata counts of the kernel sources `_reject_variable_sources` dropped, and why.
_REJECTION_COUNTS = (
    "nVariableSourcesRejected",
    "nMovedSourcesRejected",
    "nChangedNeighbourStampsRejected",
)

#: A star offset between the inputs (px) worth a note: registrations are routinely
#: better than this, and the kernel absorbs far larger ones.
_NOTED_STAR_OFFSET = 0.1
#: Fraction of the matching kernel's peak (absolute) beyond which it is out of reach
#: (`core.kernel.SpatialKernel.reach`): where a saturated star's residual, the kernel's
#: errors times its light, can still be; the full half-width on auto kernels (9-10 px
#: of 10), half of it or less on preconvolve ones (JWST: 52 px of 112).
_KERNEL_REACH_FRACTION = 1e-4

#: Stage names reported to progress callbacks, with the fraction done when they start.
STAGES = {
    "register": 0.0,
    "prepare": 0.05,
    "select": 0.15,
    "fit": 0.25,
    "convolve": 0.5,
    "decorrelate": 0.7,
    "metrics": 0.9,
    "detect": 0.95,
}


@dataclass
class _Prepared:
    """What preparing one input gave: its detections, variance scale, PSF provenance
    (the header keyword of a Gaussian PSF's FWHM, why none was estimated, where it came
    from)."""

    detected: Table
    scale: VarianceScale | None
    psf_header_key: str | None
    psf_not_estimated: str | None
    #: its detections (both signs) on the science grid grown by `_SOURCE_MASK_GROWTH`
    near_sources: np.ndarray
    #: where its PSF came from (`_SubtractBase.psf_sources`)
    psf_source: str


@dataclass
class SubtractionResult:
    """Products of a subtraction (field names follow Rubin's result struct).

    ``difference`` is set by the AL task, ``score`` by the preconvolution task
    (``output`` is whichever is set). ``background_model`` is the background that was
    subtracted (None unless ``do_subtract_background``; always the fitted one for the
    score, as Rubin does); ``fitted_background`` is always the fitted model
    (`core.kernel.BackgroundModel`: ``.image(shape, xy0)`` evaluates it).

    Attributes
    ----------
    difference, score : `Exposure` or None
        On the science grid, in science units, with its PSF. ``score`` / sqrt(variance)
        is the detection S/N (the science correlated with its PSF minus the matched
        template); its pixels are not fluxes.
    matched_template, matched_science : `Exposure`
        The inputs as subtracted (the template warped onto the science grid, the one
        convolved by the kernel).
    psf_matching_kernel : `core.kernel.SpatialKernel`
        ``.image(x, y)`` is the kernel at parent position (x, y) (its centre without
        arguments), ``.sum()`` its flux ratio, ``.size`` its width in pixels.
    kernel_sources : `astropy.table.Table`
        The stars the kernel was fitted on: ``x``, ``y`` in **parent** pixels (array
        column and row plus ``xy0``).
    dia_sources : `astropy.table.Table` or None
        What changed (`core.diasources.dia_sources` lists the columns): ``x``, ``y`` are
        0-based **array** column and row of the output (no ``xy0``), as
        `core.forced.forced_photometry` and `core.cutouts.cutouts` take them. None
        when ``dia.enabled`` is off.
    warped_template : `Exposure` or None
        Kept when ``registration.write_warped_template``.
    mode : str
        The mode run (``auto`` resolved): ``convolveTemplate``, ``convolveScience`` or
        ``preconvolve``.
    metrics : dict
        JSON-ready figures: ``quality`` (``verdict`` good/suspect/bad and its
        ``reasons``), ``noise_ratio``, ``kernel_sum``, ``registration``, ``warnings``,
        ``notes``, ... (README; ``metrics.json`` of the products).
    metadata, timings : dict
        The tasks' own figures; seconds per stage.
    """

    difference: Exposure | None = None
    score: Exposure | None = None
    matched_template: Exposure | None = None
    matched_science: Exposure | None = None
    background_model: BackgroundModel | None = None
    fitted_background: BackgroundModel | None = None
    psf_matching_kernel: SpatialKernel | None = None
    kernel_sources: Any = None
    dia_sources: Any = None
    warped_template: Exposure | None = None
    mode: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def output(self) -> Exposure:
        """The main product: the score in preconvolve mode, else the difference."""
        out = self.score if self.score is not None else self.difference
        assert out is not None
        return out

    @property
    def output_name(self) -> str:
        return "score" if self.score is not None else "difference"


class _SubtractBase(Task):
    """Preparation, masks, PSF sizes and kernel fitting shared by both tasks."""

    ConfigClass = SubtractionConfig
    config: SubtractionConfig
    makeKernel: Task  # subtasks, made in __init__
    decorrelate: Task

    def __init__(
        self, config: SubtractionConfig | None = None, progress: Progress | None = None, **kwargs
    ):
        super().__init__(config=config, **kwargs)
        self.progress = progress
        #: concerns about this run: each makes the quality verdict suspect
        self.warnings: list[str] = []
        #: where each input's PSF came from ("given", "estimated", "Gaussian of <its
        #: FWHM keyword or the sources' typical size>"; the science's may become the
        #: "kernel-matched template PSF" once the kernel is fitted)
        self.psf_sources: dict[str, str] = {}
        #: the warning of each input whose PSF is a Gaussian standing in
        self.psf_stand_ins: dict[str, str] = {}
        #: the science PSF after the fit when derived from the kernel (convolveTemplate
        #: with a stand-in science PSF: `_science_psf_through_kernel`)
        self.derived_science_psf: Psf | None = None
        #: centroid offset (dx, dy) the matching kernel has by design (preconvolution)
        self.kernel_reference_shift: tuple[float, float] = (0.0, 0.0)
        #: the science PSF seen through the preconvolution kernel P (preconvolve mode): a
        #: star's profile in P * S and in the score
        self.preconvolved_psf: ImagePsf | None = None
        #: P as applied when cut from the science PSF's stamp (preconvolve mode), else None
        self.preconvolution_cut: np.ndarray | None = None
        #: P as applied (preconvolve mode): the PSF checks draw P_S through it over the field
        self.preconvolution_kernel: np.ndarray | None = None
        #: the stand-in science PSF seen through P when P came from the fitted kernel
        #: (`_preconvolution_through_kernel`), else None
        self.preconvolved_stand_in: ImagePsf | None = None
        #: where the kernel stars sit in the template relative to the science
        self.star_offset: StarOffset | None = None
        #: what the run found and handled (confusion, correlated noise, lowered orders)
        self.notes: list[str] = []
        self.registration: dict[str, Any] = {}
        self.warped_template: Exposure | None = None
        #: registration's detections, reused by preparation; dropped once it is done
        self._memo: DetectionMemo | None = None
        #: whether each input's (science, template) noise correlation was measured on sky
        self.sky_correlated: tuple[bool, bool] = (False, False)
        # the static-structure correction's input correlations, and whether it refitted
        self.static_correlations: tuple[np.ndarray | None, np.ndarray | None] | None = None
        self.static_refitted = False
        self.static_removed = (0.0, 0.0)
        self.static_note = ""
        #: whether the subtracted background was refitted on every sky pixel
        self.background_refitted = False
        self.make_subtask("makeKernel")
        self.make_subtask("decorrelate")

    # progress -------------------------------------------------------------------------
    def _stage(self, name: str) -> None:
        if self.progress is not None:
            self.progress(name, STAGES.get(name, 0.0))

    # registration ---------------------------------------------------------------------
    def _register(self, template: Exposure, science: Exposure) -> Exposure:
        """Bring the template onto the science pixel grid (core.register); figures in metadata.

        Returns the template on the science grid: the given one when the two
        already share a grid (nothing resampled), else the warped template.
        """
        self._stage("register")
        config = self.config.registration
        self._memo = DetectionMemo()
        with self.timer("register"):
            registered, figures = register_template(
                template, science, config, self.config.sources.detection, self._memo
            )
        self.registration = figures
        self.warped_template = (
            registered if figures.get("resampled") and config.write_warped_template else None
        )
        return registered

    # preparation ----------------------------------------------------------------------
    def _prepare_inputs(self, template: Exposure, science: Exposure, sources):
        """Validate, check coverage, detect sources, rescale variances, update masks, size PSFs.

        Works in place on the task's working inputs (`_working_copies`); returns the
        source catalog.
        """
        self._validate(template, science)
        coverage = self._template_coverage(template, science)
        self.metadata["templateCoveragePercent"] = 100.0 * coverage
        required = self.config.required_template_fraction
        if coverage < required:
            raise TemplateCoverageError(
                f"Insufficient Template Coverage. ({100 * coverage:.1f}% < {100 * required:.1f}%) "
                "Not attempting subtraction. Supply a template that covers the science image, "
                "or set required_template_fraction=0 to force subtraction."
            )
        # science and template are prepared independently (PSF, detection, variance
        # scale), each on its share of the cores: the heavy numpy/scipy calls release the
        # GIL. Under a one-thread cap (a service worker beside another) they run one after
        # the other: two threads there only contend for the GIL and the core the other
        # worker needs (2 workers on 2 cores, 1024 pairs: 1.31 -> 1.23 CPU s per subtraction)
        window = _science_window(template, science)
        jobs = [(science, "science", np.s_[:, :]), (template, "template", window)]
        try:
            prepared = {
                label: done
                for (_, label, _), done in zip(
                    jobs, split_map(self._prepare_one, jobs), strict=True
                )
            }
        finally:
            self._memo = None  # frees registration's catalogs and meshes
        for label in ("science", "template"):
            self.psf_sources[label] = prepared[label].psf_source
            key = prepared[label].psf_header_key
            if key is not None:
                if key == _SOURCE_SIZE:
                    self.metadata[f"{label}PsfFromSourceSize"] = True
                else:
                    self.metadata[f"{label}PsfFromHeader"] = key
                # a real profile's wings hold ~15% of a DECam star's light beyond the
                # Gaussian's (a review's injections on decam_c: fluxes 0.82-0.86 of true)
                warning = (
                    f"{label}: no PSF given and none could be estimated "
                    f"({prepared[label].psf_not_estimated}); a Gaussian of its {key} stands "
                    "in: PSF fluxes (DIA sources, forced photometry) miss the light a real "
                    "star has beyond a Gaussian core"
                )
                self.psf_stand_ins[label] = warning
                self.warnings.append(warning)
        detected = prepared["science"].detected
        if sources is None:
            sources = detected
        if self.config.do_scale_variance:
            for label in ("template", "science"):
                scale = prepared[label].scale
                assert scale is not None
                name = label.capitalize()
                self.metadata[f"scale{name}VarianceFactor"] = scale.factor
                self.metadata[f"scale{name}VarianceMethod"] = scale.method
                self.metadata[f"scale{name}VarianceEstimates"] = [scale.sky, scale.pixel_scale]
                self.warnings.extend(f"{label}: {text}" for text in scale.warnings)
                self.notes.extend(f"{label}: {text}" for text in scale.notes)
            science_scale, template_scale = prepared["science"].scale, prepared["template"].scale
            assert science_scale is not None and template_scale is not None
            self.sky_correlated = (
                science_scale.noise_correlation is not None,
                template_scale.noise_correlation is not None,
            )
            # the catalog's S/N was measured against the unscaled science variance
            if sources is detected and "snr_pixel" in sources.colnames:
                factor = self.metadata["scaleScienceVarianceFactor"]
                sources["snr_pixel"] = sources["snr_pixel"] / math.sqrt(factor)
        # where sources are, remembered before update_masks clears DETECTED: metrics need
        # empty sky for noise figures and sky-source footprints (on either image, since
        # a source on the template only leaves a residual too). Each job grew its own
        # (a dilation of a union is the union of the dilations), on its core
        source_mask = prepared["science"].near_sources
        np.logical_or(source_mask, prepared["template"].near_sources, out=source_mask)
        self.source_mask = source_mask
        self.sky = sky_sources(
            science,
            n=self.config.sources.n_sky_sources,
            radius=self.config.sources.sky_source_radius,
        )
        self.update_masks(template, science)
        self.template_fwhm = self._psf_fwhm(template, "template")
        self.science_fwhm = self._psf_fwhm(science, "science")
        self.metadata["templatePsfSize"] = self.template_fwhm
        self.metadata["sciencePsfSize"] = self.science_fwhm
        sci_lim = limiting_magnitude(science, self.science_fwhm)
        tmpl_lim = limiting_magnitude(template, self.template_fwhm)
        self.metadata["scienceLimitingMagnitude"] = sci_lim
        self.metadata["templateLimitingMagnitude"] = tmpl_lim
        self.metadata["diffimLimitingMagnitude"] = _combine_limits(sci_lim, tmpl_lim)
        return sources

    def _prepare_one(self, job: tuple[Exposure, str, tuple[slice, slice]]) -> _Prepared:
        """PSF (estimated if missing), detection (sets DETECTED), variance scale and grown
        detections (`_Prepared.near_sources`) of one input; touches only that exposure,
        so science and template can run at once.

        ``job``: (exposure, label, window), ``window`` the slices of the exposure on the
        science grid."""
        exposure, label, window = job
        header_key = why = None
        source = "given" if exposure.psf is not None else "estimated"
        detection = self.config.sources.detection
        # the masks do not change before detection: PSF estimation (its own detection
        # and stamps) and detection share one background mesh when its size agrees, and
        # registration's, when it detected on this very exposure
        memo = self._memo or DetectionMemo()
        mesh = memo.mesh(exposure, detection)
        if exposure.psf is None:
            same = detection.background_mesh == DetectionConfig().background_mesh
            exposure.psf, header_key, why = self._find_psf(
                exposure, label, mesh if same else None, memo.generic(exposure)
            )
            if header_key is not None:
                source = f"Gaussian of {header_key}"
        # detection on both images sets DETECTED, which variance scaling, sky sources and
        # the noise metrics rely on, so it runs even when the caller gives the catalog;
        # only the science catalog is used, so the template's sources are not measured
        # nor labelled, only masked (the catalog's S/N is against the unscaled
        # variance: it is measured before)
        detected = detect_sources(
            exposure,
            detection,
            psf=exposure.psf,
            background=mesh,
            measure=label == "science",
            segmentation=False,
        )
        # drop its segmentation images now: the other input's preparation may still run
        detected = _without_frame_meta(detected)
        del mesh
        scale = None
        if self.config.do_scale_variance:
            scale = scale_variance(exposure, self.config.scale_variance)
        return _Prepared(detected, scale, header_key, why, near_sources(exposure, window), source)

    def _find_psf(
        self, exposure: Exposure, label: str, background=None, detected=None
    ) -> tuple[Psf, str | None, str | None]:
        """Estimate a PSF from the stars; else a Gaussian of the header's FWHM (pixels).

        ``background`` and ``detected`` (a generic detection of the exposure) are
        reused when given. Also returns the header keyword the FWHM came from and why
        no PSF was estimated (both None when one was).
        """
        try:
            # the order is chosen: a field's PSF varies, and a constant one biases
            # PSF fluxes by position (plain 2048 pair: transients 0.97, pulls 1.5)
            psf = estimate_psf(
                exposure, background=background, detected=detected, spatial_order=None
            )
            return psf, None, None
        except PsfError as exc:
            for key in _HEADER_FWHM_KEYS:
                value = exposure.metadata.get(key)
                if isinstance(value, int | float) and 0.5 < value < 100:
                    log.info(
                        "%s PSF: %s; using a Gaussian of %s = %.2f px",
                        label,
                        exc.message,
                        key,
                        value,
                    )
                    return GaussianPsf(float(value) / SIGMA_TO_FWHM), key, exc.message
            sigma = _typical_source_sigma(exposure, background, detected)
            if sigma is not None:
                log.info(
                    "%s PSF: %s; using a Gaussian of its sources' typical size (FWHM %.2f px)",
                    label,
                    exc.message,
                    sigma * SIGMA_TO_FWHM,
                )
                return GaussianPsf(sigma), _SOURCE_SIZE, exc.message
            raise PsfError(
                f"the {label} image has no PSF and none could be estimated: "
                f"{exc.message}; or add a FWHM keyword (pixels)"
            ) from None

    @staticmethod
    def _validate(template: Exposure, science: Exposure) -> None:
        tx0, ty0, tx1, ty1 = template.bbox
        sx0, sy0, sx1, sy1 = science.bbox
        if template.band and science.band and template.band != science.band:
            raise IncompatibleInputsError(
                f"Science and template exposures have different bands: "
                f"{science.band} and {template.band}"
            )
        if not (tx0 <= sx0 and ty0 <= sy0 and tx1 >= sx1 and ty1 >= sy1):
            raise IncompatibleInputsError(
                f"Template bbox does not contain all of the science image: template covers "
                f"{template.bbox}, science {science.bbox} (min_x, min_y, max_x, max_y). "
                "Turn registration on (registration.mode 'auto', the default) or warp the "
                "template onto the science grid first (alsub warp)."
            )
        if template.wcs is not None and science.wcs is not None and template.wcs.has_celestial:
            # same sky position for the same parent pixel, to 1% of a pixel
            xs = np.array([sx0, sx1, sx0, sx1, (sx0 + sx1) / 2])
            ys = np.array([sy0, sy0, sy1, sy1, (sy0 + sy1) / 2])
            pix_t = pixel_to_pixel(science.wcs, template.wcs, xs - sx0, ys - sy0)
            err = np.hypot(pix_t[0] + tx0 - xs, pix_t[1] + ty0 - ys)
            if not np.all(np.isfinite(err)) or err.max() > 0.01:
                raise IncompatibleInputsError(
                    "Template and science exposure WCS are not identical "
                    f"(pixels disagree by up to {np.nanmax(err):.3g} px). "
                    "Turn registration on (registration.mode 'auto', the default, or 'wcs') "
                    "or warp the template onto the science grid first (alsub warp)."
                )

    @staticmethod
    def _template_coverage(template: Exposure, science: Exposure) -> float:
        """Fraction of science pixels where neither image has NO_DATA."""
        # views, not a cutout: this runs on full frames and needs no copy
        window = _science_window(template, science)
        t_mask, t_image = template.mask[window], template.image[window]
        t_bits, s_bits = template.bitmask(["NO_DATA"]), science.bitmask(["NO_DATA"])

        def missing(rows: slice) -> int:
            no_data = ~np.isfinite(t_image[rows])
            if t_bits:
                no_data |= (t_mask[rows] & t_bits) != 0
            if s_bits:
                no_data |= (science.mask[rows] & s_bits) != 0
            return int(np.count_nonzero(no_data))

        # a block of rows at a time: no frame-sized integer or boolean temporaries; the
        # blocks on all cores (this pass runs before the inputs' preparation shares them)
        blocks = [slice(y, y + 256) for y in range(0, science.height, 256)]
        return 1.0 - sum(thread_map(missing, blocks)) / (science.height * science.width)

    def update_masks(self, template: Exposure, science: Exposure) -> None:
        """Clear science detections and rename/clear template planes (algorithm.md 5.1)."""
        # one pass over the mask for both planes
        detections = science.bitmask(["DETECTED", "DETECTED_NEGATIVE"])
        if detections:
            science.mask &= np.int32(~detections)
        if "FAKE" in science.mask_planes:
            science.set_plane("INJECTED", science.masked(["FAKE"]))
        planes = template.mask_planes
        defined = list(planes.names)
        clear = [p for p in defined if p not in self.config.preserve_template_mask]
        rename = [p for p in self.config.rename_template_mask if p in planes]
        if "FAKE" in planes:
            template.set_plane("INJECTED_TEMPLATE", template.masked(["FAKE"]))
            rename = [p for p in rename if p != "INJECTED"]
            clear = [p for p in clear if p != "INJECTED_TEMPLATE"]
        for name in rename:
            template.set_plane(f"{name}_TEMPLATE", template.masked([name]))
        # one pass over the mask for every plane cleared
        cleared = template.bitmask(clear)
        if cleared:
            template.mask &= np.int32(~cleared)

    def _psf_fwhm(self, exposure: Exposure, label: str = "input") -> float:
        """PSF FWHM at the average position, else the mean over a grid (algorithm.md 1.2.6)."""
        psf = exposure.require_psf()
        position = psf.average_position or exposure.bbox_center()
        try:
            return float(psf.fwhm(*position))
        except Exception:  # noqa: BLE001 - any evaluation failure falls back to the grid
            log.info(
                "Unable to evaluate PSF at the average position. Evaluting PSF on a grid of points."
            )
        values = []
        for x, y in _position_grid(
            exposure, self.config.fwhm_exposure_grid, self.config.fwhm_exposure_buffer
        ):
            try:
                values.append(float(psf.fwhm(x, y)))
            except Exception:  # noqa: BLE001
                continue
        if not values:
            raise PsfError(
                f"Unable to compute PSF FWHM at any position on the exposure: the {label} "
                "PSF given is no point-source profile (a centred, positive stamp); give "
                "another, or none to have it estimated from the stars"
            )
        return float(np.mean(values))

    # kernel -------------------------------------------------------------------------------
    def _select_sources(self, template, science, sources, matched_psf_size, edge_buffer=0):
        self._stage("select")
        k_size = kernel_size_for(self.template_fwhm, matched_psf_size, self.config.kernel)
        selected = select_kernel_sources(
            sources,
            science,
            template,
            k_size,
            self.config.sources,
            psf_fwhm=self.science_fwhm,
            edge_buffer=edge_buffer,
        )
        selected = self._reject_variable_sources(selected, science, template, sources)
        self.metadata["nPsfSources"] = len(selected)
        return selected

    def _measure_star_offset(self, template, science, kernel_sources) -> None:
        """Where the kernel stars sit in the template relative to the science (metrics):
        images on one grid whose stars are not (the DECam stamps' WCSs agree, their
        stars are 0.5 px apart) get a kernel that absorbs the offset, and the verdict
        judges the kernel's shift against it (`assess_quality`)."""
        offset = star_offset(
            science,
            template,
            np.asarray(kernel_sources["x"], float),
            np.asarray(kernel_sources["y"], float),
            max(self.science_fwhm, self.template_fwhm),
        )
        if offset is None:
            return
        self.star_offset = offset
        self.metadata["starOffset"] = [offset.dx, offset.dy]
        self.metadata["starOffsetError"] = offset.error
        if offset.significant and math.hypot(offset.dx, offset.dy) >= _NOTED_STAR_OFFSET:
            self.notes.append(
                f"the kernel stars sit {offset.dx:+.2f}, {offset.dy:+.2f} px (x, y; "
                f"+-{offset.error:.2f}, median of {offset.n}) apart in the template and the "
                "science: the matching kernel absorbs the offset"
            )

    def _reject_variable_sources(self, selected, science, template, catalog):
        """Drop kernel sources whose flux changed between template and science or that
        moved, and those whose stamp holds a star too bright to be a kernel source that
        did either, or a bright star of the template the science lost
        (`core.stamp_neighbours`; ``catalog``: the sources the selection chose from).

        Transients and variables have no (or a different) counterpart in the
        template. Rubin leaves them to kernel-sum clipping, which a field with
        many of them biases; comparing PSF fluxes first keeps them out. A moved star
        (proper motion, a misregistered one) keeps its flux: its centroid tells it.
        """
        # absent when not tested: a fit made again (`_fitted`) reports this selection's
        # counts, not the first's
        for key in _REJECTION_COUNTS:
            self.metadata.pop(key, None)
        if len(selected) < 3:
            return selected
        cfg = self.config.sources
        n = len(selected)
        snr_column = kernel_snr_column(catalog)  # the selection's: ``selected`` has it too
        rows, held = bright_neighbours(selected, catalog, cfg.max_snr, snr_column)
        # and the template's stars the science catalog lacks (faded ones), judged alike
        fwhm = max(self.science_fwhm, self.template_fwhm)
        lost_x, lost_y, lost_held = template_only_peaks(selected, catalog, template, fwhm)
        x = np.concatenate(
            [np.asarray(selected["x"], float), np.asarray(catalog["x"], float)[rows], lost_x]
        )
        y = np.concatenate(
            [np.asarray(selected["y"], float), np.asarray(catalog["y"], float)[rows], lost_y]
        )
        # the two images' fits are independent: on two threads (numpy releases the GIL)
        (f_s, e_s), (f_t, e_t) = thread_map(
            lambda exposure: whole_stamp_fluxes(exposure, x, y), [science, template]
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = f_s / f_t
            detected = np.isfinite(ratio) & (f_t > 5.0 * e_t)
            sigma = np.abs(ratio) * np.hypot(e_s / f_s, e_t / f_t)
            # as bright in the template as a catalog neighbour is in the science
            lost = slice(n + rows.size, None)
            detected[lost] &= f_t[lost] >= cfg.max_snr * e_t[lost]
        held = held + lost_held
        keep = detected[:n]
        # a source the template does not hold is no star to match on (a transient): kept
        # all when fewer than 3 were in it, 5 stars among 20 transients fitted a kernel
        # of sum -0.77 on the transients
        if keep.sum() >= 3:
            keep = keep & ~_changed_flux(ratio[:n], sigma[:n], keep, cfg)
        self.metadata["nVariableSourcesRejected"] = int(np.count_nonzero(~keep))
        steady = keep  # by their fluxes
        if keep.sum() >= 3:
            # the neighbours judged against the kernel sources kept
            changed = (
                _changed_flux(
                    ratio[n:], sigma[n:], detected[n:], cfg, (ratio[:n][keep], sigma[:n][keep])
                )
                if x.size > n
                else np.zeros(0, dtype=bool)
            )
            snr = np.asarray(selected[snr_column])
            if rows.size:
                snr = np.concatenate([snr, np.asarray(catalog[snr_column])[rows]])
            # a lost star has no shift: it is judged by its flux alone
            shifted = np.zeros(x.size, dtype=bool)
            shifted[: snr.size] = self._moved(
                science, template, x[: snr.size], y[: snr.size], snr, keep
            )
            moved_here = shifted[:n] & keep
            self.metadata["nMovedSourcesRejected"] = int(moved_here.sum())
            keep = keep & ~moved_here
            beside = holders_of(changed | shifted[n:], held, n) & keep
            self.metadata["nChangedNeighbourStampsRejected"] = int(beside.sum())
            keep = keep & ~beside
        kept = selected[keep]
        if len(kept) < cfg.min_kernel_sources:
            raise InsufficientSourcesError(
                f"Only {len(kept)} sources were selected for PSF matching, but "
                f"{cfg.min_kernel_sources} are required (of the {len(selected)} selected on "
                f"the science image, {_unmatched(f_s[:n], f_t[:n], detected[:n], steady)}"
                f"{_moved_words(steady & ~keep, self.metadata)}). "
                "Supply a source catalog or lower sources.min_kernel_sources."
            )
        return kept

    def _moved(self, science, template, x, y, snr, reference) -> np.ndarray:
        """Stars at (x, y) that moved between the images (`core.stamp_neighbours.moved`)
        against the first ones flagged in ``reference``; none when fewer than 3 of those
        have clean stamps and a finite S/N."""
        fwhm = max(self.science_fwhm, self.template_fwhm)
        dx, dy, clean = star_shifts(science, template, x, y, fwhm)
        n = reference.size
        ensemble = np.flatnonzero(reference & clean[:n] & np.isfinite(snr[:n]))
        if ensemble.size < 3:
            return np.zeros(x.size, dtype=bool)
        return moved(dx, dy, clean, snr, ensemble, fwhm, self.config.sources.variability_sigma)

    def _fit_kernel(
        self, reference, target, kernel_sources, reference_fwhm, target_fwhm, bbox, noise_area=None
    ):
        """Fit K and b with K * reference + b ~ target over ``bbox``.

        ``noise_area`` (pixels per independent noise sample in the stamps) defaults to
        the larger of the two inputs' measured noise correlations.
        """
        self._stage("fit")
        config = self.config.kernel
        basis = make_kernel_basis(reference_fwhm, target_fwhm, config)
        if noise_area is None:
            noise_area = max(_noise_area(reference), _noise_area(target))
        solution = fit_psf_matching_kernel(
            reference,
            target,
            kernel_sources,
            basis,
            config,
            bbox=bbox,
            task=self.makeKernel,
            noise_area=noise_area,
        )
        self.notes.extend(solution.notes)
        self.solution = solution
        return solution

    def _keep_kernel_sources(self, result: SubtractionResult, kernel_sources) -> None:
        """The kernel sources into the result, with the matching kernel's reach (meta
        `KERNEL_REACH`: how far a saturated star's residual reaches, for ``bright_star``)
        and the highest spatial order of what was fitted on them alone and applied to
        the whole frame (meta `EXTRAPOLATED_ORDER`, for ``suspect_kernel``): the
        kernel's, and the subtracted background's unless it was refitted on every sky
        pixel, where the sky across the frame and not the stamps constrain it. The
        solution's orders, not the configured ones: too few stamps lower them. Only the
        sources whose stamps the final fit used: the kernel is constrained where they
        are, not where rejected candidates were."""
        solution = self.solution
        status = np.asarray(solution.candidates["status"])
        if status.size == len(kernel_sources):  # a candidate per source, in their order
            kernel_sources = kernel_sources[status == "GOOD"]
        order = solution.kernel.order
        config = self.config
        stamps_only = not self.background_refitted and config.kernel.fit_for_background
        if config.do_subtract_background and stamps_only:
            order = max(order, solution.background.order)
        kernel_sources.meta[EXTRAPOLATED_ORDER] = int(order)
        if result.psf_matching_kernel is not None:
            reach = result.psf_matching_kernel.reach(_KERNEL_REACH_FRACTION)
            kernel_sources.meta[KERNEL_REACH] = reach
        result.kernel_sources = kernel_sources

    def _coverage_guard(self, template, science, exc):
        """Report a kernel failure as a coverage failure when coverage is low (1.3 step 3)."""
        coverage = self._template_coverage(template, science)
        limit = self.config.min_template_fraction_for_expected_success
        if coverage < limit:
            return TemplateCoverageError(
                f"Insufficient Template Coverage. ({100 * coverage:.1f}% < {100 * limit:.1f}%) "
                f"Template coverage lower than expected to succeed. Failure is tolerable: "
                f"{exc.message if hasattr(exc, 'message') else exc}"
            )
        return exc

    def _convolve(self, exposure: Exposure, kernel, defer_variance: bool = False) -> Exposure:
        convolved = convolve_exposure(
            exposure,
            kernel,
            preserve_planes=self.config.preserve_mask_planes,
            copy_edge=True,
            defer_variance=defer_variance,
        )
        # the product states its own correlation, not its input's (read back by read_exposure)
        at_centre = kernel if isinstance(kernel, np.ndarray) else kernel.image()
        convolved.noise_correlation = convolved_noise_correlation(
            exposure.noise_correlation, at_centre
        )
        return convolved

    def _match_template(
        self, template: Exposure, science: Exposure, kernel, defer_variance: bool = False
    ) -> Exposure:
        """K * T on the science box, with the science PSF, calibration and units (BUNIT,
        gain, zero point: `in_units_of`); its variance deferred if ``defer_variance``
        (`convolve_exposure`)."""
        convolved = self._convolve(template, kernel, defer_variance)
        # a registered template is already on the science box: no frame-sized copy then
        matched = convolved if convolved.bbox == science.bbox else convolved.cutout(science.bbox)
        matched.psf = science.require_psf()
        matched.photo_calib = science.photo_calib
        # K carries the flux ratio: K * T is in science units, not the template's
        matched.metadata = in_units_of(matched.metadata, science.metadata)
        return matched

    def _subtract_matched(self, minuend: Exposure, matched: Exposure, background):
        """minuend - b - matched (b if subtracted), refined; returns (difference, background).

        When either variance is deferred, so is the difference's, and the background
        refinement takes the pixels where the minuend's variance is positive: a deferred
        plane is not made for that test (a convolved variance is >= 0 where it is
        finite, and NaN only next to non-finite inputs).
        """
        # the difference's planes are written from the operands (no copy of the minuend
        # first): the same numbers as copy, subtract the background, subtract in place
        image = frame_array(minuend.image.shape, minuend.image.dtype)
        if self.config.do_subtract_background:
            background.add_to(image, minuend.xy0, scale=-1.0, source=minuend.image)
        else:
            np.copyto(image, minuend.image)
        image -= matched.image

        def add_variances() -> np.ndarray:
            dtype = np.result_type(minuend.variance, matched.variance)
            out = frame_array(minuend.variance.shape, dtype)
            return np.add(minuend.variance, matched.variance, out=out)

        deferred = minuend.variance_deferred or matched.variance_deferred
        planes = {
            "image": image,
            "mask": frame_copy(minuend.mask),
            "mask_planes": minuend.mask_planes.copy(),
            "metadata": copy.deepcopy(minuend.metadata),
            # not the minuend's own (a gain model, say): `alsub info` of a product said so
            "variance_source": "propagated: the sum of the two matched inputs' variances",
        }
        if deferred:
            difference = minuend.replace_deferred(DeferredPlane(add_variances), **planes)
        else:
            difference = replace(minuend, variance=add_variances(), **planes)
        difference.or_mask_from(matched)
        usable = minuend.variance if deferred else difference.variance
        return difference, self._refine_background(difference, background, 1.0, usable)

    def _refine_background(
        self,
        difference: Exposure,
        background: BackgroundModel,
        scale: float,
        usable: np.ndarray | None = None,
    ) -> BackgroundModel:
        """Fit the smooth residual of ``difference`` on sky pixels, subtract it in place.

        The kernel fit sees the background only in the kernel stamps; every
        other sky pixel constrains it too. The residual is fitted with the
        background's own Chebyshev terms to medians of 32 px blocks of sky
        (sources, masked and non-finite pixels left out) and returned folded
        into the background model (``scale`` maps a residual in ``difference``
        to the model's units and sign). Sky pixels need a positive variance in
        ``usable`` (default the difference's).
        """
        if not (self.config.do_subtract_background and self.config.refine_background):
            return background
        # every sky pixel constrains the configured order, even where few stamps did not
        fitted_order = background.order
        background = background.raised(self.config.kernel.spatial_bg_order)
        variance = difference.variance if usable is None else usable
        x, y, level, weight = self._sky_block_medians(difference, variance)
        if len(level) < 2 * background.coefficients.size:
            return background
        x, y = x + difference.xy0[0], y + difference.xy0[1]
        design = chebyshev_terms(x, y, background.order, background.domain).T
        sqrt_w = np.sqrt(weight)
        residual, *_ = np.linalg.lstsq(design * sqrt_w[:, None], level * sqrt_w, rcond=None)
        if not np.all(np.isfinite(residual)):
            return background
        correction = BackgroundModel(residual, background.order, background.domain)
        correction.add_to(difference.image, difference.xy0, scale=-1.0)
        self.metadata["backgroundRefinement"] = [float(c) for c in residual]
        self.background_refitted = True
        if background.order > fitted_order:
            self.notes.append(
                f"the differential background (order {fitted_order} in the kernel fit) was "
                f"refitted at order {background.order} on all sky pixels"
            )
        return BackgroundModel(
            background.coefficients + scale * residual, background.order, background.domain
        )

    def _sky_block_medians(self, difference: Exposure, variance: np.ndarray):
        """`_block_medians` of the sky pixels of ``difference`` in 32 px blocks, on a 2x2
        subsample (plenty for six smooth terms and 4x cheaper; the masks too are only
        read on it); centres in the difference's pixels.

        Bands of block rows are independent: they run on threads, and the temporaries
        stay band-sized.
        """
        size, band = 16, 256  # subsample pixels per block side, subsample rows per band
        bits = np.int32(difference.bitmask(NOISE_MASK_PLANES))

        def medians(start: int):
            rows = np.s_[2 * start : 2 * (start + band) : 2, ::2]
            image = difference.image[rows]
            good = (difference.mask[rows] & bits) == 0
            good &= ~self.source_mask[rows]
            good &= np.isfinite(image) & (variance[rows] > 0)
            x, y, level, weight = _block_medians(image, good, size)
            return x, y + start, level, weight

        parts = thread_map(medians, range(0, (difference.height + 1) // 2, band))
        x, y, level, weight = (np.concatenate(values) for values in zip(*parts, strict=True))
        return 2 * x, 2 * y, level, weight

    def finalize(
        self,
        template,
        science,
        difference,
        kernel,
        template_matched=True,
        preconv_mode=False,
        preconv_kernel=None,
        spatially_varying=None,
    ):
        """Decorrelate the difference (or score) when ``do_decorrelation`` (algorithm.md 4.2)."""
        if preconv_kernel is not None and not (template_matched and preconv_mode):
            raise ValueError(
                "Pre-convolution kernel is allowed only if preConvMode==True and "
                "templateMatched==True."
            )
        if not self.config.do_decorrelation:
            return difference
        self._stage("decorrelate")
        if spatially_varying is None:
            spatially_varying = self.config.decorrelation.spatially_varying
        if template_matched:
            science, template = self._correct_static_structure(
                difference, science, template, kernel, preconv_kernel if preconv_mode else None
            )
        with self.decorrelate.timer("run"):
            # decorrelate_difference cuts the template to the difference box only if needed
            return decorrelate_difference(
                difference,
                science,
                template,
                kernel,
                template_matched=template_matched,
                preconv_mode=preconv_mode,
                preconv_kernel=preconv_kernel,
                spatially_varying=spatially_varying,
                config=self.config.decorrelation,
                task=self.decorrelate,
                consume=True,  # the difference is replaced by the result
            )

    def _correct_static_structure(
        self, difference, science, template, kernel, preconv_kernel
    ) -> tuple[Exposure, Exposure]:
        """Inputs whose sky-measured noise held static structure, corrected on the
        difference where it cancels (`static_structure_correction`); else unchanged."""
        measured = self.sky_correlated
        if not any(measured) or self.source_mask.shape != difference.shape:
            return science, template
        # as the decorrelation takes it: at the centre, (begin + end) / 2
        x0, y0 = difference.xy0
        kernel_image = _kernel_at(kernel, x0 + difference.width / 2.0, y0 + difference.height / 2.0)
        preconv = None
        if preconv_kernel is not None:
            preconv = np.asarray(preconv_kernel, dtype=np.float64)
            preconv = preconv / preconv.sum()
        # sky: no source on either input, unmasked, clear of the convolution edges
        sky = ~difference.masked(NOISE_MASK_PLANES) & ~self.source_mask
        margin = kernel_image.shape[0] // 2 + (0 if preconv is None else preconv.shape[0] // 2)
        frame = np.ones(sky.shape, dtype=bool)
        frame[margin : -margin or None, margin : -margin or None] = False
        sky &= ~frame
        box = difference.bbox
        inputs = (science.cutout(box), template.cutout(box))
        correction = static_structure_correction(
            difference.image, sky, *inputs, kernel_image, preconv, measured, self._floors()
        )
        if correction is None:
            return science, template
        self.metadata["staticStructureRatio"] = correction.ratio
        self.metadata["staticStructureFactors"] = list(correction.factors)
        self.static_correlations = correction.correlations
        self.static_removed = correction.removed
        self.static_note = (
            f"the difference is {correction.ratio:.2f}x as noisy on sky as the inputs' "
            "sky-measured noise predicts (static faint structure in those estimates): "
            f"their variances were scaled by {correction.factors[0]:.2f} (science) and "
            f"{correction.factors[1]:.2f} (template) for the decorrelation"
        )
        self.notes.append(self.static_note)
        out = []
        for exposure, factor, rho in zip(
            (science, template), correction.factors, correction.correlations, strict=True
        ):
            out.append(
                replace(
                    exposure,
                    variance=exposure.variance * np.float32(factor),
                    noise_correlation=rho,
                )
            )
        return out[0], out[1]

    def _static_refit(self, template: Exposure, science: Exposure, notes: int) -> bool:
        """Whether to fit again: the static-structure correction found an input's
        sky-measured variance more than `excess_ratio` times its noise (confusion, not
        noise). Its corrected variance and correlation are then put on the working input
        (it is no longer sky-measured) and the first fit's notes dropped."""
        factors = self.metadata.get("staticStructureFactors")
        correlations = self.static_correlations
        if factors is None or correlations is None or self.static_refitted:
            return False
        excess = self.config.scale_variance.excess_ratio
        if not min(factors) * excess < 1.0:
            return False
        self.static_refitted = True
        # not the last note: a score's noise floor may follow it
        static_note = self.static_note
        del self.notes[notes:]
        labels = [
            label for label, f in zip(("science", "template"), factors, strict=True) if f < 1.0
        ]
        self.notes.append(
            f"{static_note}; so the {' and '.join(labels)} sky noise was mostly static "
            "structure (unresolved sources), not correlated noise: taken off the sky's "
            "variance, and the kernel fitted again"
        )
        for exposure, removed, factor, rho, name in zip(
            (science, template),
            self.static_removed,
            factors,
            correlations,
            ("Science", "Template"),
            strict=True,
        ):
            if removed > 0:
                # the setup's note took that sky for correlated noise: dropped, or told
                # what is left of the correlation
                setup_note = f"{name.lower()}: {CORRELATED_NOISE_NOTE}"
                left = (
                    []
                    if rho is None
                    else [
                        f"{name.lower()}: the noise correlation left once the static "
                        "structure is taken off is used by the decorrelation"
                    ]
                )
                self.notes[:] = [
                    kept for note in self.notes for kept in (left if note == setup_note else [note])
                ]
                # static structure added to the sky's variance, not to the sources' photon
                # noise: taken off as a sky term (scaling the plane would shrink the latter)
                lowered = exposure.variance - np.float32(removed)
                # a pixel quieter than the sky it was measured on: scaled instead
                exposure.variance = np.where(
                    lowered > 0, lowered, exposure.variance * np.float32(factor)
                ).astype(np.float32)
                exposure.noise_correlation = rho
                self.metadata[f"staticStructure{name}Removed"] = removed
        self.sky_correlated = (False, False)
        del self.metadata["staticStructureFactors"]
        return True

    def _fitted(
        self,
        template: Exposure,
        science: Exposure,
        attempt: Callable[[], tuple[SubtractionResult, Table]],
    ) -> tuple[SubtractionResult, Table]:
        """``attempt()`` (select the kernel sources, fit, subtract): run again, once, when
        the difference shows an input's sky-measured noise was mostly static structure
        (`_static_refit`: the fit weighted the pixels by that noise too). A kernel failure
        is reported as a coverage failure where coverage is low (`_coverage_guard`)."""
        while True:
            notes = len(self.notes)
            try:
                result, kernel_sources = attempt()
            except (InsufficientSourcesError, NoKernelCandidatesError, KernelSolutionError) as exc:
                raise self._coverage_guard(template, science, exc) from None
            if not self._static_refit(template, science, notes):
                return result, kernel_sources

    def _floors(self) -> tuple[float, float]:
        """Each input's pixel-scale noise over its scaled plane (NaN: not measured):
        static structure cannot inflate it and correlated noise only lowers it."""
        floors = []
        for name in ("Science", "Template"):
            factor = self.metadata.get(f"scale{name}VarianceFactor", 1.0)
            _, pixel_scale = self.metadata.get(f"scale{name}VarianceEstimates", (math.nan,) * 2)
            floors.append(pixel_scale / factor if factor > 0 else math.nan)
        return floors[0], floors[1]

    def _base_metrics(self, result: SubtractionResult, science: Exposure) -> dict[str, Any]:
        kernel = result.psf_matching_kernel
        metadata = self.metadata
        metrics = {
            "mode": result.mode,
            "kernel_sum": float(kernel.sum(*science.bbox_center())) if kernel else math.nan,
            "flux_ratio": _flux_ratio(kernel, science, result.mode),
            "n_kernel_sources": int(metadata.get("nPsfSources", 0)),
            "n_good_kernel_candidates": int(self.makeKernel.metadata.get("nGoodCandidates", 0)),
            "kernel_size": int(kernel.size) if kernel else 0,
            "star_offset_px": metadata.get("starOffset"),
            "star_offset_error_px": metadata.get("starOffsetError"),
            "science_psf_fwhm": metadata.get("sciencePsfSize"),
            "science_psf_source": self.psf_sources.get("science"),
            "template_psf_source": self.psf_sources.get("template"),
            "template_psf_fwhm": metadata.get("templatePsfSize"),
            "template_coverage_percent": metadata.get("templateCoveragePercent"),
            "science_variance_scale": metadata.get("scaleScienceVarianceFactor", 1.0),
            "template_variance_scale": metadata.get("scaleTemplateVarianceFactor", 1.0),
            "science_limiting_magnitude": metadata.get("scienceLimitingMagnitude"),
            "template_limiting_magnitude": metadata.get("templateLimitingMagnitude"),
            "diffim_limiting_magnitude": metadata.get("diffimLimitingMagnitude"),
            "spatial_condition_number": self.makeKernel.metadata.get("spatialConditionNum"),
            "spatial_kernel_order": self.makeKernel.metadata.get("spatialKernelOrder"),
            # the background subtracted: the kernel fit's, raised when refitted on all sky
            "spatial_bg_order": (
                int(result.fitted_background.order)
                if result.fitted_background is not None
                else self.makeKernel.metadata.get("spatialBgOrder")
            ),
        }
        metrics["registration"] = self.registration
        if result.fitted_background is not None:
            metrics["background_coefficients"] = [
                float(c) for c in np.ravel(result.fitted_background.coefficients)
            ]
        metrics.update(noise_statistics(result.output, exclude=self.source_mask))
        return metrics

    def _kernel_star_residuals(self, result: SubtractionResult, psf: Psf | None = None) -> dict:
        """The fraction of their flux the kernel stars of the final fit keep in the output
        (`star_residual_fraction`; the quality verdict judges it). ``psf``: the profile
        fitted in both the output and the matched science (default: each one's own)."""
        solution = getattr(self, "solution", None)
        if solution is None or result.matched_science is None:
            return {}
        table = solution.candidates
        good = np.asarray(table["status"]) == "GOOD"
        try:
            return star_residual_fraction(
                result.output,
                result.matched_science,
                np.asarray(table["x"], dtype=np.float64)[good],
                np.asarray(table["y"], dtype=np.float64)[good],
                output_psf=psf,
                minuend_psf=psf,
                rating=np.asarray(table["rating"], dtype=np.float64)[good],
            )
        except PsfError:  # a matched profile with no positive flux: no figure, no verdict
            return {}

    def metrics_and_dia_sources(
        self,
        result: SubtractionResult,
        science: Exposure,
        template: Exposure,
        metrics: Callable[[], dict[str, Any]],
    ) -> None:
        """``result.metrics`` from ``metrics()`` and the DIA sources (`detect`) at once:
        both only read the products, neither reads what the other makes, and each leaves
        a core idle much of its time (2048 auto pair: metrics 1.1 cores busy, DIA sources
        1.5). The metrics run on a thread of their own beside the DIA sources, which keep
        their pool (the two 0.34 -> 0.30 s at 2048; with the cores split between them the
        DIA sources had one thread, and at 4096 the two took longer than in turn); first,
        on the caller's thread, when one thread is allowed."""
        self._stage("metrics")

        def timed() -> dict[str, Any]:
            with self.timer("metrics"):
                return metrics()

        with task_pool() as pool:
            made = pool.submit(timed)
            table = self.detect(result, science, template)
        result.metrics = made.result()
        if table is not None:
            result.dia_sources = table
            # what turns the fluxes of epochs measured against one template into a curve
            ratio = result.metrics.get("flux_ratio")
            if isinstance(ratio, float) and math.isfinite(ratio):
                table.meta["flux_ratio"] = ratio
            result.metrics["n_dia_sources"] = len(table)
            for key in ("positive", "negative", "dipoles"):
                result.metrics[f"n_dia_{key}"] = table.meta[f"n_{key}"]

    def detect(
        self, result: SubtractionResult, science: Exposure, template: Exposure
    ) -> Table | None:
        """The DIA sources on the difference or score (``config.dia``; None when off).
        ``science`` and ``template`` (registered) as they were before any convolution: a
        cosmic ray a convolution widened is told there (`core.input_rays`), against the
        science PSF the kernel gave when it did (`derived_science_psf`)."""
        if not self.config.dia.enabled:
            return None
        if self.derived_science_psf is not None:
            science = science.with_psf(self.derived_science_psf)
        self._stage("detect")
        with self.timer("detect"):
            return dia_sources(
                result.output,
                self.config.dia,
                is_score=result.score is not None,
                matched_science=result.matched_science,
                matched_template=result.matched_template,
                kernel_sources=result.kernel_sources,
                inputs=(science, template),
                preconvolution_kernel=self.preconvolution_cut,
            )

    def assess_quality(self, result: SubtractionResult, science, template) -> dict[str, Any]:
        """The verdict (core.quality) from the metrics, the kernel and the warnings."""
        kernel = result.psf_matching_kernel
        kernel_image = kernel.image(*science.bbox_center()) if kernel is not None else None
        pair = self._matched_psfs(science, template)
        if kernel_image is not None:
            result.metrics["kernel_psf_width_ratio"] = (
                kernel_psf_width_ratio(kernel_image, *pair) if pair else math.nan
            )
        result.metrics["psf_sharpening_ratio"] = sharpening_ratio(*pair[:2]) if pair else math.nan
        if pair and self._psfs_vary(science, template):
            with self.timer("psfChecksOverField"):
                result.metrics.update(self._psf_checks_over_field(science, template, kernel))
        stamps = None
        solution = getattr(self, "solution", None)
        if solution is not None:
            good = np.asarray(solution.candidates["status"]) == "GOOD"
            stamps = (
                np.asarray(solution.candidates["x"])[good],
                np.asarray(solution.candidates["y"])[good],
            )
        verdict = assess_quality(
            result.metrics,
            science,
            template,
            kernel_image,
            stamps,
            self.warnings,
            self.config.quality,
            reference_shift=self.kernel_reference_shift,
            star_shift=self._star_shift(),
        )
        return verdict.as_dict()

    def _matched_psfs(
        self, science, template, position: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """The convolved image's PSF model and the one the kernel should turn it into (the
        other input's, or the preconvolved science's), drawn at ``position`` (default the
        science centre), and whether that target is a Gaussian standing in for a PSF nobody
        estimated; None without PSFs. What `core.psf_consistency` compares."""
        convolved, target, label = self._convolved_and_target(science, template)
        at = position or science.bbox_center()
        try:
            target_psf = self.preconvolved_psf or target.require_psf()
            stand_in = self.preconvolved_psf is None and label in self.psf_stand_ins
            if self.preconvolved_stand_in is not None:
                target_psf, stand_in = self.preconvolved_stand_in, True
            target_stamp = target_psf.kernel_image(*at)
            kernel = self.preconvolution_kernel
            if position is not None and self.preconvolved_stand_in is None and kernel is not None:
                # the preconvolved PSF was drawn once: draw P_S here through P
                target_stamp = _preconvolved_stamp(science, kernel, at)
            return convolved.require_psf().kernel_image(*at), target_stamp, stand_in
        except PsfError:
            return None

    def _convolved_and_target(self, science, template) -> tuple[Exposure, Exposure, str]:
        """The convolved input, the one it is matched to, and that one's label."""
        if self.metadata.get("convolvedExposure") == "Science":
            return science, template, "template"
        return template, science, "science"

    def _psfs_vary(self, science, template) -> bool:
        """Whether a PSF model the consistency checks draw differs anywhere on the field
        (`core.psf_consistency.field_points`) from its stamp at the centre. Stand-ins are
        constant; the preconvolved science varies as the science's PSF does."""
        convolved, target, _ = self._convolved_and_target(science, template)
        models = [convolved]
        if self.preconvolved_stand_in is None:
            models.append(science if self.preconvolved_psf is not None else target)
        points = [position for _, position in field_points(science.bbox)]
        try:
            for psf in (exposure.require_psf() for exposure in models):
                centre = psf.kernel_image(*points[0])
                if any(not np.array_equal(psf.kernel_image(*p), centre) for p in points[1:]):
                    return True
        except PsfError:
            return False
        return False

    def _psf_checks_over_field(self, science, template, kernel) -> dict[str, Any]:
        """The PSF consistency checks (`kernel_psf_width_ratio`, `psf_sharpening_ratio`) at
        the centre, edge midpoints and corners of the science when its PSF models vary
        there: each judged at its worst, the centre's value and the place kept beside it.
        A template sharper at the centre and broader in the corners read 0.92 at the
        centre and 1.70 in the corners, where its stars were left in the difference."""
        sharpening, widths = [], []
        for where, position in field_points(science.bbox):
            pair = self._matched_psfs(science, template, position)
            if pair is None:
                return {}
            sharpening.append((where, sharpening_ratio(*pair[:2])))
            if kernel is not None:
                widths.append((where, kernel_psf_width_ratio(kernel.image(*position), *pair)))
        out: dict[str, Any] = {}
        ratio, where = worst_over_field(sharpening)
        out["psf_sharpening_ratio_centre"] = sharpening[0][1]
        out["psf_sharpening_ratio"], out["psf_sharpening_where"] = ratio, where
        if widths:
            ratio, where = worst_over_field(widths, lambda r: max(r, 1.0 / r))
            out["kernel_psf_width_ratio_centre"] = widths[0][1]
            out["kernel_psf_width_ratio"], out["kernel_psf_width_where"] = ratio, where
        return out

    def _science_stand_in_only(self) -> bool:
        """The science's PSF is a Gaussian standing in and the template's is not."""
        return "science" in self.psf_stand_ins and "template" not in self.psf_stand_ins

    def _stand_in_gives_way(self, after_fit: str) -> None:
        """The science stand-in's warning goes (it no longer makes PSF fluxes); a note
        says what took its place after the fit."""
        stand_in = self.psf_stand_ins["science"]
        self.warnings = [w for w in self.warnings if w != stand_in]
        self.notes.append(
            "science: the Gaussian standing in for its PSF (none could be estimated) "
            f"sized the kernel fit only: after the fit {after_fit}"
        )

    def _star_shift(self) -> tuple[float, float] | None:
        """The centroid shift the kernel needs to follow the stars' offset: the template's
        stars moved onto the science's when the template is convolved, the other way
        round when the science is."""
        offset = self.star_offset
        if offset is None:
            return None
        sign = -1.0 if self.metadata.get("convolvedExposure") == "Science" else 1.0
        return sign * offset.dx, sign * offset.dy

    def _finish(self, result: SubtractionResult, science, template) -> SubtractionResult:
        result.metrics["warnings"] = list(self.warnings)
        result.metrics["notes"] = list(self.notes)
        result.metrics["quality"] = self.assess_quality(result, science, template)
        result.warped_template = self.warped_template
        result.timings = {
            k.split(".", 1)[1]: v
            for k, v in self.durations().items()
            if k.startswith(self.get_full_name() + ".")
        }
        result.metrics["timings"] = result.timings
        result.metadata = self.get_full_metadata()
        return result


def _flux_ratio(kernel, science: Exposure, mode: str) -> float:
    """Science / template flux ratio the kernel measured, whichever image it convolved:
    its sum maps the convolved image's fluxes onto the other's."""
    if not kernel:
        return math.nan
    total = float(kernel.sum(*science.bbox_center()))
    return 1.0 / total if mode == "convolveScience" and total != 0 else total


class AlardLuptonSubtractTask(_SubtractBase):
    """PSF-match template and science with an AL kernel and subtract (algorithm.md 1.3)."""

    _default_name = "alardLuptonSubtract"

    def run(
        self, template: Exposure, science: Exposure, sources=None, consume_inputs: bool = False
    ) -> SubtractionResult:
        """Subtract ``template`` from ``science``; ``sources`` is an optional catalog.

        Returns a `SubtractionResult` with ``difference`` in the science image's units.
        ``consume_inputs``: see `run_subtraction`.
        """
        if self.config.mode == "preconvolve":
            raise ValueError("mode 'preconvolve' is run by AlardLuptonPreconvolveSubtractTask")
        template, science = _working_copies(template, science, consume_inputs)
        with self.timer("run"), one_blas_thread():
            template = self._register(template, science)
            self._stage("prepare")
            with self.timer("prepare"):
                sources = _without_frame_meta(self._prepare_inputs(template, science, sources))
                convolve_template = self._choose_mode(template, science)
            matched_psf = self.science_fwhm if convolve_template else self.template_fwhm

            def attempt() -> tuple[SubtractionResult, Table]:
                with self.timer("select"):
                    kernel_sources = self._select_sources(template, science, sources, matched_psf)
                    self._measure_star_offset(template, science, kernel_sources)
                with self.timer("fit"):
                    solution = self.run_make_kernel(
                        template, science, kernel_sources, convolve_template
                    )
                if convolve_template:
                    return self.run_convolve_template(template, science, solution), kernel_sources
                return self.run_convolve_science(template, science, solution), kernel_sources

            result, kernel_sources = self._fitted(template, science, attempt)
            self._keep_kernel_sources(result, kernel_sources)
            self.metrics_and_dia_sources(
                result,
                science,
                template,
                lambda: self.compute_image_metrics(science, result, sources),
            )
        return self._finish(result, science, template)

    def _choose_mode(self, template: Exposure, science: Exposure) -> bool:
        """True to convolve the template (algorithm.md 1.3 step 2)."""
        mode = self.config.mode
        if mode == "convolveTemplate":
            convolve_template = True
        elif mode == "convolveScience":
            convolve_template = False
        elif mode == "auto":
            convolve_template = _template_is_sharper(
                template, science, self.template_fwhm, self.science_fwhm
            )
        else:
            raise ValueError(f"Cannot handle AlardLuptonSubtract mode: {mode}")
        self.metadata["convolvedExposure"] = "Template" if convolve_template else "Science"
        return convolve_template

    def run_make_kernel(self, template, science, kernel_sources, convolve_template=True):
        """Fit the matching kernel in the chosen direction."""
        bbox = _intersect(template.bbox, science.bbox)
        if convolve_template:
            return self._fit_kernel(
                template, science, kernel_sources, self.template_fwhm, self.science_fwhm, bbox
            )
        return self._fit_kernel(
            science, template, kernel_sources, self.science_fwhm, self.template_fwhm, bbox
        )

    def run_convolve_template(self, template, science, solution) -> SubtractionResult:
        """D = S - (K * T + b): the template is matched to the science PSF."""
        self._stage("convolve")
        kernel, background = solution.kernel, solution.background
        science = self._science_psf_through_kernel(template, science, kernel)
        with self.timer("convolve"):
            # decorrelating, the difference's variance is made from the unconvolved
            # inputs': the matched template's is made only for a product or a caller
            # that reads it (the DIA sources read stamps of it, made on their own).
            # Not in preconvolve mode: its kernel, matched to P * S, is wide, and the
            # stamps of ~1000 sources took as long as the plane (4096^2)
            matched = self._match_template(
                template, science, kernel, defer_variance=self.config.do_decorrelation
            )
            difference, background = self._subtract_matched(science, matched, background)
        difference = self.finalize(template, science, difference, kernel, template_matched=True)
        return SubtractionResult(
            difference=difference,
            matched_template=matched,
            matched_science=science,
            background_model=background if self.config.do_subtract_background else None,
            fitted_background=background,
            psf_matching_kernel=kernel,
            mode="convolveTemplate",
        )

    def _science_psf_through_kernel(self, template: Exposure, science: Exposure, kernel):
        """The science as subtracted: with the template's PSF seen through the fitted
        kernel when its own is a Gaussian standing in and the template's is not.

        K * P_T = P_S is what the fit solved for on the kernel stars: a real profile
        with its wings, where the stand-in has none (copies of a real star injected
        into decam_c / decam_coadd: forced PSF fluxes 0.82 / 0.82 of their light with
        the Gaussian, 0.98 / 0.94 with this). The difference, its decorrelation (the
        static-structure correction's profile of faint sources), the matched template,
        the DIA sources, the star residuals and the products take it; the stand-in's
        warning goes. The stand-in stays where the kernel is checked against a science
        PSF it did not make (`_matched_psfs`: against its own output the
        check would always pass). Preconvolve mode does the same when K is fitted
        between the images as they are (`_preconvolution_through_kernel`); fitting
        K * T ~ P * S needs P before the fit. Convolving the science, K maps it onto the
        template and says nothing of P_S on its own (the difference takes P_T,
        `run_convolve_science`)."""
        if not self._science_stand_in_only():
            return science
        self.derived_science_psf = KernelMatchedPsf(template.require_psf(), kernel)
        self.psf_sources["science"] = _KERNEL_MATCHED
        self._stand_in_gives_way("its PSF is the template's seen through the matching kernel")
        return science.with_psf(self.derived_science_psf)

    def run_convolve_science(self, template, science, solution) -> SubtractionResult:
        """D = (K * S + b - T) / sum(K): the science is matched to the template PSF.

        Dividing by the kernel sum keeps the difference in science units
        (decision 2); the matched template is reported in those units too.
        """
        self._stage("convolve")
        kernel, background = solution.kernel, solution.background
        norm = float(kernel.sum(*science.bbox_center()))
        with self.timer("convolve"):
            matched_science = self._convolve(science, kernel)
            # a transient's profile in K * S is the science PSF seen through K, exactly;
            # the template PSF is only what K approximates. A Gaussian standing in for
            # the science's is further off than that: K made the stars' real profile
            # into P_T (simulated Moffat science, 6 stars: transients' forced fluxes
            # 0.78 of theirs through the stand-in, 1.00 with the true PSF or P_T)
            matched_science.psf = KernelMatchedPsf(science.psf, kernel)
            if self._science_stand_in_only():
                matched_science.psf = template.require_psf()
                self._stand_in_gives_way("the difference's PSF is the template's, K's target")
            _scale(matched_science, 1.0 / norm)
            matched_template = template.cutout(science.bbox)
            matched_template.photo_calib = science.photo_calib
            _scale(matched_template, 1.0 / norm)
            # T / sum(K) is in science units: the science's BUNIT, gain and zero point
            matched_template.metadata = in_units_of(matched_template.metadata, science.metadata)
            difference = matched_science.copy()
            if self.config.do_subtract_background:
                background.add_to(difference.image, difference.xy0, scale=1.0 / norm)
            _subtract_in_place(difference, matched_template)
            # D = (K*S + b - T) / norm, so a residual r in D corrects b by -norm r
            background = self._refine_background(difference, background, scale=-norm)
        difference = self.finalize(template, science, difference, kernel, template_matched=False)
        return SubtractionResult(
            difference=difference,
            matched_template=matched_template,
            matched_science=matched_science,
            background_model=background.negated() if self.config.do_subtract_background else None,
            fitted_background=background,
            psf_matching_kernel=kernel,
            mode="convolveScience",
        )

    def compute_image_metrics(self, science, result: SubtractionResult, sources) -> dict:
        """Footprint ratios (algorithm.md 6.1) plus kernel, PSF, coverage and noise figures."""
        metrics = self._base_metrics(result, science)
        metrics.update(
            compute_difference_metrics(
                science, result.output, sources, self.science_fwhm, self.config, sky=self.sky
            )
        )
        metrics.update(self._kernel_star_residuals(result))
        for key in (
            "differenceFootprintRatioMean",
            "differenceFootprintRatioStdev",
            "differenceFootprintSkyRatioMean",
            "differenceFootprintSkyRatioStdev",
        ):
            self.metadata[key] = metrics.get(key)
        return metrics


class AlardLuptonPreconvolveSubtractTask(_SubtractBase):
    """Score image: science correlated with its PSF minus the matched template (1.4)."""

    _default_name = "alardLuptonPreconvolveSubtract"

    def run(
        self, template: Exposure, science: Exposure, sources=None, consume_inputs: bool = False
    ) -> SubtractionResult:
        """Return a `SubtractionResult` whose ``score`` / sqrt(variance) is the detection S/N.

        ``consume_inputs``: see `run_subtraction`."""
        template, science = _working_copies(template, science, consume_inputs)
        with self.timer("run"), one_blas_thread():
            template = self._register(template, science)
            self._stage("prepare")
            with self.timer("prepare"):
                sources = _without_frame_meta(self._prepare_inputs(template, science, sources))
                preconv_kernel = self._preconvolution_kernel(science)
                self.metadata["convolvedExposure"] = "Preconvolution"
            self.metadata["preconvolvedSciencePsfSize"] = math.sqrt(2.0) * self.science_fwhm

            def fit_between_images() -> tuple[Table, Any]:
                """K fitted with K * T + b ~ S, between the images as they are."""
                with self.timer("select"):
                    kernel_sources = self._select_sources(
                        template, science, sources, self.science_fwhm
                    )
                    self._measure_star_offset(template, science, kernel_sources)
                return kernel_sources, self._fit_template_to_science(
                    template, science, kernel_sources
                )

            def attempt() -> tuple[SubtractionResult, Table]:
                if self.config.preconvolve_via_difference and _template_is_sharper(
                    template, science, self.template_fwhm, self.science_fwhm
                ):
                    if self._science_stand_in_only():
                        # P is the science PSF the fit found: made after it
                        kernel_sources, solution = fit_between_images()
                        matched, kernel = self._preconvolution_through_kernel(
                            template, science, solution.kernel, preconv_kernel.shape[0]
                        )
                        solution.kernel = solution.kernel.followed_by(kernel)
                        preconvolved = self._preconvolve(matched, kernel)
                        result = self._score(template, matched, preconvolved, solution, kernel)
                        return result, kernel_sources
                    # the fit is between the images as they are: P * S is made beside the
                    # selection and the fit, which leave a core mostly idle
                    with alongside(lambda: self._preconvolve(science, preconv_kernel)) as made:
                        kernel_sources, solution = fit_between_images()
                    solution.kernel = solution.kernel.followed_by(preconv_kernel)
                    # the threads' arenas keep what they freed: the frames to come need it
                    release_free_memory()
                    result = self._score(template, science, made.result(), solution, preconv_kernel)
                    return result, kernel_sources
                matched_science = self._preconvolve(science, preconv_kernel)
                with self.timer("select"):
                    half = preconv_kernel.shape[0] // 2
                    # stars in P * S have the PSF seen through P: the variability filter
                    # compares their PSF fluxes with the template's (the matched science
                    # itself keeps the science PSF, as results do)
                    seen_through_p = replace(matched_science, psf=self.preconvolved_psf)
                    kernel_sources = self._select_sources(
                        template,
                        seen_through_p,
                        sources,
                        math.sqrt(2.0) * self.science_fwhm,
                        edge_buffer=half,
                    )
                    self._measure_star_offset(template, science, kernel_sources)
                result = self.run_preconvolve(
                    template, science, matched_science, kernel_sources, preconv_kernel
                )
                return result, kernel_sources

            result, kernel_sources = self._fitted(template, science, attempt)
            self._keep_kernel_sources(result, kernel_sources)
            self.metrics_and_dia_sources(
                result, science, template, lambda: self._score_metrics(result, science)
            )
        return self._finish(result, science, template)

    def _score_metrics(self, result: SubtractionResult, science: Exposure) -> dict[str, Any]:
        """The base metrics of a score, its interpolated pixels and propagated noise ratio,
        and its kernel stars' residuals."""
        metrics = self._base_metrics(result, science)
        metrics["n_interpolated"] = int(self.metadata.get("nInterpolated", 0))
        metrics["score_noise_ratio_propagated"] = self.metadata.get("scoreNoiseRatioPropagated")
        # a star in the score and in P * S has the science PSF seen through P
        metrics.update(self._kernel_star_residuals(result, self.preconvolved_psf))
        return metrics

    def _add_score_noise_floor(self, score: Exposure) -> None:
        """Add to the score's variance the sky scatter its propagation does not explain.

        Each score pixel is a matched-filter value, so residual structure on the PSF
        scale (unresolved stars not matched to the last percent in a crowded field, PSF
        mismatch) is noise for it, though not pixel noise: the propagated variance then
        understates the scatter of the score on empty sky (SAAO bulge frames in poor
        seeing: 1.6-2.9x). As Rubin scales input variances to the measured noise, the
        excess is measured on sky pixels and added as a constant floor, so that
        score / sqrt(variance) is an honest S/N; the ratio before goes to the metrics
        and, when large, to the verdict.
        """
        step = max(1, (1 << 20) // max(score.width, 1))
        blocks = [slice(y, y + step) for y in range(0, score.height, step)]
        bits = score.bitmask(NOISE_MASK_PLANES)

        def good_rows(rows: slice) -> np.ndarray:
            """Sky pixels with a usable score and variance, in a block of rows."""
            image, variance = score.image[rows], score.variance[rows]
            keep = ~self.source_mask[rows]
            if bits:
                keep &= (score.mask[rows] & bits) == 0
            keep &= np.isfinite(image)
            keep &= np.isfinite(variance)
            keep &= variance > 0
            return keep

        # blocks of rows on all cores: each pass is a few whole-frame operations
        good = thread_map(good_rows, blocks)
        counts = [int(np.count_nonzero(keep)) for keep in good]
        n_good = sum(counts)
        if n_good < 100:
            return
        starts = np.concatenate([[0], np.cumsum(counts)])

        def pulls(floor: float) -> np.ndarray:
            """score / sqrt(variance + floor) on the good pixels, computed in float64 a block
            of rows at a time and kept in float32 (half a float64 frame at the run's peak;
            its robust std moves by round-off, ~1e-7), in frame order."""
            z = np.empty(n_good, dtype=np.float32)

            def block(k: int) -> None:
                rows, keep = blocks[k], good[k]
                part = score.image[rows][keep].astype(np.float64)
                scale = score.variance[rows][keep].astype(np.float64)
                if floor:
                    scale += floor
                np.sqrt(scale, out=scale)
                part /= scale
                z[starts[k] : starts[k + 1]] = part

            thread_map(block, range(len(blocks)))
            return z

        ratio = float(order.mad_std(pulls(0.0), consume=True))
        self.metadata["scoreNoiseRatioPropagated"] = ratio
        self.metadata.pop("scoreNoiseFloor", None)  # a first fit's, when fitted again
        if not ratio > self.config.score_noise_tolerance:
            return

        # the constant e with robust std of score / sqrt(variance + e) equal to 1: a root
        # of a continuous decreasing function, bracketed by 0 (ratio - 1 > 0) and about
        # median(variance) ratio^2 (Brent: ~10 passes over the frame where bisection took 40)
        def excess(floor: float) -> float:
            return float(order.mad_std(pulls(floor), consume=True)) - 1.0

        # every 4th row and column: the bracket needs no precision
        sample = np.concatenate(
            [
                score.variance[rows][-rows.start % 4 :: 4, ::4][keep[-rows.start % 4 :: 4, ::4]]
                for rows, keep in zip(blocks, good, strict=True)
            ]
        )
        upper = float(order.median(sample, consume=True)) * ratio**2 if sample.size else 1.0
        floor = _root_from_zero(excess, upper, 4.0, 1e-9)
        score.variance += np.float32(floor)
        self.metadata["scoreNoiseFloor"] = floor
        self.notes.append(
            f"the score's scatter on sky was {ratio:.2f}x its propagated noise (structure on "
            "the PSF scale: crowding or PSF mismatch); a constant noise floor was added to its "
            "variance so that score/sqrt(variance) is an honest S/N"
        )

    def _preconvolution_kernel(self, science: Exposure, size: int | None = None) -> np.ndarray:
        """Unit-sum science PSF at its average position, applied by correlation (decision 1);
        cut to ``size`` (odd) when given."""
        psf = science.require_psf()
        position = psf.average_position or science.bbox_center()
        stamp = np.asarray(psf.kernel_image(*position), dtype=np.float64)
        if stamp.shape[0] % 2 == 0 or stamp.shape[1] % 2 == 0:
            raise ValueError(
                f"Preconvolution requires an odd-sized PSF kernel, got "
                f"{stamp.shape[1]}x{stamp.shape[0]}."
            )
        whole = stamp.shape
        stamp = _trim_to_power(stamp, self.config.preconvolution_power_fraction)
        stamp = _trim_to_width(stamp, self.config.preconvolution_width_fwhm, self.science_fwhm)
        if size is not None:
            stamp = _centre_cut(stamp, size // 2)
        self.metadata["preconvolutionKernelSize"] = int(stamp.shape[0])
        # K * T matches P * S, so K carries P's own centroid offset besides any misalignment
        self.kernel_reference_shift = kernel_centroid(stamp)
        kernel = stamp / stamp.sum()
        self.preconvolved_psf = _preconvolved_psf(science, kernel)
        self.preconvolution_kernel = kernel
        # a cut P is no longer the science PSF: a point source in the score is the PSF
        # correlated with the P applied, which the catalog's profiles must be too
        self.preconvolution_cut = kernel if stamp.shape != whole else None
        return kernel

    def _fill_bad(self, exposure: Exposure) -> Exposure:
        """The exposure with bad-plane pixels replaced by their nearest good pixel's value
        (1.4 step 3; Rubin interpolates them). A saturated core keeps about its
        saturation level, as a convolution of the clipped values would: the frame median
        would leave a star-sized hole that the kernel spreads over its whole footprint."""
        bad = exposure.masked(self.config.bad_mask_planes)
        bad |= ~np.isfinite(exposure.image)
        self.metadata["nInterpolated"] = int(np.count_nonzero(bad))
        image = exposure.image
        if bad.any() and not bad.all():
            image = fill_from_nearest(image, bad)
        # only the image changes: variance and mask are shared (they are only read)
        return replace(exposure, image=image)

    def run_preconvolve(
        self, template, science, matched_science, select_sources, preconv_kernel
    ) -> SubtractionResult:
        """Fit K * T + b ~ P * S on the inner box, then score = P * S - K * T (- b)."""
        half = preconv_kernel.shape[0] // 2
        sx0, sy0, sx1, sy1 = science.bbox
        inner = (sx0 + half, sy0 + half, sx1 - half, sy1 - half)
        # P * S has noise correlated over the PSF: 1 / sum(P^2) pixels per sample
        preconv_area = 1.0 / float(np.sum(preconv_kernel**2))
        with self.timer("fit"):
            solution = self._fit_kernel(
                template,
                matched_science,
                select_sources,
                self.template_fwhm,
                math.sqrt(2.0) * self.science_fwhm,
                inner,
                noise_area=max(preconv_area * _noise_area(science), _noise_area(template)),
            )
        return self._score(template, science, matched_science, solution, preconv_kernel)

    def _fit_template_to_science(self, template, science, kernel_sources):
        """Fit K * T + b ~ S (T sharper), to be followed by P: the score
        P * S - (K then P) * T (- b) is `run_preconvolve`'s, whose kernel is K followed
        by P exactly, but K is fitted where it is smallest and best constrained: between
        the two images as they are (smaller kernel and stamps, more usable stars).
        Rubin's preconvolution exists to avoid deconvolving when the science is sharper.
        """
        self.metadata["preconvolveKernelFit"] = "templateToScience"
        with self.timer("fit"):
            solution = self._fit_kernel(
                template,
                science,
                kernel_sources,
                self.template_fwhm,
                self.science_fwhm,
                _intersect(template.bbox, science.bbox),
            )
        return solution

    def _preconvolution_through_kernel(
        self, template: Exposure, science: Exposure, kernel, size: int
    ) -> tuple[Exposure, np.ndarray]:
        """The science with the template's PSF seen through the fitted K as its PSF, and
        the preconvolution kernel P drawn from it (`_preconvolution_kernel`), cut to
        ``size``, the stand-in's: K * P_T is P_T's stamp and K's wide, and the score's
        EDGE band is P's half-width (decam_c: 45 px, the band 30% -> 45% of the frame, 23
        of 76 faint injected stars found where the stand-in found 40, 38 cut); the wings
        cut hold ~1e-4 of its power, and the catalog fits the kernel as cut
        (`preconvolution_cut`).

        A Gaussian standing in for the science PSF (too few stars) has none of a real
        star's wings: as P and as the score's PSF it made the catalog's fluxes miss them.
        K * P_T is what the fit matched on the stars (`_science_psf_through_kernel`, the
        template convolved). Only here: fitting K * T ~ P * S (`run_preconvolve`) needs P
        before the fit, and keeps the stand-in.

        K also absorbed the offset of the template's stars from the science's (the
        DECam pairs: 0.5 px), which P_S does not have: K * P_T is moved back by it, else
        the catalog's positions moved by it (decam_c, copies of a real star injected:
        -0.38, -0.31 px off; moved back +0.14, +0.07, the stand-in's +0.09, -0.04)."""
        offset = self.star_offset
        shift = (0.0, 0.0) if offset is None else (offset.dx, offset.dy)
        self.derived_science_psf = KernelMatchedPsf(template.require_psf(), kernel, shift)
        self.psf_sources["science"] = _KERNEL_MATCHED
        self._stand_in_gives_way(
            "its PSF (and the preconvolution kernel) is the template's seen through the "
            "matching kernel"
        )
        matched = science.with_psf(self.derived_science_psf)
        # the kernel is checked against the stand-in seen through the P applied: against
        # its own output the check would always pass (`_matched_psfs`)
        kernel_image = self._preconvolution_kernel(matched, size)
        self.preconvolved_stand_in = _preconvolved_psf(science, kernel_image)
        return matched, kernel_image

    def _preconvolve(self, science: Exposure, preconv_kernel: np.ndarray) -> Exposure:
        """P * S (bad pixels filled first)."""
        with self.timer("preconvolve"):
            return self._convolve(self._fill_bad(science), preconv_kernel)

    def _score(
        self, template, science, matched_science, solution, preconv_kernel
    ) -> SubtractionResult:
        """score = P * S - K * T (- b), decorrelated, with an EDGE frame P's half-width wide."""
        half = preconv_kernel.shape[0] // 2
        kernel, background = solution.kernel, solution.background
        self._stage("convolve")
        with self.timer("convolve"):
            matched_template = self._match_template(self._fill_bad(template), science, kernel)
            score, background = self._subtract_matched(
                matched_science, matched_template, background
            )
        edge_values = _quiet_edge_band(score)
        score = self.finalize(
            template,
            science,
            score,
            kernel,
            template_matched=True,
            preconv_mode=True,
            preconv_kernel=preconv_kernel,
        )
        if edge_values is not None:
            band, values = edge_values
            score.image[band] = values
        frame = np.ones(score.shape, dtype=bool)
        frame[half : -half or None, half : -half or None] = False
        score.set_plane("EDGE", frame)
        self._add_score_noise_floor(score)
        return SubtractionResult(
            score=score,
            matched_template=matched_template,
            matched_science=matched_science,
            background_model=background,
            fitted_background=background,
            psf_matching_kernel=kernel,
            mode="preconvolve",
        )


def run_subtraction(
    science: Exposure,
    template: Exposure,
    config: SubtractionConfig | Mapping[str, Any] | None = None,
    sources=None,
    progress: Progress | None = None,
    consume_inputs: bool = False,
) -> SubtractionResult:
    """Run the task that ``config.mode`` names: the library's one-call entry point.

    Parameters
    ----------
    science, template : `Exposure`
        The template is registered and warped onto the science grid first
        (``config.registration``).
    config : `SubtractionConfig`, dict or None
        A dict is the JSON form (``{"kernel": {"kernel_size": 15}}``, as ``alsub config``
        prints it), validated into a `SubtractionConfig` (`pydantic.ValidationError`,
        not an `AlsubError`, on a bad value). None: the defaults.
    sources : `astropy.table.Table` or None
        Catalog with x, y in parent pixels (array column and row plus ``xy0``, 0-based),
        optionally flux; detected on the science image if None.
    progress : callable(stage, fraction) or None
        Called as each stage starts.
    consume_inputs : bool
        The caller hands ``science`` and ``template`` over and will not use them again
        (the CLI and the worker, which read them for this run): their variance and mask
        planes are then worked on in place, not copied, and a run that raises may leave
        them half changed; the result's planes may share memory with them. All four are
        still copied when any is read only or shares memory with another array of the
        pair (one mask given for both inputs, a variance that is an image). By default
        the inputs are left as they were.

    Returns
    -------
    `SubtractionResult`
        ``metrics["warnings"]`` lists the task's warnings and then those core logged
        during the run (`core.logcapture`).

    Raises
    ------
    IdenticalInputsError
        Science and template hold the same pixels (the difference would be empty).
    InvalidExposureError
        An input is no `Exposure`, or its variance is negative or NaN on unmasked pixels
        (`read_exposure` refuses such a file; an exposure built from arrays is checked
        here).
    """
    if isinstance(config, Mapping):  # the JSON form the CLI and HTTP take
        config = SubtractionConfig.model_validate(config)
    config = config or SubtractionConfig()
    for exposure, label in ((science, "science"), (template, "template")):
        check_variance(exposure, label)
    check_not_identical(science, template)
    task_class = (
        AlardLuptonPreconvolveSubtractTask
        if config.mode == "preconvolve"
        else AlardLuptonSubtractTask
    )
    task = task_class(config=config, progress=progress)
    with collect_warnings() as logged:
        result = task.run(template, science, sources, consume_inputs)
    # the task's own concerns first, then what core logged (kernel fit, decorrelation, io)
    task_warnings = list(result.metrics.get("warnings", []))
    result.metrics["warnings"] = task_warnings + [w for w in logged if w not in task_warnings]
    if progress is not None:
        progress("done", 1.0)
    return result


def check_not_identical(science: Exposure, template: Exposure) -> None:
    """Raise `IdenticalInputsError` when both images hold the same pixel values.

    Parameters
    ----------
    science, template : `Exposure`

    Raises
    ------
    IdenticalInputsError
    """
    if science.image.shape == template.image.shape and np.array_equal(
        science.image, template.image
    ):
        raise IdenticalInputsError(
            "science and template are the same image (identical pixels): give a template "
            "taken at another time"
        )


#: Planes whose pixels no stage reads: a variance there may be anything.
_UNUSED_PLANES = ("NO_DATA", "BAD", "SAT")


def check_variance(exposure: Exposure, label: str) -> None:
    """Raise `InvalidExposureError` when ``exposure`` is no `Exposure` or its variance is
    negative or NaN on a pixel not marked NO_DATA, BAD or SAT (the kernel fit's solver
    failed on them with a bare ``LinAlgError``, a negative plane as too few sources)."""
    if not isinstance(exposure, Exposure):
        raise InvalidExposureError(
            f"the {label} is a {type(exposure).__name__}, not an Exposure: read it with "
            "core.io.read_exposure(path) or build it with Exposure.from_arrays(image, ...)"
        )
    if exposure.variance_deferred:  # made by core from checked planes
        return
    variance = exposure.variance
    bad = invalid_variance(variance)
    if bad is None:
        return
    problem = bad & ~exposure.masked(_UNUSED_PLANES)
    if problem.any():
        j, i = np.argwhere(problem)[0]
        raise InvalidExposureError(
            f"{label}: variance is negative or not finite at {int(problem.sum())} unmasked "
            f"pixels (first at array x={i}, y={j}: {variance[j, i]}); fix it or set those "
            "pixels BAD or NO_DATA in the mask"
        )


# helpers ------------------------------------------------------------------------------------
def _working_copies(template: Exposure, science: Exposure, consume: bool):
    """`_working_copy` of both inputs. With ``consume`` their variance and mask planes
    are worked on in place, unless one of the four is read only or shares memory with
    another array of the pair (a mask given for both inputs would take both inputs'
    detections): then all are copied, as without ``consume``."""
    exposures = (template, science)
    planes = [plane for e in exposures for plane in (e.variance, e.mask)]
    arrays = planes + [e.image for e in exposures]
    in_place = (
        consume
        and all(plane.flags.writeable for plane in planes)
        and not any(
            np.may_share_memory(plane, other)
            for i, plane in enumerate(planes)
            for j, other in enumerate(arrays)
            if i != j
        )
    )
    return _working_copy(template, in_place), _working_copy(science, in_place)


def _working_copy(exposure: Exposure, in_place: bool = False) -> Exposure:
    """The copy a task changes (decision 7): variance, mask and metadata are copied, the
    image is shared read only. No stage writes the inputs' pixels (they write new
    arrays), so copying them would only cost a frame each; a write raises instead.
    ``in_place``: the variance and mask are the input's own (a caller that will not use
    the input again: a 4096 x 4096 pair's four frames, 0.25 GB of fresh pages, are not
    made; 0.3 s of a fresh process's first run on this machine)."""
    image = exposure.image.view()
    image.flags.writeable = False
    if in_place:
        variance, mask = exposure.variance, exposure.mask
    else:
        # two threads: the copies are bound by first-touch page faults, which run in parallel
        variance, mask = thread_map(frame_copy, (exposure.variance, exposure.mask))
    return replace(
        exposure,
        image=image,
        variance=variance,
        mask=mask,
        mask_planes=exposure.mask_planes.copy(),
        metadata=copy.deepcopy(exposure.metadata),
    )


def _science_window(template: Exposure, science: Exposure) -> tuple[slice, slice]:
    """The slices of ``template``'s arrays that lie under ``science`` (it covers it)."""
    x0, y0 = science.xy0[0] - template.xy0[0], science.xy0[1] - template.xy0[1]
    return np.s_[y0 : y0 + science.height, x0 : x0 + science.width]


#: Growth (px, city-block) of the detections into the source mask the noise metrics avoid.
_SOURCE_MASK_GROWTH = 3


def near_sources(exposure: Exposure, window=np.s_[:, :]) -> np.ndarray:
    """Pixels of ``exposure[window]`` within `_SOURCE_MASK_GROWTH` (4-connected steps,
    nothing beyond the window's border) of a DETECTED or DETECTED_NEGATIVE pixel."""
    return dilate_cross(
        exposure.masked(["DETECTED", "DETECTED_NEGATIVE"])[window], _SOURCE_MASK_GROWTH
    )


def _typical_source_sigma(exposure: Exposure, background, detected) -> float | None:
    """The Gaussian sigma (px) of the sources' typical size that detection without a PSF
    smooths with (the smallest well-populated cluster of sizes, `core.psf.stellar_locus`),
    from ``detected`` (that detection) or a new one; None from fewer than
    `_SOURCE_SIZE_MIN_SOURCES` sources."""
    table = detected
    if table is None:
        table = detect_sources(exposure, set_mask=False, background=background)
    sigma = table.meta.get("psf_sigma")
    if len(table) < _SOURCE_SIZE_MIN_SOURCES or not isinstance(sigma, int | float):
        return None
    return float(sigma) if math.isfinite(sigma) and sigma > 0 else None


def _without_frame_meta(sources):
    """The catalog without frame-sized arrays in its meta (detection's segmentation
    images): nothing after preparation reads them, and they would be held all run."""
    if sources is None or not any(_is_frame(v) for v in sources.meta.values()):
        return sources
    meta = {k: v for k, v in sources.meta.items() if not _is_frame(v)}
    return Table(sources, copy=False, meta=meta)


def _is_frame(value) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 2 and value.size >= 1 << 16


def _subtract_in_place(minuend: Exposure, subtrahend: Exposure) -> None:
    """Masked-image subtraction: image subtract, variance add, mask OR by plane name."""
    minuend.image -= subtrahend.image
    minuend.variance += subtrahend.variance
    minuend.or_mask_from(subtrahend)


def _block_medians(image: np.ndarray, good: np.ndarray, size: int):
    """Centres (x, y), medians and good-pixel counts of size x size blocks with enough sky."""
    ny, nx = image.shape
    my, mx = ny // size, nx // size
    if my == 0 or mx == 0:
        return (np.zeros(0),) * 4
    crop = np.s_[: my * size, : mx * size]
    # unusable pixels as +inf sort last: the median of the first `count` of each sorted
    # block is its nanmedian (the same numbers, without masked-array machinery)
    data = np.where(good[crop], image[crop], np.inf)
    blocks = data.reshape(my, size, mx, size).transpose(0, 2, 1, 3).reshape(my, mx, -1)
    counts = np.sum(good[crop].reshape(my, size, mx, size), axis=(1, 3))
    enough = counts >= size * size // 4
    medians = np.full((my, mx), np.nan)
    ordered = np.sort(blocks[enough], axis=1)
    n = counts[enough]
    rows = np.arange(n.size)
    low, high = ordered[rows, (n - 1) // 2], ordered[rows, n // 2]
    medians[enough] = np.where(n % 2 == 1, high, (low + high) / np.asarray(2, low.dtype))
    jj, ii = np.nonzero(enough)
    centre = (size - 1) / 2.0
    return (ii * size + centre, jj * size + centre, medians[enough], counts[enough].astype(float))


#: Standard error of the MAD-based std of n unit-normal values, times sqrt(n) (its
#: efficiency is 37%): the robust std of 60 pulls scatters by 0.15 about 1
_MAD_STD_ERROR = 1.166


def _unmatched(f_s, f_t, detected, keep) -> str:
    """Why kernel sources were dropped by the variability test, in words: a flux that
    cannot be measured in an image (which one) is not a star missing from the template."""
    lost_science = ~np.isfinite(f_s)
    lost_template = ~lost_science & ~np.isfinite(f_t)
    faint = ~detected & ~lost_science & ~lost_template
    why = f"over {WHOLE_STAMP_MISSING_LIGHT:.0%} of its PSF's light off the frame or on no data"
    parts = [
        (lost_science, f"have no flux measurable in the science ({why})"),
        (lost_template, f"have none measurable in the template ({why})"),
        (faint, "are not in the template at S/N 5"),
    ]
    words = [f"{int(which.sum())} {text}" for which, text in parts if which.any()]
    return ", ".join([*words, f"{int((detected & ~keep).sum())} changed flux between the two"])


def _moved_words(dropped: np.ndarray, metadata) -> str:
    """The kernel sources the shift tests dropped (`_reject_variable_sources`), in words."""
    if not dropped.any():
        return ""
    moved_here = int(metadata.get("nMovedSourcesRejected", 0))
    beside = int(metadata.get("nChangedNeighbourStampsRejected", 0))
    return (
        f", {moved_here} moved between the two, {beside} held a brighter star in their "
        "stamp that changed"
    )


def _changed_flux(ratio, sigma, detected, config, reference=None) -> np.ndarray:
    """Sources whose science/template flux ratio departs from the ensemble's (that of
    ``reference``, (ratios, errors) of other sources, when given).

    The centre is the median ratio of the better-measured half: fainter stars' ratios
    are biased (a ratio of noisy fluxes, cut on the template's S/N; on DECam the faint
    half sits 8% above the bright stars). Each source is judged on its own error,
    widened in quadrature by the ensemble's scatter beyond the errors where it has
    any (`_excess_scatter`: blends, PSF-model errors; 40% in SAAO's 9 px seeing). The
    raw spread of the ratios, the scale before, mostly measured the faint stars'
    errors: it let a bright star's 15% change through, and that star, the heaviest in
    the fit, pulled the kernel sum 12%.
    """
    r, s = (ratio[detected], sigma[detected]) if reference is None else reference
    centre = float(np.median(r[s <= np.median(s)]))
    excess = _excess_scatter(r - centre, s) if r.size >= 5 else 0.0
    deviation = np.abs(ratio - centre)
    return (
        detected
        & (deviation > config.variability_sigma * np.hypot(sigma, excess))
        & (deviation > config.variability_floor * abs(centre))
    )


def _excess_scatter(deviation: np.ndarray, sigma: np.ndarray) -> float:
    """The scatter e that, added in quadrature to each error, brings the robust std of
    the pulls deviation / hypot(sigma, e) down to two standard errors above 1.

    An excess within sampling noise is none: the faint stars' errors (5-10%) dominate
    the pulls, and a noise excess of 1.1 in them read as 3% on every star would
    hide a bright star's 15% change again.
    """
    target = 1.0 + 2.0 * _MAD_STD_ERROR / math.sqrt(deviation.size)

    def excess(e: float) -> float:
        return float(mad_std(deviation / np.hypot(sigma, e))) - target

    if not excess(0.0) > 0.0:
        return 0.0
    # decreasing in e: bracketed by 0 and about the deviations' own spread
    return _root_from_zero(excess, float(mad_std(deviation)), 2.0, 1e-6)


def _root_from_zero(
    decreasing: Callable[[float], float], upper: float, grow: float, rtol: float
) -> float:
    """The root of ``decreasing`` (positive at 0) in [0, upper], ``upper`` first grown by
    ``grow`` until the function is <= 0 there (at most 60 times); Brent's method to
    ``rtol`` times that bound (the score's noise floor, the kernel stars' excess scatter)."""
    for _ in range(60):
        if decreasing(upper) <= 0.0:
            break
        upper *= grow
    return float(optimize.brentq(decreasing, 0.0, upper, xtol=rtol * upper))


def _template_is_sharper(template, science, template_fwhm: float, science_fwhm: float) -> bool:
    """Auto mode's rule (algorithm.md 1.3 step 2): convolve the template when it is sharper."""
    try:
        t_xx, t_yy = _axis_fwhms(template)
        s_xx, s_yy = _axis_fwhms(science)
        return bool(t_xx <= s_xx or t_yy <= s_yy)
    except Exception:  # noqa: BLE001 - fall back to the grid-mean FWHMs
        return template_fwhm <= science_fwhm


def _quiet_edge_band(score: Exposure):
    """Set the score's unconvolved edge band to the nearest valid values; return (band,
    old values).

    The band the convolutions could not reach holds copied input pixels (P * S minus
    an unconvolved template: unmatched stars, the inputs' own border artefacts). The
    score's decorrelation filter reaches beyond the band, so it would spread them into
    valid pixels (a coadd's border: a score 17x its noise 20 px inside the edge). The
    band takes the value of its nearest valid pixel instead: a constant (the valid
    median) left a step at the band's border, a sharp edge in the smooth score that
    the decorrelation, which undoes the smoothing, turned into ringing (the DECam
    coadd: S/N +-13 to 15 at the first valid pixel, 76 of 84 DIA sources within 3 px
    of the band; 2 of 7 with the nearest values). The copied values are put back
    afterwards, still flagged EDGE. None when there is no band.
    """
    band = score.masked(["EDGE", "NO_DATA"]) | ~np.isfinite(score.image)
    if not band.any() or band.all():
        return None
    values = score.image[band].copy()
    fill_from_nearest(score.image, band, out=score.image)
    return band, values


def _trim_to_power(stamp: np.ndarray, fraction: float) -> np.ndarray:
    """The smallest centred odd square, 3 x 3 at least, holding ``fraction`` of
    sum(stamp^2) (`crop_kernel`); the whole stamp when ``fraction`` is 1.

    A matched filter cut to the box holding a fraction f of the PSF's power keeps
    sqrt(f) of its S/N, while far wings (a 205 px WebbPSF) make every convolution and
    the decorrelation margins large.
    """
    return stamp if fraction >= 1.0 else crop_kernel(stamp, 1.0 - fraction, min_half=1)


def _trim_to_width(stamp: np.ndarray, width_fwhm: float | None, fwhm: float) -> np.ndarray:
    """The centred odd square of ``stamp`` reaching ``width_fwhm`` FWHMs from its centre
    (the whole stamp when smaller, or with no width).

    The EDGE band of a score is P's half-width: a 205 px WebbPSF of 2 px FWHM lost 44% of
    a 900 px frame to wings holding 2e-5 of its power beyond 8 FWHM (17 px; the matched
    filter keeps the square root of the power kept). Stamps estimated here (6 FWHM wide,
    at least 15 px) and the simulation presets' (up to 5.6 FWHM) are kept whole.
    """
    if width_fwhm is None or not fwhm > 0:
        return stamp
    return _centre_cut(stamp, max(1, math.ceil(width_fwhm * fwhm)))


def _centre_cut(stamp: np.ndarray, half: int) -> np.ndarray:
    """The centred odd square of ``stamp`` ``half`` px either side of its centre (the
    whole stamp when smaller)."""
    cy, cx = stamp.shape[0] // 2, stamp.shape[1] // 2
    if half >= min(cy, cx):
        return stamp
    return stamp[cy - half : cy + half + 1, cx - half : cx + half + 1]


def _noise_area(exposure: Exposure) -> float:
    """Pixels per independent noise sample: the sum of the noise autocorrelation (1: white)."""
    if exposure.noise_correlation is None:
        return 1.0
    return max(1.0, float(np.sum(exposure.noise_correlation)))


def _preconvolved_psf(science: Exposure, preconv_kernel: np.ndarray) -> ImagePsf:
    """PSF of the science image correlated with ``preconv_kernel`` (at its average position)."""
    position = science.require_psf().average_position or science.bbox_center()
    return ImagePsf(_preconvolved_stamp(science, preconv_kernel, position), position)


def _preconvolved_stamp(
    science: Exposure, preconv_kernel: np.ndarray, position: tuple[float, float]
) -> np.ndarray:
    """The science PSF at ``position`` correlated with ``preconv_kernel``."""
    stamp = np.asarray(science.require_psf().kernel_image(*position), dtype=np.float64)
    half = preconv_kernel.shape[0] // 2
    # by FFT when that is faster: a 205 px WebbPSF through its own P took 75 s directly
    return signal.correlate(np.pad(stamp, half), preconv_kernel, mode="same", method="auto")


def _scale(exposure: Exposure, factor: float) -> None:
    exposure.image *= np.float32(factor)
    exposure.variance *= np.float32(factor * factor)


def _intersect(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def _axis_fwhms(exposure: Exposure) -> tuple[float, float]:
    psf = exposure.require_psf()
    position = psf.average_position or exposure.bbox_center()
    ixx, iyy, _ = psf.moments(*position)
    return SIGMA_TO_FWHM * math.sqrt(ixx), SIGMA_TO_FWHM * math.sqrt(iyy)


def _position_grid(exposure: Exposure, n: int, buffer: float):
    min_x, min_y, max_x, max_y = exposure.bbox
    bx, by = buffer * (max_x - min_x), buffer * (max_y - min_y)
    for y in np.linspace(min_y + by, max_y - by, n):
        for x in np.linspace(min_x + bx, max_x - bx, n):
            yield float(x), float(y)


def _combine_limits(science_mag: float, template_mag: float) -> float:
    """5-sigma limit of the difference: fluxes of the two limits added in quadrature."""
    if not math.isfinite(science_mag):
        return math.nan
    if not math.isfinite(template_mag):
        return science_mag
    f_sci = 10 ** (-0.4 * science_mag)
    f_tmpl = 10 ** (-0.4 * template_mag)
    return -2.5 * math.log10(math.hypot(f_sci, f_tmpl))


#: Groups of bad pixels filled from their nearest good pixel, largest first.
_MAX_FILL_GROUPS = 512


def fill_from_nearest(
    image: np.ndarray, bad: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``image`` whose ``bad`` pixels take the value of the nearest good pixel: a copy, or
    ``out`` (which may be ``image`` itself: only bad pixels are written, only good ones read).

    Bad pixels that frame a rectangle of good ones (a convolution's edge band) take
    the nearest pixel of its border, row and column copies in place. Otherwise each
    group of bad pixels is filled within its bounding box grown by one pixel (the box
    holds its nearest good pixels unless the group spans the frame), so the cost
    follows the bad area, not the frame; beyond `_MAX_FILL_GROUPS` groups the smallest
    take the median of the good pixels.
    """
    if out is None:
        out = np.array(image, copy=True)
    ny, nx = bad.shape
    good_rows = np.flatnonzero(~bad.all(axis=1))
    good_cols = np.flatnonzero(~bad.all(axis=0))
    if good_rows.size:
        r0, r1 = good_rows[0], good_rows[-1] + 1
        c0, c1 = good_cols[0], good_cols[-1] + 1
        if not bad[r0:r1, c0:c1].any():
            out[:r0, c0:c1] = out[r0, c0:c1]
            out[r1:, c0:c1] = out[r1 - 1, c0:c1]
            out[:, :c0] = out[:, c0 : c0 + 1]
            out[:, c1:] = out[:, c1 - 1 : c1]
            return out
    labels, n_groups = ndimage.label(bad)
    boxes = ndimage.find_objects(labels)
    order = np.arange(1, n_groups + 1)
    if n_groups > _MAX_FILL_GROUPS:
        # the largest groups (saturated stars, missing regions) carry the flux that
        # matters; the many smallest (isolated bad pixels) take the frame median
        areas = np.bincount(labels.ravel(), minlength=n_groups + 1)[1:]
        order = order[np.argsort(-areas, kind="stable")[:_MAX_FILL_GROUPS]]
        kept = np.zeros(n_groups + 1, dtype=bool)
        kept[order] = True
        rest = bad & ~kept[labels]
        out[rest] = _good_median(image, bad)
    for index in order:
        box = boxes[index - 1]
        if box is None:
            continue
        rows = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, ny))
        cols = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, nx))
        hole = bad[rows, cols]
        if hole.all():
            # a group filling its whole box (the frame): nothing near to copy
            out[rows, cols][labels[rows, cols] == index] = _good_median(image, bad)
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(hole, return_indices=True)
        mine = labels[rows, cols] == index
        window = out[rows, cols]
        window[mine] = image[rows, cols][iy[mine], ix[mine]]
    return out


def _good_median(image: np.ndarray, bad: np.ndarray) -> float:
    """Median of the good pixels on a sub-grid of about a million (a sky level)."""
    step = max(1, int(math.sqrt(image.size / 1e6)))
    sample = image[::step, ::step][~bad[::step, ::step]]
    return float(order.median(sample, consume=True)) if sample.size else 0.0
