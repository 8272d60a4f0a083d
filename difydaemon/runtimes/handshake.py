"""
The registration a debug plugin sends when it dials in (``runtimes.md``
§2.2), as a pure incremental parser, and the declaration and identity made
from it (§2.3).

Nothing here does I/O or keeps time: :class:`HandshakeDecoder` turns the
bytes of a fresh connection into :class:`KeyOffered`, then
:class:`Registered` (with the bytes that followed ``end``, which belong to
the plugin protocol of §0) or :class:`Rejected` (the one plain-text line
to write before closing).  Checking the key, the deadline and installing
are the protocol's business (:mod:`difydaemon.runtimes.debug`).

Deliberate differences from the Go daemon: the handshake must be the first
message; messages of unknown types are ignored (a newer SDK may send kinds
this daemon does not know) instead of failing; the manifest must have come
before ``end``.
"""

from __future__ import annotations

import binascii
import hashlib

import orjson
import yaml
from attrs import field, frozen

from difydaemon.errors import DaemonError
from difydaemon.packaging.declaration import build_declaration, providers_of, remap_icons
from difydaemon.packaging.declaration import ASSETS_DIR
from difydaemon.packaging.identifier import compose_identifier
from difydaemon.packaging.manifest import MANIFEST_FILE

DEFAULT_MAX_LINE_SIZE = 5242880
DEFAULT_MAX_ASSET_SIZE = 52428800
#: Bytes a connection may send up to and including its handshake line: the
#: SDK's is about 60 bytes, and until its key is checked a peer is anyone.
MAX_HANDSHAKE_SIZE = 1024

INVALID_HANDSHAKE = "handshake failed, invalid handshake message"
HANDSHAKE_TOO_LARGE = "handshake failed, handshake message too large"
INVALID_KEY = "handshake failed, invalid key"
HANDSHAKE_TIMEOUT = "handshake failed, timed out"
DUPLICATE_HANDSHAKE = "handshake failed, handshake already received"
INVALID_MESSAGE = "register failed, invalid message"
MESSAGE_TOO_LARGE = "register failed, message too large"
ASSETS_TOO_LARGE = "register failed, assets too large"
INVALID_ASSET = "register failed, invalid asset chunk"
NO_MANIFEST = "register failed, manifest declaration missing"
NO_PROVIDER = "register failed, at least one provider declaration is required"

#: message type -> declaration key (``tool``, ``model``, ...)
DECLARATION_TYPES = {
    "tool_declaration": "tool",
    "model_declaration": "model",
    "endpoint_declaration": "endpoint",
    "agent_strategy_declaration": "agent_strategy",
    "datasource_declaration": "datasource",
    "trigger_declaration": "trigger",
}

#: declaration key -> the manifest's ``plugins`` list that names its files
_PLUGIN_LISTS = {
    "tool": "tools",
    "model": "models",
    "endpoint": "endpoints",
    "agent_strategy": "agent_strategies",
    "datasource": "datasources",
    "trigger": "triggers",
}


@frozen
class Registration:
    """
    Everything a debug plugin registered before ``end``.

    :ivar manifest: the SDK's manifest model as JSON.
    :ivar declarations: declaration key (``tool``, ``model``, ...) -> the
        first provider declaration of its list.
    :ivar assets: file name -> bytes of the files under ``_assets/``.
    """

    manifest: dict
    declarations: dict = field(factory=dict)
    assets: dict = field(factory=dict)


@frozen
class KeyOffered:
    """The handshake arrived; ``key`` is to be checked."""

    key: str


@frozen
class Registered:
    """
    ``end`` arrived after a complete registration.

    :ivar rest: the bytes after the ``end`` line: plugin protocol already.
    """

    registration: Registration
    rest: bytes


@frozen
class Rejected:
    """The registration is refused; ``message`` is the line to send (no newline)."""

    message: str


