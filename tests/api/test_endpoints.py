"""
The endpoint management routes (``/plugin/<tenant>/endpoint/...``,
http-api §2.5) over the in-memory daemon, with the real inner API client
against the fake Dify inner API.
"""

from __future__ import annotations

import orjson

from difydaemon.management.endpoints import (
    Endpoints,
    SettingsError,
    keep_masked_secrets,
    mask_secret,
    mask_settings,
    validate_settings,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from .endpoint_harness import INNER_KEY, EndpointHarness
from .harness import OTHER_TENANT, TENANT, error_of

SECRET_CONFIG = [
    {"name": "api_key", "type": "secret-input", "required": True, "label": {"en_US": "k"}},
    {"name": "greeting", "type": "text-input", "required": False, "label": {"en_US": "g"}},
]


def endpoint_path(action: str, tenant: str = TENANT) -> str:
    return f"/plugin/{tenant}/endpoint/{action}"


class SettingsRuleTests(SynchronousTestCase):
    """The pure rules: masking, keeping masked secrets, validating."""

    def test_mask_long_and_short(self):
        """Secrets longer than 6 bytes keep 2 bytes at each end; shorter ones become all stars."""
        self.assertEqual(mask_secret("supersecret"), "su*******et")
        self.assertEqual(mask_secret("1234567"), "12***67")
        self.assertEqual(mask_secret("123456"), "******")
        self.assertEqual(mask_secret(""), "")

    def test_mask_counts_bytes(self):
        """Masking counts UTF-8 bytes as Go does; a split character becomes U+FFFD."""
        self.assertEqual(mask_secret("ééé"), "******")
        self.assertEqual(mask_secret("éabcdeé"), "é*****é")
        self.assertEqual(mask_secret("aébcdefg"), "a\ufffd*****fg")

    def test_mask_settings_only_secret_strings(self):
        """Only secret-input strings are masked; other fields and non-strings stay."""
        masked = mask_settings(
            {"api_key": "supersecret", "greeting": "hello world", "extra": "x" * 10},
            SECRET_CONFIG,
        )
        self.assertEqual(masked, {"api_key": "su*******et", "greeting": "hello world", "extra": "x" * 10})
        self.assertEqual(mask_settings({"api_key": 12345678}, SECRET_CONFIG), {"api_key": 12345678})

    def test_keep_masked_secrets(self):
        """A secret sent back in its masked form becomes the stored one; a new one stays new."""
        original = {"api_key": "supersecret", "greeting": "hi"}
        self.assertEqual(
            keep_masked_secrets({"api_key": "su*******et", "greeting": "su*******et"}, original, SECRET_CONFIG),
            {"api_key": "supersecret", "greeting": "su*******et"},
        )
        self.assertEqual(
            keep_masked_secrets({"api_key": "brandnew"}, original, SECRET_CONFIG), {"api_key": "brandnew"}
        )

    def test_validation_messages(self):
        """Each broken rule is named as the Go daemon names it."""
        configs = SECRET_CONFIG + [
            {"name": "mode", "type": "select", "options": [{"value": "a"}, {"value": "b"}]},
            {"name": "flag", "type": "boolean"},
            {"name": "app", "type": "app-selector"},
            {"name": "model", "type": "model-selector", "scope": "rerank"},
        ]
        cases = [
            ({}, "missing required setting: api_key"),
            ({"api_key": None}, "missing required setting: api_key"),
            ({"api_key": 1}, "setting api_key is not a string"),
            ({"api_key": "k", "greeting": ["x"]}, "setting greeting is not a string"),
            ({"api_key": "k", "mode": "c"}, "setting mode is not a valid option"),
            ({"api_key": "k", "flag": "true"}, "setting flag is not a boolean"),
            ({"api_key": "k", "app": "x"}, "setting app is not a map"),
            ({"api_key": "k", "app": {}}, "setting app is missing app_id"),
            ({"api_key": "k", "model": {"provider": "p", "model": "m"}}, "setting model is missing model_type"),
            (
                {"api_key": "k", "model": {"provider": "p", "model": "m", "model_type": "rerank"}},
                "setting model is missing score_threshold",
            ),
            ({f"k{i}": i for i in range(65)}, "too many setting fields"),
        ]
        for settings, message in cases:
            with self.assertRaises(SettingsError) as caught:
                validate_settings(settings, configs)
            self.assertEqual(str(caught.exception), message, settings)
        validate_settings(
            {"api_key": "k", "mode": "b", "flag": False, "app": {"app_id": "x"}, "unknown": 1,
             "model": {"provider": "p", "model": "m", "model_type": "rerank", "score_threshold": 0, "top_n": 1}},
            configs,
        )


class SetupTests(SynchronousTestCase):
    """POST /endpoint/setup."""

    def setUp(self):
        super().setUp()
        self.daemon = EndpointHarness(self)
        self.identifier = self.daemon.install_endpoint_plugin()

    def setup_call(self, **body):
        values = {
            "plugin_unique_identifier": self.identifier,
            "user_id": "user-1",
            "name": "hook",
            "settings": {"api_key": "supersecret", "greeting": "hello"},
        }
        values.update(body)
        return self.daemon.call("POST", endpoint_path("setup"), json=values)

    def stored(self):
        return self.successResultOf(self.daemon.persistence.list_endpoints(TENANT, 0, 100))

    def test_setup_stores_encrypted_settings(self):
        """Setup answers true and stores the settings as Dify encrypted them, with the new id as identity."""
        env = self.setup_call()
        self.assertEqual(env, {"code": 0, "message": "success", "data": True})
        [endpoint] = self.stored()
        self.assertEqual(endpoint.settings, {"api_key": "enc:supersecret", "greeting": "hello"})
        self.assertEqual((endpoint.name, endpoint.user_id, endpoint.plugin_id), ("hook", "user-1", "acme/hooks"))
        self.assertTrue(endpoint.enabled)
        [call] = [r for r in self.daemon.inner.received if r.path == "invoke/encrypt"]
        self.assertEqual(call.headers["x-inner-api-key"], INNER_KEY)
        self.assertEqual(
            {k: call.body[k] for k in ("tenant_id", "user_id", "type", "opt", "namespace", "identity", "data")},
            {
                "tenant_id": TENANT, "user_id": "user-1", "type": "encrypt", "opt": "encrypt",
                "namespace": "endpoint", "identity": endpoint.id,
                "data": {"api_key": "supersecret", "greeting": "hello"},
            },
        )
        self.assertEqual([c["name"] for c in call.body["config"]], ["api_key", "greeting", "mode"])

    def test_setup_counts_on_installation(self):
        """Each setup adds to endpoints_setups and endpoints_active of the installation."""
        self.setup_call()
        self.setup_call(name="second")
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        row = listing["list"][0]
        self.assertEqual((row["endpoints_setups"], row["endpoints_active"]), (2, 2))

    def test_not_installed(self):
        """An identifier the tenant has not installed is -404 PluginNotFoundError."""
        env = self.daemon.call(
            "POST", endpoint_path("setup", OTHER_TENANT),
            json={"plugin_unique_identifier": self.identifier, "user_id": "u", "name": "n", "settings": {}},
        )
        self.assertEqual(env["code"], -404)
        self.assertEqual(error_of(env), {"message": "plugin not found", "error_type": "PluginNotFoundError", "args": None})

    def test_other_version_not_installed(self):
        """Another version of an installed plugin is not the installation: -404."""
        other = self.identifier.split("@")[0] + "@" + "0" * 64
        env = self.setup_call(plugin_unique_identifier=other)
        self.assertEqual((env["code"], error_of(env)["error_type"]), (-404, "PluginNotFoundError"))

    def test_permission_denied(self):
        """A manifest without endpoint permission is -403 with the Go daemon's text."""
        identifier = self.daemon.install_endpoint_plugin(tenant=OTHER_TENANT, name="closed", allow_endpoint=False)
        env = self.daemon.call(
            "POST", endpoint_path("setup", OTHER_TENANT),
            json={"plugin_unique_identifier": identifier, "user_id": "u", "name": "n",
                  "settings": {"api_key": "k"}},
        )
        self.assertEqual(env["code"], -403)
        self.assertEqual(
            error_of(env),
            {
                "message": "permission denied, you need to enable endpoint access in plugin manifest",
                "error_type": "PluginPermissionDeniedError",
                "args": None,
            },
        )

    def test_plugin_without_endpoint(self):
        """A plugin allowed endpoints but declaring none is -400 'plugin does not have an endpoint'."""
        files = echo_plugin_files()
        files["manifest.yaml"] = files["manifest.yaml"].replace(
            b"    storage:\n", b"    endpoint:\n      enabled: true\n    storage:\n"
        )
        env = self.daemon.upload(build_package(files))
        identifier = env["data"]["unique_identifier"]
        self.daemon.install(identifier)
        env = self.setup_call(plugin_unique_identifier=identifier)
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["message"], "plugin does not have an endpoint")

    def test_invalid_settings(self):
        """Settings breaking the declaration are -400 'failed to validate settings: ...'; nothing is stored."""
        env = self.setup_call(settings={"greeting": "hi"})
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["error_type"], "PluginDaemonBadRequestError")
        self.assertEqual(error_of(env)["message"], "failed to validate settings: missing required setting: api_key")
        env = self.setup_call(settings={"api_key": "k", "mode": "shouting"})
        self.assertEqual(error_of(env)["message"], "failed to validate settings: setting mode is not a valid option")
        self.assertEqual(self.stored(), [])

    def test_binding(self):
        """A missing name, user_id or malformed identifier is HTTP 400."""
        for body in ({"name": ""}, {"user_id": None}, {"plugin_unique_identifier": "not an identifier"},
                     {"settings": "not an object"}):
            response, raw = self.daemon.request("POST", endpoint_path("setup"), json={
                "plugin_unique_identifier": self.identifier, "user_id": "u", "name": "n", **body,
            })
            self.assertEqual(response.code, 400, body)
            self.assertEqual(orjson.loads(raw)["code"], -400)

    def test_encrypt_failure_leaves_nothing(self):
        """When Dify cannot encrypt, setup is -500 'failed to encrypt settings: ...' and no endpoint exists."""
        self.daemon.inner.fail("invoke/encrypt", 500, b"boom")
        env = self.setup_call()
        self.assertEqual(env["code"], -500)
        self.assertTrue(error_of(env)["message"].startswith("failed to encrypt settings: "), env)
        self.assertEqual(self.stored(), [])
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertEqual(listing["list"][0]["endpoints_setups"], 0)


