"""Media access and scanning: real discs (dcmmkdir, genisoimage, ZIP), pydicom's real
DICOMDIRs, and a hostile corpus (tests/hostile_media.py)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import zipfile
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

import hostile_media as hm
from tasks.media_scan import MediaScan, scan_medium
from tasks.media_source import MediaError, RefusedFile, extract, normalise_name, open_medium

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on deliberately broken files

DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent
GOOD_SOURCES = [hm.UNCOMPRESSED_CT, hm.MR, hm.CT_SMALL, hm.JPEG_LS, hm.J2K_LOSSLESS, hm.RLE, hm.JPEG_BASELINE,
                hm.JPEG_EXTENDED, hm.IMPLICIT, hm.BIG_ENDIAN, hm.DEFLATED]


def scan(location: Path, **options) -> MediaScan:
    with open_medium(location) as medium:
        return scan_medium(medium, **options)


def uids(result: MediaScan) -> set[str]:
    return {instance.sop_instance_uid for instance in result.instances}


def referenced_file_ids(dicomdir: Path) -> list[str]:
    """Referenced File IDs as DCMTK's dcmdump prints them (a real peer, not our parser)."""
    output = subprocess.run(["dcmdump", "+P", "0004,1500", str(dicomdir)], capture_output=True, text=True,
                            check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in output.splitlines() if "[" in line]


# --- a good disc, as DCMTK and genisoimage make it ---------------------------------------------

@pytest.fixture(scope="module")
def good_disc(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("good")
    folder = tmp / "disc"
    written = hm.write_disc(folder, GOOD_SOURCES, patients=3)
    hm.make_dicomdir(folder)
    return {
        "written": written,
        "folder": folder,
        "iso": hm.make_iso(folder, tmp / "disc.iso"),
        "iso-plain": hm.make_iso(folder, tmp / "plain.iso", joliet=False, rock_ridge=False),
        "iso-joliet": hm.make_iso(folder, tmp / "joliet.iso", rock_ridge=False),
        "zip": hm.make_zip(folder, tmp / "disc.zip"),
    }


@pytest.mark.parametrize("medium_kind", ["folder", "iso", "iso-plain", "iso-joliet", "zip"])
def test_good_dcmtk_disc_is_scanned_through_its_dicomdir(good_disc, medium_kind):
    written: dict[str, str] = good_disc["written"]
    result = scan(good_disc[medium_kind])

    assert result.used_dicomdir, result.dicomdir_problems
    assert result.dicomdir_problems == []
    assert result.problems == []
    assert {instance.path: instance.sop_instance_uid for instance in result.instances} == written

    expected_syntaxes: Counter[str] = Counter()
    for instance in result.instances:
        on_disk = pydicom.dcmread(good_disc["folder"] / instance.path, stop_before_pixels=True)
        assert instance.size == (good_disc["folder"] / instance.path).stat().st_size
        assert instance.transfer_syntax == on_disk.file_meta.TransferSyntaxUID
        assert instance.sop_class_uid == on_disk.SOPClassUID
        assert instance.study_instance_uid == on_disk.StudyInstanceUID
        assert instance.series_instance_uid == on_disk.SeriesInstanceUID
        assert instance.patient_key == f"\\{on_disk.PatientID}"
        assert instance.has_preamble
        assert "PixelData" not in instance.header
        assert instance.header.Rows == on_disk.Rows
        expected_syntaxes[str(on_disk.file_meta.TransferSyntaxUID)] += 1
    assert result.syntaxes() == dict(expected_syntaxes)
    assert len(result.syntaxes()) == 9  # explicit, implicit, big endian, deflated, JPEG x3, J2K, RLE, JPEG-LS


def test_iso_listing_agrees_with_isoinfo(good_disc):
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(good_disc["iso"])], capture_output=True,
                             text=True, check=True).stdout.split()
    folders = {line.rsplit("/", 1)[0] for line in listing}
    files_per_isoinfo = {line.lstrip("/") for line in listing if line not in folders}
    with open_medium(good_disc["iso"]) as medium:
        assert medium.kind == "iso"
        assert {entry.path for entry in medium.files()} == files_per_isoinfo


