"""Run an export's stages in this process (no Celery, no Redis): the same functions the tasks call.

Also builds small source studies for the media tests: CT and MR from real slices, a MONOCHROME1
series, an SR report, and files in syntaxes the general-purpose profiles forbid.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import new_job_id
from tasks.media import assemble_volume, finish_export, plan_media
from tasks.scan import REQUEST, scan_export, write_batches
from tasks.spool import JobSpool, read_json
from tasks.transcode import transcode_batch


def export_inline(spool_root: Path, source: Path, out: Path, **options: Any) -> dict[str, Any]:
    """scan > transcode > plan > assemble > finish for one job; returns the job summary."""
    request = {"source": {"folder": str(source)}, "syntax": "keep", "out_dir": str(out), **options}
    spool = JobSpool(spool_root, new_job_id("export")).create()
    spool.write(REQUEST, request)
    manifest, work = scan_export(spool)
    for number in range(write_batches(spool, manifest, work)):
        transcode_batch(spool, number)
    for number in range(1, plan_media(spool) + 1):
        assemble_volume(spool, number)
    finish_export(spool)
    return read_json(spool.summary_path)


def _retag(path: Path, **values: Any) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(path)


def build_sources(folder: Path, ct_images: int = 12) -> dict[str, str]:
    """Two patients, three studies: a CT study with an SR report, an MR study with a MONOCHROME1
    series, one with RLE and JPEG-LS files. Returns study description -> Study Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    build_study(folder / "ct", StudySpec(images=ct_images, patient_name="DOE^JANE", patient_id="DF-M-1",
                                         accession_number="ACC-CT"))
    build_study(folder / "mr", StudySpec(images=6, series=2, modality="MR", patient_name="DOE^JANE",
                                         patient_id="DF-M-1", accession_number="ACC-MR", seed=2))
    for path in sorted((folder / "mr").glob("*.dcm"))[3:]:  # the second MR series: MONOCHROME1
        dataset = pydicom.dcmread(path)
        dataset.PhotometricInterpretation = "MONOCHROME1"
        dataset.save_as(path)
    ct = pydicom.dcmread(sorted((folder / "ct").glob("*.dcm"))[0])
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDescription",
                    "StudyDate", "StudyTime", "StudyID"):
        setattr(sr, keyword, ct.get(keyword, ""))
    sr.SeriesInstanceUID, sr.SeriesNumber = generate_uid(), 90
    sr.SOPInstanceUID = generate_uid()
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.save_as(folder / "sr.dcm")
    other_study, other_series = generate_uid(), generate_uid()
    for number, name in enumerate(("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"), start=1):
        target = folder / "other" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(get_testdata_file(name), target)
        _retag(target, PatientName="ROE^RICHARD", PatientID="DF-M-2", StudyInstanceUID=other_study,
               SeriesInstanceUID=other_series, SOPInstanceUID=generate_uid(), InstanceNumber=number,
               StudyDescription="MR compressed", StudyDate="20040826")
    return {"CT demo study": str(ct.StudyInstanceUID),
            "MR demo study": str(pydicom.dcmread(sorted((folder / "mr").glob("*.dcm"))[0]).StudyInstanceUID),
            "MR compressed": other_study}


def extract_iso(iso: Path, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(destination)],
                   check=True, capture_output=True)
    for path in destination.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination
