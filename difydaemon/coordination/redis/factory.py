"""Building the Redis coordination set from ``config.redis``."""

from __future__ import annotations

from twisted.internet.defer import gatherResults

from difydaemon.coordination import DEFAULT_PORT, Coordination
from difydaemon.coordination.namespace import KeySpace
from difydaemon.coordination.redis.connection import (
    CommandProtocol,
    ConnectionSettings,
    RedisConnection,
    SubscriberProtocol,
)
from difydaemon.coordination.redis.endpoints import (
    SentinelEndpoint,
    parse_sentinels,
    server_endpoint,
    tls_creator,
    trust_root_from_pem,
)
from difydaemon.coordination.redis.pubsub import RedisPubSub
from difydaemon.coordination.redis.store import RedisKeyValueStore, RedisLeaseService, RedisMembership
from difydaemon.errors import ConfigError


def _tls(redis_config):
    """The ``hostname -> connection creator`` function, or None without TLS."""
    if not redis_config.redis_use_ssl:
        return None
    ca_pem = None
    if redis_config.redis_ssl_ca_certs:
        try:
            with open(redis_config.redis_ssl_ca_certs, "rb") as f:
                ca_pem = f.read()
            trust_root_from_pem(ca_pem)
        except (OSError, ValueError) as e:
            raise ConfigError("REDIS_SSL_CA_CERTS", f"cannot use {redis_config.redis_ssl_ca_certs!r}: {e}") from None
    cert_reqs = redis_config.redis_ssl_cert_reqs
    return lambda hostname: tls_creator(hostname, cert_reqs, ca_pem)


def redis_endpoint(redis_config, reactor, connect_timeout: float):
    """
    The endpoint reaching the server ``config.redis`` names, and whether
    it must be checked for being a master (behind Sentinel).
    """
    tls = _tls(redis_config)
    if redis_config.redis_use_sentinel:
        try:
            sentinels = parse_sentinels(redis_config.redis_sentinels)
        except ValueError as e:
            raise ConfigError("REDIS_SENTINELS", str(e)) from None
        timeout = redis_config.redis_sentinel_socket_timeout or connect_timeout
        sentinel_settings = ConnectionSettings(
            username=redis_config.redis_sentinel_username,
            password=redis_config.redis_sentinel_password,
            reply_timeout=timeout,
        )
        endpoint = SentinelEndpoint(
            reactor, sentinels, redis_config.redis_sentinel_service_name, sentinel_settings, timeout, tls
        )
        return endpoint, True
    port = redis_config.redis_port or DEFAULT_PORT
    return server_endpoint(reactor, redis_config.redis_host, port, connect_timeout, tls), False


def redis_coordination(redis_config, reactor, connect_timeout: float, reply_timeout: float, keepalive: float) -> Coordination:
    """The Redis coordination set: one command connection, one subscriber connection."""
    endpoint, require_master = redis_endpoint(redis_config, reactor, connect_timeout)
    settings = ConnectionSettings(
        username=redis_config.redis_username,
        password=redis_config.redis_password,
        db=redis_config.redis_db,
        reply_timeout=reply_timeout,
        require_master=require_master,
    )
    keys = KeySpace.for_prefix(redis_config.redis_key_prefix)
    commands = RedisConnection(reactor, endpoint, settings, CommandProtocol, description="redis")
    subscriber = RedisConnection(reactor, endpoint, settings, SubscriberProtocol, description="redis subscriber")
    pubsub = RedisPubSub(reactor, commands, subscriber, keys, keepalive=keepalive)

    def close():
        pubsub.close()
        return gatherResults([commands.close(), subscriber.close()], consumeErrors=True).addCallback(lambda _: None)

    return Coordination(
        kv=RedisKeyValueStore(commands, keys),
        pubsub=pubsub,
        leases=RedisLeaseService(commands, keys),
        membership=RedisMembership(commands, keys),
        uses_redis=True,
        closer=close,
    )
