"""
Echo through a serverless daemon against the same SDK function called
directly over HTTP, and the same plugin on a local daemon, interleaved in
one run:

- echo round trip, one in flight: p50 / p99 of each path;
- echo, N in flight: calls/s of each path.

The direct client re-arms TCP_QUICKACK as the daemon's function client does
(without it every direct call waits ~40 ms for a delayed ACK). The function is the echo plugin's SDK in ``INSTALL_METHOD=serverless`` mode
on loopback (its venv is the one a local daemon built for the same
package); a fake SRI connector in a child process hands its URL to the
serverless daemon's install.

``--baseline DIR`` adds the serverless daemon of another checkout (say
``mkdir /tmp/before && git archive main | tar -x -C /tmp/before``) on the same function, so a change is
measured before and after in one interleaved run.

Usage: ``python bench/serverless_overhead.py [--rounds 3] [--calls 300] [--inflight 50] [--burst 2000]
[--baseline DIR] [--profile FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import ECHO, HEADERS, PATH, dispatch_body  # noqa: E402
from bench.harness import REPO, Daemon, HTTPConnection, free_port, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

CONNECTOR_KEY = "bench-connector-key"
CONNECTOR = """
import sys
from twisted.internet import reactor
from twisted.internet.defer import succeed
from difydaemon.runtimes.serverless.connector import FunctionInfo
from difydaemon.testing.sri import FakeSRIConnector
url, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
connector = FakeSRIConnector(reactor, key, lambda request, emit: succeed(FunctionInfo("echo", url)))
connector.listen(port)
reactor.run()
"""


def invoke_body(session_id: str = "bench") -> bytes:
    return json.dumps(
        {
            "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
            "endpoint_id": None, "context": None, "event": "request", "data": ECHO,
        },
        separators=(",", ":"),
    ).encode()


class QuickAckConnection(HTTPConnection):
    """
    The harness's client, re-arming TCP_QUICKACK at every read as the
    daemon's function client does: the SDK writes each event and its blank
    line as two chunks, and a delayed ACK would hold the second ~40 ms.
    """

    async def open(self):
        await super().open()
        sock = self.writer.get_extra_info("socket")
        quick = getattr(socket, "TCP_QUICKACK", None)

        def rearm():
            if quick is not None:
                sock.setsockopt(socket.IPPROTO_TCP, quick, 1)

        reader = self.reader
        readline, readexactly = reader.readline, reader.readexactly

        async def quick_readline():
            line = await readline()
            rearm()
            return line

        async def quick_readexactly(n):
            data = await readexactly(n)
            rearm()
            return data

        reader.readline, reader.readexactly = quick_readline, quick_readexactly


def cpu_seconds(pid):
    """``(user, system)`` CPU seconds of process ``pid`` so far (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class Path:
    """
    One way to make an echo call: ``call(connection)`` checks the answer.
    ``pid`` is the daemon whose CPU a call costs (None for the function).
    """

    def __init__(self, name, port, path, body, headers, stream_marker, pid=None):
        self.name, self.port, self.path, self.body, self.headers = name, port, path, body, headers
        self.marker = stream_marker
        self.pid = pid

    async def call(self, connection):
        body, headers = self.body, self.headers
        if body is None:
            # a function call of its own: each session id once, as the daemon sends them
            session_id = str(uuid.uuid4())
            body, headers = invoke_body(session_id), dict(headers, **{"Dify-Plugin-Session-ID": session_id})
        status, reply = await connection.request("POST", self.path, body, headers)
        assert status == 200 and reply.count(self.marker) == 2, (self.name, status, reply[:300])

    async def connections(self, count):
        out = []
        for _ in range(count):
            connection = (QuickAckConnection if self.body is None else HTTPConnection)(self.port)
            await connection.open()
            out.append(connection)
        return out


async def latency(path, connection, calls):
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await path.call(connection)
        samples.append(time.perf_counter() - start)
    return samples


async def throughput(path, connections, total):
    remaining = [total]

    async def worker(connection):
        while remaining[0] > 0:
            remaining[0] -= 1
            await path.call(connection)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return total / (time.perf_counter() - start)


async def wait_healthy(port, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = HTTPConnection(port)
            await connection.open()
            status, _ = await connection.request("GET", "/health")
            connection.close()
            if status == 200:
                return
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing healthy on port {port}")


async def main(args):
    print(f"cores: {os.cpu_count()}")
    children = []
    if args.profile:
        os.environ["BENCH_TWISTD_ARGS"] = f"--profile={args.profile}.local --profiler=cprofile --savestats"
    local = Daemon()
    os.environ.pop("BENCH_TWISTD_ARGS", None)
    serverless = baseline = None
    try:
        await local.wait_ready()
        identifier = await local.upload_install(build_package(echo_plugin_files()))
        working = os.path.abspath(working_dir_for(local.working, identifier))
        function_port, connector_port = free_port(), free_port()
        env = dict(os.environ)
        env.update(INSTALL_METHOD="serverless", SERVERLESS_HOST="127.0.0.1", SERVERLESS_PORT=str(function_port))
        children.append(
            subprocess.Popen([os.path.join(working, ".venv", "bin", "python"), "-m", "main"], cwd=working, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        await wait_healthy(function_port)
        function_url = f"http://127.0.0.1:{function_port}"
        children.append(
            subprocess.Popen([sys.executable, "-c", CONNECTOR, function_url, str(connector_port), CONNECTOR_KEY],
                             env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        await asyncio.sleep(1.0)
        if args.profile:
            os.environ["BENCH_TWISTD_ARGS"] = f"--profile={args.profile} --profiler=cprofile --savestats"
        serverless_env = {
            "PLATFORM": "serverless",
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL": f"http://127.0.0.1:{connector_port}",
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY": CONNECTOR_KEY,
        }
        serverless = Daemon(extra_env=serverless_env)
        os.environ.pop("BENCH_TWISTD_ARGS", None)
        await serverless.wait_ready()
        await serverless.upload_install(build_package(echo_plugin_files()))
        if args.baseline:
            # another checkout's daemon on the same function: before / after in one run
            baseline = Daemon(extra_env=dict(serverless_env, PYTHONPATH=os.path.abspath(args.baseline)))
            await baseline.wait_ready()
            await baseline.upload_install(build_package(echo_plugin_files()))

        paths = [
            Path("function direct", function_port, "/invoke?action=invoke_tool", None,
                 {"Content-Type": "application/json", "Accept": "text/event-stream"}, b'"type":"stream"'),
            Path("serverless daemon", serverless.port, PATH, dispatch_body(), HEADERS, b"data: ",
                 serverless.process.pid),
            Path("local daemon", local.port, PATH, dispatch_body(), HEADERS, b"data: ", local.process.pid),
        ]
        if baseline is not None:
            paths.insert(2, Path("baseline serverless daemon", baseline.port, PATH, dispatch_body(), HEADERS,
                                 b"data: ", baseline.process.pid))
        singles = {p.name: (await p.connections(1))[0] for p in paths}
        pools = {p.name: await p.connections(args.inflight) for p in paths}
        for p in paths:
            await latency(p, singles[p.name], 50)
        samples = {p.name: [] for p in paths}
        rates = {p.name: [] for p in paths}
        cpu = {p.name: [0.0, 0.0] for p in paths if p.pid is not None}
        for _ in range(args.rounds):
            for p in paths:
                samples[p.name] += await latency(p, singles[p.name], args.calls)
            for p in paths:
                before = cpu_seconds(p.pid) if p.pid is not None else None
                rates[p.name].append(await throughput(p, pools[p.name], args.burst))
                if before is not None:
                    after = cpu_seconds(p.pid)
                    cpu[p.name][0] += after[0] - before[0]
                    cpu[p.name][1] += after[1] - before[1]
        p50 = {name: percentile(values, 0.5) * 1e3 for name, values in samples.items()}
        for name, values in samples.items():
            print(f"echo, 1 in flight, {name}: p50 {p50[name]:.2f} ms p99 {percentile(values, 0.99) * 1e3:.2f} ms")
        print(
            f"added p50: serverless daemon over the function {p50['serverless daemon'] - p50['function direct']:.2f} ms"
            f" ({len(samples['function direct'])} calls each, {args.rounds} interleaved rounds)"
        )
        if baseline is not None:
            print(f"added p50: baseline serverless daemon over the function"
                  f" {p50['baseline serverless daemon'] - p50['function direct']:.2f} ms")
        medians = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
        for name, value in medians.items():
            print(f"echo, {args.inflight} in flight, {name}: {value:.0f} calls/s")
        print(
            f"serverless daemon / function direct: {medians['serverless daemon'] / medians['function direct']:.2f}"
            f" (medians of {args.rounds} interleaved rounds of {args.burst} calls)"
        )
        if baseline is not None:
            print(f"baseline serverless daemon / function direct:"
                  f" {medians['baseline serverless daemon'] / medians['function direct']:.2f}")
        # CPU per call is what the daemon itself spends, whatever else the
        # machine runs: steadier than rates on a shared machine
        calls = args.rounds * args.burst
        for name, (user, system) in cpu.items():
            print(f"daemon CPU per call at {args.inflight} in flight, {name}: {(user + system) / calls * 1e6:.0f} us"
                  f" (user {user / calls * 1e6:.0f} us, system {system / calls * 1e6:.0f} us;"
                  " the local daemon's plugin process not counted)")
        for connection in list(singles.values()) + [c for pool in pools.values() for c in pool]:
            connection.close()
    finally:
        for child in children:
            child.terminate()
            child.wait(10)
        if serverless is not None:
            serverless.stop()
        if baseline is not None:
            baseline.stop()
        local.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--baseline", default="",
                        help="also run the serverless daemon of another checkout of the project (before / after)")
    parser.add_argument("--profile", default="", help="write a cProfile of the serverless daemon to this file (of the local one to FILE.local)")
    asyncio.run(main(parser.parse_args()))
