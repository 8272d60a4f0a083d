"""
Decoding an uploaded ``.difypkg`` or ``.difybndl`` into what the management
API persists and returns (``http-api.md`` §2.4, ``runtimes.md`` §5).

Pure and synchronous; the HTTP layer runs it in a thread for large uploads.
"""

from __future__ import annotations

import re

from attrs import frozen

from difydaemon.errors import InvalidManifestError, MalformedPackageError, SignatureError
from difydaemon.packaging.archive import PackageFiles, read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.packaging.declaration import build_declaration
from difydaemon.packaging.identifier import PluginIdentifier, compose_identifier
from difydaemon.packaging.manifest import (
    AUTHOR,
    MANIFEST_FILE,
    PLUGIN_NAME,
    check_tags,
    check_version,
    i18n,
    require,
)
from difydaemon.packaging.yaml_limits import YamlLimits
from difydaemon.packaging.signature import Verification, verify_package

BAD_SIGNATURE = "plugin verification has been enabled, and the plugin you want to install has a bad signature"
UNAUTHORIZED_LANGGENIUS = (
    "plugin installation blocked: this plugin claims to be from langgenius but is not verified with the "
    "langgenius signature; set ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES=false to allow it (not recommended)"
)
_README = re.compile(r"README_([a-z]{2}_[A-Za-z]{2,})\.md", re.ASCII)
_VERSION_X = r"(\d{1,4}|[xX])"
_VERSION = r"\d{1,4}(\.\d{1,4}){2}(-\w{1,16})?"
_DEPENDENCY_VERSION = rf"([~^]?{_VERSION}|{_VERSION_X}(\.{_VERSION_X}){{2}}|{_VERSION}-{_VERSION})"
_GITHUB_PATTERN = re.compile(rf"[a-z0-9_-]{{1,64}}/[a-z0-9_-]{{1,128}}:{_DEPENDENCY_VERSION}/[^/]+", re.ASCII)
_MARKETPLACE_PATTERN = re.compile(rf"[a-z0-9_-]{{1,64}}/[a-z0-9_-]{{1,128}}:{_DEPENDENCY_VERSION}", re.ASCII)


@frozen
class PackagePolicy:
    """
    What an upload must satisfy.

    :ivar max_size: ``MAX_PLUGIN_PACKAGE_SIZE`` (zip and uncompressed total).
    :ivar force_verify: ``FORCE_VERIFYING_SIGNATURE``.
    :ivar enforce_langgenius: ``ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES``.
    :ivar public_keys: every key that may verify a signature (official first).
    :ivar yaml_limits: what the package's YAML may cost (depth, nodes, bytes).
    """

    max_size: int
    force_verify: bool
    enforce_langgenius: bool
    public_keys: tuple
    yaml_limits: YamlLimits = YamlLimits()


@frozen
class DecodedPackage:
    """
    A package that passed every check.

    :ivar identifier: its unique identifier.
    :ivar declaration: the PluginDeclaration, ``verified`` set.
    :ivar verification: the signature's category, or None when unverified.
    :ivar files: the package's files.
    """

    identifier: PluginIdentifier
    declaration: dict
    verification: Verification | None
    files: PackageFiles


def _identity_fields(manifest: dict) -> tuple[str, str, str]:
    version = check_version(manifest.get("version"), "version")
    author = manifest.get("author")
    require(isinstance(author, str) and AUTHOR.fullmatch(author) is not None, "author",
            "must match ^[a-z0-9_-]{1,64}$")
    name = manifest.get("name")
    require(isinstance(name, str) and PLUGIN_NAME.fullmatch(name) is not None, "name",
            "must match ^[a-z0-9_-]{1,128}$")
    return author, name, version


def decode_package(data: bytes, policy: PackagePolicy, verify_signature: bool = False) -> DecodedPackage:
    """
    Check and decode one package, in the Go daemon's order: size, zip,
    checksum and identifier, UUID author, manifest, signature.

    :param verify_signature: the upload's ``verify_signature`` form field.
    :raises difydaemon.errors.PackageError: any refusal (subclass names why).
    :raises difydaemon.errors.UniqueIdentifierError: no valid identifier.
    """
    from difydaemon.packaging.plugin_yaml import PackageYaml

    files = read_package(data, policy.max_size)
    package = PackageYaml(files, policy.yaml_limits)
    manifest = package.mapping(MANIFEST_FILE, "manifest file")
    author, name, version = _identity_fields(manifest)
    identifier = compose_identifier(author, name, version, package_checksum(files))
    if identifier.is_remote:
        raise InvalidManifestError("cannot set author to an UUID")
    declaration = build_declaration(files, package, manifest)

    verification = verify_package(files, policy.public_keys)
    declaration["verified"] = verification is not None
    if (policy.force_verify or verify_signature) and verification is None:
        raise SignatureError(BAD_SIGNATURE)
    return DecodedPackage(identifier=identifier, declaration=declaration, verification=verification, files=files)


