"""
Backwards invocations (``runtimes.md`` §4): permissions, the inner API
request, answers on the session's runtime, always ending with ``end``.

The inner API is the real :class:`DifyInnerAPI` over StubTreq against the
fake Dify inner API; the storage is :class:`PluginStorage` over the
in-memory persistence; the runtime is a FakeRuntime with an open session.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from difydaemon.invocation.dispatcher import (
    INVOKE_TYPES,
    MODEL_SESSION_REFUSAL,
    BackwardsInvocations,
    inner_api_request,
    permission_refusal,
)
from difydaemon.invocation.inner_api import DifyInnerAPI
from difydaemon.invocation.session import InvocationSession, MalformedInvokeError, parse_invoke
from difydaemon.invocation.storage import PluginStorage
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.inner_api import FakeDifyInnerAPI
from difydaemon.testing.runtimes import FakeRuntime

API_KEY = "inner-key"
TENANT = "tenant-1"
PLUGIN_ID = "acme/echo"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64

ALL_PERMISSIONS = {
    "tool": {"enabled": True},
    "model": {
        "enabled": True,
        "llm": True,
        "text_embedding": True,
        "rerank": True,
        "tts": True,
        "speech2text": True,
        "moderation": True,
    },
    "node": {"enabled": True},
    "app": {"enabled": True},
    "storage": {"enabled": True, "size": 16},
}


def declaration(permission: dict | None) -> dict:
    """A declaration whose manifest grants ``permission``."""
    resource = {"memory": 1} if permission is None else {"memory": 1, "permission": permission}
    return {"resource": resource}


class Harness:
    """A session open on a FakeRuntime, with the dispatcher serving it."""

    def __init__(self, permission=ALL_PERMISSIONS, access_type: str = "tool") -> None:
        self.reactor = MemoryReactorClock()
        self.fake_api = FakeDifyInnerAPI(self.reactor, API_KEY)
        self.treq = StubTreq(self.fake_api.resource())
        self.inner_api = DifyInnerAPI(
            self.reactor, self.treq, "http://dify.test", API_KEY, 5.0, 240.0, 30 * 1024 * 1024
        )
        self.persistence = MemoryPersistence(self.reactor)
        self.backwards = BackwardsInvocations(self.inner_api, PluginStorage(self.persistence, 1024))
        self.runtime = FakeRuntime(self.reactor, IDENTIFIER, declaration=declaration(permission))
        self.ended = []
        self.runtime.sessions.open("s1", self)
        request = {
            "session_id": "s1",
            "conversation_id": "c1",
            "message_id": None,
            "app_id": "app-1",
            "endpoint_id": None,
            "context": {"k": 1},
            "event": "request",
            "data": {"user_id": "u1", "type": access_type, "action": "invoke_tool"},
        }
        self.session = InvocationSession.of(TENANT, PLUGIN_ID, request, self.runtime)

    # the session's listener: these tests only look at what is sent back
    def stream(self, chunk, raw):
        pass

    def invoke(self, request):
        pass

    def end(self):
        self.ended.append("end")

    def error(self, error_type, message, args):
        self.ended.append(message)

    def call(self, invoke_type: str, request: dict, backwards_id: str = "b1") -> list[dict]:
        """Invoke, let everything run, and return the backwards answers' data."""
        self.backwards.handle(
            self.session, {"type": invoke_type, "backwards_request_id": backwards_id, "request": request}
        )
        self.treq.flush()
        return [message["data"] for _, message in self.runtime.sent]


