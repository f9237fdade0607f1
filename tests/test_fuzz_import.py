"""Fuzzing the import scan: mutated real media fed to the scan and to the import's extraction.

Seeds are real: instances from pydicom's test data (nine transfer syntaxes, and a bare
dataset without preamble or file meta), the real DICOMDIR of pydicom's ``dicomdirtests`` with
its 31 files, a file-set written by pydicom's own ``FileSet``, packed as a folder, a ZIP
(zipfile) and an ISO 9660 image (pycdlib, Rock Ridge + Joliet). Hypothesis mutates them,
structure-aware where it matters: byte flips, truncations, insertions and deletions anywhere;
length fields of data elements, items and fragments (found by walking the seed); header
values (Rows, Bits Allocated, Transfer Syntax UID ...); the compressed frames and their
codestream headers (JPEG/JPEG-LS SOF, JPEG 2000 SIZ, RLE segment table); Referenced File IDs,
record types and UIDs in DICOMDIR records; ZIP entry names with ``..``, absolute paths, drive
letters, symlink/device modes, flags and methods, and the ZIP's header fields; ISO volume
descriptors, directory records, names, SUSP/Rock Ridge entries and path tables; and on a
folder, files swapped for symlinks or FIFOs, removed or renamed.

For every mutated medium these must hold:

* ``open_medium`` either returns a medium or raises the documented ``MediaError``;
  ``scan_medium`` and ``prepare_import_instance`` (extract, rewrite, decode to Explicit VR
  Little Endian as ``--send uncompressed`` does) raise nothing;
* every file the medium lists is imported or named in a problem with a reason, and a file
  the mutation did not touch is still imported;
* nothing runs past a time limit (``EXAMPLE_SECONDS`` per medium, ``SIGALRM``; a
  ``faulthandler`` watchdog kills the run with tracebacks if C code never returns);
* nothing is opened outside the medium: an audit hook (``sys.addaudithook``, event ``open``,
  which sees every ``open``/``os.open``/``Path.open``, with ``os.open``'s ``dir_fd`` resolved
  through ``/proc/self/fd``) checks every path opened while the medium is scanned and its
  instances extracted lies under the medium root (folder), is the image file itself (ISO,
  ZIP), or lies in the job's spool. A valid DICOM file with a known SOP Instance UID sits
  next to the medium, and every escape route (symlinks, ``..``, absolute File IDs and entry
  names) points at it: its UID must never be imported. (A decode run in a forked child by
  tasks.decode_guard is not audited: the child opens only the file extracted to the spool.)
* a decoder that crashes, exhausts memory or hangs costs one refused instance, not the worker:
  the decode runs under tasks.decode_guard. Until prepare_import_instance does that itself,
  the fuzz runs the decode in a guarded child and ``test_zy_no_decoder_failure_reaches_the_worker``
  is an expected failure that lists what would have taken a worker down.

What the fuzz found is kept as plain regression tests at the end ("found while fuzzing").

Bounded for CI: ``derandomize=True`` (a fixed seed, the same inputs every run) and
``FUZZ_EXAMPLES`` (default 150) inputs per strategy; set ``DISCFLOW_FUZZ_EXAMPLES`` for a
longer run, and ``DISCFLOW_FUZZ_EXPLORE=1`` for random (not derandomized) inputs. The inputs
tried and the time taken are printed at the end.
"""
from __future__ import annotations

import faulthandler
import io
import os
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import tasks.transcode
from tasks import transfer_syntax
from tasks.decode_guard import DecodeGuardError, guarded
from tasks.manifest import Instance
from tasks.media_scan import MediaScan, scan_medium
from tasks.media_source import MediaError, Medium, open_medium
from tasks.spool import JobSpool
from tasks.transcode import Outcome, prepare_import_instance
from workers.settings import reload_settings

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns on every broken file

FUZZ_EXAMPLES = int(os.environ.get("DISCFLOW_FUZZ_EXAMPLES", "150"))
EXAMPLE_SECONDS = float(os.environ.get("DISCFLOW_FUZZ_EXAMPLE_SECONDS", "30"))
"""A medium (a handful of files, at most 33) whose scan and extraction take longer has hung (its
decodes are limited to DECODE_SECONDS each)."""
PREPARED_PER_MEDIUM = 3
"""Instances run through prepare_import_instance per medium, besides every mutated one."""
DECODE_HEADROOM = 2 << 30
"""Address space the extraction of one medium may add in this process (RLIMIT_AS, soft), so that
whatever asks for gigabytes fails here with a MemoryError, not by the OOM killer on a CI runner."""
DECODE_SECONDS, DECODE_MEMORY = 5, 512 << 20
"""The decode limits per instance while fuzzing (the seeds decode in milliseconds)."""
PRODUCT_GUARDS_DECODE = getattr(tasks.transcode, "guarded", None) is guarded
"""Whether prepare_import_instance runs its decode under tasks.decode_guard. Until it does, the
fuzz runs that decode in a guarded child itself (a decoder crash would take pytest down, as it
takes a worker down) and reports what would have crashed, exhausted or hung the worker."""

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, database=None, deadline=None, print_blob=True,
    derandomize=not os.environ.get("DISCFLOW_FUZZ_EXPLORE"),  # CI: the same inputs every run
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture],  # _clock times the whole test, not an example
)

SENTINEL_UID = generate_uid(entropy_srcs=["discflow", "fuzz", "outside the media root"])
EXAMPLES = {"part10": FUZZ_EXAMPLES, "dicomdir": FUZZ_EXAMPLES, "zip": FUZZ_EXAMPLES, "iso": FUZZ_EXAMPLES}
TOTALS: Counter = Counter()
SPENT: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in EXAMPLES}
CRASHES: list[tuple[str, str, str]] = []
"""(strategy, media path, what happened) for every decode that crashed, exhausted its memory or ran
out of time in the child the fuzz runs it in (only while the product does not guard it)."""
CONTAINED: Counter = Counter()
"""Decodes the product's own guard stopped (once wired), by kind."""
FINDINGS: Counter = Counter()
"""Instances prepare_import_instance refused with only an exception's type as the reason (its catch-all
branch): counted and printed, so that a decoder's unexpected failure mode shows up in the CI log."""
REFUSALS: Counter = Counter()
"""Why prepare_import_instance refused instances the scan had accepted (the start of the reason)."""

# --- seeds ----------------------------------------------------------------------------------

PART10_SOURCES = {
    "EVRLE": "MR_small.dcm", "CT": "CT_small.dcm", "IMPLICIT": "MR_small_implicit.dcm",
    "BIGEND": "MR_small_bigendian.dcm", "DEFLATED": "image_dfl.dcm", "JPEGLS": "MR_small_jpeg_ls_lossless.dcm",
    "RLE": "MR_small_RLE.dcm", "J2K": "MR_small_jp2klossless.dcm", "BASELINE": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEGLL_RGB": "SC_rgb_jpeg_gdcm.dcm", "JPEGLL": "JPEG-LL.dcm",
}
DISC_SOURCES = ["MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm"]
DICOMDIR_TESTS = Path(get_testdata_file("DICOMDIR")).parent
DICOMDIR_PATIENTS = ("77654033", "98892001", "98892003")
ZIP_ISO_LINK_TARGETS = ("/tmp/discflow-fuzz/outside/SECRET", "../outside/SECRET")
"""Symlink targets written into ZIP entries and Rock Ridge records: fixed, so that the image bytes
(and the offsets the mutations hit) are the same in every run. Nothing may follow them anyway."""


@dataclass(frozen=True)
class Field:
    """A length or count field in a seed: where, how wide, which byte order."""
    offset: int
    width: int
    big_endian: bool = False
    both_endian: bool = False
    """ISO 9660 both-byte-order field: the big-endian copy follows at offset + width."""


@dataclass(frozen=True)
class Value:
    """A data element value in a seed that a mutation may overwrite in place."""
    offset: int
    length: int
    vr: bytes
    tag: int


