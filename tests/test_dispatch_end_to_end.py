"""
Dispatch streams of a real SDK plugin through the whole daemon, seen from
a raw socket (issue 11, items 12 and 17):

- the first-token contract of whats-new.md §2.4: not a byte, not even the
  status line, before the plugin's first chunk; that chunk as soon as the
  plugin sends it, while the plugin is still busy;
- unknown fields of ``data`` (``first_token_timeout``, ``tool_choice``,
  future ones) reach the plugin unchanged;
- a client that goes away mid-stream, or while its installation is being
  looked up (a lookup kept waiting by a real lock in PostgreSQL), is
  forgotten: the session is abandoned, or never opened, and nothing is
  logged as a failure.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import LogLevel, globalLogPublisher

from difydaemon.testing.http import RawHTTPClient, http_chunks
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.sdk import test_uv_cache_dir
from tests.daemon_postgres import connect as connect_database, fresh_database
from tests.runtimes.test_official_plugins import prepared_venvs_dir
from tests.test_end_to_end import TENANT, DaemonCase, sse_items
from tests.test_tap import KEY

PLUGIN_ID = "acme/echo"


def dispatch_request(route: str, data: dict, tenant: str = TENANT) -> bytes:
    """The bytes of one dispatch POST as Dify's pooled client sends it."""
    body = orjson.dumps({"user_id": "u1", "data": data})
    return (
        f"POST /plugin/{tenant}/dispatch/{route} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api-Key: {KEY}\r\n"
        f"X-Plugin-ID: {PLUGIN_ID}\r\nContent-Type: application/json\r\nAccept-Encoding: gzip, deflate, br\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def tool_data(tool: str, parameters: dict, **extra) -> dict:
    """The ``data`` of a tool/invoke of the echo provider."""
    return dict({"provider": "echo", "tool": tool, "tool_parameters": parameters, "credentials": {}}, **extra)


async def wait_until(condition, what: str, seconds: float = 60.0) -> None:
    """Let the reactor run until ``condition()`` holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"gave up waiting: {what}")


class FailureLevels:
    """Counts the log events at error level or above while the test runs."""

    def __init__(self, test) -> None:
        self.count = 0
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.count += 1


class StreamCase(DaemonCase):
    """A daemon with the recording behaviour plugin installed."""

    async def start_with_plugin(self, **environ) -> None:
        """
        Start the daemon (``environ`` added) and install the plugin; its venv
        is prepared once per test process and copied by later installs.
        """
        working = os.path.abspath(self.mktemp())
        os.makedirs(working)
        os.symlink(test_uv_cache_dir(), os.path.join(working, ".uv-cache"))
        os.symlink(prepared_venvs_dir(), os.path.join(working, ".prepared-venvs"))
        await self._start(PLUGIN_WORKING_PATH=working, **environ)
        self.identifier = await self.install(behaviour_plugin_files(main="recording"))
        self.assertEqual(self.task["status"], "success", self.task)
        self.runtime = self.service.runtimes.get(self.identifier)
        await wait_until(self.runtime.is_ready, "the plugin is ready")

    async def connect(self) -> RawHTTPClient:
        """A raw connection to the daemon."""
        client = RawHTTPClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        return client

    async def wait_for_dispatches(self, count: int) -> None:
        """Wait until /health/check counts ``count`` dispatch requests in flight."""
        for _ in range(3000):
            code, reply = await self.call("GET", "/health/check")
            if orjson.loads(reply)["active_dispatch_requests"] == count:
                return
            await task.deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"never {count} dispatch requests in flight")

    def open_sessions(self) -> int:
        """Sessions open on the plugin's instances."""
        return sum(len(instance.sessions) for instance in self.runtime.instances)

    async def recorded_requests(self) -> list:
        """The ``data`` of every request the plugin received, from its ``requests`` tool."""
        items = sse_items(await self.tool("requests", {}))
        return items[0]["data"]["message"]["json_object"]["requests"]

    def gate(self) -> str:
        """A directory for the ``gate`` tool's files."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        return directory


class FirstTokenTests(StreamCase):
    """The first-token contract of whats-new.md §2.4, on the daemon's own dispatch channel."""

    async def test_nothing_before_the_first_chunk(self):
        """Not a byte before the plugin's first chunk; that chunk while the plugin still runs; then the rest."""
        await self.start_with_plugin()
        gate = self.gate()
        client = await self.connect()
        client.transport.write(dispatch_request("tool/invoke", tool_data("gate", {"dir": gate})))
        await wait_until(lambda: os.path.exists(os.path.join(gate, "started")), "the plugin got the request")
        # the plugin holds its first chunk: give the daemon turns in which it could write
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(client.received, b"")

        open(os.path.join(gate, "first"), "w").close()
        received = await client.until(b'"first"')
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        self.assertIn(b"\r\nContent-Type: text/event-stream\r\n", received)
        # the plugin waits for its second gate: the stream is open, its end not sent
        self.assertFalse(os.path.exists(os.path.join(gate, "second")))
        self.assertNotIn(b"\r\n0\r\n\r\n", received)
        self.assertEqual(self.open_sessions(), 1)

        open(os.path.join(gate, "second"), "w").close()
        received = await client.until(b"\r\n0\r\n\r\n")
        items = sse_items(b"".join(http_chunks(received.partition(b"\r\n\r\n")[2])))
        self.assertEqual([item["data"]["message"]["text"] for item in items], ["first", "second"])

    async def test_unknown_data_fields_reach_the_plugin(self):
        """first_token_timeout, tool_choice and a future field of data reach the plugin as sent, on two routes."""
        await self.start_with_plugin()
        extra = {
            "first_token_timeout": 2.5,
            "some_future_field": {"nested": [1, 2.25, "x", None, True], "deep": {"k": "v"}},
        }
        code, _ = await self.call(
            "POST", f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": tool_data("echo", {"text": "hi"}, **extra)}, {"X-Plugin-ID": PLUGIN_ID},
        )
        self.assertEqual(code, 200)
        llm = dict(
            {"provider": "openai", "model": "gpt-4o", "model_type": "llm", "credentials": {},
             "prompt_messages": [{"role": "user", "content": "hi"}], "model_parameters": {"temperature": 0},
             "stop": [], "tools": [], "stream": True,
             "tool_choice": {"mode": "tool", "name": "get_weather"}},
            **extra,
        )
        code, _ = await self.call(
            "POST", f"/plugin/{TENANT}/dispatch/llm/invoke", {"user_id": "u1", "data": llm},
            {"X-Plugin-ID": PLUGIN_ID},
        )
        self.assertEqual(code, 200)
        received = await self.recorded_requests()
        tool_request = next(r for r in received if r.get("action") == "invoke_tool" and r.get("tool") == "echo")
        llm_request = next(r for r in received if r.get("action") == "invoke_llm")
        for request, sent in ((tool_request, tool_data("echo", {"text": "hi"}, **extra)), (llm_request, llm)):
            self.assertEqual({key: request.get(key) for key in sent}, sent)


class ClientGoneTests(StreamCase):
    """A client that leaves mid-stream is forgotten."""

    async def test_client_gone_mid_stream(self):
        """The session is abandoned while the plugin still runs; its late chunks log nothing; the next call works."""
        failures = FailureLevels(self)
        await self.start_with_plugin()
        gate = self.gate()
        client = await self.connect()
        client.transport.write(dispatch_request("tool/invoke", tool_data("gate", {"dir": gate})))
        await wait_until(lambda: os.path.exists(os.path.join(gate, "started")), "the plugin got the request")
        open(os.path.join(gate, "first"), "w").close()
        await client.until(b'"first"')
        self.assertEqual(self.open_sessions(), 1)
        client.transport.loseConnection()
        await client.closed
        await wait_until(lambda: self.open_sessions() == 0, "the session is abandoned")
        # the plugin, unaware, sends its second chunk and its end for the abandoned session
        open(os.path.join(gate, "second"), "w").close()
        self.assertIn(b'"again"', await self.tool("echo", {"text": "again"}))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(failures.count, 0)


class SlowLookupTests(StreamCase):
    """A client that leaves while PostgreSQL keeps its installation lookup waiting."""

    timeout = 300

    async def start_on_postgres(self) -> None:
        """The daemon on a fresh PostgreSQL database; ``self.admin`` is a connection to it."""
        environ = await fresh_database(self, "difydaemon_lookup_")
        await self.start_with_plugin(**environ)
        self.admin = await connect_database(environ)
        self.addCleanup(self.admin.close)

    async def test_client_gone_during_lookup(self):
        """The request is never sent to the plugin, nothing is written and nothing is logged as a failure."""
        failures = FailureLevels(self)
        await self.start_on_postgres()
        locked: Deferred = Deferred()
        held: Deferred = Deferred()

        def lock(cursor):
            # holds the lock until ``held`` fires, then commits
            d = cursor.execute("LOCK TABLE plugin_installations IN ACCESS EXCLUSIVE MODE")
            d.addCallback(lambda _: locked.callback(None))
            d.addCallback(lambda _: held)
            return d

        transaction = self.admin.runInteraction(lock)
        await locked
        client = await self.connect()
        client.transport.write(dispatch_request("tool/invoke", tool_data("echo", {"text": "never sent"})))
        # the lookup waits for the lock (an uncached lookup: the install invalidated the cache)
        await self.wait_for_dispatches(1)
        client.transport.loseConnection()
        await client.closed
        held.callback(None)
        await transaction
        texts = [r.get("tool_parameters", {}).get("text") for r in await self.recorded_requests()]
        self.assertNotIn("never sent", texts)
        self.assertEqual(client.received, b"")
        self.assertEqual(self.open_sessions(), 0)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(failures.count, 0)
