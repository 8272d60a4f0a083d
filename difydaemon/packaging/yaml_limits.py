"""
The limits a package's YAML is read under (:class:`YamlLimits`), apart
from the parser (:mod:`difydaemon.packaging.plugin_yaml`): a policy holds
them in the daemon, which parses no YAML itself (its decoder children do),
so the daemon never loads PyYAML.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class YamlLimits:
    """
    What the YAML of one package may cost.

    :ivar max_depth: collections nested in one another, aliases expanded.
        The official plugins reach 16; JSON encoders downstream (orjson)
        stop at 255, so the limit leaves room for the envelope around it.
    :ivar max_nodes: scalars and collections built, every alias counting the
        nodes it expands to (the heaviest official plugin, telegram_trigger,
        builds about 63,000: a quarter of the limit).  Every node ends up in
        the declaration the daemon holds decoded and embeds in list answers.
    :ivar max_bytes: the YAML text read, all files together (telegram_trigger:
        1.35 MB).
    """

    max_depth: int = 100
    max_nodes: int = 250_000
    max_bytes: int = 16 * 1024 * 1024