class Seed:
    """Bytes, and where in them the fields, short values and pixel payloads (native pixel data,
    compressed fragments) are."""

    def __init__(self, data: bytes, fields: list[Field] = (), values: list[Value] = (),
                 payloads: list[tuple[int, int]] = ()) -> None:
        self.data, self.fields, self.values, self.payloads = data, list(fields), list(values), list(payloads)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return (f"Seed({len(self.data)} bytes, {len(self.fields)} fields, {len(self.values)} values, "
                f"{len(self.payloads)} payloads)")


class Seeds:
    def __init__(self, root: Path, sentinel: Path, part10: dict[str, Seed], disc: dict[str, bytes],
                 dicomdirtests: Path, dicomdir: Seed, dicomdir_files: dict[str, str], zip_names: list[str],
                 iso: Seed) -> None:
        self.root = root
        self.sentinel = sentinel
        """A valid DICOM file outside every medium, which every escape route points at."""
        self.part10 = part10
        self.disc = disc
        """A small file-set written by pydicom's FileSet: media path -> bytes (DICOMDIR included)."""
        self.dicomdirtests = dicomdirtests
        self.dicomdir = dicomdir
        self.dicomdir_files = dicomdir_files
        """dicomdirtests: media path -> SOP Instance UID."""
        self.zip_names = zip_names
        self.iso = iso

    def __repr__(self) -> str:
        return f"Seeds({self.root})"


def _fresh(name: str) -> Dataset:
    dataset = pydicom.dcmread(get_testdata_file(name))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(dataset, keyword, generate_uid(entropy_srcs=["discflow", "fuzz", name, keyword]))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PatientID = dataset.get("PatientID") or "FUZZ1"
    return dataset


def _part10_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _bare_bytes(dataset: Dataset) -> bytes:
    dataset = dataset.copy()
    dataset.file_meta = FileMetaDataset()
    dataset.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    root = tmp_path_factory.mktemp("fuzz")
    outside = root / "outside"
    outside.mkdir()
    sentinel_dataset = _fresh("CT_small.dcm")
    sentinel_dataset.SOPInstanceUID = SENTINEL_UID
    sentinel_dataset.file_meta.MediaStorageSOPInstanceUID = SENTINEL_UID
    sentinel = outside / "SECRET"
    sentinel.write_bytes(_part10_bytes(sentinel_dataset))

    part10: dict[str, Seed] = {}
    for key, name in PART10_SOURCES.items():
        data = _part10_bytes(_fresh(name))
        part10[key] = Seed(data, *dicom_hot_spots(data))
    bare = _bare_bytes(_fresh("MR_small.dcm"))
    part10["BARE"] = Seed(bare, *dicom_hot_spots(bare, part10=False))

    fileset = FileSet()
    fileset.UID = generate_uid(entropy_srcs=["discflow", "fuzz", "file-set"])  # the same bytes every run
    for name in DISC_SOURCES:
        fileset.add(_fresh(name))
    fileset.write(root / "disc")
    disc = {path.relative_to(root / "disc").as_posix(): path.read_bytes()
            for path in sorted((root / "disc").rglob("*")) if path.is_file()}

    dicomdirtests = root / "dicomdirtests"
    for patient in DICOMDIR_PATIENTS:
        shutil.copytree(DICOMDIR_TESTS / patient, dicomdirtests / patient)
    shutil.copyfile(DICOMDIR_TESTS / "DICOMDIR", dicomdirtests / "DICOMDIR")
    dicomdir_bytes = (dicomdirtests / "DICOMDIR").read_bytes()
    dicomdir_files = {path.relative_to(dicomdirtests).as_posix():
                      str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                      for path in sorted(dicomdirtests.rglob("*")) if path.is_file() and path.name != "DICOMDIR"}

    zip_names = list(disc)
    iso = build_iso(disc)
    seeds = Seeds(root, sentinel, part10, disc, dicomdirtests, Seed(dicomdir_bytes, *dicom_hot_spots(dicomdir_bytes)),
                  dicomdir_files, zip_names, Seed(iso, *iso_hot_spots(iso)))
    _check_seeds(seeds)
    return seeds


def _check_seeds(seeds: Seeds) -> None:
    """The unmutated seeds are valid media: everything on them imports (else the fuzz proves little)."""
    folder = Path(tempfile.mkdtemp(dir=seeds.root))
    _write_tree(folder, seeds.disc)
    with open_medium(folder) as medium:
        result = scan_medium(medium)
    assert result.used_dicomdir and not result.problems and len(result.instances) == len(DISC_SOURCES)
    with open_medium(seeds.dicomdirtests) as medium:
        result = scan_medium(medium)
    assert result.used_dicomdir and not result.problems and len(result.instances) == 31
    iso = folder / "disc.iso"
    iso.write_bytes(seeds.iso.data)
    with open_medium(iso) as medium:
        result = scan_medium(medium)
    assert len(result.instances) == len(DISC_SOURCES)
    assert [problem.file for problem in result.errors] == ["LINK"]  # the Rock Ridge symlink to the sentinel
    for key, seed in seeds.part10.items():
        assert seed.fields, f"no length fields found in seed {key}"
        if key not in ("BIGEND", "DEFLATED"):  # walked as far as the file meta only
            assert seed.payloads, f"no pixel payload found in seed {key}"
    for key in ("JPEGLS", "J2K", "RLE", "BASELINE", "JPEGLL", "JPEGLL_RGB"):
        codestream = [spot for spot in seeds.part10[key].fields if spot.offset >= seeds.part10[key].payloads[0][0]]
        assert len(codestream) >= 6, f"no codestream header fields found in seed {key}"
    assert len(seeds.iso.fields) > 40 and len(seeds.iso.values) > 10 and len(seeds.dicomdir.fields) > 400
    shutil.rmtree(folder)


def _write_tree(folder: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# --- where the length fields are: DICOM ------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH",
              b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF


def dicom_hot_spots(data: bytes, *, part10: bool = True) -> tuple[list[Field], list[Value], list[tuple[int, int]]]:
    """Every length field (elements, items, fragments), every short value and the pixel payloads,
    walking the file as explicit VR little endian (file meta; and the dataset when it is so
    encoded) or implicit; plus the header fields of each compressed frame's codestream."""
    fields: list[Field] = []
    values: list[Value] = []
    payloads: list[tuple[int, int]] = []

    def dataset(position: int, end: int, explicit: bool, depth: int, meta_only: bool = False) -> int:
        while position + 8 <= end:
            group, element = struct.unpack_from("<HH", data, position)
            tag = (group << 16) | element
            if tag == _ITEM_END:
                fields.append(Field(position + 4, 4))
                return position + 8
            if meta_only and group != 0x0002:
                return position
            vr = data[position + 4:position + 6]
            if group == 0xFFFE or not explicit:
                length_at, width, header = position + 4, 4, 8
                vr = b"SQ" if (not explicit and struct.unpack_from("<L", data, length_at)[0] == _UNDEFINED
                               and tag != _PIXEL_DATA) else b""
            elif vr in _LONG_VRS:
                length_at, width, header = position + 8, 4, 12
            elif vr in _SHORT_VRS:
                length_at, width, header = position + 6, 2, 8
            else:
                return end
            if length_at + width > len(data):
                return end
            length = struct.unpack_from("<L" if width == 4 else "<H", data, length_at)[0]
            fields.append(Field(length_at, width))
            start = position + header
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    return fragments(start)
                if depth > 8:
                    return end
                position = sequence(start, None, explicit, depth + 1)
                continue
            if vr == b"SQ" and depth <= 8:
                sequence(start, start + length, explicit, depth + 1)
            elif length <= 64 and vr not in (b"SQ",):
                values.append(Value(start, length, vr, tag))
            elif tag == _PIXEL_DATA and depth == 0:
                payloads.append((start, min(length, len(data) - start)))
            position = start + length
        return position

    def sequence(position: int, end: int | None, explicit: bool, depth: int) -> int:
        limit = len(data) if end is None else min(end, len(data))
        while position + 8 <= limit:
            tag = struct.unpack_from("<L", data, position)[0]
            tag = ((tag & 0xFFFF) << 16) | (tag >> 16)
            length = struct.unpack_from("<L", data, position + 4)[0]
            fields.append(Field(position + 4, 4))
            if tag == _SEQUENCE_END:
                return position + 8
            if tag != _ITEM:
                return limit
            if length == _UNDEFINED:
                position = dataset(position + 8, limit, explicit, depth)
            else:
                dataset(position + 8, min(position + 8 + length, limit), explicit, depth)
                position += 8 + length
        return limit

    def fragments(position: int) -> int:
        first = True
        while position + 8 <= len(data):
            tag = struct.unpack_from("<L", data, position)[0]
            tag = ((tag & 0xFFFF) << 16) | (tag >> 16)
            length = struct.unpack_from("<L", data, position + 4)[0]
            fields.append(Field(position + 4, 4))
            if tag != _ITEM or length == _UNDEFINED:
                return len(data)
            if not first and length:  # the first item is the Basic Offset Table
                payloads.append((position + 8, min(length, len(data) - position - 8)))
                fields.extend(codestream_fields(data, position + 8, length))
            first = False
            position += 8 + length
        return len(data)

    if part10:
        meta_end = dataset(132, len(data), True, 0, meta_only=True)
        meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if syntax == "1.2.840.10008.1.2":
            dataset(meta_end, len(data), False, 0)
        elif syntax not in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):  # big endian, deflated: meta only
            dataset(meta_end, len(data), True, 0)
    else:
        dataset(0, len(data), False, 0)
    return fields, values, payloads


