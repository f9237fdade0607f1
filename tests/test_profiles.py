"""Profiles, media capacities, spanning, reports (PDF), viewer bundle and burn hand-off: unit level."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from conftest import require_tools
from tasks.burn import (BurnError, VolumeToBurn, burn_command, burn_to_device, handoff_to_robot, sha256_file,
                        verify_device, write_image_checksum)
from tasks.manifest import ManifestBuilder
from tasks.profiles import (MEDIA_CAPACITY_BYTES, ProfileError, check_policy, plan_profile_conversions,
                            resolve_profile)
from tasks.report_document import ReportSource, encapsulated_pdf, read_report_file, render_pdf, sr_text
from tasks.viewer_bundle import ViewerError, autorun_inf, load_viewer
from tasks.volume_plan import FIXED_OVERHEAD_BYTES, CapacityError, Output, plan_volumes
from tasks.web_content import window_to_8bit

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"


def _dataset(study: str, series: str, number: int, image: bool = True) -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID = "DOE^JANE", "P1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2" if image else "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID, ds.InstanceNumber, ds.Modality = generate_uid(), number, "CT" if image else "SR"
    if image:
        ds.Rows = ds.Columns = 512
    return ds


def _uid(key: str) -> str:
    return "1.2.3." + ".".join(str(ord(character)) for character in key)


def _manifest(layout: list[tuple[str, str, str, bool]]):
    """(study, series, transfer syntax, is image) per instance."""
    builder = ManifestBuilder("unit", "export", {})
    for number, (study, series, syntax, image) in enumerate(layout, start=1):
        builder.add(f"/src/{number}", 1000, _dataset(_uid(study), _uid(series), number, image), syntax)
    return builder.manifest


def test_auto_picks_the_least_restrictive_general_purpose_profile() -> None:
    assert resolve_profile("auto", {ExplicitVRLittleEndian}).name == "STD-GEN-CD"
    assert resolve_profile(None, {ExplicitVRLittleEndian, JPEG_LOSSLESS}).name == "STD-GEN-DVD-JPEG"
    assert resolve_profile("auto", {JPEG_LOSSLESS}, media="usb").name == "STD-GEN-USB-JPEG"
    assert resolve_profile("auto", {J2K, JPEG_LOSSLESS}).name == "STD-GEN-DVD-J2K"
    # syntaxes no general-purpose profile allows do not steer the choice; they get converted
    assert resolve_profile("auto", {ExplicitVRLittleEndian, RLELossless}).name == "STD-GEN-CD"
    assert resolve_profile("guideline", set()).name == "GUIDELINE"
    with pytest.raises(ProfileError, match="unknown profile"):
        resolve_profile("STD-GEN-FLOPPY", set())


def test_keep_converts_only_what_the_profile_forbids_and_says_so() -> None:
    manifest = _manifest([("1", "1.1", ExplicitVRLittleEndian, True), ("1", "1.1", JPEG_LOSSLESS, True),
                          ("1", "1.2", ImplicitVRLittleEndian, False), ("2", "2.1", RLELossless, True),
                          ("2", "2.1", JPEG_LS, True)])
    profile, work = plan_profile_conversions(manifest, "keep", "STD-GEN-DVD-JPEG")
    assert profile.name == "STD-GEN-DVD-JPEG"
    assert work == [2, 3, 4]
    assert [i.action for i in manifest.instances] == ["copy", "copy", "convert", "convert", "convert"]
    assert {i.target_syntax for i in manifest.instances[2:]} == {ExplicitVRLittleEndian}
    converted = manifest.options["converted_for_profile"]
    assert [(c["index"], c["from"]) for c in converted] == [(2, ImplicitVRLittleEndian), (3, RLELossless),
                                                           (4, JPEG_LS)]
    # the same job on STD-GEN-CD also converts the JPEG file; auto keeps JPEG (DVD-JPEG)
    manifest = _manifest([("1", "1.1", ExplicitVRLittleEndian, True), ("1", "1.1", JPEG_LOSSLESS, True)])
    assert plan_profile_conversions(manifest, "keep", "STD-GEN-CD")[1] == [1]
    manifest = _manifest([("1", "1.1", ExplicitVRLittleEndian, True), ("1", "1.1", JPEG_LOSSLESS, True)])
    assert plan_profile_conversions(manifest, "keep", "auto") [0].name == "STD-GEN-DVD-JPEG"
    assert manifest.options["converted_for_profile"] == []


def test_compressing_policy_leaves_documents_alone_and_refuses_forbidden_targets() -> None:
    manifest = _manifest([("1", "1.1", ExplicitVRLittleEndian, True), ("1", "1.2", ExplicitVRLittleEndian, False)])
    profile, work = plan_profile_conversions(manifest, "jpeg-lossless", None)
    assert profile.name == "STD-GEN-DVD-JPEG" and work == [0]  # the SR keeps Explicit VR Little Endian
    with pytest.raises(ProfileError, match="does not allow --syntax j2k-lossless"):
        check_policy("j2k-lossless", "STD-GEN-CD")
    with pytest.raises(ProfileError):
        check_policy("j2k-lossy", "GUIDELINE")
    check_policy("jpeg-extended", "GUIDELINE")


def test_media_capacities_are_the_real_ones() -> None:
    assert MEDIA_CAPACITY_BYTES["cd"] <= 737_280_000 and MEDIA_CAPACITY_BYTES["dvd"] <= 4_700_372_992
    assert MEDIA_CAPACITY_BYTES["dvd-dl"] <= 8_543_666_176 and MEDIA_CAPACITY_BYTES["bd"] <= 25_025_314_816
    assert MEDIA_CAPACITY_BYTES["usb"] is None


def _outputs(manifest, size: int) -> dict[int, Output]:
    return {i.index: Output(i.index, i.source, i.transfer_syntax, i.sop_instance_uid, size) for i in manifest.instances}


def test_spanning_keeps_studies_whole_and_splits_only_an_oversized_study_by_series() -> None:
    mb = 1_000_000
    layout = [("A", "A1", ExplicitVRLittleEndian, True)] * 3 + [("B", "B1", ExplicitVRLittleEndian, True)] * 3 + \
             [("C", "C1", ExplicitVRLittleEndian, True)] * 4 + [("C", "C2", ExplicitVRLittleEndian, True)] * 4
    manifest = _manifest(layout)
    capacity = FIXED_OVERHEAD_BYTES + 7 * mb
    volumes = plan_volumes(manifest, _outputs(manifest, mb), capacity)
    studies = [[manifest.instances[i].study for i in volume] for volume in volumes]
    assert studies == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]  # C (8 MB) alone exceeds: by series
    assert [len({manifest.instances[i].series for i in v}) for v in volumes] == [2, 1, 1]
    # the viewer's bytes are taken from every volume
    assert len(plan_volumes(manifest, _outputs(manifest, mb), capacity, reserved_bytes=2 * mb)) > len(volumes)
    assert plan_volumes(manifest, _outputs(manifest, mb), None) == [list(range(14))]  # USB: one volume
    with pytest.raises(CapacityError):
        plan_volumes(manifest, _outputs(manifest, 50 * mb), capacity)


def test_txt_and_sr_reports_become_valid_pdf_and_encapsulated_pdf(tmp_path: Path) -> None:
    text = tmp_path / "report.txt"
    text.write_text("CT HEAD\n\nFindings: subdural haematoma, left (größer als 1 cm).\n" + "line\n" * 120,
                    encoding="utf-8")
    source = read_report_file(text)
    assert source.pdf.startswith(b"%PDF-1.4") and source.title == "CT HEAD"
    (tmp_path / "r.pdf").write_bytes(source.pdf)
    if shutil.which("pdftotext"):
        extracted = subprocess.run(["pdftotext", str(tmp_path / "r.pdf"), "-"], capture_output=True, text=True,
                                   check=True).stdout
        assert "subdural haematoma, left (größer als 1 cm)." in extracted and "page 3 of 3" in extracted
    info = subprocess.run(["pdfinfo", str(tmp_path / "r.pdf")], capture_output=True, text=True) \
        if shutil.which("pdfinfo") else None
    assert info is None or (info.returncode == 0 and "Pages:           3" in info.stdout and not info.stderr)

    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    title, lines = sr_text(sr)
    assert title == "Diagnosis" and any("Riesmeier" in line for line in lines)
    pdf = render_pdf(title, lines)
    dataset = encapsulated_pdf(ReportSource(pdf, title, lines, "20240101", "120000",
                                            (str(sr.SOPClassUID), str(sr.SOPInstanceUID)), "SYN"),
                               sr, sr, series_uid=generate_uid(), series_number=99, instance_number=1,
                               sop_instance_uid=generate_uid(), institution="Test Hospital")
    path = tmp_path / "pdf.dcm"
    dataset.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    assert again.MIMETypeOfEncapsulatedDocument == "application/pdf" and again.Modality == "DOC"
    assert bytes(again.EncapsulatedDocument)[:len(pdf)] == pdf
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
        assert [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")] == []
    with pytest.raises(Exception, match="not a PDF"):
        (tmp_path / "fake.pdf").write_bytes(b"hello")
        read_report_file(tmp_path / "fake.pdf")


def test_viewer_bundle_and_autorun(tmp_path: Path) -> None:
    viewer = tmp_path / "viewer"
    (viewer / "lib").mkdir(parents=True)
    (viewer / "Start Viewer.exe").write_bytes(b"MZ" + bytes(5000))
    (viewer / "lib" / "core.dll").write_bytes(b"MZ" + bytes(100))
    bundle = load_viewer(viewer)
    assert [media for media, _ in bundle.files] == ["VIEWER/Start Viewer.exe", "VIEWER/lib/core.dll"]
    assert bundle.start == "VIEWER/Start Viewer.exe" and bundle.disc_bytes == (3 + 1) * 2048 + (1 + 1) * 2048  # data sectors + a directory sector each
    assert autorun_inf(bundle.start, "DICOM 1 of 2") == \
        b'[autorun]\r\nopen="VIEWER\\Start Viewer.exe"\r\nicon="VIEWER\\Start Viewer.exe"\r\nlabel=DICOM 1 of 2\r\n'
    assert load_viewer(viewer, "lib/core.dll").start == "VIEWER/lib/core.dll"
    with pytest.raises(ViewerError, match="not in the viewer folder"):
        load_viewer(viewer, "missing.exe")
    os.symlink("/etc/passwd", viewer / "passwd")
    with pytest.raises(ViewerError, match="symbolic link"):
        load_viewer(viewer)
    assert load_viewer(None) is None


def test_robot_job_files(tmp_path: Path) -> None:
    image = tmp_path / "out" / "VOL001.ISO"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    hot = tmp_path / "hot"
    hot.mkdir()
    volume = VolumeToBurn(image, "DISCFLOW_001", 1, 2, "dvd", files=[("DICOMDIR", image), ("README.TXT", b"hi")])
    jrq = handoff_to_robot(volume, hot, "primera", robot_path=r"C:\PTBurnJobs")
    keys = dict(line.split("=", 1) for line in jrq.read_text().splitlines())
    assert jrq.name == "DISCFLOW_001_001.JRQ" and (hot / "DISCFLOW_001_001" / "VOL001.ISO").is_file()
    assert keys["ImageFile"] == r"C:\PTBurnJobs\DISCFLOW_001_001\VOL001.ISO" and keys["DiscType"] == "DVDR"
    assert keys["JobID"] == "DISCFLOW_001 1 of 2" and keys["ImageType"] == "MODE_1_2048"
    assert jrq.read_bytes().count(b"\r\n") == len(keys)
    jdf = handoff_to_robot(volume, hot, "epson")
    keys = dict(line.split("=", 1) for line in jdf.read_text().splitlines())
    assert keys["DATA"] == str(hot / "DISCFLOW_001_001" / "DATA") and keys["DISC_TYPE"] == "DVD"
    assert (hot / "DISCFLOW_001_001" / "DATA" / "README.TXT").read_bytes() == b"hi"
    with pytest.raises(BurnError, match="hot folder not found"):
        handoff_to_robot(volume, tmp_path / "nowhere", "primera")


def test_xorriso_burn_to_a_file_backed_drive_is_verified_by_reading_back(tmp_path: Path) -> None:
    require_tools("xorriso")
    image = tmp_path / "VOL001.ISO"
    from tasks.iso_image import build_iso
    build_iso(image, [], volume_id="DISCFLOW_001", extra_files=[("README.TXT", b"hello\r\n" * 1000)])
    write_image_checksum(image, sha256_file(image))
    assert burn_command(image, "/dev/sr0") == ["xorriso", "-as", "cdrecord", "-v", "dev=/dev/sr0", "-eject",
                                               str(image)]
    drive = tmp_path / "drive.iso"
    assert burn_to_device(image, f"stdio:{drive}") == sha256_file(image)
    assert drive.stat().st_size >= image.stat().st_size  # the drive pads; only the image's bytes are compared
    with open(drive, "r+b") as handle:  # a bad burn: one flipped byte in the file-set
        handle.seek(image.stat().st_size - 100)
        handle.write(b"X")
    with pytest.raises(BurnError, match="verification failed"):
        verify_device(image, f"stdio:{drive}")


def _mono(photometric: str, pixels: np.ndarray, **attributes) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, 1
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_thumbnail_windowing() -> None:
    ramp = np.tile(np.arange(0, 1000, 2, dtype=np.uint16), (500, 1))  # 500x500, stored 0..998
    # rescale to HU (-1000..-2) then a window 40/400 around soft tissue: everything below is black
    ct = window_to_8bit(_mono("MONOCHROME2", ramp, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=-500,
                              WindowWidth=200), ramp)
    assert ct.shape == (250, 250) and ct.dtype == np.uint8
    assert ct[:, 0].max() == 0 and ct[:, -1].min() == 255 and 0 < ct[0, 125] < 255
    inverted = window_to_8bit(_mono("MONOCHROME1", ramp, WindowCenter=500, WindowWidth=1000), ramp)
    normal = window_to_8bit(_mono("MONOCHROME2", ramp, WindowCenter=500, WindowWidth=1000), ramp)
    assert np.array_equal(inverted, 255 - normal) and normal[0, 0] < normal[0, -1]
    # no window: the 1st-99th percentile spans black to white
    plain = window_to_8bit(_mono("MONOCHROME2", ramp), ramp)
    assert plain.min() == 0 and plain.max() == 255
    rgb = window_to_8bit(_mono("RGB", ramp), np.zeros((64, 64, 3), dtype=np.uint8) + 200)
    assert rgb.shape == (64, 64, 3) and rgb.max() == 200
