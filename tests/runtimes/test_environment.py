"""
Tests for :mod:`difydaemon.runtimes.environment`: the pure parts, the step
runner and the builder on a fake process reactor, and real uv builds of the
echo plugin of ``runtimes.md`` §7 with the real SDK.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from difydaemon.errors import InternalServerError, UniqueIdentifierError
from difydaemon.runtimes.environment import (
    MARKER_PATH,
    OutputTail,
    StepCommand,
    StepOutcome,
    choose_dependency_file,
    compile_commands,
    failure_message,
    find_interpreter,
    find_uv,
    install_command,
    install_environment,
    interpreter_candidates,
    marker_content,
    run_step,
    runner_version,
    venv_command,
    venv_is_valid,
    working_dir_for,
    PythonEnvironmentBuilder,
)
from difydaemon.testing import sdk
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase

ECHO_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "plugins", "echo")
CHECKSUM = "a" * 64


def copy_echo_plugin(target: str) -> str:
    """A fresh copy of the echo plugin's source tree at ``target``."""
    shutil.copytree(ECHO_PLUGIN, target)
    return target


def write_executable(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


class FakeProcessTransport:
    """A spawned process the test drives: output, exit, and recorded signals."""

    def __init__(self, protocol, argv, env, path):
        self.protocol = protocol
        self.argv = tuple(argv)
        self.env = env
        self.path = path
        self.signals = []
        self.stdin_closed = False
        self.connection_lost = False
        self.ended = False

    def closeStdin(self):
        self.stdin_closed = True

    def loseConnection(self):
        self.connection_lost = True

    def signalProcess(self, signal):
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    def emit(self, data: bytes, fd: int = 1):
        self.protocol.childDataReceived(fd, data)

    def finish(self, exit_code: int | None = 0, signal: int | None = None):
        self.ended = True
        if exit_code == 0:
            reason = ProcessDone(0)
        else:
            reason = ProcessTerminated(exitCode=exit_code, signal=signal)
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(MemoryReactorClock):
    """A memory reactor that records spawned processes instead of running them."""

    def __init__(self):
        super().__init__()
        self.processes: list[FakeProcessTransport] = []

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None, **kwargs):
        transport = FakeProcessTransport(processProtocol, args, env, path)
        self.processes.append(transport)
        processProtocol.makeConnection(transport)
        return transport

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SynchronousThreadPool:
    """Runs 'threaded' work at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


# -- pure parts --------------------------------------------------------------


class WorkingDirTests(SynchronousTestCase):
    def test_author_is_a_directory_level(self):
        """The author is a directory and ``:`` becomes ``-`` before ``@checksum``."""
        self.assertEqual(
            working_dir_for("/w", f"acme/echo:0.0.1@{CHECKSUM}"),
            f"/w/acme/echo-0.0.1@{CHECKSUM}",
        )

    def test_without_author(self):
        """An identifier without an author lives directly under the working path."""
        self.assertEqual(working_dir_for("/w", f"echo:1.2.3@{CHECKSUM}"), f"/w/echo-1.2.3@{CHECKSUM}")

    def test_rejects_path_escapes(self):
        """An identifier that could escape the working path is refused."""
        self.assertRaises(UniqueIdentifierError, working_dir_for, "/w", f"../echo:0.0.1@{CHECKSUM}")
        self.assertRaises(UniqueIdentifierError, working_dir_for, "/w", f"acme/..:0.0.1@{CHECKSUM}")


class RunnerVersionTests(SynchronousTestCase):
    def test_empty_means_312(self):
        """An empty or missing meta.runner.version means Python 3.12."""
        self.assertEqual(runner_version(""), "3.12")
        self.assertEqual(runner_version(None), "3.12")

    def test_patch_dropped(self):
        """Only major.minor is kept."""
        self.assertEqual(runner_version("3.12.1"), "3.12")
        self.assertEqual(runner_version(" 3.13 "), "3.13")

    def test_not_a_version(self):
        """Text that is not a version is refused, naming it."""
        error = self.assertRaises(InternalServerError, runner_version, "python3")
        self.assertIn("'python3'", error.message)


class DependencyFileTests(SynchronousTestCase):
    def test_mirror_prefers_requirements(self):
        """With a mirror set, requirements.txt wins over pyproject.toml."""
        present = {"pyproject.toml", "requirements.txt"}
        self.assertEqual(choose_dependency_file(present, "https://mirror/simple"), "requirements.txt")

    def test_mirror_without_requirements(self):
        """With a mirror but no requirements.txt, pyproject.toml is used."""
        self.assertEqual(choose_dependency_file({"pyproject.toml"}, "https://m"), "pyproject.toml")

    def test_no_mirror_prefers_pyproject(self):
        """Without a mirror, pyproject.toml wins."""
        present = {"pyproject.toml", "requirements.txt"}
        self.assertEqual(choose_dependency_file(present, None), "pyproject.toml")

    def test_requirements_only(self):
        """A lone requirements.txt is used."""
        self.assertEqual(choose_dependency_file({"requirements.txt", "main.py"}, ""), "requirements.txt")

    def test_neither(self):
        """Neither file is an error naming both."""
        error = self.assertRaises(InternalServerError, choose_dependency_file, {"main.py"}, None)
        self.assertIn("pyproject.toml", error.message)
        self.assertIn("requirements.txt", error.message)


class InstallEnvironmentTests(SynchronousTestCase):
    def test_replaced_not_inherited(self):
        """The build environment holds only the listed variables, never PYTHONDONTWRITEBYTECODE."""
        environ = {
            "PATH": "/bin:/usr/bin",
            "HOME": "/root",
            "PYTHONDONTWRITEBYTECODE": "1",
            "SSL_CERT_FILE": "/etc/ca.pem",
            "REQUESTS_CA_BUNDLE": "",
            "UV_INDEX_NEXUS_USERNAME": "nexus",
            "SECRET": "x",
        }
        env = install_environment(
            environ, "/w/acme/echo", "/w/.uv-cache", {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ""}
        )
        self.assertEqual(
            env,
            {
                "VIRTUAL_ENV": "/w/acme/echo/.venv",
                "PATH": "/bin:/usr/bin",
                "UV_CACHE_DIR": "/w/.uv-cache",
                "SSL_CERT_FILE": "/etc/ca.pem",
                "UV_INDEX_NEXUS_USERNAME": "nexus",
                "HTTP_PROXY": "http://p:3128",
            },
        )


class CommandLineTests(SynchronousTestCase):
    env = {"PATH": "/bin"}

    def test_venv(self):
        """The venv is created by uv with the interpreter found for the runner version."""
        command = venv_command("/uv", "/wd", "/py/python3.12", self.env)
        self.assertEqual(command.argv, ("/uv", "venv", ".venv", "--python", "/py/python3.12"))
        self.assertEqual((command.path, command.env, command.required), ("/wd", self.env, True))

    def test_requirements_plain(self):
        """requirements.txt is installed with ``uv pip install -r``."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url=None, pip_extra_args=None, pip_verbose=False, frozen_lock=False,
        )
        self.assertEqual(command.argv, ("/uv", "pip", "install", "-r", "requirements.txt"))
        self.assertEqual(command.step, "installing dependencies from requirements.txt")

    def test_requirements_everything(self):
        """Mirror, verbosity and extra args are placed as the Go daemon places them."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url="https://m/simple", pip_extra_args=" --no-cache  --frozen ", pip_verbose=True,
            frozen_lock=True,
        )
        self.assertEqual(
            command.argv,
            ("/uv", "pip", "install", "-i", "https://m/simple", "-r", "requirements.txt", "-vvv", "--no-cache", "--frozen"),
        )

    def test_sync_frozen(self):
        """pyproject.toml is installed with ``uv sync --no-dev --frozen`` when the lock counts."""
        command = install_command(
            "/uv", "/wd", "pyproject.toml", self.env,
            pip_mirror_url="https://m", pip_extra_args=None, pip_verbose=True, frozen_lock=True,
        )
        self.assertEqual(command.argv, ("/uv", "sync", "--no-dev", "--frozen", "-i", "https://m", "-v"))

    def test_sync_ignored_lock(self):
        """An ignored lock drops ``--frozen`` even from the extra args."""
        command = install_command(
            "/uv", "/wd", "pyproject.toml", self.env,
            pip_mirror_url=None, pip_extra_args="--frozen --offline", pip_verbose=False, frozen_lock=False,
        )
        self.assertEqual(command.argv, ("/uv", "sync", "--no-dev", "--offline"))

    def test_compile(self):
        """The plugin and the venv's site-packages are compiled, best effort, without the idle watchdog."""
        first, second = compile_commands("/wd", [".venv/lib/python3.12/site-packages"], self.env, "-f")
        self.assertEqual(
            first.argv,
            ("/wd/.venv/bin/python", "-m", "compileall", "-q", "-f", "-x", r"\.venv|\.uv-cache", "."),
        )
        self.assertEqual(
            second.argv,
            ("/wd/.venv/bin/python", "-m", "compileall", "-q", "-j", "0", "-f", ".venv/lib/python3.12/site-packages"),
        )
        for command in (first, second):
            self.assertEqual((command.required, command.watch_inactivity, command.env), (False, False, self.env))

    def test_compile_without_site_packages(self):
        """Without site-packages only the plugin's own files are compiled."""
        self.assertEqual(len(compile_commands("/wd", [], self.env, None)), 1)

    def test_marker(self):
        """The marker is the compact JSON of the unix time in whole seconds."""
        self.assertEqual(json.loads(marker_content(1700000000.75)), {"timestamp": 1700000000})
        self.assertEqual(marker_content(5), b'{"timestamp":5}')


