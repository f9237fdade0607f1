"""The DICOMDIR of a volume: a Basic Directory (PS3.3 F, PS3.10 8) written straight from the manifest.

Why not :class:`pydicom.fileset.FileSet`: it re-reads and copies every referenced file and checks
for duplicates pairwise, which takes minutes for 10,000 instances. Everything a directory record
needs is already in the job manifest (header subsets as DICOM JSON), so this module builds the
records from those subsets and encodes the file in one pass.

How the offsets are computed
    Each record is one item of the Directory Record Sequence. Its body (record type, referenced
    file, keys) is encoded once, without offsets; the three group-0004 elements that carry them,
    (0004,1400) Offset of the Next Directory Record, (0004,1410) Record In-use Flag and
    (0004,1420) Offset of Referenced Lower-Level Directory Entity, sort before every key and have
    fixed lengths (UL, US, UL), so they are packed by hand in front of the body. All item lengths
    are therefore known before any offset is, the byte position of every item tag follows by a
    running sum, and the file is assembled once. Offsets count from the first byte of the file,
    the 128-byte preamble and ``DICM`` included, as PS3.3 F.3.2.1 defines them (the File Meta
    Information starts with the preamble).

    Group 0004 of a record, i.e. also (0004,1430) Directory Record Type and the leaf's
    (0004,1500)-(0004,1512) Referenced File ID / SOP Class / SOP Instance / Transfer Syntax, is
    fixed-VR ASCII and packed with ``struct``; pydicom encodes the keys (groups 0008 and up).
    10,000 instances take about 0.6 s, most of it pydicom.

Record order is depth first (PATIENT, its first STUDY, its first SERIES, that series' leaves, the
next SERIES, ...), as DCMTK and pydicom write it; siblings keep the order in which the entries
arrived (the caller sorts, e.g. by Instance Number).

Keys (PS3.3 F.5, as pydicom.fileset's DIRECTORY_RECORDERS and DCMTK's dcmmkdir write them)
    Type 2 keys are always present, empty when unknown. Type 1 keys missing from the header get a
    stand-in, each one logged: Patient ID ``DF`` + 14 hex digits of a hash of name and birth
    date (stable across reruns); Study Date/Time from a series, acquisition or content
    date/time, else today's date (DCMTK's choice) and 000000; Study ID ``DF`` + 10 hex digits
    of a hash of the Study Instance UID; Modality OT; Series and Instance Number the position in
    the study or series; leaf dates from other dates of the instance. Type 1 keys with no honest
    stand-in (an SR's Concept Name, an RT dose's summation type) stay empty and are logged.
    Values that break their VR (lower-case CS, ``2024-01-01``, overlong LO) are made
    conformant in the record; the file is not touched. A record whose keys are not ASCII gets
    (0008,0005) ISO_IR 100 when Latin-1 suffices, else ISO_IR 192. The DVD/USB profiles add their
    Type 1C keys (birth date, sex, institution, performing physician) when the header has them.
    Record In-use Flag (0004,1410) is retired but still written (0xFFFF), as DCMTK and pydicom do,
    for old readers. Log notes name levels by File ID, never by patient data.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VM
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage
from pydicom.valuerep import PersonName

from tasks.spool import atomic_writer

log = logging.getLogger(__name__)

__all__ = [
    "DirectoryEntry", "PROFILE_TRANSFER_SYNTAXES", "RECORD_INSTANCE_KEYWORDS", "check_profile", "file_id_for",
    "group_entries", "record_type", "write_dicomdir",
]

# --------------------------------------------------------------------------------------------
# File IDs

_FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")
_FILE_SET_ID = re.compile(r"[A-Z0-9_ ]{0,16}")


def validate_file_id(file_id: Sequence[str]) -> tuple[str, ...]:
    """``file_id`` as a tuple, or ValueError unless it is a PS3.10 8.2 / PS3.12 File ID:
    1 to 8 components of 1 to 8 characters from A-Z, 0-9 and ``_``."""
    if isinstance(file_id, str):
        raise ValueError(f"a File ID is a sequence of components, not the string {file_id!r}")
    components = tuple(file_id)
    if not 1 <= len(components) <= 8:
        raise ValueError(f"a File ID has 1 to 8 components, not {len(components)}: {components!r}")
    for component in components:
        if not isinstance(component, str) or not _FILE_ID_COMPONENT.fullmatch(component):
            raise ValueError(f"File ID component {component!r} is not 1-8 characters of A-Z, 0-9, _")
    return components


def file_id_for(patient_no: int, study_no: int, series_no: int, instance_no: int) -> tuple[str, ...]:
    """The File ID of an instance on a volume: ``DICOM/Pppppppp/Sssssss/Sxxxxxxx/Iiiiiiii``.

    All numbers are 1-based and count within the volume: ``patient_no`` among the volume's
    patients, ``study_no`` and ``series_no`` among its studies and series (the caller may count
    them per volume or per parent; both give unique paths because the parent directories
    differ), ``instance_no`` within the series. Each number is written with 7 digits after its
    letter (P, S, S, I), so a component is 8 characters, sorts naturally, and no two volumes'
    layouts need to agree. Five components leave room under the 8-level limit of PS3.10 and
    ISO 9660 Level 1; only upper-case letters and digits are used (PS3.12 F.1.2.1).
    """
    numbers = {"patient_no": patient_no, "study_no": study_no, "series_no": series_no,
               "instance_no": instance_no}
    for name, value in numbers.items():
        if not isinstance(value, int) or not 1 <= value <= 9_999_999:
            raise ValueError(f"{name} must be an integer from 1 to 9999999, not {value!r}")
    return ("DICOM", f"P{patient_no:07d}", f"S{study_no:07d}", f"S{series_no:07d}", f"I{instance_no:07d}")


# --------------------------------------------------------------------------------------------
# Entries


@dataclass
class DirectoryEntry:
    """One instance on the volume: where it is, what it is, and its header subsets per level."""

    file_id: tuple[str, ...]
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    patient: Dataset = field(repr=False)
    """tasks.manifest.PATIENT_KEYWORDS of the instance (Dataset.from_json of the manifest level)."""
    study: Dataset = field(repr=False)
    series: Dataset = field(repr=False)
    instance: Dataset = field(repr=False)

    def __post_init__(self) -> None:
        self.file_id = validate_file_id(self.file_id)
        for name in ("sop_class_uid", "sop_instance_uid", "transfer_syntax"):
            value = str(getattr(self, name) or "").strip()
            if not value:
                raise ValueError(f"{'/'.join(self.file_id)}: {name} is empty")
            setattr(self, name, value)


# --------------------------------------------------------------------------------------------
# Record types

try:  # pydicom's tables, kept current with the standard by pydicom
    from pydicom.fileset import _FOUR_LEVEL_SOP_CLASSES as _PYDICOM_LEAF_TYPES
    from pydicom.fileset import _SINGLE_LEVEL_SOP_CLASSES as _PYDICOM_TOP_TYPES
except ImportError:  # pragma: no cover - private names; fall back to the common classes
    _PYDICOM_LEAF_TYPES = {
        "1.2.840.10008.5.1.4.1.1.481.2": "RT DOSE", "1.2.840.10008.5.1.4.1.1.481.3": "RT STRUCTURE SET",
        "1.2.840.10008.5.1.4.1.1.481.4": "RT TREAT RECORD",
        "1.2.840.10008.5.1.4.1.1.11.1": "PRESENTATION", "1.2.840.10008.5.1.4.1.1.11.2": "PRESENTATION",
        "1.2.840.10008.5.1.4.1.1.11.3": "PRESENTATION", "1.2.840.10008.5.1.4.1.1.11.4": "PRESENTATION",
        "1.2.840.10008.5.1.4.1.1.9.1.1": "WAVEFORM", "1.2.840.10008.5.1.4.1.1.9.1.2": "WAVEFORM",
        "1.2.840.10008.5.1.4.1.1.9.1.3": "WAVEFORM", "1.2.840.10008.5.1.4.1.1.9.2.1": "WAVEFORM",
        "1.2.840.10008.5.1.4.1.1.9.3.1": "WAVEFORM", "1.2.840.10008.5.1.4.1.1.9.4.1": "WAVEFORM",
        "1.2.840.10008.5.1.4.1.1.88.11": "SR DOCUMENT", "1.2.840.10008.5.1.4.1.1.88.22": "SR DOCUMENT",
        "1.2.840.10008.5.1.4.1.1.88.33": "SR DOCUMENT", "1.2.840.10008.5.1.4.1.1.88.34": "SR DOCUMENT",
        "1.2.840.10008.5.1.4.1.1.88.35": "SR DOCUMENT", "1.2.840.10008.5.1.4.1.1.88.50": "SR DOCUMENT",
        "1.2.840.10008.5.1.4.1.1.88.65": "SR DOCUMENT", "1.2.840.10008.5.1.4.1.1.88.67": "SR DOCUMENT",
        "1.2.840.10008.5.1.4.1.1.88.59": "KEY OBJECT DOC", "1.2.840.10008.5.1.4.1.1.4.2": "SPECTROSCOPY",
        "1.2.840.10008.5.1.4.1.1.66": "RAW DATA", "1.2.840.10008.5.1.4.1.1.66.1": "REGISTRATION",
        "1.2.840.10008.5.1.4.1.1.66.3": "REGISTRATION", "1.2.840.10008.5.1.4.1.1.66.2": "FIDUCIAL",
        "1.2.840.10008.5.1.4.1.1.67": "VALUE MAP",
    }
    _PYDICOM_TOP_TYPES = {
        "1.2.840.10008.5.1.4.38.1": "HANGING PROTOCOL", "1.2.840.10008.5.1.4.39.1": "PALETTE",
        "1.2.840.10008.5.1.4.43.1": "IMPLANT", "1.2.840.10008.5.1.4.44.1": "IMPLANT ASSY",
        "1.2.840.10008.5.1.4.45.1": "IMPLANT GROUP",
    }

# pydicom decides these from the dataset (EncapsulatedDocument / RTPlanLabel present); we only
# have the SOP Class, so they are listed by class.
_LEAF_TYPES: dict[str, str] = {str(uid): name for uid, name in _PYDICOM_LEAF_TYPES.items()}
_LEAF_TYPES.update({
    "1.2.840.10008.5.1.4.1.1.104.1": "ENCAP DOC",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.104.2": "ENCAP DOC",  # Encapsulated CDA
    "1.2.840.10008.5.1.4.1.1.104.3": "ENCAP DOC",  # Encapsulated STL
    "1.2.840.10008.5.1.4.1.1.104.4": "ENCAP DOC",  # Encapsulated OBJ
    "1.2.840.10008.5.1.4.1.1.104.5": "ENCAP DOC",  # Encapsulated MTL
    "1.2.840.10008.5.1.4.1.1.481.5": "RT PLAN",    # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.8": "RT PLAN",    # RT Ion Plan
})
_TOP_LEVEL_TYPES: dict[str, str] = {str(uid): name for uid, name in _PYDICOM_TOP_TYPES.items()}


def record_type(sop_class_uid: str, modality: str | None = None) -> str:
    """The Directory Record Type (0004,1430) of an instance of ``sop_class_uid`` (PS3.3 F.4).

    ``modality`` refines it as pydicom does: RTINTENT, RTSEGANN and RTRAD instances are
    RADIOTHERAPY records, PLAN ones PLAN records. Image SOP classes, and any class not
    listed, are IMAGE. Hanging protocols, palettes and implant templates get their top-level
    record type, which :func:`write_dicomdir` refuses (they belong to no patient).
    """
    uid = str(sop_class_uid).strip()
    if modality in ("RTINTENT", "RTSEGANN", "RTRAD"):
        return "RADIOTHERAPY"
    if modality == "PLAN":
        return "PLAN"
    return _TOP_LEVEL_TYPES.get(uid) or _LEAF_TYPES.get(uid) or "IMAGE"


# --------------------------------------------------------------------------------------------
# Media profiles (PS3.11): which transfer syntaxes the referenced files may use

_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70")
_J2K = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
PROFILE_TRANSFER_SYNTAXES: dict[str, frozenset[str]] = {
    "STD-GEN-CD": frozenset({ExplicitVRLittleEndian}),
    "STD-GEN-DVD-JPEG": frozenset({ExplicitVRLittleEndian, *_JPEG}),
    "STD-GEN-DVD-J2K": frozenset({ExplicitVRLittleEndian, *_JPEG, *_J2K}),
    "STD-GEN-USB-JPEG": frozenset({ExplicitVRLittleEndian, *_JPEG}),
    "STD-GEN-USB-J2K": frozenset({ExplicitVRLittleEndian, *_JPEG, *_J2K}),
    "USB": frozenset({ExplicitVRLittleEndian, *_JPEG, *_J2K}),
    "GUIDELINE": frozenset({ExplicitVRLittleEndian, *_JPEG}),
}
"""Transfer syntaxes each media profile allows (PS3.11 Annex D / DCMTK dcmmkdir's checks).
JPEG lossless is Process 14 SV1 (.4.70) only; the DVD/USB JPEG 2000 profiles include the JPEG
ones. ``USB`` is discflow's name for STD-GEN-USB-J2K. ``GUIDELINE`` (a national guideline for
discs between hospitals): images raw, or JPEG lossless / extended when compression is asked.
tasks.profiles adds what else each profile asks for (report, viewer)."""


def check_profile(entries: Iterable[DirectoryEntry], profile: str) -> list[str]:
    """The entries whose transfer syntax ``profile`` does not allow, one message each."""
    try:
        allowed = PROFILE_TRANSFER_SYNTAXES[profile]
    except KeyError:
        raise ValueError(f"unknown media profile {profile!r}; known: {', '.join(PROFILE_TRANSFER_SYNTAXES)}")
    return [f"{'/'.join(e.file_id)}: transfer syntax {e.transfer_syntax} is not allowed by {profile}"
            for e in entries if e.transfer_syntax not in allowed]


# --------------------------------------------------------------------------------------------
# Grouping


@dataclass
class SeriesGroup:
    uid: str
    dataset: Dataset
    entries: list[DirectoryEntry] = field(default_factory=list)


@dataclass
class StudyGroup:
    uid: str
    dataset: Dataset
    series: dict[str, SeriesGroup] = field(default_factory=dict)


@dataclass
class PatientGroup:
    key: tuple[str, str]
    dataset: Dataset
    studies: dict[str, StudyGroup] = field(default_factory=dict)


def _text(dataset: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as a stripped string, '' when absent or empty."""
    element = dataset.get(keyword)
    if element is None:
        return ""
    if isinstance(element, (list, tuple, MultiValue)):  # multi-valued: the DICOM string form
        return "\\".join(str(v) for v in element).strip()
    return str(element).strip()


