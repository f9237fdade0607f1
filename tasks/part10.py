"""The file meta of a DICOM Part 10 file, parsed from its first bytes without pydicom.

The C-STORE sender (tasks.dicom_wire) sends a file's own bytes after its meta, and a decode
writes new Pixel Data into a file's own bytes (tasks.transfer_syntax): both need the three UIDs
and where the data set starts, for hundreds of files a second. Anything unusual (no preamble,
a VR that is not one, a group length that disagrees, an undefined length) gives None, and the
caller reads the file with pydicom instead.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

META_PROBE = 16_384
"""Bytes to read for :func:`read_file_meta`; a longer meta is left to pydicom."""

LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
"""Explicit VRs with a 2-byte pad and a 4-byte length; SHORT_VRS have a 2-byte length."""
SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                       b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})


@dataclass(frozen=True)
class FileMeta:
    """What the file meta of a Part 10 file says, and where its data set starts."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


def read_file_meta(head: bytes) -> FileMeta | None:
    """Parse the group-0002 elements at the start of a Part 10 file (``head``: its first bytes)."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    values: dict[int, bytes] = {}
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return _meta(values, offset)
        vr = head[offset + 4:offset + 6]
        if vr in LONG_VRS:
            if offset + 12 > len(head):
                return None
            length, start = struct.unpack_from("<I", head, offset + 8)[0], offset + 12
        elif vr in SHORT_VRS:
            length, start = struct.unpack_from("<H", head, offset + 6)[0], offset + 8
        else:
            return None  # not Explicit VR, as PS3.10 requires of the meta
        if length == 0xFFFFFFFF or start + length > len(head):
            return None
        values[element] = head[start:start + length]
        offset = start + length
    return None


def _meta(values: dict[int, bytes], end: int) -> FileMeta | None:
    group_length = values.get(0x0000)
    if group_length is not None and (len(group_length) != 4 or 144 + struct.unpack("<I", group_length)[0] != end):
        return None  # the meta's own length disagrees with its elements: let pydicom decide
    texts = [values.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace") for element in (2, 3, 0x10)]
    return FileMeta(*texts, end) if all(texts) else None
