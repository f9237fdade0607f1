"""DICOMDIR, ISO image and disc index writers, checked by independent readers.

A file-set of 250 real instances (CT and MR slices from pydicom's test data, an SR, a 12-lead
ECG and an Encapsulated PDF built here), two patients, three studies, fresh UIDs, laid out under
the File IDs media.py uses. The DICOMDIR is checked by dciodvfy, dcmdump, DCMTK's dcmmkdir
(update mode must find every record and no inconsistency; a fresh dcmmkdir DICOMDIR must hold
the same records) and pydicom's FileSet; offsets are also walked by hand. The ISO image is read
back by isoinfo (ISO 9660 and Joliet trees), xorriso and pycdlib. Times for 10,000 instances
are printed, not asserted (run with -s to see them).
"""
from __future__ import annotations

import hashlib

import copy
import dataclasses
import datetime
import io
import random
import re
import shutil
import struct
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pycdlib
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tasks.dicomdir import (DirectoryEntry, check_profile, encode_dicomdir, file_id_for, record_type,
                            validate_file_id, write_dicomdir)
from tasks.disc_index import index_html, readme_text, summarize
from tasks.iso_image import build_iso, level1_path, read_iso_listing
from tasks.manifest import Manifest, ManifestBuilder, dataset_from_json

HOSTILE_NAME = '<script>alert("x")</script>^Evil&Co'
LATIN1_NAME = "Müller^Jörg"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
INSTANCES = 250


def require(*tools: str) -> None:
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# The file-set


def _pdf_dataset() -> Dataset:
    """A small but complete Encapsulated PDF instance (pydicom's test data has none)."""
    pdf = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
           b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.Modality = "DOC"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20040826", "101500"
    ds.AcquisitionDateTime = "20040826101500"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = "Befund / Report"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.Manufacturer = "discflow tests"
    return ds


