"""`discflow validate`: what is wrong with a disc (ISO, ZIP or folder), one rule at a time.

The medium is untrusted and read only through tasks.media_source (no mounting, no links, no
``..``, size limits); nothing on it is ever executed. Each rule gives pass/fail, one line of why,
and the files concerned:

=====================  =======================================================================
rule                   passes when
=====================  =======================================================================
safe-entries           the medium holds no links, special files or names escaping its root
dicom-files            every file under DICOM/ is a readable Part 10 file (preamble, DICM, meta
                       with Transfer Syntax and Media Storage UIDs agreeing with the dataset)
dicomdir               DICOMDIR at the root, readable, a Basic Directory (PS3.3 F) whose records
                       have their Type 1 keys with values and Type 2 keys present (PS3.3 F.5),
                       every value valid for its VR, enumerated values known -- what dciodvfy checks
dicomdir-tree          the record offsets resolve to records and form PATIENT > STUDY > SERIES >
                       leaf, every record reached once (DCMTK warns "Cannot resolve offset")
dicomdir-consistency   every record has its file, every DICOM file its record, and the record's
                       SOP Class/Instance, Transfer Syntax, Patient ID, Study and Series UIDs agree
                       with the file
file-ids               every File ID (records and DICOM/ paths) is 1-8 components of 1-8
                       characters A-Z 0-9 _ (PS3.10 8.2, PS3.12)
transfer-syntaxes      every file's transfer syntax is allowed by the profile (without --profile:
                       by some general-purpose profile; the profiles the disc meets are named)
display-attributes     every image has Samples per Pixel, Photometric Interpretation, Rows,
                       Columns, Bits Allocated/Stored, High Bit, Pixel Representation, Instance
                       Number
report                 each study has a report (SR or Encapsulated PDF) when the profile asks
readme                 README.TXT at the root (IHE PDI)
web-content            every link and image of INDEX.HTM resolves to a file on the medium
autorun                no AUTORUN.INF, or one whose program exists (and one when the profile asks)
executables            always passes: lists programs and scripts found (by name and by content)
=====================  =======================================================================
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pydicom
from pydicom import Dataset, config
from pydicom.datadict import dictionary_has_tag
from pydicom.valuerep import validate_value

from tasks.dicomdir import _LEAF_KEYS
from tasks.media_scan import _WatchedStream
from tasks.media_source import Medium, RefusedFile, open_medium
from tasks.profiles import PROFILES, profile_named
from tasks.report_document import REPORT_CLASSES

__all__ = ["RuleResult", "ValidationReport", "validate_medium"]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
MAX_HEADER_FILE_BYTES = 4 << 30
MAX_DICOMDIR_BYTES = 256 << 20
MAX_DETAILS = 200
DISPLAY_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "InstanceNumber")
_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_EXECUTABLE_SUFFIXES = {".exe", ".com", ".bat", ".cmd", ".msi", ".dll", ".scr", ".pif", ".ps1", ".vbs", ".vbe",
                        ".js", ".jse", ".wsf", ".jar", ".sh", ".app", ".lnk", ".cpl", ".hta"}
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"#!")

# Directory record keys (PS3.3 F.5) as (keyword, type) for the non-leaf levels; leaves as
# tasks.dicomdir writes them. "1": present with a value; "2": present.
_LEVEL_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "PATIENT": (("PatientName", "2"), ("PatientID", "1")),
    "STUDY": (("StudyDate", "1"), ("StudyTime", "1"), ("StudyDescription", "2"), ("StudyInstanceUID", "1"),
              ("StudyID", "1"), ("AccessionNumber", "2")),
    "SERIES": (("Modality", "1"), ("SeriesInstanceUID", "1"), ("SeriesNumber", "1")),
}
_RECORD_TYPES = frozenset({
    "PATIENT", "STUDY", "SERIES", "IMAGE", "RT DOSE", "RT STRUCTURE SET", "RT PLAN", "RT TREAT RECORD",
    "PRESENTATION", "WAVEFORM", "SR DOCUMENT", "KEY OBJECT DOC", "SPECTROSCOPY", "RAW DATA", "REGISTRATION",
    "FIDUCIAL", "HANGING PROTOCOL", "ENCAP DOC", "HL7 STRUC DOC", "VALUE MAP", "STEREOMETRIC", "PALETTE",
    "IMPLANT", "IMPLANT ASSY", "IMPLANT GROUP", "PLAN", "MEASUREMENT", "SURFACE", "SURFACE SCAN", "TRACT",
    "ASSESSMENT", "RADIOTHERAPY", "ANNOTATION", "PRIVATE", "TOPIC", "VISIT", "RESULTS", "INTERPRETATION",
    "STUDY COMPONENT", "MRDR", "OVERLAY", "MODALITY LUT", "VOI LUT", "CURVE", "STORED PRINT",
})
_CHILDREN = {"ROOT": {"PATIENT", "HANGING PROTOCOL", "PALETTE", "IMPLANT", "IMPLANT ASSY", "IMPLANT GROUP",
                      "PRIVATE", "TOPIC"},
             "PATIENT": {"STUDY", "HL7 STRUC DOC", "PRIVATE"},
             "STUDY": {"SERIES", "PRIVATE", "VISIT", "RESULTS", "STUDY COMPONENT", "FILM SESSION"},
             "SERIES": None}  # None: any leaf type
_NO_FILE_TYPES = {"PATIENT", "STUDY", "SERIES", "PRIVATE", "TOPIC", "VISIT", "RESULTS", "STUDY COMPONENT"}


@dataclass
class RuleResult:
    rule: str
    passed: bool
    reason: str
    details: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    medium: str
    profile: str | None
    rules: list[RuleResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(rule.passed for rule in self.rules)

    def rule(self, name: str) -> RuleResult:
        return next(rule for rule in self.rules if rule.rule == name)

    def to_json(self) -> dict[str, Any]:
        return {"medium": self.medium, "profile": self.profile, "passed": self.passed,
                "rules": [asdict(rule) for rule in self.rules]}


def _result(rule: str, problems: list[str], ok: str, bad: str) -> RuleResult:
    """A rule's result: passed with ``ok`` when there are no problems, else ``bad`` and the list."""
    if not problems:
        return RuleResult(rule, True, ok)
    return RuleResult(rule, False, bad.format(n=len(problems)), _capped(problems))


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_DETAILS:
        return lines
    return lines[:MAX_DETAILS] + [f"... and {len(lines) - MAX_DETAILS} more"]


