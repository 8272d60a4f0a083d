"""
Shared parts of the benchmarks: a daemon run by ``twistd`` in a child
process, lean asyncio clients for its HTTP API and for a plugin driven
directly over stdio.  Benchmarks are scripts that print figures; they are
never run as tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "bench-key"
TENANT = "0193a8a4-0000-7000-8000-00000000beef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process (not its children), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def plugin_pids(daemon_pid: int) -> list[int]:
    """The daemon's children running the plugin (``-m main``)."""
    from difydaemon.testing.proc import children_by_parent, command_line

    pids = [pid for pid in children_by_parent().get(daemon_pid, []) if b"-m\0main" in command_line(pid)]
    if not pids:
        raise RuntimeError("the daemon runs no plugin process")
    return pids


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def stop_child(process: subprocess.Popen, log, directory: str) -> None:
    """TERM a server the bench started (KILL after 30 s), close its log and remove its directory."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    shutil.rmtree(directory, ignore_errors=True)


class Daemon:
    """``twistd -n difydaemon`` in a temporary directory, on the embedded default."""

    def __init__(self, extra_env=None, prepared_venvs=None, uv_cache=None):
        self.dir = tempfile.mkdtemp(prefix="difydaemon-bench-")
        self.port = free_port()
        working = os.path.join(self.dir, "cwd")
        os.makedirs(working)
        from difydaemon.testing.sdk import python312, test_uv_cache_dir

        os.symlink(uv_cache or test_uv_cache_dir(), os.path.join(working, ".uv-cache"))
        if prepared_venvs:
            os.makedirs(prepared_venvs, exist_ok=True)
            os.symlink(prepared_venvs, os.path.join(working, ".prepared-venvs"))
        env = dict(os.environ)
        env.update(
            {
                "SERVER_KEY": KEY,
                "SERVER_HOST": "127.0.0.1",
                "SERVER_PORT": str(self.port),
                "DIFY_INNER_API_URL": "http://127.0.0.1:1",
                "DIFY_INNER_API_KEY": "inner",
                "PLATFORM": "local",
                "DB_TYPE": "sqlite",
                "DB_DATABASE": os.path.join(self.dir, "daemon.db"),
                "PLUGIN_STORAGE_LOCAL_ROOT": os.path.join(self.dir, "storage"),
                "PLUGIN_WORKING_PATH": working,
                "PLUGIN_REMOTE_INSTALLING_ENABLED": "false",
                "FORCE_VERIFYING_SIGNATURE": "false",
                "PYTHON_INTERPRETER_PATH": python312(),
                "PYTHONPATH": REPO,
            }
        )
        env.update(extra_env or {})
        self._env = env
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.process = self._spawn()
        self.working = working

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="] + (os.environ.get("BENCH_TWISTD_ARGS", "").split()) + ["difydaemon"],
            cwd=self.dir,
            env=self._env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def restart(self) -> None:
        """Stop the daemon (TERM, KILL after 30 s) and start it again on the same directory, database and port."""
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = self._spawn()

    async def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = await http_call("GET", self.port, "/health/check")
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("the daemon did not start; see " + self.log.name)

    async def upload_install(self, package: bytes) -> str:
        """Upload and install one package; returns its identifier once the task succeeded."""
        content_type, body = upload_form(package)
        _, reply = await http_call(
            "POST",
            self.port,
            f"/plugin/{TENANT}/management/install/upload/package",
            body,
            {"Content-Type": content_type},
        )
        identifier = json.loads(reply)["data"]["unique_identifier"]
        _, reply = await http_call(
            "POST",
            self.port,
            f"/plugin/{TENANT}/management/install/identifiers",
            json.dumps({"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]}).encode(),
            {"Content-Type": "application/json"},
        )
        task_id = json.loads(reply)["data"]["task_id"]
        while task_id:
            _, reply = await http_call("GET", self.port, f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            task = json.loads(reply)["data"]
            if task["status"] == "success":
                break
            if task["status"] == "failed":
                raise RuntimeError(f"install failed: {task['plugins'][0]['message']}")
            await asyncio.sleep(0.02)
        return identifier

    async def wait_logged(self, text: str, timeout: float = 120.0) -> bool:
        """Wait until the daemon's log holds ``text``; False if it did not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.flush()
            with open(self.log.name, "rb") as f:
                if text.encode() in f.read():
                    return True
            await asyncio.sleep(0.1)
        return False

    async def wait_kept(self, timeout: float = 300.0) -> bool:
        """
        Wait until the background compilation of a fresh install is over and
        its venv kept as a prepared venv, as a daemon that keeps running
        would: a stop kills that compilation, and keeps nothing.  Niced, it
        takes minutes on a busy machine.
        """
        return await self.wait_logged("kept for later builds", timeout)

    def stop(self):
        stop_child(self.process, self.log, self.dir)


