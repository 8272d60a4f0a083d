"""
Bringing plugins up: the local runtime factory with the real SDK in real
uv venvs over real pipes (the registry's own tests, with fakes, are in
``test_registry``).
"""

from __future__ import annotations

import os
import stat

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from difydaemon.blocking import InlineRunner, ThreadPoolRunner
from difydaemon.errors import InternalServerError
from difydaemon.storage.paths import StoragePaths
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.environment import MARKER_PATH, VENV_PYTHON, working_dir_for
from difydaemon.runtimes.launch import UNPACKED_MARKER, LocalRuntimeFactory
from difydaemon.runtimes.parent_death import ParentDeathSignal, RunAs
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.process import FakeProcessReactor
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


class _FakeBuilder:
    """A builder that builds nothing and says where the venv's Python would be."""

    def __init__(self):
        self.built = []

    def build(self, working_dir, version, progress):
        self.built.append(working_dir)
        return defer.succeed(os.path.join(working_dir, ".venv", "bin", "python"))


class ContainedLaunchTests(SynchronousTestCase):
    """What a launch prepares for a contained plugin, on fakes."""

    def launch(self, run_as=None, memory=None):
        self.working_path = os.path.abspath(self.mktemp())
        self.home = os.path.join(self.working_path, ".plugin-home")
        self.reactor = FakeProcessReactor()
        self.builder = _FakeBuilder()
        factory = LocalRuntimeFactory(
            self.reactor,
            MemoryPersistence(self.reactor),
            MemoryObjectStorage(),
            StoragePaths(),
            InlineRunner(),
            self.builder,
            self.working_path,
            {"PATH": "/usr/bin:/bin", "HOME": self.home},
            52428800,
            plugin_home=self.home,
            run_as=run_as,
            shared_dirs=(os.path.join(self.working_path, ".uv-cache"),),
            runtime_options={"parent_death": ParentDeathSignal("/daemon/python", getpid=lambda: 77)},
        )
        files = behaviour_plugin_files()
        if memory is not None:
            files["manifest.yaml"] = files["manifest.yaml"].replace(b"memory: 268435456", b"memory: %d" % memory)
        data = build_package(files)
        decoded = decode_package(data, POLICY)
        launched = factory.launch(decoded.identifier.raw, decoded.declaration, data, lambda line: None)
        self.reactor.spawned[-1].transport.stdout(b'{"event":"heartbeat","session_id":null,"data":{}}\n\n')
        return self.successResultOf(launched)

    def test_plugin_home_created_private(self):
        """Before the build, the plugins' HOME is created 0700; the plugin is started with it."""
        runtime = self.launch()
        self.assertEqual(stat.S_IMODE(os.stat(self.home).st_mode), 0o700)
        self.assertEqual(self.reactor.spawned[-1].env["HOME"], self.home)
        self.assertEqual(runtime.working_dir, self.builder.built[0])

    def test_manifest_memory_enforced(self):
        """A manifest's resource.memory of 256 MB starts the plugin under that RLIMIT_DATA."""
        runtime = self.launch(memory=268435456)
        self.assertEqual(runtime.memory_limit, 268435456)
        self.assertIn("setsid,data=268435456", self.reactor.spawned[-1].args)

    def test_placeholder_memory_not_enforced(self):
        """The official packages' 1 MiB starts the plugin with no memory limit, and a warning says why."""
        with capturedLogs() as events:
            runtime = self.launch(memory=1048576)
        self.assertIsNone(runtime.memory_limit)
        # the launcher's options argument: a process group, no RLIMIT_DATA
        self.assertIn("setsid", self.reactor.spawned[-1].args)
        [warning] = [e for e in events if "placeholder" in e.get("reason", "")]
        self.assertEqual(warning["declared"], 1048576)

    def test_memory_beyond_the_launcher_not_enforced(self):
        """A resource.memory past what setrlimit takes starts the plugin with no limit (it crashed the launcher)."""
        with capturedLogs() as events:
            runtime = self.launch(memory=2**64 - 1)
        self.assertIsNone(runtime.memory_limit)
        self.assertIn("setsid", self.reactor.spawned[-1].args)  # the options argument: no data=<bytes>
        [warning] = [e for e in events if "more than the launcher can set" in e.get("reason", "")]
        self.assertEqual(warning["declared"], 2**64 - 1)

    def test_directories_given_to_the_plugin_user(self):
        """With a user to run as, the plugin's HOME, working directory and the shared uv cache become that user's."""
        if os.geteuid() != 0:
            self.skipTest("only root can give files away")
        runtime = self.launch(RunAs("plugins", 54321, 54322))
        for path in (
            self.home,
            runtime.working_dir,
            os.path.join(runtime.working_dir, "manifest.yaml"),
            os.path.join(self.working_path, ".uv-cache"),
        ):
            info = os.stat(path)
            self.assertEqual((info.st_uid, info.st_gid), (54321, 54322), path)