# --------------------------------------------------------------------------------------------
# Reading the medium


@dataclass
class _DicomFile:
    path: str
    part10: bool
    dataset: Dataset | None
    """Header with pixel data deferred (never loaded); None when unreadable."""
    problem: str | None = None

    @property
    def transfer_syntax(self) -> str:
        meta = getattr(self.dataset, "file_meta", None)
        return str(meta.get("TransferSyntaxUID", "") if meta is not None else "").strip("\0 ")

    def text(self, keyword: str) -> str:
        return str(self.dataset.get(keyword, "") if self.dataset is not None else "").strip("\0 ")


@dataclass
class _Record:
    offset: int
    item: Dataset
    kind: str
    parent: "_Record | None" = None


class _Inventory:
    """What validation needs from the medium, read once."""

    def __init__(self, medium: Medium) -> None:
        self.medium = medium
        listing = list(medium.files())
        self.refused = [entry for entry in listing if entry.refusal]
        self.paths = sorted(entry.path for entry in listing if not entry.refusal)
        self.by_key = {path.upper(): path for path in self.paths}
        self.dicom = {path: self._read(path) for path in self.paths if path.upper().startswith("DICOM/")}

    def find(self, media_path: str) -> str | None:
        """A path on the medium, matched case-insensitively (Windows and ISO readers do so)."""
        return self.by_key.get(media_path.strip("/").upper())

    def _read(self, path: str) -> _DicomFile:
        try:
            if self.medium.size(path) > MAX_HEADER_FILE_BYTES:
                return _DicomFile(path, False, None, "larger than 4 GiB")
            with self.medium.open(path) as raw:
                head = raw.read(132)
                raw.seek(0)
                # No file name behind the stream: a deferred value can never re-open a path.
                stream = _WatchedStream(raw, self.medium.size(path))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dataset = pydicom.dcmread(stream, defer_size=1024, force=True)
                if stream.overrun:
                    return _DicomFile(path, False, None, f"truncated: {stream.overrun}")
        except RefusedFile as error:
            return _DicomFile(path, False, None, error.reason)
        except Exception as error:  # noqa: BLE001 - any parse failure of an untrusted file
            return _DicomFile(path, False, None, f"unreadable ({type(error).__name__}: {error})")
        part10 = len(head) == 132 and head[128:132] == b"DICM"
        return _DicomFile(path, part10, dataset)


