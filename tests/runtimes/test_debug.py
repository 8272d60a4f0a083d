"""
Tests for :mod:`difydaemon.runtimes.debug`: the debug listener driven with
StringTransport over in-memory persistence and storage, and the real SDK
echo plugin dialling into a real port.
"""

from __future__ import annotations

import os
import signal

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from difydaemon.interfaces import IPluginRuntime
from difydaemon.management.debugging import DebuggingKeys
from difydaemon.management.installations import InstallationCache
from difydaemon.packaging.declaration import asset_id
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes import handshake as hs
from difydaemon.runtimes.debug import (
    CONNECTION_CLOSED_MESSAGE,
    SERVER_BUSY,
    TENANT_BUSY,
    DebugRuntime,
    DebugServerFactory,
)
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from tests.runtimes.debug_messages import (
    END,
    HEARTBEAT,
    ICON,
    echo_manifest,
    echo_tool_provider,
    handshake,
    message,
    registration,
)
from tests.runtimes.listeners import RecordingListener

TENANT = "0193a8a4-0000-7000-8000-000000000001"
OTHER_TENANT = "0193a8a4-0000-7000-8000-000000000002"
KEYS = iter(f"5f0c1d2e-3a4b-4c5d-8e6f-{n:012d}" for n in range(1, 1_000_000))


def request(session_id: str, text: str = "hi") -> dict:
    """A tool invocation as dispatch writes it."""
    return {
        "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
        "endpoint_id": None, "context": None, "event": "request",
        "data": {
            "action": "invoke_tool", "credential_type": "api-key", "credentials": {}, "provider": "echo",
            "tool": "echo", "tool_parameters": {"text": text}, "type": "tool", "user_id": "u1",
        },
    }


def session_line(session_id: str, kind: str, data) -> bytes:
    """One session message as the SDK writes it."""
    return orjson.dumps({"event": "session", "session_id": session_id, "data": {"type": kind, "data": data}}) + b"\n\n"


