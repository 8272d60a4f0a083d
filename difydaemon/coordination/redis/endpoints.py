"""
How a connection reaches Redis: plain TCP, TLS (``REDIS_USE_SSL``) or the
master a set of Sentinels names (``REDIS_USE_SENTINEL``).

TLS is 1.2 or newer.  ``REDIS_SSL_CERT_REQS=CERT_NONE`` skips checking the
server's certificate; any other value (or none) checks it and its host name
against ``REDIS_SSL_CA_CERTS`` (a PEM file of one or more CA certificates)
or, when that is empty, the platform's trust store.
"""

from __future__ import annotations

import re

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.coordination.redis.connection import (
    CommandProtocol,
    ConnectionSettings,
    send,
)
from difydaemon.errors import CoordinationUnavailableError

log = Logger()

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@implementer(IOpenSSLClientConnectionCreator)
class _UncheckedTLS:
    """TLS 1.2+ that accepts any server certificate (``CERT_NONE``)."""

    def __init__(self) -> None:
        self._options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection


def trust_root_from_pem(pem: bytes):
    """
    The trust root of every certificate in a PEM bundle.

    :raises ValueError: when it holds none.
    """
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate in the CA file")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(block) for block in blocks])


def tls_creator(hostname: str, cert_reqs: str, ca_pem: bytes | None):
    """
    The TLS connection creator for ``hostname``.

    :param cert_reqs: ``REDIS_SSL_CERT_REQS`` (upper case; empty allowed).
    :param ca_pem: the content of ``REDIS_SSL_CA_CERTS``, None for the
        platform's trust store.
    """
    if cert_reqs == "CERT_NONE":
        return _UncheckedTLS()
    trust = trust_root_from_pem(ca_pem) if ca_pem is not None else None
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    )


def server_endpoint(reactor, host: str, port: int, connect_timeout: float, tls=None):
    """
    An endpoint to one server; ``tls`` is None for plain TCP, else a
    function ``hostname -> connection creator`` (see :func:`tls_creator`).
    """
    endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls(host), endpoint)
    return endpoint


def parse_sentinels(entries) -> tuple[tuple[str, int], ...]:
    """
    ``REDIS_SENTINELS`` entries (``host:port``, IPv6 in brackets) as pairs.

    :raises ValueError: for an entry without a valid port.
    """
    parsed = []
    for entry in entries:
        host, colon, port = entry.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a sentinel is host:port, not {entry!r}")
        parsed.append((host.strip("[]"), int(port)))
    return tuple(parsed)


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Reaches the current master of a Sentinel service: before each
    connection attempt the sentinels are asked in turn
    (``SENTINEL get-master-addr-by-name``) until one names it.

    :param sentinels: ``(host, port)`` pairs.
    :param settings: how to log in to a sentinel (its reply timeout bounds
        each question).
    :param connect_timeout: seconds to reach a sentinel or the master.
    :param tls: as for :func:`server_endpoint`, for the master.
    """

    def __init__(self, reactor, sentinels, service_name: str, settings: ConnectionSettings, connect_timeout: float, tls=None) -> None:
        self._reactor = reactor
        self._sentinels = tuple(sentinels)
        self._service_name = service_name
        self._settings = settings
        self._connect_timeout = connect_timeout
        self._tls = tls

    def connect(self, protocolFactory):
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory):
        host, port = await self.master_address()
        endpoint = server_endpoint(self._reactor, host, port, self._connect_timeout, self._tls)
        return await endpoint.connect(protocolFactory)

    async def master_address(self) -> tuple[str, int]:
        """
        The master's ``(host, port)`` per the first sentinel that knows it.

        :raises CoordinationUnavailableError: when none does.
        """
        problems = []
        for host, port in self._sentinels:
            try:
                address = await self._ask(host, port)
            except CoordinationUnavailableError as e:
                problems.append(f"{host}:{port}: {e.reason}")
                continue
            if address is not None:
                return address
            problems.append(f"{host}:{port}: does not know {self._service_name!r}")
        raise CoordinationUnavailableError(f"no sentinel named a master: {'; '.join(problems)}")

    async def _ask(self, host: str, port: int):
        factory = Factory.forProtocol(lambda: CommandProtocol(self._reactor, self._settings))
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        try:
            protocol = await endpoint.connect(factory)
        except Exception as e:
            raise CoordinationUnavailableError(f"could not connect: {e}") from None
        try:
            await protocol.ready
            reply = await send(protocol, "SENTINEL", "get-master-addr-by-name", self._service_name)
        finally:
            protocol.transport.loseConnection()
        if not reply:
            return None
        return str(reply[0]), int(reply[1])

    def __repr__(self) -> str:
        return f"SentinelEndpoint({self._service_name!r}, {self._sentinels!r})"
