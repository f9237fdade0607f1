"""README.TXT and INDEX.HTM of a volume: what is on the disc, who made it, how to view it.

Every text shown comes from DICOM headers of outside studies, i.e. untrusted: it is stripped of
control characters (no line or escape-sequence injection into README.TXT) and HTML-escaped in
INDEX.HTM, which is static HTML with no script and a Content-Security-Policy forbidding any.
"""
from __future__ import annotations

import datetime
import html
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from pydicom import Dataset
from pydicom.valuerep import PersonName

from tasks.dicomdir import DirectoryEntry, group_entries

__all__ = ["DiscSummary", "PatientSummary", "ReportSummary", "SeriesSummary", "StudySummary", "attach_web_content",
           "index_html", "readme_text", "summarize"]


@dataclass
class SeriesSummary:
    number: int | None
    modality: str
    description: str
    instances: int
    uid: str = ""
    thumbnail: str | None = None
    """Media path of the series' thumbnail (IHE_PDI/T0000001.PNG), if one was made."""


@dataclass
class ReportSummary:
    title: str
    pdf: str
    """Media path of the report's PDF copy in the web content."""
    text: str | None = None
    """Media path of its plain-HTML copy, when the text is known."""


@dataclass
class StudySummary:
    date: str
    """ISO 8601 (YYYY-MM-DD) when the header date is valid, else as found, '' when absent."""
    description: str
    accession: str
    modalities: list[str]
    series: list[SeriesSummary] = field(default_factory=list)
    uid: str = ""
    reports: list[ReportSummary] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass
class PatientSummary:
    name: str
    """For display: ``FAMILY, Given Middle`` from the alphabetic (else first non-empty) group."""
    id: str
    birth_date: str
    studies: list[StudySummary] = field(default_factory=list)


@dataclass
class DiscSummary:
    volume_no: int
    volume_count: int
    institution: str
    created: datetime.datetime
    patients: list[PatientSummary] = field(default_factory=list)
    web_content: str | None = None
    """Media path of the IHE PDI web content entry page (e.g. ``IHE_PDI/INDEX.HTM``), if any."""
    viewer: str | None = None
    """Media path of a viewer bundled on the disc (e.g. ``VIEWER/VIEWER.EXE``), if any."""

    @property
    def instances(self) -> int:
        return sum(study.instances for patient in self.patients for study in patient.studies)


# --------------------------------------------------------------------------------------------
# From directory entries

def _clean(value: object) -> str:
    """A header value as one line of text: control characters become spaces, runs collapse."""
    text = "" if value is None else str(value)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def _date(value: object) -> str:
    text = _clean(value)
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return text


def display_name(value: object) -> str:
    """A DICOM Person Name for people: ``DOE^JOHN^Q`` -> ``DOE, JOHN Q``."""
    if value is None:
        return ""
    raw = str(value)
    groups = raw.split("=")
    group = next((g for g in groups if g.replace("^", "").strip()), "")
    parts = [p.strip() for p in (group.split("^") + [""] * 5)[:5]]
    family, given, middle, prefix, suffix = parts
    first = " ".join(p for p in (prefix, given, middle) if p)
    text = ", ".join(p for p in (family, first) if p)
    if suffix:
        text = f"{text}, {suffix}" if text else suffix
    return _clean(text)


def _get(dataset: Dataset, keyword: str) -> object:
    value = dataset.get(keyword)
    if isinstance(value, PersonName):
        return str(value)
    return value


