"""Exposures: image, variance and mask planes with their PSF, WCS and calibration.

An `Exposure` is the unit every core function takes and returns. Pixel (row j,
column i) of the arrays sits at parent position (x0 + i, y0 + j), as in the Rubin
pipeline; most exposures have ``xy0 = (0, 0)``.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidExposureError, PsfError
from .parallel import frame_array
from .stamps import stamps as _stack

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from .psf import Psf

__all__ = [
    "MaskPlanes",
    "PhotoCalib",
    "Exposure",
    "DeferredPlane",
    "DEFAULT_MASK_PLANES",
    "UNIT_VARIANCE",
    "invalid_variance",
]

#: ``variance_source`` of a plane of ones that `Exposure.from_arrays` made for want of a
#: variance: it holds no noise level, so the subtraction scales it to the measured sky
#: noise whatever the factor (`core.variance.measure_variance_scale`).
UNIT_VARIANCE = "unit variance (none given): scaled to the measured sky noise"


def invalid_variance(variance: np.ndarray) -> np.ndarray | None:
    """Pixels whose variance is negative or not finite, or None when there is none: the
    usual plane says so by its least and largest values (a NaN fails the first test, an
    infinity one of the two), one pass each instead of the mask's several."""
    if variance.min() >= 0 and variance.max() < np.inf:
        return None
    return ~np.isfinite(variance) | (variance < 0)


#: Rubin's default planes and bits (algorithm.md section 0.5).
DEFAULT_MASK_PLANES = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
)

_MAX_PLANES = 31  # int32 mask, sign bit unused
#: Pixels per block of frame-wide mask passes (block temporaries stay a few MB).
_BLOCK_PIXELS = 1 << 20


class MaskPlanes:
    """Named bit planes of an int32 mask.

    Each exposure owns its registry (unlike afw's process-global one), so adding
    a plane to one exposure never changes another.
    """

    def __init__(self, planes: dict[str, int] | None = None):
        self._bits: dict[str, int] = {}
        source = planes if planes is not None else {n: i for i, n in enumerate(DEFAULT_MASK_PLANES)}
        for name, bit in source.items():
            self._set(name, int(bit))

    def _set(self, name: str, bit: int) -> None:
        if not 0 <= bit < _MAX_PLANES:
            raise InvalidExposureError(f"mask plane {name!r} has bit {bit}, outside 0..30")
        if bit in self._bits.values() and self._bits.get(name) != bit:
            raise InvalidExposureError(f"mask plane {name!r} reuses bit {bit}")
        self._bits[name.upper()] = bit

    @property
    def names(self) -> list[str]:
        return sorted(self._bits, key=self._bits.__getitem__)

    def as_dict(self) -> dict[str, int]:
        return dict(self._bits)

    def __contains__(self, name: str) -> bool:
        return name.upper() in self._bits

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskPlanes) and self._bits == other._bits

    def __repr__(self) -> str:
        return f"MaskPlanes({self._bits})"

    def copy(self) -> MaskPlanes:
        return MaskPlanes(self._bits)

    def bit(self, name: str) -> int:
        """Bit number of ``name``, adding the plane on a free bit if it is new."""
        key = name.upper()
        if key not in self._bits:
            used = set(self._bits.values())
            free = next((b for b in range(_MAX_PLANES) if b not in used), None)
            if free is None:
                raise InvalidExposureError("no free mask bit left for plane " + key)
            self._bits[key] = free
        return self._bits[key]

    def value(self, name: str) -> int:
        """Integer value (1 << bit) of one plane, adding it if new."""
        return 1 << self.bit(name)

    def get_bitmask(self, names) -> int:
        """OR of the planes named that exist; unknown names are skipped (as afw does)."""
        bits = 0
        for name in names:
            key = name.upper()
            if key in self._bits:
                bits |= 1 << self._bits[key]
        return bits

    def remove(self, name: str) -> None:
        self._bits.pop(name.upper(), None)


@dataclass
class PhotoCalib:
    """Flux scale of an exposure: ``calibration`` nJy per image count.

    Pairs with different zero points are handled by the kernel sum (the flux
    ratio); this calibration is used for limiting magnitudes and reporting.
    """

    calibration: float = 1.0

    @property
    def zero_point(self) -> float:
        """AB magnitude of an instrumental flux of 1 count."""
        return 31.4 - 2.5 * math.log10(self.calibration)

    @classmethod
    def from_zero_point(cls, zero_point: float) -> PhotoCalib:
        return cls(calibration=10 ** ((31.4 - zero_point) / 2.5))


