"""Export from a real Orthanc: C-FIND by patient ID, C-GET over parallel associations, onto a disc."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from disc_checks import directory_leaves, xorriso_extract
from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import submit_export, wait
from orchestration.summary import export_summary
from peers import orthanc, orthanc_factory  # noqa: F401 — fixtures
from tasks.spool import JobSpool
from workers.app import app
from workers.settings import get_settings
from workers.timing import read_timings

pytestmark = pytest.mark.slow


def test_export_from_orthanc_by_patient_id(system_cluster, orthanc, tmp_path):
    wanted = build_study(tmp_path / "wanted", StudySpec(images=40, series=3, patient_id="NODE-1",
                                                        patient_name="NODE^WANTED"))
    other = build_study(tmp_path / "other", StudySpec(images=5, patient_id="NODE-2", patient_name="NODE^OTHER"))
    for path in wanted + other:
        orthanc.upload(path)
    started = time.monotonic()
    job_id = submit_export({"source": {"node": str(orthanc.node), "patient_id": "NODE-1", "study_uids": [],
                                       "accession_number": None},
                            "syntax": "uncompressed", "out_dir": str(tmp_path / "out")})
    wait(job_id, timeout=300)
    summary = export_summary(JobSpool(get_settings().spool_dir, job_id), read_timings(app, job_id),
                             time.monotonic() - started)
    assert summary["status"] == "succeeded", summary["failures"]
    assert summary["instances"]["written"] == 40
    root = xorriso_extract(Path(summary["volumes"][0]["path"]), tmp_path / "disc")
    sources = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, wanted)}
    leaves = directory_leaves(root / "DICOMDIR")
    assert {leaf.ReferencedSOPInstanceUIDInFile for leaf in leaves} == set(sources)
    for leaf in leaves:
        dataset = pydicom.dcmread(root.joinpath(*leaf.ReferencedFileID))
        assert np.array_equal(dataset.pixel_array, sources[str(dataset.SOPInstanceUID)].pixel_array)


def test_export_from_node_with_no_matching_study_fails_clearly(system_cluster, orthanc, tmp_path):
    job_id = submit_export({"source": {"node": str(orthanc.node), "patient_id": "NOBODY", "study_uids": [],
                                       "accession_number": None}, "syntax": "keep", "out_dir": str(tmp_path)})
    with pytest.raises(Exception, match="no study matching"):
        wait(job_id, timeout=120)
