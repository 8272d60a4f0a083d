"""
The remote-debug runtime (``runtimes.md`` §2, ``http-api.md`` §5.8, §7.4):
plugin authors run their plugin on their own machine and it dials into the
daemon over TCP with a debugging key; it is installed for the key's tenant
while the connection lasts.

:class:`DebugServerFactory` listens; each connection is a
:class:`DebugConnection`, which frames bytes and hands them to the pure
parsers (:mod:`difydaemon.runtimes.handshake` until ``end``, then the §0
plugin decoder of :mod:`difydaemon.runtimes.codec`).  Once registered, a
connection is served by a :class:`DebugRuntime`, which behaves towards
dispatch exactly like a :class:`~difydaemon.runtimes.local.LocalRuntime`.

Latency: the SDK writes every message as two small sends (the JSON, then
``\\n\\n``) on a socket with Nagle's algorithm on, so its second send waits
for our ACK of the first, which Linux delays by up to 40 ms when the
daemon has nothing to send back.  Accepted sockets therefore get
``TCP_NODELAY`` and, after every read, ``TCP_QUICKACK`` (which Linux clears
by itself after a while): the ACK leaves at once and the SDK's second send
follows (see ``bench/debug_latency.py``).

Decisions where the Go daemon's behaviour is unsafe or unclear:

- When the tenant already has the plugin_id installed: an installation made
  by an earlier debug connection (``runtime_type`` remote) with the same
  identifier is reused, and one with another identifier (another build of
  the plugin) is replaced; a local or marketplace installation is left
  alone and the connection refused ("register failed, plugin ... is already
  installed ..."), because uninstalling it on disconnect, as reusing it
  would, destroys the user's installation.
- Only the connection that installed (or last took over) an installation
  uninstalls it on disconnect; when another live connection serves the
  same identifier for the tenant, the installation passes to it instead.
- The handshake deadline (from connect to ``end``) ends with the line
  "handshake failed, timed out", like every other refusal.
- Until its key is checked a peer is anyone: up to and including its
  handshake line it may send 1 KiB
  (:data:`~difydaemon.runtimes.handshake.MAX_HANDSHAKE_SIZE`), and once
  that line is in nothing more is read from it until the key is accepted.
"""

from __future__ import annotations

import socket

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon import errors
from difydaemon.blocking import InlineRunner
from difydaemon.interfaces import IPluginRuntime
from difydaemon.storage.paths import StoragePaths
from difydaemon.runtimes.codec import (
    Heartbeat,
    Log,
    MalformedLine,
    OversizedLine,
    PluginErrorEvent,
    PluginOutputDecoder,
    SessionMessage,
    encode_request,
)
from difydaemon.runtimes.handshake import (
    DEFAULT_MAX_ASSET_SIZE,
    DEFAULT_MAX_LINE_SIZE,
    HANDSHAKE_TIMEOUT,
    INVALID_KEY,
    HandshakeDecoder,
    KeyOffered,
    Registered,
    Rejected,
    refusal_line,
    remote_plugin,
)
from difydaemon.runtimes.process import log_level
from difydaemon.runtimes.sessions import SessionDrain, SessionTable

SERVER_BUSY = "server is busy now, please try again later"
TENANT_BUSY = "handshake failed, too many debugging connections for this workspace"
CONNECTION_CLOSED_ERROR_TYPE = errors.ConnectionClosedError.error_type
CONNECTION_CLOSED_MESSAGE = "Connection closed unexpectedly"
NOT_CONNECTED_MESSAGE = "debugging plugin is not connected"
RUNTIME_TYPE = "remote"
INSTALL_SOURCE = "remote"

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# connection states
HANDSHAKING = "handshaking"
INSTALLING = "installing"
RUNNING = "running"
STOPPING = "stopping"
CLOSING = "closing"
CLOSED = "closed"