# --------------------------------------------------------------------------------------------
# Rules


def _safe_entries(inventory: _Inventory) -> RuleResult:
    problems = [f"{entry.path}: {entry.refusal}" for entry in inventory.refused]
    return _result("safe-entries", problems, "no links, special files or names escaping the medium",
                   "{n} entry(ies) refused by the safe media reader")


def _dicom_files(inventory: _Inventory) -> RuleResult:
    problems = []
    for path, found in inventory.dicom.items():
        if found.dataset is None:
            problems.append(f"{path}: {found.problem}")
        elif not found.part10:
            problems.append(f"{path}: not Part 10 (no 128-byte preamble and DICM prefix)")
        elif not found.transfer_syntax:
            problems.append(f"{path}: file meta information without Transfer Syntax UID")
        elif found.dataset.file_meta.get("MediaStorageSOPClassUID") != found.dataset.get("SOPClassUID") or \
                found.dataset.file_meta.get("MediaStorageSOPInstanceUID") != found.dataset.get("SOPInstanceUID"):
            problems.append(f"{path}: Media Storage SOP Class/Instance UID disagree with the dataset")
    if not inventory.dicom:
        return RuleResult("dicom-files", False, "no files under DICOM/")
    return _result("dicom-files", problems, f"{len(inventory.dicom)} file(s) under DICOM/, all Part 10",
                   "{n} file(s) under DICOM/ are not readable Part 10 files")


class _Directory:
    """The DICOMDIR as read, with the problems each rule reports about it."""

    def __init__(self, inventory: _Inventory) -> None:
        self.path = inventory.find("DICOMDIR")
        self.dataset: Dataset | None = None
        self.unreadable: str | None = None
        self.records: dict[int, _Record] = {}
        if self.path is None:
            self.unreadable = "no DICOMDIR at the root of the medium"
            return
        try:
            if inventory.medium.size(self.path) > MAX_DICOMDIR_BYTES:
                raise ValueError(f"larger than {MAX_DICOMDIR_BYTES} bytes")
            with inventory.medium.open(self.path) as stream, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = stream.read()
                self.dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
                items = list(self.dataset.get("DirectoryRecordSequence") or [])
            if data[128:132] != b"DICM":
                raise ValueError("not a Part 10 file")
            self.records = {item.seq_item_tell: _Record(item.seq_item_tell, item,
                                                       str(item.get("DirectoryRecordType", "")).strip())
                            for item in items}
        except Exception as error:  # noqa: BLE001 - any parse failure of an untrusted file
            self.unreadable = f"unreadable ({type(error).__name__}: {error})"
            self.dataset = None


def _dicomdir(directory: _Directory) -> RuleResult:
    if directory.dataset is None:
        return RuleResult("dicomdir", False, directory.unreadable or "unreadable")
    ds = directory.dataset
    problems = []
    meta = ds.file_meta
    if str(meta.get("MediaStorageSOPClassUID", "")) != MEDIA_STORAGE_DIRECTORY:
        problems.append("file meta: Media Storage SOP Class is not Media Storage Directory Storage")
    if str(meta.get("TransferSyntaxUID", "")) != EXPLICIT_VR_LITTLE_ENDIAN:
        problems.append("file meta: a DICOMDIR must be Explicit VR Little Endian")
    for keyword in ("OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity",
                    "OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity", "FileSetConsistencyFlag"):
        if ds.get(keyword) is None:
            problems.append(f"File-set Identification: {keyword} (Type 1) missing")
    for keyword in ("FileSetID", "DirectoryRecordSequence"):
        if keyword not in ds:
            problems.append(f"File-set Identification: {keyword} (Type 2) missing")
    if ds.get("FileSetConsistencyFlag") not in (None, 0):
        problems.append(f"File-set Consistency Flag {ds.FileSetConsistencyFlag} is not 0")
    problems += _value_problems(ds, "top level", skip_sequences=True)
    for number, record in enumerate(directory.records.values(), start=1):
        problems += _record_problems(record, number)
    return _result("dicomdir", problems, f"readable Basic Directory, {len(directory.records)} record(s) with "
                   "their required keys", "{n} problem(s) in the DICOMDIR")


