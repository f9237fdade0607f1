"""tasks.transfer_syntax: bit-exact lossless conversions over the whole pydicom corpus,
DCMTK cross-checks of every JPEG we write, lossy flags, refusals and Part 10 repair.

No Celery, no Redis.  The corpus is ``pydicom.data.get_testdata_files()`` (pydicom's own
test files plus the pydicom-data store); every image file in it goes through every
lossless policy and must come back bit-exact, or fail with the ConversionError reason
listed in EXPECTED_FAILURES.  Files pydicom cannot decode at all are skipped with
pydicom's reason (and separately must be refused, not crash).  Files whose decoded pixel
data exceeds MAX_DECODED_BYTES are skipped to keep the run short (today only
color3d_jpeg_baseline.dcm: 120 colour frames, 110 MB decoded; its 30-frame sibling
examples_ybr_color.dcm covers the same case).

"Bit-exact" compares pydicom's raw decode (no YCbCr -> RGB) of input and output in the
same colour space, YBR_FULL_422 == YBR_FULL (decoders up-sample chroma) and
YBR_RCT/YBR_ICT == RGB (J2K decoders undo the component transform).  Input and output
are decoded with the same pydicom plugin preference as the module (DECODING_PLUGINS),
because lossy JPEG decoders differ among themselves by a level or two.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, generate_uid

from tasks.transfer_syntax import (
    DECODING_PLUGINS,
    LOSSLESS_SYNTAXES,
    POLICIES,
    ConversionError,
    ConversionResult,
    convert_file,
    needs_conversion,
    rewrite_part10,
)

LOSSLESS_POLICIES = ("uncompressed", "jpeg-lossless", "j2k-lossless")
MAX_DECODED_BYTES = 64 << 20
MINIMUM_EXACT_FILES = 150  # image files tested per full run (155 on pydicom 3.0.2 + pydicom-data 1.0)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"

_ONE_BIT = ("liver.dcm", "liver_1frame.dcm", "liver_expb.dcm", "liver_expb_1frame.dcm")
_THIRTY_TWO_BIT = (
    "rtdose.dcm", "rtdose_1frame.dcm", "rtdose_expb.dcm", "rtdose_expb_1frame.dcm",
    "rtdose_rle.dcm", "rtdose_rle_1frame.dcm",
    "SC_rgb_32bit.dcm", "SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit.dcm",
    "SC_rgb_expb_32bit_2frame.dcm", "SC_rgb_rle_32bit.dcm", "SC_rgb_rle_32bit_2frame.dcm",
)
EXPECTED_FAILURES: dict[tuple[str, str], str] = {
    # Bit-packed segmentation-style pixels: neither JPEG nor (in DICOM) J2K codes 1-bit data.
    **{(name, policy): "cannot code 1-bit"
       for name in _ONE_BIT for policy in ("jpeg-lossless", "j2k-lossless")},
    # 32-bit samples (RT dose grids, 32-bit RGB): JPEG lossless stops at 16 bits,
    # OpenJPEG's encoder at 24.
    **{(name, "jpeg-lossless"): "codes at most 16 bits per sample; this instance has 32 bits stored"
       for name in _THIRTY_TWO_BIT},
    **{(name, "j2k-lossless"): "codes at most 24 bits per sample; this instance has 32 bits stored"
       for name in _THIRTY_TWO_BIT},
}

UNDECODABLE = {
    # name: the reason convert_file gives (pydicom cannot decode these either)
    "JPEG-lossy.dcm": "cannot decode the JPEG Extended",
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode the JPEG 2000",
    "MR_truncated.dcm": "Pixel Data holds 8130 bytes but",
    "badVR.dcm": "Number of Frames is not a number",
    "meta_missing_tsyntax.dcm": "Pixel Data cannot be interpreted",
    "nested_priv_SQ.dcm": "Pixel Data cannot be interpreted",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "no data elements could be read",
}

_SAME_COLOUR_SPACE = {"YBR_FULL_422": "YBR_FULL", "YBR_RCT": "RGB", "YBR_ICT": "RGB"}


# ------------------------------------------------------------------------- helpers

def data_file(name: str) -> Path:
    return Path(get_testdata_file(name))


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    syntax = meta.get("TransferSyntaxUID")
    if syntax:
        return str(syntax)
    implicit, little = ds.original_encoding
    return IMPLICIT_LE if implicit else EXPLICIT_LE if little else "1.2.840.10008.1.2.2"


def decode(path: Path) -> tuple[np.ndarray, str]:
    """pydicom's raw decode: (frames x rows x columns x samples, comparable colour space)."""
    ds = dcmread(path, force=True)
    syntax = UID(_syntax(ds))
    decoder = get_decoder(syntax)
    preferred = DECODING_PLUGINS.get(syntax, "")
    try:
        array, pixel = decoder.as_array(
            ds, raw=True, decoding_plugin=preferred if preferred in decoder.available_plugins else "")
    except Exception:
        if not preferred:
            raise
        array, pixel = decoder.as_array(ds, raw=True)
    frames = int(pixel.get("number_of_frames", 1))
    array = array.reshape(frames, ds.Rows, ds.Columns, int(pixel.get("samples_per_pixel", 1)))
    photometric = pixel["photometric_interpretation"]
    return array, _SAME_COLOUR_SPACE.get(photometric, photometric)


