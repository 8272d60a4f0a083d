"""
Tests for :mod:`difydaemon.runtimes.environment.builder`: the builder on a
fake process reactor, with and without caches, and real uv builds of the echo
plugin with the real SDK.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from twisted.internet.defer import DeferredSemaphore
from twisted.logger import capturedLogs

from difydaemon.errors import InternalServerError
from difydaemon.runtimes.environment import builder as builder_module
from difydaemon.runtimes.environment import (
    BackgroundBuildsService,
    BYTECODE_DIR,
    MARKER_PATH,
    BytecodeCache,
    venv_is_valid,
    PythonEnvironmentBuilder,
)
from difydaemon.runtimes.parent_death import (
    LAUNCHER,
    ParentDeathSignal,
)
from difydaemon.testing import sdk
from difydaemon.testing.packages import write_files
from difydaemon.testing.cases import (
    AsyncTestCase,
    SynchronousTestCase,
)
from tests.runtimes.environment.test_bytecode import tiny_wheel
from tests.runtimes.environment.wheelhouse import wheels_from_site_packages
from tests.runtimes.environment.fakes import (
    SITE_PACKAGES,
    copy_echo_plugin,
    ProcessReactor,
    SynchronousThreadPool,
    FakeSitePackages,
    two_distributions,
)


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

    def build_to_venv(self, **options):
        """A build by a builder with ``options``, played up to its venv's creation; the build's Deferred."""
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_verbose=False, init_timeout=120,
            python_interpreter_path=sys.executable, environ={"PATH": ""},
            interpreter_search_dirs=(), threadpool=SynchronousThreadPool(), **options,
        )
        d = self.build()
        self.answer_probe()
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        os.makedirs(os.path.join(self.working_dir, ".venv", "lib", "python3.12", "site-packages"))
        self.reactor.processes[-1].finish(0)
        return d

    def prefer_offline_install(self):
        """A PIP_PREFER_OFFLINE build up to its first install, which it returns with the build's Deferred."""
        d = self.build_to_venv(prefer_offline=True)
        compile_plugin, offline = self.reactor.processes[-2:]
        compile_plugin.finish(0)
        self.assertEqual(offline.argv, ("/uv", "pip", "install", "--offline", "-r", "requirements.txt"))
        return d, offline

    def test_prefer_offline_from_the_cache(self):
        """With prefer_offline, an install uv's cache satisfies asks no index."""
        d, offline = self.prefer_offline_install()
        offline.finish(0)
        self.reactor.processes[-1].finish(0)  # site-packages compiled
        self.successResultOf(d)
        self.assertFalse([p for p in self.reactor.processes if p.argv[:3] == ("/uv", "pip", "install") and "--offline" not in p.argv])

    def test_prefer_offline_falls_back_to_the_index(self):
        """With prefer_offline, what uv's cache lacks is installed from the index, and the first try logged."""
        d, offline = self.prefer_offline_install()
        with capturedLogs() as events:
            offline.emit(b"No solution found when resolving dependencies\n")
            offline.finish(1)
        online = self.reactor.processes[-1]
        self.assertEqual(online.argv, ("/uv", "pip", "install", "-r", "requirements.txt"))
        online.finish(0)
        self.reactor.processes[-1].finish(0)  # site-packages compiled
        self.successResultOf(d)
        self.assertEqual([e["source"] for e in events if "lacks some of" in e["log_format"]], ["uv's cache"])

    def test_prefer_offline_both_fail(self):
        """When uv's cache and the index both fail, the task's message is the index's; the two tries differ only by --offline."""
        d, offline = self.prefer_offline_install()
        offline.emit(b"error: Because requests was not found in the cache, offline\n", fd=2)
        offline.finish(1)
        online = self.reactor.processes[-1]
        self.assertEqual(online.argv, tuple(word for word in offline.argv if word != "--offline"))
        self.assertEqual((online.env, online.path), (offline.env, offline.path))
        online.emit(b"error: Because nosuch was not found in the package registry\n", fd=2)
        online.finish(1)
        error = self.failureResultOf(d, InternalServerError).value
        self.assertEqual(
            error.message,
            "installing dependencies from requirements.txt failed (exit 1):\n"
            "error: Because nosuch was not found in the package registry",
        )

    def test_background_compilation(self):
        """With compile_in_background the build fires once the install is done; site-packages compile niced afterwards."""
        d = self.build_to_venv(nice_path="/usr/bin/nice", compile_in_background=True)
        compile_plugin, install = self.reactor.processes[-2:]
        compile_plugin.finish(0)
        install.finish(0)
        self.assertEqual(self.successResultOf(d), f"{self.working_dir}/.venv/bin/python")
        self.assertTrue(venv_is_valid(self.working_dir))
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.argv[:3], ("/usr/bin/nice", "-n", "10"))
        self.assertEqual(compile_site.argv[-1], ".venv/lib/python3.12/site-packages")
        self.assertNotIn("-j", compile_site.argv)  # one process: the parent-death signal reaches all of it
        self.assertEqual(self.progress[-2:], ["byte-compiling site-packages in the background", "venv ready"])
        settled = self.builder.settled()
        self.assertNoResult(settled)
        compile_site.finish(0)
        self.assertIsNone(self.successResultOf(settled))

    def test_background_compilation_in_import_order(self):
        """The background compilation takes what the plugin's sources import first, last reached first, then all of site-packages."""
        d = self.build_to_venv(compile_in_background=True)
        site = ".venv/lib/python3.12/site-packages"
        write_files(
            self.working_dir,
            {
                "main.py": b"import sdk\n",
                f"{site}/sdk/__init__.py": b"from . import core\nimport dep\n",
                f"{site}/sdk/core.py": b"",
                f"{site}/dep.py": b"",
                f"{site}/other.py": b"",
            },
        )
        for process in self.reactor.processes[-2:]:
            process.finish(0)
        self.successResultOf(d)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(
            compile_site.argv[4:],
            (f"{site}/dep.py", f"{site}/sdk/core.py", f"{site}/sdk/__init__.py", site),
        )
        compile_site.finish(0)

    def test_failed_import_prediction_compiles_in_name_order(self):
        """A prediction that raises is logged, and the background compilation still runs, over all of site-packages."""

        def broken(*args):
            raise RuntimeError("scan broke")

        self.patch(builder_module, "compile_first", broken)
        d = self.build_to_venv(compile_in_background=True)
        write_files(self.working_dir, {"main.py": b"import sdk\n"})
        for process in self.reactor.processes[-2:]:
            process.finish(0)
        self.successResultOf(d)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.argv[4:], (".venv/lib/python3.12/site-packages",))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        settled = self.builder.settled()
        compile_site.finish(0)
        self.assertIsNone(self.successResultOf(settled))

    def test_background_compilation_failure_logged(self):
        """A failed background compilation leaves the venv valid and is only logged; settled() still fires."""
        d = self.build_to_venv(compile_in_background=True)
        for process in self.reactor.processes[-2:]:
            process.finish(0)
        self.successResultOf(d)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.argv[1:3], ("-m", "compileall"))  # no nice_path: not niced
        settled = self.builder.settled()
        compile_site.finish(1)
        self.assertIsNone(self.successResultOf(settled))
        self.assertTrue(venv_is_valid(self.working_dir))

    def test_locked_project_installs_from_mirror(self):
        """With PIP_MIRROR_URL, a uv.lock project is exported and its pinned versions installed from the mirror."""
        os.unlink(os.path.join(self.working_dir, "requirements.txt"))
        for name in ("pyproject.toml", "uv.lock"):
            open(os.path.join(self.working_dir, name), "w").close()
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_mirror_url="https://mirror/simple", pip_verbose=False,
            init_timeout=120, python_interpreter_path=sys.executable, environ={"PATH": ""},
            interpreter_search_dirs=(), threadpool=SynchronousThreadPool(),
        )
        d = self.build()
        self.answer_probe()
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        self.reactor.processes[-1].finish(0)
        export = self.reactor.processes[-1]
        self.assertEqual(
            export.argv,
            ("/uv", "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project",
             "--format", "requirements-txt", "-o", ".venv/dify/locked-requirements.txt"),
        )
        export.finish(0)
        install = self.reactor.processes[-1]
        self.assertEqual(
            install.argv,
            ("/uv", "pip", "install", "-i", "https://mirror/simple", "-r", ".venv/dify/locked-requirements.txt"),
        )
        install.finish(0)
        [compile_plugin] = [p for p in self.reactor.processes if p.argv[-1] == "."]
        compile_plugin.finish(0)
        self.successResultOf(d)
        self.assertTrue(venv_is_valid(self.working_dir))

    def test_background_builds_service_kills_the_compilation(self):
        """BackgroundBuildsService's stop kills a background compilation still running (KILL), logs no failure, and fires."""
        self.builder = PythonEnvironmentBuilder(
            self.reactor, "/uv", "/cache", pip_verbose=False, init_timeout=120,
            python_interpreter_path=sys.executable, environ={"PATH": ""},
            interpreter_search_dirs=(), threadpool=SynchronousThreadPool(), compile_in_background=True,
        )
        service = BackgroundBuildsService(self.builder)
        service.startService()
        d = self.build()
        self.answer_probe()
        os.makedirs(os.path.join(self.working_dir, ".venv", "bin"))
        open(os.path.join(self.working_dir, ".venv", "bin", "python"), "w").close()
        os.makedirs(os.path.join(self.working_dir, ".venv", "lib", "python3.12", "site-packages"))
        self.reactor.processes[-1].finish(0)
        for process in self.reactor.processes[-2:]:
            process.finish(0)
        self.successResultOf(d)
        compile_site = self.reactor.processes[-1]
        self.assertEqual(compile_site.signals, [])
        stopped = service.stopService()
        self.assertEqual(compile_site.signals, ["KILL"])
        self.successResultOf(stopped)
        # the killed process is reaped later: nothing is called twice, nothing logged as failed
        compile_site.finish(None, 9)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertTrue(venv_is_valid(self.working_dir))

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
        """A build of the same dependencies waits for the prepared venv being kept (then logged), then copies it."""
        first, _ = self.first_build()
        second = self.plugin("second")
        spawned = len(self.reactor.processes)
        d = self.build(second)
        self.assertEqual(len(self.reactor.processes), spawned)  # no venv yet: it waits
        with capturedLogs() as events:
            self.pool.release()
        self.assertEqual([e["path"] for e in events if "kept for later builds" in e["log_format"]], [first])
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

    def test_stop_while_keeping_logs_no_failure(self):
        """A stop during the keeping of a fresh build logs no failure, and the keeping still ends and is logged once."""
        first, _ = self.first_build()
        self.assertEqual(len(self.pool.waiting), 1)  # the keeping runs in its thread
        with capturedLogs() as events:
            self.builder.stop_compiling()
            self.assertEqual(self.flushLoggedErrors(), [])
            self.assertFalse([e for e in events if "kept for later builds" in e["log_format"]])
            self.pool.release()
        self.assertEqual([e["path"] for e in events if "kept for later builds" in e["log_format"]], [first])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertIsNone(self.successResultOf(self.builder.settled()))

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

    async def test_background_compiled_venv(self):
        """A build compiling in the background yields a working venv at once, and the SDK's .pyc files once settled."""
        self.builder = sdk.environment_builder(self.reactor, compile_in_background=True)
        python = await self.build()
        self.assertTrue(venv_is_valid(self.working_dir))
        self.assertIn("byte-compiling site-packages in the background", self.progress)
        await self.builder.settled()
        sdk_cache = os.path.join(
            self.working_dir, ".venv", "lib", "python3.12", "site-packages", "dify_plugin", "__pycache__"
        )
        self.assertTrue(any(name.endswith(".cpython-312.pyc") for name in os.listdir(sdk_cache)))
        seconds = await sdk.seconds_to_first_heartbeat(self.reactor, python, self.working_dir)
        self.assertGreater(seconds, 0)

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