def codestream_fields(data: bytes, start: int, length: int) -> list[Field]:
    """Header fields of one compressed frame: JPEG / JPEG-LS segment lengths, precision, rows,
    columns, components and sampling factors; JPEG 2000 SIZ (image and tile size, components,
    depth) and tile-part lengths; the RLE header's segment count and offsets."""
    end = min(start + length, len(data))
    fields: list[Field] = []
    if data[start:start + 2] == b"\xff\xd8":
        position = start + 2
        while position + 4 <= end and data[position] == 0xFF:
            marker = data[position + 1]
            fields.append(Field(position + 2, 2, big_endian=True))
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7) and position + 10 <= end:
                fields.extend([Field(position + 4, 1), Field(position + 5, 2, big_endian=True),
                               Field(position + 7, 2, big_endian=True), Field(position + 9, 1)])
                components = min(data[position + 9], 4)
                fields.extend(Field(position + 11 + 3 * component, 1) for component in range(components))
            if marker == 0xDA:
                fields.append(Field(position + 4, 1))
                break
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    elif data[start:start + 2] == b"\xff\x4f":
        position = start + 2
        while position + 4 <= end and data[position] == 0xFF:
            marker = data[position + 1]
            fields.append(Field(position + 2, 2, big_endian=True))
            if marker == 0x51 and position + 43 <= end:
                fields.extend([Field(position + offset, width, big_endian=True) for offset, width in
                               ((6, 4), (10, 4), (14, 4), (22, 4), (26, 4), (38, 2))])
                fields.extend([Field(position + 40, 1), Field(position + 41, 1)])
            if marker == 0x90:
                fields.append(Field(position + 6, 4, big_endian=True))
                break
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    elif length >= 64 and 1 <= struct.unpack_from("<L", data, start)[0] <= 15:
        fields.extend(Field(start + 4 * number, 4) for number in range(16))
    return fields


# --- where the fields are: ISO 9660 ----------------------------------------------------------

def build_iso(disc: dict[str, bytes]) -> bytes:
    """The file-set as an ISO 9660 image with Rock Ridge and Joliet (pycdlib), plus a Rock Ridge
    symlink out of the medium."""
    import pycdlib

    with mock.patch("time.time", return_value=1_700_000_000.0):  # the same bytes every run
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, rock_ridge="1.09", joliet=3, vol_ident="FUZZ")
        made = set()
        for relative, data in disc.items():
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    iso.add_directory(f"/{directory}", rr_name=parts[depth - 1], joliet_path=f"/{directory}")
                    made.add(directory)
            iso.add_fp(io.BytesIO(data), len(data), f"/{relative};1", rr_name=parts[-1], joliet_path=f"/{relative}")
        iso.add_symlink(symlink_path="/LINK.;1", rr_symlink_name="LINK", rr_path=ZIP_ISO_LINK_TARGETS[0])
        out = io.BytesIO()
        iso.write_fp(out)
        iso.close()
    return out.getvalue()


def iso_hot_spots(data: bytes) -> tuple[list[Field], list[Value]]:
    """Volume descriptor fields, every directory record's extent/length/flags/name length, SUSP
    entry lengths and continuation areas, path table entries; and the names (file identifiers,
    Rock Ridge NM and SL contents) as values a mutation may overwrite."""
    block = 2048
    fields: list[Field] = []
    names: list[Value] = []
    seen: set[int] = set()

    def directory(extent: int, size: int, depth: int) -> None:
        if extent in seen or depth > 8 or extent * block >= len(data):
            return
        seen.add(extent)
        position, end = extent * block, min(extent * block + size, len(data))
        while position < end:
            record_length = data[position]
            if record_length == 0:
                position = (position // block + 1) * block
                continue
            fields.extend([Field(position, 1), Field(position + 2, 4, both_endian=True),
                           Field(position + 10, 4, both_endian=True), Field(position + 25, 1), Field(position + 32, 1)])
            name_length = data[position + 32]
            name = data[position + 33:position + 33 + name_length]
            if name not in (b"\x00", b"\x01"):
                names.append(Value(position + 33, name_length, b"FI", 0))
            susp = position + 33 + name_length + (0 if name_length % 2 else 1)
            while susp + 4 <= position + record_length:
                entry_length = data[susp + 2]
                if entry_length < 4:
                    break
                fields.append(Field(susp + 2, 1))
                if data[susp:susp + 2] == b"CE":
                    fields.extend([Field(susp + 4, 4, both_endian=True), Field(susp + 12, 4, both_endian=True),
                                   Field(susp + 20, 4, both_endian=True)])
                if data[susp:susp + 2] in (b"SL", b"NM", b"PX", b"TF"):
                    fields.append(Field(susp + 4, 1))
                if data[susp:susp + 2] in (b"NM", b"SL") and entry_length > 5:
                    names.append(Value(susp + 5, entry_length - 5, data[susp:susp + 2], 0))
                susp += entry_length
            flags = data[position + 25]
            if flags & 2 and name not in (b"\x00", b"\x01"):
                child_extent = struct.unpack_from("<L", data, position + 2)[0]
                child_size = struct.unpack_from("<L", data, position + 10)[0]
                directory(child_extent, child_size, depth + 1)
            position += record_length

    for sector in range(16, 32):
        offset = sector * block
        if data[offset + 1:offset + 6] != b"CD001" or data[offset] == 255:
            break
        if data[offset] in (1, 2):
            fields.extend([Field(offset + 80, 4, both_endian=True), Field(offset + 120, 2, both_endian=True),
                           Field(offset + 128, 2, both_endian=True), Field(offset + 132, 4, both_endian=True),
                           Field(offset + 140, 4), Field(offset + 148, 4, big_endian=True)])
            root = offset + 156
            fields.extend([Field(root + 2, 4, both_endian=True), Field(root + 10, 4, both_endian=True)])
            path_table, path_table_size = (struct.unpack_from("<L", data, offset + 140)[0],
                                           struct.unpack_from("<L", data, offset + 132)[0])
            position = path_table * block
            while position < min(path_table * block + path_table_size, len(data) - 8):
                fields.extend([Field(position, 1), Field(position + 2, 4), Field(position + 6, 2)])
                position += 8 + data[position] + data[position] % 2
            directory(struct.unpack_from("<L", data, root + 2)[0], struct.unpack_from("<L", data, root + 10)[0], 0)
    return fields, names


# --- where the fields are: ZIP ---------------------------------------------------------------

def zip_hot_spots(data: bytes) -> list[Field]:
    fields: list[Field] = []
    layouts = {
        b"PK\x03\x04": [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
        b"PK\x01\x02": [(8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (38, 4), (42, 4)],
        b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    }
    for signature, layout in layouts.items():
        position = data.find(signature)
        while position >= 0:
            fields.extend(Field(position + offset, width) for offset, width in layout)
            position = data.find(signature, position + 4)
    return fields


# --- mutations -------------------------------------------------------------------------------

POSITION = st.integers(min_value=0, max_value=(1 << 31) - 1)
LENGTH_CHOICES = ["zero", "one", "odd", "max16", "max32", "top_bit", "minus_one", "plus_one", "double",
                  "to_end", "past_end", "undefined", "random"]
MAGIC = [b"\xff\xff\xff\xff", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"DICM", b"\x00" * 8, b"..\\..\\",
         b"PK\x03\x04", b"CD001", b"\xff\xd8\xff\xc3", b"\xff\x4f\xff\x51", b"SQ\x00\x00\xff\xff\xff\xff",
         b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"]
US_CHOICES = [0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 32, 33, 64, 0x7FFF, 0x8000, 0xFFFF]
TEXT_CHOICES = [b"", b"0", b"-1", b"99999999", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.70",
                b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.5",
                b"1.2.840.10008.1.2", b"1.2.840.10008.1.3.10", b"YBR_FULL_422", b"PALETTE COLOR", b"RGB",
                b"MONOCHROME1", b"../../etc/passwd", b"..\\..\\SECRET", b"\x00\x00\x00\x00", b"\xff\xfe",
                b"1..2", b"A" * 64, b"..", b".", b"/", b"a/../..", b"\x00", b"../../../etc/passwd\x00"]

byte_op = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(1, 255)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("insert"), POSITION, st.one_of(st.binary(min_size=1, max_size=48), st.sampled_from(MAGIC))),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 600)),
    st.tuples(st.just("overwrite"), POSITION, st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(MAGIC))),
)
field_op = st.one_of(
    st.tuples(st.just("length"), POSITION, st.sampled_from(LENGTH_CHOICES), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("flip_field"), POSITION, st.integers(0, 3), st.integers(1, 255)),
)
value_op = st.tuples(st.just("value"), POSITION, st.one_of(st.sampled_from(US_CHOICES), st.sampled_from(TEXT_CHOICES)))


