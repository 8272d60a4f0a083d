"""
Three replicas sharing the machine's real PostgreSQL (a database of their
own), a Redis (the shared one under a key prefix of their own, or a private
``redis-server`` the test stops) and one storage directory, on loopback,
with real SDK plugins in real uv venvs: any replica serves any request.

Replicas run in this process on the real reactor, except the one a test
kills with SIGKILL: that one is ``twistd -n difydaemon``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

import orjson
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.web.iweb import UNKNOWN_LENGTH

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.runtimes.environment.layout import working_dir_for
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.endpoint_plugin import endpoint_plugin_files
from difydaemon.testing.http import http_client
from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.proc import descendants
from difydaemon.testing.redis import private_redis, shared_redis_prefix
from difydaemon.testing.sdk import python312, test_uv_cache_dir
from tests.api.harness import encode_form
from tests.daemon_postgres import fresh_database
from tests.runtimes.test_debug import start_remote_plugin
from tests.test_end_to_end import TENANT, sse_items
from tests.test_endpoint_end_to_end import INNER_KEY
from tests.test_tap import KEY, environment, free_port

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class _Watch(ProcessProtocol):
    """A twistd replica's output, and its end."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = None

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-65536:]

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class Replica:
    """One replica: its variables, its base URL, and what runs it."""

    def __init__(self, name: str, environ: dict) -> None:
        self.name = name
        self.environ = environ
        self.port = int(environ["SERVER_PORT"])
        self.debug_port = int(environ["PLUGIN_REMOTE_INSTALLING_PORT"])
        self.service = None
        self.process = None
        self.watch = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class ClusterCase(AsyncTestCase):
    """Replicas of one cluster, with helpers to call them."""

    timeout = 400

    async def cluster(self, redis_port: int | None = None) -> None:
        """The shared database, Redis prefix and storage of this test's replicas."""
        self.shared = await fresh_database(self, "difydaemon_cluster_")
        self.shared["REDIS_HOST"] = "127.0.0.1"
        if redis_port is None:
            self.shared["REDIS_KEY_PREFIX"] = await shared_redis_prefix(self, reactor)
            self.shared["REDIS_PORT"] = "6379"
        else:
            self.shared["REDIS_PORT"] = str(redis_port)
        self.storage = os.path.abspath(self.mktemp())
        os.makedirs(self.storage)
        self.http = http_client(self, reactor)

    def replica(self, name: str) -> Replica:
        """A replica's variables: its own port, debug port and working directory."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "cwd"))
        os.symlink(test_uv_cache_dir(), os.path.join(workdir, "cwd", ".uv-cache"))
        environ = environment(workdir, free_port())
        environ.update(self.shared)
        environ.update(
            {
                "PLUGIN_STORAGE_LOCAL_ROOT": self.storage,
                "CLUSTER_ADVERTISE_HOST": "127.0.0.1",
                "FORCE_VERIFYING_SIGNATURE": "false",
                "PYTHON_INTERPRETER_PATH": python312(),
                "PLUGIN_MAX_EXECUTION_TIMEOUT": "60",
                "PYTHON_ENV_INIT_TIMEOUT": "60",
                "SHUTDOWN_GRACE_PERIOD": "1",
                "PLUGIN_REMOTE_INSTALLING_ENABLED": "true",
                "PLUGIN_REMOTE_INSTALLING_HOST": "127.0.0.1",
                "PLUGIN_REMOTE_INSTALLING_PORT": str(free_port()),
            }
        )
        return Replica(name, environ)

    async def start(self, replica: Replica) -> Replica:
        """Run a replica in this process."""
        replica.service = tap.build_daemon(reactor, load_config(replica.environ))
        replica.service.startService()
        self.addCleanup(self._stop, replica.service)
        await replica.service.ready
        return replica

    async def _stop(self, service) -> None:
        if service.running:
            await service.stopService()

    async def start_twistd(self, replica: Replica) -> Replica:
        """Run a replica as ``twistd -n difydaemon`` (so that it can be killed)."""
        env = dict(os.environ)
        env.update(replica.environ)
        # the repository only: the plugins inherit it
        env["PYTHONPATH"] = REPOSITORY
        replica.watch = _Watch()
        replica.watch.ended = Deferred()
        replica.process = reactor.spawnProcess(
            replica.watch, sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "difydaemon"],
            env=env, path=os.path.dirname(replica.environ["PLUGIN_WORKING_PATH"]),
        )
        self.addCleanup(self.kill, replica)
        for _ in range(600):
            try:
                code, body = await self.call(replica, "GET", "/health/check")
                if code == 200 and orjson.loads(body).get("status") == "ok":
                    return replica
            except Exception:
                pass
            await sleep(0.1)
        self.fail(f"replica {replica.name} did not start:\n" + replica.watch.output.decode(errors="replace"))

    async def kill(self, replica: Replica) -> None:
        """SIGKILL a twistd replica (its plugins die with it: parent-death signal, and the test makes sure)."""
        if replica.watch is None or replica.watch.ended.called:
            return
        children = descendants(replica.process.pid)
        replica.process.signalProcess("KILL")
        await replica.watch.ended
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def call(self, replica: Replica, method: str, path: str, body=None, headers=None):
        hdrs = {"X-Api-Key": KEY}
        hdrs.update(headers or {})
        if isinstance(body, dict):
            body = orjson.dumps(body)
            hdrs["Content-Type"] = "application/json"
        response = await self.http.request(method, replica.url(path), data=body, headers=hdrs)
        return response.code, await response.content()

    async def upload(self, replica: Replica, files: dict) -> str:
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": build_package(files)})
        code, reply = await self.call(replica, "POST", f"/plugin/{TENANT}/management/install/upload/package", body,
                                      {"Content-Type": content_type})
        envelope = orjson.loads(reply)
        self.assertEqual(envelope["code"], 0, envelope)
        return envelope["data"]["unique_identifier"]

    async def start_install(self, replica: Replica, files: dict) -> tuple[str, dict]:
        """Upload and start installing; (identifier, the install answer's envelope)."""
        identifier = await self.upload(replica, files)
        code, reply = await self.call(
            replica, "POST", f"/plugin/{TENANT}/management/install/identifiers",
            {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]},
        )
        return identifier, orjson.loads(reply)

    async def install(self, replica: Replica, files: dict) -> str:
        """Install through ``replica`` and wait for the task to succeed."""
        identifier, answer = await self.start_install(replica, files)
        self.assertEqual(answer["code"], 0, answer)
        found = await self.wait_task(replica, answer["data"]["task_id"])
        self.assertEqual(found["status"], "success", found)
        return identifier

    async def wait_task(self, replica: Replica, task_id: str, attempts: int = 900) -> dict:
        for _ in range(attempts):
            code, reply = await self.call(replica, "GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            found = orjson.loads(reply)["data"]
            if found["status"] in ("success", "failed"):
                return found
            await sleep(0.1)
        self.fail(f"task {task_id} still {found['status']}")

    async def tool(self, replica: Replica, tool: str, parameters: dict, plugin_id: str = "acme/echo",
                   provider: str = "echo"):
        """(HTTP status, body) of one tool call through ``replica``."""
        return await self.call(
            replica, "POST", f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": provider, "tool": tool, "tool_parameters": parameters,
                                       "credentials": {}}},
            {"X-Plugin-ID": plugin_id},
        )

    async def echo(self, replica: Replica, text: str, **kw) -> list:
        code, body = await self.tool(replica, "echo", {"text": text}, **kw)
        self.assertEqual(code, 200, body)
        items = sse_items(body)
        self.assertEqual(items[0]["data"]["message"]["text"], text, items)
        return items

    async def installation(self, replica: Replica, plugin_id: str):
        code, reply = await self.call(replica, "GET", f"/plugin/{TENANT}/management/list?page=1&page_size=100")
        for entry in orjson.loads(reply)["data"]["list"]:
            if entry["plugin_id"] == plugin_id:
                return entry
        return None

    async def debug_installation(self, replica: Replica, plugin_id: str, plugin):
        """The installation of a debug plugin once ``replica`` lists it (the plugin's output if it never does)."""
        for _ in range(600):
            entry = await self.installation(replica, plugin_id)
            if entry is not None:
                return entry
            await sleep(0.1)
        self.fail(f"{plugin_id} never listed:\n" + plugin.output.decode("utf-8", "replace"))


