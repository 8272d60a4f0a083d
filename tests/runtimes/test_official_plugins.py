"""
The two official packages of ``shared/fixtures`` under the local runtime:
the OpenAI model plugin (SDK 0.1.0) against a fake OpenAI server, and the
agent-strategy plugin (SDK 0.0.1b75) up to its backwards LLM invocation.

Real SDK processes in real uv venvs over real pipes, opened with requests
shaped exactly as the daemon writes them (``runtimes.md`` §0.2).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from zope.interface import implementer

from difydaemon.blocking import ThreadPoolRunner
from difydaemon.interfaces import ISessionListener
from difydaemon.invocation.messages import backwards_error
from difydaemon.storage.paths import StoragePaths
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.openai import FakeOpenAIServer, full_text, listen
from difydaemon.testing.sdk import environment_builder
from difydaemon.testing.tiktoken_cache import tiktoken_cache_dir

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures")
OPENAI_PACKAGE = os.path.join(FIXTURES, "langgenius-openai_0.0.19.difypkg")
AGENT_PACKAGE = os.path.join(FIXTURES, "langgenius-agent_0.0.14.difypkg")
AGENT_PARAMS = os.path.join(FIXTURES, "agent-strategy-params.json")

# The official packages claim langgenius authorship; the OpenAI one is unsigned.
POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False, public_keys=())


def plugin_request(session_id: str, access_type: str, action: str, fields: dict) -> dict:
    """A §0.2 request: all eight keys in the daemon's order, ``data`` flattened."""
    data = {"user_id": "u1", "type": access_type, "action": action}
    data.update(fields)
    return {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": data,
    }


def model_request(session_id: str, action: str, model: str, credentials: dict, **fields) -> dict:
    """A request of a ``model`` action on the ``openai`` provider."""
    base = {"provider": "openai", "model": model, "model_type": "llm", "credentials": credentials}
    base.update(fields)
    return plugin_request(session_id, "model", action, base)


@implementer(ISessionListener)
class _Listener:
    """Collects one session; ``done`` fires with ("end",) or ("error", type, message)."""

    def __init__(self):
        self.chunks = []
        self.invocations = []
        self.invoked = defer.Deferred()
        self.done = defer.Deferred()

    def stream(self, chunk, raw):
        self.chunks.append(chunk)

    def invoke(self, request):
        self.invocations.append(request)
        if not self.invoked.called:
            self.invoked.callback(request)

    def end(self):
        self.done.callback(("end",))

    def error(self, error_type, message, args):
        self.done.callback(("error", error_type, message))


_prepared_venvs: list[str] = []


def prepared_venvs_dir() -> str:
    """
    One prepared-venv directory for this test process, removed at exit:
    the first launch of a package builds and byte-compiles its venv (numpy,
    openai, ...), every later one copies it.
    """
    if not _prepared_venvs:
        path = tempfile.mkdtemp(prefix="difydaemon-official-venvs-")
        atexit.register(shutil.rmtree, path, True)
        _prepared_venvs.append(path)
    return _prepared_venvs[0]


