"""
The canonical request target: every path trick, applied at every position
of every kind of route, is either read as the plain route or refused.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from difydaemon.api.paths import (
    BAD_ESCAPE,
    CONTROL_BYTE,
    NO_ROUTE,
    NOT_ORIGIN_FORM,
    PathRefusal,
    RequestTarget,
    canonical_target,
)
from difydaemon.testing.cases import SynchronousTestCase

TENANT = b"0193a8a4-0000-7000-8000-000000000001"
#: one path of each shape the daemon routes
ROUTES = [
    b"/plugin/" + TENANT + b"/dispatch/tool/invoke",
    b"/plugin/" + TENANT + b"/management/list",
    b"/plugin/" + TENANT + b"/management/install/upload/package",
    b"/plugin/" + TENANT + b"/management/install/tasks/t1/delete/acme/echo:0.0.1@" + b"a" * 64,
    b"/plugin/" + TENANT + b"/endpoint/setup",
    b"/plugin/" + TENANT + b"/debugging/key",
    b"/plugin/" + TENANT + b"/asset/abc.svg",
    b"/plugin/" + TENANT + b"/extract-asset/",
    b"/health/check",
    b"/e/hook0123/",
]


def slashes(path: bytes) -> list[int]:
    """The offsets of the slashes after the first one."""
    return [i for i, byte in enumerate(path) if byte == 0x2F and i > 0]


class NormalisedTests(SynchronousTestCase):
    """Percent-encoding is decoded once, as gin does, so every encoded spelling is the plain route."""

    def test_plain_routes(self):
        """A plain path is split on slashes; the query is kept raw apart."""
        self.assertEqual(
            canonical_target(b"/plugin/t/management/list?page=1&x=%2F"),
            RequestTarget((b"plugin", b"t", b"management", b"list"), b"page=1&x=%2F"),
        )
        self.assertEqual(canonical_target(b"/"), RequestTarget((b"",), b""))
        self.assertEqual(canonical_target(b"/plugin/t/extract-asset/").segments,
                         (b"plugin", b"t", b"extract-asset", b""))

    def test_any_byte_encoded_at_any_offset(self):
        """Encoding any one byte of the path (upper or lower hex, %70-style) gives the plain route."""
        for route in ROUTES:
            plain = canonical_target(route)
            for offset in range(1, len(route)):
                for form in (b"%%%02X", b"%%%02x"):
                    tricked = route[:offset] + form % route[offset] + route[offset + 1:]
                    self.assertEqual(canonical_target(tricked), plain, tricked)

    def test_every_byte_encoded(self):
        """A path with every byte encoded is still the plain route."""
        for route in ROUTES:
            tricked = b"/" + b"".join(b"%%%02X" % byte for byte in route[1:])
            self.assertEqual(canonical_target(tricked), canonical_target(route), tricked)

    def test_encoded_slash_at_every_slash(self):
        """%2F and %2f stand for a slash anywhere, as in Go: /plugin%2F<t>/... is /plugin/<t>/..."""
        for route in ROUTES:
            plain = canonical_target(route)
            for offset in slashes(route):
                for slash in (b"%2F", b"%2f"):
                    tricked = route[:offset] + slash + route[offset + 1:]
                    self.assertEqual(canonical_target(tricked), plain, tricked)

    def test_decoded_once_only(self):
        """What decoding gives is never decoded again: %252F is the bytes %2F inside one segment."""
        for route in ROUTES:
            for offset in slashes(route)[:-1]:
                tricked = route[:offset] + b"%252F" + route[offset + 1:]
                target = canonical_target(tricked)
                self.assertEqual(len(target.segments), len(canonical_target(route).segments) - 1, tricked)
                self.assertIn(b"%2F", b"".join(target.segments), tricked)
        self.assertEqual(canonical_target(b"/%2570lugin/t").segments, (b"%70lugin", b"t"))


class RefusedTests(SynchronousTestCase):
    """Spellings gin routes nowhere are refused, wherever they appear in the routed part."""

    def test_doubled_and_tripled_slashes(self):
        """//, /// (and their encoded forms) at any slash of a route are no route."""
        for route in ROUTES:
            for offset in [0] + slashes(route)[:-1]:
                for extra in (b"/", b"//", b"%2F", b"/%2f"):
                    tricked = route[:offset + 1] + extra + route[offset + 1:]
                    self.assertEqual(canonical_target(tricked), NO_ROUTE, tricked)

    def test_dot_segments(self):
        """./ and x/../ inserted after any slash of a route are no route, encoded or not."""
        # (in /e/<hook>/... they would make a new hook id and tail: see EndpointTailTests)
        for route in ROUTES[:-1]:
            for offset in [0] + slashes(route)[:-1]:
                for extra in (b"./", b"x/../", b"%2e/", b"%2E%2E/", b".%2e/", b"x%2F..%2F"):
                    tricked = route[:offset + 1] + extra + route[offset + 1:]
                    self.assertEqual(canonical_target(tricked), NO_ROUTE, tricked)
        self.assertEqual(canonical_target(b"/plugin/t/management/list/.."), NO_ROUTE)
        self.assertEqual(canonical_target(b"/plugin/t/management/list/."), NO_ROUTE)

    def test_malformed_escapes(self):
        """A % not followed by two hex digits, anywhere in the path, is a 400."""
        for route in ROUTES:
            for offset in range(1, len(route) + 1):
                for bad in (b"%zz", b"%%41", b"%4g", b"%g"):
                    tricked = route[:offset] + bad + route[offset:]
                    self.assertEqual(canonical_target(tricked), BAD_ESCAPE, tricked)
            for bad in (b"%", b"%4"):
                self.assertEqual(canonical_target(route + bad), BAD_ESCAPE, route + bad)
                self.assertEqual(canonical_target(route + bad + b"?q=1"), BAD_ESCAPE, route + bad)
        self.assertEqual(BAD_ESCAPE.status, 400)
        # the query is not the path: its escapes are the route's business
        self.assertIsInstance(canonical_target(b"/health/check?a=%zz"), RequestTarget)

    def test_control_bytes(self):
        """A decoded control byte in the routed part is a 400."""
        for route in ROUTES[:-1]:
            for offset in range(1, len(route)):
                for control in (b"%00", b"%0A", b"%0d", b"%7F", b"%1b"):
                    tricked = route[:offset] + control + route[offset:]
                    self.assertEqual(canonical_target(tricked), CONTROL_BYTE, tricked)

    def test_not_origin_form(self):
        """Asterisk, absolute URLs, empty targets and raw bytes outside printable ASCII are 400."""
        for target in (b"*", b"http://x/plugin/t/management/list", b"", b"plugin/t", b"/plugin/t\xc3\xa9",
                       b"/plugin/t x", b"/plugin/\x00", b"/plugin/t\x7f"):
            self.assertEqual(canonical_target(target), NOT_ORIGIN_FORM, target)
        self.assertEqual(NOT_ORIGIN_FORM.status, 400)
        self.assertEqual(NO_ROUTE.status, 404)

    def test_refusals_are_values(self):
        """Refusals say why, for the log."""
        for refusal in (BAD_ESCAPE, CONTROL_BYTE, NO_ROUTE, NOT_ORIGIN_FORM):
            self.assertIsInstance(refusal, PathRefusal)
            self.assertTrue(refusal.reason)