class ClusterTests(ClusterCase):
    """Install, invoke, debug and uninstall across three replicas sharing real PostgreSQL and Redis."""

    async def test_any_replica_serves_any_request(self):
        """Installed through A, invoked through B and C; a debug plugin on A invoked through C; uninstalled through C, gone everywhere."""
        await self.cluster()
        a = await self.start(self.replica("a"))
        b = await self.start(self.replica("b"))
        c = await self.start(self.replica("c"))

        identifier = await self.install(a, behaviour_plugin_files())
        # B and C start it on the news of the install, before any call asks
        for _ in range(600):
            if all(r.service.runtimes.get(identifier) is not None for r in (b, c)):
                break
            await sleep(0.1)
        self.assertIsNotNone(b.service.runtimes.get(identifier))
        self.assertIsNotNone(c.service.runtimes.get(identifier))
        entry = await self.installation(b, "acme/echo")
        self.assertEqual(entry["plugin_unique_identifier"], identifier)
        await self.echo(b, "through b")
        await self.echo(c, "through c")
        await self.echo(a, "through a")
        for replica in (a, b, c):
            self.assertIsNotNone(replica.service.runtimes.get(identifier), replica.name)

        # a debug plugin connected to A's debug port, invoked through C
        code, reply = await self.call(a, "POST", f"/plugin/{TENANT}/debugging/key")
        key = orjson.loads(reply)["data"]["key"]
        plugin = await start_remote_plugin(self, reactor, echo_plugin_files(name="debugecho"), a.debug_port, key)
        debug_entry = await self.debug_installation(c, "acme/debugecho", plugin)
        self.assertIsNone(c.service.runtimes.get(debug_entry["plugin_unique_identifier"]))
        await self.echo(c, "debugged", plugin_id="acme/debugecho")
        await self.echo(b, "debugged too", plugin_id="acme/debugecho")

        # uninstalled through C: stopped on every replica
        code, reply = await self.call(c, "POST", f"/plugin/{TENANT}/management/uninstall",
                                      {"plugin_installation_id": entry["id"]})
        self.assertEqual(orjson.loads(reply)["data"], True)
        for _ in range(100):
            if all(r.service.runtimes.get(identifier) is None for r in (a, b, c)):
                break
            await sleep(0.1)
        for replica in (a, b, c):
            self.assertIsNone(replica.service.runtimes.get(identifier), replica.name)
            code, body = await self.tool(replica, "echo", {"text": "gone"})
            self.assertEqual(code, 404, body)

    async def test_replica_killed_under_load(self):
        """SIGKILL of one replica under 50 calls: the survivors' calls succeed, the dead one's end with an error, its task is failed, and it serves again once restarted."""
        await self.cluster()
        a = await self.start(self.replica("a"))
        b = await self.start(self.replica("b"))
        c = await self.start_twistd(self.replica("c"))
        await self.install(a, behaviour_plugin_files())
        for replica in (a, b, c):
            await self.echo(replica, f"warm {replica.name}")
        # an install under way on C when it dies: the plugin never says it is ready
        _, answer = await self.start_install(c, behaviour_plugin_files(name="stuck", main="silent"))
        stuck_task = answer["data"]["task_id"]

        replicas = [a, b, c]
        calls = [
            self.tool(replicas[i % 3], "paced", {"delay": "3", "count": "2", "gap": "0"}) for i in range(50)
        ]
        outcomes = DeferredList([Deferred.fromCoroutine(call) for call in calls], consumeErrors=True)
        await sleep(1.0)
        await self.kill(c)
        results = await outcomes
        for i, (ok, result) in enumerate(results):
            on = replicas[i % 3]
            if on is c:
                # cut off: the client reads an error, not a hang nor an answer
                self.assertFalse(ok, f"call {i} on the dead replica answered {result!r}")
            else:
                self.assertTrue(ok, result)
                code, body = result
                self.assertEqual(code, 200, body)
                items = sse_items(body)
                self.assertEqual(len(items), 2, items)
                self.assertTrue(all(item["code"] == 0 for item in items), items)

        # the survivors fail the dead replica's task once its lease has expired
        found = await self.wait_task(a, stuck_task, attempts=900)
        self.assertEqual(found["status"], "failed")
        self.assertIn("stopped answering", found["plugins"][0]["message"])

        await self.start_twistd(c)
        await self.echo(c, "back")

    async def test_redis_outage(self):
        """Redis stopped for a few seconds: the replicas serve what needs no Redis, refuse installs clearly, and recover without a restart."""
        redis = await private_redis(self, reactor)
        await self.cluster(redis_port=redis.port)
        a = await self.start(self.replica("a"))
        b = await self.start(self.replica("b"))
        await self.install(a, behaviour_plugin_files())
        await self.echo(b, "before")

        await redis.stop()
        await self.echo(a, "during a")
        await self.echo(b, "during b")
        self.assertIsNotNone(await self.installation(b, "acme/echo"))
        _, answer = await self.start_install(a, echo_plugin_files(name="later"))
        self.assertEqual(answer["code"], -500, answer)
        self.assertIn("redis unavailable", answer["message"])
        await sleep(3)

        await redis.start()
        for _ in range(100):
            _, answer = await self.start_install(a, echo_plugin_files(name="later"))
            if answer["code"] == 0:
                break
            await sleep(0.2)
        self.assertEqual(answer["code"], 0, answer)
        found = await self.wait_task(a, answer["data"]["task_id"])
        self.assertEqual(found["status"], "success", found)
        await self.echo(b, "after", plugin_id="acme/later")
        await self.echo(b, "still")


