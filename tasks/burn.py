"""Burn hand-off: checksum manifests, disc-robot hot folders (Primera PTBurn, Epson TD Bridge), xorriso.

Checksums
    Every finished volume gets a SHA-256 manifest beside it in ``sha256sum`` format:
    ``VOL001.ISO.SHA256`` (the image) or ``USB001.SHA256`` (every file of a USB folder). A burn is
    verified by reading the written medium back -- exactly as many bytes as the image has, because
    drives pad the last track -- and comparing digests.

Robots (the job file is written last, by rename, so a robot never picks up a half-copied job)
    * Primera PTBurn: ``<job>.JRQ`` with ``ImageFile=`` naming the ISO copied into the job's own
      subfolder of the hot folder, and ``DeleteFiles=YES`` so PTBurn removes that subfolder when done.
      Keys used: JobID, ClientID, ImageFile, ImageType, DiscType, Copies, VolumeName, VerifyDisc,
      RejectIfNotBlank, DeleteFiles (PTBurn SDK, JRQ File Command Structure).
    * Epson TD Bridge: ``<job>.JDF`` with ``DATA=`` naming the volume's file-set copied as a folder
      (TD Bridge burns folders), FORMAT, DISC_TYPE, COPIES, VOLUME_LABEL, JOB_ID (TD Bridge Technical
      Reference Guide, Setting Item List).
    Paths inside a job file are the ones the robot's PC sees: ``DISCFLOW_BURN_ROBOT_PATH`` (e.g.
    ``\\\\robot\\jobs`` or ``C:\\PTBurnJobs``) replaces the hot folder's path as mounted here.

Drives
    ``xorriso -as cdrecord -v dev=DEVICE -eject IMAGE`` writes the image as one track; ``DEVICE`` is
    ``/dev/sr0`` or, for tests and dry runs, ``stdio:/path/file.iso`` (a file-backed "drive").
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from tasks.spool import atomic_writer

__all__ = ["BurnError", "ROBOTS", "burn_command", "burn_to_device", "handoff_to_robot", "read_back_sha256",
           "sha256_file", "verify_device", "write_folder_checksums", "write_image_checksum"]

ROBOTS = ("primera", "epson")
_CHUNK = 1 << 20
_DISC_TYPES = {"primera": {"cd": "CDR", "dvd": "DVDR", "dvd-dl": "DVDR", "bd": "BDR"},
               "epson": {"cd": "CD", "dvd": "DVD", "dvd-dl": "DVD-DL", "bd": "BD"}}


class BurnError(Exception):
    """A hand-off or burn that did not happen, or a verification that failed; the message says which."""


@dataclass
class VolumeToBurn:
    image: Path
    """The ISO image (for Primera and drives)."""
    label: str
    """Volume label, e.g. DISCFLOW_001."""
    number: int
    count: int
    media: str = "cd"
    files: list[tuple[str, Path | bytes]] | None = None
    """The file-set as (media path, file or content), for robots that burn folders (Epson)."""


# --------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: Path, limit: int | None = None) -> str:
    """SHA-256 of ``path`` (its first ``limit`` bytes when given)."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    if remaining:
        raise BurnError(f"{path} ends {remaining} bytes early")
    return digest.hexdigest()


def write_image_checksum(image: Path, digest: str) -> Path:
    """``VOL001.ISO.SHA256`` beside the image, in sha256sum's format (``sha256sum -c`` checks it)."""
    manifest = image.with_name(image.name + ".SHA256")
    with atomic_writer(manifest) as handle:
        handle.write(f"{digest}  {image.name}\n".encode())
    os.chmod(manifest, 0o644)
    return manifest


def write_folder_checksums(root: Path, digests: Iterable[tuple[str, str]]) -> Path:
    """``USB001.SHA256`` beside the folder ``root``: one line per file, paths relative to ``root``."""
    manifest = root.with_name(root.name + ".SHA256")
    lines = "".join(f"{digest}  {media_path}\n" for media_path, digest in sorted(digests, key=lambda d: d[0]))
    with atomic_writer(manifest) as handle:
        handle.write(lines.encode())
    os.chmod(manifest, 0o644)
    return manifest


def read_checksum(image: Path) -> str:
    manifest = image.with_name(image.name + ".SHA256")
    try:
        return manifest.read_text().split()[0]
    except (OSError, IndexError) as error:
        raise BurnError(f"no checksum manifest {manifest}: {error}") from error


# --------------------------------------------------------------------------------------------
# Drives (xorriso)


def _device_path(device: str) -> str:
    return device[len("stdio:"):] if device.startswith("stdio:") else device