@functools.lru_cache(maxsize=2)  # parametrized cases of one file run back to back
def reference(path: Path) -> tuple[np.ndarray, str] | str:
    """The decoded source, or the reason it cannot be used."""
    ds = dcmread(path, force=True, stop_before_pixels=True)
    try:
        size = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.get("SamplesPerPixel", 1)) * max(int(ds.BitsAllocated) // 8, 1))
    except (AttributeError, TypeError, ValueError) as error:
        return f"pydicom cannot decode it: {error}"
    if size > MAX_DECODED_BYTES:
        return f"{size >> 20} MB decoded exceeds the {MAX_DECODED_BYTES >> 20} MB test budget"
    try:
        return decode(path)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "not decodable"
        return f"pydicom cannot decode it: {' '.join(str(error).split())[:160]}"


def assert_part10(path: Path, result: ConversionResult) -> Dataset:
    """Preamble, DICM, file meta naming the written syntax and the instance; no leftovers."""
    data = path.read_bytes()
    assert data[:128] == b"\0" * 128 and data[128:132] == b"DICM"
    assert result.bytes_out == len(data)
    assert not path.with_name("." + path.name + ".part").exists()
    ds = dcmread(path)
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == result.transfer_syntax
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == result.sop_instance_uid
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.ImplementationClassUID and meta.FileMetaInformationVersion == b"\x00\x01"
    return ds


def image_files() -> list[Path]:
    files = []
    for name in sorted(get_testdata_files(), key=lambda f: (os.path.basename(f), f)):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, force=True, defer_size=256)
        except Exception:  # noqa: BLE001 - not DICOM at all (json, README, icc ...)
            continue
        if "PixelData" in ds:
            files.append(path)
    return files


def case_id(path: Path) -> str:
    return path.name if path.parent.name in ("test_files", "data") else f"{path.parent.name}/{path.name}"


