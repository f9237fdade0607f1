"""The disc image of a volume: ISO 9660 Level 1 plus Joliet, written with pycdlib.

Names (PS3.12 F.1.2.1, ECMA-119 7.5/7.6)
    The DICOM file-set (``DICOMDIR`` and ``DICOM/...``) has ISO 9660 Level 1 names already:
    components of at most 8 characters from A-Z, 0-9 and ``_``, no extension. On the media a
    file identifier always carries the separator and version, so the file ID
    ``DICOM/P0000001/.../I0000001`` is recorded as ``/DICOM/P0000001/.../I0000001.;1`` and the
    DICOMDIR as ``/DICOMDIR.;1``, exactly as PS3.12 F.1.2.1 spells it. Readers (isoinfo -f prints
    them raw; the Linux kernel, Windows and xorriso strip ``.;1``) show ``DICOMDIR``.
    The Joliet tree carries the same paths without ``.;1``, so an operating system that reads
    Joliet (Windows, macOS, Linux by default) sees the DICOM names unchanged, and the long
    names of the human-readable extras (``IHE_PDI/...``) intact. Where such an extra path is not
    Level 1 conformant, its ISO 9660 name is derived (upper case, invalid characters to ``_``,
    8.3, made unique) -- see :func:`level1_path`.

Speed
    Directories are created once each, parents first; files are added by name (pycdlib opens
    each while mastering, so no descriptor is held per file) and pycdlib defers the extent
    layout to the single write, so adding n files is linear. The image is streamed to a
    temporary file beside the target with a 1 MiB block and renamed over it.
"""
from __future__ import annotations

import hashlib
import io
import os
import queue
import re
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pycdlib

from tasks.burn import sha256_file
from tasks.spool import atomic_writer

__all__ = ["build_folder", "build_iso", "level1_path", "read_iso_listing"]

_LEVEL1_DIRECTORY = re.compile(r"[A-Z0-9_]{1,8}")
_LEVEL1_FILE = re.compile(r"[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?")
_VOLUME_ID = re.compile(r"[A-Z0-9_]{0,32}")
_MAX_DIRECTORY_DEPTH = 8  # ISO 9660: the root and at most 7 levels below it (ECMA-119 6.8.2.1)
_JOLIET_MAX = 64          # Joliet: at most 64 UCS-2 characters per name
_WRITE_BLOCK = 1 << 20


def _component(name: str, limit: int) -> str:
    """``name`` upper-cased, non-d-characters replaced by ``_``, cut to ``limit`` characters."""
    cleaned = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:limit]
    return cleaned or "_"


class _Level1Names:
    """Deterministic ISO 9660 Level 1 names for media paths, unique within each directory."""

    def __init__(self) -> None:
        self._taken: dict[str, set[str]] = {}
        self._mapped: dict[tuple[str, str], str] = {}

    def name(self, parent: str, component: str, is_file: bool) -> str:
        key = (parent, component)
        if key in self._mapped:
            return self._mapped[key]
        if is_file and "." in component.strip("."):
            stem, _, extension = component.rpartition(".")
            base, ext = _component(stem, 8), _component(extension, 3)
        else:
            base, ext = _component(component, 8), ""
        taken = self._taken.setdefault(parent, set())
        candidate, counter = base, 1
        while _join(candidate, ext) in taken:
            suffix = f"_{counter}"
            candidate = base[:8 - len(suffix)] + suffix
            counter += 1
        result = _join(candidate, ext)
        if _is_level1(component, is_file) and result != component:
            # A conformant name (every DICOM File ID component) must reach the media unchanged.
            raise ValueError(f"{parent}/{component}: name already taken by a derived ISO 9660 name")
        taken.add(result)
        self._mapped[key] = result
        return result


def _is_level1(component: str, is_file: bool) -> bool:
    return bool((_LEVEL1_FILE if is_file else _LEVEL1_DIRECTORY).fullmatch(component))


