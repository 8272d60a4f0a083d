"""
How many instances a local plugin runs, decided from its load.

Pure decisions, no timers: :class:`~difydaemon.runtimes.local.LocalRuntime`
asks :class:`ScalingPolicy` when a session opens (one more instance?) and
when its scale-down timer fires (one fewer?).  A plugin with more
sessions in flight than instances gets one more, up to the maximum
(``PLUGIN_LOCAL_MAX_INSTANCES``): the SDK runs a session's Python code
under one GIL, so a second process is what lets a hot plugin use a second
core.  Once the load has not needed every instance for the quiet period
(``PLUGIN_LOCAL_SCALE_DOWN_DELAY``), an instance without sessions is
stopped, down to the minimum (``PLUGIN_LOCAL_INSTANCES``).
"""

from __future__ import annotations

from attrs import frozen


@frozen
class ScalingPolicy:
    """
    The bounds and pace of a plugin's instance count.

    :ivar min_instances: instances started with the plugin and kept while
        it runs.
    :ivar max_instances: the most instances load may bring (equal to
        ``min_instances``: no scaling).
    :ivar scale_down_delay: seconds the load must not have needed every
        instance before one is stopped.
    """

    min_instances: int = 1
    max_instances: int = 1
    scale_down_delay: float = 60.0

    def __attrs_post_init__(self) -> None:
        if self.min_instances < 1:
            raise ValueError("min_instances must be at least 1")
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be at least min_instances")

    @property
    def scales(self) -> bool:
        """Whether the count can change at all."""
        return self.max_instances > self.min_instances

    def scale_up(self, in_flight: int, instances: int, starting: int) -> bool:
        """
        Whether to start one more instance now: more sessions in flight
        than instances, room under the maximum, and none already starting
        (one at a time: a start costs a core for a second).
        """
        return starting == 0 and instances < self.max_instances and in_flight > instances

    def scale_down(self, instances: int, quiet_for: float) -> bool:
        """Whether to stop one instance: above the minimum and quiet long enough."""
        return instances > self.min_instances and quiet_for >= self.scale_down_delay