IMAGE_FILES = image_files()
CASES = [(path, policy) for path in IMAGE_FILES for policy in LOSSLESS_POLICIES]
_OUTCOMES: dict[tuple[str, str], str] = {}


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, f"{command[0]} failed: {completed.stderr or completed.stdout}"
    return completed


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# -------------------------------------------------------- the corpus, bit-exact

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("path", "policy"), CASES, ids=[f"{case_id(p)}-{policy}" for p, policy in CASES])
def test_lossless_policy_is_bit_exact(path: Path, policy: str, tmp_path: Path) -> None:
    logging.disable(logging.CRITICAL)  # pydicom logs every plugin that declines a frame
    try:
        source = reference(path)
    finally:
        logging.disable(logging.NOTSET)
    key = (case_id(path), policy)
    if isinstance(source, str):
        _OUTCOMES[key] = "skipped"
        pytest.skip(source)
    expected_array, expected_space = source
    destination = tmp_path / "OUT"

    expected_failure = EXPECTED_FAILURES.get((path.name, policy))
    if expected_failure:
        with pytest.raises(ConversionError, match=expected_failure) as caught:
            convert_file(path, destination, POLICIES[policy])
        assert caught.value.source == path
        assert not destination.exists() and not list(tmp_path.iterdir())
        _OUTCOMES[key] = "refused as expected"
        return

    result = convert_file(path, destination, POLICIES[policy])
    ds = assert_part10(destination, result)
    assert result.transfer_syntax == POLICIES[policy]
    assert result.lossy is False
    assert result.sop_instance_uid == dcmread(path, force=True, stop_before_pixels=True).SOPInstanceUID
    assert result.bytes_in == path.stat().st_size

    array, space = decode(destination)
    assert space == expected_space
    assert array.shape == expected_array.shape
    assert np.array_equal(array, expected_array), "decoded pixels differ"
    if ds.file_meta.TransferSyntaxUID != EXPLICIT_LE and int(ds.SamplesPerPixel) > 1:
        assert ds.PlanarConfiguration == 0
    if expected_array.shape[0] > 1:
        assert int(ds.NumberOfFrames) == expected_array.shape[0]
    _OUTCOMES[key] = "bit-exact"


def test_corpus_coverage() -> None:
    """Runs after the corpus cases (file order): the tested set must stay large."""
    if len(_OUTCOMES) < len(CASES):
        pytest.skip("run the whole module to check corpus coverage")
    covered = {name for (name, _), outcome in _OUTCOMES.items() if outcome != "skipped"}
    exact = {name for (name, _), outcome in _OUTCOMES.items() if outcome == "bit-exact"}
    refused = sum(outcome == "refused as expected" for outcome in _OUTCOMES.values())
    skipped = sorted({name for (name, _), outcome in _OUTCOMES.items() if outcome == "skipped"})
    print(f"\n{len(IMAGE_FILES)} image files, {len(covered)} tested ({len(exact)} bit-exact through "
          f"at least one policy), {refused} expected refusals, skipped: {', '.join(skipped)}")
    assert len(covered) >= MINIMUM_EXACT_FILES
    assert refused == len(EXPECTED_FAILURES), "an expected failure no longer happens: update the table"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_files_are_refused_not_crashed(name: str, tmp_path: Path) -> None:
    logging.disable(logging.CRITICAL)
    try:
        for policy in LOSSLESS_POLICIES:
            with pytest.raises(ConversionError, match=UNDECODABLE[name]):
                convert_file(data_file(name), tmp_path / "OUT", POLICIES[policy])
    finally:
        logging.disable(logging.NOTSET)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- DCMTK cross-checks

def _signed_8_in_16(tmp_path: Path) -> Path:
    """Bits Stored 8 in 16 allocated, signed: JPEG precision must still fit 2 bytes."""
    ds = dcmread(data_file("MR_small.dcm"))
    samples = (ds.pixel_array.astype(np.int32) % 256 - 128).astype(np.int16)
    ds.BitsStored, ds.HighBit = 8, 7
    ds.PixelData = samples.tobytes()
    path = tmp_path / "signed8in16.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


