"""
Plugin supervision and shutdown end to end: a real SDK plugin in a real uv
venv under the real daemon -- a plugin stopped by SIGSTOP with calls in
flight, and ``twistd -n difydaemon`` stopped by SIGTERM with a stream open
(its plugin alive, or SIGSTOPped).
"""

from __future__ import annotations

import os
import signal
import sys

import orjson
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from treq import collect

from difydaemon import tap
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.proc import command_line, descendants
from difydaemon.testing.sdk import python312, test_uv_cache_dir
from difydaemon.testing.subreaper import is_running
from tests.test_end_to_end import TENANT, DaemonCase, _alive, sse_items
from tests.test_tap import environment, free_port

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the SDK reads a .env file in its working directory: a fast heartbeat, so
#: that a short PLUGIN_HEARTBEAT_TIMEOUT still spans several of them
FAST_HEARTBEAT = b"HEARTBEAT_INTERVAL=0.5\n"


def heartbeating_plugin_files() -> dict:
    """The misbehaving echo plugin, heartbeating every 0.5 s."""
    files = behaviour_plugin_files()
    files[".env"] = FAST_HEARTBEAT
    return files


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid`` if it is still there (test clean-up)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_error(items: list) -> tuple:
    """(code, error_type, message) of a stream's last item, with a PluginInvokeError unwrapped."""
    item = items[-1]
    outer = orjson.loads(item["message"])
    if outer["error_type"] == "PluginInvokeError":
        inner = orjson.loads(outer["message"])
        return item["code"], inner["error_type"], inner["message"]
    return item["code"], outer["error_type"], outer["message"]


async def until(predicate, what: str, attempts: int = 600) -> None:
    """Poll ``predicate`` every 0.1 s until it holds."""
    for _ in range(attempts):
        if predicate():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"never happened: {what}")


class HungPluginTests(DaemonCase):
    """A plugin that stops answering (SIGSTOP) is found by its missing heartbeats."""

    async def test_stopped_plugin_fails_its_calls_and_is_replaced(self):
        """
        A slow call that outlives the heartbeat timeout completes (the
        plugin still heartbeats); then with 20 calls
        in flight the plugin is SIGSTOPped: every caller gets an error item
        saying it is stopped, the process is killed, a new one replaces it
        and the next call succeeds.
        """
        await self._start(PLUGIN_HEARTBEAT_TIMEOUT="3")
        identifier = await self.install(heartbeating_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)

        items = sse_items(await self.tool("sleep", {"seconds": "5"}))
        self.assertEqual([i["data"]["message"]["text"] for i in items], ["sleeping", "woke up"])

        runtime = self.service.runtimes.get(identifier)
        [instance] = runtime.instances
        pid = instance.pid
        self.addCleanup(kill_quietly, pid)
        calls = [defer.ensureDeferred(self.tool("sleep", {"seconds": "120"})) for _ in range(20)]
        await until(lambda: len(instance.sessions) == 20, "20 sessions open")
        os.kill(pid, signal.SIGSTOP)

        bodies = await defer.gatherResults(calls)
        for body in bodies:
            code, error_type, message = last_error(sse_items(body))
            self.assertEqual((code, error_type), (-500, "ConnectionClosedError"), body)
            self.assertIn("its process is stopped (state T)", message)
        await until(lambda: not _alive(pid), f"hung plugin {pid} gone")

        body = await self.tool("echo", {"text": "again"})
        self.assertIn(b'"again"', body)
        self.assertNotIn(pid, [i.pid for i in self.service.runtimes.get(identifier).instances])


class RetryTests(DaemonCase):
    """A plugin that fails to start is retried, and comes back once its cause is fixed."""

    async def test_broken_plugin_says_why_and_comes_back_when_fixed(self):
        """
        After a restart the installed plugin cannot start (its main.py is
        gone): a call answers 500 with the plugin's own error; once the file
        is back, the next call brings it up and is served -- no reinstall,
        no restart.
        """
        await self._start()
        identifier = await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        main = os.path.join(self.service.runtimes.get(identifier).working_dir, "main.py")
        config = self.service.config
        await self.service.stopService()
        os.rename(main, main + ".away")
        self.service = tap.build_daemon(reactor, config)
        self.service.startService()
        await self.service.ready

        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": "echo",
                                       "tool_parameters": {"text": "x"}, "credentials": {}}},
            {"X-Plugin-ID": "acme/echo"},
        )
        self.assertEqual(code, 500, body)
        error = orjson.loads(orjson.loads(body)["message"])
        self.assertTrue(error["message"].startswith("failed to get plugin runtime: "), error)
        self.assertIn("No module named main", error["message"])
        self.assertEqual(self.service.runtimes.status(identifier).state, "backing_off")

        os.rename(main + ".away", main)
        self.assertIn(b'"fixed"', await self.tool("echo", {"text": "fixed"}))
        self.assertEqual(self.service.runtimes.status(identifier).state, "running")


