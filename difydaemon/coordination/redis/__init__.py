"""
The coordination interfaces on Redis, for replicas that share one.

:mod:`.connection` keeps the connections (txredisapi's protocol, our own
connecting, reconnecting and fail-fast rules), :mod:`.endpoints` reaches the
server (TCP, TLS, Sentinel), :mod:`.scripts` holds the Lua scripts that make
compare-and-set operations atomic, :mod:`.store` and :mod:`.pubsub`
implement the interfaces.
"""
