"""
Tests for :mod:`difydaemon.runtimes.environment`: the pure parts, the step
runner and the builder on a fake process reactor, and real uv builds of the
echo plugin of ``runtimes.md`` §7 with the real SDK.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import shutil
import struct
import sys
import zipfile

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from difydaemon.errors import InternalServerError, UniqueIdentifierError
from difydaemon.runtimes.environment import (
    BYTECODE_DIR,
    MARKER_PATH,
    SEQUENTIAL_COMPILE_LIMIT,
    UNLISTED_LABEL,
    BytecodeCache,
    BytecodeLinks,
    OutputTail,
    StepCommand,
    StepOutcome,
    bytecode_salt,
    choose_dependency_file,
    compile_commands,
    failure_message,
    find_interpreter,
    find_uv,
    group_key,
    install_command,
    install_environment,
    interpreter_candidates,
    marker_content,
    pyc_index,
    pyc_matches_source,
    record_sources,
    run_step,
    runner_version,
    site_packages_compile_command,
    venv_command,
    venv_is_valid,
    working_dir_for,
    PythonEnvironmentBuilder,
)
from difydaemon.runtimes.parent_death import LAUNCHER, ParentDeathSignal
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
        """The uv steps get the allow-list, UV_*, the operator's list and proxies; never secrets or PYTHON*."""
        environ = {
            "PATH": "/bin:/usr/bin",
            "HOME": "/root",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": "/daemon/lib",
            "SSL_CERT_FILE": "/etc/ca.pem",
            "REQUESTS_CA_BUNDLE": "",
            "UV_INDEX_NEXUS_USERNAME": "nexus",
            "UV_CACHE_DIR": "/elsewhere",
            "UV_PROJECT_ENVIRONMENT": "/elsewhere/.venv",
            "DB_PASSWORD": "x",
            "SERVER_KEY": "x",
            "LISTED": "yes",
            "SECRET": "x",
        }
        env = install_environment(
            environ, "/w/acme/echo", "/w/.uv-cache", {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ""}, ("LISTED",)
        )
        self.assertEqual(
            env,
            {
                "VIRTUAL_ENV": "/w/acme/echo/.venv",
                "PATH": "/bin:/usr/bin",
                "HOME": "/root",
                "UV_CACHE_DIR": "/w/.uv-cache",
                "SSL_CERT_FILE": "/etc/ca.pem",
                "REQUESTS_CA_BUNDLE": "",
                "UV_INDEX_NEXUS_USERNAME": "nexus",
                "HTTP_PROXY": "http://p:3128",
                "LISTED": "yes",
            },
        )

    def test_default_path(self):
        """Without a PATH in the daemon's environment the uv steps get the system's default one."""
        env = install_environment({}, "/w/acme/echo", "/w/.uv-cache", {})
        self.assertEqual(env["PATH"], os.defpath)


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


# -- cached bytecode: pure parts ---------------------------------------------

SALT = bytecode_salt("/py/python3.12", None)


def pyc_header(mtime: float, size: int, flags: int = 0) -> bytes:
    """A .pyc header as CPython 3.12 writes it."""
    return struct.pack("<4sIII", b"\xcb\r\r\n", flags, int(mtime) & 0xFFFFFFFF, size & 0xFFFFFFFF)


