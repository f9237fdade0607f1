"""Read-only access to an imported medium: an ISO 9660 image, a ZIP archive or a folder.

Everything on an outside disc is untrusted. This module never mounts an image, never
follows a link, never executes anything and never writes outside the destination it is
given. It lists every regular file under one normalised, ``/``-separated relative path and
refuses, with a reason that names the entry, whatever could escape the medium or exhaust
the worker:

* names with a ``..`` component, absolute names, drive letters, NUL bytes, backslash
  traversal (``..\\evil``);
* symbolic links (folder: ``lstat``; ZIP: Unix mode in ``external_attr``; ISO: Rock Ridge SL),
  device files, FIFOs and sockets;
* files over a size limit; ZIP entries that are encrypted, use an unsupported compression
  method, or decompress to an absurd multiple of their compressed size (zip bomb).

Refused entries are still listed (``MediaFile.refusal`` is set) so that the scan can report
them, but :meth:`Medium.open` refuses to open them.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.spool import atomic_writer

DEFAULT_MAX_FILE_BYTES = 4 << 30
"""Files larger than this are refused by the medium (a CD holds 700 MB, a DVD 4.7 GB)."""
ZIP_BOMB_RATIO = 100
"""A ZIP entry that inflates to more than this multiple of its compressed size ..."""
ZIP_BOMB_MIN_BYTES = 16 << 20
"""... and to more than this many bytes is refused as a zip bomb."""
MAX_ENTRIES = 500_000
"""More entries than this and the medium is refused as a whole (central directory / tree bomb)."""
MAX_DEPTH = 64
"""Directories nested deeper than this are not walked."""

ISO_MAGIC_OFFSET = 16 * 2048 + 1
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_COPY_CHUNK = 1 << 20


class MediaError(Exception):
    """The medium as a whole is unusable: not an ISO, ZIP or folder, or unreadable."""


class RefusedFile(Exception):
    """One file on the medium cannot be opened or copied; ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class MediaFile:
    path: str
    """Normalised relative path, ``/``-separated (for a refused name: a printable form of it)."""
    size: int
    refusal: str | None = None
    """Why this entry is refused; ``None`` for a file that may be opened."""


def normalise_name(raw: str) -> tuple[str, str | None]:
    """``(normalised path, refusal)`` for an entry name as the medium spells it.

    Backslashes count as separators (Windows tools write them in ZIPs and DICOMDIRs), so
    ``..\\evil`` is caught like ``../evil``. ``.`` and empty components are dropped.
    """
    printable = raw.replace("\x00", "\\x00")
    if "\x00" in raw:
        return printable, "NUL byte in the file name"
    unified = raw.replace("\\", "/")
    if unified.startswith("/"):
        return printable, "absolute path (escapes the media root)"
    if _DRIVE_LETTER.match(unified):
        return printable, "drive letter in the path (escapes the media root)"
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        return printable, "'..' path component (escapes the media root)"
    if not parts:
        return printable or "(empty name)", "empty file name"  # a report must name something
    return "/".join(parts), None


def _component_refusal(name: str) -> str | None:
    """Why one directory entry name (already a single component) is unacceptable."""
    if "\x00" in name:
        return "NUL byte in the file name"
    if "/" in name or "\\" in name:
        return "path separator inside a file name (backslash traversal)"
    if name in ("", ".", ".."):
        return f"'{name}' as a file name (escapes the media root)"
    return None


