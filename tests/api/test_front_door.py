"""
The front door of the real daemon over real sockets: every route of
``http-api.md`` §2 with every path trick, with and without ``X-Api-Key``,
through the dispatch channel, lent requests and a handed-over connection;
bodies refused before they are read.
"""

from __future__ import annotations

import os
import re

import orjson
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from difydaemon import tap
from difydaemon.dispatch_routes import ROUTES as DISPATCH_ROUTES
from difydaemon.api.management import ManagementAPI
from difydaemon.testing.cases import AsyncTestCase
from tests.api.smuggling import shapes
from tests.test_tap import KEY, environment, free_port

TENANT = "0193a8a4-0000-7000-8000-0000000000fd"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
_PARAMETERS = {"tenant_id": TENANT, "task_id": "t1", "path:identifier": IDENTIFIER, "category": "tool",
               "asset_id": "abc.svg"}


def routes() -> list[tuple[str, str]]:
    """(method, path) of every route the daemon serves (§2.1, §2.2-2.8)."""
    found = [("GET", "/health/check"), ("POST", "/e/hook0123456789ab/some/path")]
    found += [("POST", f"/plugin/{TENANT}/dispatch/{route.path}") for route in DISPATCH_ROUTES]
    for rule in ManagementAPI.app.url_map.iter_rules():
        method = "POST" if "POST" in rule.methods else "GET"
        found.append((method, re.sub(r"<([^>]+)>", lambda m: _PARAMETERS[m.group(1)], rule.rule)))
    return found


def _second_slash(path: str) -> int:
    return path.index("/", 1)


#: name -> (how it spells a path, whether it is the same route or no route at all)
TRICKS = {
    "plain": (lambda p: p, "same"),
    "%2F": (lambda p: p[:_second_slash(p)] + "%2F" + p[_second_slash(p) + 1:], "same"),
    "%2f": (lambda p: p[:_second_slash(p)] + "%2f" + p[_second_slash(p) + 1:], "same"),
    "%70-style letter": (lambda p: "/%{:02X}".format(ord(p[1])) + p[2:], "same"),
    "all encoded": (lambda p: "/" + "".join("%{:02x}".format(ord(c)) if c != "/" else "/" for c in p[1:]), "same"),
    "//": (lambda p: "/" + p, "none"),
    "///": (lambda p: "//" + p, "none"),
    "inner //": (lambda p: p[:_second_slash(p)] + "/" + p[_second_slash(p):], "none"),
    "./": (lambda p: "/." + p, "none"),
    "../": (lambda p: "/x/.." + p, "none"),
    "%2e%2e": (lambda p: "/x/%2e%2e" + p, "none"),
    "%252F": (lambda p: p[:_second_slash(p)] + "%252F" + p[_second_slash(p) + 1:], "none"),
}


class Exchange(Protocol):
    """Sends one request and keeps what comes back until the server closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.received))


def request_bytes(method: str, path: str, key: str | None, chunked: bool, body: bytes = b"{}") -> bytes:
    if method != "POST":
        body = b""
    head = f"{method} {path} HTTP/1.1\r\nHost: daemon.test\r\nConnection: close\r\nContent-Type: application/json\r\n"
    if key is not None:
        head += f"X-Api-Key: {key}\r\n"
    if chunked:
        framed = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def body_of(raw: bytes) -> bytes:
    """The body of a response read to its end (chunked or not)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"\r\ntransfer-encoding: chunked" not in head.lower():
        return body
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        size = int(size, 16)
        if not size:
            return out
        out, body = out + body[:size], body[size + 2:]


def status_of(raw: bytes) -> int:
    """The status of the (first) response, 0 if none came."""
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", raw)
    return int(match.group(1)) if match else 0


