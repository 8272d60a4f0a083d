"""
The connector end to end: ``dify-sri`` on the real reactor on loopback,
real SDK packages built in real uv venvs (sharing the test run's uv cache
and prepared venvs, so only the first launch builds), functions called
directly over HTTP; and ``twistd -n dify-sri`` as a subprocess.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.utils import getProcessOutput
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from treq.client import HTTPClient

from difydaemon.sri.launcher import FUNCTIONS_DIR, free_port
from difydaemon.sri.tap import Options, makeService
from difydaemon.testing import sri_client as sri
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.http import http_client
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.sdk import python312, test_uv_cache_dir
from difydaemon.testing.subreaper import children_of, is_running, subreaper_argv
from tests.cli.helpers import REPOSITORY
from tests.runtimes.test_official_plugins import prepared_venvs_dir
from tests.test_plugin_processes_end_to_end import GRACE, _Watch

KEY = "sri-end-to-end-key"
ECHO = build_package(echo_plugin_files())
ECHO_FILENAME = sri.package_filename(ECHO)


def connector_environment(working: str, port: int, **extra) -> dict:
    """The connector's environment: loopback, the test's uv cache and prepared venvs, the machine's Python 3.12."""
    os.makedirs(working, exist_ok=True)
    os.symlink(test_uv_cache_dir(), os.path.join(working, ".uv-cache"))
    os.symlink(prepared_venvs_dir(), os.path.join(working, ".prepared-venvs"))
    # the machine's environment (proxies, CA bundles, uv settings), as an operator's
    environ = dict(os.environ)
    environ.update({
        "SRI_API_KEY": KEY,
        "SRI_HOST": "127.0.0.1",
        "SRI_PORT": str(port),
        "SRI_WORKING_PATH": working,
        "SRI_DAEMON_URL": "http://127.0.0.1:9",
        "PYTHON_INTERPRETER_PATH": python312(),
        "PIP_VERBOSE": "false",
    })
    environ.update(extra)
    return environ


class ConnectorCase(AsyncTestCase):
    """A connector in this process, and an HTTP client for it and its functions."""

    timeout = 300

    def setUp(self):
        self.http = http_client(self, reactor)

    def start(self, **extra) -> None:
        self.working = os.path.abspath(self.mktemp())
        self.port = free_port("127.0.0.1", set())
        self.environ = connector_environment(self.working, self.port, **extra)
        self.restart()

    def restart(self) -> None:
        """Start a connector on the test's working path and port (again)."""
        options = Options()
        options.parseOptions(["--env-file", os.path.join(self.working, "missing.env")])
        self.service = makeService(options, reactor, self.environ)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def launch(self, package: bytes = ECHO, filename: str = ECHO_FILENAME, key: str = KEY) -> list[dict]:
        content_type, body = sri.launch_form(package, filename)
        response = await self.http.post(
            self.url("/v1/launch"), data=body, headers={"Authorization": key, "Content-Type": content_type}
        )
        self.assertEqual(response.code, 200)
        return sri.launch_events(await response.content())

    async def instances(self, filename: str = ECHO_FILENAME) -> dict:
        response = await self.http.get(
            self.url("/v1/runner/instances"), params={"filename": filename}, headers={"Authorization": KEY}
        )
        return await response.json()

    async def invoke(self, endpoint: str, text: str) -> list[dict]:
        response = await self.http.post(
            endpoint + "/invoke", data=sri.tool_invoke("s-" + text, text), headers={"Content-Type": "application/json"}
        )
        self.assertEqual(response.code, 200)
        return sri.invoke_events(await response.content())

    def assert_echoed(self, events: list[dict], text: str) -> None:
        messages = [event["data"] for event in events if event["event"] == "session" and event["data"]["type"] == "stream"]
        texts = [message["data"]["message"].get("text") for message in messages]
        self.assertIn(text, texts, events)
        self.assertEqual(events[-1]["data"]["type"], "end", events)

    async def until(self, condition, what: str, seconds: float = 60.0) -> None:
        for _ in range(int(seconds / 0.05)):
            if condition():
                return
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"not within {seconds} s: {what}")


