"""
Safe reading and extraction of ``.difypkg`` zips (``runtimes.md`` §5.1).

A package comes from a tenant and is hostile until proven otherwise: sizes
in zip headers may lie, names may try to escape, entries may be symlinks.
:func:`read_package` decompresses every entry itself under one byte budget,
so the limit holds whatever the headers say.  Everything here is pure and
synchronous; callers run :func:`extract_package` in a thread.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping

from attrs import field, frozen

from difydaemon.errors import MalformedPackageError, PackageTooLargeError, UnsafePackagePathError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8 = 0x800
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 16


@frozen
class PackageFiles(Mapping):
    """
    The files of a package: entry name -> content, in zip (central directory)
    order, plus the archive comment.

    Behaves as a read-only mapping; ``names()`` gives the order explicitly.
    """

    entries: tuple[tuple[str, bytes], ...]
    comment: bytes = b""
    _index: dict = field(init=False, repr=False, eq=False)

    @_index.default
    def _build_index(self) -> dict:
        return dict(self.entries)

    @classmethod
    def from_mapping(cls, files: Mapping[str, bytes], comment: bytes = b"") -> PackageFiles:
        """Files in the mapping's iteration order (tests and the CLI)."""
        return cls(entries=tuple((name, bytes(content)) for name, content in files.items()), comment=comment)

    def names(self) -> list[str]:
        """Entry names in zip order."""
        return [name for name, _ in self.entries]

    def __getitem__(self, name: str) -> bytes:
        return self._index[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def total_size(self) -> int:
        """Sum of the uncompressed sizes of all entries."""
        return sum(len(content) for _, content in self.entries)


def too_large_message(max_size: int) -> str:
    """The Go daemon's text for a package whose content is over the limit."""
    return (
        "plugin package size is too large, please ensure the uncompressed size is less than "
        f"{max_size} bytes"
    )


def check_entry_name(name: str) -> list[str]:
    """
    Refuse an entry name that is not a plain relative ``/``-separated path.

    :returns: the path components.
    :raises UnsafePackagePathError: for directory entries, ``..``, absolute
        names, backslashes, drive letters, empty or ``.`` components, NULs.
    """
    if name.endswith("/"):
        raise UnsafePackagePathError(f"directory entries are not allowed in a plugin package: {name!r}")
    if not name:
        raise UnsafePackagePathError("empty entry name in plugin package")
    if "\\" in name:
        raise UnsafePackagePathError(f"backslash in plugin package entry name: {name!r}")
    if "\x00" in name:
        raise UnsafePackagePathError(f"NUL in plugin package entry name: {name!r}")
    if name.startswith("/"):
        raise UnsafePackagePathError(f"absolute path in plugin package: {name!r}")
    if _DRIVE.match(name):
        raise UnsafePackagePathError(f"drive letter in plugin package entry name: {name!r}")
    parts = name.split("/")
    for part in parts:
        if part == "..":
            raise UnsafePackagePathError(f"illegal file path in plugin package: {name!r}")
        if part in ("", "."):
            raise UnsafePackagePathError(f"irregular file path in plugin package: {name!r}")
    return parts


def _raw_name(info: zipfile.ZipInfo) -> str:
    # zipfile decodes names without the UTF-8 flag as cp437; Go keeps the raw
    # bytes, and the checksum hashes those bytes, so undo the decoding.
    if info.flag_bits & _FLAG_UTF8:
        return info.filename
    raw = info.orig_filename.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPackageError(f"difypkg: entry name is not valid UTF-8: {raw!r}") from None


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


def _entry_data(data: bytes, info: zipfile.ZipInfo, name: str, budget: int, max_size: int) -> bytes:
    """Decompress one entry, never producing more than ``budget`` bytes."""
    offset = info.header_offset
    header = data[offset : offset + _LOCAL_HEADER.size]
    if len(header) != _LOCAL_HEADER.size:
        raise MalformedPackageError(f"difypkg: truncated local header for {name!r}")
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE:
        raise MalformedPackageError(f"difypkg: bad local header for {name!r}")
    start = offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    raw = data[start : start + info.compress_size]
    if len(raw) != info.compress_size:
        raise MalformedPackageError(f"difypkg: truncated data for {name!r}")

    if info.compress_type == zipfile.ZIP_STORED:
        if len(raw) > budget:
            raise PackageTooLargeError(too_large_message(max_size))
        content = raw
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pieces = []
        produced = 0
        # The input goes in in slices: ``unconsumed_tail`` is a copy of what
        # is left of the input given, and giving it all at once made that
        # copy, once per output chunk, quadratic (a 60 MB entry: a minute).
        view = memoryview(raw)
        position = 0
        pending = b""
        try:
            while not inflater.eof:
                if not pending:
                    if position >= len(view):
                        break
                    pending = view[position : position + _CHUNK]
                    position += len(pending)
                # Ask for one byte more than allowed: getting it proves the
                # entry is over the limit without inflating the rest.
                piece = inflater.decompress(pending, min(_CHUNK, budget - produced + 1))
                produced += len(piece)
                if produced > budget:
                    raise PackageTooLargeError(too_large_message(max_size))
                pieces.append(piece)
                pending = inflater.unconsumed_tail
            tail = inflater.flush()
        except zlib.error as error:
            raise MalformedPackageError(f"difypkg: corrupt data for {name!r}: {error}") from None
        produced += len(tail)
        if produced > budget:
            raise PackageTooLargeError(too_large_message(max_size))
        pieces.append(tail)
        content = b"".join(pieces)
    else:
        raise MalformedPackageError(
            f"difypkg: unsupported compression method {info.compress_type} for {name!r}"
        )

    if len(content) != info.file_size:
        raise MalformedPackageError(f"difypkg: size mismatch for {name!r}")
    if zlib.crc32(content) & 0xFFFFFFFF != info.CRC:
        raise MalformedPackageError(f"difypkg: checksum error for {name!r}")
    return content


def read_package(data: bytes, max_size: int) -> PackageFiles:
    """
    Read every entry of a package zip.

    :param data: the zip bytes.
    :param max_size: limit on the zip size and on the total uncompressed size.
    :raises PackageTooLargeError: over the limit (declared or actual).
    :raises MalformedPackageError: not a readable zip.
    :raises UnsafePackagePathError: an entry name or type that could escape.
    """
    if len(data) > max_size:
        raise PackageTooLargeError("file size exceeds the maximum limit")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError, OSError) as error:
        text = str(error).replace("zip", "difypkg").replace("Zip", "difypkg")
        raise MalformedPackageError(f"difypkg: not a valid difypkg file ({text})") from None

    with archive:
        infos = archive.infolist()
        comment = archive.comment
    declared = 0
    names: list[str] = []
    seen: set[str] = set()
    for info in infos:
        name = _raw_name(info)
        check_entry_name(name)
        if _is_symlink(info):
            raise UnsafePackagePathError(f"symbolic links are not allowed in a plugin package: {name!r}")
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise MalformedPackageError(f"difypkg: encrypted entry {name!r}")
        if name in seen:
            raise UnsafePackagePathError(f"duplicate entry in plugin package: {name!r}")
        seen.add(name)
        names.append(name)
        declared += info.file_size
        if declared > max_size:
            raise PackageTooLargeError(too_large_message(max_size))

    entries = []
    used = 0
    for info, name in zip(infos, names):
        content = _entry_data(data, info, name, max_size - used, max_size)
        used += len(content)
        entries.append((name, content))
    return PackageFiles(entries=tuple(entries), comment=comment)