def _number(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def summarize(entries: Sequence[DirectoryEntry], *, volume_no: int, volume_count: int, institution: str,
              created: datetime.datetime | None = None, web_content: str | None = None,
              viewer: str | None = None) -> DiscSummary:
    """What a volume holds, patient > study > series, in the order of the entries
    (the same grouping as the DICOMDIR). ``created`` defaults to now, local time."""
    summary = DiscSummary(
        volume_no=volume_no, volume_count=volume_count, institution=_clean(institution),
        created=created or datetime.datetime.now().astimezone(), web_content=web_content, viewer=viewer)
    for patient in group_entries(entries):
        patient_summary = PatientSummary(
            name=display_name(_get(patient.dataset, "PatientName")),
            id=_clean(_get(patient.dataset, "PatientID")),
            birth_date=_date(_get(patient.dataset, "PatientBirthDate")))
        for study in patient.studies.values():
            series_list = [
                SeriesSummary(number=_number(_get(series.dataset, "SeriesNumber")),
                              modality=_clean(_get(series.dataset, "Modality")),
                              description=_clean(_get(series.dataset, "SeriesDescription")),
                              instances=len(series.entries), uid=series.uid)
                for series in study.series.values()]
            modalities = sorted({s.modality for s in series_list if s.modality})
            patient_summary.studies.append(StudySummary(
                date=_date(_get(study.dataset, "StudyDate")),
                description=_clean(_get(study.dataset, "StudyDescription")),
                accession=_clean(_get(study.dataset, "AccessionNumber")),
                modalities=modalities, series=series_list, uid=study.uid))
        summary.patients.append(patient_summary)
    return summary


def attach_web_content(summary: DiscSummary, thumbnails: dict[str, str],
                       reports: dict[str, list[tuple[str, str, str | None]]]) -> None:
    """Link each series to its thumbnail and each study to its report copies (media paths), by UID."""
    for patient in summary.patients:
        for study in patient.studies:
            study.reports = [ReportSummary(_clean(title), pdf, text) for title, pdf, text in reports.get(study.uid, [])]
            for series in study.series:
                series.thumbnail = thumbnails.get(series.uid)


# --------------------------------------------------------------------------------------------
# README.TXT

def _ascii(text: str) -> str:
    """Plain ASCII for README.TXT: accents dropped (Jörg -> Jorg), other letters as '?'."""
    decomposed = unicodedata.normalize("NFKD", _clean(text))
    return "".join(ch if ch.isascii() else ("" if unicodedata.combining(ch) else "?") for ch in decomposed)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def readme_text(summary: DiscSummary) -> str:
    """README.TXT: ASCII, CRLF line ends, for a person holding the disc."""
    created = summary.created.strftime("%Y-%m-%d %H:%M")
    lines = [
        "DICOM MEDIA - READ ME",
        "=====================",
        "",
        "This disc holds medical images and reports in DICOM format (DICOM PS3.10 files,",
        "a DICOM file-set as described in DICOM PS3.11/PS3.12 and IHE PDI).",
        "",
        f"Created by : {_ascii(summary.institution) or '(institution not configured)'}",
        f"Created on : {created}",
        f"Volume     : {summary.volume_no} of {summary.volume_count}",
    ]
    if summary.volume_count > 1:
        lines += [
            "",
            f"This disc is volume {summary.volume_no} of a set of {summary.volume_count}. Each volume is a",
            "complete DICOM file-set with its own DICOMDIR; studies not listed below are",
            "on the other volumes.",
        ]
    lines += ["", "CONTENTS", "--------"]
    if not summary.patients:
        lines.append("(no studies)")
    for patient in summary.patients:
        lines.append("")
        details = [f"ID {_ascii(patient.id)}" if patient.id else "",
                   f"born {_ascii(patient.birth_date)}" if patient.birth_date else ""]
        lines.append(f"Patient: {_ascii(patient.name) or '(no name)'}"
                     + "".join(f", {d}" for d in details if d))
        for study in patient.studies:
            head = f"  Study {study.date or '(no date)'}"
            if study.modalities:
                head += f"  {'/'.join(_ascii(m) for m in study.modalities)}"
            if study.description:
                head += f"  {_ascii(study.description)}"
            lines.append(head)
            tail = f"accession {_ascii(study.accession)}, " if study.accession else ""
            lines.append(f"    {tail}{len(study.series)} series, {_plural(study.instances, 'file')}")
            for series in study.series:
                number = f"{series.number}" if series.number is not None else "-"
                text = f"      series {number}: {_ascii(series.modality) or '??'}"
                if series.description:
                    text += f" {_ascii(series.description)}"
                lines.append(f"{text} ({_plural(series.instances, 'file')})")
            for report in study.reports:
                lines.append(f"    report: {_ascii(report.title)} ({report.pdf.replace('/', chr(92))})")
    lines += [
        "",
        "HOW TO VIEW",
        "-----------",
        "- With a DICOM viewer: open the DICOMDIR file in the top folder of this disc",
        "  (in most viewers: \"Open DICOMDIR\", \"Import\" or \"Open CD/DVD\").",
        "- In a web browser: open INDEX.HTM for a list of what is on this disc, with a",
        "  picture of each series and the reports (their copies are in the folder IHE_PDI).",
    ]
    if summary.web_content:
        lines.append(f"  Pictures and reports viewable in a browser start at {_ascii(summary.web_content)}.")
    if summary.viewer:
        lines.append(f"- A viewer is included: {_ascii(summary.viewer).replace('/', chr(92))} (double-click it;")
        lines.append("  Windows may also offer to start it when the disc is inserted).")
    lines += [
        "- The DICOM files are in the folder DICOM; they have no file name extension.",
        "",
        "This disc contains confidential patient information. Keep it safe, and give it",
        "only to people who are entitled to see it.",
        "",
    ]
    return "\r\n".join(lines)


# --------------------------------------------------------------------------------------------
# INDEX.HTM

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:60em}"
          "table{border-collapse:collapse;margin:.5em 0 1.5em}"
          "th,td{border:1px solid #999;padding:.2em .6em;text-align:left;vertical-align:top}"
          "th{background:#eee}td.n{text-align:right}td.t{width:260px;text-align:center}"
          "img{max-width:256px;background:#000}")


