"""
What plugin processes inherit, and that none outlives the daemon: a real
``twistd -n difydaemon`` in a subprocess, real SDK plugins in real uv venvs.

The daemon runs under a subreaper (:mod:`difydaemon.testing.subreaper`), as
under systemd or ``tini -s``: a plugin orphaned there is not re-parented to
PID 1, so the SDK's own check for PID 1 cannot end it.
"""

from __future__ import annotations

import json
import os
import stat
import signal
import socket
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol

from difydaemon.runtimes.child_environment import is_allowed
from difydaemon.testing.http import http_client
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.subreaper import children_of, command_line, is_running, parent_pid, subreaper_argv
from tests.cli.helpers import REPOSITORY
from tests.test_end_to_end import DaemonCase, sse_items

#: Seconds a process gets to end or to appear; the kernel needs far less.
GRACE = 10.0

#: Secrets in the daemon's environment (its own SERVER_KEY and DIFY_INNER_API_KEY come on top).
SECRETS = {
    "DB_PASSWORD": "db-password-value",
    "REDIS_PASSWORD": "redis-password-value",
    "AWS_SECRET_KEY": "aws-secret-key-value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-value",
    "FOO_SECRET": "foo-secret-value",
    "ADMIN_API_KEY": "admin-api-key-value",
}

#: What the daemon's .env holds: one variable the operator lists, one secret.
DOTENV = "ACME_FROM_DOTENV=from-dotenv\nDOTENV_SECRET=dotenv-secret-value\n"

PROXY = "http://proxy.invalid:3128"


class _Watch(ProcessProtocol):
    """Keeps a process's output and fires ``ended`` with how it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output = (self.output + data)[-65536:]

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)


class TwistdCase(DaemonCase):
    """``twistd -n difydaemon`` under a subreaper, with DaemonCase's HTTP helpers."""

    async def start_twistd(self, **extra_environ) -> None:
        """Start the daemon with the test's environment, ``extra_environ`` and :data:`DOTENV`; wait until it answers."""
        env = dict(os.environ)
        env.update(self.daemon_environment(**extra_environ))
        # twistd finds the difydaemon plugin through the checkout's twisted/plugins
        env["PYTHONPATH"] = REPOSITORY
        self.daemon_env = env
        with open(os.path.join(self.workdir, ".env"), "w") as dotenv:
            dotenv.write(DOTENV)
        pidfile = os.path.join(self.workdir, "twistd.pid")
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                  "-n", f"--pidfile={pidfile}", "difydaemon"]
        self.watch = _Watch()
        self.watched: list[int] = []
        reactor.spawnProcess(self.watch, sys.executable, subreaper_argv(twistd), env=env, path=self.workdir)
        self.addCleanup(self.end_tree)
        self.http = http_client(self, reactor)
        for _ in range(600):
            if self.watch.ended.called:
                self.fail(f"twistd ended: {self.output()}")
            try:
                response = await self.http.get(self.url("/health/check"))
                await response.content()
                break
            except Exception:
                await task.deferLater(reactor, 0.1, lambda: None)
        with open(pidfile) as f:
            self.daemon_pid = int(f.read())

    def output(self) -> str:
        return self.watch.output.decode("utf-8", "replace")

    async def end_tree(self) -> None:
        """Stop the daemon if it still runs, kill what outlived it, and wait for the subreaper."""
        if is_running(self.daemon_pid):
            os.kill(self.daemon_pid, signal.SIGTERM)
        if not await self.ended_within(GRACE):
            for pid in self.watched:
                if is_running(pid):
                    os.kill(pid, signal.SIGKILL)
            await self.watch.ended

    async def ended_within(self, seconds: float) -> bool:
        """Whether the subreaper (and so every process under it) ends within ``seconds``."""
        for _ in range(int(seconds / 0.05)):
            if self.watch.ended.called:
                return True
            await task.deferLater(reactor, 0.05, lambda: None)
        return self.watch.ended.called

    async def wait_gone(self, pid: int) -> bool:
        """Whether ``pid`` has ended within :data:`GRACE` seconds."""
        for _ in range(int(GRACE / 0.05)):
            if not is_running(pid):
                return True
            await task.deferLater(reactor, 0.05, lambda: None)
        return not is_running(pid)

    async def tool_json(self, tool: str, parameters: dict) -> dict:
        """The JSON object of a tool's single json message."""
        [item] = sse_items(await self.tool(tool, parameters))
        self.assertEqual(item["code"], 0, item)
        return item["data"]["message"]["json_object"]

    async def tool_text(self, tool: str, parameters: dict) -> str:
        """The text of a tool's single text message."""
        [item] = sse_items(await self.tool(tool, parameters))
        self.assertEqual(item["code"], 0, item)
        return item["data"]["message"]["text"]


