"""
What forwarding a dispatch call to the replica that holds a debug plugin
costs, against calling that replica directly.

Two server processes on loopback, each the daemon's real HTTP front (the
dispatch channel, the front door, DispatchResource):

- the *holder*, where the debug plugin is connected: an in-memory runtime
  that echoes at once (one chunk, end), so that what is measured is the
  daemon's path, not a plugin;
- the *front*, which does not hold the plugin and forwards each call to the
  holder (CallForwarder, kept-alive connections, hop header).

This process sends echo calls over one keep-alive connection to each,
interleaved (direct, forwarded, direct, ...), and prints p50/p99 of both
and of the difference.  Target: forwarding adds <= 1 ms p50.

Usage: .venv/bin/python bench/cluster_forwarding.py [calls]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import HTTPConnection, free_port, percentile  # noqa: E402

KEY = "bench-key"
TENANT = "0193a8a4-0000-7000-8000-000000000001"
PLUGIN_ID = "acme/echo"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
BODY = (
    b'{"user_id":"u","data":{"provider":"echo","tool":"echo","credentials":{},'
    b'"tool_parameters":{"text":"hello"}}}'
)


def serve(role: str, port: int, holder_port: int | None) -> None:
    """Run one replica's HTTP front until killed (in a child process)."""
    from twisted.internet import reactor
    from twisted.internet.defer import succeed

    from difydaemon.api import envelope
    from difydaemon.api.admission import BodyLimits, FrontDoor
    from difydaemon.api.dispatch import DispatchResource
    from difydaemon.api.dispatch_channel import DispatchGate
    from difydaemon.api.forwarding import CallForwarder
    from difydaemon.api.root import RequestCounter, RootResource, StaticJSONResource
    from difydaemon.api.site import DaemonSite
    from difydaemon.coordination.nodes import NodeInfo
    from difydaemon.management.installations import InstallationCache
    from difydaemon.persistence.memory import MemoryPersistence
    from difydaemon.runtimes.registry import RuntimeRegistry
    from difydaemon.testing.runtimes import FakeRuntime

    persistence = MemoryPersistence(reactor)
    persistence.install_plugin(TENANT, IDENTIFIER, PLUGIN_ID, "remote", "remote", {}, {"tool": "echo"})
    registry = RuntimeRegistry(reactor)
    forwarder = None
    if role == "holder":
        runtime = FakeRuntime(reactor, IDENTIFIER, runtime_type="remote")
        runtime.script(None, [("stream", {"type": "text", "message": {"text": "hello"}, "meta": None}), ("end", {})])
        registry.register(runtime)
    else:
        holder = NodeInfo(node_id="holder", host="127.0.0.1", port=holder_port, started_at=0.0, heartbeat_at=0.0)
        forwarder = CallForwarder(reactor, lambda identifier: succeed([holder]), "front", KEY)
    dispatch = DispatchResource(reactor, InstallationCache(reactor, persistence), registry, forwarder=forwarder)
    counter = RequestCounter()
    root = RootResource(KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, counter, dispatch=dispatch)
    site = DaemonSite(root, reactor=reactor, gate=DispatchGate(counter, dispatch),
                      front_door=FrontDoor(KEY.encode(), BodyLimits.for_packages(1 << 20, 1 << 20)))
    reactor.listenTCP(port, site, interface="127.0.0.1")
    reactor.run()


async def wait_ready(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


async def measure(calls: int, holder_port: int, front_port: int) -> None:
    direct = HTTPConnection(holder_port)
    forwarded = HTTPConnection(front_port)
    await direct.open()
    await forwarded.open()
    headers = {"X-Plugin-ID": PLUGIN_ID, "Content-Type": "application/json"}
    path = f"/plugin/{TENANT}/dispatch/tool/invoke"
    times = {"direct": [], "forwarded": []}
    for i in range(calls + calls // 10):
        for name, connection in (("direct", direct), ("forwarded", forwarded)):
            started = time.perf_counter()
            status, body = await connection.request("POST", path, BODY, headers)
            elapsed = time.perf_counter() - started
            if status != 200 or b'"hello"' not in body:
                raise SystemExit(f"{name} call failed: {status} {body[:300]!r}")
            # the first tenth warms connections and caches up
            if i >= calls // 10:
                times[name].append(elapsed * 1000)
    direct.close()
    forwarded.close()
    for name, values in times.items():
        print(f"{name:>9}: p50 {percentile(values, 0.5):.3f} ms  p99 {percentile(values, 0.99):.3f} ms"
              f"  ({len(values)} calls)")
    added = [f - d for d, f in zip(times["direct"], times["forwarded"])]
    print(f"{'added':>9}: p50 {percentile(added, 0.5):.3f} ms  p99 {percentile(added, 0.99):.3f} ms"
          f"  (forwarded - direct, call by call)")
    p50 = percentile(times["forwarded"], 0.5) - percentile(times["direct"], 0.5)
    print(f"forwarding adds {p50:.3f} ms p50 (target <= 1 ms): {'met' if p50 <= 1.0 else 'MISSED'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
        return
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    holder_port, front_port = free_port(), free_port()
    me = os.path.abspath(__file__)
    children = [
        subprocess.Popen([sys.executable, me, "--serve", "holder", str(holder_port)]),
        subprocess.Popen([sys.executable, me, "--serve", "front", str(front_port), str(holder_port)]),
    ]
    try:
        asyncio.run(wait_ready(holder_port))
        asyncio.run(wait_ready(front_port))
        asyncio.run(measure(calls, holder_port, front_port))
    finally:
        for child in children:
            child.terminate()
            child.wait()


if __name__ == "__main__":
    main()
