"""
Fakes shared by the tests of :mod:`difydaemon.runtimes.environment`: a process
reactor, a synchronous thread pool, a fake site-packages, the echo plugin's
source.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import struct

from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from difydaemon.runtimes.environment import bytecode_salt


ECHO_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "plugins", "echo")
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


# -- cached bytecode: pure parts ---------------------------------------------

SALT = bytecode_salt("/py/python3.12", None)


def pyc_header(mtime: float, size: int, flags: int = 0) -> bytes:
    """A .pyc header as CPython 3.12 writes it."""
    return struct.pack("<4sIII", b"\xcb\r\r\n", flags, int(mtime) & 0xFFFFFFFF, size & 0xFFFFFFFF)


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


SITE_PACKAGES = ".venv/lib/python3.12/site-packages"
