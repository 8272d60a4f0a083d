"""Tests for difydaemon.runtimes.serverless.launch_stream: the connector's launch stream."""

from __future__ import annotations

from difydaemon.runtimes.serverless.launch_stream import (
    BUILDING_MESSAGE,
    DONE,
    ERROR,
    FUNCTION,
    FUNCTION_URL,
    IGNORED,
    INFO,
    LAUNCHING_MESSAGE,
    LaunchEvent,
    LaunchStreamDecoder,
    decode_launch_line,
    parse_run_message,
)
from difydaemon.testing.cases import SynchronousTestCase

STREAM = (
    b'data: {"Stage":"healthz","State":"success","Obj":"","Message":""}\n'
    b"event: progress\n"
    b"\n"
    b'data: {"Stage":"build","State":"running","Obj":"","Message":"uv sync"}\n'
    b'{"Stage":"run","State":"running","Obj":"","Message":"starting"}\r\n'
    b"not json at all\n"
    b'data: {"Stage":"run","State":"success","Obj":"","Message":"endpoint=http://127.0.0.1:9/f,name=fn-1,id=7"}\n'
    b'data: {"Stage":"end","State":"success","Obj":"","Message":"","Extra":1}'
)

EXPECTED = [
    LaunchEvent(INFO, BUILDING_MESSAGE, "uv sync"),
    LaunchEvent(INFO, LAUNCHING_MESSAGE, "starting"),
    LaunchEvent(IGNORED, "not json at all"),
    LaunchEvent(FUNCTION, "fn-1"),
    LaunchEvent(FUNCTION_URL, "http://127.0.0.1:9/f"),
    LaunchEvent(DONE, ""),
]


def decode_all(*pieces: bytes) -> list:
    decoder = LaunchStreamDecoder()
    events = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    return events + decoder.finish()


class LaunchStreamTests(SynchronousTestCase):
    """The launch stream mapping of serverless.md §2.3."""

    def test_whole(self):
        """A stream with every kind of line gives Go's events, in order."""
        self.assertEqual(decode_all(STREAM), EXPECTED)

    def test_every_offset(self):
        """The stream cut in two at every offset gives the same events."""
        for cut in range(len(STREAM) + 1):
            self.assertEqual(decode_all(STREAM[:cut], STREAM[cut:]), EXPECTED, cut)

    def test_byte_by_byte(self):
        """The stream fed one byte at a time gives the same events."""
        self.assertEqual(decode_all(*[STREAM[i : i + 1] for i in range(len(STREAM))]), EXPECTED)

    def test_failed_any_stage(self):
        """State failed is an error with the connector's message, whatever the stage."""
        for stage in ("build", "run", "end", "healthz"):
            line = b'{"Stage":"%s","State":"failed","Obj":"","Message":"no space left"}' % stage.encode()
            self.assertEqual(decode_launch_line(line), [LaunchEvent(ERROR, "no space left")])

    def test_bad_run_message(self):
        """A run message piece without exactly one '=' is an error."""
        line = b'{"Stage":"run","State":"success","Message":"endpoint=http://x/?a=b,name=f"}'
        [event] = decode_launch_line(line)
        self.assertEqual(event.kind, ERROR)
        self.assertIn("invalid key-value pair", event.text)

    def test_empty_run_message(self):
        """An empty run message gives an empty name and URL (the end check fails later)."""
        line = b'{"Stage":"run","State":"success","Message":""}'
        self.assertEqual(decode_launch_line(line), [LaunchEvent(FUNCTION, ""), LaunchEvent(FUNCTION_URL, "")])

    def test_parse_run_message(self):
        """Pairs are split on ',' then '=' and trimmed; unknown keys kept, id optional."""
        self.assertEqual(
            parse_run_message(" endpoint = http://f:1/a , name=fn "), {"endpoint": "http://f:1/a", "name": "fn"}
        )
        self.assertRaises(ValueError, parse_run_message, "endpoint")

    def test_oversized_line(self):
        """A line over the limit is one error, its rest skipped, and the next line decodes."""
        decoder = LaunchStreamDecoder(max_line_size=40)
        events = decoder.feed(b"x" * 30)
        events += decoder.feed(b"y" * 30)
        events += decoder.feed(b"zzz\n" + b'{"Stage":"end","State":"success"}\n')
        self.assertEqual([e.kind for e in events], [ERROR, DONE])
        self.assertIn("longer than 40 bytes", events[0].text)

    def test_non_object_json(self):
        """JSON that is not a launch object is ignored, not an error."""
        self.assertEqual(decode_launch_line(b"[1,2]"), [LaunchEvent(IGNORED, "[1,2]")])