class DeferredPlane:
    """A frame made on first use, once (a lock keeps threads that read it together from
    making it twice).

    Parameters
    ----------
    compute : callable () -> `numpy.ndarray`
        Makes the whole frame.
    stamps : callable (cx, cy, half, fill) -> `numpy.ndarray` or None
        The (n, 2h+1, 2h+1) stamps the frame would give ``core.stamps.stamps``,
        made without the frame (to float32 round-off): what per-source measurements
        read while the frame is not made.
    """

    def __init__(
        self,
        compute: Callable[[], np.ndarray],
        stamps: Callable[[np.ndarray, np.ndarray, int, float], np.ndarray] | None = None,
    ) -> None:
        self._compute: Callable[[], np.ndarray] | None = compute
        self._stamps = stamps
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def made(self) -> bool:
        return self._array is not None

    def array(self) -> np.ndarray:
        with self._lock:
            if self._array is None:
                assert self._compute is not None
                self._array = np.asarray(self._compute(), dtype=np.float32)
                self._compute = self._stamps = None  # frees what they hold
            return self._array

    def stamps(self, cx, cy, half: int, fill: float) -> np.ndarray:
        """Stamps of the frame: cut from it once made, else made on their own."""
        stamps = self._stamps
        if self._array is not None or stamps is None:
            return _stack(self.array(), cx, cy, half, fill=fill)
        return stamps(np.asarray(cx), np.asarray(cy), half, fill)


class _VariancePlane:
    """`Exposure.variance`: an array, or a `DeferredPlane` made when first read (by
    `Exposure.defer_variance`). A convolved variance no stage reads (the matched
    template's, when the decorrelation makes the difference's variance from the
    inputs' own) then costs nothing unless a product or a caller asks for it."""

    def __get__(self, obj: Exposure | None, owner: Any = None) -> np.ndarray:
        if obj is None:  # as a plain field without a default
            raise AttributeError("variance")
        value = obj.__dict__["_variance"]
        if isinstance(value, DeferredPlane):
            value = obj.__dict__["_variance"] = value.array()
        return value

    def __set__(self, obj: Exposure, value: np.ndarray) -> None:
        obj.__dict__["_variance"] = value


