"""
Two whole daemons on different working directories that share only a
PostgreSQL database and an S3 bucket (moto on loopback): a real SDK plugin
uploaded and installed through one is served by the other, under Go's object
keys, and keeps being served while the bucket is unreachable.

The daemons share no directory of their own; both builds read the test
process's uv download cache, which holds downloaded wheels, not daemon
state.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.testing.http import http_client
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.s3 import ACCESS_KEY, SECRET_KEY, bucket_client, moto_server
from tests.api.harness import encode_form
from tests.daemon_postgres import fresh_database
from tests.test_dispatch_end_to_end import wait_until
from tests.test_end_to_end import TENANT, DaemonCase
from tests.test_storage_end_to_end import IDENTIFIER, UploadChecks

BUCKET = "dify-plugins"


class Daemon:
    """One started daemon: its service and port."""

    def __init__(self, service, port: int, workdir: str) -> None:
        self.service = service
        self.port = port
        self.workdir = workdir


class TwoDaemonsOnS3Tests(DaemonCase):
    """Replicas on different hosts: what one installs, the other serves."""

    timeout = 400

    async def start_daemon(self, shared: dict) -> Daemon:
        """A daemon of its own directories, on the shared database and bucket."""
        environ = self.daemon_environment(**shared)
        service = tap.build_daemon(reactor, load_config(environ))
        service.startService()

        async def stop():
            if service.running:
                await service.stopService()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        await service.ready
        return Daemon(service, self.port, self.workdir)

    async def call_on(self, daemon: Daemon, method, path, body=None, headers=None):
        """``call`` on ``daemon``."""
        self.port = daemon.port
        return await self.call(method, path, body, headers)

    async def shared_environment(self) -> dict:
        """A moto server (``self.s3``) and a fresh database, as the daemons' variables."""
        self.s3 = await moto_server(self, reactor)
        shared = dict(await fresh_database(self, "difydaemon_s3_"))
        shared.update(
            PLUGIN_STORAGE_TYPE="aws_s3",
            PLUGIN_STORAGE_OSS_BUCKET=BUCKET,
            S3_USE_AWS="false",
            S3_ENDPOINT=self.s3.endpoint,
            AWS_ACCESS_KEY=ACCESS_KEY,
            AWS_SECRET_KEY=SECRET_KEY,
        )
        self.http = http_client(self, reactor)
        return shared

    async def install_on(self, daemon: Daemon) -> dict:
        """Upload and install the behaviour plugin through ``daemon``; the upload answer's data."""
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": build_package(behaviour_plugin_files())})
        code, reply = await self.call_on(
            daemon, "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        uploaded = orjson.loads(reply)
        self.assertEqual(uploaded["code"], 0, uploaded)
        identifier = uploaded["data"]["unique_identifier"]
        code, reply = await self.call_on(
            daemon,
            "POST",
            f"/plugin/{TENANT}/management/install/identifiers",
            {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]},
        )
        task_id = orjson.loads(reply)["data"]["task_id"]
        while True:
            code, reply = await self.call_on(daemon, "GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            status = orjson.loads(reply)["data"]["status"]
            self.assertNotEqual(status, "failed", reply)
            if status == "success":
                return uploaded["data"]
            await deferLater(reactor, 0.1, lambda: None)

    async def test_installed_on_one_served_by_the_other(self):
        """A plugin installed through A is invoked through B started after; B keeps serving it and its icon with the bucket gone."""
        shared = await self.shared_environment()
        first = await self.start_daemon(shared)
        uploaded = await self.install_on(first)
        identifier = uploaded["unique_identifier"]
        icon = uploaded["manifest"]["icon"]

        # the bucket holds Go's keys; no local store was written by A
        raw = bucket_client(self.s3)
        keys = sorted(entry["Key"] for entry in raw.list_objects_v2(Bucket=BUCKET)["Contents"])
        self.assertEqual(keys, sorted([f"plugin_packages/{identifier}", f"plugin/{identifier}", f"assets/{icon}"]))
        self.assertFalse(os.path.exists(os.path.join(first.workdir, "storage")))

        second = await self.start_daemon(shared)
        self.assertNotEqual(second.workdir, first.workdir)
        # B restores what the database says is installed, from the bucket
        await wait_until(
            lambda: (runtime := second.service.runtimes.get(identifier)) is not None and runtime.is_ready(),
            "the plugin is ready on B",
            seconds=300,
        )
        self.port = second.port
        body = await self.tool("echo", {"text": "from B"})
        self.assertIn(b'"json_object":{"echo":"from B","length":6}', body)
        code, icon_bytes = await self.call_on(second, "GET", f"/plugin/{TENANT}/asset/{icon}")
        self.assertEqual(code, 200)
        self.assertIn(b"<svg", icon_bytes)

        # nothing on B's dispatch path waits on the bucket
        await self.s3.stop()
        self.port = second.port
        body = await self.tool("echo", {"text": "no bucket"})
        self.assertIn(b'"echo":"no bucket"', body)
        code, again = await self.call_on(second, "GET", f"/plugin/{TENANT}/asset/{icon}")
        self.assertEqual((code, again), (200, icon_bytes))
        self.assertFalse(os.path.exists(os.path.join(second.workdir, "storage")))

    async def test_running_replica_serves_what_another_installs(self):
        """B, already running, serves a plugin installed through A on its first request for it."""
        shared = await self.shared_environment()
        first = await self.start_daemon(shared)
        second = await self.start_daemon(shared)
        uploaded = await self.install_on(first)
        self.assertIsNone(second.service.runtimes.get(uploaded["unique_identifier"]))
        self.port = second.port
        body = await self.tool("echo", {"text": "first call"})
        self.assertIn(b'"echo":"first call"', body)
        code, reply = await self.call_on(second, "GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        self.assertEqual(orjson.loads(reply)["data"]["list"][0]["plugin_unique_identifier"], uploaded["unique_identifier"])


class StartRefusedTests(DaemonCase):
    """``twistd -n difydaemon`` on an S3 store it cannot use exits non-zero, naming the setting."""

    timeout = 120

    async def run_twistd(self, **storage) -> tuple:
        """Run twistd with the test's environment and ``storage``; its output and exit status."""
        import sys

        from twisted.internet.utils import getProcessOutputAndValue

        from tests.test_plugin_processes_end_to_end import REPOSITORY

        env = dict(os.environ)
        env.update(self.daemon_environment(**storage))
        env["PYTHONPATH"] = REPOSITORY
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "difydaemon",
             "--env-file", os.path.join(self.workdir, "absent.env")],
            env=env, path=self.workdir,
        )
        return (out + err).decode("utf-8", "replace"), code

    async def test_unreachable_endpoint(self):
        """An S3_ENDPOINT nobody answers on: status 1, one line naming S3_ENDPOINT, no port opened."""
        from difydaemon.testing.postgres import free_port

        endpoint = f"http://127.0.0.1:{free_port()}"
        output, code = await self.run_twistd(
            PLUGIN_STORAGE_TYPE="aws_s3", PLUGIN_STORAGE_OSS_BUCKET=BUCKET, S3_USE_AWS="false",
            S3_ENDPOINT=endpoint, AWS_ACCESS_KEY=ACCESS_KEY, AWS_SECRET_KEY=SECRET_KEY,
        )
        self.assertEqual(code, 1, output)
        self.assertIn(f"difydaemon could not start: S3_ENDPOINT: cannot reach the S3 store at {endpoint}", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("difydaemon is ready", output)

    async def test_other_store_refused(self):
        """PLUGIN_STORAGE_TYPE=gcs: status 1 and "not supported yet" naming PLUGIN_STORAGE_TYPE."""
        output, code = await self.run_twistd(PLUGIN_STORAGE_TYPE="gcs", GCS_CREDENTIALS="e30=")
        self.assertEqual(code, 1, output)
        self.assertIn("PLUGIN_STORAGE_TYPE: 'gcs' is not supported yet by difydaemon", output)


class S3OutageUploadTests(UploadChecks, DaemonCase):
    """An upload while the bucket cannot be reached."""

    timeout = 120

    async def test_upload_with_the_store_down(self):
        """With the store down the upload answers -500 naming the key and the reason, leaves nothing, and works once it is back."""
        s3 = await moto_server(self, reactor)
        await self._start(
            PLUGIN_STORAGE_TYPE="aws_s3", PLUGIN_STORAGE_OSS_BUCKET=BUCKET, S3_USE_AWS="false",
            S3_ENDPOINT=s3.endpoint, AWS_ACCESS_KEY=ACCESS_KEY, AWS_SECRET_KEY=SECRET_KEY,
        )
        await s3.stop()
        envelope = await self.upload()
        self.assertEqual(envelope["code"], -500, envelope)
        self.assertRegex(
            orjson.loads(envelope["message"])["message"],
            r"^object storage cannot look up assets/[0-9a-f]{64}\.svg: Could not connect to the endpoint URL",
        )
        await self.assert_no_declaration()
        await s3.start()
        raw = bucket_client(s3)
        # moto restarts empty; a real store keeps its bucket
        raw.create_bucket(Bucket=BUCKET)
        envelope = await self.upload()
        self.assertEqual(envelope["code"], 0, envelope)
        self.assertEqual(envelope["data"]["unique_identifier"], IDENTIFIER)
        keys = [entry["Key"] for entry in raw.list_objects_v2(Bucket=BUCKET)["Contents"]]
        self.assertIn(f"plugin_packages/{IDENTIFIER}", keys)