DEAD_INDEX = "http://127.0.0.1:9/simple"


class RealOfflineBuildTests(AsyncTestCase):
    """Real uv builds with the index pointed at a dead address: wheels shipped or in a wheelhouse install, else a plain error."""

    timeout = 300

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.working_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.working_dir)
        with open(os.path.join(self.working_dir, "requirements.txt"), "w") as f:
            f.write("tinydist==1.0\n")
        self.progress = []

    def builder(self, **overrides):
        return sdk.environment_builder(self.reactor, pip_mirror_url=DEAD_INDEX, **overrides)

    async def test_shipped_wheels_install_without_index(self):
        """A package's wheels/ folder installs its requirements with no index at all."""
        tiny_wheel(os.path.join(self.working_dir, "wheels"))
        python = await self.builder().build(self.working_dir, "3.12", self.progress.append)
        self.assertTrue(venv_is_valid(self.working_dir))
        self.assertTrue(glob.glob(os.path.join(os.path.dirname(os.path.dirname(python)), "lib", "python3.12",
                                               "site-packages", "tinydist-1.0.dist-info")))

    async def test_repackaged_requirements_install_without_index(self):
        """A requirements.txt naming its own --no-index --find-links=./wheels/ (community repackaging) installs offline."""
        tiny_wheel(os.path.join(self.working_dir, "wheels"))
        with open(os.path.join(self.working_dir, "requirements.txt"), "w") as f:
            f.write("--no-index\n--find-links=./wheels/\ntinydist==1.0\n")
        await self.builder().build(self.working_dir, "3.12", self.progress.append)
        self.assertTrue(venv_is_valid(self.working_dir))

    async def test_wheelhouse_tried_before_index(self):
        """PIP_WHEELHOUSE_PATH satisfies an install on its own: the dead index is never needed."""
        wheelhouse = os.path.abspath(self.mktemp())
        tiny_wheel(wheelhouse)
        python = await self.builder(wheelhouse=wheelhouse).build(self.working_dir, "3.12", self.progress.append)
        self.assertTrue(venv_is_valid(self.working_dir))
        self.assertTrue(os.path.exists(python))

    async def test_unreachable_index_said_plainly(self):
        """An install that needs the network and has none fails with "cannot reach the package index <url>"."""
        with self.assertRaises(InternalServerError) as caught:
            await self.builder().build(self.working_dir, "3.12", self.progress.append)
        self.assertTrue(
            caught.exception.message.startswith(f"cannot reach the package index {DEAD_INDEX}: "),
            caught.exception.message,
        )
        self.assertFalse(os.path.exists(os.path.join(self.working_dir, MARKER_PATH)))


