"""Tests for difydaemon.packaging.signature."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from difydaemon.packaging.archive import PackageFiles, read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.packaging.signature import (
    VERIFICATION_FILE,
    Verification,
    generate_key_pair,
    load_public_key,
    official_public_key,
    sign_package,
    verify_package,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from tests.packaging.fixtures import AGENT, FIXTURES, MAX_SIZE, OPENAI, UNSIGNED, fixture_bytes

_KEYS = {}


def shared_key_pair():
    """One 2048-bit pair shared by the module's tests (generation is slow)."""
    if "pair" not in _KEYS:
        _KEYS["pair"] = generate_key_pair(bits=2048)
    return _KEYS["pair"]


class VerifyFixtureTests(SynchronousTestCase):
    """verify_package against the real official packages."""

    def test_agent_is_langgenius(self):
        """The signed agent fixture verifies with the official key as langgenius."""
        files = read_package(fixture_bytes(AGENT), MAX_SIZE)
        self.assertNotIn(VERIFICATION_FILE, files)
        self.assertEqual(verify_package(files, [official_public_key()]), Verification("langgenius"))

    def test_changed_byte_fails(self):
        """Changing one byte of one entry breaks the signature."""
        files = read_package(fixture_bytes(AGENT), MAX_SIZE)
        entries = list(files.entries)
        name, content = entries[5]
        entries[5] = (name, bytes([content[0] ^ 1]) + content[1:])
        tampered = PackageFiles(entries=tuple(entries), comment=files.comment)
        self.assertIsNone(verify_package(tampered, [official_public_key()]))

    def test_changed_time_fails(self):
        """Changing the signing time in the comment breaks the signature."""
        files = read_package(fixture_bytes(AGENT), MAX_SIZE)
        comment = json.loads(files.comment)
        comment["time"] += 1
        tampered = PackageFiles(entries=files.entries, comment=json.dumps(comment).encode())
        self.assertIsNone(verify_package(tampered, [official_public_key()]))

    def test_unsigned_fixtures(self):
        """Packages with an empty comment are not verified."""
        for name in (OPENAI, UNSIGNED):
            files = read_package(fixture_bytes(name), MAX_SIZE)
            self.assertIsNone(verify_package(files, [official_public_key()]))

    def test_garbage_comments(self):
        """Unreadable comments mean not verified, never an exception."""
        files = read_package(fixture_bytes(UNSIGNED), MAX_SIZE)
        for comment in (b"{", b"[]", b'{"signature": 1, "time": 1}', b'{"signature": "!!", "time": 1}',
                        b'{"signature": "AAAA", "time": "1"}', b'{"signature": "AAAA", "time": true}', b"\xff"):
            self.assertIsNone(verify_package(PackageFiles(entries=files.entries, comment=comment),
                                             [official_public_key()]))


