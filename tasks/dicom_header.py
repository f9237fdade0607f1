"""Header-only reads of DICOM files: never the pixel data."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from tasks.raw_header import read_raw_header
from tasks.raw_json import plain_get

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class NotDicomError(Exception):
    """The file is not DICOM, or lacks what an instance must have; the message says why."""


@dataclass
class Header:
    dataset: Dataset
    transfer_syntax: str
    part10: bool
    """True when the file has a preamble, 'DICM' and file meta with a transfer syntax."""


def read_header(path: Path) -> Header:
    """Read a file's header up to the pixel data; bare datasets (no preamble) are accepted."""
    try:
        with open(path, "rb") as handle:
            raw = read_raw_header(handle, os.fstat(handle.fileno()).st_size)
    except OSError as error:
        raise NotDicomError(f"unreadable file: {error.strerror or error}") from error
    if raw is not None:
        return _checked(Header(dataset=raw.dataset, transfer_syntax=raw.transfer_syntax, part10=True))
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        part10 = True
    except InvalidDicomError:
        dataset = _read_bare(path)
        part10 = False
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise NotDicomError(f"unreadable DICOM header: {type(error).__name__}: {error}"[:300]) from error
    syntax = str(getattr(dataset.file_meta, "TransferSyntaxUID", "") or "")
    if not syntax:
        syntax = "1.2.840.10008.1.2.1" if not dataset.is_implicit_VR else "1.2.840.10008.1.2"
        part10 = False
    return _checked(Header(dataset=dataset, transfer_syntax=syntax, part10=part10))


def _checked(header: Header) -> Header:
    missing = [keyword for keyword in REQUIRED_UIDS if not plain_get(header.dataset, keyword)]
    if missing:
        raise NotDicomError(f"not a DICOM instance: missing {', '.join(missing)}")
    return header


def _read_bare(path: Path) -> Dataset:
    with open(path, "rb") as handle:
        start = handle.read(8)
    # A bare dataset starts with a group 0x0008 (or 0x0002) element, little endian.
    if len(start) < 8 or start[1] != 0 or start[0] not in (0x02, 0x08):
        raise NotDicomError("not DICOM (no preamble and no dataset start)")
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # noqa: BLE001 — pydicom raises many types on garbage
        raise NotDicomError(f"unreadable DICOM header: {error}") from error