class RecordingPersistence:
    """MemoryPersistence that records the names of the methods called."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return call


class DebugHarness:
    """A debug listener over fakes, and connections to it."""

    def __init__(self, test, **options) -> None:
        self.test = test
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.memory = MemoryPersistence(self.clock)
        self.persistence = RecordingPersistence(self.memory)
        self.storage = MemoryObjectStorage()
        self.registry = RuntimeRegistry(self.clock)
        self.installations = InstallationCache(self.clock, self.persistence)
        self.keys = DebuggingKeys(self.clock, self.persistence, new_key=lambda: next(KEYS))
        self.key = self.key_for(TENANT)
        self.factory = DebugServerFactory(
            self.clock, self.keys, self.persistence, self.storage, self.registry, self.installations, **options
        )
        self.persistence.calls.clear()

    def key_for(self, tenant_id: str) -> str:
        return self.test.successResultOf(Deferred.fromCoroutine(self.keys.key_for(tenant_id)))

    def connect(self, port: int = 40000):
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol.makeConnection(transport)
        return protocol, transport

    def register(self, key=None, **kwargs):
        protocol, transport = self.connect()
        protocol.dataReceived(registration(key or self.key, **kwargs))
        return protocol, transport

    def disconnect(self, protocol) -> None:
        protocol.connectionLost(Failure(ConnectionDone()))

    def installation(self, tenant_id=TENANT):
        return self.test.successResultOf(self.memory.get_installation(tenant_id, "acme/echo"))

    def run(self, d):
        return self.test.successResultOf(d)


class RegistrationTests(SynchronousTestCase):
    """A good registration installs and registers the plugin."""

    def setUp(self):
        super().setUp()
        self.harness = DebugHarness(self)

    def test_installed_and_registered(self):
        """After end: a remote installation, the declaration, the assets and a ready runtime."""
        h = self.harness
        protocol, transport = h.register()
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        installation = h.installation()
        self.assertEqual((installation.runtime_type, installation.source, installation.meta), ("remote", "remote", {}))
        identifier = installation.plugin_unique_identifier
        self.assertTrue(identifier.startswith("acme/echo:0.0.1@"))
        plugin = h.run(h.memory.get_plugin(identifier))
        self.assertEqual((plugin.install_type, plugin.refers), ("remote", 1))
        declaration = h.run(h.memory.get_declaration(identifier))
        self.assertEqual(plugin.remote_declaration, declaration)
        self.assertEqual(declaration["tool"]["identity"]["name"], "echo")
        self.assertIsNotNone(h.run(h.memory.get_provider("tool", TENANT, "acme/echo")))
        icon = asset_id(ICON, "icon.svg")
        self.assertEqual(declaration["icon"], icon)
        self.assertEqual(h.run(h.storage.load(f"assets/{icon}")), ICON)
        runtime = h.registry.get(identifier)
        self.assertIsInstance(runtime, DebugRuntime)
        self.assertTrue(verifyObject(IPluginRuntime, runtime))
        self.assertTrue(runtime.is_ready())
        self.assertEqual((runtime.runtime_type, runtime.tenant_id), ("remote", TENANT))
        self.assertEqual(protocol.installation_id, installation.id)

    def test_no_delay(self):
        """The factory sets TCP_NODELAY on accepted transports."""
        h = self.harness
        protocol = h.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        settings = []

        class NoDelayTransport(StringTransport):
            def setTcpNoDelay(self, enabled):
                settings.append(enabled)

        protocol.makeConnection(NoDelayTransport())
        self.assertEqual(settings, [True])

    def test_session_round_trip(self):
        """open_session writes the request line; the plugin's messages reach the listener."""
        h = self.harness
        protocol, transport = h.register()
        runtime = h.registry.get(h.installation().plugin_unique_identifier)
        listener = RecordingListener()
        handle = runtime.open_session("s1", request("s1"), listener)
        self.assertEqual(transport.value(), orjson.dumps(request("s1")) + b"\n")
        chunk = {"type": "text", "message": {"text": "hi"}, "meta": None}
        data = session_line("s1", "stream", chunk) + session_line("s1", "end", {})
        for offset in range(0, len(data), 7):
            protocol.dataReceived(data[offset : offset + 7])
        self.assertEqual(listener.calls, [("stream", chunk, orjson.dumps(chunk)), ("end",)])
        self.assertFalse(handle.is_open)

    def test_send_backwards_response(self):
        """send() writes a message on the connection serving the session."""
        h = self.harness
        protocol, transport = h.register()
        runtime = h.registry.get(h.installation().plugin_unique_identifier)
        runtime.open_session("s1", request("s1"), RecordingListener())
        transport.clear()
        response = {"session_id": "s1", "event": "backwards_response", "data": {"event": "end"}}
        runtime.send("s1", response)
        self.assertEqual(transport.value(), orjson.dumps(response) + b"\n")
        self.assertRaises(Exception, runtime.send, "nope", response)

    def test_key_cached(self):
        """A known key is checked without the database; a non-UUID key never reaches it."""
        h = self.harness
        h.register()
        self.assertNotIn("get_debugging_key", h.persistence.calls)
        h.persistence.calls.clear()
        protocol, transport = h.connect()
        protocol.dataReceived(handshake("not-a-uuid"))
        self.assertEqual(transport.value(), hs.INVALID_KEY.encode() + b"\n")
        self.assertEqual(h.persistence.calls, [])

    def test_key_from_database(self):
        """A key made by another daemon (not in memory) is looked up once."""
        h = self.harness
        other = DebuggingKeys(h.clock, h.memory, new_key=lambda: next(KEYS))
        key = self.successResultOf(Deferred.fromCoroutine(other.key_for(OTHER_TENANT)))
        protocol, transport = h.register(key=key)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.persistence.calls.count("get_debugging_key"), 1)
        self.assertIsNotNone(h.installation(OTHER_TENANT))

    def test_reconnect_same_build_reuses(self):
        """A second connection of the same build reuses the installation and takes it over."""
        h = self.harness
        first, _ = h.register()
        installation = h.installation()
        second, transport = h.register()
        self.assertEqual(transport.value(), b"")
        self.assertEqual(h.installation(), installation)
        identifier = installation.plugin_unique_identifier
        self.assertIs(h.registry.get(identifier), second.runtime)
        h.disconnect(first)
        self.assertEqual(h.installation(), installation)
        self.assertIs(h.registry.get(identifier), second.runtime)
        h.disconnect(second)
        self.assertIsNone(h.installation())
        self.assertIsNone(h.registry.get(identifier))

    def test_owner_leaves_first(self):
        """When the owning connection leaves first, a live twin keeps the installation."""
        h = self.harness
        first, _ = h.register()
        second, _ = h.register()
        identifier = h.installation().plugin_unique_identifier
        h.disconnect(second)
        self.assertIsNotNone(h.installation())
        self.assertIs(h.registry.get(identifier), first.runtime)
        h.disconnect(first)
        self.assertIsNone(h.installation())

    def test_new_build_replaces(self):
        """A changed build replaces the earlier debug installation of the plugin."""
        h = self.harness
        h.register()
        old = h.installation()
        tool = echo_tool_provider()
        tool["identity"]["tags"] = ["utilities"]
        h.register(tool=tool)
        new = h.installation()
        self.assertNotEqual(new.plugin_unique_identifier, old.plugin_unique_identifier)
        self.assertIsNone(h.run(h.memory.get_plugin(old.plugin_unique_identifier)))

    def test_local_install_kept(self):
        """A tenant's non-debug installation of the plugin_id is left alone; the plugin is refused."""
        h = self.harness
        local = h.run(h.memory.install_plugin(TENANT, "acme/echo:0.0.1@" + "a" * 64, "acme/echo", "local",
                                              "marketplace", {}, {"tool": "echo"}))
        protocol, transport = h.register()
        self.assertTrue(transport.value().startswith(b"register failed, plugin acme/echo is already installed"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.installation(), local)
        h.disconnect(protocol)
        self.assertEqual(h.installation(), local)

    def test_invalid_declaration(self):
        """A declaration the package checks refuse is one line naming the field."""
        h = self.harness
        protocol, transport = h.register(manifest=echo_manifest(version="1.0"))
        self.assertTrue(transport.value().startswith(b"register failed, invalid manifest field version"))
        self.assertTrue(transport.value().endswith(b"\n"))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(h.installation())


class RefusalTests(SynchronousTestCase):
    """Every refusal is one plain line, then the socket closes, with nothing installed."""

    def setUp(self):
        super().setUp()
        self.harness = DebugHarness(self, max_asset_size=1000)

    def assertRefused(self, transport, text):
        self.assertEqual(transport.value(), text.encode() + b"\n")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(self.harness.installation())
        self.assertEqual(self.harness.registry.pool_status()["total"], 0)

    def test_wrong_key(self):
        """An unknown key: "handshake failed, invalid key"."""
        protocol, transport = self.harness.register(key="5f0c1d2e-3a4b-4c5d-8e6f-999999999999")
        self.assertRefused(transport, hs.INVALID_KEY)

    def test_expired_key(self):
        """A key past its two hours is refused."""
        h = self.harness
        h.clock.advance(7201)
        protocol, transport = h.register()
        self.assertRefused(transport, hs.INVALID_KEY)

    def test_garbage_first_line(self):
        """A non-JSON first line: "handshake failed, invalid handshake message"."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(b"\x16\x03\x01 hello\n")
        self.assertRefused(transport, hs.INVALID_HANDSHAKE)

    def test_message_before_handshake(self):
        """A registration message before the handshake is refused."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(message("manifest_declaration", echo_manifest()))
        self.assertRefused(transport, hs.INVALID_HANDSHAKE)

    def test_oversized_assets(self):
        """Assets over the cap: "register failed, assets too large"."""
        protocol, transport = self.harness.register(icon=b"x" * 1001)
        self.assertRefused(transport, hs.ASSETS_TOO_LARGE)

    def test_duplicate_declaration(self):
        """A second tool declaration is refused."""
        h = self.harness
        protocol, transport = h.connect()
        protocol.dataReceived(
            handshake(h.key) + message("manifest_declaration", echo_manifest())
            + message("tool_declaration", [echo_tool_provider()]) * 2
        )
        self.assertRefused(transport, "register failed, tool declaration already registered")

    def test_end_without_provider(self):
        """``end`` without a provider declaration is refused."""
        h = self.harness
        protocol, transport = h.connect()
        protocol.dataReceived(handshake(h.key) + message("manifest_declaration", echo_manifest()) + END)
        self.assertRefused(transport, hs.NO_PROVIDER)

    def test_handshake_line_too_large(self):
        """A first line over 1 KiB is refused before its newline, and the key is never looked up."""
        h = self.harness
        protocol, transport = h.connect()
        protocol.dataReceived(b'{"type":"handshake","data":{"key":"' + b"k" * hs.MAX_HANDSHAKE_SIZE)
        self.assertRefused(transport, hs.HANDSHAKE_TOO_LARGE)
        self.assertEqual(h.persistence.calls, [])

    def test_nothing_read_until_the_key_is_checked(self):
        """Once the handshake line is in, reading stops until the key is accepted; then registration goes on."""
        h = self.harness
        checks = []

        class PendingKeys:
            def tenant_of(self, key):
                checks.append(Deferred())
                return checks[-1]

        h.factory.keys = PendingKeys()
        protocol, transport = h.connect()
        protocol.dataReceived(registration(h.key))
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(checks), 1)
        checks[0].callback(TENANT)
        self.assertEqual(transport.producerState, "producing")
        self.assertIsNotNone(h.installation())

    def test_paused_peer_refused_on_a_wrong_key(self):
        """A peer whose key is wrong is refused while its reading is paused, and the connection closes."""
        h = self.harness
        protocol, transport = h.connect()
        protocol.dataReceived(handshake("not-a-key") + b"x" * 5000)
        self.assertRefused(transport, hs.INVALID_KEY)

    def test_no_end_deadline(self):
        """A registration that never ends is closed 10 s after connecting."""
        h = self.harness
        protocol, transport = h.connect()
        protocol.dataReceived(handshake(h.key) + message("manifest_declaration", echo_manifest()))
        h.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(0.1)
        self.assertRefused(transport, hs.HANDSHAKE_TIMEOUT)

    def test_slowloris(self):
        """Bytes trickled slower than the deadline do not extend it."""
        h = self.harness
        protocol, transport = h.connect()
        data = registration(h.key)
        for index in range(20):
            protocol.dataReceived(data[index : index + 1])
            h.clock.advance(0.5)
        self.assertRefused(transport, hs.HANDSHAKE_TIMEOUT)

    def test_no_database_work_without_end(self):
        """A connection that never reached end costs one key lookup at most, and no writes."""
        h = self.harness
        other = DebuggingKeys(h.clock, h.memory, new_key=lambda: next(KEYS))
        key = self.successResultOf(Deferred.fromCoroutine(other.key_for(OTHER_TENANT)))
        protocol, transport = h.connect()
        protocol.dataReceived(handshake(key) + message("manifest_declaration", echo_manifest()))
        h.disconnect(protocol)
        self.assertEqual(h.persistence.calls, ["get_debugging_key"])
        self.assertTrue(protocol.closed.called)

    def test_connection_cap(self):
        """Above the maximum, a new connection is told the server is busy."""
        h = DebugHarness(self, max_connections=2)
        h.connect()
        first, _ = h.connect()
        protocol, transport = h.connect()
        self.assertEqual(transport.value(), SERVER_BUSY.encode() + b"\n")
        self.assertTrue(transport.disconnecting)
        h.disconnect(protocol)
        h.disconnect(first)
        _, transport = h.connect()
        self.assertEqual(transport.value(), b"")

    def test_tenant_cap(self):
        """Above the tenant's maximum, its next connection is refused; other tenants are not."""
        h = DebugHarness(self, max_tenant_connections=1)
        first, _ = h.register()
        _, transport = h.register()
        self.assertEqual(transport.value(), TENANT_BUSY.encode() + b"\n")
        _, transport = h.register(key=h.key_for(OTHER_TENANT))
        self.assertEqual(transport.value(), b"")
        h.disconnect(first)
        _, transport = h.register()
        self.assertEqual(transport.value(), b"")