DCMTK_SUBSET = {
    # name: (why it is here, dcmdjpeg options)
    "vlut_04.dcm": ("8-bit", []),
    "MR2_UNCR.dcm": ("12 bits in 16, 1024x1024", []),
    "emri_small.dcm": ("12 bits in 16, 10 frames", []),
    "mlut_18.dcm": ("signed 12 bits in 16", []),
    "693_UNCR.dcm": ("signed 14 bits in 16, the CT slice", []),
    "CT_small.dcm": ("signed 16 bits", []),
    "MR_small_bigendian.dcm": ("signed 16 bits, big endian source", []),
    "J2K_pixelrep_mismatch.dcm": ("signed 13 bits, J2K source coded unsigned", []),
    "US1_UNCR.dcm": ("RGB", []),
    "SC_rgb_16bit_2frame.dcm": ("16-bit RGB, 2 frames", []),
    "SC_ybr_full_uncompressed.dcm": ("YBR_FULL; DCMTK converts YCbCr to RGB unless +cn", ["+cn"]),
    "OBXXXX1A.dcm": ("8-bit palette", []),
    "gdcm-US-ALOKA-16.dcm": ("16-bit palette", []),
    "signed8in16": ("signed 8 bits in 16 (synthetic)", []),
}


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(DCMTK_SUBSET))
def test_jpeg_lossless_decodes_bit_exact_in_dcmtk(name: str, tmp_path: Path) -> None:
    require("dcmdjpeg")
    source = _signed_8_in_16(tmp_path) if name == "signed8in16" else data_file(name)
    expected, space = decode(source)
    compressed, decompressed = tmp_path / "JLL", tmp_path / "DCMTK"
    result = convert_file(source, compressed, POLICIES["jpeg-lossless"])
    assert result.transfer_syntax == JPEG_LOSSLESS_SV1
    run(["dcmdjpeg", *DCMTK_SUBSET[name][1], str(compressed), str(decompressed)])
    by_dcmtk = dcmread(decompressed)
    assert by_dcmtk.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert by_dcmtk.PixelRepresentation == dcmread(compressed).PixelRepresentation
    array, dcmtk_space = decode(decompressed)
    assert dcmtk_space == space
    assert np.array_equal(array, expected)


def _signed_12_bit_ct(tmp_path: Path) -> Path:
    """The CT slice clipped to signed 12 bits (HU = value - 1024)."""
    ds = dcmread(data_file("693_UNCR.dcm"))
    ds.PixelData = np.clip(ds.pixel_array, -2048, 2047).astype(np.int16).tobytes()
    ds.BitsStored, ds.HighBit = 12, 11
    ds.add_new(0x00280106, "SS", -2000)  # Smallest Image Pixel Value
    path = tmp_path / "ct12signed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _modality(ds: Dataset, array: np.ndarray) -> np.ndarray:
    return array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.mark.peers
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "syntax", "bits", "max_error"), [
    ("vlut_04.dcm", JPEG_EXTENDED, 8, 3.0),
    ("MR2_UNCR.dcm", JPEG_EXTENDED, 12, 4.0),
    ("ct12signed", JPEG_EXTENDED, 12, 3.0),
    ("US1_UNCR.dcm", JPEG_BASELINE, 8, 6.0),
])
def test_jpeg_extended_output_decodes_in_dcmtk(name: str, syntax: str, bits: int, max_error: float,
                                               tmp_path: Path) -> None:
    require("dcmdjpeg")
    source = _signed_12_bit_ct(tmp_path) if name == "ct12signed" else data_file(name)
    original = dcmread(source)
    compressed, decompressed = tmp_path / "JEXT", tmp_path / "DCMTK"
    result = convert_file(source, compressed, POLICIES["jpeg-extended"])
    assert result.transfer_syntax == syntax and result.lossy
    ds = assert_part10(compressed, result)
    assert ds.BitsStored == bits and ds.PixelRepresentation == 0
    run(["dcmdjpeg", str(compressed), str(decompressed)])
    if original.SamplesPerPixel == 1:
        ours, _ = decode(compressed)
        theirs, _ = decode(decompressed)
        # Lossy JPEG decoders may differ by a few levels (IDCT); both must be close to the source.
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 4
        before = _modality(original, original.pixel_array)
        after = _modality(ds, ours.reshape(before.shape))
        assert math.sqrt(np.mean((after - before) ** 2)) < max_error * float(original.get("RescaleSlope", 1))
    else:
        # DCMTK up-samples chroma differently from libjpeg and converts to RGB by default:
        # compare both decoders' RGB with the source.
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert dcmread(decompressed).PhotometricInterpretation == "RGB"
        for rgb in (dcmread(compressed).pixel_array, dcmread(decompressed).pixel_array):
            assert math.sqrt(np.mean((rgb.astype(float) - original.pixel_array) ** 2)) < max_error