class _Watch(ProcessProtocol):
    """Collects a child's output and fires ``ended`` with (exit code, signal)."""

    def __init__(self) -> None:
        self.output = b""
        #: stdout alone
        self.stdout = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.stdout += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class TwistdCase(DaemonCase):
    """A daemon run as ``twistd -n difydaemon`` in a child process."""

    async def _start_twistd(self, grace: str | None = "2", **extra_environ) -> None:
        """Start it (``grace``: SHUTDOWN_GRACE_PERIOD, None for the default; ``extra_environ`` adds variables) and wait until its health check answers."""
        workdir = self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "cwd"))
        os.symlink(test_uv_cache_dir(), os.path.join(workdir, "cwd", ".uv-cache"))
        self.port = free_port()
        env = dict(os.environ)
        env.update(environment(workdir, self.port))
        env.update(
            {
                "FORCE_VERIFYING_SIGNATURE": "false",
                "PYTHON_INTERPRETER_PATH": python312(),
                "PLUGIN_MAX_EXECUTION_TIMEOUT": "120",
                "PYTHON_ENV_INIT_TIMEOUT": "60",
                # these tests are not about hung plugins
                "PLUGIN_HEARTBEAT_TIMEOUT": "600",
                # the repository only: the plugins inherit it, and the
                # daemon's own stdlib on their path breaks their Python 3.12
                "PYTHONPATH": REPOSITORY,
            }
        )
        if grace is not None:
            env["SHUTDOWN_GRACE_PERIOD"] = grace
        else:
            env.pop("SHUTDOWN_GRACE_PERIOD", None)
        env.update(extra_environ)
        self.watch = _Watch()
        self.daemon = reactor.spawnProcess(
            self.watch,
            sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "difydaemon"],
            env=env,
            path=workdir,
        )
        self.addCleanup(self._kill_daemon)
        from difydaemon.testing.http import http_client

        self.http = http_client(self, reactor)
        for _ in range(300):
            try:
                code, _ = await self.call("GET", "/health/check")
                if code == 200:
                    return
            except Exception:
                pass
            await task.deferLater(reactor, 0.1, lambda: None)
        self.fail("the daemon did not start:\n" + self.watch.output.decode(errors="replace"))

    async def _kill_daemon(self) -> None:
        if not self.watch.ended.called:
            self.daemon.signalProcess("KILL")
            await self.watch.ended



class TwistdShutdownTests(TwistdCase):
    """``twistd -n difydaemon`` stopped by SIGTERM while a plugin stream is open."""

    async def _open_stream(self, tool: str = "sleep", parameters=None):
        """Start a call (a 120 s sleep); (the response, once its first item came; its whole body)."""
        response = await self.http.request(
            "POST",
            self.url(f"/plugin/{TENANT}/dispatch/tool/invoke"),
            data=orjson.dumps(
                {"user_id": "u1", "data": {"provider": "echo", "tool": tool,
                                           "tool_parameters": parameters or {"seconds": "120"}, "credentials": {}}}
            ),
            headers={"X-Api-Key": "tap-test-key", "X-Plugin-ID": "acme/echo", "Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        done = collect(response, chunks.append)
        return chunks, done

    async def _text_of(self, tool: str) -> str:
        """The text a one-item tool call answers."""
        chunks, done = await self._open_stream(tool, {})
        await done
        return sse_items(b"".join(chunks))[0]["data"]["message"]["text"]

    async def _shutdown_with_open_stream(self, stop_plugin: bool, grace: str | None = "2", stubborn: bool = False) -> None:
        await self._start_twistd(grace)
        await self.install(heartbeating_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        # a fresh install byte-compiles in the background: only plugins are wanted here
        await until(
            lambda: not any(b"compileall" in command_line(pid) for pid in descendants(self.daemon.pid)),
            "the background compilation's end",
        )
        plugins = descendants(self.daemon.pid)
        self.assertTrue(plugins)
        for pid in plugins:
            self.addCleanup(kill_quietly, pid)
        if stubborn:
            # the plugin ignores TERM and leaves a TERM-ignoring grandchild
            # outside the daemon's tree: only its process group holds it
            await self._text_of("ignore_term")
            orphan = int(await self._text_of("orphan"))
            self.addCleanup(kill_quietly, orphan)
            self.assertNotIn(orphan, descendants(self.daemon.pid))
            plugins.add(orphan)
        chunks, done = await self._open_stream()
        await until(lambda: b"sleeping" in b"".join(chunks), "the stream's first item")
        if stop_plugin:
            for pid in plugins:
                os.kill(pid, signal.SIGSTOP)
        self.daemon.signalProcess("TERM")
        await done
        items = sse_items(b"".join(chunks))
        self.assertEqual(items[0]["data"]["message"]["text"], "sleeping")
        self.assertEqual(
            last_error(items), (-500, "PluginDaemonInternalServerError", "the plugin daemon is shutting down")
        )
        code, sig = await self.watch.ended
        output = self.watch.output.decode(errors="replace")
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn("Server Shut Down.", output)
        for pid in plugins:
            # a killed orphan is reaped by init, maybe a moment later
            await until(lambda: not is_running(pid), f"plugin process {pid} gone after the daemon")

    async def test_open_stream_ends_with_an_error_item(self):
        """SIGTERM: the open stream gets a final -500 'shutting down' item, the daemon exits, no plugin remains."""
        await self._shutdown_with_open_stream(stop_plugin=False)

    async def test_stopped_plugin_does_not_hold_the_daemon(self):
        """With its plugin SIGSTOPped, the daemon still ends the stream with the item, KILLs it and exits."""
        await self._shutdown_with_open_stream(stop_plugin=True)

    async def test_default_budget_with_a_stubborn_stopped_plugin(self):
        """With the default grace, a SIGSTOPped plugin that ignores TERM and left a grandchild: item, exit, nothing left."""
        await self._shutdown_with_open_stream(stop_plugin=True, grace=None, stubborn=True)