class BytecodePureTests(SynchronousTestCase):
    def test_record_sources(self):
        """RECORD's .py lines inside site-packages come out normalized with their hash; others are left out."""
        record = (
            "a/__init__.py,sha256=AAA,10\n"
            "a/./b/../c.py,sha256=BBB,20\n"
            '"a/with,comma.py",sha256=CCC,30\n'
            "a/nohash.py,,\n"
            "a/data.txt,sha256=DDD,40\n"
            "../../../bin/tool.py,sha256=EEE,50\n"
            "/abs/x.py,sha256=FFF,60\n"
            "a-1.0.dist-info/RECORD,,\n"
            "\n"
        )
        self.assertEqual(
            record_sources(record),
            [("a/__init__.py", "sha256=AAA"), ("a/c.py", "sha256=BBB"), ("a/with,comma.py", "sha256=CCC"), ("a/nohash.py", "")],
        )

    def test_group_key(self):
        """A group's key ignores the order of its files and changes with the salt, the label, a path or a hash."""
        pairs = [("a/x.py", "h1"), ("a/y.py", "h2")]
        key = group_key(SALT, "a-1.0.dist-info", pairs)
        self.assertEqual(key, group_key(SALT, "a-1.0.dist-info", list(reversed(pairs))))
        self.assertEqual(len({
            key,
            group_key(bytecode_salt("/py/python3.12", "-o 1"), "a-1.0.dist-info", pairs),
            group_key(bytecode_salt("/other/python3.12", None), "a-1.0.dist-info", pairs),
            group_key(SALT, "a-1.1.dist-info", pairs),
            group_key(SALT, "a-1.0.dist-info", [("a/x.py", "h1"), ("a/z.py", "h2")]),
            group_key(SALT, "a-1.0.dist-info", [("a/x.py", "h1"), ("a/y.py", "h3")]),
        }), 6)

    def test_pyc_matches_source(self):
        """Only a timestamp .pyc for the source's very mtime and size matches, as Python checks it."""
        self.assertTrue(pyc_matches_source(pyc_header(1700000000, 123), 1700000000.9, 123))
        self.assertTrue(pyc_matches_source(pyc_header(2**32 + 5, 2**32 + 7), 2**32 + 5, 2**32 + 7))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123), 1700000001, 123))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123), 1700000000, 124))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123, flags=3), 1700000000, 123))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123)[:15], 1700000000, 123))

    def test_pyc_index(self):
        """A __pycache__ listing is filed by source stem, optimization levels included, other names dropped."""
        names = [
            "app.cpython-312.pyc",
            "app.cpython-312.opt-1.pyc",
            "app_x.cpython-312.pyc",
            "a.b.cpython-312.pyc",
            "x.pyc",
            "app.py",
            "app.cpython-312.pyc.140234.tmp",
        ]
        self.assertEqual(
            pyc_index(names),
            {
                "app": ["app.cpython-312.opt-1.pyc", "app.cpython-312.pyc"],
                "app_x": ["app_x.cpython-312.pyc"],
                "a.b": ["a.b.cpython-312.pyc"],
            },
        )


class SitePackagesCompileCommandTests(SynchronousTestCase):
    env = {"PATH": "/bin"}
    site = [".venv/lib/python3.12/site-packages"]

    def test_everything(self):
        """Without a cache, all of site-packages is compiled by a pool of workers."""
        command = site_packages_compile_command("/wd", self.site, self.env, "-f")
        self.assertEqual(
            command.argv,
            ("/wd/.venv/bin/python", "-m", "compileall", "-q", "-j", "0", "-f", ".venv/lib/python3.12/site-packages"),
        )
        self.assertEqual(command.step, "byte-compiling site-packages")
        self.assertEqual((command.required, command.watch_inactivity), (False, False))

    def test_nothing_missing(self):
        """When the cache provided everything (or there is no site-packages) nothing runs."""
        self.assertIsNone(site_packages_compile_command("/wd", self.site, self.env, None, []))
        self.assertIsNone(site_packages_compile_command("/wd", [], self.env, None))

    def test_few_missing(self):
        """A few missing files are compiled one by one, named on the command line."""
        missing = [f".venv/lib/python3.12/site-packages/new/m{i}.py" for i in range(SEQUENTIAL_COMPILE_LIMIT)]
        command = site_packages_compile_command("/wd", self.site, self.env, "-o 1", missing)
        self.assertEqual(command.argv, ("/wd/.venv/bin/python", "-m", "compileall", "-q", "-o", "1", *missing))
        self.assertEqual(command.step, f"byte-compiling {SEQUENTIAL_COMPILE_LIMIT} files of site-packages")
        self.assertEqual((command.required, command.watch_inactivity), (False, False))

    def test_many_missing(self):
        """Past the limit the pool compiles all of site-packages, only checking what is valid already."""
        missing = [f".venv/lib/python3.12/site-packages/new/m{i}.py" for i in range(SEQUENTIAL_COMPILE_LIMIT + 1)]
        command = site_packages_compile_command("/wd", self.site, self.env, None, missing)
        self.assertEqual(command.argv[-3:], ("-j", "0", ".venv/lib/python3.12/site-packages"))


# -- cached bytecode on a real filesystem -------------------------------------

SOURCE_MTIME = 1700000000


