"""End to end: discs into a real Orthanc through scan > prepare > store on real Redis and workers."""
from __future__ import annotations

import io
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import pydicom.data
from pydicom.fileset import FileSet

from conftest import require_tools
from orchestration.corpus import StudySpec, build_study
from orchestration.jobs import submit_export, submit_import, wait
from orchestration.summary import import_summary
from peers import orthanc, orthanc_factory  # noqa: F401 — fixtures
from tasks.spool import JobSpool
from workers.app import app
from workers.settings import get_settings
from workers.timing import read_timings

pytestmark = pytest.mark.slow
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def run_import(medium: Path, peer, send: str = "negotiate", rules: Path | None = None) -> dict:
    started = time.monotonic()
    job_id = submit_import({"medium": str(medium), "node": str(peer.node), "send": send,
                            "rules": str(rules) if rules else None, "studies": []})
    wait(job_id, timeout=600)
    return import_summary(JobSpool(get_settings().spool_dir, job_id), read_timings(app, job_id),
                          time.monotonic() - started)


def stored_datasets(peer) -> dict[str, pydicom.Dataset]:
    datasets = {}
    for orthanc_id in peer.rest("/instances"):
        dataset = pydicom.dcmread(io.BytesIO(peer.file_bytes(orthanc_id)))
        datasets[str(dataset.SOPInstanceUID)] = dataset
    return datasets


def source_datasets(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted(folder.rglob("*.dcm")))}


def jpeg_lossless_copy(source: Path, destination: Path) -> Path:
    require_tools("dcmcjpeg")
    destination.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(sorted(source.glob("*.dcm"))):
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(destination / f"IM{number:05d}")], check=True)
    return destination


def dcmtk_disc(files: Path, iso: Path) -> Path:
    """A disc as DCMTK and genisoimage make it: dcmmkdir DICOMDIR over 8-character file names."""
    require_tools("dcmmkdir", "genisoimage")
    subprocess.run(["dcmmkdir", "+r", "+id", ".", "+I", "-Pdv", "--output-file", "DICOMDIR",
                    *sorted(p.name for p in files.iterdir())], check=True, cwd=files, capture_output=True)
    subprocess.run(["genisoimage", "-quiet", "-o", str(iso), "-J", "-r", str(files)], check=True)
    return iso


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("import-study")
    build_study(folder, StudySpec(images=60, patient_name="TEST^IMPORT", patient_id="EXT-77", accession_number="A77"))
    return folder


def test_import_discflow_iso_keep_is_bit_exact(system_cluster, small_study, orthanc, tmp_path):
    job_id = submit_export({"source": {"folder": str(small_study)}, "syntax": "jpeg-lossless",
                            "out_dir": str(tmp_path / "disc")})
    wait(job_id, timeout=300)
    summary = run_import(tmp_path / "disc" / "VOL001.ISO", orthanc, send="keep")
    assert summary["status"] == "succeeded", summary["failures"]
    assert summary["instances"]["stored"] == 60
    assert summary["syntaxes"] == {JPEG_LOSSLESS: 60}
    stored = stored_datasets(orthanc)
    sources = source_datasets(small_study)
    assert set(stored) == set(sources)
    for uid, dataset in stored.items():
        assert dataset.file_meta.TransferSyntaxUID == JPEG_LOSSLESS
        assert np.array_equal(dataset.pixel_array, sources[uid].pixel_array)


def test_import_dcmtk_disc_negotiate(system_cluster, small_study, orthanc, tmp_path):
    files = jpeg_lossless_copy(small_study, tmp_path / "files")
    iso = dcmtk_disc(files, tmp_path / "dcmtk.iso")
    summary = run_import(iso, orthanc)
    assert summary["status"] == "succeeded", summary["failures"]
    assert summary["dicomdir"]["used"] is True
    assert set(stored_datasets(orthanc)) == set(source_datasets(small_study))
    assert summary["sent_syntaxes"] == {JPEG_LOSSLESS: 60}


