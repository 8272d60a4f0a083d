"""
The front door's verdict on a request head: canonical target, key, body
bound, and the bytes of a refusal.
"""

from __future__ import annotations

import attrs

import orjson

from difydaemon.api import envelope
from difydaemon.api.admission import (
    HEAD_TIMED_OUT,
    HEADERS_TOO_LARGE,
    MULTIPART_OVERHEAD,
    UNAUTHORIZED,
    ANY,
    ROUTES,
    UPLOAD_TOO_LARGE,
    URI_TOO_LONG,
    Admitted,
    BodyLimits,
    FrontDoor,
    Refused,
    Route,
    refusal_response,
)
from difydaemon.api.pace import KEYED_PACE, PUBLIC_PACE
from difydaemon.testing.cases import SynchronousTestCase

KEY = b"front-door-key"
LIMITS = BodyLimits(package=1000, bundle=2000, dispatch=300, endpoint=50, other=10)
DOOR = FrontDoor(KEY, LIMITS)


def error_of(body: bytes) -> dict:
    return orjson.loads(orjson.loads(body)["message"])


class KeyTests(SynchronousTestCase):
    """X-Api-Key is checked on every spelling of /plugin/**, and nowhere else."""

    def test_plugin_routes_need_the_key(self):
        """Without the right key, every /plugin target the daemon routes is the 401 envelope."""
        for target in (b"/plugin/t/management/list", b"/%70lugin/t/dispatch/tool/invoke", b"/plugin%2Ft/debugging/key",
                       b"/plugin%2ft/management/install/upload/package", b"/plugin", b"/plugin/"):
            for key in (None, b"", b"wrong", KEY + b"x", KEY[:-1]):
                self.assertIs(DOOR.admit(b"POST", target, key, 0), UNAUTHORIZED, (target, key))
            self.assertIsInstance(DOOR.admit(b"POST", target, KEY, 0), Admitted, target)
        self.assertEqual(UNAUTHORIZED.status, 401)
        self.assertEqual(error_of(UNAUTHORIZED.body)["error_type"], "PluginDaemonUnauthorizedError")

    def test_key_not_in_repr(self):
        """The server key never shows in the front door's repr (logs, tracebacks)."""
        self.assertNotIn("front-door-key", repr(DOOR))
        self.assertIn("BodyLimits", repr(DOOR))

    def test_other_routes_need_no_key(self):
        """/health/check, /e/ and unknown routes are admitted without a key."""
        for target in (b"/health/check", b"/e/hook/x", b"/nowhere", b"/"):
            self.assertIsInstance(DOOR.admit(b"GET", target, None, 0), Admitted, target)

    def test_admitted_target_is_canonical(self):
        """The admitted target is the canonical one, which the routers then see."""
        admitted = DOOR.admit(b"GET", b"/%70lugin%2Ft/management/list?page=1", KEY, None)
        self.assertEqual(admitted.target.segments, (b"plugin", b"t", b"management", b"list"))
        self.assertEqual(admitted.target.query, b"page=1")

    def test_unrouted_targets_refused_before_the_key(self):
        """A target the daemon does not route is its 404 (or a 400), with the key or without."""
        for key in (None, KEY):
            refused = DOOR.admit(b"GET", b"//plugin/t/management/list", key, None)
            self.assertEqual((refused.status, refused.body), (404, envelope.ROUTE_NOT_FOUND))
            refused = DOOR.admit(b"GET", b"/plugin/t/%zz", key, None)
            self.assertEqual(refused.status, 400)
            self.assertEqual(error_of(refused.body)["error_type"], "PluginDaemonBadRequestError")
            self.assertEqual(DOOR.admit(b"GET", b"*", key, None).status, 400)


