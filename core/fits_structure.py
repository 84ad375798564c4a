"""Pre-validation of a FITS file's structure before astropy parses it.

astropy trusts the structural header values: ``NAXIS = 2147483648`` makes it
build a list of two billion axis lengths, and a header or data block cut off
at the end of the file drops HDUs with only a warning. `check_fits_structure`
walks the raw 2880-byte blocks, reads only the mandatory keywords of every
HDU, checks them against the FITS standard (section 4.4 of FITS 4.0) and
checks that every header and data block lies inside the file; its time and
memory are bounded by the number of header blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import InvalidExposureError

__all__ = ["check_fits_structure"]

_BLOCK = 2880
_CARD = 80
#: FITS 4.0 limits: at most 999 axes and 999 table fields.
_MAX_AXES = 999
_MAX_FIELDS = 999
_BITPIX = {8, 16, 32, 64, -32, -64}
#: FITS sets no limit on these, astropy's parse time does: it grows faster than linearly with
#: the cards (100 000 cards in one header: 80 s) and linearly with the HDUs. Real headers hold
#: hundreds to a few thousand cards; mosaic files a few hundred HDUs.
_MAX_HEADER_CARDS = 10_000
_MAX_HDUS = 1000
_INT_VALUE = re.compile(rb"^\s*([+-]?\d{1,20})\s*(/.*)?$")
_STRUCTURAL = {b"SIMPLE", b"XTENSION", b"BITPIX", b"NAXIS", b"PCOUNT", b"GCOUNT", b"TFIELDS"}

ReadAt = Callable[[int, int], bytes]


def _card_value(card: bytes) -> bytes | None:
    return card[10:] if card[8:10] == b"= " else None


def _int(key: bytes, card: bytes, name: str) -> int:
    value = _card_value(card)
    match = _INT_VALUE.match(value or b"")
    if match is None:
        shown = (value or b"").decode("ascii", "replace").strip()[:30]
        raise InvalidExposureError(
            f"{name}: header keyword {key.decode()} = {shown!r} is not an integer"
        )
    return int(match.group(1))


def _read_header(read_at: ReadAt, offset: int, name: str, index: int) -> tuple[dict, int]:
    """Mandatory keywords of the header at ``offset`` and the offset of its data."""
    keys: dict[bytes, bytes] = {}
    position = offset
    too_many = InvalidExposureError(
        f"{name}: the header of HDU {index} has more than {_MAX_HEADER_CARDS} cards"
    )
    while True:
        if position - offset >= _MAX_HEADER_CARDS * _CARD:
            raise too_many
        block = read_at(position, _BLOCK)
        if len(block) < _BLOCK:
            raise InvalidExposureError(
                f"{name}: truncated file (the header of HDU {index} has no END card)"
            )
        position += _BLOCK
        for start in range(0, _BLOCK, _CARD):
            card = block[start : start + _CARD]
            key = card[:8].rstrip()
            if key == b"END":
                if (position - _BLOCK - offset + start) // _CARD > _MAX_HEADER_CARDS:
                    raise too_many
                return keys, position
            if key in _STRUCTURAL or re.fullmatch(rb"(Z?NAXIS\d{1,3}|ZNAXIS|ZIMAGE)", key):
                keys.setdefault(key, card)


def _hdu_extent(keys: dict, name: str, index: int) -> tuple[int, tuple[int, ...]]:
    """Bytes of the HDU's data (without padding) and its axis lengths, checked."""
    bitpix = _int(b"BITPIX", keys[b"BITPIX"], name) if b"BITPIX" in keys else None
    if bitpix not in _BITPIX:
        raise InvalidExposureError(f"{name}: HDU {index} has BITPIX {bitpix}, not a FITS value")
    naxis = _int(b"NAXIS", keys[b"NAXIS"], name) if b"NAXIS" in keys else -1
    if not 0 <= naxis <= _MAX_AXES:
        raise InvalidExposureError(
            f"{name}: HDU {index} has NAXIS = {naxis}; FITS allows 0 to {_MAX_AXES}"
        )
    axes = []
    for axis in range(1, naxis + 1):
        key = b"NAXIS%d" % axis
        if key not in keys:
            raise InvalidExposureError(f"{name}: HDU {index} lacks NAXIS{axis}")
        length = _int(key, keys[key], name)
        if length < 0:
            raise InvalidExposureError(f"{name}: HDU {index} has NAXIS{axis} = {length} < 0")
        axes.append(length)
    pcount = _int(b"PCOUNT", keys[b"PCOUNT"], name) if b"PCOUNT" in keys else 0
    gcount = _int(b"GCOUNT", keys[b"GCOUNT"], name) if b"GCOUNT" in keys else 1
    if pcount < 0 or gcount < 0:
        raise InvalidExposureError(f"{name}: HDU {index} has a negative PCOUNT or GCOUNT")
    if b"TFIELDS" in keys and not 0 <= _int(b"TFIELDS", keys[b"TFIELDS"], name) <= _MAX_FIELDS:
        raise InvalidExposureError(f"{name}: HDU {index} has more than {_MAX_FIELDS} TFIELDS")
    if b"ZNAXIS" in keys:
        znaxis = _int(b"ZNAXIS", keys[b"ZNAXIS"], name)
        if not 0 <= znaxis <= _MAX_AXES:
            raise InvalidExposureError(f"{name}: HDU {index} has ZNAXIS = {znaxis}")
        for axis in range(1, znaxis + 1):
            key = b"ZNAXIS%d" % axis
            if key not in keys or _int(key, keys[key], name) < 0:
                raise InvalidExposureError(f"{name}: HDU {index} lacks a valid ZNAXIS{axis}")
    # Random groups (NAXIS1 = 0) leave the first axis out of the product (FITS 4.0, eq. 2).
    lengths = axes[1:] if axes and axes[0] == 0 and naxis > 1 else axes
    count = 1
    for length in lengths:
        count *= length
    if naxis == 0:
        count = 0
    nbits = abs(bitpix) * gcount * (pcount + count)
    return (nbits + 7) // 8, tuple(axes)


