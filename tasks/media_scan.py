"""What is on an imported medium: every DICOM instance, and every file refused and why.

The DICOMDIR is a hint, never an authority:

* When a DICOMDIR sits at the root (``DICOMDIR``, ``dicomdir``, ``DICOMDIR.;1`` ...), it is
  parsed record by record (one bad record costs that record only, unlike
  ``pydicom.fileset.FileSet``, which gives up on the whole DICOMDIR). Each Referenced File ID is
  mapped onto the medium tolerantly (backslashes or slashes, any case, ``;1``, trailing dots)
  and refused when it would leave the media root.
* Every other file is still sniffed. A DICOM file no record references, a record whose file is
  missing, or a record whose SOP Class / SOP Instance / Transfer Syntax disagrees with the
  file's own header makes the DICOMDIR inconsistent: the scan then imports everything found
  by walking, trusts each file's own header, and lists the inconsistencies in
  ``dicomdir_problems``. ``used_dicomdir`` is true only for a readable, consistent DICOMDIR.

Headers are read with ``stop_before_pixels`` and a defer size; pixel data is never loaded.
Each file is checked before it is accepted: required UIDs present and well formed, header
not truncated, pixel data no larger than the file (length field, Rows x Columns x Frames x
Samples x BitsAllocated for native syntaxes, fragment lengths for encapsulated ones), no
decompression bomb, a bounded inflate for Deflated Explicit VR Little Endian.
"""
from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tasks.manifest import _patient_key as patient_key_of
from tasks.media_source import MediaFile, Medium, RefusedFile, normalise_name
from tasks.part10 import LONG_VRS, SHORT_VRS
from tasks.raw_header import read_raw_header
from tasks.raw_json import plain_get

