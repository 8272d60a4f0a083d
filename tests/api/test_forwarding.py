"""
Forwarding dispatch and endpoint calls to the replica holding a debug plugin, over real
loopback sockets: a "front" replica without the plugin and a "holder"
replica whose debug runtime is a FakeRuntime the test drives, each behind a
real DaemonSite (the dispatch channel, or twisted.web alone).
"""

from __future__ import annotations

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.resource import Resource
from twisted.web.server import Site

from difydaemon.api import envelope
from difydaemon.api.admission import BodyLimits, FrontDoor
from difydaemon.api.dispatch import DispatchResource
from difydaemon.api.dispatch_channel import DispatchGate
from difydaemon.api.endpoint import EndpointResource
from difydaemon.api.forwarding import HOP_HEADER, CallForwarder
from difydaemon.api.root import RequestCounter, RootResource, StaticJSONResource
from difydaemon.api.site import DaemonSite
from difydaemon.coordination.nodes import NodeInfo
from difydaemon.management.installations import InstallationCache
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.http import RawHTTPClient, http_chunks
from difydaemon.testing.runtimes import FakeRuntime
from tests.test_tap import free_port

KEY = "test-server-key"
TENANT = "0193a8a4-0000-7000-8000-000000000001"
PLUGIN_ID = "acme/echo"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
TOOL_DATA = {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}


def _sleep(seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class Replica:
    """One replica's dispatch path behind a real listening site."""

    def __init__(self, test, node_id: str, holders=None, web_only: bool = False, **forwarder_options) -> None:
        self.node_id = node_id
        self.persistence = MemoryPersistence(reactor)
        test.successResultOf(self.persistence.install_plugin(
            TENANT, IDENTIFIER, PLUGIN_ID, "remote", "remote", {}, {"tool": "echo"}))
        self.registry = RuntimeRegistry(reactor)
        self.forwarder = None
        if holders is not None:
            self.forwarder = CallForwarder(reactor, holders, node_id, KEY, **forwarder_options)
            test.addCleanup(self.forwarder.pool.closeCachedConnections)
        self.dispatch = DispatchResource(reactor, InstallationCache(reactor, self.persistence), self.registry,
                                         runtime_wait=0.2, forwarder=self.forwarder)
        counter = RequestCounter()
        root = RootResource(KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, counter,
                            dispatch=self.dispatch)
        site = DaemonSite(
            root, reactor=reactor, gate=None if web_only else DispatchGate(counter, self.dispatch),
            front_door=FrontDoor(KEY.encode(), BodyLimits.for_packages(1 << 20, 1 << 20)),
        )
        #: the server side of every connection accepted
        self.connections = []
        build = site.buildProtocol

        def build_protocol(addr):
            protocol = build(addr)
            self.connections.append(protocol)
            return protocol

        site.buildProtocol = build_protocol
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)
        self.node = NodeInfo(node_id=node_id, host="127.0.0.1", port=self.port.getHost().port,
                             started_at=0.0, heartbeat_at=0.0)

    def hold(self):
        """Connect the debug plugin here: a FakeRuntime, returned."""
        runtime = FakeRuntime(reactor, IDENTIFIER, runtime_type="remote")
        self.registry.register(runtime)
        return runtime