payload_op = st.one_of(
    st.tuples(st.just("payload_flip"), POSITION, POSITION, st.integers(1, 255)),
    st.tuples(st.just("payload_overwrite"), POSITION, POSITION,
              st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from(MAGIC))),
)
in_place_byte_op = st.one_of(  # for ISO images: nothing moves (an insertion would only hide the descriptors)
    st.tuples(st.just("flip"), POSITION, st.integers(1, 255)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("overwrite"), POSITION, st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from(MAGIC))),
)


def mutations(*, values: bool = True, max_size: int = 5, byte_ops=byte_op):
    """A list of operations: structural ones (length fields, values, pixel payloads) first, then
    byte-level ones anywhere."""
    structural = st.one_of(field_op, value_op, payload_op) if values else field_op
    return st.tuples(st.lists(structural, max_size=max_size), st.lists(byte_ops, max_size=3)).filter(
        lambda ops: ops[0] or ops[1])


def _length_value(choice: str, current: int, width: int, offset: int, size: int, random: int) -> int:
    top = (1 << (8 * width)) - 1
    value = {
        "zero": 0, "one": 1, "odd": current | 1, "max16": 0xFFFF, "max32": 0xFFFFFFFF, "top_bit": 1 << (8 * width - 1),
        "minus_one": current - 1, "plus_one": current + 1, "double": current * 2, "to_end": size - offset - width,
        "past_end": size - offset + 2, "undefined": 0xFFFFFFFF, "random": random,
    }[choice]
    return value & top


def mutate(seed: Seed, ops: tuple[list, list]) -> bytes:
    data = bytearray(seed.data)
    structural, byte_level = ops
    for op in structural:
        if op[0] in ("length", "flip_field") and seed.fields:
            spot = seed.fields[op[1] % len(seed.fields)]
            if spot.offset + spot.width > len(data):
                continue
            if op[0] == "flip_field":
                data[spot.offset + op[2] % spot.width] ^= op[3]
                continue
            order = ">" if spot.big_endian else "<"
            code = {1: "B", 2: "H", 4: "L"}[spot.width]
            current = struct.unpack_from(order + code, data, spot.offset)[0]
            value = _length_value(op[2], current, spot.width, spot.offset, len(data), op[3])
            struct.pack_into(order + code, data, spot.offset, value)
            if spot.both_endian and spot.offset + 2 * spot.width <= len(data) and op[3] % 3:
                struct.pack_into(">" + code, data, spot.offset + spot.width, value)  # sometimes left inconsistent
        elif op[0] == "value" and seed.values:
            spot = seed.values[op[1] % len(seed.values)]
            if spot.vr in (b"US", b"SS") and isinstance(op[2], int):
                new = struct.pack("<H", op[2])
            elif spot.vr in (b"UL", b"SL") and isinstance(op[2], int):
                new = struct.pack("<L", op[2])
            else:
                new = op[2] if isinstance(op[2], bytes) else str(op[2]).encode()
            new = new[:spot.length].ljust(spot.length, b"\x00" if spot.vr in (b"UI", b"OB") else b" ")
            data[spot.offset:spot.offset + spot.length] = new
        elif op[0].startswith("payload") and seed.payloads:
            start, length = seed.payloads[op[1] % len(seed.payloads)]
            if length <= 0:
                continue
            position = start + op[2] % length
            if op[0] == "payload_flip":
                data[position] ^= op[3]
            else:
                data[position:position + len(op[3])] = op[3]
    for op in byte_level:
        if not data:
            break
        position = op[1] % (len(data) + (1 if op[0] == "insert" else 0))
        if op[0] == "flip":
            data[position] ^= op[2]
        elif op[0] == "truncate":
            del data[position:]
        elif op[0] == "insert":
            data[position:position] = op[2]
        elif op[0] == "delete":
            del data[position:position + op[2]]
        elif op[0] == "overwrite":
            data[position:position + len(op[2])] = op[2]
    return bytes(data)


# --- the audit: nothing opened outside the medium ----------------------------------------------

class _Audit:
    def __init__(self) -> None:
        self.active = False
        self.allowed_files: set[str] = set()
        self.allowed_trees: list[str] = []
        self.violations: list[str] = []
        self.opened = 0
        self.pending = threading.local()

    def allows(self, path: str) -> bool:
        return path in self.allowed_files or any(path == tree or path.startswith(tree + os.sep)
                                                 for tree in self.allowed_trees)

    def check(self, resolved: str, how: str) -> None:
        self.opened += 1
        if not self.allows(resolved):
            self.violations.append(f"{how}: {resolved}")


AUDIT = _Audit()
_real_os_open = os.open
_IMPORT_FRAMES = ("<frozen importlib._bootstrap_external>", "<frozen importlib._bootstrap>")
_SOURCE_READERS = (os.sep + "linecache.py", os.sep + "tokenize.py")


def _reading_code(frame) -> bool:
    """Whether the open comes from the import system, or from linecache (a logged traceback)."""
    for _ in range(4):
        if frame is None:
            return False
        name = frame.f_code.co_filename
        if name in _IMPORT_FRAMES or name.endswith(_SOURCE_READERS):
            return True
        frame = frame.f_back
    return False


def _resolve(path: str, flags: int, dir_fd: int | None) -> str:
    if os.path.isabs(path):
        full = path
    elif dir_fd is not None:
        full = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    else:
        full = os.path.join(os.getcwd(), path)
    if flags & getattr(os, "O_NOFOLLOW", 0):  # a link as the last component is refused, not followed
        return os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
    return os.path.realpath(full)