def _record_problems(record: _Record, number: int) -> list[str]:
    where = f"record #{number} ({record.kind or 'no type'})"
    item = record.item
    problems = []
    if record.kind not in _RECORD_TYPES:
        problems.append(f"{where}: unknown Directory Record Type {record.kind!r}")
    for keyword in ("OffsetOfTheNextDirectoryRecord", "OffsetOfReferencedLowerLevelDirectoryEntity"):
        if item.get(keyword) is None:
            problems.append(f"{where}: {keyword} (Type 1) missing")
    if record.kind not in _NO_FILE_TYPES:
        for keyword in ("ReferencedFileID", "ReferencedSOPClassUIDInFile", "ReferencedSOPInstanceUIDInFile",
                        "ReferencedTransferSyntaxUIDInFile"):
            if not _has_value(item, keyword):
                problems.append(f"{where}: {keyword} (Type 1C) missing")
    keys = _LEVEL_KEYS.get(record.kind) or _LEAF_KEYS.get(record.kind, ())
    for keyword, key_type in keys:
        if key_type == "1" and not _has_value(item, keyword):
            state = "empty" if keyword in item else "missing"
            problems.append(f"{where}: {keyword} (Type 1) {state}")
        elif key_type == "2" and keyword not in item:
            problems.append(f"{where}: {keyword} (Type 2) missing")
    return problems + _value_problems(item, where)


def _has_value(dataset: Dataset, keyword: str) -> bool:
    element = dataset.get(keyword)
    if element is None:
        return False
    return bool(str(element).strip("\0 ")) if not isinstance(element, (list, pydicom.sequence.Sequence)) \
        else len(element) > 0


def _value_problems(dataset: Dataset, where: str, skip_sequences: bool = False) -> list[str]:
    """Values invalid for their VR (pydicom's PS3.5 checks plus UID roots) and unknown standard tags."""
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for element in dataset:
            tag = element.tag
            if tag.group % 2 == 0 and tag.group > 0x0002 and not dictionary_has_tag(tag):
                problems.append(f"{where}: ({tag.group:04X},{tag.element:04X}) is not a standard attribute")
                continue
            if element.VR == "SQ":
                if not skip_sequences:
                    for item in element.value or []:
                        problems += _value_problems(item, where)
                continue
            problems += _element_problems(element, where)
    return problems


def _element_problems(element: Any, where: str) -> list[str]:
    if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "US", "UL", "SS", "SL", "FL", "FD", "AT", "SV", "UV"):
        return []
    values = element.value if isinstance(element.value, (list, tuple, pydicom.multival.MultiValue)) \
        else [element.value]
    problems = []
    for value in values:
        if value is None or value == "":
            continue
        text = str(value).rstrip("\0 ") if element.VR == "UI" else str(value)
        try:
            validate_value(element.VR, text if element.VR not in ("IS", "DS") else text.strip(), config.RAISE)
            if element.VR == "UI" and not _UID.fullmatch(text):
                raise ValueError(f"UID {text!r} has an illegal root or component")
        except (ValueError, TypeError) as error:
            problems.append(f"{where}: {element.keyword or element.tag} value invalid for VR {element.VR} ({error})")
    return problems