# ------------------------------------------------------------------------ lossy

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "JPEG-LL.dcm", "RG1_UNCR.dcm"])
def test_jpeg_extended_refuses_more_than_12_bits(name: str, tmp_path: Path) -> None:
    destination = tmp_path / "OUT"
    destination.write_bytes(b"previous run")
    bits = dcmread(data_file(name), stop_before_pixels=True).BitsStored
    with pytest.raises(ConversionError, match=rf"^jpeg-extended needs 8 or 12 bits stored; this instance has {bits}$"):
        convert_file(data_file(name), destination, POLICIES["jpeg-extended"])
    assert destination.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]


def test_jpeg_extended_refusals_name_the_reason(tmp_path: Path) -> None:
    cases = {
        "mlut_18.dcm": "signed pixel data whose Modality LUT is a lookup table",
        "OBXXXX1A.dcm": "would corrupt PALETTE COLOR indices",
        "SC_rgb_16bit.dcm": "codes colour with 8 bits per sample only",
        "liver.dcm": "cannot code 1-bit",
    }
    for name, reason in cases.items():
        with pytest.raises(ConversionError, match=reason):
            convert_file(data_file(name), tmp_path / "OUT", POLICIES["jpeg-extended"])


@pytest.mark.parametrize(("policy", "method"), [("jpeg-extended", "ISO_10918_1"), ("j2k-lossy", "ISO_15444_1")])
def test_lossy_output_is_flagged_with_a_new_uid(policy: str, method: str, tmp_path: Path) -> None:
    source = data_file("MR2_UNCR.dcm")
    original = dcmread(source)
    result = convert_file(source, tmp_path / "A", POLICIES[policy])
    ds = assert_part10(tmp_path / "A", result)
    assert result.lossy and result.transfer_syntax == POLICIES[policy]
    assert result.sop_instance_uid != original.SOPInstanceUID
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == method
    ratio = float(ds.LossyImageCompressionRatio)
    assert ratio > 2 and abs(ratio / (len(original.PixelData) / len(ds.PixelData)) - 1) < 0.01
    # Idempotent: a task that runs twice writes the same new UID; other settings another one.
    assert convert_file(source, tmp_path / "B", POLICIES[policy]).sop_instance_uid == result.sop_instance_uid
    other = convert_file(source, tmp_path / "C", POLICIES[policy], lossy_quality=60)
    assert other.sop_instance_uid not in (result.sop_instance_uid, original.SOPInstanceUID)
    assert other.bytes_out < result.bytes_out


