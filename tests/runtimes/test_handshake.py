"""
Tests for :mod:`difydaemon.runtimes.handshake`: the debug registration
parser (bytes split at every offset) and the declaration and identity made
from a registration.
"""

from __future__ import annotations

import base64
import hashlib

import orjson

from difydaemon.errors import DaemonError
from difydaemon.packaging.declaration import asset_id
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.runtimes import handshake as hs
from difydaemon.runtimes.handshake import (
    HandshakeDecoder,
    KeyOffered,
    Registered,
    Registration,
    Rejected,
    build_remote_declaration,
    remote_checksum,
    remote_plugin,
)
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.debug_messages import (
    END,
    HEARTBEAT,
    ICON,
    asset_chunks,
    echo_manifest,
    echo_tool_provider,
    handshake,
    message,
    registration,
)

KEY = "5f0c1d2e-3a4b-4c5d-8e6f-000000000001"
TENANT = "0193a8a4-0000-7000-8000-000000000001"


def feed_all(data: bytes, splits=(), **kwargs) -> list:
    """Feed ``data`` cut at ``splits``; every item produced."""
    decoder = HandshakeDecoder(**kwargs)
    items = []
    start = 0
    for split in (*splits, len(data)):
        items.extend(decoder.feed(data[start:split]))
        start = split
    return items


