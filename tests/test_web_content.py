"""IHE PDI web content, opened the way a person at another hospital would: INDEX.HTM from an
extracted ISO in headless Chromium, with no network and nothing installed."""
from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import imagecodecs
import numpy as np
import pytest

from conftest import require_tools
from export_inline import build_sources, export_inline, extract_iso

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1024"]
SCREENSHOT_COPY = os.environ.get("DISCFLOW_SCREENSHOT")
"""Set to a path to keep the screenshot for a person to look at."""


@pytest.fixture(scope="module")
def disc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict]:
    require_tools("xorriso")
    base = tmp_path_factory.mktemp("web")
    studies = build_sources(base / "sources", ct_images=10)
    report = base / "befund.txt"
    report.write_text("CT Kopf nativ\n\nBefund: subdurales Hämatom links.\nBeurteilung: <dringend> & sofort.\n",
                      encoding="utf-8")
    summary = export_inline(base / "spool", base / "sources", base / "out", report=str(report))
    assert summary["status"] == "succeeded", summary["failures"]
    root = extract_iso(Path(summary["volumes"][0]["path"]), base / "extracted")
    return root, studies, summary


def _chromium(root: Path, tmp_path: Path, *mode: str) -> subprocess.CompletedProcess:
    require_tools("chromium")
    return subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *mode,
                           (root / "INDEX.HTM").as_uri()], capture_output=True, timeout=120)


def test_index_lists_every_study_with_unbroken_thumbnails(disc, tmp_path: Path) -> None:
    root, studies, summary = disc
    dom = _chromium(root, tmp_path, "--dump-dom").stdout.decode("utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    for description in studies:
        assert description in text, description
    assert "DOE, JANE" in text and "ROE, RICHARD" in text
    sources = [unquote(src) for src in re.findall(r'<img src="([^"]+)"', dom)]
    assert len(sources) == 5  # CT, two MR series (one MONOCHROME1), the RLE/JPEG-LS MR, ... one per series
    for source in sources:
        picture = imagecodecs.png_decode((root / source).read_bytes())  # resolves on the ISO 9660 tree
        assert picture.dtype == np.uint8 and picture.std() > 10, source  # not blank, not flat
        assert max(picture.shape[:2]) <= 256
    assert summary["volumes"][0]["thumbnails"] == 5


def test_reports_are_readable_in_the_browser(disc, tmp_path: Path) -> None:
    root, _, summary = disc
    index = (root / "INDEX.HTM").read_text(encoding="utf-8")
    links = re.findall(r'href="(IHE_PDI/R\d{7}\.(?:PDF|HTM))"', index)
    assert len([link for link in links if link.endswith(".PDF")]) == 4  # the txt report x 3 studies + the SR
    for link in links:
        assert (root / link).is_file(), link
        assert re.fullmatch(r"IHE_PDI/[A-Z0-9_]{1,8}\.[A-Z0-9]{1,3}", link)  # ISO 9660 Level 1 names
    texts = [(root / link).read_text(encoding="utf-8") for link in links if link.endswith(".HTM")]
    assert any("subdurales Hämatom" in page and "&lt;dringend&gt; &amp; sofort" in page for page in texts)
    pdf = (root / links[0]).read_bytes()
    assert pdf.startswith(b"%PDF-")
    if subprocess.run(["which", "pdftotext"], capture_output=True).returncode == 0:
        extracted = subprocess.run(["pdftotext", str(root / links[0]), "-"], capture_output=True, text=True).stdout
        assert "subdurales Hämatom links." in extracted


def test_screenshot_is_not_blank(disc, tmp_path: Path) -> None:
    root, _, _ = disc
    shot = tmp_path / "index.png"
    result = _chromium(root, tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    picture = imagecodecs.png_decode(shot.read_bytes())
    assert picture.shape[:2] == (1024, 1280)
    grey = picture[..., :3].mean(axis=2)
    assert (grey < 64).mean() > 0.02  # text and the black CT background, not an empty white page
    assert (grey > 192).mean() > 0.3
    if SCREENSHOT_COPY:
        Path(SCREENSHOT_COPY).write_bytes(shot.read_bytes())


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_lossless_jpeg_thumbnail_is_the_one_pydicom_decoding_gives(name: str) -> None:
    """Thumbnails of lossless JPEG are decoded by libjpeg-turbo, not pydicom: the same picture."""
    import pydicom
    from pydicom.data import get_testdata_file

    from tasks.web_content import thumbnail_png, window_to_8bit

    path = get_testdata_file(name)
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    expected = imagecodecs.png_encode(window_to_8bit(dataset, pixels[frames // 2] if frames > 1 else pixels))
    assert thumbnail_png(Path(path)) == expected