def _audit_hook(event: str, args: tuple) -> None:
    if event != "open" or not AUDIT.active:
        return
    path, mode, flags = args
    if isinstance(path, int) or path is None:
        return  # an open file descriptor (fdopen): checked when it was opened
    path = os.fsdecode(path)
    if path.endswith((".py", ".pyc", ".so")) and _reading_code(sys._getframe(1)):
        return  # Python's own code: a decoder plugin imported lazily, a traceback being logged
    dir_fd = getattr(AUDIT.pending, "dir_fd", None) if mode is None else None
    try:
        resolved = _resolve(path, flags or 0, dir_fd)
    except OSError as exc:
        resolved = f"{path} (unresolvable: {exc})"
    AUDIT.check(resolved, f"open({path!r}{', dir_fd' if dir_fd is not None else ''})")


def _audited_os_open(path, flags, mode=0o777, *, dir_fd=None):
    AUDIT.pending.dir_fd = dir_fd
    try:
        descriptor = _real_os_open(path, flags, mode, dir_fd=dir_fd)
    finally:
        AUDIT.pending.dir_fd = None
    if AUDIT.active:  # what was really opened, whatever the path said
        AUDIT.check(os.readlink(f"/proc/self/fd/{descriptor}"), f"os.open({path!r}) -> fd")
    return descriptor


sys.addaudithook(_audit_hook)  # audit hooks cannot be removed; it does nothing unless AUDIT.active


@contextmanager
def audited(*, trees: list[Path], files: list[Path] = ()):
    AUDIT.allowed_trees = [os.path.realpath(tree) for tree in trees]
    AUDIT.allowed_files = {os.path.realpath(file) for file in files}
    AUDIT.violations = []
    os.open = _audited_os_open
    AUDIT.active = True
    try:
        yield AUDIT
    finally:
        AUDIT.active = False
        os.open = _real_os_open


# --- the time limit --------------------------------------------------------------------------

class _Hang(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the code swallows it."""


@contextmanager
def time_limit(seconds: float, what: str):
    """SIGALRM after ``seconds``; the caller's handler and timer (pytest-timeout) are restored."""
    def expired(number, frame):
        raise _Hang()

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expired)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 3, exit=True)  # C code that never returns
    try:
        yield
    except _Hang:
        raise AssertionError(f"{what}: still running after {seconds} s (a hang)") from None
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer[0] > 0:
            left = max(previous_timer[0] - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, previous_timer[1])


@contextmanager
def address_space_headroom(extra: int):
    """Lower this process's soft RLIMIT_AS to what it maps now plus ``extra``; restore it after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    auditing, AUDIT.active = AUDIT.active, False  # the test's own read, not the code under test
    try:
        with open("/proc/self/statm", "rb") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
    finally:
        AUDIT.active = auditing
    limit = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _DecodeInAChild:
    """Until prepare_import_instance guards its decode itself, swap transfer_syntax.convert_file for
    a guarded one while the fuzz prepares instances, and note each decode the guard had to stop."""

    def __init__(self) -> None:
        self.strategy = ""
        self.path = ""

    @contextmanager
    def __call__(self, strategy: str):
        if PRODUCT_GUARDS_DECODE:
            yield self
            return
        original = transfer_syntax.convert_file

        def convert_file(source, destination, target_syntax, **options):
            try:
                return guarded(original, source, destination, target_syntax, seconds=DECODE_SECONDS,
                               memory_bytes=DECODE_MEMORY, label=self.path, **options)
            except DecodeGuardError as error:
                CRASHES.append((strategy, self.path, str(error)))
                raise

        transfer_syntax.convert_file = convert_file
        try:
            yield self
        finally:
            transfer_syntax.convert_file = original


decode_in_a_child = _DecodeInAChild()


@pytest.fixture(scope="module", autouse=True)
def _decode_limits():
    """The product's guard (once wired) with the fuzz's limits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISCFLOW_DECODE_TIMEOUT_SECONDS", str(DECODE_SECONDS))
        patch.setenv("DISCFLOW_DECODE_MEMORY_BYTES", str(DECODE_MEMORY))
        reload_settings()
        yield
    reload_settings()


# --- running one medium ----------------------------------------------------------------------

@dataclass
class Run:
    listed: set[str]
    scan: MediaScan | None
    outcomes: dict[str, Outcome]


def run_import_scan(strategy: str, location: Path, work: Path, *, mutated: set[str] = frozenset()) -> Run:
    """open_medium + scan_medium + prepare_import_instance (uncompressed) under the audit and the
    time limit; check the properties that hold for every medium."""
    TOTALS[strategy] += 1
    spool = JobSpool(work / "spool", "fuzzjob")
    spool.create()
    container = [] if location.is_dir() else [location]
    trees = [location, spool.path] if location.is_dir() else [spool.path]
    outcomes: dict[str, Outcome] = {}
    with time_limit(EXAMPLE_SECONDS, f"{strategy} medium {location.name}"), \
            audited(trees=trees, files=container) as audit, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            medium: Medium = open_medium(location)
        except MediaError as refused:
            assert str(refused).startswith(str(location)), f"MediaError does not name the medium: {refused}"
            TOTALS[f"{strategy}: medium refused as a whole (MediaError)"] += 1
            run = Run(set(), None, outcomes)
        else:
            with medium:
                listed = {entry.path for entry in medium.files()}
                result = scan_medium(medium)
                chosen = [instance for instance in result.instances if instance.path in mutated]
                chosen += [instance for instance in result.instances if instance.path not in mutated][
                          :PREPARED_PER_MEDIUM]
                with address_space_headroom(DECODE_HEADROOM), decode_in_a_child(strategy) as child:
                    for index, found in enumerate(chosen):
                        child.path = found.path
                        instance = Instance(index=index, source=found.path, size=found.size,
                                            sop_class_uid=found.sop_class_uid,
                                            sop_instance_uid=found.sop_instance_uid,
                                            transfer_syntax=found.transfer_syntax, patient=0, study=0, series=0,
                                            action="copy" if found.has_preamble else "rewrite")
                        outcomes[found.path] = prepare_import_instance(medium, spool, instance, "uncompressed",
                                                                       "COERCE")
            run = Run(listed, result, outcomes)
    assert not audit.violations, f"opened outside the medium: {audit.violations}"
    if run.scan is not None:
        _check_scan(strategy, run)
    return run


def _check_scan(strategy: str, run: Run) -> None:
    result = run.scan
    TOTALS[f"{strategy}: instances found"] += len(result.instances)
    TOTALS[f"{strategy}: problems reported"] += len(result.problems)
    for problem in result.problems:
        assert isinstance(problem.file, str) and problem.file, f"a problem without a file name: {problem}"
        assert problem.reason.strip(), f"a problem without a reason: {problem}"
        assert problem.severity in ("error", "warning")
    found = {instance.path for instance in result.instances}
    assert found <= run.listed, f"instances not on the medium: {found - run.listed}"
    accounted = found | {problem.file for problem in result.problems}
    unaccounted = {path for path in run.listed - accounted if path.upper().rstrip(".;1") != "DICOMDIR"}
    assert not unaccounted, f"files neither imported nor reported: {unaccounted}"
    uids = [instance.sop_instance_uid for instance in result.instances]
    assert len(uids) == len(set(uids)), "a SOP Instance UID imported twice"
    assert SENTINEL_UID not in uids, "the file outside the medium root was imported"
    for path, outcome in run.outcomes.items():
        TOTALS[f"{strategy}: prepared {'ok' if outcome.ok else 'refused'}"] += 1
        if outcome.ok:
            assert outcome.transfer_syntax == ExplicitVRLittleEndian, (path, outcome)
            assert Path(outcome.path).is_file()
        else:
            assert outcome.reason.strip(), f"{path}: refused without a reason"
            REFUSALS[outcome.reason.replace(path, "FILE")[:70]] += 1
            kind = outcome.reason.split(":", 1)[0]
            if kind in ("DecodeCrashError", "DecodeLimitError"):
                continue  # the fuzz's own guard (product not wired yet): in CRASHES
            stopped = "decoding process" in outcome.reason or "decoding exceeded" in outcome.reason
            if PRODUCT_GUARDS_DECODE and stopped:
                CONTAINED["crashed" if "decoding process" in outcome.reason else "over a limit"] += 1
            elif kind.isidentifier() and kind[0].isupper() and kind.endswith(("Error", "Exception")):
                FINDINGS[kind] += 1  # an exception the code does not name: counted, reported at the end


