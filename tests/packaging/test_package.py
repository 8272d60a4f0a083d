"""Tests for difydaemon.packaging.package."""

from __future__ import annotations

import yaml

from difydaemon.errors import (
    InvalidManifestError,
    MalformedPackageError,
    PackageError,
    PackageTooLargeError,
    SignatureError,
    UnsafePackagePathError,
)
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.packaging.package import BAD_SIGNATURE, decode_bundle, decode_package, readmes_of
from difydaemon.packaging.signature import Verification, generate_key_pair, load_public_key, sign_package
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from tests.packaging.fixtures import (
    AGENT,
    ALIAS_BOMB,
    ARCH_MAPPING,
    DEEP_MAPPING,
    DEEP_SEQUENCE,
    OPENAI,
    SELF_ALIAS,
    UNSIGNED,
    fixture_bytes,
    policy,
)

_KEYS = {}


def key_pair():
    """One 2048-bit pair for the module (generation is slow)."""
    if "pair" not in _KEYS:
        _KEYS["pair"] = generate_key_pair(bits=2048)
    return _KEYS["pair"]


def key():
    """The module's public key, as a policy's extra keys."""
    return (load_public_key(key_pair()[1]),)


def langgenius_signed_as_partner():
    """An echo package with author langgenius, signed with the module key as partner."""
    return sign_package(echo_with_manifest(lambda m: m.update(author="langgenius")), key_pair()[0], "partner", 1)


def echo_with_manifest(change):
    files = echo_plugin_files()
    manifest = yaml.safe_load(files["manifest.yaml"])
    change(manifest)
    files["manifest.yaml"] = yaml.safe_dump(manifest).encode()
    return build_package(files)