class FakeSitePackages:
    """A site-packages directory as uv leaves it, and compiled as compileall would."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, relative: str) -> str:
        return os.path.join(self.root, *relative.split("/"))

    def write(self, relative: str, content: bytes, mtime: float = SOURCE_MTIME) -> None:
        path = self.path(relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        os.utime(path, (mtime, mtime))

    def distribution(self, dist_info: str, files: dict, hashed: bool = True, mtime: float = SOURCE_MTIME) -> None:
        """Install ``files`` with a RECORD listing them (with sha256 hashes unless ``hashed`` is false)."""
        lines = []
        for relative, content in files.items():
            self.write(relative, content, mtime)
            digest = "sha256=" + hashlib.sha256(content).hexdigest() if hashed else ""
            lines.append(f"{relative},{digest},{len(content)}")
        lines += ["../../../bin/tool,sha256=xyz,10", f"{dist_info}/RECORD,,"]
        os.makedirs(self.path(dist_info), exist_ok=True)
        with open(self.path(f"{dist_info}/RECORD"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def pyc_path(self, source: str, tag: str = "cpython-312") -> str:
        directory, name = posixpath.split(source)
        return self.path(posixpath.join(directory, "__pycache__", f"{name[:-3]}.{tag}.pyc"))

    def compile(self, *sources: str, flags: int = 0) -> None:
        """Write a valid .pyc for each source (all .py files when none is named)."""
        if not sources:
            sources = tuple(sorted(
                os.path.relpath(os.path.join(d, n), self.root).replace(os.sep, "/")
                for d, dirs, names in os.walk(self.root) for n in names if n.endswith(".py")
            ))
        for source in sources:
            stat = os.stat(self.path(source))
            target = self.pyc_path(source)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(pyc_header(stat.st_mtime, stat.st_size, flags) + b"code of " + source.encode())

    def pycs(self) -> list[str]:
        return sorted(
            os.path.relpath(os.path.join(d, n), self.root).replace(os.sep, "/")
            for d, dirs, names in os.walk(self.root) for n in names if n.endswith(".pyc")
        )


def two_distributions(site: FakeSitePackages, mtime: float = SOURCE_MTIME) -> None:
    """Distribution ``a`` (a package) and ``b`` (one module), as in a venv."""
    site.distribution("a-1.0.dist-info", {"a/__init__.py": b"", "a/x.py": b"X = 1\n"}, mtime=mtime)
    site.distribution("b-2.0.dist-info", {"b.py": b"B = 2\n"}, mtime=mtime)


class BytecodeCacheTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.base = os.path.abspath(self.mktemp())
        self.cache = BytecodeCache(os.path.join(self.base, "bytecode"), max_entries=10)

    def site(self, name: str) -> FakeSitePackages:
        return FakeSitePackages(os.path.join(self.base, name, "site-packages"))

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.cache.root)) if os.path.isdir(self.cache.root) else []

    def test_scan_groups(self):
        """Files go with the one RECORD that lists them with a hash; the rest are grouped by content."""
        site = self.site("v1")
        two_distributions(site)
        site.distribution("c-1.0.dist-info", {"c.py": b"C\n"}, hashed=False)
        site.distribution("d-1.0.dist-info", {"ns/__init__.py": b"D\n"})
        site.distribution("e-1.0.dist-info", {"ns/__init__.py": b"E\n"})  # overwrites d's file
        site.write("orphan.py", b"O\n")
        present, groups = self.cache.scan(site.root, SALT)
        self.assertEqual(present, {"a/__init__.py", "a/x.py", "b.py", "c.py", "ns/__init__.py", "orphan.py"})
        self.assertEqual(
            [(group.label, group.sources) for group in groups],
            [
                ("a-1.0.dist-info", ("a/__init__.py", "a/x.py")),
                ("b-2.0.dist-info", ("b.py",)),
                (UNLISTED_LABEL, ("c.py", "ns/__init__.py", "orphan.py")),
            ],
        )
        unlisted_key = groups[-1].key
        site.write("orphan.py", b"changed\n")
        self.assertNotEqual(self.cache.scan(site.root, SALT)[1][-1].key, unlisted_key)

    def test_first_link_misses(self):
        """An empty cache links nothing and reports every source missing, every group uncached."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        self.assertEqual((links.linked, links.missing), (0, ("a/__init__.py", "a/x.py", "b.py")))
        self.assertEqual([group.label for group in links.uncached], ["a-1.0.dist-info", "b-2.0.dist-info"])
        self.assertEqual(site.pycs(), [])

    def test_store_then_link_into_another_venv(self):
        """Stored bytecode is hard-linked into a venv with the same files; nothing is left to compile."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.assertEqual(self.cache.store(first.root, links.uncached), 2)
        self.assertEqual(len(self.entries()), 2)
        second = self.site("v2")
        two_distributions(second)
        links = self.cache.link(second.root, SALT)
        self.assertEqual(links, BytecodeLinks(3, (), ()))
        self.assertEqual(second.pycs(), first.pycs())
        for source in ("a/__init__.py", "a/x.py", "b.py"):
            self.assertEqual(os.stat(second.pyc_path(source)).st_ino, os.stat(first.pyc_path(source)).st_ino)

    def test_other_content_misses(self):
        """A distribution whose RECORD differs gets nothing, nor does anything under another salt."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        second.distribution("a-1.0.dist-info", {"a/__init__.py": b"", "a/x.py": b"X = 2\n"})
        second.distribution("b-2.0.dist-info", {"b.py": b"B = 2\n"})
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, links.missing), (1, ("a/__init__.py", "a/x.py")))
        self.assertEqual([group.label for group in links.uncached], ["a-1.0.dist-info"])
        third = self.site("v3")
        two_distributions(third)
        self.assertEqual(self.cache.link(third.root, bytecode_salt("/py/python3.12", "-o 2")).linked, 0)

    def test_stale_entry_replaced(self):
        """Sources re-extracted with another mtime get no .pyc; the entry is stored again for them."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second, mtime=SOURCE_MTIME + 60)
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, len(links.missing), len(links.uncached)), (0, 3, 2))
        second.compile()
        self.assertEqual(self.cache.store(second.root, links.uncached), 2)
        third = self.site("v3")
        two_distributions(third, mtime=SOURCE_MTIME + 60)
        self.assertEqual(self.cache.link(third.root, SALT), BytecodeLinks(3, (), ()))
        self.assertEqual([name for name in self.entries() if name.startswith(".")], [])

    def test_store_needs_every_source(self):
        """A group is stored only when every source has a valid timestamp .pyc."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        site.compile("a/x.py", "b.py")  # a/__init__.py did not compile
        self.assertEqual(self.cache.store(site.root, links.uncached), 1)
        site.compile("a/__init__.py", flags=1)  # hash-based: not for this cache
        self.assertEqual(self.cache.store(site.root, links.uncached), 0)
        self.assertEqual(len(self.entries()), 1)

    def test_existing_pyc_kept(self):
        """A .pyc already in the venv (shipped by a wheel) is not replaced; compileall gets its source."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second)
        shipped = second.pyc_path("b.py")
        os.makedirs(os.path.dirname(shipped))
        with open(shipped, "wb") as f:
            f.write(b"shipped")
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, links.missing), (2, ("b.py",)))
        with open(shipped, "rb") as f:
            self.assertEqual(f.read(), b"shipped")

    def test_concurrent_store_keeps_one(self):
        """A second build storing the same group leaves the first one's entry and no staging behind."""
        first, second = self.site("v1"), self.site("v2")
        two_distributions(first)
        two_distributions(second)
        first_links = self.cache.link(first.root, SALT)
        second_links = self.cache.link(second.root, SALT)
        first.compile()
        second.compile()
        self.assertEqual(self.cache.store(first.root, first_links.uncached), 2)
        before = {name: os.stat(os.path.join(self.cache.root, name)).st_ino for name in self.entries()}
        self.assertEqual(self.cache.store(second.root, second_links.uncached), 0)
        self.assertEqual({name: os.stat(os.path.join(self.cache.root, name)).st_ino for name in self.entries()}, before)

    def test_prune_least_recently_used(self):
        """Pruning keeps the most recently used entries, drops trash, and stale staging only."""
        cache = BytecodeCache(self.cache.root, max_entries=2, clock=lambda: SOURCE_MTIME + 10 * 3600)
        for age, name in enumerate(["new", "middle", "old", ".trash-x", ".staging-dead", ".staging-live"]):
            os.makedirs(os.path.join(cache.root, name, "sub"))
            mtime = SOURCE_MTIME + 10 * 3600 - (7200 * age if name != ".staging-live" else 60)
            os.utime(os.path.join(cache.root, name), (mtime, mtime))
        self.assertEqual(cache.prune(), 1)
        self.assertEqual(self.entries(), [".staging-live", "middle", "new"])

    def test_link_marks_use(self):
        """Linking from an entry makes it recently used."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        site.compile()
        self.cache.store(site.root, links.uncached)
        for name in self.entries():
            os.utime(os.path.join(self.cache.root, name), (SOURCE_MTIME, SOURCE_MTIME))
        other = self.site("v2")
        two_distributions(other)
        self.cache.link(other.root, SALT)
        for name in self.entries():
            self.assertGreater(os.stat(os.path.join(self.cache.root, name)).st_mtime, SOURCE_MTIME)

    def test_cache_deleted_under_a_venv(self):
        """Deleting the whole cache leaves linked venvs intact."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second)
        self.cache.link(second.root, SALT)
        shutil.rmtree(self.cache.root)
        with open(second.pyc_path("a/x.py"), "rb") as f:
            self.assertTrue(f.read().endswith(b"code of a/x.py"))
        self.assertEqual(self.cache.link(self.site("v3").root, SALT).linked, 0)