def patient_key(patient: Dataset) -> tuple[str, str]:
    """Patients are told apart by (Patient ID, Issuer of Patient ID); with no Patient ID, by
    (name, birth date) -- the manifest groups anonymous patients by name the same way."""
    patient_id = _text(patient, "PatientID")
    if patient_id:
        return (patient_id, _text(patient, "IssuerOfPatientID"))
    return ("", f"{_text(patient, 'PatientName')}\\{_text(patient, 'PatientBirthDate')}")


def group_entries(entries: Iterable[DirectoryEntry]) -> list[PatientGroup]:
    """Entries grouped patient > study > series > entry, each level in first-seen order.

    Studies are keyed by Study Instance UID within a patient, series by Series Instance UID
    within a study. Raises ValueError for a missing Study/Series Instance UID and for a SOP
    Instance UID or File ID that occurs twice.
    """
    patients: dict[tuple[str, str], PatientGroup] = {}
    seen_uids: dict[str, tuple[str, ...]] = {}
    seen_ids: set[tuple[str, ...]] = set()
    # The entries of a series usually share its patient, study and series Datasets: read their
    # keys once per such trio (keyed by identity; the entries keep the Datasets alive meanwhile).
    level_keys: dict[tuple[int, int, int], tuple[str, str, tuple[str, str]]] = {}
    for entry in entries:
        where = "/".join(entry.file_id)
        if entry.file_id in seen_ids:
            raise ValueError(f"File ID {where} occurs twice")
        seen_ids.add(entry.file_id)
        if entry.sop_instance_uid in seen_uids:
            raise ValueError(f"SOP Instance UID {entry.sop_instance_uid} occurs twice: "
                             f"{'/'.join(seen_uids[entry.sop_instance_uid])} and {where}")
        seen_uids[entry.sop_instance_uid] = entry.file_id
        trio = (id(entry.patient), id(entry.study), id(entry.series))
        keys = level_keys.get(trio)
        if keys is None:
            keys = level_keys[trio] = (_text(entry.study, "StudyInstanceUID"), _text(entry.series, "SeriesInstanceUID"),
                                       patient_key(entry.patient))
        study_uid, series_uid, key = keys
        if not study_uid or not series_uid:
            raise ValueError(f"{where}: Study and Series Instance UID are required")
        patient = patients.get(key)
        if patient is None:
            patient = patients[key] = PatientGroup(key, entry.patient)
        study = patient.studies.get(study_uid)
        if study is None:
            study = patient.studies[study_uid] = StudyGroup(study_uid, entry.study)
        series = study.series.get(series_uid)
        if series is None:
            series = study.series[series_uid] = SeriesGroup(series_uid, entry.series)
        series.entries.append(entry)
    return list(patients.values())