class DecodePackageTests(SynchronousTestCase):
    """decode_package applies the upload checks in order."""

    def test_unsigned_accepted_without_force(self):
        """The unsigned fixture decodes with verified false when verification is off."""
        decoded = decode_package(fixture_bytes(UNSIGNED), policy())
        self.assertEqual(decoded.identifier.raw,
                         "test/test:0.0.1@f47ca91dfa51d374e6dc4fa3b9b6839396e1e5bff0d6e846cc940c828f8f131b")
        self.assertIsNone(decoded.verification)
        self.assertIs(decoded.declaration["verified"], False)
        self.assertEqual(decoded.identifier.checksum, package_checksum(decoded.files))

    def test_unsigned_refused_when_forced(self):
        """force_verify refuses the unsigned fixture with the Go text."""
        with self.assertRaises(SignatureError) as caught:
            decode_package(fixture_bytes(UNSIGNED), policy(force_verify=True))
        self.assertEqual(caught.exception.message, BAD_SIGNATURE)
        self.assertEqual(BAD_SIGNATURE,
                         "plugin verification has been enabled, and the plugin you want to install has a bad signature")

    def test_unsigned_refused_when_asked(self):
        """The upload's verify_signature flag also refuses unsigned packages."""
        with self.assertRaises(SignatureError):
            decode_package(fixture_bytes(UNSIGNED), policy(), verify_signature=True)

    def test_signed_accepted_when_forced(self):
        """The signed agent fixture passes every policy and is marked verified."""
        decoded = decode_package(fixture_bytes(AGENT), policy(force_verify=True, enforce_langgenius=True))
        self.assertEqual(decoded.verification, Verification("langgenius"))
        self.assertIs(decoded.declaration["verified"], True)
        self.assertEqual(decoded.identifier.plugin_id, "langgenius/agent")

    def test_langgenius_enforcement_spares_single_packages(self):
        """Unsigned langgenius-authored packages decode on their own under enforcement, as in Go HEAD."""
        decoded = decode_package(fixture_bytes(OPENAI), policy(enforce_langgenius=True))
        self.assertEqual(decoded.identifier.plugin_id, "langgenius/openai")
        self.assertIsNone(decoded.verification)
        self.assertIs(decoded.declaration["verified"], False)
        partner = decode_package(langgenius_signed_as_partner(), policy(enforce_langgenius=True, extra_keys=key()))
        self.assertEqual(partner.verification, Verification("partner"))

    def test_third_party_signed(self):
        """A package signed with a configured third-party key passes force_verify."""
        private_pem, public_pem = key_pair()
        data = sign_package(build_package(echo_plugin_files()), private_pem, "community", 1)
        decoded = decode_package(data, policy(force_verify=True, extra_keys=(load_public_key(public_pem),)))
        self.assertEqual(decoded.verification, Verification("community"))
        with self.assertRaises(SignatureError):
            decode_package(data, policy(force_verify=True))

    def test_uuid_author(self):
        """An author that parses as a UUID is refused with the Go text."""
        data = echo_with_manifest(lambda m: m.update(author="0a1b2c3d-0000-4000-8000-00000000abcd"))
        with self.assertRaises(InvalidManifestError) as caught:
            decode_package(data, policy())
        self.assertEqual(caught.exception.message, "cannot set author to an UUID")

    def test_errors_by_stage(self):
        """Each bad package raises its own error class."""
        cases = [
            (build_package({"a": b"\0" * 2048}), dict(max_size=1024), PackageTooLargeError),
            (b"garbage", {}, MalformedPackageError),
            (build_package({**echo_plugin_files(), "../x": b""}), {}, UnsafePackagePathError),
            (echo_with_manifest(lambda m: m.update(version="1.0")), {}, InvalidManifestError),
            (echo_with_manifest(lambda m: m.update(author="Acme")), {}, InvalidManifestError),
            (echo_with_manifest(lambda m: m.update(icon="x.svg")), {}, InvalidManifestError),
            (build_package({**echo_plugin_files(), "manifest.yaml": b"a: [\n"}), {}, MalformedPackageError),
        ]
        for data, options, error in cases:
            self.assertRaises(error, decode_package, data, policy(**options))

    def test_hostile_packages_refused(self):
        """Each hostile fixture is a -400 package error saying why, not a TypeError or RecursionError."""
        for name, words in (
            (ARCH_MAPPING, "invalid manifest field meta.arch"),
            (DEEP_SEQUENCE, "failed to unmarshal manifest file manifest.yaml"),
            (DEEP_MAPPING, "nested deeper than"),
            (ALIAS_BOMB, "excessive aliasing"),
            (SELF_ALIAS, "contains an alias to itself"),
        ):
            with self.assertRaises(PackageError) as caught:
                decode_package(fixture_bytes(name), policy())
            self.assertEqual(caught.exception.code, -400)
            self.assertIn(words, caught.exception.message, name)

    def test_name_length(self):
        """Names up to 128 characters are accepted; longer ones are refused naming the field."""
        decoded = decode_package(echo_with_manifest(lambda m: m.update(name="n" * 128)), policy())
        self.assertEqual(decoded.identifier.raw.split(":")[0], "acme/" + "n" * 128)
        with self.assertRaises(InvalidManifestError) as caught:
            decode_package(echo_with_manifest(lambda m: m.update(name="n" * 129)), policy())
        self.assertIn("name", caught.exception.message)


class ReadmeTests(SynchronousTestCase):
    """readmes_of finds README.md and readme/README_<lang>.md."""

    def test_languages(self):
        """README.md is en_US; translations come from the readme folder; other files are ignored."""
        files = echo_plugin_files()
        files["readme/README_zh_Hans.md"] = "你好".encode()
        files["readme/README_ja_JP.md"] = b"konnichiwa"
        files["readme/notes.md"] = b"ignored"
        files["docs/README_pt_BR.md"] = b"ignored"
        readmes = readmes_of(read_package(build_package(files), 1 << 20))
        self.assertEqual(set(readmes), {"en_US", "zh_Hans", "ja_JP"})
        self.assertEqual(readmes["zh_Hans"], "你好")
        self.assertTrue(readmes["en_US"].startswith("# Echo"))

    def test_none(self):
        """A package without READMEs has none."""
        self.assertEqual(readmes_of(read_package(fixture_bytes(UNSIGNED), 1 << 20)), {})


def bundle(dependencies, assets):
    manifest = {
        "name": "kit", "labels": {"en_US": "Kit"}, "description": {"en_US": "A kit"}, "icon": "icon.svg",
        "version": "0.0.1", "author": "acme", "type": "bundle", "dependencies": dependencies,
    }
    files = {"manifest.yaml": yaml.safe_dump(manifest).encode(), "_assets/icon.svg": b"<svg/>"}
    files.update({f"_assets/{name}": content for name, content in assets.items()})
    return build_package(files)