def extract_package(files: PackageFiles, target_dir: str) -> None:
    """
    Write the files under ``target_dir`` (files 0644, directories 0755).

    Blocking: run it in a thread.  On any failure everything this call
    created is removed before the error propagates.

    :raises UnsafePackagePathError: an entry would land outside ``target_dir``.
    """
    created_files: list[str] = []
    created_dirs: list[str] = []
    root = os.path.abspath(target_dir)

    def make_dir(path: str) -> None:
        missing = []
        current = path
        while not os.path.isdir(current):
            if os.path.lexists(current):
                raise UnsafePackagePathError(f"not a directory while extracting: {current!r}")
            missing.append(current)
            current = os.path.dirname(current)
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)
            created_dirs.append(directory)

    try:
        make_dir(root)
        real_root = os.path.realpath(root)
        for name, content in files.entries:
            parts = check_entry_name(name)
            destination = os.path.join(root, *parts)
            parent = os.path.dirname(destination)
            make_dir(parent)
            # A symlinked directory already on disk could still redirect the
            # write; resolve the parent and insist it stays inside the root.
            real_parent = os.path.realpath(parent)
            if os.path.commonpath([real_root, real_parent]) != real_root:
                raise UnsafePackagePathError(f"plugin package entry escapes the target: {name!r}")
            fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            created_files.append(destination)
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o644)
                handle.write(content)
    except BaseException:
        for path in reversed(created_files):
            try:
                os.unlink(path)
            except OSError:
                pass
        for path in reversed(created_dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass
        raise