def burn_command(image: Path, device: str, *, eject: bool = True) -> list[str]:
    """The xorriso command that writes ``image`` to ``device`` as one track (cdrecord emulation)."""
    command = ["xorriso", "-as", "cdrecord", "-v", f"dev={device}"]
    if eject and not device.startswith("stdio:"):
        command.append("-eject")
    return command + [str(image)]


def read_back_sha256(device: str, size: int) -> str:
    """SHA-256 of the first ``size`` bytes of what is on ``device`` (a drive pads its last track)."""
    try:
        return sha256_file(Path(_device_path(device)), limit=size)
    except OSError as error:
        raise BurnError(f"cannot read back {device}: {error.strerror or error}") from error


def verify_device(image: Path, device: str) -> str:
    """Compare the medium in ``device`` with the image's checksum manifest; return the digest."""
    expected = read_checksum(image)
    found = read_back_sha256(device, image.stat().st_size)
    if found != expected:
        raise BurnError(f"verification failed: {device} reads back {found[:16]}..., "
                        f"{image.name} has {expected[:16]}...")
    return found


def burn_to_device(image: Path, device: str, *, timeout: float = 3600) -> str:
    """Burn ``image`` with xorriso, read it back and verify; return the verified digest."""
    if not shutil.which("xorriso"):
        raise BurnError("xorriso is not installed (Debian: apt-get install xorriso)")
    result = subprocess.run(burn_command(image, device), capture_output=True, text=True, errors="replace",
                            timeout=timeout)
    if result.returncode != 0:
        tail = " / ".join(line for line in result.stderr.splitlines()[-3:] if line.strip())
        raise BurnError(f"xorriso could not write {image.name} to {device}: {tail}")
    return verify_device(image, device)


# --------------------------------------------------------------------------------------------
# Robots (hot folders)


def _job_name(label: str, number: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{label}_{number:03d}")[:32]


def _robot_path(hot_folder: Path, robot_path: str | None, *relative: str) -> str:
    """A path inside the hot folder as the robot's PC spells it."""
    if not robot_path:
        return str(hot_folder.joinpath(*relative))
    return str(PureWindowsPath(robot_path, *relative))


def _write_text(path: Path, lines: list[str]) -> None:
    with atomic_writer(path) as handle:
        handle.write("\r\n".join(lines + [""]).encode("ascii", "replace"))
    os.chmod(path, 0o644)


def _copy_tree(files: Iterable[tuple[str, Path | bytes]], root: Path) -> None:
    for media_path, source in files:
        target = root.joinpath(*media_path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)


def handoff_to_robot(volume: VolumeToBurn, hot_folder: Path, robot: str, *, robot_path: str | None = None,
                     copies: int = 1, client: str = "discflow") -> Path:
    """Put ``volume`` into a robot's hot folder; return the job file. Data first, job file last."""
    if robot not in ROBOTS:
        raise BurnError(f"unknown robot {robot!r}; choose {' or '.join(ROBOTS)}")
    hot_folder = Path(hot_folder)
    if not hot_folder.is_dir():
        raise BurnError(f"hot folder not found: {hot_folder}")
    job = _job_name(volume.label, volume.number)
    folder = hot_folder / job
    folder.mkdir(exist_ok=True)
    disc_type = _DISC_TYPES[robot].get(volume.media, _DISC_TYPES[robot]["cd"])
    title = f"{volume.label} {volume.number} of {volume.count}"
    if robot == "primera":
        shutil.copyfile(volume.image, folder / volume.image.name)
        job_file = hot_folder / f"{job}.JRQ"
        _write_text(job_file, [
            f"JobID={title[:32]}", f"ClientID={client[:32]}",
            f"ImageFile={_robot_path(hot_folder, robot_path, job, volume.image.name)}",
            "ImageType=MODE_1_2048", f"DiscType={disc_type}", f"Copies={copies}",
            f"VolumeName={volume.label[:32]}", "VerifyDisc=YES", "RejectIfNotBlank=YES", "DeleteFiles=YES"])
        return job_file
    if volume.files is None:
        raise BurnError("the Epson hand-off needs the volume's files (TD Bridge burns folders)")
    _copy_tree(volume.files, folder / "DATA")
    job_file = hot_folder / f"{job}.JDF"
    _write_text(job_file, [
        f"JOB_ID={job[:40]}", f"COPIES={copies}", f"DISC_TYPE={disc_type}", "FORMAT=ISO9660L2",
        f"DATA={_robot_path(hot_folder, robot_path, job, 'DATA')}", f"VOLUME_LABEL={volume.label[:32]}"])
    return job_file