# --------------------------------------------------------------------------------------------
# Record keys (PS3.3 F.5)

# Leaf keys per record type as (keyword, type): "1" must have a value (defaulted when the header
# lacks it, see _DEFAULTS), "2" is always present (empty when unknown), "1C"/"3" only when the
# header has a value. Same keys as pydicom.fileset's DIRECTORY_RECORDERS.
_CONTENT_ID = (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1"), ("ContentLabel", "1"),
               ("ContentDescription", "2"), ("ContentCreatorName", "2"))
_LEAF_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "IMAGE": (("InstanceNumber", "1"),),
    "RT DOSE": (("InstanceNumber", "1"), ("DoseSummationType", "1"), ("DoseComment", "3")),
    "RT STRUCTURE SET": (("InstanceNumber", "1"), ("StructureSetLabel", "1"), ("StructureSetDate", "2"),
                         ("StructureSetTime", "2")),
    "RT PLAN": (("InstanceNumber", "1"), ("RTPlanLabel", "1"), ("RTPlanDate", "2"), ("RTPlanTime", "2")),
    "RT TREAT RECORD": (("InstanceNumber", "1"), ("TreatmentDate", "2"), ("TreatmentTime", "2")),
    "PRESENTATION": (("PresentationCreationDate", "1"), ("PresentationCreationTime", "1"),
                     ("InstanceNumber", "1"), ("ContentLabel", "1"), ("ContentDescription", "2"),
                     ("ContentCreatorName", "2"), ("ReferencedSeriesSequence", "1C"),
                     ("BlendingSequence", "1C")),
    "WAVEFORM": (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1")),
    "SR DOCUMENT": (("InstanceNumber", "1"), ("CompletionFlag", "1"), ("VerificationFlag", "1"),
                    ("ContentDate", "1"), ("ContentTime", "1"), ("VerificationDateTime", "1C"),
                    ("ConceptNameCodeSequence", "1")),
    "KEY OBJECT DOC": (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1"),
                       ("ConceptNameCodeSequence", "1")),
    "SPECTROSCOPY": (("ImageType", "1"), ("ContentDate", "1"), ("ContentTime", "1"), ("InstanceNumber", "1"),
                     ("ReferencedImageEvidenceSequence", "1C"), ("NumberOfFrames", "1"), ("Rows", "1"),
                     ("Columns", "1"), ("DataPointRows", "1"), ("DataPointColumns", "1")),
    "RAW DATA": (("InstanceNumber", "1"), ("ContentDate", "1"), ("ContentTime", "1")),
    "REGISTRATION": _CONTENT_ID,
    "FIDUCIAL": _CONTENT_ID,
    "VALUE MAP": _CONTENT_ID,
    "MEASUREMENT": _CONTENT_ID,
    "SURFACE": _CONTENT_ID,
    "TRACT": _CONTENT_ID,
    "ENCAP DOC": (("ContentDate", "2"), ("ContentTime", "2"), ("InstanceNumber", "1"), ("DocumentTitle", "2"),
                  ("HL7InstanceIdentifier", "1C"), ("ConceptNameCodeSequence", "2"),
                  ("MIMETypeOfEncapsulatedDocument", "1")),
    "STEREOMETRIC": (),
    "PLAN": (),
    "SURFACE SCAN": (("ContentDate", "1"), ("ContentTime", "1")),
    "ASSESSMENT": (("InstanceNumber", "1"), ("InstanceCreationDate", "1"), ("InstanceCreationTime", "2")),
    "RADIOTHERAPY": (("InstanceNumber", "1"), ("UserContentLabel", "1C"), ("UserContentLongLabel", "1C"),
                     ("ContentDescription", "2"), ("ContentCreatorName", "2")),
}