class ForwardingTests(AsyncTestCase):
    """Calls for a debug plugin held by another replica."""

    timeout = 30

    async def connect(self, replica) -> RawHTTPClient:
        client = RawHTTPClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", replica.port.getHost().port), client)
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        return client

    async def post(self, replica, extra_headers: bytes = b"") -> RawHTTPClient:
        client = await self.connect(replica)
        body = orjson.dumps({"user_id": "u1", "data": TOOL_DATA})
        client.transport.write(
            b"POST /plugin/%s/dispatch/tool/invoke HTTP/1.1\r\nHost: x\r\nX-Api-Key: %s\r\n"
            b"X-Plugin-ID: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (TENANT.encode(), KEY.encode(), PLUGIN_ID.encode(), len(body), extra_headers, body)
        )
        return client

    async def wait_session(self, runtime) -> str:
        for _ in range(500):
            if runtime.requests:
                return runtime.last_session_id
            await _sleep(0.01)
        self.fail("no session was opened on the holder")

    async def _streams_chunk_by_chunk(self, web_only: bool) -> None:
        holder = Replica(self, "holder")
        runtime = holder.hold()
        front = Replica(self, "front", holders=lambda identifier: succeed([holder.node]), web_only=web_only)
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        runtime.stream(session_id, {"type": "text", "message": {"text": "one"}, "meta": None})
        # the first item arrives while the plugin has not sent the second
        await client.until(b'"one"')
        self.assertNotIn(b'"two"', client.received)
        runtime.stream(session_id, {"type": "text", "message": {"text": "two"}, "meta": None})
        runtime.end(session_id)
        await client.until(b"\r\n0\r\n\r\n")
        head, _, body = client.received.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertIn(b"text/event-stream", head.lower())
        items = [orjson.loads(line[len(b"data: "):]) for line in b"".join(http_chunks(body)).split(b"\n\n") if line]
        self.assertEqual([item["data"]["message"]["text"] for item in items], ["one", "two"])
        request = runtime.requests[0]
        self.assertEqual(request["data"]["tool"], "echo")

    async def test_streams_chunk_by_chunk_through_the_dispatch_channel(self):
        """Through the dispatch channel, each chunk reaches the caller before the plugin sends the next."""
        await self._streams_chunk_by_chunk(web_only=False)

    async def test_streams_chunk_by_chunk_through_twisted_web(self):
        """Through twisted.web, each chunk reaches the caller before the plugin sends the next."""
        await self._streams_chunk_by_chunk(web_only=True)

    async def test_forwarded_call_carries_hop_header_and_key(self):
        """The holder receives the daemon's key and the hop header naming the front replica."""
        seen = []
        holder = Replica(self, "holder")
        runtime = holder.hold()
        original = holder.dispatch.render

        def render(request):
            seen.append((request.requestHeaders.getRawHeaders(b"x-api-key"),
                         request.requestHeaders.getRawHeaders(HOP_HEADER)))
            return original(request)

        holder.dispatch.render = render
        front = Replica(self, "front", holders=lambda identifier: succeed([holder.node]))
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        runtime.end(session_id)
        await client.until(b"\r\n0\r\n\r\n")
        self.assertEqual(seen, [([KEY.encode()], [b"front"])])

    async def test_forward_loop_refused(self):
        """A call carrying the hop header for a plugin not held here fails at once and is not forwarded again."""
        asked = []
        front = Replica(self, "b", holders=lambda identifier: asked.append(identifier) or succeed([]))
        client = await self.post(front, HOP_HEADER + b": a\r\n")
        await client.until(b"}")
        self.assertIn(b"500 Internal Server Error", client.received)
        self.assertIn(b"not forwarded again", client.received)
        self.assertIn(b"forwarded by node a", client.received)
        self.assertEqual(asked, [])

    async def test_holder_dying_mid_stream_ends_with_an_error_item(self):
        """The holder's connection breaking mid-stream ends the caller's stream with an error item, not a hang."""
        holder = Replica(self, "holder")
        runtime = holder.hold()
        front = Replica(self, "front", holders=lambda identifier: succeed([holder.node]))
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        runtime.stream(session_id, {"type": "text", "message": {"text": "one"}, "meta": None})
        await client.until(b'"one"')
        # the holder's process dies: its connections are cut
        for connection in holder.connections:
            connection.transport.abortConnection()
        await client.until(b"\r\n0\r\n\r\n")
        self.assertIn(b"went away mid-stream", client.received)
        self.assertIn(b"PluginDaemonInternalServerError", client.received)

    async def test_unreachable_holder_skipped_then_clear_error(self):
        """A stale claim (nothing listening) is skipped for the next holder; with none left the caller is told at once."""
        dead = NodeInfo(node_id="dead", host="127.0.0.1", port=free_port(), started_at=0.0, heartbeat_at=0.0)
        holder = Replica(self, "holder")
        runtime = holder.hold()
        front = Replica(self, "front", holders=lambda identifier: succeed([dead, holder.node]))
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        runtime.end(session_id)
        await client.until(b"\r\n0\r\n\r\n")
        self.assertIn(b"200 OK", client.received)

        alone = Replica(self, "alone", holders=lambda identifier: succeed([dead]))
        client = await self.post(alone)
        await client.until(b"}")
        self.assertIn(b"500 Internal Server Error", client.received)
        self.assertIn(b"cannot be reached", client.received)

    async def test_read_timeout(self):
        """A holder that accepts the call and then says nothing is given up after the read timeout."""
        holder = Replica(self, "holder")
        runtime = holder.hold()
        front = Replica(self, "front", holders=lambda identifier: succeed([holder.node]), read_timeout=0.5)
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        self.addCleanup(runtime.end, session_id)
        await client.until(b"}")
        self.assertIn(b"500 Internal Server Error", client.received)
        self.assertIn(b"no answer for 0.5 s", client.received)

    async def test_no_holder_serves_here(self):
        """With no other holder, the call waits for the plugin here (a debug plugin reconnecting) as before."""
        front = Replica(self, "front", holders=lambda identifier: succeed([]))
        client = await self.post(front)
        await _sleep(0.05)
        runtime = front.hold()
        session_id = await self.wait_session(runtime)
        runtime.end(session_id)
        await client.until(b"\r\n0\r\n\r\n")
        self.assertIn(b"200 OK", client.received)

    async def test_caller_leaving_stops_the_forwarded_call(self):
        """A caller that disconnects mid-stream makes the front cut the forwarded call, and the holder abandons the session."""
        holder = Replica(self, "holder")
        runtime = holder.hold()
        front = Replica(self, "front", holders=lambda identifier: succeed([holder.node]))
        client = await self.post(front)
        session_id = await self.wait_session(runtime)
        runtime.stream(session_id, {"type": "text", "message": {"text": "one"}, "meta": None})
        await client.until(b'"one"')
        client.transport.loseConnection()
        for _ in range(500):
            if not runtime.is_open(session_id):
                break
            await _sleep(0.01)
        self.assertFalse(runtime.is_open(session_id))


