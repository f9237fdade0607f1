"""The job manifest: what scan found, grouped patient > study > series > instance.

It lives in the spool (never in task arguments) and carries, per level, the header
attributes that directory records and the disc index need, as DICOM JSON, so that no
later stage has to read a header again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.tag import BaseTag

from tasks.raw_json import plain_get, raw_element, raw_json
from tasks.spool import read_json

PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "StudyID",
                  "AccessionNumber", "ReferringPhysicianName")
SERIES_KEYWORDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
                   "SeriesTime", "BodyPartExamined", "InstitutionName", "InstitutionAddress", "PerformingPhysicianName")
INSTANCE_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "ImageType", "Rows", "Columns", "NumberOfFrames",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "ContentDate", "ContentTime", "AcquisitionDate", "CompletionFlag",
    "VerificationFlag", "ConceptNameCodeSequence", "MIMETypeOfEncapsulatedDocument", "DocumentTitle",
    "ContentLabel", "ContentDescription", "PresentationCreationDate", "PresentationCreationTime",
    "LossyImageCompression", "SliceLocation", "ImagePositionPatient", "WindowCenter", "WindowWidth",
    "RescaleSlope", "RescaleIntercept",
    # Directory record keys of non-image leaves (PS3.3 F.5), so DICOMDIR records need no stand-ins:
    "AcquisitionTime", "InstanceCreationDate", "InstanceCreationTime", "VerifyingObserverSequence",
    "ContentCreatorName", "HL7InstanceIdentifier", "UserContentLabel", "UserContentLongLabel",
    "DoseSummationType", "DoseComment", "StructureSetLabel", "StructureSetDate", "StructureSetTime",
    "RTPlanLabel", "RTPlanDate", "RTPlanTime", "TreatmentDate", "TreatmentTime", "DataPointRows",
    "DataPointColumns", "VOILUTFunction",
)
_BULK_DATA_THRESHOLD = 1 << 20
"""Ignored without a bulk data handler: binary values are always inline."""


def subset_json(dataset: Dataset, keywords: tuple[str, ...]) -> dict[str, Any]:
    """The named attributes of ``dataset`` in the DICOM JSON model (absent ones left out).

    Element by element, in ``keywords`` order: the same dict ``Dataset.to_json_dict`` gives for a
    Dataset holding just these elements (tests/test_manifest.py checks), without building that
    Dataset and resolving each keyword to a tag per call, which cost most of scan's CPU time;
    plain elements still raw are converted from their bytes (:mod:`tasks.raw_json`).
    """
    json_dict: dict[str, Any] = {}
    for tag, json_key in _json_tags(keywords):
        element = dataset.get_item(tag, keep_deferred=True)
        if element is not None:
            json_dict[json_key] = raw_json(element) or dataset[tag].to_json_dict(None, _BULK_DATA_THRESHOLD)
    return json_dict


@cache
def _json_tags(keywords: tuple[str, ...]) -> tuple[tuple[BaseTag, str], ...]:
    # The keyword tuples are module constants, so each is resolved once per process. A keyword
    # with no tag (e.g. a repeating group's "OverlayRows") is left out, as `keyword in dataset` did.
    tags = (tag_for_keyword(keyword) for keyword in keywords)
    return tuple((BaseTag(tag), f"{tag:08X}") for tag in tags if tag is not None)


def as_json(record: Any) -> dict[str, Any]:
    """A dataclass record as a dict of its fields, in field order, for ``json.dumps``.

    Shallow, unlike ``dataclasses.asdict``: nested dicts and lists are the record's own (the deep
    copy was most of the cost of writing a manifest), so serialise the result, don't mutate it.
    Nested dataclasses are not converted: a record holding some needs its own step, as
    ``Manifest.to_json`` does for its levels and instances.
    """
    return {name: getattr(record, name) for name in _field_names(type(record))}


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def dataset_from_json(attributes: dict[str, Any]) -> Dataset:
    """``Dataset.from_json(attributes)``, with plain elements kept raw (:func:`raw_element`) until
    read: the media stage makes a data set per instance and reads one or two of its values.
    tests/test_manifest.py checks both give the same values."""
    rest, raws = {}, {}
    for key, mapping in attributes.items():
        raw = raw_element(key, mapping)
        if raw is None:
            rest[key] = mapping
        else:
            raws[raw.tag] = raw
    dataset = Dataset(raws)
    for element in Dataset.from_json(rest) if rest else ():
        dataset.add(element)
    return dataset


@dataclass
class Instance:
    index: int
    source: str
    """Absolute path of the instance as scanned."""
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    patient: int
    study: int
    series: int
    attributes: dict[str, Any] = field(default_factory=dict)
    action: str = "copy"
    """copy: bytes go to the media as they are; convert: transcode to ``target_syntax``;
    rewrite: re-encode as Part 10 without touching pixels (bare dataset, missing meta)."""
    target_syntax: str | None = None
    edits: dict[str, str] = field(default_factory=dict)
    """Import reconciliation: attribute values to set before the instance is stored."""


@dataclass
class Level:
    """A patient, study or series: its key and its header attributes."""
    key: str
    parent: int
    attributes: dict[str, Any]


@dataclass
class Manifest:
    job_id: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    patients: list[Level] = field(default_factory=list)
    studies: list[Level] = field(default_factory=list)
    series: list[Level] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Files not taken, each ``{"file": ..., "reason": ...}``."""
    notes: list[dict[str, str]] = field(default_factory=list)
    """Warnings that did not stop a file (e.g. a duplicate copy), same shape as ``skipped``."""

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON values; shares nested values with it (see ``as_json``)."""
        value = as_json(self)
        for name in ("patients", "studies", "series", "instances"):
            value[name] = [as_json(record) for record in value[name]]
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "Manifest":
        return cls(
            job_id=value["job_id"], kind=value["kind"], options=value.get("options", {}),
            patients=[Level(**p) for p in value.get("patients", [])],
            studies=[Level(**s) for s in value.get("studies", [])],
            series=[Level(**s) for s in value.get("series", [])],
            instances=[Instance(**i) for i in value.get("instances", [])],
            skipped=value.get("skipped", []), notes=value.get("notes", []),
        )

    def batches(self, size: int, indices: list[int] | None = None) -> list[list[int]]:
        chosen = indices if indices is not None else [i.index for i in self.instances]
        return [chosen[start:start + size] for start in range(0, len(chosen), size)]

    def source_bytes(self) -> int:
        return sum(i.size for i in self.instances)


class ManifestBuilder:
    """Groups scanned headers patient > study > series while keeping insertion order."""

    def __init__(self, job_id: str, kind: str, options: dict[str, Any],
                 instance_keywords: tuple[str, ...] = INSTANCE_KEYWORDS) -> None:
        self.manifest = Manifest(job_id=job_id, kind=kind, options=options)
        self._instance_keywords = instance_keywords
        self._patients: dict[str, int] = {}
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}

    def add(self, source: Path | str, size: int, dataset: Dataset, transfer_syntax: str) -> Instance:
        patient = self._level(self._patients, self.manifest.patients, _patient_key(dataset), -1,
                              dataset, PATIENT_KEYWORDS)
        study = self._level(self._studies, self.manifest.studies, str(plain_get(dataset, "StudyInstanceUID")),
                            patient, dataset, STUDY_KEYWORDS)
        series = self._level(self._series, self.manifest.series, str(plain_get(dataset, "SeriesInstanceUID")),
                             study, dataset, SERIES_KEYWORDS)
        instance = Instance(
            index=len(self.manifest.instances), source=str(source), size=size,
            sop_class_uid=str(plain_get(dataset, "SOPClassUID")),
            sop_instance_uid=str(plain_get(dataset, "SOPInstanceUID")),
            transfer_syntax=transfer_syntax, patient=patient, study=study, series=series,
            attributes=subset_json(dataset, self._instance_keywords),
        )
        self.manifest.instances.append(instance)
        return instance

    def merge(self, part: Manifest) -> None:
        """Append a manifest built from the files that follow (a later chunk of the same source):
        its patients, studies and series join those already here, as one builder would have."""
        patients = [self._join(self._patients, self.manifest.patients, level, -1) for level in part.patients]
        studies = [self._join(self._studies, self.manifest.studies, level, patients[level.parent])
                   for level in part.studies]
        series = [self._join(self._series, self.manifest.series, level, studies[level.parent])
                  for level in part.series]
        for instance in part.instances:
            self.manifest.instances.append(replace(
                instance, index=len(self.manifest.instances), patient=patients[instance.patient],
                study=studies[instance.study], series=series[instance.series]))
        self.manifest.skipped += part.skipped
        self.manifest.notes += part.notes

    @staticmethod
    def _join(index: dict[str, int], levels: list[Level], level: Level, parent: int) -> int:
        if level.key not in index:
            index[level.key] = len(levels)
            levels.append(Level(key=level.key, parent=parent, attributes=level.attributes))
        return index[level.key]

    def skip(self, source: Path | str, reason: str) -> None:
        self.manifest.skipped.append({"file": str(source), "reason": reason})

    @staticmethod
    def _level(index: dict[str, int], levels: list[Level], key: str, parent: int, dataset: Dataset,
               keywords: tuple[str, ...]) -> int:
        if key not in index:
            index[key] = len(levels)
            levels.append(Level(key=key, parent=parent, attributes=subset_json(dataset, keywords)))
        return index[key]


def _patient_key(dataset: Dataset) -> str:
    # Patients are told apart by ID and issuer; an anonymous ID falls back to the name.
    patient_id = str(dataset.get("PatientID", "") or "")
    issuer = str(dataset.get("IssuerOfPatientID", "") or "")
    if patient_id:
        return f"{issuer}\\{patient_id}"
    return f"name:{dataset.get('PatientName', '')}"


def read_manifest(path: Path) -> Manifest:
    """The manifest at ``path``, parsed once per version of the file in this process: a job's last
    task and the ledger entry made after it read the same one (a 500-instance manifest takes
    20-40 ms to parse in a worker). Shared between callers: read it, never change it."""
    stat = path.stat()
    return _parsed_manifest(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1)
def _parsed_manifest(path: str, _inode: int, _size: int, _mtime_ns: int) -> Manifest:
    return Manifest.from_json(read_json(Path(path)))