class BodyBoundTests(SynchronousTestCase):
    """Each route's body bound, refused at the head when the declared length is over it."""

    def test_declared_length_over_bound(self):
        """A declared length over the route's bound is refused: 413 with a -400 envelope."""
        cases = [
            (b"POST", b"/plugin/t/dispatch/tool/invoke", 300),
            (b"POST", b"/plugin/t/management/install/identifiers", 10),
            (b"POST", b"/nowhere", 10),
            (b"POST", b"/e/hook/x", 50),
            (b"GET", b"/e/hook/x", 50),
            # an older Dify sends a JSON body on GET decode/from_identifier
            (b"GET", b"/plugin/t/management/decode/from_identifier", 10),
        ]
        for method, target, limit in cases:
            admitted = DOOR.admit(method, target, KEY, limit)
            self.assertEqual(admitted.body_limit, limit, target)
            refused = DOOR.admit(method, target, KEY, limit + 1)
            self.assertEqual(refused.status, 413, target)
            self.assertEqual(error_of(refused.body)["error_type"], "PluginDaemonBadRequestError")
            self.assertIs(admitted.oversize, refused)

    def test_uploads_answer_as_go(self):
        """An upload over its bound answers HTTP 200 with -400 "file size exceeds the maximum limit"."""
        for route, limit in ((b"package", 1000), (b"bundle", 2000)):
            target = b"/plugin/t/management/install/upload/" + route
            self.assertEqual(DOOR.admit(b"POST", target, KEY, limit).body_limit, limit)
            refused = DOOR.admit(b"POST", target, KEY, limit + 1)
            self.assertIs(refused, UPLOAD_TOO_LARGE)
            self.assertEqual(refused.status, 200)
            self.assertEqual(orjson.loads(refused.body)["code"], -400)
            self.assertEqual(error_of(refused.body)["message"], "file size exceeds the maximum limit")
            # another method on that path is no upload
            self.assertEqual(DOOR.admit(b"GET", target, KEY, 11).status, 413)

    def test_no_body_routes(self):
        """/health/check takes no body, whatever the method: one byte is 413."""
        for method, target in ((b"GET", b"/health/check"), (b"POST", b"/health/check"), (b"HEAD", b"/health/check")):
            admitted = DOOR.admit(method, target, KEY, 0)
            self.assertEqual(admitted.body_limit, 0, target)
            self.assertEqual(DOOR.admit(method, target, KEY, 1).status, 413, target)
            self.assertEqual(DOOR.admit(method, target, KEY, None).body_limit, 0, target)

    def test_paces(self):
        """Bodies under /plugin get the keyed pace; all others (/e/, /health/check, unknown) the public one."""
        for target in (b"/plugin/t/dispatch/tool/invoke", b"/plugin/t/management/install/upload/package",
                       b"/plugin/t/x"):
            self.assertIs(DOOR.admit(b"POST", target, KEY, 0).pace, KEYED_PACE, target)
        for target in (b"/e/hook/x", b"/health/check", b"/nowhere", b"/"):
            self.assertIs(DOOR.admit(b"POST", target, None, 0).pace, PUBLIC_PACE, target)
        self.assertEqual((KEYED_PACE.grace, KEYED_PACE.rate), (30.0, 16384))
        self.assertEqual((PUBLIC_PACE.grace, PUBLIC_PACE.rate), (10.0, 32768))

    def test_a_route_joins_with_one_line(self):
        """A new route with its own bound is one more line in the table, above the catch-alls."""
        routes = (Route((b"new-route",), 7, frozenset({b"POST"}), True),) + ROUTES
        door = FrontDoor(KEY, LIMITS, routes)
        self.assertEqual(door.admit(b"POST", b"/new-route", None, 7).body_limit, 7)
        self.assertEqual(door.admit(b"POST", b"/new-route", None, 8).status, 413)
        self.assertEqual(door.admit(b"POST", b"/new-route/x", None, 8).body_limit, 10)
        self.assertEqual(DOOR.admit(b"POST", b"/new-route", None, 8).body_limit, 10)

    def test_transaction_route_has_its_own_bound(self):
        """A serverless transaction body is bounded by ``BodyLimits.transaction``, without the key, and nothing else under that path is."""
        door = FrontDoor(KEY, attrs.evolve(LIMITS, transaction=20))
        admitted = door.admit(b"POST", b"/backwards-invocation/transaction", None, 20)
        self.assertEqual((admitted.body_limit, admitted.pace), (20, PUBLIC_PACE))
        self.assertEqual(door.admit(b"POST", b"/backwards-invocation/transaction", None, 21).status, 413)
        self.assertEqual(door.admit(b"POST", b"/backwards-invocation/transaction/x", None, 11).status, 413)
        self.assertEqual(DOOR.admit(b"POST", b"/backwards-invocation/transaction", None, 0).body_limit, 6 * 1024 * 1024)

    def test_route_lines(self):
        """A line covers its segments (ANY for one segment), its methods, and exactly them when exact."""
        route = Route((b"a", ANY, b"c"), 1, frozenset({b"PUT"}))
        self.assertTrue(route.covers(b"PUT", (b"a", b"b", b"c")))
        self.assertTrue(route.covers(b"PUT", (b"a", b"z", b"c", b"d")))
        self.assertFalse(route.covers(b"POST", (b"a", b"b", b"c")))
        self.assertFalse(route.covers(b"PUT", (b"a", b"b")))
        self.assertFalse(route.covers(b"PUT", (b"x", b"b", b"c")))
        exact = Route((b"a",), 1, exact=True)
        self.assertTrue(exact.covers(b"GET", (b"a",)))
        self.assertFalse(exact.covers(b"GET", (b"a", b"")))

    def test_endpoint_read_limit(self):
        """ENDPOINT_READ_LIMIT bounds /e/ bodies (16 MiB by default); over it is 413, not a silent cut."""
        self.assertEqual(BodyLimits().endpoint, 16 * 1024 * 1024)
        self.assertEqual(BodyLimits.for_packages(1, 1, endpoint=99).endpoint, 99)
        self.assertEqual(DOOR.admit(b"POST", b"/e/hook/x", None, 51).status, 413)

    def test_chunked_bodies_admitted(self):
        """A body of unannounced length is admitted, to be counted as it arrives."""
        self.assertEqual(DOOR.admit(b"POST", b"/plugin/t/dispatch/tool/invoke", KEY, None).body_limit, 300)

    def test_limits_for_packages(self):
        """Upload bounds are the package sizes plus the multipart overhead; the others stay."""
        limits = BodyLimits.for_packages(5, 7)
        self.assertEqual((limits.package, limits.bundle), (5 + MULTIPART_OVERHEAD, 7 + MULTIPART_OVERHEAD))
        self.assertEqual(limits.dispatch, BodyLimits().dispatch)


