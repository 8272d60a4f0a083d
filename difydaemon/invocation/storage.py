"""
Plugin key/value storage: the backwards invocation ``storage``
(``runtimes.md`` §4.2, ``http-api.md`` §5.7), answered inside the daemon.

The plugin sends ``{"opt": "get"|"set"|"del"|"exist", "key": ..., "value":
<hex>}``; :class:`PluginStorage` checks it the way the Go daemon does, keeps
the value in :class:`~difydaemon.interfaces.IPersistence` and returns the
``data`` of the single ``response`` event.  Whatever the plugin did wrong
becomes a :class:`StorageError` whose ``message`` is the text the Go daemon
sends in its ``error`` event.

What differs from Go, on purpose:

- Go keeps values as object-store files and the total in
  ``tenant_storages``, written one after the other (a value could be saved
  and then refused by the quota).  Here value and total change in one
  database transaction, and an overwrite really replaces the value (Go's
  file wrapper keeps the old file when one exists).
- ``deleted_num`` and ``exist_num`` are the number of stored values (0 or
  1); Go returns the number of Redis cache entries it removed or found,
  which depends on whether the value was read in the last five minutes.
  Deleting a missing key answers ``deleted_num: 0``; Go fails it with its
  object store's "not found" text.
- A key that names no value once cleaned (``"."``, ``"/"``) or holds a
  character a database column cannot (NUL, a lone surrogate) can be read,
  tested and deleted (there is nothing there) but not written; Go would
  hand such a path to its object store.

Keys are identified the way Go's file layout identifies them:
``path.Clean(key)`` without its leading ``/`` (``"a/./b"``, ``"a//b"`` and
``"/a/b"`` are all ``"a/b"``).
"""

from __future__ import annotations

from attrs import frozen

from difydaemon.errors import StorageQuotaExceededError

OPS = ("get", "set", "del", "exist")

#: Go's limit, checked on the key as sent, in UTF-8 bytes (Go's ``len``).
MAX_KEY_BYTES = 256

LOAD_FAILED = "load data failed, please check if the key is correct or you have not set it"
TRAVERSAL = "invalid key: path traversal attempt detected"
KEY_TOO_LONG = "key length must be less than 256 characters"
NO_VALUE_NAMED = "invalid key: the key names no value"
UNSTORABLE_KEY = "invalid key: the key contains a character that cannot be stored"


