"""tasks.raw_header gives pydicom's own header, or None so that pydicom reads the file."""
from __future__ import annotations

import copy
import io
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.dicom_header import read_header
from tasks.raw_header import FIRST_READ, read_raw_header


def _sample_files() -> list[Path]:
    local = Path(pydicom.data.__file__).parent  # local files only (get_testdata_files downloads)
    external = Path(pydicom.__file__).parents[1] / "data_store" / "data"  # pydicom-data's real images
    return sorted(path for root in (local, external) for path in root.rglob("*") if path.is_file())


def _raw(path: Path):
    with path.open("rb") as handle:
        return read_raw_header(handle, path.stat().st_size)


def _as_json(dataset: Dataset) -> dict:
    return dataset.to_json_dict(1 << 30)


def _pydicom_header(path: Path) -> Dataset | None:
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        _as_json(dataset)
        return dataset
    except Exception:  # noqa: BLE001 - a file pydicom cannot read is no reference
        return None


def test_same_data_set_as_pydicom_on_every_sample_file() -> None:
    compared = fell_back = 0
    for path in _sample_files():
        expected = _pydicom_header(path)
        if expected is None:
            continue
        got = _raw(path)
        if got is None:
            fell_back += 1
            continue
        compared += 1
        assert _as_json(got.dataset) == _as_json(expected), path
        assert _as_json(got.dataset.file_meta) == _as_json(expected.file_meta), path
        assert got.dataset.original_encoding == expected.original_encoding, path
        assert got.dataset.original_character_set == expected.original_character_set, path
        assert got.transfer_syntax == expected.file_meta.TransferSyntaxUID, path
    assert compared >= 200, "the sample files should mostly take the fast path"
    assert fell_back <= 40


def test_pixel_offset_is_where_pixel_data_starts() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    got = _raw(path)
    data = path.read_bytes()
    assert got is not None and got.pixel_offset is not None
    assert data[got.pixel_offset:got.pixel_offset + 4] == b"\xe0\x7f\x10\x00"
    assert "PixelData" not in got.dataset


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "image_dfl.dcm"])
def test_big_endian_and_deflate_are_left_to_pydicom(name: str) -> None:
    assert _raw(Path(get_testdata_file(name))) is None


def test_truncated_and_non_dicom_are_left_to_pydicom(tmp_path: Path) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    got = _raw(Path(get_testdata_file("CT_small.dcm")))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:got.pixel_offset - 3])  # in the middle of the last element before the pixels
    assert _raw(cut) is None
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not DICOM at all" * 20)
    assert _raw(text) is None


def _long_header_file(folder: Path, syntax: str) -> Path:
    """A file whose header is several times FIRST_READ, with nested undefined-length sequences."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "113691", "DCM", "IHE PDI"
    item = Dataset()
    item.ConceptNameCodeSequence = Sequence([inner])
    item.TextValue = "x" * (FIRST_READ // 2)
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.ContentSequence = Sequence([item, item])
    dataset.ImageComments = "y" * (FIRST_READ * 3)
    dataset.file_meta.TransferSyntaxUID = syntax
    for element, items in ((dataset["ContentSequence"], [item]), (item["ConceptNameCodeSequence"], [inner])):
        element.is_undefined_length = True
        for each in items:
            each.is_undefined_length_sequence_item = True
    path = folder / f"long-{syntax}.dcm"
    dataset.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_long_header_with_undefined_length_sequences(tmp_path: Path, syntax: str) -> None:
    path = _long_header_file(tmp_path, syntax)
    assert path.read_bytes().count(b"\xfe\xff\xdd\xe0") >= 3  # written with undefined lengths
    got = _raw(path)
    assert got is not None
    expected = pydicom.dcmread(path, stop_before_pixels=True)
    assert _as_json(got.dataset) == _as_json(expected)
    assert got.dataset.ContentSequence[1].ConceptNameCodeSequence[0].CodeMeaning == "IHE PDI"
    assert got.dataset["ContentSequence"].is_undefined_length


def test_read_header_takes_the_fast_path_and_checks_uids(tmp_path: Path) -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    header = read_header(path)
    assert header.part10 and header.transfer_syntax == ExplicitVRLittleEndian
    dataset = pydicom.dcmread(path)
    del dataset.SeriesInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    missing = tmp_path / "no-series.dcm"
    missing.write_bytes(buffer.getvalue())
    assert _raw(missing) is not None
    with pytest.raises(Exception, match="missing SeriesInstanceUID"):
        read_header(missing)


def _deeply_nested_file(folder: Path, depth: int = 5000) -> Path:
    """A Part 10 file whose header nests ``depth`` undefined-length sequences (a hostile header)."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    start = data.index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID: the nesting goes before it
    opening = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff") * depth
    closing = (b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") * depth
    path = folder / "deep.dcm"
    path.write_bytes(data[:start] + opening + closing + data[start:])
    return path


def test_a_hostile_nesting_depth_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    from tasks.dicom_header import NotDicomError

    path = _deeply_nested_file(tmp_path)
    assert _raw(path) is None  # too deep for this parser: left to pydicom
    with pytest.raises(NotDicomError, match="unreadable DICOM header"):
        read_header(path)


def _part10_bytes(dataset: Dataset, implicit: bool = False) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def test_a_file_shorter_than_its_stated_size_ends_the_read() -> None:
    """A medium's directory may claim more bytes than the file gives: no endless read loop."""
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    cut = data[:FIRST_READ + 100]  # the header goes on past what the stream will give
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.ImageComments = "z" * (2 * FIRST_READ)
    long = _part10_bytes(dataset)[:FIRST_READ + 100]
    for short in (cut[:300], long):
        assert read_raw_header(io.BytesIO(short), len(short) + 10_000) is None


def test_odd_headers_are_left_to_pydicom_and_read_as_pydicom_reads_them(tmp_path: Path) -> None:
    """A data set said to be implicit but written explicit; an implicit private element of
    undefined length; a character set that is not text: pydicom's reading, or its error."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    explicit = bytearray(_part10_bytes(dataset))
    syntax = explicit.index(b"1.2.840.10008.1.2.1")
    explicit[syntax:syntax + 20] = b"1.2.840.10008.1.2\0\0\0"  # the meta says implicit; same length
    private = copy.deepcopy(dataset)
    private.add_new(0x00091001, "SQ", Sequence([Dataset()]))
    private[0x00091001].is_undefined_length = True
    private.add_new(0x00090010, "LO", "ACME")
    private.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    cases = {"mislabelled.dcm": bytes(explicit), "private.dcm": _part10_bytes(private, implicit=True)}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert _raw(path) is None, name
        assert _as_json(read_header(path).dataset) == _as_json(pydicom.dcmread(path, stop_before_pixels=True)), name
    hostile = _part10_bytes(dataset).replace(b"\x08\x00\x05\x00CS", b"\x08\x00\x05\x00US", 1)
    path = tmp_path / "charset.dcm"  # Specific Character Set as numbers
    path.write_bytes(hostile)
    assert _raw(path) is None
    from tasks.dicom_header import NotDicomError
    with pytest.raises(NotDicomError):
        read_header(path)
