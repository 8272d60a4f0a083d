"""Tests for difydaemon.invocation.frames: the inner API's length-prefixed frames."""

from __future__ import annotations

import struct

from difydaemon.invocation.frames import FRAME_OVERHEAD, FrameDecoder, FrameError, encode_frame
from difydaemon.testing.cases import SynchronousTestCase

PAYLOADS = [
    b'{"data":{"type":"text","message":{"text":"h\xc3\xa9"},"meta":null},"error":""}',
    b"",
    b'{"data":{"result":"00ff"},"error":""}',
]


def frame_by_hand(payload: bytes, header_length: int = 10, magic: int = 0x0F) -> bytes:
    """A frame written field by field, as Dify's ``length_prefixed_response`` does."""
    return struct.pack("<BBHI", magic, 0, header_length, len(payload)) + b"\x00" * 6 + payload


class EncodeTests(SynchronousTestCase):
    """encode_frame."""

    def test_layout(self):
        """A frame is magic, reserved, header length 10, data length, 6 reserved bytes, data."""
        frame = encode_frame(b'{"a":1}')
        self.assertEqual(frame, b"\x0f\x00\x0a\x00\x07\x00\x00\x00" + b"\x00" * 6 + b'{"a":1}')
        self.assertEqual(frame, frame_by_hand(b'{"a":1}'))
        self.assertEqual(FRAME_OVERHEAD, 14)

    def test_empty_payload(self):
        """An empty payload is a bare 14-byte prefix and header that decodes back to b''."""
        frame = encode_frame(b"")
        self.assertEqual(len(frame), 14)
        decoder = FrameDecoder(10)
        self.assertEqual(decoder.feed(frame), [b""])
        decoder.finish()


class DecodeTests(SynchronousTestCase):
    """FrameDecoder."""

    def test_split_at_every_offset(self):
        """Several frames split into two pieces at every offset decode to the same payloads."""
        body = b"".join(encode_frame(p) for p in PAYLOADS)
        for offset in range(len(body) + 1):
            decoder = FrameDecoder(1024)
            payloads = decoder.feed(body[:offset]) + decoder.feed(body[offset:])
            decoder.finish()
            self.assertEqual(payloads, PAYLOADS, offset)

    def test_split_at_every_pair_of_offsets(self):
        """Three pieces, cut at every pair of offsets, decode to the same payloads."""
        body = b"".join(encode_frame(p) for p in PAYLOADS[:2])
        for first in range(len(body) + 1):
            for second in range(first, len(body) + 1):
                decoder = FrameDecoder(1024)
                payloads = decoder.feed(body[:first]) + decoder.feed(body[first:second]) + decoder.feed(body[second:])
                decoder.finish()
                self.assertEqual(payloads, PAYLOADS[:2], (first, second))

    def test_one_byte_at_a_time(self):
        """Fed one byte at a time, each payload comes out with its last byte and not before."""
        decoder = FrameDecoder(1024)
        body = b"".join(encode_frame(p) for p in PAYLOADS)
        ends = []
        position = 0
        for p in PAYLOADS:
            position += FRAME_OVERHEAD + len(p)
            ends.append(position)
        seen = []
        for index in range(len(body)):
            out = decoder.feed(body[index : index + 1])
            if out:
                seen.append((index + 1, out))
        decoder.finish()
        self.assertEqual(seen, [(end, [p]) for end, p in zip(ends, PAYLOADS)])

    def test_matches_dify_encoding(self):
        """Frames written as Dify writes them decode, reserved bytes and all."""
        decoder = FrameDecoder(1024)
        self.assertEqual(decoder.feed(frame_by_hand(PAYLOADS[0]) + frame_by_hand(PAYLOADS[2])), [PAYLOADS[0], PAYLOADS[2]])

    def test_clean_end(self):
        """An end at a frame boundary, or before any byte, is clean."""
        FrameDecoder(10).finish()
        decoder = FrameDecoder(10)
        decoder.feed(encode_frame(b"12"))
        decoder.finish()

    def test_corrupt_magic(self):
        """A first byte other than 0x0F is refused at once, even alone."""
        decoder = FrameDecoder(1024)
        error = self.assertRaises(FrameError, decoder.feed, b"{")
        self.assertIn("magic 0x7b", str(error))

    def test_corrupt_magic_of_second_frame(self):
        """A bad magic after a good frame, fed apart, is refused by the call that brings it."""
        decoder = FrameDecoder(1024)
        self.assertEqual(decoder.feed(encode_frame(b"ok")), [b"ok"])
        self.assertRaises(FrameError, decoder.feed, frame_by_hand(b"x", magic=0x0E))

    def test_frames_before_a_fault_come_out_first(self):
        """Frames complete before a fault in the same piece are returned; the next call raises."""
        for bad in (frame_by_hand(b"x", magic=0x0E), frame_by_hand(b"x", header_length=9), encode_frame(b"y" * 20)):
            decoder = FrameDecoder(10)
            self.assertEqual(decoder.feed(encode_frame(b"a") + encode_frame(b"b") + bad), [b"a", b"b"])
            self.assertRaises(FrameError, decoder.finish)
            decoder = FrameDecoder(10)
            decoder.feed(encode_frame(b"a") + bad)
            self.assertRaises(FrameError, decoder.feed, b"")

    def test_wrong_header_length(self):
        """A header length other than 10 is refused as soon as the 4-byte prefix is in."""
        decoder = FrameDecoder(1024)
        frame = frame_by_hand(b"abc", header_length=12)
        self.assertEqual(decoder.feed(frame[:3]), [])
        error = self.assertRaises(FrameError, decoder.feed, frame[3:4])
        self.assertIn("header length 12", str(error))

    def test_oversize_refused_before_data(self):
        """A data length over the limit is refused when the header is complete, before any data."""
        decoder = FrameDecoder(4)
        frame = encode_frame(b"12345")
        self.assertEqual(decoder.feed(frame[: FRAME_OVERHEAD - 1]), [])
        error = self.assertRaises(FrameError, decoder.feed, frame[FRAME_OVERHEAD - 1 : FRAME_OVERHEAD])
        self.assertIn("5 bytes", str(error))
        self.assertEqual(FrameDecoder(5).feed(frame), [b"12345"])

    def test_truncated_in_data(self):
        """An end inside a frame's data is a FrameError."""
        decoder = FrameDecoder(1024)
        decoder.feed(encode_frame(b"hello")[:-1])
        error = self.assertRaises(FrameError, decoder.finish)
        self.assertIn("4 of 5", str(error))

    def test_truncated_in_header(self):
        """An end inside a frame's prefix or header is a FrameError."""
        for cut in range(1, FRAME_OVERHEAD):
            decoder = FrameDecoder(1024)
            decoder.feed(encode_frame(b"hello")[:cut])
            self.assertRaises(FrameError, decoder.finish)

    def test_spent_after_error(self):
        """After a FrameError every later feed and finish raises again."""
        decoder = FrameDecoder(1024)
        self.assertRaises(FrameError, decoder.feed, b"\x00")
        self.assertRaises(FrameError, decoder.feed, encode_frame(b"ok"))
        self.assertRaises(FrameError, decoder.finish)