class LaunchAndInvokeTests(ConnectorCase):
    """The echo package launched once per test and called directly."""

    async def test_launch_invoke_relaunch_remove(self):
        """Launch streams build progress and the function URL; /invoke answers; a relaunch reuses; remove stops it."""
        self.start()
        events = await self.launch()
        self.assertEqual([e["Stage"] for e in events][-2:], ["run", "end"], events)
        self.assertEqual(events[-1]["State"], "success")
        self.assertIn("build", [e["Stage"] for e in events])
        function = sri.announced(events)
        self.assertTrue(function["endpoint"].startswith("http://127.0.0.1:"), function)
        self.assert_echoed(await self.invoke(function["endpoint"], "hello sri"), "hello sri")

        [item] = (await self.instances())["Items"]
        self.assertEqual((item["Name"], item["Endpoint"], item["Status"]["State"]), (function["name"], function["endpoint"], "running"))

        again = sri.announced(await self.launch())
        self.assertEqual(again, function)
        self.assertEqual(len(self.service.table), 1)

        pid = self.service.table.get(ECHO_FILENAME).pid
        response = await self.http.delete(
            self.url("/v1/runner/instances"), params={"filename": ECHO_FILENAME}, headers={"Authorization": KEY}
        )
        self.assertEqual(await response.json(), {"error": "", "removed": True})
        self.assertEqual((await self.instances())["Items"], [])
        self.assertFalse(is_running(pid))
        self.assertFalse(os.path.exists(os.path.join(self.working, FUNCTIONS_DIR, "acme")) and os.listdir(os.path.join(self.working, FUNCTIONS_DIR, "acme")))

    async def test_function_server_gets_no_delay(self):
        """In a launched function's venv and environment, the SDK's gevent server is patched to set TCP_NODELAY."""
        self.start()
        await self.launch()
        spec = self.service.table.get(ECHO_FILENAME).spec
        output = await getProcessOutput(
            spec.argv[0],
            ["-c", "import gevent.pywsgi; print(gevent.pywsgi.WSGIServer.handle.__name__)"],
            env=dict(spec.env),
            path=spec.path,
        )
        self.assertEqual(output.strip(), b"handle_with_no_delay")

    async def test_killed_function_restarted(self):
        """A function killed with SIGKILL is restarted on the same URL and answers again."""
        self.start()
        function = sri.announced(await self.launch())
        running = self.service.table.get(ECHO_FILENAME)
        first_pid = running.pid
        os.kill(first_pid, signal.SIGKILL)
        await self.until(lambda: running.restarts == 1 and running.state == "running", "the function is back")
        self.assertNotEqual(running.pid, first_pid)
        self.assert_echoed(await self.invoke(function["endpoint"], "after restart"), "after restart")

    async def test_functions_come_back_with_the_connector(self):
        """A connector stopped and started again brings its function back on the same URL."""
        self.start()
        function = sri.announced(await self.launch())
        first_pid = self.service.table.get(ECHO_FILENAME).pid
        await self.service.stopService()
        self.assertFalse(is_running(first_pid))
        self.restart()
        self.assertEqual(await self.service.restored, 1)
        [item] = (await self.instances())["Items"]
        self.assertEqual(item["Endpoint"], function["endpoint"])
        self.assert_echoed(await self.invoke(function["endpoint"], "restored"), "restored")

    async def test_stop_closes_keep_alive_connections(self):
        """A stopped connector closes a client's keep-alive connection: a later call is not served on it."""
        self.start()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        keep_alive = HTTPClient(Agent(reactor, pool=pool))
        response = await keep_alive.post(self.url("/ping"), headers={"Authorization": KEY})
        self.assertEqual(await response.content(), b'"pong"')
        await self.service.stopService()
        with self.assertRaises((ConnectionRefusedError, ResponseNeverReceived)):
            await keep_alive.post(self.url("/ping"), headers={"Authorization": KEY})

    async def test_wrong_key_refused(self):
        """Ping with the key answers "pong"; without it, or with another, 401."""
        self.start()
        response = await self.http.post(self.url("/ping"), headers={"Authorization": KEY})
        self.assertEqual(await response.content(), b'"pong"')
        for headers in ({}, {"Authorization": "Bearer " + KEY}, {"Authorization": "wrong"}):
            response = await self.http.post(self.url("/ping"), headers=headers)
            await response.content()
            self.assertEqual(response.code, 401)
        content_type, body = sri.launch_form(ECHO, ECHO_FILENAME)
        response = await self.http.post(
            self.url("/v1/launch"), data=body, headers={"Authorization": "wrong", "Content-Type": content_type}
        )
        await response.content()
        self.assertEqual(response.code, 401)
        self.assertEqual(len(self.service.table), 0)