class StorageError(Exception):
    """
    A storage request failed in a way the plugin is told about: the caller
    sends ``message`` as the ``error`` event of the backwards invocation.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@frozen
class StorageRequest:
    """
    A decoded storage request.

    :ivar opt: one of :data:`OPS`.
    :ivar key: the key exactly as the plugin sent it.
    :ivar value: the hex text of ``set`` (``""`` when absent, as in Go).
    """

    opt: str
    key: str
    value: str


def _decoding_error(field: str, value) -> StorageError:
    # Go's mapstructure text with JSON's Go type names, minus its trailing
    # ", value: '<Go %v of the value>'"
    kind = {bool: "bool", int: "float64", float: "float64", list: "slice", dict: "map"}.get(
        type(value), type(value).__name__
    )
    return StorageError(
        "unmarshal backwards invoke request failed: error decoding map: 1 error(s) decoding:"
        f"\n\n* '{field}' expected type 'string', got unconvertible type '{kind}'"
    )


def parse_storage_request(request) -> StorageRequest:
    """
    Decode the ``request`` object of a storage invocation; fields other
    than ``opt``, ``key`` and ``value`` are ignored.

    :raises StorageError: with Go's "unmarshal backwards invoke request
        failed: ..." text when a field is not a string, ``opt`` is missing
        or unknown, or ``key`` is missing or empty.
    """
    if not isinstance(request, dict):
        raise StorageError(
            "unmarshal backwards invoke request failed: error decoding map: "
            "'' expected a map, got '" + type(request).__name__ + "'"
        )
    fields = {}
    for field in ("opt", "key", "value"):
        value = request.get(field)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise _decoding_error(field, value)
        fields[field] = value
    problems = []
    if fields["opt"] == "":
        problems.append(("Opt", "required"))
    elif fields["opt"] not in OPS:
        problems.append(("Opt", "storage_opt"))
    if fields["key"] == "":
        problems.append(("Key", "required"))
    if problems:
        raise StorageError(
            "unmarshal backwards invoke request failed: error validating struct: "
            + "\n".join(
                f"Key: 'InvokeStorageRequest.{name}' Error:Field validation for "
                f"'{name}' failed on the '{tag}' tag"
                for name, tag in problems
            )
        )
    return StorageRequest(opt=fields["opt"], key=fields["key"], value=fields["value"])


def clean_path(path: str) -> str:
    """
    Go's ``path.Clean``: the shortest equivalent slash path (no empty or
    ``.`` segments, ``..`` folded where it can be, ``"."`` when nothing is
    left).
    """
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            # ".." at the root stays at the root
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def check_key(key: str) -> str:
    """
    The key under which a value is stored, or the reason it is refused.

    :returns: ``path.Clean(key)`` without its leading ``/``; ``""`` when
        the key names no value (it cleans to ``.`` or ``/``) or cannot be
        stored (see :func:`_storable`).
    :raises StorageError: with Go's text when the cleaned key contains
        ``..``, ``//`` or ``\\``.
    """
    cleaned = clean_path(key)
    if ".." in cleaned or "//" in cleaned or "\\" in cleaned:
        raise StorageError(TRAVERSAL)
    if not _storable(cleaned):
        return ""
    return "" if cleaned in (".", "/") else cleaned.lstrip("/")


def _storable(key: str) -> bool:
    # PostgreSQL text cannot hold NUL, and no driver encodes a lone
    # surrogate (a JSON decoder other than orjson lets "\ud800" through)
    if "\x00" in key:
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _invalid_byte(byte: int) -> str:
    # Go's InvalidByteError: fmt "%#U" of the byte taken as a rune
    char = chr(byte)
    shown = f" '{char}'" if char.isprintable() else ""
    return f"encoding/hex: invalid byte: U+{byte:04X}{shown}"


HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def decode_hex(text: str) -> bytes:
    """
    Go's ``hex.DecodeString``: upper or lower case digits, nothing else.

    :raises ValueError: with Go's text -- the first invalid byte in order,
        else ``encoding/hex: odd length hex string``.
    """
    raw = text.encode("utf-8")
    for byte in raw:
        if byte not in HEX_DIGITS:
            raise ValueError(_invalid_byte(byte))
    if len(raw) % 2:
        raise ValueError("encoding/hex: odd length hex string")
    return bytes.fromhex(text)


def quota_of(declared_size, max_size: int) -> int:
    """
    The byte quota of a (tenant, plugin).

    Go passes ``-1`` when the manifest has no ``resource.permission.storage``
    and then uses ``PERSISTENCE_STORAGE_MAX_SIZE`` alone; otherwise both
    limits apply.  So ``None`` (or a negative size) means ``max_size``, and
    any other size -- ``0`` included, which lets only empty values in, as in
    Go -- means ``min(declared_size, max_size)``.  Valid manifests declare
    1024..1073741824 bytes.
    """
    if declared_size is None or declared_size < 0:
        return max_size
    return min(int(declared_size), max_size)


class PluginStorage:
    """
    Answers the ``storage`` backwards invocations of every plugin.

    :param persistence: the :class:`~difydaemon.interfaces.IPersistence`
        holding the values and totals.
    :param max_size: ``PERSISTENCE_STORAGE_MAX_SIZE``, bytes per tenant and
        plugin.
    """

    def __init__(self, persistence, max_size: int) -> None:
        self._persistence = persistence
        self._max_size = max_size

    async def run(self, tenant_id: str, plugin_id: str, declared_size, request) -> dict:
        """
        Carry out one storage request for a plugin of a tenant.

        :param plugin_id: ``author/name`` (values survive upgrades).
        :param declared_size: the manifest's
            ``resource.permission.storage.size``, or None; see
            :func:`quota_of`.
        :param request: the invocation's ``request`` object.
        :returns: the ``data`` of the response event: ``{"data": <hex>}``
            for get, ``{"data": "ok"}`` for set, ``{"data": "ok",
            "deleted_num": n}`` for del, ``{"data": bool, "exist_num": n}``
            for exist.
        :raises StorageError: for anything the plugin got wrong (bad
            request, bad key, bad hex, missing value, quota); database
            failures propagate as they are.
        """
        parsed = parse_storage_request(request)
        if parsed.opt == "get":
            return await self._get(tenant_id, plugin_id, parsed)
        if parsed.opt == "set":
            return await self._set(tenant_id, plugin_id, declared_size, parsed)
        if parsed.opt == "del":
            return await self._delete(tenant_id, plugin_id, parsed)
        return await self._exist(tenant_id, plugin_id, parsed)

    async def _get(self, tenant_id, plugin_id, parsed) -> dict:
        try:
            key = check_key(parsed.key)
        except StorageError:
            # Go replaces every load failure with one text
            raise StorageError(LOAD_FAILED) from None
        value = await self._persistence.storage_get(tenant_id, plugin_id, key) if key else None
        if value is None:
            raise StorageError(LOAD_FAILED)
        return {"data": value.hex()}

    async def _set(self, tenant_id, plugin_id, declared_size, parsed) -> dict:
        try:
            value = decode_hex(parsed.value)
        except ValueError as e:
            raise StorageError(f"decode data failed: {e}") from None
        try:
            key = check_key(parsed.key)
        except StorageError as e:
            raise StorageError(f"save data failed: {e.message}") from None
        if len(parsed.key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise StorageError(f"save data failed: {KEY_TOO_LONG}")
        if not key:
            problem = NO_VALUE_NAMED if _storable(parsed.key) else UNSTORABLE_KEY
            raise StorageError(f"save data failed: {problem}")
        quota = quota_of(declared_size, self._max_size)
        try:
            await self._persistence.storage_set(tenant_id, plugin_id, key, value, quota)
        except StorageQuotaExceededError as e:
            raise StorageError(f"save data failed: {e.message}") from None
        return {"data": "ok"}

    async def _delete(self, tenant_id, plugin_id, parsed) -> dict:
        try:
            key = check_key(parsed.key)
        except StorageError as e:
            raise StorageError(f"delete data failed: {e.message}") from None
        deleted = await self._persistence.storage_delete(tenant_id, plugin_id, key) if key else 0
        return {"data": "ok", "deleted_num": deleted}

    async def _exist(self, tenant_id, plugin_id, parsed) -> dict:
        try:
            key = check_key(parsed.key)
        except StorageError as e:
            raise StorageError(f"exist data failed: {e.message}") from None
        found = await self._persistence.storage_exists(tenant_id, plugin_id, key) if key else False
        return {"data": found, "exist_num": 1 if found else 0}
