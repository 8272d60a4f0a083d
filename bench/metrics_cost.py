"""
What metrics cost the dispatch path: two daemons, ``PROMETHEUS_ENABLED=true``
and ``false``, each with the echo plugin, measured in interleaved rounds
(on, off, on, off ...) in one run:

- echo round trip, one in flight: p50 / p99 of each;
- echo, N in flight: calls/s of each, and the daemon's own CPU time per call
  (user + system of the daemon process, not its plugin), the figure the
  metrics add to;
- in process, the counting a dispatch call does (one invocation meter opened
  and finished, one HTTP request counted), in µs per call;
- in process, the whole dispatch path (the daemon's site and dispatch
  channel over a StringTransport, a FakeRuntime answering one chunk, as
  ``bench/dispatch_channel.py`` runs it) with metrics on and off,
  interleaved: CPU µs per request, and the per-round difference;
- one scrape of ``/metrics``.

``--control`` runs both daemons with metrics off: the differences it prints
are the noise floor of the machine at that moment (other work on it shows
there, not in the counting).

``--tracing`` measures OpenTelemetry instead (needs the ``otel`` extra): the
same figures with ``ENABLE_OTEL=true`` against ``false`` (metrics on in
both), requests sampled at ``--sampling-rate`` (1.0) and their spans
(request, session) exported over OTLP/HTTP to a sink in this process that
answers 200; in process, the exporter drops the spans, but the batch
processor's thread still runs and its CPU is counted.

Usage: ``python bench/metrics_cost.py [--rounds 5] [--calls 300] [--inflight 20] [--burst 2000]
[--control | --tracing [--sampling-rate 1.0]]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import timeit
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import daemon_latency, daemon_throughput  # noqa: E402
from bench import dispatch_relay as shared  # noqa: E402
from bench.harness import Daemon, HTTPConnection, cpu_seconds, percentile  # noqa: E402
from difydaemon.observability.metrics import DaemonMetrics  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402


def counting_cost(repeats: int = 200_000) -> float:
    """µs of the counting one dispatch call does with metrics on."""
    metrics = DaemonMetrics(time.time)

    def one_call():
        metrics.invocation("acme/echo", "tool", "local", "invoke_tool").finish("success")
        metrics.http_request("POST", "/plugin/:tenant_id/dispatch/tool/invoke", 200, 0.001)

    one_call()
    return min(timeit.repeat(one_call, number=repeats, repeat=5)) / repeats * 1e6


def discarding_tracing(sampling_rate: float = 1.0):
    """A Tracing that samples at ``sampling_rate`` and exports to nowhere (through the batch processor)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from difydaemon.config import load_config
    from difydaemon.observability.otel import build_tracing

    class Discard(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    environ = {
        "DIFY_INNER_API_URL": "http://127.0.0.1:5001", "DIFY_INNER_API_KEY": "k", "SERVER_KEY": "k", "PLATFORM": "local",
        "PLUGIN_REMOTE_INSTALLING_ENABLED": "false", "ENABLE_OTEL": "true",
        # every span exported, none dropped for a full queue: the whole cost
        "OTEL_MAX_QUEUE_SIZE": "100000",
        "OTEL_SAMPLING_RATE": str(sampling_rate),
    }
    return build_tracing(load_config(environ).observability, exporter=Discard())


def dispatch_path_cost(requests: int, enabled: bool, tracing: bool = False, sampling_rate: float = 1.0) -> float:
    """
    CPU µs per dispatch request through the daemon's site, in process:
    ``enabled`` turns on metrics, or with ``tracing`` OpenTelemetry (metrics on either way).
    """
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from difydaemon.api.admission import FrontDoor
    from difydaemon.api.dispatch_channel import DispatchGate
    from difydaemon.api.site import DaemonSite

    _, runtime, root = shared.build()
    metrics = DaemonMetrics(reactor.seconds) if enabled or tracing else None
    spans = discarding_tracing(sampling_rate) if tracing and enabled else None
    root._dispatch.metrics = metrics
    root._dispatch.tracing = spans
    site = DaemonSite(
        root, reactor=reactor, log_health=False, gate=DispatchGate(root._counter, root._dispatch, metrics, spans),
        front_door=FrontDoor(shared.KEY.encode()), metrics=metrics, tracing=spans,
    )
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    data = shared.http_request(f"/plugin/{shared.TENANT}/dispatch/tool/invoke")
    sent = runtime.requests
    for i in range(requests + 200):
        if i == 200:
            start = time.process_time()
        protocol.dataReceived(data)
        session_id = sent[-1]["session_id"]
        runtime.stream(session_id, shared.CHUNK, shared.RAW)
        runtime.end(session_id)
        transport.clear()
        reactor.runUntilCurrent()
        if len(sent) > 1000:
            sent.clear()
    if spans is not None:
        # the spans still queued are exported in this run, on this process's CPU
        spans.shutdown()
    return (time.process_time() - start) / requests * 1e6


def in_process(rounds: int, requests: int = 20000, tracing: bool = False, sampling_rate: float = 1.0) -> None:
    """Print the whole dispatch path's CPU per request with metrics (or tracing) on and off, interleaved."""
    on, off = [], []
    for _ in range(rounds):
        off.append(dispatch_path_cost(requests, False, tracing))
        on.append(dispatch_path_cost(requests, True, tracing, sampling_rate))
    paired = [a - b for a, b in zip(on, off)]
    what = "tracing" if tracing else "metrics"
    print(
        f"dispatch path in process: {what} off {median(off):.1f} µs/request, on {median(on):.1f} µs/request; "
        f"on adds {median(paired):+.1f} µs (median of per-round differences, range "
        f"{min(paired):+.1f} .. {max(paired):+.1f}; {rounds} interleaved rounds of {requests} requests)"
    )


class Side:
    """One daemon, its connections and its samples."""

    def __init__(self, name: str, environ: dict, prepared: str) -> None:
        self.name = name
        self.daemon = Daemon(extra_env=environ, prepared_venvs=prepared)
        self.latency: list[float] = []
        self.throughput: list[float] = []
        self.cpu_per_call: list[float] = []

    async def start(self, inflight: int) -> None:
        await self.daemon.wait_ready()
        await self.daemon.upload_install(build_package(echo_plugin_files()))
        self.connection = HTTPConnection(self.daemon.port)
        await self.connection.open()
        self.pool = []
        for _ in range(inflight):
            connection = HTTPConnection(self.daemon.port)
            await connection.open()
            self.pool.append(connection)
        await daemon_latency(self.connection, 50)

    async def round(self, calls: int, burst: int) -> None:
        self.latency += await daemon_latency(self.connection, calls)
        pid = self.daemon.process.pid
        before = sum(cpu_seconds(pid))
        self.throughput.append(await daemon_throughput(self.pool, burst))
        self.cpu_per_call.append((sum(cpu_seconds(pid)) - before) / burst * 1e6)

    def stop(self) -> None:
        for connection in self.pool + [self.connection]:
            connection.close()
        self.daemon.stop()


def otlp_sink() -> str:
    """An OTLP/HTTP endpoint in a thread of this process that reads each export and answers 200; its base URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def sides(args) -> tuple[tuple, tuple]:
    """((name, environment) of the measured daemon, the same of its baseline)."""
    if args.tracing:
        traced = {"ENABLE_OTEL": "true", "OTLP_BASE_ENDPOINT": otlp_sink(), "OTEL_SAMPLING_RATE": str(args.sampling_rate)}
        return ("tracing on", traced), ("tracing off", {"ENABLE_OTEL": "false"})
    off = ("metrics off", {"PROMETHEUS_ENABLED": "false"})
    if args.control:
        return ("metrics off (control)", off[1]), off
    return ("metrics on", {"PROMETHEUS_ENABLED": "true"}), off


async def main(args):
    print(f"cores: {os.cpu_count()}")
    if not args.tracing:
        print(f"counting per dispatch call (in process): {counting_cost():.2f} µs")
    in_process(args.rounds, tracing=args.tracing, sampling_rate=args.sampling_rate)
    prepared = tempfile.mkdtemp(prefix="difydaemon-bench-prepared-")
    (on_name, on_environ), (off_name, off_environ) = sides(args)
    on = Side(on_name, on_environ, prepared)
    off = Side(off_name, off_environ, prepared)
    try:
        for side in (on, off):
            await side.start(args.inflight)
        for _ in range(args.rounds):
            for side in (on, off):
                await side.round(args.calls, args.burst)
        for side in (on, off):
            print(
                f"{side.name}: 1 in flight p50 {percentile(side.latency, 0.5) * 1e3:.3f} ms "
                f"p99 {percentile(side.latency, 0.99) * 1e3:.3f} ms; "
                f"{args.inflight} in flight {median(side.throughput):.0f} calls/s, "
                f"daemon CPU {median(side.cpu_per_call):.1f} µs/call"
            )
        # paired by round: the two sides of one round ran back to back, under the same load
        paired = [a - b for a, b in zip(on.cpu_per_call, off.cpu_per_call)]
        added_p50 = (percentile(on.latency, 0.5) - percentile(off.latency, 0.5)) * 1e6
        print(
            f"{on.name} adds: {median(paired):+.1f} µs of daemon CPU per call (median of per-round differences, "
            f"which range {min(paired):+.1f} .. {max(paired):+.1f}), {added_p50:+.0f} µs p50 "
            f"({args.rounds} interleaved rounds; {args.calls} sequential calls and "
            f"{args.burst} calls with {args.inflight} in flight each round)"
        )
        if not args.control and not args.tracing:
            start = time.perf_counter()
            status, page = await on.connection.request("GET", "/metrics", b"", {})
            assert status == 200, status
            print(f"one scrape of /metrics: {(time.perf_counter() - start) * 1e3:.1f} ms, {len(page)} bytes")
    finally:
        on.stop()
        off.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=20)
    parser.add_argument("--burst", type=int, default=2000)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--control", action="store_true", help="both daemons without metrics: the noise floor")
    choice.add_argument("--tracing", action="store_true", help="ENABLE_OTEL on against off, instead of metrics")
    parser.add_argument("--sampling-rate", type=float, default=1.0,
                        help="OTEL_SAMPLING_RATE of the traced side (the calls carry no traceparent)")
    asyncio.run(main(parser.parse_args()))