def _walk_tree(directory: _Directory) -> tuple[list[str], dict[int, _Record]]:
    """Follow the offsets from the root; return problems and the records reached (with parents)."""
    ds, records = directory.dataset, directory.records
    problems: list[str] = []
    reached: dict[int, _Record] = {}
    chains: list[tuple[int, _Record | None]] = [
        (int(ds.get("OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity") or 0), None)]
    while chains:
        offset, parent = chains.pop()
        while offset:
            record = records.get(offset)
            if record is None:
                problems.append(f"offset {offset} (under {parent.kind if parent else 'the root'}) points to no record")
                break
            if offset in reached:
                problems.append(f"record at offset {offset} is reached twice (a loop or shared record)")
                break
            record.parent = parent
            reached[offset] = record
            allowed = _CHILDREN.get(parent.kind if parent else "ROOT", set())
            if parent is not None and parent.kind not in _CHILDREN:
                problems.append(f"{record.kind} record at offset {offset} sits under a {parent.kind} record")
            elif allowed is not None and record.kind not in allowed:
                problems.append(f"{record.kind} record at offset {offset} cannot sit under "
                                f"{parent.kind if parent else 'the root'}")
            lower = int(record.item.get("OffsetOfReferencedLowerLevelDirectoryEntity") or 0)
            if lower:
                chains.append((lower, record))
            offset = int(record.item.get("OffsetOfTheNextDirectoryRecord") or 0)
    orphans = len(records) - len(reached)
    if orphans:
        problems.append(f"{orphans} record(s) cannot be reached from the root")
    return problems, reached


def _dicomdir_tree(directory: _Directory) -> tuple[RuleResult, dict[int, _Record]]:
    if directory.dataset is None:
        return RuleResult("dicomdir-tree", False, "no readable DICOMDIR"), {}
    problems, reached = _walk_tree(directory)
    return _result("dicomdir-tree", problems, "every record offset resolves; PATIENT > STUDY > SERIES > leaf",
                   "{n} problem(s) with the record tree"), reached


def _ancestor(record: _Record, kind: str) -> _Record | None:
    while record is not None and record.kind != kind:
        record = record.parent
    return record


def _file_id(item: Dataset) -> list[str]:
    value = item.get("ReferencedFileID")
    if value is None:
        return []
    return [str(part).strip() for part in (value if not isinstance(value, str) else [value])]


def _dicomdir_consistency(inventory: _Inventory, directory: _Directory) -> RuleResult:
    if directory.dataset is None:
        return RuleResult("dicomdir-consistency", False, "no readable DICOMDIR to compare with the files")
    problems: list[str] = []
    referenced: set[str] = set()
    for record in directory.records.values():
        components = _file_id(record.item)
        if not components:
            continue
        name = "/".join(components)
        path = inventory.find(name)
        if path is None:
            problems.append(f"{name}: referenced by a {record.kind} record but missing from the medium")
            continue
        referenced.add(path)
        found = inventory.dicom.get(path)
        if found is not None and found.dataset is not None:
            problems += _key_disagreements(record, found)
    for path in inventory.dicom:
        if path not in referenced:
            problems.append(f"{path}: a DICOM file no DICOMDIR record references")
    return _result("dicomdir-consistency", problems, f"{len(referenced)} record(s) and file(s) match both ways",
                   "{n} disagreement(s) between the DICOMDIR and the files")


def _key_disagreements(record: _Record, found: _DicomFile) -> list[str]:
    checks = [("ReferencedSOPClassUIDInFile", "SOPClassUID", record),
              ("ReferencedSOPInstanceUIDInFile", "SOPInstanceUID", record),
              ("SeriesInstanceUID", "SeriesInstanceUID", _ancestor(record, "SERIES")),
              ("StudyInstanceUID", "StudyInstanceUID", _ancestor(record, "STUDY")),
              ("PatientID", "PatientID", _ancestor(record, "PATIENT"))]
    problems = []
    for record_keyword, file_keyword, holder in checks:
        if holder is None or record_keyword not in holder.item:
            continue  # an unreachable record or a missing key: the dicomdir rules report those
        in_file = found.text(file_keyword)
        in_record = str(holder.item.get(record_keyword, "")).strip("\0 ")
        if keyword_agrees(in_record, in_file, file_keyword):
            continue
        problems.append(f"{found.path}: {file_keyword} in the record is {in_record!r}, in the file {in_file!r}")
    syntax = str(record.item.get("ReferencedTransferSyntaxUIDInFile", "")).strip("\0 ")
    if syntax and syntax != found.transfer_syntax:
        problems.append(f"{found.path}: Transfer Syntax in the record is {syntax}, in the file {found.transfer_syntax}")
    return problems


