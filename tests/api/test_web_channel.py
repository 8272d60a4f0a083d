"""
twisted.web's channel behind the front door: refusals at the head with the
body unread, routing on the canonical target, body bounds as bytes arrive,
the head's size bounds and its deadline.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from difydaemon.api.admission import (
    BAD_REQUEST,
    HEAD_TIMEOUT,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    BodyLimits,
    FrontDoor,
    Refused,
)
from difydaemon.api.pace import KEYED_PACE, PUBLIC_PACE
from difydaemon.api.site import DaemonSite
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.smuggling import shapes

KEY = b"web-channel-key"
LIMITS = BodyLimits(package=100, bundle=100, dispatch=100, endpoint=8, other=20)


class Recorder(Resource):
    """A leaf that records what each request it serves looked like, and answers "ok"."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def render(self, request):
        self.seen.append((request.method, request.prepath + request.postpath, request.content.read()))
        return b"ok"


class Client:
    """One connection to a DaemonSite (twisted.web only) over a StringTransport."""

    def __init__(self, limits: BodyLimits = LIMITS, timeout=None, before_body=None) -> None:
        self.clock = MemoryReactorClock()
        self.resource = Recorder()
        self.site = DaemonSite(self.resource, reactor=self.clock, front_door=FrontDoor(KEY, limits),
                               before_body=before_body)
        if timeout is not None:
            self.site.timeOut = timeout
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def request(method: bytes = b"POST", target: bytes = b"/plugin/t/management/install/identifiers", body: bytes = b"{}",
            key: bytes | None = KEY, extra: bytes = b"") -> bytes:
    """The bytes of one request framed by its Content-Length."""
    head = method + b" " + target + b" HTTP/1.1\r\nHost: daemon\r\n"
    if key is not None:
        head += b"X-Api-Key: " + key + b"\r\n"
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(target: bytes, body: bytes, key: bytes | None = KEY, piece: int = 4) -> tuple[bytes, bytes]:
    """(head, chunked body) of one request."""
    head = b"POST " + target + b" HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
    if key is not None:
        head += b"X-Api-Key: " + key + b"\r\n"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece]) for i in range(0, len(body), piece))
    return head + b"\r\n", chunks + b"0\r\n\r\n"