class Medium(ABC):
    """A medium opened read-only. Use as a context manager or call :meth:`close`."""

    kind: str
    location: Path

    def __init__(self, location: Path, max_file_bytes: int) -> None:
        self.location = location
        self.max_file_bytes = max_file_bytes
        self._entries: dict[str, MediaFile] | None = None
        self._refused: dict[str, MediaFile] = {}
        self._listing: list[MediaFile] = []

    def files(self) -> Iterator[MediaFile]:
        """Every regular file, refused ones included (with ``refusal`` set), listed once."""
        self._ensure_listed()
        yield from self._listing

    def open(self, path: str) -> BinaryIO:
        """A binary, seekable read stream of a listed, not refused file."""
        entry = self._entry(path)
        return self._open(entry)

    def size(self, path: str) -> int:
        return self._entry(path).size

    def close(self) -> None:
        pass

    def __enter__(self) -> "Medium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _entry(self, path: str) -> MediaFile:
        self._ensure_listed()
        assert self._entries is not None
        entry = self._entries.get(path)
        if entry is None:
            refused = self._refused.get(path)
            raise RefusedFile(path, refused.refusal if refused else "not a file listed on this medium")
        if entry.refusal:
            raise RefusedFile(path, entry.refusal)
        return entry

    def _ensure_listed(self) -> None:
        if self._entries is not None:
            return
        entries: dict[str, MediaFile] = {}
        listing: list[MediaFile] = []
        for entry in self._list():
            if len(listing) >= MAX_ENTRIES:
                raise MediaError(f"{self.location}: more than {MAX_ENTRIES} entries; refused as a whole")
            if entry.refusal is None and entry.size > self.max_file_bytes:
                entry = MediaFile(entry.path, entry.size,
                                  f"file is {entry.size} bytes, over the {self.max_file_bytes}-byte limit")
            if entry.refusal is None and entry.path in entries:
                entry = MediaFile(entry.path, entry.size, "second entry with the same name; ignored")
            if entry.refusal is None:
                entries[entry.path] = entry
            else:
                self._refused.setdefault(entry.path, entry)
            listing.append(entry)
        self._entries = entries
        self._listing = listing

    @abstractmethod
    def _list(self) -> Iterator[MediaFile]:
        ...

    @abstractmethod
    def _open(self, entry: MediaFile) -> BinaryIO:
        ...