class RealOfflineSDKPluginTests(AsyncTestCase):
    """The real echo plugin, its SDK wheels shipped in the package, built with the index at a dead address."""

    timeout = 600

    async def built_and_copy(self):
        """The echo plugin built online (so its wheels are in uv's cache), and a fresh copy of it: (built, copy)."""
        from twisted.internet import reactor

        online = os.path.abspath(self.mktemp())
        copy_echo_plugin(online)
        await sdk.environment_builder(reactor).build(online, "3.12", lambda line: None)
        copy = os.path.abspath(self.mktemp())
        copy_echo_plugin(copy)
        return online, copy

    async def test_prefer_offline_installs_from_uv_cache(self):
        """With prefer_offline, the echo plugin builds from uv's warm cache while every index is behind a dead proxy."""
        from twisted.internet import reactor

        _, cut_off = await self.built_and_copy()
        dead = "http://127.0.0.1:9"
        builder = sdk.environment_builder(reactor, prefer_offline=True, proxies={"HTTP_PROXY": dead, "HTTPS_PROXY": dead})
        progress = []
        python = await builder.build(cut_off, "3.12", progress.append)
        self.assertTrue(venv_is_valid(cut_off))
        self.assertTrue(os.path.exists(python))

    async def test_offline_sdk_plugin(self):
        """A package shipping the SDK's wheels in wheels/ builds with a dead index and runs to its first heartbeat."""
        from twisted.internet import reactor

        online, offline = await self.built_and_copy()
        wheels = wheels_from_site_packages(
            os.path.join(online, SITE_PACKAGES), os.path.join(offline, "wheels")
        )
        self.assertTrue(any(os.path.basename(w).startswith("dify_plugin-") for w in wheels))
        progress = []
        python = await sdk.environment_builder(reactor, pip_mirror_url=DEAD_INDEX).build(offline, "3.12", progress.append)
        self.assertTrue(venv_is_valid(offline))
        seconds = await sdk.seconds_to_first_heartbeat(reactor, python, offline)
        self.assertGreater(seconds, 0)