class ListTests(SynchronousTestCase):
    """GET /endpoint/list and /endpoint/list/plugin."""

    def setUp(self):
        super().setUp()
        self.daemon = EndpointHarness(self)
        self.identifier = self.daemon.install_endpoint_plugin()

    def test_listed_decrypted_and_masked(self):
        """A listed endpoint carries every field, settings decrypted then masked, and the endpoint declaration."""
        listed = self.daemon.setup_endpoint(self.identifier, settings={"api_key": "supersecret", "greeting": "hello"})
        self.assertEqual(
            set(listed),
            {"id", "created_at", "updated_at", "name", "hook_id", "tenant_id", "user_id", "plugin_id",
             "expired_at", "enabled", "settings", "declaration"},
        )
        self.assertEqual(listed["settings"], {"api_key": "su*******et", "greeting": "hello"})
        self.assertEqual(listed["expired_at"], "2050-01-01T00:00:00Z")
        self.assertEqual((listed["tenant_id"], listed["plugin_id"], listed["enabled"]), (TENANT, "acme/hooks", True))
        self.assertRegex(listed["hook_id"], r"^[a-z0-9]{16}$")
        self.assertEqual(set(listed["declaration"]), {"settings", "endpoints"})
        self.assertEqual([s["name"] for s in listed["declaration"]["settings"]], ["api_key", "greeting", "mode"])
        self.assertIn({"path": "/custom", "method": "GET", "hidden": False}, listed["declaration"]["endpoints"])
        decrypts = [r.body for r in self.daemon.inner.received if r.path == "invoke/encrypt" and r.body["opt"] == "decrypt"]
        self.assertEqual(decrypts[-1]["data"], {"api_key": "enc:supersecret", "greeting": "hello"})
        self.assertEqual(decrypts[-1]["identity"], listed["id"])

    def test_newest_first_and_paged(self):
        """The list is newest first and paged; page_size over 100 and page 0 are HTTP 400."""
        for index in range(3):
            self.daemon.clock.advance(1)
            self.daemon.setup_endpoint(self.identifier, name=f"e{index}")
        names = [e["name"] for e in self.daemon.ok("GET", endpoint_path("list"), params={"page": 1, "page_size": 10})]
        self.assertEqual(names, ["e2", "e1", "e0"])
        page = self.daemon.ok("GET", endpoint_path("list"), params={"page": 2, "page_size": 2})
        self.assertEqual([e["name"] for e in page], ["e0"])
        for params in ({"page": 1, "page_size": 101}, {"page": 0, "page_size": 10}, {"page_size": 10}):
            response, _ = self.daemon.request("GET", endpoint_path("list"), params=params)
            self.assertEqual(response.code, 400, params)
        self.assertEqual(self.daemon.ok("GET", endpoint_path("list"), params={"page": 1, "page_size": 100, "user_id": "x"})[0]["name"], "e2")

    def test_empty_list_is_empty_array(self):
        """A tenant without endpoints gets an empty list, not null."""
        env = self.daemon.call("GET", endpoint_path("list"), params={"page": 1, "page_size": 10})
        self.assertEqual(env, {"code": 0, "message": "success", "data": []})

    def test_uninstalled_plugin_listed_empty(self):
        """An endpoint of an uninstalled plugin is listed with {} settings and an empty declaration."""
        self.daemon.setup_endpoint(self.identifier)
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall",
                       json={"plugin_installation_id": listing["list"][0]["id"]})
        [listed] = self.daemon.ok("GET", endpoint_path("list"), params={"page": 1, "page_size": 10})
        self.assertEqual(listed["settings"], {})
        self.assertEqual(listed["declaration"], {"settings": [], "endpoints": []})

    def test_list_plugin(self):
        """list/plugin keeps one plugin's endpoints; an uninstalled plugin with endpoints is -404."""
        self.daemon.setup_endpoint(self.identifier, name="mine")
        listed = self.daemon.ok("GET", endpoint_path("list/plugin"),
                                params={"plugin_id": "acme/hooks", "page": 1, "page_size": 10})
        self.assertEqual([e["name"] for e in listed], ["mine"])
        self.assertEqual(listed[0]["settings"]["api_key"], "su*******et")
        self.assertEqual(
            self.daemon.ok("GET", endpoint_path("list/plugin"), params={"plugin_id": "acme/other", "page": 1, "page_size": 10}),
            [],
        )
        response, _ = self.daemon.request("GET", endpoint_path("list/plugin"), params={"page": 1, "page_size": 10})
        self.assertEqual(response.code, 400)
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall",
                       json={"plugin_installation_id": listing["list"][0]["id"]})
        env = self.daemon.call("GET", endpoint_path("list/plugin"),
                               params={"plugin_id": "acme/hooks", "page": 1, "page_size": 10})
        self.assertEqual(env["code"], -404)
        self.assertEqual(error_of(env)["message"], "failed to find plugin installation: record not found")

    def test_decrypt_failure(self):
        """When Dify cannot decrypt, the list is -500 'failed to decrypt settings: ...'."""
        self.daemon.setup_endpoint(self.identifier)
        self.daemon.inner.error("invoke/encrypt", "key rotated")
        env = self.daemon.call("GET", endpoint_path("list"), params={"page": 1, "page_size": 10})
        self.assertEqual(env["code"], -500)
        self.assertEqual(error_of(env)["message"], "failed to decrypt settings: key rotated")