class FolderMedium(Medium):
    """A mounted disc, a USB stick or an unpacked folder. Symlinks are never followed."""

    kind = "folder"

    def _list(self) -> Iterator[MediaFile]:
        stack: list[tuple[str, int]] = [("", 0)]
        while stack:
            relative, depth = stack.pop()
            directory = self.location / relative if relative else self.location
            try:
                with os.scandir(directory) as scan:
                    children = sorted(scan, key=lambda e: e.name)
            except OSError as exc:
                yield MediaFile(relative or ".", 0, f"unreadable directory: {exc.strerror or exc}")
                continue
            subdirectories = []
            for child in children:
                path = f"{relative}/{child.name}" if relative else child.name
                refusal = _component_refusal(child.name)
                try:
                    info = child.stat(follow_symlinks=False)
                except OSError as exc:
                    yield MediaFile(path, 0, f"cannot stat: {exc.strerror or exc}")
                    continue
                mode = info.st_mode
                if stat.S_ISLNK(mode):
                    try:
                        target = os.readlink(child.path)
                    except OSError:
                        target = "?"
                    yield MediaFile(path, 0, f"symbolic link (to '{target}'); links are never followed")
                elif refusal:
                    yield MediaFile(path, 0, refusal)
                elif stat.S_ISDIR(mode):
                    if depth + 1 > MAX_DEPTH:
                        yield MediaFile(path, 0, f"directory nested deeper than {MAX_DEPTH} levels; not walked")
                    else:
                        subdirectories.append((path, depth + 1))
                elif stat.S_ISREG(mode):
                    yield MediaFile(path, info.st_size)
                else:
                    yield MediaFile(path, 0, f"not a regular file ({_kind_of(mode)})")
            stack.extend(reversed(subdirectories))

    def _open(self, entry: MediaFile) -> BinaryIO:
        # Open component by component beneath the root with O_NOFOLLOW, so that a link
        # swapped in after listing (a writable USB stick) is still refused, and with
        # O_NONBLOCK so that a FIFO swapped in cannot hang the worker.
        parts = entry.path.split("/")
        flags_dir = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        flags_file = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                      | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            directory_fd = os.open(self.location, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise RefusedFile(entry.path, f"cannot open the media root: {exc.strerror or exc}") from exc
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, flags_dir, dir_fd=directory_fd)
                os.close(directory_fd)
                directory_fd = next_fd
            file_fd = os.open(parts[-1], flags_file, dir_fd=directory_fd)
        except OSError as exc:
            raise RefusedFile(entry.path, f"cannot open without following links: {exc.strerror or exc}") from exc
        finally:
            os.close(directory_fd)
        mode = os.fstat(file_fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(file_fd)
            raise RefusedFile(entry.path, f"not a regular file ({_kind_of(mode)})")
        return os.fdopen(file_fd, "rb")


class ZipMedium(Medium):
    """A ZIP archive, e.g. the media archive Orthanc or a PACS web portal makes."""

    kind = "zip"

    def __init__(self, location: Path, max_file_bytes: int) -> None:
        super().__init__(location, max_file_bytes)
        if _central_directory_entries(location, MAX_ENTRIES) > MAX_ENTRIES:
            # Counted first: zipfile builds every entry before anyone can count them (a 28 MB
            # central directory of empty entries costs it 10 s and 260 MB; a DVD-sized one, the worker).
            raise MediaError(f"{location}: more than {MAX_ENTRIES} entries; refused as a whole")
        try:
            self._zip = zipfile.ZipFile(location)
        except Exception as exc:  # noqa: BLE001 - a hostile central directory
            raise MediaError(f"{location}: not a readable ZIP archive: {type(exc).__name__}: {exc}") from exc
        self._infos: dict[str, zipfile.ZipInfo] = {}

    def _list(self) -> Iterator[MediaFile]:
        for info in self._zip.infolist():
            raw = info.orig_filename  # zipfile's own .filename has NUL and what follows cut off
            if raw.endswith("/") and "\x00" not in raw:
                continue  # a directory entry
            path, refusal = normalise_name(raw)
            mode = (info.external_attr >> 16) & 0xFFFF
            if refusal is None and info.create_system == 3 and mode:
                if stat.S_ISLNK(mode):
                    refusal = "symbolic link entry; links are never followed"
                elif stat.S_ISDIR(mode):
                    continue
                elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    refusal = f"not a regular file ({_kind_of(mode)})"
            if refusal is None and info.flag_bits & 0x1:
                refusal = "encrypted entry"
            if refusal is None and info.compress_type not in _ZIP_METHODS:
                refusal = f"unsupported compression method {info.compress_type}"
            if refusal is None and info.file_size > ZIP_BOMB_MIN_BYTES and (
                    info.file_size > ZIP_BOMB_RATIO * max(info.compress_size, 1)):
                refusal = (f"zip bomb: inflates {info.compress_size} bytes to {info.file_size} bytes "
                           f"(more than {ZIP_BOMB_RATIO}x)")
            if refusal is None and path not in self._infos:
                self._infos[path] = info
            yield MediaFile(path, info.file_size, refusal)

    def _open(self, entry: MediaFile) -> BinaryIO:
        try:
            return self._zip.open(self._infos[entry.path])  # by ZipInfo: never by a (duplicate) name
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, ValueError) as exc:
            raise RefusedFile(entry.path, f"unreadable ZIP entry: {exc}") from exc

    def close(self) -> None:
        self._zip.close()


def _central_directory_entries(location: Path, limit: int) -> int:
    """How many entries ``zipfile`` would read from the central directory (counted up to
    ``limit + 1``, walking it as zipfile does, without building them); 0 when that cannot be told
    (zipfile then gives its own verdict)."""
    try:
        with open(location, "rb") as handle:
            end = zipfile._EndRecData(handle)  # zipfile's own reading of the end records (zip64 too)
            if not end:
                return 0
            size = end[zipfile._ECD_SIZE]
            start = end[zipfile._ECD_LOCATION] - size  # where zipfile starts reading (its start_dir)
            if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:
                start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
            if start < 0:
                return 0
            handle.seek(start)
            count = walked = 0
            while walked < size and count <= limit:
                header = handle.read(46)
                if len(header) < 46 or header[:4] != b"PK\x01\x02":
                    break
                variable = sum(struct.unpack_from("<HHH", header, 28))  # name, extra field, comment
                handle.seek(variable, 1)
                walked += 46 + variable
                count += 1
            return count
    except (OSError, ValueError, struct.error, AttributeError):  # AttributeError: a Python without them
        return 0


