"""
The bytecode cache: the ``.pyc`` files of installed distributions, kept
across venvs.

Byte-compiling a fresh venv's site-packages is most of a new plugin's
install time (the SDK's ~1,000 modules take 4-5 s of CPU), yet almost every
plugin installs the same distributions.  So the .pyc files of each installed
distribution are kept, keyed by what decides their content, and linked into
the next venv that installs the same files; only what is new gets compiled.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import posixpath
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator

from attrs import frozen
from twisted.logger import Logger

from difydaemon.runtimes.environment.steps import split_extra_args

log = Logger()

BYTECODE_DIR = "bytecode"
BYTECODE_FORMAT = "1"
DEFAULT_BYTECODE_ENTRIES = 1000

# A staging directory this old belongs to a build that died.
STALE_STAGING_SECONDS = 3600.0
UNLISTED_LABEL = "<unlisted>"

_PYC_HEADER = struct.Struct("<4sIII")
_PYC_NAME = re.compile(r"(.+?)\.[A-Za-z0-9_-]+(?:\.opt-[0-9]+)?\.pyc", re.ASCII | re.DOTALL)
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".trash-"


def bytecode_salt(interpreter: str, compile_extra_args: str | None) -> str:
    """
    What decides a source's ``.pyc`` files besides its content: the cache's
    format, the interpreter, and compileall's extra arguments (``-o``,
    ``--invalidation-mode``...).
    """
    return "\0".join((BYTECODE_FORMAT, interpreter, " ".join(split_extra_args(compile_extra_args))))


def record_sources(record: str) -> list[tuple[str, str]]:
    """
    The ``.py`` files a distribution's ``RECORD`` lists inside site-packages.

    :return: ``(path, hash)`` pairs, the path normalized and relative to
        site-packages, the hash as written (``""`` when the line has none).
        Lines that leave site-packages (``../../../bin/x``) or are absolute
        are left out.
    """
    sources = []
    for row in csv.reader(io.StringIO(record)):
        if not row or not row[0].endswith(".py"):
            continue
        path = posixpath.normpath(row[0])
        if path.startswith("/") or path == ".." or path.startswith("../"):
            continue
        sources.append((path, row[1] if len(row) > 1 else ""))
    return sources


def group_key(salt: str, label: str, digests: Iterable[tuple[str, str]]) -> str:
    """The cache key of a group of sources: the salt, the group's label and every ``(path, content hash)``."""
    digest = hashlib.sha256()
    for part in (salt, label):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    for path, content in sorted(digests):
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0" + content.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def pyc_matches_source(header: bytes, mtime: float, size: int) -> bool:
    """
    Whether a ``.pyc`` header is timestamp-checked and written for a source
    of this mtime and size: the check Python makes before using a ``.pyc``.
    A hash-based ``.pyc`` never matches (the cache does not carry those).
    """
    if len(header) < _PYC_HEADER.size:
        return False
    _magic, flags, pyc_mtime, pyc_size = _PYC_HEADER.unpack_from(header)
    return flags == 0 and pyc_mtime == int(mtime) & 0xFFFFFFFF and pyc_size == size & 0xFFFFFFFF


def pyc_index(names: Iterable[str]) -> dict[str, list[str]]:
    """
    The compiled files of a ``__pycache__`` listing by the stem of their
    source: ``<stem>.<tag>.pyc`` and ``<stem>.<tag>.opt-<n>.pyc`` are filed
    under ``<stem>`` (``<stem>.py`` being the source); other names are left out.
    """
    index: dict[str, list[str]] = {}
    for name in sorted(names):
        match = _PYC_NAME.fullmatch(name)
        if match is not None:
            index.setdefault(match.group(1), []).append(name)
    return index


@frozen
class SourceGroup:
    """
    Sources of site-packages whose ``.pyc`` files are cached together.

    :ivar label: the distribution's ``.dist-info`` directory, or
        :data:`UNLISTED_LABEL` for the files no single ``RECORD`` vouches for.
    :ivar key: the cache key (see :func:`group_key`): ``RECORD`` hashes for a
        distribution, hashes of the files' actual content for the rest.
    :ivar sources: the ``.py`` files, relative to site-packages, ``/``-separated.
    """

    label: str
    key: str
    sources: tuple[str, ...]


@frozen
class BytecodeLinks:
    """
    What :meth:`BytecodeCache.link` did to one site-packages directory.

    :ivar linked: how many ``.pyc`` files it linked from the cache.
    :ivar missing: the sources (relative to site-packages) left without one,
        to be compiled.
    :ivar uncached: the groups the cache did not have, to store once compiled.
    """

    linked: int
    missing: tuple[str, ...]
    uncached: tuple[SourceGroup, ...]