class _OfficialPluginCase(AsyncTestCase):
    """Launches fixture packages through a LocalRuntimeFactory."""

    timeout = 600

    def setUp(self):
        if not os.path.exists(OPENAI_PACKAGE):
            self.skipTest(f"fixture packages not found at {FIXTURES}")
        self.working_path = os.path.abspath(self.mktemp())
        os.makedirs(self.working_path)
        self.runner = ThreadPoolRunner(reactor, "test-official-plugins")
        self.addCleanup(self.runner.stop)
        # what the daemon gives a plugin, the tokenizer cache listed as in PLUGIN_ENV_PASSTHROUGH
        environ = plugin_environment(
            dict(os.environ, TIKTOKEN_CACHE_DIR=tiktoken_cache_dir()), passthrough=["TIKTOKEN_CACHE_DIR"]
        )
        # The fake server is on loopback: never through a proxy.
        environ["NO_PROXY"] = environ["no_proxy"] = "127.0.0.1,localhost"
        self.factory = LocalRuntimeFactory(
            reactor,
            MemoryPersistence(reactor),
            MemoryObjectStorage(),
            StoragePaths(),
            self.runner,
            environment_builder(reactor, prepared_venvs_dir=prepared_venvs_dir()),
            self.working_path,
            environ,
            52428800,
            runtime_options={"readiness_timeout": 120.0, "session_timeout": 120.0, "stop_grace_period": 2.0},
        )

    async def launch(self, path: str):
        """Decode and launch one fixture package; the runtime is stopped at clean-up."""
        with open(path, "rb") as f:
            data = f.read()
        decoded = decode_package(data, POLICY)
        runtime = await self.factory.launch(decoded.identifier.raw, decoded.declaration, data, lambda line: None)
        self.addCleanup(runtime.stop)
        return runtime

    async def serve_fake_openai(self, **options) -> tuple[FakeOpenAIServer, str]:
        """A fake OpenAI server on loopback, closed at clean-up; (server, openai_api_base)."""
        server = FakeOpenAIServer(reactor, **options)
        listening = listen(reactor, server)
        self.addCleanup(listening.stop)
        return server, listening.base_url

    async def run_session(self, runtime, request: dict) -> _Listener:
        """Open one session and wait for its end or error."""
        listener = _Listener()
        runtime.open_session(request["session_id"], request, listener)
        await listener.done
        return listener


class OpenAIPluginTests(_OfficialPluginCase):
    """``langgenius/openai`` 0.0.19 (SDK 0.1.0, openai 1.64, tiktoken 0.8) on Python 3.12."""

    async def test_model_schema(self):
        """get_ai_model_schemas answers one chunk with the predefined model's schema, then ends."""
        runtime = await self.launch(OPENAI_PACKAGE)
        listener = await self.run_session(
            runtime, model_request("schema-1", "get_ai_model_schemas", "gpt-4o-mini", {"openai_api_key": "sk-test"})
        )
        self.assertEqual(listener.done.result, ("end",))
        self.assertEqual(len(listener.chunks), 1)
        schema = listener.chunks[0]["model_schema"]
        self.assertEqual(schema["model"], "gpt-4o-mini")
        self.assertEqual(schema["model_type"], "llm")
        self.assertEqual(schema["fetch_from"], "predefined-model")
        self.assertEqual(schema["model_properties"]["mode"], "chat")
        self.assertIn("temperature", [rule["name"] for rule in schema["parameter_rules"]])

    async def test_validate_provider_credentials(self):
        """validate_provider_credentials makes one non-streamed completion on the fake and answers result true."""
        server, base = await self.serve_fake_openai(chunk_count=3)
        runtime = await self.launch(OPENAI_PACKAGE)
        credentials = {"openai_api_key": "sk-test", "openai_api_base": base}
        request = plugin_request(
            "validate-1", "model", "validate_provider_credentials", {"provider": "openai", "credentials": credentials}
        )
        listener = await self.run_session(runtime, request)
        self.assertEqual(listener.done.result, ("end",))
        self.assertEqual([chunk["result"] for chunk in listener.chunks], [True])
        [call] = server.requests
        self.assertEqual((call.method, call.path, call.authorization), ("POST", "/v1/chat/completions", "Bearer sk-test"))
        self.assertEqual(call.body["model"], "gpt-4o-mini")
        self.assertFalse(call.body["stream"])

    async def test_validate_rejects_wrong_key(self):
        """A key the server refuses (401) ends validation with CredentialsValidateFailedError."""
        server, base = await self.serve_fake_openai(api_key="sk-right")
        runtime = await self.launch(OPENAI_PACKAGE)
        credentials = {"openai_api_key": "sk-wrong", "openai_api_base": base}
        request = plugin_request(
            "validate-2", "model", "validate_provider_credentials", {"provider": "openai", "credentials": credentials}
        )
        listener = await self.run_session(runtime, request)
        kind, error_type, message = listener.done.result
        self.assertEqual((kind, error_type), ("error", "CredentialsValidateFailedError"))
        self.assertIn("Incorrect API key provided", message)
        self.assertEqual(listener.chunks, [])

    async def test_streaming_invoke_llm_without_usage_chunk(self):
        """A 20-chunk stream with no usage chunk comes back as 20 LLMResultChunks; tiktoken counts the usage."""
        server, base = await self.serve_fake_openai(chunk_count=20, interval=0.005)
        runtime = await self.launch(OPENAI_PACKAGE)
        request = model_request(
            "invoke-1",
            "invoke_llm",
            "gpt-3.5-turbo",
            {"openai_api_key": "sk-test", "openai_api_base": base},
            model_parameters={"temperature": 0.5},
            prompt_messages=[{"role": "user", "content": "Hello, world!"}],
            tools=[],
            stop=[],
            stream=True,
        )
        listener = await self.run_session(runtime, request)
        self.assertEqual(listener.done.result, ("end",))
        self.assertEqual(len(listener.chunks), 20)
        for chunk in listener.chunks:
            self.assertEqual(chunk["model"], "gpt-3.5-turbo")
            self.assertEqual(chunk["delta"]["index"], 0)
            self.assertEqual(chunk["delta"]["message"]["role"], "assistant")
            self.assertIsInstance(chunk["delta"]["message"]["content"], str)
        text = "".join(chunk["delta"]["message"]["content"] for chunk in listener.chunks)
        self.assertEqual(text, full_text(20))
        last = listener.chunks[-1]["delta"]
        self.assertEqual(last["finish_reason"], "stop")
        # Counted by tiktoken (cl100k_base) since the server sent no usage.
        self.assertEqual(last["usage"]["completion_tokens"], 27)
        self.assertGreater(last["usage"]["prompt_tokens"], 0)
        self.assertIsNone(listener.chunks[0]["delta"]["usage"])
        [call] = server.requests
        self.assertEqual(call.body["messages"], [{"role": "user", "content": "Hello, world!"}])
        self.assertEqual(call.body["stream_options"], {"include_usage": True})
        self.assertEqual(server.streams_completed, 1)

    async def test_streaming_invoke_llm_with_usage_chunk(self):
        """When the server sends the usage chunk the plugin asked for, its counts are the ones reported."""
        server, base = await self.serve_fake_openai(chunk_count=5, usage_chunk=True)
        runtime = await self.launch(OPENAI_PACKAGE)
        request = model_request(
            "invoke-2",
            "invoke_llm",
            "gpt-4o-mini",
            {"openai_api_key": "sk-test", "openai_api_base": base},
            model_parameters={},
            prompt_messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            tools=[],
            stop=[],
            stream=True,
        )
        listener = await self.run_session(runtime, request)
        self.assertEqual(listener.done.result, ("end",))
        self.assertEqual("".join(c["delta"]["message"]["content"] for c in listener.chunks), full_text(5))
        usage = listener.chunks[-1]["delta"]["usage"]
        self.assertEqual((usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]), (9, 5, 14))


