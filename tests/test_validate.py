"""`discflow validate` against a corpus of good and broken media built here, cross-checked with the
independent tools: dciodvfy on the DICOMDIR (errors iff the dicomdir rule fails), dciodvfy on the
files (missing display attributes iff the display rule fails), DCMTK dcmmkdir building a fresh
DICOMDIR from the files (errors iff a file rule fails) and updating ours (any change or complaint
implies a DICOMDIR rule fails; a record whose file is missing is caught by validate only)."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from typer.testing import CliRunner

from conftest import require_tools
from export_inline import build_sources, export_inline, extract_iso
from orchestration.cli import cli
from tasks.validate import DISPLAY_KEYWORDS, validate_medium

FILE_RULES = ("dicom-files", "file-ids", "transfer-syntaxes")
DICOMDIR_RULES = ("dicomdir", "dicomdir-tree", "dicomdir-consistency", *FILE_RULES)


@pytest.fixture(scope="module")
def good_disc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ISO, extracted folder) of a real export: 3 studies, SR rendered to PDF, a viewer with autorun."""
    require_tools("xorriso", "dciodvfy", "dcmmkdir")
    base = tmp_path_factory.mktemp("validate")
    build_sources(base / "sources", ct_images=8)
    viewer = base / "viewer"
    viewer.mkdir()
    (viewer / "VIEWER.EXE").write_bytes(b"MZ" + bytes(2000))
    summary = export_inline(base / "spool", base / "sources", base / "out", viewer_dir=str(viewer))
    assert summary["status"] == "succeeded", summary["failures"]
    iso = Path(summary["volumes"][0]["path"])
    return iso, extract_iso(iso, base / "good")


# --------------------------------------------------------------------------------------------
# The corpus: each case breaks one thing in a copy of the good disc


def _first_file(root: Path, number: int = 0) -> Path:
    return sorted(p for p in (root / "DICOM").rglob("*") if p.is_file())[number]


def _patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


def _blank_value(path: Path, tag: tuple[int, int], vr: bytes) -> None:
    data = path.read_bytes()
    at = data.index(struct.pack("<HH", *tag) + vr)
    length = struct.unpack_from("<H", data, at + 6)[0]
    path.write_bytes(data[:at + 8] + b" " * length + data[at + 8 + length:])


def _set_value(path: Path, tag: tuple[int, int], vr: bytes, value: bytes) -> None:
    data = path.read_bytes()
    at = data.index(struct.pack("<HH", *tag) + vr)
    length = struct.unpack_from("<H", data, at + 6)[0]
    path.write_bytes(data[:at + 8] + value.ljust(length)[:length] + data[at + 8 + length:])


def _rewrite(path: Path, change: Callable[[pydicom.Dataset], None], **save: object) -> None:
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path, **save)


def _bare(path: Path) -> None:
    dataset = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    path.write_bytes(buffer.getvalue())


def _new_uid(dataset: pydicom.Dataset) -> None:
    dataset.SOPInstanceUID = pydicom.uid.generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID


def _extra_file(root: Path) -> None:
    extra = _first_file(root).with_name("X0000001")
    shutil.copyfile(_first_file(root), extra)
    _rewrite(extra, _new_uid)


