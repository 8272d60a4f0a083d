"""
The management surface end to end over fakes: the real Klein app, real
packaging, in-memory persistence and storage, StubTreq.
"""

from __future__ import annotations

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from difydaemon.persistence.records import TASK_FAILED, TASK_SUCCESS
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from .harness import OTHER_TENANT, TENANT, DaemonHarness, RecordingRunner, default_policy, error_of

from tests.packaging.fixtures import fixture_bytes as _fixture


def echo_package(**kw) -> bytes:
    return build_package(echo_plugin_files(**kw))


class AuthAndRoutingTests(SynchronousTestCase):
    """Authentication, unknown routes and health."""

    def setUp(self):
        super().setUp()
        self.daemon = DaemonHarness(self)

    def test_missing_key_is_401_envelope(self):
        """A /plugin route without X-Api-Key answers 401 with the unauthorized envelope."""
        response, body = self.daemon.request("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10", key=None)
        self.assertEqual(response.code, 401)
        env = orjson.loads(body)
        self.assertEqual(env["code"], -401)
        self.assertIsNone(env["data"])
        self.assertEqual(
            error_of(env), {"message": "unauthorized", "error_type": "PluginDaemonUnauthorizedError", "args": None}
        )

    def test_wrong_key_is_401(self):
        """A wrong X-Api-Key is refused."""
        response, _ = self.daemon.request("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10", key="nope")
        self.assertEqual(response.code, 401)

    def test_unknown_route_is_404_with_string_code(self):
        """Unknown routes answer 404 with the string-code body of the Go daemon."""
        response, body = self.daemon.request("GET", "/no/such/route")
        self.assertEqual(response.code, 404)
        self.assertEqual(orjson.loads(body), {"code": "not_found", "message": "route not found"})

    def test_method_mismatch_is_404(self):
        """A known path with the wrong method is also the 404 body."""
        response, body = self.daemon.request("POST", f"/plugin/{TENANT}/management/list")
        self.assertEqual(response.code, 404)
        self.assertEqual(orjson.loads(body)["code"], "not_found")

    def test_wrong_method_on_health_is_404(self):
        """/health/check with another method is the 404 body of unknown routes, not twisted.web's 405 page."""
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            response, body = self.daemon.request(method, "/health/check", key=None)
            self.assertEqual(response.code, 404, method)
            self.assertEqual(orjson.loads(body), {"code": "not_found", "message": "route not found"})

    def test_head_is_404(self):
        """HEAD is no GET, as in Go: on /health/check and on a GET management route it is 404."""
        for path in ("/health/check", f"/plugin/{TENANT}/management/list?page=1&page_size=10"):
            response, _ = self.daemon.request("HEAD", path)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"])

    def test_path_tricks_without_the_channel(self):
        """On a plain twisted.web site the root routes on the same canonical target, key check included."""
        listing = f"/plugin/{TENANT}/management/list?page=1&page_size=10"
        for path, key, status in (
            ("/" + listing, None, 404),
            ("/" + listing, "test-server-key", 404),
            (listing.replace("/plugin/", "/plugin%2F"), None, 401),
            (listing.replace("/plugin/", "/./plugin/"), None, 404),
            (listing.replace("/plugin/", "/%70lugin/"), None, 401),
        ):
            response, body = self.daemon.request("GET", path, key=key)
            self.assertEqual(response.code, status, (path, key, body))
        self.assertEqual(self.daemon.ok("GET", listing.replace("/plugin/", "/%70lugin%2F")), {"list": [], "total": 0})

    def test_health_check_shape(self):
        """/health/check answers the raw JSON shape of §2.1 without a key."""
        response, body = self.daemon.request("GET", "/health/check", key=None)
        self.assertEqual(response.code, 200)
        health = orjson.loads(body)
        self.assertEqual(
            set(health),
            {"status", "pool_status", "version", "build_time", "platform", "active_requests", "active_dispatch_requests"},
        )
        self.assertEqual(health["status"], "ok")
        self.assertEqual(set(health["pool_status"]), {"free", "busy", "total"})
        self.assertEqual(health["platform"], "local")

    def test_validation_failure_is_400(self):
        """A list without page answers HTTP 400 with a bad-request envelope."""
        response, body = self.daemon.request("GET", f"/plugin/{TENANT}/management/list?page_size=10")
        self.assertEqual(response.code, 400)
        env = orjson.loads(body)
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["error_type"], "PluginDaemonBadRequestError")
        self.assertIn("'Page'", error_of(env)["message"])

    def test_page_zero_is_refused(self):
        """page=0 fails gin's required rule."""
        response, _ = self.daemon.request("GET", f"/plugin/{TENANT}/management/list?page=0&page_size=10")
        self.assertEqual(response.code, 400)

    def test_page_size_over_256_is_refused(self):
        """page_size above 256 is refused."""
        response, _ = self.daemon.request("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=257")
        self.assertEqual(response.code, 400)