class EndpointTailTests(SynchronousTestCase):
    """The tail of /e/<hook_id>/<path> is the endpoint plugin's own path, handed over as Go does."""

    def test_tail_kept_decoded_and_uncleaned(self):
        """Empty, dot and control segments stay in the tail, decoded once."""
        target = canonical_target(b"/e/hook/a//b/../%2e/c%2Fd/%0A%2525?x=%2F")
        self.assertEqual(target.segments, (b"e", b"hook", b"a", b"", b"b", b"..", b".", b"c", b"d", b"\n%25"))
        self.assertEqual(target.query, b"x=%2F")

    def test_prefix_is_routed(self):
        """The e and hook segments themselves are checked like any route."""
        for target in (b"//e/hook/x", b"/e//x", b"/e/../plugin/t/management/list", b"/e/./x", b"/./e/hook/x"):
            self.assertEqual(canonical_target(target), NO_ROUTE, target)
        self.assertEqual(canonical_target(b"/e/ho%00ok/x"), CONTROL_BYTE)
        self.assertEqual(canonical_target(b"/%65/hook/x").segments, (b"e", b"hook", b"x"))


class EncodedPathTests(SynchronousTestCase):
    """encoded_path gives twisted.web a path from which it splits and decodes the canonical segments exactly."""

    def test_round_trip(self):
        """Splitting on / and decoding each segment, as twisted.web does, gives the segments back."""
        samples = [
            (b"plugin", b"t", b"management", b"list"),
            (b"e", b"hook", b"", b"..", b"%2F", b"a b", b"\n", b"?x", b"#y", b"\xc3\xa9", b"%", b"%25", b""),
            (b"",),
        ]
        for segments in samples:
            target = RequestTarget(segments, b"")
            encoded = target.encoded_path()
            self.assertRegex(encoded, rb"^/[\x21-\x7e]*$")
            self.assertNotIn(b"?", encoded)
            self.assertEqual(tuple(unquote_to_bytes(s) for s in encoded[1:].split(b"/")), segments, encoded)

    def test_plain_path_unchanged(self):
        """A path with nothing to escape is its own encoding."""
        target = canonical_target(b"/plugin/t/management/install/tasks/x/delete/acme/echo:0.0.1@ab")
        self.assertEqual(target.encoded_path(), b"/plugin/t/management/install/tasks/x/delete/acme/echo:0.0.1@ab")
        self.assertEqual(target.path, target.encoded_path())
