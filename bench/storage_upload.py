"""
Upload -> install -> first answer with the object store on S3 (moto in
server mode on loopback) against the local filesystem, interleaved
(filesystem, S3, filesystem, S3 ...), in one run.

Two daemons run as in production (``twistd``, embedded SQLite), one per
store; they share a prepared-venv directory, warmed by a first untimed
install on each, so that the figures are the store's and the daemon's,
not uv's.  Every round uploads a package never seen before (the echo
plugin with ``--blob-mb`` of incompressible payload and a fresh nonce)
into a tenant of its own, and times:

- upload: the upload request (decode, check, store the package and icon);
- install: from the install request to the task's success (copy the
  package to the installed prefix, unpack it, copy the prepared venv,
  start the plugin);
- first answer: the first echo call, answered.

moto keeps objects in memory and answers on loopback: the S3 figures are
the cost of the S3 protocol (signing, HTTP, botocore in threads, parts
above 16 MiB), not a network's.

Usage: ``python bench/storage_upload.py [--rounds 5] [--blob-mb 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import Daemon, HTTPConnection, free_port, http_call, upload_form  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402
from difydaemon.testing.s3 import ACCESS_KEY, SECRET_KEY, answers  # noqa: E402

HEADERS = {"Content-Type": "application/json", "X-Plugin-ID": "acme/echo"}
ECHO = json.dumps(
    {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}}
).encode()


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto server on a free loopback port, and its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not answers("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("moto_server did not start")
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port}"


def package(blob_mb: float) -> bytes:
    """The echo plugin with ``blob_mb`` MiB of incompressible payload: a new identifier each time."""
    files = echo_plugin_files()
    files["payload.bin"] = os.urandom(int(blob_mb * 1024 * 1024))
    return build_package(files)


async def upload_install_answer(daemon: Daemon, data: bytes) -> tuple[float, float, float]:
    """Seconds of the upload, the install and the first answer, in a tenant of its own."""
    tenant = str(uuid.uuid4())
    content_type, body = upload_form(data)
    start = time.perf_counter()
    status, reply = await http_call(
        "POST", daemon.port, f"/plugin/{tenant}/management/install/upload/package", body, {"Content-Type": content_type}
    )
    identifier = json.loads(reply)["data"]["unique_identifier"]
    uploaded = time.perf_counter()
    _, reply = await http_call(
        "POST",
        daemon.port,
        f"/plugin/{tenant}/management/install/identifiers",
        json.dumps({"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]}).encode(),
        {"Content-Type": "application/json"},
    )
    task_id = json.loads(reply)["data"]["task_id"]
    while True:
        _, reply = await http_call("GET", daemon.port, f"/plugin/{tenant}/management/install/tasks/{task_id}")
        task = json.loads(reply)["data"]
        if task["status"] == "success":
            break
        if task["status"] == "failed":
            raise RuntimeError(f"install failed: {task['plugins'][0]['message']}")
        await asyncio.sleep(0.01)
    installed = time.perf_counter()
    connection = HTTPConnection(daemon.port)
    await connection.open()
    try:
        status, reply = await connection.request("POST", f"/plugin/{tenant}/dispatch/tool/invoke", ECHO, HEADERS)
    finally:
        connection.close()
    assert status == 200 and reply.count(b"data: ") == 2, reply
    answered = time.perf_counter()
    return uploaded - start, installed - uploaded, answered - installed


async def main(args) -> None:
    moto, endpoint = start_moto()
    prepared = tempfile.mkdtemp(prefix="difydaemon-bench-venvs-")
    daemons = {}
    try:
        daemons["filesystem"] = Daemon(prepared_venvs=prepared)
        daemons["s3"] = Daemon(
            prepared_venvs=prepared,
            extra_env={
                "PLUGIN_STORAGE_TYPE": "aws_s3",
                "PLUGIN_STORAGE_OSS_BUCKET": "bench",
                "S3_USE_AWS": "false",
                "S3_ENDPOINT": endpoint,
                "AWS_ACCESS_KEY": ACCESS_KEY,
                "AWS_SECRET_KEY": SECRET_KEY,
            },
        )
        for daemon in daemons.values():
            await daemon.wait_ready(60)
        for daemon in daemons.values():
            # warms the prepared venv and every cache but the store's
            await upload_install_answer(daemon, package(0))
        data = [package(args.blob_mb) for _ in range(args.rounds * 2)]
        print(f"package: echo plugin + {args.blob_mb:g} MiB incompressible (zip {len(data[0]) / 1e6:.2f} MB), "
              f"{args.rounds} rounds, interleaved; CPU cores: {os.cpu_count()}")
        samples = {name: [] for name in daemons}
        for index in range(args.rounds):
            for offset, (name, daemon) in enumerate(daemons.items()):
                samples[name].append(await upload_install_answer(daemon, data[index * 2 + offset]))
        print(f"{'store':<11} {'upload':>10} {'install':>10} {'1st answer':>11} {'total':>10}   (median seconds)")
        for name, rounds in samples.items():
            upload, install, answer = (median(phase) for phase in zip(*rounds))
            total = median(sum(r) for r in rounds)
            print(f"{name:<11} {upload:>10.3f} {install:>10.3f} {answer:>11.3f} {total:>10.3f}")
    finally:
        for daemon in daemons.values():
            daemon.stop()
        moto.kill()
        moto.wait()
        shutil.rmtree(prepared, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--blob-mb", type=float, default=4.0)
    asyncio.run(main(parser.parse_args()))