class VenvValidityTests(SynchronousTestCase):
    def make(self, *paths):
        root = self.mktemp()
        os.makedirs(root)
        for path in paths:
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            open(full, "w").close()
        return root

    def test_complete(self):
        """A venv with its python and the marker is valid."""
        self.assertTrue(venv_is_valid(self.make(".venv/bin/python", MARKER_PATH)))

    def test_without_marker(self):
        """A venv without the marker is not valid."""
        self.assertFalse(venv_is_valid(self.make(".venv/bin/python")))

    def test_without_python(self):
        """A venv without its python is not valid."""
        self.assertFalse(venv_is_valid(self.make(MARKER_PATH)))

    def test_nothing(self):
        """No venv is not valid."""
        self.assertFalse(venv_is_valid(self.make()))


class OutputTailTests(SynchronousTestCase):
    output = (
        b"DEBUG uv 0.13.9\n"
        b"TRACE Checking lock\n"
        b"Resolved 3 packages\r\n"
        b"   0.002s DEBUG resolving\n"
        b"error: No solution found\n"
        b"  cause: Because nope was not found in the package registry\n"
        b"hint: \xc3\xa9 partial"
    )

    def test_split_anywhere(self):
        """Splitting the output at any offset gives the same tail."""
        whole = OutputTail()
        whole.feed(self.output)
        expected = whole.text()
        self.assertEqual(
            expected,
            "Resolved 3 packages\nerror: No solution found\n"
            "  cause: Because nope was not found in the package registry\nhint: \u00e9 partial",
        )
        for offset in range(len(self.output) + 1):
            tail = OutputTail()
            tail.feed(self.output[:offset])
            tail.feed(self.output[offset:])
            self.assertEqual(tail.text(), expected, offset)

    def test_bounded(self):
        """Only about the last ``limit`` bytes are kept, ending with the newest line."""
        tail = OutputTail(limit=100)
        for n in range(1000):
            tail.feed(b"line %d\n" % n)
        text = tail.text()
        self.assertLessEqual(len(text), 100)
        self.assertTrue(text.endswith("line 999"))
        self.assertTrue(text.startswith("line "))


