"""Builders for media, good and hostile, made from real DICOM files with fresh UIDs.

Good media come from real tools: ``dcmmkdir`` (DCMTK) writes the DICOMDIR, ``genisoimage``
writes the ISO image, :mod:`zipfile` writes a ZIP with forward slashes as Orthanc does.

Every ``case_*`` function builds one hostile medium in a fresh folder and returns a
:class:`HostileCase`: where the medium is, which files must be refused (with a fragment of
the expected reason), which warnings must appear, and which SOP Instance UIDs must still be
imported because the rest of the disc is fine.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

UNCOMPRESSED_CT = "693_UNCR.dcm"  # 512 x 512 CT, Explicit VR Little Endian
MR = "MR_small.dcm"  # 64 x 64 MR, Explicit VR Little Endian
CT_SMALL = "CT_small.dcm"
JPEG_LS = "MR_small_jpeg_ls_lossless.dcm"
J2K_LOSSLESS = "MR_small_jp2klossless.dcm"
RLE = "MR_small_RLE.dcm"
JPEG_BASELINE = "SC_rgb_jpeg_dcmtk.dcm"
JPEG_EXTENDED = "JPEG-lossy.dcm"
IMPLICIT = "MR_small_implicit.dcm"
BIG_ENDIAN = "MR_small_bigendian.dcm"
DEFLATED = "image_dfl.dcm"


@dataclass
class HostileCase:
    name: str
    location: Path
    refused: dict[str, str] = field(default_factory=dict)
    """Media path (or, for a DICOMDIR record, the Referenced File ID as written) -> reason fragment."""
    valid: set[str] = field(default_factory=set)
    """SOP Instance UIDs that must be imported despite the hostile files."""
    warnings: dict[str, str] = field(default_factory=dict)
    dicomdir_problems: list[str] = field(default_factory=list)
    """Fragments that must each appear in some ``dicomdir_problems`` entry."""
    used_dicomdir: bool | None = None
    not_imported: set[str] = field(default_factory=set)
    """SOP Instance UIDs that must not be in the instances (refused content)."""


# --- building blocks -------------------------------------------------------------------------

def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return Path(path)


def fresh_instance(source: str = MR, *, patient_id: str = "DISCFLOW1", patient_name: str = "Hostile^Media",
                   study_uid: str | None = None, series_uid: str | None = None,
                   sop_uid: str | None = None) -> Dataset:
    """A real instance from pydicom's test data, with new UIDs (so copies never collide)."""
    dataset = pydicom.dcmread(testdata(source))
    dataset.SOPInstanceUID = sop_uid or generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.PatientID = patient_id
    dataset.PatientName = patient_name
    return dataset


