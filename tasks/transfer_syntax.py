"""Convert one DICOM Part 10 file to another transfer syntax.

A pure module (no Celery, no spool): the transcode stage calls :func:`convert_file`
per instance, the import path calls it only when asked or when the PACS refuses the
original syntax, and :func:`rewrite_part10` mends bare datasets and broken file meta.

How a conversion runs
---------------------
* The source file is read once, fully, into memory and parsed once.
* Pixel data is decoded at most once, and only when the pixels must change form:
  Implicit VR LE / Deflated / Explicit VR LE sources going to Explicit VR LE, and
  any source whose syntax already equals the target, are re-encoded without touching
  the pixels.  Explicit VR Big Endian sources are decoded (pixels byte-swapped), and
  their other OW/OF/OL/OD/OV values are byte-swapped too.
* The destination is written as Part 10 (zero preamble, fresh file meta with the
  written Transfer Syntax UID, Media Storage SOP Class/Instance UID and discflow's
  Implementation Class UID) to ``.<name>.part`` next to it, then renamed with
  :func:`os.replace`, so a task that runs twice never leaves a half-written file.

Decoders
--------
JPEG lossless (.4.57, .4.70) single-sample frames are decoded with libjpeg-turbo
(``imagecodecs.jpeg8_decode``, ~5x faster than the pydicom plugins on a CT slice),
then given exactly pydicom's treatment of unused high bits (mask, or sign-extend when
Pixel Representation is 1).  Everything else, and anything the fast path declines,
goes through pydicom 3's decoders: the plugin in :data:`DECODING_PLUGINS` first
(pylibjpeg for JPEG and RLE, GDCM for JPEG-LS and J2K, the faster of the two here),
then every available plugin in pydicom's order (GDCM as the fallback for pylibjpeg).

Encoders
--------
==================  ===============================================================
uncompressed        the decoded array's little-endian bytes (bit-packed again for
                    Bits Allocated 1)
jpeg-lossless .4.70 libjpeg-turbo 3 via ``imagecodecs.jpeg8_encode(lossless=True,
                    predictor=1)``: a SOF3 stream, selection value 1, point transform
                    0, precision = Bits Stored (2..16; at least 9 in 16 allocated bits).
                    (``ljpeg_encode`` writes predictor 6, i.e. .4.57, and pylibjpeg
                    cannot encode JPEG.)  Checked bit-exact with pydicom and dcmdjpeg.
                    YBR_FULL is coded as colour space UNKNOWN: libjpeg-turbo's YCbCr
                    lossless streams use two Huffman tables yet GDCM, libjpeg and DCMTK
                    fail on them ("bad Huffman code").
jpeg-extended .4.51 libjpeg-turbo 3 via ``imagecodecs.jpeg8_encode``, IJG quality
                    ``lossy_quality``, 8-bit (SOF0) or 12-bit (SOF1) precision; colour
                    as JPEG Baseline .4.50 (see Colour).
j2k-lossless .4.90  OpenJPEG 2.5 via ``imagecodecs.jpeg2k_encode(reversible=True)``:
                    5/3 wavelet, one layer, J2K codestream.  Same OpenJPEG and the same
                    bytes as pylibjpeg-openjpeg (pydicom's J2K encoder), but it lets the
                    number of resolutions follow the image size: pylibjpeg's fixed 6
                    fails on images smaller than 32 pixels a side.
j2k-lossy .4.91     the same, irreversible 9/7 wavelet, one quality layer at a PSNR
                    derived from ``lossy_quality`` (see :func:`_j2k_psnr`).
==================  ===============================================================

Signed pixel data and JPEG
--------------------------
JPEG codes unsigned samples.  Lossless JPEG of signed data stores the two's complement
bit pattern of Bits Stored bits (as DCMTK and GDCM do); decoders sign-extend from Bits
Stored.  Lossy JPEG of such a pattern would smear -1 into the maximum, so jpeg-extended
instead adds 2^(BitsStored-1) to every sample, writes Pixel Representation 0 and lowers
Rescale Intercept (top level or Pixel Value Transformation functional groups) by
slope x 2^(BitsStored-1), so modality values, windows and VOI LUTs are unchanged;
padding and smallest/largest pixel values move with the samples.  Signed data with no
rescale to absorb the offset (or with a Modality LUT Sequence) is refused.

Colour
------
Samples are kept in the colour space they are stored in; pydicom is asked for the raw
decoded samples (``raw=True``, no YCbCr to RGB conversion, which would round).

* YBR_FULL_422 (native, or JPEG whose decoder up-samples chroma) becomes YBR_FULL:
  the written pixels are full-resolution YCbCr.
* YBR_RCT / YBR_ICT (J2K) become RGB: OpenJPEG/GDCM undo the component transform;
  RCT is reversible, so that is exact.
* Encapsulated colour output always has Planar Configuration 0.  JPEG lossless writes
  RGB or YBR_FULL unchanged (no colour transform); j2k-lossless encodes RGB with the
  reversible colour transform and writes YBR_RCT; j2k-lossy encodes RGB with the
  irreversible one and writes YBR_ICT; YBR_FULL is coded as is in both.
* PS3.5 Table 8.2.1-1 allows colour only in JPEG Baseline, so jpeg-extended writes
  8-bit colour as JPEG Baseline (.4.50), YBR_FULL_422 with 4:2:2 chroma sub-sampling;
  the result's ``transfer_syntax`` says so.  A .4.50 source is already what
  jpeg-extended asks for and is rewritten, not re-compressed (no generation loss).

Lossless comparisons therefore compare in the stored colour space with
YBR_FULL_422 == YBR_FULL and YBR_RCT/YBR_ICT == RGB.

Instances without pixels, and other special cases
-------------------------------------------------
* No Pixel Data (SR, encapsulated PDF, KOS, waveforms ...): a compressed target does
  not fail; the instance is written Explicit VR Little Endian and the result reports
  that syntax (a disc holds such instances in Explicit VR LE under every media
  profile).
* Float / Double Float Pixel Data: written uncompressed; a compressed target raises.
* Lossy output sets Lossy Image Compression "01", appends to Lossy Image Compression
  Ratio and Method ("ISO_10918_1" JPEG, "ISO_15444_1" J2K) and gets a new SOP
  Instance UID (also in the file meta) from ``generate_uid`` seeded with the source UID,
  syntax and quality, so a task that runs twice writes the same UID.  Any output of an
  already lossy source keeps (or sets) Lossy Image Compression "01" and records the
  source's method when the file did not.
* A DICOMDIR is refused (it is rebuilt by the media stage; rewriting would break its
  record offsets).
* Pixel values that do not fit Bits Stored (a J2K stream whose precision exceeds it)
  raise Bits Stored/High Bit just enough to keep the conversion bit-exact.
* Native pixel data shorter than Rows x Columns x frames needs is refused.
* Overlays embedded in unused high bits of Pixel Data (retired) are not carried into
  compressed output: decoders mask those bits, as PS3.5 8.1.1 requires.
"""
from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_fragments, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import UID, generate_uid

