"""Media options through the export stages: spanning, USB folders, GUIDELINE discs with report and
viewer, profile conversions, robot hand-off and burning to a file-backed drive; one job on real
Celery workers with the new options."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest

from conftest import require_tools
from export_inline import build_sources, export_inline, extract_iso
from orchestration.commands_media import burn_volumes
from orchestration.jobs import submit_export, wait
from tasks.spool import JobSpool, read_json
from tasks.validate import validate_medium
from workers.settings import get_settings


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("media-sources")
    return folder, build_sources(folder, ct_images=30)


@pytest.fixture
def viewer(tmp_path: Path) -> Path:
    folder = tmp_path / "viewer"
    (folder / "bin").mkdir(parents=True)
    (folder / "VIEWER.EXE").write_bytes(b"MZ" + bytes(300_000))
    (folder / "bin" / "codecs.dll").write_bytes(b"MZ" + bytes(100_000))
    return folder


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_spanning_volumes_are_complete_file_sets_labelled_n_of_m(sources, tmp_path: Path, viewer: Path) -> None:
    require_tools("xorriso", "dciodvfy")
    folder, studies = sources
    # Room for the CT study (30 x 512 KB + its reports) on one volume, not for the MR studies too.
    summary = export_inline(tmp_path / "spool", folder, tmp_path / "out", volume_capacity=20_000_000,
                            viewer_dir=str(viewer))
    assert summary["status"] == "succeeded", summary["failures"]
    volumes = summary["volumes"]
    assert len(volumes) == 2 and [v["label"] for v in volumes] == ["1 of 2", "2 of 2"]
    seen_studies: dict[str, int] = {}
    for number, volume in enumerate(volumes, start=1):
        root = extract_iso(Path(volume["path"]), tmp_path / f"vol{number}")
        assert {"DICOMDIR", "README.TXT", "INDEX.HTM", "AUTORUN.INF"} <= {p.name for p in root.iterdir()}
        assert (root / "VIEWER" / "VIEWER.EXE").is_file() and Path(volume["path"]).stat().st_size <= 20_000_000
        assert f"Volume     : {number} of 2" in (root / "README.TXT").read_text()
        assert f"volume {number} of 2" in (root / "INDEX.HTM").read_text()
        assert _dciodvfy_errors(root / "DICOMDIR") == []
        assert validate_medium(Path(volume["path"]), "STD-GEN-CD").passed
        for record in pydicom.dcmread(root / "DICOMDIR").DirectoryRecordSequence:
            if record.DirectoryRecordType == "STUDY":
                assert record.StudyInstanceUID not in seen_studies, "a study was split across volumes"
                seen_studies[record.StudyInstanceUID] = number
        checksum = Path(volume["checksums"]).read_text().split()[0]
        assert checksum == hashlib.sha256(Path(volume["path"]).read_bytes()).hexdigest()
    assert set(seen_studies) == set(studies.values())


def test_usb_folder_guideline_profile_with_report_and_viewer(sources, tmp_path: Path, viewer: Path) -> None:
    folder, studies = sources
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
                       b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    summary = export_inline(tmp_path / "spool", folder, tmp_path / "out", media="usb", profile="GUIDELINE",
                            report=str(report), viewer_dir=str(viewer))
    assert summary["status"] == "succeeded" and summary["profile"] == "GUIDELINE" and summary["media"] == "usb"
    [volume] = summary["volumes"]
    root = Path(volume["path"])
    assert root == tmp_path / "out" / "USB001" and root.is_dir() and not list((tmp_path / "out").glob("*.ISO"))
    # RLE and JPEG-LS are not allowed by GUIDELINE: converted, and the summary says so
    converted = summary["converted_for_profile"]
    assert converted["count"] == 2 and set(converted["by_syntax"]) == {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80"}
    assert all(item["to"] == "1.2.840.10008.1.2.1" for item in converted["files"])
    assert summary["profile_problems"] == []  # every study got the report
    report_check = validate_medium(root, "GUIDELINE")
    assert report_check.passed, [(r.rule, r.reason, r.details[:3]) for r in report_check.rules if not r.passed]
    lines = Path(volume["checksums"]).read_text().splitlines()
    assert len(lines) == sum(1 for p in root.rglob("*") if p.is_file())
    for line in lines:  # sha256sum format, verifiable on the stick
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest
    records = pydicom.dcmread(root / "DICOMDIR").DirectoryRecordSequence
    assert sum(r.DirectoryRecordType == "ENCAP DOC" for r in records) == len(studies) + 1  # + the rendered SR
    assert _dciodvfy_errors(root / "DICOMDIR") == []


def test_keep_on_auto_converts_what_no_general_profile_allows(sources, tmp_path: Path) -> None:
    folder, _ = sources
    summary = export_inline(tmp_path / "spool", folder, tmp_path / "out")
    assert summary["profile"] == "STD-GEN-CD" and summary["converted_for_profile"]["count"] == 2
    assert validate_medium(Path(summary["volumes"][0]["path"]), "STD-GEN-CD").passed


def test_robot_hand_off_and_burn_with_verification(sources, tmp_path: Path, viewer: Path, monkeypatch) -> None:
    require_tools("xorriso")
    folder, _ = sources
    hot = tmp_path / "ptburn"
    hot.mkdir()
    summary = export_inline(tmp_path / "spool", folder, tmp_path / "out", volume_capacity=20_000_000,
                            hot_folder=str(hot), robot="primera", viewer_dir=str(viewer))
    assert [Path(v["handoff"]).name for v in summary["volumes"]] == ["DISCFLOW_001_001.JRQ", "DISCFLOW_002_002.JRQ"]
    for volume in summary["volumes"]:
        job = dict(line.split("=", 1) for line in Path(volume["handoff"]).read_text().splitlines())
        assert Path(job["ImageFile"]).read_bytes() == Path(volume["path"]).read_bytes()
    summary["status"] = "succeeded"
    burn_volumes(summary, f"stdio:{tmp_path}/drive{{n}}.iso", as_json=True)
    assert [b["verified"] for b in summary["burn"]] == [True, True]
    assert summary["burn"][1]["device"] == f"stdio:{tmp_path}/drive2.iso"
    assert summary["status"] == "succeeded"
    # a drive that returns other bytes fails the verification and makes the job partial
    monkeypatch.setattr("tasks.burn.subprocess.run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    (tmp_path / "bad1.iso").write_bytes(b"\0" * 4096)
    burn_volumes(summary, f"stdio:{tmp_path}/bad{{n}}.iso", as_json=True)
    assert summary["status"] == "partial" and summary["burn"][0]["verified"] is False


@pytest.mark.slow
def test_media_options_on_real_workers(embedded_cluster, sources, tmp_path: Path, viewer: Path) -> None:
    """The same options through Celery: task arguments stay job ids and numbers."""
    folder, _ = sources
    job_id = submit_export({"source": {"folder": str(folder)}, "syntax": "keep", "out_dir": str(tmp_path / "out"),
                            "profile": "GUIDELINE", "media": "dvd", "viewer_dir": str(viewer),
                            "report": None})
    wait(job_id, timeout=300)
    summary = read_json(JobSpool(get_settings().spool_dir, job_id).summary_path)
    assert summary["status"] == "succeeded" and summary["profile"] == "GUIDELINE"
    assert summary["profile_problems"] and "has no report" in summary["profile_problems"][0]  # MR studies
    iso = Path(summary["volumes"][0]["path"])
    assert validate_medium(iso, "GUIDELINE").rule("autorun").passed
    root = extract_iso(iso, tmp_path / "x")
    assert (root / "IHE_PDI").is_dir() and (root / "AUTORUN.INF").is_file()
