"""
The connector's launch stream (``serverless.md`` §2.3), decoded without I/O.

The body of ``POST /v1/launch`` is a stream of lines, each (after an
optional ``data:`` prefix) one JSON object ``{"Stage","State","Obj",
"Message"}``.  :class:`LaunchStreamDecoder` turns the bytes, cut anywhere,
into :class:`LaunchEvent` values in the order of Go's mapping.
"""

from __future__ import annotations

import orjson
from attrs import frozen

#: the longest launch line accepted (Go's scanner buffer)
MAX_LAUNCH_LINE = 30 * 1024 * 1024

INFO = "info"
ERROR = "error"
FUNCTION = "function"
FUNCTION_URL = "function_url"
DONE = "done"
#: a line that is not launch JSON: logged and skipped
IGNORED = "ignored"

BUILDING_MESSAGE = "Building plugin..."
LAUNCHING_MESSAGE = "Launching plugin..."


@frozen
class LaunchEvent:
    """
    One thing the launch stream said.

    :ivar kind: ``info``, ``error``, ``function``, ``function_url``,
        ``done`` or ``ignored``.
    :ivar text: the progress text, the connector's error message, the
        function name or URL, or the ignored line.
    :ivar detail: for ``info``, the connector's own ``Message`` (may be
        empty).
    """

    kind: str
    text: str
    detail: str = ""


def parse_run_message(message: str) -> dict:
    """
    The ``key=value`` pairs of a ``run``/``success`` message
    (``endpoint=http://...,name=fn,id=1``): split on ``,`` then on ``=``,
    trimmed.  An empty message gives ``{}``.

    :raises ValueError: when a piece has no ``=`` or more than one.
    """
    pairs: dict = {}
    if not message.strip():
        return pairs
    for piece in message.split(","):
        parts = piece.split("=")
        if len(parts) != 2:
            raise ValueError(f"invalid key-value pair: {piece!r}")
        pairs[parts[0].strip()] = parts[1].strip()
    return pairs


def decode_launch_line(line: bytes) -> list[LaunchEvent]:
    """The events of one launch line (without its newline)."""
    line = line.strip()
    if line.startswith(b"data:"):
        line = line[5:].strip()
    if not line or line.startswith(b"event:"):
        return []
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError:
        item = None
    if not isinstance(item, dict) or not isinstance(item.get("Stage", ""), str):
        return [LaunchEvent(IGNORED, line.decode("utf-8", "replace"))]
    stage = item.get("Stage", "")
    state = item.get("State", "")
    message = item.get("Message", "")
    message = message if isinstance(message, str) else str(message)
    if state == "failed":
        return [LaunchEvent(ERROR, message)]
    if stage in ("start", "build"):
        return [LaunchEvent(INFO, BUILDING_MESSAGE, message)]
    if stage == "run":
        if state != "success":
            return [LaunchEvent(INFO, LAUNCHING_MESSAGE, message)]
        try:
            pairs = parse_run_message(message)
        except ValueError as exc:
            return [LaunchEvent(ERROR, f"failed to parse the function of the launch: {exc}")]
        return [LaunchEvent(FUNCTION, pairs.get("name", "")), LaunchEvent(FUNCTION_URL, pairs.get("endpoint", ""))]
    if stage == "end":
        return [LaunchEvent(DONE, message)]
    return []


class LaunchStreamDecoder:
    """
    Incremental decoder of a launch stream: feed it bytes as they come.

    A line longer than ``max_line_size`` is an ``error`` event (Go's scanner
    would stop there too); its rest is skipped.
    """

    def __init__(self, max_line_size: int = MAX_LAUNCH_LINE) -> None:
        self.max_line_size = max_line_size
        self._buffer = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[LaunchEvent]:
        """The events of the lines ``data`` completes."""
        events: list[LaunchEvent] = []
        buffer = self._buffer + data
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                break
            line, buffer = buffer[:newline], buffer[newline + 1 :]
            if self._discarding:
                self._discarding = False
                continue
            events.extend(self._line(line))
        if len(buffer) > self.max_line_size and not self._discarding:
            events.append(self._oversized())
            self._discarding = True
        self._buffer = b"" if self._discarding else buffer
        return events

    def finish(self) -> list[LaunchEvent]:
        """The events of a last line without newline, at the end of the body."""
        buffer, self._buffer = self._buffer, b""
        if self._discarding:
            return []
        return self._line(buffer)

    def _line(self, line: bytes) -> list[LaunchEvent]:
        if len(line) > self.max_line_size:
            return [self._oversized()]
        return decode_launch_line(line)

    def _oversized(self) -> LaunchEvent:
        return LaunchEvent(ERROR, f"launch stream line longer than {self.max_line_size} bytes")
