"""DICOM JSON (PS3.18 F) of a header element still in its raw, undecoded form, for the plain VRs.

The scan converts ~25 attributes of every instance to DICOM JSON for the manifest. Through
pydicom (raw element -> DataElement -> ``to_json_dict``) that cost ~20 us per element, more
than reading the header. For the VRs whose value is plain ASCII text or little-endian numbers
the JSON follows from the bytes directly; this returns ``None`` for anything else (another VR,
a byte outside printable ASCII, a number pydicom would read differently), and the caller
converts that element with pydicom. tests/test_manifest.py checks both give the same JSON.
"""
from __future__ import annotations

import math
import re
import struct
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

_TEXT_VRS = frozenset({"UI", "CS", "DA", "TM", "DT", "AS"})
"""Split at backslashes after trailing spaces and NULs go; no character set applies."""
_STRING_VRS = _TEXT_VRS | {"IS", "DS"}
"""Stored as text: pydicom's empty value is ''."""
_PRINTABLE = re.compile(rb"[\x20-\x7e]*\x00?\Z")
_PLAIN_TEXT = re.compile(r"[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e])?\Z")
"""Printable ASCII without a backslash, not starting or ending with a space (which raw_json strips)."""
_IS = re.compile(r" *[+-]?[0-9]+ *\Z")
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *\Z")
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def raw_json(element: Any) -> dict[str, Any] | None:
    """``{"vr": ..., "Value": [...]}`` as pydicom's ``to_json_dict`` would give it, or ``None``
    when this element needs pydicom."""
    if not isinstance(element, RawDataElement) or element.VR is None or element.value is None:
        return None
    vr, value = element.VR, element.value
    if not value:
        return {"vr": vr} if vr in _STRING_VRS or vr in _NUMBERS else None
    if vr in _NUMBERS:
        return _numbers(vr, value, element.is_little_endian)
    if not _PRINTABLE.match(value):
        return None
    items = value.decode("ascii").rstrip(" \x00").split("\\")
    if vr in _TEXT_VRS:
        return {"vr": vr} if items == [""] else {"vr": vr, "Value": items}
    if vr == "IS" and all(_IS.match(item) for item in items):
        return {"vr": vr, "Value": [int(item) for item in items]}
    if vr == "DS" and all(_DS.match(item) for item in items):
        return {"vr": vr, "Value": [float(item) for item in items]}
    return None


def _numbers(vr: str, value: bytes, little_endian: bool) -> dict[str, Any] | None:
    code = _NUMBERS[vr]
    size = struct.calcsize(code)
    if not little_endian or len(value) % size:
        return None
    return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{code}", value))}


def raw_element(key: str, mapping: dict[str, Any]) -> RawDataElement | None:
    """The raw element whose :func:`raw_json` is ``mapping`` (the attribute ``key`` of a DICOM
    JSON data set), or None when that is not a plain one. A data set made of raw elements converts
    only the values that are read: the media stage makes one per instance and reads one or two."""
    vr, values = mapping.get("vr"), mapping.get("Value")
    if len(mapping) != 1 + ("Value" in mapping) or not isinstance(values, (list, type(None))):
        return None
    if vr in _NUMBERS:
        value = _packed(vr, values or [])
    elif vr in _STRING_VRS:
        value = _text(vr, values or [])
    else:
        return None
    if value is None:
        return None
    tag = BaseTag(int(key, 16))
    return RawDataElement(tag, vr, len(value), value, 0, False, True)


def _packed(vr: str, values: list[Any]) -> bytes | None:
    """One number packed (several would convert to a plain list, where pydicom makes a MultiValue)."""
    kind = float if vr in ("FL", "FD") else int
    if len(values) > 1 or not all(type(v) is kind for v in values):
        return None
    try:
        packed = struct.pack(f"<{len(values)}{_NUMBERS[vr]}", *values)
    except (struct.error, OverflowError):
        return None
    same = list(struct.unpack(f"<{len(values)}{_NUMBERS[vr]}", packed)) == values  # FL: exactly a float32
    return packed if same else None


def _text(vr: str, values: list[Any]) -> bytes | None:
    if vr == "IS":
        texts = [str(v) for v in values if type(v) is int]
    elif vr == "DS":  # repr gives back the same float; pydicom allows 16 characters
        texts = [repr(v) for v in values if type(v) is float and len(repr(v)) <= 16 and math.isfinite(v)]
    else:
        texts = [v for v in values if type(v) is str and _PLAIN_TEXT.match(v)]
    if len(texts) != len(values):
        return None
    encoded = "\\".join(texts).encode("ascii")
    return encoded + (b"\0" if vr == "UI" else b" ") if len(encoded) % 2 else encoded


def plain_get(dataset: Dataset, keyword: str, default: Any = "") -> Any:
    """``dataset.get(keyword, default)``, read from the raw bytes when the value is plain: a
    single value as itself, several as a list (pydicom's MultiValue). Checks of untrusted
    headers read a dozen values per file; through pydicom's conversions that was a tenth of
    an import's scan."""
    tag = tag_for_keyword(keyword)
    plain = raw_json(dataset.get_item(tag, keep_deferred=True)) if tag is not None else None
    if plain is None:
        return dataset.get(keyword, default)
    values = plain.get("Value", [])
    return values[0] if len(values) == 1 else (values or _empty(plain["vr"]))


def _empty(vr: str) -> Any:
    """pydicom's empty value: '' for text, None for numbers."""
    return "" if vr in _STRING_VRS else None