def test_lossy_ratio_and_method_are_appended(tmp_path: Path) -> None:
    source = data_file("MR2_J2KI.dcm")  # already lossy J2K: ratio 18, no method recorded
    result = convert_file(source, tmp_path / "OUT", POLICIES["jpeg-extended"])
    ds = dcmread(tmp_path / "OUT")
    assert ds.LossyImageCompression == "01"
    assert [float(v) for v in ds.LossyImageCompressionRatio][0] == 18
    assert len(ds.LossyImageCompressionRatio) == 2 and float(ds.LossyImageCompressionRatio[1]) > 1
    assert list(ds.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    assert result.lossy


def test_lossless_copy_of_lossy_source_stays_flagged(tmp_path: Path) -> None:
    source = data_file("SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, not flagged in the file
    result = convert_file(source, tmp_path / "OUT", POLICIES["j2k-lossless"])
    ds = dcmread(tmp_path / "OUT")
    assert not result.lossy and result.sop_instance_uid == dcmread(source).SOPInstanceUID
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_signed_jpeg_extended_moves_the_offset_into_the_rescale(tmp_path: Path) -> None:
    source = _signed_12_bit_ct(tmp_path)
    convert_file(source, tmp_path / "OUT", POLICIES["jpeg-extended"])
    ds = dcmread(tmp_path / "OUT")
    assert ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) == -1024 - 2048
    assert ds.SmallestImagePixelValue == -2000 + 2048
    assert ds.WindowCenter == dcmread(source).WindowCenter  # windows are in HU: unchanged


def test_j2k_lossy_quality_controls_the_error(tmp_path: Path) -> None:
    source = data_file("693_UNCR.dcm")
    original = dcmread(source).pixel_array.astype(float)
    errors = []
    for quality in (50, 90, 100):
        convert_file(source, tmp_path / f"Q{quality}", POLICIES["j2k-lossy"], lossy_quality=quality)
        decoded, _ = decode(tmp_path / f"Q{quality}")
        errors.append(math.sqrt(np.mean((decoded.reshape(original.shape) - original) ** 2)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 3  # q90: ~2 HU RMS on this CT slice
    with pytest.raises(ConversionError, match="lossy quality must be 1..100"):
        convert_file(source, tmp_path / "BAD", POLICIES["j2k-lossy"], lossy_quality=0)


def test_rgb_j2k_uses_the_colour_transforms(tmp_path: Path) -> None:
    source = data_file("US1_UNCR.dcm")
    convert_file(source, tmp_path / "R", POLICIES["j2k-lossless"])
    convert_file(source, tmp_path / "I", POLICIES["j2k-lossy"])
    assert dcmread(tmp_path / "R").PhotometricInterpretation == "YBR_RCT"
    assert dcmread(tmp_path / "I").PhotometricInterpretation == "YBR_ICT"


# ------------------------------------------------------------- instances without pixels

@pytest.mark.parametrize(("name", "policy"), [
    ("test-SR.dcm", "jpeg-lossless"),
    ("rtplan.dcm", "j2k-lossless"),          # implicit VR source
    ("waveform_ecg.dcm", "jpeg-extended"),
    ("reportsi.dcm", "j2k-lossy"),
    ("rtplan.dcm", "uncompressed"),
])
def test_non_image_instances_are_written_explicit_le(name: str, policy: str, tmp_path: Path) -> None:
    source = data_file(name)
    result = convert_file(source, tmp_path / "OUT", POLICIES[policy])
    assert result.transfer_syntax == EXPLICIT_LE and not result.lossy
    ds = assert_part10(tmp_path / "OUT", result)
    original = dcmread(source)
    assert set(ds.keys()) == set(original.keys())
    for element in original:
        if element.VR != "SQ":
            assert ds[element.tag].value == element.value, element
        else:
            assert len(ds[element.tag].value) == len(element.value)


def test_float_pixel_data_is_refused_for_compression_but_kept_uncompressed(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated = 4, 5, 1, 32
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.FloatPixelData = np.linspace(-1, 1, 20, dtype="<f4").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LE
    source = tmp_path / "float.dcm"
    ds.save_as(source, enforce_file_format=True)
    for policy in ("jpeg-lossless", "jpeg-extended", "j2k-lossless", "j2k-lossy"):
        with pytest.raises(ConversionError, match="cannot compress Float Pixel Data"):
            convert_file(source, tmp_path / "OUT", POLICIES[policy])
    result = convert_file(source, tmp_path / "OUT", POLICIES["uncompressed"])
    assert dcmread(tmp_path / "OUT").FloatPixelData == ds.FloatPixelData and not result.lossy


def test_big_endian_other_word_values_are_swapped(tmp_path: Path) -> None:
    convert_file(data_file("OBXXXX1A_expb.dcm"), tmp_path / "OUT", POLICIES["uncompressed"])
    ours, twin = dcmread(tmp_path / "OUT"), dcmread(data_file("OBXXXX1A.dcm"))
    for keyword in ("RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
                    "BluePaletteColorLookupTableData"):
        assert ours[keyword].value == twin[keyword].value
    assert np.array_equal(ours.pixel_array, twin.pixel_array)


@pytest.mark.peers
@pytest.mark.parametrize(("name", "policy"), [
    ("693_UNCR.dcm", "jpeg-lossless"), ("693_UNCR.dcm", "j2k-lossless"), ("693_UNCR.dcm", "j2k-lossy"),
    ("MR2_UNCR.dcm", "jpeg-extended"), ("US1_UNCR.dcm", "jpeg-extended"), ("US1_UNCR.dcm", "j2k-lossless"),
    ("emri_small.dcm", "jpeg-lossless"), ("MR_small_bigendian.dcm", "uncompressed"),
])
def test_outputs_add_no_iod_errors(name: str, policy: str, tmp_path: Path) -> None:
    """dicom3tools' dciodvfy finds no error in our output that the source did not have."""
    require("dciodvfy")

    def errors(path: Path) -> set[str]:
        completed = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        lines = (completed.stdout + completed.stderr).splitlines()
        return {line for line in lines if line.startswith("Error")}

    convert_file(data_file(name), tmp_path / "OUT", POLICIES[policy])
    assert errors(tmp_path / "OUT") <= errors(data_file(name))


def test_dicomdir_is_not_an_instance(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="DICOMDIR"):
        convert_file(data_file("DICOMDIR"), tmp_path / "OUT", POLICIES["uncompressed"])


# ---------------------------------------------------------------------- rewrite_part10

def _bare(source: Path, destination: Path, *, implicit: bool) -> Path:
    """The data set of ``source`` alone: no preamble, no file meta."""
    ds = dcmread(source)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    dcmwrite(destination, ds, implicit_vr=implicit, little_endian=True)
    data = destination.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    return destination


@pytest.mark.parametrize(("name", "implicit", "syntax"), [
    ("MR_small.dcm", True, IMPLICIT_LE),
    ("CT_small.dcm", False, EXPLICIT_LE),
    ("JPEG-LL.dcm", False, JPEG_LOSSLESS_SV1),                     # sniffed: SOF3, predictor 1
    ("JPGExtended.dcm", False, JPEG_EXTENDED),                     # SOF1
    ("SC_rgb_jpeg_dcmtk.dcm", False, JPEG_BASELINE),               # SOF0
    ("emri_small_jpeg_ls_lossless.dcm", False, "1.2.840.10008.1.2.4.80"),
    ("MR2_J2KR.dcm", False, J2K_LOSSLESS),                         # COD: reversible 5/3
    ("MR2_J2KI.dcm", False, J2K),                                  # COD: irreversible 9/7
    ("MR_small_RLE.dcm", False, "1.2.840.10008.1.2.5"),
])
def test_rewrite_part10_of_a_bare_dataset(name: str, implicit: bool, syntax: str, tmp_path: Path) -> None:
    bare = _bare(data_file(name), tmp_path / "bare", implicit=implicit)
    result = rewrite_part10(bare, tmp_path / "OUT")
    ds = assert_part10(tmp_path / "OUT", result)
    assert result.transfer_syntax == syntax and not result.lossy
    assert ds.PixelData == dcmread(data_file(name)).PixelData  # identical pixel bytes
    assert np.array_equal(decode(tmp_path / "OUT")[0], decode(data_file(name))[0])
    if shutil.which("dcmftest"):
        run(["dcmftest", str(tmp_path / "OUT")])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rewrite_part10_repairs_lying_file_meta_in_place(tmp_path: Path) -> None:
    # An implicit VR data set under a JPEG Transfer Syntax UID: pydicom reads it with a
    # warning, DCMTK cannot; rewritten in place (as the import path does) it is proper.
    path = tmp_path / "IMG"
    shutil.copyfile(data_file("SC_rgb_jpeg.dcm"), path)
    expected = decode(data_file("SC_rgb_jpeg.dcm"))
    result = rewrite_part10(path, path)
    assert_part10(path, result)
    assert result.transfer_syntax == JPEG_BASELINE
    assert np.array_equal(decode(path)[0], expected[0])
    if shutil.which("dcmdump"):
        assert "E:" not in run(["dcmdump", "-q", str(path)]).stderr

    # Meta says Explicit VR LE, the data set is implicit: the real encoding wins.
    liar = dcmread(data_file("MR_small_implicit.dcm"))
    liar.file_meta.TransferSyntaxUID = EXPLICIT_LE
    raw = tmp_path / "LIAR"
    dcmwrite(raw, liar, implicit_vr=True, little_endian=True, force_encoding=True)
    assert rewrite_part10(raw, tmp_path / "FIXED").transfer_syntax == IMPLICIT_LE
    assert np.array_equal(decode(tmp_path / "FIXED")[0], decode(data_file("MR_small_implicit.dcm"))[0])


def test_same_syntax_is_rewritten_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.transfer_syntax as module

    def no_decoding(*args: object) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(module, "_decode", no_decoding)
    source = data_file("JPEG-LL.dcm")
    result = convert_file(source, tmp_path / "OUT", POLICIES["jpeg-lossless"])
    assert result.transfer_syntax == JPEG_LOSSLESS_SV1
    assert dcmread(tmp_path / "OUT").PixelData == dcmread(source).PixelData
    # Implicit VR LE -> Explicit VR LE re-encodes the data set, not the pixels.
    result = convert_file(data_file("MR_small_implicit.dcm"), tmp_path / "EXP", POLICIES["uncompressed"])
    assert result.transfer_syntax == EXPLICIT_LE
    # JPEG Baseline already satisfies jpeg-extended: kept, not re-compressed.
    result = convert_file(data_file("SC_rgb_jpeg_dcmtk.dcm"), tmp_path / "JB", POLICIES["jpeg-extended"])
    assert result.transfer_syntax == JPEG_BASELINE and not result.lossy


def test_needs_conversion() -> None:
    assert not needs_conversion(JPEG_LOSSLESS_SV1, None)
    assert not needs_conversion(J2K_LOSSLESS, J2K_LOSSLESS)
    assert needs_conversion(IMPLICIT_LE, EXPLICIT_LE)
    assert needs_conversion(J2K, EXPLICIT_LE)
    assert needs_conversion(EXPLICIT_LE, JPEG_LOSSLESS_SV1)
    assert not needs_conversion(JPEG_BASELINE, JPEG_EXTENDED)
    assert needs_conversion(JPEG_EXTENDED, JPEG_BASELINE)


def test_policy_table() -> None:
    assert POLICIES == {
        "keep": None, "uncompressed": EXPLICIT_LE, "jpeg-lossless": JPEG_LOSSLESS_SV1,
        "jpeg-extended": JPEG_EXTENDED, "j2k-lossless": J2K_LOSSLESS, "j2k-lossy": J2K,
    }
    for syntax in (EXPLICIT_LE, IMPLICIT_LE, JPEG_LOSSLESS_SV1, J2K_LOSSLESS, "1.2.840.10008.1.2.5",
                   "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80"):
        assert syntax in LOSSLESS_SYNTAXES
    for syntax in (JPEG_BASELINE, JPEG_EXTENDED, J2K, "1.2.840.10008.1.2.4.81"):
        assert syntax not in LOSSLESS_SYNTAXES


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_gdcm.dcm",
                                  "J2K_pixelrep_mismatch.dcm"])
def test_decompressing_keeps_every_other_byte_of_the_file(name: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode to Explicit VR Little Endian that changes nothing but the pixels splices the new Pixel
    Data into the source's own bytes: every element is what pydicom's full re-encoding gives."""
    import tasks.transfer_syntax as transfer_syntax

    source, explicit_le = Path(get_testdata_file(name)), "1.2.840.10008.1.2.1"
    splices: list[Path] = []
    real_splice = transfer_syntax._write_spliced
    monkeypatch.setattr(transfer_syntax, "_write_spliced", lambda *args: splices.append(args[4]) or real_splice(*args))
    spliced = convert_file(source, tmp_path / "spliced.dcm", explicit_le)
    monkeypatch.setattr(transfer_syntax, "_splice_point", lambda *args: None)
    encoded = convert_file(source, tmp_path / "encoded.dcm", explicit_le)
    assert splices == [tmp_path / "spliced.dcm"]  # the fast path ran, the comparison is not vacuous
    assert (spliced.transfer_syntax, spliced.sop_instance_uid) == (encoded.transfer_syntax, encoded.sop_instance_uid)
    ours, pydicoms = dcmread(tmp_path / "spliced.dcm"), dcmread(tmp_path / "encoded.dcm")
    assert [(e.tag, e.VR, e.value) for e in ours] == [(e.tag, e.VR, e.value) for e in pydicoms]
    assert ours.file_meta == pydicoms.file_meta
    assert np.array_equal(ours.pixel_array, pydicoms.pixel_array)