import imagecodecs

from tasks.part10 import META_PROBE, read_file_meta

# --------------------------------------------------------------------------- syntaxes

IMPLICIT_VR_LITTLE_ENDIAN = UID("1.2.840.10008.1.2")
EXPLICIT_VR_LITTLE_ENDIAN = UID("1.2.840.10008.1.2.1")
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = UID("1.2.840.10008.1.2.1.99")
EXPLICIT_VR_BIG_ENDIAN = UID("1.2.840.10008.1.2.2")
RLE_LOSSLESS = UID("1.2.840.10008.1.2.5")
JPEG_BASELINE = UID("1.2.840.10008.1.2.4.50")
JPEG_EXTENDED = UID("1.2.840.10008.1.2.4.51")
JPEG_LOSSLESS = UID("1.2.840.10008.1.2.4.57")
JPEG_LOSSLESS_SV1 = UID("1.2.840.10008.1.2.4.70")
JPEG_LS_LOSSLESS = UID("1.2.840.10008.1.2.4.80")
JPEG_LS_NEAR_LOSSLESS = UID("1.2.840.10008.1.2.4.81")
J2K_LOSSLESS = UID("1.2.840.10008.1.2.4.90")
J2K = UID("1.2.840.10008.1.2.4.91")
J2K_PART2_LOSSLESS = UID("1.2.840.10008.1.2.4.92")
J2K_PART2 = UID("1.2.840.10008.1.2.4.93")
HTJ2K_LOSSLESS = UID("1.2.840.10008.1.2.4.201")
HTJ2K_LOSSLESS_RPCL = UID("1.2.840.10008.1.2.4.202")
HTJ2K = UID("1.2.840.10008.1.2.4.203")

POLICIES: dict[str, str | None] = {
    "keep": None,
    "uncompressed": str(EXPLICIT_VR_LITTLE_ENDIAN),
    "jpeg-lossless": str(JPEG_LOSSLESS_SV1),
    "jpeg-extended": str(JPEG_EXTENDED),
    "j2k-lossless": str(J2K_LOSSLESS),
    "j2k-lossy": str(J2K),
}
"""Transfer-syntax policy name -> target Transfer Syntax UID (``keep`` -> None)."""

LOSSLESS_SYNTAXES: frozenset[str] = frozenset({
    str(IMPLICIT_VR_LITTLE_ENDIAN),
    str(EXPLICIT_VR_LITTLE_ENDIAN),
    str(DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN),
    str(EXPLICIT_VR_BIG_ENDIAN),
    "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    str(RLE_LOSSLESS),
    str(JPEG_LOSSLESS),
    str(JPEG_LOSSLESS_SV1),
    str(JPEG_LS_LOSSLESS),
    str(J2K_LOSSLESS),
    str(J2K_PART2_LOSSLESS),
    str(HTJ2K_LOSSLESS),
    str(HTJ2K_LOSSLESS_RPCL),
})
"""Transfer syntaxes that cannot lose information (uncompressed ones included)."""

_NATIVE_SYNTAXES = frozenset({
    IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN,
})
_J2K_SYNTAXES = frozenset({J2K_LOSSLESS, J2K, J2K_PART2_LOSSLESS, J2K_PART2,
                           HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K})
_TARGETS = frozenset({EXPLICIT_VR_LITTLE_ENDIAN, JPEG_LOSSLESS_SV1, JPEG_EXTENDED, J2K_LOSSLESS, J2K})
_POLICY_NAME = {UID(uid): name for name, uid in POLICIES.items() if uid}
_LOSSY_METHOD = {
    JPEG_BASELINE: "ISO_10918_1", JPEG_EXTENDED: "ISO_10918_1",
    JPEG_LS_NEAR_LOSSLESS: "ISO_14495_1",
    J2K: "ISO_15444_1", J2K_PART2: "ISO_15444_1", HTJ2K: "ISO_15444_15",
}
_MEDIA_STORAGE_DIRECTORY = UID("1.2.840.10008.1.3.10")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
# Attributes in the stored-pixel-value domain that move with a jpeg-extended offset.
_PIXEL_VALUE_KEYWORDS = ("SmallestImagePixelValue", "LargestImagePixelValue",
                         "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
                         "PixelPaddingValue", "PixelPaddingRangeLimit")

DECODING_PLUGINS: dict[str, str] = {
    # pydicom plugin tried first per source syntax; on failure every available plugin is
    # tried in pydicom's order (GDCM first).  Measured on this venv: pylibjpeg (libjpeg)
    # decodes JPEG 1.2-2.5x faster than GDCM and alone does 12-bit JPEG; GDCM decodes
    # J2K ~1.4x and JPEG-LS ~3x faster than pylibjpeg (openjpeg / libjpeg).  Lossy JPEG
    # decoders differ by a level or two (IDCT, chroma up-sampling), so "bit-exact" for a
    # lossy JPEG source means: equal to what this plugin decodes.
    **{uid: "pylibjpeg" for uid in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                                    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                                    "1.2.840.10008.1.2.5")},
    **{uid: "gdcm" for uid in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                               "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")},
}

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["discflow", "transfer_syntax", "1"])
"""discflow's Implementation Class UID, stable across runs (derived, under pydicom's root)."""
IMPLEMENTATION_VERSION_NAME = "DISCFLOW_0_1"


