"""
Stored plugin packages: upload, decode, declarations, readmes and assets
(``http-api.md`` §2.4 upload/decode/fetch, §2.8, §5.3).
"""

from __future__ import annotations

from twisted.logger import Logger

from difydaemon.errors import BadRequestError, NotFoundError, ObjectNotFoundError, ObjectStorageError
from difydaemon.management.declarations import DEFAULT_CAPACITY, DeclarationCache
from difydaemon.management.lru import LRUCache
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.packaging.isolation import InProcessDecoder
from difydaemon.packaging.package import PackagePolicy, readmes_of
from difydaemon.packaging.declaration import remap_icons
from difydaemon.storage.paths import StoragePaths

log = Logger()


def _verification_json(verification):
    if verification is None:
        return None
    return {"authorized_category": verification.authorized_category}


class PackageRegistry:
    """
    Decodes, checks and stores packages; answers questions about them.

    :param persistence: an IPersistence.
    :param storage: an IObjectStorage.
    :param policy: the :class:`PackagePolicy` (sizes, signature rules).
    :param runner: where blocking work runs (zip decoding and hashing).
    :param paths: the storage prefixes.
    :param decoder: decodes packages and bundles, blocking (run through
        ``runner``): a :class:`~difydaemon.packaging.isolation.ChildProcessDecoder`
        in the daemon, in-process by default.
    :param media_cache_size: LRU entries for ``/asset/`` bytes.
    :param asset_cache_size: LRU entries for ``/extract-asset/`` bytes.
    :param declaration_cache_bytes: memory of decoded declarations held
        (:class:`~difydaemon.management.declarations.DeclarationCache`).
    """

    def __init__(
        self,
        persistence,
        storage,
        policy: PackagePolicy,
        runner,
        paths: StoragePaths = StoragePaths(),
        media_cache_size: int = 1024,
        asset_cache_size: int = 256,
        max_bundle_size: int = 629145600,
        decoder=None,
        declaration_cache_bytes: int = DEFAULT_CAPACITY,
    ) -> None:
        self._persistence = persistence
        self._storage = storage
        self._policy = policy
        self._runner = runner
        self.paths = paths
        self._media = LRUCache(media_cache_size)
        self._extracted = LRUCache(asset_cache_size)
        self._max_bundle_size = max_bundle_size
        self._decoder = decoder if decoder is not None else InProcessDecoder()
        self._declarations = DeclarationCache(persistence, runner, capacity=declaration_cache_bytes)

    @property
    def policy(self) -> PackagePolicy:
        """The package policy in force."""
        return self._policy

    @property
    def max_bundle_size(self) -> int:
        """``MAX_BUNDLE_PACKAGE_SIZE``."""
        return self._max_bundle_size

    @property
    def runner(self):
        """Where this registry's blocking work runs."""
        return self._runner

    @property
    def declarations(self) -> DeclarationCache:
        """The stored declarations, decoded once per process."""
        return self._declarations

    @property
    def decoder(self):
        """What decodes packages and bundles."""
        return self._decoder

    async def upload(self, data: bytes, verify_signature: bool) -> dict:
        """
        Decode and check one package, then store it with its assets and its
        declaration.  Returns the upload answer ``{unique_identifier,
        manifest, verification}``.  Nothing stays stored when it fails.
        """
        if len(data) > self._policy.max_size:
            raise BadRequestError("file size exceeds the maximum limit")
        decoded = await self._runner.run(self._decoder.package, data, self._policy, verify_signature)
        declaration = await self._persist(decoded, data)
        return {
            "unique_identifier": decoded.identifier.raw,
            "manifest": declaration.fragment(),
            "verification": _verification_json(decoded.verification),
        }

    async def upload_bundle(self, data: bytes, verify_signature: bool) -> list:
        """
        Decode a bundle; its embedded packages are checked and stored (all or
        none).  Returns the dependency list of the upload/bundle answer.
        """
        if len(data) > self._max_bundle_size:
            raise BadRequestError("file size exceeds the maximum limit")
        dependencies = await self._runner.run(
            self._decoder.bundle, data, self._policy, self._max_bundle_size, verify_signature
        )
        stored: list[str] = []
        answer = []
        try:
            for dependency in dependencies:
                if dependency["type"] != "package":
                    answer.append({"type": dependency["type"], "value": dependency["value"]})
                    continue
                decoded = dependency["decoded"]
                created = not await self._storage.exists(self.paths.package(decoded.identifier.raw))
                declaration = await self._persist(decoded, dependency["data"])
                if created:
                    stored.append(decoded.identifier.raw)
                answer.append(
                    {
                        "type": "package",
                        "value": {
                            "unique_identifier": decoded.identifier.raw,
                            "manifest": declaration.fragment(),
                        },
                    }
                )
        except BaseException:
            for identifier in stored:
                await self._forget(identifier)
            raise
        return answer

    async def _persist(self, decoded, data: bytes):
        """Store a decoded package; its stored :class:`Declaration`."""
        identifier = decoded.identifier.raw
        declaration, assets = remap_icons(decoded.declaration, decoded.files)
        created_keys = []
        declaration_created = remembered = False
        try:
            for asset_id, content in assets.items():
                key = self.paths.asset(asset_id)
                if not await self._storage.exists(key):
                    await self._storage.save(key, content)
                    created_keys.append(key)
            package_key = self.paths.package(identifier)
            if not await self._storage.exists(package_key):
                await self._storage.save(package_key, data)
                created_keys.append(package_key)
            existing = await self._declarations.get(identifier)
            if existing is None:
                # encoded once, in the pool: the row is written from the
                # same bytes (a Fragment), not encoded again on the reactor
                existing = await self._declarations.remember(identifier, declaration)
                remembered = True
                await self._persistence.save_declaration(
                    identifier, decoded.identifier.plugin_id, existing.fragment()
                )
                declaration_created = True
            return existing
        except BaseException as exc:
            if isinstance(exc, ObjectStorageError):
                # the operator's problem (a full or read-only disk), not a bug
                log.error("storing package {identifier} failed, rolling back: {reason}",
                          identifier=identifier, reason=exc.message)
            else:
                log.warn("storing package {identifier} failed; rolling back", identifier=identifier)
            for key in created_keys:
                try:
                    await self._storage.delete(key)
                except ObjectStorageError as error:
                    log.error("rollback of {key} failed: {reason}", key=key, reason=error.message)
                except Exception:
                    log.failure("rollback of {key} failed", key=key)
            if remembered:
                self._declarations.forget(identifier)
            if declaration_created:
                await self._persistence.delete_declaration(identifier)
            raise

    async def _forget(self, identifier: str) -> None:
        await self._storage.delete(self.paths.package(identifier))
        await self._persistence.delete_declaration(identifier)
        self._declarations.forget(identifier)

    async def package_bytes(self, identifier: str) -> bytes:
        """The stored package, or BadRequestError as Go words it."""
        try:
            return await self._storage.load(self.paths.package(identifier))
        except ObjectNotFoundError:
            raise BadRequestError("plugin package not found, please upload it firstly")

    async def decode_stored(self, identifier: str) -> dict:
        """
        Re-decode a stored package (``decode/from_identifier``): the
        identifier, the stored declaration and the verification.
        """
        parse_identifier(identifier)
        data = await self.package_bytes(identifier)
        decoded = await self._runner.run(self._decoder.package, data, self._unforced_policy(), False)
        declaration = await self._declarations.get(identifier)
        if declaration is None:
            declaration = await self._persist(decoded, data)
        return {
            "unique_identifier": identifier,
            "manifest": declaration.fragment(),
            "verification": _verification_json(decoded.verification),
        }

    def _unforced_policy(self) -> PackagePolicy:
        # Re-decoding what was accepted at upload must not fail on policy.
        return PackagePolicy(
            max_size=self._policy.max_size,
            force_verify=False,
            enforce_langgenius=False,
            public_keys=self._policy.public_keys,
            yaml_limits=self._policy.yaml_limits,
        )

    async def declaration(self, identifier: str) -> dict | None:
        """
        The stored declaration of an identifier (icons as asset ids), or
        None.  Shared with every other reader: never change it in place.
        """
        return await self._declarations.value(identifier)

    def forget_declaration(self, identifier: str) -> None:
        """Drop what is held of a declaration whose row was deleted."""
        self._declarations.forget(identifier)

    async def readme(self, identifier: str, language: str) -> dict:
        """
        ``{content, language}`` in the requested language, else en_US, else
        any; cached in the database after the first extraction.
        """
        parse_identifier(identifier)
        readmes = await self._persistence.get_readmes(identifier)
        if not readmes:
            try:
                data = await self._storage.load(self.paths.package(identifier))
            except ObjectNotFoundError:
                data = None
            if data is not None:
                files = await self._runner.run(read_package, data, self._policy.max_size)
                readmes = readmes_of(files)
                for lang, content in readmes.items():
                    await self._persistence.save_readme(identifier, lang, content)
        for choice in (language, "en_US"):
            if choice and choice in readmes:
                return {"content": readmes[choice], "language": choice}
        if readmes:
            lang = sorted(readmes)[0]
            return {"content": readmes[lang], "language": lang}
        raise NotFoundError("readme not found")

    async def asset(self, asset_id: str) -> bytes | None:
        """An icon asset's bytes, or None when it does not exist."""
        cached = self._media.get(asset_id)
        if cached is not None:
            return cached
        try:
            data = await self._storage.load(self.paths.asset(asset_id))
        except ObjectNotFoundError:
            return None
        except ValueError:
            return None
        self._media.put(asset_id, data)
        return data

    async def extract_asset(self, identifier: str, file_path: str) -> bytes | None:
        """
        A file under ``_assets/`` of a stored package, or None if the package
        has no such file.
        """
        parse_identifier(identifier)
        key = (identifier, file_path)
        cached = self._extracted.get(key)
        if cached is not None:
            return cached
        data = await self.package_bytes(identifier)
        files = await self._runner.run(read_package, data, self._policy.max_size)
        content = files.get("_assets/" + file_path.lstrip("/"))
        if content is None:
            return None
        self._extracted.put(key, content)
        return content

