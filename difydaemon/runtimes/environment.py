"""
The Python environment of a local plugin (``runtimes.md`` §1.2–§1.3).

A plugin's working directory gets a ``.venv`` built with uv: ``uv venv``, then
``uv pip install -r requirements.txt`` or ``uv sync``, then byte-compilation,
then the marker ``.venv/dify/plugin.json`` that says the venv is complete.
Every step is a child process spawned on the injected reactor, watched for
inactivity and for total duration; a failed step raises an
:class:`~difydaemon.errors.InternalServerError` that names the step and
carries the end of its output.

Two caches make later builds cheap: prepared venvs (a finished venv per set
of dependency files, copied as hard links) and :class:`BytecodeCache` (the
``.pyc`` files of each installed distribution, so that a new set of
dependencies compiles only the distributions no earlier build had).  Both
are filled in the background once a build is done.

The pure parts (working directory naming, dependency file choice, command
lines, the replaced environment, output tails, ``RECORD`` and ``.pyc``
headers) are module functions so that they can be tested without spawning
anything.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

from attrs import field, frozen
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, DeferredSemaphore
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from difydaemon.errors import InternalServerError
from difydaemon.packaging.identifier import PluginIdentifier, parse_identifier
from difydaemon.runtimes.child_environment import plugin_environment, uv_environment
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv

log = Logger()

VENV_DIR = ".venv"
VENV_PYTHON = os.path.join(VENV_DIR, "bin", "python")
MARKER_PATH = os.path.join(VENV_DIR, "dify", "plugin.json")
DEFAULT_RUNNER_VERSION = "3.12"
REQUIREMENTS_TXT = "requirements.txt"
PYPROJECT_TOML = "pyproject.toml"
UV_LOCK = "uv.lock"
TAIL_BYTES = 2048

_RUNNER_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})(?:\.\d{1,4})?", re.ASCII)
_UV_TRACING_LINE = re.compile(rb"^\s*(?:[\d.]+s\s+)?(?:TRACE|DEBUG)\s")
_VERSION_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"
_PROBE_TIMEOUT = 30.0


# -- pure parts --------------------------------------------------------------


def working_dir_for(working_path: str, identifier: str | PluginIdentifier) -> str:
    """
    The directory a plugin is unpacked into and run from.

    ``$PLUGIN_WORKING_PATH/<author>/<name>-<version>@<checksum>``: the identity
    ``author/name:version`` with ``:`` replaced by ``-``, so the author is a
    directory level (``runtimes.md`` §1.2).  An identifier without an author
    lives directly under ``working_path``.

    :raises UniqueIdentifierError: when ``identifier`` breaks the grammar,
        which also keeps ``..`` and absolute parts out of the path.
    """
    parsed = identifier if isinstance(identifier, PluginIdentifier) else parse_identifier(identifier)
    leaf = f"{parsed.name}-{parsed.version}@{parsed.checksum}"
    if parsed.author is None:
        return os.path.join(working_path, leaf)
    return os.path.join(working_path, parsed.author, leaf)


def runner_version(version: str | None) -> str:
    """
    The ``major.minor`` Python version a manifest's ``meta.runner.version`` asks for.

    Empty means 3.12, the only version the Go daemon ever uses; a patch part
    is dropped.

    :raises InternalServerError: when the text is not a Python version.
    """
    text = (version or "").strip()
    if not text:
        return DEFAULT_RUNNER_VERSION
    match = _RUNNER_VERSION.fullmatch(text)
    if match is None:
        raise InternalServerError(f"meta.runner.version {text!r} is not a Python version")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def choose_dependency_file(present: Collection[str], pip_mirror_url: str | None) -> str:
    """
    The dependency file to install from, given the names present in the working directory.

    ``requirements.txt`` when a mirror is set and it exists; otherwise
    ``pyproject.toml`` first, then ``requirements.txt`` (``runtimes.md`` §1.3
    step 5).

    :raises InternalServerError: when neither file is present.
    """
    if pip_mirror_url and REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    if PYPROJECT_TOML in present:
        return PYPROJECT_TOML
    if REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    raise InternalServerError(f"the plugin has neither {PYPROJECT_TOML} nor {REQUIREMENTS_TXT}")


def install_environment(
    environ: Mapping[str, str],
    working_dir: str,
    uv_cache_dir: str,
    proxies: Mapping[str, str],
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """
    The whole environment of the uv steps: it replaces the daemon's, it does not extend it.

    The allow-listed variables and uv's own ``UV_*`` ones
    (:func:`~difydaemon.runtimes.child_environment.uv_environment`), then
    ``VIRTUAL_ENV`` and ``UV_CACHE_DIR`` (shared by all plugins).  Notably
    ``PYTHONDONTWRITEBYTECODE`` and the daemon's secrets never reach the build.

    :param environ: the daemon's environment.
    :param proxies: resolved proxy variables; empty values are left out.
    :param passthrough: the names listed in ``PLUGIN_ENV_PASSTHROUGH``.
    """
    env = uv_environment(environ, proxies, passthrough)
    env.setdefault("PATH", os.defpath)
    env["VIRTUAL_ENV"] = os.path.join(working_dir, VENV_DIR)
    env["UV_CACHE_DIR"] = uv_cache_dir
    return env


def split_extra_args(text: str | None) -> list[str]:
    """Extra command-line arguments from a configuration string, split on whitespace."""
    return (text or "").split()


@frozen
class StepCommand:
    """
    One child process of a build.

    :ivar step: what the step does, in words (``"installing dependencies"``).
    :ivar argv: the command line, ``argv[0]`` being the executable's path.
    :ivar env: the child's whole environment.
    :ivar path: the child's working directory.
    :ivar watch_inactivity: whether silence for ``init_timeout`` kills it.
        ``compileall -q`` is silent by design, so its steps only get the total time-out.
    :ivar required: whether a failure fails the build; byte-compilation is
        best effort, since some wheels ship files that do not compile.
    """

    step: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)
    path: str
    watch_inactivity: bool = True
    required: bool = True


def venv_command(uv: str, working_dir: str, interpreter: str, env: Mapping[str, str]) -> StepCommand:
    """``uv venv .venv --python <interpreter>`` in the working directory."""
    return StepCommand(
        step="creating venv",
        argv=(uv, "venv", VENV_DIR, "--python", interpreter),
        env=env,
        path=working_dir,
    )


def install_command(
    uv: str,
    working_dir: str,
    dependency_file: str,
    env: Mapping[str, str],
    *,
    pip_mirror_url: str | None,
    pip_extra_args: str | None,
    pip_verbose: bool,
    frozen_lock: bool,
) -> StepCommand:
    """
    The dependency installation of ``runtimes.md`` §1.3 step 6.

    :param frozen_lock: whether ``uv sync`` gets ``--frozen`` (a ``uv.lock``
        exists and ``PLUGIN_IGNORE_UV_LOCK`` is off); only for ``pyproject.toml``.
    """
    extra = split_extra_args(pip_extra_args)
    if dependency_file == REQUIREMENTS_TXT:
        argv = [uv, "pip", "install"]
        if pip_mirror_url:
            argv += ["-i", pip_mirror_url]
        argv += ["-r", REQUIREMENTS_TXT]
        if pip_verbose:
            argv.append("-vvv")
        argv += extra
    elif dependency_file == PYPROJECT_TOML:
        argv = [uv, "sync", "--no-dev"]
        if frozen_lock:
            argv.append("--frozen")
        if pip_mirror_url:
            argv += ["-i", pip_mirror_url]
        if pip_verbose:
            argv.append("-v")
        # Whether the lock is honoured is decided above, not by extra args.
        argv += [arg for arg in extra if arg != "--frozen"]
    else:
        raise ValueError(f"unknown dependency file {dependency_file!r}")
    return StepCommand(
        step=f"installing dependencies from {dependency_file}",
        argv=tuple(argv),
        env=env,
        path=working_dir,
    )


def plugin_compile_command(working_dir: str, env: Mapping[str, str], compile_extra_args: str | None) -> StepCommand:
    """
    Byte-compilation of the plugin's own files (everything but the venv), as
    the Go daemon does it (``runtimes.md`` §1.3 step 7).

    ``compileall`` writes ``.pyc`` files whatever ``PYTHONDONTWRITEBYTECODE``
    says, and the build environment does not carry that variable anyway.
    """
    python = os.path.join(working_dir, VENV_PYTHON)
    return StepCommand(
        step="byte-compiling the plugin",
        argv=(python, "-m", "compileall", "-q", *split_extra_args(compile_extra_args), "-x", r"\.venv|\.uv-cache", "."),
        env=env,
        path=working_dir,
        watch_inactivity=False,
        required=False,
    )


def site_packages_compile_command(
    working_dir: str,
    site_packages: Sequence[str],
    env: Mapping[str, str],
    compile_extra_args: str | None,
    missing: Sequence[str] | None = None,
) -> StepCommand | None:
    """
    Byte-compilation of the venv's site-packages, or of the part of it the
    bytecode cache did not provide.

    Without it a plugin cold-starts in about 3 s instead of about 1.2 s.

    :param site_packages: the site-packages directories, relative to ``working_dir``.
    :param missing: the sources still to compile, relative to ``working_dir``;
        None means all of site-packages.
    :return: None when there is nothing to compile.
    """
    python = os.path.join(working_dir, VENV_PYTHON)
    extra = split_extra_args(compile_extra_args)
    if not site_packages or missing is not None and not missing:
        return None
    if missing is not None and len(missing) <= SEQUENTIAL_COMPILE_LIMIT:
        return StepCommand(
            step=f"byte-compiling {len(missing)} files of site-packages",
            argv=(python, "-m", "compileall", "-q", *extra, *missing),
            env=env,
            path=working_dir,
            watch_inactivity=False,
            required=False,
        )
    return StepCommand(
        step="byte-compiling site-packages",
        # One worker per core: site-packages is most of the build's time,
        # and two free cores cut it by about a third.  Files whose .pyc is
        # already valid (linked from the cache) are only checked.
        argv=(python, "-m", "compileall", "-q", "-j", "0", *extra, *site_packages),
        env=env,
        path=working_dir,
        watch_inactivity=False,
        required=False,
    )


def compile_commands(
    working_dir: str,
    site_packages: Sequence[str],
    env: Mapping[str, str],
    compile_extra_args: str | None,
) -> list[StepCommand]:
    """
    Byte-compilation of the plugin's own files and of all of the venv's
    site-packages (see :func:`plugin_compile_command` and
    :func:`site_packages_compile_command`).
    """
    commands = [plugin_compile_command(working_dir, env, compile_extra_args)]
    site = site_packages_compile_command(working_dir, site_packages, env, compile_extra_args)
    if site is not None:
        commands.append(site)
    return commands


def marker_content(timestamp: float) -> bytes:
    """The content of ``.venv/dify/plugin.json``: ``{"timestamp":<unix seconds>}``."""
    return json.dumps({"timestamp": int(timestamp)}, separators=(",", ":")).encode("ascii")


def venv_is_valid(working_dir: str) -> bool:
    """Whether ``.venv``, ``.venv/bin/python`` and the marker all exist."""
    return (
        os.path.isdir(os.path.join(working_dir, VENV_DIR))
        and os.path.exists(os.path.join(working_dir, VENV_PYTHON))
        and os.path.isfile(os.path.join(working_dir, MARKER_PATH))
    )


class OutputTail:
    """
    The last few KiB of a step's output, for error messages.

    Bytes arrive in arbitrary pieces; only whole lines are kept, and uv's
    ``DEBUG``/``TRACE`` lines (``-v``, ``-vvv``) are dropped so that its
    final complaint is what remains.
    """

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._limit = limit
        self._partial = b""
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Add a piece of output."""
        pieces = (self._partial + data).split(b"\n")
        self._partial = pieces.pop()
        if len(self._partial) > self._limit:
            self._partial = self._partial[-self._limit :]
        for line in pieces:
            self._keep(line)

    def _keep(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.strip() or _UV_TRACING_LINE.match(line):
            return
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.pop(0)) + 1

    def text(self) -> str:
        """The kept lines (and any unfinished last line), at most about ``limit`` bytes."""
        lines = list(self._lines)
        if self._partial.strip() and not _UV_TRACING_LINE.match(self._partial):
            lines.append(self._partial)
        joined = b"\n".join(lines)
        if len(joined) > self._limit:
            joined = joined[-self._limit :]
        return joined.decode("utf-8", errors="replace").strip()