class ConversionError(Exception):
    """A conversion that cannot be done; ``str(error)`` is the human reason.

    ``source`` names the file when :func:`convert_file` / :func:`rewrite_part10`
    raised it (the message itself stays short, as the operator sees it per file).
    """

    def __init__(self, reason: str, *, source: Path | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source


@dataclass
class ConversionResult:
    transfer_syntax: str
    """The syntax actually written (Explicit VR LE for non-image instances, see module doc)."""
    sop_instance_uid: str
    """The written SOP Instance UID: new when the conversion was lossy."""
    bytes_in: int
    bytes_out: int
    lossy: bool
    """True when this conversion lost information (not when the source already had)."""


# ------------------------------------------------------------------------- public API

def needs_conversion(source_syntax: str, target_syntax: str | None) -> bool:
    """Whether an instance in ``source_syntax`` must be converted for ``target_syntax``.

    ``None`` (the ``keep`` policy) never converts.  JPEG Baseline (.4.50) already
    satisfies jpeg-extended (.4.51): Process 1 is a subset of Processes 2 & 4, and
    re-compressing would only add loss, so that pair needs no conversion either.
    """
    if target_syntax is None:
        return False
    source, target = UID(source_syntax), UID(target_syntax)
    if source == target:
        return False
    return not (source == JPEG_BASELINE and target == JPEG_EXTENDED)


def rewrite_part10(source: Path, destination: Path) -> ConversionResult:
    """Rewrite ``source`` as a proper Part 10 file in the syntax it is encoded in.

    Never decodes pixels.  Mends a missing preamble/file meta (bare dataset), a
    missing or wrong Transfer Syntax UID (taken from how the dataset is actually
    encoded, or for encapsulated pixel data sniffed from the first fragment's
    codestream), stale Media Storage UIDs and File Meta elements left in the data set.
    """
    source, destination = Path(source), Path(destination)
    try:
        raw, ds, syntax = _read(source)
        return _rewrite(ds, syntax, len(raw), destination)
    except ConversionError as error:
        error.source = source
        raise


def convert_file(source: Path, destination: Path, target_syntax: str, *,
                 lossy_quality: int = 90) -> ConversionResult:
    """Convert the Part 10 (or bare) DICOM file ``source`` to ``target_syntax``.

    ``target_syntax`` is one of the non-None values of :data:`POLICIES`;
    ``lossy_quality`` (1..100) steers jpeg-extended (IJG quality) and j2k-lossy.
    Raises :class:`ConversionError` with the reason when the conversion is impossible.
    """
    source, destination = Path(source), Path(destination)
    try:
        return _convert(source, destination, UID(str(target_syntax)), lossy_quality)
    except ConversionError as error:
        error.source = source
        raise


# ------------------------------------------------------------------------ the stages

def _convert(source: Path, destination: Path, target: UID, quality: int) -> ConversionResult:
    if target not in _TARGETS:
        raise ConversionError(f"discflow cannot write transfer syntax {target} ({target.name})")
    if not 1 <= int(quality) <= 100:
        raise ConversionError(f"lossy quality must be 1..100, not {quality}")

    raw, ds, syntax = _read(source)
    if not needs_conversion(syntax, target):
        return _rewrite(ds, syntax, len(raw), destination)

    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None or keyword != "PixelData":
        if keyword is not None and target != EXPLICIT_VR_LITTLE_ENDIAN:
            raise ConversionError(
                f"{_policy(target)} cannot compress {_spaced(keyword)}: JPEG and JPEG 2000 "
                f"code integer samples only; write it uncompressed")
        # No pixels to compress (SR, PDF, KOS, ...) or float pixels going uncompressed.
        if syntax == EXPLICIT_VR_BIG_ENDIAN:
            _swap_other_words(ds)
        return _write(ds, EXPLICIT_VR_LITTLE_ENDIAN, len(raw), destination, lossy=False)

    if syntax in _NATIVE_SYNTAXES:
        _check_native_length(ds)
        if target == EXPLICIT_VR_LITTLE_ENDIAN and syntax != EXPLICIT_VR_BIG_ENDIAN:
            # Implicit/Deflated/Explicit LE -> Explicit LE: same pixel bytes.
            return _write(ds, EXPLICIT_VR_LITTLE_ENDIAN, len(raw), destination, lossy=False)

    if target == JPEG_EXTENDED:
        _check_jpeg_extended(ds)  # refuse before paying for a decode
    source_method = _source_lossy_method(ds, syntax)  # before the Pixel Data is replaced
    splice = _splice_point(raw, ds, syntax) if target == EXPLICIT_VR_LITTLE_ENDIAN and source_method is None else None
    state = _image_pixel_state(ds)
    frames, pixel = _decode(ds, syntax)
    if syntax == EXPLICIT_VR_BIG_ENDIAN:
        _swap_other_words(ds)
    _fit_bits_stored(ds, frames, syntax)
    if source_method is not None:
        _mark_lossy_source(ds, source_method)

    if target == EXPLICIT_VR_LITTLE_ENDIAN:
        pixels = _native_pixels(ds, frames)
        _set_image_pixel(ds, frames, pixel["photometric_interpretation"])
        if splice is not None and _image_pixel_state(ds) == state:
            return _write_spliced(raw, splice, ds, pixels, destination)
        written, lossy = _set_native(ds, pixels), False
    elif target == JPEG_LOSSLESS_SV1:
        written, lossy = _encode_jpeg_lossless(ds, frames, pixel), False
    elif target == JPEG_EXTENDED:
        written, lossy = _encode_jpeg_extended(ds, frames, pixel, quality), True
    else:
        written, lossy = _encode_j2k(ds, frames, pixel, lossy=target == J2K, quality=quality), target == J2K

    if lossy:
        ds.SOPInstanceUID = _lossy_instance_uid(str(ds.SOPInstanceUID), written, quality)
    return _write(ds, written, len(raw), destination, lossy=lossy)


def _read(source: Path) -> tuple[bytes, Dataset, UID]:
    """Read the whole file once and parse it once; return (bytes, dataset, real syntax)."""
    try:
        raw = source.read_bytes()
    except OSError as error:
        raise ConversionError(f"cannot read {source.name}: {error.strerror or error}") from error
    try:
        ds = dcmread(BytesIO(raw), force=True)
    except MemoryError:
        raise
    except Exception as error:  # untrusted bytes: any parser failure is this file's fault
        raise ConversionError(f"not a readable DICOM dataset: {_first_line(error)}") from error
    if len(ds) == 0:
        raise ConversionError("not a DICOM dataset: no data elements could be read")
    if _is_dicomdir(ds):
        raise ConversionError("a DICOMDIR is a media directory, not an instance: it is rebuilt, not converted")
    return raw, ds, _actual_syntax(ds)


def _actual_syntax(ds: Dataset) -> UID:
    """The syntax the data set is really encoded in, whatever the file meta says."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    claimed = meta.get("TransferSyntaxUID")
    claimed = UID(str(claimed).strip("\0 ")) if claimed else None
    implicit, little = ds.original_encoding
    first = ds.get_item(next(iter(ds.keys())))  # still raw: says how it was really read
    if getattr(first, "is_raw", False) and (first.is_implicit_VR, first.is_little_endian) != (implicit, little):
        # pydicom fell back to the other VR encoding (e.g. an implicit VR data set under
        # a JPEG Transfer Syntax UID); record it, or the writer would copy raw bytes.
        implicit, little = first.is_implicit_VR, first.is_little_endian
        ds.set_original_encoding(implicit, little)
    encoded_as = (IMPLICIT_VR_LITTLE_ENDIAN if implicit else
                  EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN)

    # Reading the element (not just its value) tells whether it had undefined length.
    encapsulated = "PixelData" in ds and ds["PixelData"].is_undefined_length
    if encapsulated:
        if claimed is not None and claimed.is_transfer_syntax and claimed.is_encapsulated:
            return claimed
        return _sniff_encapsulated(ds)
    if claimed == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN and encoded_as == EXPLICIT_VR_LITTLE_ENDIAN:
        return claimed
    return encoded_as


def _sniff_encapsulated(ds: Dataset) -> UID:
    """Transfer syntax of encapsulated pixel data without a usable Transfer Syntax UID."""
    head = _first_fragment_head(ds)
    if not head:
        raise ConversionError("encapsulated Pixel Data has no fragments and the file meta "
                              "names no transfer syntax")
    if head[:2] == b"\xff\xd8":
        return _sniff_jpeg(head)
    if head[:4] == b"\xff\x4f\xff\x51":
        cod = head.find(b"\xff\x52")
        if cod > 0 and cod + 13 < len(head):
            return J2K_LOSSLESS if head[cod + 13] == 1 else J2K
        return J2K
    if head[4:12] == b"jP  \r\n\x87\n":
        return J2K
    if len(head) >= 64:
        segments = int.from_bytes(head[:4], "little")
        if 1 <= segments <= 15 and int.from_bytes(head[4:8], "little") == 64:
            return RLE_LOSSLESS
    raise ConversionError("cannot tell the transfer syntax of the encapsulated Pixel Data: "
                          "the file meta names none and the codestream is not JPEG, "
                          "JPEG-LS, JPEG 2000 or RLE")


def _first_fragment_head(ds: Dataset, size: int = 4096) -> bytes:
    """The start of the first non-empty fragment after the Basic Offset Table item."""
    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments, None)  # the Basic Offset Table item (PS3.5 A.4)
        for fragment in fragments:
            if fragment:
                return bytes(fragment[:size])
    except ValueError:
        pass
    return b""


def _sniff_jpeg(head: bytes) -> UID:
    position, sof = 2, None
    while position + 4 <= len(head):
        if head[position] != 0xFF:
            break
        marker = head[position + 1]
        length = int.from_bytes(head[position + 2:position + 4], "big")
        if marker in (0xC0, 0xC1, 0xC3, 0xF7):
            sof = marker
        if marker == 0xDA:  # start of scan: Ss is the predictor (lossless) / NEAR (JPEG-LS)
            components = head[position + 4] if position + 4 < len(head) else 0
            ss_at = position + 5 + 2 * components
            ss = head[ss_at] if ss_at < len(head) else 0
            if sof == 0xC3:
                return JPEG_LOSSLESS_SV1 if ss == 1 else JPEG_LOSSLESS
            if sof == 0xF7:
                return JPEG_LS_LOSSLESS if ss == 0 else JPEG_LS_NEAR_LOSSLESS
            break
        position += 2 + length
    if sof == 0xC0:
        return JPEG_BASELINE
    if sof == 0xC1:
        return JPEG_EXTENDED
    raise ConversionError("cannot tell which JPEG process encoded the Pixel Data and the "
                          "file meta names no transfer syntax")


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    return meta.get("MediaStorageSOPClassUID") == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds


def _rewrite(ds: Dataset, syntax: UID, bytes_in: int, destination: Path) -> ConversionResult:
    if "PixelData" in ds and syntax in _NATIVE_SYNTAXES:
        _check_native_length(ds)
    return _write(ds, syntax, bytes_in, destination, lossy=False)


# --------------------------------------------------------------------------- decoding

def _decode(ds: Dataset, syntax: UID) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode all frames once: (array shaped frames x rows x columns x samples, properties).

    The properties are pydicom's Image Pixel values describing the array (its
    ``photometric_interpretation`` may differ from the data set's, see module doc).
    """
    _require(ds, "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
    if ds.BitsAllocated > 1:
        _require(ds, "BitsStored", "PixelRepresentation")
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax

    number_of_frames = _number_of_frames(ds)
    array, pixel = None, None
    if syntax in (JPEG_LOSSLESS, JPEG_LOSSLESS_SV1):
        array = decode_lossless_jpeg(ds, number_of_frames)
        if array is not None:
            pixel = {"photometric_interpretation": str(ds.PhotometricInterpretation),
                     "number_of_frames": number_of_frames, "samples_per_pixel": 1,
                     "bits_allocated": ds.BitsAllocated}
    if array is None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as error:
            raise ConversionError(f"no decoder for {syntax.name} ({syntax})") from error
        if not decoder.is_available:
            raise ConversionError(f"the {syntax.name} decoder is not installed")
        preferred = DECODING_PLUGINS.get(syntax, "")
        try:
            try:
                array, pixel = decoder.as_array(
                    ds, raw=True, decoding_plugin=preferred if preferred in decoder.available_plugins else "")
            except BaseException as error:
                if not preferred or not _decoder_failure(error):
                    raise
                array, pixel = decoder.as_array(ds, raw=True)  # every plugin, pydicom's order
        except BaseException as error:  # plugins raise anything from RuntimeError to IndexError
            if not _decoder_failure(error):
                raise
            raise ConversionError(f"cannot decode the {syntax.name} Pixel Data: "
                                  f"{_first_line(error)}") from error
        number_of_frames = int(pixel.get("number_of_frames", number_of_frames))
        samples = int(pixel.get("samples_per_pixel", ds.SamplesPerPixel))
        array = array.reshape(number_of_frames, ds.Rows, ds.Columns, samples)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if pixel.get("photometric_interpretation") == "YBR_FULL_422":
        pixel["photometric_interpretation"] = "YBR_FULL"  # decoders up-sample the chroma
    return array, pixel


def _decoder_failure(error: BaseException) -> bool:
    """Whether ``error`` from a decoding plugin is this file's fault: any Exception, and the
    PanicException of a Rust plugin (pylibjpeg-rle panics on a corrupt RLE segment; pyo3 makes
    that a BaseException, which ``except Exception`` lets through to the worker)."""
    return isinstance(error, Exception) or type(error).__name__ == "PanicException"


def decode_lossless_jpeg(ds: Dataset, number_of_frames: int) -> np.ndarray | None:
    """libjpeg-turbo decode of single-sample lossless JPEG (frames x rows x columns x 1, pydicom's
    values), or None to use pydicom's decoders."""
    if ds.SamplesPerPixel != 1 or ds.BitsAllocated not in (8, 16) or "ExtendedOffsetTable" in ds:
        return None
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    out = np.empty((number_of_frames, ds.Rows, ds.Columns), dtype=dtype)
    try:
        count = 0
        for count, fragment in enumerate(generate_frames(ds.PixelData, number_of_frames=number_of_frames), 1):
            if count > number_of_frames:
                return None
            frame = imagecodecs.jpeg8_decode(fragment)
            if frame.shape != out.shape[1:] or frame.dtype != dtype:
                return None
            out[count - 1] = frame
        if count != number_of_frames:
            return None
    except Exception:  # anything odd: let pydicom's decoders (and their messages) handle it
        return None
    # Exactly pydicom's treatment of the bits above Bits Stored (PS3.5 8.1.1).
    if ds.PixelRepresentation == 1:
        out = out.view(np.int8 if dtype == np.uint8 else np.int16)
    shift = ds.BitsAllocated - ds.BitsStored
    if shift > 0:
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out[..., np.newaxis]


def _fit_bits_stored(ds: Dataset, frames: np.ndarray, syntax: UID) -> None:
    """Raise Bits Stored when decoded values exceed it (J2K precision > Bits Stored).

    pydicom masks/sign-extends native and JPEG data to Bits Stored, so only J2K
    sources can carry wider values; keeping them keeps the conversion bit-exact.
    """
    if syntax not in _J2K_SYNTAXES or frames.dtype.kind not in "iu" or frames.size == 0:
        return
    bits_stored = int(ds.BitsStored)
    low, high = int(frames.min()), int(frames.max())
    if frames.dtype.kind == "i":
        needed = max((high).bit_length(), (-low - 1).bit_length() if low < 0 else 0) + 1
    else:
        needed = high.bit_length()
    needed = min(needed, frames.dtype.itemsize * 8)
    if needed > bits_stored:
        ds.BitsStored = needed
        ds.HighBit = needed - 1


# --------------------------------------------------------------------------- encoding

def _native_pixels(ds: Dataset, frames: np.ndarray) -> bytes | memoryview:
    """Decoded frames as native little-endian Pixel Data of even length: a view of the decoder's
    own buffer where it already is (no 0.5 MB copy a CT slice; two cores share memory bandwidth)."""
    if ds.BitsAllocated == 1:
        data: bytes | memoryview = pack_bits(frames.reshape(-1))
    elif not frames.size:
        data = b""  # a view of nothing cannot be cast
    else:
        data = memoryview(np.ascontiguousarray(frames.astype(frames.dtype.newbyteorder("<"), copy=False))).cast("B")
    return data if len(data) % 2 == 0 else bytes(data) + b"\0"


def _native_vr(ds: Dataset) -> str:
    return "OW" if ds.BitsAllocated > 8 else "OB"


def _set_native(ds: Dataset, pixels: bytes | memoryview) -> UID:
    ds.PixelData = bytes(pixels)
    element = ds["PixelData"]
    element.VR = _native_vr(ds)
    element.is_undefined_length = False
    return EXPLICIT_VR_LITTLE_ENDIAN


def _encode_jpeg_lossless(ds: Dataset, frames: np.ndarray, pixel: dict[str, Any]) -> UID:
    name = _policy(JPEG_LOSSLESS_SV1)
    photometric = pixel["photometric_interpretation"]
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if bits_allocated == 1:
        raise ConversionError(f"{name} cannot code 1-bit (bit-packed) pixel data; keep it uncompressed")
    if bits_stored > 16 or bits_allocated not in (8, 16):
        raise ConversionError(f"{name} codes at most 16 bits per sample; this instance has "
                              f"{bits_stored} bits stored in {bits_allocated} allocated")
    if frames.shape[-1] == 3 and photometric not in ("RGB", "YBR_FULL"):
        raise ConversionError(f"{name} cannot code {photometric} colour")
    if frames.shape[-1] not in (1, 3):
        raise ConversionError(f"{name} codes 1 or 3 samples per pixel, not {frames.shape[-1]}")
    # JPEG precision must fit the container the decoders return (8-bit <-> 1 byte).
    precision = max(bits_stored, 2) if bits_allocated == 8 else max(bits_stored, 9)
    samples = frames
    if frames.dtype.kind == "i":  # two's complement pattern of `precision` bits
        samples = frames.view(np.uint8 if frames.dtype.itemsize == 1 else np.uint16) & ((1 << precision) - 1)
    # RGB: Adobe marker + component IDs R,G,B, no transform.  YBR_FULL: libjpeg-turbo's
    # YCbCr lossless streams (two Huffman tables) fail in GDCM, libjpeg and DCMTK, so
    # code the samples as colour space UNKNOWN (IDs 0,1,2, one table, no transform).
    colour = {"colorspace": "RGB", "outcolorspace": "RGB"} if photometric == "RGB" else (
        {"colorspace": "UNKNOWN", "outcolorspace": "UNKNOWN"} if photometric == "YBR_FULL" else {})
    encoded = _encode_frames(JPEG_LOSSLESS_SV1, samples, lambda frame: imagecodecs.jpeg8_encode(
        frame, lossless=True, predictor=1, bitspersample=precision, **colour))
    _set_image_pixel(ds, frames, photometric)
    _set_encapsulated(ds, encoded)
    return JPEG_LOSSLESS_SV1


def _check_jpeg_extended(ds: Dataset) -> None:
    name = _policy(JPEG_EXTENDED)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    bits_allocated, bits_stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1))
    if photometric == "PALETTE COLOR":
        raise ConversionError(f"{name} would corrupt PALETTE COLOR indices (lossy); use a lossless policy")
    if bits_allocated == 1:
        raise ConversionError(f"{name} cannot code 1-bit (bit-packed) pixel data; keep it uncompressed")
    if samples == 1 and (bits_stored > 12 or bits_allocated > 16):
        raise ConversionError(f"{name} needs 8 or 12 bits stored; this instance has {bits_stored}")
    if samples != 1 and bits_allocated != 8:
        raise ConversionError(f"{name} codes colour with 8 bits per sample only; this instance "
                              f"has {bits_stored} bits stored in {bits_allocated} allocated")
    if samples not in (1, 3):
        raise ConversionError(f"{name} codes 1 or 3 samples per pixel, not {samples}")
    if int(ds.get("PixelRepresentation", 0)) == 1 and samples == 1:
        if "ModalityLUTSequence" in ds:
            raise ConversionError(f"{name} cannot code signed pixel data whose Modality LUT is a "
                                  f"lookup table (JPEG codes unsigned samples)")
        if not _rescale_items(ds):
            raise ConversionError(f"{name} cannot code signed pixel data without a Rescale Intercept "
                                  f"to absorb the unsigned offset (JPEG codes unsigned samples)")