def keyword_agrees(in_record: str, in_file: str, keyword: str) -> bool:
    """Record and file agree; a Patient ID the writer had to invent (file has none) or make valid
    for its VR (backslash, length) is not a disagreement."""
    if in_record == in_file:
        return True
    if keyword == "PatientID":
        return not in_file or in_record == in_file.replace("\\", " ")[:64].strip()
    return False


def _file_ids(inventory: _Inventory, directory: _Directory) -> RuleResult:
    problems = []
    for record in directory.records.values():
        components = _file_id(record.item)
        if components and not _legal(components):
            shown = "\\".join(components)
            problems.append(f"record {record.kind}: Referenced File ID {shown!r} is not legal")
    for path in inventory.dicom:
        if not _legal(path.split("/")):
            problems.append(f"{path}: not a legal File ID (1-8 components of 1-8 characters A-Z 0-9 _)")
    return _result("file-ids", problems, "every File ID is 1-8 components of 1-8 characters A-Z 0-9 _",
                   "{n} illegal File ID(s)")


def _legal(components: list[str]) -> bool:
    return 1 <= len(components) <= 8 and all(_COMPONENT.fullmatch(part) for part in components)


def _readable(inventory: _Inventory) -> list[_DicomFile]:
    return [found for found in inventory.dicom.values() if found.dataset is not None]


def _transfer_syntaxes(inventory: _Inventory, profile: str | None) -> RuleResult:
    files = _readable(inventory)
    syntaxes = {found.path: found.transfer_syntax for found in files}
    meets = [name for name, p in PROFILES.items() if set(syntaxes.values()) <= p.transfer_syntaxes]
    if profile:
        allowed = profile_named(profile).transfer_syntaxes
        label = profile_named(profile).name
    else:
        allowed = frozenset().union(*(p.transfer_syntaxes for p in PROFILES.values()))
        label = "any general-purpose profile"
    problems = [f"{path}: {syntax or '(none)'} not allowed by {label}" for path, syntax in syntaxes.items()
                if syntax not in allowed]
    return _result("transfer-syntaxes", problems,
                   f"{len(set(syntaxes.values()))} transfer syntax(es), allowed by {label}; the disc meets "
                   f"{', '.join(meets) or 'no general-purpose profile'}",
                   "{n} file(s) in a transfer syntax " + label + " does not allow")


def _display_attributes(inventory: _Inventory) -> RuleResult:
    problems = []
    images = [found for found in _readable(inventory) if "PixelData" in found.dataset]
    for found in images:
        missing = [k for k in DISPLAY_KEYWORDS if found.dataset.get(k) is None or str(found.dataset.get(k)) == ""]
        if missing:
            problems.append(f"{found.path}: missing {', '.join(missing)}")
    return _result("display-attributes", problems, f"{len(images)} image(s) have every attribute needed for display",
                   "{n} image(s) lack attributes needed for display")


def _report(inventory: _Inventory, profile: str | None) -> RuleResult:
    studies: dict[str, bool] = defaultdict(bool)
    for found in _readable(inventory):
        studies[found.text("StudyInstanceUID")] |= found.text("SOPClassUID") in REPORT_CLASSES
    with_report = sum(studies.values())
    required = bool(profile) and profile_named(profile).requires_report
    if not required:
        return RuleResult("report", True, f"not required by {profile or 'the general-purpose profiles'}; "
                                          f"{with_report} of {len(studies)} study(ies) have one")
    missing = [f"study {uid}: no SR or Encapsulated PDF report" for uid, has in studies.items() if not has]
    return _result("report", missing, f"every study ({len(studies)}) has its report",
                   "{n} study(ies) without the report " + profile_named(profile).name + " requires")


def _readme(inventory: _Inventory) -> RuleResult:
    if inventory.find("README.TXT"):
        return RuleResult("readme", True, "README.TXT present")
    return RuleResult("readme", False, "no README.TXT at the root (IHE PDI requires one)")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.targets.append(value)