class AgentPluginTests(_OfficialPluginCase):
    """``langgenius/agent`` 0.0.14 (signed; SDK 0.0.1b75) on Python 3.12."""

    async def test_function_calling_backwards_llm_refused(self):
        """function_calling asks for an LLM call; refused with error then end, the plugin fails the session."""
        runtime = await self.launch(AGENT_PACKAGE)
        with open(AGENT_PARAMS, "rb") as f:
            params = json.load(f)
        request = plugin_request(
            "agent-1",
            "agent_strategy",
            "invoke_agent_strategy",
            {"agent_strategy_provider": "agent", "agent_strategy": "function_calling", "agent_strategy_params": params},
        )
        listener = _Listener()
        runtime.open_session("agent-1", request, listener)
        invocation = await listener.invoked
        self.assertEqual(invocation["type"], "llm")
        self.assertEqual(invocation["request"]["provider"], "langgenius/openai/openai")
        self.assertEqual(invocation["request"]["model"], "gpt-3.5-turbo")
        self.assertTrue(invocation["request"]["stream"])
        self.assertEqual(
            [tool["name"] for tool in invocation["request"]["tools"]], ["current_time"]
        )
        for message in backwards_error(request, invocation["backwards_request_id"], "no Dify inner API here"):
            runtime.send("agent-1", message)
        self.assertEqual(await listener.done, ("error", "Exception", "no Dify inner API here"))
        # Before asking, it reported the start of its first round as log messages.
        self.assertEqual([chunk["type"] for chunk in listener.chunks], ["log", "log"])
        self.assertEqual(listener.chunks[0]["message"]["label"], "ROUND 1")
