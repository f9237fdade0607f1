"""IHE PDI web content of a volume: one thumbnail per series, readable copies of the reports.

Everything lands in ``IHE_PDI/`` under ISO 9660 Level 1 names (8.3, upper case), so the links in
INDEX.HTM work on a reader that sees only the ISO 9660 tree: ``T0000001.PNG`` (series thumbnails,
numbered in volume order), ``R0000001.PDF`` (a report as PDF) and ``R0000001.HTM`` (the same
report as plain HTML text, when its text is known: for a browser without a PDF viewer).

Thumbnails cost one decode per series: the middle image of the series (by Instance Number, as a
reader scrolling to the middle would see it), its middle frame, block-averaged down to at most
:data:`THUMBNAIL_PIXELS` on the long side before any arithmetic. Grey levels follow the display
pipeline of PS3.3 C.11: Modality LUT (rescale slope/intercept or LUT), then the first VOI window
(or VOI LUT), else a robust 1st-99th percentile window; MONOCHROME1 is inverted; colour images keep
their colours (palette colour through its LUT). A series that cannot be decoded gets no thumbnail
(a note in the log, never a failed volume).
"""
from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom import Dataset

from tasks.dicomdir import DirectoryEntry, group_entries
from tasks.report_document import ENCAPSULATED_PDF
from tasks.spool import read_json
from tasks.transfer_syntax import JPEG_LOSSLESS, JPEG_LOSSLESS_SV1, decode_lossless_jpeg

LOSSLESS_JPEG = (JPEG_LOSSLESS, JPEG_LOSSLESS_SV1)
log = logging.getLogger(__name__)

__all__ = ["THUMBNAIL_PIXELS", "ReportLink", "WebContent", "build_web_content", "thumbnail_png", "window_to_8bit"]

FOLDER = "IHE_PDI"
THUMBNAIL_PIXELS = 256


@dataclass
class ReportLink:
    title: str
    pdf: str
    """Media path of the PDF copy."""
    text: str | None = None
    """Media path of the plain-HTML copy, when the report's text is known."""


@dataclass
class WebContent:
    files: list[tuple[str, bytes]] = field(default_factory=list)
    """(media path, content) of every file under IHE_PDI/."""
    thumbnails: dict[str, str] = field(default_factory=dict)
    """Series Instance UID -> media path of its thumbnail."""
    reports: dict[str, list[ReportLink]] = field(default_factory=dict)
    """Study Instance UID -> its reports on this volume."""


# --------------------------------------------------------------------------------------------
# Pixels to an 8-bit picture


