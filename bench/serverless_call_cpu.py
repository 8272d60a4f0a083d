"""
CPU of the serverless runtime's own part of one echo call, in one process:
``ServerlessRuntime.open_session`` -> ``InvokeClient`` -> the function
client's pooled connection, answered with the bytes the SDK's function
sends for an echo (head, a stream event, its end, each chunked as the SDK
writes it, in two reads), down to the listener's ``end``.  No sockets, no
HTTP server in front: what ``bench/serverless_overhead.py`` measures on top
of the local daemon, less the loopback hops, without their noise.

Run it under another checkout with ``PYTHONPATH=DIR`` to compare before and
after.  On a shared machine, process CPU time still drifts with the load;
for a figure that does not, count instructions with callgrind at two call
counts and divide the difference::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/serverless_call_cpu.py --calls 500 --rounds 1 --warmup 300
    (the same with --calls 1500; instructions per call = difference / 1000)

Usage: ``python bench/serverless_call_cpu.py [--calls 10000] [--rounds 5] [--warmup 2000]``
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import uuid

if "PYTHONPATH" not in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import succeed  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from difydaemon.invocation.session import InvocationSession  # noqa: E402
from difydaemon.runtimes.serverless.connector import FunctionInfo  # noqa: E402
from difydaemon.runtimes.serverless.function_client import FunctionHTTPClient  # noqa: E402
from difydaemon.runtimes.serverless.invoke import InvokeClient  # noqa: E402
from difydaemon.runtimes.serverless.runtime import ServerlessRuntime  # noqa: E402
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions  # noqa: E402

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Date: Thu, 03 Dec 2026 12:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Endpoint:
    """Connects at once over a StringTransport (one pooled connection serves every call)."""

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class _Listener:
    """Counts what a dispatch relay would be told."""

    def __init__(self, runtime, request):
        self.runtime, self.request, self.seen = runtime, request, 0

    def invocation_session(self):
        return InvocationSession.of("tenant", "acme/echo", self.request, self.runtime)

    def stream(self, chunk, raw):
        self.seen += 1

    def end(self):
        self.seen += 10

    def error(self, error_type, message, args):
        raise AssertionError(f"the echo failed: {error_type}: {message}")

    def invoke(self, request):
        raise AssertionError("no backwards invocation here")


def main(args) -> None:
    clock = MemoryReactorClock()
    endpoint = _Endpoint()
    client = FunctionHTTPClient(clock, endpoint_for=lambda *key: endpoint)
    runtime = ServerlessRuntime(
        clock, "acme/echo:0.0.1@" + "a" * 64, {"author": "acme"}, FunctionInfo("echo", "http://127.0.0.1:9000"),
        InvokeClient(clock, client), MemoryServerlessSessions(clock),
    )

    def call() -> None:
        session_id = str(uuid.uuid4())
        request = {
            "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
            "endpoint_id": None, "context": {}, "event": "request",
            "data": {"user_id": "u", "type": "tool", "action": "invoke_tool", "provider": "echo", "tool": "echo",
                     "tool_parameters": {"text": "hi"}, "credentials": {}},
        }
        listener = _Listener(runtime, request)
        runtime.open_session(session_id, request, listener)
        sid = session_id.encode()
        stream = b'{"event":"session","session_id":"%s","data":{"type":"stream","data":{"type":"text","message":{"text":"hi"},"meta":null}}}' % sid
        end = b'{"event":"session","session_id":"%s","data":{"type":"end","data":null}}' % sid
        endpoint.protocol.dataReceived(HEAD + chunk(stream) + chunk(b"\n\n"))
        endpoint.protocol.dataReceived(chunk(end) + chunk(b"\n\n") + b"0\r\n\r\n")
        if listener.seen != 11:
            raise AssertionError(f"the echo did not end as expected ({listener.seen})")
        endpoint.transport.clear()

    for _ in range(args.warmup):
        call()
    figures = []
    for _ in range(args.rounds):
        gc.collect()
        start = time.process_time()
        for _ in range(args.calls):
            call()
        figures.append((time.process_time() - start) / args.calls * 1e6)
    print(f"cores: {os.cpu_count()}")
    print(
        f"serverless runtime + invoke client + function client, CPU per echo call: median {sorted(figures)[len(figures) // 2]:.1f} us"
        f" (min {min(figures):.1f}; {args.rounds} rounds of {args.calls} calls)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2000)
    main(parser.parse_args())