# -- steps and builder on a fake process reactor ----------------------------


class RunStepTests(SynchronousTestCase):
    def start(self, watch_inactivity=True):
        reactor = ProcessReactor()
        command = StepCommand("installing dependencies", ("/uv", "pip"), {"PATH": "/bin"}, "/wd", watch_inactivity)
        d = Deferred.fromCoroutine(run_step(reactor, command, 120, 600))
        return reactor, reactor.processes[0], d

    def test_parent_death_launcher(self):
        """With a parent-death launcher the step is spawned through it, its command line kept whole."""
        reactor = ProcessReactor()
        command = StepCommand("installing dependencies", ("/uv", "pip"), {"PATH": "/bin"}, "/wd")
        d = Deferred.fromCoroutine(
            run_step(reactor, command, 120, 600, ParentDeathSignal("/launcher/python", getpid=lambda: 42))
        )
        [process] = reactor.processes
        self.assertEqual(process.argv, ("/launcher/python", "-I", "-S", "-c", LAUNCHER, "42", "setsid", "/uv", "pip"))
        self.assertEqual((process.env, process.path), ({"PATH": "/bin"}, "/wd"))
        process.finish(0)
        self.assertTrue(self.successResultOf(d).succeeded)

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
        """A build probes, creates the venv, installs while compiling the plugin, compiles site-packages, marks."""
        d = self.build()
        self.answer_probe()
        venv = self.reactor.processes[-1]
        self.assertEqual(venv.argv, ("/uv", "venv", ".venv", "--python", sys.executable))
        self.assertEqual(
            venv.env,
            {
                "VIRTUAL_ENV": f"{self.working_dir}/.venv",
                "PATH": "",
                "HOME": self.working_dir,
                "UV_CACHE_DIR": "/cache",
                "SSL_CERT_FILE": "/ca.pem",
            },
        )
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        os.makedirs(os.path.join(self.working_dir, ".venv", "lib", "python3.12", "site-packages"))
        venv.finish(0)
        compile_plugin, install = self.reactor.processes[-2:]
        self.assertEqual(compile_plugin.argv[-1], ".")
        self.assertEqual(install.argv, ("/uv", "pip", "install", "-r", "requirements.txt"))
        compile_plugin.finish(1)  # best effort: the build goes on
        self.assertEqual(self.reactor.processes[-1], install)
        install.finish(0)
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

    def test_step_environments(self):
        """uv steps get UV_* and the listed variables; the venv's Python only the listed ones; no step gets secrets."""
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_verbose=False, init_timeout=120,
            python_interpreter_path=sys.executable,
            environ={"PATH": "/bin", "UV_INDEX_NEXUS_PASSWORD": "nexus", "LISTED": "yes", "DB_PASSWORD": "db",
                     "SERVER_KEY": "key", "PYTHONPATH": "/daemon"},
            interpreter_search_dirs=(), threadpool=SynchronousThreadPool(), proxies={"HTTPS_PROXY": "http://p:1"},
            passthrough=("LISTED",),
        )
        d = self.build()
        self.answer_probe()
        venv = self.reactor.processes[-1]
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        os.makedirs(os.path.join(self.working_dir, ".venv", "lib", "python3.12", "site-packages"))
        venv.finish(0)
        compile_plugin, install = self.reactor.processes[-2:]
        install.finish(0)
        compile_plugin.finish(0)
        compile_site = self.reactor.processes[-1]
        uv_env = {"PATH": "/bin", "UV_INDEX_NEXUS_PASSWORD": "nexus", "LISTED": "yes", "HTTPS_PROXY": "http://p:1",
                  "VIRTUAL_ENV": f"{self.working_dir}/.venv", "UV_CACHE_DIR": "/cache"}
        self.assertEqual((venv.env, install.env), (uv_env, uv_env))
        python_env = {"PATH": "/bin", "LISTED": "yes", "HTTPS_PROXY": "http://p:1"}
        self.assertEqual((compile_plugin.env, compile_site.env), (python_env, python_env))
        compile_site.finish(0)
        self.successResultOf(d)

    def test_steps_through_parent_death_launcher(self):
        """With a parent-death launcher every child of a build, the probe included, is spawned through it."""
        self.builder._parent_death = ParentDeathSignal("/launcher/python", getpid=lambda: 42)
        d = self.build()
        probe = self.reactor.processes[-1]
        self.assertEqual(probe.argv[:7], ("/launcher/python", "-I", "-S", "-c", LAUNCHER, "42", "setsid"))
        self.assertEqual(probe.argv[7], sys.executable)
        probe.emit(b"3.12\n")
        probe.finish(0)
        venv = self.reactor.processes[-1]
        self.assertEqual(venv.argv, ("/launcher/python", "-I", "-S", "-c", LAUNCHER, "42", "setsid",
                                     "/uv", "venv", ".venv", "--python", sys.executable))
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        venv.finish(0)
        compile_plugin, install = self.reactor.processes[-2:]
        self.assertEqual(install.argv[7:], ("/uv", "pip", "install", "-r", "requirements.txt"))
        self.assertEqual(compile_plugin.argv[:7], ("/launcher/python", "-I", "-S", "-c", LAUNCHER, "42", "setsid"))
        install.finish(0)
        compile_plugin.finish(0)
        self.successResultOf(d)

    def test_install_failure(self):
        """A failed install fails the build, once the plugin's compilation is over, with uv's complaint; no marker."""
        d = self.build()
        self.answer_probe()
        self.reactor.processes[-1].finish(0)
        compile_plugin, install = self.reactor.processes[-2:]
        install.emit(b"DEBUG noise\nerror: No solution found when resolving dependencies\n", fd=2)
        install.finish(1)
        self.assertNoResult(d)  # the directory may be deleted only once compileall is done with it
        compile_plugin.finish(0)
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
        compile_plugin, install = self.reactor.processes[-2:]
        install.finish(0)
        compile_plugin.finish(0)  # no site-packages: nothing more to compile
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