class FailureMessageTests(SynchronousTestCase):
    def test_exit(self):
        """An exit status is named with the step and followed by the output tail."""
        self.assertEqual(
            failure_message("installing dependencies", StepOutcome(1, None, "error: nope")),
            "installing dependencies failed (exit 1):\nerror: nope",
        )

    def test_timeout(self):
        """A watchdog kill says why."""
        message = failure_message("creating venv", StepOutcome(None, 9, "", "no output for 120 s"))
        self.assertEqual(message, "creating venv timed out (no output for 120 s), without output")

    def test_signal(self):
        """A death by signal names the signal."""
        self.assertEqual(failure_message("x", StepOutcome(None, 11, "boom")), "x failed (signal 11):\nboom")


class FindExecutablesTests(SynchronousTestCase):
    def test_candidates_order(self):
        """PATH comes first, then pyenv's versions newest patch first, then the search dirs; only executables."""
        root = os.path.abspath(self.mktemp())
        on_path = write_executable(os.path.join(root, "bin", "python3.12"), "#!/bin/sh\n")
        for patch in ("3.12.1", "3.12.10", "3.11.7", "3.12"):
            write_executable(os.path.join(root, "pyenv", "versions", patch, "bin", f"python{patch[:4]}"), "#!/bin/sh\n")
        not_executable = os.path.join(root, "usr", "python3.12")
        os.makedirs(os.path.dirname(not_executable))
        open(not_executable, "w").close()
        environ = {"PATH": os.pathsep.join([os.path.join(root, "bin"), os.path.join(root, "bin")]),
                   "PYENV_ROOT": os.path.join(root, "pyenv")}
        candidates = interpreter_candidates("3.12", environ, [os.path.join(root, "usr")])
        versions = os.path.join(root, "pyenv", "versions")
        self.assertEqual(
            candidates,
            [
                on_path,
                os.path.join(versions, "3.12.10", "bin", "python3.12"),
                os.path.join(versions, "3.12.1", "bin", "python3.12"),
                os.path.join(versions, "3.12", "bin", "python3.12"),
            ],
        )

    def test_uv_path_wins(self):
        """UV_PATH is used as given when it is executable."""
        path = write_executable(os.path.abspath(self.mktemp()), "#!/bin/sh\n")
        self.assertEqual(find_uv(path), path)

    def test_uv_path_not_executable(self):
        """A UV_PATH that is not an executable file is an error naming it."""
        error = self.assertRaises(InternalServerError, find_uv, "/nonexistent/uv")
        self.assertIn("/nonexistent/uv", error.message)

    def test_uv_from_package(self):
        """Without UV_PATH, the uv shipped with the daemon's own packages is found."""
        path = find_uv(None)
        self.assertTrue(os.access(path, os.X_OK), path)