class KeyAtHeadTests(SynchronousTestCase):
    """A missing or wrong key is answered as soon as the head is read, and the body is never read."""

    def test_refused_before_the_body(self):
        """The 401 envelope comes with the head alone; the connection closes and later bytes go nowhere."""
        for key in (None, b"wrong"):
            client = Client()
            data = request(key=key, body=b"x" * 10)
            head = data[:data.index(b"\r\n\r\n") + 4]
            raw = client.send(head)
            self.assertTrue(raw.startswith(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n"), raw)
            self.assertIn(b'"error_type\\":\\"PluginDaemonUnauthorizedError', raw)
            self.assertTrue(client.closed)
            client.send(b"x" * 10 + request())
            self.assertEqual(client.transport.value(), raw)
            self.assertEqual(client.resource.seen, [])
            # not even a file to hold the body was made
            self.assertIsNone(client.protocol.requests[0].content)

    def test_no_100_continue_for_a_refused_request(self):
        """A client waiting for 100 Continue gets the 401 instead, and sends no body."""
        client = Client()
        raw = client.send(request(key=b"wrong", body=b"", extra=b"Expect: 100-continue\r\n"))
        self.assertNotIn(b"100 Continue", raw)
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "))

    def test_refusal_cut_anywhere(self):
        """The same refusal, whatever the cuts in the head and body."""
        data = request(key=b"wrong", body=b"0123456789")
        whole = Client()
        expected = whole.send(data)
        for offset in range(1, len(data)):
            client = Client()
            client.send(data[:offset])
            self.assertEqual(client.send(data[offset:]), expected, offset)
            self.assertEqual(client.resource.seen, [])

    def test_refused_client_that_does_not_read_is_aborted(self):
        """A refused client that never lets the connection close is aborted after abortTimeout."""
        client = Client()
        client.send(request(key=None))
        self.assertFalse(client.transport.disconnected)
        client.clock.advance(client.protocol.abortTimeout)
        self.assertTrue(client.transport.disconnected)
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(client.clock.getDelayedCalls(), [])


class CanonicalRoutingTests(SynchronousTestCase):
    """The router sees the canonical target the key check saw."""

    def test_normalised_spellings_need_the_key_and_route_alike(self):
        """%70lugin and plugin%2F<t> are /plugin/<t>: refused without the key, routed as the plain path with it."""
        for target in (b"/%70lugin/t/management/list", b"/plugin%2Ft/management/list", b"/plugin%2ft/management/list",
                       b"/plugin/t/manage%6dent/list"):
            refused = Client()
            self.assertTrue(refused.send(request(b"GET", target, b"", key=None)).startswith(b"HTTP/1.1 401 "))
            served = Client()
            self.assertTrue(served.send(request(b"GET", target, b"")).endswith(b"ok"), target)
            self.assertEqual(served.resource.seen, [(b"GET", [b"plugin", b"t", b"management", b"list"], b"")])

    def test_refused_spellings(self):
        """//, ./ and ../ spellings are the daemon's 404 with or without the key; bad escapes are 400."""
        for target, status in ((b"//plugin/t/management/list", b"404"), (b"/plugin/./t/management/list", b"404"),
                               (b"/x/../plugin/t/management/list", b"404"), (b"/plugin/t/%2e%2e/list", b"404"),
                               (b"/plugin/t/ma%zznagement/list", b"400")):
            for key in (None, KEY):
                client = Client()
                raw = client.send(request(b"GET", target, b"", key=key))
                self.assertTrue(raw.startswith(b"HTTP/1.1 " + status), (target, key, raw))
                self.assertTrue(client.closed)
                self.assertEqual(client.resource.seen, [])

    def test_decoded_once(self):
        """%252F reaches the router as the bytes %2F, not as a slash."""
        client = Client()
        client.send(request(b"GET", b"/plugin/t/a%252Fb", b""))
        self.assertEqual(client.resource.seen, [(b"GET", [b"plugin", b"t", b"a%2Fb"], b"")])

    def test_endpoint_tail_kept(self):
        """The /e/ tail reaches the router decoded once and uncleaned."""
        client = Client()
        client.send(request(b"GET", b"/e/hook/a//b/../%2e%0A", b"", key=None))
        self.assertEqual(client.resource.seen, [(b"GET", [b"e", b"hook", b"a", b"", b"b", b"..", b".\n"], b"")])


class BodyBoundTests(SynchronousTestCase):
    """Bodies are bounded by their route, declared or counted as they arrive."""

    def test_declared_length_over_bound(self):
        """A Content-Length over the route's bound is refused at the head, before any body byte."""
        client = Client()
        data = request(body=b"x" * 21)
        raw = client.send(data[:data.index(b"\r\n\r\n") + 4])
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\nConnection: close\r\n"), raw)
        self.assertTrue(client.closed)
        self.assertEqual(client.resource.seen, [])

    def test_upload_over_bound_answers_as_go(self):
        """An upload over its bound is HTTP 200 with -400 "file size exceeds the maximum limit"."""
        client = Client()
        raw = client.send(request(target=b"/plugin/t/management/install/upload/package", body=b"x" * 101))
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"), raw)
        self.assertIn(b"file size exceeds the maximum limit", raw)
        self.assertEqual(client.resource.seen, [])

    def test_chunked_body_counted_as_it_arrives(self):
        """A chunked body is refused as soon as it goes over, and what follows is not read."""
        head, body = chunked(b"/plugin/t/management/install/identifiers", b"y" * 40)
        client = Client()
        client.send(head)
        for offset in range(len(body)):
            client.send(body[offset:offset + 1])
            if client.closed:
                break
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertLess(offset, len(body) - 1)
        self.assertLessEqual(client.protocol.requests[0].content.tell(), 20)
        self.assertEqual(client.resource.seen, [])

    def test_chunked_body_within_bound(self):
        """A chunked body within the bound reaches the resource whole."""
        head, body = chunked(b"/plugin/t/management/install/identifiers", b"y" * 20)
        client = Client()
        self.assertTrue(client.send(head + body).endswith(b"\r\n\r\nok"))
        self.assertEqual(client.resource.seen[0][2], b"y" * 20)

    def test_endpoint_body_bounded(self):
        """/e/ refuses a body over ENDPOINT_READ_LIMIT, declared or chunked, and serves one within it."""
        client = Client()
        raw = client.send(request(target=b"/e/hook/x", body=b"0123456789abc", key=None))
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertTrue(client.closed)
        client = Client()
        head, body = chunked(b"/e/hook/y", b"ABCDEFGHIJ", key=None, piece=3)
        raw = client.send(head + body)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertEqual(client.resource.seen, [])
        client = Client()
        client.send(request(target=b"/e/hook/x", body=b"01234567", key=None))
        self.assertEqual(client.resource.seen, [(b"POST", [b"e", b"hook", b"x"], b"01234567")])

    def test_no_body_routes(self):
        """/health/check takes no body: one declared or chunked is refused with 413, unread."""
        for method, target in ((b"GET", b"/health/check"), (b"POST", b"/health/check")):
            client = Client()
            data = request(method, target, b"x")
            raw = client.send(data[:-1])
            self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), (target, raw))
            self.assertTrue(client.closed)
            head, body = chunked(target, b"x")
            client = Client()
            raw = client.send(head.replace(b"POST", method) + body)
            self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), (target, raw))
            self.assertEqual(client.resource.seen, [])
        # without a body they are served, chunked and empty too
        client = Client()
        head, body = chunked(b"/health/check", b"")
        client.send(request(b"GET", b"/health/check", b"") + head.replace(b"POST", b"GET") + body)
        self.assertEqual(len(client.resource.seen), 2)


