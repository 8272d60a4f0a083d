"""
A launch with a fake builder, a fake process reactor and a fake health
probe: the package checked and unpacked, the venv built through the
builder, the function started in serverless mode on its own port, progress
reported; failures name their stage and leave nothing behind.
"""

from __future__ import annotations

import os

from difydaemon.blocking import InlineRunner
from difydaemon.sri import wire
from difydaemon.sri.function_site import FUNCTION_SITE_DIR, SITECUSTOMIZE
from difydaemon.sri.functions import FunctionTable
from difydaemon.sri.state import load_records
from difydaemon.sri.launcher import FUNCTIONS_DIR, FunctionLauncher, LaunchFailed, function_environment, free_port
from difydaemon.packaging.checksum import package_checksum
from difydaemon.packaging.archive import read_package
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.process import FakeProcessReactor
from tests.sri.fakes import FakeBuilder, FakeProbe, Ports

PACKAGE = build_package(echo_plugin_files())
CHECKSUM = package_checksum(read_package(PACKAGE, 10**8))
FILENAME = f"acme@echo@0.0.1@{CHECKSUM}.difypkg"
BASE_ENV = {"PATH": "/usr/bin", "HOME": "/home/sri"}


def form(package: bytes = PACKAGE, filename: str = FILENAME) -> wire.LaunchForm:
    return wire.launch_form(filename, package, "false", None)


class LauncherCase(SynchronousTestCase):
    """A launcher on fakes: builder, process reactor, health probe, ports."""

    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.builder = FakeBuilder()
        self.probe = FakeProbe()
        self.ports = Ports()
        self.working_path = os.path.abspath(self.mktemp())
        self.table = FunctionTable()
        self.launcher = self.make_launcher()
        self.events: list[wire.LaunchEvent] = []

    def make_launcher(self, **overrides) -> FunctionLauncher:
        arguments = dict(
            reactor=self.reactor,
            builder=self.builder,
            run_blocking=InlineRunner().run,
            table=self.table,
            working_path=self.working_path,
            function_host="127.0.0.1",
            daemon_url="http://daemon:5002",
            base_environment=BASE_ENV,
            probe=self.probe,
            max_package_size=10**7,
            start_timeout=5.0,
            allocate_port=self.ports,
        )
        arguments.update(overrides)
        return FunctionLauncher(**arguments)

    def launch(self, launch_form=None):
        return self.launcher.launch(launch_form or form(), self.events.append)

    def working_dir(self) -> str:
        return os.path.join(self.working_path, FUNCTIONS_DIR, "acme", f"echo-0.0.1@{CHECKSUM}")


