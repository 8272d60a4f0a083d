"""Tests for difydaemon.runtimes.serverless.response: the /invoke response of a function."""

from __future__ import annotations

from difydaemon.runtimes.serverless.response import (
    INNER_ERROR_TYPE,
    NOT_SUPPORTED_ERROR_TYPE,
    RUNTIME_ERROR_TYPE,
    Chunk,
    Failed,
    Finished,
    InvokeResponseDecoder,
    LogLine,
    http_failure,
)
from difydaemon.testing.cases import SynchronousTestCase

SID = "11111111-2222-4333-8444-555555555555"
CHUNK = b'{"type":"text","message":{"text":"hi"},"meta":null}'


def line(kind: str, data: bytes) -> bytes:
    return b'{"event":"session","session_id":"%s","data":{"type":"%s","data":%s}}\n\n' % (
        SID.encode(), kind.encode(), data
    )


BODY = (
    line("stream", CHUNK)
    + b'{"event":"log","session_id":null,"data":{"level":"INFO","message":"m","timestamp":1.0}}\n\n'
    + b'{"event":"heartbeat","session_id":null,"data":{}}\n'
    + b'{"something":"else"}\n'
    + line("stream", b'{"type":"text","message":{"text":"there"},"meta":null}')
    + line("end", b"null")
    + b"ignored after the end\n"
)


def decode(*pieces: bytes, limit: int = 1 << 20, finish: bool = True) -> list:
    decoder = InvokeResponseDecoder(limit)
    out = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    if finish:
        out.extend(decoder.finish())
    return out


class InvokeResponseTests(SynchronousTestCase):
    """The line handling of serverless.md §3.5."""

    def expected(self) -> list:
        out = decode(BODY)
        self.assertEqual(
            [type(o) for o in out], [Chunk, LogLine, Chunk, Finished]
        )
        self.assertEqual(out[0].raw, CHUNK)
        return out

    def test_every_offset(self):
        """The body cut in two at every offset gives the same outcomes."""
        expected = self.expected()
        for cut in range(len(BODY) + 1):
            self.assertEqual(decode(BODY[:cut], BODY[cut:]), expected, cut)

    def test_end_synthesized(self):
        """A body that ends after a chunk without end is finished by the daemon."""
        out = decode(line("stream", CHUNK))
        self.assertEqual([type(o) for o in out], [Chunk, Finished])

    def test_last_line_without_newline(self):
        """A last line without newline still counts."""
        out = decode(line("stream", CHUNK).rstrip(b"\n"))
        self.assertEqual([type(o) for o in out], [Chunk, Finished])

    def test_no_session_message(self):
        """A body with no session message at all fails with 'no valid session response'."""
        [failed] = decode(b'{"event":"heartbeat","session_id":null,"data":{}}\n')
        self.assertEqual(failed.error_type, RUNTIME_ERROR_TYPE)
        self.assertEqual(failed.message, "Plugin runtime request failed: no valid session response")

    def test_plugin_error(self):
        """A session error message is the plugin's error, and nothing follows (not even its end)."""
        out = decode(line("error", b'{"error_type":"ValueError","message":"bad","args":{"a":1}}') + line("end", b"{}"))
        self.assertEqual(out, [Failed("ValueError", "bad", {"a": 1})])

    def test_invoke_not_supported(self):
        """An invoke session message fails: serverless plugins call back over HTTP."""
        [failed] = decode(line("invoke", b'{"type":"tool","backwards_request_id":"x","request":{}}'))
        self.assertEqual(failed.error_type, NOT_SUPPORTED_ERROR_TYPE)

    def test_non_json_line(self):
        """A stray non-JSON line ends the session with an inner error quoting it."""
        [failed] = decode(b"Traceback (most recent call last):\n" + line("end", b"{}"))
        self.assertEqual(failed.error_type, INNER_ERROR_TYPE)
        self.assertIn("original response: Traceback", failed.message)

    def test_lambda_error_line(self):
        """A Lambda error object in the body is a runtime error with its type, message and request id."""
        [failed] = decode(b'{"errorType":"Runtime.ExitError","errorMessage":"exit 1","requestId":"r-1"}\n')
        self.assertEqual(
            failed,
            Failed(
                RUNTIME_ERROR_TYPE,
                "Plugin runtime request failed: Runtime.ExitError: exit 1",
                {"status_code": 200, "request_id": "r-1"},
            ),
        )

    def test_top_level_error_event(self):
        """A top-level error event ends the session (stdio only logs it)."""
        [failed] = decode(b'{"event":"error","session_id":null,"data":"boom"}\n')
        self.assertEqual(failed, Failed(INNER_ERROR_TYPE, "encountered an error: boom"))

    def test_malformed_session_message(self):
        """A session event whose data is not a session message fails."""
        [failed] = decode(b'{"event":"session","session_id":"s","data":{"nope":1}}\n')
        self.assertEqual(failed.error_type, INNER_ERROR_TYPE)
        self.assertIn("failed to parse session message", failed.message)

    def test_line_over_max_buffer(self):
        """A line over PLUGIN_RUNTIME_MAX_BUFFER_SIZE fails at once, without waiting for its newline."""
        out = decode(line("stream", CHUNK), b"x" * 300, limit=200, finish=False)
        self.assertEqual(type(out[-1]), Failed)
        self.assertIn("longer than the 200 bytes allowed", out[-1].message)

    def test_input_after_outcome_ignored(self):
        """After the last outcome nothing more comes out, not even at finish."""
        decoder = InvokeResponseDecoder(1024)
        decoder.feed(line("end", b"{}"))
        self.assertEqual(decoder.feed(line("stream", CHUNK)), [])
        self.assertEqual(decoder.finish(), [])


class HttpFailureTests(SynchronousTestCase):
    """The session error of a failed response (§3.5 steps 1, 2 and 6)."""

    def test_status_text(self):
        """Without a Lambda error, the status text names the failure and the body is quoted."""
        failed = http_failure(500, "Internal Server Error", None, None, b"'session_id'")
        self.assertEqual(failed.message, "Plugin runtime request failed: 500 Internal Server Error: 'session_id'")
        self.assertEqual(failed.args, {"status_code": 500})

    def test_header_wins(self):
        """x-amzn-ErrorType names the failure, the body's message and request id complete it."""
        failed = http_failure(
            200, "OK", "Function.ResponseSizeTooLarge", None, b'{"errorType":"X","errorMessage":"too big","requestId":"q"}'
        )
        self.assertEqual(failed.message, "Plugin runtime request failed: Function.ResponseSizeTooLarge: too big")
        self.assertEqual(failed.args, {"status_code": 200, "request_id": "q"})

    def test_request_id_header(self):
        """The x-amzn-RequestId header fills request_id."""
        failed = http_failure(502, "Bad Gateway", None, "hdr-id", b"")
        self.assertEqual(failed.message, "Plugin runtime request failed: 502 Bad Gateway")
        self.assertEqual(failed.args, {"status_code": 502, "request_id": "hdr-id"})