class HandshakeDecoderTests(SynchronousTestCase):
    """The registration parser."""

    def test_sdk_registration(self):
        """The SDK's whole registration yields the key, then everything it registered."""
        items = feed_all(registration(KEY))
        self.assertEqual(items[0], KeyOffered(KEY))
        self.assertIsInstance(items[1], Registered)
        self.assertEqual(len(items), 2)
        registered = items[1].registration
        self.assertEqual(registered.manifest, echo_manifest())
        self.assertEqual(registered.declarations, {"tool": echo_tool_provider()})
        self.assertEqual(registered.assets, {"icon.svg": ICON})
        # the blank line after ``end`` and the first heartbeat are plugin protocol
        self.assertEqual(items[1].rest, b"\n" + HEARTBEAT)

    def test_every_split(self):
        """Cutting the bytes at any one offset gives the same items, and the same bytes after end."""
        data = registration(KEY)
        whole = feed_all(data)
        for offset in range(len(data) + 1):
            decoder = HandshakeDecoder()
            first = decoder.feed(data[:offset])
            second = decoder.feed(data[offset:])
            items = first + second
            self.assertEqual(items[:-1], whole[:-1], offset)
            self.assertEqual(items[-1].registration, whole[-1].registration, offset)
            # bytes fed after the decoder finished belong to the plugin protocol
            after = items[-1].rest + (data[offset:] if second == [] else b"")
            self.assertEqual(after, whole[-1].rest, offset)

    def test_byte_by_byte(self):
        """One byte at a time works too."""
        data = registration(KEY)
        items = feed_all(data, range(1, len(data)))
        self.assertEqual(items[0], KeyOffered(KEY))
        self.assertEqual(items[1].registration, feed_all(data)[1].registration)

    def test_assets_in_pieces(self):
        """Chunks of one file are appended in order; several files stay apart."""
        big = bytes(range(256)) * 100
        data = (
            handshake(KEY) + message("manifest_declaration", echo_manifest())
            + message("tool_declaration", [echo_tool_provider()])
            + asset_chunks("big.bin", big, 1000) + asset_chunks("icon.svg", ICON) + END
        )
        registered = feed_all(data)[-1].registration
        self.assertEqual(registered.assets, {"big.bin": big, "icon.svg": ICON})

    def test_blank_lines_ignored(self):
        """Blank and whitespace-only lines anywhere are skipped."""
        data = b"\n \n" + registration(KEY).replace(b"\n\n", b"\n\r\n\n")
        items = feed_all(data)
        self.assertEqual(items[0], KeyOffered(KEY))
        self.assertIsInstance(items[1], Registered)

    def test_first_list_element_kept(self):
        """A declaration list keeps only its first element."""
        second = dict(echo_tool_provider(), oauth_schema={"x": 1})
        data = (
            handshake(KEY) + message("manifest_declaration", echo_manifest())
            + message("tool_declaration", [echo_tool_provider(), second]) + END
        )
        self.assertEqual(feed_all(data)[-1].registration.declarations["tool"], echo_tool_provider())

    def test_unknown_types_ignored(self):
        """A message type this daemon does not know is skipped."""
        data = (
            handshake(KEY) + message("manifest_declaration", echo_manifest())
            + message("spaceship_declaration", [{}])
            + message("tool_declaration", [echo_tool_provider()]) + END
        )
        self.assertIsInstance(feed_all(data)[-1], Registered)

    def test_finished_after_end(self):
        """After ``end`` the decoder takes nothing more."""
        decoder = HandshakeDecoder()
        items = decoder.feed(registration(KEY))
        self.assertTrue(decoder.finished)
        self.assertIsInstance(items[-1], Registered)
        self.assertEqual(decoder.feed(handshake(KEY)), [])

    def assertRejected(self, data: bytes, text: str, **kwargs):
        items = feed_all(data, **kwargs)
        self.assertEqual(items[-1], Rejected(text))
        return items

    def test_garbage_first_line(self):
        """A first line that is not JSON is an invalid handshake."""
        items = self.assertRejected(b"GET / HTTP/1.1\r\n", hs.INVALID_HANDSHAKE)
        self.assertEqual(len(items), 1)

    def test_not_handshake_first(self):
        """Anything but a handshake first is refused, even a valid registration message."""
        self.assertRejected(message("manifest_declaration", echo_manifest()), hs.INVALID_HANDSHAKE)

    def test_handshake_without_key(self):
        """A handshake without a string key is refused."""
        self.assertRejected(b'{"type":"handshake","data":{}}\n', hs.INVALID_HANDSHAKE)
        self.assertRejected(b'{"type":"handshake","data":{"key":7}}\n', hs.INVALID_HANDSHAKE)
        self.assertRejected(b'[1, 2]\n', hs.INVALID_HANDSHAKE)

    def test_second_handshake(self):
        """A second handshake is refused."""
        self.assertRejected(handshake(KEY) + handshake(KEY), hs.DUPLICATE_HANDSHAKE)

    def test_garbage_after_handshake(self):
        """A non-JSON line after the handshake is refused."""
        self.assertRejected(handshake(KEY) + b"hello\n", hs.INVALID_MESSAGE)

    def test_duplicate_declaration(self):
        """Each declaration kind may come once."""
        data = (
            handshake(KEY) + message("manifest_declaration", echo_manifest())
            + message("tool_declaration", [echo_tool_provider()])
            + message("tool_declaration", [echo_tool_provider()])
        )
        self.assertRejected(data, "register failed, tool declaration already registered")

    def test_duplicate_manifest(self):
        """The manifest may come once."""
        data = handshake(KEY) + message("manifest_declaration", echo_manifest()) * 2
        self.assertRejected(data, "register failed, manifest declaration already registered")

    def test_declaration_not_a_list(self):
        """A declaration whose data is not a non-empty list of objects is refused."""
        for data in ({}, [], ["x"]):
            self.assertRejected(
                handshake(KEY) + message("model_declaration", data), "register failed, invalid model declaration"
            )

    def test_end_without_provider(self):
        """``end`` needs at least one provider declaration."""
        data = handshake(KEY) + message("manifest_declaration", echo_manifest()) + END
        self.assertRejected(data, hs.NO_PROVIDER)

    def test_end_without_manifest(self):
        """``end`` needs the manifest."""
        data = handshake(KEY) + message("tool_declaration", [echo_tool_provider()]) + END
        self.assertRejected(data, hs.NO_MANIFEST)

    def test_assets_too_large(self):
        """The decoded asset total is capped."""
        data = handshake(KEY) + asset_chunks("a.bin", b"x" * 600, 100) + asset_chunks("b.bin", b"y" * 500, 100)
        items = self.assertRejected(data, hs.ASSETS_TOO_LARGE, max_asset_size=1000)
        self.assertEqual(items[0], KeyOffered(KEY))

    def test_assets_at_the_cap(self):
        """Exactly the cap is accepted."""
        data = (
            handshake(KEY) + message("tool_declaration", [echo_tool_provider()])
            + message("manifest_declaration", echo_manifest()) + asset_chunks("a.bin", b"x" * 1000, 300) + END
        )
        self.assertIsInstance(feed_all(data, max_asset_size=1000)[-1], Registered)

    def test_bad_asset_chunk(self):
        """Bad base64, a path as file name or a missing field is refused."""
        for data in (
            {"filename": "a.svg", "data": "***", "end": True},
            {"filename": "../a.svg", "data": "", "end": True},
            {"filename": "a.svg", "end": True},
        ):
            self.assertRejected(handshake(KEY) + message("asset_chunk", data), hs.INVALID_ASSET)

    def test_long_line(self):
        """A line over the limit is refused, even before its newline arrives."""
        self.assertRejected(handshake(KEY) + b"x" * 101, hs.MESSAGE_TOO_LARGE, max_line_size=100)
        self.assertRejected(handshake(KEY) + b"x" * 101 + b"\n", hs.MESSAGE_TOO_LARGE, max_line_size=100)

    def test_handshake_line_bounded(self):
        """Up to its handshake line a connection sends at most 1 KiB, blank lines included; over it is refused."""
        padding = b" " * (hs.MAX_HANDSHAKE_SIZE - len(handshake(KEY)))
        self.assertEqual(feed_all(padding + handshake(KEY)), [KeyOffered(KEY)])
        self.assertEqual(feed_all(b"\n" * len(padding) + handshake(KEY)), [KeyOffered(KEY)])
        for data in (b" " + padding + handshake(KEY), b"\n" + b"\n" * len(padding) + handshake(KEY),
                     b"x" * (hs.MAX_HANDSHAKE_SIZE + 1), b"\n" * (hs.MAX_HANDSHAKE_SIZE + 1)):
            self.assertRejected(data, hs.HANDSHAKE_TOO_LARGE)
            # refused as soon as the bound is passed, wherever the bytes are cut
            for offset in range(0, len(data), 97):
                items = feed_all(data, (offset,))
                self.assertEqual(items, [Rejected(hs.HANDSHAKE_TOO_LARGE)], offset)

    def test_later_lines_not_bounded_by_the_handshake(self):
        """Once the handshake line is in, lines are bounded by max_line_size only."""
        items = feed_all(handshake(KEY) + message("manifest_declaration", {"x": "y" * 4 * hs.MAX_HANDSHAKE_SIZE}))
        self.assertEqual(items, [KeyOffered(KEY)])

    def test_nothing_before_newline(self):
        """An unfinished first line yields nothing yet."""
        self.assertEqual(feed_all(handshake(KEY)[:-1]), [])


