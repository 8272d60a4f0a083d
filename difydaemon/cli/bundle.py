"""
``dify bundle``: a bundle source directory (``runtimes.md`` §5.6) and its
``.difybndl``.

A bundle directory holds ``manifest.yaml`` (``type: bundle`` with a
``dependencies`` list) and ``_assets/``; an embedded package is stored as
``_assets/<checksum>`` and referenced by that checksum.  Every change is
checked with the daemon's own bundle decoder.
"""

from __future__ import annotations

import os

import yaml

from difydaemon.cli.errors import CommandError
from difydaemon.cli.packing import DEFAULT_MAX_SIZE_MB, MEGABYTE, build_zip, check_package, source_files
from difydaemon.cli.scaffold import label_of
from difydaemon.cli.templates import ICON_SVG
from difydaemon.errors import DaemonError
from difydaemon.packaging.manifest import PLUGIN_NAME
from difydaemon.packaging.package import PackagePolicy, decode_bundle

MANIFEST = "manifest.yaml"
MAX_BUNDLE_SIZE = 12 * DEFAULT_MAX_SIZE_MB * MEGABYTE
_POLICY = PackagePolicy(max_size=DEFAULT_MAX_SIZE_MB * MEGABYTE, force_verify=False, enforce_langgenius=False,
                        public_keys=())


def bundle_manifest(name: str, author: str, description: str) -> dict:
    """The manifest of a new, empty bundle."""
    return {
        "name": name,
        "labels": {"en_US": label_of(name)},
        "description": {"en_US": description},
        "icon": "icon.svg",
        "version": "0.0.1",
        "author": author,
        "type": "bundle",
        "dependencies": [],
        "tags": [],
    }


def init_bundle(parent: str, name: str, author: str, description: str) -> str:
    """
    Create ``<parent>/<name>/`` with a bundle manifest and icon.

    :returns: the bundle directory.
    :raises CommandError: a bad name or author, or the directory is in the way.
    """
    if PLUGIN_NAME.fullmatch(name) is None:
        raise CommandError(f"invalid --name {name!r}: use 1-128 of a-z, 0-9, _ and -")
    if PLUGIN_NAME.fullmatch(author) is None:
        raise CommandError(f"invalid --author {author!r}: use a-z, 0-9, _ and -")
    directory = os.path.join(parent, name)
    if os.path.exists(directory):
        raise CommandError(f"{directory} already exists")
    try:
        os.makedirs(os.path.join(directory, "_assets"))
        with open(os.path.join(directory, "_assets", "icon.svg"), "w", encoding="utf-8") as handle:
            handle.write(ICON_SVG)
        write_manifest(directory, bundle_manifest(name, author, description or f"The {label_of(name)} bundle"))
    except OSError as error:
        raise CommandError(f"cannot write {error.filename}: {error.strerror}") from None
    return directory


def read_manifest(directory: str) -> dict:
    """
    The bundle's ``manifest.yaml``.

    :raises CommandError: missing, unreadable or not a bundle manifest.
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = yaml.safe_load(handle)
    except FileNotFoundError:
        raise CommandError(f"no {MANIFEST} in {directory}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CommandError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    if not isinstance(manifest, dict) or manifest.get("type") != "bundle":
        raise CommandError(f"{path} is not a bundle manifest (type must be bundle)")
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.yaml`` back, keys in their order."""
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as handle:
        yaml.safe_dump(manifest, handle, sort_keys=False, allow_unicode=True)


def _check_dependency(dependency: dict, assets: dict[str, bytes]) -> None:
    """Run the daemon's bundle decoder over a bundle holding only this dependency."""
    manifest = bundle_manifest("check", "check", "check")
    manifest["dependencies"] = [dependency]
    files = {MANIFEST: yaml.safe_dump(manifest).encode("utf-8"), **assets}
    try:
        decode_bundle(build_zip(files), _POLICY, MAX_BUNDLE_SIZE)
    except DaemonError as error:
        raise CommandError(f"the daemon would refuse this dependency: {error.message}") from None


def add_dependency(directory: str, dependency: dict, assets: dict[str, bytes] | None = None) -> bool:
    """
    Append a dependency to the bundle (and write its assets), after the
    daemon's checks; an identical dependency is not added twice.

    :returns: whether it was added.
    """
    manifest = read_manifest(directory)
    assets = assets or {}
    _check_dependency(dependency, assets)
    dependencies = manifest.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise CommandError(f"{MANIFEST}: dependencies must be a list")
    if dependency in dependencies:
        return False
    try:
        for path, content in assets.items():
            target = os.path.join(directory, *path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(content)
        manifest["dependencies"] = [*dependencies, dependency]
        write_manifest(directory, manifest)
    except OSError as error:
        raise CommandError(f"cannot write {error.filename}: {error.strerror}") from None
    return True


def add_package(directory: str, package_path: str) -> str:
    """
    Embed a ``.difypkg`` as ``_assets/<checksum>``.

    :returns: the package's unique identifier.
    """
    try:
        with open(package_path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CommandError(f"cannot read {package_path}: {error.strerror}") from None
    decoded = check_package(data, _POLICY.max_size)
    checksum = decoded.identifier.checksum
    add_dependency(directory, {"type": "package", "value": {"path": checksum}}, {f"_assets/{checksum}": data})
    return decoded.identifier.raw


def package_bundle(directory: str) -> tuple[bytes, list[dict]]:
    """
    The ``.difybndl`` of a bundle directory and its decoded dependencies.

    :raises CommandError: unreadable or refused by the daemon's checks.
    """
    read_manifest(directory)
    files = source_files(directory)
    data = build_zip(files)
    try:
        dependencies = decode_bundle(data, _POLICY, MAX_BUNDLE_SIZE)
    except DaemonError as error:
        raise CommandError(f"the daemon would refuse this bundle: {error.message}") from None
    return data, dependencies