def _fresh_dir(seeds: Seeds) -> Path:
    return Path(tempfile.mkdtemp(dir=seeds.root))


# --- 1. one DICOM file mutated, on a folder with an intact neighbour ---------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_part10_files(seeds, data):
    key = data.draw(st.sampled_from(sorted(seeds.part10)), label="seed")
    ops = data.draw(mutations(), label="mutations")
    strip_preamble = data.draw(st.booleans(), label="strip preamble and DICM") if key != "BARE" else False
    work = _fresh_dir(seeds)
    try:
        folder = work / "disc"
        mutated = mutate(seeds.part10[key], ops)
        if strip_preamble:  # file meta first, as some writers leave it (sniffed as a bare dataset)
            mutated = mutated[132:] if mutated[128:132] == b"DICM" else mutated
        neighbour = seeds.part10["CT" if key != "CT" else "EVRLE"].data
        _write_tree(folder, {"DICOM/I0000001": mutated, "DICOM/I0000002": neighbour})
        run = run_import_scan("part10", folder, work, mutated={"DICOM/I0000001"})
        neighbour_uid = str(pydicom.dcmread(io.BytesIO(neighbour), stop_before_pixels=True).SOPInstanceUID)
        imported = {instance.path: instance.sop_instance_uid for instance in run.scan.instances}
        if imported.get("DICOM/I0000002") != neighbour_uid:  # only a clash with the mutated file's UID excuses it
            problem = run.scan.problem_for("DICOM/I0000002")
            assert problem is not None and "same SOP Instance UID" in problem.reason, \
                f"the intact file was not imported: {problem}"
        else:
            assert run.outcomes["DICOM/I0000002"].ok, run.outcomes["DICOM/I0000002"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- 2. the real DICOMDIR of dicomdirtests, mutated, with its 31 files ---------------------------

def _hostile_file_ids(seeds: Seeds) -> list[list[str]]:
    return [
        ["..", "outside", "SECRET"], ["..\\outside\\SECRET"], [str(seeds.sentinel)],
        str(seeds.sentinel).strip("/").split("/"), ["77654033", "..", "..", "outside", "SECRET"],
        ["C:", "SECRET"], ["C:\\SECRET"], ["\\\\server", "share"], ["LINKDIR", "SECRET"], ["DICOMDIR"],
        ["77654033/CR1/6154"], ["77654033", "cr1", "6154;1"], ["77654033", "CR1", "6154."], ["77654033", "CR1"],
        [""], ["\x00"], ["A" * 300], ["77654033", "CR1", "6154\x00"], ["FIFO"],
    ]


dicomdir_record_op = st.tuples(
    st.integers(0, 1000),
    st.sampled_from(["file_id", "file_id", "drop_file_id", "sop_instance", "syntax", "sop_class", "type",
                     "duplicate", "delete"]),
    st.integers(0, 1000),
)
file_op = st.tuples(st.integers(0, 1000), st.sampled_from(["symlink_out", "symlink_relative", "fifo", "remove",
                                                           "lowercase", "directory_link", "second_dicomdir"]))


@FUZZ
@given(data=st.data())
def test_fuzz_dicomdir(seeds, data):
    record_ops = data.draw(st.lists(dicomdir_record_op, max_size=4), label="record edits")
    ops = data.draw(st.one_of(st.just(([], [])), mutations(max_size=4)), label="byte mutations")
    file_ops = data.draw(st.lists(file_op, max_size=2), label="file changes")
    work = _fresh_dir(seeds)
    try:
        folder = work / "disc"
        shutil.copytree(seeds.dicomdirtests, folder, copy_function=os.link)  # files are replaced, never edited
        dicomdir = seeds.dicomdir
        if record_ops:
            dicomdir = _edit_records(seeds, record_ops)
        (folder / "DICOMDIR").unlink()  # a hard link to the seed: replace it, never write through it
        (folder / "DICOMDIR").write_bytes(mutate(dicomdir, ops) if ops[0] or ops[1] else dicomdir.data)
        touched = _apply_file_ops(seeds, folder, file_ops)
        run = run_import_scan("dicomdir", folder, work, mutated=touched)
        imported = {instance.path for instance in run.scan.instances}
        untouched = set(seeds.dicomdir_files) - touched
        assert untouched <= imported, f"intact files not imported: {sorted(untouched - imported)[:5]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _edit_records(seeds: Seeds, record_ops: list) -> Seed:
    dataset = pydicom.dcmread(io.BytesIO(seeds.dicomdir.data))
    records = dataset.DirectoryRecordSequence
    hostile = _hostile_file_ids(seeds)
    syntaxes = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2", "", "1.2.3"]
    for index, action, choice in record_ops:
        if not len(records):
            break
        record = records[index % len(records)]
        if action == "file_id":
            record.ReferencedFileID = hostile[choice % len(hostile)]
        elif action == "drop_file_id" and "ReferencedFileID" in record:
            del record.ReferencedFileID
        elif action == "sop_instance":
            record.ReferencedSOPInstanceUIDInFile = [SENTINEL_UID, "1.2.3", "", "9" * 64][choice % 4]
        elif action == "syntax":
            record.ReferencedTransferSyntaxUIDInFile = syntaxes[choice % len(syntaxes)]
        elif action == "sop_class":
            record.ReferencedSOPClassUIDInFile = "1.2.840.10008.1.3.10"
        elif action == "type":
            record.DirectoryRecordType = ["HL7 STRUC DOC", "", "PATIENT", "IMAGE"][choice % 4]
        elif action == "duplicate":
            records.append(records[choice % len(records)])
        elif action == "delete":
            del records[index % len(records)]
    buffer = io.BytesIO()
    with pydicom.config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    return Seed(data, *dicom_hot_spots(data))


def _apply_file_ops(seeds: Seeds, folder: Path, file_ops: list) -> set[str]:
    """Swap files for links, FIFOs ...; returns the media paths no longer intact."""
    paths = sorted(seeds.dicomdir_files)
    touched: set[str] = set()
    for index, action in file_ops:
        relative = paths[index % len(paths)]
        path = folder / relative
        if action == "directory_link":
            if not (folder / "LINKDIR").exists():
                (folder / "LINKDIR").symlink_to(seeds.sentinel.parent)
            continue
        if action == "second_dicomdir":
            shutil.copyfile(DICOMDIR_TESTS / "DICOMDIR-reordered", folder / "dicomdir;1")
            continue
        if relative in touched or not path.exists():
            continue
        touched.add(relative)
        path.unlink()
        if action == "symlink_out":
            path.symlink_to(seeds.sentinel)
        elif action == "symlink_relative":
            path.symlink_to(os.path.relpath(seeds.sentinel, path.parent))
        elif action == "fifo":
            os.mkfifo(path)
        elif action == "lowercase":  # renamed as a Linux mount of a plain ISO 9660 disc shows it
            (path.parent / (path.name.lower() + ";1")).write_bytes((DICOMDIR_TESTS / relative).read_bytes())
    return touched


# --- 3. ZIP: hostile entry names and modes, damaged headers -------------------------------------

ESCAPING_NAMES = ["../SECRET", "../../outside/SECRET", "DICOM/../../SECRET", "..\\SECRET", "DICOM\\..\\..\\SECRET",
                  "C:/SECRET", "C:\\SECRET", "\\\\server\\share\\SECRET", "/SECRET", "..", "../"]
ODD_NAMES = ["./IM1", "DICOM//IM2", "DICOM/./IM3", "dicomdir;1", "DICOMDIR", "PT000000/ST000000/SE000000/IM000000",
             "pt000000/st000000/se000000/im000000;1", "DİCOM/ÄÖ", "A" * 250, " ", "", "IM4.", "DICOM/"]

zip_entry = st.fixed_dictionaries({
    "mode": st.sampled_from(["file", "file", "file", "symlink", "directory", "fifo", "device", "no_unix"]),
    "method": st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]),
    "encrypted": st.booleans(),
})
extra_entry = st.tuples(st.sampled_from(ESCAPING_NAMES + ODD_NAMES),
                        st.sampled_from(["file", "file", "symlink_out", "symlink_relative"]))


