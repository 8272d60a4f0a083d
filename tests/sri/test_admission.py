"""
The connector's front door, alone and on its HTTP channel: the key checked
in constant time before anything else (odd spellings of paths included),
routes and methods, and body bounds decided before the body is read.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from difydaemon.api.admission import MULTIPART_OVERHEAD, Admitted, Refused
from difydaemon.sri.admission import SMALL_BODY_LIMIT, ConnectorFrontDoor
from difydaemon.sri.tap import ConnectorSite
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.test_web_channel import Recorder

KEY = b"sri-test-key"
PACKAGE_LIMIT = 1000
DOOR = ConnectorFrontDoor(KEY, PACKAGE_LIMIT)


class FrontDoorTests(SynchronousTestCase):
    def test_key_required_everywhere(self):
        """Without the exact key every target is refused 401, routes or not, whatever its spelling."""
        for key in (None, b"", b"sri-test-ke", b"sri-test-key ", b"Bearer sri-test-key", KEY.upper()):
            for method, target in (
                (b"POST", b"/ping"),
                (b"GET", b"/v1/runner/instances?filename=x"),
                (b"POST", b"/v1/launch"),
                (b"DELETE", b"/v1/runner/instances?filename=x"),
                (b"GET", b"//ping"),
                (b"GET", b"/%70ing"),
                (b"GET", b"/v1%2Flaunch"),
                (b"GET", b"/../ping"),
                (b"GET", b"/nothing"),
                (b"GET", b"*"),
            ):
                verdict = DOOR.admit(method, target, key, None)
                self.assertEqual((type(verdict), verdict.status), (Refused, 401), (key, target))

    def test_routes_admitted(self):
        """With the key the three routes are admitted, encoded spellings read canonically."""
        for method, target in (
            (b"POST", b"/ping"),
            (b"GET", b"/ping"),
            (b"GET", b"/v1/runner/instances?filename=a"),
            (b"DELETE", b"/v1/runner/instances?filename=a"),
            (b"POST", b"/v1/launch"),
            (b"POST", b"/v1%2flaunch"),
        ):
            self.assertIsInstance(DOOR.admit(method, target, KEY, None), Admitted, target)

    def test_unknown_and_odd_paths(self):
        """Unknown paths answer 404, empty or dot segments 404, malformed escapes 400."""
        for target, status in ((b"/v1/launch/x", 404), (b"//ping", 404), (b"/./ping", 404), (b"/pi%zzng", 400)):
            verdict = DOOR.admit(b"GET", target, KEY, None)
            self.assertEqual((type(verdict), verdict.status), (Refused, status), target)

    def test_method_not_allowed(self):
        """A route asked with a method it does not take answers 405."""
        for method, target in ((b"GET", b"/v1/launch"), (b"PUT", b"/ping"), (b"POST", b"/v1/runner/instances")):
            self.assertEqual(DOOR.admit(method, target, KEY, None).status, 405)

    def test_body_bounds(self):
        """A launch may carry the package bound plus multipart framing; other routes a small body."""
        launch = PACKAGE_LIMIT + MULTIPART_OVERHEAD
        self.assertEqual(DOOR.admit(b"POST", b"/v1/launch", KEY, None).body_limit, launch)
        self.assertIsInstance(DOOR.admit(b"POST", b"/v1/launch", KEY, launch), Admitted)
        self.assertEqual(DOOR.admit(b"POST", b"/v1/launch", KEY, launch + 1).status, 413)
        self.assertEqual(DOOR.admit(b"POST", b"/ping", KEY, SMALL_BODY_LIMIT + 1).status, 413)

    def test_refusal_body_is_json_error(self):
        """A refusal's body carries an ``error`` the daemon reports."""
        verdict = DOOR.admit(b"GET", b"/ping", None, None)
        self.assertEqual(json.loads(verdict.body)["error"], "unauthorized")


class ChannelTests(SynchronousTestCase):
    """The connector's site: the daemon's hardened channel, checking ``Authorization``."""

    def setUp(self):
        super().setUp()
        self.resource = Recorder()
        site = ConnectorSite(self.resource, reactor=MemoryReactorClock(), front_door=DOOR)
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_wrong_key_refused_before_body(self):
        """A launch with a wrong key is answered 401 and closed at its head; its body is never read."""
        self.protocol.dataReceived(
            b"POST /v1/launch HTTP/1.1\r\nAuthorization: nope\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertTrue(self.transport.disconnecting)
        self.protocol.dataReceived(b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(self.resource.seen, [])

    def test_x_api_key_is_not_the_key(self):
        """The daemon's X-Api-Key header does not stand in for Authorization."""
        self.protocol.dataReceived(b"POST /ping HTTP/1.1\r\nX-Api-Key: sri-test-key\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "))

    def test_right_key_served(self):
        """The raw key in Authorization (no Bearer) reaches the resource."""
        self.protocol.dataReceived(b"POST /ping HTTP/1.1\r\nAuthorization: sri-test-key\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.resource.seen, [(b"POST", [b"ping"], b"")])

    def test_chunked_launch_over_bound(self):
        """A chunked launch body is counted as it arrives and refused 413 once over the bound."""
        self.protocol.dataReceived(
            b"POST /v1/launch HTTP/1.1\r\nAuthorization: sri-test-key\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * 4096
        for _ in range((PACKAGE_LIMIT + MULTIPART_OVERHEAD) // len(piece) + 2):
            if self.transport.disconnecting:
                break
            self.protocol.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertIn(b" 413 ", self.transport.value().split(b"\r\n")[0])
        self.assertEqual(self.resource.seen, [])
