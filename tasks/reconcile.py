"""Import reconciliation: foreign patient identity to the local one, as IHE IRWF describes.

Decisions are made once per patient at scan time (``plan_edits``) and applied per instance
in the store stage (``apply_edits``), keeping prior values in Original Attributes Sequence.
"""
from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

MODIFYING_SYSTEM = "DISCFLOW"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

PatientLookup = Callable[[str, str], str | None]
"""(patient name, birth date) -> local Patient ID, or None when the PACS does not know the patient."""


class RulesError(Exception):
    pass


@dataclass
class Rules:
    patient_map: dict[str, str] = field(default_factory=dict)
    issuer: str | None = None
    lookup_by_demographics: bool = False
    accession_prefix: str | None = None
    accession_replace: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    regenerate_uids: bool = False
    reason: str = "COERCE"

    @property
    def empty(self) -> bool:
        return self == Rules()


def _keyword(name: str) -> str:
    """A tag given as keyword or as "(gggg,eeee)"/"ggggeeee"; a clear error for anything else."""
    text = name.strip().strip("()").replace(",", "")
    if tag_for_keyword(name) is not None:
        return name
    try:
        keyword = keyword_for_tag(int(text, 16))
    except ValueError:
        keyword = ""
    if not keyword:
        raise RulesError(f"unknown DICOM attribute in rules: {name!r}")
    return keyword


def load_rules(path: Path | None) -> Rules:
    """Read a rules TOML file; see README "Import rules" for its keys."""
    if path is None:
        return Rules()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise RulesError(f"cannot read rules file {path}: {error}") from error
    patient = data.get("patient", {})
    accession = data.get("accession", {})
    return Rules(
        patient_map={str(k): str(v) for k, v in patient.get("map", {}).items()},
        issuer=patient.get("issuer"), lookup_by_demographics=patient.get("lookup") == "pacs",
        accession_prefix=accession.get("prefix"), accession_replace=accession.get("replace"),
        tags={_keyword(k): str(v) for k, v in data.get("tags", {}).items()},
        regenerate_uids=bool(data.get("uids", {}).get("regenerate", False)),
        reason=str(data.get("reason", "COERCE")),
    )


def plan_patient_edits(header: Dataset, rules: Rules, lookup: PatientLookup | None = None) -> dict[str, str]:
    """Attribute edits for one foreign patient (from any of its instances' headers)."""
    edits: dict[str, str] = {}
    foreign_id = str(header.get("PatientID", "") or "")
    local_id = rules.patient_map.get(foreign_id)
    if local_id is None and rules.lookup_by_demographics and lookup is not None:
        local_id = lookup(str(header.get("PatientName", "") or ""), str(header.get("PatientBirthDate", "") or ""))
    if local_id and local_id != foreign_id:
        edits["PatientID"] = local_id
    if rules.issuer is not None:
        edits["IssuerOfPatientID"] = rules.issuer
    return edits


def plan_instance_edits(header: Dataset, rules: Rules) -> dict[str, str]:
    """Edits that do not depend on the patient decision: accession number and free tag edits."""
    edits = dict(rules.tags)
    accession = str(header.get("AccessionNumber", "") or "")
    if rules.accession_replace is not None:
        edits["AccessionNumber"] = rules.accession_replace
    elif rules.accession_prefix and accession and not accession.startswith(rules.accession_prefix):
        edits["AccessionNumber"] = (rules.accession_prefix + accession)[:16]
    return edits


def apply_edits(dataset: Dataset, edits: dict[str, str], reason: str = "COERCE",
                new_uids: dict[str, str] | None = None) -> bool:
    """Apply ``edits`` (and UID replacements); record prior values in Original Attributes Sequence."""
    changes = {k: v for k, v in {**edits, **(new_uids or {})}.items() if str(dataset.get(k, "")) != v}
    if not changes:
        return False
    prior = Dataset()
    for keyword in changes:
        if keyword in dataset:
            prior[keyword] = dataset[keyword]
        else:
            prior.add_new(tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)), None)
    for keyword, value in changes.items():
        dataset.add_new(tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)), value)
    if "SOPInstanceUID" in changes and hasattr(dataset, "file_meta"):
        dataset.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    item = Dataset()
    item.ModifiedAttributesSequence = Sequence([prior])
    item.AttributeModificationDateTime = datetime.now().strftime("%Y%m%d%H%M%S")
    item.ModifyingSystem = MODIFYING_SYSTEM
    item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = reason
    dataset.setdefault("OriginalAttributesSequence", Sequence([]))
    dataset.OriginalAttributesSequence.append(item)
    return True


class UidMapper:
    """Consistent new UIDs for a job when the rules ask for them (same old UID, same new UID)."""

    def __init__(self, mapping: dict[str, str] | None = None) -> None:
        self.mapping: dict[str, str] = mapping or {}

    def replace(self, dataset: Dataset) -> dict[str, str]:
        return {k: self.mapping.setdefault(str(dataset[k].value), generate_uid())
                for k in UID_KEYWORDS if k in dataset}

    def to_json(self) -> dict[str, Any]:
        return dict(self.mapping)