def _encode_jpeg_extended(ds: Dataset, frames: np.ndarray, pixel: dict[str, Any], quality: int) -> UID:
    _check_jpeg_extended(ds)  # again: a J2K source may have widened Bits Stored
    photometric = pixel["photometric_interpretation"]
    if frames.shape[-1] == 3:
        if photometric not in ("RGB", "YBR_FULL"):
            raise ConversionError(f"{_policy(JPEG_EXTENDED)} cannot code {photometric} colour")
        source_space = "RGB" if photometric == "RGB" else "YCbCr"
        encoded = _encode_frames(JPEG_BASELINE, frames, lambda frame: imagecodecs.jpeg8_encode(
            frame, quality, colorspace=source_space, outcolorspace="YCbCr", subsampling="422"))
        _set_image_pixel(ds, frames, "YBR_FULL_422")
        _set_encapsulated(ds, encoded)
        _mark_lossy(ds, JPEG_BASELINE, frames, encoded)
        return JPEG_BASELINE

    precision = 8 if ds.BitsAllocated == 8 else 12
    samples = frames[..., 0]
    if frames.dtype.kind == "i":
        samples = _offset_signed_for_jpeg(ds, samples)
    samples = samples.astype(np.uint8 if precision == 8 else np.uint16, copy=False)
    encoded = _encode_frames(JPEG_EXTENDED, samples, lambda frame: imagecodecs.jpeg8_encode(
        frame, quality, bitspersample=precision))
    ds.BitsStored, ds.HighBit = precision, precision - 1
    _set_image_pixel(ds, frames, photometric)
    _set_encapsulated(ds, encoded)
    _mark_lossy(ds, JPEG_EXTENDED, frames, encoded)
    return JPEG_EXTENDED


