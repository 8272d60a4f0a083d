"""
The length-prefixed frames of the Dify inner API (``runtimes.md`` §4.2).

Dify answers streamed backwards invocations (and, in recent versions, single
ones too) with a body of frames, each one:

1. a 4-byte prefix: the magic byte ``0x0F``, one reserved byte, then the
   header length as uint16 little-endian, which must be 10;
2. a 10-byte header: the data length as uint32 little-endian, then 6
   reserved bytes;
3. the data: the JSON bytes of ``{"data": ..., "error": ""}``.

Pure and incremental: :func:`encode_frame` builds one frame and
:class:`FrameDecoder` turns a body, fed in pieces of any size, into the
payloads it carries.  Nothing here parses the JSON, does I/O or logs.
"""

from __future__ import annotations

import struct

#: The first byte of every frame; a body starting with it is framed.
MAGIC = 0x0F
#: The only header length Dify sends (and the Go daemon accepts).
HEADER_LENGTH = 10

_PREFIX = struct.Struct("<BxH")
_HEADER = struct.Struct("<I6x")
#: Bytes in front of every payload: the prefix and the header.
FRAME_OVERHEAD = _PREFIX.size + HEADER_LENGTH


def encode_frame(payload: bytes) -> bytes:
    """One frame carrying ``payload``, reserved bytes zeroed as Dify does."""
    return _PREFIX.pack(MAGIC, HEADER_LENGTH) + _HEADER.pack(len(payload)) + payload


class FrameError(ValueError):
    """The bytes are not a well-formed sequence of frames."""


class FrameDecoder:
    """
    Incremental decoder of a framed body.

    A frame's data length is checked against ``max_frame_size`` as soon as
    its header is in, so an oversized frame is refused before its data is
    held.  Frames complete before a fault are still returned: the
    :class:`FrameError` is then raised by the next call.  After it the
    decoder is spent: every later call raises again.

    :param max_frame_size: the largest payload accepted
        (``RESPONSE_MAX_BUFFER_SIZE``).
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        # The data length of the frame whose header has been read, or None
        # while waiting for a header.
        self._length: int | None = None
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """
        The payloads of the frames ``data`` completes, in order; the rest is
        kept for the next call.

        :raises FrameError: on a bad magic byte, a header length other than
            10 or a data length over ``max_frame_size`` (in ``data``, if no
            frame before the fault completes in this call; else in an
            earlier call).
        """
        if self._error is not None:
            raise self._error
        payloads: list[bytes] = []
        try:
            self._decode(data, payloads)
        except FrameError:
            if not payloads:
                raise
        return payloads

    def _decode(self, data: bytes, payloads: list[bytes]) -> None:
        buffer = self._buffer
        buffer += data
        while True:
            length = self._length
            if length is None:
                # The magic byte alone already tells a framed body from,
                # say, an HTML error page: refuse it at once.
                if buffer and buffer[0] != MAGIC:
                    self._fail(f"bad frame magic 0x{buffer[0]:02x}, expected 0x{MAGIC:02x}")
                if len(buffer) < _PREFIX.size:
                    break
                _, header_length = _PREFIX.unpack_from(buffer)
                if header_length != HEADER_LENGTH:
                    self._fail(f"bad frame header length {header_length}, expected {HEADER_LENGTH}")
                if len(buffer) < FRAME_OVERHEAD:
                    break
                (length,) = _HEADER.unpack_from(buffer, _PREFIX.size)
                if length > self.max_frame_size:
                    self._fail(f"frame of {length} bytes is over the limit of {self.max_frame_size}")
                # Deleting from the front of a bytearray is cheap: CPython
                # only moves its start pointer.
                del buffer[:FRAME_OVERHEAD]
                self._length = length
            if len(buffer) < length:
                break
            payloads.append(bytes(buffer[:length]))
            del buffer[:length]
            self._length = None

    def finish(self) -> None:
        """
        The body has ended.

        :raises FrameError: if a frame was cut short (or a fault is still
            to be reported); an end between two frames, or before any, is
            clean.
        """
        if self._error is not None:
            raise self._error
        if self._length is not None:
            self._fail(f"body ended inside a frame: {len(self._buffer)} of {self._length} data bytes")
        if self._buffer:
            self._fail(f"body ended inside a frame header: {len(self._buffer)} bytes")

    def _fail(self, reason: str):
        self._error = FrameError(reason)
        self._buffer = bytearray()
        raise self._error
