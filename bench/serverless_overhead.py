"""
Echo through a serverless daemon against the same SDK function called
directly over HTTP, and the same plugin on a local daemon, interleaved in
one run:

- echo round trip, one in flight: p50 / p99 of each path;
- echo, N in flight: calls/s of each path.

Every path is driven by the same load generator (``bench/serverless_load.py``),
one child process per path, calling over the daemon's own function client
(kept-alive pool, TCP_NODELAY, TCP_QUICKACK re-armed at every read, the lean
HTTP/1.1 decoder): the direct calls cost their client what the daemon's calls
to the function cost the daemon, so the paths differ by the daemon hop
alone.  The function is the echo plugin's SDK in ``INSTALL_METHOD=serverless`` mode
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
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import PATH  # noqa: E402
from bench.harness import REPO, Daemon, HTTPConnection, cpu_seconds, free_port, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

CONNECTOR_KEY = "bench-connector-key"
LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serverless_load.py")
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


class Path:
    """
    One way to make an echo call, driven by a load generator of its own
    (``bench/serverless_load.py``, the same code for every path).  ``pid``
    is the daemon whose CPU a call costs (None for the function).
    """

    def __init__(self, name, url, kind, pid=None):
        self.name, self.url, self.kind, self.pid = name, url, kind, pid

    async def start(self):
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, LOAD, self.url, self.kind,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024,
        )

    async def ask(self, **command):
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the load generator exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    async def latency(self, calls):
        return (await self.ask(op="latency", calls=calls))["samples"]

    async def throughput(self, total, inflight):
        return (await self.ask(op="throughput", total=total, inflight=inflight))["rate"]

    async def stop(self):
        process = getattr(self, "process", None)
        if process is None or process.returncode is not None:
            return
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


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
    paths = []
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

        daemon_url = "http://127.0.0.1:{}" + PATH
        paths = [
            Path("function direct", function_url, "function"),
            Path("serverless daemon", daemon_url.format(serverless.port), "daemon", serverless.process.pid),
            Path("local daemon", daemon_url.format(local.port), "daemon", local.process.pid),
        ]
        if baseline is not None:
            paths.insert(2, Path("baseline serverless daemon", daemon_url.format(baseline.port), "daemon",
                                 baseline.process.pid))
        for p in paths:
            await p.start()
        # warm up: every generator's pool (and the daemons' own pools) at full size
        for p in paths:
            await p.latency(50)
            await p.throughput(args.inflight * 4, args.inflight)
        samples = {p.name: [] for p in paths}
        rates = {p.name: [] for p in paths}
        cpu = {p.name: [0.0, 0.0] for p in paths if p.pid is not None}
        client_cpu = {p.name: 0.0 for p in paths}
        for _ in range(args.rounds):
            for p in paths:
                samples[p.name] += await p.latency(args.calls)
            for p in paths:
                before = cpu_seconds(p.pid) if p.pid is not None else None
                client_before = sum(cpu_seconds(p.process.pid))
                rates[p.name].append(await p.throughput(args.burst, args.inflight))
                client_cpu[p.name] += sum(cpu_seconds(p.process.pid)) - client_before
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
        for name, seconds in client_cpu.items():
            print(f"load generator CPU per call at {args.inflight} in flight, {name}: {seconds / calls * 1e6:.0f} us")
    finally:
        for p in paths:
            await p.stop()
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
