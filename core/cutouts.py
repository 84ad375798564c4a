"""Alert cutouts: science, matched template and difference stamps around DIA sources.

As in ZTF and Rubin alert packets, each DIA source gets a triplet of stamps
centred on its pixel: a FITS file of three image HDUs (SCIENCE, TEMPLATE,
DIFFERENCE, each with its WCS, unit and its own image's epoch) and a MASK HDU
(the product's mask bits, invalid pixels of any stamp), and a PNG of the three side
by side for dashboards. Stamps of all sources are gathered at once (core.stamps, NaN
beyond the frame); a stamp's WCS is the frame's with CRPIX moved to the stamp's
origin, the same as slicing the WCS.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .display import BLANK_PLANES, blanked, png_bytes
from .epoch import full_epoch
from .errors import InvalidConfigError
from .exposure import MaskPlanes
from .io import mask_planes
from .parallel import frame_array, thread_map
from .stamps import stamps

__all__ = [
    "TRIPLET",
    "TRIPLET_PANEL",
    "Cutouts",
    "cutouts",
    "result_images",
    "result_masks",
    "product_blank",
    "product_mask",
    "source_header",
    "triplet_fits",
    "triplet_png",
    "triplet_from_files",
]

#: HDU names of a triplet, in order.
TRIPLET = ("SCIENCE", "TEMPLATE", "DIFFERENCE")

#: Cards of an image's own epoch that its stamps carry (from the image's metadata or
#: its product's primary header).
EPOCH_KEYS = ("MJD-OBS", "DATE-OBS")
#: Epoch cards astropy's WCS writes. The matched template lies on the science grid
#: and its WCS is the science's, epoch included: given an image's own cards, a stamp
#: keeps none of these from the WCS (the TEMPLATE stamp said the science's MJD-OBS).
_WCS_EPOCH_KEYS: tuple[str, ...] = ("MJD-OBS", "DATE-OBS", "MJD-BEG", "DATE-BEG", "MJD-AVG")
_WCS_EPOCH_KEYS += ("DATE-AVG", "MJD-END", "DATE-END")


@dataclass
class Cutouts:
    """Stamps of several sources in several images.

    Attributes
    ----------
    stamps : dict
        Image name -> `numpy.ndarray` (n, size, size), float32, NaN off the frame.
    origin : `numpy.ndarray` (n, 2), int
        Array column and row of each stamp's pixel [0, 0] in the frame.
    headers : dict
        Image name -> the frame's WCS as a FITS header with the image's own cards
        (BUNIT, PRODUCT, MJD-OBS, DATE-OBS where known), or None without either.
    blank : dict
        Image name -> (n, size, size) bool, the stamp pixels a picture leaves blank
        (`core.display.BLANK_PLANES` of the product's mask); images without one: none.
    masks : dict
        Image name -> ((n, size, size) int32 mask stamps, `core.exposure.MaskPlanes`),
        for images whose mask planes are named; off the frame NO_DATA.
    """

    stamps: dict[str, np.ndarray]
    origin: np.ndarray
    headers: dict[str, fits.Header | None]
    blank: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, tuple[np.ndarray, MaskPlanes]] = field(default_factory=dict)

    def header(self, name: str, k: int) -> fits.Header:
        """FITS header with the WCS (and BUNIT) of stamp ``k`` of image ``name`` (empty
        without either)."""
        base = self.headers.get(name)
        if base is None:
            return fits.Header()
        header = base.copy()
        if "CRPIX1" in base:  # a WCS (a header of BUNIT alone has none)
            # a stamp starting at column x0 sees reference pixel CRPIX1 - x0 (slicing a WCS)
            header["CRPIX1"] = base.get("CRPIX1", 0.0) - float(self.origin[k, 0])
            header["CRPIX2"] = base.get("CRPIX2", 0.0) - float(self.origin[k, 1])
        return header

    def mask(self, k: int) -> tuple[np.ndarray, MaskPlanes] | None:
        """Stamp ``k`` of every image's mask ORed into one, bits mapped by plane name onto
        the last image's (the difference's, itself the OR of both inputs' masks); None
        without named masks. A pixel is invalid in some stamp where it has a bit of
        `core.display.BLANK_PLANES` (NO_DATA also off the frame)."""
        if not self.masks:
            return None
        *_, (last, planes) = self.masks.values()
        planes = planes.copy()
        out = np.array(last[k], dtype=np.int32)
        for stack, other in list(self.masks.values())[:-1]:
            for name, bit in other.as_dict().items():
                target = planes.bit(name)
                out |= ((stack[k] >> np.int32(bit)) & np.int32(1)) << np.int32(target)
        return out, planes


def _gather(data: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """(n, 2 half + 1, 2 half + 1) float32 stamps, NaN off the frame. Stamps wholly on
    the frame are sliced one by one: for cutout-sized stamps a slice copy per stamp is
    ~2x faster than one fancy-indexed gather (whose cost is per row of every stamp)."""
    ny, nx = data.shape
    size = 2 * half + 1
    # every stamp is written whole: on huge pages, the first writes of a large stack
    # fault once per 2 MB instead of once per 4 kB
    out = frame_array((ix.size, size, size), np.float32)
    inside = (ix >= half) & (iy >= half) & (ix < nx - half) & (iy < ny - half)
    whole = np.flatnonzero(inside)
    corners = (whole.tolist(), (iy[whole] - half).tolist(), (ix[whole] - half).tolist())
    for k, y, x in zip(*corners, strict=True):
        out[k] = data[y : y + size, x : x + size]
    edge = np.flatnonzero(~inside)
    if edge.size:
        out[edge] = _gather_edge(data, ix[edge], iy[edge], half)
    return out


def _gather_edge(data: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating):
        return stamps(data, ix, iy, half, fill=np.nan).astype(np.float32, copy=False)
    out = stamps(data, ix, iy, half).astype(np.float32)
    out[_off_frame(data.shape, ix, iy, half)] = np.nan
    return out


def cutouts(
    images: Mapping[str, tuple],
    x,
    y,
    size: int,
    masks: Mapping[str, tuple] | None = None,
) -> Cutouts:
    """Stamps of ``size`` x ``size`` px (odd) centred on the pixels nearest (x, y).

    Parameters
    ----------
    images : mapping
        Name (e.g. `TRIPLET`) -> (image (ny, nx), WCS or None[, cards]), one pixel grid.
        ``cards``, a mapping of header cards (BUNIT, PRODUCT, MJD-OBS, DATE-OBS, ...),
        go on the image's stamps; given, they replace the WCS's epoch cards (only the
        image's own epoch is stated: its MJD-OBS and DATE-OBS among the cards, else none).
    x, y : array-like (n,)
        0-based columns and rows of the sources.
    size : int
        Odd stamp side, so the source's pixel is the centre pixel.
    masks : mapping, optional
        Name -> (integer mask (ny, nx), planes): ``planes`` a mapping of plane name to
        bit (`core.exposure.MaskPlanes.as_dict`), whose `core.display.BLANK_PLANES`
        pictures leave blank (`Cutouts.blank`) and `triplet_fits` writes as its MASK
        HDU (`Cutouts.mask`); or (mask, bits), an int of the bits to leave blank only.

    Raises
    ------
    InvalidConfigError
        Even or non-positive size, or a centre outside the frame.
    """
    if size < 1 or size % 2 == 0:
        raise InvalidConfigError(f"cutout size must be a positive odd number, got {size}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    ix = np.floor(x + 0.5).astype(int)
    iy = np.floor(y + 0.5).astype(int)
    half = size // 2
    for data, *_ in images.values():
        ny, nx = data.shape
        if np.any((ix < 0) | (ix >= nx) | (iy < 0) | (iy >= ny)):
            raise InvalidConfigError(f"a cutout centre is outside the {nx}x{ny} image")
    # the images on the thread pool: their stamps' copies and first writes release the GIL
    names = list(images)
    stacks = thread_map(lambda name: _gather(images[name][0], ix, iy, half), names)
    by_name = dict(zip(names, stacks, strict=True))
    headers = {name: _stamp_header(*spec[1:]) for name, spec in images.items()}
    blank, named = {}, {}
    for name, (mask, planes) in (masks or {}).items():
        if isinstance(planes, Mapping | MaskPlanes):
            given = planes.as_dict() if isinstance(planes, MaskPlanes) else dict(planes)
            planes = MaskPlanes(given)
            # the stamps' rows only, then int32 (a file's mask is big-endian, memory-mapped)
            stack = stamps(mask, ix, iy, half).astype(np.int32)
            stack[_off_frame(mask.shape, ix, iy, half)] |= np.int32(planes.value("NO_DATA"))
            named[name] = (stack, planes)
            bits = planes.get_bitmask(BLANK_PLANES)
        else:
            stack, bits = stamps(mask, ix, iy, half), int(planes)
        if bits:
            blank[name] = (stack & np.int64(bits)) != 0
    return Cutouts(by_name, np.column_stack([ix - half, iy - half]), headers, blank, named)


def _stamp_header(wcs: WCS | None, cards: Mapping | None = None) -> fits.Header | None:
    """The frame's WCS header with an image's own ``cards``; None without either."""
    if wcs is None and not cards:
        return None
    header = wcs.to_header(relax=True) if wcs is not None else fits.Header()
    if cards is not None:
        for key in _WCS_EPOCH_KEYS:
            header.remove(key, ignore_missing=True)
        for key, value in cards.items():
            if value is not None:
                header[key] = value
    return header


def _off_frame(shape: tuple[int, ...], ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """(n, size, size) bool: stamp pixels beyond a frame of ``shape``."""
    ny, nx = shape
    offsets = np.arange(-half, half + 1)
    rows = ((iy[:, None] + offsets) >= 0) & ((iy[:, None] + offsets) < ny)
    cols = ((ix[:, None] + offsets) >= 0) & ((ix[:, None] + offsets) < nx)
    return ~(rows[:, :, None] & cols[:, None, :])


def result_images(result) -> dict[str, tuple[np.ndarray, WCS | None, dict]]:
    """`TRIPLET` name -> (image, WCS, cards) of a `core.subtract.SubtractionResult`: the
    matched science, the matched template and the difference (or score), each with the
    cards its product file gives its stamps (BUNIT, PRODUCT, its own MJD-OBS, DATE-OBS)."""
    from .io import bunit_card

    names = ("matched_science", "matched_template", result.output_name)
    return {
        name: (e.image, e.wcs, {"BUNIT": bunit_card(e), **_product_card(product), **_epoch(e)})
        for (name, e), product in zip(_triplet(result).items(), names, strict=True)
    }


def result_masks(result) -> dict[str, tuple[np.ndarray, dict[str, int]]]:
    """`cutouts`' ``masks`` of the same images (`result_images`): each one's mask and its
    planes, so that its pictures leave its `core.display.BLANK_PLANES` blank and its
    FITS triplet carries the MASK HDU, as those cut from the product files do."""
    return {name: (e.mask, e.mask_planes.as_dict()) for name, e in _triplet(result).items()}


def _product_card(product: str) -> dict:
    # the third stamp of a preconvolve job is its score, not a difference
    return {"PRODUCT": (product, "product the stamp is cut from")}


def _epoch(exposure) -> dict:
    """An exposure's own MJD-OBS and DATE-OBS, where its metadata has them."""
    upper = {str(k).upper(): v for k, v in exposure.metadata.items()}
    return full_epoch(upper.get("MJD-OBS"), upper.get("DATE-OBS"))


def product_blank(hdul: fits.HDUList, shape: tuple[int, ...]) -> tuple[np.ndarray, int] | None:
    """A product file's ``MASK`` plane of its image's ``shape`` and the bits of its
    `core.display.BLANK_PLANES` (pictures leave those pixels blank); None without one."""
    found = product_mask(hdul, shape)
    if found is None:
        return None
    mask, planes = found
    return mask, planes.get_bitmask(BLANK_PLANES)


def product_mask(
    hdul: fits.HDUList, shape: tuple[int, ...]
) -> tuple[np.ndarray, MaskPlanes] | None:
    """A product file's ``MASK`` plane of its image's ``shape`` and its planes (its
    ``MP_<NAME>`` cards, else the default ones); None without one."""
    mask = next((h for h in hdul if h.name == "MASK" and h.is_image and h.shape == shape), None)
    if mask is None:
        return None
    return mask.data, mask_planes(mask.header)


def _triplet(result) -> dict:
    exposures = (result.matched_science, result.matched_template, result.output)
    return dict(zip(TRIPLET, exposures, strict=True))


def triplet_fits(cut: Cutouts, k: int = 0, header: Mapping | None = None) -> bytes:
    """FITS bytes of source ``k``: empty primary HDU (``header`` cards, e.g.
    `source_header`), one image HDU per image, named as in ``cut.stamps``, with the
    stamp's WCS and cards, and with named masks a ``MASK`` HDU (`Cutouts.mask`).

    The stamps keep the values of pixels without a difference (the EDGE band, NO_DATA
    where the template has no coverage), as the products do; MASK says which they are,
    int32 with the products' ``MP_<NAME>`` bit cards: a pixel is usable in every stamp
    where ``MASK & (NO_DATA | EDGE)`` is 0 (off the frame: NO_DATA, and NaN).
    """
    primary = fits.PrimaryHDU()
    for key, value in (header or {}).items():
        primary.header[key] = value
    hdus: list = [primary]
    for name, stack in cut.stamps.items():
        hdus.append(fits.ImageHDU(stack[k], header=cut.header(name, k), name=name))
    combined = cut.mask(k)
    if combined is not None:
        mask, planes = combined
        cards = fits.Header()
        for plane, bit in sorted(planes.as_dict().items(), key=lambda kv: kv[1]):
            cards[f"HIERARCH MP_{plane}"] = bit
        # one plane for the triplet, as an alert consumer masks one stamp grid
        cards["COMMENT"] = "OR of the stamps' masks; off the frame NO_DATA"
        hdus.append(fits.ImageHDU(mask, header=cards, name="MASK"))
    buffer = io.BytesIO()
    # the headers are built here, not read: nothing to verify
    fits.HDUList(hdus).writeto(buffer, output_verify="ignore")
    return buffer.getvalue()


#: Catalog meta -> primary card of a triplet (the science exposure's, `core.diasources`).
_SOURCE_META = {
    "mjd_obs": ("MJD-OBS", "start of the science exposure (MJD)"),
    "date_obs": ("DATE-OBS", "start of the science exposure"),
    "band": ("FILTER", "filter of the science exposure"),
}


def source_header(row, meta: Mapping | None = None) -> dict:
    """Primary-header cards of a DIA source's triplet (`triplet_fits`' ``header``).

    Parameters
    ----------
    row : `astropy.table.Row`
        The source's catalog row: its ``id``, ``x``, ``y`` and, where finite, ``ra``
        and ``dec`` become DIASRCID, X, Y, RA, DEC.
    meta : mapping, optional
        The catalog's meta: the science's ``mjd_obs``, ``date_obs`` and ``band`` become
        MJD-OBS, DATE-OBS (either one giving the other) and FILTER where known.

    Returns
    -------
    dict
        Keyword -> (value, comment).
    """
    cards = {
        "DIASRCID": (int(row["id"]), "DIA source id in the catalog"),
        "X": (float(row["x"]), "column of the source, 0-based (science array)"),
        "Y": (float(row["y"]), "row of the source, 0-based (science array)"),
    }
    sky = (("ra", "RA", "right ascension (deg)"), ("dec", "DEC", "declination (deg)"))
    for column, key, comment in sky:
        value = float(row[column]) if column in row.colnames else np.nan
        if np.isfinite(value):
            cards[key] = (value, comment)
    meta = meta or {}
    # the epoch complete, as each stamp's: DATE-OBS from MJD-OBS or the other way round
    given = full_epoch(meta.get("mjd_obs"), meta.get("date_obs"))
    known = {**meta, "mjd_obs": given.get("MJD-OBS"), "date_obs": given.get("DATE-OBS")}
    for name, (key, comment) in _SOURCE_META.items():
        card = known.get(name)
        if card is not None and not (isinstance(card, float) and not np.isfinite(card)):
            cards[key] = (card, comment)
    return cards


#: Smallest panel (px) of a triplet PNG: a 63 px stamp drawn pixel for pixel is a
#: thumbnail on a dashboard; whole-pixel zoom keeps each pixel a visible square.
TRIPLET_PANEL = 180


def triplet_png(cut: Cutouts, k: int = 0) -> bytes:
    """PNG of source ``k``'s stamps side by side (science, template, difference), each
    stretched on its own, enlarged to `TRIPLET_PANEL` and labelled with its name; pixels
    in `Cutouts.blank` drawn blank."""
    blank = cut.blank
    return png_bytes(
        [
            blanked(stack[k], blank[name][k] if name in blank else None)
            for name, stack in cut.stamps.items()
        ],
        labels=[_label(cut, name) for name in cut.stamps],
        min_panel=TRIPLET_PANEL,
    )


def _label(cut: Cutouts, name: str) -> str:
    """A panel's label: its name, or "score" for a score cut where a difference goes."""
    header = cut.headers.get(name)
    return "score" if header is not None and header.get("PRODUCT") == "score" else name.lower()


def triplet_from_files(paths: Mapping[str, Path], x, y, size: int) -> Cutouts:
    """`cutouts` from product files, reading only the stamps' rows (memory map).

    Parameters
    ----------
    paths : mapping
        Name -> product file (matched science, matched template, difference or
        score); the image is the MEF ``IMAGE`` HDU, else the first 2-D image HDU.
    x, y : array-like (n,)
        0-based columns and rows.
    size : int
        Odd stamp side.

    A product's ``MASK`` HDU marks the pixels its pictures leave blank (`Cutouts.blank`)
    and goes into the triplet's MASK (`Cutouts.mask`). Each image's stamps carry its
    product's BUNIT, PRODUCT (the file's stem) and its own epoch (`EPOCH_KEYS` of an
    alsub product's primary header, else of the image's HDU; a matched template's WCS
    is the science's, epoch included).
    """
    parts = []
    for name, path in paths.items():
        with fits.open(path, memmap=True) as hdul:
            hdus = [h for h in hdul if h.is_image and h.header.get("NAXIS") == 2]
            named = [h for h in hdus if h.name == "IMAGE"]
            if not (named or hdus):
                raise InvalidConfigError(f"{Path(path).name} has no 2-D image for a cutout")
            chosen = (named or hdus)[0]
            try:
                # astropy's notes on cards it fixed (a JWST header: "Set OBSGEO-H to ...")
                # were printed bare by `alsub cutouts`; the reader keeps them quiet too
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FITSFixedWarning)
                    wcs = WCS(chosen.header) if chosen.header.get("CTYPE1") else None
            except Exception:  # noqa: BLE001 - an unreadable WCS: stamps without one
                wcs = None
            # its mask's unusable pixels are left blank in pictures
            mask = product_mask(hdul, chosen.shape)
            masks = {name: mask} if mask is not None else None
            cards = {**_file_epoch(hdul, chosen), **_product_card(Path(path).stem)}
            unit = chosen.header.get("BUNIT")
            if unit:  # the stamps' unit, as the product states it
                cards["BUNIT"] = unit
            parts.append(cutouts({name: (chosen.data, wcs, cards)}, x, y, size, masks))
    pairs = list(zip(parts, paths, strict=True))
    return Cutouts(
        {name: part.stamps[name] for part, name in pairs},
        parts[0].origin,
        {name: part.headers[name] for part, name in pairs},
        {name: part.blank[name] for part, name in pairs if name in part.blank},
        {name: part.masks[name] for part, name in pairs if name in part.masks},
    )


def _file_epoch(hdul: fits.HDUList, chosen) -> dict:
    """`EPOCH_KEYS` of a product file's image: an alsub product's primary header holds
    the image's own metadata (its IMAGE HDU's WCS may carry the science's epoch); another
    file's, the primary's, else the image HDU's."""
    primary = hdul[0].header
    sources = [primary] if "ALSUBMD" in primary else [primary, chosen.header]
    found = {
        key: next((h[key] for h in sources if h.get(key) is not None), None) for key in EPOCH_KEYS
    }
    return full_epoch(found["MJD-OBS"], found["DATE-OBS"])
