"""
Hosting many plugins end to end: a real SDK plugin in a real uv venv under
the real daemon, stopped when idle and started again by a burst of calls,
left idle by a restart until its first call, and killed when it goes over
the memory its manifest declares.
"""

from __future__ import annotations

import os

from twisted.internet import defer

from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.proc import command_line, descendants
from tests.packaging.fixtures import AGENT, fixture_bytes
from tests.test_end_to_end import DaemonCase, _alive, sse_items
from tests.test_supervision_end_to_end import last_error, until


def plugin_processes() -> list[int]:
    """The processes below this test running a plugin (``-m main``)."""
    return [pid for pid in descendants(os.getpid()) if b"-m\0main" in command_line(pid)]


def texts(body: bytes) -> list:
    """What a tool call's stream said: each text, or each echoed JSON's ``echo``; an error item as itself."""
    said = []
    for item in sse_items(body):
        message = (item.get("data") or {}).get("message") or {}
        if "text" in message:
            said.append(message["text"])
        elif "json_object" in message:
            said.append(message["json_object"].get("echo"))
        else:
            said.append(item)
    return said


class IdleStopTests(DaemonCase):
    """PLUGIN_IDLE_TIMEOUT stops an unused plugin; the next calls start it again and none fails."""

    async def test_idle_plugin_stopped_then_burst_served(self):
        """
        After a second without calls the plugin's process is gone; then 20
        calls at once all succeed, served by one new process; then it goes
        idle again.
        """
        await self._start(PLUGIN_IDLE_TIMEOUT="1")
        identifier = await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        self.assertEqual(texts(await self.tool("echo", {"text": "first"})), ["first", "first"])
        [old] = self.service.runtimes.get(identifier).instances
        await until(lambda: self.service.runtimes.get(identifier) is None, "the idle plugin stopped")
        await until(lambda: not _alive(old.pid), f"idle plugin process {old.pid} gone")
        self.assertEqual(self.service.runtimes.status(identifier).state, "idle")

        bodies = await defer.gatherResults(
            [defer.ensureDeferred(self.tool("echo", {"text": f"call-{n}"})) for n in range(20)]
        )
        for number, body in enumerate(bodies):
            self.assertEqual(texts(body), [f"call-{number}"] * 2, body)
        [new] = self.service.runtimes.get(identifier).instances
        self.assertNotEqual(new.pid, old.pid)
        await until(lambda: self.service.runtimes.get(identifier) is None, "idle again")


class RestoreIdleTests(DaemonCase):
    """With idle stop on, a restarted daemon starts an installed plugin only for its first call."""

    async def test_restart_leaves_plugin_idle_until_called(self):
        """
        After a restart with PLUGIN_IDLE_TIMEOUT the installed plugin is
        idle with no process; its first call starts it and is answered.
        """
        environ = self.daemon_environment(PLUGIN_IDLE_TIMEOUT="60")
        await self._boot(environ)
        identifier = await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        [old] = self.service.runtimes.get(identifier).instances
        await self.service.stopService()
        self.assertFalse(_alive(old.pid), f"plugin process {old.pid} outlived the daemon")

        await self._boot(environ)
        await until(lambda: self.service.runtimes.status(identifier) is not None, "the installed plugin restored")
        self.assertEqual(self.service.runtimes.status(identifier).state, "idle")
        self.assertIsNone(self.service.runtimes.get(identifier))
        self.assertEqual(plugin_processes(), [])

        self.assertEqual(texts(await self.tool("echo", {"text": "woken"})), ["woken", "woken"])
        [new] = self.service.runtimes.get(identifier).instances
        self.assertEqual(plugin_processes(), [new.pid])


class MemoryLimitTests(DaemonCase):
    """A plugin going over its manifest's resource.memory is killed and its caller told so."""

    async def test_allocation_past_the_limit_kills_and_is_reported(self):
        """
        Allocating 600 MiB in a plugin whose manifest declares 256 MiB:
        the call fails with "over its memory limit of 256 MB", the process
        is killed, and the next call is served by a new one.
        """
        await self._start()
        identifier = await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        self.assertEqual(texts(await self.tool("allocate", {"mb": "20"})), ["allocated"])
        [old] = self.service.runtimes.get(identifier).instances

        body = await self.tool("allocate", {"mb": "600"})
        code, error_type, message = last_error(sse_items(body))
        self.assertEqual((code, error_type), (-500, "ConnectionClosedError"), body)
        self.assertEqual(message, "plugin acme/echo was killed: over its memory limit of 256 MB")
        await until(lambda: not _alive(old.pid), f"plugin process {old.pid} killed")

        body = await self.tool("echo", {"text": "again"})
        self.assertEqual(texts(body), ["again", "again"])

    async def test_official_package_placeholder_memory_not_enforced(self):
        """
        The official agent package declares resource.memory 1048576: it
        installs and heartbeats under the daemon's launcher, with no limit
        (1 MiB of RLIMIT_DATA kept its Python from loading libpython).
        """
        await self._start()
        identifier = await self.install(fixture_bytes(AGENT))
        self.assertEqual(self.task["status"], "success", self.task)
        runtime = self.service.runtimes.get(identifier)
        self.assertIsNotNone(runtime.parent_death)
        self.assertIsNone(runtime.memory_limit)
        [instance] = runtime.instances
        self.assertTrue(_alive(instance.pid))
