"""Read a disc image back with independent tools: xorriso, isoinfo, pycdlib, dciodvfy, DCMTK."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pycdlib
import pydicom


def isoinfo_paths(iso: Path) -> list[str]:
    """ISO 9660 file paths as isoinfo lists them, version suffix removed, files only."""
    output = subprocess.run(["isoinfo", "-i", str(iso), "-f"], check=True, capture_output=True, text=True).stdout
    # ISO 9660 names carry ";1" and, without an extension, a trailing "." that readers drop.
    paths = [line.strip().split(";")[0].rstrip(".") for line in output.splitlines() if line.strip()]
    directories = {p.rsplit("/", 1)[0] for p in paths}
    return [p.lstrip("/") for p in paths if p not in directories]


def xorriso_extract(iso: Path, destination: Path) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(destination)],
                   check=True, capture_output=True)
    for path in destination.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination


def pycdlib_read(iso: Path, iso_path: str) -> bytes:
    import io
    disc = pycdlib.PyCdlib()
    disc.open(str(iso))
    try:
        buffer = io.BytesIO()
        name = "/" + iso_path + ("" if "." in iso_path.rsplit("/", 1)[-1] else ".")
        disc.get_file_from_iso_fp(buffer, iso_path=name + ";1")
        return buffer.getvalue()
    finally:
        disc.close()


def dciodvfy_errors(dicomdir: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(dicomdir)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def dcmdump_ok(path: Path) -> bool:
    return subprocess.run(["dcmdump", "-q", str(path)], capture_output=True).returncode == 0


def directory_leaves(dicomdir: Path) -> list[pydicom.Dataset]:
    """Every leaf record (those that reference a file) of a DICOMDIR."""
    records = pydicom.dcmread(dicomdir).DirectoryRecordSequence
    return [record for record in records if "ReferencedFileID" in record]