@pytest.mark.parametrize("medium_kind", ["folder", "iso", "zip"])
def test_extract_copies_exact_bytes_and_honours_the_cap(good_disc, medium_kind, tmp_path):
    path = next(iter(good_disc["written"]))
    original = (good_disc["folder"] / path).read_bytes()
    with open_medium(good_disc[medium_kind]) as medium:
        copied = extract(medium, path, tmp_path / "out" / "copy.dcm", max_bytes=len(original))
        assert copied == len(original)
        assert (tmp_path / "out" / "copy.dcm").read_bytes() == original

        with pytest.raises(RefusedFile, match="over the"):
            extract(medium, path, tmp_path / "capped.dcm", max_bytes=len(original) - 1)
        assert not (tmp_path / "capped.dcm").exists()
        with pytest.raises(RefusedFile, match="not a file listed"):
            extract(medium, "../../etc/passwd", tmp_path / "passwd", max_bytes=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp files left behind


# --- pydicom's own DICOMDIRs -------------------------------------------------------------------

def _copy_dicomdir_tests(destination: Path, dicomdir_name: str = "DICOMDIR") -> None:
    destination.mkdir()
    for patient in ("77654033", "98892001", "98892003"):
        shutil.copytree(DICOMDIR_TESTS / patient, destination / patient)
    shutil.copyfile(DICOMDIR_TESTS / dicomdir_name, destination / "DICOMDIR")


@pytest.mark.parametrize("variant", ["DICOMDIR", "DICOMDIR-reordered", "DICOMDIR-nooffset", "DICOMDIR-implicit",
                                     "DICOMDIR-bigEnd", "DICOMDIR-nopatient"])
def test_pydicom_dicomdirtests_every_referenced_file_is_found(variant, tmp_path):
    # DICOMDIR-nopatient makes pydicom.fileset.FileSet raise for the whole file-set; a
    # record-by-record reading loses nothing.
    _copy_dicomdir_tests(tmp_path / "disc", variant)
    expected = {file_id.replace("\\", "/") for file_id in referenced_file_ids(DICOMDIR_TESTS / "DICOMDIR")}
    assert len(expected) == 31

    result = scan(tmp_path / "disc")
    assert result.used_dicomdir, result.dicomdir_problems
    assert {instance.path for instance in result.instances} == expected
    assert result.problems == []


def test_pydicom_dicomdirtests_folder_as_shipped(tmp_path):
    """The folder holds the DICOMDIR variants and a second file-set (TINY_ALPHA) the root DICOMDIR
    does not reference: those files still import, and the DICOMDIR is reported inconsistent."""
    result = scan(DICOMDIR_TESTS)
    referenced = {file_id.replace("\\", "/") for file_id in referenced_file_ids(DICOMDIR_TESTS / "DICOMDIR")}
    tiny_alpha = {f"TINY_ALPHA/{id_.replace(chr(92), '/')}"
                  for id_ in referenced_file_ids(DICOMDIR_TESTS / "TINY_ALPHA" / "DICOMDIR")}
    found = {instance.path for instance in result.instances}
    assert referenced <= found
    assert tiny_alpha <= found
    assert found == referenced | tiny_alpha
    assert not result.used_dicomdir
    assert any("TINY_ALPHA/PT000000" in problem and "no DICOMDIR record references" in problem
               for problem in result.dicomdir_problems)
    skipped = {problem.file for problem in result.problems if "a DICOMDIR, not an instance" in problem.reason}
    assert {"DICOMDIR-bigEnd", "DICOMDIR-implicit", "TINY_ALPHA/DICOMDIR"} <= skipped
    assert not result.errors


def test_tiny_alpha_file_set_on_its_own():
    result = scan(DICOMDIR_TESTS / "TINY_ALPHA")
    assert result.used_dicomdir
    assert len(result.instances) == 50
    assert [(problem.file, problem.reason, problem.severity) for problem in result.problems] == \
        [("README", "skipped: not DICOM", "warning")]


# --- the hostile corpus --------------------------------------------------------------------------

def _check_case(case: hm.HostileCase, result: MediaScan) -> None:
    with open_medium(case.location) as medium:
        listed = {entry.path for entry in medium.files()}
    accounted = {instance.path for instance in result.instances} | {problem.file for problem in result.problems}
    unaccounted = {path for path in listed - accounted if path.upper().rstrip(".;1") != "DICOMDIR"}
    assert not unaccounted, f"files neither imported nor reported: {unaccounted}"

    found_uids = uids(result)
    found_paths = {instance.path for instance in result.instances}
    errors = {problem.file: problem.reason for problem in result.problems if problem.severity == "error"}
    warnings = {problem.file: problem.reason for problem in result.problems if problem.severity == "warning"}

    for file, fragment in case.refused.items():
        assert file in errors, f"{file} not refused; errors: {errors}"
        assert fragment in errors[file], f"{file}: {errors[file]!r} lacks {fragment!r}"
        assert file not in found_paths
    assert set(errors) == set(case.refused), f"unexpected refusals: {set(errors) - set(case.refused)}"
    for file, fragment in case.warnings.items():
        assert file in warnings, f"no warning for {file}; warnings: {warnings}"
        assert fragment in warnings[file]
    assert case.valid <= found_uids, "a valid file on the hostile medium was not imported"
    assert not (case.not_imported & found_uids)
    for fragment in case.dicomdir_problems:
        assert any(fragment in problem for problem in result.dicomdir_problems), \
            f"{fragment!r} not in {result.dicomdir_problems}"
    if case.used_dicomdir is not None:
        assert result.used_dicomdir is case.used_dicomdir
    assert len(found_uids) == len(result.instances), "a SOP Instance UID imported twice"


@pytest.mark.parametrize("build", hm.CASES, ids=lambda build: build.__name__.removeprefix("case_"))
def test_hostile_medium(build, tmp_path):
    case = build(tmp_path)
    started = time.perf_counter()
    result = scan(case.location)
    print(f"{case.name}: scanned in {time.perf_counter() - started:.3f} s")
    _check_case(case, result)


FOLDER_CASES = [hm.case_dicomdir_escaping_file_id, hm.case_dicomdir_missing_file,
                hm.case_dicomdir_wrong_sop_instance_uid, hm.case_corrupt_headers, hm.case_non_dicom_files,
                hm.case_truncated_pixel_data, hm.case_decompression_bomb, hm.case_duplicate_same_content,
                hm.case_duplicate_different_content, hm.case_garbage_dicomdir]


@pytest.mark.parametrize("container", ["iso", "zip"])
@pytest.mark.parametrize("build", FOLDER_CASES, ids=lambda build: build.__name__.removeprefix("case_"))
def test_hostile_folder_cases_burnt_or_zipped(build, container, tmp_path):
    """The same hostile content on an ISO (Rock Ridge + Joliet) or in a ZIP gives the same verdicts."""
    case = build(tmp_path)
    if container == "iso":
        case.location = hm.make_iso(case.location, tmp_path / "case.iso")
    else:
        case.location = hm.make_zip(case.location, tmp_path / "case.zip")
    _check_case(case, scan(case.location))


def test_lower_case_iso9660_names_with_versions_on_an_iso(tmp_path):
    """A disc burnt without Rock Ridge or Joliet by a tool that kept lower case: ISO 9660 names
    'dicomdir.;1', 'i0000001.;1' ... still map onto the upper-case Referenced File IDs."""
    source = tmp_path / "src"
    written = hm.write_disc(source, [hm.MR, hm.CT_SMALL])
    hm.make_dicomdir(source)
    iso = tmp_path / "plain.iso"
    subprocess.run(["genisoimage", "-quiet", "-allow-lowercase", "-o", str(iso), str(source)], check=True,
                   capture_output=True)
    with open_medium(iso) as medium:
        assert medium.name_source == "iso_path"
        result = scan_medium(medium)
    assert result.used_dicomdir, result.dicomdir_problems
    assert uids(result) == set(written.values())


def test_rock_ridge_fifo_and_device_are_refused(tmp_path):
    source = tmp_path / "src"
    written = hm.write_disc(source, [hm.MR])
    os.mkfifo(source / "FIFO")
    try:
        os.mknod(source / "NULLDEV", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        device = True
    except (PermissionError, OSError):
        device = False
    iso = hm.make_iso(source, tmp_path / "dev.iso")
    result = scan(iso)
    errors = {problem.file: problem.reason for problem in result.errors}
    assert "not a regular file (FIFO)" in errors["FIFO"]
    if device:
        assert "not a regular file (character device)" in errors["NULLDEV"]
    assert uids(result) == set(written.values())


def test_folder_device_file_is_refused(tmp_path):
    folder = tmp_path / "disc"
    written = hm.write_disc(folder, [hm.MR])
    try:
        os.mknod(folder / "NULLDEV", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here")
    result = scan(folder)
    assert result.problem_for("NULLDEV").reason == "refused: not a regular file (character device)"
    assert uids(result) == set(written.values())


def test_folder_open_refuses_a_symlink_swapped_in_after_listing(tmp_path):
    folder = tmp_path / "usb"
    written = hm.write_disc(folder, [hm.MR, hm.CT_SMALL])
    first, second = list(written)
    with open_medium(folder) as medium:
        listed = {entry.path for entry in medium.files()}
        assert first in listed
        (folder / first).unlink()
        (folder / first).symlink_to("/etc/passwd")
        with pytest.raises(RefusedFile, match="without following links"):
            medium.open(first)
        # A directory on the way swapped for a link is refused too.
        shutil.move(folder / "DICOM", tmp_path / "elsewhere")
        (folder / "DICOM").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(RefusedFile, match="without following links"):
            medium.open(second)


def test_refused_entries_cannot_be_opened(tmp_path):
    case = hm.case_zip_dotdot_entry(tmp_path)
    with open_medium(case.location) as medium:
        refused = [entry for entry in medium.files() if entry.refusal]
        assert [entry.path for entry in refused] == ["../evil.dcm", "DICOM/../../evil2.dcm"]
        for entry in refused:
            with pytest.raises(RefusedFile, match=r"'\.\.' path component"):
                medium.open(entry.path)


# --- one file at a time --------------------------------------------------------------------------

def test_bare_datasets_without_preamble_are_found(tmp_path):
    folder = tmp_path / "bare"
    implicit = hm.fresh_instance(hm.MR)
    explicit = hm.fresh_instance(hm.CT_SMALL)
    folder.mkdir()
    implicit.file_meta = pydicom.dataset.FileMetaDataset()
    implicit.preamble = None
    pydicom.dcmwrite(folder / "IMPLICIT", implicit, implicit_vr=True, little_endian=True)
    explicit.file_meta = pydicom.dataset.FileMetaDataset()
    explicit.preamble = None
    pydicom.dcmwrite(folder / "EXPLICIT", explicit, implicit_vr=False, little_endian=True)
    assert (folder / "IMPLICIT").read_bytes()[:2] == b"\x08\x00"

    result = scan(folder)
    by_path = {instance.path: instance for instance in result.instances}
    assert set(by_path) == {"IMPLICIT", "EXPLICIT"}
    assert by_path["IMPLICIT"].transfer_syntax == "1.2.840.10008.1.2"
    assert by_path["EXPLICIT"].transfer_syntax == "1.2.840.10008.1.2.1"
    assert not by_path["IMPLICIT"].has_preamble and not by_path["EXPLICIT"].has_preamble
    assert by_path["IMPLICIT"].sop_instance_uid == implicit.SOPInstanceUID


def test_header_keeps_no_pixels_no_big_values_and_no_path_to_reopen(tmp_path):
    folder = tmp_path / "disc"
    dataset = hm.fresh_instance(hm.MR)
    dataset.add_new(0x00091001, "OB", bytes(2 << 20))  # a 2 MiB private blob
    dataset.private_block(0x0009, "DISCFLOW", create=True)
    hm.write_instance(dataset, folder / "DICOM" / "I0000001")
    (result,) = scan(folder).instances
    assert "PixelData" not in result.header
    assert 0x00091001 not in result.header
    assert result.header.SOPInstanceUID == dataset.SOPInstanceUID
    assert getattr(result.header, "filename", None) is None
    assert getattr(result.header, "buffer", None) is None
    for element in result.header:  # every value readable without the medium
        element.value


def test_scan_limits_are_honoured(tmp_path):
    folder = tmp_path / "disc"
    written = hm.write_disc(folder, [hm.MR, hm.UNCOMPRESSED_CT])
    small, large = list(written)
    result = scan(folder, max_file_bytes=100_000)
    assert uids(result) == {written[small]}
    assert "over the 100000-byte limit" in result.problem_for(large).reason

    result = scan(folder, max_pixels=64 * 64)
    assert uids(result) == {written[small]}
    assert "decompression bomb" in result.problem_for(large).reason


def test_medium_refuses_files_over_its_limit(tmp_path):
    folder = tmp_path / "disc"
    written = hm.write_disc(folder, [hm.MR, hm.UNCOMPRESSED_CT])
    with open_medium(folder, max_file_bytes=100_000) as medium:
        refusals = {entry.path: entry.refusal for entry in medium.files()}
        result = scan_medium(medium)
    large = list(written)[1]
    assert "over the 100000-byte limit" in refusals[large]
    assert result.problem_for(large).severity == "error"
    assert uids(result) == {written[list(written)[0]]}


@pytest.mark.parametrize("content", [b"", b"not a disc at all" * 100, bytes(40_000)])
def test_open_medium_refuses_what_is_no_medium(content, tmp_path):
    junk = tmp_path / "junk.iso"
    junk.write_bytes(content)
    with pytest.raises(MediaError):
        open_medium(junk)
    with pytest.raises(MediaError, match="no such file"):
        open_medium(tmp_path / "missing.zip")


def test_open_medium_refuses_truncated_iso_and_zip(good_disc, tmp_path):
    iso = tmp_path / "cut.iso"
    iso.write_bytes(good_disc["iso"].read_bytes()[:40_000])
    with pytest.raises(MediaError, match="ISO 9660"):
        open_medium(iso)
    archive = tmp_path / "cut.zip"
    archive.write_bytes(good_disc["zip"].read_bytes()[:-5000])
    with pytest.raises(MediaError):
        open_medium(archive)


def test_medium_is_told_by_content_not_by_name(good_disc, tmp_path):
    shutil.copyfile(good_disc["zip"], tmp_path / "really_a_zip.iso")
    shutil.copyfile(good_disc["iso"], tmp_path / "really_an_iso.zip")
    assert open_medium(tmp_path / "really_a_zip.iso").kind == "zip"
    assert open_medium(tmp_path / "really_an_iso.zip").kind == "iso"


@pytest.mark.parametrize("raw, expected", [
    ("DICOM/P0000001/I0000001", ("DICOM/P0000001/I0000001", None)),
    ("DICOM\\P0000001\\I0000001", ("DICOM/P0000001/I0000001", None)),
    ("./DICOM//I0000001", ("DICOM/I0000001", None)),
    ("../evil", ("../evil", "'..' path component (escapes the media root)")),
    ("DICOM\\..\\..\\evil", ("DICOM\\..\\..\\evil", "'..' path component (escapes the media root)")),
    ("/etc/passwd", ("/etc/passwd", "absolute path (escapes the media root)")),
    ("\\\\server\\share", ("\\\\server\\share", "absolute path (escapes the media root)")),
    ("C:\\evil", ("C:\\evil", "drive letter in the path (escapes the media root)")),
    ("a\x00b", ("a\\x00b", "NUL byte in the file name")),
])
def test_normalise_name(raw, expected):
    assert normalise_name(raw) == expected


def test_zip_with_backslash_names_as_old_windows_tools_write(tmp_path):
    archive = tmp_path / "windows.zip"
    dataset = hm.fresh_instance(hm.MR)
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("DICOM\\P0000001\\I0000001", hm._part10_bytes(dataset))
    result = scan(archive)
    assert [(instance.path, instance.sop_instance_uid) for instance in result.instances] == \
        [("DICOM/P0000001/I0000001", dataset.SOPInstanceUID)]


# --- how fast -----------------------------------------------------------------------------------

def test_scan_of_a_500_file_disc(tmp_path):
    """Folder, ISO and ZIP of the same 500-file disc; timings printed (run with -s), not asserted."""
    folder = tmp_path / "disc"
    written = hm.write_disc(folder, [hm.CT_SMALL, hm.MR] * 250, patients=5)
    hm.make_dicomdir(folder)
    media = {"folder": folder, "iso": hm.make_iso(folder, tmp_path / "disc.iso"),
             "zip": hm.make_zip(folder, tmp_path / "disc.zip")}
    for kind, location in media.items():
        started = time.perf_counter()
        result = scan(location)
        elapsed = time.perf_counter() - started
        print(f"500-file disc from {kind}: {elapsed:.3f} s")
        assert result.used_dicomdir
        assert uids(result) == set(written.values())
        assert result.problems == []


# --- random damage ------------------------------------------------------------------------------

def test_damaged_media_never_escape_as_exceptions(good_disc, tmp_path):
    """Bytes flipped and files cut at random: the scan reports problems, or the medium is
    refused as a whole (MediaError); nothing else ever comes out of open_medium/scan_medium."""
    import random

    rng = random.Random(20240611)
    folder = tmp_path / "damaged"
    shutil.copytree(good_disc["folder"], folder)
    originals = {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
    for _ in range(40):
        for path, data in originals.items():
            damaged = bytearray(data)
            if rng.random() < 0.3:
                damaged = damaged[:rng.randrange(len(damaged))]
            else:
                for _ in range(rng.randrange(1, 20)):
                    damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            path.write_bytes(bytes(damaged))
        result = scan(folder)
        # Every file is accounted for: imported, or named in a problem (the root DICOMDIR aside).
        accounted = {instance.path for instance in result.instances} | {problem.file for problem in result.problems}
        on_medium = {path.relative_to(folder).as_posix() for path in originals} - {"DICOMDIR"}
        assert on_medium <= accounted

    outcomes = Counter()
    for kind in ("iso", "zip"):
        pristine = good_disc[kind].read_bytes()
        damaged_path = tmp_path / f"damaged.{kind}"
        low = 16 * 2048 if kind == "iso" else 0  # ISO: hit the descriptors and directory records
        high = min(len(pristine), low + 60_000) if kind == "iso" else len(pristine)
        for _ in range(150):
            damaged = bytearray(pristine)
            for _ in range(rng.randrange(1, 30)):
                damaged[rng.randrange(low, high)] = rng.randrange(256)
            damaged_path.write_bytes(bytes(damaged))
            try:
                scan(damaged_path)
                outcomes[f"{kind} scanned"] += 1
            except MediaError:
                outcomes[f"{kind} refused"] += 1
    print(dict(outcomes))
    assert sum(outcomes.values()) == 300