class DaemonOnSocket(AsyncTestCase):
    """The daemon made by makeService, listening on a free port."""

    timeout = 600
    extra_environment: dict = {}

    async def start(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.port = free_port()
        environ = environment(workdir, self.port)
        environ.update({"PLUGIN_REMOTE_INSTALLING_ENABLED": "true", "PLUGIN_REMOTE_INSTALLING_HOST": "127.0.0.1",
                        "PLUGIN_REMOTE_INSTALLING_PORT": str(free_port())})
        environ.update(self.extra_environment)
        options = tap.Options()
        options.parseOptions(["--env-file", os.path.join(workdir, "absent.env")])
        self.service = tap.makeService(options, reactor=reactor, environ=environ)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        await self.service.ready

    async def exchange(self, data: bytes) -> bytes:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        protocol = Exchange(data)
        await connectProtocol(endpoint, protocol)
        return await protocol.done


class EveryRouteEveryTrickTests(DaemonOnSocket):
    """No spelling of a route reaches it without the key, on either HTTP stack."""

    async def test_matrix(self):
        """Every route x trick x key x framing: without the key only 401/404/400; the same route with it."""
        await self.start()
        semaphore = defer.DeferredSemaphore(16)
        cases = []
        for method, path in routes():
            for trick, (spell, kind) in TRICKS.items():
                for key in (None, KEY):
                    for chunked in (False, True):
                        cases.append((method, path, trick, kind, key, chunked))

        async def one(case):
            method, path, trick, kind, key, chunked = case
            raw = await self.exchange(request_bytes(method, TRICKS[trick][0](path), key, chunked))
            return case, status_of(raw), raw

        results = await defer.gatherResults(
            [semaphore.run(lambda c=case: defer.Deferred.fromCoroutine(one(c))) for case in cases]
        )
        plain = {}
        for (method, path, trick, kind, key, chunked), status, raw in results:
            if trick == "plain":
                plain[(method, path, key, chunked)] = status
        checked = 0
        for (method, path, trick, kind, key, chunked), status, raw in results:
            where = (method, path, trick, key, "chunked" if chunked else "length", raw[:200])
            self.assertLess(status, 500, where)
            self.assertNotEqual(status, 0, where)
            protected = path.startswith("/plugin/")
            if protected and key != KEY:
                self.assertIn(status, (400, 401, 404), where)
            if kind == "none":
                self.assertEqual(status, 404, where)
                self.assertIn(b'{"code":"not_found","message":"route not found"}', raw, where)
            else:
                self.assertEqual(status, plain[(method, path, key, chunked)], where)
            checked += 1
        # the plain routes answer as expected: the key is needed, and enough to pass the front door
        for (method, path, key, chunked), status in plain.items():
            if path.startswith("/plugin/"):
                self.assertEqual(status == 401, key != KEY, (method, path, key, status))
        self.assertGreater(checked, 2000)


class BodyNotReadTests(DaemonOnSocket):
    """A refused request's body is never read: the answer comes before it is sent."""

    extra_environment = {"MAX_PLUGIN_PACKAGE_SIZE": "1000"}

    async def answer_to_head(self, head: bytes) -> bytes:
        """Send a head announcing a body, and nothing more; the answer must come anyway."""
        return await self.exchange(head)

    async def test_unauthenticated_bodies(self):
        """Without the key, a 200 MB body announced on any /plugin route is refused at the head, on both stacks."""
        await self.start()
        for path in (f"/plugin/{TENANT}/dispatch/tool/invoke", f"/plugin/{TENANT}/management/install/upload/package",
                     f"//plugin/{TENANT}/management/install/upload/package"):
            for framing in (b"Content-Length: 200000000\r\n", b"Transfer-Encoding: chunked\r\n"):
                raw = await self.answer_to_head(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: d\r\n" + framing + b"\r\n")
                self.assertIn(status_of(raw), (401, 404), (path, framing, raw))
                self.assertIn(b"\r\nConnection: close\r\n", raw)

    async def test_oversize_upload(self):
        """An upload announced over MAX_PLUGIN_PACKAGE_SIZE plus the multipart overhead is Go's 200/-400 at once."""
        await self.start()
        path = f"/plugin/{TENANT}/management/install/upload/package"
        raw = await self.answer_to_head(
            f"POST {path} HTTP/1.1\r\nX-Api-Key: {KEY}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {1000 + 1024 * 1024 + 1}\r\n\r\n".encode()
        )
        self.assertEqual(status_of(raw), 200, raw)
        envelope = orjson.loads(body_of(raw))
        self.assertEqual(envelope["code"], -400)
        self.assertEqual(orjson.loads(envelope["message"])["message"], "file size exceeds the maximum limit")

    async def test_oversize_file_part(self):
        """A file part over MAX_PLUGIN_PACKAGE_SIZE in a body within the bound is refused, as Go does."""
        await self.start()
        body = (b"--b\r\nContent-Disposition: form-data; name=\"dify_pkg\"; filename=\"p\"\r\n\r\n" + b"z" * 1001
                + b"\r\n--b--\r\n")
        raw = await self.exchange(
            f"POST /plugin/{TENANT}/management/install/upload/package HTTP/1.1\r\nX-Api-Key: {KEY}\r\n"
            f"Connection: close\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        self.assertEqual(status_of(raw), 200, raw)
        envelope = orjson.loads(body_of(raw))
        self.assertEqual(envelope["code"], -400)
        self.assertEqual(orjson.loads(envelope["message"])["message"], "file size exceeds the maximum limit")


class Trickle(Protocol):
    """Sends a head, then a byte every ``every`` seconds, until the server answers and closes."""

    def __init__(self, head: bytes, body: bytes, every: float) -> None:
        self.head = head
        self.body = body
        self.every = every
        self.received = []
        self.done = defer.Deferred()
        self._call = None

    def connectionMade(self):
        self.transport.write(self.head)
        self._next(0)

    def _next(self, offset: int) -> None:
        if offset < len(self.body):
            self._call = reactor.callLater(self.every, self._send, offset)

    def _send(self, offset: int) -> None:
        self._call = None
        self.transport.write(self.body[offset:offset + 1])
        self._next(offset + 1)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.done.callback(b"".join(self.received))


class SlowBodyTests(DaemonOnSocket):
    """A body trickled over a real socket is answered 408 and its connection closed, lent or handed over."""

    async def test_trickled_bodies(self):
        """A byte a second to a public route: 408 once the grace is over, with Content-Length and chunked."""
        await self.start()
        body = b"z" * 100
        heads = {
            "lent (Content-Length)": (b"POST /nowhere HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n", body),
            "handed over (chunked)": (b"POST /nowhere HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n",
                                      b"".join(b"1\r\n%c\r\n" % byte for byte in body)),
        }
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        trickles = {name: Trickle(head, rest, 1.0) for name, (head, rest) in heads.items()}
        for trickle in trickles.values():
            await connectProtocol(endpoint, trickle)
        for name, trickle in trickles.items():
            raw = await trickle.done
            self.assertEqual(status_of(raw), 408, (name, raw))
            self.assertIn(b"request body not received in time", raw)


class SmugglingOnSocketTests(DaemonOnSocket):
    """Request smuggling shapes over a real socket: 400 and closed, through the dispatch channel and lent."""

    async def test_shapes(self):
        """Every shape, on a dispatch route and a management route: one 400, then the connection closes."""
        await self.start()
        for target in (f"/plugin/{TENANT}/dispatch/tool/invoke", f"/plugin/{TENANT}/management/install/identifiers"):
            for name, data in shapes(target.encode(), KEY.encode()).items():
                raw = await self.exchange(data)
                self.assertEqual(status_of(raw), 400, (target, name, raw))
                self.assertEqual(raw.count(b"HTTP/1.1 "), 1, (target, name, raw))


class AnsweredAtTheHeadTests(DaemonOnSocket):
    """Bodies nobody should read are refused once the head is in: the client sends only the head."""

    async def test_health_check_with_a_body(self):
        """/health/check with a body announced is 413 at once."""
        await self.start()
        raw = await self.exchange(b"GET /health/check HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(status_of(raw), 413, raw)
        raw = await self.exchange(b"POST /health/check HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1\r\nz\r\n")
        self.assertEqual(status_of(raw), 413, raw)

    async def test_unknown_hook(self):
        """An /e/ call for an unknown hook, a 10 MB body announced and not sent, is the endpoint's 404 at once."""
        await self.start()
        for framing in (b"Content-Length: 10000000\r\n", b"Transfer-Encoding: chunked\r\n"):
            raw = await self.exchange(b"POST /e/no-such-hook/x HTTP/1.1\r\nHost: d\r\n" + framing + b"\r\n")
            self.assertEqual(status_of(raw), 404, raw)
            self.assertIn(b"endpoint not found", raw)

    async def test_endpoint_body_over_the_limit(self):
        """An /e/ body announced over ENDPOINT_READ_LIMIT is 413 at once."""
        await self.start()
        raw = await self.exchange(b"POST /e/any/x HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n"
                                  % (16 * 1024 * 1024 + 1))
        self.assertEqual(status_of(raw), 413, raw)


class Idle(Protocol):
    """Connects, sends nothing, and notes when the server closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


class ConnectionCapOnSocketTests(DaemonOnSocket):
    """SERVER_MAX_CONNECTIONS over a real socket: over the cap a connection is closed at once, unanswered."""

    extra_environment = {"SERVER_MAX_CONNECTIONS": "3"}

    async def test_cap(self):
        """Three idle connections fill the daemon; a fourth is closed at once; once one leaves, requests are served."""
        await self.start()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        idle = [Idle() for _ in range(3)]
        for protocol in idle:
            await connectProtocol(endpoint, protocol)
        over = Idle()
        await connectProtocol(endpoint, over)
        self.assertEqual(await over.closed, b"")
        idle[0].transport.loseConnection()
        await idle[0].closed
        raw = b""
        for _ in range(50):
            raw = await self.exchange(b"GET /health/check HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
            if raw:
                break  # the daemon may see the close after our next connect
            await deferLater(reactor, 0.05)
        self.assertEqual(status_of(raw), 200, raw)
        for protocol in idle[1:]:
            protocol.transport.loseConnection()
            await protocol.closed