def _e(value: object) -> str:
    return html.escape(_clean(value), quote=True)


def _href(path: str) -> str:
    """A relative link to a media path: each component percent-encoded, then attribute-escaped."""
    return html.escape("/".join(quote(part) for part in path.split("/")), quote=True)


def _picture(series: SeriesSummary) -> str:
    if not series.thumbnail:
        return "(no picture)"
    label = _e(f"series {series.number if series.number is not None else '-'} {series.modality} {series.description}")
    return f'<img src="{_href(series.thumbnail)}" alt="{label}">'


def _report_list(study: StudySummary) -> list[str]:
    if not study.reports:
        return []
    items = []
    for report in study.reports:
        text = f' (<a href="{_href(report.text)}">as text</a>)' if report.text else ""
        items.append(f'<li>Report: <a href="{_href(report.pdf)}">{_e(report.title) or "report"}</a> (PDF){text}</li>')
    return ["<ul>", *items, "</ul>"]


def index_html(summary: DiscSummary) -> str:
    """INDEX.HTM: static HTML listing patients, studies and series; every header value escaped."""
    title = f"DICOM media, volume {summary.volume_no} of {summary.volume_count}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src 'self' file:\">",
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>Created by {_e(summary.institution) or '(institution not configured)'} on "
        f"{_e(summary.created.strftime('%Y-%m-%d %H:%M'))}. "
        f"{_e(_plural(summary.instances, 'file'))} in DICOM format.</p>",
        "<ul>",
        '<li>To view the images, open the file <code>DICOMDIR</code> on this disc with a DICOM viewer.</li>',
        f'<li><a href="{_href("README.TXT")}">README.TXT</a>: what is on this disc and how to view it.</li>',
    ]
    if summary.web_content:
        out.append(f'<li><a href="{_href(summary.web_content)}">Pictures and reports</a> '
                   "viewable in this browser.</li>")
    if summary.viewer:
        out.append(f"<li>A viewer is included: <code>{_e(summary.viewer)}</code>.</li>")
    out.append("</ul>")
    if summary.volume_count > 1:
        out.append(f"<p>This is volume {summary.volume_no} of {summary.volume_count}; each volume is a "
                   "complete DICOM file-set. Studies not listed here are on the other volumes.</p>")
    for p_index, patient in enumerate(summary.patients, start=1):
        out.append(f'<h2 id="p{p_index}">Patient: {_e(patient.name) or "(no name)"}</h2>')
        out.append(f"<p>Patient ID: {_e(patient.id) or '-'}; birth date: {_e(patient.birth_date) or '-'}</p>")
        out += [
            "<table>",
            "<caption>Studies</caption>",
            "<thead><tr><th>Date</th><th>Description</th><th>Accession</th><th>Modalities</th>"
            "<th>Series</th><th>Files</th></tr></thead>",
            "<tbody>",
        ]
        for s_index, study in enumerate(patient.studies, start=1):
            out.append(
                f'<tr><td><a href="#p{p_index}s{s_index}">{_e(study.date) or "-"}</a></td>'
                f"<td>{_e(study.description)}</td><td>{_e(study.accession)}</td>"
                f"<td>{_e(', '.join(study.modalities))}</td>"
                f'<td class="n">{len(study.series)}</td><td class="n">{study.instances}</td></tr>')
        out += ["</tbody>", "</table>"]
        for s_index, study in enumerate(patient.studies, start=1):
            heading = " - ".join(x for x in (_e(study.date), _e(study.description)) if x) or "(no date)"
            out += [
                f'<h3 id="p{p_index}s{s_index}">Study {heading}</h3>',
                "<table>",
                "<thead><tr><th>Series</th><th>Modality</th><th>Description</th><th>Files</th>"
                "<th>Picture</th></tr></thead>",
                "<tbody>",
            ]
            for series in study.series:
                number = "-" if series.number is None else str(series.number)
                out.append(f'<tr><td class="n">{number}</td><td>{_e(series.modality)}</td>'
                           f'<td>{_e(series.description)}</td><td class="n">{series.instances}</td>'
                           f'<td class="t">{_picture(series)}</td></tr>')
            out += ["</tbody>", "</table>"]
            out += _report_list(study)
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