class DisconnectTests(SynchronousTestCase):
    """What happens when a registered plugin goes away."""

    def setUp(self):
        super().setUp()
        self.harness = DebugHarness(self)
        self.protocol, self.transport = self.harness.register()
        self.identifier = self.harness.installation().plugin_unique_identifier
        self.runtime = self.harness.registry.get(self.identifier)

    def assertGone(self):
        h = self.harness
        self.assertIsNone(h.registry.get(self.identifier))
        self.assertIsNone(h.installation())
        self.assertIsNone(h.run(h.memory.get_plugin(self.identifier)))
        self.assertIsNone(h.run(h.installations.get(TENANT, "acme/echo")))
        self.assertFalse(self.runtime.is_ready())
        self.assertTrue(self.protocol.closed.called)

    def test_disconnect(self):
        """Open sessions fail at once; the plugin is unregistered and uninstalled."""
        h = self.harness
        # warm the installation cache: it must be invalidated
        self.assertIsNotNone(h.run(h.installations.get(TENANT, "acme/echo")))
        listeners = [RecordingListener(), RecordingListener()]
        for index, listener in enumerate(listeners):
            self.runtime.open_session(f"s{index}", request(f"s{index}"), listener)
        h.disconnect(self.protocol)
        for listener in listeners:
            self.assertEqual(listener.calls, [("error", "ConnectionClosedError", CONNECTION_CLOSED_MESSAGE, None)])
        self.assertGone()
        self.assertRaises(Exception, self.runtime.open_session, "s9", request("s9"), RecordingListener())

    def test_heartbeat_loss(self):
        """No heartbeat for 60 s closes the connection; then it is uninstalled."""
        h = self.harness
        h.clock.advance(50)
        self.assertFalse(self.transport.disconnecting)
        h.clock.advance(20)
        self.assertTrue(self.transport.disconnecting)
        h.disconnect(self.protocol)
        self.assertGone()

    def test_heartbeats_keep_alive(self):
        """Heartbeats every 10 s keep the connection; other traffic does not count."""
        h = self.harness
        for _ in range(20):
            h.clock.advance(10)
            self.protocol.dataReceived(HEARTBEAT)
        self.assertFalse(self.transport.disconnecting)
        for _ in range(8):
            h.clock.advance(10)
            self.protocol.dataReceived(b'{"event":"log","data":{"level":"INFO","message":"x"}}\n')
        self.assertTrue(self.transport.disconnecting)

    def test_stop(self):
        """stop() waits for open sessions, closes, and fires once cleaned up."""
        h = self.harness
        listener = RecordingListener()
        self.runtime.open_session("s1", request("s1"), listener)
        stopped = self.runtime.stop()
        self.assertFalse(self.runtime.is_ready())
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(session_line("s1", "end", {}))
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(stopped)
        h.disconnect(self.protocol)
        self.successResultOf(stopped)
        self.assertEqual(listener.calls, [("end",)])
        self.assertGone()

    def test_shutdown_ends_open_sessions_with_the_reason(self):
        """The registry's stop_all waits the grace period, then open sessions get the shutdown error and the connection closes."""
        h = self.harness
        listener = RecordingListener()
        self.runtime.open_session("s1", request("s1"), listener)
        stopped = h.registry.stop_all()
        h.clock.advance(5.9)
        self.assertEqual((listener.calls, self.transport.disconnecting), ([], False))
        h.clock.advance(0.1)
        self.assertEqual(
            listener.calls, [("error", "PluginDaemonInternalServerError", "the plugin daemon is shutting down", None)]
        )
        self.assertTrue(self.transport.disconnecting)
        h.disconnect(self.protocol)
        self.successResultOf(stopped)

    def test_registry_stop_all(self):
        """The registry's stop_all stops debug runtimes too."""
        h = self.harness
        stopped = h.registry.stop_all()
        self.assertTrue(self.transport.disconnecting)
        h.disconnect(self.protocol)
        self.successResultOf(stopped)
        self.assertIsNone(h.installation())

    def test_oversized_line(self):
        """A plugin line over the limit closes the connection."""
        h = DebugHarness(self, max_line_size=100_000)
        protocol, transport = h.register()
        protocol.dataReceived(b"x" * 100_001)
        self.assertTrue(transport.disconnecting)


