"""
:class:`StoragePaths`: where each kind of object lives in the object store
(``http-api.md`` §5.3).  The prefixes and the key shapes are the Go
daemon's, so that a deployment can move between the two daemons on the
same bucket or directory.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class StoragePaths:
    """The object-storage prefixes of ``http-api.md`` §5.3."""

    packages: str = "plugin_packages"
    installed: str = "plugin"
    media: str = "assets"

    def package(self, identifier: str) -> str:
        """The key of an uploaded package."""
        return f"{self.packages}/{identifier}"

    def installed_package(self, identifier: str) -> str:
        """The key of an installed package's copy."""
        return f"{self.installed}/{identifier}"

    def asset(self, asset_id: str) -> str:
        """The key of an icon asset."""
        return f"{self.media}/{asset_id}"

    def immutable_prefixes(self) -> tuple:
        """
        The prefixes whose keys never change their bytes: packages are named
        by their checksum and assets by the hash of their content, so a copy
        of one is never stale.
        """
        return (self.packages, self.installed, self.media)