class HandshakeDecoder:
    """
    Incremental parser of a debug connection up to ``end``.

    Lines end with ``\\n``; blank lines are skipped.  :meth:`feed` returns
    the items the new bytes complete; after a :class:`Registered` or a
    :class:`Rejected` the decoder is finished and ignores further bytes.

    Each line is parsed once and the asset bytes are decoded as they come,
    so a connection costs memory only for what it legitimately sends: at
    most :data:`MAX_HANDSHAKE_SIZE` bytes up to the end of the handshake
    line (blank lines included), then ``max_line_size`` bytes of an
    unfinished line and ``max_asset_size`` bytes of assets.
    """

    def __init__(
        self, max_line_size: int = DEFAULT_MAX_LINE_SIZE, max_asset_size: int = DEFAULT_MAX_ASSET_SIZE
    ) -> None:
        self.max_line_size = max_line_size
        self.max_asset_size = max_asset_size
        self.finished = False
        self._buffer = b""
        self._key: str | None = None
        self._manifest: dict | None = None
        self._declarations: dict = {}
        self._assets: dict[str, bytearray] = {}
        self._asset_size = 0
        # bytes consumed before the handshake line was whole
        self._before_key = 0

    @property
    def asset_size(self) -> int:
        """Decoded asset bytes received so far."""
        return self._asset_size

    def feed(self, data: bytes) -> list:
        """Parse the lines ``data`` completes; keep an unfinished one."""
        if self.finished:
            return []
        buffer = self._buffer + data if self._buffer else data
        items: list = []
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            line = buffer[start:newline]
            if self._key is None:
                self._before_key += newline + 1 - start
                if self._before_key > MAX_HANDSHAKE_SIZE:
                    return self._finish(items, Rejected(HANDSHAKE_TOO_LARGE))
            start = newline + 1
            if len(line) > self.max_line_size:
                return self._finish(items, Rejected(MESSAGE_TOO_LARGE))
            if not line.strip():
                continue
            item = self._line(line)
            if item is None:
                continue
            if isinstance(item, KeyOffered):
                items.append(item)
                continue
            if isinstance(item, Registration):
                return self._finish(items, Registered(item, buffer[start:]))
            return self._finish(items, item)
        self._buffer = buffer[start:]
        if self._key is None and self._before_key + len(self._buffer) > MAX_HANDSHAKE_SIZE:
            return self._finish(items, Rejected(HANDSHAKE_TOO_LARGE))
        if len(self._buffer) > self.max_line_size:
            return self._finish(items, Rejected(MESSAGE_TOO_LARGE))
        return items

    def _finish(self, items: list, last) -> list:
        self.finished = True
        self._buffer = b""
        self._assets = {}
        items.append(last)
        return items

    def _line(self, line: bytes):
        """KeyOffered, Registration (at ``end``), Rejected, or None."""
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            message = None
        if self._key is None:
            return self._handshake(message)
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return Rejected(INVALID_MESSAGE)
        kind = message["type"]
        data = message.get("data")
        if kind == "handshake":
            return Rejected(DUPLICATE_HANDSHAKE)
        if kind == "manifest_declaration":
            if self._manifest is not None:
                return Rejected("register failed, manifest declaration already registered")
            if not isinstance(data, dict):
                return Rejected(INVALID_MESSAGE)
            self._manifest = data
            return None
        declared = DECLARATION_TYPES.get(kind)
        if declared is not None:
            if declared in self._declarations:
                return Rejected(f"register failed, {declared} declaration already registered")
            if not isinstance(data, list) or not data or not isinstance(data[0], dict):
                return Rejected(f"register failed, invalid {declared} declaration")
            self._declarations[declared] = data[0]
            return None
        if kind == "asset_chunk":
            return self._asset_chunk(data)
        if kind == "end":
            return self._end()
        return None

    def _handshake(self, message):
        if not isinstance(message, dict) or message.get("type") != "handshake":
            return Rejected(INVALID_HANDSHAKE)
        data = message.get("data")
        key = data.get("key") if isinstance(data, dict) else None
        if not isinstance(key, str) or not key:
            return Rejected(INVALID_HANDSHAKE)
        self._key = key
        return KeyOffered(key)

    def _asset_chunk(self, data):
        if not isinstance(data, dict):
            return Rejected(INVALID_ASSET)
        filename = data.get("filename")
        encoded = data.get("data")
        if not isinstance(filename, str) or not filename or "/" in filename or not isinstance(encoded, str):
            return Rejected(INVALID_ASSET)
        # Refuse before decoding: base64 never shrinks below 3/4.
        if self._asset_size + len(encoded) * 3 // 4 - 2 > self.max_asset_size:
            return Rejected(ASSETS_TOO_LARGE)
        try:
            chunk = binascii.a2b_base64(encoded, strict_mode=True)
        except (binascii.Error, ValueError):
            return Rejected(INVALID_ASSET)
        self._asset_size += len(chunk)
        if self._asset_size > self.max_asset_size:
            return Rejected(ASSETS_TOO_LARGE)
        self._assets.setdefault(filename, bytearray()).extend(chunk)
        return None

    def _end(self):
        if self._manifest is None:
            return Rejected(NO_MANIFEST)
        if not self._declarations:
            return Rejected(NO_PROVIDER)
        return Registration(
            manifest=self._manifest,
            declarations=dict(self._declarations),
            assets={name: bytes(content) for name, content in self._assets.items()},
        )