def _encode_frames(syntax: UID, frames: np.ndarray, encode: Any) -> list[bytes]:
    """``encode`` each frame (C-contiguous; single-sample frames as rows x columns)."""
    encoded = []
    try:
        for frame in frames:
            if frame.ndim == 3 and frame.shape[-1] == 1:
                frame = frame[..., 0]
            encoded.append(encode(np.ascontiguousarray(frame)))
    except Exception as error:  # imagecodecs raises its own error classes and ValueError
        raise ConversionError(f"{_policy(syntax)} encoding failed: {_first_line(error)}") from error
    return encoded


def _offset_signed_for_jpeg(ds: Dataset, samples: np.ndarray) -> np.ndarray:
    """Signed -> unsigned by adding 2^(BitsStored-1); the rescale intercept absorbs it."""
    offset = 1 << (int(ds.BitsStored) - 1)
    shifted = samples.astype(np.int32) + offset
    for item in _rescale_items(ds):
        slope = float(item.get("RescaleSlope", 1) or 1)
        intercept = float(item.RescaleIntercept) - slope * offset
        item.RescaleIntercept = _ds_string(intercept)
    for keyword in _PIXEL_VALUE_KEYWORDS:
        if keyword in ds and not isinstance(ds[keyword].value, bytes):
            values = ds[keyword].value
            values = [int(v) + offset for v in values] if isinstance(values, MultiValue | list) \
                else int(values) + offset
            ds[keyword] = DataElement(ds[keyword].tag, "US", values)
    ds.PixelRepresentation = 0
    return shifted


