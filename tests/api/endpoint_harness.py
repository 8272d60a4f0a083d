"""
The in-memory daemon of :mod:`tests.api.harness` with the endpoint parts
wired in: the ``/plugin/<tenant>/endpoint/...`` routes, the public ``/e/``
resource over a RuntimeRegistry (holding FakeRuntimes the tests register),
and the real inner API client talking to a FakeDifyInnerAPI through its own
StubTreq.
"""

from __future__ import annotations

from treq.testing import StubTreq

from difydaemon.api.endpoint import EndpointResource
from difydaemon.api.management import ManagementAPI
from difydaemon.api.root import BuildInfo, HealthResource, RootResource
from difydaemon.invocation.inner_api import DifyInnerAPI
from difydaemon.management.endpoints import Endpoints
from difydaemon.management.installations import InstallationCache
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.testing.endpoint_plugin import endpoint_plugin_files
from difydaemon.testing.inner_api import FakeDifyInnerAPI
from difydaemon.testing.packages import build_package
from difydaemon.testing.runtimes import FakeRuntime

from .harness import KEY, TENANT, DaemonHarness

INNER_KEY = "inner-test-key"
EXECUTION_TIMEOUT = 60.0


class EndpointHarness(DaemonHarness):
    """
    :param test: the SynchronousTestCase using it.
    :param backwards: what ``/e/`` sessions hand ``invoke`` messages to.
    :param runtime_wait: seconds ``/e/`` waits for a runtime.
    """

    def __init__(self, test, backwards=None, runtime_wait: float = 3.0) -> None:
        super().__init__(test)
        self.inner = FakeDifyInnerAPI(self.clock, INNER_KEY)
        self.inner_treq = StubTreq(self.inner.resource())
        self.inner_api = DifyInnerAPI(
            self.clock, self.inner_treq, "http://dify.test", INNER_KEY, 10.0, 60.0, 1 << 20
        )
        self.endpoints = Endpoints(self.clock, self.persistence, self.inner_api, declarations=self.packages.declarations)
        # no caching: tests uninstall and expect /e/ to notice at once
        self.installations = InstallationCache(self.clock, self.persistence, ttl=0)
        self.registry = RuntimeRegistry(self.clock)
        self.public = EndpointResource(
            self.clock,
            self.persistence,
            self.installations,
            self.registry,
            self.endpoints,
            backwards=backwards,
            max_execution_timeout=EXECUTION_TIMEOUT,
            runtime_wait=runtime_wait,
        )
        api = ManagementAPI(self.packages, self.installer, self.persistence, endpoints=self.endpoints)
        health = HealthResource(
            BuildInfo(version="test", build_time="now", platform="local"),
            self.counter,
            lambda: {"free": 0, "busy": 0, "total": 0},
        )
        self.root = RootResource(KEY, api.resource(), health, self.counter, endpoint=self.public)
        self.treq = StubTreq(self.root)

    def pump(self) -> None:
        """Let both in-memory HTTP connections and zero-delay calls run until quiet."""
        for _ in range(30):
            self.clock.advance(0)
            self.inner_treq.flush()
            self.treq.flush()

    def wait(self, seconds: float, step: float = 0.1) -> None:
        """Let ``seconds`` pass on the clock in small steps, pumping in between."""
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)
            self.pump()

    def _finish(self, d):
        self.pump()
        response = self.test.successResultOf(d)
        body_d = self.treq.content(response)
        self.pump()
        return response, self.test.successResultOf(body_d)

    def send(self, method: str, path: str, **kw):
        """Start one request without waiting for its end; the response Deferred."""
        d = self.treq.request(method, "http://daemon.test" + path, **kw)
        self.pump()
        return d

    def install_endpoint_plugin(self, tenant: str = TENANT, **options) -> str:
        """Upload and install the endpoint test plugin; its identifier."""
        env = self.upload(build_package(endpoint_plugin_files(**options)), tenant=tenant)
        self.test.assertEqual(env["code"], 0, env)
        identifier = env["data"]["unique_identifier"]
        self.install(identifier, tenant=tenant)
        self.test.assertIsNotNone(
            self.test.successResultOf(self.persistence.get_installation(tenant, identifier.split(":")[0]))
        )
        return identifier

    def setup_endpoint(self, identifier: str, tenant: str = TENANT, name: str = "hook", settings=None,
                       user_id: str = "user-1") -> dict:
        """Set one endpoint up through the route; the endpoint as listed."""
        if settings is None:
            settings = {"api_key": "supersecret", "greeting": "hello"}
        self.ok(
            "POST",
            f"/plugin/{tenant}/endpoint/setup",
            json={"plugin_unique_identifier": identifier, "user_id": user_id, "name": name, "settings": settings},
        )
        listed = self.ok("GET", f"/plugin/{tenant}/endpoint/list", params={"page": 1, "page_size": 1})
        return listed[0]

    def runtime(self, identifier: str, **options) -> FakeRuntime:
        """A FakeRuntime of ``identifier``, registered."""
        runtime = FakeRuntime(self.clock, identifier, **options)
        self.registry.register(runtime)
        return runtime