class BuildInstalledTests(SynchronousTestCase):
    """build_installed makes an installed plugin's files and venv without starting any process (idle stop)."""

    def installed(self):
        """A factory over fakes holding one installed local plugin; (reactor, factory, builder, working_path, identifier)."""
        reactor = FakeProcessReactor()
        persistence = MemoryPersistence(reactor)
        storage = MemoryObjectStorage()
        paths = StoragePaths()
        builder = _FakeBuilder()
        working_path = os.path.abspath(self.mktemp())
        data = build_package(behaviour_plugin_files())
        decoded = decode_package(data, POLICY)
        identifier = decoded.identifier.raw
        self.successResultOf(persistence.install_plugin("tenant", identifier, "acme/echo", "local", "package", {}, {}))
        self.successResultOf(persistence.save_declaration(identifier, "acme/echo", decoded.declaration))
        self.successResultOf(storage.save(paths.installed_package(identifier), data))
        factory = LocalRuntimeFactory(
            reactor, persistence, storage, paths, InlineRunner(), builder, working_path,
            {"PATH": "/usr/bin:/bin"}, 52428800,
        )
        return reactor, factory, builder, working_path, identifier

    def test_builds_without_a_process(self):
        """The package is unpacked and the venv built; nothing is spawned, and a launch after it reuses the directory."""
        reactor, factory, builder, working_path, identifier = self.installed()
        lines = []
        self.assertIsNone(self.successResultOf(factory.build_installed(identifier, lines.append)))
        self.assertEqual(reactor.spawned, [])
        self.assertEqual(len(builder.built), 1)
        self.assertTrue(os.path.exists(os.path.join(builder.built[0], "manifest.yaml")))
        self.assertEqual(lines[-1], "plugin is built; idle until its first call")
        launched = factory.launch_installed(identifier, lines.append)
        reactor.spawned[-1].transport.stdout(b'{"event":"heartbeat","session_id":null,"data":{}}\n\n')
        self.assertEqual(self.successResultOf(launched).working_dir, builder.built[0])
        self.assertNotIn("unpacking the package", lines[lines.index("plugin is built; idle until its first call"):])

    def test_partial_unpack_is_unpacked_again(self):
        """A working directory holding some of the package's files but no unpack marker (a cancelled or killed unpack) is unpacked again; a whole one is not."""
        _, factory, _, working_path, identifier = self.installed()
        working_dir = os.path.abspath(working_dir_for(working_path, identifier))
        os.makedirs(working_dir)
        with open(os.path.join(working_dir, "manifest.yaml"), "wb") as f:
            f.write(b"vers")  # what an unpack cut short left
        lines = []
        self.assertIsNone(self.successResultOf(factory.build_installed(identifier, lines.append)))
        self.assertIn("unpacking the package", lines)
        self.assertEqual(os.listdir(os.path.join(working_dir)).count("main.py"), 1)
        with open(os.path.join(working_dir, "manifest.yaml"), "rb") as f:
            self.assertEqual(f.read(), behaviour_plugin_files()["manifest.yaml"])
        self.assertTrue(os.path.exists(os.path.join(working_dir, UNPACKED_MARKER)))
        del lines[:]
        self.assertIsNone(self.successResultOf(factory.build_installed(identifier, lines.append)))
        self.assertNotIn("unpacking the package", lines)

    def test_directory_from_before_the_marker_kept(self):
        """A working directory with a built venv and no unpack marker (made before the marker existed) is kept as it is."""
        _, factory, _, working_path, identifier = self.installed()
        working_dir = os.path.abspath(working_dir_for(working_path, identifier))
        for path in (VENV_PYTHON, MARKER_PATH, "main.py"):
            os.makedirs(os.path.dirname(os.path.join(working_dir, path)), exist_ok=True)
            open(os.path.join(working_dir, path), "w").close()
        lines = []
        self.assertIsNone(self.successResultOf(factory.build_installed(identifier, lines.append)))
        self.assertNotIn("unpacking the package", lines)
        self.assertEqual(os.path.getsize(os.path.join(working_dir, "main.py")), 0)
        self.assertTrue(os.path.exists(os.path.join(working_dir, UNPACKED_MARKER)))

    def test_not_a_local_plugin(self):
        """An identifier with no local install builds nothing and answers None."""
        clock = Clock()
        builder = _FakeBuilder()
        factory = LocalRuntimeFactory(
            clock, MemoryPersistence(clock), MemoryObjectStorage(), StoragePaths(), InlineRunner(), builder,
            self.mktemp(), {}, 52428800,
        )
        self.assertIsNone(self.successResultOf(factory.build_installed("acme/x:0.0.1@" + "c" * 64, lambda line: None)))
        self.assertEqual(builder.built, [])


class InstalledDeclarationTests(SynchronousTestCase):
    """Restoring an installed plugin reads its declaration through the declaration cache."""

    def test_declaration_read_through_the_cache(self):
        """launch_installed asks the cache, not the database, for the declaration."""
        clock = Clock()
        persistence = MemoryPersistence(clock)
        identifier = "acme/echo:0.0.1@" + "a" * 64
        self.successResultOf(persistence.install_plugin("tenant", identifier, "acme/echo", "local", "package", {}, {}))
        self.successResultOf(persistence.save_declaration(identifier, "acme/echo", {"name": "echo"}))

        class Absent:
            asked = []

            async def value(self, wanted):
                self.asked.append(wanted)
                return None

        declarations = Absent()
        factory = LocalRuntimeFactory(
            clock, persistence, MemoryObjectStorage(), StoragePaths(), InlineRunner(), None,
            self.mktemp(), {}, 52428800, declarations=declarations,
        )
        failure = self.failureResultOf(factory.launch_installed(identifier, lambda line: None), InternalServerError)
        self.assertIn("has no declaration", failure.value.message)
        self.assertEqual(declarations.asked, [identifier])
