"""
Relay capacity: a fake plugin that emits tool chunks as fast as it can on
one stream, read through the daemon's HTTP API (SSE) and read directly from
the plugin's stdout, interleaved, in one run.  Also prints the daemon's CPU
seconds per chunk, which says whether it fits in one core.

Usage: ``python bench/relay_capacity.py [--chunks 200000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import TENANT, Daemon, HTTPConnection  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

# Speaks the plugin side of the stdio protocol without the SDK, as fast as
# Python can write: one heartbeat, then for each request `count` chunks and end.
FIREHOSE_MAIN = r'''
import json
import sys

out = sys.stdout
out.write('{"event":"heartbeat","session_id":null,"data":{}}\n\n')
out.flush()
for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    request = json.loads(line)
    sid = request["session_id"]
    count = int(request["data"].get("tool_parameters", {}).get("count", 1000))
    chunk = ('{"event":"session","session_id":"%s","data":{"type":"stream","data":'
             '{"type":"text","message":{"text":"x"},"meta":null}}}\n\n' % sid)
    batch = chunk * 1000
    for _ in range(count // 1000):
        out.write(batch)
    out.write(chunk * (count % 1000))
    out.write('{"event":"session","session_id":"%s","data":{"type":"end","data":{}}}\n\n' % sid)
    out.flush()
'''


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def through_daemon(daemon, count):
    connection = HTTPConnection(daemon.port)
    await connection.open()
    body = json.dumps(
        {"user_id": "u", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"count": count}, "credentials": {}}}
    ).encode()
    before = cpu(daemon.process.pid)
    start = time.perf_counter()
    status, reply = await connection.request(
        "POST",
        f"/plugin/{TENANT}/dispatch/tool/invoke",
        body,
        {"Content-Type": "application/json", "X-Plugin-ID": "acme/echo"},
    )
    elapsed = time.perf_counter() - start
    used = cpu(daemon.process.pid) - before
    connection.close()
    got = reply.count(b"data: ")
    assert status == 200 and got == count, (status, got)
    return count / elapsed, used / count


async def direct(working_dir, count):
    process = await asyncio.create_subprocess_exec(
        os.path.join(working_dir, ".venv", "bin", "python"),
        "main.py",
        cwd=working_dir,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    await process.stdout.readline()
    request = {"session_id": "s", "event": "request", "data": {"tool_parameters": {"count": count}}}
    start = time.perf_counter()
    process.stdin.write(json.dumps(request).encode() + b"\n")
    seen = 0
    tail = b""
    while True:
        data = await process.stdout.read(1 << 16)
        data = tail + data
        seen += data.count(b'"type":"stream"')
        if b'"type":"end"' in data:
            break
        tail = data[-64:]
        seen -= tail.count(b'"type":"stream"')
    elapsed = time.perf_counter() - start
    process.kill()
    await process.wait()
    return count / elapsed


async def main(args):
    print(f"cores: {os.cpu_count()}")
    files = echo_plugin_files()
    files["main.py"] = FIREHOSE_MAIN.encode()
    daemon = Daemon(prepared_venvs=os.path.join(tempfile.gettempdir(), "difydaemon-bench-prepared"))
    try:
        await daemon.wait_ready()
        identifier = await daemon.upload_install(build_package(files))
        working_dir = os.path.abspath(working_dir_for(daemon.working, identifier))
        await through_daemon(daemon, 10000)
        rates_daemon, rates_direct, cpus = [], [], []
        for _ in range(args.rounds):
            rates_direct.append(await direct(working_dir, args.chunks))
            rate, cpu_per_chunk = await through_daemon(daemon, args.chunks)
            rates_daemon.append(rate)
            cpus.append(cpu_per_chunk)
        med = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
        print(
            f"relay, one stream of {args.chunks} chunks: daemon {med(rates_daemon):,.0f} chunks/s "
            f"(daemon CPU {med(cpus) * 1e6:.2f} us/chunk = {1 / med(cpus):,.0f} chunks/s per core), "
            f"plugin read directly {med(rates_direct):,.0f} chunks/s (medians of {args.rounds} interleaved rounds)"
        )
    finally:
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
