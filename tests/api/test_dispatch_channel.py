"""
The lean dispatch channel: its pure framing, the bytes it writes (compared
with what twisted.web writes for the same requests), keep-alive and
pipelining, the hand-over of other connections to twisted.web, clients that
go away, and the bounds on what it buffers.
"""

from __future__ import annotations

import os
import re

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from difydaemon import tap
from difydaemon.api import envelope, sse
from difydaemon.api.admission import BAD_REQUEST, HEAD_TIMEOUT, MAX_REQUEST_LINE, BodyLimits, FrontDoor
from difydaemon.api.dispatch_channel import (
    EAGER_READ_SIZE,
    FOREIGN,
    MAX_BODY_SIZE,
    MAX_HEAD_SIZE,
    DispatchChannel,
    DispatchGate,
    Incomplete,
    parse_head,
    split_request,
)
from difydaemon.api.pace import KEYED_PACE, PUBLIC_PACE
from difydaemon.api.root import RequestCounter
from difydaemon.api.site import DaemonSite
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.smuggling import shapes
from tests.api.test_dispatch import KEY, TENANT, TEXT_HI, TEXT_HO, TOOL_DATA, DispatchHarness
from tests.test_tap import environment

PATH = f"/plugin/{TENANT}/dispatch/tool/invoke"
BODY = orjson.dumps({"user_id": "u", "data": TOOL_DATA})
ITEMS = sse.success_item(orjson.dumps(TEXT_HI)) + sse.success_item(orjson.dumps(TEXT_HO))