class DecodeBundleTests(SynchronousTestCase):
    """decode_bundle turns a bundle into the upload/bundle dependency list."""

    def test_dependencies(self):
        """github, marketplace and package dependencies get their wire shapes."""
        package = build_package(echo_plugin_files())
        checksum = package_checksum(read_package(package, 1 << 20))
        data = bundle(
            [
                {"type": "github", "value": {"repo_pattern": "acme/tools:1.2.3/tools.difypkg"}},
                {"type": "marketplace", "value": {"marketplace_pattern": "langgenius/openai:^0.0.19"}},
                {"type": "package", "value": {"path": checksum}},
            ],
            {checksum: package},
        )
        result = decode_bundle(data, policy(), max_bundle_size=1 << 24)
        self.assertEqual(result[0], {"type": "github", "value": {
            "repo_address": "https://github.com/acme/tools", "repo": "acme/tools", "release": "1.2.3",
            "packages": "tools.difypkg"}})
        self.assertEqual(result[1], {"type": "marketplace", "value": {
            "organization": "langgenius", "plugin": "openai", "version": "^0.0.19"}})
        self.assertEqual(result[2]["type"], "package")
        self.assertEqual(result[2]["value"]["unique_identifier"], f"acme/echo:0.0.1@{checksum}")
        self.assertEqual(result[2]["value"]["manifest"]["name"], "echo")
        self.assertEqual(result[2]["decoded"].identifier.checksum, checksum)

    def test_embedded_langgenius_enforced(self):
        """An embedded unsigned langgenius package is refused under enforcement, accepted without it."""
        package = fixture_bytes(OPENAI)
        data = bundle([{"type": "package", "value": {"path": "openai"}}], {"openai": package})
        with self.assertRaises(SignatureError) as caught:
            decode_bundle(data, policy(enforce_langgenius=True), max_bundle_size=1 << 24)
        self.assertIn("claims to be from langgenius", caught.exception.message)
        result = decode_bundle(data, policy(), max_bundle_size=1 << 24)
        self.assertEqual(result[0]["decoded"].identifier.plugin_id, "langgenius/openai")

    def test_embedded_langgenius_needs_langgenius_category(self):
        """An embedded langgenius-authored package signed as partner is refused under enforcement."""
        data = bundle([{"type": "package", "value": {"path": "p"}}], {"p": langgenius_signed_as_partner()})
        with self.assertRaises(SignatureError):
            decode_bundle(data, policy(enforce_langgenius=True, extra_keys=key()), max_bundle_size=1 << 24)
        result = decode_bundle(data, policy(extra_keys=key()), max_bundle_size=1 << 24)
        self.assertEqual(result[0]["decoded"].verification, Verification("partner"))

    def test_embedded_official_signature_passes_enforcement(self):
        """The langgenius-signed agent fixture inside a bundle passes enforcement."""
        data = bundle([{"type": "package", "value": {"path": "agent"}}], {"agent": fixture_bytes(AGENT)})
        result = decode_bundle(data, policy(force_verify=True, enforce_langgenius=True), max_bundle_size=1 << 24)
        self.assertEqual(result[0]["decoded"].verification, Verification("langgenius"))

    def test_bad_patterns_and_missing_asset(self):
        """Invalid patterns and missing package assets are refused."""
        with self.assertRaises(InvalidManifestError):
            decode_bundle(bundle([{"type": "marketplace", "value": {"marketplace_pattern": "nope"}}], {}),
                          policy(), max_bundle_size=1 << 24)
        with self.assertRaises(MalformedPackageError):
            decode_bundle(bundle([{"type": "package", "value": {"path": "gone"}}], {}),
                          policy(), max_bundle_size=1 << 24)

    def test_bundle_size(self):
        """A bundle over MAX_BUNDLE_PACKAGE_SIZE is refused."""
        with self.assertRaises(PackageTooLargeError):
            decode_bundle(bundle([], {"big": b"\0" * 4096}), policy(), max_bundle_size=1024)
