"""
The fake OpenAI server: its bodies, its streams on a fake clock, and its
HTTP behaviour in memory (StubTreq) and over real loopback.
"""

from __future__ import annotations

import json
from io import BytesIO

import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.openai import (
    FakeOpenAIServer,
    full_text,
    listen,
    sse_event,
    text_pieces,
)

URL = "http://fake.invalid/v1/chat/completions"


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = body.split(b"\n\n")
    assert events[-1] == b"", body
    payloads = []
    for event in events[:-1]:
        assert event.startswith(b"data: "), event
        payloads.append(event[len(b"data: "):])
    return payloads


class PureTests(SynchronousTestCase):
    """The text pieces and the SSE framing."""

    def test_pieces(self):
        """Pieces are words, every one but the first after a space, and join into the full text."""
        pieces = text_pieces(25)
        self.assertEqual(len(pieces), 25)
        self.assertFalse(pieces[0].startswith(" "))
        self.assertTrue(all(piece.startswith(" ") and piece.strip() for piece in pieces[1:]))
        self.assertEqual(full_text(25), "".join(pieces))
        self.assertEqual(text_pieces(3), text_pieces(25)[:3])

    def test_sse_event(self):
        """An event is the data line and a blank line."""
        self.assertEqual(sse_event(b'{"a":1}'), b'data: {"a":1}\n\n')


class ServerTests(SynchronousTestCase):
    """The resource through StubTreq, its timers on a Clock."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()

    def client(self, **options):
        self.server = FakeOpenAIServer(self.clock, **options)
        return StubTreq(self.server)

    def post(self, stub, body: dict, headers=None):
        return stub.post(URL, data=json.dumps(body).encode(), headers=headers or {})

    def test_stream_chunks_on_the_clock(self):
        """A stream writes one chunk now and one per interval, the last with finish_reason stop, then [DONE]."""
        stub = self.client(chunk_count=3, interval=1.0)
        response = self.successResultOf(self.post(stub, {"model": "gpt-x", "stream": True, "messages": []}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = treq.content(response)
        self.assertEqual(self.server.streams_started, 1)
        self.assertEqual(self.server.streams_completed, 0)
        self.clock.advance(1.0)
        stub.flush()
        self.assertNoResult(body)
        self.clock.advance(1.0)
        stub.flush()
        payloads = sse_payloads(self.successResultOf(body))
        self.assertEqual(payloads[-1], b"[DONE]")
        chunks = [json.loads(p) for p in payloads[:-1]]
        self.assertEqual(len(chunks), 3)
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual({c["model"] for c in chunks}, {"gpt-x"})
        self.assertEqual([c["choices"][0]["delta"]["content"] for c in chunks], text_pieces(3))
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks], [None, None, "stop"])
        self.assertEqual(self.server.streams_completed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_usage_chunk_by_default(self):
        """Even when the request asks for usage, the default fake sends no usage chunk."""
        stub = self.client(chunk_count=2)
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        response = self.successResultOf(self.post(stub, body))
        self.clock.advance(0)
        stub.flush()
        payloads = sse_payloads(self.successResultOf(treq.content(response)))
        self.assertEqual(len(payloads), 3)
        self.assertTrue(all("usage" not in json.loads(p) for p in payloads[:-1]))

    def test_usage_chunk_when_asked(self):
        """With usage_chunk, a request asking for usage gets a choice-less usage chunk before [DONE]."""
        stub = self.client(chunk_count=2, usage_chunk=True)
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        response = self.successResultOf(self.post(stub, body))
        self.clock.advance(0)
        stub.flush()
        payloads = sse_payloads(self.successResultOf(treq.content(response)))
        usage = json.loads(payloads[-2])
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["usage"], {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
        response = self.successResultOf(self.post(stub, {"model": "m", "stream": True}))
        self.clock.advance(0)
        stub.flush()
        self.assertEqual(len(sse_payloads(self.successResultOf(treq.content(response)))), 3)

    def test_whole_completion(self):
        """Without stream, one chat.completion carries the whole text and its usage."""
        stub = self.client(chunk_count=4)
        response = self.successResultOf(self.post(stub, {"model": "gpt-y", "messages": []}))
        self.assertEqual(response.code, 200)
        answer = self.successResultOf(response.json())
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], "gpt-y")
        self.assertEqual(answer["choices"][0]["message"], {"role": "assistant", "content": full_text(4)})
        self.assertEqual(answer["usage"]["completion_tokens"], 4)
        [recorded] = self.server.requests
        self.assertEqual((recorded.method, recorded.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(recorded.body, {"model": "gpt-y", "messages": []})

    def test_api_key(self):
        """With an api_key, another bearer token gets 401 with OpenAI's error body; the right one passes."""
        stub = self.client(api_key="sk-right")
        response = self.successResultOf(self.post(stub, {"model": "m"}, {"Authorization": "Bearer sk-wrong"}))
        self.assertEqual(response.code, 401)
        error = self.successResultOf(response.json())["error"]
        self.assertEqual(error["code"], "invalid_api_key")
        response = self.successResultOf(self.post(stub, {"model": "m"}, {"Authorization": "Bearer sk-right"}))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.server.requests[0].authorization, "Bearer sk-wrong")

    def test_models(self):
        """GET /v1/models lists the configured models."""
        stub = self.client(models=("a", "b"))
        response = self.successResultOf(stub.get("http://fake.invalid/v1/models"))
        listing = self.successResultOf(response.json())
        self.assertEqual([m["id"] for m in listing["data"]], ["a", "b"])

    def test_unknown_path_and_bad_body(self):
        """An unknown path is a 404; a completion without a model is a 400."""
        stub = self.client()
        response = self.successResultOf(stub.post("http://fake.invalid/v1/embeddings", data=b"{}"))
        self.assertEqual(response.code, 404)
        response = self.successResultOf(stub.post(URL, data=b"not json"))
        self.assertEqual(response.code, 400)

    def test_client_gone_stops_the_stream(self):
        """When the client disconnects, no further chunk is scheduled or written."""
        server = FakeOpenAIServer(self.clock, chunk_count=10, interval=1.0)
        request = DummyRequest([])
        request.method = b"POST"
        request.path = b"/v1/chat/completions"
        request.content = BytesIO(b'{"model":"m","stream":true}')
        self.assertIs(server.render(request), NOT_DONE_YET)
        self.clock.advance(1.0)
        self.assertEqual(len(request.written), 2)
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5.0)
        self.assertEqual(len(request.written), 2)
        self.assertEqual(server.streams_completed, 0)

    def test_chunk_count_must_be_positive(self):
        """A fake with no chunks to send is refused."""
        self.assertRaises(ValueError, FakeOpenAIServer, self.clock, chunk_count=0)


class LoopbackTests(AsyncTestCase):
    """The fake over real loopback HTTP."""

    async def test_stream_over_loopback_and_stop(self):
        """A real client reads a whole stream; stop() closes the port and the kept-alive connection."""
        server = FakeOpenAIServer(reactor, chunk_count=5, interval=0.001)
        listening = listen(reactor, server)
        pool = HTTPConnectionPool(reactor, persistent=True)
        try:
            response = await treq.post(
                listening.base_url + "/v1/chat/completions", data=b'{"model":"m","stream":true}', pool=pool
            )
            payloads = sse_payloads(await treq.content(response))
            self.assertEqual(payloads[-1], b"[DONE]")
            self.assertEqual(listening.open_connections, 1)
            self.assertEqual(
                "".join(json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1]), full_text(5)
            )
        finally:
            await listening.stop()
            await pool.closeCachedConnections()
        self.assertEqual(listening.open_connections, 0)