class HoldingThreadPool(SynchronousThreadPool):
    """Runs 'threaded' work at once, except calls to the functions named in ``held``, which wait for release()."""

    def __init__(self, held=()):
        self.held = set(held)
        self.waiting = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        if getattr(f, "__name__", None) in self.held:
            self.waiting.append((on_result, f, args, kwargs))
        else:
            super().callInThreadWithCallback(on_result, f, *args, **kwargs)

    def release(self):
        waiting, self.waiting = self.waiting, []
        for on_result, f, args, kwargs in waiting:
            super().callInThreadWithCallback(on_result, f, *args, **kwargs)


class BrokenBytecodeCache(BytecodeCache):
    """A bytecode cache whose operations named in ``failing`` fail, as on a full disk."""

    def __init__(self, root, failing):
        super().__init__(root)
        self.failing = failing

    def link(self, site_packages, salt):
        if "link" in self.failing:
            raise OSError(28, "No space left on device")
        return super().link(site_packages, salt)

    def store(self, site_packages, groups):
        if "store" in self.failing:
            raise OSError(28, "No space left on device")
        return super().store(site_packages, groups)


SITE_PACKAGES = ".venv/lib/python3.12/site-packages"


class FakeCachedBuilderTests(SynchronousTestCase):
    """The builder with its prepared venvs and bytecode cache, on a fake process reactor."""

    def setUp(self):
        super().setUp()
        self.reactor = ProcessReactor()
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.pool = HoldingThreadPool(held=("_keep_blocking",))
        self.prepared = os.path.join(self.base, "prepared")
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_verbose=False, init_timeout=120,
            python_interpreter_path=sys.executable, environ={"PATH": "", "HOME": self.base},
            interpreter_search_dirs=(), threadpool=self.pool, prepared_venvs_dir=self.prepared,
        )
        self.progress = []

    def plugin(self, name, requirements="dify_plugin\n"):
        working_dir = os.path.join(self.base, name)
        os.makedirs(working_dir)
        with open(os.path.join(working_dir, "requirements.txt"), "w") as f:
            f.write(requirements)
        return working_dir

    def build(self, working_dir):
        return self.builder.build(working_dir, "3.12", self.progress.append)

    def answer_probe(self):
        probe = self.reactor.processes[-1]
        self.assertEqual(probe.argv[0], sys.executable)
        probe.emit(b"3.12\n")
        probe.finish(0)

    def play_uv(self, working_dir):
        """Play ``uv venv`` and ``uv pip install`` (two distributions) and the plugin's compilation."""
        venv = self.reactor.processes[-1]
        self.assertEqual(venv.argv[:2], ("/uv", "venv"))
        os.makedirs(os.path.join(working_dir, ".venv", "bin"))
        open(os.path.join(working_dir, ".venv", "bin", "python"), "w").close()
        venv.finish(0)
        compile_plugin, install = self.reactor.processes[-2:]
        self.assertEqual(install.argv[:3], ("/uv", "pip", "install"))
        site = FakeSitePackages(os.path.join(working_dir, SITE_PACKAGES))
        two_distributions(site)
        compile_plugin.finish(0)
        install.finish(0)
        return site

    def first_build(self):
        working_dir = self.plugin("first")
        d = self.build(working_dir)
        self.answer_probe()
        site = self.play_uv(working_dir)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(
            compile_site.argv,
            (f"{working_dir}/.venv/bin/python", "-m", "compileall", "-q",
             f"{SITE_PACKAGES}/a/__init__.py", f"{SITE_PACKAGES}/a/x.py", f"{SITE_PACKAGES}/b.py"),
        )
        site.compile()
        compile_site.finish(0)
        self.assertEqual(self.successResultOf(d), f"{working_dir}/.venv/bin/python")
        return working_dir, site

    def test_new_dependency_set_links_bytecode(self):
        """A new dependency set gets the bytecode an earlier build compiled and runs no compilation of site-packages."""
        _, first_site = self.first_build()
        self.assertIn("linked 0 cached .pyc files", self.progress)
        self.assertEqual(len(self.pool.waiting), 1)  # keeping it for later happens in the background
        settled = self.builder.settled()
        self.assertNoResult(settled)
        self.pool.release()
        self.assertIsNone(self.successResultOf(settled))
        second = self.plugin("second", "dify_plugin\n# a set of its own\n")
        del self.progress[:]
        spawned = len(self.reactor.processes)
        d = self.build(second)
        site = self.play_uv(second)
        self.assertEqual(self.successResultOf(d), f"{second}/.venv/bin/python")
        self.assertEqual(len(self.reactor.processes), spawned + 3)  # venv, install, the plugin's compilation
        self.assertEqual(site.pycs(), first_site.pycs())
        self.assertEqual(
            self.progress,
            [
                "creating venv with Python 3.12",
                "installing dependencies from requirements.txt",
                "byte-compiling the plugin",
                "linked 3 cached .pyc files",
                "venv ready",
            ],
        )
        self.assertTrue(venv_is_valid(second))

    def test_same_dependencies_wait_for_keeping(self):
        """A build of the same dependencies waits for the prepared venv being kept, then copies it."""
        self.first_build()
        second = self.plugin("second")
        spawned = len(self.reactor.processes)
        d = self.build(second)
        self.assertEqual(len(self.reactor.processes), spawned)  # no venv yet: it waits
        self.pool.release()
        prepared = [name for name in os.listdir(self.prepared) if name != BYTECODE_DIR]
        self.assertEqual(len(prepared), 1)
        self.assertTrue(venv_is_valid(os.path.join(self.prepared, prepared[0])))
        copy = self.reactor.processes[-1]
        self.assertEqual(
            copy.argv,
            ("/bin/cp", "-al", os.path.join(self.prepared, prepared[0], ".venv"), os.path.join(second, ".venv")),
        )
        copy.finish(0)
        self.reactor.processes[-1].finish(0)  # the plugin's compilation
        self.successResultOf(d)
        self.assertIn("copying a prepared venv", self.progress)

    def test_invalid_prepared_venv_replaced(self):
        """A prepared venv that lost its marker is not used; the next fresh build replaces it with a valid one."""
        self.first_build()
        self.pool.release()
        (key,) = [name for name in os.listdir(self.prepared) if name != BYTECODE_DIR]
        os.unlink(os.path.join(self.prepared, key, MARKER_PATH))
        second = self.plugin("second")
        d = self.build(second)
        self.play_uv(second)  # built afresh: the bytecode cache gives all of site-packages
        self.successResultOf(d)
        self.assertNotIn("copying a prepared venv", self.progress)
        self.pool.release()
        self.successResultOf(self.builder.settled())
        self.assertEqual([name for name in os.listdir(self.prepared) if name != BYTECODE_DIR], [key])
        self.assertTrue(venv_is_valid(os.path.join(self.prepared, key)))

    def test_failed_link_compiles_everything(self):
        """When linking cached bytecode fails, all of site-packages is compiled and the failure logged."""
        # A fake in place of the builder's cache: the only way to make a disk fail on cue.
        self.builder._bytecode = BrokenBytecodeCache(os.path.join(self.prepared, BYTECODE_DIR), {"link"})
        working_dir = self.plugin("first")
        d = self.build(working_dir)
        self.answer_probe()
        self.play_uv(working_dir)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.argv[-3:], ("-j", "0", SITE_PACKAGES))
        compile_site.finish(0)
        self.successResultOf(d)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(venv_is_valid(working_dir))

    def test_failed_store_is_logged(self):
        """When storing bytecode fails, the build is not affected, the failure is logged, and the prepared venv kept."""
        self.builder._bytecode = BrokenBytecodeCache(os.path.join(self.prepared, BYTECODE_DIR), {"store"})
        working_dir, _ = self.first_build()
        self.pool.release()
        self.assertIsNone(self.successResultOf(self.builder.settled()))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        prepared = [name for name in os.listdir(self.prepared) if name != BYTECODE_DIR]
        self.assertEqual(len(prepared), 1)
        self.assertTrue(venv_is_valid(os.path.join(self.prepared, prepared[0])))
        self.assertFalse(os.path.exists(os.path.join(self.prepared, BYTECODE_DIR)))


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