class LaunchFailureTests(ConnectorCase):
    """Launches that fail: the stream says why, ends with a failed event, and nothing is left."""

    def assert_nothing_left(self) -> None:
        functions = os.path.join(self.working, FUNCTIONS_DIR)
        left = [os.path.join(d, f) for d, _, files in os.walk(functions) for f in files]
        self.assertEqual(left, [])
        self.assertEqual(len(self.service.table), 0)

    async def test_build_fails(self):
        """A package whose dependencies cannot be installed: the builder's error is the stream's failed message."""
        self.start()
        package = build_package(echo_plugin_files(name="broken", extra_requirements=("/nonexistent/missing-1.0-py3-none-any.whl",)))
        events = await self.launch(package, sri.package_filename(package, name="broken"))
        self.assertEqual((events[-1]["Stage"], events[-1]["State"]), ("build", "failed"), events)
        self.assertIn("missing-1.0-py3-none-any.whl", events[-1]["Message"])
        self.assertNotIn("end", [e["Stage"] for e in events])
        self.assert_nothing_left()

    async def test_function_never_listens(self):
        """A package whose main never serves HTTP fails the launch after the bounded wait; its process is gone."""
        self.start(SRI_FUNCTION_START_TIMEOUT="3")
        files = echo_plugin_files(name="silent")
        files["main.py"] = b"import time\ntime.sleep(600)\n"
        package = build_package(files)
        pids_before = set(children_of(os.getpid()))
        events = await self.launch(package, sri.package_filename(package, name="silent"))
        self.assertEqual((events[-1]["Stage"], events[-1]["State"]), ("run", "failed"), events)
        self.assertIn("did not answer GET /health within 3 s", events[-1]["Message"])
        await self.until(lambda: set(children_of(os.getpid())) <= pids_before, "the silent function is gone", GRACE)
        self.assert_nothing_left()


class TwistdTests(AsyncTestCase):
    """``twistd -n dify-sri`` as a process."""

    timeout = 300

    def spawn(self, environ: dict, subreaper: bool = True) -> _Watch:
        env = dict(environ)
        # twistd finds the dify-sri plugin through the checkout's twisted/plugins
        env["PYTHONPATH"] = REPOSITORY
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir, exist_ok=True)
        self.pidfile = os.path.join(workdir, "twistd.pid")
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", f"--pidfile={self.pidfile}", "dify-sri"]
        watch = _Watch()
        argv = subreaper_argv(twistd) if subreaper else twistd
        reactor.spawnProcess(watch, sys.executable, argv, env=env, path=workdir)
        return watch

    async def test_refuses_to_start_without_key(self):
        """Without SRI_API_KEY, twistd dify-sri exits non-zero and says which variable is missing."""
        watch = self.spawn({"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}, subreaper=False)
        ended = await watch.ended
        self.assertNotEqual(getattr(ended, "exitCode", 0), 0)
        self.assertIn(b"SRI_API_KEY", watch.output)

    async def launched_under_twistd(self) -> tuple[_Watch, int, int]:
        """Start twistd dify-sri and launch the echo package: (watch, connector pid, function pid)."""
        working = os.path.abspath(self.mktemp())
        port = free_port("127.0.0.1", set())
        watch = self.spawn(connector_environment(working, port))
        self.addCleanup(self.end, watch)
        http = http_client(self, reactor)
        events = None
        for _ in range(600):
            if watch.ended.called:
                self.fail(f"twistd ended: {watch.output!r}")
            try:
                content_type, body = sri.launch_form(ECHO, ECHO_FILENAME)
                response = await http.post(
                    f"http://127.0.0.1:{port}/v1/launch",
                    data=body,
                    headers={"Authorization": KEY, "Content-Type": content_type},
                )
                events = sri.launch_events(await response.content())
                break
            except Exception:
                await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(events[-1]["Stage"], "end", events)
        with open(self.pidfile) as f:
            connector_pid = int(f.read())
        functions = children_of(connector_pid)
        self.assertEqual(len(functions), 1, functions)
        return watch, connector_pid, functions[0]

    async def end(self, watch: _Watch) -> None:
        """Make sure the subreaper (and all under it) has ended."""
        if not watch.ended.called:
            with open(self.pidfile) as f:
                pid = int(f.read())
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
            await watch.ended

    async def test_sigterm_stops_functions(self):
        """SIGTERM to a connector with a running function stops the function, then the connector."""
        watch, connector_pid, function_pid = await self.launched_under_twistd()
        os.kill(connector_pid, signal.SIGTERM)
        await watch.ended
        self.assertFalse(is_running(function_pid))
        self.assertIn(b"1 functions stopped", watch.output)

    async def test_sigkill_takes_functions_along(self):
        """A connector killed with SIGKILL leaves no function running (the parent-death signal)."""
        watch, connector_pid, function_pid = await self.launched_under_twistd()
        os.kill(connector_pid, signal.SIGKILL)
        for _ in range(int(GRACE / 0.05)):
            if not is_running(function_pid):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(is_running(function_pid))
        await watch.ended