def _rescale_items(ds: Dataset) -> list[Dataset]:
    """Every data set holding a Rescale Intercept that applies to this image's pixels."""
    items = [ds] if "RescaleIntercept" in ds else []
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for frame_group in ds.get(group, []):
            for item in frame_group.get("PixelValueTransformationSequence", []):
                if "RescaleIntercept" in item:
                    items.append(item)
    return items


def _encode_j2k(ds: Dataset, frames: np.ndarray, pixel: dict[str, Any], *, lossy: bool,
                quality: int) -> UID:
    target = J2K if lossy else J2K_LOSSLESS
    name = _policy(target)
    photometric = pixel["photometric_interpretation"]
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if bits_allocated == 1:
        raise ConversionError(f"{name} cannot code 1-bit (bit-packed) pixel data; keep it uncompressed")
    if bits_stored > 24:
        raise ConversionError(f"{name} (OpenJPEG) codes at most 24 bits per sample; this instance "
                              f"has {bits_stored} bits stored")
    if lossy and photometric == "PALETTE COLOR":
        raise ConversionError(f"{name} would corrupt PALETTE COLOR indices (lossy); use a lossless policy")
    if frames.shape[-1] == 3 and photometric not in ("RGB", "YBR_FULL"):
        raise ConversionError(f"{name} cannot code {photometric} colour")
    if frames.shape[-1] not in (1, 3):
        raise ConversionError(f"{name} codes 1 or 3 samples per pixel, not {frames.shape[-1]}")
    rgb = photometric == "RGB"
    rows, columns = frames.shape[1:3]
    options: dict[str, Any] = {
        "codecformat": "J2K", "bitspersample": max(bits_stored, 1), "reversible": not lossy,
        "mct": rgb, "colorspace": "SRGB" if rgb else "UNSPECIFIED",
        # OpenJPEG needs 2^(resolutions-1) <= the smaller side; 6 (5 DWT levels) is the usual.
        "resolutions": max(1, min(6, min(rows, columns).bit_length())),
    }
    if lossy:
        options["level"] = _j2k_psnr(bits_stored, quality)  # imagecodecs: level = target PSNR (dB)
    encoded = _encode_frames(target, frames, lambda frame: imagecodecs.jpeg2k_encode(frame, **options))
    written_photometric = ("YBR_ICT" if lossy else "YBR_RCT") if rgb else photometric
    _set_image_pixel(ds, frames, written_photometric)
    _set_encapsulated(ds, encoded)
    if lossy:
        _mark_lossy(ds, J2K, frames, encoded)
    return target


