"""
Echo round trip through the debug runtime (``performance.md``: debug
runtime echo, one in flight, p50 <= 2 ms).

The real SDK echo plugin runs in remote mode against three debug listeners
in this process: the daemon's (TCP_NODELAY and TCP_QUICKACK), one with
TCP_NODELAY only, and a naive one with neither.  Sessions are opened on the
registered DebugRuntime exactly as dispatch opens them, one in flight,
rounds interleaved (A B C A B C ...).  One line per workload.

Usage::

    .venv/bin/python bench/debug_latency.py [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import react
from zope.interface import implementer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from difydaemon.interfaces import ISessionListener  # noqa: E402
from difydaemon.management.debugging import DebuggingKeys  # noqa: E402
from difydaemon.management.installations import InstallationCache  # noqa: E402
from difydaemon.persistence.memory import MemoryPersistence  # noqa: E402
from difydaemon.runtimes.debug import DebugServerFactory  # noqa: E402
from difydaemon.runtimes.registry import RuntimeRegistry  # noqa: E402
from difydaemon.storage.memory import MemoryObjectStorage  # noqa: E402
from difydaemon.testing import sdk  # noqa: E402
from difydaemon.testing.packages import echo_plugin_files, write_files  # noqa: E402

VARIANTS = (
    ("daemon (nodelay+quickack)", True, True),
    ("nodelay only", True, False),
    ("naive (neither)", False, False),
)


@implementer(ISessionListener)
class _Timed:
    def __init__(self) -> None:
        self.done: Deferred = Deferred()

    def stream(self, chunk, raw):
        pass

    def invoke(self, request):
        pass

    def end(self):
        self.done.callback(time.perf_counter())

    def error(self, error_type, message, args):
        self.done.errback(RuntimeError(f"{error_type}: {message}"))


class _Plugin(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)


def _request(session_id: str) -> dict:
    return {
        "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
        "endpoint_id": None, "context": None, "event": "request",
        "data": {
            "action": "invoke_tool", "credential_type": "api-key", "credentials": {}, "provider": "echo",
            "tool": "echo", "tool_parameters": {"text": "hi"}, "type": "tool", "user_id": "u1",
        },
    }


def _sleep(reactor, seconds):
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _main(reactor, calls: int, rounds: int) -> None:
    working_dir = write_files(tempfile.mkdtemp(prefix="debug-bench-"), echo_plugin_files())
    python = await sdk.environment_builder(reactor).build(working_dir, "3.12", lambda message: None)

    tenants = {}
    processes = []
    try:
        for index, (name, no_delay, quick_ack) in enumerate(VARIANTS):
            tenant = f"00000000-0000-4000-8000-00000000000{index}"
            persistence = MemoryPersistence(reactor)
            registry = RuntimeRegistry(reactor)
            keys = DebuggingKeys(reactor, persistence)
            key = await keys.key_for(tenant)
            factory = DebugServerFactory(
                reactor, keys, persistence, MemoryObjectStorage(), registry,
                InstallationCache(reactor, persistence), no_delay=no_delay, quick_ack=quick_ack,
            )
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            env = dict(
                os.environ, INSTALL_METHOD="remote", REMOTE_INSTALL_URL=f"127.0.0.1:{port.getHost().port}",
                REMOTE_INSTALL_KEY=key,
            )
            plugin = _Plugin()
            process = reactor.spawnProcess(plugin, python, [python, "-m", "main"], env=env, path=working_dir)
            processes.append((process, plugin))
            tenants[name] = (persistence, registry, tenant)

        runtimes = {}
        for name, (persistence, registry, tenant) in tenants.items():
            for _ in range(600):
                installation = await persistence.get_installation(tenant, "acme/echo")
                runtime = installation and registry.get(installation.plugin_unique_identifier)
                if runtime:
                    runtimes[name] = runtime
                    break
                await _sleep(reactor, 0.05)
            else:
                raise RuntimeError(f"{name}: the plugin never registered")

        samples = {name: [] for name in runtimes}
        counter = 0
        for _ in range(rounds):
            for name, runtime in runtimes.items():
                for call in range(calls):
                    counter += 1
                    listener = _Timed()
                    session_id = f"bench-{counter}"
                    started = time.perf_counter()
                    runtime.open_session(session_id, _request(session_id), listener)
                    finished = await listener.done
                    if call >= 3:  # warm-up of each round
                        samples[name].append((finished - started) * 1000.0)
        cores = os.cpu_count()
        for name, values in samples.items():
            print(
                f"debug echo, one in flight, {name}: p50 {_percentile(values, 0.5):.2f} ms,"
                f" p99 {_percentile(values, 0.99):.2f} ms, n={len(values)}, cores={cores}"
            )
    finally:
        for process, plugin in processes:
            try:
                process.signalProcess(signal.SIGKILL)
            except ProcessExitedAlready:
                pass
            await plugin.ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    options = parser.parse_args()
    react(lambda reactor: ensureDeferred(_main(reactor, options.calls, options.rounds)))


if __name__ == "__main__":
    main()