class IsoMedium(Medium):
    """An ISO 9660 image, read with pycdlib (never mounted).

    Names come from Rock Ridge when present (case, long names, and link/device
    information), else Joliet, else ISO 9660 with the ``;1`` version and trailing dot cut.
    The directory tree is read once; every file keeps its directory record, so opening a
    file costs no lookup.
    """

    kind = "iso"

    def __init__(self, location: Path, max_file_bytes: int) -> None:
        super().__init__(location, max_file_bytes)
        import pycdlib

        self._iso = pycdlib.PyCdlib()
        try:
            self._iso.open(str(location))
        except Exception as exc:  # noqa: BLE001 - pycdlib parsing a hostile image raises anything (struct.error ...)
            raise MediaError(f"{location}: not a readable ISO 9660 image: {type(exc).__name__}: {exc}") from exc
        if self._iso.has_rock_ridge():
            self.name_source = "rr_path"
        elif self._iso.has_joliet():
            self.name_source = "joliet_path"
        else:
            self.name_source = "iso_path"
        self._records: dict[str, object] = {}

    def _name_of(self, record) -> str:
        if self.name_source == "rr_path" and record.rock_ridge is not None:
            return record.rock_ridge.name().decode("utf-8", "surrogateescape")
        raw = record.file_identifier()  # (a record without Rock Ridge on a Rock Ridge image: its ISO 9660 name)
        if self.name_source == "joliet_path":
            name = raw.decode("utf-16_be", "surrogatepass")
        else:
            name = raw.decode("latin-1")
        if not record.is_dir():
            name = re.sub(r";\d*$", "", name)
            if name.endswith(".") and name != ".":
                name = name[:-1]
        return name

    def _list(self) -> Iterator[MediaFile]:

        # Children are read from the records themselves, starting at the root: one pass
        # over the tree, no path lookups.
        stack: list[tuple[str, str, int]] = [("", "/", 0)]
        while stack:
            relative, lookup, depth = stack.pop()
            try:
                children = list(self._iso.list_children(**{self.name_source: lookup}))
            except Exception as exc:  # noqa: BLE001 - hostile directory records
                yield MediaFile(relative or ".", 0, f"unreadable directory: {type(exc).__name__}: {exc}")
                continue
            subdirectories = []
            for record in children:
                if record is None or record.is_dot() or record.is_dotdot():
                    continue
                try:
                    name = self._name_of(record)
                except Exception as exc:  # noqa: BLE001 - hostile name records
                    yield MediaFile(f"{relative}/?" if relative else "?", 0, f"unreadable name: {exc}")
                    continue
                path = f"{relative}/{name}" if relative else name
                shown = path.replace("\x00", "\\x00") or "(empty name)"
                refusal = _component_refusal(name)
                if refusal:
                    yield MediaFile(shown, 0, refusal)
                    continue
                if record.is_symlink():
                    try:
                        target = record.rock_ridge.symlink_path().decode("utf-8", "replace")
                    except Exception:  # noqa: BLE001 - hostile SL records
                        target = "?"
                    yield MediaFile(path, 0, f"symbolic link (to '{target}'); links are never followed")
                    continue
                mode = self._rock_ridge_mode(record)
                if record.is_dir():
                    if depth + 1 > MAX_DEPTH:
                        yield MediaFile(path, 0, f"directory nested deeper than {MAX_DEPTH} levels; not walked")
                    else:
                        subdirectories.append((path, self._lookup_child(lookup, record, name), depth + 1))
                    continue
                if mode is not None and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                    yield MediaFile(path, 0, f"not a regular file ({_kind_of(mode)})")
                    continue
                try:
                    size = record.get_data_length()
                except Exception as exc:  # noqa: BLE001
                    yield MediaFile(path, 0, f"unreadable directory record: {exc}")
                    continue
                self._records[path] = record
                yield MediaFile(path, size)
            stack.extend(reversed(subdirectories))

    def _lookup_child(self, lookup: str, record, name: str) -> str:
        if self.name_source == "iso_path":
            component = record.file_identifier().decode("latin-1")
        else:
            component = name
        return f"{lookup.rstrip('/')}/{component}"

    @staticmethod
    def _rock_ridge_mode(record) -> int | None:
        if record.rock_ridge is None:
            return None
        try:
            return record.rock_ridge.get_file_mode()
        except Exception:  # noqa: BLE001 - no PX record
            return None

    def _open(self, entry: MediaFile) -> BinaryIO:
        from pycdlib import pycdlibio

        record = self._records[entry.path]
        if entry.size == 0 or getattr(record, "inode", None) is None:
            return io.BytesIO(b"")
        # What PyCdlib.open_file_from_iso does, minus the path lookup.
        raw = pycdlibio.PyCdlibIO(record.inode, self._iso.logical_block_size)
        raw.__enter__()
        return io.BufferedReader(raw, buffer_size=64 << 10)

    def close(self) -> None:
        try:
            self._iso.close()
        except Exception:  # noqa: BLE001 - closing a half-opened image
            pass