def _downsample(frame: np.ndarray, limit: int) -> np.ndarray:
    """Block mean by an integer factor so the long side is at most ``limit`` (anti-aliased, cheap)."""
    factor = max(1, math.ceil(max(frame.shape[:2]) / limit))
    if factor == 1:
        return frame.astype(np.float64)
    rows, columns = (frame.shape[0] // factor) * factor, (frame.shape[1] // factor) * factor
    cropped = frame[:rows, :columns].astype(np.float64)
    shape = (rows // factor, factor, columns // factor, factor) + cropped.shape[2:]
    return cropped.reshape(shape).mean(axis=(1, 3))


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _linear_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: the VOI window to 0..1."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5, 0.0, 1.0)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, (1.0, 99.0))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _frame_attribute(ds: Dataset, keyword: str, macro: str) -> object:
    """An attribute from the dataset, else from the shared functional groups (enhanced multi-frame)."""
    if keyword in ds:
        return ds.get(keyword)
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for item in shared[:1]:
        for group in item.get(macro) or []:
            if keyword in group:
                return group.get(keyword)
    return None


def window_to_8bit(ds: Dataset, frame: np.ndarray, limit: int = THUMBNAIL_PIXELS) -> np.ndarray:
    """One frame as display-ready uint8 (greyscale 2-D or RGB 3-D), at most ``limit`` pixels long."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        frame = apply_color_lut(frame, ds)
        photometric = "RGB"
    if frame.ndim == 3:  # colour: stored values scaled to 8 bits, no windowing (PS3.3 C.11 is greyscale)
        small = _downsample(frame, limit)
        top = 255.0 if frame.dtype == np.uint8 else float(2 ** int(ds.get("BitsStored", 16) or 16) - 1)
        return np.clip(np.rint(small / top * 255.0), 0, 255).astype(np.uint8)
    if "ModalityLUTSequence" in ds:  # a non-linear LUT indexes stored values: apply before averaging
        from pydicom.pixels import apply_modality_lut
        values = _downsample(apply_modality_lut(frame, ds), limit)
    else:
        slope = _first(_frame_attribute(ds, "RescaleSlope", "PixelValueTransformationSequence")) or 1.0
        intercept = _first(_frame_attribute(ds, "RescaleIntercept", "PixelValueTransformationSequence")) or 0.0
        values = _downsample(frame, limit) * slope + intercept
    center = _first(_frame_attribute(ds, "WindowCenter", "FrameVOILUTSequence"))
    width = _first(_frame_attribute(ds, "WindowWidth", "FrameVOILUTSequence"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        scaled = _linear_window(values, center, width, function)
    elif "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut
        scaled = _percentile_window(apply_voi_lut(np.rint(values).astype(np.int64), ds).astype(np.float64))
    else:
        scaled = _percentile_window(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255.0).astype(np.uint8)


def thumbnail_png(path: Path, limit: int = THUMBNAIL_PIXELS) -> bytes:
    """A PNG thumbnail of the DICOM image at ``path``: its middle frame, windowed (see module doc)."""
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    fast = decode_lossless_jpeg(ds, frames) if ds.file_meta.get("TransferSyntaxUID") in LOSSLESS_JPEG else None
    if fast is not None:  # 5x faster than pydicom's plugins, the same values
        pixels = fast[frames // 2, ..., 0]
    else:
        pixels = ds.pixel_array  # the one decode; YBR is converted to RGB by pydicom
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        if frames > 1 and pixels.ndim == (4 if samples > 1 else 3):
            pixels = pixels[frames // 2]
    return imagecodecs.png_encode(window_to_8bit(ds, pixels, limit))


# --------------------------------------------------------------------------------------------
# The web content of one volume


WEB_INSTANCE_KEYWORDS = frozenset({"Rows", "DocumentTitle"})
"""The attributes of :attr:`DirectoryEntry.instance` read here (see dicomdir.RECORD_INSTANCE_KEYWORDS)."""


def _is_image(entry: DirectoryEntry) -> bool:
    return "Rows" in entry.instance  # the header subset has Rows only for instances with pixels


def _report_html(title: str, lines: Sequence[str]) -> bytes:
    body = html.escape("\n".join(lines))
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
            f"<title>{html.escape(title)}</title>\n<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}"
            "pre{white-space:pre-wrap;font-family:inherit}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<pre>{body}</pre>\n<p><a href=\"../INDEX.HTM\">Back to the disc "
            "contents</a></p>\n</body>\n</html>\n")
    return page.encode("utf-8")


def _pdf_of(path: Path) -> bytes | None:
    """The PDF inside an Encapsulated PDF instance (small: read whole), trailing NUL padding removed."""
    ds = pydicom.dcmread(path)
    data = bytes(ds.get("EncapsulatedDocument") or b"")
    length = ds.get("EncapsulatedDocumentLength")
    if length and int(length) <= len(data):
        data = data[:int(length)]
    elif data.endswith(b"\0"):
        data = data[:-1]
    return data if data.startswith(b"%PDF-") else None


def build_web_content(pairs: Sequence[tuple[DirectoryEntry, str]], report_texts: dict[str, str]) -> WebContent:
    """Thumbnails and report copies for the entries of one volume (``pairs``: entry, file on disk).

    ``report_texts`` maps the SOP Instance UID of a report made by discflow to a spool JSON file
    with its title and text lines (``tasks.report_document``)."""
    content = WebContent()
    files = {entry.sop_instance_uid: path for entry, path in pairs}
    series_no = report_no = 0
    for patient in group_entries([entry for entry, _ in pairs]):
        for study in patient.studies.values():
            for series in study.series.values():
                images = [entry for entry in series.entries if _is_image(entry)]
                if images:
                    series_no += 1
                    _add_thumbnail(content, series.uid, images[len(images) // 2], files, series_no)
                for entry in series.entries:
                    if entry.sop_class_uid == ENCAPSULATED_PDF:
                        report_no += 1
                        _add_report(content, study.uid, entry, files, report_texts, report_no)
    return content


def _add_thumbnail(content: WebContent, series_uid: str, entry: DirectoryEntry, files: dict[str, str],
                   number: int) -> None:
    media_path = f"{FOLDER}/T{number:07d}.PNG"
    try:
        content.files.append((media_path, thumbnail_png(Path(files[entry.sop_instance_uid]))))
    except Exception as error:  # noqa: BLE001 - a codec we lack must not cost the disc
        log.warning("no thumbnail for %s: %s: %s", "/".join(entry.file_id), type(error).__name__, error)
        return
    content.thumbnails[series_uid] = media_path


def _add_report(content: WebContent, study_uid: str, entry: DirectoryEntry, files: dict[str, str],
                report_texts: dict[str, str], number: int) -> None:
    where = "/".join(entry.file_id)
    try:
        pdf = _pdf_of(Path(files[entry.sop_instance_uid]))
    except Exception as error:  # noqa: BLE001 - an unreadable report file: listed in DICOM only
        log.warning("report %s not copied to the web content: %s", where, type(error).__name__)
        return
    if pdf is None:
        log.warning("report %s holds no PDF; not copied to the web content", where)
        return
    title = str(entry.instance.get("DocumentTitle", "") or "").strip() or f"Report {number}"
    link = ReportLink(title=title, pdf=f"{FOLDER}/R{number:07d}.PDF")
    content.files.append((link.pdf, pdf))
    text_file = report_texts.get(entry.sop_instance_uid)
    if text_file and Path(text_file).is_file():
        text = read_json(Path(text_file))
        link.text = f"{FOLDER}/R{number:07d}.HTM"
        content.files.append((link.text, _report_html(text["title"], text["lines"])))
    content.reports.setdefault(study_uid, []).append(link)
