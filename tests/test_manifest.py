"""Manifest JSON: subset_json and Manifest.to_json give what the Dataset and asdict forms gave."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import keyword_for_tag

from tasks.manifest import (INSTANCE_KEYWORDS, PATIENT_KEYWORDS, SERIES_KEYWORDS, STUDY_KEYWORDS, Manifest,
                            ManifestBuilder, as_json, subset_json)

# CT, MR, RT plan/structures/dose, SR (also with empty IS/DS), palette and RGB colour, multi-frame,
# big endian, deflated, no file meta, waveform, nested private sequences, an AT inside a sequence,
# and character sets with ideographic and phonetic person names.
TEST_FILES = (
    "CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm", "rtdose.dcm", "reportsi.dcm",
    "reportsi_with_empty_number_tags.dcm", "examples_palette.dcm", "SC_rgb.dcm", "emri_small.dcm",
    "ExplVR_BigEnd.dcm", "image_dfl.dcm", "no_meta.dcm", "waveform_ecg.dcm", "nested_priv_SQ.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
)
CHARSET_FILES = ("chrH31.dcm", "chrX1.dcm", "chrSQEncoding.dcm", "chrJapMulti.dcm", "chrKoreanMulti.dcm")
LEVEL_KEYWORDS = (PATIENT_KEYWORDS, STUDY_KEYWORDS, SERIES_KEYWORDS, INSTANCE_KEYWORDS)


def _path(name: str) -> str:
    if name.startswith("chr"):
        return get_charset_files(name)[0]
    return get_testdata_file(name)


def _read(name: str) -> Dataset:
    # Pixel data included, so binary (OB/OW) values are compared too.
    return pydicom.dcmread(_path(name), force=True)


def _dataset_subset_json(dataset: Dataset, keywords: tuple[str, ...]) -> dict[str, Any]:
    """The conversion subset_json replaced: a Dataset of just these elements, then to_json_dict."""
    part = Dataset()
    for keyword in keywords:
        if keyword in dataset:
            part[keyword] = dataset[keyword]
    return part.to_json_dict(bulk_data_threshold=1 << 20, bulk_data_element_handler=None)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # as the spool writes it; key order counts


@pytest.mark.parametrize("name", TEST_FILES + CHARSET_FILES)
def test_subset_json_equals_the_dataset_conversion(name: str) -> None:
    every = tuple(keyword for keyword in map(keyword_for_tag, _read(name).keys()) if keyword)
    for keywords in (*LEVEL_KEYWORDS, every, every[::-1]):
        # A fresh read each: converting an element changes the dataset it came from.
        assert _dumps(subset_json(_read(name), keywords)) == _dumps(_dataset_subset_json(_read(name), keywords))


def test_subset_json_leaves_out_keywords_without_a_tag() -> None:
    dataset = _read("CT_small.dcm")
    assert subset_json(dataset, ("OverlayRows", "Modality")) == {"00080060": {"vr": "CS", "Value": ["CT"]}}


def _manifest() -> Manifest:
    builder = ManifestBuilder("unit", "import", {"batch_size": 2, "nested": [{"a": None}]})
    for name in TEST_FILES + CHARSET_FILES:
        dataset = _read(name)
        if all(dataset.get(keyword) for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                     "SeriesInstanceUID")):
            builder.add(_path(name), 1, dataset, "1.2.840.10008.1.2.1")
        else:
            builder.skip(_path(name), "missing UIDs")
    builder.manifest.notes.append({"file": "x", "reason": "duplicate"})
    builder.manifest.instances[0].edits = {"PatientID": "LOCAL-1"}
    builder.manifest.instances[1].target_syntax = "1.2.840.10008.1.2.4.70"
    return builder.manifest


def test_manifest_json_equals_asdict() -> None:
    manifest = _manifest()
    assert len(manifest.instances) > 10 and manifest.skipped
    assert _dumps(manifest.to_json()) == _dumps(asdict(manifest))
    for instance in manifest.instances:
        assert _dumps(as_json(instance)) == _dumps(asdict(instance))
    again = Manifest.from_json(json.loads(_dumps(manifest.to_json())))
    assert _dumps(again.to_json()) == _dumps(manifest.to_json())


def test_chunks_merged_give_the_manifest_of_one_pass(tmp_path) -> None:
    """The export scan's chunk tasks each build a partial manifest and the merge joins them: the
    result must be the manifest one pass over the same files builds (levels shared across chunks
    keep the first file's attributes, indices follow file order, skipped files stay in order)."""
    from tasks.scan import scan_files

    names = [*TEST_FILES, *CHARSET_FILES, "CT_small.dcm", "MR_small.dcm"]  # the last two repeat levels
    (tmp_path / "notes.txt").write_text("not DICOM")
    paths = [_path(name) for name in names]
    paths.insert(5, str(tmp_path / "notes.txt"))
    whole = ManifestBuilder("unit", "export", {})
    scan_files(paths, whole)
    merged = ManifestBuilder("unit", "export", {})
    for chunk in (paths[:3], paths[3:11], paths[11:12], paths[12:]):
        part = ManifestBuilder("unit", "export", {})
        scan_files(chunk, part)
        merged.merge(Manifest.from_json(json.loads(_dumps(part.manifest.to_json()))))  # as the spool holds it
    assert len(whole.manifest.patients) > 3 and len(whole.manifest.instances) > len(whole.manifest.series)
    assert whole.manifest.skipped and _dumps(merged.manifest.to_json()) == _dumps(whole.manifest.to_json())


def test_raw_json_converts_plain_elements_from_their_bytes() -> None:
    """The fast path must be taken (else the comparisons above prove nothing about it) and agree
    with pydicom on every plain element of every pydicom test file it takes."""
    from pathlib import Path

    from pydicom.dataelem import RawDataElement

    from pydicom.multival import MultiValue

    from tasks.raw_json import plain_get, raw_json

    def raw(vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(0x00280030, vr, len(value), value, 0, False, True)

    assert raw_json(raw("US", b"\x00\x02")) == {"vr": "US", "Value": [512]}
    assert raw_json(raw("DS", b"0.5\\-2e3 ")) == {"vr": "DS", "Value": [0.5, -2000.0]}
    assert raw_json(raw("CS", b"ORIGINAL\\PRIMARY\\AXIAL ")) == {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert raw_json(raw("UI", b"  \x00")) == {"vr": "UI"}
    assert raw_json(raw("IS", b"1.5")) is None and raw_json(raw("LO", b"ABC")) is None  # left to pydicom
    assert raw_json(raw("CS", "É".encode("latin-1"))) is None
    taken = 0
    local = Path(pydicom.data.__file__).parent  # local files only (get_testdata_files downloads)
    external = Path(pydicom.__file__).parents[1] / "data_store" / "data"  # pydicom-data's real images
    for path in [*sorted(local.rglob("*.dcm")), *sorted(external.glob("*.dcm"))]:
        try:
            dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            tags = list(dataset.keys())
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken test files
            continue
        for tag in tags:
            fast = raw_json(dataset.get_item(tag, keep_deferred=True))
            if fast is not None:
                taken += 1
                keyword = keyword_for_tag(tag)
                quick = plain_get(dataset, keyword, None) if keyword else None  # before pydicom converts it
                assert _dumps(fast) == _dumps(dataset[tag].to_json_dict(None, 1 << 20)), (path, tag)
                if keyword:
                    slow = dataset.get(keyword, None)
                    assert quick == (list(slow) if isinstance(slow, MultiValue) else slow), (path, keyword)
    assert taken > 5000


def test_a_scan_run_again_keeps_no_chunk_of_the_last_listing(tmp_path, monkeypatch) -> None:
    """A rescan (resume of a job whose scan never finished) must not merge chunks of an older
    listing, nor wait for their outcomes."""
    import shutil

    from tasks.scan import REQUEST, list_export_source, scan_chunk
    from tasks.spool import JobSpool
    from workers.settings import reload_settings

    monkeypatch.setenv("DISCFLOW_SCAN_CHUNK_FILES", "2")
    reload_settings()
    try:
        source = tmp_path / "source"
        source.mkdir()
        for number in range(5):
            shutil.copy(_path("CT_small.dcm"), source / f"{number}.dcm")
        spool = JobSpool(tmp_path / "spool", "rescan").create()
        spool.write(REQUEST, {"source": {"folder": str(source)}})
        assert list_export_source(spool) == 3
        scan_chunk(spool, 2)
        for number in range(3):
            (source / f"{number}.dcm").unlink()
        assert list_export_source(spool) == 1
        assert [p.name for p in (spool.path / "batches" / "scan").iterdir()] == ["000000.json"]
        assert not (spool.path / "outcomes" / "scan").exists()
    finally:
        monkeypatch.undo()
        reload_settings()


def test_dataset_from_json_gives_pydicom_values_with_plain_elements_kept_raw() -> None:
    """Every plain attribute of the sample files' header subsets goes back to the same raw
    element JSON, and the data set gives the values Dataset.from_json gives."""
    from pathlib import Path

    import pydicom.data
    from pydicom.dataelem import RawDataElement

    from tasks.manifest import dataset_from_json
    from tasks.raw_json import raw_element, raw_json

    local = Path(pydicom.data.__file__).parent
    external = Path(pydicom.__file__).parents[1] / "data_store" / "data"
    compared = raws = 0
    for path in [*sorted(local.rglob("*.dcm")), *sorted(external.glob("*.dcm"))]:
        try:
            attributes = subset_json(pydicom.dcmread(path, stop_before_pixels=True), sum(LEVEL_KEYWORDS, ()))
            expected = Dataset.from_json(attributes)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken test files
            continue
        for key, mapping in attributes.items():
            raw = raw_element(key, mapping)
            if raw is not None:
                raws += 1
                assert raw_json(raw) == mapping, (path, key)
        got = dataset_from_json(attributes)
        assert sorted(got.keys()) == sorted(expected.keys()), path
        for tag in expected.keys():
            assert (got[tag].VR, got[tag].value) == (expected[tag].VR, expected[tag].value), (path, tag)
            assert type(got[tag].value) is type(expected[tag].value), (path, tag)
        compared += 1
    assert compared > 150 and raws > 3000
    kept = dataset_from_json({"00200013": {"vr": "IS", "Value": [7]}, "00080060": {"vr": "CS", "Value": ["CT"]}})
    assert isinstance(kept.get_item(0x00200013, keep_deferred=True), RawDataElement)
    assert kept.InstanceNumber == 7 and kept.Modality == "CT"
    for mapping in ({"vr": "DS", "Value": [1 / 3]}, {"vr": "CS", "Value": [" A"]}, {"vr": "CS", "Value": ["A\\B"]},
                    {"vr": "US", "Value": [70000]}, {"vr": "IS", "Value": [None]}, {"vr": "LO", "Value": ["x"]}):
        assert raw_element("00181050", mapping) is None, mapping  # left to pydicom


def test_read_manifest_parses_each_version_of_the_file_once(tmp_path) -> None:
    from tasks.manifest import read_manifest
    from tasks.spool import write_json

    path = tmp_path / "manifest.json"
    write_json(path, Manifest(job_id="a", kind="export").to_json())
    first = read_manifest(path)
    assert read_manifest(path) is first and first.job_id == "a"
    write_json(path, Manifest(job_id="b", kind="export").to_json())  # a rewrite is a new file
    assert read_manifest(path).job_id == "b"
