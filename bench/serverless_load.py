"""
The load generator of ``bench/serverless_overhead.py``: one child process
per path, the same code for every path, so the paths differ only by what
sits behind the URL (a function, a serverless daemon, a local daemon).

It calls over the daemon's own function client
(:class:`~difydaemon.runtimes.serverless.function_client.FunctionHTTPClient`:
kept-alive pool, one ``send`` per request, ``TCP_NODELAY`` and
``TCP_QUICKACK``, the lean HTTP/1.1 decoder), on its own reactor and in its
own process: a direct call to the function costs the client what the
daemon's own call to it costs the daemon, and the bench's parent process
never competes with it for a reactor.

Driven over stdin/stdout, one JSON object a line::

    {"op": "latency", "calls": N}                    -> {"samples": [seconds, ...]}
    {"op": "throughput", "total": N, "inflight": K}  -> {"rate": calls per second}

Usage (by the bench): ``python bench/serverless_load.py URL KIND`` where
``KIND`` is ``function`` (an ``/invoke`` call with a fresh session id, as
the daemon sends it) or ``daemon`` (a tool dispatch, as Dify sends it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402
from twisted.web.client import ResponseDone  # noqa: E402

from bench.echo_overhead import ECHO, HEADERS, dispatch_body  # noqa: E402
from bench.harness import KEY  # noqa: E402
from difydaemon.runtimes.serverless.function_client import FunctionHTTPClient  # noqa: E402


class _Body(Protocol):
    """Collects a response body; ``done`` fires with it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason=None) -> None:
        if reason is not None and reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class EchoCaller:
    """
    One echo call of one kind, checked: the status is 200 and the body holds
    the two stream events the echo tool answers.
    """

    def __init__(self, client: FunctionHTTPClient, url: str, kind: str) -> None:
        self._client = client
        self.kind = kind
        if kind == "function":
            self.url = url.rstrip("/") + "/invoke?action=invoke_tool"
            self._marker = b'"type":"stream"'
        elif kind == "daemon":
            self.url = url
            self._marker = b"data: "
            headers = {name.encode(): [value.encode()] for name, value in HEADERS.items()}
            headers[b"X-Api-Key"] = [KEY.encode()]
            self._headers = headers
            self._body = dispatch_body()
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def _request(self) -> tuple[bytes, dict]:
        if self.kind == "daemon":
            return self._body, self._headers
        # what the daemon does per call: a session id of its own, the body encoded with orjson
        session_id = str(uuid.uuid4())
        body = orjson.dumps(
            {
                "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
                "endpoint_id": None, "context": None, "event": "request", "data": ECHO,
            }
        )
        headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"text/event-stream"],
            b"Dify-Plugin-Session-ID": [session_id.encode()],
        }
        return body, headers

    async def call(self) -> None:
        body, headers = self._request()
        response = await self._client.post(self.url, body, headers)
        reader = _Body()
        response.deliverBody(reader)
        reply = await reader.done
        if response.code != 200 or reply.count(self._marker) != 2:
            raise RuntimeError(f"{self.kind}: status {response.code}, body {reply[:300]!r}")


async def latency(caller: EchoCaller, calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls made one after the other."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await caller.call()
        samples.append(time.perf_counter() - start)
    return samples


async def throughput(caller: EchoCaller, total: int, inflight: int) -> float:
    """Calls per second of ``total`` calls, ``inflight`` at a time."""
    remaining = [total]

    async def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            await caller.call()

    start = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(inflight)], consumeErrors=True)
    return total / (time.perf_counter() - start)


class Commands(LineReceiver):
    """One command a line on stdin, one answer a line on stdout, one at a time."""

    delimiter = b"\n"

    def __init__(self, caller: EchoCaller, finished: Deferred) -> None:
        self._caller = caller
        self._finished = finished

    def lineReceived(self, line: bytes) -> None:
        Deferred.fromCoroutine(self._run(json.loads(line))).addErrback(self._failed)

    async def _run(self, command: dict) -> None:
        if command["op"] == "latency":
            answer = {"samples": await latency(self._caller, command["calls"])}
        else:
            answer = {"rate": await throughput(self._caller, command["total"], command["inflight"])}
        self.sendLine(json.dumps(answer).encode())

    def _failed(self, failure) -> None:
        # the bench reads the error as the answer and stops
        self.sendLine(json.dumps({"error": failure.getErrorMessage() or repr(failure.value)}).encode())

    def connectionLost(self, reason=None) -> None:
        if not self._finished.called:
            self._finished.callback(None)


def main(reactor, url: str, kind: str) -> Deferred:
    from twisted.internet.stdio import StandardIO

    client = FunctionHTTPClient(reactor)
    finished: Deferred = Deferred()
    StandardIO(Commands(EchoCaller(client, url, kind), finished), reactor=reactor)
    return finished.addCallback(lambda _: client.closeCachedConnections())


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:3])
