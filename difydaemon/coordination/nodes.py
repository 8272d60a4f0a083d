"""
Who a replica is to the others: its :class:`NodeInfo`, and the host it
advertises.

``CLUSTER_ADVERTISE_HOST`` names the host other replicas use to reach this
one on ``SERVER_PORT``.  When it is unset, :func:`detect_advertise_host`
picks, in order: ``SERVER_HOST`` when it names one address (not a wildcard
such as ``0.0.0.0``); else the first non-loopback address the machine's
host name resolves to (IPv4 first), which is the pod or container address
under Kubernetes and Docker; else the loopback address, with a warning,
which only works for replicas on one machine.  It never scans interfaces
(Go does, and advertises every address it finds, some unreachable).
"""

from __future__ import annotations

import ipaddress
import socket
import uuid

import orjson
from attrs import frozen
from twisted.logger import Logger

from difydaemon.coordination.namespace import check_name

log = Logger()

_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


@frozen
class NodeInfo:
    """
    One replica, as the membership records it.

    :ivar node_id: fresh for every start of a daemon (a restarted replica
        is a new node).
    :ivar host: the advertised host (``CLUSTER_ADVERTISE_HOST``).
    :ivar port: ``SERVER_PORT``.
    :ivar started_at: when the daemon started, seconds since the epoch.
    :ivar heartbeat_at: when the node last announced itself, by its own clock.
    """

    node_id: str
    host: str
    port: int
    started_at: float
    heartbeat_at: float

    @property
    def url(self) -> str:
        """The base URL of the node's HTTP server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def to_json(self) -> str:
        """The JSON text stored for the node."""
        return orjson.dumps(
            {
                "node_id": self.node_id,
                "host": self.host,
                "port": self.port,
                "started_at": self.started_at,
                "heartbeat_at": self.heartbeat_at,
            }
        ).decode("utf-8")

    @classmethod
    def from_json(cls, text) -> "NodeInfo":
        """
        The node of a stored JSON text.

        :raises ValueError: when the text is not such a record.
        """
        try:
            record = orjson.loads(text)
            return cls(
                node_id=check_name(record["node_id"], "node id"),
                host=str(record["host"]),
                port=int(record["port"]),
                started_at=float(record["started_at"]),
                heartbeat_at=float(record["heartbeat_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a node record: {e}") from None


def new_node_id() -> str:
    """A fresh random node id."""
    return str(uuid.uuid4())


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _host_addresses(hostname: str) -> list[str]:
    """The addresses ``hostname`` resolves to, IPv4 first (blocking: start-up only)."""
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family and info[4][0] not in found:
                found.append(info[4][0])
    return found


def detect_advertise_host(
    advertise_host: str | None,
    server_host: str,
    hostname=socket.gethostname,
    resolve=_host_addresses,
) -> str:
    """
    The host other replicas reach this one at (see the module docstring).

    Blocking when it has to resolve the host name: call it at start-up,
    before the reactor runs.

    :param advertise_host: ``CLUSTER_ADVERTISE_HOST``; wins when set.
    :param server_host: ``SERVER_HOST``.
    :param hostname: returns the machine's host name.
    :param resolve: host name -> addresses, IPv4 first.
    """
    if advertise_host:
        return advertise_host
    if server_host.strip() not in _WILDCARDS:
        return server_host.strip()
    name = hostname()
    for address in resolve(name):
        if not _is_loopback(address):
            return address
    log.warn(
        "CLUSTER_ADVERTISE_HOST is unset and host name {hostname!r} resolves to no "
        "non-loopback address; advertising 127.0.0.1, which only replicas on this machine reach",
        hostname=name,
    )
    return "127.0.0.1"