_DATE_SOURCES = ("ContentDate", "AcquisitionDate", "PresentationCreationDate", "SeriesDate", "StudyDate")
_TIME_SOURCES = ("ContentTime", "AcquisitionTime", "PresentationCreationTime", "SeriesTime", "StudyTime")


def _first_value(datasets: Sequence[Dataset], keywords: Sequence[str]) -> str:
    for keyword in keywords:
        for dataset in datasets:
            value = _text(dataset, keyword)
            if value:
                return value
    return ""


# Type 1 leaf keys that have a safe stand-in when the header lacks them. Instance Number falls
# back to the position in the series (set by the caller); dates and times to other dates and
# times of the same instance, series or study. Labels get a neutral label. Anything else (e.g.
# Concept Name Code Sequence of an SR, Dose Summation Type) is left empty with a warning: better
# a directory key a validator complains about than an invented clinical statement.
_DEFAULTS: dict[str, Callable[[Sequence[Dataset]], str]] = {
    "ContentDate": lambda d: _first_value(d, _DATE_SOURCES),
    "ContentTime": lambda d: _first_value(d, _TIME_SOURCES),
    "PresentationCreationDate": lambda d: _first_value(d, ("PresentationCreationDate", *_DATE_SOURCES)),
    "PresentationCreationTime": lambda d: _first_value(d, ("PresentationCreationTime", *_TIME_SOURCES)),
    "InstanceCreationDate": lambda d: _first_value(d, ("InstanceCreationDate", *_DATE_SOURCES)),
    "ContentLabel": lambda d: "UNLABELED",
    "StructureSetLabel": lambda d: "UNLABELED",
    "RTPlanLabel": lambda d: "UNLABELED",
    "CompletionFlag": lambda d: "PARTIAL",        # the conservative claim
    "VerificationFlag": lambda d: "UNVERIFIED",   # the conservative claim
    "MIMETypeOfEncapsulatedDocument": lambda d: "application/octet-stream",
}