class HeadBoundTests(SynchronousTestCase):
    """Over-long request lines answer 414, over-large heads 431, then the connection closes."""

    def test_request_line_too_long(self):
        """A request line over the bound is 414, whole or still arriving."""
        target = b"/e/" + b"a" * MAX_REQUEST_LINE
        for data in (b"GET " + target + b" HTTP/1.1\r\n\r\n", b"GET " + target):
            client = Client()
            raw = client.send(data)
            self.assertTrue(raw.startswith(b"HTTP/1.1 414 Request-URI Too Long\r\nConnection: close\r\n"), data[-20:])
            self.assertIn(b"request line too long", raw)
            self.assertTrue(client.closed)
        client = Client()
        at_bound = b"GET /e/" + b"a" * (MAX_REQUEST_LINE - len(b"GET /e/ HTTP/1.1")) + b" HTTP/1.1\r\n\r\n"
        self.assertTrue(client.send(at_bound).endswith(b"ok"))

    def test_head_too_large(self):
        """A head over MAX_HEAD_SIZE is 431, whole, still arriving, or in one long line."""
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        start = b"GET /health HTTP/1.1\r\n"
        many = start + line * (MAX_HEAD_SIZE // len(line) + 1)
        for data in (many + b"\r\n", many, start + b"X-Long: " + b"b" * MAX_HEAD_SIZE):
            client = Client()
            raw = client.send(data)
            self.assertTrue(raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"),
                            (len(data), raw[:100]))
            self.assertTrue(client.closed)
            self.assertEqual(client.resource.seen, [])

    def test_head_at_bound_served(self):
        """A head of exactly MAX_HEAD_SIZE bytes (line ends included) is served."""
        start = b"GET /health HTTP/1.1\r\n"
        filler = b"X-Filler: "
        head = start + filler + b"a" * (MAX_HEAD_SIZE - len(start) - len(filler) - 2) + b"\r\n"
        self.assertEqual(len(head), MAX_HEAD_SIZE)
        client = Client()
        self.assertTrue(client.send(head + b"\r\n").endswith(b"ok"))
        client = Client()
        self.assertTrue(client.send(head[:-1] + b"a\r\n\r\n").startswith(b"HTTP/1.1 431 "))

    def test_too_many_headers(self):
        """More than MAX_HEADERS header lines is 431."""
        client = Client()
        raw = client.send(b"GET /health HTTP/1.1\r\n" + b"A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 431 "))
        client = Client()
        self.assertTrue(client.send(b"GET /health HTTP/1.1\r\n" + b"A: b\r\n" * MAX_HEADERS + b"\r\n").endswith(b"ok"))


