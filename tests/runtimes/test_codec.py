"""Tests for difydaemon.runtimes.codec: the plugin stdio wire format."""

from __future__ import annotations

import orjson

from difydaemon.runtimes.codec import (
    HEARTBEAT,
    ForeignLine,
    Heartbeat,
    Log,
    MalformedLine,
    OversizedLine,
    PluginErrorEvent,
    PluginOutputDecoder,
    SessionMessage,
    encode_request,
)
from difydaemon.testing.cases import SynchronousTestCase

SID = "11111111-2222-3333-4444-555555555555"

MANIFEST_LINE = (
    b'{"version":"0.0.1","type":"plugin","author":"acme","name":"echo",'
    b'"label":{"en_US":"Echo"},"plugins":{"tools":["provider/echo.yaml"]},'
    b'"meta":{"runner":{"language":"python","version":"3.12","entrypoint":"main"}}}'
)
LOG_LINE = (
    b'{"event": "log", "data": {"level": "INFO", "message": "Installed tool: echo",'
    b' "timestamp": 1795559969.905}}'
)
HEARTBEAT_LINE = b'{"event":"heartbeat","session_id":null,"data":{}}'
TEXT_CHUNK = b'{"type":"text","message":{"text":"h\xc3\xa9 \\"q\\" }}"},"meta":null}'
STREAM_LINE = (
    b'{"event":"session","session_id":"' + SID.encode() + b'","data":{"type":"stream","data":'
    + TEXT_CHUNK
    + b"}}"
)
JSON_CHUNK = b'{"type":"json","message":{"json_object":{"echo":"hi","length":2}},"meta":null}'
JSON_STREAM_LINE = (
    b'{"event":"session","session_id":"' + SID.encode() + b'","data":{"type":"stream","data":'
    + JSON_CHUNK
    + b"}}"
)
INVOKE_LINE = (
    b'{"event":"session","session_id":"' + SID.encode() + b'","data":{"type":"invoke","data":'
    b'{"type":"storage","backwards_request_id":"abc","request":{"opt":"get","key":"k"}}}}'
)
ERROR_LINE = (
    b'{"event":"session","session_id":"' + SID.encode() + b'","data":{"type":"error","data":'
    b'{"error_type":"ValueError","message":"bad","args":{"traceback":"..."}}}}'
)
END_LINE = (
    b'{"event":"session","session_id":"' + SID.encode() + b'","data":{"type":"end","data":{}}}'
)
ERROR_EVENT_LINE = b'{"event":"error","session_id":null,"data":{"error":"boom"}}'


def _transcript() -> bytes:
    """What a real plugin writes: SDK framing, a log with spaces, a print."""
    return b"".join(
        [
            MANIFEST_LINE + b"\n\n",
            LOG_LINE + b"\n",
            HEARTBEAT_LINE + b"\n\n",
            STREAM_LINE + b"\n\n",
            b"hello from print()\n",
            JSON_STREAM_LINE + b"\n",
            b"\n\n\n",
            INVOKE_LINE + b"\n\n",
            ERROR_LINE + b"\n\n",
            END_LINE + b"\n\n",
            ERROR_EVENT_LINE + b"\n\n",
            HEARTBEAT_LINE + b"\n\n",
        ]
    )


def _expected() -> list:
    return [
        ForeignLine(MANIFEST_LINE, True),
        Log("INFO", "Installed tool: echo", 1795559969.905),
        HEARTBEAT,
        SessionMessage(SID, "stream", orjson.loads(TEXT_CHUNK), TEXT_CHUNK),
        ForeignLine(b"hello from print()", False),
        SessionMessage(SID, "stream", orjson.loads(JSON_CHUNK), JSON_CHUNK),
        SessionMessage(
            SID,
            "invoke",
            {"type": "storage", "backwards_request_id": "abc", "request": {"opt": "get", "key": "k"}},
            None,
        ),
        SessionMessage(
            SID,
            "error",
            {"error_type": "ValueError", "message": "bad", "args": {"traceback": "..."}},
            None,
        ),
        SessionMessage(SID, "end", {}, None),
        PluginErrorEvent({"error": "boom"}),
        HEARTBEAT,
    ]