@frozen
class StepOutcome:
    """
    How a step's process ended.

    :ivar exit_code: the exit status, or None when a signal ended it.
    :ivar signal: the signal number, or None.
    :ivar tail: the end of its output (see :class:`OutputTail`).
    :ivar timed_out: why the watchdog killed it, or None.
    """

    exit_code: int | None
    signal: int | None
    tail: str
    timed_out: str | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the process exited 0 by itself."""
        return self.timed_out is None and self.exit_code == 0


def failure_message(step: str, outcome: StepOutcome) -> str:
    """The error text of a failed step: what failed, how, and the end of its output."""
    if outcome.timed_out is not None:
        how = f"{step} timed out ({outcome.timed_out})"
    elif outcome.exit_code is not None:
        how = f"{step} failed (exit {outcome.exit_code})"
    else:
        how = f"{step} failed (signal {outcome.signal})"
    if outcome.tail:
        return f"{how}:\n{outcome.tail}"
    return f"{how}, without output"


# -- cached bytecode ---------------------------------------------------------
#
# Byte-compiling a fresh venv's site-packages is most of a new plugin's
# install time (the SDK's ~1,000 modules take 4-5 s of CPU), yet almost every
# plugin installs the same distributions.  So the .pyc files of each installed
# distribution are kept, keyed by what decides their content, and linked into
# the next venv that installs the same files; only what is new gets compiled.

BYTECODE_DIR = "bytecode"
BYTECODE_FORMAT = "1"
DEFAULT_BYTECODE_ENTRIES = 1000
# Up to this many files, compiling them one by one beats starting compileall's
# process pool (about 0.3-0.5 s here) and re-checking all of site-packages.
SEQUENTIAL_COMPILE_LIMIT = 200
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


# -- finding executables -----------------------------------------------------


def find_uv(uv_path: str | None) -> str:
    """
    The uv executable: ``UV_PATH``, else the binary of the ``uv`` package
    installed with the daemon, else ``uv`` on ``PATH``.

    :raises InternalServerError: when none is found, or ``uv_path`` is not executable.
    """
    if uv_path:
        if not _is_executable(uv_path):
            raise InternalServerError(f"UV_PATH {uv_path!r} is not an executable file")
        return uv_path
    try:
        import uv as uv_package

        return uv_package.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise InternalServerError("uv not found: set UV_PATH or install the uv package")
    return found


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _pyenv_versions(pyenv_root: str, version: str) -> list[str]:
    """``<root>/versions/<version>[.N]/bin/python<version>``, newest patch first."""
    versions_dir = os.path.join(pyenv_root, "versions")
    try:
        names = os.listdir(versions_dir)
    except OSError:
        return []
    pattern = re.compile(re.escape(version) + r"(?:\.(\d+))?", re.ASCII)
    matching = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            matching.append((int(match.group(1) or -1), name))
    matching.sort(reverse=True)
    return [os.path.join(versions_dir, name, "bin", f"python{version}") for _, name in matching]


def interpreter_candidates(
    version: str,
    environ: Mapping[str, str],
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
) -> list[str]:
    """
    Executables that should be Python ``version``, in the order they are tried.

    ``python<version>`` on ``PATH``, then pyenv's ``versions/<version>.*``
    (root from ``$PYENV_ROOT``, else ``~/.pyenv``), then ``search_dirs``.
    Only existing executables are listed, each once.  Names can lie (a pyenv
    shim fails when the version is not selected), so each is asked later.
    """
    name = f"python{version}"
    paths = [os.path.join(d, name) for d in environ.get("PATH", "").split(os.pathsep) if d]
    home = environ.get("HOME") or os.path.expanduser("~")
    pyenv_root = environ.get("PYENV_ROOT") or os.path.join(home, ".pyenv")
    paths += _pyenv_versions(pyenv_root, version)
    paths += [os.path.join(d, name) for d in search_dirs]
    seen: set[str] = set()
    candidates = []
    for path in paths:
        if path not in seen and _is_executable(path):
            seen.add(path)
            candidates.append(path)
    return candidates


async def find_interpreter(
    reactor,
    version: str,
    configured_path: str | None,
    environ: Mapping[str, str] | None = None,
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
    parent_death: ParentDeathSignal | None = None,
) -> str:
    """
    A Python interpreter of ``version`` (``"3.12"``) on this machine.

    ``configured_path`` (``PYTHON_INTERPRETER_PATH``) wins if it is that
    version; otherwise the :func:`interpreter_candidates` are tried.  Each is
    asked its version by running it (through ``parent_death`` when given),
    on the reactor, never blocking it.

    :raises InternalServerError: naming the version when none is found.
    """
    environ = os.environ if environ is None else environ
    candidates = interpreter_candidates(version, environ, search_dirs)
    if configured_path:
        candidates.insert(0, configured_path)
    probe_env = {key: value for key, value in environ.items() if key in ("PATH", "HOME", "PYENV_ROOT")}
    for candidate in candidates:
        if not _is_executable(candidate):
            continue
        outcome = await run_step(
            reactor,
            StepCommand(
                step=f"asking {candidate} its version",
                argv=(candidate, "-c", _VERSION_PROBE),
                env=probe_env,
                path="/",
            ),
            _PROBE_TIMEOUT,
            _PROBE_TIMEOUT,
            parent_death,
        )
        if outcome.succeeded and outcome.tail.splitlines()[-1:] == [version]:
            return candidate
    raise InternalServerError(
        f"no Python {version} interpreter found for the plugin runner "
        f"(tried PYTHON_INTERPRETER_PATH, PATH, pyenv and {', '.join(search_dirs)})"
    )


# -- running steps -----------------------------------------------------------


class _StepProtocol(ProcessProtocol):
    """Collects a step's output tail and kills it when the watchdog fires."""

    def __init__(self, reactor, inactivity_timeout: float | None, total_timeout: float) -> None:
        self.ended: Deferred[StepOutcome] = Deferred()
        self._reactor = reactor
        self._inactivity_timeout = inactivity_timeout
        self._total_timeout = total_timeout
        self._tail = OutputTail()
        self._timed_out: str | None = None
        self._idle_call = None
        self._total_call = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        if self._inactivity_timeout is not None:
            self._idle_call = self._reactor.callLater(
                self._inactivity_timeout,
                self._kill,
                f"no output for {self._inactivity_timeout:g} s",
            )
        self._total_call = self._reactor.callLater(
            self._total_timeout, self._kill, f"still running after {self._total_timeout:g} s"
        )

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._tail.feed(data)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._inactivity_timeout)

    def _kill(self, why: str) -> None:
        self._timed_out = why
        for call in (self._idle_call, self._total_call):
            if call is not None and call.active():
                call.cancel()
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A grandchild (a build backend) may still hold the pipes open;
        # closing our ends lets processEnded fire once the child is reaped.
        self.transport.loseConnection()

    def processEnded(self, reason) -> None:
        for call in (self._idle_call, self._total_call):
            if call is not None and call.active():
                call.cancel()
        self.ended.callback(
            StepOutcome(
                exit_code=getattr(reason.value, "exitCode", None),
                signal=getattr(reason.value, "signal", None),
                tail=self._tail.text(),
                timed_out=self._timed_out,
            )
        )