class RemoteDeclarationTests(SynchronousTestCase):
    """The declaration and identity of a registration."""

    def registration(self, manifest=None, tool=None, assets=None) -> Registration:
        return Registration(
            manifest=manifest if manifest is not None else echo_manifest(),
            declarations={"tool": tool if tool is not None else echo_tool_provider()},
            assets={"icon.svg": ICON} if assets is None else assets,
        )

    def test_declaration(self):
        """The declaration has package-style defaults, remapped icons and the SDK's plugin lists."""
        declaration, assets = build_remote_declaration(self.registration())
        icon = asset_id(ICON, "icon.svg")
        self.assertEqual(assets, {icon: ICON})
        self.assertTrue(icon.endswith(".svg"))
        self.assertEqual(icon[:-4], hashlib.sha256(ICON + b"icon.svg").hexdigest())
        self.assertEqual(declaration["icon"], icon)
        self.assertEqual(declaration["tool"]["identity"]["icon"], icon)
        self.assertEqual(declaration["icon_dark"], "")
        self.assertEqual(declaration["tags"], [])
        self.assertIs(declaration["verified"], False)
        self.assertEqual(declaration["plugins"]["tools"], ["provider/echo.yaml"])
        tool = declaration["tool"]["tools"][0]
        self.assertNotIn("extra", tool)
        self.assertNotIn("extra", declaration["tool"])
        self.assertEqual(tool["parameters"][0]["options"], [])
        self.assertEqual(declaration["label"]["en_US"], "Echo")
        self.assertEqual(declaration["resource"]["permission"], {"storage": {"enabled": True, "size": 1048576}})

    def test_identity(self):
        """Identifier = author/name:version@sha256(JSON(declaration) ‖ tenant)."""
        plugin = remote_plugin(self.registration(), TENANT)
        expected = hashlib.sha256(orjson.dumps(plugin.declaration) + TENANT.encode()).hexdigest()
        self.assertEqual(remote_checksum(plugin.declaration, TENANT), expected)
        self.assertEqual(plugin.identifier, f"acme/echo:0.0.1@{expected}")
        self.assertEqual(parse_identifier(plugin.identifier).plugin_id, "acme/echo")
        self.assertEqual(plugin.plugin_id, "acme/echo")
        self.assertEqual(plugin.providers, {"tool": "echo"})

    def test_tenants_differ(self):
        """The same plugin gets a different identifier per tenant, and the same one again."""
        one = remote_plugin(self.registration(), TENANT)
        two = remote_plugin(self.registration(), "another tenant")
        self.assertNotEqual(one.identifier, two.identifier)
        self.assertEqual(remote_plugin(self.registration(), TENANT).identifier, one.identifier)

    def test_uppercase_author(self):
        """An uppercase manifest author (the SDK allows it) is lowercased."""
        plugin = remote_plugin(self.registration(manifest=echo_manifest(author="Acme")), TENANT)
        self.assertEqual(plugin.plugin_id, "acme/echo")
        self.assertEqual(plugin.declaration["author"], "acme")

    def test_no_author(self):
        """A manifest without an author is refused with the field named."""
        manifest = echo_manifest()
        del manifest["author"]
        error = self.assertRaises(DaemonError, remote_plugin, self.registration(manifest=manifest), TENANT)
        self.assertIn("author", error.message)

    def test_bad_version(self):
        """The manifest checks of packages apply."""
        error = self.assertRaises(
            DaemonError, remote_plugin, self.registration(manifest=echo_manifest(version="1.0")), TENANT
        )
        self.assertIn("version", error.message)

    def test_missing_icon_asset(self):
        """An icon that was not sent as an asset is refused."""
        error = self.assertRaises(DaemonError, remote_plugin, self.registration(assets={}), TENANT)
        self.assertIn("icon.svg", error.message)

    def test_strings_survive(self):
        """Strings YAML would read as other types stay strings; floats stay floats."""
        tool = echo_tool_provider()
        tool["tools"][0]["parameters"][0].update(default="yes", min=1e-05, max=2.5, llm_description="null")
        declaration, _ = build_remote_declaration(self.registration(tool=tool))
        parameter = declaration["tool"]["tools"][0]["parameters"][0]
        self.assertEqual(
            (parameter["default"], parameter["min"], parameter["max"], parameter["llm_description"]),
            ("yes", 1e-05, 2.5, "null"),
        )

    def test_base64_round_trip(self):
        """Binary assets come through the chunks unchanged."""
        content = bytes(range(256))
        data = (
            handshake(KEY) + message("manifest_declaration", echo_manifest())
            + message("tool_declaration", [echo_tool_provider()])
            + message("asset_chunk", {"filename": "icon.svg", "data": base64.b64encode(content).decode(), "end": True})
            + END
        )
        self.assertEqual(feed_all(data)[-1].registration.assets["icon.svg"], content)