class BytecodeCache:
    """
    The ``.pyc`` files of installed distributions, kept across venvs.

    Each entry is a directory named by a :class:`SourceGroup` key, holding
    that group's ``__pycache__`` files laid out as in site-packages.  An entry
    is built in a staging directory and renamed into place, so readers see
    all of it or nothing, and concurrent builds storing the same group both
    succeed.  Linked files are validated against the new venv's sources the
    way Python validates them (mtime and size, which uv's hard links from its
    cache preserve), so a stale entry costs a compilation, never wrong code.
    Entries are hard links, so the cache may be deleted at any time; it keeps
    at most ``max_entries`` entries, the least recently used going first.

    Every method blocks on the filesystem: call them in a thread pool.

    :param root: the cache directory (created when needed).
    :param clock: the wall clock, compared with file modification times.
    """

    def __init__(self, root: str, max_entries: int = DEFAULT_BYTECODE_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_entries = max_entries
        self._clock = clock

    def scan(self, site_packages: str, salt: str) -> tuple[set[str], list[SourceGroup]]:
        """
        Every ``.py`` file of ``site_packages``, and the groups they are cached by.

        A file goes with its distribution when exactly one ``RECORD`` lists
        it with a hash; any other (listed twice, listed without a hash, not
        listed) goes into the :data:`UNLISTED_LABEL` group, keyed by content.
        """
        present = set(_python_sources(site_packages))
        claims: dict[str, list[tuple[str, str]]] = {}
        for name in sorted(_listdir_or_empty(site_packages)):
            if not name.endswith(".dist-info"):
                continue
            try:
                with open(os.path.join(site_packages, name, "RECORD"), encoding="utf-8") as f:
                    record = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            for path, content in record_sources(record):
                if path in present:
                    claims.setdefault(path, []).append((name, content))
        listed: dict[str, list[tuple[str, str]]] = {}
        unlisted = []
        for path in sorted(present):
            owners = claims.get(path, [])
            if len(owners) == 1 and owners[0][1]:
                listed.setdefault(owners[0][0], []).append((path, owners[0][1]))
            else:
                unlisted.append(path)
        groups = [
            SourceGroup(label, group_key(salt, label, pairs), tuple(path for path, _ in pairs))
            for label, pairs in sorted(listed.items())
        ]
        hashed = []
        for path in unlisted:
            try:
                hashed.append((path, "sha256:" + _file_sha256(os.path.join(site_packages, path))))
            except OSError:
                continue  # left out of every group: it stays missing and gets compiled
        if hashed:
            groups.append(SourceGroup(UNLISTED_LABEL, group_key(salt, UNLISTED_LABEL, hashed), tuple(p for p, _ in hashed)))
        return present, groups

    def link(self, site_packages: str, salt: str) -> BytecodeLinks:
        """
        Link the cached ``.pyc`` files of ``site_packages``'s sources into it.

        A group whose entry is missing, or holds a ``.pyc`` that is not valid
        for this venv's source (uv re-extracted the distribution since), is
        reported as uncached, to be stored again once compiled.
        """
        present, groups = self.scan(site_packages, salt)
        covered: set[str] = set()
        linked = 0
        uncached = []
        for group in groups:
            entry = os.path.join(self.root, group.key)
            if not os.path.isdir(entry):
                uncached.append(group)
                continue
            count, complete = self._link_group(entry, site_packages, group, covered)
            linked += count
            if not complete:
                uncached.append(group)
            elif count:
                try:
                    os.utime(entry)  # the least recently used entries are pruned first
                except OSError:
                    pass
        return BytecodeLinks(linked, tuple(sorted(present - covered)), tuple(uncached))

    def _link_group(self, entry: str, site_packages: str, group: SourceGroup, covered: set[str]) -> tuple[int, bool]:
        """Link one entry's files; how many, and whether every source of the group got its own."""
        listings: dict[str, dict[str, list[str]]] = {}
        created: set[str] = set()
        linked = 0
        complete = True
        for source in group.sources:
            directory, filename = posixpath.split(source)
            cached_dir = os.path.join(entry, directory, "__pycache__")
            if cached_dir not in listings:
                listings[cached_dir] = pyc_index(_listdir_or_empty(cached_dir))
            names = listings[cached_dir].get(filename[:-3])
            if not names or not _pycs_match(cached_dir, names, os.path.join(site_packages, source)):
                complete = False
                continue
            target_dir = os.path.join(site_packages, directory, "__pycache__")
            try:
                if target_dir not in created:
                    os.makedirs(target_dir, exist_ok=True)
                    created.add(target_dir)
                for name in names:
                    _link_or_copy(os.path.join(cached_dir, name), os.path.join(target_dir, name))
                    linked += 1
            except OSError:
                # Pruned under us, or already there (a wheel that ships .pyc
                # files): compileall decides.
                continue
            covered.add(source)
        return linked, complete

    def store(self, site_packages: str, groups: Iterable[SourceGroup]) -> int:
        """
        Keep the freshly compiled ``.pyc`` files of ``groups``; returns how many entries were written.

        A group is kept only when every one of its sources has a ``.pyc``
        that is valid for it, so that an entry never lacks anything.  An
        entry that is not valid for these sources is replaced; one that is
        (a concurrent build stored it) is left alone.
        """
        stored = 0
        for group in groups:
            entry = os.path.join(self.root, group.key)
            if os.path.isdir(entry) and _valid_pycs(entry, site_packages, group) is not None:
                continue
            files = _valid_pycs(site_packages, site_packages, group)
            if not files:
                continue
            os.makedirs(self.root, exist_ok=True)
            staging = self._temporary(_STAGING_PREFIX, group.key)
            created: set[str] = set()
            try:
                for path in files:
                    target = os.path.join(staging, path)
                    if os.path.dirname(target) not in created:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        created.add(os.path.dirname(target))
                    _link_or_copy(os.path.join(site_packages, path), target)
                self._put(staging, entry)
                stored += 1
            except OSError as e:
                log.warn("caching the bytecode of {label} failed: {error}", label=group.label, error=str(e))
            finally:
                if os.path.lexists(staging):
                    shutil.rmtree(staging, ignore_errors=True)
        return stored

    def _put(self, staging: str, entry: str) -> None:
        """Rename ``staging`` to ``entry``, moving any entry already there away first."""
        try:
            os.rename(staging, entry)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        trash = self._temporary(_TRASH_PREFIX, os.path.basename(entry))
        try:
            os.rename(entry, trash)
        except FileNotFoundError:
            pass  # another build moved it away first
        try:
            os.rename(staging, entry)
        except OSError as e:
            # Another build put its own in between: as good as ours.
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)

    def _temporary(self, prefix: str, key: str) -> str:
        return os.path.join(self.root, f"{prefix}{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}")

    def prune(self) -> int:
        """
        Remove the least recently used entries beyond ``max_entries``, and
        what dead builds left behind; returns how many entries were removed.
        """
        now = self._clock()
        entries = []
        for name in _listdir_or_empty(self.root):
            path = os.path.join(self.root, name)
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                continue
            if name.startswith(_TRASH_PREFIX) or (
                name.startswith(_STAGING_PREFIX) and now - mtime > STALE_STAGING_SECONDS
            ):
                shutil.rmtree(path, ignore_errors=True)
            elif not name.startswith("."):
                entries.append((mtime, name))
        entries.sort()
        removed = 0
        for _, name in entries[: max(0, len(entries) - self.max_entries)]:
            # Renamed away before deletion, so no new build finds it half
            # gone; one already linking from it loses files, which only
            # costs compiling them.
            trash = self._temporary(_TRASH_PREFIX, name)
            try:
                os.rename(os.path.join(self.root, name), trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed += 1
        return removed


def _python_sources(site_packages: str) -> Iterator[str]:
    """The ``.py`` files under ``site_packages`` that compileall compiles, relative, ``/``-separated."""
    for directory, dirnames, filenames in os.walk(site_packages):
        dirnames[:] = [name for name in dirnames if name != "__pycache__"]
        relative = os.path.relpath(directory, site_packages)
        for name in filenames:
            if name.endswith(".py"):
                path = name if relative == "." else os.path.join(relative, name)
                yield path.replace(os.sep, "/")


def _pycs_match(cache_dir: str, names: Iterable[str], source: str) -> bool:
    """Whether the ``.pyc`` files ``names`` in ``cache_dir`` are all valid for ``source``."""
    try:
        stat = os.stat(source)
        for name in names:
            with open(os.path.join(cache_dir, name), "rb") as f:
                if not pyc_matches_source(f.read(_PYC_HEADER.size), stat.st_mtime, stat.st_size):
                    return False
    except OSError:
        return False
    return True


def _valid_pycs(root: str, site_packages: str, group: SourceGroup) -> list[str] | None:
    """
    The ``.pyc`` files under ``root`` (site-packages itself, or a cache entry)
    for every source of ``group`` in ``site_packages``, as relative paths; or
    None when a source has none, or one that is not valid for it.
    """
    files = []
    listings: dict[str, dict[str, list[str]]] = {}
    for source in group.sources:
        directory, filename = posixpath.split(source)
        cache_dir = posixpath.join(directory, "__pycache__")
        if cache_dir not in listings:
            listings[cache_dir] = pyc_index(_listdir_or_empty(os.path.join(root, cache_dir)))
        names = listings[cache_dir].get(filename[:-3])
        if not names or not _pycs_match(os.path.join(root, cache_dir), names, os.path.join(site_packages, source)):
            return None
        files += [posixpath.join(cache_dir, name) for name in names]
    return files


def _link_or_copy(source: str, target: str) -> None:
    """
    Hard-link ``source`` as ``target``; copy it (through a temporary name,
    so that no half-written file is ever seen) where links cannot be made.
    An existing ``target`` is an error, not replaced: targets are in a venv or
    a staging directory that only one build writes.
    """
    try:
        os.link(source, target)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "already exists", target)
    temporary = f"{target}.{secrets.token_hex(4)}.tmp"
    try:
        shutil.copyfile(source, temporary)
        os.rename(temporary, target)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _listdir_or_empty(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