@implementer(IPluginRuntime)
class DebugRuntime:
    """
    The IPluginRuntime of one registered debug connection.

    :ivar tenant_id: the tenant it is installed for.
    :ivar plugin_id: ``author/name``.
    :ivar sessions: the connection's open sessions.
    """

    runtime_type = RUNTIME_TYPE

    def __init__(
        self, connection, plugin_unique_identifier: str, plugin_id: str, tenant_id: str, declaration: dict | None = None
    ) -> None:
        self._connection = connection
        self.plugin_unique_identifier = plugin_unique_identifier
        self.plugin_id = plugin_id
        self.tenant_id = tenant_id
        self.declaration = declaration if declaration is not None else {}
        self.sessions = connection.sessions

    def is_ready(self) -> bool:
        """True while the connection is up and not stopping."""
        return self._connection.state == RUNNING

    def open_session(self, session_id: str, request: dict, listener):
        """
        Route the session's messages to ``listener``, then write ``request``
        as one ``\\n``-terminated line.

        :raises difydaemon.errors.InternalServerError: the plugin is gone or
            stopping.
        """
        if self._connection.state != RUNNING:
            raise errors.InternalServerError(NOT_CONNECTED_MESSAGE)
        handle = self.sessions.open(session_id, listener)
        self._connection.transport.write(encode_request(request))
        return handle

    def send(self, session_id: str, message: dict) -> None:
        """
        Write one more message (a backwards response) to the plugin.

        :raises difydaemon.errors.ConnectionClosedError: the session is not
            open on this connection.
        """
        if session_id not in self.sessions or self._connection.state not in (RUNNING, STOPPING):
            raise errors.ConnectionClosedError(f"plugin session {session_id} is not open")
        self._connection.transport.write(encode_request(message))

    def stop(self, drain_timeout: float | None = None, reason: str | None = None) -> Deferred:
        """
        Refuse new sessions, wait for open ones (up to ``drain_timeout``,
        by default the factory's drain timeout), then close the connection.
        Fires (with None) once the plugin is unregistered and uninstalled.

        :param reason: when given, the sessions still open at the end of the
            wait are failed with it (a -500 whose message is ``reason``)
            rather than with "Connection closed unexpectedly".
        """
        return self._connection.stop(drain_timeout, reason)