def upload_form(package: bytes) -> tuple[str, bytes]:
    """(content type, body) of a package upload as Dify sends it (unverified)."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"verify_signature\"\r\n\r\nfalse\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"dify_pkg\"; filename=\"dify_pkg\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + package + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


async def http_call(method, port, path, body=b"", headers=None):
    """One request on a fresh connection; returns (status, body bytes)."""
    conn = HTTPConnection(port)
    await conn.open()
    try:
        return await conn.request(method, path, body, headers)
    finally:
        conn.close()


class HTTPConnection:
    """A minimal keep-alive HTTP/1.1 client reading chunked or sized bodies."""

    def __init__(self, port):
        self.port = port

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self):
        self.writer.close()

    async def request(self, method, path, body=b"", headers=None):
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"X-Api-Key: {KEY}", f"Content-Length: {len(body)}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = None
        chunked = False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            return status, b"".join(parts)
        return status, await self.reader.readexactly(length or 0)


class DirectPlugin:
    """A plugin process driven over stdio as a local runtime does, without the daemon."""

    def __init__(self, working_dir):
        self.working_dir = working_dir
        self.waiters = {}
        self.chunks = {}
        #: called with each session message as soon as its line is read, or None
        self.on_message = None

    async def start(self):
        env = dict(os.environ)
        env["INSTALL_METHOD"] = "local"
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.process = await asyncio.create_subprocess_exec(
            os.path.join(self.working_dir, ".venv", "bin", "python"),
            "-m",
            "main",
            cwd=self.working_dir,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=16 * 1024 * 1024,
        )
        self.ready = asyncio.get_running_loop().create_future()
        self.reader_task = asyncio.ensure_future(self._read())
        await self.ready

    async def _read(self):
        buffer = b""
        while True:
            data = await self.process.stdout.read(65536)
            if not data:
                return
            buffer += data
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            for line in lines:
                if not line:
                    continue
                if b'"heartbeat"' in line[:40]:
                    if not self.ready.done():
                        self.ready.set_result(None)
                    continue
                if not line.startswith(b'{"event":"session"'):
                    continue
                message = json.loads(line)
                if self.on_message is not None:
                    self.on_message(message)
                session = message["session_id"]
                kind = message["data"]["type"]
                if kind == "stream":
                    self.chunks[session] = self.chunks.get(session, 0) + 1
                elif kind in ("end", "error"):
                    waiter = self.waiters.pop(session, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(self.chunks.pop(session, 0))

    async def invoke(self, data):
        session = str(uuid.uuid4())
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[session] = waiter
        line = json.dumps(
            {
                "session_id": session,
                "conversation_id": None,
                "message_id": None,
                "app_id": None,
                "endpoint_id": None,
                "context": None,
                "event": "request",
                "data": data,
            },
            separators=(",", ":"),
        )
        self.process.stdin.write(line.encode() + b"\n")
        return await waiter

    async def stop(self):
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except asyncio.TimeoutError:
            self.process.kill()
        self.reader_task.cancel()