def _implicit(root: Path) -> None:
    def change(dataset: pydicom.Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    _rewrite(_first_file(root, 1), change, implicit_vr=True, little_endian=True)


def _no_rows(root: Path) -> None:
    def change(dataset: pydicom.Dataset) -> None:
        del dataset.Rows
    _rewrite(_first_file(root, 2), change)


def _bad_offset(root: Path) -> None:
    data = (root / "DICOMDIR").read_bytes()
    at = data.index(struct.pack("<HH", 0x0004, 0x1200) + b"UL\x04\x00")
    (root / "DICOMDIR").write_bytes(data[:at + 8] + struct.pack("<I", 12345) + data[at + 12:])


def _autorun_to_nowhere(root: Path) -> None:
    (root / "AUTORUN.INF").write_bytes(b"[autorun]\r\nopen=VIEWER\\NOPE.EXE /dicomdir\r\n")


CASES: dict[str, Callable[[Path], None]] = {
    "good": lambda root: None,
    "dicomdir-no-patient-id": lambda root: _patch(root / "DICOMDIR", b"\x10\x00\x20\x00LO", b"\x10\x00\x00\x10LO"),
    "dicomdir-empty-study-date": lambda root: _blank_value(root / "DICOMDIR", (0x0008, 0x0020), b"DA"),
    "dicomdir-no-instance-number": lambda root: _patch(root / "DICOMDIR", b"\x20\x00\x13\x00IS",
                                                       b"\x20\x00\x12\x00IS"),
    "dicomdir-lower-case-modality": lambda root: _set_value(root / "DICOMDIR", (0x0008, 0x0060), b"CS", b"ct"),
    "dicomdir-dashed-date": lambda root: _set_value(root / "DICOMDIR", (0x0008, 0x0020), b"DA", b"2024-1-1"),
    "dicomdir-unknown-record-type": lambda root: _set_value(root / "DICOMDIR", (0x0004, 0x1430), b"CS",
                                                            b"PATIENX"),
    "dicomdir-truncated": lambda root: (root / "DICOMDIR").write_bytes((root / "DICOMDIR").read_bytes()[:3000]),
    "dicomdir-bad-offset": _bad_offset,
    "dicomdir-absent": lambda root: (root / "DICOMDIR").unlink(),
    "record-without-file": lambda root: _first_file(root).unlink(),
    "file-without-record": _extra_file,
    "file-uid-disagrees": lambda root: _rewrite(_first_file(root), _new_uid),
    "file-implicit-vr": _implicit,
    "file-not-part10": lambda root: _bare(_first_file(root, 3)),
    "file-lower-case-name": lambda root: _first_file(root, 4).rename(_first_file(root, 4).with_name("im0005.dcm")),
    "file-without-rows": _no_rows,
    "autorun-to-nowhere": _autorun_to_nowhere,
}
EXPECTED_FAILURES = {
    "good": set(),
    "dicomdir-no-patient-id": {"dicomdir"},
    "dicomdir-empty-study-date": {"dicomdir"},
    "dicomdir-no-instance-number": {"dicomdir"},
    "dicomdir-lower-case-modality": {"dicomdir"},
    "dicomdir-dashed-date": {"dicomdir"},
    "dicomdir-unknown-record-type": {"dicomdir", "dicomdir-tree"},
    "dicomdir-truncated": {"dicomdir", "dicomdir-tree", "dicomdir-consistency"},
    "dicomdir-bad-offset": {"dicomdir-tree"},
    "dicomdir-absent": {"dicomdir", "dicomdir-tree", "dicomdir-consistency"},
    "record-without-file": {"dicomdir-consistency"},
    "file-without-record": {"dicomdir-consistency"},
    "file-uid-disagrees": {"dicomdir-consistency"},
    "file-implicit-vr": {"dicomdir-consistency", "transfer-syntaxes"},
    "file-not-part10": {"dicom-files", "dicomdir-consistency", "transfer-syntaxes"},
    "file-lower-case-name": {"dicomdir-consistency", "file-ids"},
    "file-without-rows": {"display-attributes"},
    "autorun-to-nowhere": {"autorun"},
}


@pytest.fixture(scope="module")
def corpus(good_disc: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("corpus")
    cases = {}
    for name, breaks in CASES.items():
        root = base / name
        shutil.copytree(good_disc[1], root)
        breaks(root)
        cases[name] = root
    return cases


def _failed(root: Path, profile: str | None = "STD-GEN-CD") -> set[str]:
    return {rule.rule for rule in validate_medium(root, profile).rules if not rule.passed}


@pytest.mark.parametrize("case", list(CASES))
def test_each_broken_medium_fails_exactly_its_rules(corpus: dict[str, Path], case: str) -> None:
    assert _failed(corpus[case]) == EXPECTED_FAILURES[case]


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_dicomdir_rule_agrees_with_dciodvfy(corpus: dict[str, Path]) -> None:
    checked = 0
    for name, root in corpus.items():
        if not (root / "DICOMDIR").exists():
            continue
        dciodvfy_says_broken = bool(_dciodvfy_errors(root / "DICOMDIR"))
        validate_says_broken = "dicomdir" in _failed(root)
        assert dciodvfy_says_broken == validate_says_broken, name
        checked += 1
    assert checked == len(corpus) - 1


_DISPLAY_ERROR = re.compile(r"(Missing|Empty) attribute.*Element=<(" + "|".join(DISPLAY_KEYWORDS) + r")>")


def test_display_rule_agrees_with_dciodvfy_on_the_files(corpus: dict[str, Path]) -> None:
    for name in ("good", "file-without-rows", "file-implicit-vr"):
        root = corpus[name]
        images = [p for p in (root / "DICOM").rglob("*") if p.is_file() and "PixelData" in pydicom.dcmread(p)]
        dciodvfy_says_missing = any(_DISPLAY_ERROR.search(line) for path in images
                                    for line in _dciodvfy_errors(path))
        assert dciodvfy_says_missing == ("display-attributes" in _failed(root)), name


def _dcmmkdir(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dcmmkdir", *arguments, "+I", "+r", "DICOM"], cwd=root, capture_output=True, text=True,
                          errors="replace")


def test_file_rules_agree_with_a_fresh_dcmmkdir(corpus: dict[str, Path], tmp_path: Path) -> None:
    for name, root in corpus.items():
        made = _dcmmkdir(root, "-Pgp", "-w", "+D", str(tmp_path / "discard"))
        dcmmkdir_refuses = any(line.startswith(("E:", "F:")) for line in made.stderr.splitlines())
        validate_refuses = bool(_failed(root) & set(FILE_RULES))
        assert dcmmkdir_refuses == validate_refuses, (name, made.stderr[-500:])


def test_what_dcmmkdir_update_notices_validate_fails(corpus: dict[str, Path], tmp_path: Path) -> None:
    """dcmmkdir +U adds a record for every file ours lacks (or whose UID differs) and complains about
    unresolvable offsets; validate must fail those. It does not notice a record whose file is gone;
    validate does."""
    noticed = set()
    for name, root in corpus.items():
        if not (root / "DICOMDIR").exists():
            continue
        copy = tmp_path / f"{name}.dir"
        shutil.copyfile(root / "DICOMDIR", copy)
        before = _record_count(copy)
        update = _dcmmkdir(root, "+U", "-nb", "+D", str(copy))
        complaints = [line for line in update.stderr.splitlines()
                      if line.startswith(("E:", "F:")) or "resolve offset" in line or "inconsistent" in line]
        if complaints or _record_count(copy) != before:
            noticed.add(name)
            assert _failed(root) & set(DICOMDIR_RULES), (name, complaints)
    assert {"file-without-record", "file-uid-disagrees", "dicomdir-bad-offset"} <= noticed
    assert "good" not in noticed and "record-without-file" not in noticed
    assert "dicomdir-consistency" in _failed(corpus["record-without-file"])


def _record_count(path: Path) -> int | None:
    try:
        return len(pydicom.dcmread(path).DirectoryRecordSequence)
    except Exception:  # noqa: BLE001 - a DICOMDIR dcmmkdir could not rewrite
        return None


def test_profiles_reports_and_autorun(good_disc: tuple[Path, Path], corpus: dict[str, Path]) -> None:
    iso, _ = good_disc
    report = validate_medium(iso, "GUIDELINE")
    assert report.rule("report").passed is False  # the MR studies have no report
    assert "without the report GUIDELINE requires" in report.rule("report").reason
    assert report.rule("autorun").passed and report.rule("autorun").details == ["target: VIEWER/VIEWER.EXE"]
    assert report.rule("executables").details == ["AUTORUN.INF", "VIEWER/VIEWER.EXE"]
    assert validate_medium(iso, "STD-GEN-CD").passed
    assert "meets STD-GEN-CD" in validate_medium(iso).rule("transfer-syntaxes").reason
    broken = validate_medium(corpus["autorun-to-nowhere"]).rule("autorun")
    assert not broken.passed and "VIEWER/NOPE.EXE" in broken.reason


def test_zip_and_cli(good_disc: tuple[Path, Path], corpus: dict[str, Path], tmp_path: Path) -> None:
    iso, root = good_disc
    archive = tmp_path / "disc.zip"
    with zipfile.ZipFile(archive, "w") as writer:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                writer.write(path, path.relative_to(root).as_posix())
    assert validate_medium(archive, "STD-GEN-CD").passed
    runner = CliRunner()
    result = runner.invoke(cli, ["validate", str(iso), "--profile", "STD-GEN-CD"])
    assert result.exit_code == 0, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("PASS")]) == 13
    result = runner.invoke(cli, ["validate", str(corpus["file-implicit-vr"]), "--json"])
    assert result.exit_code == 1
    parsed = json.loads(result.output)
    assert not parsed["passed"] and {r["rule"] for r in parsed["rules"] if not r["passed"]} == \
        {"dicomdir-consistency", "transfer-syntaxes"}
    assert runner.invoke(cli, ["validate", str(iso), "--profile", "NOPE"]).exit_code == 2
