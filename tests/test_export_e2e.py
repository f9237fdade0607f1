"""End to end: a 210-instance CT study through scan > transcode > media on real Redis and workers."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import CT_IMAGES, require_tools
from disc_checks import dciodvfy_errors, dcmdump_ok, directory_leaves, isoinfo_paths, pycdlib_read, xorriso_extract
from orchestration.jobs import submit_export, wait
from orchestration.summary import export_summary
from tasks.spool import JobSpool
from tasks.transfer_syntax import POLICIES
from workers.app import app
from workers.settings import get_settings
from workers.timing import read_timings

pytestmark = pytest.mark.slow


def export(source: Path, out: Path, syntax: str) -> dict:
    started = time.monotonic()
    job_id = submit_export({"source": {"folder": str(source)}, "syntax": syntax, "out_dir": str(out)})
    wait(job_id, timeout=600)
    return export_summary(JobSpool(get_settings().spool_dir, job_id), read_timings(app, job_id),
                          time.monotonic() - started)


def source_pixels(study: Path) -> dict[str, np.ndarray]:
    return {str(ds.SOPInstanceUID): ds.pixel_array for ds in map(pydicom.dcmread, sorted(study.glob("*.dcm")))}


def check_disc(summary: dict, study: Path, syntax: str, work: Path) -> None:
    require_tools("isoinfo", "xorriso", "dciodvfy", "dcmdump")
    assert summary["status"] == "succeeded", summary["failures"]
    assert summary["instances"] == {"total": CT_IMAGES, "written": CT_IMAGES, "failed": 0}
    [volume] = summary["volumes"]
    iso = Path(volume["path"])
    listed = isoinfo_paths(iso)
    dicom_files = [p for p in listed if p.startswith("DICOM/")]
    assert len(dicom_files) == len(set(dicom_files)) == CT_IMAGES
    assert {"DICOMDIR", "README.TXT", "INDEX.HTM"} <= set(listed)
    assert pycdlib_read(iso, "DICOMDIR")[128:132] == b"DICM"

    root = xorriso_extract(iso, work / "extracted")
    dicomdir = root / "DICOMDIR"
    assert dciodvfy_errors(dicomdir) == []
    assert dcmdump_ok(dicomdir)
    leaves = directory_leaves(dicomdir)
    assert sorted("/".join(leaf.ReferencedFileID) for leaf in leaves) == sorted(dicom_files)
    expected = source_pixels(study)
    expected_syntax = POLICIES[syntax]
    seen = set()
    for leaf in leaves:
        dataset = pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID))
        uid = str(dataset.SOPInstanceUID)
        assert uid == leaf.ReferencedSOPInstanceUIDInFile
        assert dataset.file_meta.TransferSyntaxUID == leaf.ReferencedTransferSyntaxUIDInFile
        if expected_syntax:
            assert dataset.file_meta.TransferSyntaxUID == expected_syntax
        assert np.array_equal(dataset.pixel_array, expected[uid]), f"pixels differ for {uid}"
        seen.add(uid)
    assert seen == set(expected)
    if syntax == "jpeg-lossless":
        _cross_check_dcmdjpeg(root.joinpath(*leaves[0].ReferencedFileID), expected, work)


def _cross_check_dcmdjpeg(path: Path, expected: dict[str, np.ndarray], work: Path) -> None:
    require_tools("dcmdjpeg")
    decoded = work / "dcmdjpeg.dcm"
    subprocess.run(["dcmdjpeg", str(path), str(decoded)], check=True)
    dataset = pydicom.dcmread(decoded)
    assert np.array_equal(dataset.pixel_array, expected[str(dataset.SOPInstanceUID)])


@pytest.mark.parametrize("syntax", ["keep", "uncompressed"])
def test_export_on_embedded_default(embedded_cluster, ct_study, tmp_path, syntax):
    summary = export(ct_study, tmp_path / "out", syntax)
    check_disc(summary, ct_study, syntax, tmp_path)
    assert summary["stages"]["scan"]["instances"] == CT_IMAGES


@pytest.mark.parametrize("syntax", ["keep", "uncompressed", "jpeg-lossless", "j2k-lossless"])
def test_export_on_system_redis_with_two_workers(system_cluster, ct_study, tmp_path, syntax):
    summary = export(ct_study, tmp_path / "out", syntax)
    check_disc(summary, ct_study, syntax, tmp_path)
    if syntax in ("jpeg-lossless", "j2k-lossless"):
        transcode = summary["stages"]["transcode"]
        assert transcode["instances"] == CT_IMAGES and transcode["tasks"] >= 2
        assert transcode["bytes_out"] < transcode["bytes_in"]
