"""A DICOM header parsed from its bytes into pydicom's raw elements, for the scans' common case.

pydicom's reader takes ~1.6 ms a header: its element generator reads the file a few bytes at a
time. A scan reads the header of every file of a study (500 and more), so this parses a header
already in memory, in one pass, into the same ``RawDataElement``\\ s pydicom's reader yields and
leaves every value conversion to pydicom. It knows only Explicit and Implicit VR Little Endian,
the syntaxes of nearly every file, and gives ``None`` for anything else (big endian, deflate, a
private syntax, a VR that is not one, an undefined length outside a sequence, a length past the
end of the file): the caller then reads the file with pydicom, whose messages name what is wrong.
tests/test_raw_header.py checks both give the same data set on every test file of pydicom and
pydicom-data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ImplicitVRLittleEndian

from tasks.part10 import LONG_VRS, SHORT_VRS, read_file_meta
from tasks.raw_json import plain_get

FIRST_READ = 16_384
"""Bytes read first; a longer header is read again in doubling reads."""
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
"""Where pydicom's ``stop_before_pixels`` stops."""
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_VR_NAMES = {vr: vr.decode("ascii") for vr in LONG_VRS | SHORT_VRS}
_LONG_NAMES = frozenset(_VR_NAMES[vr] for vr in LONG_VRS)
_TAG, _TAG_LENGTH, _EXPLICIT, _LENGTH16, _LENGTH32 = (struct.Struct(f) for f in ("<HH", "<HHI", "<HH2sH", "<H", "<I"))


class _Short(Exception):
    """The header goes on past the bytes read so far."""


class _Unusual(Exception):
    """Something this parser leaves to pydicom."""


@dataclass
class RawHeader:
    """The data set up to its pixel data, with its file meta, and where the pixel data starts."""
    dataset: Dataset
    transfer_syntax: str
    implicit: bool
    pixel_offset: int | None
    """The offset of the Pixel Data element in the file; None when the file ends first."""


def read_raw_header(handle: BinaryIO, size: int, limit: int | None = None) -> RawHeader | None:
    """The header of the Part 10 file open in ``handle`` (``size`` bytes long), or None when it
    is not one this parser reads (see the module's docstring) or goes on past ``limit`` bytes."""
    readable = size if limit is None else min(size, limit)
    data = handle.read(min(readable, FIRST_READ))
    meta = read_file_meta(data)
    if meta is None:
        return None
    implicit = _is_implicit(meta.transfer_syntax)
    if implicit is None:
        return None
    if implicit and _looks_explicit(data, meta.dataset_offset):
        return None  # pydicom reads such a data set as explicit, whatever its meta says
    try:
        file_meta = FileMetaDataset(_elements(data[:meta.dataset_offset], 132, False, True)[0])
        elements, pixel_offset = _all_elements(handle, data, meta.dataset_offset, implicit, size, readable)
        dataset = Dataset(elements)
        character_set = plain_get(dataset, "SpecificCharacterSet", None)  # what pydicom's reader does, faster
        encoding = convert_encodings(character_set) if character_set else default_encoding
    except Exception:  # noqa: BLE001 - _Short, _Unusual, a hostile character set or nesting: pydicom decides
        return None
    dataset.file_meta = file_meta
    dataset.set_original_encoding(implicit, True, encoding)
    return RawHeader(dataset, meta.transfer_syntax, implicit, pixel_offset)


def _all_elements(handle: BinaryIO, data: bytes, offset: int, implicit: bool, size: int,
                  readable: int) -> tuple[dict, int | None]:
    """:func:`_elements`, reading on in doubling steps while the header goes on past ``data``."""
    while True:
        try:
            return _elements(data, offset, implicit, len(data) >= size)
        except _Short:
            wanted = min(readable, 2 * len(data)) - len(data)
            more = handle.read(wanted) if wanted > 0 else b""
            if len(more) < wanted or not more:
                raise  # the file ends before its size says, or the header before the limit
            data += more


def _looks_explicit(data: bytes, offset: int) -> bool:
    """Whether the first element of a data set said to be implicit carries a VR (pydicom checks
    the same and reads such a data set as explicit)."""
    return data[offset + 4:offset + 6] in _VR_NAMES


@lru_cache(maxsize=64)  # bounded: a hostile medium may name a new syntax in every file
def _is_implicit(transfer_syntax: str) -> bool | None:
    """True for Implicit VR Little Endian, False for a syntax of Explicit VR Little Endian
    (the native one and every encapsulated one), None for the rest."""
    if transfer_syntax == ImplicitVRLittleEndian:
        return True
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or uid.is_private or uid.is_deflated or not uid.is_little_endian:
        return None
    return False if not uid.is_implicit_VR else None


def _elements(data: bytes, offset: int, implicit: bool, at_end: bool) -> tuple[dict, int | None]:
    """The elements from ``offset`` to the pixel data (or the end of ``data`` when that is the
    end of the file), and the pixel data's offset."""
    elements: dict[BaseTag, RawDataElement] = {}
    end = len(data)
    # The element header is parsed inline, not by _element_header (which items use): one struct
    # read and no call per element make this loop, ~100 runs a file, 15-25 % faster.
    while offset + 8 <= end:
        group, number, vr_bytes, length = _EXPLICIT.unpack_from(data, offset)
        tag = BaseTag(group << 16 | number)
        if tag in PIXEL_TAGS:
            return elements, offset
        if group == 0xFFFE:
            raise _Unusual  # an item or delimiter where an element belongs
        if implicit:
            vr, length, start = None, _LENGTH32.unpack_from(data, offset + 4)[0], offset + 8
        else:
            vr = _VR_NAMES.get(vr_bytes)
            if vr in _LONG_NAMES:
                if offset + 12 > end:
                    raise _Short
                length, start = _LENGTH32.unpack_from(data, offset + 8)[0], offset + 12
            elif vr is None:
                raise _Unusual  # not a VR: pydicom reads such an element as implicit
            else:
                start = offset + 8
        if length == _UNDEFINED:
            _require_sequence(tag, vr)
            stop = _sequence_end(data, start, implicit)
        else:
            stop = start + length
            if stop > end:
                raise _Short
        elements[tag] = RawDataElement(tag, vr, length, data[start:stop], start, implicit, True)
        offset = stop
    if offset < end or not at_end:
        raise _Short if not at_end else _Unusual
    return elements, None


def _element_header(data: bytes, offset: int, implicit: bool) -> tuple[str | None, int, int]:
    """(VR, value length, value offset) of the element at ``offset``; VR None when implicit."""
    if implicit:
        return None, _LENGTH32.unpack_from(data, offset + 4)[0], offset + 8
    vr = _VR_NAMES.get(data[offset + 4:offset + 6])
    if vr in _LONG_NAMES:
        if offset + 12 > len(data):
            raise _Short
        return vr, _LENGTH32.unpack_from(data, offset + 8)[0], offset + 12
    if vr is None:
        raise _Unusual
    return vr, _LENGTH16.unpack_from(data, offset + 6)[0], offset + 8


def _sequence_end(data: bytes, offset: int, implicit: bool) -> int:
    """The offset just past the Sequence Delimitation Item of the undefined-length sequence
    whose items start at ``offset``."""
    while True:
        if offset + 8 > len(data):
            raise _Short
        group, number, length = _TAG_LENGTH.unpack_from(data, offset)
        tag = group << 16 | number
        if tag == _SEQUENCE_END:
            return offset + 8
        if tag != _ITEM:
            raise _Unusual
        offset = _item_end(data, offset + 8, implicit) if length == _UNDEFINED else offset + 8 + length


def _item_end(data: bytes, offset: int, implicit: bool) -> int:
    """The offset just past the Item Delimitation Item of the undefined-length item whose
    elements start at ``offset``."""
    while True:
        if offset + 8 > len(data):
            raise _Short
        group, number = _TAG.unpack_from(data, offset)
        if group << 16 | number == _ITEM_END:
            return offset + 8
        vr, length, start = _element_header(data, offset, implicit)
        if length == _UNDEFINED:
            _require_sequence(group << 16 | number, vr)
            offset = _sequence_end(data, start, implicit)
        else:
            offset = start + length


def _require_sequence(tag: int, vr: str | None) -> None:
    """An undefined length is read here only for a sequence: explicit SQ, or implicit and SQ in
    the dictionary (pydicom looks ahead at anything else, e.g. a private tag, and reads items or
    a delimited value)."""
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise _Unusual from None
    if vr != "SQ":
        raise _Unusual