# -- steps and builder on a fake process reactor ----------------------------


class RunStepTests(SynchronousTestCase):
    def start(self, watch_inactivity=True):
        reactor = ProcessReactor()
        command = StepCommand("installing dependencies", ("/uv", "pip"), {"PATH": "/bin"}, "/wd", watch_inactivity)
        d = Deferred.fromCoroutine(run_step(reactor, command, 120, 600))
        return reactor, reactor.processes[0], d

    def test_exit_status_and_tail(self):
        """The outcome carries the exit status and the output of both pipes."""
        reactor, process, d = self.start()
        self.assertEqual((process.argv, process.env, process.path), (("/uv", "pip"), {"PATH": "/bin"}, "/wd"))
        self.assertTrue(process.stdin_closed)
        process.emit(b"Resolved\n")
        process.emit(b"error: nope\n", fd=2)
        process.finish(1)
        self.assertEqual(self.successResultOf(d), StepOutcome(1, None, "Resolved\nerror: nope"))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_success(self):
        """A zero exit succeeds and leaves no timer behind."""
        reactor, process, d = self.start()
        process.finish(0)
        self.assertTrue(self.successResultOf(d).succeeded)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_inactivity_kills(self):
        """Silence for init_timeout seconds kills the process and says so."""
        reactor, process, d = self.start()
        reactor.advance(119)
        self.assertEqual(process.signals, [])
        reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        self.assertTrue(process.connection_lost)
        process.finish(None, signal=9)
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.timed_out, "no output for 120 s")
        self.assertFalse(outcome.succeeded)

    def test_output_postpones_inactivity(self):
        """Output restarts the inactivity clock."""
        reactor, process, d = self.start()
        for _ in range(4):
            reactor.advance(100)
            process.emit(b"progress\n", fd=2)
        reactor.advance(119)
        self.assertEqual(process.signals, [])
        reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        process.finish(None, signal=9)
        self.assertEqual(self.successResultOf(d).timed_out, "no output for 120 s")

    def test_total_timeout(self):
        """A process that keeps talking is still killed after the total time-out."""
        reactor, process, d = self.start(watch_inactivity=False)
        reactor.advance(599)
        self.assertEqual(process.signals, [])
        reactor.advance(1)
        self.assertEqual(process.signals, ["KILL"])
        process.finish(None, signal=9)
        self.assertEqual(self.successResultOf(d).timed_out, "still running after 600 s")


class FakeBuilderTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.reactor = ProcessReactor()
        self.working_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.working_dir)
        open(os.path.join(self.working_dir, "requirements.txt"), "w").close()
        self.progress = []
        # sys.executable only has to be an executable: the fake process answers the version probe.
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_verbose=False, init_timeout=120,
            python_interpreter_path=sys.executable,
            environ={"PATH": "", "HOME": self.working_dir, "SSL_CERT_FILE": "/ca.pem", "PYTHONDONTWRITEBYTECODE": "1"},
            interpreter_search_dirs=(), threadpool=SynchronousThreadPool(),
        )

    def build(self):
        return self.builder.build(self.working_dir, "3.12", self.progress.append)

    def answer_probe(self, version=b"3.12\n"):
        probe = self.reactor.processes[-1]
        self.assertEqual(probe.argv[0], sys.executable)
        probe.emit(version)
        probe.finish(0)

    def test_steps_in_order(self):
        """A build probes, creates the venv, installs, compiles twice and writes the marker."""
        d = self.build()
        self.answer_probe()
        venv = self.reactor.processes[-1]
        self.assertEqual(venv.argv, ("/uv", "venv", ".venv", "--python", sys.executable))
        self.assertEqual(
            venv.env,
            {"VIRTUAL_ENV": f"{self.working_dir}/.venv", "PATH": "", "UV_CACHE_DIR": "/cache", "SSL_CERT_FILE": "/ca.pem"},
        )
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        os.makedirs(os.path.join(self.working_dir, ".venv", "lib", "python3.12", "site-packages"))
        venv.finish(0)
        install = self.reactor.processes[-1]
        self.assertEqual(install.argv, ("/uv", "pip", "install", "-r", "requirements.txt"))
        install.finish(0)
        compile_plugin = self.reactor.processes[-1]
        self.assertEqual(compile_plugin.argv[-1], ".")
        compile_plugin.finish(1)  # best effort: the build goes on
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.argv[-1], ".venv/lib/python3.12/site-packages")
        compile_site.finish(0)
        self.assertEqual(self.successResultOf(d), f"{self.working_dir}/.venv/bin/python")
        self.assertTrue(venv_is_valid(self.working_dir))
        self.assertEqual(len(self.reactor.processes), 5)
        self.assertEqual(
            self.progress,
            [
                "creating venv with Python 3.12",
                "installing dependencies from requirements.txt",
                "byte-compiling the plugin",
                "byte-compiling site-packages",
                "venv ready",
            ],
        )

    def test_install_failure(self):
        """A failed install fails the build with the step, the status and uv's complaint; no marker."""
        d = self.build()
        self.answer_probe()
        self.reactor.processes[-1].finish(0)
        install = self.reactor.processes[-1]
        install.emit(b"DEBUG noise\nerror: No solution found when resolving dependencies\n", fd=2)
        install.finish(1)
        error = self.failureResultOf(d, InternalServerError).value
        self.assertEqual(
            error.message,
            "installing dependencies from requirements.txt failed (exit 1):\n"
            "error: No solution found when resolving dependencies",
        )
        self.assertFalse(os.path.exists(os.path.join(self.working_dir, MARKER_PATH)))

    def test_wrong_interpreter_version(self):
        """An interpreter that answers another version is not used, and the error names the version."""
        d = self.build()
        self.answer_probe(b"3.11\n")
        error = self.failureResultOf(d, InternalServerError).value
        self.assertIn("no Python 3.12 interpreter", error.message)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_invalid_venv_deleted(self):
        """A venv without its marker is deleted before the rebuild."""
        junk = os.path.join(self.working_dir, ".venv", "junk")
        os.makedirs(os.path.dirname(junk))
        open(junk, "w").close()
        self.build()
        self.assertFalse(os.path.exists(junk))
        self.assertEqual(self.progress, ["deleting an incomplete venv"])

    def test_same_dir_serialized(self):
        """A second build of the same directory waits for the first and then reuses its venv."""
        first = self.build()
        second = self.build()
        self.answer_probe()
        self.assertEqual(len(self.reactor.processes), 2)  # probe, venv: nothing for the second build
        venv = self.reactor.processes[-1]
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        venv.finish(0)
        self.reactor.processes[-1].finish(0)  # install
        self.reactor.processes[-1].finish(0)  # compile the plugin (no site-packages)
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(len(self.reactor.processes), 4)
        self.assertEqual(self.progress[-1], "reusing the existing venv")
        self.assertEqual(self.builder._locks, {})

    def test_semaphore_bounds_builds(self):
        """With a launch semaphore of one, a second directory's build waits for the first."""
        self.builder._launch_semaphore = DeferredSemaphore(1)
        other = os.path.abspath(self.mktemp())
        os.makedirs(other)
        open(os.path.join(other, "requirements.txt"), "w").close()
        first = self.build()
        second = self.builder.build(other, "3.12", self.progress.append)
        self.answer_probe()
        self.assertEqual(len(self.reactor.processes), 2)
        self.reactor.processes[-1].finish(1)  # the first build's venv step fails
        self.failureResultOf(first, InternalServerError)
        # The interpreter is cached: the second build goes straight to its venv step.
        self.assertEqual(self.reactor.processes[-1].path, other)
        self.assertNoResult(second)


