"""Tests of the public fake runtime, :class:`difydaemon.testing.runtimes.FakeRuntime`."""

from __future__ import annotations

import orjson
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.runtimes import FakeRuntime
from tests.runtimes.listeners import RecordingListener

IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64


def request(session_id: str, action: str = "invoke_tool") -> dict:
    return {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {"user_id": "", "type": "tool", "action": action},
    }


class FakeRuntimeTests(SynchronousTestCase):
    """FakeRuntime records sessions and plays the plugin's part."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.runtime = FakeRuntime(self.clock, IDENTIFIER)
        self.listener = RecordingListener()

    def test_provides_interface(self):
        """FakeRuntime provides IPluginRuntime."""
        self.assertTrue(verifyObject(IPluginRuntime, self.runtime))
        self.assertEqual(self.runtime.plugin_unique_identifier, IDENTIFIER)

    def test_records_requests(self):
        """Opened sessions are recorded with their requests, in order."""
        self.runtime.open_session("s1", request("s1"), self.listener)
        self.runtime.open_session("s2", request("s2"), self.listener)
        self.assertEqual(self.runtime.session_ids, ["s1", "s2"])
        self.assertEqual(self.runtime.last_session_id, "s2")
        self.assertEqual(self.runtime.requests[0], request("s1"))

    def test_stream_and_end(self):
        """Pushed chunks reach the listener with their compact JSON, then end closes the session."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.runtime.stream("s", {"a": 1})
        self.runtime.stream("s", {"b": 2}, b'{"b": 2}')
        self.runtime.end("s")
        self.assertEqual(
            self.listener.calls,
            [("stream", {"a": 1}, b'{"a":1}'), ("stream", {"b": 2}, b'{"b": 2}'), ("end",)],
        )
        self.assertFalse(self.runtime.is_open("s"))

    def test_error_then_end(self):
        """An error is delivered once; the SDK's end after it is dropped."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.runtime.error("s", "ValueError", "bad", {"traceback": "t"})
        self.runtime.end("s")
        self.assertEqual(self.listener.calls, [("error", "ValueError", "bad", {"traceback": "t"})])

    def test_invoke(self):
        """A pushed invoke reaches the listener and leaves the session open."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.runtime.invoke("s", {"type": "storage", "backwards_request_id": "b", "request": {}})
        self.assertEqual(self.listener.calls, [("invoke", {"type": "storage", "backwards_request_id": "b", "request": {}})])
        self.assertTrue(self.runtime.is_open("s"))

    def test_send_recorded(self):
        """send() records messages for open sessions."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.runtime.send("s", {"event": "backwards_response"})
        self.assertEqual(self.runtime.sent, [("s", {"event": "backwards_response"})])

    def test_send_to_closed_session_fails(self):
        """send() to a session that is not open raises ConnectionClosedError."""
        self.assertRaises(errors.ConnectionClosedError, self.runtime.send, "nope", {})
        self.assertEqual(self.runtime.sent, [])

    def test_not_ready(self):
        """A runtime that is not ready refuses sessions and counts the refusals."""
        self.runtime.ready = False
        self.assertFalse(self.runtime.is_ready())
        exc = self.assertRaises(errors.InternalServerError, self.runtime.open_session, "s", request("s"), self.listener)
        self.assertEqual(exc.message, "failed to get plugin runtime")
        self.assertEqual((self.runtime.refusals, self.runtime.requests), (1, []))
        self.runtime.ready = True
        self.runtime.open_session("s", request("s"), self.listener)
        self.assertEqual(self.runtime.session_ids, ["s"])

    def test_close_stops_routing(self):
        """A closed handle gets nothing more."""
        handle = self.runtime.open_session("s", request("s"), self.listener)
        handle.close()
        self.runtime.stream("s", {"a": 1})
        self.assertEqual(self.listener.calls, [])

    def test_session_timeout(self):
        """With a session_timeout, open sessions are killed by timeout."""
        runtime = FakeRuntime(self.clock, IDENTIFIER, session_timeout=5.0)
        runtime.open_session("s", request("s"), self.listener)
        self.clock.advance(5.0)
        self.assertEqual(self.listener.calls, [("error", "PluginDaemonInternalServerError", "killed by timeout", None)])

    def test_script_plays_one_turn_later(self):
        """A scripted action is answered one reactor turn after the session opens."""
        self.runtime.script("invoke_tool", [("stream", {"a": 1}), ("end", {})])
        self.runtime.open_session("s", request("s"), self.listener)
        self.assertEqual(self.listener.calls, [])
        self.clock.advance(0)
        self.assertEqual(self.listener.calls, [("stream", {"a": 1}, orjson.dumps({"a": 1})), ("end",)])

    def test_script_by_action_and_default(self):
        """Action scripts win over the default script; a function script sees the request."""
        self.runtime.script(None, lambda req: [("stream", {"session": req["session_id"]}), ("end", {})])
        self.runtime.script("invoke_llm", [("error", {"error_type": "E", "message": "m", "args": None})])
        other = RecordingListener()
        self.runtime.open_session("s1", request("s1"), self.listener)
        self.runtime.open_session("s2", request("s2", "invoke_llm"), other)
        self.clock.advance(0)
        self.assertEqual(self.listener.calls[0][1], {"session": "s1"})
        self.assertEqual(other.calls, [("error", "E", "m", None)])

    def test_stop_fails_sessions(self):
        """stop() fails open sessions with ConnectionClosedError and refuses new ones."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.successResultOf(self.runtime.stop())
        self.assertEqual(self.listener.calls, [("error", "ConnectionClosedError", "plugin runtime stopped", None)])
        self.assertFalse(self.runtime.is_ready())

    def test_stop_with_reason(self):
        """stop(drain_timeout, reason) records the call and fails open sessions with the reason as a -500."""
        self.runtime.open_session("s", request("s"), self.listener)
        self.successResultOf(self.runtime.stop(drain_timeout=8, reason="shutting down"))
        self.assertEqual(self.runtime.stop_calls, [(8, "shutting down")])
        self.assertEqual(self.listener.calls, [("error", "PluginDaemonInternalServerError", "shutting down", None)])

    def test_becoming_ready_calls_on_ready(self):
        """Setting ready from false to true calls on_ready once; other changes do not."""
        told = []
        self.runtime.on_ready = told.append
        self.runtime.ready = True
        self.runtime.ready = False
        self.assertEqual(told, [])
        self.runtime.ready = True
        self.assertEqual(told, [self.runtime])