class RecordingEndpoint(Resource):
    """The holder's ``/e/`` as the front sees it: records each call and answers 201 with a header of its own."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def render(self, request):
        self.seen.append((request.method, request.uri, request.requestHeaders, request.content.read()))
        request.setResponseCode(201)
        request.setHeader(b"x-plugin-header", b"yes")
        request.setHeader(b"content-type", b"text/plain")
        return b"made by the plugin"


class EndpointForwardingTests(AsyncTestCase):
    """Public endpoint calls for a debug plugin held by another replica."""

    timeout = 30

    def front(self, holders):
        persistence = MemoryPersistence(reactor)
        self.successResultOf(persistence.install_plugin(
            TENANT, IDENTIFIER, PLUGIN_ID, "remote", "remote", {}, {}))
        endpoint = self.successResultOf(persistence.create_endpoint("e1", TENANT, "u1", PLUGIN_ID, "hook", {}))
        forwarder = CallForwarder(reactor, holders, "front", KEY)
        self.addCleanup(forwarder.pool.closeCachedConnections)
        resource = EndpointResource(reactor, persistence, InstallationCache(reactor, persistence),
                                    RuntimeRegistry(reactor), None, runtime_wait=0.2, forwarder=forwarder)
        root = RootResource(KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, RequestCounter(),
                            endpoint=resource)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, endpoint.hook_id

    def holder(self):
        recorder = RecordingEndpoint()
        root = Resource()
        root.putChild(b"e", recorder)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        node = NodeInfo(node_id="holder", host="127.0.0.1", port=port.getHost().port, started_at=0.0,
                        heartbeat_at=0.0)
        return recorder, node

    async def call(self, port: int, request: bytes) -> bytes:
        client = RawHTTPClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(request)
        await client.closed
        return client.received

    async def test_endpoint_call_forwarded_whole(self):
        """Method, path, query, headers and body reach the holder (Host as X-Original-Host, with the hop header); its status, headers and body come back."""
        recorder, node = self.holder()
        port, hook_id = self.front(lambda identifier: succeed([node]))
        answer = await self.call(port, (
            b"PUT /e/%s/some/path?x=1 HTTP/1.1\r\nHost: public.example\r\nX-Custom: a\r\n"
            b"Content-Length: 7\r\nConnection: close\r\n\r\npayload" % hook_id.encode()))
        self.assertIn(b"201 Created", answer)
        self.assertIn(b"X-Plugin-Header: yes", answer)
        self.assertEqual(b"".join(http_chunks(answer.partition(b"\r\n\r\n")[2])), b"made by the plugin")
        [(method, uri, headers, body)] = recorder.seen
        self.assertEqual((method, uri, body), (b"PUT", b"/e/%s/some/path?x=1" % hook_id.encode(), b"payload"))
        self.assertEqual(headers.getRawHeaders(b"x-custom"), [b"a"])
        self.assertEqual(headers.getRawHeaders(b"x-original-host"), [b"public.example"])
        self.assertEqual(headers.getRawHeaders(HOP_HEADER), [b"front"])

    async def test_endpoint_forward_loop_refused(self):
        """An endpoint call that was already forwarded once is refused, not forwarded again."""
        recorder, node = self.holder()
        port, hook_id = self.front(lambda identifier: succeed([node]))
        answer = await self.call(port, (
            b"GET /e/%s/x HTTP/1.1\r\nHost: h\r\n%s: a\r\nConnection: close\r\n\r\n" % (hook_id.encode(), HOP_HEADER)))
        self.assertIn(b"500 Internal Server Error", answer)
        self.assertIn(b"not forwarded again", answer)
        self.assertEqual(recorder.seen, [])
