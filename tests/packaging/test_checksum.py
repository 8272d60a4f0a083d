"""Tests for difydaemon.packaging.checksum."""

from __future__ import annotations

import hashlib
import io
import zipfile

from difydaemon.packaging.archive import PackageFiles, read_package
from difydaemon.packaging.checksum import directory_checksum, package_checksum
from difydaemon.testing.cases import SynchronousTestCase

from tests.packaging.fixtures import AGENT, ALL_PACKAGES, MAX_SIZE, OPENAI, UNSIGNED, fixture_bytes


def reference_checksum(data: bytes) -> str:
    """runtimes.md §5.4 written out: sort names, hash name and content, hash it all."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        contents = {info.filename: archive.read(info) for info in archive.infolist()}
    buffer = b""
    for name in sorted(contents, key=lambda text: text.encode("utf-8")):
        buffer += hashlib.sha256(name.encode("utf-8")).digest()
        buffer += hashlib.sha256(contents[name]).digest()
    return hashlib.sha256(buffer).hexdigest()


class PackageChecksumTests(SynchronousTestCase):
    """package_checksum follows runtimes.md §5.4 exactly."""

    def test_fixtures_match_reference(self):
        """Each fixture's checksum equals the formula computed independently."""
        for name in ALL_PACKAGES:
            data = fixture_bytes(name)
            self.assertEqual(package_checksum(read_package(data, MAX_SIZE)), reference_checksum(data), name)

    def test_fixtures_are_stable(self):
        """The fixtures' checksums are the known values (spec prefixes included)."""
        checksums = {name: package_checksum(read_package(fixture_bytes(name), MAX_SIZE)) for name in ALL_PACKAGES}
        self.assertEqual(checksums[OPENAI], "ee25cddb7264169044e305955abbf97eff0876a151ced2bf20c5907430ad5727")
        self.assertEqual(checksums[UNSIGNED], "f47ca91dfa51d374e6dc4fa3b9b6839396e1e5bff0d6e846cc940c828f8f131b")
        self.assertEqual(checksums[AGENT], "26958a0e80a10655ce73812bdb7c35a66ce7b16f5ac346d298bda17ff85efd1e")

    def test_order_and_comment_do_not_matter(self):
        """Entry order and the zip comment leave the checksum unchanged."""
        first = PackageFiles.from_mapping({"a": b"1", "b": b"2"}, comment=b"x")
        second = PackageFiles.from_mapping({"b": b"2", "a": b"1"})
        self.assertEqual(package_checksum(first), package_checksum(second))

    def test_content_and_names_matter(self):
        """Changing a byte of content or a name changes the checksum."""
        base = package_checksum({"a": b"1"})
        self.assertNotEqual(base, package_checksum({"a": b"2"}))
        self.assertNotEqual(base, package_checksum({"b": b"1"}))

    def test_directory_checksum(self):
        """A directory's files give the same checksum as the package holding them."""
        pairs = [("provider/x.yaml", b"x"), ("manifest.yaml", b"m")]
        self.assertEqual(directory_checksum(pairs), package_checksum(dict(pairs)))
        self.assertEqual(directory_checksum([("provider\\x.yaml", b"x"), ("manifest.yaml", b"m")]),
                         package_checksum(dict(pairs)))
