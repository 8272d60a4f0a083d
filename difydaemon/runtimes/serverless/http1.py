"""
The HTTP/1.1 of one ``/invoke`` call, encoded and decoded without I/O.

The daemon speaks to functions in one shape only: a ``POST`` with a JSON
body of known length, answered by a status, a few headers and a body framed
by its length, by chunks or by the end of the connection.  twisted.web's
Agent handles every shape HTTP allows, at the price of several times the
CPU of the rest of a serverless dispatch (``Headers``, body producers, a
line receiver per response); :func:`encode_post` and
:class:`ResponseDecoder` are the whole of what this client needs.
"""

from __future__ import annotations

import re

from attrs import frozen

#: bytes of a response head (status line and headers) at most
MAX_HEAD_SIZE = 64 * 1024
#: headers of a response head at most
MAX_HEADERS = 128
#: bytes of a chunk-size line at most (a size, extensions ignored)
MAX_CHUNK_LINE = 4096

_FORBIDDEN = re.compile(rb"[\r\n\x00]")


class MalformedResponse(Exception):
    """The function's answer is not HTTP/1.x as this client reads it."""


@frozen
class ResponseHead:
    """
    The status line and headers of a response.

    :ivar headers: ``(lowercased name, value)`` pairs in order.
    """

    version: bytes
    code: int
    phrase: bytes
    headers: tuple

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lowercase)."""
        return [value for key, value in self.headers if key == name]


@frozen
class ResponseEnd:
    """
    The body is complete.

    :ivar reusable: the connection may carry another request (HTTP/1.1,
        no ``Connection: close``, a body framed by length or chunks).
    """

    reusable: bool


def encode_post(host: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """
    A whole ``POST`` request: head and body in one buffer, one ``send``.

    :param host: the ``Host`` header (``name`` or ``name:port``).
    :param target: the request target (path and query).
    :param headers: further headers, written as given.
    :raises ValueError: a header name or value holds CR, LF or NUL (what
        would let a value smuggle another header or request).
    """
    return encode_post_from(post_line(host, target), headers, body)


def post_line(host: bytes, target: bytes) -> bytes:
    """
    The request line and ``Host`` header of a ``POST``, checked once: a
    client sends many requests to the same few targets
    (:func:`encode_post_from`).

    :raises ValueError: the host or target holds CR, LF or NUL, or the
        target a space.
    """
    if _FORBIDDEN.search(host + target) is not None or b" " in target:
        raise ValueError("a request header or the target holds a forbidden character")
    return b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (target, host)


def encode_post_from(line: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """
    :func:`encode_post` after a :func:`post_line`: only the headers are checked.

    :raises ValueError: a header name or value holds CR, LF or NUL.
    """
    head = b"".join([b"%s: %s\r\n" % pair for pair in headers])
    # the head holds one CR and one LF per header, ours: any other CR, LF
    # or NUL the caller gave would smuggle a header or a request
    count = len(headers)
    if head.count(b"\r") != count or head.count(b"\n") != count or b"\x00" in head:
        raise ValueError("a request header or the target holds a forbidden character")
    return b"%s%sContent-Length: %d\r\n\r\n%s" % (line, head, len(body), body)


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseDecoder:
    """
    Incremental decoder of one response to a ``POST``.

    :meth:`feed` returns what the bytes complete, in order: one
    :class:`ResponseHead`, body pieces (``bytes``, one per feed at most),
    then one :class:`ResponseEnd`.  Bytes after the end are kept in
    :attr:`extra` (a well-behaved function sends none).  Informational
    (1xx) heads are skipped.

    :raises MalformedResponse: from :meth:`feed` or :meth:`connection_lost`;
        the decoder is then useless and the connection must be closed.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._state = _HEAD
        self._remaining = 0
        self._reusable = False
        #: bytes received after the response ended
        self.extra = b""

    @property
    def done(self) -> bool:
        """True once :class:`ResponseEnd` was returned."""
        return self._state == _DONE

    @property
    def started(self) -> bool:
        """True once the head was returned."""
        return self._state != _HEAD

    def feed(self, data: bytes) -> list:
        """The events ``data`` completes."""
        if self._state == _DONE:
            self.extra += data
            return []
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        out: list = []
        body: list[bytes] = []
        position = 0
        end = len(buffer)
        while position < end or self._state == _DONE:
            state = self._state
            if state == _DONE:
                self.extra = buffer[position:]
                break
            if state == _LENGTH:
                take = min(self._remaining, end - position)
                body.append(buffer[position:position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._finish(body, out)
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - position)
                body.append(buffer[position:position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_CRLF
            elif state == _UNTIL_CLOSE:
                body.append(buffer[position:])
                position = end
            elif state == _CHUNK_CRLF:
                if end - position < 2:
                    break
                if buffer[position:position + 2] != b"\r\n":
                    raise MalformedResponse("a chunk does not end with CRLF")
                position += 2
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                # the SDK sends a chunk per event and per blank line: read
                # every whole chunk of the buffer in this one loop
                while True:
                    eol = buffer.find(b"\r\n", position, position + MAX_CHUNK_LINE)
                    if eol < 0:
                        if end - position >= MAX_CHUNK_LINE:
                            raise MalformedResponse("a chunk-size line is too long")
                        break
                    line = buffer[position:eol]
                    size = _SIZES.get(line)
                    if size is None:
                        size = _chunk_size(line)
                    start = eol + 2
                    if not size:
                        position = start
                        self._state = _TRAILERS
                        break
                    stop = start + size
                    if stop + 2 > end:
                        position = start
                        self._remaining = size
                        self._state = _CHUNK_DATA
                        break
                    if buffer[stop:stop + 2] != b"\r\n":
                        raise MalformedResponse("a chunk does not end with CRLF")
                    body.append(buffer[start:stop])
                    position = stop + 2
                if self._state == _CHUNK_SIZE:
                    break
            elif state == _TRAILERS:
                eol = buffer.find(b"\r\n", position)
                if eol < 0:
                    if end - position >= MAX_HEAD_SIZE:
                        raise MalformedResponse("the trailers are too long")
                    break
                line, position = buffer[position:eol], eol + 2
                if not line:
                    self._finish(body, out)
            else:  # _HEAD
                eoh = buffer.find(b"\r\n\r\n", position)
                if eoh < 0:
                    if end - position > MAX_HEAD_SIZE:
                        raise MalformedResponse("the response head is too long")
                    break
                if eoh - position > MAX_HEAD_SIZE:
                    raise MalformedResponse("the response head is too long")
                head, framing = _head_of(buffer[position:eoh])
                position = eoh + 4
                if 100 <= head.code < 200:
                    continue  # an interim answer; the real one follows
                out.append(head)
                self._frame(head, framing, body, out)
        if position < end and self._state != _DONE:
            self._buffer = buffer[position:]
        if body and self._state != _DONE:
            joined = b"".join(body)
            if joined:
                out.append(joined)
        return out

    def connection_lost(self) -> list:
        """
        The connection closed: the end of a body read until close, else
        nothing.

        :raises MalformedResponse: the response was cut short.
        """
        if self._state == _DONE:
            return []
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            return [ResponseEnd(False)]
        if self._state == _HEAD:
            raise MalformedResponse("the connection closed before a response")
        raise MalformedResponse("the connection closed in the middle of the body")

    def _frame(self, head: ResponseHead, framing: tuple, body: list, out: list) -> None:
        keep_alive, chunked, length = framing
        self._reusable = keep_alive
        if head.code in (204, 304):
            self._finish(body, out)
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if not length:
                self._finish(body, out)
        else:
            self._reusable = False
            self._state = _UNTIL_CLOSE

    def _finish(self, body: list, out: list) -> None:
        if body:
            joined = b"".join(body)
            body.clear()
            if joined:
                out.append(joined)
        self._state = _DONE
        out.append(ResponseEnd(self._reusable))


#: parsed heads by their bytes: a function answers every call with the same
#: head but for its ``Date``, so most heads are parsed once a second (heads
#: that differ on every call, with a request id, only cost a miss)
_HEADS: dict[bytes, tuple] = {}
_HEADS_KEPT = 256
#: bytes of a head kept at most (a function's usual head is ~150)
_HEAD_KEPT_SIZE = 1024


def _head_of(data: bytes) -> tuple:
    """``(ResponseHead, (keep_alive, chunked, length))`` of a head's bytes (CRLF CRLF excluded)."""
    found = _HEADS.get(data)
    if found is None:
        head = _parse_head(data)
        found = (head, _framing(head))
        if len(data) <= _HEAD_KEPT_SIZE:
            if len(_HEADS) >= _HEADS_KEPT:
                _HEADS.clear()
            _HEADS[data] = found
    return found


def _framing(head: ResponseHead) -> tuple:
    """``(keep_alive, chunked, length)``: how a head says its body is framed, and if the connection stays."""
    keep_alive = head.version == b"HTTP/1.1"
    length = None
    chunked = False
    for name, value in head.headers:
        if name == b"connection":
            tokens = [token.strip().lower() for token in value.split(b",")]
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"content-length":
            try:
                value_length = int(value.strip())
            except ValueError:
                raise MalformedResponse("a Content-Length is not a number") from None
            if value_length < 0 or (length is not None and length != value_length):
                raise MalformedResponse("the Content-Length is invalid")
            length = value_length
    return keep_alive, chunked, length


#: chunk sizes by their (short) size lines: a function's chunks come in a
#: handful of sizes (its events, the blank lines between them, the last
#: chunk), so a call's five or so size lines are dictionary hits; bounded,
#: and a bad line is never kept
_SIZES: dict[bytes, int] = {}
_SIZES_KEPT = 4096


def _chunk_size(line: bytes) -> int:
    """The size a chunk-size line gives (kept in ``_SIZES`` when the line is short)."""
    size_line = line
    if b";" in size_line:
        size_line = size_line.split(b";", 1)[0].rstrip(b" \t")
    if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
        raise MalformedResponse("a chunk size is not hexadecimal")
    size = int(size_line, 16)
    if len(line) <= 8 and len(_SIZES) < _SIZES_KEPT:
        _SIZES[line] = size
    return size


def _parse_head(data: bytes) -> ResponseHead:
    lines = data.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise MalformedResponse("the status line is not HTTP/1.x")
    try:
        code = int(status[1])
    except ValueError:
        raise MalformedResponse("the status is not a number") from None
    if not 100 <= code <= 999 or len(status[1]) != 3:
        raise MalformedResponse("the status is not three digits")
    if len(lines) - 1 > MAX_HEADERS:
        raise MalformedResponse("the response has too many headers")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\n" in line:
            raise MalformedResponse("a header line is malformed")
        headers.append((name.lower(), value.strip()))
    return ResponseHead(status[0], code, status[2] if len(status) > 2 else b"", tuple(headers))