def _j2k_psnr(bits_stored: int, quality: int) -> float:
    """OpenJPEG's PSNR target for ``quality``, behaving like IJG JPEG quality.

    IJG quality q scales JPEG's quantisation tables by s = 50/q (q < 50) or
    2 - q/50, and the resulting RMS error in sample units is nearly independent of
    bit depth: about 6 * s^0.75 (measured here on 8-bit US, 12-bit MR and 12-bit CT:
    ~6 at q50, ~3.6 at q75, ~1.8 at q90, ~1.1 at q95).  j2k-lossy aims at the same
    RMS error, so a quality means the same fidelity in both lossy policies (J2K then
    reaches ~1.3-1.7x JPEG's compression ratio).  OpenJPEG states PSNR against the
    full precision range 2^bits - 1.
    """
    scale = 50.0 / quality if quality < 50 else 2.0 - quality / 50.0
    rms_error = 6.0 * max(scale, 0.01) ** 0.75
    return 20.0 * math.log10(((1 << bits_stored) - 1) / rms_error)


# ------------------------------------------------------------------- data set updates

def _set_image_pixel(ds: Dataset, frames: np.ndarray, photometric: str) -> None:
    ds.PhotometricInterpretation = photometric
    if frames.shape[-1] > 1:
        ds.PlanarConfiguration = 0
    if "NumberOfFrames" in ds or frames.shape[0] > 1:
        ds.NumberOfFrames = frames.shape[0]
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]


def _set_encapsulated(ds: Dataset, encoded: list[bytes]) -> None:
    encoded = [bytes(frame) for frame in encoded]
    total = sum(len(frame) + 8 for frame in encoded)
    if total > 2**32 - 2:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(encoded)
    else:
        ds.PixelData = encapsulate(encoded, has_bot=True)
    element = ds["PixelData"]
    element.VR = "OB"
    element.is_undefined_length = True


