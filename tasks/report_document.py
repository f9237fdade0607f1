"""The study's report on the disc: an Encapsulated PDF instance (PS3.3 A.45.1) in the file-set.

Where a report comes from
    * ``--report FILE.pdf|.txt`` given for the job: the PDF as it is (it must start with ``%PDF-``),
      a text file rendered to PDF here. It is added to every study of the job (a job is usually
      one study; a reader opening any study finds the report).
    * The study's own text reports (Basic Text, Enhanced and Comprehensive SR) found in the source:
      each is rendered to a PDF, because most viewers and every browser show a PDF and few show SR.
      The SR itself stays on the disc too. Dose, CAD and key-object SRs are not reports and are left
      alone. Encapsulated PDF instances already in the source are copied like any instance.

When
    In the scan stage (:func:`add_reports`, called from ``scan_export``): the new instances enter
    the manifest like scanned files, so volume planning, the DICOMDIR (ENCAP DOC records), the
    profile checks and the web content treat them like every other instance, and nothing later
    needs to know they were made here. Rendering is milliseconds per report.

The PDF writer is deliberately minimal (no dependency): Helvetica from the 14 standard fonts,
WinAnsi (cp1252) text, A4 pages, one content stream per page, a correct cross-reference table.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tasks.manifest import Manifest, ManifestBuilder, dataset_from_json
from tasks.spool import JobSpool, atomic_writer, write_json

log = logging.getLogger(__name__)

__all__ = ["ENCAPSULATED_PDF", "REPORT_SR_CLASSES", "ReportError", "add_reports", "encapsulated_pdf",
           "render_pdf", "sr_text"]

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
REPORT_SR_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR
})
REPORT_CLASSES = REPORT_SR_CLASSES | {ENCAPSULATED_PDF}
"""SOP classes that count as "the study's report" on a disc."""
MAX_REPORT_BYTES = 64 << 20
_LOINC_REPORT = ("18748-4", "LN", "Diagnostic imaging report")


class ReportError(Exception):
    """A report file that cannot go on the disc; the message is for the operator."""


# --------------------------------------------------------------------------------------------
# PDF


_PAGE_WIDTH, _PAGE_HEIGHT, _MARGIN = 595, 842, 56
_BODY_SIZE, _LEADING, _TITLE_SIZE = 10, 13, 14
_COLUMNS = 95  # characters of 10 pt Helvetica that fit between the margins, on average text


def _pdf_string(text: str) -> bytes:
    data = text.encode("cp1252", "replace")
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _wrap(lines: Iterable[str]) -> list[str]:
    wrapped: list[str] = []
    for line in lines:
        line = line.replace("\t", "    ").rstrip()
        indent = len(line) - len(line.lstrip(" "))
        wrapped += textwrap.wrap(line, _COLUMNS, subsequent_indent=" " * indent, break_long_words=True,
                                 drop_whitespace=True) or [""]
    return wrapped


def _page_stream(title: str, lines: list[str], page: int, pages: int) -> bytes:
    top = _PAGE_HEIGHT - _MARGIN
    parts = [b"BT", f"/F2 {_TITLE_SIZE} Tf {_MARGIN} {top} Td".encode(), _pdf_string(title) + b" Tj",
             f"/F1 {_BODY_SIZE} Tf {_LEADING} TL 0 -{_LEADING * 2} Td".encode()]
    for line in lines:
        parts.append(_pdf_string(line) + b" Tj T*")
    parts += [b"ET", b"BT", f"/F1 8 Tf {_MARGIN} {_MARGIN // 2} Td".encode(),
              _pdf_string(f"page {page} of {pages}") + b" Tj", b"ET"]
    return b"\n".join(parts)


def render_pdf(title: str, lines: Iterable[str], *, created: datetime.datetime | None = None) -> bytes:
    """A valid PDF 1.4 of ``title`` and the text ``lines`` (wrapped, paginated on A4)."""
    body = _wrap(lines)
    per_page = (_PAGE_HEIGHT - 2 * _MARGIN) // _LEADING - 3
    chunks = [body[i:i + per_page] for i in range(0, len(body), per_page)] or [[]]
    stamp = (created or datetime.datetime.now().astimezone()).strftime("D:%Y%m%d%H%M%S")
    objects: list[bytes] = [b"", b""]  # 1: catalog, 2: pages (filled in below)
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
    objects.append(b"<< /Title " + _pdf_string(title) + b" /Producer (discflow) /CreationDate ("
                   + stamp.encode() + b") >>")
    kids = []
    for number, chunk in enumerate(chunks, start=1):
        stream = _page_stream(title, chunk, number, len(chunks))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {_PAGE_WIDTH} {_PAGE_HEIGHT}] "
                       f"/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> /Contents {content} 0 R >>".encode())
        kids.append(len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = (f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>").encode()
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 5 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# SR content as text


def _meaning(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> str:
    codes = item.get(keyword) or []
    return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""


def _item_value(item: Dataset) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item, "ConceptCodeSequence")
    if kind == "NUM":
        measured = (item.get("MeasuredValueSequence") or [Dataset()])[0]
        units = _meaning(measured, "MeasurementUnitsCodeSequence")
        return f"{measured.get('NumericValue', '')} {units}".strip()
    if kind == "PNAME":
        return str(item.get("PersonName", ""))
    if kind in ("DATE", "TIME", "DATETIME", "UIDREF"):
        keyword = {"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime", "UIDREF": "UID"}[kind]
        return str(item.get(keyword, ""))
    return ""


def _content_lines(items: Iterable[Dataset], depth: int) -> list[str]:
    lines: list[str] = []
    for item in items:
        name, value = _meaning(item), _item_value(item)
        indent = "  " * depth
        if str(item.get("ValueType", "")) == "CONTAINER":
            if name:
                lines += ["", f"{indent}{name.upper()}"]
        elif value:
            text_lines = value.splitlines() or [""]
            lines.append(f"{indent}{name + ': ' if name else ''}{text_lines[0]}")
            lines += [f"{indent}  {extra}" for extra in text_lines[1:]]
        lines += _content_lines(item.get("ContentSequence") or [], depth + 1)
    return lines


def sr_text(dataset: Dataset) -> tuple[str, list[str]]:
    """A structured report as (title, lines of text): header facts, then the content tree."""
    title = _meaning(dataset) or "Report"
    lines = [f"Patient: {dataset.get('PatientName', '')}   ID: {dataset.get('PatientID', '')}",
             f"Study date: {dataset.get('StudyDate', '')}   Accession: {dataset.get('AccessionNumber', '')}",
             f"Report date: {dataset.get('ContentDate', '')} {dataset.get('ContentTime', '')}".rstrip(),
             f"Status: {dataset.get('CompletionFlag', '')} / {dataset.get('VerificationFlag', '')}"]
    for observer in dataset.get("VerifyingObserverSequence") or []:
        lines.append(f"Verified by: {observer.get('VerifyingObserverName', '')} "
                     f"({observer.get('VerificationDateTime', '')})")
    lines += _content_lines(dataset.get("ContentSequence") or [], 0)
    return title, lines


# --------------------------------------------------------------------------------------------
# The Encapsulated PDF instance


@dataclass
class ReportSource:
    """What a new report instance is made from."""
    pdf: bytes
    title: str
    text: list[str] | None
    """The report as text lines when known (rendered from text or SR), for the web content."""
    content_date: str
    content_time: str
    derived_from: tuple[str, str] | None = None
    """(SOP Class UID, SOP Instance UID) of the SR it was rendered from."""
    conversion_type: str = "WSD"


_PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
          "StudyDescription")


def encapsulated_pdf(source: ReportSource, patient: Dataset, study: Dataset, *, series_uid: str, series_number: int,
                     instance_number: int, sop_instance_uid: str, institution: str) -> Dataset:
    """An Encapsulated PDF instance (PS3.3 A.45.1) of ``source`` in the given patient's study."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, sop_instance_uid
    for keyword in _PATIENT:
        if keyword in patient:
            ds[keyword] = patient[keyword]
    for keyword in _STUDY:
        if keyword in study:
            ds[keyword] = study[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:  # Type 2: present, empty when unknown
            setattr(ds, keyword, "")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "DOC", series_uid, series_number
    ds.SeriesDescription = "Reports"
    ds.Manufacturer, ds.InstitutionName = "discflow", institution[:64]
    ds.ConversionType = source.conversion_type
    ds.InstanceNumber = instance_number
    ds.ContentDate, ds.ContentTime = source.content_date, source.content_time
    ds.AcquisitionDateTime = source.content_date + source.content_time
    ds.BurnedInAnnotation = "YES"  # a report names the patient in its text
    ds.DocumentTitle = source.title[:64]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _LOINC_REPORT
    ds.ConceptNameCodeSequence = [code]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    if source.derived_from:
        reference = Dataset()
        reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.derived_from
        ds.SourceInstanceSequence = [reference]
    pdf = source.pdf + (b"\0" if len(source.pdf) % 2 else b"")  # OB value: even length, NUL padded
    ds.EncapsulatedDocument = pdf
    ds.EncapsulatedDocumentLength = len(source.pdf)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENCAPSULATED_PDF, sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


# --------------------------------------------------------------------------------------------
# In the scan stage


def read_report_file(path: Path) -> ReportSource:
    """``--report FILE``: a PDF as it is, a text file (UTF-8, else Latin-1) rendered to PDF."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ReportError(f"report file {path}: {error.strerror or error}") from error
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(f"report file {path} is larger than {MAX_REPORT_BYTES} bytes")
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if path.suffix.lower() == ".pdf":
        if not data.startswith(b"%PDF-"):
            raise ReportError(f"report file {path} does not start with %PDF-; not a PDF")
        return ReportSource(data, path.stem, None, date, time)
    if path.suffix.lower() != ".txt":
        raise ReportError(f"report file {path}: give a .pdf or a .txt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    lines = text.splitlines()
    title = next((line.strip() for line in lines if line.strip()), "Report")[:64]
    return ReportSource(render_pdf(title, lines), title, lines, date, time)


def _report_from_sr(path: Path) -> ReportSource:
    dataset = pydicom.dcmread(path)
    title, lines = sr_text(dataset)
    created = str(dataset.get("ContentDate", "")), str(dataset.get("ContentTime", ""))
    return ReportSource(render_pdf(title, lines), title, lines, created[0] or datetime.date.today().strftime("%Y%m%d"),
                        created[1].split(".")[0] or "000000", (str(dataset.SOPClassUID), str(dataset.SOPInstanceUID)),
                        conversion_type="SYN")


def _series_number(manifest: Manifest, study: int) -> int:
    numbers = []
    for series in manifest.series:
        if series.parent == study:
            value = series.attributes.get("00200011", {}).get("Value", [None])[0]
            try:
                numbers.append(int(value))
            except (TypeError, ValueError):
                pass
    return max(numbers, default=0) + 1


def add_reports(spool: JobSpool, builder: ManifestBuilder, request: dict[str, Any], institution: str) -> int:
    """Add the job's reports to the manifest as Encapsulated PDF instances; return how many.

    One new series (Modality DOC) per study holds them. Each report's text, when known, is kept in
    the spool for the web content (``manifest.options["report_texts"]``: SOP Instance UID -> path).
    UIDs are derived from what the report is made of, so a scan that runs twice makes the same ones.
    """
    manifest = builder.manifest
    per_study: dict[int, list[tuple[ReportSource, str]]] = {}
    if request.get("report"):
        given = read_report_file(Path(request["report"]))
        digest = hashlib.sha256(given.pdf).hexdigest()
        for study in range(len(manifest.studies)):
            per_study.setdefault(study, []).append((given, digest))
    for instance in list(manifest.instances):
        if instance.sop_class_uid in REPORT_SR_CLASSES and not request.get("no_sr_reports"):
            try:
                rendered = _report_from_sr(Path(instance.source))
            except Exception as error:  # noqa: BLE001 - a broken SR must not stop the export
                builder.skip(instance.source, f"SR not rendered to PDF: {type(error).__name__}: {error}")
                continue
            per_study.setdefault(instance.study, []).append((rendered, instance.sop_instance_uid))
    added = 0
    for study, reports in per_study.items():
        added += _add_study_reports(spool, builder, study, reports, institution)
    return added


def _add_study_reports(spool: JobSpool, builder: ManifestBuilder, study: int,
                       reports: list[tuple[ReportSource, str]], institution: str) -> int:
    manifest = builder.manifest
    study_level = manifest.studies[study]
    patient = dataset_from_json(manifest.patients[study_level.parent].attributes)
    study_dataset = dataset_from_json(study_level.attributes)
    series_uid = generate_uid(entropy_srcs=["discflow-report-series", study_level.key])
    series_number = _series_number(manifest, study)
    texts = manifest.options.setdefault("report_texts", {})
    for number, (source, key) in enumerate(reports, start=1):
        sop_uid = generate_uid(entropy_srcs=["discflow-report", study_level.key, key])
        dataset = encapsulated_pdf(source, patient, study_dataset, series_uid=series_uid, series_number=series_number,
                                   instance_number=number, sop_instance_uid=sop_uid, institution=institution)
        path = spool.path / "reports" / f"{study:06d}-{number:03d}.dcm"
        with atomic_writer(path) as handle:
            dataset.save_as(handle, enforce_file_format=True)
        instance = builder.add(path, path.stat().st_size, dataset, ExplicitVRLittleEndian)
        instance.action = "copy"
        if source.text is not None:
            text_path = path.with_suffix(".json")
            write_json(text_path, {"title": source.title, "lines": source.text})
            texts[sop_uid] = str(text_path)
    return len(reports)