def opened_medium(location: Path | str, medium: Medium | None = None) -> AbstractContextManager[Medium]:
    """``medium`` itself when the caller holds it open already (left open), else the medium at
    ``location``, opened for the ``with`` block."""
    return nullcontext(medium) if medium is not None else open_medium(location)


def open_medium(location: Path | str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Medium:
    """Open a folder, an ISO 9660 image or a ZIP archive, told apart by content, not by name."""
    location = Path(location)
    try:
        if location.is_dir():
            return _listed(FolderMedium(location, max_file_bytes))
        if not location.is_file():
            raise MediaError(f"{location}: no such file or folder")
        with open(location, "rb") as handle:
            head = handle.read(4)
            handle.seek(ISO_MAGIC_OFFSET)
            iso_magic = handle.read(5)
    except OSError as exc:
        raise MediaError(f"{location}: unreadable: {exc.strerror or exc}") from exc
    if iso_magic == b"CD001":
        medium: Medium = IsoMedium(location, max_file_bytes)
    elif head[:2] == b"PK" or zipfile.is_zipfile(location):
        medium = ZipMedium(location, max_file_bytes)
    else:
        raise MediaError(f"{location}: neither a folder, an ISO 9660 image nor a ZIP archive")
    return _listed(medium)


def _listed(medium: Medium) -> Medium:
    """List the medium now, so that a medium unusable as a whole fails here, not mid-scan."""
    try:
        medium._ensure_listed()
    except BaseException:
        medium.close()
        raise
    return medium


def extract(medium: Medium, path: str, destination: Path, *, max_bytes: int) -> int:
    """Copy one file off the medium to ``destination`` (temp name, then rename).

    Streams with a byte cap: a file that turns out longer than ``max_bytes`` (or than the
    medium said) is refused and nothing is left at ``destination``. Returns bytes copied.
    """
    expected = medium.size(path)
    if expected > max_bytes:
        raise RefusedFile(path, f"file is {expected} bytes, over the {max_bytes}-byte limit")
    copied = 0
    with medium.open(path) as source, atomic_writer(Path(destination)) as target:
        try:
            while True:
                chunk = source.read(min(_COPY_CHUNK, max_bytes + 1 - copied))
                if not chunk:
                    break
                copied += len(chunk)
                if copied > max_bytes or copied > expected:
                    raise RefusedFile(path, f"holds more than the {min(max_bytes, expected)} bytes it declared")
                target.write(chunk)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise RefusedFile(path, f"unreadable: {exc}") from exc
        if copied != expected:
            raise RefusedFile(path, f"holds {copied} bytes, not the {expected} it declared")
    return copied


def _kind_of(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    return f"mode {oct(mode)}"