class ChangeTests(SynchronousTestCase):
    """update, enable, disable and remove."""

    def setUp(self):
        super().setUp()
        self.daemon = EndpointHarness(self)
        self.identifier = self.daemon.install_endpoint_plugin()
        self.endpoint = self.daemon.setup_endpoint(self.identifier)

    def stored(self, tenant=TENANT):
        return self.successResultOf(self.daemon.persistence.get_endpoint(tenant, self.endpoint["id"]))

    def counters(self):
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        row = listing["list"][0]
        return row["endpoints_setups"], row["endpoints_active"]

    def update(self, tenant=TENANT, **body):
        values = {"endpoint_id": self.endpoint["id"], "user_id": "user-2", "name": "renamed",
                  "settings": {"api_key": "su*******et", "greeting": "bye"}}
        values.update(body)
        return self.daemon.call("POST", endpoint_path("update", tenant), json=values)

    def test_update_keeps_masked_secret(self):
        """Sending the masked secret back keeps the stored secret; other fields and the name change."""
        env = self.update()
        self.assertEqual(env["data"], True, env)
        stored = self.stored()
        self.assertEqual(stored.name, "renamed")
        self.assertEqual(stored.settings, {"api_key": "enc:supersecret", "greeting": "bye"})
        opts = [r.body["opt"] for r in self.daemon.inner.received if r.path == "invoke/encrypt"]
        self.assertEqual(opts[-3:], ["decrypt", "encrypt", "clear"])
        clear = self.daemon.inner.received[-1].body
        self.assertEqual((clear["identity"], clear["user_id"]), (self.endpoint["id"], "user-2"))

    def test_update_new_secret(self):
        """A secret that is not the masked form replaces the stored one."""
        self.update(settings={"api_key": "anothersecret"})
        self.assertEqual(self.stored().settings, {"api_key": "enc:anothersecret"})

    def test_update_validates(self):
        """Invalid new settings are -400 and change nothing."""
        env = self.update(settings={"api_key": "k", "mode": "nope"})
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["message"], "failed to validate settings: setting mode is not a valid option")
        self.assertEqual(self.stored().name, "hook")

    def test_update_unknown(self):
        """Updating an unknown endpoint is -404 'failed to find endpoint: record not found'."""
        env = self.update(endpoint_id="0193a8a4-0000-7000-8000-0000000000ff")
        self.assertEqual(env["code"], -404)
        self.assertEqual(
            error_of(env),
            {"message": "failed to find endpoint: record not found", "error_type": "PluginDaemonNotFoundError", "args": None},
        )

    def test_disable_enable(self):
        """Disable and enable answer true, move endpoints_active once, and can be repeated."""
        path = endpoint_path("disable")
        self.assertIs(self.daemon.ok("POST", path, json={"endpoint_id": self.endpoint["id"]}), True)
        self.assertIs(self.daemon.ok("POST", path, json={"endpoint_id": self.endpoint["id"]}), True)
        self.assertFalse(self.stored().enabled)
        self.assertEqual(self.counters(), (1, 0))
        self.daemon.ok("POST", endpoint_path("enable"), json={"endpoint_id": self.endpoint["id"]})
        self.daemon.ok("POST", endpoint_path("enable"), json={"endpoint_id": self.endpoint["id"]})
        self.assertTrue(self.stored().enabled)
        self.assertEqual(self.counters(), (1, 1))

    def test_toggle_unknown(self):
        """Enabling or disabling an unknown endpoint is -404 'endpoint not found'; no id is HTTP 400."""
        for action in ("enable", "disable"):
            env = self.daemon.call("POST", endpoint_path(action), json={"endpoint_id": "nope"})
            self.assertEqual((env["code"], error_of(env)["message"]), (-404, "endpoint not found"))
            response, _ = self.daemon.request("POST", endpoint_path(action), json={})
            self.assertEqual(response.code, 400)

    def test_remove(self):
        """Remove answers true and takes the endpoint and its counts away; again it is -500."""
        env = self.daemon.call("POST", endpoint_path("remove"), json={"endpoint_id": self.endpoint["id"], "user_id": "u"})
        self.assertEqual(env["data"], True)
        self.assertIsNone(self.stored())
        self.assertEqual(self.counters(), (0, 0))
        env = self.daemon.call("POST", endpoint_path("remove"), json={"endpoint_id": self.endpoint["id"]})
        self.assertEqual(env["code"], -500)
        self.assertEqual(error_of(env)["message"], "failed to remove endpoint: record not found")

    def test_tenant_isolation(self):
        """Another tenant can neither list, update, disable nor remove the endpoint."""
        other = OTHER_TENANT
        self.assertEqual(self.daemon.ok("GET", endpoint_path("list", other), params={"page": 1, "page_size": 10}), [])
        self.assertEqual(self.update(tenant=other)["code"], -404)
        self.assertEqual(self.daemon.call("POST", endpoint_path("disable", other), json={"endpoint_id": self.endpoint["id"]})["code"], -404)
        self.assertEqual(self.daemon.call("POST", endpoint_path("remove", other), json={"endpoint_id": self.endpoint["id"]})["code"], -500)
        stored = self.stored()
        self.assertEqual((stored.name, stored.enabled), ("hook", True))

    def test_needs_key(self):
        """The endpoint routes sit behind X-Api-Key like every /plugin route."""
        response, _ = self.daemon.request("GET", endpoint_path("list"), key=None, params={"page": 1, "page_size": 1})
        self.assertEqual(response.code, 401)


