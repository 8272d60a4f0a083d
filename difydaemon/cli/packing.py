"""
Turning a plugin source directory into a ``.difypkg`` (``runtimes.md`` §5.1,
§6 ``dify plugin package``), and refusing what the daemon would refuse.

The CLI runs without a reactor, so these functions block; they are not for
the daemon.
"""

from __future__ import annotations

import io
import os
import subprocess
import zipfile

from difydaemon.cli.errors import CommandError
from difydaemon.cli.ignore import IgnoreRules, parse_ignore
from difydaemon.errors import DaemonError
from difydaemon.packaging.package import DecodedPackage, PackagePolicy, decode_package

DIFYIGNORE = ".difyignore"
GITIGNORE = ".gitignore"
#: Never packaged, whatever the ignore file says.
ALWAYS_EXCLUDED_DIRS = frozenset({".git"})
DEFAULT_MAX_SIZE_MB = 50
MEGABYTE = 1024 * 1024
_UV_EXPORT_ARGS = (
    "export", "--frozen", "--format", "requirements.txt", "--no-group", "dev",
    "--no-emit-project", "--no-hashes", "--no-header", "--no-annotate",
)


def load_ignore_rules(directory: str) -> IgnoreRules:
    """The rules of ``.difyignore``, else of ``.gitignore``, else none."""
    for name in (DIFYIGNORE, GITIGNORE):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as handle:
                return parse_ignore(handle.read())
    return IgnoreRules()


def _sort_key(name: str) -> bytes:
    return name.encode("utf-8")


def source_files(directory: str) -> dict[str, bytes]:
    """
    The files of a plugin directory that a package holds, by relative
    ``/``-joined path, sorted bytewise: the ignore rules applied, ``.git/``
    always left out, directories never listed themselves.

    :raises CommandError: the directory does not exist or cannot be read.
    """
    if not os.path.isdir(directory):
        raise CommandError(f"plugin directory not found: {directory}")
    rules = load_ignore_rules(directory)
    found: dict[str, bytes] = {}
    root = os.path.abspath(directory)

    def walk_error(error: OSError) -> None:
        raise CommandError(f"cannot read {error.filename}: {error.strerror}")

    for current, dirs, files in os.walk(root, onerror=walk_error):
        relative_dir = os.path.relpath(current, root).replace(os.sep, "/")
        prefix = "" if relative_dir == "." else relative_dir + "/"
        kept_dirs = []
        for name in sorted(dirs):
            path = prefix + name
            if name in ALWAYS_EXCLUDED_DIRS or rules.is_ignored(path, is_dir=True):
                continue
            kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in files:
            path = prefix + name
            if rules.is_ignored(path, is_dir=False):
                continue
            try:
                with open(os.path.join(current, name), "rb") as handle:
                    found[path] = handle.read()
            except OSError as error:
                raise CommandError(f"cannot read {path}: {error.strerror}") from None
    return {name: found[name] for name in sorted(found, key=_sort_key)}


def export_requirements(directory: str, uv: str | None) -> bytes | None:
    """
    ``requirements.txt`` made by ``uv export`` for a project that only has
    ``pyproject.toml`` and ``uv.lock``; None when uv is not available.

    :raises CommandError: uv ran and failed.
    """
    if uv is None:
        return None
    try:
        result = subprocess.run(
            [uv, *_UV_EXPORT_ARGS], cwd=directory, capture_output=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommandError(f"uv export failed: {error}") from None
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise CommandError(f"uv export failed (exit {result.returncode}): {last[0]}")
    return result.stdout


def find_uv_or_none() -> str | None:
    """uv as the daemon finds it (``UV_PATH``, the uv package, ``PATH``), or None."""
    from difydaemon.runtimes.environment import find_uv

    try:
        return find_uv(os.environ.get("UV_PATH") or None)
    except DaemonError:
        return None


def _on_disk(directory: str, name: str) -> bool:
    try:
        os.stat(os.path.join(directory, name))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise CommandError(f"cannot read {name}: {error.strerror}") from None
    return True


def wants_exported_requirements(directory: str) -> bool:
    """
    Whether the package gets a ``requirements.txt`` made by ``uv export``:
    none on disk, and both ``pyproject.toml`` and ``uv.lock`` on disk.

    The files on disk decide, before any ignore rule, as in the Go packager
    (``generatedFiles`` stats them directly): an ignored ``uv.lock`` still
    yields requirements, and an ignored ``requirements.txt`` still prevents
    them, since ``uv export`` reads the lock file from disk either way.
    """
    return (
        not _on_disk(directory, "requirements.txt")
        and _on_disk(directory, "pyproject.toml")
        and _on_disk(directory, "uv.lock")
    )


def plugin_files(directory: str, uv: str | None = None) -> dict[str, bytes]:
    """
    :func:`source_files`, plus a ``requirements.txt`` from ``uv export`` when
    :func:`wants_exported_requirements` and ``uv`` is given.
    """
    files = source_files(directory)
    if wants_exported_requirements(directory):
        exported = export_requirements(directory, uv)
        if exported is not None:
            files["requirements.txt"] = exported
            files = {name: files[name] for name in sorted(files, key=_sort_key)}
    return files


def largest_files_message(files: dict[str, bytes], max_size: int, count: int = 5) -> str:
    """The refusal of an oversized package, naming its ``count`` largest files."""
    total = sum(len(content) for content in files.values())
    largest = sorted(files.items(), key=lambda item: (-len(item[1]), item[0]))[:count]
    listed = ", ".join(f"{name} ({len(content)} bytes)" for name, content in largest)
    return (
        f"plugin package is too large: {total} bytes uncompressed, the maximum is {max_size} bytes; "
        f"largest files: {listed}"
    )


def build_zip(files: dict[str, bytes], comment: bytes = b"") -> bytes:
    """
    A package zip: entries sorted bytewise, deflated, no directory entries,
    fixed timestamps so that the same files give the same bytes.
    """
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files, key=_sort_key):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
        archive.comment = comment
    return output.getvalue()


def check_package(data: bytes, max_size: int) -> DecodedPackage:
    """
    Run the daemon's own upload checks (signature not required).

    :raises CommandError: naming why the daemon would refuse it.
    """
    policy = PackagePolicy(max_size=max_size, force_verify=False, enforce_langgenius=False, public_keys=())
    try:
        return decode_package(data, policy)
    except DaemonError as error:
        raise CommandError(f"the daemon would refuse this package: {error.message}") from None


def package_directory(
    directory: str, max_size: int, uv: str | None = None, add_files=None
) -> tuple[bytes, DecodedPackage]:
    """
    The ``.difypkg`` bytes of a plugin directory and what the daemon makes of them.

    :param add_files: None, or a function of the package's files to the
        files to package instead (``--offline`` adds the wheels).

    :raises CommandError: unreadable directory, too large, or refused.
    """
    if not os.path.isfile(os.path.join(directory, "manifest.yaml")):
        if not os.path.isdir(directory):
            raise CommandError(f"plugin directory not found: {directory}")
        raise CommandError(f"no manifest.yaml in {directory}")
    files = plugin_files(directory, uv)
    if add_files is not None:
        files = add_files(files)
        files = {name: files[name] for name in sorted(files, key=_sort_key)}
    if sum(len(content) for content in files.values()) > max_size:
        raise CommandError(largest_files_message(files, max_size))
    data = build_zip(files)
    return data, check_package(data, max_size)