def _web_content(inventory: _Inventory) -> RuleResult:
    index = inventory.find("INDEX.HTM")
    if index is None:
        return RuleResult("web-content", True, "no INDEX.HTM (web content is optional)")
    with inventory.medium.open(index) as stream:
        parser = _Links()
        parser.feed(stream.read(16 << 20).decode("utf-8", "replace"))
    problems = []
    local = 0
    for target in parser.targets:
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:
            continue  # another site, or an anchor on the same page
        local += 1
        resolved = PurePosixPath(PurePosixPath(index).parent, unquote(parts.path)).as_posix()
        if ".." in resolved.split("/") or inventory.find(resolved) is None:
            problems.append(f"INDEX.HTM links to {target}, which is not on the medium")
    return _result("web-content", problems, f"INDEX.HTM: all {local} local link(s) and image(s) resolve",
                   "{n} broken link(s) or image(s) in INDEX.HTM")


def _autorun_targets(text: str) -> list[str]:
    targets, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]").strip().lower()
            continue
        key, _, value = line.partition("=")
        key = key.strip().lower()
        if section == "autorun" and value.strip() and (key in ("open", "shellexecute") or key.endswith("\\command")):
            value = value.strip()
            target = value[1:].split('"', 1)[0] if value.startswith('"') else value.split()[0]
            targets.append(target.replace("\\", "/").lstrip("/"))
    return targets


def _autorun(inventory: _Inventory, profile: str | None) -> RuleResult:
    required = bool(profile) and profile_named(profile).requires_viewer
    path = inventory.find("AUTORUN.INF")
    if path is None:
        if required:
            return RuleResult("autorun", False, f"no AUTORUN.INF, but {profile_named(profile).name} requires a viewer "
                                                "with autorun")
        return RuleResult("autorun", True, "no AUTORUN.INF")
    with inventory.medium.open(path) as stream:
        targets = _autorun_targets(stream.read(1 << 20).decode("latin-1"))
    if not targets:
        return RuleResult("autorun", False, "AUTORUN.INF names no program to start (no open= in [autorun])")
    missing = [t for t in targets if inventory.find(t) is None]
    if missing:
        return RuleResult("autorun", False, f"AUTORUN.INF starts {', '.join(missing)}, which is not on the medium",
                          [f"target: {t}" for t in targets])
    return RuleResult("autorun", True, f"AUTORUN.INF starts {', '.join(targets)} (present)",
                      [f"target: {t}" for t in targets])


def _executables(inventory: _Inventory) -> RuleResult:
    found = []
    for path in inventory.paths:
        if path in inventory.dicom:
            continue
        by_name = PurePosixPath(path).suffix.lower() in _EXECUTABLE_SUFFIXES or path.upper() == "AUTORUN.INF"
        try:
            with inventory.medium.open(path) as stream:
                head = stream.read(4)
        except RefusedFile:
            continue
        if by_name or head.startswith(_EXECUTABLE_MAGIC):
            found.append(path)
    reason = f"{len(found)} program(s)/script(s) on the medium (listed, never run)" if found else \
        "no programs or scripts"
    return RuleResult("executables", True, reason, _capped(found))


def validate_medium(location: Path | str, profile: str | None = None) -> ValidationReport:
    """Check the disc at ``location`` (ISO, ZIP or folder) against every rule; see the module doc."""
    if profile:
        profile = profile_named(profile).name
    report = ValidationReport(str(location), profile)
    with open_medium(Path(location)) as medium:
        inventory = _Inventory(medium)
        directory = _Directory(inventory)
        tree, _ = _dicomdir_tree(directory)
        checks: list[Callable[[], RuleResult]] = [
            lambda: _safe_entries(inventory), lambda: _dicom_files(inventory), lambda: _dicomdir(directory),
            lambda: tree, lambda: _dicomdir_consistency(inventory, directory),
            lambda: _file_ids(inventory, directory), lambda: _transfer_syntaxes(inventory, profile),
            lambda: _display_attributes(inventory), lambda: _report(inventory, profile),
            lambda: _readme(inventory), lambda: _web_content(inventory), lambda: _autorun(inventory, profile),
            lambda: _executables(inventory)]
        report.rules = [check() for check in checks]
    return report