class DebugConnection(Protocol):
    """
    One debug plugin's TCP connection: handshake, registration, then the
    plugin protocol of ``runtimes.md`` §0.

    :ivar state: ``handshaking``, ``installing``, ``running``,
        ``stopping``, ``closing`` (refused; the line is being flushed) or
        ``closed``.
    :ivar tenant_id: set once the key is accepted.
    :ivar runtime: the :class:`DebugRuntime`, once registered.
    :ivar installation_id: the installation it made or reused.
    :ivar tenant_slot: the tenant whose connection count includes this
        connection (the factory's bookkeeping).
    :ivar closed: fires (with None) when the connection is gone and
        everything it installed is cleaned up.
    """

    log = Logger()

    def __init__(self, factory: DebugServerFactory) -> None:
        self.factory = factory
        self._reactor = factory.reactor
        self.state = HANDSHAKING
        self.tenant_id: str | None = None
        self.plugin = None
        self.runtime: DebugRuntime | None = None
        self.installation_id: str | None = None
        self.sessions = SessionTable(self._reactor, factory.session_timeout)
        self.last_heartbeat: float | None = None
        self.closed: Deferred = Deferred()
        self._handshake = HandshakeDecoder(factory.max_line_size, factory.max_asset_size)
        self._decoder: PluginOutputDecoder | None = None
        self._registration = None
        self._deadline = None
        self._monitor: LoopingCall | None = None
        self._socket = None
        self._peer = "?"
        self.tenant_slot: str | None = None
        self._drain: SessionDrain | None = None
        self._reading_paused = False

    # -- connection life --------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        if not self.factory.connection_opened(self):
            self.log.warn("debug connection from {peer} refused: too many connections", peer=self._peer)
            self._refuse(SERVER_BUSY)
            return
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None and self.factory.no_delay:
            set_no_delay(True)
        if self.factory.quick_ack and _QUICKACK is not None:
            handle = getattr(self.transport, "getHandle", None)
            sock = handle() if handle is not None else None
            if sock is not None and hasattr(sock, "setsockopt"):
                self._socket = sock
        self._deadline = self._reactor.callLater(self.factory.handshake_timeout, self._handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        if self._socket is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None
        if self._decoder is not None:
            self._plugin_data(data)
        elif self.state == HANDSHAKING:
            self._handshake_data(data)

    def connectionLost(self, reason=None) -> None:
        previous = self.state
        self.state = CLOSED
        self._cancel_deadline()
        if self._monitor is not None and self._monitor.running:
            self._monitor.stop()
        self.factory.connection_closed(self)
        if previous in (RUNNING, STOPPING):
            self._finish(self._teardown())
        elif previous != INSTALLING:
            # Never registered: nothing to clean up.  An installation in
            # progress cleans up after itself when it sees the state.
            self.closed.callback(None)

    def _finish(self, coroutine) -> None:
        d = Deferred.fromCoroutine(coroutine)
        d.addErrback(
            lambda failure: self.log.failure(
                "cleaning up debug plugin {identifier} failed",
                failure,
                identifier=self.plugin.identifier if self.plugin else None,
            )
        )
        d.addBoth(lambda _: self.closed.callback(None))

    def _refuse(self, message: str) -> None:
        """Send one plain line and close, once."""
        if self.state in (CLOSING, CLOSED):
            return
        self.state = CLOSING
        self._cancel_deadline()
        self.transport.write(message.encode("utf-8") + b"\n")
        self.transport.loseConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.state == HANDSHAKING:
            self.log.warn("debug connection from {peer}: handshake timed out", peer=self._peer)
            self._refuse(HANDSHAKE_TIMEOUT)

    # -- handshake --------------------------------------------------------

    def _handshake_data(self, data: bytes) -> None:
        for item in self._handshake.feed(data):
            if type(item) is KeyOffered:
                # read nothing more from an unauthenticated peer: what came
                # with its handshake line is all it may have sent so far
                self._reading_paused = True
                self.transport.pauseProducing()
                self.factory.keys.tenant_of(item.key).addCallbacks(self._key_checked, self._key_check_failed)
            elif type(item) is Registered:
                self._registration = item.registration
                # What follows ``end`` is plugin protocol already (the
                # first heartbeat); heartbeats count from now.
                self.last_heartbeat = self._reactor.seconds()
                self._decoder = PluginOutputDecoder(self.factory.max_line_size)
                if item.rest:
                    self._plugin_data(item.rest)
                self._maybe_install()
            elif type(item) is Rejected:
                self.log.info(
                    "debug connection from {peer} refused: {reason}", peer=self._peer, reason=item.message
                )
                self._refuse(item.message)

    def _key_checked(self, tenant_id) -> None:
        if self.state != HANDSHAKING:
            return
        if tenant_id is None:
            self.log.info("debug connection from {peer}: invalid key", peer=self._peer)
            self._refuse(INVALID_KEY)
            return
        if not self.factory.tenant_connection_opened(self, tenant_id):
            self._refuse(TENANT_BUSY)
            return
        self.tenant_slot = tenant_id
        self.tenant_id = tenant_id
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._maybe_install()

    def _key_check_failed(self, failure) -> None:
        self.log.failure("checking a debugging key failed", failure)
        if self.state == HANDSHAKING:
            self._refuse(INVALID_KEY)

    def _maybe_install(self) -> None:
        if self.state != HANDSHAKING or self.tenant_id is None or self._registration is None:
            return
        self.state = INSTALLING
        self._cancel_deadline()
        d = Deferred.fromCoroutine(self._install())
        d.addErrback(lambda failure: self._install_crashed(failure))

    async def _install(self) -> None:
        factory = self.factory
        try:
            plugin = await factory.runner.run(remote_plugin, self._registration, self.tenant_id)
        except errors.DaemonError as exc:
            self.log.info("debug plugin from {peer} refused: {reason}", peer=self._peer, reason=exc.message)
            self._refuse_while_installing(refusal_line(exc))
            return
        self._registration = None
        self.plugin = plugin
        for asset_id, content in plugin.assets.items():
            await factory.storage.save(factory.paths.asset(asset_id), content)
        try:
            installation = await factory.install(self, plugin)
        except errors.DaemonError as exc:
            self.log.info(
                "debug plugin {plugin_id} for tenant {tenant_id} refused: {reason}",
                plugin_id=plugin.plugin_id, tenant_id=self.tenant_id, reason=exc.message,
            )
            self._refuse_while_installing(refusal_line(exc))
            return
        self.installation_id = installation.id
        self.runtime = DebugRuntime(self, plugin.identifier, plugin.plugin_id, self.tenant_id, plugin.declaration)
        if self.state == CLOSED:
            # Gone while installing: undo at once.
            await self._teardown()
            self.closed.callback(None)
            return
        self.state = RUNNING
        factory.registry.register(self.runtime)
        factory.installations.invalidate(self.tenant_id, plugin.plugin_id)
        monitor = LoopingCall(self._check_heartbeat)
        monitor.clock = self._reactor
        self._monitor = monitor
        monitor.start(factory.heartbeat_check_interval, now=False).addErrback(
            lambda failure: self.log.failure("heartbeat monitor failed", failure)
        )
        self.log.info(
            "debug plugin {identifier} connected from {peer} for tenant {tenant_id}",
            identifier=plugin.identifier, peer=self._peer, tenant_id=self.tenant_id,
        )

    def _refuse_while_installing(self, message: str) -> None:
        if self.state == CLOSED:
            self.closed.callback(None)
            return
        self.state = HANDSHAKING
        self._refuse(message)

    def _install_crashed(self, failure) -> None:
        self.log.failure("installing a debug plugin from {peer} failed", failure, peer=self._peer)
        if self.state == CLOSED:
            if not self.closed.called:
                self.closed.callback(None)
            return
        self.state = HANDSHAKING
        self._refuse("register failed, internal error")

    # -- registered --------------------------------------------------------

    def _plugin_data(self, data: bytes) -> None:
        sessions = self.sessions
        for item in self._decoder.feed(data):
            kind = type(item)
            if kind is SessionMessage:
                sessions.deliver(item)
            elif kind is Heartbeat:
                self.last_heartbeat = self._reactor.seconds()
            else:
                self._other(item)

    def _other(self, item) -> None:
        identifier = self.plugin.identifier if self.plugin is not None else self._peer
        if isinstance(item, Log):
            self.log.emit(
                log_level(item.level), "debug plugin {identifier}: {plugin_message}",
                identifier=identifier, plugin_message=item.message, plugin_level=item.level,
            )
        elif isinstance(item, PluginErrorEvent):
            self.log.error("debug plugin {identifier} reported an error: {error}", identifier=identifier, error=item.data)
        elif isinstance(item, MalformedLine):
            self.log.warn(
                "debug plugin {identifier} sent a malformed session message ({reason})",
                identifier=identifier, reason=item.reason,
            )
        elif isinstance(item, OversizedLine):
            self.log.error(
                "debug plugin {identifier} sent a line of more than {limit} bytes; closing",
                identifier=identifier, limit=self._decoder.max_line_size,
            )
            self.transport.abortConnection()
        else:
            self.log.debug("debug plugin {identifier} sent a line without an event", identifier=identifier)

    def _check_heartbeat(self) -> None:
        silent = self._reactor.seconds() - self.last_heartbeat
        if silent > self.factory.heartbeat_timeout and self.state in (RUNNING, STOPPING):
            self.log.warn(
                "debug plugin {identifier}: no heartbeat for {silent:.0f} s; closing",
                identifier=self.plugin.identifier, silent=silent,
            )
            self.transport.abortConnection()

    def stop(self, drain_timeout: float | None = None, reason: str | None = None) -> Deferred:
        """See :meth:`DebugRuntime.stop`; a later stop may shorten the wait."""
        timeout = self.factory.drain_timeout if drain_timeout is None else drain_timeout
        if self.state == RUNNING:
            self.state = STOPPING
            self._drain = SessionDrain(self._reactor, [self.sessions], self._drained)
            self._drain.start(timeout, reason)
        elif self.state == STOPPING and self._drain is not None:
            self._drain.limit(timeout, reason)
        elif self.state not in (CLOSED, INSTALLING):
            self.transport.loseConnection()
        waiter: Deferred = Deferred()

        def cleaned_up(result):
            waiter.callback(None)
            return result

        self.closed.addBoth(cleaned_up)
        return waiter

    def _drained(self) -> None:
        if self.state != CLOSED:
            self.transport.loseConnection()

    async def _teardown(self) -> None:
        """Fail open sessions, unregister, uninstall (when ours), invalidate."""
        self.sessions.fail_all(CONNECTION_CLOSED_ERROR_TYPE, CONNECTION_CLOSED_MESSAGE)
        factory = self.factory
        if self.runtime is not None:
            factory.registry.unregister(self.runtime)
        await factory.uninstall(self)
        self.log.info(
            "debug plugin {identifier} of tenant {tenant_id} disconnected",
            identifier=self.plugin.identifier, tenant_id=self.tenant_id,
        )


class DebugServerFactory(ServerFactory):
    """
    The listener of debug plugins (``PLUGIN_REMOTE_INSTALLING_HOST:PORT``).

    :param reactor: for timers.
    :param keys: a :class:`~difydaemon.management.debugging.DebuggingKeys`.
    :param persistence: an IPersistence.
    :param storage: an IObjectStorage (icons go under the media prefix).
    :param registry: the RuntimeRegistry that dispatch asks.
    :param installations: the InstallationCache to invalidate.
    :param paths: the storage prefixes.
    :param runner: where the declaration is built and hashed (a thread
        pool in the daemon; inline by default).
    :param max_connections: ``PLUGIN_REMOTE_INSTALLING_MAX_CONN``.
    :param max_tenant_connections:
        ``PLUGIN_REMOTE_INSTALLING_MAX_SINGLE_TENANT_CONN``.
    :param handshake_timeout: seconds from connect to ``end``.
    :param heartbeat_timeout: seconds without a heartbeat before closing.
    :param heartbeat_check_interval: how often that is checked.
    :param session_timeout: seconds before a session is "killed by
        timeout" (``PLUGIN_MAX_EXECUTION_TIMEOUT``).
    :param drain_timeout: seconds a stop waits for open sessions
        (default: ``session_timeout``).
    :param no_delay: set ``TCP_NODELAY`` on accepted sockets.
    :param quick_ack: set ``TCP_QUICKACK`` after every read (Linux).
    :param guard: the
        :class:`~difydaemon.coordination.debug_plugins.DebugInstallGuard`
        fencing installations against other replicas' sweeps (None: alone,
        unfenced).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        keys,
        persistence,
        storage,
        registry,
        installations,
        paths: StoragePaths = StoragePaths(),
        runner=None,
        max_connections: int = 256,
        max_tenant_connections: int = 5,
        handshake_timeout: float = 10.0,
        heartbeat_timeout: float = 60.0,
        heartbeat_check_interval: float = 10.0,
        session_timeout: float | None = 600.0,
        drain_timeout: float | None = None,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        max_asset_size: int = DEFAULT_MAX_ASSET_SIZE,
        no_delay: bool = True,
        quick_ack: bool = True,
        guard=None,
    ) -> None:
        self.reactor = reactor
        self.keys = keys
        self.persistence = persistence
        self.storage = storage
        self.registry = registry
        self.installations = installations
        self.paths = paths
        self.runner = runner if runner is not None else InlineRunner()
        self.max_connections = max_connections
        self.max_tenant_connections = max_tenant_connections
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_check_interval = heartbeat_check_interval
        self.session_timeout = session_timeout
        self.drain_timeout = session_timeout if drain_timeout is None else drain_timeout
        self.max_line_size = max_line_size
        self.max_asset_size = max_asset_size
        self.no_delay = no_delay
        self.quick_ack = quick_ack
        self.guard = guard
        self.connections: set[DebugConnection] = set()
        self._tenant_counts: dict[str, int] = {}
        # (tenant_id, plugin_id) -> the connection whose disconnect uninstalls
        self._owners: dict[tuple, DebugConnection] = {}

    def buildProtocol(self, addr) -> DebugConnection:
        return DebugConnection(self)

    # -- counting -----------------------------------------------------------

    def connection_opened(self, connection: DebugConnection) -> bool:
        """Count a new connection; False (not counted) above the maximum."""
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(connection)
        return True

    def tenant_connection_opened(self, connection: DebugConnection, tenant_id: str) -> bool:
        """Count a connection for its tenant; False above the tenant's maximum."""
        count = self._tenant_counts.get(tenant_id, 0)
        if count >= self.max_tenant_connections:
            return False
        self._tenant_counts[tenant_id] = count + 1
        return True

    def connection_closed(self, connection: DebugConnection) -> None:
        """Forget a connection in every count."""
        self.connections.discard(connection)
        tenant_id = connection.tenant_slot
        if tenant_id is not None:
            connection.tenant_slot = None
            count = self._tenant_counts.get(tenant_id, 0) - 1
            if count > 0:
                self._tenant_counts[tenant_id] = count
            else:
                self._tenant_counts.pop(tenant_id, None)

    # -- installations ---------------------------------------------------------

    async def install(self, connection: DebugConnection, plugin):
        """
        Install ``plugin`` for the connection's tenant, or take over the
        tenant's earlier debug installation of it (see the module's notes),
        and save its declaration.  The connection owns the installation
        afterwards.  Returns the Installation.

        :raises difydaemon.errors.AlreadyInstalledError: the tenant has the
            plugin_id installed some other way.
        """
        tenant_id = connection.tenant_id
        key = (tenant_id, plugin.plugin_id)
        # no other replica's sweep removes the rows while they are written
        lease = await self.guard.hold(tenant_id, plugin.plugin_id) if self.guard is not None else None
        previous_owner = self._owners.get(key)
        # Claimed first, so that the previous owner disconnecting meanwhile
        # does not uninstall what is being taken over.
        self._owners[key] = connection
        try:
            installation = await self._install_rows(tenant_id, plugin)
            await self.persistence.save_declaration(plugin.identifier, plugin.plugin_id, plugin.declaration)
            if self.guard is not None:
                # claimed before the lease goes: a sweep never sees these rows unclaimed
                await self.guard.claim(plugin.identifier)
        except BaseException:
            if self._owners.get(key) is connection:
                if previous_owner is not None and previous_owner.state in (RUNNING, STOPPING):
                    self._owners[key] = previous_owner
                else:
                    del self._owners[key]
            raise
        finally:
            if lease is not None:
                await lease.release()
        self.installations.invalidate(tenant_id, plugin.plugin_id)
        return installation

    def owns(self, tenant_id: str, plugin_id: str) -> bool:
        """Whether a connection here owns the tenant's debug installation of ``plugin_id``."""
        return (tenant_id, plugin_id) in self._owners

    async def _install_rows(self, tenant_id: str, plugin):
        persistence = self.persistence
        for _ in range(3):
            existing = await persistence.get_installation(tenant_id, plugin.plugin_id)
            if existing is None:
                try:
                    return await persistence.install_plugin(
                        tenant_id, plugin.identifier, plugin.plugin_id, RUNTIME_TYPE, INSTALL_SOURCE,
                        {}, plugin.providers, remote_declaration=plugin.declaration,
                    )
                except errors.AlreadyInstalledError:
                    continue  # installed concurrently: look again
            if existing.runtime_type != RUNTIME_TYPE:
                raise errors.AlreadyInstalledError(
                    f"plugin {plugin.plugin_id} is already installed for this workspace;"
                    " uninstall it to debug it"
                )
            if existing.plugin_unique_identifier == plugin.identifier:
                return existing
            # An earlier build of the plugin, from a connection that is gone
            # or about to be: this one replaces it.
            await persistence.uninstall_plugin(tenant_id, existing.id)
            self.installations.invalidate(tenant_id, plugin.plugin_id)
        raise errors.InternalServerError(f"could not install debug plugin {plugin.plugin_id}")

    async def uninstall(self, connection: DebugConnection) -> None:
        """
        Undo what a closed connection installed: uninstall when it owns the
        installation and no other live connection serves the same
        identifier; otherwise hand the installation to that connection.
        """
        plugin = connection.plugin
        key = (connection.tenant_id, plugin.plugin_id)
        if self._owners.get(key) is not connection:
            return
        heir = next(
            (
                other for other in self.connections
                if other is not connection and other.state in (RUNNING, STOPPING)
                and other.tenant_id == connection.tenant_id
                and other.plugin.identifier == plugin.identifier
            ),
            None,
        )
        if heir is not None:
            self._owners[key] = heir
            self.registry.register(heir.runtime)
            return
        del self._owners[key]
        await self.persistence.uninstall_plugin(connection.tenant_id, connection.installation_id)
        self.installations.invalidate(connection.tenant_id, plugin.plugin_id)

    def stop_all(self) -> Deferred:
        """Close every connection at once. Deferred[None] when all are cleaned up."""
        waiters = []
        for connection in list(self.connections):
            waiters.append(connection.closed)
            connection.transport.loseConnection()
        if not waiters:
            return succeed(None)
        return DeferredList(waiters, consumeErrors=True).addCallback(lambda _: None)
