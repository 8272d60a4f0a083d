"""
Access to the real official packages in ``../shared/fixtures`` (read-only).
"""

from __future__ import annotations

import os

from difydaemon.packaging.package import PackagePolicy
from difydaemon.packaging.signature import official_public_key

FIXTURES = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "fixtures")
)
AGENT = "langgenius-agent_0.0.14.difypkg"
OPENAI = "langgenius-openai_0.0.19.difypkg"
UNSIGNED = "unsigned-test_0.0.1.difypkg"
ALL_PACKAGES = (AGENT, OPENAI, UNSIGNED)
MAX_SIZE = 52428800
#: Packages made to break a decoder (``hostile/`` in the fixtures).
ARCH_MAPPING = "hostile/manifest-arch-mapping.difypkg"
DEEP_SEQUENCE = "hostile/yaml-20000-deep-flow-sequence.difypkg"
DEEP_MAPPING = "hostile/yaml-5000-deep-flow-mapping.difypkg"
ALIAS_BOMB = "hostile/yaml-alias-bomb.difypkg"
SELF_ALIAS = "hostile/yaml-self-referencing-alias.difypkg"
HOSTILE_PACKAGES = (ARCH_MAPPING, DEEP_SEQUENCE, DEEP_MAPPING, ALIAS_BOMB, SELF_ALIAS)


def fixture_bytes(name: str) -> bytes:
    """The bytes of one fixture file."""
    with open(os.path.join(FIXTURES, name), "rb") as handle:
        return handle.read()


def policy(force_verify: bool = False, enforce_langgenius: bool = False, extra_keys: tuple = (),
           max_size: int = MAX_SIZE) -> PackagePolicy:
    """A policy with the official key (plus ``extra_keys``)."""
    return PackagePolicy(
        max_size=max_size,
        force_verify=force_verify,
        enforce_langgenius=enforce_langgenius,
        public_keys=(official_public_key(), *extra_keys),
    )