class PureTests(SynchronousTestCase):
    """The table and the request shaping."""

    def test_parse_invoke_refuses_malformed(self):
        """A missing type, id or request object is MalformedInvokeError."""
        for data in (None, {}, {"type": "tool", "backwards_request_id": "b"}, {"type": 1, "backwards_request_id": "b",
                                                                                "request": {}}):
            self.assertRaises(MalformedInvokeError, parse_invoke, data)
        self.assertEqual(
            parse_invoke({"type": "tool", "backwards_request_id": "b", "request": {"x": 1}}), ("tool", "b", {"x": 1})
        )

    def test_permission_refusal(self):
        """model.llm needs model.enabled too; upload_file needs nothing."""
        self.assertIsNone(permission_refusal(declaration(ALL_PERMISSIONS), ("model", "llm")))
        half = declaration({"model": {"enabled": False, "llm": True}})
        self.assertEqual(
            permission_refusal(half, ("model", "llm")),
            "permission denied, you need to enable llm access in plugin manifest",
        )
        self.assertEqual(
            permission_refusal(declaration(None), ("tool",)),
            "permission denied, you need to enable tool access in plugin manifest",
        )
        self.assertIsNone(permission_refusal(declaration(None), INVOKE_TYPES["upload_file"].permission))

    def test_request_overrides_identity_and_drops_unknown_fields(self):
        """tenant, user and type come from the session; app_id the SDK adds to tool calls is dropped."""
        harness = Harness()
        body = inner_api_request(
            harness.session,
            "tool",
            INVOKE_TYPES["tool"],
            {"tool_type": "builtin", "provider": "p", "tool": "t", "tool_parameters": {}, "app_id": "x",
             "tenant_id": "forged", "user_id": "forged", "type": "llm"},
        )
        self.assertEqual(
            body,
            {"tenant_id": TENANT, "user_id": "u1", "type": "tool", "tool_type": "builtin", "provider": "p",
             "tool": "t", "tool_parameters": {}},
        )