class _PluginProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.output = b""

    def kill(self) -> None:
        """SIGKILL the plugin, if it still runs."""
        try:
            self.transport.signalProcess(signal.SIGKILL)
        except ProcessExitedAlready:
            pass

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-8192:]

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


async def start_remote_plugin(testcase, reactor, files: dict, port: int, key: str) -> _PluginProcess:
    """
    Write ``files`` to a new directory, build its venv with the real SDK and
    run it in remote mode against the debug port ``port`` with ``key``;
    the test kills it and waits for its end when it is over.
    """
    from difydaemon.testing import sdk

    working_dir = os.path.abspath(testcase.mktemp())
    for path, content in files.items():
        target = os.path.join(working_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)
    python = await sdk.environment_builder(reactor).build(working_dir, "3.12", lambda message: None)
    with open(os.path.join(working_dir, ".env"), "w") as f:
        f.write(f"INSTALL_METHOD=remote\nREMOTE_INSTALL_URL=127.0.0.1:{port}\nREMOTE_INSTALL_KEY={key}\n")
    # what a local plugin would get: no INSTALL_METHOD (from .env instead), no PYTHONPATH
    env = plugin_environment(os.environ)
    plugin = _PluginProcess()
    reactor.spawnProcess(plugin, python, [python, "-m", "main"], env=env, path=working_dir)
    testcase.addCleanup(lambda: plugin.ended)
    testcase.addCleanup(plugin.kill)
    return plugin