# -- real builds -------------------------------------------------------------


class FindInterpreterTests(AsyncTestCase):
    async def test_configured_path_of_right_version(self):
        """PYTHON_INTERPRETER_PATH is used when it is the version asked for."""
        from twisted.internet import reactor

        python = sdk.python312()
        self.assertEqual(await find_interpreter(reactor, "3.12", python), python)

    async def test_configured_path_of_other_version(self):
        """A PYTHON_INTERPRETER_PATH of another version is passed over for one found on the machine."""
        from twisted.internet import reactor

        sdk.python312()
        found = await find_interpreter(reactor, "3.12", sys.executable)
        self.assertNotEqual(found, sys.executable)
        self.assertEqual(sdk.python_interpreter("3.12"), sdk.python312())
        self.assertIn("3.12", os.path.basename(found))


class RealBuildTests(AsyncTestCase):
    """Real uv venvs of the echo plugin with the real SDK, on the shared uv cache."""

    timeout = 300

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.builder = sdk.environment_builder(reactor)
        self.working_dir = os.path.abspath(self.mktemp())
        copy_echo_plugin(self.working_dir)
        self.progress = []

    async def build(self, version="3.12"):
        return await self.builder.build(self.working_dir, version, self.progress.append)

    async def test_compiled_venv(self):
        """A build yields the venv's python, the marker, and .pyc files for the plugin and the SDK."""
        python = await self.build()
        self.assertEqual(python, os.path.join(self.working_dir, ".venv", "bin", "python"))
        with open(os.path.join(self.working_dir, MARKER_PATH)) as f:
            self.assertIsInstance(json.load(f)["timestamp"], int)
        self.assertTrue(os.path.exists(os.path.join(self.working_dir, "__pycache__", "main.cpython-312.pyc")))
        sdk_cache = os.path.join(
            self.working_dir, ".venv", "lib", "python3.12", "site-packages", "dify_plugin", "__pycache__"
        )
        self.assertTrue(any(name.endswith(".cpython-312.pyc") for name in os.listdir(sdk_cache)))
        self.assertIn("installing dependencies from requirements.txt", self.progress)

    async def test_second_build_reuses(self):
        """A second build of a complete venv reuses it as it is, marker included."""
        await self.build()
        with open(os.path.join(self.working_dir, MARKER_PATH), "rb") as f:
            marker = f.read()
        self.progress.clear()
        python = await self.build()
        self.assertEqual(self.progress, ["reusing the existing venv"])
        self.assertEqual(python, os.path.join(self.working_dir, ".venv", "bin", "python"))
        with open(os.path.join(self.working_dir, MARKER_PATH), "rb") as f:
            self.assertEqual(f.read(), marker)

    async def test_echo_plugin_heartbeats(self):
        """The built venv runs the echo plugin up to its first heartbeat."""
        python = await self.build()
        seconds = await sdk.seconds_to_first_heartbeat(self.reactor, python, self.working_dir)
        self.assertGreater(seconds, 0)

    async def test_missing_package(self):
        """A requirement that does not exist fails, naming the step and quoting uv."""
        with open(os.path.join(self.working_dir, "requirements.txt"), "w") as f:
            f.write("difydaemon-test-no-such-package-xyzzy==1.0\n")
        with self.assertRaises(InternalServerError) as caught:
            await self.build()
        message = caught.exception.message
        self.assertTrue(
            message.startswith("installing dependencies from requirements.txt failed (exit 1):"), message
        )
        self.assertIn("difydaemon-test-no-such-package-xyzzy", message)
        self.assertIn("not found in the package registry", message)
        self.assertFalse(os.path.exists(os.path.join(self.working_dir, MARKER_PATH)))

    async def test_unknown_runner_version(self):
        """A runner version with no interpreter on the machine fails naming it."""
        with self.assertRaises(InternalServerError) as caught:
            await self.build("2.1")
        self.assertIn("Python 2.1", caught.exception.message)
        self.assertFalse(os.path.exists(os.path.join(self.working_dir, ".venv")))