class UploadTests(SynchronousTestCase):
    """Uploading packages."""

    def setUp(self):
        super().setUp()
        self.daemon = DaemonHarness(self)

    def test_upload_echo_package(self):
        """An upload answers identifier, manifest (icons as asset ids) and null verification."""
        env = self.daemon.upload(echo_package())
        self.assertEqual(env["code"], 0, env)
        data = env["data"]
        self.assertRegex(data["unique_identifier"], r"^acme/echo:0\.0\.1@[0-9a-f]{64}$")
        self.assertIsNone(data["verification"])
        self.assertEqual(data["manifest"]["name"], "echo")
        self.assertRegex(data["manifest"]["icon"], r"^[0-9a-f]{64}\.svg$")
        self.assertFalse(data["manifest"]["verified"])

    def test_form_read_through_the_runner(self):
        """The multipart body is read by the runner (a thread pool in the daemon), not on the reactor."""
        runner = RecordingRunner()
        daemon = DaemonHarness(self, runner=runner)
        self.assertEqual(daemon.upload(echo_package())["code"], 0)
        self.assertEqual(runner.functions[0], "read_form")

    def test_declaration_encoded_in_the_runner_once(self):
        """An upload encodes its declaration in the runner, once; the row is written from those bytes."""
        runner = RecordingRunner()
        daemon = DaemonHarness(self, runner=runner)
        ident = daemon.upload(echo_package())["data"]["unique_identifier"]
        self.assertEqual(runner.functions.count("Declaration.of"), 1)
        held = self.successResultOfCoroutine(daemon.packages.declarations.get(ident))
        self.assertEqual(self.successResultOf(daemon.persistence.get_declarations_json([ident]))[ident], held.json)

    def test_refused_declaration_row_leaves_nothing_held(self):
        """When the declaration row cannot be written, no decoded copy stays held."""
        from twisted.internet.defer import fail

        from difydaemon.errors import DatabaseUnavailableError

        daemon = DaemonHarness(self)
        daemon.persistence.save_declaration = lambda *args: fail(DatabaseUnavailableError("the database is down"))
        env = daemon.upload(echo_package())
        self.assertNotEqual(env["code"], 0)
        self.assertEqual(daemon.packages.declarations.weight, 0)
        self.assertEqual(daemon.stored_keys(), [])

    def test_file_part_over_the_limit(self):
        """A file part over MAX_PLUGIN_PACKAGE_SIZE is Go's -400 "file size exceeds the maximum limit"."""
        package = echo_package()
        daemon = DaemonHarness(self, default_policy(max_size=len(package) - 1))
        env = daemon.upload(package)
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["message"], "file size exceeds the maximum limit")

    def test_not_multipart_is_400(self):
        """An upload that is not multipart/form-data is a binding failure, HTTP 400."""
        response, body = self.daemon.request(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", data=b"{}",
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(error_of(orjson.loads(body))["message"], "request is not multipart/form-data")

    def test_uploaded_icon_is_served(self):
        """The icon asset id from the manifest is served raw by /asset/."""
        files = echo_plugin_files()
        data = self.daemon.upload(build_package(files))["data"]
        response, body = self.daemon.request("GET", f"/plugin/{TENANT}/asset/{data['manifest']['icon']}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])
        icon = files["_assets/icon.svg"]
        self.assertEqual(body, icon if isinstance(icon, bytes) else icon.encode())

    def test_unknown_asset_is_empty_200(self):
        """An unknown asset id answers HTTP 200 with an empty body."""
        response, body = self.daemon.request("GET", f"/plugin/{TENANT}/asset/{'0' * 64}.svg")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")

    def test_signed_fixture_verifies_as_langgenius(self):
        """The official agent package uploads with verification langgenius."""
        daemon = DaemonHarness(self, default_policy(force_verify=True, enforce_langgenius=True))
        env = daemon.upload(_fixture("langgenius-agent_0.0.14.difypkg"))
        self.assertEqual(env["code"], 0, env)
        self.assertEqual(env["data"]["verification"], {"authorized_category": "langgenius"})
        self.assertTrue(env["data"]["manifest"]["verified"])

    def test_unsigned_refused_when_forced(self):
        """With FORCE_VERIFYING_SIGNATURE an unsigned package is refused, nothing stored."""
        daemon = DaemonHarness(self, default_policy(force_verify=True))
        env = daemon.upload(_fixture("unsigned-test_0.0.1.difypkg"))
        self.assertEqual(env["code"], -400)
        self.assertEqual(
            error_of(env)["message"],
            "plugin verification has been enabled, and the plugin you want to install has a bad signature",
        )
        self.assertEqual(daemon.stored_keys(), [])

    def test_unsigned_langgenius_single_upload_under_enforcement(self):
        """FORCE_VERIFYING_SIGNATURE=false + ENFORCE_LANGGENIUS=true accept the unsigned openai package alone."""
        daemon = DaemonHarness(self, default_policy(force_verify=False, enforce_langgenius=True))
        env = daemon.upload(_fixture("langgenius-openai_0.0.19.difypkg"))
        self.assertEqual(env["code"], 0, env)
        self.assertIsNone(env["data"]["verification"])
        self.assertIs(env["data"]["manifest"]["verified"], False)
        self.assertTrue(env["data"]["unique_identifier"].startswith("langgenius/openai:0.0.19@"))

    def test_unsigned_accepted_when_not_forced(self):
        """Without forced verification the unsigned fixture uploads."""
        env = self.daemon.upload(_fixture("unsigned-test_0.0.1.difypkg"))
        self.assertEqual(env["code"], 0, env)

    def test_verify_signature_form_field_forces_verification(self):
        """verify_signature=true refuses an unsigned package even when not forced."""
        env = self.daemon.upload(_fixture("unsigned-test_0.0.1.difypkg"), verify=True)
        self.assertEqual(env["code"], -400)
        self.assertEqual(self.daemon.stored_keys(), [])

    def test_bad_packages_write_nothing(self):
        """Each refused package answers -400 with a message and leaves storage and DB empty."""
        files = echo_plugin_files()
        cases = {
            "not a zip": b"this is not a zip",
            "traversal": build_package({**files, "../evil.py": "x"}),
            "missing declared file": build_package({k: v for k, v in files.items() if k != "tools/echo.yaml"}),
            "uuid author": build_package(echo_plugin_files(author="0193a8a4-0000-7000-8000-000000000001")),
        }
        for name, data in cases.items():
            env = self.daemon.upload(data)
            self.assertEqual(env["code"], -400, name)
            self.assertEqual(error_of(env)["error_type"], "PluginDaemonBadRequestError", name)
            self.assertTrue(error_of(env)["message"], name)
            self.assertEqual(self.daemon.stored_keys(), [], name)
        self.assertEqual(self.successResultOf(self.daemon.persistence.get_declarations([])), {})

    def test_oversized_upload_refused(self):
        """A package over MAX_PLUGIN_PACKAGE_SIZE is refused and nothing is stored."""
        daemon = DaemonHarness(self, default_policy(max_size=1000))
        env = daemon.upload(echo_package() + b"\0" * 2000)
        self.assertEqual(env["code"], -400)
        self.assertEqual(daemon.stored_keys(), [])

    def test_decode_from_identifier_query_and_json_body(self):
        """decode/from_identifier reads the identifier from the query or from a JSON body."""
        ident = self.daemon.upload(echo_package())["data"]["unique_identifier"]
        path = f"/plugin/{TENANT}/management/decode/from_identifier"
        by_query = self.daemon.ok("GET", path, params={"plugin_unique_identifier": ident})
        by_body = self.daemon.ok("GET", path, json={"plugin_unique_identifier": ident})
        self.assertEqual(by_query, by_body)
        self.assertEqual(by_query["unique_identifier"], ident)
        self.assertEqual(by_query["manifest"]["name"], "echo")

    def test_decode_unknown_identifier(self):
        """Decoding an identifier never uploaded is -400 with Go's wording."""
        env = self.daemon.call(
            "GET",
            f"/plugin/{TENANT}/management/decode/from_identifier",
            params={"plugin_unique_identifier": "acme/none:0.0.1@" + "a" * 64},
        )
        self.assertEqual(env["code"], -400)
        self.assertEqual(error_of(env)["message"], "plugin package not found, please upload it firstly")

    def test_malformed_identifier_is_400(self):
        """A malformed identifier fails validation with HTTP 400."""
        response, _ = self.daemon.request(
            "GET", f"/plugin/{TENANT}/management/fetch/manifest", params={"plugin_unique_identifier": "Bad"}
        )
        self.assertEqual(response.code, 400)

    def test_fetch_manifest_and_readme(self):
        """fetch/manifest answers the stored declaration and fetch/readme the README."""
        ident = self.daemon.upload(echo_package())["data"]["unique_identifier"]
        manifest = self.daemon.ok(
            "GET", f"/plugin/{TENANT}/management/fetch/manifest", params={"plugin_unique_identifier": ident}
        )
        self.assertEqual(manifest["author"], "acme")
        readme = self.daemon.ok(
            "GET",
            f"/plugin/{TENANT}/management/fetch/readme",
            params={"plugin_unique_identifier": ident, "language": "ja_JP"},
        )
        self.assertEqual(readme["language"], "en_US")
        self.assertTrue(readme["content"])

    def test_extract_asset(self):
        """extract-asset/ serves a file under _assets/ of a stored package; unknown is empty."""
        files = echo_plugin_files()
        ident = self.daemon.upload(build_package(files))["data"]["unique_identifier"]
        response, body = self.daemon.request(
            "GET",
            f"/plugin/{TENANT}/extract-asset/",
            params={"plugin_unique_identifier": ident, "file_path": "icon.svg"},
        )
        self.assertEqual(response.code, 200)
        icon = files["_assets/icon.svg"]
        self.assertEqual(body, icon if isinstance(icon, bytes) else icon.encode())
        response, body = self.daemon.request(
            "GET",
            f"/plugin/{TENANT}/extract-asset/",
            params={"plugin_unique_identifier": ident, "file_path": "nope.svg"},
        )
        self.assertEqual((response.code, body), (200, b""))


class InstallTests(SynchronousTestCase):
    """Install tasks, listing, uninstall and upgrade."""

    def setUp(self):
        super().setUp()
        self.daemon = DaemonHarness(self)
        self.ident = self.daemon.upload(echo_package())["data"]["unique_identifier"]

    def _task(self, task_id, tenant=TENANT):
        return self.daemon.ok("GET", f"/plugin/{tenant}/management/install/tasks/{task_id}")

    def test_install_creates_successful_task_and_lists(self):
        """Installing runs a task to success; the plugin is then listed with its declaration."""
        answer = self.daemon.install(self.ident)
        self.assertFalse(answer["all_installed"])
        task = self._task(answer["task_id"])
        self.assertEqual(task["status"], TASK_SUCCESS)
        self.assertEqual(task["completed_plugins"], 1)
        self.assertEqual(task["plugins"][0]["status"], TASK_SUCCESS)
        self.assertEqual(task["plugins"][0]["message"], "installed")
        self.assertEqual(task["plugins"][0]["labels"], {"en_US": "Echo"})
        self.assertEqual(self.daemon.launcher.launched, [self.ident])
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 256, "response_type": "paged"})
        self.assertEqual(listing["total"], 1)
        entity = listing["list"][0]
        self.assertEqual(entity["plugin_unique_identifier"], self.ident)
        self.assertEqual(entity["plugin_id"], "acme/echo")
        self.assertEqual(entity["id"], entity["installation_id"])
        self.assertEqual(entity["declaration"]["name"], "echo")
        self.assertEqual(entity["version"], "0.0.1")
        self.assertEqual(entity["runtime_type"], "local")
        self.assertRegex(entity["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

    def test_install_steps_logged(self):
        """Each progress line of an install is logged with its plugin, so the log times every step."""
        with capturedLogs() as events:
            self.daemon.install(self.ident)
        steps = [(e["identifier"], e["step"]) for e in events if e.get("log_format", "").startswith("install of")]
        self.assertEqual(steps, [(self.ident, "launching")])

    def test_second_install_is_all_installed(self):
        """Installing a plugin_id the tenant has answers all_installed with an empty task id."""
        self.daemon.install(self.ident)
        answer = self.daemon.install(self.ident)
        self.assertEqual(answer, {"all_installed": True, "task_id": ""})

    def test_successful_task_deletes_itself(self):
        """A successful task is gone 120 s later."""
        task_id = self.daemon.install(self.ident)["task_id"]
        self.daemon.clock.advance(121)
        env = self.daemon.call("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
        self.assertEqual(env["code"], -500)
        self.assertEqual(error_of(env)["message"], "record not found")

    def test_failed_launch_leaves_nothing(self):
        """A failed launch fails the task with its message and writes no rows and no installed copy."""
        self.daemon.launcher.fail(self.ident, "creating venv failed: no python 3.12")
        task = self._task(self.daemon.install(self.ident)["task_id"])
        self.assertEqual(task["status"], TASK_FAILED)
        self.assertEqual(task["plugins"][0]["status"], TASK_FAILED)
        self.assertEqual(task["plugins"][0]["message"], "creating venv failed: no python 3.12")
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertEqual(listing["total"], 0)
        self.assertIsNone(self.successResultOf(self.daemon.persistence.get_plugin(self.ident)))
        self.assertNotIn(f"plugin/{self.ident}", self.daemon.stored_keys())

    def test_install_of_never_uploaded_identifier(self):
        """Installing an identifier whose declaration was never stored is -500."""
        env = self.daemon.call(
            "POST",
            f"/plugin/{TENANT}/management/install/identifiers",
            json={"plugin_unique_identifiers": ["acme/none:0.0.1@" + "b" * 64], "source": "package", "metas": [{}]},
        )
        self.assertEqual(env["code"], -500)

    def test_metas_length_mismatch(self):
        """metas must have one entry per identifier."""
        env = self.daemon.call(
            "POST",
            f"/plugin/{TENANT}/management/install/identifiers",
            json={"plugin_unique_identifiers": [self.ident], "source": "package", "metas": [{}, {}]},
        )
        self.assertEqual(env["code"], -400)

    def test_tenants_are_isolated(self):
        """Another tenant sees nothing of this tenant's installs and tasks."""
        task_id = self.daemon.install(self.ident)["task_id"]
        listing = self.daemon.ok("GET", f"/plugin/{OTHER_TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertEqual(listing, {"list": [], "total": 0})
        env = self.daemon.call("GET", f"/plugin/{OTHER_TENANT}/management/install/tasks/{task_id}")
        self.assertEqual(env["code"], -500)
        tasks = self.daemon.ok("GET", f"/plugin/{OTHER_TENANT}/management/install/tasks", params={"page": 1, "page_size": 10})
        self.assertEqual(tasks, [])
        tools = self.daemon.ok("GET", f"/plugin/{OTHER_TENANT}/management/tools", params={"page": 1, "page_size": 10})
        self.assertEqual(tools, [])

    def test_tools_routes(self):
        """tools, tool and check_existence answer the installed tool provider."""
        self.daemon.install(self.ident)
        tools = self.daemon.ok("GET", f"/plugin/{TENANT}/management/tools", params={"page": 1, "page_size": 256})
        self.assertEqual(len(tools), 1)
        self.assertEqual(tools[0]["provider"], "echo")
        self.assertEqual(tools[0]["plugin_id"], "acme/echo")
        self.assertEqual(tools[0]["declaration"]["identity"]["name"], "echo")
        tool = self.daemon.ok("GET", f"/plugin/{TENANT}/management/tool", params={"plugin_id": "acme/echo", "provider": "echo"})
        self.assertEqual(tool["plugin_unique_identifier"], self.ident)
        env = self.daemon.call("GET", f"/plugin/{TENANT}/management/tool", params={"plugin_id": "acme/echo", "provider": "other"})
        self.assertEqual((env["code"], error_of(env)["error_type"]), (-404, "PluginNotFoundError"))
        exists = self.daemon.ok(
            "POST",
            f"/plugin/{TENANT}/management/tools/check_existence",
            json={"provider_ids": [{"plugin_id": "acme/echo", "provider_name": "echo"}, {"plugin_id": "x/y", "provider_name": "z"}]},
        )
        self.assertEqual(exists, [True, False])

    def test_installation_ids_batch_and_missing(self):
        """installation/ids, fetch/batch and missing describe the installed plugin."""
        self.daemon.install(self.ident)
        ids = self.daemon.ok("GET", f"/plugin/{TENANT}/management/installation/ids", params={"category": "tool"})
        self.assertEqual(ids, {"plugin_ids": ["acme/echo"]})
        env = self.daemon.request("GET", f"/plugin/{TENANT}/management/installation/ids", params={"category": "nope"})
        self.assertEqual(env[0].code, 400)
        batch = self.daemon.ok("POST", f"/plugin/{TENANT}/management/installation/fetch/batch", json={"plugin_ids": ["acme/echo", "x/y"]})
        self.assertEqual(len(batch), 1)
        self.assertEqual(batch[0]["version"], "0.0.1")
        self.assertEqual(batch[0]["declaration"]["name"], "echo")
        other_version = "acme/echo:0.0.2@" + "c" * 64
        missing = self.daemon.ok(
            "POST",
            f"/plugin/{TENANT}/management/installation/missing",
            json={"plugin_unique_identifiers": [self.ident, other_version, "x/y:1.0.0@" + "d" * 64]},
        )
        self.assertEqual(
            missing,
            [
                {"plugin_unique_identifier": other_version, "current_identifier": self.ident},
                {"plugin_unique_identifier": "x/y:1.0.0@" + "d" * 64},
            ],
        )

    def test_category_list(self):
        """tool/list finds the plugin by query and not under model/list."""
        self.daemon.install(self.ident)
        found = self.daemon.ok("GET", f"/plugin/{TENANT}/management/tool/list", params={"page": 1, "page_size": 10, "query": "ECH"})
        self.assertEqual([p["plugin_id"] for p in found["list"]], ["acme/echo"])
        self.assertFalse(found["has_more"])
        none = self.daemon.ok("GET", f"/plugin/{TENANT}/management/model/list", params={"page": 1, "page_size": 10})
        self.assertEqual(none["list"], [])

    def test_uninstall_refcounts_across_tenants(self):
        """Uninstalling from one tenant keeps the plugin for another; the last uninstall stops it."""
        self.daemon.install(self.ident)
        self.daemon.install(self.ident, tenant=OTHER_TENANT)
        first = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})["list"][0]
        self.assertTrue(self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall", json={"plugin_installation_id": first["id"]}))
        self.assertEqual(self.daemon.launcher.stopped, [])
        self.assertTrue(self.daemon.ok("GET", f"/plugin/{TENANT}/management/fetch/identifier", params={"plugin_unique_identifier": self.ident}))
        second = self.daemon.ok("GET", f"/plugin/{OTHER_TENANT}/management/list", params={"page": 1, "page_size": 10})["list"][0]
        self.daemon.ok("POST", f"/plugin/{OTHER_TENANT}/management/uninstall", json={"plugin_installation_id": second["id"]})
        self.assertEqual(self.daemon.launcher.stopped, [self.ident])
        self.assertFalse(self.daemon.ok("GET", f"/plugin/{TENANT}/management/fetch/identifier", params={"plugin_unique_identifier": self.ident}))
        self.assertNotIn(f"plugin/{self.ident}", self.daemon.stored_keys())
        self.assertIn(f"plugin_packages/{self.ident}", self.daemon.stored_keys())

    def test_list_decodes_a_declaration_once(self):
        """A second list call reads no declaration text and decodes nothing: the held one is embedded."""
        self.daemon.install(self.ident)
        self.daemon.packages.declarations.forget(self.ident)
        read = []
        original = self.daemon.persistence.get_declarations_json

        def reading(identifiers, known=()):
            return original(identifiers, known).addCallback(
                lambda found: read.extend(i for i, text in found.items() if text is not None) or found
            )

        self.daemon.persistence.get_declarations_json = reading
        pages = [
            self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
            for _ in range(2)
        ]
        self.assertEqual(read, [self.ident])
        self.assertEqual(pages[0], pages[1])
        self.assertEqual(pages[1]["list"][0]["declaration"], self.successResultOf(
            self.daemon.persistence.get_declaration(self.ident)
        ))

    def test_last_uninstall_drops_held_declaration(self):
        """The uninstall that deletes the declaration row drops the decoded copy too."""
        self.daemon.install(self.ident)
        self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertGreater(self.daemon.packages.declarations.weight, 0)
        first = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})["list"][0]
        self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall", json={"plugin_installation_id": first["id"]})
        self.assertEqual(self.daemon.packages.declarations.weight, 0)

    def test_uninstall_unknown_is_true(self):
        """Uninstalling an unknown installation id still answers true."""
        self.assertTrue(self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall", json={"plugin_installation_id": "nope"}))

    def test_upgrade_through_task(self):
        """Upgrading to a new version runs a task and moves the installation."""
        self.daemon.install(self.ident)
        new = self.daemon.upload(echo_package(version="0.0.2"))["data"]["unique_identifier"]
        answer = self.daemon.ok(
            "POST",
            f"/plugin/{TENANT}/management/install/upgrade",
            json={"original_plugin_unique_identifier": self.ident, "new_plugin_unique_identifier": new, "source": "package", "meta": {}},
        )
        self.assertFalse(answer["all_installed"])
        self.assertEqual(self._task(answer["task_id"])["status"], TASK_SUCCESS)
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertEqual([p["plugin_unique_identifier"] for p in listing["list"]], [new])
        self.assertEqual(self.daemon.launcher.stopped, [self.ident])

    def test_upgrade_does_not_wait_for_old_sessions(self):
        """An upgrade's task succeeds while the old version still drains its sessions; the old one is stopped meanwhile."""
        self.daemon.install(self.ident)
        new = self.daemon.upload(echo_package(version="0.0.2"))["data"]["unique_identifier"]
        self.daemon.launcher.hold_stops = True
        answer = self.daemon.ok(
            "POST",
            f"/plugin/{TENANT}/management/install/upgrade",
            json={"original_plugin_unique_identifier": self.ident, "new_plugin_unique_identifier": new, "source": "package", "meta": {}},
        )
        self.assertEqual(self._task(answer["task_id"])["status"], TASK_SUCCESS)
        self.assertEqual(self.daemon.launcher.stopped, [self.ident])
        self.daemon.launcher.held_stops.pop(self.ident).callback(None)
        self.assertEqual(self.daemon.launcher.running, {new})

    def test_upgrade_rules(self):
        """Upgrade refuses equal identifiers, different plugin ids and uninstalled originals."""
        url = f"/plugin/{TENANT}/management/install/upgrade"
        same = self.daemon.call("POST", url, json={"original_plugin_unique_identifier": self.ident, "new_plugin_unique_identifier": self.ident, "source": "package"})
        self.assertEqual(same["code"], -400)
        other = self.daemon.call("POST", url, json={"original_plugin_unique_identifier": self.ident, "new_plugin_unique_identifier": "x/y:1.0.0@" + "d" * 64, "source": "package"})
        self.assertEqual(other["code"], -400)
        new = "acme/echo:0.0.2@" + "e" * 64
        absent = self.daemon.call("POST", url, json={"original_plugin_unique_identifier": self.ident, "new_plugin_unique_identifier": new, "source": "package"})
        self.assertEqual(absent["code"], -404)

    def test_task_deletion_routes(self):
        """delete-one-item, delete and delete_all remove tasks of the tenant."""
        self.daemon.launcher.fail(self.ident, "boom")
        task_id = self.daemon.install(self.ident)["task_id"]
        self.assertTrue(
            self.daemon.ok("POST", f"/plugin/{TENANT}/management/install/tasks/{task_id}/delete/{self.ident}")
        )
        env = self.daemon.call("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
        self.assertEqual(env["code"], -500, "a task whose remaining items all succeeded is deleted")
        task_id = self.daemon.install(self.ident)["task_id"]
        self.assertTrue(self.daemon.ok("POST", f"/plugin/{TENANT}/management/install/tasks/{task_id}/delete"))
        self.assertEqual(self.daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks", params={"page": 1, "page_size": 10}), [])
        self.daemon.install(self.ident)
        self.daemon.install(self.ident)
        self.assertEqual(len(self.daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks", params={"page": 1, "page_size": 10})), 2)
        self.assertTrue(self.daemon.ok("POST", f"/plugin/{TENANT}/management/install/tasks/delete_all"))
        self.assertEqual(self.daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks", params={"page": 1, "page_size": 10}), [])

    def test_bad_task_item_identifier(self):
        """Deleting a task item with a malformed identifier is -400."""
        env = self.daemon.call("POST", f"/plugin/{TENANT}/management/install/tasks/some-task/delete/not-an-identifier")
        self.assertEqual(env["code"], -400)


class BundleTests(SynchronousTestCase):
    """Uploading bundles."""

    def setUp(self):
        super().setUp()
        self.daemon = DaemonHarness(self)

    def _upload_bundle(self, data: bytes):
        from .harness import encode_form

        content_type, body = encode_form({"verify_signature": "false"}, {"dify_bundle": data})
        return self.daemon.call(
            "POST",
            f"/plugin/{TENANT}/management/install/upload/bundle",
            data=body,
            headers={"Content-Type": content_type},
        )

    def test_bundle_dependencies_and_embedded_package(self):
        """A bundle answers its dependencies; its embedded package is stored and installable."""
        from tests.packaging.test_package import bundle

        from difydaemon.packaging.archive import read_package
        from difydaemon.packaging.checksum import package_checksum

        package = echo_package()
        checksum = package_checksum(read_package(package, 1 << 20))
        env = self._upload_bundle(
            bundle(
                [
                    {"type": "marketplace", "value": {"marketplace_pattern": "langgenius/openai:0.0.19"}},
                    {"type": "package", "value": {"path": checksum}},
                ],
                {checksum: package},
            )
        )
        self.assertEqual(env["code"], 0, env)
        self.assertEqual(env["data"][0]["type"], "marketplace")
        embedded = env["data"][1]
        self.assertEqual(set(embedded), {"type", "value"})
        ident = embedded["value"]["unique_identifier"]
        self.assertEqual(ident, f"acme/echo:0.0.1@{checksum}")
        self.assertRegex(embedded["value"]["manifest"]["icon"], r"^[0-9a-f]{64}\.svg$")
        task = self.daemon.install(ident)
        self.assertFalse(task["all_installed"])

    def test_bad_bundle_stores_nothing(self):
        """A bundle whose second package is broken stores neither package."""
        from tests.packaging.test_package import bundle

        from difydaemon.packaging.archive import read_package
        from difydaemon.packaging.checksum import package_checksum

        good = echo_package()
        checksum = package_checksum(read_package(good, 1 << 20))
        env = self._upload_bundle(
            bundle(
                [{"type": "package", "value": {"path": checksum}}, {"type": "package", "value": {"path": "broken"}}],
                {checksum: good, "broken": b"not a zip"},
            )
        )
        self.assertEqual(env["code"], -400)
        self.assertEqual(self.daemon.stored_keys(), [])


    def test_bundle_with_unsigned_langgenius_refused_under_enforcement(self):
        """A bundle embedding the unsigned openai package is refused under enforcement; nothing is stored."""
        from tests.packaging.test_package import bundle

        daemon = DaemonHarness(self, default_policy(force_verify=False, enforce_langgenius=True))
        self.daemon = daemon
        good = echo_package()
        env = self._upload_bundle(
            bundle(
                [{"type": "package", "value": {"path": "echo"}}, {"type": "package", "value": {"path": "openai"}}],
                {"echo": good, "openai": _fixture("langgenius-openai_0.0.19.difypkg")},
            )
        )
        self.assertEqual(env["code"], -400)
        self.assertIn("claims to be from langgenius", error_of(env)["message"])
        self.assertEqual(daemon.stored_keys(), [])


class UnfinishedTaskTests(SynchronousTestCase):
    """Tasks that a daemon stop or crash interrupted."""

    def test_shutdown_fails_running_tasks(self):
        """Stopping the installer fails a running task with the shutdown message."""
        daemon = DaemonHarness(self)
        ident = daemon.upload(echo_package())["data"]["unique_identifier"]
        daemon.launcher.hold_all = True
        task_id = daemon.install(ident)["task_id"]
        self.assertEqual(daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")["status"], "running")
        self.successResultOf(Deferred.fromCoroutine(daemon.installer.stop()))
        task = daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
        self.assertEqual(task["status"], TASK_FAILED)
        self.assertEqual(task["plugins"][0]["message"], "An unexpected daemon shutdown occurred")
        self.assertEqual(task["total_plugins"], 1)


class DepartedClientTests(SynchronousTestCase):
    """A management route whose client left (Klein cancels its handler) is no failure."""

    def test_cancelled_route_logs_nothing(self):
        """Cancelling a route waiting on its work ends it with CancelledError and logs no failure."""
        from twisted.internet.defer import CancelledError
        from twisted.web.test.requesthelper import DummyRequest

        from difydaemon.api.management import envelope_route

        waiting = Deferred()

        class Routes:
            @envelope_route("SlowRequest")
            async def slow(self, request, tenant_id, params):
                return await waiting

        d = Deferred.fromCoroutine(Routes().slow(DummyRequest([b""]), TENANT))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.flushLoggedErrors(), [])
