"""
Bringing plugins up: the runtime registry (with fakes) and the local
runtime factory with the real SDK in real uv venvs over real pipes.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from difydaemon.blocking import ThreadPoolRunner
from difydaemon.errors import InternalServerError
from difydaemon.interfaces import IRuntimeLauncher
from difydaemon.management.packages import StoragePaths
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.sdk import environment_builder

POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False, public_keys=())


class _Runtime:
    def __init__(self, identifier):
        self.plugin_unique_identifier = identifier
        self.stopped = False

    def is_ready(self):
        return not self.stopped

    def stop(self):
        self.stopped = True
        return defer.succeed(None)


class _Factory:
    def __init__(self):
        self.launches = []
        self.discarded = []
        self.pending = {}

    def launch(self, identifier, declaration, package, progress):
        self.launches.append(identifier)
        d = defer.Deferred()
        self.pending[identifier] = d
        return d

    def discard(self, identifier):
        self.discarded.append(identifier)
        return defer.succeed(None)

    def restore(self):
        return defer.succeed([_Runtime("a/restored:0.0.1@" + "1" * 64)])


class RegistryTests(SynchronousTestCase):
    """The registry shares launches, keeps runtimes and discards on stop."""

    def setUp(self):
        super().setUp()
        self.factory = _Factory()
        self.registry = RuntimeRegistry(Clock(), self.factory)

    def test_provides_launcher(self):
        """The registry is an IRuntimeLauncher."""
        self.assertTrue(verifyObject(IRuntimeLauncher, self.registry))

    def test_concurrent_launches_share_one(self):
        """Two launches of one identifier start it once and both see the outcome."""
        first = self.registry.launch("a/b:0.0.1@" + "2" * 64, {}, b"", lambda line: None)
        second = self.registry.launch("a/b:0.0.1@" + "2" * 64, {}, b"", lambda line: None)
        self.assertEqual(len(self.factory.launches), 1)
        runtime = _Runtime("a/b:0.0.1@" + "2" * 64)
        self.factory.pending["a/b:0.0.1@" + "2" * 64].callback(runtime)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIs(self.registry.get("a/b:0.0.1@" + "2" * 64), runtime)
        self.assertEqual(self.registry.pool_status(), {"free": 1, "busy": 0, "total": 1})

    def test_failed_launch_is_forgotten(self):
        """A failed launch fails every waiter and a later launch tries again."""
        ident = "a/b:0.0.1@" + "3" * 64
        first = self.registry.launch(ident, {}, b"", lambda line: None)
        second = self.registry.launch(ident, {}, b"", lambda line: None)
        self.factory.pending[ident].errback(InternalServerError("boom"))
        self.failureResultOf(first, InternalServerError)
        self.failureResultOf(second, InternalServerError)
        self.assertIsNone(self.registry.get(ident))
        self.registry.launch(ident, {}, b"", lambda line: None)
        self.assertEqual(len(self.factory.launches), 2)

    def test_stop_stops_and_discards(self):
        """stop() stops the runtime and discards its files."""
        ident = "a/b:0.0.1@" + "4" * 64
        self.registry.launch(ident, {}, b"", lambda line: None)
        runtime = _Runtime(ident)
        self.factory.pending[ident].callback(runtime)
        self.successResultOf(self.registry.stop(ident))
        self.assertTrue(runtime.stopped)
        self.assertEqual(self.factory.discarded, [ident])
        self.assertIsNone(self.registry.get(ident))

    def test_start_restores_installed(self):
        """start() registers what the factory restores."""
        self.successResultOf(self.registry.start())
        self.assertIsNotNone(self.registry.get("a/restored:0.0.1@" + "1" * 64))

    def test_register_and_unregister(self):
        """Debug runtimes register themselves; unregister only removes the same object."""
        runtime = _Runtime("u/p:0.0.1@" + "5" * 64)
        self.registry.register(runtime)
        self.registry.unregister(_Runtime("u/p:0.0.1@" + "5" * 64))
        self.assertIs(self.registry.get(runtime.plugin_unique_identifier), runtime)
        self.registry.unregister(runtime)
        self.assertIsNone(self.registry.get(runtime.plugin_unique_identifier))


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