def _conformant_first(paths: list[tuple[str, Path | bytes]]) -> list[tuple[str, Path | bytes]]:
    """Paths whose every component is already Level 1 first, so that derived names for the
    others can never take a name a conformant path needs (pycdlib sorts directories itself)."""
    def conformant(media_path: str) -> bool:
        parts = _split(media_path)
        return all(_is_level1(part, is_file=i == len(parts) - 1) for i, part in enumerate(parts))
    return sorted(paths, key=lambda item: not conformant(item[0]))


def _join(name: str, extension: str) -> str:
    return f"{name}.{extension}" if extension else name


def level1_path(media_path: str) -> str:
    """The ISO 9660 Level 1 path (without ``.;1``) a single media path gets on its own.

    ``DICOM/P0000001/S0000001/S0000001/I0000001`` and ``README.TXT`` stay as they are;
    ``IHE_PDI/series-1-thumbnail.jpeg`` becomes ``IHE_PDI/SERIES_1.JPE``. Within one image,
    :func:`build_iso` also makes derived names unique: a clash ends in ``_2``, ``_3``... instead.
    Names that are already Level 1 (every DICOM File ID component) are never changed.
    """
    names = _Level1Names()
    parts = _split(media_path)
    out: list[str] = []
    for depth, part in enumerate(parts):
        out.append(names.name("/".join(out), part, is_file=depth == len(parts) - 1))
    return "/".join(out)


def _split(media_path: str) -> list[str]:
    path = PurePosixPath(media_path.replace("\\", "/"))
    parts = [p for p in path.parts if p not in ("/", "")]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"media path {media_path!r} is empty or leaves the media root")
    if len(parts) > _MAX_DIRECTORY_DEPTH:
        raise ValueError(f"media path {media_path!r} is deeper than ISO 9660 allows (8 levels)")
    for part in parts:
        if len(part) > _JOLIET_MAX:
            raise ValueError(f"media path {media_path!r}: component {part!r} is longer than 64 characters")
    return parts


def _iso_file_identifier(name: str) -> str:
    """``NAME`` -> ``NAME.;1``, ``NAME.EXT`` -> ``NAME.EXT;1`` (the separator is always recorded)."""
    return f"{name};1" if "." in name else f"{name}.;1"


class _Layout:
    """The directories and files of one image, both trees, added to pycdlib in one pass."""

    def __init__(self, disc: pycdlib.PyCdlib, joliet: bool) -> None:
        self.disc = disc
        self.joliet = joliet
        self.names = _Level1Names()
        self.directories: dict[tuple[str, ...], str] = {(): ""}  # media parts -> ISO path
        self.files: set[tuple[str, ...]] = set()
        self.folded: set[str] = set()
        self.pending: list[tuple[str, str | None, Path | bytes]] = []

    def _directory(self, parts: tuple[str, ...]) -> str:
        known = self.directories.get(parts)
        if known is not None:
            return known
        if parts in self.files:
            raise ValueError(f"{'/'.join(parts)} is both a file and a directory")
        parent = self._directory(parts[:-1])
        self._claim_folded(parts)
        iso_path = f"{parent}/{self.names.name(parent, parts[-1], is_file=False)}"
        joliet_path = "/" + "/".join(parts) if self.joliet else None
        self.disc.add_directory(iso_path, joliet_path=joliet_path)
        self.directories[parts] = iso_path
        return iso_path

    def _claim_folded(self, parts: tuple[str, ...]) -> None:
        """Refuse a path that differs from another one only in case: Windows, reading Joliet,
        would show one of them only."""
        folded = "/".join(parts).upper()
        if folded in self.folded:
            raise ValueError(f"{'/'.join(parts)} differs from another path only in case")
        self.folded.add(folded)

    def add(self, media_path: str, source: Path | bytes) -> None:
        parts = tuple(_split(media_path))
        if parts in self.files or parts in self.directories:
            raise ValueError(f"{'/'.join(parts)} is on the image twice")
        parent = self._directory(parts[:-1])
        self._claim_folded(parts)
        self.files.add(parts)
        iso_path = f"{parent}/{_iso_file_identifier(self.names.name(parent, parts[-1], is_file=True))}"
        joliet_path = "/" + "/".join(parts) if self.joliet else None
        self.pending.append((iso_path, joliet_path, source))

    def commit(self) -> str | None:
        """Add the files to pycdlib in the order of their extents (see :func:`_extent_order`), so
        that it writes their data front to back and :class:`_HashingWriter` can hash the image as
        it goes; return the ISO path of the first."""
        ordered = sorted(self.pending, key=_extent_order)
        for iso_path, joliet_path, source in ordered:
            if isinstance(source, bytes):
                self.disc.add_fp(io.BytesIO(source), len(source), iso_path, joliet_path=joliet_path)
            else:
                self.disc.add_file(os.fspath(source), iso_path, joliet_path=joliet_path)
        return ordered[0][0] if ordered else None