RECORD_INSTANCE_KEYWORDS: frozenset[str] = frozenset(
    {keyword for keys in _LEAF_KEYS.values() for keyword, _ in keys}
    | {*_DATE_SOURCES, *_TIME_SOURCES, "VerifyingObserverSequence"})
"""Every attribute of :attr:`DirectoryEntry.instance` that the records read: the leaf keys, the
sources of their stand-ins (:data:`_DEFAULTS`, the study date and time fallbacks) and what a
VERIFIED SR's Verification DateTime comes from. A caller may build ``instance`` from just these
(tasks.media does: converting the whole header subset was most of a volume's time); keep this
set in step with what the record code reads from ``instance``."""


def _has_value(dataset: Dataset, keyword: str) -> bool:
    value = dataset.get(keyword)
    if value is None:
        return False
    if isinstance(value, (str, PersonName)):
        return bool(str(value).strip())
    if isinstance(value, (list, tuple, MultiValue, PydicomSequence)):
        return len(value) > 0
    return True


# Header values from other vendors' studies break VR rules often enough (lower-case Modality,
# 2024-01-01 dates, descriptions over 64 characters, a backslash in a Patient ID) that a record
# copying them verbatim fails validation. Record keys are therefore made conformant; the file
# itself is left as it is.
_MAX_CHARACTERS = {"SH": 16, "LO": 64, "CS": 16, "ST": 1024, "LT": 10240}
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,6})?([+-]\d{4})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _repair(vr: str, value: Any, single: bool) -> Any:
    """``value`` made valid for ``vr``, unchanged when it is; None when it cannot be repaired."""
    if vr in ("SQ", "UI", "OB", "OW", "UN", "US", "UL", "SS", "SL", "FL", "FD", "AT"):
        return value
    text = str(value).strip()
    if vr == "DA":
        digits = re.sub(r"\D", "", text)
        try:
            datetime.datetime.strptime(digits, "%Y%m%d")
        except ValueError:
            return None
        return digits
    if vr == "TM":
        candidate = text.replace(":", "")
        return candidate if _TM.fullmatch(candidate) else None
    if vr == "DT":
        candidate = re.sub(r"[-: T]", "", text[:10]) + re.sub(r"[: ]", "", text[10:])
        return candidate if _DT.fullmatch(candidate) else None
    if vr == "IS":
        try:
            number = int(float(text))
        except ValueError:
            return None
        return number if -(2 ** 31) <= number < 2 ** 31 else None
    if vr == "DS":
        try:
            return format(float(text), ".10g")[:16]
        except ValueError:
            return None
    if vr == "CS":
        repaired = re.sub(r"[^A-Z0-9 _]", "_", text.upper())[:16].strip()
        return repaired or None
    if vr == "PN":
        groups = _CONTROL.sub(" ", text).replace("\\", " ").split("=")[:3]
        return "=".join(group[:64] for group in groups)
    if vr in ("SH", "LO", "UC"):
        repaired = _CONTROL.sub(" ", str(value))
        if single or vr != "UC":
            repaired = repaired.replace("\\", " ")
        return repaired[:_MAX_CHARACTERS.get(vr, len(repaired))]
    if vr in ("ST", "LT", "UT"):
        repaired = re.sub(r"[\x00-\x08\x0b\x0e-\x1f\x7f]", " ", str(value))
        return repaired[:_MAX_CHARACTERS.get(vr, len(repaired))]
    return value


def _conform(element: DataElement) -> DataElement | None:
    """``element`` itself when its values are valid for its VR, a repaired copy when they can be
    made valid, None when nothing valid remains."""
    if element.VR == "SQ" or element.value is None:
        return element
    values = list(element.value) if isinstance(element.value, (MultiValue, list, tuple)) else [element.value]
    try:
        single = dictionary_VM(element.tag) == "1"
    except KeyError:
        single = False
    changed = False
    if single and len(values) > 1:  # VM 1 key with several values: one value
        values = [" ".join(str(v) for v in values)] if element.VR in _TEXT_VRS else values[:1]
        changed = True
    repaired = []
    for value in values:
        fixed = _repair(element.VR, value, single)
        if fixed is None:
            changed = True
        elif fixed == value or fixed == str(value):
            repaired.append(value)
        else:
            repaired.append(fixed)
            changed = True
    if not repaired:
        return None
    if not changed:
        return element
    return DataElement(element.tag, element.VR, repaired if len(repaired) > 1 else repaired[0])


# --------------------------------------------------------------------------------------------
# Encoding

_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_ITEM_TAG = struct.pack("<HH", 0xFFFE, 0xE000)
_OFFSET_ELEMENTS = struct.Struct("<HH2sHI HH2sHH HH2sHI".replace(" ", ""))
_ITEM_OVERHEAD = 8 + _OFFSET_ELEMENTS.size  # item tag + length, then the three offset elements


def _texts(dataset: Dataset) -> Iterable[str]:
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _texts(item)
        elif element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield str(value)


def _character_set(record: Dataset) -> str | None:
    """None for ASCII-only keys; else ISO_IR 100 when Latin-1 suffices, ISO_IR 192 (UTF-8).

    (0008,0005) is Type 1C in a record: required when a key uses a character set other than
    the default repertoire (PS3.3 F.3.2.2). Values arrive decoded (DICOM JSON is Unicode), so
    the original character set of the file does not matter here.
    """
    text = "".join(_texts(record))
    if text.isascii():
        return None
    try:
        text.encode("latin-1")
        return "ISO_IR 100"
    except UnicodeEncodeError:
        return "ISO_IR 192"