class IdleStopClusterTests(ClusterCase):
    """With PLUGIN_IDLE_TIMEOUT, an install through one replica is built on the others but runs nowhere nobody called it."""

    async def test_install_elsewhere_is_built_idle(self):
        """Installed through A: B builds it (venv, no process) and leaves it idle; B's first call starts it and is answered."""
        await self.cluster()
        replicas = []
        for name in ("a", "b"):
            replica = self.replica(name)
            replica.environ["PLUGIN_IDLE_TIMEOUT"] = "300"
            replicas.append(await self.start(replica))
        a, b = replicas
        identifier = await self.install(a, behaviour_plugin_files())
        venv = os.path.join(working_dir_for(b.environ["PLUGIN_WORKING_PATH"], identifier), ".venv")
        for _ in range(600):
            status = b.service.runtimes.status(identifier)
            if status is not None and status.state == "idle" and os.path.isdir(venv):
                break
            await sleep(0.1)
        self.assertEqual(b.service.runtimes.status(identifier).state, "idle")
        self.assertTrue(os.path.isdir(venv), venv)
        self.assertIsNone(b.service.runtimes.get(identifier))
        await self.echo(b, "first call on b")
        self.assertIsNotNone(b.service.runtimes.get(identifier))


class ForwardedEndpointTests(ClusterCase):
    """Endpoint calls (``/e/``) for a debug plugin held by another replica, end to end."""

    async def test_debug_endpoint_through_another_replica(self):
        """A real endpoint plugin connected to A answers /e/ calls made to B: path, query, Host, a 2 MiB body, a stream, a custom status."""
        await self.cluster()
        dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        self.shared.update({"DIFY_INNER_API_URL": base_url(await dify.listen()), "DIFY_INNER_API_KEY": INNER_KEY})
        self.addCleanup(dify.stop)
        a = await self.start(self.replica("a"))
        b = await self.start(self.replica("b"))

        code, reply = await self.call(a, "POST", f"/plugin/{TENANT}/debugging/key")
        key = orjson.loads(reply)["data"]["key"]
        plugin = await start_remote_plugin(self, reactor, endpoint_plugin_files(), a.debug_port, key)
        entry = await self.debug_installation(b, "acme/hooks", plugin)
        identifier = entry["plugin_unique_identifier"]
        self.assertIsNone(b.service.runtimes.get(identifier))
        code, reply = await self.call(
            b, "POST", f"/plugin/{TENANT}/endpoint/setup",
            {"plugin_unique_identifier": identifier, "user_id": "u1", "name": "hook",
             "settings": {"api_key": "supersecret", "greeting": "hello"}},
        )
        self.assertEqual(orjson.loads(reply)["code"], 0, reply)
        code, reply = await self.call(b, "GET", f"/plugin/{TENANT}/endpoint/list?page=1&page_size=10&user_id=u1")
        [endpoint] = orjson.loads(reply)["data"]
        hook = endpoint["hook_id"]

        async def public(method, path, body=None, headers=None):
            response = await self.http.request(method, b.url(path), data=body, headers=headers or {})
            return response, await response.content()

        response, body = await public("GET", f"/e/{hook}/echo/deep%20path?b=2&a=1&a=0")
        self.assertEqual(response.code, 200, body)
        echoed = orjson.loads(body)
        self.assertEqual((echoed["method"], echoed["path"]), ("GET", "/echo/deep path"))
        self.assertEqual(echoed["query"], {"a": ["1", "0"], "b": ["2"]})
        # the plugin sees the Host the caller used (B's), not the hop's (A's)
        self.assertEqual(echoed["host"], f"127.0.0.1:{b.port}")
        self.assertEqual(echoed["settings"], {"api_key": "supersecret", "greeting": "hello"})

        large = os.urandom(2 * 1024 * 1024)
        response, body = await public("POST", f"/e/{hook}/hash", large, {"Content-Type": "application/octet-stream"})
        self.assertEqual(response.code, 200, body[:500])
        self.assertEqual(orjson.loads(body), {"sha256": hashlib.sha256(large).hexdigest(), "length": len(large)})

        response, body = await public("GET", f"/e/{hook}/stream?count=200")
        self.assertEqual((response.code, response.length), (200, UNKNOWN_LENGTH))
        self.assertEqual(body, b"".join(f"line-{i}\n".encode() for i in range(200)))

        response, body = await public("GET", f"/e/{hook}/custom")
        self.assertEqual((response.code, body), (418, b"teapot"))
        self.assertEqual(response.headers.getRawHeaders("x-custom"), ["yes"])
