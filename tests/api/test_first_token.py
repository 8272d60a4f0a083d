"""
The first-token contract of whats-new.md §2.4 on both stacks (the dispatch
channel and twisted.web), over fakes: nothing -- not even the response
head -- is written before the plugin's first chunk, and each chunk is
written within the reactor turn after it arrives; unknown fields of
``data`` reach the plugin unchanged.  The same over real sockets with a
real plugin is in tests/test_dispatch_end_to_end.py.
"""

from __future__ import annotations

import orjson

from difydaemon.api import sse
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.test_dispatch import LLM_DATA, TEXT_HI, TEXT_HO, TOOL_DATA, DispatchHarness
from tests.api.test_dispatch_channel import Connection, post


UNKNOWN_FIELDS = {
    "first_token_timeout": 2.5,
    "tool_choice": {"mode": "tool", "name": "get_weather"},
    "some_future_field": {"nested": [1, 2.25, "x", None, True], "big": 12345678901234567},
}


class FirstTokenTestsMixin:
    """Both stacks write nothing early and each chunk at once; ``lean`` picks the stack."""

    lean: bool

    def test_nothing_before_the_first_chunk(self):
        """However long the plugin takes, not a byte is written before its first chunk."""
        connection = Connection(self, lean=self.lean, script=False)
        connection.send(post())
        for _ in range(100):
            connection.clock.advance(0)
        connection.clock.advance(300)
        self.assertEqual(connection.transport.value(), b"")
        runtime = connection.daemon.runtime
        runtime.stream(runtime.last_session_id, TEXT_HI)
        connection.clock.advance(0)
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw)
        self.assertTrue(raw.endswith(sse.success_item(orjson.dumps(TEXT_HI)) + b"\r\n"), raw)

    def test_each_chunk_written_the_turn_after_it_arrives(self):
        """Every chunk is on the transport one reactor turn after the plugin sent it, long before the end."""
        connection = Connection(self, lean=self.lean, script=False)
        connection.send(post())
        runtime = connection.daemon.runtime
        session = runtime.last_session_id
        for chunk in (TEXT_HI, TEXT_HO, TEXT_HI):
            runtime.stream(session, chunk)
            connection.clock.advance(0)
            self.assertTrue(connection.transport.value().endswith(sse.success_item(orjson.dumps(chunk)) + b"\r\n"))
        self.assertNotIn(b"\r\n0\r\n\r\n", connection.transport.value())


class DispatchChannelFirstTokenTests(FirstTokenTestsMixin, SynchronousTestCase):
    """The first-token contract on the dispatch channel."""

    lean = True


class TwistedWebFirstTokenTests(FirstTokenTestsMixin, SynchronousTestCase):
    """The first-token contract on twisted.web."""

    lean = False


class UnknownFieldsTests(SynchronousTestCase):
    """Fields of ``data`` the daemon does not know are passed on as sent."""

    def test_llm_invoke(self):
        """first_token_timeout, tool_choice and a future field reach the plugin unchanged on llm/invoke."""
        daemon = DispatchHarness(self)
        daemon.open("llm/invoke", dict(LLM_DATA, **UNKNOWN_FIELDS))
        data = daemon.runtime.requests[0]["data"]
        self.assertEqual({key: data[key] for key in UNKNOWN_FIELDS}, UNKNOWN_FIELDS)

    def test_tool_invoke(self):
        """Unknown fields reach the plugin unchanged on tool/invoke too."""
        daemon = DispatchHarness(self)
        daemon.open("tool/invoke", dict(TOOL_DATA, **UNKNOWN_FIELDS))
        data = daemon.runtime.requests[0]["data"]
        self.assertEqual({key: data[key] for key in UNKNOWN_FIELDS}, UNKNOWN_FIELDS)
