"""
The Go daemon's benchmark workload (``performance.md``,
``BenchmarkLocalOpenAILLMInvocation``): the official OpenAI plugin from
``shared/fixtures`` answers streaming ``invoke_llm`` calls, ``--in-flight``
(100) at a time, against a fake OpenAI server that streams ``--chunks``
(400) chunks ``--interval-ms`` (10) ms apart with no usage chunk.  Go's
figure: 134 ms/op on 4 procs.

Paths, run interleaved (A B A B ...) for ``--rounds`` rounds:

- ``direct``: the plugin process spawned here exactly as the local runtime
  spawns it, request lines written on its stdin, session ends counted on
  its stdout: the floor, no daemon at all.
- ``daemon``: the same workload through the daemon's HTTP API (``twistd``
  on the embedded default, the package uploaded and installed over HTTP,
  one plugin instance).

The fake server runs in a subprocess of its own, so that it shares no
reactor with what is measured.  One line per run and a median line per
path, each naming the core count.  ms/op is wall time over invocations,
as ``go test -bench`` reports it.

Usage::

    .venv/bin/python bench/openai_workload.py [--in-flight 100] [--chunks 400]
        [--interval-ms 10] [--invocations 400] [--rounds 3] [--paths direct]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

from attrs import frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater, react

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.harness import cpu_seconds as process_cpu  # noqa: E402
from bench.harness import plugin_pids  # noqa: E402
from difydaemon.packaging.archive import extract_package, read_package  # noqa: E402
from difydaemon.runtimes.environment import venv_is_valid  # noqa: E402
from difydaemon.testing.openai import FakeOpenAIServer, listen  # noqa: E402
from difydaemon.testing.sdk import environment_builder  # noqa: E402
from difydaemon.testing.tiktoken_cache import tiktoken_cache_dir  # noqa: E402

PACKAGE = os.path.join(ROOT, "..", "shared", "fixtures", "langgenius-openai_0.0.19.difypkg")
MAX_PACKAGE_SIZE = 52428800
PLUGIN_ID = "langgenius/openai"
# What the SDK writes before a session id, and the id's length (uuid4 text).
_SESSION_PREFIX = b'{"event":"session","session_id":"'
_ID_LENGTH = 36
_AFTER_ID = len(_SESSION_PREFIX) + _ID_LENGTH
_STREAM = b'","data":{"type":"stream"'
_END = b'","data":{"type":"end"'
_ERROR = b'","data":{"type":"error"'


@frozen
class Workload:
    """
    One workload's settings.

    :ivar in_flight: invocations open at once.
    :ivar chunks: chunks per fake stream.
    :ivar interval_ms: milliseconds between two chunks.
    :ivar invocations: invocations per run.
    :ivar model: the model asked for (``gpt-3.5-turbo``: tiktoken's
        ``cl100k_base``, the only encoding available offline).
    """

    in_flight: int
    chunks: int
    interval_ms: float
    invocations: int
    model: str = "gpt-3.5-turbo"


@frozen
class RunResult:
    """
    One run of a workload on one path.

    :ivar path: ``direct`` or ``daemon``.
    :ivar seconds: wall time from the first request to the last stream's end.
    :ivar completed: streams that ended without error.
    :ivar errors: streams that ended with an error.
    :ivar chunks: stream chunks received in all.
    :ivar plugin_cpu: CPU seconds the plugin process(es) used meanwhile.
    :ivar client_cpu: CPU seconds this bench process used meanwhile.
    :ivar daemon_cpu: CPU seconds the daemon's twistd process used meanwhile
        (None on the direct path).
    :ivar first_error: the first error's text, or None.
    """

    path: str
    seconds: float
    completed: int
    errors: int
    chunks: int
    plugin_cpu: float
    client_cpu: float
    daemon_cpu: float | None = None
    first_error: str | None = None


def invoke_llm_fields(workload: Workload, openai_api_base: str) -> dict:
    """
    The request fields of one ``invoke_llm``, as the Go benchmark sends
    them: the ``data`` of a dispatch body, and (with ``user_id``, ``type``
    and ``action``) of the plugin request.
    """
    return {
        "provider": "openai",
        "model": workload.model,
        "model_type": "llm",
        "credentials": {"openai_api_key": "test", "openai_api_base": openai_api_base},
        "model_parameters": {"temperature": 0.5},
        "prompt_messages": [{"role": "user", "content": "Hello, world!"}],
        "tools": [],
        "stop": [],
        "stream": True,
    }


def plugin_request_line(session_id: str, fields: dict) -> bytes:
    """The §0.2 request line the daemon writes on the plugin's stdin (``data`` keys sorted, as Go writes them)."""
    data = dict(fields, user_id="bench", type="model", action="invoke_llm")
    message = {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {key: data[key] for key in sorted(data)},
    }
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def dispatch_body(fields: dict) -> dict:
    """The body Dify POSTs to ``/plugin/<tenant>/dispatch/llm/invoke`` for the same invocation."""
    return {
        "user_id": "bench",
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "data": fields,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a live process."""
    return sum(process_cpu(pid))


# -- the plugin, driven directly ------------------------------------------------


class PluginProcess(ProcessProtocol):
    """
    The OpenAI plugin over stdio: writes request lines, counts each
    session's stream chunks and its end or error, and nothing more.
    """

    def __init__(self) -> None:
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.chunks = 0
        self._buffer = b""
        self._stderr = b""
        self._sessions: dict[bytes, object] = {}

    def open(self, session_id: str, line: bytes, on_done) -> None:
        """Write one request; ``on_done(error_text_or_None)`` is called at its end."""
        self._sessions[session_id.encode()] = on_done
        self.transport.write(line)

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if not line.startswith(_SESSION_PREFIX):
                if not self.ready.called and b'"heartbeat"' in line:
                    self.ready.callback(None)
                continue
            rest = line[_AFTER_ID:]
            if rest.startswith(_STREAM):
                self.chunks += 1
            elif rest.startswith(_END):
                self._finish(line, None)
            elif rest.startswith(_ERROR):
                self._finish(line, json.loads(line)["data"]["data"])

    def _finish(self, line: bytes, error) -> None:
        # After an error the SDK still sends end; the session is gone by then.
        on_done = self._sessions.pop(line[len(_SESSION_PREFIX):_AFTER_ID], None)
        if on_done is not None:
            on_done(None if error is None else json.dumps(error)[:500])

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-4096:]

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(f"plugin exited before its first heartbeat: {self._stderr.decode('utf-8', 'replace')}")
            )
        self.ended.callback(None)

    def stop(self, reactor, grace: float = 2.0) -> Deferred:
        """TERM, then KILL after ``grace`` seconds (the SDK ignores stdin EOF)."""
        for signal_name, delay in (("TERM", 0.0), ("KILL", grace)):
            reactor.callLater(delay, self._signal, signal_name)
        return self.ended

    def _signal(self, name: str) -> None:
        if self.ended.called:
            return
        try:
            self.transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


async def prepare_plugin(reactor, work_dir: str) -> str:
    """Unpack the package into ``work_dir`` and build its venv as the daemon does; the venv's python."""
    if not venv_is_valid(work_dir):
        if os.path.isdir(work_dir):
            shutil.rmtree(work_dir)
        with open(PACKAGE, "rb") as f:
            extract_package(read_package(f.read(), MAX_PACKAGE_SIZE), work_dir)
    return await environment_builder(reactor).build(work_dir, "3.12", lambda line: print("#", line, flush=True))


async def start_plugin(reactor, python: str, work_dir: str) -> PluginProcess:
    """Spawn the plugin as the local runtime does and wait for its first heartbeat."""
    env = dict(os.environ, INSTALL_METHOD="local", TIKTOKEN_CACHE_DIR=tiktoken_cache_dir())
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    plugin = PluginProcess()
    reactor.spawnProcess(plugin, python, [python, "-m", "main"], env=env, path=work_dir)
    await plugin.ready
    return plugin


async def run_direct(context: BenchContext, workload: Workload) -> RunResult:
    """The workload on the plugin directly over stdio (the floor)."""
    plugin = context.plugin
    fields = invoke_llm_fields(workload, context.fake_base_url)
    done: Deferred = Deferred()
    state = {"started": 0, "completed": 0, "errors": 0, "first_error": None}

    def start_one() -> None:
        state["started"] += 1
        session_id = str(uuid.uuid4())
        plugin.open(session_id, plugin_request_line(session_id, fields), finished)

    def finished(error) -> None:
        if error is None:
            state["completed"] += 1
        else:
            state["errors"] += 1
            state["first_error"] = state["first_error"] or error
        if state["started"] < workload.invocations:
            start_one()
        elif state["completed"] + state["errors"] == workload.invocations:
            done.callback(None)

    chunks_before = plugin.chunks
    cpu_before = cpu_seconds(plugin.transport.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    for _ in range(min(workload.in_flight, workload.invocations)):
        start_one()
    await done
    seconds = time.perf_counter() - started
    return RunResult(
        path="direct",
        seconds=seconds,
        completed=state["completed"],
        errors=state["errors"],
        chunks=plugin.chunks - chunks_before,
        plugin_cpu=cpu_seconds(plugin.transport.pid) - cpu_before,
        client_cpu=time.process_time() - client_before,
        first_error=state["first_error"],
    )


# -- the daemon path (to be written) --------------------------------------------


async def start_daemon(reactor, instances: int = 1):
    """
    The daemon (``twistd``) with ``langgenius/openai`` installed for the
    bench tenant, the plugin inheriting ``TIKTOKEN_CACHE_DIR``.
    """
    import treq

    from bench.harness import KEY, TENANT, Daemon
    from tests.api.harness import encode_form

    daemon = Daemon(
        extra_env={
            "TIKTOKEN_CACHE_DIR": tiktoken_cache_dir(),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES": "false",
            "PLUGIN_LOCAL_INSTANCES": str(instances),
        },
        prepared_venvs=os.path.join(tempfile.gettempdir(), "difydaemon-bench-prepared"),
    )
    base = f"http://127.0.0.1:{daemon.port}"
    for _ in range(300):
        try:
            response = await treq.get(base + "/health/check")
            await response.content()
            break
        except Exception:
            await deferLater(reactor, 0.1, lambda: None)
    with open(PACKAGE, "rb") as f:
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": f.read()})
    headers = {"X-Api-Key": KEY}
    response = await treq.post(
        f"{base}/plugin/{TENANT}/management/install/upload/package",
        data=body,
        headers=dict(headers, **{"Content-Type": content_type}),
    )
    identifier = json.loads(await response.content())["data"]["unique_identifier"]
    response = await treq.post(
        f"{base}/plugin/{TENANT}/management/install/identifiers",
        data=json.dumps({"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]}).encode(),
        headers=dict(headers, **{"Content-Type": "application/json"}),
    )
    task_id = json.loads(await response.content())["data"]["task_id"]
    while task_id:
        response = await treq.get(f"{base}/plugin/{TENANT}/management/install/tasks/{task_id}", headers=headers)
        task = json.loads(await response.content())["data"]
        if task["status"] == "success":
            break
        if task["status"] == "failed":
            raise RuntimeError(f"installing the OpenAI plugin failed: {task['plugins'][0]['message']}")
        await deferLater(reactor, 0.2, lambda: None)
    return daemon


async def run_daemon(context: BenchContext, workload: Workload) -> RunResult:
    """The same workload through the daemon's HTTP API (``--instances`` plugin processes)."""
    import treq
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    from bench.harness import KEY, TENANT

    daemon = context.daemon
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = workload.in_flight
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    url = f"http://127.0.0.1:{daemon.port}/plugin/{TENANT}/dispatch/llm/invoke"
    headers = {"X-Api-Key": KEY, "X-Plugin-ID": PLUGIN_ID, "Content-Type": "application/json"}
    body = json.dumps(dispatch_body(invoke_llm_fields(workload, context.fake_base_url))).encode()
    state = {"started": 0, "completed": 0, "errors": 0, "chunks": 0, "first_error": None}

    async def one() -> None:
        response = await client.post(url, data=body, headers=headers)
        content = await response.content()
        state["chunks"] += content.count(b'data: {"code":0')
        if b'"code":-500' in content or response.code != 200:
            state["errors"] += 1
            state["first_error"] = state["first_error"] or content[-300:].decode("utf-8", "replace")
        else:
            state["completed"] += 1

    async def worker() -> None:
        while state["started"] < workload.invocations:
            state["started"] += 1
            await one()

    pids = plugin_pids(daemon.process.pid)
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    daemon_before = cpu_seconds(daemon.process.pid)
    client_before = time.process_time()
    started = time.perf_counter()
    from twisted.internet.defer import gatherResults

    await gatherResults([ensureDeferred(worker()) for _ in range(min(workload.in_flight, workload.invocations))])
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    daemon_cpu = cpu_seconds(daemon.process.pid) - daemon_before
    await pool.closeCachedConnections()
    return RunResult(
        path="daemon",
        seconds=seconds,
        completed=state["completed"],
        errors=state["errors"],
        chunks=state["chunks"],
        plugin_cpu=sum(cpu_seconds(pid) for pid in pids) - cpu_before,
        client_cpu=client_cpu,
        daemon_cpu=daemon_cpu,
        first_error=state["first_error"],
    )


PATHS = {"direct": run_direct, "daemon": run_daemon}


class BenchContext:
    """What the paths share: the fake server's address and the direct path's plugin."""

    def __init__(self, fake_base_url: str, plugin: PluginProcess | None, daemon=None) -> None:
        self.fake_base_url = fake_base_url
        self.plugin = plugin
        self.daemon = daemon


# -- the fake server, in a process of its own ------------------------------------


class _FakeServerProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.address: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._out = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if not self.address.called and b"\n" in self._out:
            self.address.callback(self._out.split(b"\n", 1)[0].decode().strip())

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason) -> None:
        if not self.address.called:
            self.address.errback(RuntimeError(f"fake OpenAI server exited: {reason.value}"))
        self.ended.callback(None)


async def start_fake_server(reactor, workload: Workload):
    """Spawn ``serve-fake`` as a subprocess; (process protocol, base URL)."""
    process = _FakeServerProcess()
    argv = [
        sys.executable, os.path.abspath(__file__), "serve-fake",
        "--chunks", str(workload.chunks), "--interval-ms", str(workload.interval_ms),
    ]
    reactor.spawnProcess(process, sys.executable, argv, env=dict(os.environ))
    return process, await process.address


async def serve_fake(reactor, options) -> None:
    """Serve the fake OpenAI API; print its base URL on the first line; run until killed."""
    server = FakeOpenAIServer(reactor, chunk_count=options.chunks, interval=options.interval_ms / 1000.0, record=False)
    listening = listen(reactor, server)
    print(listening.base_url, flush=True)
    await Deferred()


# -- main ---------------------------------------------------------------------------


def describe(result: RunResult, workload: Workload, fake_cpu: float) -> str:
    """One line for one run (``fake_cpu``: the fake server's CPU seconds meanwhile)."""
    total = result.completed + result.errors
    line = (
        f"{result.path:<7} in_flight={workload.in_flight} chunks={workload.chunks} "
        f"interval={workload.interval_ms:g}ms invocations={total} cores={os.cpu_count()}: "
        f"{result.seconds * 1000 / max(total, 1):.1f} ms/op, {result.completed / result.seconds:.2f} streams/s, "
        f"plugin CPU {result.plugin_cpu:.1f} s ({result.plugin_cpu / result.seconds:.2f} cores, "
        f"{result.plugin_cpu * 1000 / max(result.chunks, 1):.2f} ms/chunk), "
        f"fake server CPU {fake_cpu / result.seconds:.2f} cores, "
        f"bench client CPU {result.client_cpu / result.seconds:.2f} cores, "
        + (f"daemon CPU {result.daemon_cpu / result.seconds:.2f} cores "
           f"({result.daemon_cpu * 1e6 / max(result.chunks, 1):.0f} us/chunk), "
           if result.daemon_cpu is not None else "")
        + f"chunks {result.chunks}/{total * workload.chunks}, errors {result.errors}"
    )
    if result.first_error:
        line += f" (first: {result.first_error})"
    return line


async def bench(reactor, options) -> None:
    workload = Workload(
        in_flight=options.in_flight,
        chunks=options.chunks,
        interval_ms=options.interval_ms,
        invocations=options.invocations or 4 * options.in_flight,
        model=options.model,
    )
    paths = [name.strip() for name in options.paths.split(",") if name.strip()]
    for name in paths:
        if name not in PATHS:
            raise SystemExit(f"unknown path {name!r}; known: {', '.join(PATHS)}")
    work_dir = options.work_dir or tempfile.mkdtemp(prefix="openai-workload-")
    fake, base_url = await start_fake_server(reactor, workload)
    plugin = None
    daemon = None
    try:
        if "direct" in paths:
            python = await prepare_plugin(reactor, os.path.join(work_dir, "langgenius-openai-0.0.19"))
            plugin = await start_plugin(reactor, python, os.path.join(work_dir, "langgenius-openai-0.0.19"))
            # Warm-up: the first calls import and connect lazily.
            warm = Workload(min(10, workload.in_flight), workload.chunks, workload.interval_ms, min(10, workload.in_flight))
            await run_direct(BenchContext(base_url, plugin), warm)
        if "daemon" in paths:
            daemon = await start_daemon(reactor, options.instances)
            warm = Workload(min(10, workload.in_flight), workload.chunks, workload.interval_ms, min(10, workload.in_flight))
            await run_daemon(BenchContext(base_url, None, daemon), warm)
        context = BenchContext(base_url, plugin, daemon)
        results: dict[str, list[RunResult]] = {name: [] for name in paths}
        for _ in range(options.rounds):
            for name in paths:
                fake_cpu = cpu_seconds(fake.transport.pid)
                result = await PATHS[name](context, workload)
                fake_cpu = cpu_seconds(fake.transport.pid) - fake_cpu
                results[name].append(result)
                print(describe(result, workload, fake_cpu), flush=True)
                await deferLater(reactor, 1.0, lambda: None)
        for name, runs in results.items():
            ms_per_op = statistics.median(r.seconds * 1000 / (r.completed + r.errors) for r in runs)
            streams = statistics.median(r.completed / r.seconds for r in runs)
            print(
                f"median  {name:<7} instances={options.instances if name == 'daemon' else 1} in_flight={workload.in_flight} chunks={workload.chunks} "
                f"interval={workload.interval_ms:g}ms invocations={workload.invocations} cores={os.cpu_count()} "
                f"runs={len(runs)}: {ms_per_op:.1f} ms/op, {streams:.2f} streams/s",
                flush=True,
            )
    finally:
        if daemon is not None:
            daemon.stop()
        if plugin is not None:
            await plugin.stop(reactor)
        try:
            fake.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            pass
        await fake.ended
        if not options.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=("bench", "serve-fake"))
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--invocations", type=int, default=0, help="per run (default: 4 x in-flight)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=1, help="PLUGIN_LOCAL_INSTANCES of the daemon path")
    parser.add_argument("--paths", default="direct", help="comma-separated, run interleaved: direct,daemon")
    parser.add_argument("--model", default="gpt-3.5-turbo")
    parser.add_argument("--work-dir", default=None, help="keep the unpacked plugin and its venv here")
    options = parser.parse_args()
    if options.mode == "serve-fake":
        react(lambda reactor: ensureDeferred(serve_fake(reactor, options)))
    else:
        react(lambda reactor: ensureDeferred(bench(reactor, options)))


if __name__ == "__main__":
    main()
