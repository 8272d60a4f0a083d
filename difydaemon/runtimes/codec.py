"""
The stdio wire format between the daemon and a plugin (``runtimes.md`` §0).

Pure and incremental: :class:`PluginOutputDecoder` turns the bytes a plugin
writes on stdout into typed items, :func:`encode_request` turns a daemon ->
plugin message into the bytes of one line.  Nothing here does I/O, logs or
keeps time; the process protocol decides what each item means.

The decoder is on the hot path of every streamed chunk, so it splits with
``bytes.find``/``bytes.split`` and recognises the SDK's exact compact shape
of a stream message, parsing only the inner chunk and handing its original
bytes on without re-encoding them.
"""

from __future__ import annotations

import orjson
from attrs import define, frozen

#: The SDK writes every message as compact JSON with keys in this order.
_STREAM_PREFIX = b'{"event":"session","session_id":"'
_STREAM_MIDDLE = b'","data":{"type":"stream","data":'
_ID_START = len(_STREAM_PREFIX)
_MIDDLE_LENGTH = len(_STREAM_MIDDLE)
_loads = orjson.loads
_HEARTBEAT_LINE = b'{"event":"heartbeat","session_id":null,"data":{}}'
#: where a message glued after a print() starts
_EVENT_START = b'{"event"'

SESSION_MESSAGE_KINDS = frozenset({"stream", "end", "error", "invoke"})


@frozen
class Heartbeat:
    """The plugin is alive; the first one means it is ready."""


#: Heartbeats carry nothing, so one instance serves them all.
HEARTBEAT = Heartbeat()


@frozen
class Log:
    """
    One ``log`` event from the plugin's Python ``logging``.

    :ivar level: the Python level name as sent (``INFO``, ``WARNING``, ...).
    :ivar timestamp: the plugin's Unix time, or None if it sent none.
    """

    level: str
    message: str
    timestamp: float | None


@frozen
class PluginErrorEvent:
    """A top-level ``error`` event: logged, closes no session."""

    data: object


# Not frozen: a frozen attrs class costs 0.4 µs more to build, which is
# 15 % of the decoder's budget for one streamed chunk.  Nobody mutates it.
@define
class SessionMessage:
    """
    One ``session`` event.

    :ivar kind: ``stream``, ``end``, ``error``, ``invoke`` (or whatever
        unknown type the plugin sent; the session table decides).
    :ivar data: the parsed inner ``data``.
    :ivar raw_data: for ``stream`` messages, the compact JSON bytes of
        ``data``; None for the other kinds.
    """

    session_id: str
    kind: str
    data: object
    raw_data: bytes | None


@frozen
class ForeignLine:
    """
    A stdout line that is not a daemon event: the SDK's manifest dump, a
    ``print()``, a JSON object with no or an unknown ``event``.

    :ivar is_json: whether the line parsed as JSON (``print()`` output
        usually does not).
    """

    line: bytes
    is_json: bool


@frozen
class MalformedLine:
    """A ``session`` event that the daemon must reject (no id, type or data)."""

    line: bytes
    reason: str


@frozen
class OversizedLine:
    """
    A line went past the decoder's limit; the rest of it is discarded.

    :ivar size: how many bytes of the line had been seen when the limit was
        crossed -- a lower bound of its length, since the decoder reports it
        at once instead of waiting for a newline that may never come.
    """

    size: int


class PluginOutputDecoder:
    """
    Incremental decoder of a plugin's stdout.

    Lines end with ``\\n``; blank lines (the SDK follows every message with
    one) are skipped.  At most ``max_line_size`` bytes of an unfinished line
    are kept between calls to :meth:`feed`: a longer line produces one
    :class:`OversizedLine` and its bytes are dropped up to the next newline.

    :param max_line_size: the longest line accepted, newline excluded
        (``PLUGIN_RUNTIME_MAX_BUFFER_SIZE``).
    """

    def __init__(self, max_line_size: int) -> None:
        self.max_line_size = max_line_size
        # The unfinished line, as the reads that brought it.  Joined only
        # once its newline arrives, so a long line costs one copy.
        self._parts: list[bytes] = []
        self._pending = 0
        self._discarding = False

    @property
    def buffered(self) -> int:
        """How many bytes of an unfinished line are held."""
        return self._pending

    def feed(self, data: bytes) -> list:
        """Decode the complete lines ``data`` finishes; keep the rest."""
        items: list = []
        if self._discarding or self._parts:
            newline = data.find(b"\n")
            if newline < 0:
                if not self._discarding:
                    self._hold(data, items)
                return items
            if self._discarding:
                self._discarding = False
            else:
                self._parts.append(data[:newline])
                line = b"".join(self._parts)
                self._parts = []
                self._pending = 0
                if len(line) > self.max_line_size:
                    items.append(OversizedLine(len(line)))
                else:
                    _decode_into(line, items.append)
            data = data[newline + 1 :]
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.max_line_size
        append = items.append
        for line in lines:
            if not line:
                continue
            if len(line) > limit:
                append(OversizedLine(len(line)))
                continue
            # The stream message skips a call level: it is nearly every line.
            if line.startswith(_STREAM_PREFIX):
                item = _decode_compact_stream(line)
                if item is not None:
                    append(item)
                    continue
            _decode_into(line, append)
        if tail:
            self._hold(tail, items)
        return items

    def _hold(self, data: bytes, items: list) -> None:
        pending = self._pending + len(data)
        if pending > self.max_line_size:
            items.append(OversizedLine(pending))
            self._parts = []
            self._pending = 0
            self._discarding = True
        else:
            self._parts.append(data)
            self._pending = pending

