"""
The child process of :class:`difydaemon.packaging.isolation.ChildProcessDecoder`:
``python -m difydaemon.packaging.child``.

It reads one JSON header line (what to decode, under which policy, within
how much address space) then the package bytes on stdin, and writes one
JSON document on stdout:
``{"ok": ...}`` or ``{"error": {"type": <DaemonError class>, "message": ...}}``.
It imports no Twisted, so that it starts quickly.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import traceback

#: How far below the daemon the child runs.
NICENESS = 10

if __name__ == "__main__":
    # Before the imports: decoding, and even getting ready to, must leave
    # the CPU to dispatch when both want it.
    os.nice(NICENESS)

import orjson  # noqa: E402
from attrs import asdict  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from difydaemon.errors import DaemonError  # noqa: E402
from difydaemon.packaging.package import DecodedPackage, PackagePolicy, decode_bundle, decode_package  # noqa: E402
from difydaemon.packaging.signature import load_public_key  # noqa: E402
from difydaemon.packaging.yaml_limits import YamlLimits  # noqa: E402

if __name__ == "__main__":
    # A spare child waits with the parser loaded, ready for its package;
    # the daemon, which imports this module for its header, does not load it.
    importlib.import_module("difydaemon.packaging.plugin_yaml")

MEBIBYTE = 1024 * 1024


def policy_header(policy: PackagePolicy) -> dict:
    """The JSON form of a policy, for the child."""
    return {
        "max_size": policy.max_size,
        "force_verify": policy.force_verify,
        "enforce_langgenius": policy.enforce_langgenius,
        "public_keys": [
            key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode("ascii")
            for key in policy.public_keys
        ],
        "yaml_limits": asdict(policy.yaml_limits),
    }


def _policy_from(header: dict) -> PackagePolicy:
    return PackagePolicy(
        max_size=header["max_size"],
        force_verify=header["force_verify"],
        enforce_langgenius=header["enforce_langgenius"],
        public_keys=tuple(load_public_key(pem.encode("ascii")) for pem in header["public_keys"]),
        yaml_limits=YamlLimits(**header["yaml_limits"]),
    )


def _decoded_json(decoded: DecodedPackage) -> dict:
    return {
        "identifier": decoded.identifier.raw,
        "declaration": decoded.declaration,
        "verification": None if decoded.verification is None else decoded.verification.authorized_category,
    }


def _serve(header: dict, data: bytes) -> dict:
    policy = _policy_from(header["policy"])
    if header["kind"] == "package":
        return _decoded_json(decode_package(data, policy, header["verify_signature"]))
    dependencies = []
    for dependency in decode_bundle(data, policy, header["max_bundle_size"], header["verify_signature"]):
        if dependency["type"] == "package":
            dependency = {"type": "package", "asset": dependency["asset"],
                          "decoded": _decoded_json(dependency["decoded"])}
        dependencies.append(dependency)
    return {"dependencies": dependencies}


def limit_address_space(size: int) -> None:
    """Make this process's allocations fail beyond ``size`` bytes."""
    resource.setrlimit(resource.RLIMIT_AS, (size, size))


def main(stdin, stdout, stderr, limit=limit_address_space) -> int:
    """
    The child: wait for a header (started ahead of need, it may wait long;
    no header means the parent closed it), ``limit`` memory, decode what
    stdin holds, answer on stdout (tracebacks of bugs go to stderr).
    """
    line = stdin.readline()
    if not line.strip():
        return 0
    header = orjson.loads(line)
    memory = header["memory"]
    limit(memory)
    try:
        answer = {"ok": _serve(header, stdin.read())}
    except DaemonError as error:
        answer = {"error": {"type": type(error).__name__, "message": error.message}}
    except MemoryError:
        answer = {"error": {"type": "MalformedPackageError",
                            "message": f"the package needs more than {memory // MEBIBYTE} MiB of memory to decode"}}
    except Exception as error:  # noqa: BLE001 - a bug: reported as such, with its traceback
        traceback.print_exc(file=stderr)
        answer = {"error": {"type": "InternalServerError", "message": f"decoding the package failed: {error!r}"}}
    stdout.write(orjson.dumps(answer))
    stdout.flush()
    return 0


if __name__ == "__main__":
    status = main(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    sys.stderr.flush()
    # Nothing is left to clean up; tearing the interpreter down would only
    # keep the parent waiting for this process to end.
    os._exit(status)
