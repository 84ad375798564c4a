"""Read and write exposures as FITS: the Rubin-style MEF layout and plain single images.

`read_exposure` accepts (1) multi-extension files with IMAGE, MASK, VARIANCE (and
optional PSF) extensions, mask-plane bits in ``MP_<NAME>`` cards, or HST's and JWST's
SCI, ERR and DQ (`_mask_from_dq`); (2) a plain
single image whose variance is modelled from GAIN/RDNOISE or measured from the sky;
(3) optional separate variance, inverse-variance weight, 1-sigma noise, mask and PSF
files or extensions. `write_exposure` writes layout (1) atomically. Every problem
with an input raises `InvalidExposureError` naming the file and the problem.

Variance of a single image without a variance plane (`estimate_variance`)
-------------------------------------------------------------------------
The sky level ``sky`` and sky noise ``sigma`` are measured with
`astropy.stats.sigma_clipped_stats` (3 sigma, MAD-based width; computed from one sort by
`core.clipping`), the noise about a smooth map of the sky (cell medians), so that a
twilight or moonlight gradient is not taken for noise. The gain is that of the pixel
values: BUNIT in electrons makes it 1 and a rate (per second) multiplies it by EXPTIME,
whatever GAIN card the file kept. Then:

* GAIN known, sky present (``sky > 3 sigma`` everywhere: the sky was not subtracted):
  the CCD model ``max(image, 0) / gain + (rdnoise / gain)**2`` (ADU**2, RDNOISE in
  electrons). The measured sigma is *not* used here because in crowded fields
  it is dominated by unresolved stars, not noise (SAAO bulge frames: measured
  ~40 ADU, true noise ~19 ADU, checked on two frames taken minutes apart). If the
  measured sky variance is below 0.8 x the model's (it is an upper bound on the
  noise, so the gain or the pedestal must be wrong) the measured value is used
  as the sky term instead.
* GAIN known, sky subtracted (median near 0, e.g. DECam community-pipeline
  cutouts): the sky's Poisson noise cannot be predicted from the pixels, so the
  sky term is ``max(sigma**2, (rdnoise / gain)**2)`` plus the source Poisson term
  ``max(image - sky map, 0) / gain``. Sky left above the map's lowest level (moonlight
  over a constant subtraction) is light: its photon noise ``(sky map - lowest) / gain``
  is added where it is, and its mean taken out of ``sigma**2``, which held it.
* No GAIN: sky term ``sigma**2``; if a sky is present an effective gain
  ``sky / sigma**2`` (all sky noise taken as Poisson, a conservative choice)
  gives the source Poisson term, otherwise there is none.

What was done is recorded in `Exposure.variance_source`.

astropy's CCDData and this module
---------------------------------
Pixels, headers, WCS, units and gzip go through astropy (`astropy.io.fits`,
`astropy.wcs`, `astropy.units`). The CCDData reader and writer
(`astropy.nddata.fits_ccddata_reader`/``CCDData.to_hdu``) are not used for the
files themselves because they do a different job: the writer stores the mask as
one boolean byte plane (Rubin's named ``MP_<NAME>`` bits would be lost) in an
``UNCERT`` extension layout Rubin's tools do not read; the reader takes one data
HDU with same-file planes, so it cannot model a variance from GAIN/RDNOISE or
the sky, read separate noise/weight/mask/PSF files, PSF grids, or refuse
truncated and oversized files before loading them. Instead the files this
module writes follow the conventions the CCDData reader understands (BUNIT on
IMAGE, ``UTYPE = VarianceUncertainty`` on VARIANCE, a MASK extension), so
``CCDData.read(path, hdu="IMAGE", hdu_uncertainty="VARIANCE", hdu_mask="MASK")``
works on them, and `to_ccddata`/`from_ccddata` convert in memory.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from . import order
from .clipping import sigma_clipped_median_std
from .config import ForcedPhotometryConfig
from .dilation import dilate_cross, or_filter
from .errors import InvalidExposureError, PsfError
from .exposure import Exposure, MaskPlanes, PhotoCalib, invalid_variance
from .fits_structure import check_fits_structure
from .psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf, Psf
from .psf_sampling import memo, refined_nodes
from .sky import pixel_to_radec
from .units import GAIN_KEYS, SATURATION_KEYS, ZERO_POINT_KEYS, rate_and_electrons

__all__ = [
    "read_exposure",
    "write_exposure",
    "write_hdulist_atomic",
    "file_mode",
    "exposure_to_hdulist",
    "exposure_to_bytes",
    "describe_exposure",
    "estimate_variance",
    "to_ccddata",
    "from_ccddata",
    "image_unit",
    "bunit_card",
    "mask_bits",
    "mask_planes",
    "DEFAULT_MAX_PIXELS",
    "MIN_IMAGE_SIDE",
]

log = logging.getLogger(__name__)

#: Default limit on the number of pixels of any plane (100 megapixels).
DEFAULT_MAX_PIXELS = 100_000_000
#: Smallest image side read as an exposure: below it no PSF stamp or kernel fits.
MIN_IMAGE_SIDE = 8

# extension names recognised in the same file, in order of preference
_IMAGE_NAMES = ("IMAGE", "SCI")
_VARIANCE_NAMES = ("VARIANCE", "VAR")
_NOISE_NAMES = ("ERR", "NOISE", "SIGMA", "RMS")
_WEIGHT_NAMES = ("WEIGHT", "IVAR", "INVVAR")
_MASK_NAMES = ("MASK",)
#: Data-quality extensions of HST and JWST files (SCI, ERR, DQ), read as the mask when
#: there is no MASK (`_mask_from_dq`).
_DQ_NAMES = ("DQ",)
#: JWST's DQ bits (its pipeline's ``dqflags``): do not use, saturated.
_JWST_DO_NOT_USE, _JWST_SATURATED = 1, 2
_PSF_NAMES = ("PSF",)
_PSF_NODES_NAME = "PSF_NODES"
#: Normalised noise autocorrelation of a resampled image (`Exposure.noise_correlation`).
_NOISECORR_NAME = "NOISECORR"

#: How `Exposure.variance_source` starts for planes modelled from gain and read noise
#: (photon statistics: white noise, unlike resampled or measured planes; core.variance).
PHYSICAL_VARIANCE_PREFIX = "gain/read-noise model"
_READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "READNOISE", "RON")
_BAND_KEYS = ("BAND", "FILTER", "FILTNAME", "FILTNAM")

#: Exact zeros in solid blocks (every pixel in a ``_FILL_BLOCK`` square of zeros) making
#: up pieces of at least ``_MIN_FILL_PIXELS`` are no data: the fill of a coadd or drizzled
#: image outside its coverage, a dithered frame's border. Noise never repeats one value
#: over a block; sky-subtracted integer frames hold scattered zeros, not solid blocks.
_FILL_BLOCK = 5
_MIN_FILL_PIXELS = 500

# masked pixels (these planes) may carry any variance; elsewhere it must be finite and >= 0
_UNUSABLE_PLANES = ("NO_DATA", "BAD", "SAT")

# alsub's own primary-header cards; never part of Exposure.metadata
_ALSUB_JSON_KEY = "ALSUBMD"
_RESERVED_KEYS = {"BAND", "PHOTCAL", _ALSUB_JSON_KEY}

_STRUCTURAL = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|BZERO|BSCALE|BLANK|EXTNAME|"
    r"EXTVER|EXTLEVEL|EXTTYPE|INHERIT|CHECKSUM|DATASUM|COMMENT|HISTORY|TFIELDS|END|)$"
)
_WCS_KEYS = re.compile(
    r"^(WCSAXES|WCSNAME|WCSDIM|CTYPE\d|CRVAL\d|CRPIX\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|"
    r"PC\d_\d|PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|CRDER\d|CSYER\d|"
    r"(A|B|AP|BP)_(ORDER|DMAX|\d+_\d+)|LTV\d|LTM\d_\d|WAT\d_\d+)[A-Z]?$"
)
_STANDARD_KEY = re.compile(r"^[A-Z0-9_-]{1,8}$")

Source = str | os.PathLike | bytes | bytearray | IO[bytes]  # or an astropy HDUList


# ----------------------------------------------------------------------------- helpers
@dataclass
class _ReadInfo:
    """What `_read` found, for `describe_exposure`."""

    planes: dict[str, str] = field(default_factory=dict)
    saturation: float | None = None
    sky: float | None = None
    sky_sigma: float | None = None
    dtype: str = ""


def _source_name(source: Any, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray):
        return "<uploaded bytes>"
    if isinstance(source, fits.HDUList):
        return str(source.filename() or "<HDUList>")
    return str(getattr(source, "name", "<file object>"))


class _Fits:
    """An open HDU list with its display name and the warnings astropy gave."""

    def __init__(self, source: Source, name: str, max_bytes: int):
        self.name = name
        self.warnings: list[str] = []
        if isinstance(source, fits.HDUList):
            # a notebook's open file: as its bytes, so every check of a file applies
            buffer = io.BytesIO()
            source.writeto(buffer, output_verify="silentfix")
            source = buffer.getvalue()
        elif not isinstance(source, bytes | bytearray | str | os.PathLike) and not hasattr(
            source, "read"
        ):
            hint = " (an array: use Exposure.from_arrays)" if hasattr(source, "shape") else ""
            raise InvalidExposureError(
                f"cannot read a {type(source).__name__} as FITS{hint}: give a path, bytes, "
                "a binary file object or an astropy HDUList"
            )
        if not isinstance(source, bytes | bytearray | str | os.PathLike) and not (
            hasattr(source, "seekable") and source.seekable()
        ):
            source = source.read()
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
            if data[:2] == b"\x1f\x8b":
                # astropy gunzips paths but not in-memory uploads; cap the output at room
                # for image, variance, mask and PSF planes of max_pixels 8-byte values
                data = _gunzip(data, name, max_bytes)
            fileobj: Any = io.BytesIO(data)
        elif isinstance(source, str | os.PathLike):
            path = Path(source)
            if not path.exists():
                raise InvalidExposureError(f"{name}: no such file")
            if not path.is_file():
                raise InvalidExposureError(f"{name}: not a regular file")
            fileobj = os.fspath(path)
            with open(fileobj, "rb") as handle:
                if handle.read(2) == b"\x1f\x8b":
                    # Gunzipped here (capped) so that the structure check sees the FITS bytes.
                    handle.seek(0)
                    fileobj = io.BytesIO(_gunzip(handle.read(), name, max_bytes))
        else:
            fileobj = source
        _check_structure(fileobj, name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # a file on disk is mapped (None: where astropy can; scaled integers are
                # converted anyway), so its planes are converted from the page cache, not
                # read into fresh memory first; each is a copy, so nothing keeps the
                # mapping once the file is closed (4096 pair on two threads, fresh
                # processes: 0.38-1.11 -> 0.19-0.20 s)
                memmap = None if isinstance(fileobj, str) else False
                self.hdul = fits.open(fileobj, memmap=memmap, lazy_load_hdus=False)
        except PermissionError:
            raise InvalidExposureError(f"{name}: cannot open the file: permission denied") from None
        except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise InvalidExposureError(f"{name}: not a FITS file ({_short(exc)})") from None
        self.warnings = [str(w.message).splitlines()[0] for w in caught]
        try:
            self._check_complete(fileobj)
        except BaseException:
            self.close()
            raise

    def _check_complete(self, fileobj: Any) -> None:
        """Refuse files whose headers or data blocks were cut off.

        astropy only warns (and silently drops HDUs whose header is cut); a file
        that merely lacks its final padding is still accepted.
        """
        if len(self.hdul) == 0:
            raise InvalidExposureError(f"{self.name}: not a FITS file (no HDU)")
        if getattr(self.hdul[0].fileinfo()["file"], "compression", None):
            return  # sizes of gzip/bzip2 files are unknown here; loading finds a cut
        for text in self.warnings:
            if "error validating header" in text.lower():
                raise InvalidExposureError(
                    f"{self.name}: truncated or corrupt file (a header after HDU "
                    f"{len(self.hdul) - 1} cannot be read: {text})"
                )
        if isinstance(fileobj, str):
            size = os.path.getsize(fileobj)
        else:
            position = fileobj.tell()
            size = fileobj.seek(0, os.SEEK_END)
            fileobj.seek(position)
        for index, hdu in enumerate(self.hdul):
            if isinstance(hdu, fits.CompImageHDU):
                continue  # its size is the uncompressed one; loading finds a cut
            end = hdu.fileinfo()["datLoc"] + hdu.size
            if end > size:
                raise InvalidExposureError(
                    f"{self.name}: truncated file (HDU {index} needs {end} bytes, "
                    f"the file has {size})"
                )

    @property
    def truncated(self) -> str | None:
        for text in self.warnings:
            low = text.lower()
            if "truncated" in low or "error validating header" in low:
                return text
        return None

    def problem(self, text: str) -> InvalidExposureError:
        hint = self.truncated
        if hint:
            text = f"truncated or corrupt file ({text}; {hint})"
        return InvalidExposureError(f"{self.name}: {text}")

    def index_of(self, names: tuple[str, ...]) -> int | None:
        for wanted in names:
            for i, hdu in enumerate(self.hdul):
                if hdu.name.upper() == wanted:
                    return i
        return None

    def close(self) -> None:
        self.hdul.close()


def _check_structure(fileobj: Any, name: str) -> None:
    """Validate the structural keywords and extents before astropy parses anything."""
    if isinstance(fileobj, str):
        with open(fileobj, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size

            def read_at(offset: int, n: int) -> bytes:
                handle.seek(offset)
                return handle.read(n)

            check_fits_structure(read_at, size, name)
        return
    position = fileobj.tell()
    size = fileobj.seek(0, os.SEEK_END)

    def read_from(offset: int, n: int) -> bytes:
        fileobj.seek(offset)
        return fileobj.read(n)

    try:
        check_fits_structure(read_from, size, name)
    finally:
        fileobj.seek(position)


def _gunzip(data: bytes, name: str, max_bytes: int) -> bytes:
    """Decompress gzip bytes, refusing output beyond ``max_bytes`` (a gzip bomb)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise InvalidExposureError(f"{name}: corrupt gzip data ({exc})") from None
    if len(out) > max_bytes:
        raise InvalidExposureError(
            f"{name}: gzip data expands to more than {max_bytes} bytes, over the limit"
        )
    if not inflater.eof:
        raise InvalidExposureError(f"{name}: truncated file (gzip stream ends early)")
    return out


