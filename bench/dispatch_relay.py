"""
CPU cost of the dispatch path, in process (no sockets, no plugin).

Drives a twisted.web Site (``parsePOSTFormSubmission=False``, no access log,
as tap.py builds it) over a StringTransport with keep-alive HTTP/1.1
requests; a FakeRuntime plays the plugin, delivering through the real
session table.  Prints, for the same Site:

- ``baseline``: a bare leaf Resource at the root answering one fixed SSE
  item for the same request (what any twisted.web answer costs);
- ``dispatch``: POST /plugin/<tenant>/dispatch/tool/invoke, one chunk, end;
- the daemon's own share (dispatch - baseline);
- relay capacity of one long stream, chunks delivered 10 per reactor turn,
  with write coalescing on and off.

Usage: .venv/bin/python bench/dispatch_relay.py [requests]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from difydaemon.api import envelope, sse  # noqa: E402
from difydaemon.api.dispatch import DispatchResource  # noqa: E402
from difydaemon.api.root import RequestCounter, RootResource, StaticJSONResource  # noqa: E402
from difydaemon.management.installations import InstallationCache  # noqa: E402
from difydaemon.persistence.memory import MemoryPersistence  # noqa: E402
from difydaemon.runtimes.registry import RuntimeRegistry  # noqa: E402
from difydaemon.testing.runtimes import FakeRuntime  # noqa: E402

KEY = "bench-key"
TENANT = "0193a8a4-0000-7000-8000-000000000001"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
CHUNK = {"type": "text", "message": {"text": "hello"}, "meta": None}
RAW = orjson.dumps(CHUNK)
BODY = orjson.dumps(
    {
        "user_id": "u",
        "conversation_id": None,
        "app_id": None,
        "message_id": None,
        "data": {"provider": "echo", "tool": "echo", "credentials": {}, "credential_type": "api-key",
                 "tool_parameters": {"text": "hello"}},
    }
)


def http_request(path: str) -> bytes:
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost:5002\r\nAccept-Encoding: gzip, deflate, br\r\n"
        b"X-Api-Key: " + KEY.encode() + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )


class Baseline(Resource):
    isLeaf = True
    item = sse.success_item(RAW)

    def render_POST(self, request):
        # chunked, like the dispatch stream
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(self.item)
        request.finish()
        return NOT_DONE_YET


def build(coalesce: bool = True):
    # the real reactor's timers (a heap), not Clock's sorted list; the
    # reactor is never run: due calls are run with runUntilCurrent()
    from twisted.internet import reactor as clock
    persistence = MemoryPersistence(clock)
    persistence.install_plugin(TENANT, IDENTIFIER, "acme/echo", "local", "package", {}, {"tool": "echo"})
    registry = RuntimeRegistry(clock)
    runtime = FakeRuntime(clock, IDENTIFIER, session_timeout=600.0)
    registry.register(runtime)
    dispatch = DispatchResource(clock, InstallationCache(clock, persistence), registry, coalesce_writes=coalesce)
    root = RootResource(KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, RequestCounter(),
                        dispatch=dispatch)
    return clock, runtime, root


class NoLogSite(Site):
    def log(self, request):
        pass


def connect(root, clock):
    site = NoLogSite(root, reactor=clock, parsePOSTFormSubmission=False)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def per_request(n: int, dispatch: bool) -> float:
    """CPU µs per request."""
    clock, runtime, root = build()
    path = f"/plugin/{TENANT}/dispatch/tool/invoke"
    if not dispatch:
        root = Baseline()
    protocol, transport = connect(root, clock)
    data = http_request(path)
    sessions = runtime.sessions
    # warm-up (fills the installation cache)
    for _ in range(200):
        protocol.dataReceived(data)
        if dispatch:
            sid = runtime.last_session_id
            runtime.stream(sid, CHUNK, RAW)
            runtime.end(sid)
        transport.clear()
    runtime.requests.clear()
    start = time.process_time()
    for _ in range(n):
        protocol.dataReceived(data)
        if dispatch:
            sid = runtime.requests[-1]["session_id"]
            runtime.stream(sid, CHUNK, RAW)
            runtime.end(sid)
        transport.clear()
        runtime.requests.clear() if len(runtime.requests) > 1000 else None
    elapsed = time.process_time() - start
    assert len(sessions) == 0
    return elapsed / n * 1e6


def relay(chunks: int, coalesce: bool) -> float:
    """Chunks per CPU second through one stream, 10 chunks per reactor turn."""
    clock, runtime, root = build(coalesce)
    protocol, transport = connect(root, clock)
    protocol.dataReceived(http_request(f"/plugin/{TENANT}/dispatch/tool/invoke"))
    sid = runtime.last_session_id
    stream = runtime.stream
    start = time.process_time()
    for _ in range(chunks // 10):
        for _ in range(10):
            stream(sid, CHUNK, RAW)
        clock.runUntilCurrent()
        transport.clear()
    elapsed = time.process_time() - start
    runtime.end(sid)
    return chunks / elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = 5
    base, disp = [], []
    for _ in range(rounds):  # interleaved A B A B
        base.append(per_request(n, False))
        disp.append(per_request(n, True))
    on, off = [], []
    for _ in range(rounds):
        on.append(relay(200000, True))
        off.append(relay(200000, False))
    b, d = statistics.median(base), statistics.median(disp)
    print(f"cores={os.cpu_count()} requests={n} rounds={rounds} (medians)")
    print(f"per request CPU: baseline Resource {b:.1f} us, dispatch {d:.1f} us, dispatch own share {d - b:.1f} us")
    print(f"relay one stream: coalesced {statistics.median(on):,.0f} chunks/s, "
          f"one write per chunk {statistics.median(off):,.0f} chunks/s")


if __name__ == "__main__":
    main()