def write_instance(dataset: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_disc(folder: Path, sources: list[str], *, patients: int = 1, prefix: str = "DICOM") -> dict[str, str]:
    """Part 10 files with 8-character upper-case names, laid out as an export disc would.

    Returns media path -> SOP Instance UID.
    """
    written: dict[str, str] = {}
    studies = [generate_uid() for _ in range(patients)]
    for number, source in enumerate(sources):
        patient = number % patients
        dataset = fresh_instance(source, patient_id=f"DISCFLOW{patient + 1}", patient_name=f"Patient^{patient + 1}",
                                 study_uid=studies[patient], series_uid=None)
        relative = f"{prefix}/P{patient + 1:07d}/S0000001/I{number + 1:07d}"
        write_instance(dataset, folder / relative)
        written[relative] = str(dataset.SOPInstanceUID)
    return written


def make_dicomdir(folder: Path, *inputs: str) -> Path:
    """DICOMDIR by DCMTK's dcmmkdir, over every file under ``inputs`` (default: DICOM/)."""
    command = ["dcmmkdir", "--recurse", "--invent", "--no-xfer-check", "--no-encoding-check",
               "--no-resolution-check", "--input-directory", str(folder),
               "--output-file", str(folder / "DICOMDIR"), *(inputs or ("DICOM",))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dcmmkdir failed: {result.stderr or result.stdout}")
    return folder / "DICOMDIR"


def make_iso(folder: Path, iso: Path, *, joliet: bool = True, rock_ridge: bool = True) -> Path:
    command = ["genisoimage", "-quiet", "-V", "DISCFLOW", "-o", str(iso)]
    if joliet:
        command.append("-J")
    if rock_ridge:
        command.append("-R")
    subprocess.run([*command, str(folder)], check=True, capture_output=True)
    return iso


def make_zip(folder: Path, archive: Path) -> Path:
    """Every file under ``folder``, forward slashes, deflated (like an Orthanc media archive)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out.write(path, path.relative_to(folder).as_posix())
    return archive


def replace_in_file(path: Path, old: bytes, new: bytes, *, count: int = 1) -> None:
    """Byte-level edit that keeps every length (so DICOMDIR record offsets stay right)."""
    if len(old) != len(new):
        raise ValueError("replacement must keep the length")
    data = path.read_bytes()
    if data.count(old) < count:
        raise ValueError(f"{old!r} not found {count} time(s) in {path}")
    path.write_bytes(data.replace(old, new, count))


def file_id_bytes(relative: str) -> bytes:
    """How dcmmkdir writes a Referenced File ID value (backslashes, padded to even length)."""
    value = relative.replace("/", "\\").encode()
    return value + b" " if len(value) % 2 else value


def set_zip_flag(archive: Path, name: str, flag: int) -> None:
    """Set a general-purpose flag bit of one entry, in its local header and central directory."""
    with zipfile.ZipFile(archive) as existing:
        info = existing.getinfo(name)
        local = info.header_offset
    data = bytearray(archive.read_bytes())
    assert data[local:local + 4] == b"PK\x03\x04"
    struct.pack_into("<H", data, local + 6, struct.unpack_from("<H", data, local + 6)[0] | flag)
    position = data.find(b"PK\x01\x02")
    while position >= 0:
        name_length = struct.unpack_from("<H", data, position + 28)[0]
        if bytes(data[position + 46:position + 46 + name_length]) == name.encode():
            struct.pack_into("<H", data, position + 8, struct.unpack_from("<H", data, position + 8)[0] | flag)
            break
        position = data.find(b"PK\x01\x02", position + 4)
    archive.write_bytes(bytes(data))


# --- hostile cases ---------------------------------------------------------------------------

def case_zip_dotdot_entry(tmp: Path) -> HostileCase:
    archive = tmp / "dotdot.zip"
    good = fresh_instance(MR)
    evil = fresh_instance(MR)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("DICOM/I0000001", _part10_bytes(good))
        out.writestr("../evil.dcm", _part10_bytes(evil))
        out.writestr("DICOM/../../evil2.dcm", _part10_bytes(evil))
    return HostileCase("zip_dotdot_entry", archive,
                       refused={"../evil.dcm": "'..' path component", "DICOM/../../evil2.dcm": "'..' path component"},
                       valid={good.SOPInstanceUID}, not_imported={evil.SOPInstanceUID})


def case_zip_absolute_entry(tmp: Path) -> HostileCase:
    archive = tmp / "absolute.zip"
    good = fresh_instance(MR)
    evil = fresh_instance(MR)
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("DICOM/I0000001", _part10_bytes(good))
        out.writestr(zipfile.ZipInfo("/etc/evil.dcm"), _part10_bytes(evil))
    return HostileCase("zip_absolute_entry", archive, refused={"/etc/evil.dcm": "absolute path"},
                       valid={good.SOPInstanceUID}, not_imported={evil.SOPInstanceUID})


def case_zip_windows_names(tmp: Path) -> HostileCase:
    """Backslash traversal, a drive letter, a NUL byte in a name, an encrypted entry, a symlink entry."""
    archive = tmp / "windows.zip"
    good = fresh_instance(MR)
    evil = fresh_instance(MR)
    evil_bytes = _part10_bytes(evil)
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("DICOM/I0000001", _part10_bytes(good))
        out.writestr("..\\..\\evil.dcm", evil_bytes)
        out.writestr("C:/Windows/evil.dcm", evil_bytes)
        out.writestr("DICOM/I0000002#.txt", evil_bytes)  # '#' becomes a NUL byte below
        out.writestr("DICOM/SECRET", evil_bytes)  # marked encrypted below
        link = zipfile.ZipInfo("DICOM/LINK")
        link.create_system = 3
        link.external_attr = (0o120777 << 16)
        out.writestr(link, "/etc/passwd")
    # zipfile cuts names at a NUL byte when writing, so put the NUL in afterwards (local
    # header and central directory both).
    replace_in_file(archive, b"DICOM/I0000002#.txt", b"DICOM/I0000002\x00.txt", count=2)
    set_zip_flag(archive, "DICOM/SECRET", 0x1)  # zipfile clears flag bits when writing
    return HostileCase("zip_windows_names", archive, refused={
        "..\\..\\evil.dcm": "'..' path component",
        "C:/Windows/evil.dcm": "drive letter",
        "DICOM/I0000002\\x00.txt": "NUL byte",
        "DICOM/SECRET": "encrypted",
        "DICOM/LINK": "symbolic link",
    }, valid={good.SOPInstanceUID}, not_imported={evil.SOPInstanceUID})


def case_zip_bomb(tmp: Path) -> HostileCase:
    archive = tmp / "bomb.zip"
    good = fresh_instance(MR)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        out.writestr("DICOM/I0000001", _part10_bytes(good))
        with out.open("DICOM/I0000002", "w", force_zip64=True) as bomb:
            preamble = _part10_bytes(fresh_instance(MR))
            bomb.write(preamble)
            zeros = bytes(8 << 20)
            for _ in range(8):  # 64 MiB of zeros: about 64 KiB compressed
                bomb.write(zeros)
    return HostileCase("zip_bomb", archive, refused={"DICOM/I0000002": "zip bomb"}, valid={good.SOPInstanceUID})


def case_folder_symlinks(tmp: Path) -> HostileCase:
    folder = tmp / "symlinks"
    written = write_disc(folder, [MR, CT_SMALL])
    (folder / "DICOM/PASSWD").symlink_to("/etc/passwd")
    (folder / "DICOM/LINK").symlink_to(folder / next(iter(written)))
    (folder / "OUTSIDE").symlink_to("/etc")
    os.mkfifo(folder / "DICOM/FIFO")
    return HostileCase("folder_symlinks", folder, refused={
        "DICOM/PASSWD": "symbolic link (to '/etc/passwd')",
        "DICOM/LINK": "symbolic link",
        "OUTSIDE": "symbolic link",
        "DICOM/FIFO": "not a regular file (FIFO)",
    }, valid=set(written.values()))


def case_iso_symlink(tmp: Path) -> HostileCase:
    folder = tmp / "iso_symlink_src"
    written = write_disc(folder, [MR, CT_SMALL])
    (folder / "DICOM/PASSWD").symlink_to("/etc/passwd")
    (folder / "DICOM/LINK").symlink_to("P0000001/S0000001/I0000001")
    iso = make_iso(folder, tmp / "symlink.iso")
    return HostileCase("iso_symlink", iso, refused={
        "DICOM/PASSWD": "symbolic link (to '/etc/passwd')",
        "DICOM/LINK": "symbolic link",
    }, valid=set(written.values()))


def case_dicomdir_escaping_file_id(tmp: Path) -> HostileCase:
    folder = tmp / "escaping"
    written = write_disc(folder, [MR, CT_SMALL, JPEG_LS])
    dicomdir = make_dicomdir(folder)
    target = list(written)[1]
    original = file_id_bytes(target)
    evil = b"..\\..\\etc\\passwd"
    replace_in_file(dicomdir, original, evil.ljust(len(original), b" "))
    return HostileCase("dicomdir_escaping_file_id", folder,
                       refused={"..\\..\\etc\\passwd": "escapes the media root"},
                       valid=set(written.values()),  # the file whose record was spoiled is found by walking
                       dicomdir_problems=["escapes the media root", f"{target}: a DICOM file no DICOMDIR record"],
                       used_dicomdir=False)


def case_dicomdir_missing_file(tmp: Path) -> HostileCase:
    folder = tmp / "missing"
    written = write_disc(folder, [MR, CT_SMALL, JPEG_LS, RLE])
    make_dicomdir(folder)
    gone = list(written)[2]
    (folder / gone).unlink()
    kept = {uid for path, uid in written.items() if path != gone}
    return HostileCase("dicomdir_missing_file", folder, refused={gone: "missing from the medium"},
                       valid=kept, dicomdir_problems=["missing from the medium"], used_dicomdir=False)


def case_dicomdir_wrong_sop_instance_uid(tmp: Path) -> HostileCase:
    folder = tmp / "wrong_uid"
    written = write_disc(folder, [MR, CT_SMALL, J2K_LOSSLESS])
    dicomdir = make_dicomdir(folder)
    path, uid = list(written.items())[0]
    wrong = ("9" * len(uid)).encode()
    replace_in_file(dicomdir, uid.encode(), wrong)
    return HostileCase("dicomdir_wrong_sop_instance_uid", folder, valid=set(written.values()),
                       warnings={path: "the file's header is used"},
                       dicomdir_problems=["Referenced SOP Instance UID in File 999"], used_dicomdir=False,
                       not_imported={wrong.decode()})


def case_lowercase_slashes_versions(tmp: Path) -> HostileCase:
    """What a Windows or Linux mount of an ISO 9660 disc can show: lower case, ';1', trailing
    dots, and a writer that put forward slashes in a Referenced File ID."""
    source = tmp / "lowercase_src"
    written = write_disc(source, [MR, CT_SMALL, JPEG_BASELINE, IMPLICIT])
    dicomdir = make_dicomdir(source)
    paths = list(written)
    replace_in_file(dicomdir, file_id_bytes(paths[0]), file_id_bytes(paths[0]).replace(b"\\", b"/"))
    folder = tmp / "lowercase"
    for number, path in enumerate(paths):
        renamed = folder / (path.lower() + (";1" if number % 2 == 0 else "."))
        renamed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / path, renamed)
    shutil.copyfile(dicomdir, folder / "dicomdir;1")
    return HostileCase("lowercase_slashes_versions", folder, valid=set(written.values()), used_dicomdir=True)


def case_corrupt_headers(tmp: Path) -> HostileCase:
    folder = tmp / "corrupt"
    good = write_disc(folder, [MR, CT_SMALL])
    cut = fresh_instance(CT_SMALL)
    data = _part10_bytes(cut)
    inside_uid = data.rindex(str(cut.SOPInstanceUID).encode()) + 6  # in the dataset, not the meta
    (folder / "DICOM/CUT").write_bytes(data[:inside_uid])
    garbage = bytes(128) + b"DICM" + os.urandom(3000)
    (folder / "DICOM/GARBAGE").write_bytes(garbage)
    no_uid = fresh_instance(MR)
    del no_uid.StudyInstanceUID
    write_instance(no_uid, folder / "DICOM/NOSTUDY")
    bad_uid = fresh_instance(MR, sop_uid="1.2.3.../../../etc/passwd")
    write_instance(bad_uid, folder / "DICOM/BADUID")
    return HostileCase("corrupt_headers", folder, refused={
        "DICOM/CUT": "truncated or corrupt header",
        "DICOM/GARBAGE": "",
        "DICOM/NOSTUDY": "missing required attribute(s): Study Instance UID",
        "DICOM/BADUID": "is not a valid UID",
    }, valid=set(good.values()), not_imported={str(cut.SOPInstanceUID), str(no_uid.SOPInstanceUID)})


def case_non_dicom_files(tmp: Path) -> HostileCase:
    folder = tmp / "viewer"
    written = write_disc(folder, [MR, JPEG_BASELINE])
    (folder / "AUTORUN.INF").write_text("[autorun]\r\nopen=VIEWER\\SETUP.EXE\r\nicon=VIEWER\\VIEWER.ICO\r\n")
    (folder / "VIEWER").mkdir()
    (folder / "VIEWER/SETUP.EXE").write_bytes(b"MZ\x90\x00" + os.urandom(4096))
    (folder / "INDEX.HTM").write_text("<html><body><a href='VIEWER/SETUP.EXE'>Run me</a></body></html>")
    (folder / "README.TXT").write_text("Images of patient DISCFLOW1\r\n")
    (folder / "EMPTY").write_bytes(b"")
    make_dicomdir(folder)
    return HostileCase("non_dicom_files", folder, valid=set(written.values()), warnings={
        "AUTORUN.INF": "skipped: not DICOM", "VIEWER/SETUP.EXE": "skipped: not DICOM",
        "INDEX.HTM": "skipped: not DICOM", "README.TXT": "skipped: not DICOM", "EMPTY": "skipped: not DICOM",
    }, used_dicomdir=True)


def case_truncated_pixel_data(tmp: Path) -> HostileCase:
    folder = tmp / "truncated_pixels"
    written = write_disc(folder, [MR, JPEG_LS])
    cut = fresh_instance(UNCOMPRESSED_CT)
    data = _part10_bytes(cut)
    (folder / "DICOM/CUTPIX").write_bytes(data[: len(data) - 200_000])  # length field says 524288
    liar = fresh_instance(MR)
    liar.Rows = 4096  # 4096 x 64 x 2 bytes claimed, 8192 held
    write_instance(liar, folder / "DICOM/LIAR")
    encapsulated = fresh_instance(JPEG_LS)
    data = _part10_bytes(encapsulated)
    (folder / "DICOM/CUTJLS").write_bytes(data[:-1000])
    return HostileCase("truncated_pixel_data", folder, refused={
        "DICOM/CUTPIX": "claims more pixel data than it holds",
        "DICOM/LIAR": "claims more pixel data than it holds",
        "DICOM/CUTJLS": "claims more pixel data than it holds",
    }, valid=set(written.values()), not_imported={str(cut.SOPInstanceUID), str(liar.SOPInstanceUID)})


def case_decompression_bomb(tmp: Path) -> HostileCase:
    folder = tmp / "bomb"
    written = write_disc(folder, [MR, CT_SMALL])
    bomb = fresh_instance(JPEG_LS)
    bomb.Rows = 65535
    bomb.Columns = 65535
    bomb.NumberOfFrames = 100000
    write_instance(bomb, folder / "DICOM/BOMB")
    return HostileCase("decompression_bomb", folder, refused={"DICOM/BOMB": "decompression bomb"},
                       valid=set(written.values()), not_imported={str(bomb.SOPInstanceUID)})


def case_deflate_bomb(tmp: Path) -> HostileCase:
    """A Deflated Explicit VR Little Endian file whose dataset inflates to more than 256 MiB."""
    folder = tmp / "deflate_bomb"
    written = write_disc(folder, [MR, DEFLATED])
    bomb = fresh_instance(MR)
    plain = _part10_bytes(bomb)
    meta_end = _meta_end(plain)
    body = plain[meta_end:]
    huge = struct.pack("<HH2s2xL", 0x0009, 0x1001, b"OB", 300 << 20)  # a 300 MiB private blob of zeros
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    # Elements are sorted by tag, so the private element goes before group 0x0010.
    split = _offset_of_group(body, 0x0010)
    deflated = compressor.compress(body[:split] + huge)
    zeros = bytes(4 << 20)
    for _ in range(75):
        deflated += compressor.compress(zeros)
    deflated += compressor.compress(body[split:]) + compressor.flush()
    meta = _with_transfer_syntax(plain[:meta_end], "1.2.840.10008.1.2.1.99")
    (folder / "DICOM/DFLBOMB").write_bytes(meta + deflated)
    return HostileCase("deflate_bomb", folder, refused={"DICOM/DFLBOMB": "deflate bomb"},
                       valid=set(written.values()), not_imported={str(bomb.SOPInstanceUID)})


def case_duplicate_same_content(tmp: Path) -> HostileCase:
    folder = tmp / "duplicate_same"
    written = write_disc(folder, [MR, CT_SMALL])
    first = next(iter(written))
    shutil.copyfile(folder / first, folder / "DICOM/ZZCOPY01")  # sorts after the original: the second seen
    return HostileCase("duplicate_same_content", folder, valid=set(written.values()),
                       warnings={"DICOM/ZZCOPY01": f"duplicate copy of {first}"})


def case_duplicate_different_content(tmp: Path) -> HostileCase:
    folder = tmp / "duplicate_different"
    written = write_disc(folder, [MR, CT_SMALL])
    first, uid = next(iter(written.items()))
    other = fresh_instance(CT_SMALL, sop_uid=uid)
    write_instance(other, folder / "DICOM/ZZOTHER1")  # sorts after DICOM/P...: the second one seen
    return HostileCase("duplicate_different_content", folder,
                       refused={"DICOM/ZZOTHER1": "different content with the same SOP Instance UID"},
                       valid=set(written.values()))


def case_garbage_dicomdir(tmp: Path) -> HostileCase:
    folder = tmp / "garbage_dicomdir"
    written = write_disc(folder, [MR, CT_SMALL, JPEG_EXTENDED])
    (folder / "DICOMDIR").write_bytes(os.urandom(20000))
    return HostileCase("garbage_dicomdir", folder, valid=set(written.values()),
                       warnings={"DICOMDIR": "DICOMDIR not used"},
                       dicomdir_problems=["walking the medium instead"], used_dicomdir=False)


def case_dicomdir_garbage_after_magic(tmp: Path) -> HostileCase:
    folder = tmp / "dicm_garbage_dicomdir"
    written = write_disc(folder, [MR, CT_SMALL])
    real = make_dicomdir(folder).read_bytes()
    real = bytearray(real)
    start = _meta_end(bytes(real))
    real[start + 40:] = os.urandom(len(real) - start - 40)
    (folder / "DICOMDIR").write_bytes(bytes(real))
    return HostileCase("dicomdir_garbage_after_magic", folder, valid=set(written.values()), used_dicomdir=False)


CASES = [
    case_zip_dotdot_entry, case_zip_absolute_entry, case_zip_windows_names, case_zip_bomb,
    case_folder_symlinks, case_iso_symlink,
    case_dicomdir_escaping_file_id, case_dicomdir_missing_file, case_dicomdir_wrong_sop_instance_uid,
    case_lowercase_slashes_versions,
    case_corrupt_headers, case_non_dicom_files, case_truncated_pixel_data,
    case_decompression_bomb, case_deflate_bomb,
    case_duplicate_same_content, case_duplicate_different_content,
    case_garbage_dicomdir, case_dicomdir_garbage_after_magic,
]


# --- byte helpers ----------------------------------------------------------------------------

def _part10_bytes(dataset: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _meta_end(data: bytes) -> int:
    position = 132
    while True:
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            return position
        vr = data[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            length = struct.unpack_from("<L", data, position + 8)[0]
            position += 12 + length
        else:
            length = struct.unpack_from("<H", data, position + 6)[0]
            position += 8 + length


def _offset_of_group(body: bytes, group_wanted: int) -> int:
    """Offset of the first top-level element of ``group_wanted`` or later (explicit VR LE)."""
    position = 0
    while position < len(body):
        group, element = struct.unpack_from("<HH", body, position)
        if group >= group_wanted:
            return position
        vr = body[position + 4:position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack_from("<L", body, position + 8)[0]
            if length == 0xFFFFFFFF:
                raise ValueError("undefined length before the wanted group")
            position += 12 + length
        else:
            length = struct.unpack_from("<H", body, position + 6)[0]
            position += 8 + length
    return position


def _with_transfer_syntax(meta: bytes, transfer_syntax: str) -> bytes:
    """Rewrite a Part 10 preamble + meta block with another Transfer Syntax UID."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_file_meta_info

    file_meta = FileMetaDataset(read_dataset(BytesIO(meta[132:]), False, True))
    file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    buffer.write(meta[:132])
    from pydicom.filebase import DicomFileLike

    write_file_meta_info(DicomFileLike(buffer), file_meta, enforce_standard=True)
    return buffer.getvalue()