async def run_step(
    reactor,
    command: StepCommand,
    inactivity_timeout: float,
    total_timeout: float,
    parent_death: ParentDeathSignal | None = None,
) -> StepOutcome:
    """
    Run one step as a child process on ``reactor`` and report how it ended.

    :param inactivity_timeout: seconds of silence on stdout and stderr before
        the child is killed (ignored unless ``command.watch_inactivity``).
    :param total_timeout: seconds before the child is killed regardless.
    :param parent_death: the launcher that makes the child die with the
        daemon; None starts it directly.
    """
    protocol = _StepProtocol(
        reactor,
        inactivity_timeout if command.watch_inactivity else None,
        total_timeout,
    )
    argv = child_argv(parent_death, command.argv)
    reactor.spawnProcess(protocol, argv[0], argv, env=dict(command.env), path=command.path)
    return await protocol.ended


# -- the builder -------------------------------------------------------------


class PythonEnvironmentBuilder:
    """
    Builds (or reuses) the ``.venv`` of local plugins' working directories.

    Builds of one working directory are serialized; builds of different ones
    run in parallel, bounded by ``launch_semaphore`` when one is given
    (``PLUGIN_LOCAL_LAUNCHING_CONCURRENT``).  A caller that already holds that
    semaphore around the whole launch must not pass it here as well.

    :param uv_path: the uv executable (see :func:`find_uv`).
    :param uv_cache_dir: ``UV_CACHE_DIR`` shared by every plugin
        (``$PLUGIN_WORKING_PATH/.uv-cache`` in the daemon).
    :param prefer_binary: ``PIP_PREFER_BINARY``; accepted for configuration
        parity, but uv has no such option (uv already prefers wheels), so it
        changes nothing, as in the Go daemon's uv path.
    :param proxies: ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` to values.
    :param init_timeout: ``PYTHON_ENV_INIT_TIMEOUT``: seconds of silence
        after which a step is killed.
    :param total_timeout: seconds after which any one step is killed.
    :param python_interpreter_path: ``PYTHON_INTERPRETER_PATH``, used when it
        is the version the plugin asks for.
    :param environ: the daemon's environment, of which the steps get only
        what :func:`install_environment` (uv) and
        :func:`~difydaemon.runtimes.child_environment.plugin_environment`
        (the venv's Python) allow.
    :param passthrough: the names listed in ``PLUGIN_ENV_PASSTHROUGH``.
    :param parent_death: the launcher that makes every step die with the
        daemon (:func:`~difydaemon.runtimes.parent_death.parent_death_signal`);
        None starts them directly.
    :param threadpool: where blocking work runs (deleting an invalid venv,
        the caches' file work); the reactor's own thread pool by default.
    :param prepared_venvs_dir: where finished, byte-compiled venvs are kept,
        keyed by everything that decides their content (interpreter,
        dependency files, index and extra arguments).  A plugin whose key is
        there gets a hard-linked copy in milliseconds instead of an install
        and a site-packages compilation (seconds); None disables it.  Its
        ``bytecode`` directory is a :class:`BytecodeCache`: a plugin with a
        new dependency set gets the ``.pyc`` files of every distribution
        an earlier plugin installed, and compiles only the rest.  Both are
        filled in the background after a fresh build (see :meth:`settled`).
    :param bytecode_entries: how many distributions' bytecode is kept.
    """

    def __init__(
        self,
        reactor,
        uv_path: str,
        uv_cache_dir: str,
        pip_mirror_url: str | None = None,
        pip_extra_args: str | None = None,
        pip_verbose: bool = False,
        prefer_binary: bool = True,
        proxies: Mapping[str, str] | None = None,
        compile_extra_args: str | None = None,
        ignore_uv_lock: bool = False,
        init_timeout: float = 120.0,
        total_timeout: float = 600.0,
        *,
        python_interpreter_path: str | None = None,
        launch_semaphore: DeferredSemaphore | None = None,
        environ: Mapping[str, str] | None = None,
        interpreter_search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
        threadpool=None,
        prepared_venvs_dir: str | None = None,
        bytecode_entries: int = DEFAULT_BYTECODE_ENTRIES,
        passthrough: Iterable[str] = (),
        parent_death: ParentDeathSignal | None = None,
    ) -> None:
        self._reactor = reactor
        self._prepared = prepared_venvs_dir
        self._bytecode = (
            None
            if prepared_venvs_dir is None
            else BytecodeCache(os.path.join(prepared_venvs_dir, BYTECODE_DIR), bytecode_entries)
        )
        self._uv = uv_path
        self._uv_cache_dir = uv_cache_dir
        self._pip_mirror_url = pip_mirror_url
        self._pip_extra_args = pip_extra_args
        self._pip_verbose = pip_verbose
        self._prefer_binary = prefer_binary
        self._proxies = dict(proxies or {})
        self._compile_extra_args = compile_extra_args
        self._ignore_uv_lock = ignore_uv_lock
        self._init_timeout = init_timeout
        self._total_timeout = total_timeout
        self._python_interpreter_path = python_interpreter_path
        self._launch_semaphore = launch_semaphore
        self._environ = dict(os.environ if environ is None else environ)
        self._passthrough = tuple(passthrough)
        self._parent_death = parent_death
        self._interpreter_search_dirs = tuple(interpreter_search_dirs)
        self._threadpool = threadpool
        self._locks: dict[str, DeferredLock] = {}
        # Background keeping of finished builds, to the prepared venv each keeps (or None).
        self._background: dict[Deferred, str | None] = {}
        self._interpreters: dict[str, str] = {}

    def build(self, working_dir: str, runner_version_text: str | None, progress: Callable[[str], None]) -> Deferred:
        """
        Make sure ``working_dir/.venv`` is complete; fire with its python's absolute path.

        :param runner_version_text: the manifest's ``meta.runner.version``
            (empty means 3.12).
        :param progress: called with short status lines as the build goes.
        :return: a Deferred firing with ``<working_dir>/.venv/bin/python``, or
            failing with :class:`InternalServerError` naming the failed step.
        """
        return Deferred.fromCoroutine(self._build(os.path.abspath(working_dir), runner_version_text, progress))

    async def _build(self, working_dir: str, runner_version_text: str | None, progress) -> str:
        lock = self._locks.setdefault(working_dir, DeferredLock())
        try:
            async with lock:
                if venv_is_valid(working_dir):
                    progress("reusing the existing venv")
                    return os.path.join(working_dir, VENV_PYTHON)
                if self._launch_semaphore is None:
                    await self._create(working_dir, runner_version_text, progress)
                else:
                    async with self._launch_semaphore:
                        await self._create(working_dir, runner_version_text, progress)
                return os.path.join(working_dir, VENV_PYTHON)
        finally:
            if not lock.locked and not lock.waiting:
                self._locks.pop(working_dir, None)

    async def _create(self, working_dir: str, runner_version_text: str | None, progress) -> None:
        version = runner_version(runner_version_text)
        dependency_file = choose_dependency_file(_listdir(working_dir), self._pip_mirror_url)
        if os.path.lexists(os.path.join(working_dir, VENV_DIR)):
            progress("deleting an incomplete venv")
            await deferToThreadPool(
                self._reactor, self._pool(), shutil.rmtree, os.path.join(working_dir, VENV_DIR), True
            )
        interpreter = await self._interpreter(version)
        env = install_environment(self._environ, working_dir, self._uv_cache_dir, self._proxies, self._passthrough)
        # The venv's Python runs the .pth files of what uv installed: it
        # gets what a plugin gets, not uv's index credentials.
        python_env = plugin_environment(self._environ, self._proxies, self._passthrough)
        frozen_lock = (
            dependency_file == PYPROJECT_TOML
            and not self._ignore_uv_lock
            and os.path.exists(os.path.join(working_dir, UV_LOCK))
        )
        prepared = None
        if self._prepared is not None:
            key = await deferToThreadPool(
                self._reactor, self._pool(), self._prepared_key, working_dir, interpreter, dependency_file, frozen_lock
            )
            prepared = os.path.join(self._prepared, key)
            # A build of the same dependencies that just finished may be
            # keeping its venv: a copy is far quicker than a build.
            await self._settled(prepared)
        fresh = prepared is None or not venv_is_valid(prepared)
        linked: list[tuple[str, BytecodeLinks]] = []
        if not fresh:
            progress("copying a prepared venv")
            await self._run(_link_copy(os.path.join(prepared, VENV_DIR), os.path.join(working_dir, VENV_DIR), python_env))
            command = plugin_compile_command(working_dir, python_env, self._compile_extra_args)
            progress(command.step)
            await self._run(command)
        else:
            progress(f"creating venv with Python {version}")
            await self._run(venv_command(self._uv, working_dir, interpreter, env))

            progress(f"installing dependencies from {dependency_file}")
            # The plugin's own files need only the venv's python: they are
            # compiled while uv installs, off the critical path.
            command = plugin_compile_command(working_dir, python_env, self._compile_extra_args)
            progress(command.step)
            plugin_compiled = Deferred.fromCoroutine(self._run(command))
            try:
                await self._run(
                    install_command(
                        self._uv,
                        working_dir,
                        dependency_file,
                        env,
                        pip_mirror_url=self._pip_mirror_url,
                        pip_extra_args=self._pip_extra_args,
                        pip_verbose=self._pip_verbose,
                        frozen_lock=frozen_lock,
                    )
                )
            finally:
                # Awaited even when the install fails: whoever then deletes
                # the directory must not race compileall walking it.
                await plugin_compiled
            linked = await self._compile_site_packages(working_dir, interpreter, python_env, progress)

        marker = os.path.join(working_dir, MARKER_PATH)
        os.makedirs(os.path.dirname(marker), mode=0o755, exist_ok=True)
        with open(marker, "wb") as f:
            f.write(marker_content(self._reactor.seconds()))
        if fresh and (prepared is not None or self._bytecode is not None):
            # Keeping the venv and its bytecode for later builds is no
            # business of this plugin's start: it happens in the background
            # (see settled()), in a thread, while the plugin starts.
            self._keep_for_later(working_dir, prepared, linked)
        progress("venv ready")

    def settled(self) -> Deferred:
        """
        A Deferred that fires (with None) once the work finished builds left
        in the background is done: keeping their venv as a prepared venv and
        their new bytecode in the cache.  It never fails.
        """
        return Deferred.fromCoroutine(self._settled())

    async def _settled(self, prepared: str | None = None) -> None:
        """Wait for background work: all of it, or only the keeping of ``prepared``."""
        while True:
            pending = [d for d, target in self._background.items() if prepared is None or target == prepared]
            if not pending:
                return
            await DeferredList(pending)

    def _keep_for_later(self, working_dir: str, prepared: str | None, linked) -> None:
        """Start keeping a fresh build for later ones; tracked until done, its errors logged."""

        def forget(result: None) -> None:
            self._background.pop(done, None)

        done = deferToThreadPool(self._reactor, self._pool(), self._keep_blocking, working_dir, prepared, linked)
        self._background[done] = prepared
        done.addErrback(lambda failure: log.failure("keeping {path} for later builds failed", failure, path=working_dir))
        done.addBoth(forget)

    def _keep_blocking(self, working_dir: str, prepared: str | None, linked) -> None:
        """Keep a prepared venv and new bytecode from a finished build (blocking)."""
        if prepared is not None:
            _keep_prepared(os.path.join(working_dir, VENV_DIR), prepared)
        if self._bytecode is not None:
            self._store_bytecode(working_dir, linked)

    async def _compile_site_packages(self, working_dir: str, interpreter: str, env, progress) -> list[tuple[str, BytecodeLinks]]:
        """
        Byte-compile site-packages, taking what the bytecode cache has.

        :return: each site-packages directory with what the cache gave it
            (empty without a cache, or when the cache failed).
        """
        site_packages = _site_packages(working_dir)
        linked: list[tuple[str, BytecodeLinks]] = []
        missing: list[str] | None = None
        if self._bytecode is not None and site_packages:
            salt = bytecode_salt(interpreter, self._compile_extra_args)
            # Bytecode other builds are storing right now is worth the wait.
            await self._settled()
            try:
                for directory in site_packages:
                    links = await deferToThreadPool(
                        self._reactor, self._pool(), self._bytecode.link, os.path.join(working_dir, directory), salt
                    )
                    linked.append((directory, links))
            except Exception:
                # The cache is an optimisation: whatever breaks it, compile everything.
                log.failure("linking cached bytecode into {path} failed", path=working_dir)
                linked = []
            else:
                missing = [os.path.join(directory, path) for directory, links in linked for path in links.missing]
                progress(f"linked {sum(links.linked for _, links in linked)} cached .pyc files")
        command = site_packages_compile_command(working_dir, site_packages, env, self._compile_extra_args, missing)
        if command is not None:
            progress(command.step)
            await self._run(command)
        return linked

    def _store_bytecode(self, working_dir: str, linked: Sequence[tuple[str, BytecodeLinks]]) -> None:
        """Keep what was compiled for the next venvs, and bound the cache (blocking)."""
        try:
            for directory, links in linked:
                self._bytecode.store(os.path.join(working_dir, directory), links.uncached)
            self._bytecode.prune()
        except Exception:
            log.failure("caching the bytecode of {path} failed", path=working_dir)

    def _prepared_key(self, working_dir: str, interpreter: str, dependency_file: str, frozen_lock: bool) -> str:
        """What decides a venv's content, hashed (blocking: reads files)."""
        digest = hashlib.sha256()
        for part in (interpreter, dependency_file, self._pip_mirror_url or "", self._pip_extra_args or "", str(frozen_lock)):
            digest.update(part.encode() + b"\0")
        names = [dependency_file]
        if dependency_file == PYPROJECT_TOML and os.path.exists(os.path.join(working_dir, UV_LOCK)):
            names.append(UV_LOCK)
        for name in names:
            with open(os.path.join(working_dir, name), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        return digest.hexdigest()

    async def _interpreter(self, version: str) -> str:
        cached = self._interpreters.get(version)
        if cached is None:
            cached = await find_interpreter(
                self._reactor,
                version,
                self._python_interpreter_path,
                self._environ,
                self._interpreter_search_dirs,
                self._parent_death,
            )
            self._interpreters[version] = cached
        return cached

    async def _run(self, command: StepCommand) -> None:
        outcome = await run_step(self._reactor, command, self._init_timeout, self._total_timeout, self._parent_death)
        if outcome.succeeded:
            return
        message = failure_message(command.step, outcome)
        if command.required:
            raise InternalServerError(message)
        log.warn("{step} of {path} failed, continuing: {message}", step=command.step, path=command.path, message=message)

    def _pool(self):
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return self._threadpool


def _keep_prepared(venv: str, prepared: str) -> None:
    """
    Keep a hard-linked copy of a finished venv as the prepared venv
    ``prepared``, unless a valid one is there already (blocking).

    The copy is made in a staging directory and renamed into place, so a
    prepared venv is whole or absent; it is kept only if it is valid, and it
    replaces an invalid leftover.  The plugin may be running meanwhile:
    Python replaces the ``.pyc`` files it writes, it never rewrites them, so
    the copy sees each file whole.
    """
    if venv_is_valid(prepared):
        return
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = f"{prepared}.{token}"
    old = f"{prepared}.{token}.old"
    try:
        shutil.copytree(venv, os.path.join(staging, VENV_DIR), symlinks=True, copy_function=os.link)
        if not venv_is_valid(staging):
            return
        try:
            os.rename(staging, prepared)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or venv_is_valid(prepared):
                raise
            os.rename(prepared, old)
            os.rename(staging, prepared)
    except (OSError, shutil.Error) as e:
        # Unless another build kept the same venv first, the plugin's
        # directory went away (a failed launch, an uninstall) or the disk
        # refused: the next build of these dependencies builds afresh.
        if not venv_is_valid(prepared):
            log.warn("keeping a prepared venv failed: {error}", error=str(e))
    finally:
        for path in (staging, old):
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)


def _link_copy(source: str, target: str, env) -> StepCommand:
    """
    A copy of a venv made of hard links (``cp -al``): instant, and safe to
    share because Python and uv replace files instead of rewriting them.
    """
    return StepCommand(
        step="copying a prepared venv",
        argv=("/bin/cp", "-al", source, target),
        env=env,
        path=os.path.dirname(target) or ".",
    )


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise InternalServerError(f"cannot read the plugin's working directory {path}: {e.strerror}") from e


def _site_packages(working_dir: str) -> list[str]:
    """The venv's ``lib/python*/site-packages`` directories, relative to the working directory."""
    lib = os.path.join(VENV_DIR, "lib")
    try:
        names = sorted(os.listdir(os.path.join(working_dir, lib)))
    except OSError:
        return []
    return [
        os.path.join(lib, name, "site-packages")
        for name in names
        if name.startswith("python") and os.path.isdir(os.path.join(working_dir, lib, name, "site-packages"))
    ]