def _extent_order(item: tuple[str, str | None, Path | bytes]) -> tuple[int, list[str], str]:
    """Where pycdlib puts a file's data: directory by directory, breadth first, and by name within
    each (ISO 9660 identifiers of A-Z, 0-9, _ and . sort as Python sorts them). A file added out of
    this order is still written correctly; the image is then hashed by reading it back."""
    *directories, name = item[0].strip("/").split("/")
    return len(directories), directories, name


def build_iso(path: Path, files: Iterable[tuple[str, Path]], *, volume_id: str,
              extra_files: Iterable[tuple[str, bytes]] = (), joliet: bool = True) -> tuple[int, str]:
    """Write an ISO 9660 image of ``files`` and ``extra_files`` to ``path``; return its size in
    bytes and its SHA-256 (hashed while it is written, else by reading it back).

    ``files`` are (media path, file on disk), e.g. ``("DICOMDIR", staging / "DICOMDIR")`` and
    ``("DICOM/P0000001/S0000001/S0000001/I0000001", spool_file)``; ``extra_files`` are small
    generated files given as bytes (README.TXT, INDEX.HTM, IHE_PDI/...). ``volume_id`` goes to
    the Primary (and Joliet) Volume Descriptor; PS3.12 F.1.1 wants the File-set ID there, so pass
    the DICOMDIR's ``file_set_id``. The image is written beside ``path`` under a temporary name
    and renamed over it, so a rerun never leaves half an image behind.
    """
    if not _VOLUME_ID.fullmatch(volume_id):
        raise ValueError(f"volume ID {volume_id!r} must be at most 32 characters of A-Z, 0-9 and _")
    path = Path(path)
    disc = pycdlib.PyCdlib()
    disc.new(interchange_level=1, vol_ident=volume_id, joliet=3 if joliet else None,
             app_ident_str="DISCFLOW")
    try:
        layout = _Layout(disc, joliet)
        items: list[tuple[str, Path | bytes]] = [(name, Path(source)) for name, source in files]
        items += [(name, bytes(content)) for name, content in extra_files]
        for media_path, source in _conformant_first(items):
            layout.add(media_path, source)
        first_file = layout.commit()
        data_start = disc.get_record(iso_path=first_file).extent_location() * 2048 if first_file else 0
        with atomic_writer(path) as handle:
            writer = _HashingWriter(handle, data_start)
            try:
                disc.write_fp(writer, blocksize=_WRITE_BLOCK)
            finally:
                digest = writer.hexdigest()
    finally:
        disc.close()
    os.chmod(path, 0o644)  # mkstemp made it 0600; burners and viewers run as other users
    return path.stat().st_size, digest or sha256_file(path)


