"""
Daemon CPU per dispatch request: DaemonSite with the lean dispatch channel
(as tap.py builds it) against the same DaemonSite serving through
twisted.web only, interleaved (A B A B ...).

- in process: keep-alive HTTP/1.1 requests over a StringTransport, a
  FakeRuntime answering one chunk and end through the real session table
  (no sockets, no plugin), the reactor's due calls run after each request;
- ``--loopback``: the real reactor, a client subprocess sending keep-alive
  requests one at a time over loopback TCP; server CPU per request
  (process_time) and the round trip p50.

Usage: .venv/bin/python bench/dispatch_channel.py [requests] [--loopback] [--rounds N]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

import dispatch_relay as shared  # noqa: E402
from difydaemon.api.admission import FrontDoor  # noqa: E402
from difydaemon.api.dispatch_channel import DispatchGate  # noqa: E402
from difydaemon.api.site import DaemonSite  # noqa: E402

PATH = f"/plugin/{shared.TENANT}/dispatch/tool/invoke"


def site_for(lean: bool, reactor):
    """The daemon's site over a FakeRuntime; (site, runtime)."""
    clock, runtime, root = shared.build()
    gate = DispatchGate(root._counter, root._dispatch) if lean else None
    front_door = FrontDoor(shared.KEY.encode())
    return DaemonSite(root, reactor=reactor, log_health=False, gate=gate, front_door=front_door), runtime


def in_process(n: int, lean: bool) -> float:
    """CPU µs per request."""
    from twisted.internet import reactor

    site, runtime = site_for(lean, reactor)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    data = shared.http_request(PATH)
    requests = runtime.requests
    chunk, raw = shared.CHUNK, shared.RAW
    for i in range(n + 200):
        if i == 200:
            start = time.process_time()
        protocol.dataReceived(data)
        sid = requests[-1]["session_id"]
        runtime.stream(sid, chunk, raw)
        runtime.end(sid)
        transport.clear()
        # as the running reactor would: due calls run, cancelled ones go
        reactor.runUntilCurrent()
        if len(requests) > 1000:
            requests.clear()
    elapsed = time.process_time() - start
    assert len(runtime.sessions) == 0
    return elapsed / n * 1e6


def loopback(n: int, lean: bool) -> tuple[float, float]:
    """(server CPU µs per request, round trip p50 µs), in a fresh process."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, str(n), "--serve", "lean" if lean else "web"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def serve(n: int, lean: bool) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import ProcessProtocol

    import dispatch_loopback

    site, runtime = site_for(lean, reactor)
    runtime.script("invoke_tool", [("stream", shared.CHUNK), ("end", {})])
    runtime.requests = dispatch_loopback._Discard()
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    request = shared.http_request(PATH)
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
                         [sys.executable, "-c", dispatch_loopback.CLIENT, str(port.getHost().port), str(n + 500),
                          request.hex()],
                         env=dict(os.environ))
    reactor.run()
    print((marks["end"] - marks["start"]) / n * 1e6, marks["p50"])


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--serve" in sys.argv:
        serve(int(args[0]), args[1] == "lean")
        return
    n = int(args[0]) if args else 20000
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    lean, web = [], []
    if "--loopback" in sys.argv:
        for _ in range(rounds):
            web.append(loopback(n, False))
            lean.append(loopback(n, True))
        w_cpu, l_cpu = statistics.median(c for c, _ in web), statistics.median(c for c, _ in lean)
        w_p50, l_p50 = statistics.median(p for _, p in web), statistics.median(p for _, p in lean)
        print(f"cores={os.cpu_count()} loopback requests={n} rounds={rounds} (medians): "
              f"twisted.web {w_cpu:.0f} us CPU/request p50 {w_p50:.0f} us; "
              f"lean channel {l_cpu:.0f} us CPU/request p50 {l_p50:.0f} us; "
              f"CPU ratio {l_cpu / w_cpu:.2f}")
        return
    for _ in range(rounds):
        web.append(in_process(n, False))
        lean.append(in_process(n, True))
    w, lc = statistics.median(web), statistics.median(lean)
    print(f"cores={os.cpu_count()} in-process requests={n} rounds={rounds} (medians): "
          f"twisted.web {w:.1f} us/request, lean channel {lc:.1f} us/request, saved {w - lc:.1f} us")


if __name__ == "__main__":
    main()