_UID_VALUE = re.compile(r"[0-9.]{1,64}")


def _string_element(element: int, vr: bytes, value: str, padding: bytes) -> bytes:
    """A group 0004 string element (CS or UI) in Explicit VR Little Endian."""
    encoded = value.encode("ascii")
    if len(encoded) % 2:
        encoded += padding
    return struct.pack("<HH2sH", 0x0004, element, vr, len(encoded)) + encoded


def _reference_elements(kind: str, entry: DirectoryEntry | None) -> bytes:
    """(0004,1430) Directory Record Type and, for a leaf, (0004,1500)-(0004,1512): the file and
    what it holds. Fixed VRs and ASCII values, so they are packed directly (pydicom's per-element
    validation would cost more than the rest of the record together)."""
    parts = [_string_element(0x1430, b"CS", kind, b" ")]
    if entry is not None:
        for name in ("sop_class_uid", "sop_instance_uid", "transfer_syntax"):
            if not _UID_VALUE.fullmatch(getattr(entry, name)):
                raise ValueError(f"{'/'.join(entry.file_id)}: {name} {getattr(entry, name)!r} is not a valid UID")
        parts += [
            _string_element(0x1500, b"CS", "\\".join(entry.file_id), b" "),
            _string_element(0x1510, b"UI", entry.sop_class_uid, b"\0"),
            _string_element(0x1511, b"UI", entry.sop_instance_uid, b"\0"),
            _string_element(0x1512, b"UI", entry.transfer_syntax, b"\0"),
        ]
    return b"".join(parts)


def _encode_keys(keys: Dataset) -> bytes:
    """The record's keys (groups 0008 and up, so they sort after group 0004) encoded by pydicom,
    or packed directly when all are plain ASCII (:func:`_plain_keys`)."""
    charset = _character_set(keys)
    if charset:
        keys.SpecificCharacterSet = charset
    else:
        plain = _plain_keys(keys)
        if plain is not None:
            return plain
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, keys)
    return buffer.getvalue()


_PLAIN_KEY_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM", "UI"})


def _plain_keys(keys: Dataset) -> bytes | None:
    """The bytes pydicom's ``write_dataset`` gives ``keys`` when every value is ASCII text or a
    number string; None otherwise. An image record has one or two such keys: packing them costs
    a tenth of pydicom's writer, which was a third of a DICOMDIR's time (tests/test_media_writers.py
    checks both agree)."""
    parts = []
    for element in keys:
        value = element.value
        items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        kinds = (int, float, str) if element.VR in ("IS", "DS") else str
        if element.VR not in _PLAIN_KEY_VRS or not all(isinstance(item, kinds) for item in items):
            return None  # an empty (None) value or an odd type: pydicom's writer decides
        texts = [getattr(item, "original_string", None) or str(item) for item in items]
        encoded = "\\".join(texts)
        if not encoded.isascii() or len(encoded) > 0xFFF0:
            return None
        data = encoded.encode("ascii")
        if len(data) % 2:
            data += b"\0" if element.VR == "UI" else b" "
        parts.append(_element(element.tag.group, element.tag.element, element.VR.encode("ascii"), data))
    return b"".join(parts)


