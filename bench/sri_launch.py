"""
Our SRI connector, ``twistd -n dify-sri`` in a child process, measured:

- time to launch the echo package (upload -> run/success -> end) cold: a
  fresh working path, so uv installs from its cache (the test run's; no
  download) and everything is byte-compiled;
- the same time for a second package with the same dependencies (a copy of
  the prepared venv), and for a relaunch of a running package (reused);
- the echo tool's round trip through ``POST <function URL>/invoke``, called
  directly, one in flight: p50 / p99 over one keep-alive connection, and
  with a new connection per call.  (The SDK's gevent server writes each
  response in several small chunks; without the ``TCP_NODELAY`` the
  connector gives functions, :mod:`difydaemon.sri.function_site`, a reused
  connection measured 44 ms p50: Nagle's algorithm meets delayed ACKs.)

Usage: ``python bench/sri_launch.py [--calls 500]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import REPO, HTTPConnection, free_port, http_call, percentile, stop_child  # noqa: E402
from difydaemon.testing import sri_client as sri  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402
from difydaemon.testing.sdk import python312, test_uv_cache_dir  # noqa: E402

KEY = "bench-sri-key"


class Connector:
    """``twistd -n dify-sri`` in a temporary directory, on the test run's uv cache only."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="difydaemon-bench-sri-")
        self.port = free_port()
        working = os.path.join(self.dir, "sri")
        os.makedirs(working)
        os.symlink(test_uv_cache_dir(), os.path.join(working, ".uv-cache"))
        env = dict(os.environ)
        env.update(
            {
                "SRI_API_KEY": KEY,
                "SRI_HOST": "127.0.0.1",
                "SRI_PORT": str(self.port),
                "SRI_WORKING_PATH": working,
                "PYTHON_INTERPRETER_PATH": python312(),
                "PIP_VERBOSE": "false",
                "PYTHONPATH": REPO,
            }
        )
        self.log = open(os.path.join(self.dir, "sri.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "dify-sri"],
            cwd=self.dir,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = await http_call("POST", self.port, "/ping", headers={"Authorization": KEY})
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("the connector did not start; see " + self.log.name)

    async def launch(self, package: bytes, filename: str) -> tuple[float, dict]:
        """Launch a package; (seconds until the stream ended, the announced function)."""
        content_type, body = sri.launch_form(package, filename)
        started = time.perf_counter()
        status, reply = await http_call(
            "POST", self.port, "/v1/launch", body, {"Authorization": KEY, "Content-Type": content_type}
        )
        elapsed = time.perf_counter() - started
        events = sri.launch_events(reply)
        if status != 200 or events[-1]["Stage"] != "end":
            raise RuntimeError(f"launch failed: {events[-1:]}")
        return elapsed, sri.announced(events)

    def stop(self) -> None:
        stop_child(self.process, self.log, self.dir)


async def invoke_latencies(endpoint: str, calls: int) -> list[float]:
    """Round trips of the echo tool on one keep-alive connection to the function."""
    port = int(endpoint.rsplit(":", 1)[1])
    connection = HTTPConnection(port)
    await connection.open()
    latencies = []
    try:
        for number in range(calls):
            body = sri.tool_invoke(f"bench-{number}", "hi")
            started = time.perf_counter()
            status, reply = await connection.request("POST", "/invoke", body, {"Content-Type": "application/json"})
            latencies.append(time.perf_counter() - started)
            events = sri.invoke_events(reply)
            if status != 200 or events[-1]["data"]["type"] != "end":
                raise RuntimeError(f"invoke failed: {status} {reply[:300]!r}")
    finally:
        connection.close()
    return latencies


async def fresh_connection_latencies(endpoint: str, calls: int) -> list[float]:
    """Round trips of the echo tool, each on a new connection."""
    port = int(endpoint.rsplit(":", 1)[1])
    latencies = []
    for number in range(calls):
        body = sri.tool_invoke(f"bench-fresh-{number}", "hi")
        started = time.perf_counter()
        status, reply = await http_call("POST", port, "/invoke", body, {"Content-Type": "application/json"})
        latencies.append(time.perf_counter() - started)
        if status != 200 or sri.invoke_events(reply)[-1]["data"]["type"] != "end":
            raise RuntimeError(f"invoke failed: {status} {reply[:300]!r}")
    return latencies


def report(label: str, latencies: list[float]) -> None:
    print(
        f"direct /invoke echo, one in flight, {label}, {len(latencies)} calls: "
        f"p50 {percentile(latencies, 0.5) * 1000:.2f} ms, p99 {percentile(latencies, 0.99) * 1000:.2f} ms"
    )


async def main(calls: int) -> None:
    echo = build_package(echo_plugin_files())
    twin = build_package(echo_plugin_files(name="echotwin"))
    connector = Connector()
    try:
        await connector.wait_ready()
        cold, function = await connector.launch(echo, sri.package_filename(echo))
        reused, _ = await connector.launch(echo, sri.package_filename(echo))
        # the prepared venv is kept in the background once the first build is done
        await asyncio.sleep(3)
        warm, _ = await connector.launch(twin, sri.package_filename(twin, name="echotwin"))
        print(f"launch, cold (uv from its cache, full byte-compilation): {cold:.2f} s")
        print(f"launch, same dependencies as a launched package (prepared venv): {warm:.2f} s")
        print(f"launch, package already running (reused): {reused * 1000:.1f} ms")
        await invoke_latencies(function["endpoint"], 50)  # warm-up
        report("one keep-alive connection", await invoke_latencies(function["endpoint"], calls))
        report("a new connection per call", await fresh_connection_latencies(function["endpoint"], calls))
        print(json.dumps({"function": function}))
    finally:
        connector.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--calls", type=int, default=500)
    asyncio.run(main(parser.parse_args().calls))
