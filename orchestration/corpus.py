"""Synthetic studies built from real slices (pydicom-data), with fresh UIDs: for the demo, tests, bench."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_SLICE = "693_UNCR.dcm"
MR_SLICE = "MR_small.dcm"


@dataclass
class StudySpec:
    patient_name: str = "DEMO^PATIENT"
    patient_id: str = "DF-DEMO-0001"
    images: int = 200
    series: int = 2
    modality: str = "CT"
    accession_number: str = "ACC0001"
    noise: float = 6.0
    """Standard deviation added per slice, so slices differ as real ones do (lossless ratio ~3:1)."""
    seed: int = 1


def _template(modality: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(CT_SLICE if modality == "CT" else MR_SLICE))


def build_study(destination: Path, spec: StudySpec) -> list[Path]:
    """Write ``spec.images`` Explicit VR Little Endian instances under ``destination``; return their paths."""
    template = _template(spec.modality)
    pixels = template.pixel_array
    rng = np.random.default_rng(spec.seed)
    study_uid = generate_uid()
    series_uids = [generate_uid() for _ in range(spec.series)]
    destination.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(spec.images):
        series_no = number * spec.series // spec.images
        dataset = _slice(template, pixels, number, rng, spec)
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uids[series_no]
        dataset.SeriesNumber = series_no + 1
        path = destination / f"IM{number:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice(template: pydicom.Dataset, pixels: np.ndarray, number: int, rng: np.random.Generator,
           spec: StudySpec) -> pydicom.Dataset:
    dataset = template.copy()
    shifted = np.roll(pixels, shift=(number % 7) - 3, axis=0)
    noise = rng.normal(0.0, spec.noise, size=pixels.shape) if spec.noise else 0.0
    info = np.iinfo(pixels.dtype)
    low = max(info.min, -(1 << (template.BitsStored - 1)) if template.PixelRepresentation else 0)
    high = min(info.max, (1 << (template.BitsStored - (1 if template.PixelRepresentation else 0))) - 1)
    values = np.clip(np.rint(shifted + noise), low, high).astype(pixels.dtype)
    dataset.PixelData = values.tobytes()
    sop_uid = generate_uid()
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.PatientName = spec.patient_name
    dataset.PatientID = spec.patient_id
    dataset.AccessionNumber = spec.accession_number
    dataset.Modality = spec.modality
    dataset.StudyDescription = f"{spec.modality} demo study"
    dataset.InstanceNumber = number + 1
    dataset.SliceLocation = float(number)
    dataset.ImagePositionPatient = [0.0, 0.0, float(number)]
    return dataset
