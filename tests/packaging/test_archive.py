"""Tests for difydaemon.packaging.archive."""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
import zipfile

from difydaemon.errors import MalformedPackageError, PackageTooLargeError, UnsafePackagePathError
from difydaemon.packaging.archive import PackageFiles, extract_package, read_package
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from tests.packaging.fixtures import ALL_PACKAGES, fixture_bytes

LIMIT = 1024 * 1024


def raw_zip(entries, compression=zipfile.ZIP_DEFLATED, comment=b""):
    """A zip built from (ZipInfo or name, content) pairs, duplicates allowed."""
    output = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(output, "w", compression=compression) as archive:
            for info, content in entries:
                archive.writestr(info, content)
            archive.comment = comment
    return output.getvalue()


def lie_about_sizes(data: bytes, declared: int) -> bytes:
    """Rewrite every local and central header to claim ``declared`` uncompressed bytes."""
    patched = bytearray(data)
    position = 0
    while (position := patched.find(b"PK\x03\x04", position)) != -1:
        struct.pack_into("<I", patched, position + 22, declared)
        position += 4
    position = 0
    while (position := patched.find(b"PK\x01\x02", position)) != -1:
        struct.pack_into("<I", patched, position + 24, declared)
        position += 4
    return bytes(patched)


class ReadPackageTests(SynchronousTestCase):
    """read_package reads honest zips and refuses hostile ones."""

    def test_fixtures_in_zip_order(self):
        """Every fixture reads with entries in central-directory order and its comment."""
        for name in ALL_PACKAGES:
            data = fixture_bytes(name)
            files = read_package(data, 52428800)
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                self.assertEqual(files.names(), archive.namelist())
                self.assertEqual(files["manifest.yaml"], archive.read("manifest.yaml"))
                self.assertEqual(files.comment, archive.comment)

    def test_mapping_behaviour(self):
        """PackageFiles is a read-only ordered mapping."""
        files = read_package(build_package({"b": b"2", "a": b"1"}), LIMIT)
        self.assertEqual(list(files), ["a", "b"])
        self.assertEqual(dict(files), {"a": b"1", "b": b"2"})
        self.assertIn("a", files)
        self.assertNotIn("c", files)
        self.assertEqual(len(files), 2)
        self.assertEqual(files.total_size(), 2)
        with self.assertRaises(TypeError):
            files["c"] = b"3"

    def test_stored_entries(self):
        """Uncompressed (stored) entries are read too."""
        data = raw_zip([("a.txt", b"hello")], compression=zipfile.ZIP_STORED)
        self.assertEqual(read_package(data, LIMIT)["a.txt"], b"hello")

    def test_too_big_compressed(self):
        """A zip larger than the limit is refused before it is opened."""
        data = build_package({"a": os.urandom(4096)})
        with self.assertRaises(PackageTooLargeError) as caught:
            read_package(data, 1024)
        self.assertEqual(caught.exception.message, "file size exceeds the maximum limit")

    def test_too_big_declared(self):
        """Declared uncompressed sizes over the limit are refused with the Go text."""
        data = build_package({"a": b"\0" * 600, "b": b"\0" * 600})
        with self.assertRaises(PackageTooLargeError) as caught:
            read_package(data, 1000)
        self.assertEqual(
            caught.exception.message,
            "plugin package size is too large, please ensure the uncompressed size is less than 1000 bytes",
        )

    def test_too_big_with_lying_headers(self):
        """A zip bomb whose headers claim tiny sizes is stopped by the actual byte count."""
        bomb = lie_about_sizes(build_package({"bomb": b"\0" * (4 * LIMIT)}), 10)
        with zipfile.ZipFile(io.BytesIO(bomb)) as archive:
            self.assertEqual(archive.getinfo("bomb").file_size, 10)
        self.assertLess(len(bomb), LIMIT)
        with self.assertRaises(PackageTooLargeError) as caught:
            read_package(bomb, LIMIT)
        self.assertIn(f"less than {LIMIT} bytes", caught.exception.message)

    def test_lying_headers_under_limit(self):
        """Content that disagrees with its declared size, but fits, is malformed."""
        liar = lie_about_sizes(build_package({"a": b"x" * 100}), 10)
        with self.assertRaises(MalformedPackageError) as caught:
            read_package(liar, LIMIT)
        self.assertIn("size mismatch", caught.exception.message)

    def test_entry_of_many_slices(self):
        """An entry whose deflated data spans many input slices reads back whole, its neighbours too."""
        blob = os.urandom(300_000) + b"z" * 300_000 + os.urandom(100_001)
        files = read_package(build_package({"a": b"head", "data/blob.bin": blob, "z": b"tail"}), LIMIT)
        self.assertEqual((files["a"], files["data/blob.bin"], files["z"]), (b"head", blob, b"tail"))

    def test_truncated_deflate_stream(self):
        """Deflated data that ends before its stream does is malformed, not a short file."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("a", os.urandom(200_000))
        data = bytearray(buffer.getvalue())
        central = data.find(b"PK\x01\x02")
        compressed = struct.unpack_from("<I", data, central + 20)[0]
        # the entry's data loses its last 1000 bytes; the sizes still claim them
        start = 30 + len("a")
        cut = data[: start + compressed - 1000] + b"\x00" * 1000 + data[start + compressed :]
        with self.assertRaises(MalformedPackageError):
            read_package(bytes(cut), LIMIT)

    def test_bad_crc(self):
        """A corrupted CRC is refused as malformed."""
        data = bytearray(build_package({"a": b"hello"}))
        central = data.find(b"PK\x01\x02")
        struct.pack_into("<I", data, central + 16, 0)
        with self.assertRaises(MalformedPackageError):
            read_package(bytes(data), LIMIT)

    def test_malformed_zip(self):
        """Garbage is refused and the message says difypkg, not zip."""
        for data in (b"", b"not a zip at all", build_package({"a": b"1"})[:-30]):
            with self.assertRaises(MalformedPackageError) as caught:
                read_package(data, LIMIT)
            self.assertIn("difypkg", caught.exception.message)
            self.assertNotIn("zip", caught.exception.message.lower())

    def assertUnsafe(self, data, fragment):
        with self.assertRaises(UnsafePackagePathError) as caught:
            read_package(data, LIMIT)
        self.assertIn(fragment, caught.exception.message)

    def test_dot_dot(self):
        """A name with a .. component is refused."""
        self.assertUnsafe(raw_zip([("a/../../evil", b"x")]), "illegal file path")

    def test_absolute(self):
        """An absolute name is refused."""
        self.assertUnsafe(raw_zip([("/etc/evil", b"x")]), "absolute path")

    def test_backslash(self):
        """A backslash in a name is refused."""
        self.assertUnsafe(raw_zip([("..\\evil", b"x")]), "backslash")

    def test_drive_letter(self):
        """A drive letter is refused."""
        self.assertUnsafe(raw_zip([("C:/evil", b"x")]), "drive letter")

    def test_empty_component(self):
        """Empty and . components are refused."""
        self.assertUnsafe(raw_zip([("a//b", b"x")]), "irregular")
        self.assertUnsafe(raw_zip([("./b", b"x")]), "irregular")

    def test_directory_entry(self):
        """A directory entry is refused."""
        self.assertUnsafe(raw_zip([("dir/", b""), ("dir/a", b"x")]), "directory entries")

    def test_symlink(self):
        """An entry whose unix mode is a symlink is refused."""
        info = zipfile.ZipInfo("link", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        self.assertUnsafe(raw_zip([(info, b"/etc/passwd")]), "symbolic links")

    def test_duplicate(self):
        """Two entries with one name are refused."""
        self.assertUnsafe(raw_zip([("a", b"1"), ("a", b"2")]), "duplicate entry")

    def test_unsupported_method(self):
        """Compression methods the Go reader lacks are refused as malformed."""
        data = raw_zip([("a", b"x" * 100)], compression=zipfile.ZIP_BZIP2)
        with self.assertRaises(MalformedPackageError) as caught:
            read_package(data, LIMIT)
        self.assertIn("unsupported compression method", caught.exception.message)


class ExtractPackageTests(SynchronousTestCase):
    """extract_package writes files safely and cleans up after itself."""

    def test_extracts_with_modes(self):
        """Files land under the target with 0644, directories with 0755."""
        target = os.path.join(self.mktemp(), "plugin")
        files = read_package(build_package(echo_plugin_files()), LIMIT)
        extract_package(files, target)
        for name, content in files.items():
            path = os.path.join(target, *name.split("/"))
            with open(path, "rb") as handle:
                self.assertEqual(handle.read(), content)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(target, "provider")).st_mode), 0o755)

    def test_refuses_escape_and_leaves_nothing(self):
        """A .. entry is refused and everything already written is removed."""
        base = self.mktemp()
        target = os.path.join(base, "plugin")
        files = PackageFiles.from_mapping({"a/ok.txt": b"1", "b.txt": b"2", "../evil": b"3"})
        with self.assertRaises(UnsafePackagePathError):
            extract_package(files, target)
        self.assertFalse(os.path.exists(target))
        self.assertFalse(os.path.exists(os.path.join(base, "evil")))

    def test_refuses_symlinked_directory(self):
        """A directory symlink already inside the target cannot redirect writes outside."""
        base = self.mktemp()
        target = os.path.join(base, "plugin")
        outside = os.path.join(base, "outside")
        os.makedirs(target)
        os.makedirs(outside)
        os.symlink(outside, os.path.join(target, "link"))
        files = PackageFiles.from_mapping({"first.txt": b"1", "link/evil.txt": b"2"})
        with self.assertRaises(UnsafePackagePathError):
            extract_package(files, target)
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(os.listdir(target), ["link"])

    def test_existing_file_is_not_overwritten(self):
        """Extraction never overwrites an existing file, and cleans up what it wrote."""
        target = self.mktemp()
        os.makedirs(target)
        with open(os.path.join(target, "b.txt"), "wb") as handle:
            handle.write(b"keep")
        files = PackageFiles.from_mapping({"a.txt": b"1", "b.txt": b"2"})
        with self.assertRaises(FileExistsError):
            extract_package(files, target)
        self.assertEqual(os.listdir(target), ["b.txt"])
        with open(os.path.join(target, "b.txt"), "rb") as handle:
            self.assertEqual(handle.read(), b"keep")
