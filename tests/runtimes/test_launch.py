"""
Bringing plugins up: the local runtime factory with the real SDK in real
uv venvs over real pipes (the registry's own tests, with fakes, are in
``test_registry``).
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor

from difydaemon.blocking import ThreadPoolRunner
from difydaemon.errors import InternalServerError
from difydaemon.storage.paths import StoragePaths
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.sdk import environment_builder

POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False, public_keys=())


class _Listener:
    def __init__(self):
        self.chunks = []
        self.done = defer.Deferred()

    def stream(self, chunk, raw):
        self.chunks.append(chunk)

    def invoke(self, request):
        pass

    def end(self):
        self.done.callback(("end", None))

    def error(self, error_type, message, args):
        self.done.callback(("error", (error_type, message)))


def tool_request(session_id: str, tool: str, parameters: dict) -> dict:
    return {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {
            "user_id": "u1",
            "type": "tool",
            "action": "invoke_tool",
            "provider": "echo",
            "tool": tool,
            "tool_parameters": parameters,
            "credentials": {},
        },
    }


class LocalFactoryTests(AsyncTestCase):
    """The local factory with the real SDK."""

    timeout = 240

    def setUp(self):
        self.working_path = os.path.abspath(self.mktemp())
        os.makedirs(self.working_path)
        self.runner = ThreadPoolRunner(reactor, "test-launch")
        self.addCleanup(self.runner.stop)
        self.factory = LocalRuntimeFactory(
            reactor,
            MemoryPersistence(reactor),
            MemoryObjectStorage(),
            StoragePaths(),
            self.runner,
            environment_builder(reactor, prepared_venvs_dir=os.path.join(self.working_path, ".prepared")),
            self.working_path,
            plugin_environment(os.environ),
            52428800,
            runtime_options={"readiness_timeout": 60.0, "session_timeout": 60.0, "stop_grace_period": 2.0},
        )

    async def _launch(self, files, progress=None):
        data = build_package(files)
        decoded = decode_package(data, POLICY)
        lines = progress if progress is not None else []
        runtime = await self.factory.launch(decoded.identifier.raw, decoded.declaration, data, lines.append)
        return decoded.identifier.raw, runtime

    async def test_echo_end_to_end_and_prepared_venv(self):
        """A real plugin launches, answers a tool call; a second version reuses the prepared venv."""
        identifier, runtime = await self._launch(behaviour_plugin_files())
        self.addCleanup(runtime.stop)
        listener = _Listener()
        runtime.open_session("s1", tool_request("s1", "echo", {"text": "hi"}), listener)
        self.assertEqual(await listener.done, ("end", None))
        self.assertEqual(listener.chunks[0], {"type": "text", "message": {"text": "hi"}, "meta": None})
        lines = []
        identifier2, runtime2 = await self._launch(behaviour_plugin_files(version="0.0.2"), lines)
        self.addCleanup(runtime2.stop)
        self.assertIn("copying a prepared venv", lines)
        listener = _Listener()
        runtime2.open_session("s2", tool_request("s2", "stream", {"count": "250"}), listener)
        self.assertEqual(await listener.done, ("end", None))
        self.assertEqual([c["message"]["text"] for c in listener.chunks], [f"chunk-{i}" for i in range(250)])

    async def test_missing_dependency_fails_and_cleans(self):
        """A dependency that does not exist fails the launch naming the step; the directory goes."""
        files = behaviour_plugin_files(extra_requirements=("difydaemon-no-such-package-xyz==1.0",))
        with self.assertRaises(InternalServerError) as caught:
            await self._launch(files)
        message = caught.exception.message
        self.assertIn("installing dependencies from requirements.txt failed", message)
        self.assertIn("difydaemon-no-such-package-xyz", message)
        self.assertEqual(sorted(n for n in os.listdir(self.working_path) if not n.startswith(".")), ["acme"])
        self.assertEqual(os.listdir(os.path.join(self.working_path, "acme")), [])

    async def test_broken_plugin_reports_its_traceback(self):
        """A plugin that crashes at start fails the launch with its stderr tail."""
        with self.assertRaises(InternalServerError) as caught:
            await self._launch(behaviour_plugin_files(main="broken"))
        self.assertIn("starting the plugin failed", caught.exception.message)
        self.assertIn("this plugin cannot start", caught.exception.message)
        self.assertEqual(os.listdir(os.path.join(self.working_path, "acme")), [])

    async def test_silent_plugin_times_out(self):
        """A plugin that never heartbeats fails the launch after the readiness time-out and is killed."""
        self.factory._runtime_options["readiness_timeout"] = 3.0
        with self.assertRaises(InternalServerError) as caught:
            await self._launch(behaviour_plugin_files(main="silent"))
        self.assertIn("starting the plugin failed", caught.exception.message)
        self.assertEqual(os.listdir(os.path.join(self.working_path, "acme")), [])