def test_import_orthanc_media_zip(system_cluster, small_study, orthanc_factory, tmp_path):
    source_pacs, local_pacs = orthanc_factory(), orthanc_factory()
    for path in sorted(small_study.glob("*.dcm")):
        source_pacs.upload(path)
    [study_id] = source_pacs.rest("/studies")
    medium = tmp_path / "media.zip"
    medium.write_bytes(source_pacs.rest_bytes(f"/studies/{study_id}/media"))
    assert zipfile.is_zipfile(medium)
    summary = run_import(medium, local_pacs)
    assert summary["status"] == "succeeded", summary["failures"]
    assert set(stored_datasets(local_pacs)) == set(source_datasets(small_study))


def test_import_pydicom_dicomdirtests(system_cluster, orthanc, tmp_path):
    """pydicom's real DICOMDIR test disc (its second file-set, TINY_ALPHA, left out)."""
    source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    disc = tmp_path / "disc"
    shutil.copytree(source, disc, ignore=lambda folder, names: [n for n in names if n.startswith("DICOMDIR-") or n == "TINY_ALPHA"])
    expected = {str(instance.SOPInstanceUID) for instance in FileSet(pydicom.dcmread(disc / "DICOMDIR"))}
    summary = run_import(disc, orthanc)
    assert summary["failures"] == []
    assert summary["dicomdir"]["used"] is True
    assert summary["instances"]["stored"] == len(expected) > 20
    assert set(orthanc.instance_uids()) == expected


def test_negotiate_with_a_pacs_that_accepts_only_uncompressed(system_cluster, small_study, orthanc_factory, tmp_path):
    files = jpeg_lossless_copy(small_study, tmp_path / "files")
    pacs = orthanc_factory(accepted_transfer_syntaxes=list(UNCOMPRESSED))
    summary = run_import(files, pacs, send="negotiate")
    assert summary["status"] == "succeeded", summary["failures"]
    stored = stored_datasets(pacs)
    sources = source_datasets(small_study)
    assert set(stored) == set(sources)
    for uid, dataset in stored.items():
        assert dataset.file_meta.TransferSyntaxUID in UNCOMPRESSED
        assert np.array_equal(dataset.pixel_array, sources[uid].pixel_array)


def test_send_uncompressed_decompresses_before_store(system_cluster, small_study, orthanc, tmp_path):
    files = jpeg_lossless_copy(small_study, tmp_path / "files")
    summary = run_import(files, orthanc, send="uncompressed")
    assert summary["status"] == "succeeded", summary["failures"]
    assert summary["stages"]["transcode"]["instances"] == 60
    assert all(ds.file_meta.TransferSyntaxUID in UNCOMPRESSED for ds in stored_datasets(orthanc).values())


def test_reconciliation_is_visible_in_the_pacs(system_cluster, small_study, orthanc, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[patient]\nissuer = "LOCAL-HOSP"\n[patient.map]\n"EXT-77" = "L-0042"\n'
                     '[accession]\nprefix = "EXT"\n[tags]\nInstitutionName = "Outside Hospital"\n')
    summary = run_import(small_study, orthanc, rules=rules)
    assert summary["status"] == "succeeded", summary["failures"]
    stored = stored_datasets(orthanc)
    sources = source_datasets(small_study)
    assert set(stored) == set(sources)  # UIDs unchanged
    for uid, dataset in stored.items():
        assert dataset.PatientID == "L-0042" and dataset.IssuerOfPatientID == "LOCAL-HOSP"
        assert dataset.AccessionNumber == "EXTA77"
        assert dataset.InstitutionName == "Outside Hospital"
        [original] = dataset.OriginalAttributesSequence
        assert original.ReasonForTheAttributeModification == "COERCE"
        assert original.ModifyingSystem == "DISCFLOW"
        prior = original.ModifiedAttributesSequence[0]
        assert prior.PatientID == "EXT-77" and prior.AccessionNumber == "A77"
        assert dataset.PixelData == sources[uid].PixelData