class RealPluginTests(AsyncTestCase):
    """The real SDK echo plugin in remote mode against a real debug port."""

    timeout = 300

    async def test_echo_plugin(self):
        """The plugin registers, answers a tool call through the runtime, and is uninstalled when killed."""
        from twisted.internet import reactor

        from difydaemon.testing.packages import echo_plugin_files

        persistence = MemoryPersistence(reactor)
        registry = RuntimeRegistry(reactor)
        installations = InstallationCache(reactor, persistence)
        keys = DebuggingKeys(reactor, persistence)
        key = await keys.key_for(TENANT)
        factory = DebugServerFactory(reactor, keys, persistence, MemoryObjectStorage(), registry, installations)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        plugin = await start_remote_plugin(self, reactor, echo_plugin_files(), port.getHost().port, key)

        runtime = None
        for _ in range(600):
            installation = await persistence.get_installation(TENANT, "acme/echo")
            if installation is not None:
                runtime = registry.get(installation.plugin_unique_identifier)
                if runtime is not None:
                    break
            await _sleep(reactor, 0.1)
        self.assertIsNotNone(runtime, plugin.output.decode("utf-8", "replace"))
        self.assertEqual(installation.runtime_type, "remote")

        listener = RecordingListener()
        finished: Deferred = Deferred()
        original_end = listener.end
        listener.end = lambda: (original_end(), finished.callback(None))
        runtime.open_session("11111111-2222-3333-4444-555555555555", request("11111111-2222-3333-4444-555555555555"), listener)
        await finished
        self.assertEqual(
            [call[:2] for call in listener.calls],
            [
                ("stream", {"type": "text", "message": {"text": "hi"}, "meta": None}),
                ("stream", {"type": "json", "message": {"json_object": {"echo": "hi", "length": 2}}, "meta": None}),
                ("end",),
            ],
        )

        connection = next(iter(factory.connections))
        plugin.kill()
        await plugin.ended
        await connection.closed
        self.assertIsNone(registry.get(installation.plugin_unique_identifier))
        self.assertIsNone(await persistence.get_installation(TENANT, "acme/echo"))


def _sleep(reactor, seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