@dataclass
class Exposure:
    """A calibrated image with its variance, mask, PSF, WCS and metadata.

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx), float32
        Other real dtypes and byte orders are converted; a `numpy.ma.MaskedArray`'s
        masked pixels are set BAD. Arrays already float32 (int32 for the mask) are
        kept, not copied: the in-place methods (`set_plane`, ...) change them.
    variance : `numpy.ndarray` (ny, nx), float32, counts squared
    mask : `numpy.ndarray` (ny, nx), int32 bit planes named by ``mask_planes``
    mask_planes : `MaskPlanes`
    psf : `core.psf.Psf` or None
    wcs : `astropy.wcs.WCS` or None
    photo_calib : `PhotoCalib` or None
    band : str or None
        Filter/band label; science and template must agree when both are set.
    metadata : dict
        Header keywords (GAIN, RDNOISE, EXPTIME, ...) carried through to outputs.
    xy0 : (int, int)
        Parent position of pixel [0, 0].
    variance_source : str
        Where the variance came from ("VARIANCE HDU", "gain/read noise", ...).
    noise_correlation : `numpy.ndarray` (k, k), float64, or None
        Autocorrelation of the pixel noise normalised to 1 at its centre (odd
        square); None means white noise. Resampling (warping, coadding) correlates
        neighbouring pixels; whoever knows or measures that sets it, and the
        decorrelation and variance checks take it into account.
    """

    image: np.ndarray
    variance: np.ndarray  # read through `_VariancePlane` (set below the class)
    mask: np.ndarray
    mask_planes: MaskPlanes = field(default_factory=MaskPlanes)
    psf: Psf | None = None
    wcs: WCS | None = None
    photo_calib: PhotoCalib | None = None
    band: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    xy0: tuple[int, int] = (0, 0)
    variance_source: str = "given"
    noise_correlation: np.ndarray | None = None

    def __post_init__(self) -> None:
        # numpy's masked pixels are unusable, not data: asarray alone drops the mask
        masked = self.image.mask if isinstance(self.image, np.ma.MaskedArray) else False
        for name in ("image", "variance"):
            if np.iscomplexobj(getattr(self, name)):
                # float32 of a complex array keeps the real part with only a ComplexWarning
                raise InvalidExposureError(f"{name} is complex: give real pixel values")
        self.image = np.asarray(np.ma.getdata(self.image), dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.int32)
        if self.image.ndim != 2:
            raise InvalidExposureError(f"image must be 2-D, got {self.image.ndim}-D")
        if self.variance.shape != self.image.shape or self.mask.shape != self.image.shape:
            raise InvalidExposureError(
                f"planes differ in shape: image {self.image.shape}, "
                f"variance {self.variance.shape}, mask {self.mask.shape}"
            )
        self.xy0 = (int(self.xy0[0]), int(self.xy0[1]))
        if np.any(masked):
            # on a copy: the caller's mask array is theirs
            self.mask = self.mask.copy()
            self.set_plane("BAD", np.broadcast_to(masked, self.shape))

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles hold the variance itself, not what would make it
        state = self.__dict__.copy()
        state["_variance"] = self.variance
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "variance" in state:  # pickled before the plane could be deferred
            state = {**state, "_variance": state["variance"]}
            del state["variance"]
        self.__dict__.update(state)

    # deferred variance ---------------------------------------------------------------
    def defer_variance(self, plane: DeferredPlane) -> None:
        """Replace the variance plane by ``plane``, made when first read."""
        self.__dict__["_variance"] = plane

    def with_psf(self, psf: Psf | None) -> Exposure:
        """This exposure with ``psf``, sharing its planes (no copies; a deferred variance
        stays deferred and is made once for both)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.psf = psf
        return clone

    def replace_deferred(self, plane: DeferredPlane, **changes: Any) -> Exposure:
        """``dataclasses.replace(self, **changes)`` with the variance deferred to ``plane``
        (neither this exposure's variance nor ``plane`` is made)."""
        # a zero-stride stand-in passes the shape check until the plane replaces it
        stand_in = np.broadcast_to(np.float32(0.0), self.shape)
        exposure = replace(self, variance=stand_in, **changes)
        exposure.defer_variance(plane)
        return exposure

    @property
    def variance_deferred(self) -> bool:
        """Whether the variance plane is deferred and not made yet."""
        value = self.__dict__["_variance"]
        return isinstance(value, DeferredPlane) and not value.made

    def variance_stamps(self, cx, cy, half: int, fill: float = 0.0) -> np.ndarray:
        """(n, 2h+1, 2h+1) stamps of the variance centred on array indices (cx, cy),
        ``fill`` off the frame; a deferred plane gives them without being made."""
        value = self.__dict__["_variance"]
        if isinstance(value, DeferredPlane):
            return value.stamps(cx, cy, half, fill)
        return _stack(value, cx, cy, half, fill=fill)

    @classmethod
    def from_arrays(cls, image, variance=None, mask=None, **kwargs) -> Exposure:
        """Build an exposure from arrays (no FITS file).

        Parameters
        ----------
        image : array-like (ny, nx)
            Any real dtype or byte order; copied to float32 (a float32 array in native
            order is kept, not copied). A `numpy.ma.MaskedArray`'s masked pixels are
            set BAD in the mask.
        variance : array-like (ny, nx), optional
            Image units squared. Missing: a plane of ones marked `UNIT_VARIANCE`, which a
            subtraction scales to the measured sky noise (no photon noise of the sources;
            for that give one, e.g. from `core.io.estimate_variance` with the gain).
        mask : array-like (ny, nx), optional
            Integer bit planes (`DEFAULT_MASK_PLANES`: bit 0 BAD, 1 SAT, ...); a boolean
            mask is True -> BAD. Missing: 0.
        **kwargs
            The other `Exposure` fields: ``psf`` (e.g. ``core.psf.ImagePsf(stamp)``),
            ``wcs``, ``metadata``, ``xy0``, ... An exposure without a PSF or WCS is
            fine for a subtraction: PSFs are estimated from the stars and the pair is
            registered on stars.
        """
        if variance is None:
            variance = np.ones(np.shape(image), dtype=np.float32)
            kwargs.setdefault("variance_source", UNIT_VARIANCE)
        if mask is None:
            mask = np.zeros(np.shape(image), dtype=np.int32)
        return cls(image=image, variance=variance, mask=mask, **kwargs)

    # geometry -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive parent box (min_x, min_y, max_x, max_y)."""
        x0, y0 = self.xy0
        return (x0, y0, x0 + self.width - 1, y0 + self.height - 1)

    def bbox_center(self) -> tuple[float, float]:
        """Centre of the inclusive box, ((min+max)/2), as afw's getCenter."""
        min_x, min_y, max_x, max_y = self.bbox
        return ((min_x + max_x) / 2.0, (min_y + max_y) / 2.0)

    def pixel_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Parent x (columns) and y (rows) coordinates as 1-D arrays."""
        x0, y0 = self.xy0
        return (
            np.arange(self.width, dtype=np.float64) + x0,
            np.arange(self.height, dtype=np.float64) + y0,
        )

    def require_psf(self) -> Psf:
        """The PSF, or a `PsfError` saying the exposure has none."""
        if self.psf is None:
            raise PsfError(
                "the exposure has no PSF: give one (a PSF extension or file); a subtraction "
                "estimates its inputs' PSFs, not that of an exposure read on its own"
            )
        return self.psf

    # copies and cutouts ------------------------------------------------------------
    def copy(self) -> Exposure:
        """Deep copy of the pixels and the mask registry; PSF and WCS are shared (immutable use)."""
        return replace(
            self,
            image=self.image.copy(),
            variance=self.variance.copy(),
            mask=self.mask.copy(),
            mask_planes=self.mask_planes.copy(),
            metadata=copy.deepcopy(self.metadata),
        )

    def cutout(self, bbox: tuple[int, int, int, int]) -> Exposure:
        """Sub-exposure over an inclusive parent box; PSF/WCS keep parent coordinates.

        PSFs are evaluated in parent coordinates and the WCS is shifted by the
        slice, so sky positions of pixels do not change.
        """
        min_x, min_y, max_x, max_y = bbox
        x0, y0 = self.xy0
        i0, j0 = min_x - x0, min_y - y0
        i1, j1 = max_x - x0 + 1, max_y - y0 + 1
        if i0 < 0 or j0 < 0 or i1 > self.width or j1 > self.height or i1 <= i0 or j1 <= j0:
            raise InvalidExposureError(f"cutout box {bbox} is not inside {self.bbox}")
        wcs = self.wcs[j0:j1, i0:i1] if self.wcs is not None else None
        return replace(
            self,
            image=self.image[j0:j1, i0:i1].copy(),
            variance=self.variance[j0:j1, i0:i1].copy(),
            mask=self.mask[j0:j1, i0:i1].copy(),
            mask_planes=self.mask_planes.copy(),
            metadata=copy.deepcopy(self.metadata),
            wcs=wcs,
            xy0=(min_x, min_y),
        )

    # masks ---------------------------------------------------------------------------
    def bitmask(self, names) -> int:
        return self.mask_planes.get_bitmask(names)

    def any_masked(self, names) -> bool:
        """Whether any pixel has one of the named planes set (`masked(names).any()`,
        block by block, stopping at the first hit)."""
        bits = self.bitmask(names)
        if not bits:
            return False
        step = max(1, _BLOCK_PIXELS // max(self.mask.shape[-1], 1))
        return any(
            bool(np.any(self.mask[y : y + step] & np.int32(bits)))
            for y in range(0, self.mask.shape[0], step)
        )

    def masked(self, names) -> np.ndarray:
        """Boolean array: True where any of the named planes is set.

        Computed a block of rows at a time: no frame-sized integer temporary; the
        result is written whole, so a large one is on huge pages (`frame_array`).
        """
        bits = self.bitmask(names)
        if not bits:
            return np.zeros(self.shape, dtype=bool)
        out = frame_array(self.shape, bool)
        step = max(1, _BLOCK_PIXELS // max(self.mask.shape[-1], 1))
        for y in range(0, self.mask.shape[0], step):
            np.not_equal(self.mask[y : y + step] & np.int32(bits), 0, out=out[y : y + step])
        return out

    def set_plane(self, name: str, where: np.ndarray) -> None:
        self.mask[where] |= self.mask_planes.value(name)

    def clear_plane(self, name: str) -> None:
        if name in self.mask_planes:
            self.mask &= ~np.int32(self.mask_planes.value(name))

    def or_mask_from(self, other: Exposure) -> None:
        """OR ``other``'s mask into this one by plane name (planes are added as needed).

        Bit numbers may differ between the two registries (e.g. SAT_TEMPLATE),
        so bits are mapped by name; planes on the same bit in both go in one OR.
        """
        same = 0
        moved: list[tuple[int, int]] = []  # (bit in other, bit here)
        for name, bit in other.mask_planes.as_dict().items():
            target = self.mask_planes.bit(name)
            if target == bit:
                same |= 1 << bit
            else:
                moved.append((bit, target))
        same_bits = np.int32(np.uint32(same).view(np.int32))
        # a block of rows at a time, by shifts: no frame-sized temporaries or fancy indexing
        step = max(1, _BLOCK_PIXELS // max(self.mask.shape[-1], 1))
        for y in range(0, self.mask.shape[0], step):
            source, rows = other.mask[y : y + step], self.mask[y : y + step]
            if same:
                rows |= source & same_bits
            for bit, target in moved:
                rows |= ((source >> np.int32(bit)) & np.int32(1)) << np.int32(target)

    def plane_counts(self) -> dict[str, int]:
        """Number of pixels with each plane set."""
        # Most pixels carry no bit: count each plane over the few that carry any, not the frame.
        flagged = self.mask[self.mask != 0]
        return {
            name: int(np.count_nonzero(flagged & (1 << bit)))
            for name, bit in self.mask_planes.as_dict().items()
        }


# the dataclass's field stays a plain required ndarray (its __init__ assigns it); reads
# and writes go through the descriptor, so a deferred plane is made on first read
Exposure.variance = _VariancePlane()  # type: ignore[assignment]