def _decode(pieces, max_line_size=1 << 20) -> list:
    decoder = PluginOutputDecoder(max_line_size)
    items = []
    for piece in pieces:
        items.extend(decoder.feed(piece))
    return items


def _normalise(items, limit):
    """OversizedLine sizes depend on where reads split; keep only their kind."""
    normal = []
    for item in items:
        if isinstance(item, OversizedLine):
            assert item.size > limit, item
            normal.append("oversized")
        else:
            normal.append(item)
    return normal


class DecoderItemTests(SynchronousTestCase):
    """Each kind of stdout line becomes the right item."""

    def decode_one(self, line: bytes):
        items = _decode([line + b"\n\n"])
        self.assertEqual(len(items), 1, items)
        return items[0]

    def test_heartbeat(self):
        """The SDK's heartbeat line is a Heartbeat."""
        self.assertIsInstance(self.decode_one(HEARTBEAT_LINE), Heartbeat)

    def test_heartbeat_with_spaces(self):
        """A heartbeat written with spaces is still a Heartbeat."""
        item = self.decode_one(b'{"event": "heartbeat", "session_id": null, "data": {}}')
        self.assertIsInstance(item, Heartbeat)

    def test_log(self):
        """A log line with json.dumps spacing gives level, message and timestamp."""
        self.assertEqual(
            self.decode_one(LOG_LINE), Log("INFO", "Installed tool: echo", 1795559969.905)
        )

    def test_log_without_object(self):
        """A log event whose data is not an object is an INFO log of its text."""
        self.assertEqual(self.decode_one(b'{"event":"log","data":"plain"}'), Log("INFO", "plain", None))

    def test_plugin_error_event(self):
        """A top-level error event carries its data."""
        self.assertEqual(self.decode_one(ERROR_EVENT_LINE), PluginErrorEvent({"error": "boom"}))

    def test_compact_stream_raw_is_the_sent_bytes(self):
        """A compact stream message's raw_data is the chunk's bytes exactly as sent."""
        item = self.decode_one(STREAM_LINE)
        self.assertEqual(item, SessionMessage(SID, "stream", orjson.loads(TEXT_CHUNK), TEXT_CHUNK))
        self.assertEqual(item.data["message"]["text"], 'hé "q" }}')

    def test_spaced_stream_raw_is_compact_json(self):
        """A stream message with spaces gets raw_data re-encoded compactly."""
        line = (
            b'{"event": "session", "session_id": "s1", "data": {"type": "stream",'
            b' "data": {"result": true, "n": [1, 2]}}}'
        )
        item = self.decode_one(line)
        self.assertEqual(item, SessionMessage("s1", "stream", {"result": True, "n": [1, 2]}, b'{"result":true,"n":[1,2]}'))

    def test_compact_prefix_with_extra_key_is_not_sliced(self):
        """A line that only looks compact is decoded in full, not sliced."""
        line = b'{"event":"session","session_id":"s1","data":{"type":"stream","data":{"a":1},"more":{}}}'
        self.assertEqual(self.decode_one(line), SessionMessage("s1", "stream", {"a": 1}, b'{"a":1}'))

    def test_escaped_session_id(self):
        """A session id with a JSON escape is unescaped, not sliced raw."""
        line = b'{"event":"session","session_id":"s\\u0031","data":{"type":"stream","data":{"a":1}}}'
        self.assertEqual(self.decode_one(line), SessionMessage("s1", "stream", {"a": 1}, b'{"a":1}'))

    def test_end_error_invoke(self):
        """end, error and invoke messages keep their data and have no raw_data."""
        self.assertEqual(self.decode_one(END_LINE), SessionMessage(SID, "end", {}, None))
        self.assertEqual(self.decode_one(ERROR_LINE).kind, "error")
        self.assertEqual(self.decode_one(INVOKE_LINE).data["backwards_request_id"], "abc")

    def test_unknown_session_type_is_passed_on(self):
        """An unknown session message type reaches the session table to decide."""
        line = b'{"event":"session","session_id":"s1","data":{"type":"weird","data":{}}}'
        self.assertEqual(self.decode_one(line), SessionMessage("s1", "weird", {}, None))

    def test_session_without_type_or_data(self):
        """Session messages missing type, data or session_id are MalformedLine."""
        for line in [
            b'{"event":"session","session_id":"s1","data":{"data":{}}}',
            b'{"event":"session","session_id":"s1","data":{"type":"stream"}}',
            b'{"event":"session","session_id":"s1","data":null}',
            b'{"event":"session","session_id":null,"data":{"type":"end","data":{}}}',
            b'{"event":"session","data":{"type":"end","data":{}}}',
        ]:
            item = self.decode_one(line)
            self.assertIsInstance(item, MalformedLine, line)
            self.assertEqual(item.line, line)

    def test_foreign_lines(self):
        """Non-JSON, eventless and unknown-event lines are ForeignLine, never errors."""
        self.assertEqual(self.decode_one(b"Traceback (most recent"), ForeignLine(b"Traceback (most recent", False))
        self.assertEqual(self.decode_one(MANIFEST_LINE), ForeignLine(MANIFEST_LINE, True))
        self.assertEqual(self.decode_one(b'{"event":"mystery"}'), ForeignLine(b'{"event":"mystery"}', True))
        self.assertEqual(self.decode_one(b"[1,2]"), ForeignLine(b"[1,2]", True))

    def test_blank_and_crlf_lines(self):
        """Blank, whitespace-only and CRLF-terminated lines are tolerated."""
        items = _decode([b"\n \n\r\n" + HEARTBEAT_LINE + b"\r\n\n"])
        self.assertEqual(items, [HEARTBEAT])

    def test_single_newline_framing(self):
        """Messages ending in one newline (no blank line) are each decoded."""
        items = _decode([HEARTBEAT_LINE + b"\n" + END_LINE + b"\n"])
        self.assertEqual(items, [HEARTBEAT, SessionMessage(SID, "end", {}, None)])

    def test_incomplete_line_waits(self):
        """A line without its newline yields nothing until the newline comes."""
        decoder = PluginOutputDecoder(1024)
        self.assertEqual(decoder.feed(HEARTBEAT_LINE), [])
        self.assertEqual(decoder.feed(b"\n"), [HEARTBEAT])


