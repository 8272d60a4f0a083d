"""
Redis servers of a test's own, for tests that need Redis to go away.

Outage tests must never stop the machine's shared Redis (127.0.0.1:6379),
so :class:`PrivateRedis` runs a ``redis-server`` of its own: a free port on
127.0.0.1, a temporary directory, no persistence (``--save ""
--appendonly no``).  The test starts, stops, kills, freezes (``SIGSTOP``) and
thaws it at will; :func:`private_redis` also destroys it at clean-up, and an
``atexit`` hook destroys whatever an interrupted run left behind.  The server
is started through the daemon's parent-death launcher, so it dies with the
test process even when that is killed.

:func:`shared_redis_prefix` gives a test a key prefix of its own on the
shared Redis and deletes every key under it at clean-up.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile

from attrs import frozen

from difydaemon.testing.server_process import ServerProcess

#: The machine's shared Redis (never stopped by tests).
SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379


def redis_server_binary() -> str:
    """The ``redis-server`` program; RuntimeError when it is not installed."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return found


def ping(host: str, port: int, timeout: float = 0.5, tls: bool = False) -> bool:
    """Whether a Redis answers PING at ``host:port`` now (blocking, loopback only)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if tls:
                return True
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class PrivateRedis(ServerProcess):
    """
    One ``redis-server`` in a temporary directory.

    :param reactor: for waiting.
    :param options: more ``redis-server`` command-line options
        (``["--requirepass", "secret"]``, TLS settings ...).
    :param config: text of a configuration file to start from (Sentinel
        needs one it can rewrite); its options come before ``options``.
    :param sentinel: start it as a Sentinel.
    :param tls: a :class:`TLSFiles`: serve TLS only, with that certificate
        (clients need not show one).
    :ivar port: the TCP port on 127.0.0.1 (TLS only with ``tls``).
    """

    name = "redis-server"

    def __init__(self, reactor, options=(), config: str | None = None, sentinel: bool = False, tls=None) -> None:
        super().__init__(reactor)
        self.directory = tempfile.mkdtemp(prefix="difydaemon-redis-")
        self._options = list(options)
        self._tls = tls
        self._config = config
        self._sentinel = sentinel
        self._log = os.path.join(self.directory, "server.log")

    def server_log(self) -> str:
        """What the server logged (for failure messages)."""
        try:
            with open(self._log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _answers(self) -> bool:
        return ping(self.host, self.port, tls=self._tls is not None)

    def _remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _argv(self) -> list[str]:
        argv = [redis_server_binary()]
        if self._config is not None:
            path = os.path.join(self.directory, "redis.conf")
            with open(path, "w", encoding="utf-8") as f:
                f.write(self._config)
            argv.append(path)
        if self._tls is not None:
            argv += [
                "--tls-port", str(self.port),
                "--tls-cert-file", self._tls.certificate,
                "--tls-key-file", self._tls.key,
                "--tls-ca-cert-file", self._tls.ca,
                "--tls-auth-clients", "no",
            ]
        argv += [
            "--port", "0" if self._tls is not None else str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", self._log,
            "--daemonize", "no",
            *self._options,
        ]
        if self._sentinel:
            argv.append("--sentinel")
        return argv


async def private_redis(case, reactor, **kwargs) -> PrivateRedis:
    """A started :class:`PrivateRedis` that ``case``'s clean-up destroys."""
    server = PrivateRedis(reactor, **kwargs)
    case.addCleanup(server.destroy)
    await server.start()
    return server


@frozen
class TLSFiles:
    """PEM files of a test CA and of a server certificate it signed."""

    ca: str
    certificate: str
    key: str


def make_tls_files(directory: str, hosts=("127.0.0.1",)) -> TLSFiles:
    """
    A fresh CA and a server certificate for ``hosts`` (IP addresses or
    names), written to ``directory``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, ca, names=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    def alternative_name(host):
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("difydaemon test CA", "difydaemon test CA", ca_key.public_key(), ca_key, True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate(
        "redis", "difydaemon test CA", server_key.public_key(), ca_key, False, [alternative_name(h) for h in hosts]
    )
    files = TLSFiles(
        ca=os.path.join(directory, "ca.pem"),
        certificate=os.path.join(directory, "server.pem"),
        key=os.path.join(directory, "server.key"),
    )
    for path, data in (
        (files.ca, ca.public_bytes(serialization.Encoding.PEM)),
        (files.certificate, server.public_bytes(serialization.Encoding.PEM)),
        (
            files.key,
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return files


def sentinel_config(service_name: str, master_port: int, master_host: str = "127.0.0.1") -> str:
    """The configuration of a Sentinel watching one master (quorum 1)."""
    return (
        f"sentinel monitor {service_name} {master_host} {master_port} 1\n"
        f"sentinel down-after-milliseconds {service_name} 1000\n"
    )


def new_prefix() -> str:
    """A key prefix no other test uses."""
    return "difydaemon_test_" + secrets.token_hex(6)


async def delete_prefix(connection, prefix: str) -> int:
    """
    Delete every key under ``prefix:`` through ``connection`` (a
    RedisConnection); how many went.
    """
    deleted = 0
    cursor = "0"
    pattern = prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?").replace("[", "\\[") + ":*"
    while True:
        cursor, keys = await connection.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 500)
        if keys:
            deleted += await connection.execute("DEL", *keys)
        if str(cursor) == "0":
            return deleted


#: The variables every configuration needs, for building a config in tests.
_BASE_ENVIRONMENT = {
    "SERVER_KEY": "test-server-key",
    "DIFY_INNER_API_URL": "http://127.0.0.1:1",
    "DIFY_INNER_API_KEY": "test-inner-key",
    "PLATFORM": "local",
    "PLUGIN_REMOTE_INSTALLING_ENABLED": "false",
}


def redis_config(host: str = SHARED_HOST, port: int = SHARED_PORT, prefix: str | None = None, **variables):
    """
    A daemon Config naming a Redis (``variables`` are more ``REDIS_*``
    settings, by name).
    """
    from difydaemon.config import load_config

    environ = dict(_BASE_ENVIRONMENT, REDIS_HOST=host, REDIS_PORT=str(port), **variables)
    if prefix is not None:
        environ["REDIS_KEY_PREFIX"] = prefix
    return load_config(environ)


async def shared_redis_prefix(case, reactor) -> str:
    """
    A fresh key prefix on the shared Redis whose keys ``case``'s clean-up
    deletes; fails the test when the shared Redis does not answer.
    """
    from difydaemon.coordination.redis.connection import CommandProtocol, ConnectionSettings, RedisConnection
    from difydaemon.coordination.redis.endpoints import server_endpoint

    if not ping(SHARED_HOST, SHARED_PORT):
        case.fail(
            f"the shared Redis at {SHARED_HOST}:{SHARED_PORT} does not answer; these tests are required "
            "(.ci/run starts it)"
        )
    prefix = new_prefix()
    connection = RedisConnection(
        reactor, server_endpoint(reactor, SHARED_HOST, SHARED_PORT, 5.0), ConnectionSettings(), CommandProtocol
    )

    async def clean_up():
        try:
            await delete_prefix(connection, prefix)
        finally:
            await connection.close()

    from twisted.internet.defer import Deferred

    case.addCleanup(lambda: Deferred.fromCoroutine(clean_up()))
    return prefix
