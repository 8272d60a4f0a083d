"""
An in-memory daemon for API tests: the real Klein app and management
classes over in-memory persistence, in-memory object storage and a
recording launcher, driven with StubTreq.
"""

from __future__ import annotations

import io

import orjson
from treq.testing import StubTreq
from twisted.internet.task import Clock

from difydaemon.api.management import ManagementAPI
from difydaemon.api.root import BuildInfo, HealthResource, RequestCounter, RootResource
from difydaemon.blocking import InlineRunner
from difydaemon.management.installer import Installer
from difydaemon.management.packages import PackageRegistry
from difydaemon.packaging.package import PackagePolicy
from difydaemon.packaging.signature import official_public_key
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.launchers import RecordingLauncher

KEY = "test-server-key"
TENANT = "0193a8a4-0000-7000-8000-000000000001"
OTHER_TENANT = "0193a8a4-0000-7000-8000-000000000002"
BASE = "http://daemon.test"


class RecordingRunner(InlineRunner):
    """Runs inline and records the qualified name of each function it runs."""

    def __init__(self):
        self.functions = []

    def run(self, function, *args, **kwargs):
        self.functions.append(function.__qualname__)
        return super().run(function, *args, **kwargs)


def default_policy(**overrides) -> PackagePolicy:
    """A policy that accepts unsigned packages, as tests need."""
    values = dict(
        max_size=52428800,
        force_verify=False,
        enforce_langgenius=False,
        public_keys=(official_public_key(),),
    )
    values.update(overrides)
    return PackagePolicy(**values)


class DaemonHarness:
    """
    The management surface wired over fakes.

    :param test: the SynchronousTestCase using it (for successResultOf).
    :param storage: the object store (an empty MemoryObjectStorage when None).
    :param runner: where blocking work runs (inline by default).
    :param installer_options: more keyword arguments of the Installer
        (task leases, the cluster).
    """

    def __init__(self, test, policy: PackagePolicy | None = None, storage=None, runner=None, **installer_options) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.persistence = MemoryPersistence(self.clock)
        self.storage = storage if storage is not None else MemoryObjectStorage()
        self.packages = PackageRegistry(
            self.persistence, self.storage, policy or default_policy(), runner or InlineRunner()
        )
        self.launcher = RecordingLauncher()
        self.installer = Installer(
            self.clock, self.persistence, self.storage, self.packages, self.launcher, **installer_options
        )
        api = ManagementAPI(self.packages, self.installer, self.persistence)
        self.counter = RequestCounter()
        health = HealthResource(
            BuildInfo(version="test", build_time="now", platform="local"),
            self.counter,
            lambda: {"free": 0, "busy": 0, "total": 0},
        )
        self.root = RootResource(KEY, api.resource(), health, self.counter)
        self.treq = StubTreq(self.root)

    def _finish(self, d):
        self.treq.flush()
        response = self.test.successResultOf(d)
        body_d = self.treq.content(response)
        self.treq.flush()
        return response, self.test.successResultOf(body_d)

    def request(self, method: str, path: str, *, key: str | None = KEY, json=None, params=None, headers=None, **kw):
        """One request; returns (response, body bytes)."""
        hdrs = dict(headers or {})
        if key is not None:
            hdrs["X-Api-Key"] = key
        if json is not None:
            kw["data"] = orjson.dumps(json)
            hdrs["Content-Type"] = "application/json"
        d = self.treq.request(method, BASE + path, headers=hdrs, params=params, **kw)
        return self._finish(d)

    def call(self, method: str, path: str, **kw):
        """One request expected to answer HTTP 200; returns the envelope."""
        response, body = self.request(method, path, **kw)
        self.test.assertEqual(response.code, 200, body)
        return orjson.loads(body)

    def ok(self, method: str, path: str, **kw):
        """One request expected to succeed; returns the envelope's data."""
        env = self.call(method, path, **kw)
        self.test.assertEqual(env["code"], 0, env)
        self.test.assertEqual(env["message"], "success")
        self.test.assertIsNotNone(env["data"])
        return env["data"]

    def upload(self, data: bytes, tenant: str = TENANT, verify: bool = False):
        """Upload a package through the multipart route; returns the envelope."""
        content_type, body = encode_form(
            {"verify_signature": "true" if verify else "false"}, {"dify_pkg": data}
        )
        return self.call(
            "POST",
            f"/plugin/{tenant}/management/install/upload/package",
            data=body,
            headers={"Content-Type": content_type},
        )

    def install(self, identifier: str, tenant: str = TENANT, source: str = "package"):
        """Install one uploaded identifier; returns the install answer."""
        return self.ok(
            "POST",
            f"/plugin/{tenant}/management/install/identifiers",
            json={"plugin_unique_identifiers": [identifier], "source": source, "metas": [{}]},
        )

    def stored_keys(self) -> list:
        """Every key in object storage."""
        keys = []
        for prefix in ("plugin_packages", "plugin", "assets"):
            keys.extend(self.test.successResultOf(self.storage.list(prefix)))
        return keys


def encode_form(fields: dict, files: dict) -> tuple:
    """
    A multipart/form-data body as Dify's httpx client sends it (file parts
    named after their field).  StubTreq cannot send files itself.
    """
    boundary = "difydaemon-test-boundary-7f3a"
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


def error_of(env: dict) -> dict:
    """The decoded inner error of an error envelope."""
    return orjson.loads(env["message"])