# Run by the venv's own python: how many sources of site-packages lack a
# .pyc that this interpreter would use as it is (magic, mtime, size).
_UNUSABLE_PYCS = """
import importlib.util, os, sys
unusable = 0
for directory, dirnames, names in os.walk(sys.argv[1]):
    dirnames[:] = [name for name in dirnames if name != "__pycache__"]
    for name in names:
        if not name.endswith(".py"):
            continue
        source = os.path.join(directory, name)
        stat = os.stat(source)
        try:
            with open(importlib.util.cache_from_source(source), "rb") as f:
                header = f.read(16)
        except OSError:
            unusable += 1
            continue
        expected = importlib.util.MAGIC_NUMBER + bytes(4) + (
            (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
        )
        unusable += header != expected
print(unusable)
"""


def tiny_wheel(directory: str) -> str:
    """A pure-Python wheel of two modules, ``tinydist`` 1.0, built by hand (no index needed)."""
    files = {
        "tinydist/__init__.py": b"from tinydist.more import VALUE\n",
        "tinydist/more.py": b"VALUE = 42\n",
        "tinydist-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinydist\nVersion: 1.0\n",
        "tinydist-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: difydaemon-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    record.append("tinydist-1.0.dist-info/RECORD,,")
    files["tinydist-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tinydist-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


class RealBytecodeCacheTests(AsyncTestCase):
    """Real uv venvs of the echo plugin sharing prepared venvs and cached bytecode."""

    timeout = 300

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.builder = sdk.environment_builder(reactor, prepared_venvs_dir=os.path.abspath(self.mktemp()))
        # Background keeping must be over before trial looks for leftovers.
        self.addCleanup(self.builder.settled)

    async def build(self, *extra_requirements):
        """Build a copy of the echo plugin with more requirement lines; its directory, python and progress."""
        working_dir = copy_echo_plugin(os.path.abspath(self.mktemp()))
        with open(os.path.join(working_dir, "requirements.txt"), "a") as f:
            f.write("".join(line + "\n" for line in extra_requirements))
        progress = []
        python = await self.builder.build(working_dir, "3.12", progress.append)
        return working_dir, python, progress

    async def unusable_pycs(self, python, working_dir):
        """How many sources of the venv's site-packages its python would have to compile again."""
        outcome = await run_step(
            self.reactor,
            StepCommand(
                "checking .pyc files",
                (python, "-c", _UNUSABLE_PYCS, os.path.join(working_dir, SITE_PACKAGES)),
                {"PATH": os.environ.get("PATH", "")},
                working_dir,
            ),
            60,
            60,
        )
        self.assertTrue(outcome.succeeded, outcome)
        return int(outcome.tail)

    async def test_new_dependency_set_links_cached_bytecode(self):
        """A plugin with a never-seen dependency set links the SDK's cached bytecode, compiles none of it, and starts."""
        first, _, progress = await self.build()
        self.assertIn("byte-compiling site-packages", progress)
        await self.builder.settled()
        second, python, progress = await self.build("# a dependency set of its own")
        self.assertNotIn("copying a prepared venv", progress)
        linked = [line for line in progress if line.startswith("linked ")]
        self.assertEqual(len(linked), 1, progress)
        self.assertGreater(int(linked[0].split()[1]), 500)
        self.assertEqual([line for line in progress if "site-packages" in line], [])
        self.assertEqual(await self.unusable_pycs(python, second), 0)
        pyc = os.path.join(SITE_PACKAGES, "dify_plugin", "__pycache__", "__init__.cpython-312.pyc")
        self.assertEqual(os.stat(os.path.join(second, pyc)).st_ino, os.stat(os.path.join(first, pyc)).st_ino)
        self.assertGreater(await sdk.seconds_to_first_heartbeat(self.reactor, python, second), 0)

    async def test_new_distribution_compiled_alone(self):
        """A distribution no plugin installed before is the only thing compiled, and is cached in its turn."""
        wheel = tiny_wheel(os.path.abspath(self.mktemp()))
        await self.build()
        await self.builder.settled()
        second, python, progress = await self.build(wheel)
        self.assertIn("byte-compiling 2 files of site-packages", progress)
        self.assertEqual(await self.unusable_pycs(python, second), 0)
        await self.builder.settled()
        third, python, progress = await self.build(wheel, "# yet another set")
        self.assertEqual([line for line in progress if "site-packages" in line], [])
        self.assertEqual(await self.unusable_pycs(python, third), 0)