@FUZZ
@given(data=st.data())
def test_fuzz_zip(seeds, data):
    changed = data.draw(st.dictionaries(st.sampled_from(seeds.zip_names), zip_entry, max_size=2), label="entries")
    extras = data.draw(st.lists(extra_entry, max_size=3), label="extra entries")
    damage = data.draw(st.one_of(st.just(None), st.tuples(st.lists(field_op, max_size=4),
                                                          st.lists(byte_op, max_size=2))), label="damage")
    content_ops = data.draw(st.one_of(st.just(None), mutations(max_size=3)), label="content mutation")
    work = _fresh_dir(seeds)
    try:
        archive = work / "disc.zip"
        sentinel = seeds.sentinel.read_bytes()
        mutated_paths: set[str] = set()
        with zipfile.ZipFile(archive, "w") as out:
            for number, name in enumerate(seeds.zip_names):
                content = seeds.disc[name]
                treatment = changed.get(name)
                if content_ops is not None and number == 1:
                    content = mutate(Seed(content, *dicom_hot_spots(content)), content_ops)
                    mutated_paths.add(name)
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                if treatment:
                    mutated_paths.add(name)
                    info.compress_type = treatment["method"]
                    mode = {"file": stat.S_IFREG | 0o644, "symlink": stat.S_IFLNK | 0o777,
                            "directory": stat.S_IFDIR | 0o755, "fifo": stat.S_IFIFO | 0o644,
                            "device": stat.S_IFCHR | 0o600, "no_unix": 0}[treatment["mode"]]
                    info.external_attr = mode << 16
                    if treatment["mode"] == "no_unix":
                        info.create_system = 0
                    if treatment["mode"] == "symlink":
                        content = ZIP_ISO_LINK_TARGETS[0].encode()
                out.writestr(info, content)
            for number, (name, kind) in enumerate(extras):
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.create_system = 3
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                # Escaping names hold the sentinel; names that stay inside the root hold an instance
                # of their own (not a copy of a seed entry, which would shadow it as a duplicate).
                content = sentinel if name in ESCAPING_NAMES else seeds.part10["CT"].data
                if kind.startswith("symlink"):
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    content = ZIP_ISO_LINK_TARGETS[kind == "symlink_relative"].encode()
                out.writestr(info, content)
        encrypted = [name for name, treatment in changed.items() if treatment["encrypted"]]
        raw = bytearray(archive.read_bytes())
        for name in encrypted:  # zipfile clears flag bits when writing: set bit 0 by hand
            _set_encrypted(raw, name.encode())
        if damage is not None:
            raw = bytearray(mutate(Seed(bytes(raw), zip_hot_spots(bytes(raw))), damage))
        archive.write_bytes(bytes(raw))
        run = run_import_scan("zip", archive, work, mutated=mutated_paths)
        if damage is None and run.scan is not None:
            imported = {instance.path for instance in run.scan.instances}
            intact = {name for name in seeds.zip_names if name not in mutated_paths and name != "DICOMDIR"}
            assert intact <= imported, f"intact entries not imported: {intact - imported}"
        if damage is None:
            assert run.scan is not None, "an undamaged ZIP refused as a whole"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _set_encrypted(raw: bytearray, name: bytes) -> None:
    for signature, flag_at, name_length_at, name_at in ((b"PK\x03\x04", 6, 26, 30), (b"PK\x01\x02", 8, 28, 46)):
        position = raw.find(signature)
        while position >= 0:
            length = struct.unpack_from("<H", raw, position + name_length_at)[0]
            if bytes(raw[position + name_at:position + name_at + length]) == name:
                raw[position + flag_at] |= 0x1
            position = raw.find(signature, position + 4)


# --- 4. ISO 9660: descriptors, directory records, Rock Ridge -----------------------------------

