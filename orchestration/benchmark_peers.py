"""The peers `discflow bench` measures discflow against, on the same files in the same run.

- export, decompressing: DCMTK ``dcmdjpeg`` (two at a time, one per core) + ``dcmmkdir`` + ``xorriso``;
- export, keeping the JPEG bytes: copy + ``dcmmkdir`` + ``xorriso``;
- export from the PACS itself: Orthanc's ``/studies/{id}/media`` ZIP (optionally transcoded);
- import: DCMTK ``dcmsend`` (TCP_NODELAY=1) reading the disc's DICOMDIR, ``-dn`` to send the stored
  syntax, ``+dls`` (its default) to decompress lossless JPEG before sending.

Each returns a :class:`~orchestration.benchmark.Run` with sub-step seconds in ``stages``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from orchestration.benchmark_report import Run
from orchestration.local_peers import OrthancPeer, find_binary, peer_environment

UNCOMPRESSED = "1.2.840.10008.1.2.1"
TOOLS = ("dcmdjpeg", "dcmmkdir", "dcmsend", "xorriso")


def missing_tools() -> list[str]:
    """Programs the peer rows need that this host lacks (Orthanc is checked when it starts)."""
    return [name for name in TOOLS if find_binary(name) is None]


def _run(command: Sequence[str], **options: object) -> None:
    finished = subprocess.run(list(command), capture_output=True, text=True, **options)  # type: ignore[call-overload]
    if finished.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({finished.returncode}): "
                           f"{(finished.stderr or finished.stdout)[-1500:]}")


def start_clock() -> float:
    """The moment a run starts, once the earlier runs' writes are on disk: the kernel writes dirty
    pages back ~30 s after they were written, during whichever run comes next (each run writes
    100-500 MB), so every tool starts from an idle disk."""
    os.sync()
    return time.monotonic()


@contextmanager
def _step(stages: dict[str, float], name: str) -> Iterator[None]:
    started = time.monotonic()
    yield
    stages[name] = round(time.monotonic() - started, 4)


def _disc_names(sources: Sequence[Path], staging: Path) -> list[tuple[Path, Path]]:
    """Source file -> DICOM/Innnnnnn on the disc (8 upper-case characters, no extension: PS3.12)."""
    folder = staging / "DICOM"
    folder.mkdir(parents=True)
    return [(source, folder / f"I{number:07d}") for number, source in enumerate(sources)]


def dcmtk_export(source: Path, staging: Path, iso: Path, decompress: bool, parallel: int = 2) -> Run:
    """The DCMTK pipeline a careful operator scripts: decode (or copy), DICOMDIR, ISO image."""
    shutil.rmtree(staging, ignore_errors=True)
    iso.unlink(missing_ok=True)
    pairs = _disc_names(sorted(source.glob("*.dcm")), staging)
    stages: dict[str, float] = {}
    started = start_clock()
    if decompress:
        with _step(stages, "decompress"), ThreadPoolExecutor(parallel) as pool:
            # dcmdjpeg decodes one file per process: two processes at a time use both cores.
            list(pool.map(lambda pair: _run(["dcmdjpeg", str(pair[0]), str(pair[1])]), pairs))
    else:
        with _step(stages, "copy"):
            for original, target in pairs:
                shutil.copyfile(original, target)
    with _step(stages, "dicomdir"):
        profile = "-Pgp" if decompress else "-Pdv"  # STD-GEN-CD / STD-GEN-DVD-JPEG, as discflow's auto
        _run(["dcmmkdir", profile, "+id", str(staging), "+D", str(staging / "DICOMDIR"), "+r", "DICOM"])
    with _step(stages, "iso"):
        _run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "DCMTK_001", "-o", str(iso), str(staging)])
    seconds = time.monotonic() - started
    shutil.rmtree(staging, ignore_errors=True)
    return Run(seconds, iso.stat().st_size, len(pairs), stages)


def orthanc_media(peer: OrthancPeer, study_id: str, target: Path, transcode: str | None = None) -> Run:
    """Orthanc's own export: GET /studies/{id}/media (a ZIP with a DICOMDIR), written to ``target``."""
    query = f"?transcode={transcode}" if transcode else ""
    started = start_clock()
    target.write_bytes(peer.rest_bytes(f"/studies/{study_id}/media{query}", timeout=900))
    seconds = time.monotonic() - started
    return Run(seconds, target.stat().st_size, 0, {})


def supports_media_transcode(peer: OrthancPeer) -> bool:
    """Orthanc >= 1.7 transcodes archives and media (``?transcode=``); older ones ignore it."""
    version = str(peer.rest("/system").get("Version", "0"))
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (1, 7)


def dcmsend(peer: OrthancPeer, disc: Path, decompress: bool) -> Run:
    """dcmsend with TCP_NODELAY=1 reading the mounted disc's DICOMDIR, as a PACS import station does."""
    mode = "+dls" if decompress else "-dn"
    command = ["dcmsend", "-aet", "DCMSEND", "-aec", peer.node.ae_title, mode, "+rd", "-nh",
               peer.node.host, str(peer.node.port), str(disc / "DICOMDIR")]
    started = start_clock()
    _run(command, env=peer_environment(tcp_nodelay=True), timeout=1800)
    seconds = time.monotonic() - started
    return Run(seconds, 0, peer.instance_count(), {})


def extract_iso(iso: Path, destination: Path) -> Path:
    """The disc as a mounted drive shows it (files readable), for dcmsend."""
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    _run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(destination)])
    for path in destination.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return destination


def load_study(peer: OrthancPeer, folder: Path) -> str:
    """Put the study into the PACS as it is (JPEG lossless stays JPEG lossless); its Orthanc id.

    Over REST, not DICOM: a stock Orthanc stalls ~45 ms per C-STORE, and loading is not measured."""
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda path: _upload(peer, path), sorted(folder.glob("*.dcm"))))
    studies = peer.rest("/studies")
    if len(studies) != 1:
        raise RuntimeError(f"expected one study in Orthanc after loading, found {len(studies)}")
    return str(studies[0])


UPLOAD_ATTEMPTS = 3


def _upload(peer: OrthancPeer, path: Path) -> None:
    """POST one file; again after a server error, then fail with Orthanc's log (a full bench run
    here once stopped on an HTTP 500 from Orthanc 1.10 while loading the study for the node rows)."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            peer.upload(path)
            return
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == UPLOAD_ATTEMPTS:
                raise RuntimeError(f"Orthanc refused {path.name}: {error}\n{peer.log()[-3000:]}") from error
            time.sleep(0.2 * attempt)


def tool_versions() -> dict[str, str]:
    """First line of each peer's version, for the record."""
    versions = {}
    for name, command in {"dcmtk": ["dcmsend", "--version"], "xorriso": ["xorriso", "-version"],
                          "orthanc": [find_binary("Orthanc", "/usr/sbin/Orthanc") or "Orthanc", "--version"]}.items():
        try:
            output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
            versions[name] = output.strip().splitlines()[0] if output.strip() else "?"
        except (OSError, subprocess.SubprocessError):
            versions[name] = "not installed"
    return versions