class SplitTests(SynchronousTestCase):
    """The decoder's output does not depend on how reads split the bytes."""

    def test_transcript_in_one_read(self):
        """A realistic transcript in one read decodes to the expected items."""
        self.assertEqual(_decode([_transcript()]), _expected())

    def test_transcript_split_at_every_offset(self):
        """Splitting the transcript in two at any offset changes nothing."""
        data = _transcript()
        expected = _expected()
        for offset in range(len(data) + 1):
            self.assertEqual(_decode([data[:offset], data[offset:]]), expected, offset)

    def test_transcript_byte_by_byte(self):
        """Feeding one byte at a time changes nothing."""
        data = _transcript()
        self.assertEqual(_decode([data[i : i + 1] for i in range(len(data))]), _expected())

    def test_oversized_line_split_at_every_offset(self):
        """An oversized line in the middle gives one OversizedLine, then decoding goes on."""
        limit = 64
        data = HEARTBEAT_LINE + b"\n\n" + b"x" * 150 + b"\n\n" + END_LINE + b"\n\n"
        expected = [HEARTBEAT, "oversized", SessionMessage(SID, "end", {}, None)]
        self.assertEqual(_normalise(_decode([data], limit * 2), limit * 2), expected)
        for offset in range(len(data) + 1):
            items = _decode([data[:offset], data[offset:]], limit * 2)
            self.assertEqual(_normalise(items, limit * 2), expected, offset)
        byte_by_byte = _decode([data[i : i + 1] for i in range(len(data))], limit * 2)
        self.assertEqual(_normalise(byte_by_byte, limit * 2), expected)

    def test_oversized_line_reported_before_its_newline(self):
        """The OversizedLine comes as soon as the limit is passed, not at the newline."""
        decoder = PluginOutputDecoder(100)
        self.assertEqual(decoder.feed(b"y" * 60), [])
        self.assertEqual(decoder.feed(b"y" * 60), [OversizedLine(120)])
        self.assertEqual(decoder.feed(b"y" * 1000), [])
        self.assertEqual(decoder.feed(b"y\n" + HEARTBEAT_LINE + b"\n"), [HEARTBEAT])

    def test_complete_oversized_line_reports_its_size(self):
        """An oversized line that arrives whole is reported with its full length."""
        self.assertEqual(_decode([b"z" * 300 + b"\n"], 100), [OversizedLine(300)])

    def test_line_at_the_limit_is_accepted(self):
        """A line exactly max_line_size long is decoded."""
        head = b'{"event":"log","data":{"level":"INFO","message":"'
        filler = 200 - len(head) - 3
        line = head + b"m" * filler + b'"}}'
        self.assertEqual(len(line), 200)
        items = _decode([line[:150], line[150:] + b"\n"], 200)
        self.assertEqual(items, [Log("INFO", "m" * filler, None)])
        self.assertEqual(_decode([line[:150], line[150:] + b"\n"], 199), [OversizedLine(200)])

    def test_memory_stays_bounded(self):
        """The buffer never holds more than max_line_size bytes between reads."""
        limit = 1000
        decoder = PluginOutputDecoder(limit)
        sizes = []
        for _ in range(500):
            decoder.feed(b"q" * 97)
            sizes.append(decoder.buffered)
        decoder.feed(b"q" * 100_000)
        sizes.append(decoder.buffered)
        self.assertLessEqual(max(sizes), limit)
        self.assertEqual(decoder.buffered, 0)
        self.assertEqual(decoder.feed(b"\n" + HEARTBEAT_LINE + b"\n"), [HEARTBEAT])


