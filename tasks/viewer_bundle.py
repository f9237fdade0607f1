"""The viewer bundle: a site-configured folder copied to VIEWER/ on every volume, with AUTORUN.INF.

The folder comes from ``DISCFLOW_VIEWER_DIR`` (or ``--viewer DIR`` per job). Its start program is
``DISCFLOW_VIEWER_START`` (a path inside the folder), else the only ``*.exe`` at its top level; with
neither, the viewer is copied but no AUTORUN.INF is written (an autorun pointing nowhere is worse
than none, and ``discflow validate`` fails it). Its size counts against every volume's capacity.

Checked before a job starts (:func:`viewer_files`), so a bad folder fails the submission, not a
volume: no symbolic links or special files, every path at most 8 levels deep on the disc and every
name at most 64 characters (Joliet), nothing named like the DICOM file-set (``DICOM``, ``DICOMDIR``).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["FOLDER", "ViewerBundle", "ViewerError", "autorun_inf", "load_viewer", "viewer_files"]

FOLDER = "VIEWER"
SECTOR = 2048
_MAX_DEPTH = 8
_MAX_NAME = 64


class ViewerError(ValueError):
    """The configured viewer folder cannot go on a disc; the message says why."""


@dataclass
class ViewerBundle:
    files: list[tuple[str, Path]]
    """(media path under VIEWER/, file on disk)."""
    start: str | None
    """Media path of the program AUTORUN.INF starts, or None."""

    @property
    def disc_bytes(self) -> int:
        """Bytes on the disc: each file rounded up to whole sectors, plus a sector of directory records."""
        return sum(-(-path.stat().st_size // SECTOR) * SECTOR + SECTOR for _, path in self.files)


def viewer_files(folder: Path) -> list[tuple[str, Path]]:
    """Every regular file of ``folder`` as (``VIEWER/...`` media path, path), or ViewerError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ViewerError(f"viewer folder not found: {folder}")
    files: list[tuple[str, Path]] = []
    for root, directories, names in os.walk(folder):
        directories.sort()
        for name in sorted(names) + [d for d in directories if os.path.islink(os.path.join(root, d))]:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise ViewerError(f"viewer folder holds a symbolic link: {relative}; copy the real files instead")
            if not stat.S_ISREG(mode):
                raise ViewerError(f"viewer folder holds a special file: {relative}")
            files.append((_media_path(relative), path))
    if not files:
        raise ViewerError(f"viewer folder is empty: {folder}")
    return files


def _media_path(relative: str) -> str:
    parts = PurePosixPath(FOLDER, relative).parts
    if len(parts) > _MAX_DEPTH:
        raise ViewerError(f"viewer file {relative} is nested deeper than a disc allows (8 levels with VIEWER/)")
    for part in parts:
        if len(part) > _MAX_NAME:
            raise ViewerError(f"viewer file {relative}: name {part!r} is longer than 64 characters (Joliet)")
    return "/".join(parts)


def _start_program(files: list[tuple[str, Path]], start: str | None) -> str | None:
    if start:
        wanted = _media_path(start.replace("\\", "/").strip("/"))
        if wanted not in {media for media, _ in files}:
            raise ViewerError(f"viewer start program {start} is not in the viewer folder")
        return wanted
    top_level = [media for media, _ in files if media.count("/") == 1 and media.lower().endswith(".exe")]
    return top_level[0] if len(top_level) == 1 else None


def load_viewer(folder: Path | None, start: str | None = None) -> ViewerBundle | None:
    """The bundle for ``folder`` (None: no viewer configured)."""
    if folder is None or str(folder) == "":
        return None
    files = viewer_files(Path(folder))
    return ViewerBundle(files, _start_program(files, start))


def autorun_inf(start: str, label: str) -> bytes:
    """AUTORUN.INF starting ``start`` (a media path), CRLF line ends as Windows writes them."""
    program = start.replace("/", "\\")
    quoted = f'"{program}"' if " " in program else program
    lines = ["[autorun]", f"open={quoted}", f"icon={quoted}", f"label={label[:32]}", ""]
    return "\r\n".join(lines).encode("ascii", "replace")