class HeadDeadlineTests(SynchronousTestCase):
    """A head must be whole within HEAD_TIMEOUT of its first byte; trickled bytes do not extend it."""

    def test_trickled_head_times_out(self):
        """A byte every second keeps nothing open: at HEAD_TIMEOUT the answer is 408 and the connection closes."""
        client = Client(timeout=60)
        data = request(b"GET", b"/health/check", b"")
        for offset in range(int(HEAD_TIMEOUT) - 1):
            client.send(data[offset:offset + 1])
            client.clock.advance(1)
        self.assertFalse(client.closed)
        client.clock.advance(1)
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 408 Request Time-out\r\nConnection: close\r\n"), raw)
        self.assertTrue(client.closed)
        client.clock.advance(client.protocol.abortTimeout)
        self.assertTrue(client.transport.disconnected)

    def test_deadline_per_request(self):
        """Each request of a connection has its own deadline, from its own first byte; none is left after it."""
        client = Client(timeout=60)
        for _ in range(3):
            data = request(b"GET", b"/health/check", b"")
            client.send(data[:5])
            client.clock.advance(HEAD_TIMEOUT - 1)
            client.send(data[5:])
            self.assertFalse(client.closed)
        self.assertEqual(len(client.resource.seen), 3)
        # only the idle timer is left
        self.assertEqual(len(client.clock.getDelayedCalls()), 1)

    def test_slow_body_is_not_a_slow_head(self):
        """Once the head is whole its deadline is gone: a body may take longer, within its own pace."""
        client = Client(timeout=60)
        data = request(body=b"z" * 20)
        body_start = data.index(b"\r\n\r\n") + 4
        client.send(data[:body_start])
        for offset in range(body_start, len(data)):
            client.clock.advance(1)
            client.send(data[offset:offset + 1])
        self.assertFalse(client.closed)
        self.assertEqual(client.resource.seen[0][2], b"z" * 20)

    def test_idle_timer_not_reset_by_head_bytes(self):
        """With an idle timeout shorter than the head deadline, trickled head bytes do not keep the connection."""
        client = Client(timeout=3)
        for offset in range(5):
            client.send(b"GET /health/check HTTP/1.1\r\n"[offset:offset + 1])
            client.clock.advance(1)
        self.assertTrue(client.closed)


