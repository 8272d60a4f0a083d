"""
Tests for :mod:`difydaemon.runtimes.environment.interpreters`: finding uv and
a Python interpreter, on disk and for real.
"""

from __future__ import annotations

import os
import sys


from difydaemon.errors import InternalServerError
from difydaemon.runtimes.environment import (
    find_interpreter,
    find_uv,
    interpreter_candidates,
)
from difydaemon.testing import sdk
from difydaemon.testing.cases import (
    AsyncTestCase,
    SynchronousTestCase,
)
from tests.runtimes.environment.fakes import write_executable


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
