"""
How fast supervision reacts, with the real daemon (``twistd``) and the
real SDK echo plugin (issue 11, items 9 and 11):

- ``hung``: N calls in flight, the plugin SIGSTOPped; how long each caller
  waits for its error item, and how long until a call succeeds again (the
  replacement instance is up).  Before supervision every caller waited
  149 s.
- ``shutdown``: one stream open, the daemon SIGTERMed (its plugin alive,
  then SIGSTOPped); how long until the client reads the final error item
  and until the daemon has exited.  ``docker stop`` allows 10 s.

  A SIGSTOPped plugin gets TERM then CONT for its whole process group, so
  it ends at once; the last run makes it ignore TERM as well, so that it
  is KILLed 2 s later: the worst case.

Usage: ``python bench/supervision.py [--scenario all|hung|shutdown] [--calls 20] [--heartbeat-timeout 30] [--grace N]``
(without ``--grace``, the default ``SHUTDOWN_GRACE_PERIOD``)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import HEADERS, PATH  # noqa: E402
from bench.harness import KEY, Daemon, plugin_pids  # noqa: E402
from difydaemon.testing.packages import build_package  # noqa: E402
from difydaemon.testing.plugins import behaviour_plugin_files  # noqa: E402


def tool_body(tool: str, parameters: dict) -> bytes:
    return json.dumps(
        {"user_id": "u1", "data": {"provider": "echo", "tool": tool, "tool_parameters": parameters, "credentials": {}}}
    ).encode()


class Stream:
    """One dispatch call on its own connection, its SSE items read as they come."""

    def __init__(self, port: int, body: bytes) -> None:
        self.port = port
        self.body = body
        self.items: list[tuple[float, dict]] = []
        self.first = asyncio.get_event_loop().create_future()

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = [f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1", f"X-Api-Key: {KEY}", f"Content-Length: {len(self.body)}"]
        head += [f"{name}: {value}" for name, value in HEADERS.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + self.body)
        await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        buffer = b""
        try:
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                buffer += await reader.readexactly(size)
                await reader.readexactly(2)
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    self.items.append((time.monotonic(), json.loads(block[len(b"data: "):])))
                    if not self.first.done():
                        self.first.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    @property
    def ended_with_error(self) -> bool:
        return bool(self.items) and self.items[-1][1]["code"] == -500


async def installed_daemon(extra_env: dict) -> Daemon:
    files = behaviour_plugin_files()
    # the SDK's own default heartbeat interval (10 s) stays: this measures what users get
    daemon = Daemon(extra_env)
    await daemon.wait_ready(60)
    await daemon.upload_install(build_package(files))
    return daemon


async def hung(calls: int, heartbeat_timeout: int) -> None:
    daemon = await installed_daemon({"PLUGIN_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)})
    try:
        streams = [Stream(daemon.port, tool_body("sleep", {"seconds": "3600"})) for _ in range(calls)]
        tasks = [asyncio.ensure_future(stream.run()) for stream in streams]
        await asyncio.gather(*(stream.first for stream in streams))
        [pid] = plugin_pids(daemon.process.pid)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.gather(*tasks)
        waits = [stream.items[-1][0] - stopped for stream in streams]
        errors = sum(1 for stream in streams if stream.ended_with_error)
        while True:
            echo = Stream(daemon.port, tool_body("echo", {"text": "back"}))
            await echo.run()
            if echo.items and echo.items[-1][1]["code"] == 0:
                break
            await asyncio.sleep(0.1)
        back = time.monotonic() - stopped
        print(
            f"hung plugin, {calls} calls in flight, PLUGIN_HEARTBEAT_TIMEOUT={heartbeat_timeout}:"
            f" {errors}/{calls} got an error item after {min(waits):.1f} / {statistics.median(waits):.1f} /"
            f" {max(waits):.1f} s (min / median / max); a call succeeded again {back:.1f} s after SIGSTOP"
        )
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finally:
        daemon.stop()


async def shutdown(grace: int | None, stop_plugin: bool, ignore_term: bool = False) -> None:
    daemon = await installed_daemon({} if grace is None else {"SHUTDOWN_GRACE_PERIOD": str(grace)})
    try:
        if ignore_term:
            # the worst case: continued, the plugin still ignores TERM and waits for KILL
            await Stream(daemon.port, tool_body("ignore_term", {})).run()
        stream = Stream(daemon.port, tool_body("sleep", {"seconds": "3600"}))
        task = asyncio.ensure_future(stream.run())
        await stream.first
        pids = plugin_pids(daemon.process.pid)
        if stop_plugin:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        await task
        item = stream.items[-1][0] - started
        while daemon.process.poll() is None:
            await asyncio.sleep(0.01)
        exited = time.monotonic() - started
        left = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        print(
            f"shutdown, SHUTDOWN_GRACE_PERIOD={'default' if grace is None else grace},"
            f" plugin {'SIGSTOPped' if stop_plugin else 'alive'}{' ignoring TERM' if ignore_term else ''}:"
            f" error item {'read' if stream.ended_with_error else 'MISSING'} after {item:.2f} s,"
            f" daemon exited after {exited:.2f} s, plugin processes left: {left}"
        )
    finally:
        daemon.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("all", "hung", "shutdown"), default="all")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--heartbeat-timeout", type=int, default=30)
    parser.add_argument("--grace", type=int, default=None)
    options = parser.parse_args()
    if options.scenario in ("all", "hung"):
        await hung(options.calls, options.heartbeat_timeout)
    if options.scenario in ("all", "shutdown"):
        await shutdown(options.grace, stop_plugin=False)
        await shutdown(options.grace, stop_plugin=True)
        await shutdown(options.grace, stop_plugin=True, ignore_term=True)


if __name__ == "__main__":
    asyncio.run(main())