@FUZZ
@given(ops=mutations(max_size=3, byte_ops=in_place_byte_op))
def test_fuzz_iso(seeds, ops):
    work = _fresh_dir(seeds)
    try:
        image = work / "disc.iso"
        image.write_bytes(mutate(seeds.iso, ops))
        run_import_scan("iso", image, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- found while fuzzing ---------------------------------------------------------------------

def test_zip_central_directory_bomb_is_refused_before_zipfile_parses_it(tmp_path):
    """600 000 empty entries in a 28 MB central directory (no data at all): zipfile builds every
    ZipInfo before Medium can count them (10 s, 260 MB here; a DVD-sized one would sink the
    worker). media_source counts the central directory first and refuses it."""
    entries = 600_000
    local = b"PK\x03\x04" + struct.pack("<HHHHHLLLHH", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    record = b"PK\x01\x02" + struct.pack("<HHHHHHLLLHHHHHLL", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = record * entries
    end64 = b"PK\x06\x06" + struct.pack("<QHHLLQQQQ", 44, 45, 45, 0, 0, entries, entries, len(directory), len(local))
    locator = b"PK\x06\x07" + struct.pack("<LQL", 0, len(local) + len(directory), 1)
    end = b"PK\x05\x06" + struct.pack("<HHHHLLH", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(local + directory + end64 + locator + end)

    # In a child limited to 3 s and 64 MB more address space (tasks.decode_guard): parsing it
    # all would break both limits; counting first answers in well under a second.
    with pytest.raises(MediaError, match="more than 500000 entries"):
        guarded(open_medium, archive, seconds=3, memory_bytes=64 << 20, label=archive.name)


def test_a_zip_entry_with_an_empty_name_is_reported_under_a_name(tmp_path):
    archive = tmp_path / "empty_name.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr(zipfile.ZipInfo(""), _part10_bytes(_fresh("MR_small.dcm")))
    with open_medium(archive) as medium:
        (problem,) = scan_medium(medium).problems
    assert (problem.file, problem.reason) == ("(empty name)", "refused: empty file name")


def _with_codestream_field(name: str, marker: bytes, offset: int, value: bytes) -> bytes:
    """A real instance with ``value`` written ``offset`` bytes after ``marker`` in its first frame."""
    data = bytearray(_part10_bytes(_fresh(name)))
    _, _, payloads = dicom_hot_spots(bytes(data))
    start = data.index(marker, payloads[0][0])
    data[start + offset:start + offset + len(value)] = value
    return bytes(data)


def _prepare_in_a_child(tmp_path: Path, data: bytes) -> Outcome:
    """scan + prepare_import_instance of one file, as a worker would, in a guarded child (1 GB,
    60 s): if the product lets its decoder crash the process or eat its memory, only this probe
    suffers, and the test is marked as an expected failure until the product guards the decode."""
    folder = tmp_path / "disc"
    folder.mkdir()
    (folder / "I0000001").write_bytes(data)

    def prepare() -> tuple[Outcome, int]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        spool = JobSpool(tmp_path / "spool", "job").create()
        with open_medium(folder) as medium:
            (found,) = scan_medium(medium).instances
            instance = Instance(index=0, source=found.path, size=found.size, sop_class_uid=found.sop_class_uid,
                                sop_instance_uid=found.sop_instance_uid, transfer_syntax=found.transfer_syntax,
                                patient=0, study=0, series=0)
            outcome = prepare_import_instance(medium, spool, instance, "uncompressed", "COERCE")
        return outcome, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) << 10

    try:
        outcome, grown = guarded(prepare, seconds=60, memory_bytes=1 << 30, label="the worker")
    except DecodeGuardError as error:
        if PRODUCT_GUARDS_DECODE:
            raise
        pytest.xfail(f"{error}: prepare_import_instance does not run the decode under tasks.decode_guard yet")
    if grown > 256 << 20:  # the decode ran in the worker's process and ate its memory
        if PRODUCT_GUARDS_DECODE:
            raise AssertionError(f"the worker's own memory grew by {grown >> 20} MB")
        pytest.xfail(f"the decode grew the worker by {grown >> 20} MB before failing ({outcome.reason}): "
                     f"prepare_import_instance does not run the decode under tasks.decode_guard yet")
    return outcome


@pytest.mark.parametrize("name, marker, offset, value", [
    ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 7, b"\x00\x00"),  # width 0: SIGSEGV in GDCM
    ("MR_small_jpeg_ls_lossless.dcm", b"\xff\xf7", 4, b"\xfd"),  # precision 253: SIGABRT in GDCM
    ("JPEG-LL.dcm", b"\xff\xc3", 5, b"\x00\x00"),  # height 0: pylibjpeg-libjpeg takes all memory
], ids=["jpeg-ls-width-0", "jpeg-ls-precision-253", "jpeg-lossless-height-0"])
def test_a_decoder_that_dies_costs_one_instance_not_the_worker(tmp_path, name, marker, offset, value):
    """Codestream header fields the fuzz found (one or two bytes of a real file changed): the
    decode crashes, or eats every byte of memory (23 GB on the 24 GB machine, then OOM-killed)."""
    outcome = _prepare_in_a_child(tmp_path, _with_codestream_field(name, marker, offset, value))
    assert not outcome.ok
    if PRODUCT_GUARDS_DECODE:
        assert outcome.reason.startswith("I0000001: ") and "decoding" in outcome.reason, outcome.reason


def test_a_panicking_rle_decoder_costs_one_instance_not_the_batch(tmp_path):
    """One byte of MR_small_RLE's RLE segment changed: pylibjpeg-rle (Rust) panics, and pyo3's
    PanicException is a BaseException, which ``except Exception`` does not stop."""
    data = bytearray(_part10_bytes(_fresh("MR_small_RLE.dcm")))
    _, _, payloads = dicom_hot_spots(bytes(data))
    data[payloads[0][0] + 3573] = 247
    folder = tmp_path / "disc"
    folder.mkdir()
    (folder / "I0000001").write_bytes(data)
    spool = JobSpool(tmp_path / "spool", "job").create()
    with open_medium(folder) as medium, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (found,) = scan_medium(medium).instances
        instance = Instance(index=0, source=found.path, size=found.size, sop_class_uid=found.sop_class_uid,
                            sop_instance_uid=found.sop_instance_uid, transfer_syntax=found.transfer_syntax,
                            patient=0, study=0, series=0)
        try:
            outcome = prepare_import_instance(medium, spool, instance, "uncompressed", "COERCE")
        except BaseException as escaped:  # noqa: BLE001
            if type(escaped).__name__ != "PanicException":
                raise
            pytest.xfail(f"{type(escaped).__name__} ({escaped}) escapes prepare_import_instance: neither "
                         f"transfer_syntax._decode nor a guarded decode stops it yet")
    assert not outcome.ok and "index out of bounds" in outcome.reason, outcome


# --- the audit itself must be able to fail ------------------------------------------------------

def test_the_audit_sees_a_read_outside_the_medium(seeds, tmp_path):
    """The properties above are only as good as the audit: an open of the sentinel, by path, by
    os.open with dir_fd, or through a symlink inside the medium, is caught."""
    folder = tmp_path / "disc"
    folder.mkdir()
    (folder / "LINK").symlink_to(seeds.sentinel)
    for reader in (lambda: open(seeds.sentinel, "rb").close(),
                   lambda: seeds.sentinel.read_bytes(),
                   lambda: os.close(os.open(seeds.sentinel.name, os.O_RDONLY, dir_fd=os.open(
                       seeds.sentinel.parent, os.O_RDONLY | os.O_DIRECTORY))),
                   lambda: (folder / "LINK").read_bytes()):
        with audited(trees=[folder]) as audit:
            reader()
        assert any(str(seeds.sentinel) in violation for violation in audit.violations), audit.violations
    with audited(trees=[folder]) as audit:
        (folder / "INSIDE").write_bytes(b"x")
        (folder / "INSIDE").read_bytes()
    assert not audit.violations


def test_the_time_limit_stops_a_hang():
    started = time.monotonic()
    with pytest.raises(AssertionError, match="a hang"):
        with time_limit(0.5, "sleeper"):
            try:
                time.sleep(30)
            except Exception:  # the code under test swallowing errors does not swallow the limit
                pass
    assert time.monotonic() - started < 5


def test_zy_no_decoder_failure_reaches_the_worker():
    """A decoder that crashes (SIGSEGV/SIGABRT in GDCM), exhausts memory (pylibjpeg-libjpeg on a
    JPEG with height 0) or never returns must cost one refused instance, not the worker: the
    decode must run under tasks.decode_guard. Expected to fail until prepare_import_instance
    does so (the fuzz then contains those decodes itself and lists them here)."""
    if PRODUCT_GUARDS_DECODE:
        assert not CRASHES
        return
    if CRASHES:
        kinds = Counter(message.split(": ", 1)[1].split(" (")[0] for _, _, message in CRASHES)
        pytest.xfail(f"{len(CRASHES)} mutated instances would crash, exhaust or hang a worker whose decode is not "
                     f"guarded ({dict(kinds)}); first: {CRASHES[0][0]} {CRASHES[0][2]}. "
                     f"prepare_import_instance does not use tasks.decode_guard yet.")


def test_zz_fuzz_totals(capsys):
    """How many inputs were tried, and in how long (quoted in the README); fails if the fuzz did not run."""
    strategies = ("part10", "dicomdir", "zip", "iso")
    tried = {name: TOTALS[name] for name in strategies}
    wall = sum(SPENT[name][0] for name in strategies)
    cpu = sum(SPENT[name][1] for name in strategies)
    lines = [f"fuzz_import: {sum(tried.values())} mutated media tried in {wall:.1f} s "
             f"({cpu:.1f} s CPU): " + ", ".join(f"{name} {tried[name]} in {SPENT[name][0]:.1f} s"
                                                 for name in strategies)]
    lines += [f"  {key}: {count}" for key, count in sorted(TOTALS.items()) if key not in strategies]
    lines += [f"  prepare refused {count}x: {reason}" for reason, count in REFUSALS.most_common(8)]
    if CRASHES:
        lines.append(f"  decodes that crashed/exhausted/hung (contained by the fuzz, the product does not guard "
                     f"them yet): {len(CRASHES)}")
    if CONTAINED:
        lines.append(f"  decodes stopped by the product's guard: {dict(CONTAINED)}")
    if FINDINGS:
        lines.append(f"  prepare_import_instance refused with an exception type the code does not name: "
                     f"{dict(FINDINGS)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    ran = [name for name in strategies if tried[name]]
    if len(ran) < len(strategies):
        pytest.skip(f"only {ran} ran (a -k selection?)")
    assert all(tried[name] >= EXAMPLES[name] * 0.9 for name in strategies), tried


@pytest.fixture(autouse=True)
def _clock(request):
    """Wall-clock and CPU time per fuzz strategy (the seeds, built once, are not counted)."""
    name = request.node.name.removeprefix("test_fuzz_")
    strategy = {"part10_files": "part10"}.get(name, name)
    if strategy not in EXAMPLES:
        yield
        return
    started, cpu = time.monotonic(), time.process_time()
    yield
    SPENT[strategy] = (time.monotonic() - started, time.process_time() - cpu)