class SignRoundTripTests(SynchronousTestCase):
    """sign_package writes the §5.5 format and verify_package reads it back."""

    def test_round_trip_with_third_party_key(self):
        """A package signed with our key verifies only when our key is in the list."""
        private_pem, public_pem = shared_key_pair()
        signed = sign_package(build_package(echo_plugin_files()), private_pem, "partner", now=1700000000)
        files = read_package(signed, MAX_SIZE)
        self.assertIsNone(verify_package(files, [official_public_key()]))
        self.assertEqual(
            verify_package(files, [official_public_key(), load_public_key(public_pem)]), Verification("partner")
        )

    def test_signed_format(self):
        """Entries keep their order, the verification file comes last, the comment is compact JSON."""
        private_pem, public_pem = shared_key_pair()
        original = build_package(echo_plugin_files())
        signed = sign_package(original, private_pem, "community", now=1700000123)
        with zipfile.ZipFile(io.BytesIO(original)) as archive:
            original_names = archive.namelist()
        with zipfile.ZipFile(io.BytesIO(signed)) as archive:
            names = archive.namelist()
            contents = [archive.read(name) for name in names]
            comment = archive.comment
        self.assertEqual(names, original_names + [VERIFICATION_FILE])
        self.assertEqual(contents[-1], b'{"authorized_category":"community"}')
        self.assertRegex(comment, rb'^\{"signature":"[A-Za-z0-9+/=]+","time":1700000123\}$')
        # The signed data written out independently: entry hashes in zip order, then the time.
        data = b"".join(hashlib.sha256(content).digest() for content in contents) + b"1700000123"
        signature = base64.b64decode(json.loads(comment)["signature"])
        load_public_key(public_pem).verify(signature, data, padding.PKCS1v15(), hashes.SHA256())

    def test_resign_keeps_checksum_and_replaces_verification(self):
        """Re-signing at another time keeps the checksum and a single verification file."""
        private_pem, _ = shared_key_pair()
        once = sign_package(build_package(echo_plugin_files()), private_pem, "partner", now=1)
        twice = sign_package(once, private_pem, "partner", now=2)
        first, second = read_package(once, MAX_SIZE), read_package(twice, MAX_SIZE)
        self.assertEqual(package_checksum(first), package_checksum(second))
        self.assertEqual(second.names().count(VERIFICATION_FILE), 1)
        self.assertNotEqual(first.comment, second.comment)

    def test_unknown_category(self):
        """Only langgenius, partner and community can be signed for."""
        private_pem, _ = shared_key_pair()
        with self.assertRaises(ValueError):
            sign_package(build_package(echo_plugin_files()), private_pem, "friends", now=1)

    def test_bad_verification_file(self):
        """A signed package whose verification file names an unknown category is not verified."""
        private_pem, public_pem = shared_key_pair()
        key = serialization.load_pem_private_key(private_pem, password=None)

        def signed_with(category: bytes) -> PackageFiles:
            entries = [*echo_plugin_files().items(), (VERIFICATION_FILE, category)]
            data = b"".join(hashlib.sha256(content).digest() for _, content in entries) + b"5"
            signature = base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()
            comment = json.dumps({"signature": signature, "time": 5}).encode()
            return PackageFiles(entries=tuple(entries), comment=comment)

        keys = [load_public_key(public_pem)]
        self.assertEqual(verify_package(signed_with(b'{"authorized_category":"partner"}'), keys),
                         Verification("partner"))
        self.assertIsNone(verify_package(signed_with(b'{"authorized_category":"root"}'), keys))
        self.assertIsNone(verify_package(signed_with(b"not json"), keys))


class KeyTests(SynchronousTestCase):
    """Key loading accepts PKCS#1 RSA public keys only."""

    def test_official_key(self):
        """The embedded official key is the fixture key."""
        with open(f"{FIXTURES}/langgenius-official-public-key.pem", "rb") as handle:
            fixture = load_public_key(handle.read())
        self.assertEqual(official_public_key().public_numbers(), fixture.public_numbers())

    def test_generated_pair_formats(self):
        """Generated keys are PEM 'RSA PRIVATE KEY' and 'RSA PUBLIC KEY' of the asked size."""
        private_pem, public_pem = shared_key_pair()
        self.assertTrue(private_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertTrue(public_pem.startswith(b"-----BEGIN RSA PUBLIC KEY-----"))
        self.assertEqual(load_public_key(public_pem).key_size, 2048)

    def test_spki_refused(self):
        """An SPKI 'PUBLIC KEY' block is refused."""
        _, public_pem = shared_key_pair()
        spki = load_public_key(public_pem).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.assertTrue(spki.startswith(b"-----BEGIN PUBLIC KEY-----"))
        with self.assertRaises(ValueError):
            load_public_key(spki)

    def test_trailing_junk_refused(self):
        """Anything but whitespace after the PEM block is refused."""
        _, public_pem = shared_key_pair()
        self.assertEqual(load_public_key(public_pem + b"\n\n").key_size, 2048)
        with self.assertRaises(ValueError):
            load_public_key(public_pem + b"junk")
        with self.assertRaises(ValueError):
            load_public_key(public_pem + public_pem)

    def test_garbage_refused(self):
        """Text that is no PEM at all, or a corrupt body, is refused."""
        with self.assertRaises(ValueError):
            load_public_key(b"hello")
        with self.assertRaises(ValueError):
            load_public_key(b"-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n")