class SmugglingTests(SynchronousTestCase):
    """A head two readers could frame differently is 400 and the connection closes; nothing is served."""

    def test_shapes(self):
        """Bare LF, folded lines, two lengths, a length with a coding, bad chunk sizes: each 400, whole or cut."""
        for name, data in shapes(b"/plugin/t/management/install/identifiers", KEY).items():
            for offset in range(1, len(data) + 1):
                client = Client()
                client.send(data[:offset])
                raw = client.send(data[offset:]) if offset < len(data) else client.transport.value()
                self.assertTrue(raw.startswith(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"),
                                (name, offset, raw))
                self.assertTrue(raw.endswith(BAD_REQUEST.body), (name, offset))
                self.assertEqual(raw.count(b"HTTP/1.1"), 1, (name, offset))
                self.assertTrue(client.closed, (name, offset))
                self.assertEqual(client.resource.seen, [], (name, offset))

    def test_bare_lf_head_answered_at_once(self):
        """A head of bare LFs is refused as it arrives, not at its deadline."""
        client = Client()
        raw = client.send(b"GET /health/check HTTP/1.1\nHost: d\n\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), raw)
        self.assertEqual(client.clock.seconds(), 0)

    def test_crlf_bodies_may_hold_lf(self):
        """A body with bare LFs, pipelined behind a request, is no head: both requests are served."""
        data = request(body=b'{"a":\n1}') + request(body=b'{\n}')
        client = Client()
        client.send(data)
        self.assertEqual([seen[2] for seen in client.resource.seen], [b'{"a":\n1}', b"{\n}"])


class BodyPaceTests(SynchronousTestCase):
    """A body must keep up with its route's pace: a grace period, then a minimum average rate."""

    def trickle(self, client: Client, data: bytes, every: float) -> int:
        """Send the head, then the body a byte every ``every`` seconds; the bytes sent before the close."""
        body_start = data.index(b"\r\n\r\n") + 4
        client.send(data[:body_start])
        for offset in range(body_start, len(data)):
            client.clock.advance(every)
            if client.closed:
                return offset - body_start
            client.send(data[offset:offset + 1])
        return len(data) - body_start

    def test_keyed_body_trickled(self):
        """A /plugin body a byte every 2 s is 408 once the keyed grace is over, and the connection closes."""
        client = Client(limits=BodyLimits(), timeout=600)
        sent = self.trickle(client, request(body=b"z" * 1000), 2.0)
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 408 Request Time-out\r\nConnection: close\r\n"), raw)
        self.assertIn(b"request body not received in time", raw)
        self.assertEqual(sent, int(KEYED_PACE.grace / 2))
        self.assertEqual(client.resource.seen, [])
        client.clock.advance(client.protocol.abortTimeout)
        self.assertTrue(client.transport.disconnected)

    def test_public_bodies_get_less_grace(self):
        """An /e/ or unknown-route body trickled is 408 after the public grace, chunked or not."""
        for data in (request(target=b"/e/hook/x", body=b"z" * 100, key=None),
                     b"".join(chunked(b"/nowhere", b"z" * 100, key=None, piece=1))):
            client = Client(limits=BodyLimits(), timeout=600)
            sent = self.trickle(client, data, 1.0)
            self.assertTrue(client.transport.value().startswith(b"HTTP/1.1 408 "))
            self.assertEqual(sent, int(PUBLIC_PACE.grace))

    def test_body_at_pace_served(self):
        """A body that keeps the pace is served, however long it takes, and leaves no pace call behind."""
        client = Client(limits=BodyLimits(), timeout=600)
        body = b"z" * (KEYED_PACE.rate * 60)
        data = request(body=body)
        body_start = data.index(b"\r\n\r\n") + 4
        client.send(data[:body_start])
        step = int(KEYED_PACE.rate)
        for offset in range(body_start, len(data), step):
            client.clock.advance(1)
            client.send(data[offset:offset + step])
        self.assertEqual(client.resource.seen[0][2], body)
        self.assertFalse(client.closed)
        # only the idle timer is left
        self.assertEqual(len(client.clock.getDelayedCalls()), 1)


class Decisions:
    """A before_body check whose answers the test gives, one Deferred per request asked about."""

    def __init__(self) -> None:
        self.asked = []

    def __call__(self, admitted):
        if admitted.target.segments[0] != b"e":
            return None
        d = Deferred()
        self.asked.append((admitted.target.segments[1], d))
        return d


class BeforeBodyTests(SynchronousTestCase):
    """A before_body check is made once the head is in, and the body waits unread for its answer."""

    def test_refused_before_the_body(self):
        """While the check runs, reading stops and nothing of the body is read; a refusal answers and closes."""
        decisions = Decisions()
        client = Client(before_body=decisions)
        data = request(target=b"/e/nohook/x", body=b"01234567", key=None)
        body_start = data.index(b"\r\n\r\n") + 4
        self.assertEqual(client.send(data[:body_start + 3]), b"")
        self.assertEqual([hook for hook, _ in decisions.asked], [b"nohook"])
        self.assertEqual(client.transport.producerState, "paused")
        self.assertIsNone(client.protocol.requests[0].content)
        decisions.asked[0][1].callback(Refused(404, b"application/json", b"{}", "unknown hook id"))
        raw = client.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n"), raw)
        self.assertTrue(client.closed)
        client.send(data[body_start + 3:])
        self.assertEqual(client.resource.seen, [])

    def test_admitted_body_then_read(self):
        """Once the check passes, reading resumes and the body, held bytes first, reaches the resource whole."""
        decisions = Decisions()
        client = Client(before_body=decisions)
        data = request(target=b"/e/hook/x", body=b"01234567", key=None, extra=b"Expect: 100-continue\r\n")
        body_start = data.index(b"\r\n\r\n") + 4
        client.send(data[:body_start + 3])
        # no 100 Continue before the check
        self.assertEqual(client.transport.value(), b"")
        decisions.asked[0][1].callback(None)
        self.assertEqual(client.transport.producerState, "producing")
        self.assertIn(b"100 Continue", client.transport.value())
        client.send(data[body_start + 3:])
        self.assertEqual(client.resource.seen, [(b"POST", [b"e", b"hook", b"x"], b"01234567")])

    def test_answer_in_the_same_turn(self):
        """A check answered at once (an in-memory lookup) lets the body through untouched, cut anywhere."""
        data = request(target=b"/e/hook/x", body=b"01234567", key=None, extra=b"Expect: 100-continue\r\n")
        for offset in range(1, len(data)):
            client = Client(before_body=lambda admitted: succeed(None))
            client.send(data[:offset])
            raw = client.send(data[offset:])
            self.assertEqual(client.resource.seen, [(b"POST", [b"e", b"hook", b"x"], b"01234567")], offset)
            self.assertEqual(raw.count(b"100 Continue"), 1, offset)

    def test_not_asked_without_a_body(self):
        """A request without a body is not held: the resource makes its checks itself."""
        decisions = Decisions()
        client = Client(before_body=decisions)
        client.send(request(b"GET", b"/e/hook/x", b"", key=None))
        self.assertEqual(decisions.asked, [])
        self.assertEqual(len(client.resource.seen), 1)

    def test_held_bytes_bounded(self):
        """Bytes arriving while the check runs are bounded by the route's body limit: over it is 413."""
        decisions = Decisions()
        client = Client(before_body=decisions)
        head, body = chunked(b"/e/hook/x", b"z" * 40, key=None)
        raw = client.send(head + body)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        decisions.asked[0][1].callback(None)
        self.assertEqual(client.resource.seen, [])

    def test_check_failing_lets_the_resource_answer(self):
        """A check that fails (the database gone) is logged, and the request goes on to the resource."""
        client = Client(before_body=lambda admitted: fail(RuntimeError("database gone")))
        client.send(request(target=b"/e/hook/x", body=b"0123", key=None))
        self.assertEqual(client.resource.seen, [(b"POST", [b"e", b"hook", b"x"], b"0123")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_gone_while_checking(self):
        """The client leaving while the check runs: its answer changes nothing and writes nothing."""
        decisions = Decisions()
        client = Client(before_body=decisions)
        client.send(request(target=b"/e/hook/x", body=b"0123", key=None)[:-2])
        client.protocol.connectionLost(Failure(ConnectionDone()))
        decisions.asked[0][1].callback(Refused(404, b"application/json", b"{}", "unknown hook id"))
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual(client.resource.seen, [])
