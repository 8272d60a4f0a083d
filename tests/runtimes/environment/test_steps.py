"""
Tests for :mod:`difydaemon.runtimes.environment.steps`: the build's command
lines and environment, output tails, and the step runner on a fake process
reactor.
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred

from difydaemon.runtimes.environment import (
    SEQUENTIAL_COMPILE_LIMIT,
    OutputTail,
    StepCommand,
    StepOutcome,
    compile_commands,
    failure_message,
    install_command,
    install_environment,
    marker_content,
    run_step,
    site_packages_compile_command,
    venv_command,
)
from difydaemon.runtimes.environment.steps import niced, unreachable_index_message
from difydaemon.runtimes.parent_death import (
    LAUNCHER,
    ParentDeathSignal,
)
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.environment.fakes import ProcessReactor


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

    def test_requirements_no_index(self):
        """An offline install names no index at all, even with a mirror, and finds wheels in the given folder."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url="https://m/simple", pip_extra_args=None, pip_verbose=False, frozen_lock=False,
            find_links="wheels", no_index=True,
        )
        self.assertEqual(
            command.argv, ("/uv", "pip", "install", "--no-index", "--find-links", "wheels", "-r", "requirements.txt")
        )

    def test_requirements_offline(self):
        """An install from uv's cache alone says --offline and keeps the rest of the command."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url=None, pip_extra_args=None, pip_verbose=False, frozen_lock=False, offline=True,
        )
        self.assertEqual(command.argv, ("/uv", "pip", "install", "--offline", "-r", "requirements.txt"))

    def test_requirements_find_links_with_index(self):
        """A wheelhouse offered alongside the index keeps the mirror."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url="https://m/simple", pip_extra_args=None, pip_verbose=False, frozen_lock=False,
            find_links="/wh",
        )
        self.assertEqual(
            command.argv,
            ("/uv", "pip", "install", "-i", "https://m/simple", "--find-links", "/wh", "-r", "requirements.txt"),
        )

    def test_unreachable_index_message(self):
        """uv's connection failure becomes "cannot reach the package index <url>: <cause>"."""
        tail = (
            "error: Request failed after 3 retries in 6.4s\n"
            "  cause: Failed to fetch: http://127.0.0.1:9/simple/six/\n"
            "  cause: error sending request for url (http://127.0.0.1:9/simple/six/)\n"
            "  cause: client error (Connect)\n"
            "  cause: tcp connect error\n"
            "  cause: Connection refused (os error 111)\n"
        )
        self.assertEqual(
            unreachable_index_message(tail, "http://127.0.0.1:9/simple"),
            "cannot reach the package index http://127.0.0.1:9/simple: Connection refused (os error 111)",
        )
        self.assertTrue(unreachable_index_message("  cause: dns error\n", None).startswith(
            "cannot reach the package index https://pypi.org/simple: dns error"))

    def test_missing_package_is_not_unreachable(self):
        """An index that answers "not found" is not reported as unreachable."""
        tail = "  x No solution found when resolving dependencies:\n  `-> Because nope was not found in the package registry\n"
        self.assertIsNone(unreachable_index_message(tail, None))

    def test_niced(self):
        """niced() prefixes nice -n 10 when a nice executable is known, and changes nothing otherwise."""
        command = install_command(
            "/uv", "/wd", "requirements.txt", self.env,
            pip_mirror_url=None, pip_extra_args=None, pip_verbose=False, frozen_lock=False,
        )
        self.assertEqual(niced(command, "/usr/bin/nice").argv[:4], ("/usr/bin/nice", "-n", "10", "/uv"))
        self.assertIs(niced(command, None), command)

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

    def test_first(self):
        """Sources given as first come before the rest, each named once."""
        first = [".venv/lib/python3.12/site-packages/b.py", ".venv/lib/python3.12/site-packages/a.py"]
        missing = [".venv/lib/python3.12/site-packages/a.py", ".venv/lib/python3.12/site-packages/c.py"]
        few = site_packages_compile_command("/wd", self.site, self.env, None, missing, first=first)
        self.assertEqual(few.argv[4:], (*first, ".venv/lib/python3.12/site-packages/c.py"))
        everything = site_packages_compile_command("/wd", self.site, self.env, None, parallel=False, first=first)
        self.assertEqual(everything.argv[4:], (*first, ".venv/lib/python3.12/site-packages"))


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