def _decode_compact_stream(line: bytes) -> SessionMessage | None:
    """
    The SDK's exact compact stream message, or None to take the slow path.

    Such a line is the prefix, a session id free of escapes, the middle, one
    JSON value and ``}}``.  If that value parses, the whole line is exactly
    that object, so the value's bytes are the chunk's compact JSON as sent.
    """
    id_end = line.find(b'"', _ID_START)
    if not (line.startswith(_STREAM_MIDDLE, id_end) and line.endswith(b"}}")):
        return None
    raw_id = line[_ID_START:id_end]
    if b"\\" in raw_id:
        return None
    raw = line[id_end + _MIDDLE_LENGTH : -2]
    try:
        return SessionMessage(raw_id.decode(), "stream", _loads(raw), raw)
    except ValueError:
        # orjson's and the UTF-8 codec's errors are both ValueErrors.
        return None


def _decode_into(line: bytes, append) -> None:
    """
    Decode one line and ``append`` its items: usually one, two when text
    with no newline of its own (``print(..., end="")``) was glued before a
    message, which must not be lost -- the text becomes a
    :class:`ForeignLine` of its own, then comes the message.
    """
    item = decode_line(line)
    if item is None:
        return
    if type(item) is ForeignLine and not item.is_json:
        start = line.find(_EVENT_START, 1)
        if start > 0:
            message = decode_line(line[start:])
            if message is not None and type(message) is not ForeignLine:
                append(ForeignLine(line[:start], False))
                append(message)
                return
    append(item)


def decode_line(line: bytes):
    """
    Decode one complete, non-blank stdout line (no newline) into an item.

    Returns None for whitespace-only lines.
    """
    if line.startswith(_STREAM_PREFIX):
        item = _decode_compact_stream(line)
        if item is not None:
            return item
    elif line == _HEARTBEAT_LINE:
        return HEARTBEAT
    try:
        message = _loads(line)
    except orjson.JSONDecodeError:
        if line.isspace():
            return None
        return ForeignLine(line, False)
    if not isinstance(message, dict):
        return ForeignLine(line, True)
    event = message.get("event")
    if event == "session":
        return _decode_session(line, message)
    if event == "heartbeat":
        return HEARTBEAT
    if event == "log":
        return _decode_log(message.get("data"))
    if event == "error":
        return PluginErrorEvent(message.get("data"))
    return ForeignLine(line, True)


def _decode_session(line: bytes, message: dict):
    session_id = message.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        return MalformedLine(line, "session message without session_id")
    body = message.get("data")
    if not isinstance(body, dict) or "type" not in body or "data" not in body:
        return MalformedLine(line, "session message without type or data")
    kind = body["type"]
    if not isinstance(kind, str):
        return MalformedLine(line, "session message type is not a string")
    data = body["data"]
    raw = orjson.dumps(data) if kind == "stream" else None
    return SessionMessage(session_id, kind, data, raw)


def _decode_log(data) -> Log:
    if not isinstance(data, dict):
        return Log("INFO", str(data), None)
    timestamp = data.get("timestamp")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        timestamp = None
    level = data.get("level")
    message = data.get("message")
    return Log(
        level if isinstance(level, str) else "INFO",
        message if isinstance(message, str) else str(message),
        timestamp,
    )


def encode_request(message: dict) -> bytes:
    """
    One daemon -> plugin line (``runtimes.md`` §0.2): compact JSON, keys in
    the dict's order, followed by exactly one ``\\n``.
    """
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)
