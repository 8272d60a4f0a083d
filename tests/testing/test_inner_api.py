"""
The fake Dify inner API: its wire format, key check, recording, default
answers and overrides in memory (StubTreq on a fake clock), and its
listen/stop over real loopback.
"""

from __future__ import annotations

import orjson
import treq
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from difydaemon.invocation.frames import FrameDecoder
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.http import http_client
from difydaemon.testing.inner_api import (
    LLM_PIECES,
    STREAM_PATHS,
    FakeDifyInnerAPI,
    ReceivedRequest,
    UploadedFile,
    base_url,
    default_values,
    encrypt_values,
)

KEY = "fake-key"
BASE = "http://dify.test"


def frames_of(body: bytes) -> list:
    """The parsed JSON values of a framed body (which must end cleanly)."""
    decoder = FrameDecoder(1 << 20)
    payloads = decoder.feed(body)
    decoder.finish()
    return [orjson.loads(p) for p in payloads]


class FakeTests(SynchronousTestCase):
    """The fake through StubTreq, its delays on a Clock."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.fake = FakeDifyInnerAPI(self.clock, KEY)
        self.stub = StubTreq(self.fake.resource())

    def post(self, path: str, body, key: str | None = KEY, raw: bytes | None = None, headers=None):
        """POST to /inner/api/<path>; returns (response, body bytes)."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["X-Inner-Api-Key"] = key
        data = raw if raw is not None else orjson.dumps(body)
        response = self.successResultOf(self.stub.post(BASE + "/inner/api/" + path, data=data, headers=hdrs))
        content = self.stub.content(response)
        self.stub.flush()
        return response, self.successResultOf(content)

    def content_type(self, response) -> bytes:
        return response.headers.getRawHeaders(b"content-type")[0]

    # -- wire format and key -------------------------------------------------

    def test_stream_is_one_frame_per_value(self):
        """A streamed answer is one frame per value, each {"data": ..., "error": ""}, as text/event-stream."""
        body = {"model": "gpt-x"}
        response, content = self.post("invoke/llm", body)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.content_type(response), b"text/event-stream")
        self.assertEqual(frames_of(content), [{"data": v, "error": ""} for v in default_values("invoke/llm", body)])

    def test_single_is_plain_json(self):
        """A single answer is one plain JSON body by default."""
        response, content = self.post("invoke/summary", {"text": "long text"})
        self.assertEqual(self.content_type(response), b"application/json")
        self.assertEqual(orjson.loads(content), {"data": {"summary": "summary: long text"}, "error": ""})

    def test_framed_singles(self):
        """With framed_singles a single answer is exactly one frame."""
        self.fake = FakeDifyInnerAPI(self.clock, KEY, framed_singles=True)
        self.stub = StubTreq(self.fake.resource())
        response, content = self.post("invoke/moderation", {"text": "unsafe words"})
        self.assertEqual(self.content_type(response), b"application/json")
        self.assertEqual(frames_of(content), [{"data": {"result": True}, "error": ""}])

    def test_wrong_or_missing_key(self):
        """A wrong or missing key is Dify's 404 page, and the request is still recorded."""
        for key in ("nope", None):
            response, content = self.post("invoke/llm", {}, key=key)
            self.assertEqual(response.code, 404)
            self.assertIn(b"Not Found", content)
        self.assertEqual(len(self.fake.received), 2)
        self.assertNotIn("x-inner-api-key", self.fake.received[1].headers)

    def test_unknown_path(self):
        """A path Dify does not serve is a 404."""
        response, _ = self.post("invoke/nothing", {})
        self.assertEqual(response.code, 404)

    def test_only_post(self):
        """Other methods are refused."""
        response = self.successResultOf(self.stub.get(BASE + "/inner/api/invoke/llm", headers={"X-Inner-Api-Key": KEY}))
        self.assertEqual(response.code, 405)

    def test_records_requests(self):
        """Each request is recorded with its path, lower-case headers and parsed JSON body (None if not JSON)."""
        self.post("invoke/llm/structured-output", {"model": "m"}, headers={"Traceparent": "00-abc"})
        self.post("invoke/summary", None, raw=b"{not json")
        first, second = self.fake.received
        self.assertIsInstance(first, ReceivedRequest)
        self.assertEqual(first.path, "invoke/llm/structured-output")
        self.assertEqual(first.body, {"model": "m"})
        self.assertEqual(first.headers["traceparent"], "00-abc")
        self.assertEqual(first.headers["x-inner-api-key"], KEY)
        self.assertEqual((second.path, second.body), ("invoke/summary", None))

    # -- default answers ------------------------------------------------------

    def test_llm_chunks(self):
        """LLM chunks carry the pieces; only the last has usage and finish_reason stop."""
        chunks = default_values("invoke/llm", {"model": "gpt-x"})
        self.assertEqual([c["delta"]["message"]["content"] for c in chunks], list(LLM_PIECES))
        self.assertEqual([c["delta"]["index"] for c in chunks], list(range(len(LLM_PIECES))))
        self.assertEqual({c["model"] for c in chunks}, {"gpt-x"})
        self.assertEqual([c["delta"]["finish_reason"] for c in chunks[:-1]], [None] * (len(chunks) - 1))
        self.assertEqual(chunks[-1]["delta"]["finish_reason"], "stop")
        self.assertEqual([c["delta"]["usage"] for c in chunks[:-1]], [None] * (len(chunks) - 1))
        usage = chunks[-1]["delta"]["usage"]
        self.assertEqual(usage["completion_tokens"], len(LLM_PIECES))
        self.assertEqual(usage["total_tokens"], usage["prompt_tokens"] + usage["completion_tokens"])
        structured = default_values("invoke/llm/structured-output", {"model": "gpt-x"})
        self.assertEqual(structured[-1]["structured_output"], {"answer": "".join(LLM_PIECES)})

    def test_tool_echo(self):
        """The tool answer is a text message with the parameters as JSON, then a json message echoing the call."""
        body = {"tool_type": "builtin", "provider": "time", "tool": "now", "tool_parameters": {"b": 2, "a": 1}}
        text, data = default_values("invoke/tool", body)
        self.assertEqual(text, {"type": "text", "message": {"text": '{"a": 1, "b": 2}'}, "meta": None})
        self.assertEqual(data["type"], "json")
        self.assertEqual(data["message"]["json_object"]["tool_parameters"], {"b": 2, "a": 1})
        self.assertEqual(data["message"]["json_object"]["tool"], "now")

    def test_model_singles(self):
        """Embedding, rerank, tts, speech2text and moderation answers follow their inputs."""
        [embedding] = default_values("invoke/text-embedding", {"model": "e", "texts": ["ab", "c"]})
        self.assertEqual(embedding["embeddings"], [[2.0, 0.0, 0.5], [1.0, 1.0, 0.5]])
        self.assertEqual(embedding["usage"]["tokens"], 2)
        [rerank] = default_values("invoke/rerank", {"docs": ["x", "y", "z"], "top_n": 2, "score_threshold": 0.0})
        self.assertEqual([(d["index"], d["text"]) for d in rerank["docs"]], [(0, "x"), (1, "y")])
        tts = default_values("invoke/tts", {"content_text": "héllo"})
        self.assertEqual(bytes.fromhex("".join(c["result"] for c in tts)).decode("utf-8"), "héllo")
        self.assertEqual(default_values("invoke/speech2text", {"file": "00ff10"}), [{"result": "fake transcript of 3 bytes"}])
        self.assertEqual(default_values("invoke/moderation", {"text": "fine"}), [{"result": False}])

    def test_nodes_and_apps(self):
        """Node answers are NodeResponses; app answers are dicts; app info is wrapped in data."""
        [extracted] = default_values("invoke/parameter-extractor", {"parameters": [{"name": "city"}], "query": "q"})
        self.assertEqual(extracted["outputs"]["city"], "value of city")
        self.assertEqual(extracted["inputs"], {"query": "q"})
        [classified] = default_values("invoke/question-classifier", {"classes": [{"id": "1", "name": "weather"}]})
        self.assertEqual(classified["outputs"], {"class_name": "weather", "class_id": "1"})
        streamed = default_values("invoke/app", {"query": "hi", "response_mode": "streaming"})
        self.assertEqual(streamed[-1]["event"], "message_end")
        [blocking] = default_values("invoke/app", {"query": "hi", "response_mode": "blocking"})
        self.assertEqual(blocking["answer"], "fake answer to 'hi'")
        [info] = default_values("fetch/app/info", {"app_id": "a1"})
        self.assertEqual(info["data"]["opening_statement"], "fake app a1")
        self.assertIsNone(default_values("invoke/unknown", {}))

    def test_encrypt(self):
        """Encrypt prefixes only the secret-input fields, decrypt undoes it, clear answers an empty object."""
        config = [{"name": "key", "type": "secret-input"}, {"name": "region", "type": "text-input"}]
        data = {"key": "sk", "region": "eu", "other": "x"}
        [encrypted] = encrypt_values({"opt": "encrypt", "data": data, "config": config})
        self.assertEqual(encrypted, {"data": {"key": "enc:sk", "region": "eu", "other": "x"}})
        [decrypted] = encrypt_values({"opt": "decrypt", "data": encrypted["data"], "config": config})
        self.assertEqual(decrypted, {"data": data})
        self.assertEqual(encrypt_values({"opt": "clear", "data": data, "config": config}), [{"data": {}}])
        _, content = self.post("invoke/encrypt", {"opt": "encrypt", "data": data, "config": config})
        self.assertEqual(orjson.loads(content), {"data": encrypted, "error": ""})

    def test_upload(self):
        """The upload URL points at the fake itself, which takes the multipart file and answers 201."""
        _, content = self.post("upload/file/request", {"filename": "a.txt", "mimetype": "text/plain"})
        url = orjson.loads(content)["data"]["url"]
        self.assertTrue(url.startswith("http://dify.test/files/upload/for-plugin?"), url)
        form = (
            b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
            b"Content-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n"
        )
        response = self.successResultOf(
            self.stub.post(url, data=form, headers={"Content-Type": "multipart/form-data; boundary=XX"})
        )
        self.assertEqual(response.code, 201)
        answer = self.successResultOf(self.stub.json_content(response))
        self.assertEqual((answer["name"], answer["size"], answer["mime_type"]), ("a.txt", 5, "text/plain"))
        self.assertEqual(self.fake.uploads, [UploadedFile("a.txt", "text/plain", b"hello")])

    # -- overrides -------------------------------------------------------------

    def test_answer(self):
        """answer() replaces a path's values, framed as Dify would unless told otherwise."""
        self.fake.answer("invoke/tool", [{"a": 1}, {"b": 2}])
        self.fake.answer("invoke/summary", [{"summary": "s"}])
        self.fake.answer("invoke/rerank", [{"x": 1}, {"y": 2}], framed=True)
        self.assertEqual(frames_of(self.post("invoke/tool", {})[1]), [{"data": {"a": 1}, "error": ""}, {"data": {"b": 2}, "error": ""}])
        self.assertEqual(orjson.loads(self.post("invoke/summary", {})[1]), {"data": {"summary": "s"}, "error": ""})
        self.assertEqual(len(frames_of(self.post("invoke/rerank", {})[1])), 2)
        self.assertRaises(ValueError, self.fake.answer, "invoke/summary", [1, 2], framed=False)

    def test_error(self):
        """error() sends the items, then a value with null data and the message."""
        self.fake.error("invoke/llm", "boom", items=[{"n": 1}])
        self.fake.error("invoke/summary", "bang")
        self.assertEqual(frames_of(self.post("invoke/llm", {})[1]), [{"data": {"n": 1}, "error": ""}, {"data": None, "error": "boom"}])
        self.assertEqual(orjson.loads(self.post("invoke/summary", {})[1]), {"data": None, "error": "bang"})

    def test_fail_and_garbage(self):
        """fail() answers a status and raw body; garbage() raw bytes with 200."""
        self.fake.fail("invoke/llm", 503, b"down")
        self.fake.garbage("invoke/summary", b"\x00\x01junk")
        response, content = self.post("invoke/llm", {})
        self.assertEqual((response.code, content), (503, b"down"))
        response, content = self.post("invoke/summary", {})
        self.assertEqual((response.code, content), (200, b"\x00\x01junk"))

    def test_slow(self):
        """slow() sends the first frames at once and the rest after the delay on the reactor."""
        self.fake.slow("invoke/llm", 5.0, after=2)
        headers = {"X-Inner-Api-Key": KEY}
        response = self.successResultOf(self.stub.post(BASE + "/inner/api/invoke/llm", data=b"{}", headers=headers))
        received: list[bytes] = []
        done = treq.collect(response, received.append)
        self.stub.flush()
        self.assertEqual(len(frames_of(b"".join(received))), 2)
        self.assertNoResult(done)
        self.clock.advance(5.0)
        self.stub.flush()
        self.successResultOf(done)
        self.assertEqual(len(frames_of(b"".join(received))), len(LLM_PIECES))

    def test_slow_whole_answer_and_reset(self):
        """With after=0 not even the status comes before the delay; reset() restores the prompt default."""
        self.fake.slow("invoke/summary", 5.0)
        d = self.stub.post(BASE + "/inner/api/invoke/summary", data=b'{"text":"t"}', headers={"X-Inner-Api-Key": KEY})
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(5.0)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.fake.reset("invoke/summary")
        self.assertEqual(orjson.loads(self.post("invoke/summary", {"text": "t"})[1])["data"], {"summary": "summary: t"})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stream_paths(self):
        """The streamed paths are the five Dify streams."""
        self.assertEqual(
            STREAM_PATHS,
            {"invoke/tool", "invoke/llm", "invoke/llm/structured-output", "invoke/tts", "invoke/app"},
        )


class ListenTests(AsyncTestCase):
    """The fake over real loopback TCP."""

    async def test_listen_and_stop(self):
        """listen() serves the fake on a free port; stop() closes it so new connections are refused."""
        fake = FakeDifyInnerAPI(reactor, KEY)
        port = await fake.listen()
        self.addCleanup(fake.stop)
        url = base_url(port)
        self.assertTrue(url.startswith("http://127.0.0.1:"), url)
        client = http_client(self, reactor)
        response = await client.post(url + "/inner/api/invoke/tts", data=b'{"content_text":"hi"}', headers={"X-Inner-Api-Key": KEY})
        self.assertEqual(response.code, 200)
        values = frames_of(await response.content())
        self.assertEqual(bytes.fromhex("".join(v["data"]["result"] for v in values)), b"hi")
        await fake.stop()
        with self.assertRaises(ConnectionRefusedError):
            await client.post(url + "/inner/api/invoke/tts", data=b"{}", headers={"X-Inner-Api-Key": KEY})