# ---------------------------------------------------------------------------
# what a registration installs


@frozen
class RemotePlugin:
    """
    A registration made installable for one tenant.

    :ivar declaration: the PluginDeclaration, icons remapped to asset ids.
    :ivar assets: asset id -> bytes, for the media prefix of the storage.
    :ivar identifier: ``author/name:version@checksum``.
    :ivar plugin_id: ``author/name``.
    :ivar providers: :func:`~difydaemon.packaging.declaration.providers_of`.
    """

    declaration: dict
    assets: dict
    identifier: str
    plugin_id: str
    providers: dict


def _yaml(value) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True, sort_keys=False).encode("utf-8")


def build_remote_declaration(registration: Registration) -> tuple[dict, dict]:
    """
    The PluginDeclaration of a registration and its assets (asset id ->
    bytes), built and checked exactly as a package's is (``http-api.md``
    §4.5, ``runtimes.md`` §5.3).

    The SDK sends its models already parsed; they are handed to the package
    code as a virtual package whose manifest lists one file per provider, so
    that defaults, normalisation and checks cannot drift between local and
    debug plugins.  The manifest's own ``plugins`` lists come back as sent.

    An uppercase manifest author or name is lowercased (the SDK accepts it,
    identifiers do not).

    :raises difydaemon.errors.PackageError: a rule is broken (names it).
    """
    manifest = dict(registration.manifest)
    for key in ("author", "name"):
        if isinstance(manifest.get(key), str):
            manifest[key] = manifest[key].lower()
    original_plugins = manifest.get("plugins")
    plugins = {listed: [] for listed in _PLUGIN_LISTS.values()}
    files: dict[str, bytes] = {}
    for kind, provider in registration.declarations.items():
        path = f"{kind}_declaration.yaml"
        plugins[_PLUGIN_LISTS[kind]] = [path]
        files[path] = _yaml(provider)
    manifest["plugins"] = plugins
    files[MANIFEST_FILE] = _yaml(manifest)
    for filename, content in registration.assets.items():
        files[ASSETS_DIR + filename] = content
    declaration = build_declaration(files)
    declaration, assets = remap_icons(declaration, files)
    if isinstance(original_plugins, dict):
        declaration["plugins"] = {
            listed: list(original_plugins.get(listed) or []) for listed in _PLUGIN_LISTS.values()
        }
    return declaration, assets


def remote_checksum(declaration: dict, tenant_id: str) -> str:
    """hex SHA-256(JSON(declaration) ‖ tenant_id) (``http-api.md`` §4.3)."""
    return hashlib.sha256(orjson.dumps(declaration) + tenant_id.encode("utf-8")).hexdigest()


def remote_plugin(registration: Registration, tenant_id: str) -> RemotePlugin:
    """
    Everything needed to install a registration for ``tenant_id``.

    :raises difydaemon.errors.DaemonError: the declaration is refused or
        the identifier would be malformed.
    """
    declaration, assets = build_remote_declaration(registration)
    checksum = remote_checksum(declaration, tenant_id)
    identifier = compose_identifier(
        declaration["author"], declaration["name"], declaration["version"], checksum
    )
    return RemotePlugin(
        declaration=declaration,
        assets=assets,
        identifier=identifier.raw,
        plugin_id=identifier.plugin_id,
        providers=providers_of(declaration),
    )


def refusal_line(error: DaemonError) -> str:
    """The line sent when installing a registration fails with ``error``."""
    return f"register failed, {error.message}"