class _RecordBuilder:
    """Builds and encodes the records of one DICOMDIR, depth first, with their tree links."""

    def __init__(self, profile_keys: bool) -> None:
        self.profile_keys = profile_keys
        """Add the Type 1C keys of the DVD/USB profiles (PS3.11): birth date, sex, institution."""
        self.bodies: list[bytes] = []
        self.parents: list[int] = []
        self.notes: list[str] = []
        self.today = datetime.date.today()

    def add(self, kind: str, keys: Dataset, parent: int, entry: DirectoryEntry | None = None) -> int:
        """Encode one record: its type, the referenced file (leaves) and its keys."""
        self.bodies.append(_reference_elements(kind, entry) + _encode_keys(keys))
        self.parents.append(parent)
        return len(self.bodies) - 1

    def note(self, message: str) -> None:
        self.notes.append(message)

    def take(self, record: Dataset, source: Dataset, keyword: str, where: str) -> bool:
        """Copy ``keyword`` from ``source`` if it has a value valid for its VR (repaired if need
        be, see :func:`_repair`); False when there is nothing usable to copy."""
        if not _has_value(source, keyword):
            return False
        element = _conform(source[keyword])
        if element is None:
            self.note(f"{where}: {keyword} is not valid for its VR and cannot be repaired; ignored")
            return False
        if element is not source[keyword]:
            self.note(f"{where}: {keyword} made valid for its VR (case, length, separators or format)")
        record[keyword] = element
        return True

    def put(self, record: Dataset, keyword: str, value: Any, where: str) -> None:
        """Set a stand-in value, itself made conformant (it may come from another attribute)."""
        stand_in = Dataset()
        try:
            setattr(stand_in, keyword, value)
        except (TypeError, ValueError):
            stand_in = Dataset()
        if not self.take(record, stand_in, keyword, where):
            setattr(record, keyword, [] if keyword.endswith("Sequence") else "")

    # -- levels --------------------------------------------------------------------------

    def patient(self, group: PatientGroup) -> Dataset:
        source, where = group.dataset, _where(group, 2)
        record = Dataset()
        if not self.take(record, source, "PatientName", where):  # Type 2
            record.PatientName = ""
        if not self.take(record, source, "PatientID", where):
            # Type 1: a stable stand-in derived from what identifies this patient on the media.
            patient_id = "DF" + hashlib.sha1(group.key[1].encode("utf-8")).hexdigest()[:14].upper()
            self.put(record, "PatientID", patient_id, where)
            self.note(f"{where}: no Patient ID; the PATIENT record gets a generated one")
        if self.profile_keys:
            for keyword in ("PatientBirthDate", "PatientSex"):
                self.take(record, source, keyword, where)
        return record

    def study(self, group: StudyGroup) -> Dataset:
        source, where = group.dataset, _where(group, 3)
        # Where a missing study date or time is looked for: the study, then each series and
        # its first instance (DCMTK's order: series, acquisition, content date).
        everything = [source]
        for series in group.series.values():
            everything += [series.dataset, *(entry.instance for entry in series.entries[:1])]
        record = Dataset()
        for keyword, fallbacks in (("StudyDate", ("SeriesDate", "AcquisitionDate", "ContentDate")),
                                   ("StudyTime", ("SeriesTime", "AcquisitionTime", "ContentTime"))):
            if self.take(record, source, keyword, where):
                continue
            value = _first_value(everything, fallbacks)
            if value:
                self.put(record, keyword, value, where)
            if keyword in record and record[keyword].value:
                self.note(f"{where}: {keyword} missing; taken from a series or instance")
            else:
                # Type 1 needs something: today's date, as DCMTK does; for the time midnight,
                # which reads as "unknown" and keeps a rerun's output identical.
                setattr(record, keyword, self.today.strftime("%Y%m%d") if keyword == "StudyDate" else "000000")
                self.note(f"{where}: {keyword} missing; using {'today' if keyword == 'StudyDate' else '000000'}")
        for keyword in ("StudyDescription", "AccessionNumber"):  # Type 2
            if not self.take(record, source, keyword, where):
                setattr(record, keyword, "")
        record.StudyInstanceUID = group.uid
        if not self.take(record, source, "StudyID", where):
            record.StudyID = "DF" + hashlib.sha1(group.uid.encode("ascii", "replace")).hexdigest()[:10].upper()
            self.note(f"{where}: Study ID missing; using one derived from the Study Instance UID")
        return record

    def series(self, group: SeriesGroup, ordinal: int) -> Dataset:
        source, where = group.dataset, _where(group, 4)
        record = Dataset()
        if not self.take(record, source, "Modality", where):
            record.Modality = "OT"
            self.note(f"{where}: Modality missing, using OT")
        record.SeriesInstanceUID = group.uid
        if not self.take(record, source, "SeriesNumber", where):
            record.SeriesNumber = ordinal
            self.note(f"{where}: Series Number missing, using {ordinal}")
        if self.profile_keys:
            for keyword in ("InstitutionName", "InstitutionAddress", "PerformingPhysicianName"):
                self.take(record, source, keyword, where)
        return record

    def leaf(self, entry: DirectoryEntry, kind: str, ordinal: int, context: Sequence[Dataset]) -> Dataset:
        source = entry.instance
        where = "/".join(entry.file_id)
        record = Dataset()
        for keyword, key_type in _LEAF_KEYS[kind]:
            if self.take(record, source, keyword, where):
                continue
            if key_type == "1":
                if keyword == "InstanceNumber":
                    value: Any = ordinal
                elif keyword in _DEFAULTS:
                    value = _DEFAULTS[keyword]([source, *context])
                else:
                    value = ""
                if value != "":
                    self.put(record, keyword, value, where)
                if keyword in record and record[keyword].VM:
                    self.note(f"{where}: {kind} key {keyword} missing; stand-in used")
                else:
                    setattr(record, keyword, [] if keyword.endswith("Sequence") else "")
                    self.note(f"{where}: {kind} key {keyword} (Type 1) missing and has no safe default; left empty")
            elif key_type == "2":
                setattr(record, keyword, [] if keyword.endswith("Sequence") else "")
        if kind == "SR DOCUMENT" and _text(record, "VerificationFlag") == "VERIFIED" \
                and "VerificationDateTime" not in record:
            self.put(record, "VerificationDateTime", self._verification_datetime(entry, record), where)
        return record

    def _verification_datetime(self, entry: DirectoryEntry, record: Dataset) -> str:
        """Type 1C for a VERIFIED SR: the latest Verification DateTime of the Verifying Observer
        Sequence; without that sequence, the content date and time (a lower bound) with a note."""
        observers = entry.instance.get("VerifyingObserverSequence") or []
        stamps = sorted(_text(item, "VerificationDateTime") for item in observers)
        if stamps and stamps[-1]:
            return stamps[-1]
        value = _text(record, "ContentDate") + _text(record, "ContentTime")
        self.note(f"{'/'.join(entry.file_id)}: VERIFIED SR without Verifying Observer Sequence in the header "
                  f"subset; Verification DateTime set to the content date/time")
        return value


def _where(group: PatientGroup | StudyGroup | SeriesGroup, depth: int) -> str:
    """A level named by the File ID prefix of its first instance (``DICOM/P0000001/S0000002``):
    notes end up in worker logs, which must not carry names, IDs, dates or UIDs."""
    if isinstance(group, PatientGroup):
        group = next(iter(group.studies.values()))
    if isinstance(group, StudyGroup):
        group = next(iter(group.series.values()))
    return "/".join(group.entries[0].file_id[:depth])


