"""
The IPersistence contract, run against every implementation.

Each check is written once as a coroutine and wrapped by :func:`contract`
into a plain test method that hands it to ``self.run_check``: synchronous
cases (memory, inline SQLite) require it to finish without the reactor,
real-reactor cases (SQLite with its thread, PostgreSQL) return it as a
Deferred.  A concrete case provides ``self.persistence`` (migrated) and
``self.clock`` (its time source, with ``advance``).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import attrs

import orjson
from twisted.internet.defer import Deferred, DeferredList
from zope.interface.verify import verifyObject

from difydaemon.errors import (
    AlreadyInstalledError,
    RecordNotFoundError,
    StorageQuotaExceededError,
)
from difydaemon.ids import new_id, utc_from_timestamp
from difydaemon.interfaces import IPersistence
from difydaemon.persistence.records import (
    TASK_FAILED,
    TASK_PENDING,
    TASK_RUNNING,
    TASK_SUCCESS,
    InstallTask,
    InstallTaskPlugin,
)

T1 = "7b7a0f0c-0000-4000-8000-000000000001"
T2 = "7b7a0f0c-0000-4000-8000-000000000002"
# Dify tenant ids are UUIDs, but a malformed one must not be a database error.
ODD_TENANT = "not-a-uuid tenant"

ECHO_1 = "acme/echo:0.0.1@" + "a" * 64
ECHO_2 = "acme/echo:0.0.2@" + "b" * 64
OTHER = "acme/other:1.0.0@" + "c" * 64

KEY_1 = "5f0c1d2e-3a4b-4c5d-8e6f-000000000001"
KEY_2 = "5f0c1d2e-3a4b-4c5d-8e6f-000000000002"

ALL_KINDS = ("tool", "model", "agent_strategy", "datasource", "trigger")


def contract(check):
    """
    Turn ``async def check(self)`` into a plain test method that runs it
    through ``self.run_check``; the check's docstring is the test's.
    """

    def test(self):
        return self.run_check(check(self))

    test.__name__ = check.__name__
    test.__qualname__ = check.__qualname__
    test.__doc__ = check.__doc__
    return test


async def settle(*deferreds) -> list:
    """
    Wait for every Deferred, started together; a list of
    ``(succeeded, result_or_failure)`` in the same order.
    """
    return await DeferredList(list(deferreds), consumeErrors=True)


def _task(tenant_id: str, moment, status: str = TASK_RUNNING, plugins=None) -> InstallTask:
    if plugins is None:
        plugins = [
            InstallTaskPlugin(
                plugin_unique_identifier=ECHO_1,
                plugin_id="acme/echo",
                status=TASK_PENDING,
                message="",
                icon="icon.svg",
                icon_dark="",
                labels={"en_US": "Echo", "zh_Hans": "回声"},
                source="marketplace",
            )
        ]
    return InstallTask(
        id=new_id(moment.timestamp()),
        created_at=moment,
        updated_at=moment,
        status=status,
        tenant_id=tenant_id,
        total_plugins=len(plugins),
        completed_plugins=0,
        plugins=plugins,
    )


class PersistenceContract:
    """The behaviour every IPersistence must have."""

    #: set by the concrete case: the migrated implementation under test
    persistence = None
    #: set by the concrete case: what the persistence takes its time from,
    #: with ``advance(seconds)``
    clock = None

    def advance(self, seconds: float) -> None:
        """Move the time the persistence sees."""
        self.clock.advance(seconds)

    def now(self):
        """The time the persistence sees, as an aware datetime."""
        return utc_from_timestamp(self.clock.seconds())

    async def install(self, tenant_id=T1, identifier=ECHO_1, plugin_id="acme/echo",
                      providers=None, **kwargs):
        """Install with the usual defaults."""
        return await self.persistence.install_plugin(
            tenant_id,
            identifier,
            plugin_id,
            kwargs.pop("runtime_type", "local"),
            kwargs.pop("source", "marketplace"),
            kwargs.pop("meta", {"origin": "test"}),
            {"tool": "echo"} if providers is None else providers,
            **kwargs,
        )

    # -- schema ---------------------------------------------------------

    @contract
    async def test_provides_interface(self):
        """The implementation provides IPersistence with matching signatures."""
        self.assertTrue(verifyObject(IPersistence, self.persistence))

    @contract
    async def test_migrate_twice_is_noop(self):
        """A second migrate() succeeds and keeps the data already written."""
        installation = await self.install()
        await self.persistence.migrate()
        self.assertEqual(
            await self.persistence.get_installation(T1, "acme/echo"), installation
        )

    # -- install ---------------------------------------------------------

    @contract
    async def test_install_returns_stored_installation(self):
        """install_plugin returns exactly what get_installation later reads back."""
        installation = await self.install(meta={"a": [1, 2], "b": {"c": None}})
        self.assertEqual(installation.tenant_id, T1)
        self.assertEqual(installation.plugin_id, "acme/echo")
        self.assertEqual(installation.plugin_unique_identifier, ECHO_1)
        self.assertEqual(installation.runtime_type, "local")
        self.assertEqual(installation.source, "marketplace")
        self.assertEqual(installation.meta, {"a": [1, 2], "b": {"c": None}})
        self.assertEqual((installation.endpoints_setups, installation.endpoints_active), (0, 0))
        self.assertEqual(installation.created_at.utcoffset(), timedelta(0))
        self.assertEqual(installation.created_at.tzinfo, timezone.utc)
        self.assertEqual(installation.created_at, self.now())
        self.assertEqual(
            await self.persistence.get_installation(T1, "acme/echo"), installation
        )
        self.assertEqual(
            await self.persistence.get_installation_by_id(T1, installation.id), installation
        )

    @contract
    async def test_install_creates_plugin_row(self):
        """The first install creates the plugins row with install_type and refers 1."""
        await self.install(runtime_type="local", source="github")
        plugin = await self.persistence.get_plugin(ECHO_1)
        self.assertEqual(plugin.plugin_unique_identifier, ECHO_1)
        self.assertEqual(plugin.plugin_id, "acme/echo")
        self.assertEqual(plugin.refers, 1)
        self.assertEqual(plugin.install_type, "local")
        self.assertEqual(plugin.manifest_type, "")
        self.assertEqual(plugin.source, "github")
        self.assertIsNone(plugin.remote_declaration)
        self.assertEqual(plugin.created_at.tzinfo, timezone.utc)

    @contract
    async def test_remote_declaration_stored(self):
        """A remote install keeps its declaration on the plugins row."""
        declaration = {"version": "0.0.1", "name": "echo", "label": {"en_US": "Echo"}}
        await self.install(runtime_type="remote", source="remote",
                           remote_declaration=declaration)
        plugin = await self.persistence.get_plugin(ECHO_1)
        self.assertEqual(plugin.install_type, "remote")
        self.assertEqual(plugin.remote_declaration, declaration)

    @contract
    async def test_list_plugins_by_install_type(self):
        """list_plugins returns the plugins of one install type only."""
        await self.install(identifier=ECHO_1, runtime_type="remote")
        self.advance(1)
        await self.install(identifier=OTHER, plugin_id="acme/other", runtime_type="local")
        remote = await self.persistence.list_plugins("remote")
        local = await self.persistence.list_plugins("local")
        self.assertEqual([p.plugin_unique_identifier for p in remote], [ECHO_1])
        self.assertEqual([p.plugin_unique_identifier for p in local], [OTHER])
        self.assertEqual(await self.persistence.list_plugins("serverless"), [])

    @contract
    async def test_list_installations_by_runtime_type(self):
        """list_installations_by_runtime_type returns every tenant's installations of one runtime type, oldest first."""
        first = await self.install(identifier=ECHO_1, runtime_type="remote")
        self.advance(1)
        await self.install(identifier=OTHER, plugin_id="acme/other", runtime_type="local")
        self.advance(1)
        second = await self.install(tenant_id=T2, identifier=ECHO_1, runtime_type="remote")
        remote = await self.persistence.list_installations_by_runtime_type("remote")
        self.assertEqual([i.id for i in remote], [first.id, second.id])
        self.assertEqual([i.tenant_id for i in remote], [T1, T2])
        self.assertEqual(await self.persistence.list_installations_by_runtime_type("serverless"), [])

    @contract
    async def test_already_installed(self):
        """Installing a plugin_id the tenant has (any version) fails and changes nothing."""
        first = await self.install(identifier=ECHO_1)
        failure = None
        try:
            await self.install(identifier=ECHO_2)
        except AlreadyInstalledError as e:
            failure = e
        self.assertIsInstance(failure, AlreadyInstalledError)
        self.assertEqual(await self.persistence.get_installation(T1, "acme/echo"), first)
        self.assertIsNone(await self.persistence.get_plugin(ECHO_2))
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 1)

    @contract
    async def test_refers_across_tenants(self):
        """Two tenants share one plugins row; it and its declaration go only at zero."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"name": "echo"})
        one = await self.install(tenant_id=T1)
        two = await self.install(tenant_id=T2)
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 2)

        result = await self.persistence.uninstall_plugin(T1, one.id)
        self.assertEqual(result.installation, one)
        self.assertFalse(result.plugin_removed)
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 1)
        self.assertEqual(await self.persistence.get_declaration(ECHO_1), {"name": "echo"})
        self.assertIsNone(await self.persistence.get_installation(T1, "acme/echo"))
        self.assertEqual(await self.persistence.get_installation(T2, "acme/echo"), two)

        result = await self.persistence.uninstall_plugin(T2, two.id)
        self.assertTrue(result.plugin_removed)
        self.assertIsNone(await self.persistence.get_plugin(ECHO_1))
        self.assertIsNone(await self.persistence.get_declaration(ECHO_1))

    @contract
    async def test_uninstall_removes_projections(self):
        """Uninstall deletes the tenant's provider rows and leaves other tenants' rows."""
        providers = {"tool": "echo", "model": "echo_models"}
        await self.install(tenant_id=T1, providers=providers)
        two = await self.install(tenant_id=T2, providers=providers)
        await self.persistence.uninstall_plugin(T2, two.id)
        for kind in ("tool", "model"):
            self.assertIsNone(await self.persistence.get_provider(kind, T2, "acme/echo"))
            self.assertIsNotNone(await self.persistence.get_provider(kind, T1, "acme/echo"))

    @contract
    async def test_uninstall_unknown(self):
        """Uninstalling an unknown, malformed or foreign installation id gives None."""
        one = await self.install(tenant_id=T1)
        self.assertIsNone(await self.persistence.uninstall_plugin(T1, new_id(1.0)))
        self.assertIsNone(await self.persistence.uninstall_plugin(T1, "nonsense"))
        self.assertIsNone(await self.persistence.uninstall_plugin(T2, one.id))
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 1)

    @contract
    async def test_unknown_kind_writes_nothing(self):
        """An install failing in the middle (unknown provider kind) leaves no row behind."""
        await self.install(tenant_id=T2, identifier=OTHER, plugin_id="acme/other")
        failure = None
        try:
            await self.install(providers={"tool": "echo", "spaceship": "x"})
        except ValueError as e:
            failure = e
        self.assertIsInstance(failure, ValueError)
        self.assertIsNone(await self.persistence.get_plugin(ECHO_1))
        self.assertIsNone(await self.persistence.get_installation(T1, "acme/echo"))
        self.assertIsNone(await self.persistence.get_provider("tool", T1, "acme/echo"))
        self.assertEqual(await self.persistence.list_installations(T1, 0, 10), ([], 0))

    @contract
    async def test_concurrent_install_same_tenant(self):
        """Concurrent installs of one plugin_id by one tenant: one wins, the rest are refused."""
        outcomes = await settle(*[
            Deferred.fromCoroutine(self.install(identifier=identifier))
            for identifier in (ECHO_1, ECHO_1, ECHO_1, ECHO_2)
        ])
        succeeded = [result for ok, result in outcomes if ok]
        refused = [result for ok, result in outcomes if not ok]
        self.assertEqual(len(succeeded), 1)
        self.assertEqual(len(refused), 3)
        for failure in refused:
            failure.trap(AlreadyInstalledError)
        installations, total = await self.persistence.list_installations(T1, 0, 10)
        self.assertEqual((installations, total), (succeeded, 1))
        winner = succeeded[0].plugin_unique_identifier
        loser = ECHO_2 if winner == ECHO_1 else ECHO_1
        self.assertEqual((await self.persistence.get_plugin(winner)).refers, 1)
        self.assertIsNone(await self.persistence.get_plugin(loser))

    @contract
    async def test_concurrent_install_many_tenants(self):
        """Concurrent installs of one identifier by different tenants count every one."""
        tenants = [f"tenant-{n}" for n in range(4)]
        outcomes = await settle(*[
            Deferred.fromCoroutine(self.install(tenant_id=tenant)) for tenant in tenants
        ])
        self.assertEqual([ok for ok, _ in outcomes], [True] * 4)
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 4)

    # -- tenant isolation and listing -----------------------------------------

    @contract
    async def test_tenant_isolation(self):
        """Nothing one tenant installed is visible to another in any list or get."""
        one = await self.install(tenant_id=T1, providers={k: "p" for k in ALL_KINDS})
        await self.persistence.create_task(_task(T1, self.now()))
        for other in (T2, ODD_TENANT):
            self.assertIsNone(await self.persistence.get_installation(other, "acme/echo"))
            self.assertIsNone(await self.persistence.get_installation_by_id(other, one.id))
            self.assertEqual(await self.persistence.list_installations(other, 0, 10), ([], 0))
            self.assertEqual(
                await self.persistence.list_installations_by_plugin_ids(other, ["acme/echo"]), []
            )
            for kind in ALL_KINDS:
                self.assertEqual(await self.persistence.list_providers(kind, other, 0, 10), [])
                self.assertIsNone(await self.persistence.get_provider(kind, other, "acme/echo"))
            self.assertEqual(await self.persistence.list_tasks(other, 0, 10), [])

    @contract
    async def test_list_installations_newest_first(self):
        """Installations are paged newest first with the tenant's total."""
        ids = []
        for n in range(5):
            installation = await self.install(
                identifier=f"acme/p{n}:1.0.0@" + "d" * 64, plugin_id=f"acme/p{n}"
            )
            ids.append(installation.id)
            self.advance(1)
        await self.install(tenant_id=T2, identifier=OTHER, plugin_id="acme/other")
        page, total = await self.persistence.list_installations(T1, 0, 3)
        self.assertEqual(total, 5)
        self.assertEqual([i.id for i in page], ids[::-1][:3])
        page, total = await self.persistence.list_installations(T1, 3, 3)
        self.assertEqual(total, 5)
        self.assertEqual([i.id for i in page], ids[::-1][3:])
        self.assertEqual(await self.persistence.list_installations(T1, 10, 3), ([], 5))

    @contract
    async def test_list_installations_by_plugin_ids(self):
        """Only the asked plugin_ids of the tenant are returned; an empty ask gives []."""
        echo = await self.install(identifier=ECHO_1, plugin_id="acme/echo")
        other = await self.install(identifier=OTHER, plugin_id="acme/other")
        await self.install(identifier="acme/third:1.0.0@" + "e" * 64, plugin_id="acme/third")
        found = await self.persistence.list_installations_by_plugin_ids(
            T1, ["acme/other", "acme/echo", "acme/missing"]
        )
        self.assertEqual(sorted(found, key=lambda i: i.plugin_id), [echo, other])
        self.assertEqual(await self.persistence.list_installations_by_plugin_ids(T1, []), [])

    # -- providers ---------------------------------------------------------

    @contract
    async def test_providers_per_kind(self):
        """Each declared kind gets one projection row naming the provider."""
        await self.install(providers={"tool": "echo_tool", "model": "echo_model"})
        tool = await self.persistence.get_provider("tool", T1, "acme/echo")
        self.assertEqual(
            (tool.tenant_id, tool.provider, tool.plugin_id, tool.plugin_unique_identifier),
            (T1, "echo_tool", "acme/echo", ECHO_1),
        )
        model = await self.persistence.get_provider("model", T1, "acme/echo")
        self.assertEqual(model.provider, "echo_model")
        for kind in ("agent_strategy", "datasource", "trigger"):
            self.assertIsNone(await self.persistence.get_provider(kind, T1, "acme/echo"))
            self.assertEqual(await self.persistence.list_providers(kind, T1, 0, 10), [])

    @contract
    async def test_list_providers_newest_first(self):
        """A projection table pages newest first."""
        for n in range(3):
            await self.install(
                identifier=f"acme/p{n}:1.0.0@" + "d" * 64, plugin_id=f"acme/p{n}",
                providers={"datasource": f"source{n}"},
            )
            self.advance(1)
        rows = await self.persistence.list_providers("datasource", T1, 0, 10)
        self.assertEqual([r.provider for r in rows], ["source2", "source1", "source0"])
        rows = await self.persistence.list_providers("datasource", T1, 1, 1)
        self.assertEqual([r.provider for r in rows], ["source1"])

    @contract
    async def test_unknown_kind_query(self):
        """Asking for an unknown provider kind is a ValueError."""
        failure = None
        try:
            await self.persistence.list_providers("spaceship", T1, 0, 10)
        except ValueError as e:
            failure = e
        self.assertIsInstance(failure, ValueError)

    # -- upgrade -----------------------------------------------------------

    @contract
    async def test_upgrade_moves_refers(self):
        """Upgrade points the installation at the new identifier and moves one refer."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1})
        one = await self.install(tenant_id=T1, providers={"tool": "echo", "model": "m"})
        await self.install(tenant_id=T2)
        self.advance(5)
        result = await self.persistence.upgrade_plugin(
            T1, ECHO_1, ECHO_2, {"tool": "echo2", "trigger": "t"}, "github", {"new": True}
        )
        self.assertFalse(result.original_plugin_removed)
        upgraded = result.installation
        self.assertEqual(upgraded.id, one.id)
        self.assertEqual(upgraded.created_at, one.created_at)
        self.assertEqual(upgraded.updated_at, self.now())
        self.assertEqual(upgraded.plugin_unique_identifier, ECHO_2)
        self.assertEqual((upgraded.source, upgraded.meta), ("github", {"new": True}))
        self.assertEqual(await self.persistence.get_installation(T1, "acme/echo"), upgraded)

        old = await self.persistence.get_plugin(ECHO_1)
        new = await self.persistence.get_plugin(ECHO_2)
        self.assertEqual(old.refers, 1)
        self.assertEqual(new.refers, 1)
        self.assertEqual(new.manifest_type, "plugin")
        self.assertEqual(new.install_type, "local")
        self.assertEqual(new.plugin_id, "acme/echo")

        tool = await self.persistence.get_provider("tool", T1, "acme/echo")
        self.assertEqual((tool.provider, tool.plugin_unique_identifier), ("echo2", ECHO_2))
        self.assertIsNone(await self.persistence.get_provider("model", T1, "acme/echo"))
        self.assertEqual(
            (await self.persistence.get_provider("trigger", T1, "acme/echo")).provider, "t"
        )
        self.assertEqual(len(await self.persistence.list_providers("tool", T1, 0, 10)), 1)
        # the other tenant's projection still names the old version
        other = await self.persistence.get_provider("tool", T2, "acme/echo")
        self.assertEqual(other.plugin_unique_identifier, ECHO_1)
        self.assertEqual(await self.persistence.get_declaration(ECHO_1), {"v": 1})

    @contract
    async def test_upgrade_removes_unreferenced_original(self):
        """The original plugins row and declaration go when the upgrade drops refers to zero."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1})
        await self.install(tenant_id=T1)
        result = await self.persistence.upgrade_plugin(T1, ECHO_1, ECHO_2, {}, "package", {})
        self.assertTrue(result.original_plugin_removed)
        self.assertIsNone(await self.persistence.get_plugin(ECHO_1))
        self.assertIsNone(await self.persistence.get_declaration(ECHO_1))
        self.assertEqual((await self.persistence.get_plugin(ECHO_2)).refers, 1)
        self.assertIsNone(await self.persistence.get_provider("tool", T1, "acme/echo"))

    @contract
    async def test_upgrade_to_same_identifier(self):
        """Upgrading to the identifier already installed keeps its row and count."""
        await self.install(tenant_id=T1)
        result = await self.persistence.upgrade_plugin(
            T1, ECHO_1, ECHO_1, {"tool": "echo"}, "marketplace", {}
        )
        self.assertFalse(result.original_plugin_removed)
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 1)

    @contract
    async def test_upgrade_unknown_original(self):
        """Upgrading an identifier the tenant has not installed is RecordNotFoundError."""
        await self.install(tenant_id=T2)
        failure = None
        try:
            await self.persistence.upgrade_plugin(T1, ECHO_1, ECHO_2, {}, "marketplace", {})
        except RecordNotFoundError as e:
            failure = e
        self.assertIsInstance(failure, RecordNotFoundError)
        self.assertIsNone(await self.persistence.get_plugin(ECHO_2))
        self.assertEqual((await self.persistence.get_plugin(ECHO_1)).refers, 1)

    # -- declarations and readmes -------------------------------------------

    @contract
    async def test_declaration_insert_if_absent(self):
        """A second save of the same identifier keeps the first declaration."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1, "icon": "x"})
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 2})
        self.assertEqual(await self.persistence.get_declaration(ECHO_1), {"v": 1, "icon": "x"})
        self.assertIsNone(await self.persistence.get_declaration(ECHO_2))

    @contract
    async def test_declaration_saved_from_encoded_json(self):
        """A declaration given as an orjson.Fragment of its JSON is stored as that JSON."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", orjson.Fragment(b'{"v":1,"s":"\xe5\x9b\x9e"}'))
        self.assertEqual(await self.persistence.get_declaration(ECHO_1), {"v": 1, "s": "\u56de"})

    @contract
    async def test_get_declarations_batch(self):
        """get_declarations returns the existing ones, keyed by identifier."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1})
        await self.persistence.save_declaration(OTHER, "acme/other", {"v": "o"})
        found = await self.persistence.get_declarations([ECHO_1, ECHO_2, OTHER])
        self.assertEqual(found, {ECHO_1: {"v": 1}, OTHER: {"v": "o"}})
        self.assertEqual(await self.persistence.get_declarations([]), {})

    @contract
    async def test_get_declarations_json(self):
        """get_declarations_json gives the stored JSON bytes, None for known ones, nothing for absent ones."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1, "s": "回"})
        await self.persistence.save_declaration(OTHER, "acme/other", {"v": "o"})
        found = await self.persistence.get_declarations_json([ECHO_1, ECHO_2, OTHER])
        self.assertEqual(set(found), {ECHO_1, OTHER})
        self.assertIsInstance(found[ECHO_1], bytes)
        self.assertEqual(orjson.loads(found[ECHO_1]), {"v": 1, "s": "回"})
        self.assertEqual(orjson.loads(found[OTHER]), {"v": "o"})
        known = await self.persistence.get_declarations_json([ECHO_1, ECHO_2, OTHER], known=[OTHER, ECHO_2])
        self.assertEqual(set(known), {ECHO_1, OTHER})
        self.assertIsNone(known[OTHER])
        self.assertEqual(await self.persistence.get_declarations_json([]), {})
        await self.persistence.delete_declaration(OTHER)
        self.assertEqual(set(await self.persistence.get_declarations_json([OTHER], known=[OTHER])), set())

    @contract
    async def test_delete_declaration(self):
        """delete_declaration removes one declaration; deleting again is fine."""
        await self.persistence.save_declaration(ECHO_1, "acme/echo", {"v": 1})
        await self.persistence.save_declaration(OTHER, "acme/other", {"v": 2})
        await self.persistence.delete_declaration(ECHO_1)
        await self.persistence.delete_declaration(ECHO_1)
        self.assertIsNone(await self.persistence.get_declaration(ECHO_1))
        self.assertEqual(await self.persistence.get_declaration(OTHER), {"v": 2})

    @contract
    async def test_readmes(self):
        """READMEs are stored per language, replaced on save, and per identifier."""
        self.assertEqual(await self.persistence.get_readmes(ECHO_1), {})
        await self.persistence.save_readme(ECHO_1, "en_US", "# Echo")
        await self.persistence.save_readme(ECHO_1, "zh_Hans", "# 回声")
        await self.persistence.save_readme(ECHO_1, "en_US", "# Echo v2")
        await self.persistence.save_readme(OTHER, "en_US", "# Other")
        self.assertEqual(
            await self.persistence.get_readmes(ECHO_1), {"en_US": "# Echo v2", "zh_Hans": "# 回声"}
        )

    # -- tasks ---------------------------------------------------------------

    @contract
    async def test_task_round_trip(self):
        """A created task reads back equal, plugins and labels included."""
        task = _task(T1, self.now())
        await self.persistence.create_task(task)
        self.assertEqual(await self.persistence.get_task(T1, task.id), task)
        self.assertIsNone(await self.persistence.get_task(T2, task.id))
        self.assertIsNone(await self.persistence.get_task(T1, "no-such-task"))

    @contract
    async def test_update_task(self):
        """update_task replaces status, counts and plugins and stamps updated_at."""
        task = _task(T1, self.now())
        await self.persistence.create_task(task)
        self.advance(3)
        done = attrs.evolve(task.plugins[0], status=TASK_SUCCESS, message="installed")
        changed = attrs.evolve(task, status=TASK_SUCCESS, completed_plugins=1, plugins=[done])
        await self.persistence.update_task(changed)
        stored = await self.persistence.get_task(T1, task.id)
        self.assertEqual(stored.status, TASK_SUCCESS)
        self.assertEqual(stored.completed_plugins, 1)
        self.assertEqual(stored.plugins, (done,))
        self.assertEqual(stored.created_at, task.created_at)
        self.assertEqual(stored.updated_at, self.now())

    @contract
    async def test_list_tasks_newest_first(self):
        """A tenant's tasks page newest first."""
        tasks = []
        for _ in range(3):
            task = _task(T1, self.now())
            await self.persistence.create_task(task)
            tasks.append(task)
            self.advance(1)
        await self.persistence.create_task(_task(T2, self.now()))
        self.assertEqual(await self.persistence.list_tasks(T1, 0, 10), tasks[::-1])
        self.assertEqual(await self.persistence.list_tasks(T1, 1, 1), [tasks[1]])

    @contract
    async def test_list_tasks_by_status(self):
        """list_tasks_by_status finds tasks of every tenant in the given statuses."""
        running = _task(T1, self.now(), status=TASK_RUNNING)
        self.advance(1)
        pending = _task(T2, self.now(), status=TASK_PENDING)
        self.advance(1)
        failed = _task(T1, self.now(), status=TASK_FAILED)
        for task in (running, pending, failed):
            await self.persistence.create_task(task)
        found = await self.persistence.list_tasks_by_status([TASK_PENDING, TASK_RUNNING])
        self.assertEqual(sorted(t.id for t in found), sorted([running.id, pending.id]))
        self.assertEqual(await self.persistence.list_tasks_by_status([TASK_SUCCESS]), [])

    @contract
    async def test_delete_task(self):
        """delete_task removes only the tenant's own task; absent ids are fine."""
        task = _task(T1, self.now())
        await self.persistence.create_task(task)
        await self.persistence.delete_task(T2, task.id)
        self.assertEqual(await self.persistence.get_task(T1, task.id), task)
        await self.persistence.delete_task(T1, task.id)
        await self.persistence.delete_task(T1, task.id)
        await self.persistence.delete_task(T1, "malformed")
        self.assertIsNone(await self.persistence.get_task(T1, task.id))

    @contract
    async def test_delete_all_tasks(self):
        """delete_all_tasks empties one tenant's tasks and no one else's."""
        for _ in range(2):
            await self.persistence.create_task(_task(T1, self.now()))
            self.advance(1)
        kept = _task(T2, self.now())
        await self.persistence.create_task(kept)
        await self.persistence.delete_all_tasks(T1)
        self.assertEqual(await self.persistence.list_tasks(T1, 0, 10), [])
        self.assertEqual(await self.persistence.list_tasks(T2, 0, 10), [kept])

    # -- remote debugging keys -------------------------------------------------

    @contract
    async def test_debugging_key_created_once(self):
        """A tenant's first key is the new one; later calls return it and ignore theirs."""
        first = await self.persistence.get_or_create_debugging_key(T1, KEY_1, 7200.0)
        self.assertEqual((first.tenant_id, first.key), (T1, KEY_1))
        self.assertEqual(first.expires_at, utc_from_timestamp(self.clock.seconds() + 7200.0))
        again = await self.persistence.get_or_create_debugging_key(T1, KEY_2, 7200.0)
        self.assertEqual(again.key, KEY_1)
        other = await self.persistence.get_or_create_debugging_key(T2, KEY_2, 7200.0)
        self.assertEqual(other.key, KEY_2)
        self.assertEqual((await self.persistence.get_debugging_key(KEY_2)).tenant_id, T2)

    @contract
    async def test_debugging_key_refresh(self):
        """Asking for the key again moves its expiry; lookups never do."""
        await self.persistence.get_or_create_debugging_key(T1, KEY_1, 7200.0)
        self.advance(7000)
        self.assertEqual((await self.persistence.get_debugging_key(KEY_1)).tenant_id, T1)
        refreshed = await self.persistence.get_or_create_debugging_key(T1, KEY_2, 7200.0)
        self.assertEqual(refreshed.key, KEY_1)
        self.advance(7100)
        found = await self.persistence.get_debugging_key(KEY_1)
        self.assertEqual(found, refreshed)
        self.advance(200)
        self.assertIsNone(await self.persistence.get_debugging_key(KEY_1))

    @contract
    async def test_debugging_key_expired_replaced(self):
        """An expired key is dead; the tenant's next key is the new one given."""
        await self.persistence.get_or_create_debugging_key(T1, KEY_1, 10.0)
        self.advance(10)
        self.assertIsNone(await self.persistence.get_debugging_key(KEY_1))
        renewed = await self.persistence.get_or_create_debugging_key(T1, KEY_2, 10.0)
        self.assertEqual(renewed.key, KEY_2)
        self.assertIsNone(await self.persistence.get_debugging_key(KEY_1))
        self.assertEqual((await self.persistence.get_debugging_key(KEY_2)).tenant_id, T1)

    @contract
    async def test_debugging_key_unknown(self):
        """An unknown or malformed key names no tenant."""
        await self.persistence.get_or_create_debugging_key(T1, KEY_1, 7200.0)
        self.assertIsNone(await self.persistence.get_debugging_key(KEY_2))
        self.assertIsNone(await self.persistence.get_debugging_key("not a key"))

    @contract
    async def test_debugging_key_concurrent_first_requests(self):
        """Concurrent first requests of one tenant all get the same key."""
        outcomes = await settle(*[
            self.persistence.get_or_create_debugging_key(ODD_TENANT, key, 7200.0)
            for key in (KEY_1, KEY_2)
        ])
        self.assertEqual([ok for ok, _ in outcomes], [True, True])
        self.assertEqual(outcomes[0][1].key, outcomes[1][1].key)

    # -- plugin key/value storage ------------------------------------------------

    async def storage_quota_refused(self, tenant_id, plugin_id, key, value, quota):
        """Whether storage_set failed with StorageQuotaExceededError (and its text)."""
        try:
            await self.persistence.storage_set(tenant_id, plugin_id, key, value, quota)
        except StorageQuotaExceededError as e:
            self.assertEqual(e.message, "allocated size is greater than max storage size")
            return True
        return False

    @contract
    async def test_storage_round_trip(self):
        """Stored bytes (NULs, digits, non-ASCII keys) come back unchanged and are counted."""
        values = {"k": b"hello", "bin/\u952e-\u00fc": b"\x00\xff\x00", "digits": b"123"}
        for key, value in values.items():
            await self.persistence.storage_set(T1, "acme/echo", key, value, 1000)
        for key, value in values.items():
            found = await self.persistence.storage_get(T1, "acme/echo", key)
            self.assertEqual((type(found), found), (bytes, value))
            self.assertTrue(await self.persistence.storage_exists(T1, "acme/echo", key))
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 5 + 3 + 3)

    @contract
    async def test_storage_absent(self):
        """An unknown key reads as None, does not exist, deletes nothing and costs nothing."""
        self.assertIsNone(await self.persistence.storage_get(T1, "acme/echo", "nope"))
        self.assertFalse(await self.persistence.storage_exists(T1, "acme/echo", "nope"))
        self.assertEqual(await self.persistence.storage_delete(T1, "acme/echo", "nope"), 0)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 0)

    @contract
    async def test_storage_empty_value(self):
        """An empty value is stored: it exists, reads as b'' and costs nothing."""
        await self.persistence.storage_set(T1, "acme/echo", "empty", b"", 0)
        self.assertTrue(await self.persistence.storage_exists(T1, "acme/echo", "empty"))
        self.assertEqual(await self.persistence.storage_get(T1, "acme/echo", "empty"), b"")
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 0)

    @contract
    async def test_storage_overwrite(self):
        """Overwriting a key replaces its value and counts only the new length."""
        await self.persistence.storage_set(T1, "acme/echo", "k", b"0123456789", 100)
        await self.persistence.storage_set(T1, "acme/echo", "other", b"xy", 100)
        await self.persistence.storage_set(T1, "acme/echo", "k", b"abcd", 100)
        self.assertEqual(await self.persistence.storage_get(T1, "acme/echo", "k"), b"abcd")
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 4 + 2)
        await self.persistence.storage_set(T1, "acme/echo", "k", b"abcdefgh", 100)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 8 + 2)

    @contract
    async def test_storage_delete(self):
        """Deleting a key removes it once and takes its length off the total."""
        await self.persistence.storage_set(T1, "acme/echo", "a", b"aaaa", 100)
        await self.persistence.storage_set(T1, "acme/echo", "b", b"bb", 100)
        self.assertEqual(await self.persistence.storage_delete(T1, "acme/echo", "a"), 1)
        self.assertIsNone(await self.persistence.storage_get(T1, "acme/echo", "a"))
        self.assertFalse(await self.persistence.storage_exists(T1, "acme/echo", "a"))
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 2)
        self.assertEqual(await self.persistence.storage_delete(T1, "acme/echo", "a"), 0)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 2)
        self.assertEqual(await self.persistence.storage_get(T1, "acme/echo", "b"), b"bb")

    @contract
    async def test_storage_quota(self):
        """A write up to the quota succeeds; one beyond it fails and changes nothing."""
        await self.persistence.storage_set(T1, "acme/echo", "a", b"123456", 10)
        await self.persistence.storage_set(T1, "acme/echo", "b", b"1234", 10)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 10)
        self.assertTrue(await self.storage_quota_refused(T1, "acme/echo", "c", b"1", 10))
        self.assertFalse(await self.persistence.storage_exists(T1, "acme/echo", "c"))
        self.assertTrue(await self.storage_quota_refused(T1, "acme/echo", "b", b"12345", 10))
        self.assertEqual(await self.persistence.storage_get(T1, "acme/echo", "b"), b"1234")
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 10)
        # an overwrite is charged only the difference, so shrinking always fits
        await self.persistence.storage_set(T1, "acme/echo", "a", b"12", 10)
        await self.persistence.storage_set(T1, "acme/echo", "c", b"1234", 10)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 10)

    @contract
    async def test_storage_quota_first_write(self):
        """A first write over the quota leaves no value and no total behind."""
        self.assertTrue(await self.storage_quota_refused(T1, "acme/echo", "k", b"x" * 11, 10))
        self.assertFalse(await self.persistence.storage_exists(T1, "acme/echo", "k"))
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 0)
        await self.persistence.storage_set(T1, "acme/echo", "k", b"x" * 10, 10)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 10)

    @contract
    async def test_storage_isolation(self):
        """Tenants and plugins have their own keys, totals and quotas."""
        pairs = [(T1, "acme/echo"), (T2, "acme/echo"), (T1, "acme/other"), (ODD_TENANT, "x/y")]
        for index, (tenant_id, plugin_id) in enumerate(pairs):
            await self.persistence.storage_set(tenant_id, plugin_id, "k", b"v" * (index + 1), 4)
        for index, (tenant_id, plugin_id) in enumerate(pairs):
            self.assertEqual(
                await self.persistence.storage_get(tenant_id, plugin_id, "k"), b"v" * (index + 1)
            )
            self.assertEqual(await self.persistence.storage_size(tenant_id, plugin_id), index + 1)
        self.assertIsNone(await self.persistence.storage_get(T2, "acme/other", "k"))
        self.assertEqual(await self.persistence.storage_delete(T2, "acme/echo", "k"), 1)
        self.assertEqual(await self.persistence.storage_get(T1, "acme/echo", "k"), b"v")
        self.assertEqual(await self.persistence.storage_get(T1, "acme/other", "k"), b"vvv")
        self.assertEqual(await self.persistence.storage_size(T2, "acme/echo"), 0)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/other"), 3)

    @contract
    async def test_storage_concurrent_writes_respect_quota(self):
        """Concurrent writes to one plugin's fresh store: totals add up and the quota holds."""
        outcomes = await settle(*[
            self.persistence.storage_set(T1, "acme/echo", f"key-{index}", b"1234", 10)
            for index in range(5)
        ])
        succeeded = [index for index, (ok, _) in enumerate(outcomes) if ok]
        for ok, failure in outcomes:
            if not ok:
                failure.trap(StorageQuotaExceededError)
        self.assertEqual(len(succeeded), 2)
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 8)
        for index in range(5):
            self.assertEqual(
                await self.persistence.storage_exists(T1, "acme/echo", f"key-{index}"),
                index in succeeded,
            )

    @contract
    async def test_storage_concurrent_deletes(self):
        """Concurrent deletes of one key delete it once and take its length off once."""
        await self.persistence.storage_set(T1, "acme/echo", "a", b"aaaa", 100)
        await self.persistence.storage_set(T1, "acme/echo", "b", b"bb", 100)
        outcomes = await settle(*[
            self.persistence.storage_delete(T1, "acme/echo", "a") for _ in range(3)
        ])
        self.assertEqual(sorted(result for _, result in outcomes), [0, 0, 1])
        self.assertEqual(await self.persistence.storage_size(T1, "acme/echo"), 2)

    # -- endpoints ---------------------------------------------------------------

    async def endpoint(self, tenant_id=T1, plugin_id="acme/echo", name="default", settings=None,
                       user_id="user-1"):
        """Create one endpoint with the usual defaults."""
        return await self.persistence.create_endpoint(
            new_id(self.clock.seconds()), tenant_id, user_id, plugin_id, name,
            {"api_key": "cipher", "depth": 2} if settings is None else settings,
        )

    async def counters(self, tenant_id=T1, plugin_id="acme/echo"):
        """(endpoints_setups, endpoints_active) of an installation."""
        installation = await self.persistence.get_installation(tenant_id, plugin_id)
        return installation.endpoints_setups, installation.endpoints_active

    @contract
    async def test_endpoint_round_trip(self):
        """create_endpoint returns exactly what the lookups by id and by hook id read back."""
        await self.install()
        endpoint_id = new_id(self.clock.seconds())
        created = await self.persistence.create_endpoint(
            endpoint_id, T1, "user-1", "acme/echo", "my hook", {"api_key": "cipher", "nested": {"a": [1, None]}}
        )
        self.assertEqual(created.id, endpoint_id)
        self.assertEqual(
            (created.tenant_id, created.user_id, created.plugin_id, created.name),
            (T1, "user-1", "acme/echo", "my hook"),
        )
        self.assertEqual(created.settings, {"api_key": "cipher", "nested": {"a": [1, None]}})
        self.assertIs(created.enabled, True)
        self.assertRegex(created.hook_id, r"^[a-z0-9]{16}$")
        self.assertEqual(created.expired_at, datetime(2050, 1, 1, tzinfo=timezone.utc))
        self.assertEqual(created.created_at, self.now())
        self.assertEqual(created.updated_at, self.now())
        self.assertEqual(await self.persistence.get_endpoint(T1, endpoint_id), created)
        self.assertEqual(await self.persistence.get_endpoint_by_hook_id(created.hook_id), created)

    @contract
    async def test_endpoint_hook_ids_differ(self):
        """Every endpoint gets its own random hook id."""
        await self.install()
        hooks = {(await self.endpoint()).hook_id for _ in range(20)}
        self.assertEqual(len(hooks), 20)

    @contract
    async def test_endpoint_unknown(self):
        """Unknown ids, malformed ids and unknown hook ids find nothing."""
        self.assertIsNone(await self.persistence.get_endpoint(T1, new_id(self.clock.seconds())))
        self.assertIsNone(await self.persistence.get_endpoint(T1, "not-a-uuid"))
        self.assertIsNone(await self.persistence.get_endpoint_by_hook_id("abcdefghijklmnop"))
        self.assertIsNone(await self.persistence.update_endpoint(T1, "not-a-uuid", "n", {}))
        self.assertIsNone(await self.persistence.set_endpoint_enabled(T1, "not-a-uuid", False))
        self.assertFalse(await self.persistence.delete_endpoint(T1, "not-a-uuid"))

    @contract
    async def test_endpoint_counters_on_create(self):
        """Creating endpoints adds to both counters of the tenant's installation."""
        await self.install()
        await self.install(tenant_id=T2)
        await self.endpoint()
        await self.endpoint()
        self.assertEqual(await self.counters(), (2, 2))
        self.assertEqual(await self.counters(T2), (0, 0))

    @contract
    async def test_endpoint_without_installation(self):
        """An endpoint of a plugin the tenant has not installed is still stored."""
        created = await self.endpoint(plugin_id="acme/gone")
        self.assertEqual(await self.persistence.get_endpoint(T1, created.id), created)

    @contract
    async def test_endpoint_tenant_isolation(self):
        """Another tenant can neither see, change, enable, disable nor delete an endpoint."""
        await self.install()
        created = await self.endpoint()
        self.assertIsNone(await self.persistence.get_endpoint(T2, created.id))
        self.assertEqual(await self.persistence.list_endpoints(T2, 0, 10), [])
        self.assertEqual(await self.persistence.list_plugin_endpoints(T2, "acme/echo", 0, 10), [])
        self.assertIsNone(await self.persistence.update_endpoint(T2, created.id, "x", {}))
        self.assertIsNone(await self.persistence.set_endpoint_enabled(T2, created.id, False))
        self.assertFalse(await self.persistence.delete_endpoint(T2, created.id))
        self.assertEqual(await self.persistence.get_endpoint(T1, created.id), created)
        self.assertEqual(await self.counters(), (1, 1))

    @contract
    async def test_list_endpoints_newest_first(self):
        """Endpoint lists are newest first, paged, and the plugin list filters by plugin_id."""
        await self.install()
        await self.install(identifier=OTHER, plugin_id="acme/other")
        made = []
        for index in range(5):
            self.advance(1)
            made.append(await self.endpoint(
                plugin_id="acme/echo" if index % 2 == 0 else "acme/other", name=f"e{index}"
            ))
        await self.endpoint(tenant_id=T2)
        listed = await self.persistence.list_endpoints(T1, 0, 10)
        self.assertEqual([e.name for e in listed], ["e4", "e3", "e2", "e1", "e0"])
        self.assertEqual(listed[0], made[4])
        page = await self.persistence.list_endpoints(T1, 1, 2)
        self.assertEqual([e.name for e in page], ["e3", "e2"])
        mine = await self.persistence.list_plugin_endpoints(T1, "acme/echo", 0, 10)
        self.assertEqual([e.name for e in mine], ["e4", "e2", "e0"])
        page = await self.persistence.list_plugin_endpoints(T1, "acme/echo", 2, 5)
        self.assertEqual([e.name for e in page], ["e0"])

    @contract
    async def test_update_endpoint(self):
        """update_endpoint replaces name and settings, stamps updated_at and keeps the rest."""
        await self.install()
        created = await self.endpoint()
        self.advance(5)
        updated = await self.persistence.update_endpoint(T1, created.id, "renamed", {"api_key": "other"})
        self.assertEqual(updated.name, "renamed")
        self.assertEqual(updated.settings, {"api_key": "other"})
        self.assertEqual(updated.updated_at, self.now())
        self.assertEqual(
            (updated.hook_id, updated.created_at, updated.enabled, updated.user_id),
            (created.hook_id, created.created_at, created.enabled, created.user_id),
        )
        self.assertEqual(await self.persistence.get_endpoint(T1, created.id), updated)
        self.assertEqual(await self.counters(), (1, 1))

    @contract
    async def test_endpoint_enable_disable(self):
        """Disabling and enabling change endpoints_active once each, however often repeated."""
        await self.install()
        created = await self.endpoint()
        await self.endpoint()
        disabled = await self.persistence.set_endpoint_enabled(T1, created.id, False)
        self.assertIs(disabled.enabled, False)
        self.assertEqual(await self.counters(), (2, 1))
        again = await self.persistence.set_endpoint_enabled(T1, created.id, False)
        self.assertIs(again.enabled, False)
        self.assertEqual(await self.counters(), (2, 1))
        self.assertIs((await self.persistence.get_endpoint_by_hook_id(created.hook_id)).enabled, False)
        enabled = await self.persistence.set_endpoint_enabled(T1, created.id, True)
        self.assertIs(enabled.enabled, True)
        await self.persistence.set_endpoint_enabled(T1, created.id, True)
        self.assertEqual(await self.counters(), (2, 2))

    @contract
    async def test_delete_endpoint(self):
        """Deleting takes one off both counters (active only if it was enabled), once."""
        await self.install()
        first = await self.endpoint()
        second = await self.endpoint()
        await self.persistence.set_endpoint_enabled(T1, second.id, False)
        self.assertEqual(await self.counters(), (2, 1))
        self.assertTrue(await self.persistence.delete_endpoint(T1, first.id))
        self.assertEqual(await self.counters(), (1, 0))
        self.assertFalse(await self.persistence.delete_endpoint(T1, first.id))
        self.assertTrue(await self.persistence.delete_endpoint(T1, second.id))
        self.assertEqual(await self.counters(), (0, 0))
        self.assertIsNone(await self.persistence.get_endpoint(T1, first.id))
        self.assertIsNone(await self.persistence.get_endpoint_by_hook_id(second.hook_id))

    @contract
    async def test_endpoints_survive_uninstall(self):
        """Uninstalling a plugin keeps its endpoints (http-api §5.5)."""
        installation = await self.install()
        created = await self.endpoint()
        await self.persistence.uninstall_plugin(T1, installation.id)
        self.assertEqual(await self.persistence.get_endpoint(T1, created.id), created)

    @contract
    async def test_concurrent_endpoint_toggles(self):
        """Concurrent disables of one endpoint take endpoints_active down once."""
        await self.install()
        created = await self.endpoint()
        await settle(*[self.persistence.set_endpoint_enabled(T1, created.id, False) for _ in range(4)])
        self.assertEqual(await self.counters(), (1, 0))
        outcomes = await settle(*[self.persistence.delete_endpoint(T1, created.id) for _ in range(3)])
        self.assertEqual(sorted(result for _, result in outcomes), [False, False, True])
        self.assertEqual(await self.counters(), (0, 0))


    # -- serverless functions -----------------------------------------------

    @contract
    async def test_serverless_runtime_upsert(self):
        """A function row is inserted, then updated in place (same id and created_at) by a second upsert."""
        self.assertIsNone(await self.persistence.get_serverless_runtime(ECHO_1))
        first = await self.persistence.upsert_serverless_runtime(ECHO_1, "http://f/1", "fn-1", "a" * 64)
        self.assertEqual(
            (first.plugin_unique_identifier, first.function_url, first.function_name, first.type, first.checksum),
            (ECHO_1, "http://f/1", "fn-1", "serverless", "a" * 64),
        )
        self.advance(1)
        second = await self.persistence.upsert_serverless_runtime(ECHO_1, "http://f/2", "fn-2", "a" * 64)
        self.assertEqual((second.id, second.created_at), (first.id, first.created_at))
        self.assertEqual((second.function_url, second.function_name), ("http://f/2", "fn-2"))
        self.assertEqual(second.updated_at, self.now())
        self.assertEqual(await self.persistence.get_serverless_runtime(ECHO_1), second)
        self.assertEqual(await self.persistence.list_serverless_runtimes(), [second])

    @contract
    async def test_serverless_runtimes_listed_oldest_first(self):
        """list_serverless_runtimes gives every row, oldest first."""
        await self.persistence.upsert_serverless_runtime(OTHER, "http://f/o", "o", "c" * 64)
        self.advance(1)
        await self.persistence.upsert_serverless_runtime(ECHO_1, "http://f/e", "e", "a" * 64)
        listed = await self.persistence.list_serverless_runtimes()
        self.assertEqual([r.plugin_unique_identifier for r in listed], [OTHER, ECHO_1])

    @contract
    async def test_serverless_runtime_goes_with_its_plugin(self):
        """The function row goes when the last installation of its identifier is uninstalled, not before."""
        first = await self.install(tenant_id=T1, runtime_type="serverless")
        second = await self.install(tenant_id=T2, runtime_type="serverless")
        await self.persistence.upsert_serverless_runtime(ECHO_1, "http://f/1", "fn", "a" * 64)
        await self.persistence.uninstall_plugin(T1, first.id)
        self.assertIsNotNone(await self.persistence.get_serverless_runtime(ECHO_1))
        await self.persistence.uninstall_plugin(T2, second.id)
        self.assertIsNone(await self.persistence.get_serverless_runtime(ECHO_1))


class FrozenTimeReactor:
    """
    The real reactor, except that ``seconds()`` is frozen and moves only by
    :meth:`advance`, so real-reactor cases get the same stamps as the
    ``Clock`` cases.
    """

    def __init__(self, reactor, start: float = 1_700_000_000.0) -> None:
        self._reactor = reactor
        self._now = start

    def seconds(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def __getattr__(self, name):
        return getattr(self._reactor, name)