def post(path: str = PATH, body: bytes = BODY, *, extra: bytes = b"", version: bytes = b"HTTP/1.1",
         key: bytes = KEY.encode()) -> bytes:
    """The bytes of one dispatch POST as Dify's client sends it."""
    return (
        b"POST " + path.encode() + b" " + version + b"\r\nHost: daemon.test\r\nAccept-Encoding: gzip\r\n"
        b"X-Api-Key: " + key + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def without_date(raw: bytes) -> bytes:
    """Response bytes with every Date header's value blanked (twisted.web reads the wall clock)."""
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", raw)


class Connection:
    """
    One client connection to the daemon's site over a StringTransport, the
    dispatch path over fakes with a FakeRuntime that answers every tool
    call with two chunks and end (one reactor turn later).

    :param lean: serve through the dispatch channel (as tap.py wires it),
        or through twisted.web only.
    :param root: the site's resource for what twisted.web serves (the
        harness's root by default).
    """

    def __init__(self, test, lean: bool = True, script: bool = True, timeout=None, root=None,
                 limits: BodyLimits | None = None, tracing=None, **harness_options) -> None:
        self.daemon = DispatchHarness(test, tracing=tracing, **harness_options)
        if script:
            self.daemon.runtime.script(None, [("stream", TEXT_HI), ("stream", TEXT_HO), ("end", {})])
        self.counter = self.daemon.root._counter
        gate = DispatchGate(self.counter, self.daemon.dispatch, tracing=tracing) if lean else None
        self.site = DaemonSite(root or self.daemon.root, reactor=self.daemon.clock, gate=gate,
                               front_door=FrontDoor(KEY.encode(), limits or BodyLimits()), tracing=tracing)
        if timeout is not None:
            self.site.timeOut = timeout
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    @property
    def clock(self):
        return self.daemon.clock

    @property
    def handed_over(self) -> bool:
        """Whether twisted.web serves this connection now."""
        return getattr(self.protocol, "_inner", None) is not None

    def send(self, data: bytes) -> bytes:
        """Send bytes, let the fake plugin answer; everything written so far."""
        self.protocol.dataReceived(data)
        self.clock.advance(0)
        self.clock.advance(0)
        return self.transport.value()

    def disconnect(self) -> None:
        """The client closes the connection."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


def exchange(test, data: bytes, lean: bool, **options) -> tuple[bytes, bool]:
    """(response bytes without dates, whether the server closed) for ``data`` sent at once."""
    connection = Connection(test, lean=lean, **options)
    return without_date(connection.send(data)), connection.transport.disconnecting


def assert_every_cut(test, data: bytes, expected: tuple[bytes, bool], **options) -> None:
    """``data`` cut in two at every offset gets ``expected`` (as :func:`exchange` gives it)."""
    for offset in range(1, len(data)):
        connection = Connection(test, **options)
        connection.send(data[:offset])
        raw = connection.send(data[offset:])
        test.assertEqual((without_date(raw), connection.transport.disconnecting), expected, offset)


# -- framing ---------------------------------------------------------------------------


class ParseHeadTests(SynchronousTestCase):
    """parse_head reads the heads it can frame, tells dispatch calls apart, and refuses the rest."""

    def head(self, data: bytes) -> bytes:
        return data[: data.index(b"\r\n\r\n")]

    def test_dispatch_head(self):
        """A dispatch POST gives the tenant-first postpath, lower-cased headers and the body length."""
        head = parse_head(self.head(post()))
        self.assertEqual(head.version, b"HTTP/1.1")
        self.assertTrue(head.dispatch)
        self.assertEqual(head.postpath, [TENANT.encode(), b"dispatch", b"tool", b"invoke"])
        self.assertEqual(head.headers[b"x-plugin-id"], [b"acme/echo"])
        self.assertEqual(head.headers[b"x-api-key"], [KEY.encode()])
        self.assertEqual(head.content_length, len(BODY))
        self.assertTrue(head.persistent)

    def test_percent_decoding_and_query(self):
        """The route is read on the canonical target: the path decoded once, then split, the query dropped."""
        head = parse_head(b"POST /%70lugin/t/dispatch/tool/invoke?x=1 HTTP/1.1\r\nA: b")
        self.assertEqual(head.postpath, [b"t", b"dispatch", b"tool", b"invoke"])
        self.assertEqual(head.target.query, b"x=1")
        # an encoded slash is a slash, as in gin: this is tenant "plugin"'s dispatch route
        head = parse_head(b"POST /plugin%2Ft/dispatch/tool/invoke HTTP/1.1")
        self.assertEqual(head.postpath, [b"t", b"dispatch", b"tool", b"invoke"])
        # so a tenant cannot hold one; and what decoding gives is not decoded again
        self.assertFalse(parse_head(b"POST /plugin/t%2F1/dispatch/tool/invoke HTTP/1.1").dispatch)
        self.assertEqual(parse_head(b"POST /plugin/t%252F1/dispatch/x HTTP/1.1").postpath, [b"t%2F1", b"dispatch", b"x"])

    def test_refused_targets_are_lent(self):
        """Dispatch-looking targets the daemon does not route are lent, for twisted.web's front door to refuse."""
        for target in (b"//plugin/t/dispatch/x", b"/plugin//t/dispatch/x", b"/plugin/./t/dispatch/x",
                       b"/a/../plugin/t/dispatch/x", b"/plugin/t/%2e%2e/t/dispatch/x", b"/plugin/t%00/dispatch/x",
                       b"/plugin/%zz/dispatch/x"):
            head = parse_head(b"POST " + target + b" HTTP/1.1")
            self.assertFalse(head.dispatch, target)
            self.assertIsNone(head.target, target)

    def test_values_stripped_and_repeated_names_kept(self):
        """Values lose surrounding blanks; a repeated name keeps every value in order."""
        head = parse_head(b"POST /plugin/t/dispatch/x HTTP/1.1\r\nA:  one \t\r\nB: x\r\na: two")
        self.assertEqual(head.headers, {b"a": [b"one", b"two"], b"b": [b"x"]})
        self.assertEqual(head.content_length, 0)

    def test_persistence(self):
        """HTTP/1.1 stays open unless Connection has a close token; HTTP/1.0 never does."""
        self.assertFalse(parse_head(b"POST /plugin/t/dispatch/x HTTP/1.1\r\nConnection: Keep-Alive Close").persistent)
        self.assertTrue(parse_head(b"POST /plugin/t/dispatch/x HTTP/1.1\r\nConnection: keep-alive").persistent)
        self.assertFalse(parse_head(b"POST /plugin/t/dispatch/x HTTP/1.0\r\nConnection: keep-alive").persistent)

    def test_other_requests_are_lent(self):
        """Other methods and routes are framed too, as requests to lend to twisted.web."""
        others = [
            b"GET /plugin/t/dispatch/tool/invoke HTTP/1.1\r\nHost: x",
            b"post /plugin/t/dispatch/tool/invoke HTTP/1.1",
            b"POST /plugin/t/management/install/upload/package HTTP/1.1\r\nContent-Length: 12",
            b"GET /health/check HTTP/1.1",
            b"POST /plugin/t HTTP/1.1",
            b"POST /e/hook/x?y=1 HTTP/1.0\r\nContent-Type: text/plain",
            b"DELETE /plugin/t/endpoint/remove HTTP/1.1\r\nConnection: close",
            b"POST //plugin/t/dispatch/x HTTP/1.1",
        ]
        for data in others:
            head = parse_head(data)
            self.assertFalse(head.dispatch, data)
            self.assertIsNone(head.postpath, data)
        self.assertEqual(parse_head(others[2]).content_length, 12)
        self.assertFalse(parse_head(others[5]).persistent)
        self.assertFalse(parse_head(others[6]).persistent)
        self.assertTrue(parse_head(b"POST /plugin/t/%64ispatch/x HTTP/1.1").dispatch)

    def test_foreign_heads(self):
        """Versions, targets, framings and malformed lines twisted.web must judge are not the channel's."""
        good = b"POST /plugin/t/dispatch/tool/invoke HTTP/1.1\r\nHost: x"
        self.assertIsNotNone(parse_head(good))
        foreign = [
            b"POST http://x/plugin/t/dispatch/x HTTP/1.1",
            b"GET * HTTP/1.1",
            good.replace(b"POST", b"GET") + b"\r\nTransfer-Encoding: chunked",
            good + b"\r\nUpgrade: websocket",
            good.replace(b"HTTP/1.1", b"HTTP/2.0"),
            good.replace(b" HTTP", b"  HTTP"),
            good.replace(b"/tool/", b"/t\xc3\xa9/"),
            good + b"\r\nTransfer-Encoding: chunked",
            good + b"\r\nTransfer-Encoding: identity",
            good + b"\r\nExpect: 100-continue",
            good + b"\r\nContent-Length: 1\r\nContent-Length: 1",
            good + b"\r\nContent-Length: -1",
            good + b"\r\nContent-Length: 0x10",
            good + b"\r\nContent-Length: %d" % (MAX_BODY_SIZE + 1),
            good + b"\r\n folded",
            good + b"\r\nNo Colon",
            good + b"\r\nBad Name: x",
            good + b"\r\n: empty name",
            good + b"\r\nA: b\nC: d",
            good + b"\r\nA: b\rc",
            good + b"\r\nA: \x00",
            good + b"".join(b"\r\nH%d: x" % i for i in range(501)),
            b"\r\n" + good,
        ]
        for head in foreign:
            self.assertIsNone(parse_head(head), head)


class SplitRequestTests(SynchronousTestCase):
    """split_request frames one request, whatever bytes have arrived."""

    def test_whole_request_and_rest(self):
        """A whole request gives its head, its body and what follows."""
        data = post()
        head, body, rest = split_request(data + b"POST /next")
        self.assertEqual(head.content_length, len(BODY))
        self.assertEqual(body, BODY)
        self.assertEqual(rest, b"POST /next")

    def test_every_prefix_is_incomplete(self):
        """Every prefix asks for more: one more byte until the head is known, then the whole request."""
        data = post()
        head_end = data.index(b"\r\n\r\n") + 4
        for offset in range(len(data)):
            framed = split_request(data[:offset])
            self.assertIsInstance(framed, Incomplete, offset)
            self.assertEqual(framed.need, offset + 1 if offset < head_end else len(data), offset)
        self.assertEqual(split_request(data)[1], BODY)

    def test_foreign_as_soon_as_head_is_read(self):
        """A whole head the channel cannot frame is foreign, body or not."""
        self.assertIs(split_request(b"GET /health/check HTTP/3\r\n\r\n"), FOREIGN)
        self.assertIs(split_request(post(extra=b"Expect: 100-continue\r\n")[:-5]), FOREIGN)
        self.assertIsInstance(split_request(b"GET /health/check HTTP/1.1\r\n"), Incomplete)

    def test_other_requests_framed(self):
        """A request that is not a dispatch call is framed by its length all the same."""
        data = post().replace(b"POST", b"PUT")
        head, body, rest = split_request(data + b"GET /")
        self.assertFalse(head.dispatch)
        self.assertEqual((body, rest), (BODY, b"GET /"))
        self.assertIsInstance(split_request(data[:-1]), Incomplete)

    def test_long_request_line_is_foreign(self):
        """A request line over MAX_REQUEST_LINE is twisted.web's (414) as soon as it is known, ended or not."""
        start = b"GET /e/"
        self.assertIsInstance(split_request(start + b"a" * (MAX_REQUEST_LINE - len(start))), Incomplete)
        self.assertIs(split_request(start + b"a" * MAX_REQUEST_LINE), FOREIGN)
        self.assertIs(split_request(start + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nA: b"), FOREIGN)
        self.assertIs(split_request(start + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n"), FOREIGN)

    def test_oversize_head_is_foreign(self):
        """A head longer than twisted.web's header limit is foreign before it ends, so buffering is bounded."""
        start = b"POST " + PATH.encode() + b" HTTP/1.1\r\nX-Big: "
        self.assertIsInstance(split_request(start + b"a" * (MAX_HEAD_SIZE - len(start))), Incomplete)
        self.assertIs(split_request(start + b"a" * MAX_HEAD_SIZE), FOREIGN)
        self.assertIs(split_request(start + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n"), FOREIGN)


# -- the bytes on the wire -------------------------------------------------------------------


class SameBytesAsTwistedWebTests(SynchronousTestCase):
    """For the same requests the channel writes what twisted.web writes."""

    cases = {
        "stream": post(),
        "two keep-alive requests": post() + post(),
        "connection close, then ignored bytes": post(extra=b"Connection: close\r\n") + post(),
        "HTTP/1.0": post(version=b"HTTP/1.0"),
        "wrong key": post(key=b"wrong"),
        "no key": post().replace(b"X-Api-Key: " + KEY.encode() + b"\r\n", b""),
        "unknown route": post(path=f"/plugin/{TENANT}/dispatch/tool/nope"),
        "trailing slash": post(path=PATH + "/"),
        "no route": post(path=f"/plugin/{TENANT}/dispatch"),
        "validation failure": post(body=orjson.dumps({"data": {"provider": "echo"}})),
        "not JSON": post(body=b"{not json"),
        "no plugin id": post().replace(b"X-Plugin-ID: acme/echo\r\n", b""),
        "other tenant": post(path="/plugin/someone-else/dispatch/tool/invoke"),
        "percent-encoded path, query": post(path=f"/%70lugin/{TENANT}/dispatch/tool/invoke?x=1"),
        "empty body": post(body=b""),
        "polling route": post(path=f"/plugin/{TENANT}/dispatch/oauth/get_authorization_url",
                              body=orjson.dumps({"data": {"provider": "p", "redirect_uri": "u",
                                                          "system_credentials": {}}})),
        "management route": b"GET /plugin/" + TENANT.encode() + b"/management/list HTTP/1.1\r\nX-Api-Key: "
        + KEY.encode() + b"\r\n\r\n" + post(),
        "dispatch GET": b"GET " + PATH.encode() + b" HTTP/1.1\r\nX-Api-Key: " + KEY.encode() + b"\r\n\r\n",
        "malformed header": b"POST " + PATH.encode() + b" HTTP/1.1\r\nBad Header: x\r\n\r\n",
        "bad request line": b"POST  " + PATH.encode() + b" HTTP/1.1\r\n\r\n",
        "chunked body": b"POST " + PATH.encode() + b" HTTP/1.1\r\nX-Api-Key: " + KEY.encode()
        + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n",
        "expect 100-continue": post(extra=b"Expect: 100-continue\r\n"),
        "two content lengths": post(extra=b"Content-Length: 3\r\n"),
        "dispatch after a management call": b"GET /nowhere HTTP/1.1\r\n\r\n" + post(),
        "management call after a dispatch": post() + b"GET /nowhere HTTP/1.1\r\n\r\n",
        "dispatch, management, dispatch, management": (post() + b"GET /a HTTP/1.1\r\n\r\n") * 2,
        "management call with a body, then dispatch": post(path="/nowhere").replace(b"POST", b"PUT") + post(),
        "management call over HTTP/1.0, then ignored bytes": b"GET /nowhere HTTP/1.0\r\n\r\n" + post(),
        "management call closing, then ignored bytes": b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n" + post(),
        "management call, then a chunked one": b"GET /a HTTP/1.1\r\n\r\n" + b"POST /b HTTP/1.1\r\n"
        + b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n" + post(),
        # the front door
        "wrong key, then a request": post(key=b"wrong") + post(),
        "encoded slash, no key": post(path=f"/plugin%2F{TENANT}/dispatch/tool/invoke", key=b""),
        "encoded slash, key": post(path=f"/plugin%2f{TENANT}/dispatch/tool/invoke"),
        "double slash": post(path=f"//plugin/{TENANT}/dispatch/tool/invoke"),
        "dot segment": post(path=f"/plugin/{TENANT}/./dispatch/tool/invoke"),
        "double encoding": post(path=f"/plugin%252F{TENANT}/dispatch/tool/invoke"),
        "malformed escape": post(path=f"/plugin/{TENANT}/dispatch/tool/invoke%"),
        "dispatch body over bound": post(body=b"").replace(b"Content-Length: 0", b"Content-Length: %d" % (2**31)),
        "management body over bound": b"POST /plugin/" + TENANT.encode() + b"/management/uninstall HTTP/1.1\r\n"
        + b"X-Api-Key: " + KEY.encode() + b"\r\nContent-Length: 2000000\r\n\r\n{",
        "request line too long": b"GET /e/" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n" + post(),
        "too many headers": b"GET /a HTTP/1.1\r\n" + b"A: b\r\n" * 501 + b"\r\n" + post(),
        "HEAD on health": b"HEAD /health/check HTTP/1.1\r\n\r\n" + post(),
        "POST on health": b"POST /health/check HTTP/1.1\r\nContent-Length: 0\r\n\r\n" + post(),
    }

    def test_same_bytes(self):
        """Every case gets the same response bytes and the same closing as from twisted.web."""
        for name, data in self.cases.items():
            self.assertEqual(exchange(self, data, lean=True), exchange(self, data, lean=False), name)

    def test_front_door_answers(self):
        """The front door's cases answer what they should, and every refusal closes the connection."""
        expected = {
            "wrong key, then a request": (b"HTTP/1.1 401 Unauthorized", 1),
            "encoded slash, no key": (b"HTTP/1.1 401 Unauthorized", 1),
            "encoded slash, key": (b"HTTP/1.1 200 OK", 0),
            "double slash": (b"HTTP/1.1 404 Not Found", 1),
            "dot segment": (b"HTTP/1.1 404 Not Found", 1),
            "double encoding": (b"HTTP/1.1 404 Not Found", 0),
            "malformed escape": (b"HTTP/1.1 400 Bad Request", 1),
            "dispatch body over bound": (b"HTTP/1.1 413 Request Entity Too Large", 1),
            "management body over bound": (b"HTTP/1.1 413 Request Entity Too Large", 1),
            "request line too long": (b"HTTP/1.1 414 Request-URI Too Long", 1),
            "too many headers": (b"HTTP/1.1 431 Request Header Fields Too Large", 1),
            "HEAD on health": (b"HTTP/1.1 404 Not Found", 0),
            "POST on health": (b"HTTP/1.1 404 Not Found", 0),
        }
        for name, (status, closes) in expected.items():
            raw, closed = exchange(self, self.cases[name], lean=True)
            self.assertTrue(raw.startswith(status + b"\r\n"), (name, raw[:80]))
            self.assertEqual(closed, bool(closes), name)
            if closes:
                self.assertEqual(raw.count(b"HTTP/1.1 "), 1, name)
                self.assertIn(b"\r\nConnection: close\r\n", raw, name)
            elif name != "double encoding":
                # the dispatch call (or the next one) on the connection is served
                self.assertIn(ITEMS, raw, name)

    def test_stream_response(self):
        """A stream is a chunked text/event-stream with TwistedWeb's Server and the reactor's Date."""
        connection = Connection(self)
        raw = connection.send(post())
        self.assertEqual(
            raw,
            b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/" + raw.split(b"TwistedWeb/")[1].split(b"\r\n")[0]
            + b"\r\nDate: " + datetimeToString(connection.clock.seconds())
            + b"\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(ITEMS) + ITEMS + b"\r\n0\r\n\r\n",
        )
        self.assertFalse(connection.handed_over)

    def test_plain_answers_are_sized(self):
        """An answer that is one JSON envelope carries Content-Length, on both paths."""
        for lean in (True, False):
            raw, _ = exchange(self, post().replace(b"X-Plugin-ID: acme/echo\r\n", b""), lean=lean)
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertIn(b"\r\nContent-Length: %d" % len(body), head)
            self.assertNotIn(b"Transfer-Encoding", head)

    def test_connection_close_says_so(self):
        """A request with Connection: close is answered with Connection: close first, then the connection closes."""
        connection = Connection(self)
        raw = connection.send(post(extra=b"Connection: close\r\n"))
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: "))
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(connection.send(post()), raw)


class SplitDeliveryTests(SynchronousTestCase):
    """The answer does not depend on how the bytes were cut."""

    def test_split_at_every_offset(self):
        """Two pipelined requests cut in two at every offset get the bytes of the uncut pair."""
        data = post() + post(extra=b"Connection: close\r\n")
        expected = exchange(self, data, lean=True)
        self.assertTrue(expected[1])
        self.assertEqual(expected[0].count(b"HTTP/1.1 200 OK"), 2)
        assert_every_cut(self, data, expected)

    def test_byte_at_a_time(self):
        """A request sent one byte at a time is served once, when its last byte arrives."""
        data = post()
        connection = Connection(self)
        for byte in range(len(data) - 1):
            self.assertEqual(connection.send(data[byte:byte + 1]), b"")
        self.assertEqual(without_date(connection.send(data[-1:])), exchange(self, data, lean=True)[0])
        self.assertEqual(len(connection.daemon.runtime.requests), 1)

    def test_large_body_in_pieces(self):
        """A body of several reads is joined once whole and parsed as one JSON document."""
        text = "x" * 300_000
        body = orjson.dumps({"data": dict(TOOL_DATA, tool_parameters={"text": text})})
        data = post(body=body)
        connection = Connection(self)
        for start in range(0, len(data), 65536):
            connection.protocol.dataReceived(data[start:start + 65536])
        connection.send(b"")
        request = connection.daemon.runtime.requests[0]
        self.assertEqual(request["data"]["tool_parameters"], {"text": text})


# -- connections ---------------------------------------------------------------------------------


class KeepAliveTests(SynchronousTestCase):
    """Requests one after another, and pipelined, on one connection."""

    def test_sequence(self):
        """Three requests in turn are each answered on the same open connection."""
        connection = Connection(self)
        for count in range(1, 4):
            raw = connection.send(post())
            self.assertEqual(raw.count(b"\r\n0\r\n\r\n"), count)
        self.assertFalse(connection.transport.disconnecting)
        self.assertFalse(connection.handed_over)
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))

    def test_pipelined_request_waits_its_turn(self):
        """A request sent while one is streamed is only served once the first is finished."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        connection.send(post())
        first = runtime.last_session_id
        runtime.stream(first, TEXT_HI)
        connection.send(post())
        self.assertEqual(len(runtime.requests), 1)
        runtime.end(first)
        self.assertEqual(len(runtime.requests), 2)
        runtime.stream(runtime.last_session_id, TEXT_HO)
        runtime.end(runtime.last_session_id)
        raw = connection.transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK"), 2)
        self.assertLess(raw.index(b'"hi"'), raw.index(b"HTTP/1.1 200 OK", 1))
        self.assertLess(raw.index(b"HTTP/1.1 200 OK", 1), raw.index(b'"ho"'))

    def test_pipelined_reading_is_bounded(self):
        """More than EAGER_READ_SIZE bytes of pipelined requests pause reading until the first is answered."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        connection.send(post())
        data = post() * (EAGER_READ_SIZE // len(post()) + 1)
        connection.send(data)
        self.assertEqual(connection.transport.producerState, "paused")
        runtime.end(runtime.last_session_id)
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertEqual(len(runtime.requests), 2)

    def test_client_not_reading_pauses_between_requests(self):
        """When the transport's buffer is full, reading stops once the current answer is done."""
        connection = Connection(self, script=False)
        connection.send(post())
        connection.protocol.pauseProducing()
        self.assertEqual(connection.transport.producerState, "producing")
        connection.daemon.runtime.end(connection.daemon.runtime.last_session_id)
        connection.protocol.resumeProducing()
        connection.protocol.pauseProducing()
        self.assertEqual(connection.transport.producerState, "paused")
        connection.protocol.resumeProducing()
        self.assertEqual(connection.transport.producerState, "producing")


class SlowResource(Resource):
    """Answers every request later, when the test says; registers a push producer on it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = []
        self.producers = []

    def render(self, request):
        producer = StringTransport()  # a push producer that records its state
        request.registerProducer(producer, True)
        self.requests.append(request)
        self.producers.append(producer)
        return NOT_DONE_YET

    def answer(self) -> None:
        request = self.requests.pop(0)
        request.unregisterProducer()
        request.write(b"slow")
        request.finish()


SLOW = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"


class LendingTests(SynchronousTestCase):
    """Other requests are lent to twisted.web, one at a time, and the connection comes back."""

    def slow(self, **options):
        resource = SlowResource()
        return Connection(self, root=resource, **options), resource

    def test_connection_comes_back(self):
        """After a management call the next dispatch call is served by the channel, which is the producer again."""
        connection = Connection(self)
        timers = len(connection.clock.getDelayedCalls())
        raw = connection.send(b"GET /nowhere HTTP/1.1\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertFalse(connection.handed_over)
        self.assertIsNone(connection.protocol._request)
        self.assertIs(connection.transport.producer, connection.protocol)
        # the lent channel's idle timer is gone with it
        self.assertEqual(len(connection.clock.getDelayedCalls()), timers)
        raw = connection.send(post())
        self.assertIn(ITEMS, raw)
        self.assertEqual(len(connection.daemon.runtime.requests), 1)

    def test_pipelined_dispatch_waits_for_lent_request(self):
        """A dispatch call behind a slow management call is served only after it, in order."""
        connection, resource = self.slow()
        self.assertEqual(connection.send(SLOW + post()), b"")
        self.assertEqual(connection.daemon.runtime.requests, [])
        resource.answer()
        connection.clock.advance(0)
        connection.clock.advance(0)
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertLess(raw.index(b"\r\n4\r\nslow\r\n"), raw.index(ITEMS))
        self.assertEqual(len(connection.daemon.runtime.requests), 1)

    def test_reading_bounded_during_lent_request(self):
        """Bytes pipelined behind a slow lent request are buffered up to a bound, then reading stops."""
        connection, resource = self.slow()
        connection.send(SLOW)
        data = post(body=orjson.dumps({"data": dict(TOOL_DATA, tool_parameters={"text": "x" * EAGER_READ_SIZE})}))
        connection.send(data[:EAGER_READ_SIZE])
        self.assertEqual(connection.transport.producerState, "producing")
        connection.send(data[EAGER_READ_SIZE:EAGER_READ_SIZE + 1])
        self.assertEqual(connection.transport.producerState, "paused")
        resource.answer()
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertEqual(connection.daemon.runtime.requests, [])
        self.assertIn(ITEMS, connection.send(data[EAGER_READ_SIZE + 1:]))
        self.assertFalse(connection.handed_over)

    def test_full_write_buffer_reaches_lent_request(self):
        """A client not reading pauses the lent request's producer, and resumes it."""
        connection, resource = self.slow()
        connection.send(SLOW)
        producer = resource.producers[0]
        connection.protocol.pauseProducing()
        self.assertEqual(producer.producerState, "paused")
        connection.protocol.resumeProducing()
        self.assertEqual(producer.producerState, "producing")

    def test_client_leaves_during_lent_request(self):
        """The client's departure reaches the lent request, and no timer is left."""
        connection, resource = self.slow()
        connection.send(SLOW)
        finished = resource.requests[0].notifyFinish()
        connection.disconnect()
        self.failureResultOf(finished, ConnectionDone)
        connection.protocol._stop_idle_timer()
        self.assertEqual(connection.clock.getDelayedCalls(), [])

    def test_lent_request_never_times_out(self):
        """A slow lent request is not idleness; the idle count starts again when it is answered."""
        connection, resource = self.slow(timeout=100)
        connection.send(SLOW)
        connection.clock.advance(250)
        self.assertFalse(connection.transport.disconnecting)
        resource.answer()
        connection.clock.advance(99)
        self.assertFalse(connection.transport.disconnecting)
        connection.clock.advance(101)
        self.assertTrue(connection.transport.disconnecting)

    def test_body_passed_on_as_it_arrives(self):
        """A lent request's body goes to twisted.web as it arrives, not buffered here; what follows is ours."""
        upload = b"x" * (4 * EAGER_READ_SIZE)
        data = b"PUT /nowhere HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(upload) + upload
        connection = Connection(self)
        step = EAGER_READ_SIZE // 2
        for start in range(0, len(data) - step, step):
            connection.send(data[start:start + step])
            self.assertEqual(connection.protocol._parts, [])
            self.assertEqual(connection.transport.producerState, "producing")
        raw = connection.send(data[start + step:] + post())
        self.assertTrue(raw.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        self.assertIn(ITEMS, raw)
        self.assertFalse(connection.handed_over)

    def test_split_at_every_offset(self):
        """A management call with a body, then a dispatch call, cut in two anywhere, get the uncut answer."""
        data = post(path="/nowhere").replace(b"POST", b"PUT") + post(extra=b"Connection: close\r\n")
        expected = exchange(self, data, lean=True)
        self.assertEqual(expected, exchange(self, data, lean=False))
        assert_every_cut(self, data, expected)

    def test_lent_channel_closes(self):
        """A lent request that closes the connection leaves the channel closing, and not a producer."""
        connection = Connection(self)
        connection.send(b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(connection.transport.disconnecting)
        self.assertIsNone(connection.transport.producer)
        self.assertEqual(connection.send(post()).count(b"HTTP/1.1 "), 1)


class FrontDoorTests(SynchronousTestCase):
    """The channel checks a dispatch request's head before reading its body."""

    def head_of(self, data: bytes) -> bytes:
        return data[:data.index(b"\r\n\r\n") + 4]

    def test_key_refused_at_head(self):
        """A wrong key is answered as soon as the head is read; the body that follows is never read."""
        for key in (b"", b"wrong"):
            connection = Connection(self)
            data = post(key=key, body=b"x" * 100_000)
            raw = connection.send(self.head_of(data))
            self.assertTrue(raw.startswith(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n"), raw)
            self.assertTrue(connection.transport.disconnecting)
            self.assertFalse(connection.handed_over)
            connection.send(data[len(self.head_of(data)):] + post())
            self.assertEqual(connection.transport.value(), raw)
            self.assertEqual(connection.protocol._parts, [])
            self.assertEqual(connection.daemon.runtime.requests, [])
            self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))

    def test_refusal_cut_anywhere(self):
        """A refused dispatch request gets the same answer whatever the cuts."""
        data = post(key=b"wrong")
        expected = exchange(self, data, lean=True)
        assert_every_cut(self, data, expected)

    def test_body_bound_at_head(self):
        """A declared body over the dispatch bound is refused by the channel itself, before the body."""
        connection = Connection(self, limits=BodyLimits(dispatch=10))
        raw = connection.send(self.head_of(post()))
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\nConnection: close\r\n"), raw)
        self.assertFalse(connection.handed_over)
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(connection.daemon.runtime.requests, [])
        connection = Connection(self, limits=BodyLimits(dispatch=len(BODY)))
        self.assertIn(ITEMS, connection.send(post()))

    def test_refused_client_aborted(self):
        """A refused client that does not let the connection close is aborted."""
        connection = Connection(self)
        connection.send(post(key=b"wrong"))
        connection.clock.advance(connection.protocol.abort_timeout)
        self.assertTrue(connection.transport.disconnected)


class HeadDeadlineTests(SynchronousTestCase):
    """A head must be whole within HEAD_TIMEOUT of its first byte, on the dispatch channel too."""

    def test_trickled_head_times_out(self):
        """A byte a second keeps nothing open: at HEAD_TIMEOUT the answer is 408, then the connection closes."""
        connection = Connection(self, timeout=60)
        data = post()
        for offset in range(int(HEAD_TIMEOUT) - 1):
            connection.send(data[offset:offset + 1])
            connection.clock.advance(1)
        self.assertFalse(connection.transport.disconnecting)
        connection.clock.advance(1)
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 408 Request Time-out\r\nConnection: close\r\n"), raw)
        self.assertTrue(connection.transport.disconnecting)
        connection.clock.advance(connection.protocol.abort_timeout)
        self.assertTrue(connection.transport.disconnected)
        self.assertEqual(connection.daemon.runtime.requests, [])

    def test_head_within_deadline(self):
        """Heads that take a little under the deadline are served, one after another, and leave no deadline."""
        connection = Connection(self, timeout=60)
        for count in range(1, 4):
            connection.send(post()[:10])
            connection.clock.advance(HEAD_TIMEOUT - 1)
            connection.send(post()[10:])
            self.assertEqual(len(connection.daemon.runtime.requests), count)
        self.assertFalse(connection.transport.disconnecting)
        self.assertIsNone(connection.protocol._head_call)

    def test_no_deadline_while_answering(self):
        """Bytes pipelined behind a request being answered start no deadline until that answer is done."""
        connection = Connection(self, script=False, timeout=600)
        runtime = connection.daemon.runtime
        connection.send(post() + post()[:10])
        connection.clock.advance(HEAD_TIMEOUT * 3)
        self.assertFalse(connection.transport.disconnecting)
        runtime.end(runtime.last_session_id)
        connection.clock.advance(HEAD_TIMEOUT)
        self.assertTrue(connection.transport.value().split(b"0\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 408 "))

    def test_body_bytes_are_activity(self):
        """Once the head is whole its deadline is gone: a body may take longer, within its own pace."""
        connection = Connection(self, timeout=60)
        data = post()
        body_start = data.index(b"\r\n\r\n") + 4
        connection.send(data[:body_start])
        for offset in range(body_start, body_start + 3):
            connection.clock.advance(HEAD_TIMEOUT - 1)
            connection.send(data[offset:offset + 1])
        connection.send(data[body_start + 3:])
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(len(connection.daemon.runtime.requests), 1)

    def test_idle_timer_not_reset_by_head_bytes(self):
        """With an idle timeout shorter than the deadline, trickled head bytes do not keep the connection."""
        connection = Connection(self, timeout=3)
        for offset in range(5):
            connection.send(post()[offset:offset + 1])
            connection.clock.advance(1)
        self.assertTrue(connection.transport.disconnecting)


class HandOverTests(SynchronousTestCase):
    """Requests the channel cannot frame turn the connection over to twisted.web with every byte."""

    def test_unframed_request_hands_over_for_good(self):
        """A chunked request hands the connection over; later dispatch calls are twisted.web's."""
        connection = Connection(self)
        connection.send(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
        self.assertTrue(connection.handed_over)
        raw = connection.send(post())
        self.assertEqual(raw.count(b"HTTP/1.1 "), 2)
        self.assertIn(ITEMS, raw)
        self.assertIs(connection.transport.producer, connection.protocol._inner)

    def test_partial_head_then_hand_over(self):
        """A head cut anywhere reaches twisted.web whole once it is known to be foreign."""
        data = b"GET /nowhere HTTP/1.1\r\nX-Api-Key: " + KEY.encode() + b"\r\nExpect: 100-continue\r\n\r\n"
        expected = exchange(self, data, lean=False)
        assert_every_cut(self, data, expected)

    def test_bad_request_is_400(self):
        """A malformed head is twisted.web's 400, and the connection closes."""
        raw, closed = exchange(self, b"POST " + PATH.encode() + b" HTTP/1.1\r\nA: b\nC: d\r\n\r\n", lean=True)
        self.assertTrue(raw.startswith(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"), raw)
        self.assertTrue(raw.endswith(BAD_REQUEST.body))
        self.assertTrue(closed)

    def test_oversize_head_is_431(self):
        """Endless headers stop being buffered here and get the front door's 431, and the connection closes."""
        connection = Connection(self)
        connection.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\n")
        for _ in range(MAX_HEAD_SIZE // 1000 + 1):
            connection.send(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        self.assertTrue(connection.handed_over)
        self.assertEqual(connection.protocol._parts, [])
        self.assertTrue(connection.transport.value().startswith(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"))
        self.assertTrue(connection.transport.disconnecting)

    def test_disconnect_reaches_twisted_web(self):
        """After the hand-over the client's departure reaches twisted.web's pending request."""
        connection = Connection(self, script=False)
        connection.send(b"POST " + PATH.encode() + b" HTTP/1.1\r\nX-Api-Key: " + KEY.encode()
                        + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\n"
                        + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        session = connection.daemon.runtime.last_session_id
        self.assertTrue(connection.handed_over)
        connection.disconnect()
        self.assertFalse(connection.daemon.runtime.is_open(session))
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))


class DisconnectTests(SynchronousTestCase):
    """A client that goes away."""

    def test_disconnect_mid_stream(self):
        """The session closes, nothing more is written, no timer is left and the request is no longer counted."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        connection.send(post())
        session = runtime.last_session_id
        runtime.stream(session, TEXT_HI)
        connection.clock.advance(0)
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (1, 1))
        written = connection.transport.value()
        runtime.stream(session, TEXT_HO)
        connection.disconnect()
        self.assertFalse(runtime.is_open(session))
        runtime.stream(session, TEXT_HI)
        connection.clock.advance(1000)
        self.assertEqual(connection.transport.value(), written)
        self.assertEqual(connection.clock.getDelayedCalls(), [])
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))

    def test_disconnect_while_waiting_for_a_runtime(self):
        """A client that leaves while its request waits for a runtime leaves no retry behind."""
        connection = Connection(self, runtime=False)
        connection.send(post())
        self.assertEqual(len(connection.clock.getDelayedCalls()), 2)
        connection.disconnect()
        self.assertEqual(connection.clock.getDelayedCalls(), [])
        connection.daemon.registry.register(connection.daemon.runtime)
        connection.clock.advance(10)
        self.assertEqual(connection.daemon.runtime.requests, [])

    def test_request_after_disconnect(self):
        """Writes after the client left are dropped; finishing then raises, as on twisted.web."""
        connection = Connection(self, script=False)
        connection.send(post())
        request = connection.protocol._request
        finished = request.notifyFinish()
        connection.disconnect()
        self.failureResultOf(finished, ConnectionDone)
        written = connection.transport.value()
        request.write(b"more")
        self.assertEqual(connection.transport.value(), written)
        self.assertRaises(RuntimeError, request.finish)


class CounterTests(SynchronousTestCase):
    """Dispatch calls served by the channel count in /health/check."""

    def test_counted_while_in_flight(self):
        """A call is counted from its head to its end, refusals included."""
        connection = Connection(self, script=False)
        connection.send(post())
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (1, 1))
        connection.daemon.runtime.end(connection.daemon.runtime.last_session_id)
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))
        connection.send(post(key=b"wrong"))
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))

    def test_counter_track_for_twisted_web(self):
        """RequestCounter.track counts a twisted.web request until notifyFinish fires, either way."""
        from twisted.internet.defer import Deferred

        class Request:
            def __init__(self):
                self.finished = Deferred()

            def notifyFinish(self):
                return self.finished

        counter = RequestCounter()
        ok, gone = Request(), Request()
        counter.track(ok, True)
        counter.track(gone, False)
        self.assertEqual((counter.active, counter.active_dispatch), (2, 1))
        ok.finished.callback(None)
        gone.finished.errback(Failure(ConnectionDone()))
        self.assertEqual((counter.active, counter.active_dispatch), (0, 0))


class FailureTests(SynchronousTestCase):
    """A dispatch resource that raises."""

    def test_resource_bug_is_500(self):
        """A resource that raises gets twisted.web's 500 page, and the failure is logged."""

        class Broken:
            def render(self, request):
                raise ZeroDivisionError("bug")

        clock = MemoryReactorClock()
        site = DaemonSite(None, reactor=clock, gate=DispatchGate(RequestCounter(), Broken()),
                          front_door=FrontDoor(KEY.encode()))
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post())
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"))
        self.assertIn(b"\r\nContent-Type: text/html\r\nContent-Length: %d" % len(body), head)
        self.assertIn(b"Processing Failed", body)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_render_returning_bytes(self):
        """A resource that answers at once gets a sized answer and the connection goes on."""

        class Fixed:
            def render(self, request):
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"application/json; charset=utf-8")
                return envelope.ROUTE_NOT_FOUND

        site = DaemonSite(None, reactor=MemoryReactorClock(), gate=DispatchGate(RequestCounter(), Fixed()),
                          front_door=FrontDoor(KEY.encode()))
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post() + post())
        raw = transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1 404 Not Found\r\n"), 2)
        self.assertEqual(raw.count(b"Content-Length: %d\r\n\r\n" % len(envelope.ROUTE_NOT_FOUND)
                                   + envelope.ROUTE_NOT_FOUND), 2)


class IdleTimeoutTests(SynchronousTestCase):
    """Idle connections are closed after the site's timeOut, as twisted.web does."""

    def make(self):
        return Connection(self, script=False, timeout=100)

    def test_idle_connection_closed(self):
        """No request for timeOut seconds after the last answer closes the connection, and aborts it if it lingers."""
        connection = self.make()
        connection.clock.advance(60)
        connection.send(post())
        connection.daemon.runtime.end(connection.daemon.runtime.last_session_id)
        connection.clock.advance(99)
        self.assertFalse(connection.transport.disconnecting)
        connection.clock.advance(1)
        self.assertTrue(connection.transport.disconnecting)
        connection.clock.advance(connection.protocol.abort_timeout)
        self.assertTrue(connection.transport.disconnected)

    def test_request_in_flight_never_times_out(self):
        """A long stream is not idleness; the count starts again when it ends."""
        connection = self.make()
        connection.send(post())
        connection.clock.advance(250)
        self.assertFalse(connection.transport.disconnecting)
        connection.daemon.runtime.end(connection.daemon.runtime.last_session_id)
        connection.clock.advance(99)
        self.assertFalse(connection.transport.disconnecting)
        connection.clock.advance(101)
        self.assertTrue(connection.transport.disconnecting)

    def test_timer_stops_with_connection(self):
        """A closed connection leaves no timer."""
        connection = self.make()
        connection.send(post(extra=b"Connection: close\r\n"))
        connection.daemon.runtime.end(connection.daemon.runtime.last_session_id)
        connection.disconnect()
        self.assertEqual(connection.clock.getDelayedCalls(), [])


class WiringTests(SynchronousTestCase):
    """tap.py serves dispatch calls through the channel."""

    def test_daemon_site_uses_channel(self):
        """The daemon's site starts connections on the dispatch channel, which answers a bad key itself."""
        workdir = self.mktemp()
        options = tap.Options()
        options.parseOptions(["--env-file", os.path.join(workdir, "absent.env")])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(workdir, 5002))
        protocol = service.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(protocol, DispatchChannel)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(post(key=b"wrong"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 Unauthorized\r\n"))
        self.assertIsNone(protocol._inner)


class TurnFlushTests(SynchronousTestCase):
    """The streams of one resource share one flush per reactor turn."""

    def test_streams_of_one_turn_share_one_call(self):
        """Two streams with chunks in one turn are flushed by one delayed call, each as one HTTP chunk."""
        first = Connection(self, script=False)
        # a second connection to the same site, so the same dispatch resource
        second_protocol = first.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        second_transport = StringTransport()
        second_protocol.makeConnection(second_transport)
        runtime = first.daemon.runtime
        first.send(post())
        one = runtime.last_session_id
        second_protocol.dataReceived(post())
        two = runtime.last_session_id
        idle_timers = len(first.clock.getDelayedCalls())
        runtime.stream(one, TEXT_HI)
        runtime.stream(two, TEXT_HI)
        runtime.stream(one, TEXT_HO)
        self.assertEqual(len(first.clock.getDelayedCalls()), idle_timers + 1)
        first.clock.advance(0)
        item_hi, item_ho = sse.success_item(orjson.dumps(TEXT_HI)), sse.success_item(orjson.dumps(TEXT_HO))
        self.assertTrue(first.transport.value().endswith(b"%x\r\n" % len(item_hi + item_ho) + item_hi + item_ho + b"\r\n"))
        self.assertTrue(second_transport.value().endswith(b"%x\r\n" % len(item_hi) + item_hi + b"\r\n"))
        self.assertEqual(len(first.clock.getDelayedCalls()), idle_timers)

    def test_streams_ending_in_their_turn_leave_no_call(self):
        """A stream whose chunk and end come in one turn writes both at once and leaves no delayed call."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        connection.send(post())
        idle_timers = connection.clock.getDelayedCalls()
        runtime.stream(runtime.last_session_id, TEXT_HI)
        runtime.end(runtime.last_session_id)
        self.assertEqual(connection.clock.getDelayedCalls(), idle_timers)
        self.assertTrue(connection.transport.value().endswith(
            sse.success_item(orjson.dumps(TEXT_HI)) + b"\r\n0\r\n\r\n"))

    def test_stream_ending_in_its_turn_is_one_write(self):
        """A stream whose chunk and end come in one turn is answered in one write: head, item and last chunk."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        connection.send(post())
        writes = []
        write = connection.transport.write
        connection.transport.write = lambda data: (writes.append(data), write(data))
        runtime.stream(runtime.last_session_id, TEXT_HI)
        runtime.end(runtime.last_session_id)
        [written] = writes
        self.assertTrue(written.startswith(b"HTTP/1.1 200 OK\r\n"), written)
        self.assertTrue(written.endswith(sse.success_item(orjson.dumps(TEXT_HI)) + b"\r\n0\r\n\r\n"), written)

    def test_ended_stream_does_not_cancel_others(self):
        """One stream ending in the turn leaves the other streams of that turn to be flushed."""
        connection = Connection(self, script=False)
        runtime = connection.daemon.runtime
        other = connection.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        other_transport = StringTransport()
        other.makeConnection(other_transport)
        connection.send(post())
        one = runtime.last_session_id
        other.dataReceived(post())
        two = runtime.last_session_id
        runtime.stream(one, TEXT_HI)
        runtime.stream(two, TEXT_HO)
        runtime.end(one)
        self.assertNotIn(b'"ho"', other_transport.value())
        connection.clock.advance(0)
        self.assertIn(sse.success_item(orjson.dumps(TEXT_HO)), other_transport.value())


class SmugglingTests(SynchronousTestCase):
    """On the dispatch channel too, a head two readers could frame differently is 400, and the connection closes."""

    def test_shapes(self):
        """Each shape on a dispatch route and on a lent one: 400 with the envelope, closed, nothing served."""
        for target in (PATH.encode(), f"/plugin/{TENANT}/management/install/identifiers".encode()):
            for name, data in shapes(target, KEY.encode()).items():
                for offset in range(1, len(data) + 1, 7):
                    connection = Connection(self)
                    connection.send(data[:offset])
                    raw = connection.send(data[offset:])
                    self.assertTrue(raw.startswith(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"),
                                    (target, name, offset, raw))
                    self.assertTrue(raw.endswith(BAD_REQUEST.body), (name, offset))
                    self.assertTrue(connection.transport.disconnecting, (name, offset))
                    self.assertEqual(connection.daemon.runtime.requests, [], (name, offset))

    def test_bare_lf_in_a_partial_head(self):
        """A head of bare LFs still arriving is handed over and refused at once, not at its deadline."""
        for data in (b"POST " + PATH.encode() + b" HTTP/1.1\nHost: d\n", b"GET /health/check HTTP/1.1\n\n"):
            self.assertIs(split_request(data), FOREIGN)
            connection = Connection(self)
            self.assertTrue(connection.send(data).startswith(b"HTTP/1.1 400 "), data)
            self.assertTrue(connection.transport.disconnecting)


class DispatchBodyPaceTests(SynchronousTestCase):
    """A dispatch body, framed by this channel, must keep up with the keyed pace."""

    def test_trickled_body_is_408(self):
        """A dispatch body a byte every 2 s is 408 once the keyed grace is over; nothing reaches the plugin."""
        connection = Connection(self, timeout=600)
        data = post()
        body_start = data.index(b"\r\n\r\n") + 4
        connection.send(data[:body_start])
        sent = 0
        for offset in range(body_start, len(data)):
            connection.clock.advance(2)
            if connection.transport.disconnecting:
                break
            connection.send(data[offset:offset + 1])
            sent += 1
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 408 Request Time-out\r\nConnection: close\r\n"), raw)
        self.assertIn(b"request body not received in time", raw)
        self.assertEqual(sent, int(KEYED_PACE.grace / 2))
        self.assertEqual(connection.daemon.runtime.requests, [])
        self.assertFalse(connection.handed_over)

    def test_body_within_pace_leaves_no_call(self):
        """A body in time is served, and its pace call is gone with it."""
        connection = Connection(self, timeout=600)
        data = post()
        body_start = data.index(b"\r\n\r\n") + 4
        connection.send(data[:body_start + 2])
        self.assertIsNotNone(connection.protocol._pace_call)
        connection.clock.advance(KEYED_PACE.grace - 1)
        self.assertIn(ITEMS, connection.send(data[body_start + 2:]))
        self.assertIsNone(connection.protocol._pace_call)
        self.assertFalse(connection.transport.disconnecting)

    def test_lent_body_paced(self):
        """A lent request's body (an /e/ call) is paced by twisted.web's channel: 408, and the connection closes."""
        connection = Connection(self, timeout=600)
        data = b"POST /e/hook/x HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"z" * 100
        body_start = data.index(b"\r\n\r\n") + 4
        connection.send(data[:body_start])
        for offset in range(body_start, len(data)):
            connection.clock.advance(1)
            if connection.transport.disconnecting:
                break
            connection.send(data[offset:offset + 1])
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertFalse(connection.handed_over)
        self.assertEqual(offset - body_start, int(PUBLIC_PACE.grace))