class LauncherTests(LauncherCase):
    def test_launched(self):
        """A launch unpacks, builds through the builder, starts the SDK in serverless mode and keeps the function."""
        function = self.successResultOf(self.launch())
        working_dir = self.working_dir()
        self.assertTrue(os.path.isfile(os.path.join(working_dir, "main.py")))
        self.assertEqual(self.builder.builds, [(working_dir, "3.12")])
        spawned = self.reactor.spawned[0]
        self.assertEqual(spawned.args, [os.path.join(working_dir, ".venv", "bin", "python"), "-m", "main"])
        self.assertEqual(spawned.path, working_dir)
        self.assertEqual(
            spawned.env,
            {
                **BASE_ENV,
                "INSTALL_METHOD": "serverless",
                "SERVERLESS_HOST": "127.0.0.1",
                "SERVERLESS_PORT": "41000",
                "DIFY_PLUGIN_DAEMON_URL": "http://daemon:5002",
                "PYTHONPATH": os.path.join(self.working_path, FUNCTION_SITE_DIR),
            },
        )
        with open(os.path.join(self.working_path, FUNCTION_SITE_DIR, "sitecustomize.py")) as f:
            self.assertEqual(f.read(), SITECUSTOMIZE)
        self.assertEqual(function.spec.endpoint, "http://127.0.0.1:41000")
        self.assertIs(self.table.get(FILENAME), function)
        stages = [(event.stage, event.state) for event in self.events]
        self.assertEqual(stages[0], ("start", "running"))
        self.assertIn(("build", "running"), stages)
        self.assertEqual(stages[-1], ("run", "running"))
        self.assertIn("installing dependencies from requirements.txt", [event.message for event in self.events])

    def test_relaunch_reuses(self):
        """A second launch of a running package reuses its function: no build, no process."""
        first = self.successResultOf(self.launch())
        second = self.successResultOf(self.launch())
        self.assertIs(first, second)
        self.assertEqual((len(self.builder.builds), len(self.reactor.spawned)), (1, 1))

    def test_concurrent_launches_share(self):
        """Two launches of one package at once share one build and one function."""
        self.builder.hold = True
        first = self.launch()
        second = self.launch()
        self.builder.release()
        self.assertIs(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual((len(self.builder.builds), len(self.reactor.spawned)), (1, 1))

    def test_builds_bounded(self):
        """With one build at a time, a second package's build waits for the first's, and says so."""
        self.launcher = self.make_launcher(build_concurrency=1)
        self.builder.hold = True
        first = self.launch()
        other = build_package(echo_plugin_files(name="other"))
        checksum = package_checksum(read_package(other, 10**8))
        second = self.launch(form(other, f"acme@other@0.0.1@{checksum}.difypkg"))
        self.assertEqual(len(self.builder.builds), 1)
        self.assertIn("waiting for other builds to finish", [event.message for event in self.events])
        self.builder.release()
        self.successResultOf(first)
        self.assertEqual(len(self.builder.builds), 2)
        self.builder.release()
        self.successResultOf(second)

    def test_second_package_gets_another_port(self):
        """Each function gets a port no other function holds."""
        self.successResultOf(self.launch())
        other = build_package(echo_plugin_files(name="other"))
        checksum = package_checksum(read_package(other, 10**8))
        function = self.successResultOf(self.launch(form(other, f"acme@other@0.0.1@{checksum}.difypkg")))
        self.assertEqual(function.spec.port, 41001)
        self.assertEqual(self.ports.taken[-1], {41000})

    def test_build_failure(self):
        """A failed build fails the launch at the build stage with the builder's message; nothing is left."""
        self.builder.error = "installing dependencies failed (exit 1):\nNo solution found for dify_plugin==99"
        failure = self.failureResultOf(self.launch(), LaunchFailed)
        self.assertEqual(failure.value.stage, "build")
        self.assertIn("No solution found for dify_plugin==99", failure.value.message)
        self.assertFalse(os.path.exists(self.working_dir()))
        self.assertEqual((self.reactor.spawned, len(self.table)), ([], 0))

    def test_function_never_answers(self):
        """A function that never answers /health fails the launch after the bounded wait; it is stopped, its directory removed."""
        self.probe.healthy = False
        launched = self.launch()
        for _ in range(100):
            self.reactor.advance(0.1)
        failure = self.failureResultOf(launched, LaunchFailed)
        self.assertEqual(failure.value.stage, "run")
        self.assertIn("did not answer GET /health within 5 s", failure.value.message)
        self.assertEqual(self.reactor.running_processes, [])
        self.assertFalse(os.path.exists(self.working_dir()))
        self.assertEqual(len(self.table), 0)

    def test_checksum_mismatch(self):
        """A package whose content is not the checksum its file name claims is refused before anything is built."""
        wrong = f"acme@echo@0.0.1@{'0' * 64}.difypkg"
        failure = self.failureResultOf(self.launch(form(PACKAGE, wrong)), LaunchFailed)
        self.assertEqual(failure.value.stage, "start")
        self.assertIn(CHECKSUM, failure.value.message)
        self.assertEqual(self.builder.builds, [])

    def test_not_a_package(self):
        """Bytes that are no package fail the launch at its start, naming why."""
        failure = self.failureResultOf(self.launch(form(b"not a zip")), LaunchFailed)
        self.assertEqual(failure.value.stage, "start")
        self.assertIn("not valid", failure.value.message)

    def test_package_over_bound(self):
        """A package over the size bound is refused."""
        self.launcher = self.make_launcher(max_package_size=100)
        self.assertEqual(self.failureResultOf(self.launch(), LaunchFailed).value.stage, "start")

    def test_remove(self):
        """Removing a function stops its process and deletes its directory."""
        self.successResultOf(self.launch())
        removed = self.launcher.remove(FILENAME)
        self.reactor.advance(5)
        self.assertTrue(self.successResultOf(removed))
        self.assertEqual(self.reactor.running_processes, [])
        self.assertFalse(os.path.exists(self.working_dir()))
        self.assertIsNone(self.table.get(FILENAME))


class EnvironmentTests(SynchronousTestCase):
    def test_function_environment(self):
        """A function gets its base environment and the SDK's serverless settings, not PYTHONDONTWRITEBYTECODE."""
        env = function_environment({"PATH": "/bin", "PYTHONDONTWRITEBYTECODE": "1"}, "10.0.0.5", 4100, "http://d:5002")
        self.assertEqual(
            env,
            {
                "PATH": "/bin",
                "INSTALL_METHOD": "serverless",
                "SERVERLESS_HOST": "10.0.0.5",
                "SERVERLESS_PORT": "4100",
                "DIFY_PLUGIN_DAEMON_URL": "http://d:5002",
            },
        )

    def test_free_port(self):
        """A free port is one no function holds."""
        first = free_port("127.0.0.1", set())
        self.assertNotEqual(free_port("127.0.0.1", {first}), first)


class LauncherStopTests(LauncherCase):
    """Stopping the launcher (the connector stopping)."""

    def test_stop_reaches_starting_functions(self):
        """A stop while a function is still starting stops it; its launch fails and nothing is kept."""
        self.probe.healthy = False
        launched = self.launch()
        self.assertEqual(len(self.reactor.running_processes), 1)
        stopped = self.launcher.stop()
        self.reactor.advance(5)
        self.successResultOf(stopped)
        failure = self.failureResultOf(launched, LaunchFailed)
        self.assertIn("stopping", failure.value.message)
        self.assertEqual((self.reactor.running_processes, len(self.table)), ([], 0))

    def test_stop_refuses_new_launches(self):
        """After a stop no launch starts anything."""
        self.successResultOf(self.launcher.stop())
        self.assertIn("stopping", self.failureResultOf(self.launch(), LaunchFailed).value.message)
        self.assertEqual(self.builder.builds, [])


class RestoreTests(LauncherCase):
    """Functions remembered in the state file come back when a connector starts."""

    def launched_then_new_connector(self, **overrides) -> FunctionLauncher:
        """Launch echo, make its python exist, and give a new launcher (a restarted connector) on the same path."""
        function = self.successResultOf(self.launch())
        os.makedirs(os.path.dirname(function.spec.argv[0]), exist_ok=True)
        open(function.spec.argv[0], "w").close()
        self.reactor = FakeProcessReactor()
        self.builder = FakeBuilder()
        self.table = FunctionTable()
        return self.make_launcher(reactor=self.reactor, builder=self.builder, table=self.table, **overrides)

    def test_remembered(self):
        """A launch is written to the state file; a removal takes it out."""
        function = self.successResultOf(self.launch())
        [record] = load_records(self.working_path)
        self.assertEqual((record.filename, record.port, record.argv), (FILENAME, 41000, function.spec.argv))
        removed = self.launcher.remove(FILENAME)
        self.reactor.advance(5)
        self.successResultOf(removed)
        self.assertEqual(load_records(self.working_path), [])

    def test_restored_on_same_port(self):
        """A restarted connector starts the function again on its port, without building; instances finds it."""
        launcher = self.launched_then_new_connector(is_port_free=lambda host, port: True)
        self.assertEqual(self.successResultOf(launcher.restore()), 1)
        function = self.table.get(FILENAME)
        self.assertEqual((function.spec.port, function.state), (41000, "running"))
        self.assertEqual(self.builder.builds, [])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.reactor.spawned[0].env["SERVERLESS_PORT"], "41000")

    def test_taken_port_replaced(self):
        """A function whose port is taken now comes back on another one."""
        launcher = self.launched_then_new_connector(is_port_free=lambda host, port: False)
        self.successResultOf(launcher.restore())
        self.assertEqual(self.table.get(FILENAME).spec.port, 41001)
        self.assertEqual(load_records(self.working_path)[0].port, 41001)

    def test_launch_during_restore_waits(self):
        """A launch of a function being restored waits for it instead of building another."""
        self.probe.healthy = True
        launcher = self.launched_then_new_connector(is_port_free=lambda host, port: True)
        self.probe.healthy = False
        restored = launcher.restore()
        launched = launcher.launch(form(), self.events.append)
        self.probe.healthy = True
        self.reactor.advance(0.1)
        self.successResultOf(restored)
        self.assertIs(self.successResultOf(launched), self.table.get(FILENAME))
        self.assertEqual((self.builder.builds, len(self.reactor.spawned)), ([], 1))

    def test_gone_venv_not_restored(self):
        """A function whose venv is gone is not restored, and forgotten."""
        launcher = self.launched_then_new_connector(is_port_free=lambda host, port: True)
        os.unlink(load_records(self.working_path)[0].argv[0])
        self.assertEqual(self.successResultOf(launcher.restore()), 0)
        self.assertEqual((len(self.table), self.reactor.spawned), (0, []))
        self.assertEqual(load_records(self.working_path), [])