def _mark_lossy(ds: Dataset, syntax: UID, frames: np.ndarray, encoded: list[bytes]) -> None:
    """Lossy Image Compression flags (PS3.3 C.7.6.1.1.5) and a new SOP Instance UID."""
    uncompressed = frames.shape[0] * int(ds.Rows) * int(ds.Columns) * frames.shape[-1] * (int(ds.BitsAllocated) // 8)
    ratio = uncompressed / max(sum(len(frame) for frame in encoded), 1)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _existing(ds, "LossyImageCompressionRatio") + [_ds_string(ratio)]
    ds.LossyImageCompressionMethod = _existing(ds, "LossyImageCompressionMethod") + [_LOSSY_METHOD[syntax]]


def _lossy_instance_uid(source_uid: str, syntax: UID, quality: int) -> str:
    """The new SOP Instance UID of a lossy result: ``generate_uid`` seeded with the source
    UID, syntax and quality, so a task that runs twice writes the same UID (idempotent),
    while every distinct lossy derivative of an instance gets its own."""
    return str(generate_uid(entropy_srcs=["discflow lossy", source_uid, str(syntax), str(quality)]))


def _source_lossy_method(ds: Dataset, syntax: UID) -> str | None:
    """How the source was lossy compressed, or None if its pixels are original."""
    method = _LOSSY_METHOD.get(syntax)
    if method and syntax in _J2K_SYNTAXES | {JPEG_LS_NEAR_LOSSLESS}:
        # .4.91/.4.93/.4.203 may hold reversible codestreams, .4.81 a NEAR=0 one.
        try:
            fragment = _first_fragment_head(ds)
            if syntax == JPEG_LS_NEAR_LOSSLESS:
                lossless = _sniff_jpeg(fragment) == JPEG_LS_LOSSLESS
            else:
                cod = fragment.find(b"\xff\x52")
                lossless = cod > 0 and cod + 13 < len(fragment) and fragment[cod + 13] == 1
        except ConversionError:
            lossless = False
        if lossless:
            method = None
    if method is None and ds.get("LossyImageCompression") == "01":
        return ""  # flagged lossy earlier, method unknown here
    return method


def _mark_lossy_source(ds: Dataset, method: str) -> None:
    """Once lossy, always flagged lossy (PS3.3 C.7.6.1.1.5), also after decompression."""
    ds.LossyImageCompression = "01"
    if method and not _existing(ds, "LossyImageCompressionMethod"):
        ds.LossyImageCompressionMethod = method


def _swap_other_words(ds: Dataset) -> None:
    """Big -> little endian for OW/OF/OL/OD/OV values (pydicom writes those bytes as read)."""
    pixel_data = ds["PixelData"] if "PixelData" in ds else None  # replaced from the decode
    for element in ds.iterall():
        width = _SWAP_WIDTH.get(element.VR)
        if width and isinstance(element.value, bytes | bytearray) and element is not pixel_data:
            value = bytes(element.value)
            usable = len(value) - len(value) % width
            element.value = np.frombuffer(value[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes() \
                + value[usable:]


# ---------------------------------------------------------------------------- writing

def _write(ds: Dataset, syntax: UID, bytes_in: int, destination: Path, *, lossy: bool) -> ConversionResult:
    """Write ``ds`` as Part 10 in ``syntax`` to ``.<name>.part``, then rename into place."""
    meta, sop_instance = _file_meta(ds, syntax)
    for tag in [tag for tag in ds.keys() if tag.group == 0x0002]:
        del ds[tag]  # file meta elements misplaced in the data set
    ds.file_meta = meta
    ds.preamble = b"\0" * 128

    try:
        with _partial_file(destination) as partial:
            if _pixel_bytes(ds) <= _BUFFERED_WRITE_LIMIT:
                # One write() of the whole file beats pydicom's many small ones by ~1 ms/slice.
                buffer = BytesIO()
                dcmwrite(buffer, ds, enforce_file_format=True)
                bytes_out = partial.write_bytes(buffer.getbuffer())
            else:
                with open(partial, "wb", buffering=1 << 20) as stream:
                    dcmwrite(stream, ds, enforce_file_format=True)
                    bytes_out = stream.tell()
    except (OSError, MemoryError):  # the spool's problem, not the instance's: fail the task
        raise
    except Exception as error:  # pydicom found an element it cannot encode (lazy parsing)
        raise ConversionError(f"cannot encode the data set as {syntax.name}: {_first_line(error)}") from error
    return ConversionResult(transfer_syntax=str(syntax), sop_instance_uid=str(sop_instance),
                            bytes_in=bytes_in, bytes_out=bytes_out, lossy=lossy)


@contextmanager
def _partial_file(destination: Path) -> Iterator[Path]:
    """``.<name>.part`` beside ``destination`` (the name a stopped guarded decode cleans up),
    renamed into place when the block succeeds and removed when it fails."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name("." + destination.name + ".part")
    try:
        yield partial
        os.replace(partial, destination)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _file_meta(ds: Dataset, syntax: UID) -> tuple[FileMetaDataset, str]:
    """discflow's file meta for ``ds`` written in ``syntax``, and its SOP Instance UID."""
    sop_class = ds.get("SOPClassUID") or (getattr(ds, "file_meta", None) or {}).get("MediaStorageSOPClassUID")
    sop_instance = ds.get("SOPInstanceUID") or (getattr(ds, "file_meta", None) or {}).get("MediaStorageSOPInstanceUID")
    if not sop_class or not sop_instance:
        raise ConversionError("the data set has no SOP Class UID / SOP Instance UID, "
                              "so it cannot be stored as a DICOM file")
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(str(sop_class))
    meta.MediaStorageSOPInstanceUID = UID(str(sop_instance))
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta, str(sop_instance)


# ---------------------------------------------------------------- decoded, written by splicing

_PIXEL_DATA = 0x7FE00010
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class _Splice:
    """Where a Part 10 file's encapsulated Pixel Data element starts and ends in its bytes."""
    dataset_start: int
    pixel_start: int
    pixel_end: int


def _splice_point(raw: bytes, ds: Dataset, syntax: UID) -> _Splice | None:
    """Where to cut ``raw`` so that only its Pixel Data changes, or None when anything else must.

    Only for a file whose meta declares ``syntax`` (an encapsulated syntax: Explicit VR Little
    Endian around the pixels), with no misplaced file meta and no group length that the new
    Pixel Data would make wrong."""
    meta = read_file_meta(raw[:META_PROBE])
    if meta is None or meta.transfer_syntax != syntax or not syntax.is_encapsulated:
        return None
    if any(tag.group == 0x0002 or tag == 0x7FE00000 for tag in ds.keys()):
        return None
    element = ds.get_item(_PIXEL_DATA) if _PIXEL_DATA in ds else None
    value_tell = getattr(element, "value_tell", None) or getattr(element, "file_tell", None)
    if element is None or value_tell is None or not isinstance(element.value, bytes):
        return None
    start, end = value_tell - 12, value_tell + len(element.value) + len(_SEQUENCE_DELIMITER)
    if raw[start:start + 8] != b"\xe0\x7f\x10\x00OB\x00\x00" or raw[end - 8:end] != _SEQUENCE_DELIMITER:
        return None
    return _Splice(meta.dataset_offset, start, end)


def _image_pixel_state(ds: Dataset) -> tuple[Any, ...]:
    """Every attribute a decode may change besides Pixel Data (see _fit_bits_stored, _set_image_pixel)."""
    return tuple(ds.get(keyword) for keyword in (
        "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "BitsStored", "HighBit",
        "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "SamplesPerPixel", "BitsAllocated"))


def _write_spliced(raw: bytes, splice: _Splice, ds: Dataset, pixels: bytes | memoryview,
                   destination: Path) -> ConversionResult:
    """The source's own bytes around new native Pixel Data, under a new file meta: pydicom's
    encoding of the whole data set cost ~5 ms a slice and changed nothing else."""
    meta, sop_instance = _file_meta(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    parts = [header.getvalue(), raw[splice.dataset_start:splice.pixel_start],
             struct.pack("<HH2sHI", 0x7FE0, 0x0010, _native_vr(ds).encode(), 0, len(pixels)), pixels,
             raw[splice.pixel_end:]]
    with _partial_file(destination) as partial, partial.open("wb") as handle:
        handle.writelines(parts)  # no joined copy: the pixels go from the decoder's buffer to the file
    bytes_out = sum(len(part) for part in parts)
    return ConversionResult(transfer_syntax=str(EXPLICIT_VR_LITTLE_ENDIAN), sop_instance_uid=str(sop_instance),
                            bytes_in=len(raw), bytes_out=bytes_out, lossy=False)


# ---------------------------------------------------------------------------- helpers

_BUFFERED_WRITE_LIMIT = 64 << 20


def _pixel_bytes(ds: Dataset) -> int:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            value = ds[keyword].value
            return len(value) if value is not None else 0
    return 0


def _check_native_length(ds: Dataset) -> None:
    """Refuse native pixel data shorter than its Image Pixel attributes claim."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as error:
        missing = [_spaced(k) for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) is None]
        what = f"{', '.join(missing)} missing" if missing else "Rows/Columns/Bits Allocated invalid"
        raise ConversionError(f"Pixel Data cannot be interpreted: {what}") from error
    pixels = rows * columns * _number_of_frames(ds)
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        needed = pixels * 2 * bits // 8
    else:
        needed = (pixels * samples * bits + 7) // 8
    held = len(ds.PixelData or b"")
    if held < needed:
        raise ConversionError(f"Pixel Data holds {held} bytes but Rows x Columns x frames x samples "
                              f"needs {needed}: the file is truncated or its header lies")


def _number_of_frames(ds: Dataset) -> int:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"Number of Frames is not a number: {ds.get('NumberOfFrames')!r}") from error
    return max(frames, 1)


def _require(ds: Dataset, *keywords: str) -> None:
    missing = [keyword for keyword in keywords if ds.get(keyword) is None]
    if missing:
        raise ConversionError(f"Pixel Data cannot be decoded without {', '.join(_spaced(k) for k in missing)}")


def _existing(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return []
    value = ds[keyword].value
    return [str(v) for v in value] if not isinstance(value, str | float | int) else [str(value)]


def _ds_string(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _policy(syntax: UID) -> str:
    return _POLICY_NAME.get(syntax, syntax.name)


def _spaced(keyword: str) -> str:
    """'FloatPixelData' -> 'Float Pixel Data'."""
    return "".join(" " + c if c.isupper() and i else c for i, c in enumerate(keyword))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3])[:300] or type(error).__name__