def check_fits_structure(read_at: ReadAt, size: int, name: str) -> int:
    """Check every HDU's mandatory keywords and extent; return the number of HDUs.

    Parameters
    ----------
    read_at : callable
        ``read_at(offset, n)`` returns up to ``n`` bytes of the (uncompressed)
        file starting at ``offset``.
    size : `int`
        Size of the file (bytes).
    name : `str`
        Name used in error messages.

    Returns
    -------
    n_hdu : `int`

    Raises
    ------
    core.errors.InvalidExposureError
        Not FITS, a structural keyword out of the standard's range, a header
        or data block that ends beyond the end of the file (only the final
        padding of the last HDU may be missing), more than 10 000 cards in a
        header or more than 1000 HDUs.
    """
    if read_at(0, 9) != b"SIMPLE  =":
        raise InvalidExposureError(f"{name}: not a FITS file (it does not start with SIMPLE)")
    offset, index = 0, 0
    while offset < size:
        if index >= _MAX_HDUS:
            raise InvalidExposureError(f"{name}: more than {_MAX_HDUS} HDUs")
        keys, data_start = _read_header(read_at, offset, name, index)
        nbytes, _ = _hdu_extent(keys, name, index)
        end = data_start + nbytes
        if end > size:
            raise InvalidExposureError(
                f"{name}: truncated file (HDU {index} needs {end} bytes, the file has {size})"
            )
        index += 1
        offset = data_start + -(-nbytes // _BLOCK) * _BLOCK
        # What follows the last HDU is only checked when it claims to be an extension:
        # astropy ignores trailing padding and junk.
        if read_at(offset, 8) != b"XTENSION":
            break
    return index
