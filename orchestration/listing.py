"""What is on a disc: patients, studies, series, transfer syntaxes and problems (`import --list`)."""
from __future__ import annotations

from typing import Any

from pydicom.uid import UID

from tasks.media_scan import MediaScan


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else uid


def disc_listing(found: MediaScan) -> dict[str, Any]:
    patients: dict[str, dict[str, Any]] = {}
    for item in found.instances:
        header = item.header
        patient = patients.setdefault(item.patient_key, {
            "name": str(header.get("PatientName", "")), "id": str(header.get("PatientID", "")),
            "birth_date": str(header.get("PatientBirthDate", "")), "studies": {}})
        study = patient["studies"].setdefault(item.study_instance_uid, {
            "uid": item.study_instance_uid, "date": str(header.get("StudyDate", "")),
            "description": str(header.get("StudyDescription", "")),
            "accession": str(header.get("AccessionNumber", "")), "series": {}})
        series = study["series"].setdefault(item.series_instance_uid, {
            "uid": item.series_instance_uid, "modality": str(header.get("Modality", "")),
            "number": str(header.get("SeriesNumber", "")), "description": str(header.get("SeriesDescription", "")),
            "instances": 0, "bytes": 0})
        series["instances"] += 1
        series["bytes"] += item.size
    for patient in patients.values():
        patient["studies"] = list(patient["studies"].values())
        for study in patient["studies"]:
            study["series"] = list(study["series"].values())
    return {
        "instances": len(found.instances),
        "patients": list(patients.values()),
        "syntaxes": {_syntax_name(uid): count for uid, count in found.syntaxes().items()},
        "used_dicomdir": found.used_dicomdir,
        "dicomdir_problems": found.dicomdir_problems,
        "problems": [{"file": p.file, "reason": p.reason, "severity": p.severity} for p in found.problems],
    }