def check_langgenius_authorship(decoded: DecodedPackage, policy: PackagePolicy) -> None:
    """
    ``ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES`` for a package embedded in a
    bundle: author ``langgenius`` needs the langgenius signature.

    Go HEAD applies it to bundles only (the single-upload check is commented
    out, ``http-api.md`` §4.4), so a package built from the official public
    source uploads on its own under ``FORCE_VERIFYING_SIGNATURE=false``.

    :raises SignatureError: the package claims langgenius without its signature.
    """
    if not policy.enforce_langgenius or str(decoded.declaration.get("author", "")).lower() != "langgenius":
        return
    if decoded.verification is None or decoded.verification.authorized_category != "langgenius":
        raise SignatureError(UNAUTHORIZED_LANGGENIUS)


def readmes_of(files: PackageFiles) -> dict[str, str]:
    """
    READMEs by language: ``README.md`` is en_US, ``readme/README_<lang>.md``
    the others.  Files that are not UTF-8 are skipped.
    """
    readmes = {}
    for name, content in files.items():
        if name == "README.md":
            language = "en_US"
        elif name.startswith("readme/") and name.count("/") == 1:
            match = _README.fullmatch(name[len("readme/"):])
            if match is None:
                continue
            language = match.group(1)
        else:
            continue
        try:
            readmes[language] = content.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return readmes


def _split_pattern(pattern: str) -> list[str]:
    return [piece for part in pattern.split(":") for piece in part.split("/")]


def decode_bundle(data: bytes, policy: PackagePolicy, max_bundle_size: int, verify_signature: bool = False) -> list[dict]:
    """
    Decode a ``.difybndl`` into its dependency list (``runtimes.md`` §5.6).

    Each item is ``{"type": "github"|"marketplace"|"package", "value": {...}}``
    in the wire shape of ``/install/upload/bundle``; ``package`` items also
    carry ``"decoded": DecodedPackage``, ``"data"`` (the package bytes) and
    ``"asset"`` (its entry name) for the caller to persist and then drop
    before answering.  Embedded packages get every check of
    :func:`decode_package` and, unlike single uploads, the Langgenius-authorship
    rule (:func:`check_langgenius_authorship`).
    """
    from difydaemon.packaging.plugin_yaml import PackageYaml

    files = read_package(data, max_bundle_size)
    manifest = PackageYaml(files, policy.yaml_limits).mapping(MANIFEST_FILE, "bundle manifest")
    require(manifest.get("type") == "bundle", "type", "must be 'bundle'")
    require(isinstance(manifest.get("name"), str) and manifest["name"] != "", "name", "is required")
    i18n(manifest.get("labels"), "labels")
    i18n(manifest.get("description"), "description")
    require(isinstance(manifest.get("icon"), str) and manifest["icon"] != "", "icon", "is required")
    check_version(manifest.get("version"), "version")
    require(isinstance(manifest.get("author"), str) and manifest["author"] != "", "author", "is required")
    check_tags(manifest.get("tags"), "tags")
    dependencies = manifest.get("dependencies")
    require(isinstance(dependencies, list), "dependencies", "is required")

    result: list[dict] = []
    for index, dependency in enumerate(dependencies):
        field = f"dependencies[{index}]"
        require(isinstance(dependency, dict), field, "must be an object")
        kind = dependency.get("type")
        value = dependency.get("value")
        require(isinstance(value, dict), f"{field}.value", "is required")
        if kind == "github":
            pattern = value.get("repo_pattern")
            require(isinstance(pattern, str) and _GITHUB_PATTERN.fullmatch(pattern) is not None,
                    f"{field}.value.repo_pattern", "invalid github repo pattern")
            parts = _split_pattern(pattern)
            result.append({"type": "github", "value": {
                "repo_address": f"https://github.com/{parts[0]}/{parts[1]}",
                "repo": f"{parts[0]}/{parts[1]}",
                "release": parts[2],
                "packages": parts[3] if len(parts) > 3 else "",
            }})
        elif kind == "marketplace":
            pattern = value.get("marketplace_pattern")
            require(isinstance(pattern, str) and _MARKETPLACE_PATTERN.fullmatch(pattern) is not None,
                    f"{field}.value.marketplace_pattern", "invalid marketplace pattern")
            parts = _split_pattern(pattern)
            result.append({"type": "marketplace", "value": {
                "organization": parts[0], "plugin": parts[1], "version": parts[2],
            }})
        elif kind == "package":
            path = value.get("path")
            require(isinstance(path, str) and path != "", f"{field}.value.path", "is required")
            asset = files.get("_assets/" + path)
            if asset is None:
                raise MalformedPackageError(f"failed to fetch package from bundle: _assets/{path} not found")
            decoded = decode_package(asset, policy, verify_signature=verify_signature)
            check_langgenius_authorship(decoded, policy)
            result.append({
                "type": "package",
                "value": {"unique_identifier": decoded.identifier.raw, "manifest": decoded.declaration},
                "decoded": decoded,
                "data": asset,
                "asset": "_assets/" + path,
            })
        else:
            require(False, f"{field}.type", "must be github, marketplace or package")
    return result