HEADER_DEFER_BYTES = 256 << 10
"""Header values longer than this are not read; they are left out of ``FoundInstance.header``."""
MAX_DICOMDIR_BYTES = 256 << 20
MAX_INFLATED_BYTES = 256 << 20
"""A Deflated dataset may inflate to at most this many bytes."""
MAX_SINGLE_READ = 64 << 20
"""No single header read may ask for more than this (a never-deferred element of absurd length)."""
MAX_HEADER_BYTES = 256 << 20
"""All header values read from one file together (a header of a million 200 KB elements)."""
MAX_META_BYTES = 1 << 20
SNIFF_BYTES = 256

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NOT_DICOM = "skipped: not DICOM"
NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                   DeflatedExplicitVRLittleEndian}
PIXEL_TAGS = {0x7FE00010: "Pixel Data", 0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
REQUIRED_UIDS = (("SOPClassUID", "SOP Class UID"), ("SOPInstanceUID", "SOP Instance UID"),
                 ("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"))
NON_DICOM_RECORD_TYPES = {"HL7 STRUC DOC"}
"""Directory records whose referenced file is not a DICOM dataset."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_VRS = LONG_VRS | SHORT_VRS
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD

Severity = Literal["error", "warning"]


@dataclass
class FoundInstance:
    path: str
    """Relative media path."""
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    has_preamble: bool
    """Part 10 file (preamble + DICM) rather than a bare dataset."""
    header: Dataset = field(repr=False)
    """Header only: no pixel data, no value longer than ``HEADER_DEFER_BYTES``."""


@dataclass
class MediaProblem:
    file: str
    reason: str
    severity: Severity


@dataclass
class MediaScan:
    instances: list[FoundInstance] = field(default_factory=list)
    problems: list[MediaProblem] = field(default_factory=list)
    used_dicomdir: bool = False
    dicomdir_problems: list[str] = field(default_factory=list)

    def syntaxes(self) -> dict[str, int]:
        """Instances per transfer syntax UID."""
        return dict(Counter(instance.transfer_syntax for instance in self.instances))

    @property
    def errors(self) -> list[MediaProblem]:
        return [problem for problem in self.problems if problem.severity == "error"]

    def problem_for(self, file: str) -> MediaProblem | None:
        return next((problem for problem in self.problems if problem.file == file), None)


class _Refused(Exception):
    """This file is not imported; the message is the reason."""


class _Skipped(Exception):
    """This file is not an instance (not DICOM, another DICOMDIR); the message is the reason."""


@dataclass
class _Record:
    index: int
    record_type: str
    file_id: str
    """The Referenced File ID as written in the record (components joined by backslashes)."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    def name(self) -> str:
        return f"DICOMDIR record #{self.index} ({self.record_type or 'no type'}, '{self.file_id}')"


class _WatchedStream:
    """A read-only view of a media stream that notes any request past the end of the file.

    pydicom reads a truncated header without complaint (short reads, seeks past the end
    for deferred values); this wrapper is how a truncated file is told from a whole one.
    It has no ``name``: a header read through it can never re-open a path on the worker.
    It keeps its own position (``tell`` on a buffered reader is slow and pydicom calls it a lot).
    """

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw = raw
        self.size = size
        self.overrun: str | None = None
        self._position = raw.tell()
        self._read_total = 0

    def _note(self, start: int, end: int) -> None:
        if self.overrun is None:
            self.overrun = (f"an element at offset {start} runs to offset {end}, past the end of the file "
                            f"({self.size} bytes)")

    def read(self, n: int | None = -1) -> bytes:
        position = self._position
        if n is None or n < 0:
            n = max(self.size - position, 0)
        if n > MAX_SINGLE_READ:
            raise _Refused(f"corrupt header: an element claims {n} bytes")
        end = position + n
        if end > self.size and not (position == 0 and n == 128):  # pydicom's preamble probe
            # At the very end, only the 8-byte probe for a next element is legitimate.
            if position != self.size or n != 8:
                self._note(position, end)
        data = self._raw.read(n)
        self._position = position + len(data)
        self._read_total += len(data)
        if self._read_total > MAX_HEADER_BYTES:
            raise _Refused(f"header larger than {MAX_HEADER_BYTES} bytes")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            target = offset
        elif whence == 1:
            target = self._position + offset
        else:
            target = self.size + offset
        if target > self.size:
            self._note(self._position, target)
        self._position = self._raw.seek(target)
        return self._position

    def tell(self) -> int:
        return self._position


def scan_medium(medium: Medium, *, max_pixels: int = 2_000_000_000, max_file_bytes: int = 4 << 30,
                on_found: Callable[[FoundInstance], None] | None = None) -> MediaScan:
    """Every DICOM instance on ``medium``, and a problem for every file not taken.

    ``on_found`` sees each instance as soon as it is taken (in the order of ``instances``), so
    work on the first ones can start while the rest of the medium is read."""
    scan = MediaScan()
    listing = sorted(medium.files(), key=lambda entry: entry.path)
    usable: list[MediaFile] = []
    refused: dict[str, MediaFile] = {}
    for entry in listing:
        if entry.refusal:
            refused[entry.path] = entry
            scan.problems.append(MediaProblem(entry.path, f"refused: {entry.refusal}", "error"))
        else:
            usable.append(entry)

    dicomdir = _root_dicomdir(usable, refused, scan)
    references: dict[str, _Record] = {}
    dicomdir_readable = False
    if dicomdir is not None:
        records = _read_dicomdir(medium, dicomdir, scan)
        if records is not None:
            dicomdir_readable = True
            references = _map_records(records, usable, refused, scan)

    found: dict[str, FoundInstance] = {}
    for entry in usable:
        if dicomdir is not None and entry.path == dicomdir.path:
            continue
        record = references.get(entry.path)
        try:
            instance = _scan_file(medium, entry, record, max_pixels=max_pixels, max_file_bytes=max_file_bytes,
                                  scan=scan)
        except _Skipped as skipped:
            scan.problems.append(MediaProblem(entry.path, str(skipped), "warning"))
            continue
        except _Refused as refusal:
            scan.problems.append(MediaProblem(entry.path, str(refusal), "error"))
            continue
        if dicomdir_readable and record is None:
            scan.dicomdir_problems.append(f"{entry.path}: a DICOM file no DICOMDIR record references")
        if record is not None:
            _compare_record(record, instance, scan)
        _add_unique(medium, instance, found, scan)
        if on_found is not None and scan.instances and scan.instances[-1] is instance:
            on_found(instance)

    scan.used_dicomdir = dicomdir_readable and not scan.dicomdir_problems
    return scan


# --- DICOMDIR -------------------------------------------------------------------------------

def _media_key(path: str) -> str:
    """How a path is compared with a Referenced File ID: upper case, no ';1', no trailing dot."""
    components = []
    for component in path.split("/"):
        component = re.sub(r";\d*$", "", component.strip())
        if component.rstrip("."):
            component = component.rstrip(".")
        components.append(component.upper())
    return "/".join(components)


def _root_dicomdir(usable: list[MediaFile], refused: dict[str, MediaFile], scan: MediaScan) -> MediaFile | None:
    candidates = [entry for entry in usable if "/" not in entry.path and _media_key(entry.path) == "DICOMDIR"]
    for path in refused:
        if "/" not in path and _media_key(path) == "DICOMDIR":
            scan.dicomdir_problems.append(f"{path}: the DICOMDIR is refused ({refused[path].refusal}); walking the medium")
    if not candidates:
        return None
    candidates.sort(key=lambda entry: (entry.path != "DICOMDIR", entry.path))
    for extra in candidates[1:]:
        scan.dicomdir_problems.append(f"{extra.path}: a second DICOMDIR at the root; only {candidates[0].path} is read")
    return candidates[0]


def _read_dicomdir(medium: Medium, entry: MediaFile, scan: MediaScan) -> list[_Record] | None:
    """The DICOMDIR's records, or ``None`` (with a problem noted) when it cannot be used."""
    def unusable(reason: str) -> None:
        scan.dicomdir_problems.append(f"{entry.path}: {reason}; walking the medium instead")
        scan.problems.append(MediaProblem(entry.path, f"DICOMDIR not used: {reason}", "warning"))

    if entry.size > MAX_DICOMDIR_BYTES:
        unusable(f"{entry.size} bytes, over the {MAX_DICOMDIR_BYTES}-byte limit")
        return None
    try:
        with medium.open(entry.path) as raw:
            stream = _WatchedStream(raw, entry.size)
            head = raw.read(SNIFF_BYTES)
            if _sniff(head) != "part10":
                unusable("not a DICOM Part 10 file")
                return None
            meta, _ = _parse_meta(stream)
            if meta.get(0x00020010) == DeflatedExplicitVRLittleEndian:
                unusable("Deflated transfer syntax, which PS3.10 does not allow for a DICOMDIR")
                return None
            stream.seek(0)
            dataset = dcmread(stream, force=True)
            if stream.overrun:
                unusable(f"truncated ({stream.overrun})")
                return None
            sequence = dataset.get("DirectoryRecordSequence")
    except (RefusedFile, _Refused) as exc:
        unusable(str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file
        unusable(f"unreadable ({type(exc).__name__}: {exc})")
        return None
    if sequence is None:
        unusable("no Directory Record Sequence")
        return None

    records = []
    for index, item in enumerate(sequence, start=1):
        try:
            file_id = plain_get(item, "ReferencedFileID")
            if file_id is None or file_id == "":
                continue
            components = [str(part).strip() for part in (file_id if not isinstance(file_id, str) else [file_id])]
            records.append(_Record(
                index=index,
                record_type=str(plain_get(item, "DirectoryRecordType") or "").strip(),
                file_id="\\".join(components),
                sop_class_uid=_clean_uid(plain_get(item, "ReferencedSOPClassUIDInFile")),
                sop_instance_uid=_clean_uid(plain_get(item, "ReferencedSOPInstanceUIDInFile")),
                transfer_syntax=_clean_uid(plain_get(item, "ReferencedTransferSyntaxUIDInFile")),
            ))
        except Exception as exc:  # noqa: BLE001 - one bad record costs that record only
            scan.dicomdir_problems.append(f"DICOMDIR record #{index} unreadable ({type(exc).__name__}: {exc})")
    return records


def _map_records(records: list[_Record], usable: list[MediaFile], refused: dict[str, MediaFile],
                 scan: MediaScan) -> dict[str, _Record]:
    by_key: dict[str, list[str]] = {}
    for entry in usable:
        by_key.setdefault(_media_key(entry.path), []).append(entry.path)
    refused_by_key = {_media_key(path): path for path in refused}

    references: dict[str, _Record] = {}
    for record in records:
        path, refusal = normalise_name(record.file_id)
        if refusal:
            reason = f"Referenced File ID in {record.name()} refused: {refusal}"
            scan.dicomdir_problems.append(reason)
            scan.problems.append(MediaProblem(record.file_id, reason, "error"))
            continue
        key = _media_key(path)
        matches = by_key.get(key, [])
        if not matches:
            if key in refused_by_key:
                scan.dicomdir_problems.append(f"{record.name()} references {refused_by_key[key]}, which is refused")
                continue
            reason = f"referenced by {record.name()} but missing from the medium"
            scan.dicomdir_problems.append(f"{path}: {reason}")
            scan.problems.append(MediaProblem(path, reason, "error"))
            continue
        chosen = path if path in matches else matches[0]
        if len(matches) > 1:
            scan.dicomdir_problems.append(f"{record.name()} matches several files ({', '.join(matches)}); "
                                          f"took {chosen}")
        if chosen in references:
            scan.dicomdir_problems.append(f"{chosen} is referenced by both {references[chosen].name()} "
                                          f"and {record.name()}")
            continue
        references[chosen] = record
    return references


def _compare_record(record: _Record, instance: FoundInstance, scan: MediaScan) -> None:
    for label, in_record, in_file in (
        ("SOP Class UID", record.sop_class_uid, instance.sop_class_uid),
        ("SOP Instance UID", record.sop_instance_uid, instance.sop_instance_uid),
        ("Transfer Syntax UID", record.transfer_syntax, instance.transfer_syntax),
    ):
        if in_record and in_record != in_file:
            reason = (f"{record.name()} says Referenced {label} in File {in_record}, the file's own header says "
                      f"{in_file}; the file's header is used")
            scan.dicomdir_problems.append(f"{instance.path}: {reason}")
            scan.problems.append(MediaProblem(instance.path, reason, "warning"))


# --- one file -------------------------------------------------------------------------------

def _sniff(head: bytes) -> str | None:
    """``"part10"``, ``"bare"`` (a dataset with no preamble) or ``None`` (not DICOM)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) < 8:
        return None
    group, element = struct.unpack_from("<HH", head)
    if group not in (0x0002, 0x0008) or element > 0x1000:
        return None
    vr = head[4:6]
    if vr in _VRS:
        if vr in LONG_VRS:
            return "bare" if head[6:8] == b"\x00\x00" else None
        length = struct.unpack_from("<H", head, 6)[0]
        return "bare" if length <= 1024 else None
    length = struct.unpack_from("<L", head, 4)[0]  # implicit VR: short first values, even length
    if length > 1024 or length % 2:
        return None
    return "bare"


def _parse_meta(stream: _WatchedStream) -> tuple[dict[int, str], int]:
    """The File Meta Information's short string values, read from offset 132, and the offset
    where the dataset starts. Read before pydicom sees the file, for the transfer syntax: a
    Deflated dataset must not be inflated unbounded."""
    values: dict[int, str] = {}
    position = 132
    stream.seek(position)
    while position - 132 < MAX_META_BYTES:
        header = stream.read(8)
        if len(header) < 8:
            break
        group, element = struct.unpack_from("<HH", header)
        if group != 0x0002:
            break
        vr = header[4:6]
        if vr in LONG_VRS:
            extra = stream.read(4)
            if len(extra) < 4:
                break
            length = struct.unpack("<L", extra)[0]
            header_length = 12
        elif vr in _VRS:
            length = struct.unpack_from("<H", header, 6)[0]
            header_length = 8
        else:
            break  # not explicit VR: let pydicom deal with it
        if length > MAX_META_BYTES:
            raise _Refused(f"corrupt file meta information: element ({group:04X},{element:04X}) claims {length} bytes")
        value = stream.read(length)
        if vr in (b"UI", b"SH", b"AE", b"CS", b"LO"):
            values[(group << 16) | element] = value.decode("ascii", "replace").strip("\x00 ")
        position += header_length + length
    return values, position


def _clean_uid(value: object) -> str:
    return str(value or "").strip("\x00 ")


def _scan_file(medium: Medium, entry: MediaFile, record: _Record | None, *, max_pixels: int,
               max_file_bytes: int, scan: MediaScan) -> FoundInstance:
    try:
        raw = medium.open(entry.path)
    except RefusedFile as exc:
        raise _Refused(f"refused: {exc.reason}") from exc
    with raw:
        stream = _WatchedStream(raw, entry.size)
        try:
            head = raw.read(SNIFF_BYTES)  # not watched: a short file is not a truncated one
        except Exception as exc:  # noqa: BLE001 - an unreadable file on the medium
            raise _Refused(f"unreadable: {exc}") from exc
        kind = _sniff(head)
        if kind is None:
            if record is None:
                raise _Skipped(NOT_DICOM)
            if record.record_type in NON_DICOM_RECORD_TYPES:
                raise _Skipped(f"{NOT_DICOM} ({record.record_type} document referenced by the DICOMDIR)")
            kind = "bare"  # the DICOMDIR says it is DICOM: let the parser decide
        if entry.size > max_file_bytes:
            raise _Refused(f"file is {entry.size} bytes, over the {max_file_bytes}-byte limit")
        try:
            dataset, transfer_syntax, implicit, little, data_stream = _read_header(stream, kind)
            return _accept(entry, dataset, transfer_syntax, implicit, little, data_stream, kind,
                           max_pixels=max_pixels, scan=scan)
        except (_Refused, _Skipped):
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file
            raise _Refused(f"unreadable or corrupt header ({type(exc).__name__}: {exc})") from exc


def _read_header(stream: _WatchedStream, kind: str):
    """``(dataset, transfer syntax, implicit VR, little endian, stream positioned at the pixel
    data element or the end)``."""
    if kind == "part10":
        meta, dataset_start = _parse_meta(stream)
        if meta.get(0x00020002) == MEDIA_STORAGE_DIRECTORY:
            raise _Skipped("skipped: a DICOMDIR, not an instance")
        if meta.get(0x00020010) == DeflatedExplicitVRLittleEndian:
            return _read_deflated(stream, dataset_start)
        stream.seek(0)
        raw = read_raw_header(stream, stream.size, limit=HEADER_DEFER_BYTES)  # pydicom's values, 3x faster
        if raw is not None:
            stream.seek(stream.size if raw.pixel_offset is None else raw.pixel_offset)
            return raw.dataset, raw.transfer_syntax, raw.implicit, True, stream
    stream.seek(0)
    dataset = dcmread(stream, defer_size=HEADER_DEFER_BYTES, stop_before_pixels=True, force=True)
    if stream.overrun:
        raise _Refused(f"truncated or corrupt header: {stream.overrun}")
    implicit, little = dataset.original_encoding
    if implicit is None:
        implicit, little = True, True
    transfer_syntax = _clean_uid(dataset.file_meta.get("TransferSyntaxUID", "")) if kind == "part10" else ""
    if not transfer_syntax:
        transfer_syntax = ImplicitVRLittleEndian if implicit else (
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return dataset, transfer_syntax, implicit, little, stream


def _read_deflated(stream: _WatchedStream, dataset_start: int):
    stream.seek(0)
    preamble_and_meta = stream.read(dataset_start)
    file_meta = FileMetaDataset(read_dataset(io.BytesIO(preamble_and_meta[132:]), False, True))
    # Inflate in bounded steps (never one unbounded zlib call, as pydicom's reader makes).
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    inflated = 0
    while not inflater.eof:
        pending = stream.read(1 << 20)
        if not pending:
            break
        while pending:
            part = inflater.decompress(pending, 4 << 20)
            parts.append(part)
            inflated += len(part)
            if inflated > MAX_INFLATED_BYTES:
                raise _Refused(f"deflate bomb: the Deflated dataset inflates beyond {MAX_INFLATED_BYTES} bytes")
            pending = inflater.unconsumed_tail
    if not inflater.eof:
        raise _Refused("truncated or corrupt header: the Deflated dataset ends early")
    data = b"".join(parts)
    body = _WatchedStream(io.BytesIO(data), len(data))
    dataset = read_dataset(body, False, True, stop_when=_at_pixel_data, defer_size=HEADER_DEFER_BYTES)
    if body.overrun:
        raise _Refused(f"truncated or corrupt header (inflated dataset): {body.overrun}")
    dataset.file_meta = file_meta
    dataset.preamble = preamble_and_meta[:128]
    return dataset, DeflatedExplicitVRLittleEndian, False, True, body


def _at_pixel_data(tag, vr, length) -> bool:
    return int(tag) in PIXEL_TAGS


def _accept(entry: MediaFile, dataset: Dataset, transfer_syntax: str, implicit: bool, little: bool,
            stream: _WatchedStream, kind: str, *, max_pixels: int, scan: MediaScan) -> FoundInstance:
    sop_class_uid = _clean_uid(plain_get(dataset, "SOPClassUID"))
    if sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        raise _Skipped("skipped: a DICOMDIR, not an instance")
    uids = {}
    missing = []
    for keyword, label in REQUIRED_UIDS:
        value = _clean_uid(plain_get(dataset, keyword))
        if not value:
            missing.append(label)
        elif not _UID.match(value):
            raise _Refused(f"{label} {value!r} is not a valid UID")
        uids[keyword] = value
    if missing:
        raise _Refused(f"missing required attribute(s): {', '.join(missing)}")
    if not _UID.match(transfer_syntax):
        raise _Refused(f"Transfer Syntax UID {transfer_syntax!r} is not a valid UID")
    _check_pixels(entry, dataset, transfer_syntax, implicit, little, stream, max_pixels=max_pixels)
    for keyword, label in REQUIRED_UIDS:
        if len(uids[keyword]) > 64:
            scan.problems.append(MediaProblem(entry.path, f"{label} is longer than 64 characters", "warning"))
    _strip_deferred(dataset)
    return FoundInstance(
        path=entry.path, size=entry.size,
        sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"],
        transfer_syntax=transfer_syntax,
        study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        patient_key=patient_key_of(dataset), has_preamble=kind == "part10", header=dataset,
    )


def _check_pixels(entry: MediaFile, dataset: Dataset, transfer_syntax: str, implicit: bool, little: bool,
                  stream: _WatchedStream, *, max_pixels: int) -> None:
    """Refuse a file whose pixel data claims more than the file holds, or a decompression bomb."""
    start = stream.tell()
    size = stream.size
    endian = "<" if little else ">"
    header = stream._raw.read(12)
    if len(header) < 4:
        return  # no pixel data element: nothing to check
    group, element = struct.unpack_from(endian + "HH", header)
    tag = (group << 16) | element
    if tag not in PIXEL_TAGS:
        return
    label = PIXEL_TAGS[tag]
    if not implicit and len(header) >= 6 and not (b"AA" <= header[4:6] <= b"ZZ"):
        implicit = True  # as pydicom does: no valid VR here, so this element is implicit VR
    if implicit:
        if len(header) < 8:
            raise _Refused(f"claims more pixel data than it holds: the {label} element is cut off")
        length, header_length = struct.unpack_from(endian + "L", header, 4)[0], 8
    else:
        if len(header) < 8:
            raise _Refused(f"claims more pixel data than it holds: the {label} element is cut off")
        if header[4:6] in LONG_VRS:
            if len(header) < 12:
                raise _Refused(f"claims more pixel data than it holds: the {label} element is cut off")
            length, header_length = struct.unpack_from(endian + "L", header, 8)[0], 12
        else:
            length, header_length = struct.unpack_from(endian + "H", header, 6)[0], 8
    value_start = start + header_length
    remaining = size - value_start

    rows = _int_attribute(dataset, "Rows")
    columns = _int_attribute(dataset, "Columns")
    frames = _int_attribute(dataset, "NumberOfFrames", default=1)
    samples = _int_attribute(dataset, "SamplesPerPixel", default=1)
    bits = _int_attribute(dataset, "BitsAllocated")
    if not rows or not columns:
        raise _Refused(f"{label} without Rows and Columns")
    if frames < 1 or samples < 1:
        raise _Refused(f"invalid Number of Frames ({frames}) or Samples per Pixel ({samples})")
    pixels = rows * columns * frames * samples
    if pixels > max_pixels:
        raise _Refused(f"decompression bomb: Rows x Columns x Frames x Samples = {rows} x {columns} x {frames} x "
                       f"{samples} = {pixels} pixels, over the limit of {max_pixels}")

    if length == 0xFFFFFFFF:
        if transfer_syntax in NATIVE_SYNTAXES:
            raise _Refused(f"corrupt {label}: undefined length in native transfer syntax {transfer_syntax}")
        _check_fragments(stream, value_start, size, label)
        return
    if length > remaining:
        raise _Refused(f"claims more pixel data than it holds: the {label} length field says {length} bytes, "
                       f"only {remaining} remain in the file")
    if transfer_syntax in NATIVE_SYNTAXES:
        if not bits:
            raise _Refused(f"{label} without Bits Allocated")
        stored_samples = 2 if str(plain_get(dataset, "PhotometricInterpretation")).strip() == "YBR_FULL_422" \
            and samples == 3 else samples
        needed = (rows * columns * frames * stored_samples * bits + 7) // 8
        if needed > length:
            raise _Refused(
                f"claims more pixel data than it holds: Rows x Columns x Frames x Samples x BitsAllocated/8 = "
                f"{rows} x {columns} x {frames} x {stored_samples} x {bits}/8 = {needed} bytes, but {label} "
                f"holds {length} (file has {remaining} bytes after the tag)")


def _check_fragments(stream: _WatchedStream, position: int, size: int, label: str) -> None:
    """Walk the items of encapsulated pixel data: every one inside the file, a delimiter at the end."""
    raw = stream._raw
    items = 0
    while True:
        raw.seek(position)
        header = raw.read(8)
        if len(header) < 8:
            raise _Refused(f"claims more pixel data than it holds: encapsulated {label} ends without a sequence "
                           f"delimiter after {items} item(s)")
        group, element, length = struct.unpack("<HHL", header)
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise _Refused(f"corrupt encapsulated {label}: ({group:04X},{element:04X}) where an item belongs, "
                           f"at offset {position}")
        if length == 0xFFFFFFFF or position + 8 + length > size:
            raise _Refused(f"claims more pixel data than it holds: encapsulated {label} item {items} claims "
                           f"{length} bytes at offset {position + 8}, the file has {size}")
        items += 1
        position += 8 + length
    if items < 2:
        raise _Refused(f"encapsulated {label} holds no compressed frame")


def _int_attribute(dataset: Dataset, keyword: str, default: int = 0) -> int:
    value = plain_get(dataset, keyword, None)
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (int, float, str)):
            value = value[0]  # a multi-valued US from a broken writer
        return int(value)
    except (TypeError, ValueError, IndexError) as exc:
        raise _Refused(f"invalid {keyword} {value!r}") from exc


def _strip_deferred(dataset: Dataset) -> None:
    """Drop values that were not read (over ``HEADER_DEFER_BYTES``) and the link to the stream, so
    the header never tries to re-read a file later, let alone one named by the medium."""
    deferred = [tag for tag, element in dataset.items()  # raw elements, nothing converted
                if element.value is None and getattr(element, "length", 0) not in (0, 0xFFFFFFFF)]
    for tag in deferred:
        del dataset[tag]
    for attribute in ("filename", "buffer"):
        if hasattr(dataset, attribute):
            setattr(dataset, attribute, None)


def _add_unique(medium: Medium, instance: FoundInstance, found: dict[str, FoundInstance], scan: MediaScan) -> None:
    first = found.get(instance.sop_instance_uid)
    if first is None:
        found[instance.sop_instance_uid] = instance
        scan.instances.append(instance)
        return
    try:
        same = first.size == instance.size and _sha256(medium, first.path) == _sha256(medium, instance.path)
    except Exception as exc:  # noqa: BLE001 - e.g. a CRC error in a ZIP entry
        scan.problems.append(MediaProblem(
            instance.path, f"same SOP Instance UID as {first.path}, and its content cannot be compared ({exc}); "
                           f"not imported", "error"))
        return
    if same:
        scan.problems.append(MediaProblem(
            instance.path, f"duplicate copy of {first.path} (same SOP Instance UID, identical content); "
                           f"imported once", "warning"))
    else:
        scan.problems.append(MediaProblem(
            instance.path, f"different content with the same SOP Instance UID {instance.sop_instance_uid} as "
                           f"{first.path}; {first.path} is imported, this file is not", "error"))


def _sha256(medium: Medium, path: str) -> str:
    digest = hashlib.sha256()
    with medium.open(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
