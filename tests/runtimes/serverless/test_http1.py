"""Tests for difydaemon.runtimes.serverless.http1: the /invoke request and response, without I/O."""

from __future__ import annotations

from difydaemon.runtimes.serverless.http1 import (
    MAX_HEAD_SIZE,
    MalformedResponse,
    ResponseDecoder,
    ResponseEnd,
    ResponseHead,
    encode_post,
    encode_post_from,
    post_line,
)
from difydaemon.testing.cases import SynchronousTestCase

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Amzn-RequestId: r-1\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED = SSE_HEAD + b"5\r\nhello\r\n1\r\n\n\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
LENGTH = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\nnope"


def decode(*pieces: bytes, lost: bool = False):
    """(head, joined body, end, extra) of a response fed in ``pieces``."""
    decoder = ResponseDecoder()
    events = []
    for piece in pieces:
        events += decoder.feed(piece)
    if lost:
        events += decoder.connection_lost()
    heads = [e for e in events if type(e) is ResponseHead]
    ends = [e for e in events if type(e) is ResponseEnd]
    body = b"".join(e for e in events if type(e) is bytes)
    if ends:
        assert events[-1] is ends[0], events
    return heads, body, ends, decoder.extra


class EncodePostTests(SynchronousTestCase):
    """The request: one buffer, one send."""

    def test_shape(self):
        """A POST carries its target, Host, the given headers and the body with its length."""
        self.assertEqual(
            encode_post(b"fn:8080", b"/invoke?action=invoke_tool", [(b"Dify-Plugin-Session-ID", b"s-1")], b"{}"),
            b"POST /invoke?action=invoke_tool HTTP/1.1\r\nHost: fn:8080\r\nDify-Plugin-Session-ID: s-1\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )

    def test_no_header_injection(self):
        """A CR, LF or NUL in a header name or value, or a space in the target, is refused."""
        for bad in (b"s\r\nX-Evil: 1", b"s\nx", b"s\x00"):
            self.assertRaises(ValueError, encode_post, b"fn", b"/i", [(b"Dify-Plugin-Session-ID", bad)], b"")
        self.assertRaises(ValueError, encode_post, b"fn", b"/i", [(b"X\r\n", b"v")], b"")
        self.assertRaises(ValueError, encode_post, b"fn\r\n", b"/i", [], b"")
        self.assertRaises(ValueError, encode_post, b"fn", b"/i HTTP/1.0\r\n", [], b"")
        self.assertRaises(ValueError, encode_post, b"fn", b"/a b", [], b"")

    def test_line_checked_once_headers_every_time(self):
        """A request line made once with post_line serves many requests; each request's headers are still checked."""
        line = post_line(b"fn:8080", b"/invoke?action=invoke_tool")
        self.assertEqual(
            encode_post_from(line, [(b"Dify-Plugin-Session-ID", b"s-1")], b"{}"),
            encode_post(b"fn:8080", b"/invoke?action=invoke_tool", [(b"Dify-Plugin-Session-ID", b"s-1")], b"{}"),
        )
        self.assertRaises(ValueError, encode_post_from, line, [(b"Dify-Plugin-Session-ID", b"s\r\nX: 1")], b"")
        self.assertRaises(ValueError, post_line, b"fn", b"/i HTTP/1.0\r\n")


class ResponseDecoderTests(SynchronousTestCase):
    """Heads, framings and their ends, cut anywhere."""

    def assert_every_offset(self, data: bytes, lost: bool = False):
        """``data`` cut in two, and byte by byte, decodes as it does whole; returns that."""
        whole = decode(data, lost=lost)
        for offset in range(len(data) + 1):
            self.assertEqual(decode(data[:offset], data[offset:], lost=lost), whole, offset)
        self.assertEqual(decode(*[data[i:i + 1] for i in range(len(data))], lost=lost), whole)
        return whole

    def test_chunked(self):
        """A chunked body is unchunked (extensions and trailers skipped) and ends reusable."""
        heads, body, ends, extra = self.assert_every_offset(CHUNKED)
        self.assertEqual(body, b"hello\n world")
        self.assertEqual((heads[0].code, heads[0].phrase, heads[0].values(b"x-amzn-requestid")), (200, b"OK", [b"r-1"]))
        self.assertEqual(ends, [ResponseEnd(True)])
        self.assertEqual(extra, b"")

    def test_content_length(self):
        """A body framed by its length ends after that many bytes, reusable."""
        heads, body, ends, _ = self.assert_every_offset(LENGTH)
        self.assertEqual((heads[0].code, heads[0].phrase, body, ends), (502, b"Bad Gateway", b"nope", [ResponseEnd(True)]))

    def test_connection_close(self):
        """``Connection: close`` or HTTP/1.0 makes the connection not reusable."""
        _, _, ends, _ = decode(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(ends, [ResponseEnd(False)])
        _, _, ends, _ = decode(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(ends, [ResponseEnd(False)])

    def test_until_close(self):
        """A body with no length ends when the connection closes, not reusable."""
        data = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nline one\nline two\n"
        heads, body, ends, _ = self.assert_every_offset(data, lost=True)
        self.assertEqual((body, ends), (b"line one\nline two\n", [ResponseEnd(False)]))
        self.assertEqual(decode(data)[2], [])

    def test_interim_and_empty(self):
        """A 100 Continue is skipped; a 204 has no body whatever it says."""
        heads, body, ends, _ = self.assert_every_offset(b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH)
        self.assertEqual([h.code for h in heads], [502])
        heads, body, ends, extra = decode(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual((heads[0].code, body, ends, extra), (204, b"", [ResponseEnd(True)], b""))

    def test_extra_bytes_kept(self):
        """Bytes after the end are kept apart, not taken as body."""
        _, body, ends, extra = decode(LENGTH + b"HTTP/1.1 200")
        self.assertEqual((body, extra), (b"nope", b"HTTP/1.1 200"))
        _, body, _, extra = decode(LENGTH, b"more")
        self.assertEqual((body, extra), (b"nope", b"more"))

    def test_cut_short(self):
        """A connection closing before the head or in a framed body is an error."""
        for data in (b"", b"HTTP/1.1 200 OK\r\n", LENGTH[:-1], CHUNKED[:-3]):
            decoder = ResponseDecoder()
            decoder.feed(data)
            self.assertRaises(MalformedResponse, decoder.connection_lost)

    def test_malformed(self):
        """What is not HTTP/1.x as framed here raises MalformedResponse."""
        for data in (
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * MAX_HEAD_SIZE,
        ):
            self.assertRaises(MalformedResponse, ResponseDecoder().feed, data)

    def test_one_body_piece_per_feed(self):
        """The pieces of many chunks in one read are handed over as one piece."""
        decoder = ResponseDecoder()
        events = decoder.feed(CHUNKED[:-5])
        self.assertEqual([type(e) for e in events], [ResponseHead, bytes])

    def test_same_head_decoded_alike_every_time(self):
        """A head seen before (parsed once, then reused) frames each response as it did the first: body, end, reuse."""
        for _ in range(3):
            heads, body, ends, _ = decode(CHUNKED)
            self.assertEqual((heads[0].code, body, ends), (200, b"hello\n world", [ResponseEnd(True)]))
            heads, body, ends, _ = decode(LENGTH + LENGTH[:12])
            self.assertEqual((heads[0].code, body, ends), (502, b"nope", [ResponseEnd(True)]))

    def test_malformed_head_refused_every_time(self):
        """A malformed head is refused each time it comes, not only the first."""
        for _ in range(3):
            self.assertRaises(
                MalformedResponse, ResponseDecoder().feed, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
            )

    def test_chunk_sizes_read_alike_every_time(self):
        """A chunk-size line seen before (then looked up) frames its chunk as it did the first; a bad one is refused each time."""
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for _ in range(3):
            heads, body, ends, _ = decode(chunked + b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n")
            self.assertEqual((body, ends), (b"0123456789abcdefghij", [ResponseEnd(True)]))
            self.assertRaises(MalformedResponse, ResponseDecoder().feed, chunked + b"g\r\nx\r\n")
            self.assertRaises(MalformedResponse, ResponseDecoder().feed, chunked + b"-1\r\nx\r\n")