class EncodeRequestTests(SynchronousTestCase):
    """Daemon -> plugin lines."""

    def test_spec_example(self):
        """The §7 request encodes to the exact bytes, keys in order, one newline."""
        request = {
            "session_id": SID,
            "conversation_id": None,
            "message_id": None,
            "app_id": None,
            "endpoint_id": None,
            "context": None,
            "event": "request",
            "data": {
                "action": "invoke_tool",
                "credential_type": "api-key",
                "credentials": {},
                "provider": "echo",
                "tool": "echo",
                "tool_parameters": {"text": "hi"},
                "type": "tool",
                "user_id": "u1",
            },
        }
        self.assertEqual(
            encode_request(request),
            b'{"session_id":"11111111-2222-3333-4444-555555555555","conversation_id":null,'
            b'"message_id":null,"app_id":null,"endpoint_id":null,"context":null,'
            b'"event":"request","data":{"action":"invoke_tool","credential_type":"api-key",'
            b'"credentials":{},"provider":"echo","tool":"echo","tool_parameters":{"text":"hi"},'
            b'"type":"tool","user_id":"u1"}}\n',
        )

    def test_non_ascii_and_newlines_in_values(self):
        """Non-ASCII stays UTF-8 and a newline inside a value is escaped."""
        line = encode_request({"data": {"text": "é\nx"}})
        self.assertEqual(line, '{"data":{"text":"é\\nx"}}\n'.encode())
        self.assertEqual(line.count(b"\n"), 1)


class GluedPrintTests(SynchronousTestCase):
    """Text printed without a newline right before a message loses neither."""

    def test_print_glued_before_a_stream_message(self):
        """``print("x", end="")`` then a stream chunk: the text, then the chunk, at every split."""
        data = b"hello there" + STREAM_LINE + b"\n\n" + END_LINE + b"\n"
        expected = [ForeignLine(b"hello there", False)] + _decode([STREAM_LINE + b"\n" + END_LINE + b"\n"])
        self.assertEqual(len(expected), 3)
        for offset in range(len(data) + 1):
            self.assertEqual(_decode([data[:offset], data[offset:]]), expected, offset)

    def test_print_glued_before_a_heartbeat_and_a_log(self):
        """The glued message may be any event: heartbeat, log."""
        self.assertEqual(
            _decode([b"oops" + HEARTBEAT_LINE + b"\n" + b"{{" + LOG_LINE + b"\n"]),
            [ForeignLine(b"oops", False), HEARTBEAT, ForeignLine(b"{{", False), _decode([LOG_LINE + b"\n"])[0]],
        )

    def test_text_mentioning_event_stays_text(self):
        """A line that merely contains ``{"event"`` but no message after it is one ForeignLine."""
        line = b'printed {"event": not json'
        self.assertEqual(_decode([line + b"\n"]), [ForeignLine(line, False)])
        line = b'x{"event":"mystery"}'
        self.assertEqual(_decode([line + b"\n"]), [ForeignLine(line, False)])