class RefusalResponseTests(SynchronousTestCase):
    """The bytes of a refusal, written by both HTTP stacks."""

    def test_bytes(self):
        """Status line, Connection: close, Server, Date, type, length and body."""
        raw = refusal_response(b"HTTP/1.1", UNAUTHORIZED, b"DATE")
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 401 Unauthorized")
        self.assertEqual(lines[1], b"Connection: close")
        self.assertTrue(lines[2].startswith(b"Server: TwistedWeb/"))
        self.assertEqual(lines[3:], [b"Date: DATE", b"Content-Type: application/json; charset=utf-8",
                                     b"Content-Length: %d" % len(UNAUTHORIZED.body)])
        self.assertEqual(body, UNAUTHORIZED.body)

    def test_versions_and_reasons(self):
        """HTTP/1.0 is answered in kind, anything else as HTTP/1.1; 431 has its RFC 6585 phrase."""
        self.assertTrue(refusal_response(b"HTTP/1.0", URI_TOO_LONG, b"d").startswith(b"HTTP/1.0 414 "))
        self.assertTrue(refusal_response(b"HTTP/9", HEAD_TIMED_OUT, b"d").startswith(b"HTTP/1.1 408 "))
        self.assertTrue(refusal_response(b"HTTP/1.1", HEADERS_TOO_LARGE, b"d").startswith(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertTrue(refusal_response(b"HTTP/1.1", Refused(499, b"x", b"", "r"), b"d").startswith(
            b"HTTP/1.1 499 Unknown Status\r\n"))
