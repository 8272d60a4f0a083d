"""
Daemon CPU per dispatch request over real loopback HTTP.

The server (this process, the real reactor) is RootResource + DispatchResource
over a Site as tap.py builds it (no form parsing, no access log); a scripted
FakeRuntime answers every tool/invoke with one chunk and end, one reactor
turn later.  A client subprocess sends keep-alive requests one at a time and
reads each chunked response to its end.  Printed: server CPU µs per request
(process_time, so the client's CPU is not counted) and the round trip p50.

Usage: .venv/bin/python bench/dispatch_loopback.py [requests] [--baseline]

``--baseline`` serves a bare leaf Resource answering the same one item
instead, for the share of twisted.web and the socket.
"""

from __future__ import annotations

import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLIENT = r'''
import socket, sys, time, statistics
port, n, request = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for i in range(n):
    t = time.perf_counter(); s.sendall(request); buf = b""
    while not buf.endswith(b"\r\n0\r\n\r\n"):
        buf += s.recv(65536)
    times.append(time.perf_counter() - t)
    if i == 499:
        sys.stdout.write("warm\n"); sys.stdout.flush()
times = sorted(times[500:])
print("p50_us", times[len(times) // 2] * 1e6, flush=True)
'''


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    baseline = "--baseline" in sys.argv
    from twisted.internet import reactor
    from twisted.internet.protocol import ProcessProtocol

    import dispatch_relay as shared
    from difydaemon.api import envelope
    from difydaemon.api.dispatch import DispatchResource
    from difydaemon.api.root import RequestCounter, RootResource, StaticJSONResource
    from difydaemon.management.installations import InstallationCache
    from difydaemon.persistence.memory import MemoryPersistence
    from difydaemon.runtimes.registry import RuntimeRegistry
    from difydaemon.testing.runtimes import FakeRuntime

    persistence = MemoryPersistence(reactor)
    persistence.install_plugin(shared.TENANT, shared.IDENTIFIER, "acme/echo", "local", "package", {}, {"tool": "echo"})
    registry = RuntimeRegistry(reactor)
    runtime = FakeRuntime(reactor, shared.IDENTIFIER, session_timeout=600.0)
    runtime.script("invoke_tool", [("stream", shared.CHUNK), ("end", {})])
    runtime.requests = _Discard()
    registry.register(runtime)
    dispatch = DispatchResource(reactor, InstallationCache(reactor, persistence), registry)
    root = RootResource(shared.KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, RequestCounter(),
                        dispatch=dispatch)
    if baseline:
        root = shared.Baseline()
    site = shared.NoLogSite(root, parsePOSTFormSubmission=False)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    request = shared.http_request(f"/plugin/{shared.TENANT}/dispatch/tool/invoke")
    marks = {}

    class Client(ProcessProtocol):
        output = b""

        def outReceived(self, data):
            if b"warm" in data and "start" not in marks:
                marks["start"] = time.process_time()
            self.output += data

        def processEnded(self, reason):
            marks["end"] = time.process_time()
            marks["p50"] = float(self.output.split(b"p50_us")[1].split()[0])
            reactor.stop()

    reactor.spawnProcess(Client(), sys.executable,
                         [sys.executable, "-c", CLIENT, str(port.getHost().port), str(n + 500), request.hex()],
                         env=dict(os.environ))
    reactor.run()
    cpu = (marks["end"] - marks["start"]) / n * 1e6
    what = "bare Resource" if baseline else "dispatch"
    print(f"cores={os.cpu_count()} requests={n} {what}: server CPU {cpu:.0f} us/request, round trip p50 {marks['p50']:.0f} us")


class _Discard(list):
    """A requests list that keeps only the last entry (the fake runtime records every request)."""

    def append(self, item):
        self[:] = [item]


if __name__ == "__main__":
    main()