def _file_set_uid(file_set_id: str, entries: Sequence[DirectoryEntry]) -> str:
    """A stable Media Storage SOP Instance UID: the same volume written twice gets the same UID."""
    digest = hashlib.sha256(file_set_id.encode())
    for entry in entries:
        digest.update(b"\0" + "/".join(entry.file_id).encode() + b"=" + entry.sop_instance_uid.encode())
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, digest.hexdigest()).int}"


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def encode_dicomdir(entries: Sequence[DirectoryEntry], *, file_set_id: str = "DISCFLOW",
                    profile: str | None = "STD-GEN-CD", notes: list[str] | None = None) -> bytes:
    """The complete DICOMDIR file for ``entries`` as bytes (see :func:`write_dicomdir`)."""
    if not _FILE_SET_ID.fullmatch(file_set_id):
        raise ValueError(f"File-set ID {file_set_id!r} must be at most 16 characters of A-Z, 0-9, _ and space")
    patients = group_entries(entries)

    builder = _RecordBuilder(profile_keys=profile not in (None, "STD-GEN-CD"))
    for patient in patients:
        patient_index = builder.add("PATIENT", builder.patient(patient), -1)
        for study in patient.studies.values():
            study_index = builder.add("STUDY", builder.study(study), patient_index)
            for series_ordinal, series in enumerate(study.series.values(), start=1):
                series_index = builder.add("SERIES", builder.series(series, series_ordinal), study_index)
                modality = _text(series.dataset, "Modality") or None
                context = (series.dataset, study.dataset)
                for ordinal, entry in enumerate(series.entries, start=1):
                    kind = record_type(entry.sop_class_uid, modality)
                    if kind not in _LEAF_KEYS:
                        raise ValueError(f"{'/'.join(entry.file_id)}: SOP Class {entry.sop_class_uid} has the "
                                         f"top-level record type {kind}, which cannot sit under a patient")
                    builder.add(kind, builder.leaf(entry, kind, ordinal, context), series_index, entry)

    # File Meta Information (group 0002), preamble and prefix.
    meta = Dataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = _file_set_uid(file_set_id, entries)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta_buffer = DicomBytesIO()
    meta_buffer.is_little_endian = True
    meta_buffer.is_implicit_VR = False
    write_file_meta_info(meta_buffer, meta, enforce_standard=True)
    head = b"\0" * 128 + b"DICM" + meta_buffer.getvalue()

    # The File-set Identification and Directory Information modules; offsets patched below.
    file_set_value = file_set_id.encode("ascii")
    if len(file_set_value) % 2:
        file_set_value += b" "
    records_length = sum(_ITEM_OVERHEAD + len(body) for body in builder.bodies)
    header_length = (8 + len(file_set_value)) + 12 + 12 + 10 + 12
    first_item = len(head) + header_length

    positions: list[int] = []
    position = first_item
    for body in builder.bodies:
        positions.append(position)
        position += _ITEM_OVERHEAD + len(body)

    next_sibling = [0] * len(builder.bodies)
    first_child = [0] * len(builder.bodies)
    last_of: dict[int, int] = {}
    roots: list[int] = []
    for index, parent in enumerate(builder.parents):
        previous = last_of.get(parent)
        if previous is not None:
            next_sibling[previous] = positions[index]
        elif parent >= 0:
            first_child[parent] = positions[index]
        if parent < 0:
            roots.append(index)
        last_of[parent] = index

    parts = [
        head,
        _element(0x0004, 0x1130, b"CS", file_set_value),
        _element(0x0004, 0x1200, b"UL", struct.pack("<I", positions[roots[0]] if roots else 0)),
        _element(0x0004, 0x1202, b"UL", struct.pack("<I", positions[roots[-1]] if roots else 0)),
        _element(0x0004, 0x1212, b"US", struct.pack("<H", 0)),
        struct.pack("<HH2sHI", 0x0004, 0x1220, b"SQ", 0, records_length),
    ]
    for index, body in enumerate(builder.bodies):
        parts.append(_ITEM_TAG + struct.pack("<I", _OFFSET_ELEMENTS.size + len(body)))
        parts.append(_OFFSET_ELEMENTS.pack(
            0x0004, 0x1400, b"UL", 4, next_sibling[index],
            0x0004, 0x1410, b"US", 2, 0xFFFF,
            0x0004, 0x1420, b"UL", 4, first_child[index]))
        parts.append(body)
    data = b"".join(parts)
    if len(data) > 0xFFFFFFFF:
        raise ValueError("DICOMDIR larger than 4 GiB: offsets do not fit in UL")
    if notes is not None:
        notes.extend(builder.notes)
    return data


def write_dicomdir(path: Path, entries: Sequence[DirectoryEntry], *, file_set_id: str = "DISCFLOW",
                   profile: str | None = "STD-GEN-CD") -> int:
    """Write the DICOMDIR for ``entries`` to ``path`` atomically; return the bytes written.

    Records: PATIENT > STUDY > SERIES > one leaf per entry (type from :func:`record_type`),
    with the keys PS3.3 F.5 requires. Missing Type 1 keys get the stand-ins documented in
    :class:`_RecordBuilder` (logged as warnings). ``profile`` (PS3.11) is checked against the
    entries' transfer syntaxes: a mismatch is logged, not raised, because the job has already
    done its work by now -- enforce :func:`check_profile` when the job is planned. ``None``
    skips the check.
    """
    entries = list(entries)
    if profile is not None:
        violations = check_profile(entries, profile)
        if violations:
            log.warning("DICOMDIR %s: %d file(s) violate %s, e.g. %s", path, len(violations), profile,
                        violations[0])
    notes: list[str] = []
    data = encode_dicomdir(entries, file_set_id=file_set_id, profile=profile, notes=notes)
    for note in notes[:20]:
        log.warning("DICOMDIR %s: %s", path, note)
    if len(notes) > 20:
        log.warning("DICOMDIR %s: %d more notes like these", path, len(notes) - 20)
    with atomic_writer(Path(path)) as handle:
        handle.write(data)
    os.chmod(path, 0o644)  # mkstemp made it 0600
    return len(data)