class DispatchTests(SynchronousTestCase):
    """Answers on the runtime."""

    def test_tool_stream_then_end(self):
        """A tool call streams each item as a 'stream' response, then end."""
        harness = Harness()
        answers = harness.call("tool", {"tool_type": "builtin", "provider": "p", "tool": "t",
                                        "tool_parameters": {"text": "hi"}})
        self.assertGreater(len(answers), 1)
        for answer in answers[:-1]:
            self.assertEqual((answer["event"], answer["message"], answer["backwards_request_id"]),
                             ("response", "stream", "b1"))
        self.assertEqual(answers[-1], {"backwards_request_id": "b1", "event": "end", "message": "", "data": None})
        received = harness.fake_api.received[-1]
        self.assertEqual(received.path, "invoke/tool")
        self.assertEqual(received.body["tenant_id"], TENANT)
        self.assertEqual(received.body["user_id"], "u1")

    def test_answers_repeat_session_context(self):
        """Every answer names the session and repeats its context keys (§4.3)."""
        harness = Harness()
        harness.call("text_embedding", {"provider": "p", "model": "m", "model_type": "text-embedding",
                                        "texts": ["a"]})
        for session_id, message in harness.runtime.sent:
            self.assertEqual(session_id, "s1")
            self.assertEqual(message["event"], "backwards_response")
            self.assertEqual((message["session_id"], message["conversation_id"], message["app_id"],
                              message["context"]), ("s1", "c1", "app-1", {"k": 1}))

    def test_single_is_one_struct_response(self):
        """A single-answer type sends one 'struct' response with Dify's data, then end."""
        harness = Harness()
        answers = harness.call("system_summary", {"text": "long text", "instruction": "short"})
        self.assertEqual([(a["event"], a["message"]) for a in answers], [("response", "struct"), ("end", "")])
        self.assertIn("summary", answers[0]["data"])

    def test_model_session_refused(self):
        """A model session may not call back: error, then end, and Dify is not called."""
        harness = Harness(access_type="model")
        answers = harness.call("llm", {"provider": "p", "model": "m", "model_type": "llm", "prompt_messages": []})
        self.assertEqual(
            answers,
            [
                {"backwards_request_id": "b1", "event": "error", "message": MODEL_SESSION_REFUSAL, "data": None},
                {"backwards_request_id": "b1", "event": "end", "message": "", "data": None},
            ],
        )
        self.assertEqual(harness.fake_api.received, [])

    def test_permission_denied(self):
        """A plugin without tool permission gets the spec's text, then end."""
        harness = Harness(permission={"storage": {"enabled": True, "size": 10}})
        answers = harness.call("tool", {"tool_type": "builtin", "provider": "p", "tool": "t", "tool_parameters": {}})
        self.assertEqual([a["event"] for a in answers], ["error", "end"])
        self.assertEqual(answers[0]["message"], "permission denied, you need to enable tool access in plugin manifest")
        self.assertEqual(harness.fake_api.received, [])

    def test_unknown_type(self):
        """An unknown invoke type (and the daemon-internal encrypt) is refused."""
        harness = Harness()
        for name in ("teleport", "encrypt"):
            answers = harness.call(name, {}, backwards_id=name)
            self.assertEqual([a["event"] for a in answers[-2:]], ["error", "end"])
            self.assertEqual(answers[-2]["message"], f"unsupported invoke type: {name}")

    def test_upload_file_always_allowed(self):
        """upload_file needs no permission at all."""
        harness = Harness(permission=None)
        answers = harness.call("upload_file", {"filename": "a.txt", "mimetype": "text/plain"})
        self.assertEqual([a["event"] for a in answers], ["response", "end"])
        self.assertIn("url", answers[0]["data"])

    def test_storage_served_inside_the_daemon(self):
        """storage set, get, exist and del go to the persistence, never to Dify."""
        harness = Harness()
        harness.call("storage", {"opt": "set", "key": "k", "value": "6869"}, "b1")
        harness.call("storage", {"opt": "get", "key": "k"}, "b2")
        harness.call("storage", {"opt": "exist", "key": "k"}, "b3")
        harness.call("storage", {"opt": "del", "key": "k"}, "b4")
        responses = {a["backwards_request_id"]: a["data"] for a in
                     (m["data"] for _, m in harness.runtime.sent) if a["event"] == "response"}
        self.assertEqual(responses["b1"], {"data": "ok"})
        self.assertEqual(responses["b2"], {"data": "6869"})
        self.assertEqual(responses["b3"], {"data": True, "exist_num": 1})
        self.assertEqual(responses["b4"], {"data": "ok", "deleted_num": 1})
        self.assertEqual(harness.fake_api.received, [])

    def test_storage_quota(self):
        """A value beyond the manifest's storage.size is refused with error + end."""
        harness = Harness()
        answers = harness.call("storage", {"opt": "set", "key": "k", "value": "00" * 17})
        self.assertEqual([a["event"] for a in answers], ["error", "end"])

    def test_dify_failure_is_error_then_end(self):
        """A 500 from Dify reaches the plugin as error + end."""
        harness = Harness()
        harness.fake_api.fail("invoke/tool", 500, b"boom")
        answers = harness.call("tool", {"tool_type": "builtin", "provider": "p", "tool": "t", "tool_parameters": {}})
        self.assertEqual([a["event"] for a in answers], ["error", "end"])
        self.assertIn("500", answers[0]["message"])

    def test_dify_error_item(self):
        """An error Dify puts in its answer is the plugin's error message."""
        harness = Harness()
        harness.fake_api.error("invoke/moderation", "model is gone")
        answers = harness.call("moderation", {"provider": "p", "model": "m", "model_type": "moderation",
                                              "text": "x"})
        self.assertEqual([(a["event"], a["message"]) for a in answers], [("error", "model is gone"), ("end", "")])

    def test_session_closed_midway(self):
        """When the session is gone before Dify answers, nothing is sent and nothing fails."""
        harness = Harness()
        harness.fake_api.slow("invoke/summary", 5)
        harness.backwards.handle(harness.session, {"type": "system_summary", "backwards_request_id": "b1",
                                                   "request": {"text": "t", "instruction": "i"}})
        harness.runtime.end("s1")
        harness.reactor.advance(5)
        harness.treq.flush()
        self.assertEqual(harness.runtime.sent, [])
        self.assertEqual(harness.backwards.running, set())
        self.assertEqual(self.flushLoggedErrors(), [])