class PluginEnvironmentTests(TwistdCase):
    """A plugin process sees the allow-list, never the daemon's secrets."""

    async def test_plugin_sees_no_daemon_secret(self):
        """A plugin dumping os.environ finds no secret, no PYTHON*; PATH, its own 0700 HOME, proxies and listed variables are there."""
        await self.start_twistd(
            **SECRETS,
            HTTP_PROXY=PROXY,
            no_proxy="localhost,127.0.0.1",
            PLUGIN_ENV_PASSTHROUGH="ACME_SETTING,ACME_FROM_DOTENV",
            ACME_SETTING="visible",
        )
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        dump = await self.tool_json("environ", {})
        environ = dump["environ"]
        self.watched.append(dump["pid"])

        self.assertEqual(parent_pid(dump["pid"]), self.daemon_pid)
        hidden = [*SECRETS, "SERVER_KEY", "DIFY_INNER_API_KEY", "DOTENV_SECRET", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE"]
        self.assertEqual([name for name in hidden if name in environ], [])
        text = json.dumps(environ)
        for value in [*SECRETS.values(), self.daemon_env["SERVER_KEY"], "dotenv-secret-value"]:
            self.assertNotIn(value, text)
        # HOME is the plugins' own, not the operator's
        self.assertEqual(environ.get("PATH"), self.daemon_env["PATH"])
        self.assertNotEqual(self.daemon_env["HOME"], environ.get("HOME"))
        self.assertEqual(os.path.basename(environ.get("HOME")), ".plugin-home")
        self.assertEqual(stat.S_IMODE(os.stat(environ["HOME"]).st_mode), 0o700)
        self.assertEqual(
            {name: environ.get(name) for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")},
            {"HTTP_PROXY": PROXY, "http_proxy": PROXY, "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"},
        )
        self.assertEqual(
            (environ.get("ACME_SETTING"), environ.get("ACME_FROM_DOTENV"), environ.get("INSTALL_METHOD")),
            ("visible", "from-dotenv", "local"),
        )
        listed = {"ACME_SETTING", "ACME_FROM_DOTENV", "INSTALL_METHOD"}
        self.assertEqual(sorted(name for name in environ if not is_allowed(name) and name not in listed), [])


class DaemonKilledTests(TwistdCase):
    """No plugin process or build step outlives a SIGKILLed daemon."""

    async def test_plugins_die_with_daemon(self):
        """SIGKILL of the daemon ends both instances of a plugin, each ignoring SIGTERM, and nothing is left."""
        await self.start_twistd(PLUGIN_LOCAL_INSTANCES="2")
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        # dispatch goes round-robin over the instances that are ready: call until both answered
        pids: set[int] = set()
        for _ in range(int(6 * GRACE / 0.1)):
            pids.add(int(await self.tool_text("ignore_term", {})))
            if len(pids) == 2:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.watched.extend(pids)
        self.assertEqual(len(pids), 2)
        self.assertEqual({parent_pid(pid) for pid in pids}, {self.daemon_pid})

        os.kill(self.daemon_pid, signal.SIGKILL)
        for pid in pids:
            self.assertTrue(await self.wait_gone(pid), f"plugin process {pid} outlived the daemon")
        self.assertTrue(await self.ended_within(GRACE), f"processes outlived the daemon: {self.output()}")

    async def test_uv_step_dies_with_daemon(self):
        """SIGKILL of the daemon during a dependency install ends the uv process, and nothing is left."""
        index = socket.socket()
        self.addCleanup(index.close)
        index.bind(("127.0.0.1", 0))
        index.listen(16)  # connections are accepted by the kernel and never answered
        # no first try from uv's cache, which ends at once: the install waits on the index
        await self.start_twistd(
            PIP_MIRROR_URL=f"http://127.0.0.1:{index.getsockname()[1]}/simple", PIP_PREFER_OFFLINE="false"
        )
        await self.start_install(behaviour_plugin_files())

        uv = None
        for _ in range(int(6 * GRACE / 0.1)):
            installs = [pid for pid in children_of(self.daemon_pid) if command_line(pid)[1:3] == ["pip", "install"]]
            if installs:
                [uv] = installs
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.assertIsNotNone(uv, f"no uv pip install under the daemon: {self.output()}")
        self.watched.append(uv)

        os.kill(self.daemon_pid, signal.SIGKILL)
        self.assertTrue(await self.wait_gone(uv), f"uv process {uv} outlived the daemon")
        self.assertTrue(await self.ended_within(GRACE), f"processes outlived the daemon: {self.output()}")