class WithoutEndpointsTests(SynchronousTestCase):
    """A management app built without the endpoint service has no endpoint routes."""

    def test_routes_unknown(self):
        """Every endpoint route is the route-not-found 404 then."""
        from .harness import DaemonHarness

        daemon = DaemonHarness(self)
        for method, action in (("POST", "setup"), ("GET", "list"), ("POST", "remove")):
            response, body = daemon.request(method, endpoint_path(action), json={"endpoint_id": "x"},
                                            params={"page": 1, "page_size": 1})
            self.assertEqual(response.code, 404, action)
            self.assertEqual(orjson.loads(body), {"code": "not_found", "message": "route not found"})


class DeclarationSourceTests(SynchronousTestCase):
    """Endpoints read declarations through the declaration cache when given one."""

    def test_declaration_through_the_cache(self):
        """Endpoints.declaration answers the cache's decoded declaration, not a fresh decode."""
        from twisted.internet.task import Clock

        from difydaemon.blocking import InlineRunner
        from difydaemon.management.declarations import DeclarationCache
        from difydaemon.persistence.memory import MemoryPersistence

        persistence = MemoryPersistence(Clock())
        identifier = "acme/echo:0.0.1@" + "a" * 64
        self.successResultOf(persistence.save_declaration(identifier, "acme/echo", {"name": "echo"}))
        cache = DeclarationCache(persistence, InlineRunner())
        endpoints = Endpoints(Clock(), persistence, None, declarations=cache)
        first = self.successResultOfCoroutine(endpoints.declaration(identifier))
        self.assertIs(self.successResultOfCoroutine(endpoints.declaration(identifier)), first)
        self.assertIs(first, self.successResultOfCoroutine(cache.value(identifier)))
