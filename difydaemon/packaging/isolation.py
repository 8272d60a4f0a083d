"""
Package decoding in a child process.

Decoding a package is mostly pure Python (the YAML, the declaration).  In a
thread of the daemon it holds the GIL for hundreds of milliseconds per
heavy package, and every dispatch waits for it in turn: echo calls went
from p99 ~7 ms to 60-160 ms while telegram_trigger uploaded.  In a child
process it holds no lock of the daemon's; and a hostile package meets a
memory limit (``RLIMIT_AS``) and a deadline that end only the child.

:class:`ChildProcessDecoder` runs ``python -m difydaemon.packaging.child``
for each package or bundle.  It blocks: call it from the thread pool, where
waiting for the child releases the GIL.  (subprocess rather than the
reactor's spawnProcess, because the caller is a pool thread; Twisted reaps
only the processes it spawned, so the two do not meet.); :class:`InProcessDecoder` decodes in the caller, for
the CLI and unit tests.  Both give the same results and raise the same
:class:`~difydaemon.errors.DaemonError` subclasses.

The child (:mod:`difydaemon.packaging.child`) answers with the
declaration, identifier and verification; the parent re-reads the zip
itself for the files it keeps (zlib runs without the GIL), and trusts the
child's answer: the child is our code, run with the daemon's interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import orjson
from attrs import frozen
from twisted.logger import Logger

from difydaemon import errors
from difydaemon.errors import DaemonError, MalformedPackageError
from difydaemon.packaging import child
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.child import policy_header
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.packaging.package import DecodedPackage, PackagePolicy, decode_bundle, decode_package
from difydaemon.packaging.signature import Verification

log = Logger()

MEBIBYTE = child.MEBIBYTE
#: What a decoder child inherits of the daemon's environment (and ``LC_*``).
_INHERITED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP"})


@frozen
class ChildLimits:
    """
    What one decoding child may take.

    :ivar timeout: seconds before the child is killed.
    :ivar base_memory: address space for the interpreter and the YAML
        budget (1,000,000 nodes), in bytes.
    :ivar memory_per_input_byte: more address space per byte of package (the
        zip, its inflated files and their copies).
    """

    timeout: float = 60.0
    base_memory: int = 768 * MEBIBYTE
    memory_per_input_byte: int = 4

    def memory_for(self, size: int) -> int:
        """The address-space limit for a package of ``size`` bytes."""
        return self.base_memory + self.memory_per_input_byte * size


class InProcessDecoder:
    """Decodes in the calling thread (the CLI, unit tests)."""

    def package(self, data: bytes, policy: PackagePolicy, verify_signature: bool) -> DecodedPackage:
        """:func:`~difydaemon.packaging.package.decode_package`."""
        return decode_package(data, policy, verify_signature)

    def bundle(self, data: bytes, policy: PackagePolicy, max_bundle_size: int, verify_signature: bool) -> list:
        """:func:`~difydaemon.packaging.package.decode_bundle`."""
        return decode_bundle(data, policy, max_bundle_size, verify_signature)


def _decoded_from(document: dict, data: bytes, max_size: int) -> DecodedPackage:
    category = document["verification"]
    return DecodedPackage(
        identifier=parse_identifier(document["identifier"]),
        declaration=document["declaration"],
        verification=None if category is None else Verification(category),
        files=read_package(data, max_size),
    )


def _raise(error: dict) -> None:
    cls = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message"))
    if isinstance(cls, type) and issubclass(cls, DaemonError) and cls.__module__ == errors.__name__:
        raise cls(message)
    raise errors.InternalServerError(message)


class ChildProcessDecoder:
    """
    Decodes each package or bundle in a child process of its own; blocking,
    safe to call from several threads.

    A child serves one package and exits.  One spare child is kept started
    (its imports done, waiting on stdin) so that a decode does not wait for
    an interpreter to start; each decode starts the next one when it ends.
    Children run at a lower CPU priority than the daemon: when the CPUs are
    busy, dispatch goes first.

    :param limits: the child's memory and time.
    :param python: the interpreter to run (the daemon's own).
    """

    def __init__(self, limits: ChildLimits = ChildLimits(), python: str = sys.executable) -> None:
        self.limits = limits
        self._python = python
        self._lock = threading.Lock()
        self._spare: subprocess.Popen | None = None
        # children decoding now, killed if the daemon stops meanwhile
        self._busy: set[subprocess.Popen] = set()
        self._closed = False

    @property
    def spare(self) -> subprocess.Popen | None:
        """The child waiting for the next package, if one is started."""
        return self._spare

    def _start(self) -> subprocess.Popen:
        # The daemon's own import path, whatever put difydaemon on it
        # (twistd adds the working directory, for one).
        # Nothing else of the daemon's environment: its secrets are no
        # business of a decoder reading untrusted input.
        environ = {name: value for name, value in os.environ.items() if name in _INHERITED or name.startswith("LC_")}
        environ["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        return subprocess.Popen(
            [self._python, "-m", child.__name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
        )

    def _take(self) -> subprocess.Popen:
        with self._lock:
            if self._closed:
                raise errors.InternalServerError("the package decoder is stopped")
            spare, self._spare = self._spare, None
            process = spare if spare is not None and spare.poll() is None else self._start()
            self._busy.add(process)
        return process

    def _replenish(self) -> None:
        # After a decode rather than when taking the spare: its start-up
        # would otherwise compete with the decode for the CPU.
        with self._lock:
            if self._spare is None and not self._closed:
                self._spare = self._start()

    def close(self) -> None:
        """
        Kill the spare child and the children decoding now (their callers
        get an error at once): no child outlives the daemon, no thread
        waits on one, and the shutdown never waits for a child that does
        not read its stdin (a stopped one, say).
        """
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            busy = list(self._busy)
        for process in busy:
            process.kill()
        if spare is not None:
            spare.kill()
            spare.wait()
            spare.stdin.close()
            spare.stdout.close()
            spare.stderr.close()

    def stop(self) -> None:
        """:meth:`close`, as the daemon's shutdown calls each of its runners."""
        self.close()

    def package(self, data: bytes, policy: PackagePolicy, verify_signature: bool) -> DecodedPackage:
        """What :func:`decode_package` gives, decoded in a child."""
        header = {"kind": "package", "policy": policy_header(policy), "verify_signature": verify_signature}
        return _decoded_from(self._run(header, data), data, policy.max_size)

    def bundle(self, data: bytes, policy: PackagePolicy, max_bundle_size: int, verify_signature: bool) -> list:
        """What :func:`decode_bundle` gives, decoded in a child."""
        header = {
            "kind": "bundle", "policy": policy_header(policy), "verify_signature": verify_signature,
            "max_bundle_size": max_bundle_size,
        }
        result = self._run(header, data)
        files = read_package(data, max_bundle_size)
        dependencies = []
        for dependency in result["dependencies"]:
            if dependency["type"] != "package":
                dependencies.append(dependency)
                continue
            asset = files[dependency["asset"]]
            decoded = _decoded_from(dependency["decoded"], asset, policy.max_size)
            dependencies.append({
                "type": "package",
                "value": {"unique_identifier": decoded.identifier.raw, "manifest": decoded.declaration},
                "decoded": decoded,
                "data": asset,
                "asset": dependency["asset"],
            })
        return dependencies

    def _run(self, header: dict, data: bytes) -> dict:
        memory = self.limits.memory_for(len(data))
        header["memory"] = memory
        process = self._take()
        try:
            stdout, stderr = process.communicate(orjson.dumps(header) + b"\n" + data, timeout=self.limits.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            log.warn("decoding a package took more than {timeout} s; child killed", timeout=self.limits.timeout)
            raise MalformedPackageError(
                f"decoding the package took more than {self.limits.timeout:g} seconds"
            ) from None
        finally:
            with self._lock:
                self._busy.discard(process)
            self._replenish()
        try:
            document = orjson.loads(stdout)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict) and "ok" in document:
            return document["ok"]
        if isinstance(document, dict) and isinstance(document.get("error"), dict):
            if document["error"].get("type") == "InternalServerError":
                log.error("package decoder failed: {stderr}", stderr=stderr.decode("utf-8", "replace"))
            _raise(document["error"])
        log.error(
            "package decoder exited with {code} and no answer: {stderr}",
            code=process.returncode,
            stderr=stderr.decode("utf-8", "replace")[-4000:],
        )
        raise MalformedPackageError(
            f"the package could not be decoded within {memory // MEBIBYTE} MiB of memory "
            f"(the decoder exited with {process.returncode})"
        )