def _gunzip_limit(max_pixels: int) -> int:
    return 4 * 8 * max_pixels + 2**20


def _short(exc: BaseException) -> str:
    """The exception's first line, or after a wcslib "ERROR n in f() at line ..." line
    (where in wcslib's C) the line that says what is wrong."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[1] if len(lines) > 1 and _WCSLIB_WHERE.match(lines[0]) else lines[0]
    return text[:200]


_WCSLIB_WHERE = re.compile(r"ERROR \d+ in \w+\(\) at line \d+ of file ")


def _is_image(hdu) -> bool:
    return isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)


def _shape_from_header(header: fits.Header) -> tuple[int, ...]:
    naxis = int(header.get("NAXIS", 0))
    return tuple(int(header.get(f"NAXIS{naxis - k}", 0)) for k in range(naxis))


def _check_pixels(f: _Fits, index: int, what: str, max_pixels: int) -> tuple[int, ...]:
    """Shape of an image HDU from its header, checked before any data is read."""
    hdu = f.hdul[index]
    shape = _shape_from_header(hdu.header)
    npix = math.prod(shape) if shape else 0
    if npix > max_pixels:
        raise InvalidExposureError(
            f"{f.name}: {what} has {npix} pixels {shape}, more than the limit of {max_pixels}"
        )
    return shape


def _load(f: _Fits, index: int, what: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = f.hdul[index].data
    except (OSError, ValueError, TypeError, IndexError, EOFError) as exc:
        raise f.problem(f"cannot read the {what} pixels: {_short(exc)}") from None
    if data is None:
        raise f.problem(f"HDU {index} holds no {what} data")
    return np.asarray(data)


def _require_2d(f: _Fits, shape: tuple[int, ...], what: str, index: int) -> None:
    if len(shape) != 2:
        dims = "x".join(str(s) for s in reversed(shape))
        raise f.problem(f"{what} in HDU {index} is {len(shape)}-D ({dims}), expected 2-D")


def _to_float32(data: np.ndarray) -> np.ndarray:
    # astropy applies BZERO/BSCALE on access, so uint16 arrays already hold true counts
    return np.array(data, dtype=np.float32, copy=True)


def _zero_fill(image: np.ndarray) -> np.ndarray | None:
    """Pixels of ``image`` that are zero fill, not data (`_MIN_FILL_PIXELS`); None if none.

    The solid blocks of exact zeros large enough, grown back over the zeros within a
    block of them (a dithered border's ragged edge). Nothing when every finite pixel
    would be fill (an image of zeros is refused as empty elsewhere, not hidden here).
    """
    zero = image == 0
    if np.count_nonzero(zero) < _MIN_FILL_PIXELS:
        return None
    h = _FILL_BLOCK // 2
    # centres of solid blocks: no nonzero pixel in the block (the box filters' ORs, a few
    # whole-array passes; pixels off the frame count as zero, as the frame's edge pixels
    # would, which lie in the same block)
    centres = ~or_filter(~zero, h, h)
    if not centres.any():
        return None
    from scipy import ndimage  # only now: reading a frame (`alsub info`) needs no scipy

    labels, n = ndimage.label(or_filter(centres, h, h), structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    large = sizes >= _MIN_FILL_PIXELS
    if not large.any():
        return None
    fill = zero & or_filter(large[labels], h, h)
    if np.count_nonzero(fill) >= np.count_nonzero(np.isfinite(image)):
        return None
    return fill


def _header_value(headers: list[fits.Header], keys: tuple[str, ...]):
    for header in headers:
        for key in keys:
            if key in header:
                value = header[key]
                if isinstance(value, str) and not value.strip():
                    continue
                return value
    return None


def _float_value(headers, keys) -> float | None:
    value = _header_value(headers, keys)
    try:
        number = float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


# ---------------------------------------------------------------------------- variance
def _data_gain(headers) -> float | None:
    """Electrons per unit of the pixel values, for the variance model.

    The GAIN keyword is electrons per ADU; a pipeline that converts the pixels to
    electrons or to a rate (HST and many coadds: BUNIT 'ELECTRONS/S') usually keeps
    the card. Taken as it is, it makes the photon and read noise of a rate image
    ~EXPTIME/GAIN times too large (a difference that looks far quieter than its
    variance), so the unit decides: electrons -> 1, per second -> times EXPTIME.
    """
    rate, electrons = rate_and_electrons(_header_value(headers, ("BUNIT",)))
    gain = 1.0 if electrons else _float_value(headers, GAIN_KEYS)
    if rate and gain is not None:
        exptime = _float_value(headers, ("EXPTIME", "EXPOSURE"))
        return gain * exptime if exptime and exptime > 0 else None
    return gain


_STATS_MAX_SIDE = 2048
#: The first (masking) pass of `_sky_statistics` takes every this-many-th value, when
#: that leaves at least `_FIRST_PASS_MIN` of them.
_FIRST_PASS_STEP = 4
_FIRST_PASS_MIN = 250_000
#: Cells of the sky mesh: about this many along the shorter side, and at least
#: `_SKY_CELL_MIN` px, so a gradient is followed while a cell still holds sky.
_SKY_CELLS = 8
_SKY_CELL_MIN = 32


def _sky_mesh(image: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """The sky as a smooth map: medians of ``keep`` pixels in cells, bilinear between
    cell centres (extrapolated linearly to the edges); a cell without enough sky (a
    mosaic's empty region) takes its nearest cell's. None when the image holds fewer
    than two cells or none has sky (then one level describes it)."""
    from scipy import ndimage

    from .background import _interp_matrix  # needs scipy: only when a sky is measured

    ny, nx = image.shape
    cell = max(_SKY_CELL_MIN, min(ny, nx) // _SKY_CELLS)
    nby, nbx = ny // cell, nx // cell
    if nby * nbx < 2:
        return None
    mesh = np.empty((nby, nbx))
    for j in range(nby):
        for i in range(nbx):
            # every other row and column: a cell's median to ~1% of the noise from a
            # quarter of its pixels (the whole cells' medians doubled a 2048 px read)
            window = (slice(j * cell, (j + 1) * cell, 2), slice(i * cell, (i + 1) * cell, 2))
            values = image[window][keep[window]]
            enough = values.size >= image[window].size // 4
            mesh[j, i] = np.median(values) if enough else np.nan
    empty = np.isnan(mesh)
    if empty.all():
        return None
    if empty.any():
        nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
        mesh = mesh[tuple(nearest)]
    # the cells start at pixel 0: their centres are (cell - 1) / 2 + k cell
    wy = _interp_matrix(ny, (cell - 1) / 2.0, cell, nby)
    wx = _interp_matrix(nx, (cell - 1) / 2.0, cell, nbx)
    return (wy @ mesh @ wx.T).astype(np.float32)


def _sky_statistics(image: np.ndarray, valid: np.ndarray) -> tuple[float, float, np.ndarray | None]:
    """Sky level, robust sky noise and the smooth sky map (or None), sources masked.

    A first sigma-clipped pass (on every 4th value of large samples) gives a
    threshold; pixels above it after a 3x3 smoothing, grown by 3 pixels, are masked
    so that star wings (which clipping keeps) do not inflate the noise. The noise is
    then measured about a smooth sky (`_sky_mesh`): a twilight or moonlight gradient
    would otherwise count as noise, hundreds of times the true variance. Large images
    use a central block (and no map is returned).
    """
    ny, nx = image.shape
    whole = True
    if ny > _STATS_MAX_SIDE or nx > _STATS_MAX_SIDE:
        j0, i0 = max(0, (ny - _STATS_MAX_SIDE) // 2), max(0, (nx - _STATS_MAX_SIDE) // 2)
        block = (slice(j0, j0 + _STATS_MAX_SIDE), slice(i0, i0 + _STATS_MAX_SIDE))
        if valid[block].sum() > 1000:
            image, valid = image[block], valid[block]
            whole = False
    # Imported here: reading a file that has its variance (and `alsub info`) needs no scipy,
    # half of this module's import time.
    from scipy import ndimage

    # float32 values: the clipping sorts them once (core.clipping), no float64 copy
    values = image[valid]
    if values.size == 0:
        raise InvalidExposureError("no valid pixels to measure the sky noise")
    # the first pass only sets the source-masking threshold: a regular quarter of the
    # values gives it to ~0.1% (of a 1-sigma cut) at a quarter of the sort
    step = _FIRST_PASS_STEP if values.size >= _FIRST_PASS_STEP * _FIRST_PASS_MIN else 1
    sky, sigma = sigma_clipped_median_std(values[::step], sigma=3.0, maxiters=10)
    smooth_sky = None
    if math.isfinite(sigma) and sigma > 0:
        # the sky as a map of cell medians (robust to the few sources of a cell), and the
        # noise about it: a smooth gradient is neither noise nor a source
        smooth_sky = _sky_mesh(image, valid)
        if smooth_sky is not None:
            flat = image - smooth_sky
            _, sigma = sigma_clipped_median_std(flat[valid][::step], sigma=3.0, maxiters=10)
        else:
            flat = image - np.float32(sky)
        filled = np.where(valid, flat, 0.0)
        # a 3x3 mean has noise sigma/3, so 1 sigma of the raw image is a 3-sigma cut
        smooth = ndimage.uniform_filter(filled, size=3)
        sources = dilate_cross(smooth > sigma, 3)
        keep = valid & ~sources
        if keep.sum() > max(100, 0.1 * valid.sum()):
            if smooth_sky is None:
                sky, sigma = sigma_clipped_median_std(image[keep], sigma=3.0, maxiters=10)
            else:
                # the level (the least of it and the map's says whether a sky is
                # present) and the noise about the map from a regular sample: a million
                # values give the noise to ~0.1%
                sky, _ = sigma_clipped_median_std(image[keep][::step], sigma=3.0, maxiters=10)
                _, sigma = sigma_clipped_median_std(flat[keep][::step], sigma=3.0, maxiters=10)
    sky, sigma = float(sky), float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        sigma = float(np.std(values, dtype=np.float64)) or 1.0
    return sky, sigma, smooth_sky if whole else None


def estimate_variance(
    image: np.ndarray,
    valid: np.ndarray | None = None,
    gain: float | None = None,
    read_noise: float | None = None,
) -> tuple[np.ndarray, str, float, float]:
    """Model the variance of a single image that has no variance plane.

    Parameters
    ----------
    image : `numpy.ndarray` (ny, nx)
        Pixel values (ADU for the gain model).
    valid : `numpy.ndarray` (ny, nx), bool, optional
        Pixels to use for the sky statistics (default: all finite).
    gain : float, optional
        Electrons per ADU.
    read_noise : float, optional
        Read noise in electrons (0 if unknown).

    Returns
    -------
    variance : `numpy.ndarray` (ny, nx), float32
    description : str
        What was done, for `Exposure.variance_source`.
    sky, sky_sigma : float
        The measured sky level and robust sky noise.

    Notes
    -----
    See the module docstring for the three cases (sky present with a gain, sky
    subtracted with a gain, no gain).
    """
    # float32 throughout the full frame keeps memory at a few planes for 100 Mpix images
    image = np.asarray(image, dtype=np.float32)
    if valid is None:
        valid = np.isfinite(image)
    sky, sigma, sky_map = _sky_statistics(image, valid)
    measured = sigma * sigma
    # present everywhere: a pedestal subtracted as one constant leaves a gradient
    # whose low side has no sky, and the CCD model would miss its photon noise there
    low = sky if sky_map is None else min(sky, float(sky_map.min()))
    sky_present = low > 3.0 * sigma
    # sources stand above the local sky: a gradient's photon noise is in the measured
    # sigma already and must not be counted again as source light
    local_sky = np.float32(sky) if sky_map is None else sky_map
    rn = read_noise or 0.0
    if gain is not None and gain > 0:
        read_var = (rn / gain) ** 2
        model_sky = max(sky, 0.0) / gain + read_var
        if sky_present and measured >= 0.8 * model_sky:
            # in place: each frame-sized temporary costs fresh pages
            variance = np.maximum(image, np.float32(0.0))
            variance /= np.float32(gain)
            variance += np.float32(read_var)
            text = f"{PHYSICAL_VARIANCE_PREFIX} (GAIN={gain:.4g} e-/ADU, RDNOISE={rn:.4g} e-)"
        elif sky_present:
            variance = measured + np.maximum(image - sky, 0.0) / gain
            text = (
                f"measured sky noise {sigma:.4g} (below the gain model's "
                f"{math.sqrt(model_sky):.4g}) + Poisson term (GAIN={gain:.4g})"
            )
        else:
            # sky left above its lowest level (moonlight over a constant subtraction) is
            # light, with its photon noise there; the measured noise is its mean
            residual = None if sky_map is None else (sky_map - np.float32(low)) / np.float32(gain)
            mean_residual = 0.0 if residual is None else float(np.mean(residual[valid]))
            sky_var = max(measured - mean_residual, read_var)
            variance = sky_var + np.maximum(image - local_sky, 0.0) / gain
            if residual is not None:
                variance += residual
            text = (
                f"sky-subtracted image: sky noise max(measured {sigma:.4g}, read noise "
                f"{math.sqrt(read_var):.4g}) + Poisson term (GAIN={gain:.4g})"
            )
    elif sky_present:
        effective_gain = sky / measured
        variance = measured + np.maximum(image - sky, 0.0) / effective_gain
        text = (
            f"measured sky noise {sigma:.4g} + Poisson term with effective gain "
            f"{effective_gain:.4g} from the sky level (no GAIN keyword)"
        )
    else:
        variance = np.full(image.shape, measured, dtype=np.float32)
        text = f"measured sky noise {sigma:.4g} only (no GAIN keyword, sky-subtracted image)"
    variance = np.asarray(variance, dtype=np.float32)
    bad = ~np.isfinite(variance)
    if bad.any():
        variance[bad] = np.float32(measured)
    return variance, text, sky, sigma


# ---------------------------------------------------------------------- plane sources
def _aux_plane(
    spec: Any, main: _Fits, what: str, max_pixels: int
) -> tuple[np.ndarray, fits.Header | None, str, _Fits | None]:
    """Array, header and description of an auxiliary plane given as array, ext name or file.

    Returns also the opened file (caller closes) so a PSF file can give PSF_NODES.
    """
    if isinstance(spec, np.ndarray):
        return np.asarray(spec), None, f"{what} array", None
    if isinstance(spec, str) and not os.path.exists(spec):
        index = main.index_of((spec.upper(),))
        if index is not None:
            _check_pixels(main, index, f"{what} extension {spec}", max_pixels)
            data = _load(main, index, what)
            return data, main.hdul[index].header, f"{what} extension {spec.upper()}", None
    name = _source_name(spec)
    other = _Fits(spec, name, _gunzip_limit(max_pixels))
    try:
        index = next(
            (i for i, hdu in enumerate(other.hdul) if _is_image(hdu) and hdu.header.get("NAXIS")),
            None,
        )
        if index is None:
            raise other.problem(f"no image data for the {what}")
        _check_pixels(other, index, what, max_pixels)
        data = _load(other, index, what)
        header = other.hdul[index].header
    except BaseException:
        other.close()
        raise
    return data, header, f"{what} file {os.path.basename(name)}", other


def _mask_planes_from_header(header: fits.Header | None) -> MaskPlanes | None:
    if header is None:
        return None
    planes = {}
    for key, value in header.items():
        if key.upper().startswith("MP_") and len(key) > 3:
            planes[key[3:].upper()] = int(value)
    return MaskPlanes(planes) if planes else None


def mask_planes(header: fits.Header | None) -> MaskPlanes:
    """The planes of a MASK HDU with header ``header``: its ``MP_<NAME>`` cards, else
    alsub's (Rubin's) default planes."""
    return _mask_planes_from_header(header) or MaskPlanes()


def mask_bits(header: fits.Header | None, names) -> int:
    """Bits of the named planes in a MASK HDU with header ``header`` (`mask_planes`)."""
    return mask_planes(header).get_bitmask(names)


def _mask_from_plane(
    data: np.ndarray, header: fits.Header | None, default_rubin: bool
) -> tuple[np.ndarray, MaskPlanes]:
    planes = _mask_planes_from_header(header)
    if planes is not None or default_rubin:
        if np.issubdtype(data.dtype, np.integer):
            # integer casts keep the low 32 bits, as through int64 (without its frame)
            return data.astype(np.int32), planes or MaskPlanes()
        data = np.where(np.isfinite(data), data, 0)
        return np.asarray(data, dtype=np.int64).astype(np.int32), planes or MaskPlanes()
    # a user mask without plane names: any non-zero pixel is BAD
    planes = MaskPlanes()
    bad = np.asarray(data != 0) if np.issubdtype(data.dtype, np.integer) else ~(data == 0)
    mask = np.zeros(data.shape, dtype=np.int32)
    mask[bad] = planes.value("BAD")
    return mask, planes


def _mask_from_dq(data: np.ndarray, telescope: str | None) -> tuple[np.ndarray, MaskPlanes]:
    """A DQ extension as the mask. JWST's bits are named by its pipeline: DO_NOT_USE is
    BAD, SATURATED is SAT, the rest (a jump fitted out of the ramp, ...) leave the pixel
    usable. Any other telescope's (HST's bits differ by instrument) non-zero is BAD, as
    an unnamed mask's. A DQ was ignored: two hot columns flagged there made 39 DIA
    sources, verdict good."""
    values = np.asarray(data)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.where(np.isfinite(values), values, 0).astype(np.int64)
    if (telescope or "").strip().upper() != "JWST":
        return _mask_from_plane(values, None, default_rubin=False)
    planes = MaskPlanes()
    mask = np.zeros(values.shape, dtype=np.int32)
    mask[(values & _JWST_DO_NOT_USE) != 0] |= planes.value("BAD")
    mask[(values & _JWST_SATURATED) != 0] |= planes.value("SAT")
    return mask, planes


# -------------------------------------------------------------------------------- PSF
def _psf_from_hdu(f: _Fits, index: int, center: tuple[float, float], max_pixels: int) -> Psf:
    header = f.hdul[index].header
    _check_pixels(f, index, "PSF", max_pixels)
    data = np.asarray(_load(f, index, "PSF"), dtype=np.float64)
    kind = str(header.get("PSFTYPE", "")).upper()
    params = {}
    if "PSFPARS" in header:
        try:
            params = json.loads(header["PSFPARS"])
        except ValueError:
            params = {}
    try:
        if kind == "GAUSSIAN" and params:
            return GaussianPsf(**params)
        if kind == "MOFFAT" and params:
            return MoffatPsf(**params)
        if data.ndim == 2:
            average: tuple[float, float] | None
            if "PSFAVGX" in header:
                average = (float(header["PSFAVGX"]), float(header["PSFAVGY"]))
            else:
                average = None if kind else center
            return ImagePsf(data, average_position=average)
        if data.ndim == 4:
            x_nodes, y_nodes = _psf_nodes(f, header, data.shape)
            return GridPsf(data, x_nodes, y_nodes)
    except (PsfError, TypeError, ValueError, KeyError) as exc:
        # KeyError: PSFAVGX without PSFAVGY
        raise InvalidExposureError(f"{f.name}: invalid PSF in HDU {index}: {exc}") from None
    raise InvalidExposureError(
        f"{f.name}: PSF in HDU {index} is {data.ndim}-D; expected a 2-D stamp "
        "or a 4-D (ny_nodes, nx_nodes, k, k) grid"
    )


def _psf_nodes(f: _Fits, header: fits.Header, shape) -> tuple[np.ndarray, np.ndarray]:
    """Node coordinates of a grid PSF: PSF_NODES table, else XNODEi/YNODEi header cards."""
    ny, nx = shape[0], shape[1]
    index = f.index_of((_PSF_NODES_NAME,))
    if index is not None:
        table = f.hdul[index].data
        names = [n.upper() for n in table.columns.names]
        try:
            xcol = table.field(names.index("X_NODES") if "X_NODES" in names else names.index("X"))
            ycol = table.field(names.index("Y_NODES") if "Y_NODES" in names else names.index("Y"))
        except ValueError:
            raise InvalidExposureError(
                f"{f.name}: {_PSF_NODES_NAME} table needs X_NODES and Y_NODES columns"
            ) from None
        x = np.asarray(xcol, dtype=np.float64)
        y = np.asarray(ycol, dtype=np.float64)
        # one row of vector columns, or one row per node with NaN padding
        x = x[0] if x.ndim == 2 else x
        y = y[0] if y.ndim == 2 else y
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        return x, y
    try:
        x = np.array([float(header[f"XNODE{i + 1}"]) for i in range(nx)])
        y = np.array([float(header[f"YNODE{j + 1}"]) for j in range(ny)])
    except KeyError:
        raise InvalidExposureError(
            f"{f.name}: 4-D PSF grid without node coordinates "
            f"(a {_PSF_NODES_NAME} table or XNODEi/YNODEi cards)"
        ) from None
    return x, y


def _psf_from_spec(spec: Any, main: _Fits, center, max_pixels: int) -> tuple[Psf, str]:
    if isinstance(spec, Psf):
        return spec, "PSF object"
    if isinstance(spec, np.ndarray):
        try:
            psf = ImagePsf(spec, average_position=center) if spec.ndim == 2 else None
        except PsfError as exc:
            raise InvalidExposureError(f"{main.name}: invalid PSF array: {exc}") from None
        if psf is None:
            raise InvalidExposureError(f"{main.name}: PSF array must be 2-D")
        return psf, "PSF array"
    if isinstance(spec, str) and not os.path.exists(spec):
        index = main.index_of((spec.upper(),))
        if index is not None:
            return _psf_from_hdu(main, index, center, max_pixels), f"PSF extension {spec.upper()}"
    name = _source_name(spec)
    other = _Fits(spec, name, _gunzip_limit(max_pixels))
    try:
        index = other.index_of(_PSF_NAMES)
        if index is None:
            index = next(
                (i for i, h in enumerate(other.hdul) if _is_image(h) and h.header.get("NAXIS")),
                None,
            )
        if index is None:
            raise other.problem("no image data for the PSF")
        return _psf_from_hdu(other, index, center, max_pixels), f"PSF file {os.path.basename(name)}"
    finally:
        other.close()


# --------------------------------------------------------------------- header -> fields
def _metadata_from_header(header: fits.Header) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for card in header.cards:
        key = card.keyword
        if not key or _STRUCTURAL.match(key) or _WCS_KEYS.match(key) or key in _RESERVED_KEYS:
            continue
        value = card.value
        if isinstance(value, fits.card.Undefined):
            value = None
        meta[key] = value
    return meta


def _band_from_headers(headers) -> str | None:
    value = _header_value(headers, _BAND_KEYS)
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    # "i DECam SDSS c0003 7835.0 1470.0" -> "i"
    return text.split()[0] if text else None


def _photo_calib_from_headers(headers) -> PhotoCalib | None:
    cal = _float_value(headers, ("PHOTCAL",))
    if cal and cal > 0:
        return PhotoCalib(cal)
    flux_mag0 = _float_value(headers, ("FLUXMAG0",))
    if flux_mag0 and flux_mag0 > 0:
        return PhotoCalib.from_zero_point(2.5 * math.log10(flux_mag0))
    zero_point = _float_value(headers, ZERO_POINT_KEYS)
    if zero_point is not None:
        return PhotoCalib.from_zero_point(zero_point)
    bunit = str(_header_value(headers, ("BUNIT",)) or "").strip().lower().replace(" ", "")
    if bunit == "njy":
        return PhotoCalib(1.0)
    pixel_area = _float_value(headers, ("PIXAR_SR",))
    if bunit == "mjy/sr" and pixel_area and pixel_area > 0:
        # 1 MJy/sr over one pixel = 1e15 nJy x pixel solid angle
        return PhotoCalib(1e15 * pixel_area)
    return None


def _wcs_from_header(header: fits.Header, name: str) -> WCS | None:
    if not any(k in header for k in ("CTYPE1", "CTYPE2")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            # the header as text verifies its cards: a lower-case keyword astropy fixes
            # printed three warnings (a gzipped file's; none counted in the run's)
            warnings.simplefilter("ignore", VerifyWarning)
            wcs = WCS(header, naxis=2)
    except Exception as exc:  # astropy.wcs raises many private exception types
        log.warning("%s: WCS ignored, it cannot be parsed: %s", name, _short(exc))
        return None
    return wcs if wcs.has_celestial else None


def _xy0_from_header(header: fits.Header) -> tuple[int, int]:
    """Parent origin from the Rubin-style 'A' (physical) WCS cards, else (0, 0)."""
    if str(header.get("CTYPE1A", "")).upper() == "LINEAR" and "CRVAL1A" in header:
        try:
            x0 = float(header["CRVAL1A"]) - (float(header.get("CRPIX1A", 1.0)) - 1.0)
            y0 = float(header["CRVAL2A"]) - (float(header.get("CRPIX2A", 1.0)) - 1.0)
            return int(round(x0)), int(round(y0))
        except (KeyError, TypeError, ValueError):
            return (0, 0)
    return (0, 0)


def _alsub_json(header: fits.Header) -> dict[str, Any]:
    if _ALSUB_JSON_KEY not in header:
        return {}
    try:
        data = json.loads(header[_ALSUB_JSON_KEY])
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------- reading
def read_exposure(
    source: Source,
    *,
    variance: Any = None,
    weight: Any = None,
    noise: Any = None,
    mask: Any = None,
    psf: Any = None,
    hdu: int | str | None = None,
    saturation: float | None = None,
    gain: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Exposure:
    """Read an exposure from a FITS file (MEF or single image).

    Parameters
    ----------
    source : str, `os.PathLike`, bytes, binary file object or `astropy.io.fits.HDUList`
        The FITS file (an HDUList is read from its bytes: the same checks apply). For
        numpy arrays use `core.exposure.Exposure.from_arrays`.
    variance, weight, noise : optional
        A separate variance plane, inverse-variance weight or 1-sigma noise map:
        a path, bytes, file object, the name of an extension of ``source``, or
        an array. At most one of them. Pixels whose weight or noise is not
        positive and finite are marked NO_DATA.
    mask : optional
        A separate mask (same forms). With ``MP_<NAME>`` cards its bits are
        named planes; without, any non-zero pixel is BAD.
    psf : optional
        A PSF file or extension (2-D stamp, or 4-D grid with nodes), an array or
        a `core.psf.Psf`.
    hdu : int or str, optional
        Image HDU (index or EXTNAME). Default: the IMAGE (or SCI) extension,
        else the first HDU holding image data.
    saturation : float, optional
        Saturation level; overrides the SATURATE keyword.
    gain : float, optional
        Electrons per unit of the pixel values, for the variance model of a file with
        no variance plane; overrides the GAIN keyword (a coadd whose GAIN card is one
        exposure's: a mean of N exposures has N times its gain).
    max_pixels : int
        Refuse planes with more pixels (checked from headers before loading).
    name : str, optional
        Name used in error messages (e.g. the uploaded file name).

    Returns
    -------
    `core.exposure.Exposure`
        image float32 (non-finite pixels set to 0 and NO_DATA), variance float32,
        mask int32.

    Raises
    ------
    InvalidExposureError
        Not a FITS file, truncated, no image data, not 2-D, planes of different
        shapes, no finite pixel, negative or NaN variance on unmasked pixels, a
        noise or weight plane with no positive finite pixel, too many pixels. The
        message names the file.
    """
    exposure, _ = _read(
        source,
        variance=variance,
        weight=weight,
        noise=noise,
        mask=mask,
        psf=psf,
        hdu=hdu,
        saturation=saturation,
        gain=gain,
        max_pixels=max_pixels,
        name=name,
    )
    return exposure


def _read(
    source, *, variance, weight, noise, mask, psf, hdu, saturation, max_pixels, name, gain=None
):
    display = _source_name(source, name)
    if gain is not None and not (math.isfinite(gain) and gain > 0):
        raise InvalidExposureError(
            f"{display}: the gain must be a positive number (electrons per pixel unit), got {gain}"
        )
    options = (("variance", variance), ("weight", weight), ("noise", noise))
    given = [k for k, v in options if v is not None]
    if len(given) > 1:
        raise InvalidExposureError(f"{display}: give only one of {', '.join(given)}")
    f = _Fits(source, display, _gunzip_limit(max_pixels))
    opened: list[_Fits] = []
    try:
        return _read_open(
            f, opened, variance, weight, noise, mask, psf, hdu, saturation, max_pixels, gain
        )
    except InvalidExposureError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError, PsfError) as exc:
        raise f.problem(f"cannot read exposure: {_short(exc)}") from None
    except MemoryError:
        raise InvalidExposureError(f"{display}: not enough memory to read it") from None
    finally:
        for other in opened:
            other.close()
        f.close()


def _find_image_hdu(f: _Fits, hdu) -> int:
    n = len(f.hdul)
    index: int | None
    if hdu is not None:
        if isinstance(hdu, int):
            if not -n <= hdu < n:
                raise InvalidExposureError(f"{f.name}: no HDU {hdu} (the file has {n})")
            index = hdu % n
        else:
            index = f.index_of((str(hdu).upper(),))
            if index is None:
                raise InvalidExposureError(f"{f.name}: no extension named {hdu!r}")
        if not _is_image(f.hdul[index]) or not f.hdul[index].header.get("NAXIS"):
            raise f.problem(f"HDU {hdu!r} holds no image data")
        return index
    index = f.index_of(_IMAGE_NAMES)
    if index is not None and _is_image(f.hdul[index]) and f.hdul[index].header.get("NAXIS"):
        return index
    for i, h in enumerate(f.hdul):
        if _is_image(h) and h.header.get("NAXIS"):
            return i
    raise f.problem("no image data (no image HDU with pixels)")


def _read_open(
    f, opened, variance, weight, noise, mask, psf, hdu, saturation, max_pixels, gain=None
):
    info = _ReadInfo()
    index = _find_image_hdu(f, hdu)
    image_hdu = f.hdul[index]
    shape = _check_pixels(f, index, "image", max_pixels)
    _require_2d(f, shape, "image data", index)
    if min(shape) < MIN_IMAGE_SIDE:
        raise InvalidExposureError(
            f"{f.name}: image is {shape[1]}x{shape[0]} pixels; an exposure needs at least "
            f"{MIN_IMAGE_SIDE} pixels on each side to hold a PSF"
        )
    raw = _load(f, index, "image")
    image = _to_float32(raw)
    primary = f.hdul[0].header
    image_header = image_hdu.header
    is_mef = index != 0
    headers = [primary, image_header] if is_mef else [image_header]
    info.dtype = str(raw.dtype)
    info.planes["IMAGE"] = f"HDU {index}" + (f" ({image_hdu.name})" if image_hdu.name else "")

    # None when every pixel is finite (the usual frame: no frame of booleans made)
    finite = None if order.all_finite(image) else np.isfinite(image)
    if finite is not None and not finite.any():
        raise InvalidExposureError(f"{f.name}: image has no finite pixel (all NaN or inf)")

    def check_shape(array: np.ndarray, what: str) -> None:
        if array.shape != image.shape:
            raise InvalidExposureError(
                f"{f.name}: planes of different shapes: image {image.shape[::-1]} (nx, ny) but "
                f"{what} {array.shape[::-1]}"
            )

    # mask ------------------------------------------------------------------------------
    mask_array: np.ndarray | None = None
    planes = MaskPlanes()
    if mask is not None:
        data, header, text, other = _aux_plane(mask, f, "mask", max_pixels)
        if other:
            opened.append(other)
        if data.ndim != 2:
            raise InvalidExposureError(f"{f.name}: {text} is {data.ndim}-D, expected 2-D")
        check_shape(data, text)
        mask_array, planes = _mask_from_plane(data, header, default_rubin=False)
        info.planes["MASK"] = text
    else:
        m_index = f.index_of(_MASK_NAMES)
        dq_index = f.index_of(_DQ_NAMES) if m_index is None else None
        if m_index is not None and m_index != index:
            m_shape = _check_pixels(f, m_index, "mask", max_pixels)
            _require_2d(f, m_shape, "mask", m_index)
            data = _load(f, m_index, "mask")
            check_shape(data, "mask")
            mask_array, planes = _mask_from_plane(data, f.hdul[m_index].header, True)
            info.planes["MASK"] = f"HDU {m_index} (MASK)"
        elif dq_index is not None and dq_index != index:
            m_shape = _check_pixels(f, dq_index, "DQ", max_pixels)
            _require_2d(f, m_shape, "DQ", dq_index)
            data = _load(f, dq_index, "DQ")
            check_shape(data, "DQ")
            telescope = str(_header_value(headers, ("TELESCOP",)) or "")
            mask_array, planes = _mask_from_dq(data, telescope)
            info.planes["MASK"] = f"HDU {dq_index} (DQ)"
    if mask_array is None:
        mask_array = np.zeros(image.shape, dtype=np.int32)
    exposure_mask = mask_array

    def set_plane(plane: str, where: np.ndarray) -> None:
        if where.any():
            exposure_mask[where] |= np.int32(planes.value(plane))

    fill = _zero_fill(image)
    if fill is not None:  # no data as non-finite pixels are: marked just below
        log.info("%s: %d pixels of zero fill marked NO_DATA", f.name, np.count_nonzero(fill))
        finite = ~fill if finite is None else finite & ~fill
    if finite is not None:
        nonfinite = ~finite
        set_plane("NO_DATA", nonfinite)
        image[nonfinite] = 0.0
        del nonfinite

    # saturation --------------------------------------------------------------------------
    level = saturation if saturation is not None else _float_value(headers, SATURATION_KEYS)
    if level is None and np.issubdtype(raw.dtype, np.integer):
        # integer frames without SATURATE: pixels piled up at the maximum are the ceiling
        top = raw.max()
        if np.count_nonzero(raw == top) >= 3 and top > 0:
            level = float(top)
    if level is not None:
        above = image >= level
        set_plane("SAT", above if finite is None else finite & above)
        info.saturation = float(level)

    # variance ---------------------------------------------------------------------------
    variance_array, variance_source = _variance_plane(
        f, opened, index, variance, weight, noise, max_pixels, check_shape, set_plane, info
    )
    alsub = _alsub_json(primary)
    unusable = _Unusable(exposure_mask, planes.get_bitmask(_UNUSABLE_PLANES))
    if variance_array is not None and gain is not None:
        raise f.problem(
            f"a gain models the variance of a file without one, and this one has it "
            f"({info.planes.get('VARIANCE', 'a variance plane')}): give one or the other"
        )
    if variance_array is None:
        if gain is None:
            gain = _data_gain(headers)
        read_noise = _float_value(headers, _READ_NOISE_KEYS)
        usable = ~unusable.pixels()
        valid = usable if finite is None else finite & usable
        if not valid.any():
            valid = np.ones(image.shape, dtype=bool) if finite is None else finite
        variance_array, variance_source, info.sky, info.sky_sigma = estimate_variance(
            image, valid, gain, read_noise
        )
        info.planes["VARIANCE"] = "estimated"
    elif variance is None and weight is None and noise is None:
        # a file alsub wrote keeps the original description of its variance
        if "variance_source" in alsub:
            variance_source = str(alsub["variance_source"])
        elif info.planes.get("VARIANCE", "").startswith("VARIANCE extension"):
            vsrc = _header_value([f.hdul[f.index_of(_VARIANCE_NAMES)].header], ("VARSRC",))
            variance_source = str(vsrc) if vsrc else variance_source

    bad_variance = invalid_variance(variance_array)  # the image's shape: not empty
    if bad_variance is not None:
        problem = bad_variance & ~unusable.pixels()
        if problem.any():
            j, i = np.argwhere(problem)[0]
            raise InvalidExposureError(
                f"{f.name}: variance is negative or NaN at {int(problem.sum())} unmasked "
                f"pixels (first at x={i}, y={j}: {variance_array[j, i]})"
            )
        # masked pixels keep a finite, typical variance so FFT convolutions stay finite
        good = variance_array[~bad_variance]
        variance_array = variance_array.copy()
        variance_array[bad_variance] = np.median(good) if good.size else 1.0

    # PSF, WCS, calibration, metadata --------------------------------------------------------
    xy0 = _xy0_from_header(image_header)
    center = (xy0[0] + (image.shape[1] - 1) / 2.0, xy0[1] + (image.shape[0] - 1) / 2.0)
    psf_model: Psf | None = None
    if psf is not None:
        psf_model, info.planes["PSF"] = _psf_from_spec(psf, f, center, max_pixels)
    else:
        p_index = f.index_of(_PSF_NAMES)
        if p_index is not None and p_index != index:
            psf_model = _psf_from_hdu(f, p_index, center, max_pixels)
            info.planes["PSF"] = f"HDU {p_index} (PSF)"

    noise_correlation = _noise_correlation_from_file(f, index)
    if noise_correlation is not None:
        info.planes["NOISECORR"] = f"HDU {f.index_of((_NOISECORR_NAME,))} (NOISECORR)"

    metadata = _metadata_from_header(primary)
    if is_mef and f.index_of(("IMAGE",)) is None:
        # an image in an extension of a non-Rubin file: its own header holds keywords too
        metadata.update(_metadata_from_header(image_header))
    elif "BUNIT" in image_header and _ALSUB_JSON_KEY not in primary:
        # another writer's Rubin layout keeps the pixels' unit on the IMAGE HDU (astropy's
        # CCDData reads it there): read without it, a difference of nJy images was
        # labelled adu. (Ours keeps a known unit in the primary too: adu on IMAGE alone
        # is the label of an unknown one.)
        metadata.setdefault("BUNIT", image_header["BUNIT"])
    metadata.update(alsub.get("metadata", {}))
    band = alsub["band"] if "band" in alsub else _band_from_headers(headers)
    if "photo_calib" in alsub:
        cal = alsub["photo_calib"]
        photo_calib = PhotoCalib(float(cal)) if cal is not None else None
    else:
        photo_calib = _photo_calib_from_headers(headers)

    exposure = Exposure(
        image=image,
        variance=variance_array,
        mask=exposure_mask,
        mask_planes=planes,
        psf=psf_model,
        wcs=_wcs_from_header(image_header, f.name),
        photo_calib=photo_calib,
        band=band,
        metadata=metadata,
        xy0=xy0,
        variance_source=variance_source,
        noise_correlation=noise_correlation,
    )
    return exposure, info


class _Unusable:
    """Pixels with any of ``bits`` set in ``mask``, made on first use only."""

    def __init__(self, mask: np.ndarray, bits: int) -> None:
        self.mask, self.bits = mask, np.int32(bits)
        self._pixels: np.ndarray | None = None

    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            # a block of rows at a time: no frame-sized int32 temporary
            self._pixels = np.empty(self.mask.shape, dtype=bool)
            for y in range(0, self.mask.shape[0], 256):
                rows = slice(y, y + 256)
                np.not_equal(self.mask[rows] & self.bits, 0, out=self._pixels[rows])
        return self._pixels


def _noise_correlation_from_file(f: _Fits, image_index: int) -> np.ndarray | None:
    """The NOISECORR extension alsub writes for resampled images, checked; None if absent."""
    index = f.index_of((_NOISECORR_NAME,))
    if index is None or index == image_index:
        return None
    _check_pixels(f, index, _NOISECORR_NAME, 10_000)
    data = np.asarray(_load(f, index, _NOISECORR_NAME), dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != data.shape[1] or data.shape[0] % 2 == 0:
        raise InvalidExposureError(
            f"{f.name}: {_NOISECORR_NAME} must be a square 2-D array of odd size, "
            f"got shape {data.shape}"
        )
    r = data.shape[0] // 2
    if not np.all(np.isfinite(data)) or data[r, r] <= 0:
        raise InvalidExposureError(
            f"{f.name}: {_NOISECORR_NAME} needs finite values and a positive centre"
        )
    return data / data[r, r]


def _variance_plane(
    f, opened, index, variance, weight, noise, max_pixels, check_shape, set_plane, info
):
    """Variance from an argument or a same-file extension; (None, '') when none is given."""
    kind = spec = None
    for k, v in (("variance", variance), ("weight", weight), ("noise", noise)):
        if v is not None:
            kind, spec = k, v
    if kind is not None:
        data, _, text, other = _aux_plane(spec, f, kind, max_pixels)
        if other:
            opened.append(other)
    else:
        for k, names in (
            ("variance", _VARIANCE_NAMES),
            ("noise", _NOISE_NAMES),
            ("weight", _WEIGHT_NAMES),
        ):
            v_index = f.index_of(names)
            if v_index is not None and v_index != index and _is_image(f.hdul[v_index]):
                kind = k
                _check_pixels(f, v_index, kind, max_pixels)
                data = _load(f, v_index, kind)
                text = f"{f.hdul[v_index].name} extension (HDU {v_index})"
                break
        else:
            return None, ""
    # a plane file's text names its kind already ("noise file n.fits")
    label = text if text.startswith(kind) else f"{kind} {text}"
    if data.ndim != 2:
        raise InvalidExposureError(f"{f.name}: {label} is {data.ndim}-D, expected 2-D")
    check_shape(data, label)
    info.planes["VARIANCE"] = text if kind == "variance" else f"{text} as {kind}"
    if kind == "variance":
        # straight to float32: no float64 round trip of the whole plane
        return np.array(data, dtype=np.float32), text
    data = np.asarray(data, dtype=np.float64)
    usable = np.isfinite(data) & (data > 0)
    if not usable.any():
        # else every pixel is NO_DATA and the subtraction fails later, blaming the coverage
        what = "inverse-variance weight" if kind == "weight" else "1-sigma noise"
        raise InvalidExposureError(
            f"{f.name}: {label} has no positive finite pixel, so no pixel would have data; "
            f"give a {what} map, positive where the image has data"
        )
    set_plane("NO_DATA", ~usable)
    safe = np.where(usable, data, 1.0)
    result = 1.0 / safe if kind == "weight" else safe * safe
    fill = np.median(result[usable])
    result = np.where(usable, result, fill)
    label = "inverse of weight" if kind == "weight" else "square of 1-sigma noise"
    return result.astype(np.float32), f"{label}: {text}"


# ---------------------------------------------------------------------------- writing
def _card_round_trips(key: str, value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii() and value.isprintable() and value == value.rstrip()
    if isinstance(value, bool | int):
        return abs(int(value)) < 2**63
    if isinstance(value, float):
        if not math.isfinite(value):
            return False
        try:
            card = fits.Card(key, value)
            return fits.Card.fromstring(card.image).value == value
        except (ValueError, fits.VerifyError):
            return False
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _json_default(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, str | int | float | bool | list | dict) or value is None:
        return value
    return str(value)


def _psf_hdus(psf: Psf, exposure: Exposure) -> list:
    """PSF extension(s) for any PSF: exact parameters where the model has them."""
    header = fits.Header()
    if isinstance(psf, GaussianPsf | MoffatPsf):
        # constructor arguments, so the reader rebuilds the model exactly
        if isinstance(psf, GaussianPsf):
            header["PSFTYPE"] = "GAUSSIAN"
            params = {"sigma": psf.sigma_major}
        else:
            header["PSFTYPE"] = "MOFFAT"
            params = {"fwhm": psf.true_fwhm, "beta": psf.beta}
        params.update(ellipticity=psf.ellipticity, angle=psf.angle, size=psf.size)
        header["PSFPARS"] = json.dumps(params)
        data = psf.kernel_image()
    elif isinstance(psf, GridPsf):
        return _grid_hdus(psf.stamps, psf.x_nodes, psf.y_nodes)
    elif isinstance(psf, ImagePsf):
        header["PSFTYPE"] = "IMAGE"
        data = psf.stamp
        if psf.average_position is not None:
            header["PSFAVGX"], header["PSFAVGY"] = map(float, psf.average_position)
    else:
        # any other model: sampled on a grid fine enough for its blends (3 x 3 at least,
        # refined as photometry refines it); one stamp if it does not vary
        sampling = ForcedPhotometryConfig()
        draw = memo(psf.kernel_image)
        most, tolerance = sampling.psf_grid_refined_nodes, sampling.psf_blend_tolerance
        xs, ys = refined_nodes(psf, exposure.bbox, 3, 3, most, tolerance, draw=draw)
        stamps = _common_size([[draw(x, y) for x in xs] for y in ys])
        if np.allclose(stamps, stamps[1, 1], rtol=0, atol=1e-12):
            header["PSFTYPE"] = "IMAGE"
            data = stamps[1, 1]
            center = exposure.bbox_center()
            header["PSFAVGX"], header["PSFAVGY"] = map(float, center)
        else:
            return _grid_hdus(stamps, xs, ys)
    header["PSFFWHM"] = (round(psf.fwhm(), 6), "FWHM from adaptive moments, pixels")
    return [fits.ImageHDU(np.asarray(data, dtype=np.float64), header=header, name="PSF")]


def _common_size(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Stamps zero-padded about their centres to the largest (odd) size, as one array."""
    size = max(stamp.shape[0] for row in rows for stamp in row)
    out = np.zeros((len(rows), len(rows[0]), size, size))
    for j, row in enumerate(rows):
        for i, stamp in enumerate(row):
            pad = (size - stamp.shape[0]) // 2
            out[j, i, pad : size - pad, pad : size - pad] = stamp
    return out


def _grid_hdus(stamps, x_nodes, y_nodes) -> list:
    header = fits.Header()
    header["PSFTYPE"] = "GRID"
    header["COMMENT"] = "stamps[j, i] is the PSF at (x_nodes[i], y_nodes[j]); see PSF_NODES"
    cube = fits.ImageHDU(np.asarray(stamps, dtype=np.float64), header=header, name="PSF")
    nx, ny = len(x_nodes), len(y_nodes)
    columns = fits.ColDefs(
        [
            fits.Column(name="X_NODES", format=f"{nx}D", array=np.asarray([x_nodes], float)),
            fits.Column(name="Y_NODES", format=f"{ny}D", array=np.asarray([y_nodes], float)),
        ]
    )
    nodes = fits.BinTableHDU.from_columns(columns, name=_PSF_NODES_NAME)
    return [cube, nodes]


def exposure_to_hdulist(
    exposure: Exposure, extra_header: Mapping[str, Any] | fits.Header | None = None
) -> fits.HDUList:
    """The MEF layout of an exposure: primary (metadata), IMAGE, MASK, VARIANCE [, PSF]
    (`_exposure_hdus`, the planes copied into FITS's big-endian order).

    Parameters
    ----------
    exposure : `core.exposure.Exposure`
    extra_header : mapping or `astropy.io.fits.Header`, optional
        Extra cards for the primary header (e.g. provenance of a product).

    Returns
    -------
    `astropy.io.fits.HDUList`
        Metadata keywords that FITS cards cannot hold exactly (long or lower-case
        names, non-scalar or non-ASCII values, floats that would lose digits) go
        into one JSON card ``ALSUBMD`` with the band, calibration and variance
        source, so `read_exposure` restores them exactly.
    """
    hdus, planes = _exposure_hdus(exposure, extra_header)
    for index, array in planes.items():
        hdu = hdus[index]
        # copied straight to FITS's order: astropy writes native-order data by swapping
        # it in place and back, two more passes
        hdus[index] = fits.ImageHDU(array.astype(hdu.data.dtype), header=hdu.header)
    return fits.HDUList(hdus)


def _exposure_hdus(
    exposure: Exposure, extra_header: Mapping[str, Any] | fits.Header | None = None
) -> tuple[list, dict[int, np.ndarray]]:
    """The HDUs of `exposure_to_hdulist` with the three planes as data-less stand-ins of
    their shape and FITS type, and the planes by HDU index."""
    primary = fits.PrimaryHDU()
    header = primary.header
    json_meta: dict[str, Any] = {}
    for key, value in exposure.metadata.items():
        value = _plain(value)
        upper = str(key).upper()
        standard = (
            isinstance(key, str)
            and _STANDARD_KEY.match(key)
            and not _STRUCTURAL.match(upper)
            and not _WCS_KEYS.match(upper)
            and upper not in _RESERVED_KEYS
        )
        if standard and value is not None and _card_round_trips(key, value):
            header[key] = value
        else:
            json_meta[str(key)] = value
    if exposure.band is not None:
        header["BAND"] = str(exposure.band)
    if exposure.photo_calib is not None:
        header["PHOTCAL"] = (exposure.photo_calib.calibration, "nJy per image count")
    alsub = {
        "metadata": json_meta,
        "band": exposure.band,
        "photo_calib": exposure.photo_calib.calibration if exposure.photo_calib else None,
        "variance_source": exposure.variance_source,
    }
    header[_ALSUB_JSON_KEY] = json.dumps(alsub, default=_json_default)
    if extra_header is not None:
        if isinstance(extra_header, fits.Header):
            # update, not append: a key already set from the metadata is replaced
            header.update(extra_header)
        else:
            for key, value in extra_header.items():
                header[key if len(key) <= 8 else f"HIERARCH {key}"] = _plain(value)

    image_header = fits.Header()
    if exposure.wcs is not None:
        image_header.update(exposure.wcs.to_header(relax=True))
    x0, y0 = exposure.xy0
    # Rubin-style physical ("A") WCS carries xy0; LTV for IRAF/ds9
    image_header["CTYPE1A"], image_header["CTYPE2A"] = "LINEAR", "LINEAR"
    image_header["CRPIX1A"], image_header["CRPIX2A"] = 1.0, 1.0
    image_header["CRVAL1A"], image_header["CRVAL2A"] = float(x0), float(y0)
    image_header["CUNIT1A"], image_header["CUNIT2A"] = "PIXEL", "PIXEL"
    image_header["WCSNAMEA"] = "PHYSICAL"
    image_header["LTV1"], image_header["LTV2"] = -float(x0), -float(y0)
    # astropy's CCDData/NDData readers take the unit from BUNIT of the data HDU and the
    # uncertainty's kind from UTYPE of its HDU (see `to_ccddata` for the documented call).
    unit = image_unit(exposure)
    image_header["BUNIT"] = (_unit_card(unit), "unit of IMAGE")  # `bunit_card`'s value
    mask_header = fits.Header()
    for plane, bit in sorted(exposure.mask_planes.as_dict().items(), key=lambda kv: kv[1]):
        mask_header[f"HIERARCH MP_{plane}"] = bit

    variance_header = fits.Header()
    source = exposure.variance_source
    if source.isascii() and source.isprintable():
        variance_header["VARSRC"] = source
    variance_header["BUNIT"] = (_unit_card(unit**2), "unit of VARIANCE")
    variance_header["UTYPE"] = ("VarianceUncertainty", "astropy uncertainty class")
    planes = [
        (exposure.image, ">f4", image_header, "IMAGE"),
        (exposure.mask, ">i4", mask_header, "MASK"),
        (exposure.variance, ">f4", variance_header, "VARIANCE"),
    ]
    hdus: list = [primary]
    for array, dtype, plane_header, name in planes:
        # the data is the plane's shape in FITS order but holds no memory: `_write_hdus`
        # streams the plane itself, `exposure_to_hdulist` puts in a copy
        stand_in = np.broadcast_to(np.zeros((), dtype), array.shape)
        hdus.append(fits.ImageHDU(stand_in, header=plane_header, name=name))
    if exposure.psf is not None:
        hdus.extend(_psf_hdus(exposure.psf, exposure))
    if exposure.noise_correlation is not None:
        hdus.append(_noise_correlation_hdu(exposure.noise_correlation))
    return hdus, {1: exposure.image, 2: exposure.mask, 3: exposure.variance}


def _write_hdus(hdus: list, planes: Mapping[int, np.ndarray], handle: BinaryIO) -> None:
    """Write ``hdus`` as one FITS file; HDU ``i`` in ``planes`` gets the data of
    ``planes[i]`` (any byte order) in its own data type, converted a block of rows at a
    time into one reused buffer.

    A converted copy of each plane (`exposure_to_hdulist`) is fresh memory, and on a
    VM that hands freed pages back to its host first touching it costs more than the
    conversion: the first write of a 4096^2 difference in a process took 0.67-0.88 s
    with whole copies, 0.25-0.35 s so.
    """
    buffer = None
    for index, hdu in enumerate(hdus):
        if index not in planes:
            handle.write(_hdu_bytes(hdu, primary=index == 0))
            continue
        handle.write(hdu.header.tostring().encode("ascii"))
        array, dtype = planes[index], hdu.data.dtype
        rows = max(1, _WRITE_BLOCK_BYTES // max(1, array.shape[1] * dtype.itemsize))
        if buffer is None or buffer.nbytes < rows * array.shape[1] * dtype.itemsize:
            buffer = np.empty(rows * array.shape[1] * dtype.itemsize, dtype=np.uint8)
        for start in range(0, array.shape[0], rows):
            part = array[start : start + rows]
            block = buffer[: part.size * dtype.itemsize].view(dtype).reshape(part.shape)
            np.copyto(block, part, casting="unsafe")
            handle.write(memoryview(block).cast("B"))
        handle.write(bytes(-(array.size * dtype.itemsize) % _FITS_BLOCK))


#: Bytes per plane block converted for writing (a few MB: stays in the caches' reach).
_WRITE_BLOCK_BYTES = 1 << 22
#: FITS record length: headers and data are padded to a multiple of it.
_FITS_BLOCK = 2880


def _hdu_bytes(hdu, primary: bool) -> bytes:
    """The bytes of one small HDU as astropy writes it (header and padded data)."""
    buffer = io.BytesIO()
    if primary:
        fits.HDUList([hdu]).writeto(buffer)
        return buffer.getvalue()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buffer)
    return buffer.getvalue()[_FITS_BLOCK:]  # an empty primary header is one record


def _noise_correlation_hdu(correlation: np.ndarray):
    """NOISECORR: the normalised noise autocorrelation, lag (0, 0) at the centre pixel.

    Without it a warped template read back would look white to the decorrelation and
    the difference's variance plane would not be honest.
    """
    header = fits.Header()
    header["COMMENT"] = "normalised autocorrelation of the pixel noise (e.g. after resampling)"
    header["COMMENT"] = "element [r + dy, r + dx] is the correlation at lag (dx, dy); centre 1"
    return fits.ImageHDU(
        np.asarray(correlation, dtype=np.float64), header=header, name=_NOISECORR_NAME
    )


def exposure_to_bytes(
    exposure: Exposure, extra_header: Mapping[str, Any] | fits.Header | None = None
) -> bytes:
    """The MEF file of `exposure_to_hdulist` as bytes (for HTTP responses and stores)."""
    buffer = io.BytesIO()
    exposure_to_hdulist(exposure, extra_header).writeto(buffer)
    return buffer.getvalue()


def file_mode() -> int:
    """Permission bits of a newly created product file: ``0o666`` less the process umask.

    Temporary files are created 0600; every product gets this mode before its
    rename, so all products of a run share one mode, as ``open()`` would give.
    """
    try:
        with open("/proc/self/status") as status:  # Linux: reading it leaves the umask alone
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return 0o666 & ~mask


def write_hdulist_atomic(
    hdulist: fits.HDUList, path: str | os.PathLike, overwrite: bool = True
) -> Path:
    """Write an HDU list so that ``path`` is either the complete new file or untouched.

    The file is written to a temporary name in the same directory, flushed to
    disk, then renamed over ``path`` (`os.replace` is atomic on one filesystem).

    Parameters
    ----------
    hdulist : `astropy.io.fits.HDUList`
    path : str or `os.PathLike`
    overwrite : bool
        If False and ``path`` exists, raise `FileExistsError`.

    Returns
    -------
    `pathlib.Path`
        The path written.
    """
    return _write_atomic(hdulist.writeto, path, overwrite)


def _write_atomic(write: Callable[[BinaryIO], object], path, overwrite: bool) -> Path:
    """`write_hdulist_atomic` of what ``write(handle)`` writes."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists and overwrite is False")
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return path


def write_exposure(
    exposure: Exposure,
    path: str | os.PathLike,
    *,
    extra_header: Mapping[str, Any] | fits.Header | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an exposure in the MEF layout (atomically; see `write_hdulist_atomic`).

    Parameters
    ----------
    exposure : `core.exposure.Exposure`
    path : str or `os.PathLike`
    extra_header : mapping or `astropy.io.fits.Header`, optional
        Extra primary-header cards.
    overwrite : bool
        Replace an existing file (default True).

    Returns
    -------
    `pathlib.Path`
    """
    hdus, planes = _exposure_hdus(exposure, extra_header)
    return _write_atomic(partial(_write_hdus, hdus, planes), path, overwrite)


# --------------------------------------------------------------------------- astropy
#: Unit of an image whose header names none: raw detector counts.
_DEFAULT_UNIT = "adu"


def image_unit(exposure: Exposure) -> Any:
    """The astropy unit of ``exposure.image``: its BUNIT when astropy understands it, else adu.

    Parameters
    ----------
    exposure : `core.exposure.Exposure`

    Returns
    -------
    `astropy.units.UnitBase`
    """
    from astropy import units as u

    text = next((v for k, v in exposure.metadata.items() if str(k).upper() == "BUNIT"), None)
    if isinstance(text, str) and text.strip():
        # FITS writes ADU upper case; astropy spells it adu
        text = text.strip().lower() if text.strip().lower() == "adu" else text.strip()
        unit = u.Unit(text, parse_strict="silent")
        if isinstance(unit, u.UnrecognizedUnit):
            # common invalid spellings ("ELECTRONS/S") mapped as CCDData's reader maps
            # them; none of them parses, so they are looked up only then (astropy.nddata
            # costs 30 ms to import, in every run)
            from astropy.nddata import CCDData

            mapped = CCDData.known_invalid_fits_unit_strings.get(text)
            unit = mapped if mapped is not None else unit
        if not isinstance(unit, u.UnrecognizedUnit):
            return unit
    return u.Unit(_DEFAULT_UNIT)


def bunit_card(exposure: Exposure) -> str:
    """The BUNIT the products give ``exposure``'s pixels (`image_unit`, FITS spelling):
    an image and a catalog measured on it say the same unit."""
    return _unit_card(image_unit(exposure))


def _unit_card(unit: Any) -> str:
    """BUNIT text: the FITS spelling where the standard has the unit, else astropy's."""
    try:
        return unit.to_string(format="fits") or ""
    except ValueError:  # e.g. electron, not a FITS-standard unit; astropy reads it back
        return unit.to_string()


def to_ccddata(exposure: Exposure, mask_planes: list[str] | None = None) -> Any:
    """The exposure as an `astropy.nddata.CCDData` (image, variance, boolean mask, WCS).

    The same as reading a file alsub wrote with
    ``CCDData.read(path, hdu="IMAGE", hdu_uncertainty="VARIANCE", hdu_mask="MASK")``.

    Parameters
    ----------
    exposure : `core.exposure.Exposure`
    mask_planes : list of str, optional
        Planes whose pixels are True in the mask; default every plane (mask != 0).

    Returns
    -------
    `astropy.nddata.CCDData`
        ``uncertainty`` a `~astropy.nddata.VarianceUncertainty`; ``mask`` boolean, as
        astropy expects (the named bits are not kept: use the exposure for those);
        ``meta`` the metadata that fits in FITS cards.
    """
    from astropy.nddata import CCDData, VarianceUncertainty

    if mask_planes is None:
        mask = exposure.mask != 0
    else:
        mask = (exposure.mask & exposure.mask_planes.get_bitmask(mask_planes)) != 0
    meta = fits.Header()
    for key, value in exposure.metadata.items():
        if _STANDARD_KEY.match(str(key)) and _card_round_trips(str(key), _plain(value)):
            meta[str(key)] = _plain(value)
    unit = image_unit(exposure)
    return CCDData(
        exposure.image.copy(),
        unit=unit,
        uncertainty=VarianceUncertainty(exposure.variance.copy(), unit=unit**2),
        mask=mask,
        wcs=exposure.wcs,
        meta=meta,
    )


def from_ccddata(ccd: Any, psf: Psf | None = None) -> Exposure:
    """An exposure from an `astropy.nddata.CCDData` (or any NDData with a unit).

    Parameters
    ----------
    ccd : `astropy.nddata.CCDData`
        Its uncertainty may be a standard deviation, a variance or an inverse
        variance; without one the variance is estimated as `read_exposure` does.
        A boolean mask (CCDData's are always boolean) becomes the BAD plane; the
        integer mask of a plain NDData keeps its bits, named by ``MP_<NAME>`` cards
        in ``meta`` when it has them.
    psf : `core.psf.Psf`, optional

    Returns
    -------
    `core.exposure.Exposure`

    Raises
    ------
    InvalidExposureError
        Not 2-D, or planes of different shapes.
    """
    from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

    image = np.asarray(ccd.data, dtype=np.float32)
    if image.ndim != 2:
        raise InvalidExposureError(f"CCDData is {image.ndim}-D, expected 2-D")
    header = fits.Header(dict(ccd.meta)) if not isinstance(ccd.meta, fits.Header) else ccd.meta
    variance: np.ndarray | None = None
    unc = ccd.uncertainty
    if unc is not None:
        array = np.asarray(unc.array, dtype=np.float64)
        if isinstance(unc, VarianceUncertainty):
            variance = array
        elif isinstance(unc, InverseVariance):
            with np.errstate(divide="ignore"):
                variance = np.where(array > 0, 1.0 / array, np.inf)
        elif isinstance(unc, StdDevUncertainty):
            variance = array**2
        else:
            raise InvalidExposureError(f"CCDData uncertainty {type(unc).__name__} not supported")
    hdus = [fits.PrimaryHDU(header=_ccd_header(header, ccd))]
    hdus.append(fits.ImageHDU(image, header=_ccd_wcs_header(ccd), name="IMAGE"))
    if ccd.mask is not None:
        mask = np.asarray(ccd.mask)
        mask_header = fits.Header()
        if mask.dtype != np.bool_:  # an integer mask keeps its named bits
            for card in header.cards:
                if str(card.keyword).upper().startswith("MP_"):
                    mask_header[f"HIERARCH {card.keyword}"] = card.value
        # a boolean mask is bit 0, which Rubin's layout (the default) names BAD
        hdus.append(fits.ImageHDU(mask.astype(np.int32), header=mask_header, name="MASK"))
    if variance is not None:
        hdus.append(fits.ImageHDU(variance.astype(np.float32), name="VARIANCE"))
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return read_exposure(buffer.getvalue(), psf=psf, name="CCDData")


def _ccd_header(meta: fits.Header, ccd: Any) -> fits.Header:
    """Primary header of the in-memory MEF: the metadata cards and the unit."""
    header = fits.Header()
    for card in meta.cards:
        key = str(card.keyword).upper()
        if key.startswith("MP_") or _STRUCTURAL.match(key) or _WCS_KEYS.match(key):
            continue
        header.append(card)
    if ccd.unit is not None:
        header["BUNIT"] = _unit_card(ccd.unit)
    return header


def _ccd_wcs_header(ccd: Any) -> fits.Header:
    return ccd.wcs.to_header(relax=True) if ccd.wcs is not None else fits.Header()


# --------------------------------------------------------------------------- describe
_INFO_KEYS = (
    "EXPTIME",
    "GAIN",
    "RDNOISE",
    "SATURATE",
    "FILTER",
    "MJD-OBS",
    "DATE-OBS",
    "BUNIT",
    "TELESCOP",
    "INSTRUME",
    "OBJECT",
    "AIRMASS",
    "FWHM",
    "SEEING",
    "PFWHM",
)


def _ctypes(wcs) -> list[str]:
    """The axis types as a header would give them: astropy holds a TPV projection as TAN
    plus its distortion (DECam frames read RA---TAN), its header writes TPV again."""
    header = wcs.to_header(relax=True)
    return [str(header.get(f"CTYPE{i + 1}", c)) for i, c in enumerate(wcs.wcs.ctype)]


def _json_number(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


#: Pixels (a regular sub-grid) behind `describe_exposure`'s sky medians.
_DESCRIBE_MAX_PIXELS = 1 << 20


def describe_exposure(source: Source, **kwargs: Any) -> dict[str, Any]:
    """Summary of an exposure file for ``alsub info`` (JSON-serialisable).

    Parameters
    ----------
    source : str, `os.PathLike`, bytes or binary file object
    **kwargs
        Passed to `read_exposure` (variance=, mask=, psf=, ...).

    Returns
    -------
    dict
        ``file``, ``shape`` [ny, nx], ``xy0``, ``planes`` (where IMAGE, VARIANCE,
        MASK and PSF came from), ``variance_source``, ``psf`` (type, stamp size,
        FWHM in pixels, or None), ``wcs`` (present, centre RA/Dec, pixel scale),
        ``mask_planes`` (pixel count per plane), ``band``, ``zero_point``,
        ``saturation``, ``sky`` (medians of the good pixels' image and variance, on a
        regular sub-grid of at most 2**20 pixels) and ``header`` (key keywords).
    """
    exposure, info = _read(
        source,
        variance=kwargs.pop("variance", None),
        weight=kwargs.pop("weight", None),
        noise=kwargs.pop("noise", None),
        mask=kwargs.pop("mask", None),
        psf=kwargs.pop("psf", None),
        hdu=kwargs.pop("hdu", None),
        saturation=kwargs.pop("saturation", None),
        gain=kwargs.pop("gain", None),
        max_pixels=kwargs.pop("max_pixels", DEFAULT_MAX_PIXELS),
        name=kwargs.pop("name", None),
    )
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
    planes = {p: info.planes.get(p) for p in ("IMAGE", "VARIANCE", "MASK", "PSF")}
    psf_info = None
    if exposure.psf is not None:
        try:
            fwhm = _json_number(exposure.psf.fwhm(), 4)
        except PsfError:
            fwhm = None
        psf_info = {
            "type": type(exposure.psf).__name__,
            "size": int(exposure.psf.kernel_image().shape[0]),
            "fwhm_pixels": fwhm,
        }
    wcs_info: dict[str, Any] = {"present": exposure.wcs is not None}
    if exposure.wcs is not None:
        ny, nx = exposure.shape
        ra, dec = pixel_to_radec(exposure.wcs, (nx - 1) / 2.0, (ny - 1) / 2.0)
        scales = np.abs(proj_plane_pixel_scales(exposure.wcs.celestial))  # degrees
        wcs_info.update(
            center_ra=_json_number(float(ra), 10),
            center_dec=_json_number(float(dec), 10),
            pixel_scale_arcsec=_json_number(float(np.mean(scales)) * 3600, 5),
            ctype=_ctypes(exposure.wcs),
        )
    # the sky figures describe, they do not measure: a regular sub-grid of at most
    # `_DESCRIBE_MAX_PIXELS` gives the medians to ~1e-3 sigma at a fraction of the sort
    # (the service describes every upload: 0.3 s per 4096^2 frame on the whole frame)
    stride = max(1, math.ceil(math.sqrt(exposure.image.size / _DESCRIBE_MAX_PIXELS)))
    sub = np.s_[::stride, ::stride]
    good = exposure.mask[sub] == 0
    header = {k: _plain(exposure.metadata[k]) for k in _INFO_KEYS if k in exposure.metadata}
    return {
        "file": _source_name(source, None),
        "shape": [int(exposure.height), int(exposure.width)],
        "xy0": list(exposure.xy0),
        "file_dtype": info.dtype,
        "planes": planes,
        "variance_source": exposure.variance_source,
        "psf": psf_info,
        "wcs": wcs_info,
        "mask_planes": exposure.plane_counts(),
        "band": exposure.band,
        "zero_point": _json_number(exposure.photo_calib.zero_point, 6)
        if exposure.photo_calib
        else None,
        "saturation": info.saturation,
        "sky": {
            "median": _json_number(
                float(order.median(exposure.image[sub][good], consume=True)) if good.any() else None
            ),
            "median_sigma_from_variance": _json_number(
                float(np.sqrt(order.median(exposure.variance[sub][good], consume=True)))
                if good.any()
                else None
            ),
        },
        "header": {
            k: (v if isinstance(v, str | int | float | bool) else str(v)) for k, v in header.items()
        },
    }