def _load(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _write_instance(template: Dataset, folder: Path, patient: dict, study: dict, series: dict,
                    number: int) -> Path:
    ds = copy.deepcopy(template)
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in {**patient, **study, **series}.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def _build_sources(folder: Path) -> list[Path]:
    """250 instances: patient A (Latin-1 name) with a CT study (100 CT_small, 20 693_UNCR, 1 SR)
    and an MR study (67 MR_small, 1 PDF); patient B (hostile name) with a study that has no
    date and no Study ID (60 CT, 1 ECG without Series Number)."""
    folder.mkdir(parents=True, exist_ok=True)
    ct, big_ct, mr = _load("CT_small.dcm"), _load("693_UNCR.dcm"), _load("MR_small.dcm")
    sr, ecg, pdf = _load("test-SR.dcm"), _load("waveform_ecg.dcm"), _pdf_dataset()

    patient_a = {"PatientName": LATIN1_NAME, "PatientID": "DF-MW-A", "IssuerOfPatientID": "DISCFLOW",
                 "PatientBirthDate": "19610203", "PatientSex": "M"}
    patient_b = {"PatientName": HOSTILE_NAME, "PatientID": "DF-MW-B", "PatientBirthDate": "",
                 "PatientSex": "F"}
    ct_study = {"StudyInstanceUID": generate_uid(), "StudyDate": "20040119", "StudyTime": "072730",
                "StudyID": "CT1", "AccessionNumber": "ACC-CT-1", "StudyDescription": "CT Thorax <nativ>"}
    mr_study = {"StudyInstanceUID": generate_uid(), "StudyDate": "20040826", "StudyTime": "101500",
                "StudyID": "MR1", "AccessionNumber": "ACC-MR-1", "StudyDescription": "MR Kopf"}
    undated = {"StudyInstanceUID": generate_uid(), "StudyDate": "", "StudyTime": "", "StudyID": "",
               "AccessionNumber": "", "StudyDescription": "Befund & <b>Vergleich</b>"}

    def series(modality: str, number: int | None, description: str) -> dict:
        values = {"SeriesInstanceUID": generate_uid(), "Modality": modality, "SeriesDescription": description}
        values["SeriesNumber"] = number if number is not None else ""
        return values

    layout = [
        (ct, patient_a, ct_study, series("CT", 1, "Thorax 5mm"), 100),
        (big_ct, patient_a, ct_study, series("CT", 2, "Thorax 1mm"), 20),
        (sr, patient_a, ct_study, series("SR", 90, "Befundbericht"), 1),
        (mr, patient_a, mr_study, series("MR", 1, "T1 sag"), 67),
        (pdf, patient_a, mr_study, series("DOC", 99, "PDF <report>"), 1),
        (ct, patient_b, undated, series("CT", 3, "Abdomen"), 60),
        (ecg, patient_b, undated, series("ECG", None, "12-lead"), 1),
    ]
    paths = []
    for template, patient, study, series_values, count in layout:
        for number in range(1, count + 1):
            paths.append(_write_instance(template, folder, patient, study, series_values, number))
    assert len(paths) == INSTANCES
    return paths


def _manifest(paths: list[Path]) -> Manifest:
    builder = ManifestBuilder("test-media-writers", "export", {})
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        builder.add(path, path.stat().st_size, dataset, str(dataset.file_meta.TransferSyntaxUID))
    return builder.manifest


def _entries(manifest: Manifest) -> list[tuple[DirectoryEntry, Path]]:
    """Directory entries as tasks/media.py makes them: patient, study, series numbered in order
    of appearance, instances numbered within their series."""
    numbers: dict[str, dict[int, int]] = defaultdict(dict)
    per_series: Counter[int] = Counter()
    result = []
    for instance in manifest.instances:
        patient_no = numbers["patient"].setdefault(instance.patient, len(numbers["patient"]) + 1)
        study_no = numbers["study"].setdefault(instance.study, len(numbers["study"]) + 1)
        series_no = numbers["series"].setdefault(instance.series, len(numbers["series"]) + 1)
        per_series[instance.series] += 1
        entry = DirectoryEntry(
            file_id=file_id_for(patient_no, study_no, series_no, per_series[instance.series]),
            sop_class_uid=instance.sop_class_uid, sop_instance_uid=instance.sop_instance_uid,
            transfer_syntax=instance.transfer_syntax,
            patient=dataset_from_json(manifest.patients[instance.patient].attributes),
            study=dataset_from_json(manifest.studies[instance.study].attributes),
            series=dataset_from_json(manifest.series[instance.series].attributes),
            instance=dataset_from_json(instance.attributes))
        result.append((entry, Path(instance.source)))
    return result


class FileSetOnDisk:
    def __init__(self, root: Path, entries: list[DirectoryEntry], sources: dict[str, Path], size: int):
        self.root = root
        self.dicomdir = root / "DICOMDIR"
        self.entries = entries
        self.sources = sources
        self.size = size
        self.by_uid = {e.sop_instance_uid: e for e in entries}


@pytest.fixture(scope="module")
def file_set(tmp_path_factory: pytest.TempPathFactory) -> FileSetOnDisk:
    base = tmp_path_factory.mktemp("media-writers")
    paired = _entries(_manifest(_build_sources(base / "sources")))
    root = base / "disc"
    for entry, source in paired:
        target = root.joinpath(*entry.file_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    entries = [entry for entry, _ in paired]
    size = write_dicomdir(root / "DICOMDIR", entries, file_set_id="DISCFLOW_TEST")
    return FileSetOnDisk(root, entries, {e.sop_instance_uid: s for e, s in paired}, size)


# --------------------------------------------------------------------------------------------
# DICOMDIR: independent validators


def test_dicomdir_has_no_dciodvfy_errors(file_set: FileSetOnDisk) -> None:
    require("dciodvfy")
    result = subprocess.run(["dciodvfy", str(file_set.dicomdir)], capture_output=True, text=True, errors="replace")
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = sorted({line for line in lines if line.startswith("Warning")})
    print("\ndciodvfy warnings:", *warnings, sep="\n  ")
    assert errors == []
    assert "BasicDirectory" in lines[0]
    # The only expected warning comes from test-SR.dcm's own concept code (scheme "TEST").
    assert all("<TEST>" in w for w in warnings), warnings


def test_dicomdir_dumps_with_dcmdump(file_set: FileSetOnDisk) -> None:
    require("dcmdump")
    result = subprocess.run(["dcmdump", "-q", "+L", str(file_set.dicomdir)], capture_output=True, text=True, errors="replace")
    assert result.returncode == 0, result.stderr
    dump = subprocess.run(["dcmdump", str(file_set.dicomdir)], capture_output=True, text=True, errors="replace").stdout
    assert dump.count('"Directory Record" ') == INSTANCES + 2 + 3 + 7  # leaves, patients, studies, series


def test_dicomdir_reads_back_as_pydicom_fileset(file_set: FileSetOnDisk) -> None:
    dicomdir = pydicom.dcmread(file_set.dicomdir)
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert dicomdir.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert dicomdir.FileSetID == "DISCFLOW_TEST"
    fs = FileSet(dicomdir)  # checks every offset and that each referenced file exists
    found = Counter(str(instance.SOPInstanceUID) for instance in fs)
    assert len(found) == INSTANCES and set(found.values()) == {1}
    for instance in fs:
        entry = file_set.by_uid[str(instance.SOPInstanceUID)]
        assert tuple(instance.ReferencedFileID) == entry.file_id
        assert instance.ReferencedSOPClassUIDInFile == entry.sop_class_uid
        assert instance.ReferencedTransferSyntaxUIDInFile == entry.transfer_syntax
        on_disc = instance.load()  # the record really points at that file
        assert on_disc.SOPInstanceUID == entry.sop_instance_uid
        assert on_disc.file_meta.TransferSyntaxUID == entry.transfer_syntax
    assert Counter(i.DirectoryRecordType for i in fs) == {"IMAGE": 247, "SR DOCUMENT": 1, "ENCAP DOC": 1,
                                                         "WAVEFORM": 1}


def _records_by_offset(path: Path) -> tuple[Dataset, dict[int, Dataset], bytes]:
    raw = path.read_bytes()
    dicomdir = pydicom.dcmread(path)
    return dicomdir, {item.seq_item_tell: item for item in dicomdir.DirectoryRecordSequence}, raw


def _walk(path: Path) -> list[tuple[Dataset, Dataset, Dataset, Dataset]]:
    """Follow the offsets by hand: every offset must land on the Item tag of a record, the tree
    must be PATIENT > STUDY > SERIES > leaf, and every record must be reached exactly once.
    Returns (patient, study, series, leaf) records per leaf in directory order."""
    dicomdir, records, raw = _records_by_offset(path)

    def chain(offset: int) -> list[int]:
        offsets = []
        while offset:
            assert raw[offset:offset + 4] == struct.pack("<HH", 0xFFFE, 0xE000), offset
            assert offset in records
            offsets.append(offset)
            offset = records[offset].OffsetOfTheNextDirectoryRecord
        return offsets

    roots = chain(dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity)
    assert roots[-1] == dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity
    reached = list(roots)
    leaves = []
    for p_offset in roots:
        patient = records[p_offset]
        assert patient.DirectoryRecordType == "PATIENT"
        for s_offset in chain(patient.OffsetOfReferencedLowerLevelDirectoryEntity):
            study = records[s_offset]
            assert study.DirectoryRecordType == "STUDY"
            reached.append(s_offset)
            for e_offset in chain(study.OffsetOfReferencedLowerLevelDirectoryEntity):
                series = records[e_offset]
                assert series.DirectoryRecordType == "SERIES"
                reached.append(e_offset)
                for l_offset in chain(series.OffsetOfReferencedLowerLevelDirectoryEntity):
                    leaf = records[l_offset]
                    reached.append(l_offset)
                    assert leaf.OffsetOfReferencedLowerLevelDirectoryEntity == 0
                    leaves.append((patient, study, series, leaf))
    assert sorted(reached) == sorted(records) and len(reached) == len(set(reached))
    return leaves


def _check_tree(leaves: list, file_set: FileSetOnDisk) -> None:
    assert len(leaves) == INSTANCES
    for patient, study, series, leaf in leaves:
        entry = file_set.by_uid[leaf.ReferencedSOPInstanceUIDInFile]
        assert patient.PatientID == entry.patient.PatientID
        assert study.StudyInstanceUID == entry.study.StudyInstanceUID
        assert series.SeriesInstanceUID == entry.series.SeriesInstanceUID
        assert tuple(leaf.ReferencedFileID) == entry.file_id


def test_dicomdir_offsets_form_the_patient_study_series_tree(file_set: FileSetOnDisk) -> None:
    _check_tree(_walk(file_set.dicomdir), file_set)


def test_dicomdir_groups_entries_that_arrive_in_any_order(file_set: FileSetOnDisk, tmp_path: Path) -> None:
    shuffled = file_set.entries[:]
    random.Random(20240611).shuffle(shuffled)
    write_dicomdir(tmp_path / "DICOMDIR", shuffled)
    leaves = _walk(tmp_path / "DICOMDIR")
    _check_tree(leaves, file_set)
    assert len({id(p) for p, _, _, _ in leaves}) == 2
    assert len({id(s) for _, s, _, _ in leaves}) == 3
    assert len({id(s) for _, _, s, _ in leaves}) == 7
    first_seen = list(dict.fromkeys(e.sop_instance_uid for e in shuffled
                                    if e.series.SeriesInstanceUID == shuffled[0].series.SeriesInstanceUID))
    in_directory = [leaf.ReferencedSOPInstanceUIDInFile for _, _, s, leaf in leaves
                    if s.SeriesInstanceUID == shuffled[0].series.SeriesInstanceUID]
    assert in_directory == first_seen


def test_dicomdir_keys(file_set: FileSetOnDisk) -> None:
    dicomdir = pydicom.dcmread(file_set.dicomdir)
    records = dicomdir.DirectoryRecordSequence
    patients = [r for r in records if r.DirectoryRecordType == "PATIENT"]
    assert [str(p.PatientName) for p in patients] == [LATIN1_NAME, HOSTILE_NAME]
    assert patients[0].SpecificCharacterSet == "ISO_IR 100"  # non-ASCII key
    assert "SpecificCharacterSet" not in patients[1]
    studies = {r.StudyInstanceUID: r for r in records if r.DirectoryRecordType == "STUDY"}
    undated = next(s for s in studies.values() if s.StudyDescription.startswith("Befund"))
    assert re.fullmatch(r"\d{8}", undated.StudyDate) and re.fullmatch(r"\d{6}", undated.StudyTime)  # stand-ins
    assert re.fullmatch(r"DF[0-9A-F]{10}", undated.StudyID)
    assert undated.AccessionNumber == ""  # Type 2: present, empty
    ecg_series = next(r for r in records if r.DirectoryRecordType == "SERIES" and r.Modality == "ECG")
    assert ecg_series.SeriesNumber == 2  # no Series Number in the file: its place in the study
    sr = next(r for r in records if r.DirectoryRecordType == "SR DOCUMENT")
    for keyword in ("InstanceNumber", "CompletionFlag", "VerificationFlag", "ContentDate", "ContentTime",
                    "ConceptNameCodeSequence", "VerificationDateTime"):
        assert keyword in sr and sr[keyword].VM, keyword
    pdf = next(r for r in records if r.DirectoryRecordType == "ENCAP DOC")
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert pdf.DocumentTitle == "Befund / Report" and "ContentDate" in pdf and "ConceptNameCodeSequence" in pdf
    for leaf in (r for r in records if "ReferencedFileID" in r):
        assert len(leaf.ReferencedFileID) == 5


def test_dicomdir_agrees_with_dcmmkdir(file_set: FileSetOnDisk, tmp_path: Path) -> None:
    """DCMTK cross-check, two ways. (1) dcmmkdir +U on a copy of our DICOMDIR re-reads every
    referenced file: it must match each file to an existing record (so adds none) and report no
    inconsistency between record keys and file. (2) A DICOMDIR made by dcmmkdir from the same
    files holds the same records with the same keys."""
    require("dcmmkdir", "dcmdump")
    ours = tmp_path / "ours"
    shutil.copyfile(file_set.dicomdir, ours)
    update = subprocess.run(["dcmmkdir", "+U", "-nb", "+I", "+r", "+id", str(file_set.root), "+D", str(ours),
                             "DICOM"], capture_output=True, text=True, errors="replace")
    assert update.returncode == 0, update.stderr
    assert "inconsistent" not in update.stderr, update.stderr
    assert "E:" not in update.stderr, update.stderr

    fresh = tmp_path / "fresh"
    made = subprocess.run(["dcmmkdir", "+I", "+r", "+id", str(file_set.root), "+D", str(fresh), "DICOM"],
                          capture_output=True, text=True, errors="replace")
    assert made.returncode == 0, made.stderr

    def summary(path: Path) -> Counter:
        keys = Counter()
        for record in pydicom.dcmread(path).DirectoryRecordSequence:
            kind = record.DirectoryRecordType
            key = {"PATIENT": ("PatientID", "PatientName"), "STUDY": ("StudyInstanceUID", "AccessionNumber"),
                   "SERIES": ("SeriesInstanceUID", "Modality")}.get(
                kind, ("ReferencedSOPInstanceUIDInFile", "ReferencedFileID", "ReferencedSOPClassUIDInFile",
                       "ReferencedTransferSyntaxUIDInFile", "InstanceNumber"))
            keys[(kind, *(str(record.get(k)) for k in key))] += 1
        return keys

    mine, updated, dcmtk = summary(file_set.dicomdir), summary(ours), summary(fresh)
    assert updated == mine
    assert dcmtk == mine


def test_dicomdir_character_sets_and_stable_output(tmp_path: Path) -> None:
    def entry(name: str, number: int) -> DirectoryEntry:
        patient, study, series, instance = Dataset(), Dataset(), Dataset(), Dataset()
        patient.PatientName, patient.PatientID = name, f"ID{number}"
        study.StudyInstanceUID, study.StudyDate, study.StudyTime, study.StudyID = f"1.2.3.{number}", "20240101", "1200", "1"
        series.SeriesInstanceUID, series.Modality, series.SeriesNumber = f"1.2.3.{number}.1", "OT", 1
        instance.InstanceNumber = 1
        return DirectoryEntry(file_id_for(number, 1, 1, 1), "1.2.840.10008.5.1.4.1.1.7", f"1.2.3.{number}.1.1",
                              ExplicitVRLittleEndian, patient, study, series, instance)

    entries = [entry("Plain^Name", 1), entry("Ωmega^Ñandú", 2), entry("山田^太郎", 3)]
    path = tmp_path / "DICOMDIR"
    write_dicomdir(path, entries)
    first = path.read_bytes()
    write_dicomdir(path, entries)
    assert path.read_bytes() == first  # a rerun of the task writes the same file
    assert [p.name for p in tmp_path.iterdir()] == ["DICOMDIR"]  # no temporary files left
    patients = [r for r in pydicom.dcmread(path).DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert [r.get("SpecificCharacterSet") for r in patients] == [None, "ISO_IR 192", "ISO_IR 192"]
    assert [str(r.PatientName) for r in patients] == ["Plain^Name", "Ωmega^Ñandú", "山田^太郎"]
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
        assert [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")] == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, as the invalid values are read
def test_invalid_header_values_are_made_conformant_in_records(tmp_path: Path) -> None:
    """Other vendors' headers: lower-case CS, dashed dates, overlong LO/SH/PN, a backslash in a
    VM 1 key, an unparseable Content Date. The records must still validate."""
    patient = dataset_from_json({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A" * 80 + "^B"}]},
                                 "00100020": {"vr": "LO", "Value": ["X\\Y"]}})
    study = dataset_from_json({"0020000D": {"vr": "UI", "Value": ["1.2.3"]},
                               "00081030": {"vr": "LO", "Value": ["d" * 200]},
                               "00080020": {"vr": "DA", "Value": ["2024-01-01"]},
                               "00080030": {"vr": "TM", "Value": ["12:30:00"]},
                               "00200010": {"vr": "SH", "Value": ["x" * 30]}})
    series = dataset_from_json({"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS", "Value": ["ct"]},
                                "00200011": {"vr": "IS", "Value": [3]}})
    instance = dataset_from_json({"00200013": {"vr": "IS", "Value": [7]},
                                  "00080023": {"vr": "DA", "Value": ["garbage"]}})
    entry = DirectoryEntry(file_id_for(1, 1, 1, 1), "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ExplicitVRLittleEndian,
                           patient, study, series, instance)
    notes: list[str] = []
    data = encode_dicomdir([entry], notes=notes)
    patient_record, study_record, series_record, _ = pydicom.dcmread(io.BytesIO(data)).DirectoryRecordSequence
    assert patient_record.PatientID == "X Y" and len(str(patient_record.PatientName)) == 64
    assert (study_record.StudyDate, study_record.StudyTime, study_record.StudyID) == ("20240101", "123000", "x" * 16)
    assert len(study_record.StudyDescription) == 64 and series_record.Modality == "CT"
    assert any("made valid" in note for note in notes)
    assert not any("AAAA" in note or "X Y" in note or "2024" in note for note in notes)  # no PHI in logs
    if shutil.which("dciodvfy"):
        (tmp_path / "DICOMDIR").write_bytes(data)
        out = subprocess.run(["dciodvfy", str(tmp_path / "DICOMDIR")], capture_output=True, text=True,
                             errors="replace")
        assert [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")] == []


def test_packed_record_keys_are_the_bytes_pydicom_writes(file_set: FileSetOnDisk, monkeypatch) -> None:
    """Record keys packed directly (plain ASCII) and written by pydicom give the same DICOMDIR,
    for every sample instance, under both key sets (CD; DVD/USB)."""
    import tasks.dicomdir as dicomdir

    packed = {profile: encode_dicomdir(file_set.entries, profile=profile) for profile in ("STD-GEN-CD", "STD-GEN-DVD-J2K")}
    used = []
    monkeypatch.setattr(dicomdir, "_plain_keys", lambda keys: used.append(keys) and None)
    for profile, data in packed.items():
        assert encode_dicomdir(file_set.entries, profile=profile) == data, profile
    assert len(used) > len(file_set.entries)  # the fast path was offered every record


def test_dvd_and_usb_profiles_add_their_patient_and_series_keys(file_set: FileSetOnDisk) -> None:
    records = pydicom.dcmread(io.BytesIO(encode_dicomdir(file_set.entries, profile="STD-GEN-DVD-J2K"))) \
        .DirectoryRecordSequence
    patient = records[0]
    assert (patient.PatientBirthDate, patient.PatientSex) == ("19610203", "M")
    cd = pydicom.dcmread(file_set.dicomdir).DirectoryRecordSequence[0]
    assert "PatientBirthDate" not in cd and "PatientSex" not in cd  # STD-GEN-CD: F.5 keys only


def test_patient_without_id_gets_a_stable_generated_id() -> None:
    def entry(number: int) -> DirectoryEntry:
        patient, study, series, instance = Dataset(), Dataset(), Dataset(), Dataset()
        patient.PatientName, patient.PatientID, patient.PatientBirthDate = "Anon^Ymous", "", "19700101"
        study.StudyInstanceUID, study.StudyDate, study.StudyTime, study.StudyID = "1.2.3", "20240101", "1200", "1"
        series.SeriesInstanceUID, series.Modality, series.SeriesNumber = "1.2.3.1", "OT", 1
        return DirectoryEntry(file_id_for(1, 1, 1, number), "1.2.840.10008.5.1.4.1.1.7", f"1.2.3.1.{number}",
                              ExplicitVRLittleEndian, patient, study, series, instance)

    data = encode_dicomdir([entry(1), entry(2)])
    records = pydicom.dcmread(io.BytesIO(data)).DirectoryRecordSequence
    [patient] = [r for r in records if r.DirectoryRecordType == "PATIENT"]
    assert re.fullmatch(r"DF[0-9A-F]{14}", patient.PatientID)
    assert encode_dicomdir([entry(2), entry(1)]).count(patient.PatientID.encode()) == 1
    assert [r.InstanceNumber for r in records if r.DirectoryRecordType == "IMAGE"] == [1, 2]  # stand-ins


def test_dicomdir_refuses_duplicates_and_bad_ids(file_set: FileSetOnDisk, tmp_path: Path) -> None:
    first = file_set.entries[0]
    with pytest.raises(ValueError, match="occurs twice"):
        encode_dicomdir([first, copy.copy(first)])
    twin = copy.copy(first)
    twin.file_id = file_id_for(9, 9, 9, 9)
    with pytest.raises(ValueError, match="SOP Instance UID"):
        encode_dicomdir([first, twin])
    with pytest.raises(ValueError, match="File-set ID"):
        encode_dicomdir([first], file_set_id="lower-case")
    for bad in [(), ("DICOM", "p0000001"), ("DICOM", "TOOLONGNAME"), ("A",) * 9, ("DICOM", "..")]:
        with pytest.raises(ValueError):
            validate_file_id(bad)
    assert file_id_for(1, 2, 3, 4) == ("DICOM", "P0000001", "S0000002", "S0000003", "I0000004")
    with pytest.raises(ValueError):
        file_id_for(0, 1, 1, 1)


def test_record_types_and_profiles(file_set: FileSetOnDisk) -> None:
    assert record_type("1.2.840.10008.5.1.4.1.1.2") == "IMAGE"
    assert record_type("1.2.840.10008.5.1.4.1.1.88.33") == "SR DOCUMENT"
    assert record_type(ENCAPSULATED_PDF) == "ENCAP DOC"
    assert record_type("1.2.840.10008.5.1.4.1.1.11.1") == "PRESENTATION"
    assert record_type("1.2.840.10008.5.1.4.1.1.88.59") == "KEY OBJECT DOC"
    assert record_type("1.2.840.10008.5.1.4.1.1.9.1.1") == "WAVEFORM"
    assert record_type("1.2.840.10008.5.1.4.1.1.481.2") == "RT DOSE"
    assert record_type("1.2.840.10008.5.1.4.1.1.481.5") == "RT PLAN"
    assert record_type("1.2.840.10008.5.1.4.1.1.481.10", modality="RTINTENT") == "RADIOTHERAPY"
    assert record_type("1.2.840.10008.5.1.4.38.1") == "HANGING PROTOCOL"  # refused by the writer
    assert check_profile(file_set.entries, "STD-GEN-CD") == []
    jpeg = copy.copy(file_set.entries[0])
    jpeg.transfer_syntax = "1.2.840.10008.1.2.4.70"
    assert len(check_profile([jpeg], "STD-GEN-CD")) == 1
    assert check_profile([jpeg], "STD-GEN-DVD-JPEG") == []
    with pytest.raises(ValueError, match="unknown media profile"):
        check_profile([jpeg], "STD-GEN-FLOPPY")


def test_media_keeps_every_instance_attribute_the_records_and_web_content_read(file_set: FileSetOnDisk) -> None:
    """tasks.media converts only RECORD_INSTANCE_KEYWORDS and WEB_INSTANCE_KEYWORDS of each
    instance's header subset: DICOMDIR, thumbnails, report copies and the disc index must come out
    the same as from the whole subset (CT, MR, SR, ECG and PDF instances here)."""
    from tasks.media import _entry_attributes
    from tasks.web_content import build_web_content

    trimmed = [dataclasses.replace(entry, instance=Dataset.from_json(_entry_attributes(entry.instance.to_json_dict())))
               for entry in file_set.entries]
    assert sum(len(e.instance) for e in trimmed) < sum(len(e.instance) for e in file_set.entries)
    for profile in ("STD-GEN-CD", "STD-GEN-DVD-JPEG"):
        assert encode_dicomdir(trimmed, profile=profile) == encode_dicomdir(file_set.entries, profile=profile)
    whole = build_web_content([(e, file_set.sources[e.sop_instance_uid]) for e in file_set.entries], {})
    part = build_web_content([(e, file_set.sources[e.sop_instance_uid]) for e in trimmed], {})
    assert (part.files, part.thumbnails, part.reports) == (whole.files, whole.thumbnails, whole.reports)
    assert whole.thumbnails and whole.reports
    created = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert index_html(summarize(trimmed, volume_no=1, volume_count=1, institution="X", created=created)) == \
        index_html(summarize(file_set.entries, volume_no=1, volume_count=1, institution="X", created=created))


# --------------------------------------------------------------------------------------------
# ISO image


@pytest.fixture(scope="module")
def iso(file_set: FileSetOnDisk, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict]:
    files = [("DICOMDIR", file_set.dicomdir)] + [("/".join(e.file_id), file_set.root.joinpath(*e.file_id))
                                                 for e in file_set.entries]
    extras = {"README.TXT": b"read me\r\n", "INDEX.HTM": b"<!DOCTYPE html><title>x</title>",
              "IHE_PDI/Series-1 thumbnail.html": b"<p>long Joliet name</p>"}
    path = tmp_path_factory.mktemp("iso") / "VOL001.ISO"
    started = time.perf_counter()
    size, digest = build_iso(path, files, volume_id="DISCFLOW_TEST", extra_files=extras.items())
    print(f"\nISO of {len(files)} files ({sum(p.stat().st_size for _, p in files) / 1e6:.1f} MB): "
          f"{time.perf_counter() - started:.3f} s")
    assert size == path.stat().st_size and size % 2048 == 0
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    return path, [name for name, _ in files], extras


def _listed(lines: str) -> list[str]:
    return [line.strip().strip("'") for line in lines.splitlines() if line.strip()]


def _files_only(paths: list[str]) -> list[str]:
    directories = {p.rsplit("/", 1)[0] for p in paths}
    return sorted(p.lstrip("/") for p in paths if p not in directories)


def test_iso_9660_tree_lists_every_file_once(iso: tuple[Path, list[str], dict]) -> None:
    require("isoinfo")
    path, names, extras = iso
    raw = _listed(subprocess.run(["isoinfo", "-i", str(path), "-f"], check=True, capture_output=True,
                                 text=True, errors="replace").stdout)
    files = [p for p in raw if ";" in p]
    assert all(p.endswith(";1") for p in files)
    assert "/DICOMDIR.;1" in files  # PS3.12 F.1.2.1: name, separator, no extension, version 1
    plain = [p[:-2].rstrip(".").lstrip("/") for p in files]
    expected = sorted(names + ["README.TXT", "INDEX.HTM", level1_path("IHE_PDI/Series-1 thumbnail.html")])
    assert sorted(plain) == expected and len(plain) == len(set(plain))
    assert read_iso_listing(path) == expected
    volume = subprocess.run(["isoinfo", "-d", "-i", str(path)], check=True, capture_output=True, text=True, errors="replace").stdout
    assert "Volume id: DISCFLOW_TEST" in volume and "Joliet" in volume


def test_joliet_tree_lists_every_file_once(iso: tuple[Path, list[str], dict]) -> None:
    require("isoinfo", "xorriso")
    path, names, extras = iso
    expected = sorted(names + list(extras))
    joliet = _listed(subprocess.run(["isoinfo", "-i", str(path), "-J", "-f"], check=True, capture_output=True,
                                    text=True, errors="replace").stdout)
    assert _files_only(joliet) == expected
    for read_fs, wanted in (("any", expected), ("ecma119", read_iso_listing(path))):
        found = _listed(subprocess.run(["xorriso", "-read_fs", read_fs, "-indev", str(path), "-find", "/",
                                        "-type", "f"], check=True, capture_output=True, text=True, errors="replace").stdout)
        assert sorted(p.lstrip("/") for p in found) == wanted, read_fs


def test_iso_file_contents_match(iso: tuple[Path, list[str], dict], file_set: FileSetOnDisk,
                                 tmp_path: Path) -> None:
    require("isoinfo", "xorriso")
    path, _, extras = iso
    originals = {"DICOMDIR": file_set.dicomdir} | {"/".join(e.file_id): file_set.root.joinpath(*e.file_id)
                                                   for e in file_set.entries[::50]}
    disc = pycdlib.PyCdlib()
    disc.open(str(path))
    try:
        for name, original in originals.items():
            via_isoinfo = subprocess.run(["isoinfo", "-i", str(path), "-x", f"/{name}.;1"], check=True,
                                         capture_output=True).stdout
            buffer = io.BytesIO()
            disc.get_file_from_iso_fp(buffer, joliet_path=f"/{name}")
            assert via_isoinfo == buffer.getvalue() == original.read_bytes(), name
        buffer = io.BytesIO()
        disc.get_file_from_iso_fp(buffer, joliet_path="/IHE_PDI/Series-1 thumbnail.html")
        assert buffer.getvalue() == extras["IHE_PDI/Series-1 thumbnail.html"]
    finally:
        disc.close()
    out = tmp_path / "x"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(path), "-extract", "/", str(out)], check=True,
                   capture_output=True)
    for extracted in [out, *out.rglob("*")]:  # no Rock Ridge: xorriso makes everything read-only
        extracted.chmod(0o755 if extracted.is_dir() else 0o644)
    assert (out / "DICOMDIR").read_bytes() == file_set.dicomdir.read_bytes()
    assert (out / "README.TXT").read_bytes() == extras["README.TXT"]
    for entry in file_set.entries:
        assert out.joinpath(*entry.file_id).stat().st_size == file_set.root.joinpath(*entry.file_id).stat().st_size


def test_iso_is_hashed_as_it_is_written_and_read_back_only_when_out_of_order(tmp_path: Path, monkeypatch) -> None:
    """A disc's usual layout (DICOMDIR, DICOM/..., README, INDEX, IHE_PDI/, a viewer) is hashed
    while pycdlib writes it; files added out of extent order are hashed by reading the image back.
    Either way the SHA-256 is the image's."""
    import tasks.iso_image as iso_image

    sources = []
    for number in range(12):
        source = tmp_path / f"source{number}"
        source.write_bytes(bytes([number]) * (1000 + 3000 * number))
        sources.append((f"DICOM/P0000001/S0000001/S000000{1 + number // 5}/I{number:07d}", source))
    (tmp_path / "DICOMDIR").write_bytes(b"D" * 5000)
    files = [("DICOMDIR", tmp_path / "DICOMDIR"), *sources]
    extras = [("README.TXT", b"r" * 3000), ("INDEX.HTM", b"<p>" * 900), ("IHE_PDI/T0000001.PNG", b"p" * 4097),
              ("VIEWER/bin/Viewer Start.exe", b"x" * 7000), ("AUTORUN.INF", b"[autorun]\r\n")]
    read_back = []
    monkeypatch.setattr(iso_image, "sha256_file", lambda path: read_back.append(path) or "read back")
    path = tmp_path / "VOL001.ISO"
    size, digest = build_iso(path, files, volume_id="DISCFLOW_001", extra_files=extras)
    assert read_back == [] and digest == hashlib.sha256(path.read_bytes()).hexdigest() and size == path.stat().st_size
    monkeypatch.setattr(iso_image, "_extent_order", lambda item: [-ord(c) for c in item[0]])  # reversed
    assert build_iso(path, files, volume_id="DISCFLOW_001", extra_files=extras)[1] == "read back"
    assert read_back == [path]


def test_iso_refuses_bad_layouts(tmp_path: Path) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    target = tmp_path / "out" / "X.ISO"
    with pytest.raises(ValueError, match="twice"):
        build_iso(target, [("DICOMDIR", source), ("DICOMDIR", source)], volume_id="X")
    with pytest.raises(ValueError, match="root"):
        build_iso(target, [("../escape", source)], volume_id="X")
    with pytest.raises(ValueError, match="volume ID"):
        build_iso(target, [("DICOMDIR", source)], volume_id="lower case")
    with pytest.raises(ValueError, match="deeper"):
        build_iso(target, [("A/B/C/D/E/F/G/H/I", source)], volume_id="X")
    assert not target.exists() and (not target.parent.exists() or not any(target.parent.iterdir()))
    build_iso(target, [("DICOMDIR", source)], volume_id="X")
    build_iso(target, [("DICOMDIR", source)], volume_id="X")  # a rerun replaces the image
    assert [p.name for p in target.parent.iterdir()] == ["X.ISO"]


def test_iso_derives_level1_names_without_taking_conformant_ones(tmp_path: Path) -> None:
    extras = [("IHE_PDI/series-2-a.html", b"a"), ("IHE_PDI/SERIES_2.HTM", b"b"), ("ihe_pdi/Index.htm", b"c")]
    with pytest.raises(ValueError, match="only in case"):  # Joliet readers fold case
        build_iso(tmp_path / "A.ISO", [], volume_id="A", extra_files=extras)
    path = tmp_path / "B.ISO"
    build_iso(path, [], volume_id="B", extra_files=extras[:2] + [("IHE_PDI/Index.htm", b"c")])
    listing = read_iso_listing(path)
    assert "IHE_PDI/SERIES_2.HTM" in listing and "IHE_PDI/INDEX.HTM" in listing
    assert len(listing) == 3 and all(re.fullmatch(r"IHE_PDI/[A-Z0-9_]{1,8}\.HTM", p) for p in listing)
    disc = pycdlib.PyCdlib()
    disc.open(str(path))
    try:
        for joliet_path, content in (("/IHE_PDI/SERIES_2.HTM", b"b"), ("/IHE_PDI/series-2-a.html", b"a")):
            buffer = io.BytesIO()
            disc.get_file_from_iso_fp(buffer, joliet_path=joliet_path)
            assert buffer.getvalue() == content
        buffer = io.BytesIO()
        disc.get_file_from_iso_fp(buffer, iso_path="/IHE_PDI/SERIES_2.HTM;1")
        assert buffer.getvalue() == b"b"
    finally:
        disc.close()


# --------------------------------------------------------------------------------------------
# README.TXT and INDEX.HTM


def test_readme_and_index_list_every_study_and_escape_headers(file_set: FileSetOnDisk) -> None:
    created = datetime.datetime(2024, 6, 11, 9, 30)
    summary = summarize(file_set.entries, volume_no=1, volume_count=2, institution="Klinikum <Süd> & Co",
                        created=created)
    assert [p.id for p in summary.patients] == ["DF-MW-A", "DF-MW-B"]
    assert [len(p.studies) for p in summary.patients] == [2, 1]
    assert summary.instances == INSTANCES
    ct_study = summary.patients[0].studies[0]
    assert (ct_study.date, ct_study.accession, ct_study.modalities) == ("2004-01-19", "ACC-CT-1", ["CT", "SR"])
    assert [(s.number, s.instances) for s in ct_study.series] == [(1, 100), (2, 20), (90, 1)]

    readme = readme_text(summary)
    assert readme.isascii() and "\n" not in readme.replace("\r\n", "")
    assert "Volume     : 1 of 2" in readme and "Klinikum <Sud> & Co" in readme
    assert "Muller, Jorg" in readme
    for patient in summary.patients:
        for study in patient.studies:
            assert (study.date or "(no date)") in readme
            if study.accession:
                assert study.accession in readme

    page = index_html(summary)
    assert "<script" not in page.lower() and "<b>" not in page and "<nativ>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "Klinikum &lt;Süd&gt; &amp; Co" in page and "Müller, Jörg" in page
    assert "Befund &amp; &lt;b&gt;Vergleich&lt;/b&gt;" in page
    for patient in summary.patients:
        for study in patient.studies:
            assert f"<td>{study.accession}</td>" in page
            for series in study.series:
                assert f'<td class="n">{series.instances}</td>' in page
    assert page.count("<tr><td class=\"n\">") == sum(len(s.series) for p in summary.patients for s in p.studies)


def test_hostile_text_cannot_break_lines_or_markup() -> None:
    patient, study, series, instance = Dataset(), Dataset(), Dataset(), Dataset()
    patient.PatientName, patient.PatientID = "Evil\r\nInjected^<img src=x onerror=alert(1)>", "X\x1b[31mRED"
    study.StudyInstanceUID, study.StudyDescription = "1.2.3", "a\"b'c</table>"
    series.SeriesInstanceUID, series.Modality, series.SeriesDescription = "1.2.3.4", "OT", "\x00\x07bell"
    entry = DirectoryEntry(file_id_for(1, 1, 1, 1), "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5",
                           ExplicitVRLittleEndian, patient, study, series, instance)
    summary = summarize([entry], volume_no=1, volume_count=1, institution="x")
    readme = readme_text(summary)
    assert "\x1b" not in readme and "\x00" not in readme and "\x07" not in readme
    assert not any(line.startswith("Injected") for line in readme.split("\r\n"))
    page = index_html(summary)
    assert "<img" not in page and "a&quot;b&#x27;c&lt;/table&gt;" in page


# --------------------------------------------------------------------------------------------
# 10,000 instances: printed timings (benchmarks live elsewhere)


def test_ten_thousand_instances_timing(file_set: FileSetOnDisk, tmp_path: Path) -> None:
    template = file_set.entries[0]
    entries = []
    for study in range(5):
        study_ds = copy.deepcopy(template.study)
        study_ds.StudyInstanceUID = f"2.25.{1000 + study}"
        for series in range(10):
            series_ds = copy.deepcopy(template.series)
            series_ds.SeriesInstanceUID = f"2.25.{1000 + study}.{series}"
            series_ds.SeriesNumber = series + 1
            for number in range(1, 201):
                instance_ds = Dataset()
                instance_ds.InstanceNumber = number
                entries.append(DirectoryEntry(
                    file_id_for(1, study + 1, series + 1, number), template.sop_class_uid,
                    f"2.25.{1000 + study}.{series}.{number}", template.transfer_syntax,
                    template.patient, study_ds, series_ds, instance_ds))
    started = time.perf_counter()
    size = write_dicomdir(tmp_path / "DICOMDIR", entries)
    elapsed = time.perf_counter() - started
    print(f"\nDICOMDIR of {len(entries)} instances: {elapsed:.3f} s, {size / 1e6:.1f} MB")
    records = pydicom.dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence
    assert len(records) == 10_000 + 50 + 5 + 1

    small = tmp_path / "small"
    small.mkdir()
    files = []
    for index, entry in enumerate(entries):
        source = small / f"{index}"
        source.write_bytes(b"\0" * 2048)
        files.append(("/".join(entry.file_id), source))
    started = time.perf_counter()
    size, _ = build_iso(tmp_path / "SMALL.ISO", [("DICOMDIR", tmp_path / "DICOMDIR")] + files, volume_id="BENCH")
    print(f"ISO of {len(files) + 1} small files: {time.perf_counter() - started:.3f} s, {size / 1e6:.1f} MB")
    assert len(read_iso_listing(tmp_path / "SMALL.ISO")) == len(files) + 1
