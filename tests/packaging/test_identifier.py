"""Tests for difydaemon.packaging.identifier."""

from __future__ import annotations

import hashlib

from difydaemon.errors import UniqueIdentifierError
from difydaemon.packaging.identifier import compose_identifier, is_uuid, parse_identifier
from difydaemon.testing.cases import SynchronousTestCase

SUM64 = "a" * 64
SUM32 = "0123456789abcdef" * 2


class ParseIdentifierTests(SynchronousTestCase):
    """The identifier grammar of http-api §4.1."""

    def test_full_identifier(self):
        """An author/name:version@checksum identifier splits into its parts."""
        parsed = parse_identifier(f"langgenius/openai:0.0.19@{SUM64}")
        self.assertEqual(
            (parsed.author, parsed.name, parsed.version, parsed.checksum),
            ("langgenius", "openai", "0.0.19", SUM64),
        )
        self.assertEqual(parsed.plugin_id, "langgenius/openai")
        self.assertEqual(str(parsed), f"langgenius/openai:0.0.19@{SUM64}")

    def test_without_author(self):
        """The author is optional and plugin_id is then the bare name."""
        parsed = parse_identifier(f"echo:1.2@{SUM32}")
        self.assertIsNone(parsed.author)
        self.assertEqual(parsed.plugin_id, "echo")
        self.assertEqual(parsed.version, "1.2")

    def test_accepted_shapes(self):
        """Two to four numeric parts, a word suffix, 32 to 64 hex digits are accepted."""
        for text in (
            f"a/b:1.2.3.4@{SUM32}",
            f"a-b_c/d-e_f:9999.0.1-beta_1@{SUM64}",
            f"x/y:1.0.0-{'w' * 16}@{'f' * 40}",
            f"{'a' * 64}/{'n' * 255}:0.0@{SUM32}",
        ):
            self.assertEqual(parse_identifier(text).raw, text)

    def test_refused_shapes(self):
        """Everything outside the grammar raises UniqueIdentifierError."""
        for text in (
            "",
            f"Langgenius/openai:0.0.1@{SUM64}",
            f"a/b:1@{SUM64}",
            f"a/b:1.2.3.4.5@{SUM64}",
            f"a/b:12345.0.0@{SUM64}",
            f"a/b:1.0.0-{'w' * 17}@{SUM64}",
            f"a/b:1.0.0@{'a' * 31}",
            f"a/b:1.0.0@{'a' * 65}",
            f"a/b:1.0.0@{'A' * 64}",
            f"a/b:1.0.0@{SUM64}\n",
            f"{'a' * 65}/b:1.0.0@{SUM64}",
            f"a/b/c:1.0.0@{SUM64}",
            f"a/b:1.0.0-é@{SUM64}",
            f"a/b:1.0.0{SUM64}",
        ):
            with self.assertRaises(UniqueIdentifierError, msg=repr(text)) as caught:
                parse_identifier(text)
            self.assertIn("invalid plugin unique identifier", caught.exception.message)

    def test_error_code(self):
        """The error is reported as -400 PluginUniqueIdentifierError."""
        with self.assertRaises(UniqueIdentifierError) as caught:
            parse_identifier("nope")
        self.assertEqual((caught.exception.code, caught.exception.error_type), (-400, "PluginUniqueIdentifierError"))

    def test_is_remote(self):
        """An author that parses as a UUID (hyphenated or bare hex) marks a remote plugin."""
        remote = parse_identifier(f"0a1b2c3d-0000-4000-8000-00000000abcd/debug:0.0.1@{SUM32}")
        self.assertTrue(remote.is_remote)
        self.assertTrue(parse_identifier(f"{'0' * 32}/debug:0.0.1@{SUM32}").is_remote)
        self.assertFalse(parse_identifier(f"acme/echo:0.0.1@{SUM32}").is_remote)
        self.assertFalse(parse_identifier(f"echo:0.0.1@{SUM32}").is_remote)

    def test_is_uuid_shapes(self):
        """Misplaced hyphens are not a UUID, as in Go's uuid.Parse."""
        self.assertFalse(is_uuid("0a1b2c3d0-000-4000-8000-00000000abcd"))
        self.assertTrue(is_uuid("0A1B2C3D-0000-4000-8000-00000000ABCD"))

    def test_hashed(self):
        """hashed is the hex SHA-256 of the full identifier text."""
        text = f"acme/echo:0.0.1@{SUM32}"
        self.assertEqual(parse_identifier(text).hashed, hashlib.sha256(text.encode()).hexdigest())

    def test_compose(self):
        """compose_identifier joins manifest fields and omits a missing author."""
        self.assertEqual(compose_identifier("acme", "echo", "0.0.1", SUM64).raw, f"acme/echo:0.0.1@{SUM64}")
        self.assertEqual(compose_identifier(None, "echo", "0.0.1", SUM64).raw, f"echo:0.0.1@{SUM64}")