class _HashingWriter:
    """The image file, hashed (SHA-256) as pycdlib writes it, on a thread of its own (hashlib lets
    go of the GIL, so the hash runs on the other core): the image need not be read back.

    pycdlib writes the volume descriptors, path tables and directory records first, in no
    particular order, all before ``data_start`` (the first file's extent): they are kept in memory
    until the file data starts. File data is written front to back when the files were added in
    extent order (:func:`_extent_order`); a gap it seeks over stays zeros. Any other write makes
    :meth:`hexdigest` None, and the caller reads the image back instead.
    """

    def __init__(self, handle: BinaryIO, data_start: int) -> None:
        self._handle = handle
        self._head = bytearray(data_start)
        self._position = 0
        self._hashed = data_start
        self._streaming = False
        self._digest = hashlib.sha256()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self._thread = threading.Thread(target=self._hash, name="iso-sha256", daemon=True)
        self._thread.start()
        self.in_order = True

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._digest.update(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._position = self._handle.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data: bytes) -> int:
        written = self._handle.write(data)
        end = self._position + written
        if self.in_order:
            self._take(data, end)
        self._position = end
        return written

    def _take(self, data: bytes, end: int) -> None:
        """Keep ``data`` (written from the current position to ``end``) for the hash."""
        if not self._streaming and end <= len(self._head):
            self._head[self._position:end] = data
        elif self._position >= self._hashed:
            if not self._streaming:
                self._chunks.put(bytes(self._head))
                self._streaming = True
            for start in range(self._hashed, self._position, _WRITE_BLOCK):  # a gap: zeros on the image
                self._chunks.put(bytes(min(_WRITE_BLOCK, self._position - start)))
            self._chunks.put(data if isinstance(data, bytes) else bytes(data))
            self._hashed = end
        else:
            self.in_order = False

    def hexdigest(self) -> str | None:
        """The image's SHA-256 once written, or None; ends the hashing thread."""
        self._chunks.put(None)
        self._thread.join()
        return self._digest.hexdigest() if self.in_order and self._streaming else None


def read_iso_listing(path: Path) -> list[str]:
    """Every file path in the ISO 9660 tree of the image at ``path``, relative to the root,
    version (``;1``) and the empty-extension dot removed: ``DICOMDIR``, ``DICOM/P0000001/...``."""
    disc = pycdlib.PyCdlib()
    disc.open(os.fspath(path))
    try:
        listing: list[str] = []
        for directory, _dirs, names in disc.walk(iso_path="/"):
            prefix = directory.strip("/")
            for name in names:
                plain = name.split(";", 1)[0]
                if plain.endswith("."):
                    plain = plain[:-1]
                listing.append(f"{prefix}/{plain}" if prefix else plain)
        return sorted(listing)
    finally:
        disc.close()


def build_folder(path: Path, files: Iterable[tuple[str, Path]], *,
                 extra_files: Iterable[tuple[str, bytes]] = ()) -> tuple[int, list[tuple[str, str]]]:
    """Write the same file-set as :func:`build_iso` as a folder tree at ``path`` (a USB volume).

    Media paths are used as they are (the DICOM names are already upper-case 8-character
    components). The tree is written under a temporary name beside ``path`` and renamed over it, so
    a rerun never leaves half a volume. Each file is hashed while it is copied (one read); returns
    the bytes written and ``(media path, SHA-256)`` per file for the checksum manifest.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.part")
    shutil.rmtree(staging, ignore_errors=True)
    items: list[tuple[str, Path | bytes]] = [(name, Path(source)) for name, source in files]
    items += [(name, bytes(content)) for name, content in extra_files]
    seen: set[str] = set()
    digests: list[tuple[str, str]] = []
    total = 0
    for media_path, source in items:
        parts = _split(media_path)
        if "/".join(parts).upper() in seen:
            raise ValueError(f"{media_path} is on the volume twice (or differs from another path only in case)")
        seen.add("/".join(parts).upper())
        target = staging.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = _copy_hashing(source, target)
        digests.append(("/".join(parts), digest))
        total += size
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return total, digests


def _copy_hashing(source: Path | bytes, target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    if isinstance(source, bytes):
        digest.update(source)
        target.write_bytes(source)
        return digest.hexdigest(), len(source)
    size = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_WRITE_BLOCK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
