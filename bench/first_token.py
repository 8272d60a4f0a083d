"""
The first-token contract (whats-new.md §2.4) measured on the wire: a real
SDK plugin whose first chunk comes after a delay, then chunks at a steady
pace, each carrying the ``time.time()`` of its yield.  Interleaved runs:

- through the daemon (twistd child, the dispatch channel) read by a raw
  socket: when the first byte arrives relative to the first yield (an early
  response head would arrive before it), how many bytes arrive before the
  first chunk, and each chunk's latency from yield to client;
- the same plugin driven directly over stdio: yield to stdout reader,
  the part of the latency that is the SDK's and the pipe's.

The difference is what the daemon adds per chunk, TurnFlush's one reactor
turn (``callLater(0)``) included.

Usage: ``python bench/first_token.py [--rounds 5] [--count 40] [--gap 0.02] [--delay 0.5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import KEY, TENANT, Daemon, DirectPlugin, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package  # noqa: E402
from difydaemon.testing.plugins import behaviour_plugin_files  # noqa: E402

# one whole SSE item of a text chunk: the yield time is its text
_ITEM = re.compile(rb'"message":\{"text":"([0-9.e+-]+)"\}[^\n]*\n\n')
_END = b"\r\n0\r\n\r\n"


def paced(args) -> dict:
    """The ``data`` of one call of the ``paced`` tool."""
    parameters = {"count": str(args.count), "gap": str(args.gap), "delay": str(args.delay)}
    return {"provider": "echo", "tool": "paced", "tool_parameters": parameters, "credentials": {}}


async def through_daemon(port: int, args) -> dict:
    """One paced stream through the daemon, timed at the client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = json.dumps({"user_id": "u1", "data": paced(args)}).encode()
    writer.write(
        (
            f"POST /plugin/{TENANT}/dispatch/tool/invoke HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: {KEY}\r\n"
            f"X-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    received = b""
    first_byte = None
    before_first_chunk = None
    latencies = []
    parsed = 0
    while not received.endswith(_END):
        data = await reader.read(65536)
        now = time.time()
        if not data:
            raise RuntimeError("the daemon closed the connection")
        if first_byte is None:
            first_byte = now
        if before_first_chunk is None and _ITEM.search(received + data):
            before_first_chunk = len(received)
        received += data
        for match in _ITEM.finditer(received, parsed):
            latencies.append(now - float(match.group(1)))
            parsed = match.end()
    writer.close()
    first_yield = float(_ITEM.search(received).group(1))
    assert len(latencies) == args.count, (len(latencies), received[-300:])
    return {
        "first_byte_after_yield": first_byte - first_yield,
        "bytes_before_first_chunk": before_first_chunk,
        "latencies": latencies,
    }


async def direct(plugin: DirectPlugin, args) -> list:
    """One paced stream read straight off the plugin's stdout: yield-to-read latencies."""
    latencies = []

    def on_message(message):
        now = time.time()
        data = message["data"]
        if data.get("type") == "stream":
            latencies.append(now - float(data["data"]["message"]["text"]))

    plugin.on_message = on_message
    chunks = await plugin.invoke(dict(paced(args), user_id="u1", type="tool", action="invoke_tool"))
    plugin.on_message = None
    assert chunks == args.count, chunks
    return latencies


def ms(values, fraction) -> str:
    return f"{percentile(values, fraction) * 1e3:.2f}"


async def main(args) -> None:
    print(f"cores: {os.cpu_count()}; {args.rounds} rounds of {args.count} chunks {args.gap * 1e3:.0f} ms apart, "
          f"the first after {args.delay * 1e3:.0f} ms")
    daemon = Daemon(prepared_venvs=tempfile.mkdtemp(prefix="difydaemon-bench-prepared-"))
    plugin = None
    try:
        await daemon.wait_ready()
        identifier = await daemon.upload_install(build_package(behaviour_plugin_files()))
        plugin = DirectPlugin(os.path.abspath(working_dir_for(daemon.working, identifier)))
        await plugin.start()
        runs, direct_latencies = [], []
        for _ in range(args.rounds):
            direct_latencies += await direct(plugin, args)
            runs.append(await through_daemon(daemon.port, args))
        daemon_latencies = [value for run in runs for value in run["latencies"]]
        firsts = [run["latencies"][0] for run in runs]
        print("first byte on the wire, after the first yield: "
              + ", ".join(f"{run['first_byte_after_yield'] * 1e3:+.2f} ms" for run in runs)
              + " (negative: a byte before the first chunk)")
        print("bytes received before the first chunk: " + ", ".join(str(run["bytes_before_first_chunk"])
                                                                     for run in runs))
        print(f"first chunk, yield -> client: p50 {ms(firsts, 0.5)} ms, max {ms(firsts, 1.0)} ms")
        print(f"every chunk, yield -> client (daemon): p50 {ms(daemon_latencies, 0.5)} ms, "
              f"p90 {ms(daemon_latencies, 0.9)} ms, max {ms(daemon_latencies, 1.0)} ms ({len(daemon_latencies)})")
        print(f"every chunk, yield -> stdout reader (direct): p50 {ms(direct_latencies, 0.5)} ms, "
              f"p90 {ms(direct_latencies, 0.9)} ms, max {ms(direct_latencies, 1.0)} ms ({len(direct_latencies)})")
        print(f"added by the daemon, p50: {(percentile(daemon_latencies, 0.5) - percentile(direct_latencies, 0.5)) * 1e3:.2f} ms")
    finally:
        if plugin is not None:
            await plugin.stop()
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds before the first chunk")
    asyncio.run(main(parser.parse_args()))
