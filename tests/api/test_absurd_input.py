"""
Absurd input is a bad request (issue 11, item 13): integers that do not
fit Go's int or SQL bigint, floats, NaN and infinities, strings of digits
10 kB long, NUL, path parameters 10 kB long or not UTF-8.  Every route of
http-api.md §2.4, §2.5 and §2.8 answers them with its 400 / -400 (or its
own not-found), never an "internal server error" nor an HTML page.

The binder is tested alone; then one table of requests goes through the
in-memory daemon here, and through the real daemon on SQLite and on
PostgreSQL in tests/test_absurd_input_end_to_end.py.
"""

from __future__ import annotations

import orjson
from attrs import frozen
from twisted.internet.defer import fail

from difydaemon.api import envelope
from difydaemon.api.binding import INT64_MAX, INT64_MIN, BindError, Field, bind, page_fields, page_offset
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import SynchronousTestCase

from tests.api.test_dispatch_channel import Connection, post

from .endpoint_harness import EndpointHarness
from .harness import TENANT, DaemonHarness

IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64


def tag_failure(field: str, tag: str) -> str:
    """The end of the validator's message for ``field`` failing ``tag``."""
    return f"Error:Field validation for '{field}' failed on the '{tag}' tag"


class BindIntegerTests(SynchronousTestCase):
    """bind() reads an int as Go does, and only what fits int64."""

    fields = [Field("page", int, required=True)]

    def page(self, raw):
        """The bound page of ``raw``."""
        return bind("R", self.fields, {"page": raw})["page"]

    def refused(self, raw, tag: str = "number") -> None:
        """``raw`` fails with the validator's message for ``tag``."""
        error = self.assertRaises(BindError, self.page, raw)
        self.assertEqual(error.message, "Key: 'R.Page' " + tag_failure("Page", tag), raw)

    def test_accepted(self):
        """Decimal strings and JSON integers within int64 are read as Go reads them."""
        for raw, value in [("1", 1), ("+5", 5), ("-5", -5), ("007", 7), (7, 7), (str(INT64_MAX), INT64_MAX),
                           (INT64_MAX, INT64_MAX), (str(INT64_MIN), INT64_MIN), (INT64_MIN, INT64_MIN)]:
            self.assertEqual(self.page(raw), value, raw)

    def test_out_of_range(self):
        """Integers beyond int64, as text or JSON, fail the 'number' tag."""
        for raw in [str(INT64_MAX + 1), str(INT64_MIN - 1), INT64_MAX + 1, INT64_MIN - 1, 1 << 200, "9" * 10_000]:
            self.refused(raw)

    def test_not_decimal(self):
        """Exponents, fractions, NaN, infinities, spaces, underscores and non-ASCII digits fail 'number'."""
        for raw in ["1e308", "1.5", "1.0", "NaN", "nan", "inf", "-Infinity", " 5", "5 ", "1_000", "\uff11",
                    "\u0665", "0x10", "+", "-", "1\x00"]:
            self.refused(raw)

    def test_json_numbers_that_are_not_integers(self):
        """JSON floats (1.0 included, as Go's decoder refuses it for an int), booleans and others fail 'number'."""
        for raw in [1.0, 1.5, 1e308, float("inf"), float("nan"), True, False, [1], {"a": 1}]:
            self.refused(raw)

    def test_empty_is_zero(self):
        """An empty query value is 0, as gin binds it, so a required int fails 'required'."""
        self.refused("", "required")

    def test_page_bounds(self):
        """page needs >= 1 ('min'); page_size 1..max ('min', 'max'); zero is 'required'."""
        cases = [({"page": "0", "page_size": "1"}, "Page", "required"),
                 ({"page": "-1", "page_size": "1"}, "Page", "min"),
                 ({"page": "1", "page_size": "0"}, "PageSize", "required"),
                 ({"page": "1", "page_size": "-1"}, "PageSize", "min"),
                 ({"page": "1", "page_size": "257"}, "PageSize", "max")]
        for values, field, tag in cases:
            error = self.assertRaises(BindError, bind, "R", page_fields(), values)
            self.assertIn(tag_failure(field, tag), error.message, values)
        self.assertEqual(bind("R", page_fields(), {"page": "1", "page_size": "256"}), {"page": 1, "page_size": 256})

    def test_page_offset_fits_bigint(self):
        """The offset of any bound page fits an int64 OFFSET: clamped at both ends."""
        self.assertEqual(page_offset(1, 10), 0)
        self.assertEqual(page_offset(3, 10), 20)
        self.assertEqual(page_offset(-5, 10), 0)
        self.assertEqual(page_offset(INT64_MAX, 256), INT64_MAX)
        self.assertEqual(page_offset(INT64_MIN, 100), 0)


class BindStringTests(SynchronousTestCase):
    """bind() refuses NUL in strings and strings longer than their column."""

    def test_nul_refused(self):
        """A NUL in a string, in a list's string or in a listed object's string fails 'excludesrune'."""
        cases = [
            (Field("plugin_id", str), "a\x00b", "PluginId"),
            (Field("plugin_ids", list), ["ok", "a\x00"], "PluginIds"),
            (Field("provider_ids", list), [{"plugin_id": "a\x00", "provider_name": "b"}], "ProviderIds"),
        ]
        for field, raw, name in cases:
            error = self.assertRaises(BindError, bind, "R", [field], {field.name: raw})
            self.assertIn(tag_failure(name, "excludesrune"), error.message)

    def test_nul_in_object_kept(self):
        """An object field (settings, meta) is stored as JSON, where a NUL is harmless: it is kept."""
        self.assertEqual(bind("R", [Field("meta", dict)], {"meta": {"a": "\x00"}}), {"meta": {"a": "\x00"}})

    def test_maximum_length(self):
        """A string longer than its maximum fails 'max'; one of that length passes."""
        field = Field("source", str, required=True, maximum=3)
        self.assertEqual(bind("R", [field], {"source": "abc"}), {"source": "abc"})
        error = self.assertRaises(BindError, bind, "R", [field], {"source": "abcd"})
        self.assertIn(tag_failure("Source", "max"), error.message)


@frozen
class Case:
    """
    One absurd request and the answer it must get.

    :ivar path: the request target, percent-encoded ASCII.
    :ivar body: the bytes of a JSON body, or None.
    :ivar status: the HTTP status.
    :ivar code: the envelope's code, or None for a raw (non-envelope) body.
    :ivar message: a part of the inner error message (error answers), or None.
    :ivar body_is: for a raw answer, the exact body.
    """

    name: str
    method: str
    path: str
    body: bytes | None = None
    status: int = 400
    code: int | None = -400
    message: str | None = None
    body_is: bytes | None = None


BIG = "9" * 10_000
LONG = "a" * 10_000
PAGED = [
    "management/list", "management/install/tasks", "management/models", "management/tools",
    "management/agent_strategies", "management/datasources", "management/triggers", "management/tool/list",
    "endpoint/list",
]
ABSURD_INTEGERS = [
    "9223372036854775808", "-9223372036854775809", "18446744073709551616", "1e308", "1.5", "NaN", "inf",
    "-Infinity", BIG, "%EF%BC%91", "%205", "1_0",
]
# JSON bodies on a GET, as Dify sends decode/from_identifier (http-api.md §1.4)
ABSURD_JSON_PAGES = ["1e308", "9223372036854775808", "18446744073709551616", "1.0", "1.5", "-0.0"]
NUL = "%00"
NOT_UTF8 = "%FF%FE"


def absurd_cases() -> list[Case]:
    """Every absurd request of the table, with its answer."""
    t = f"/plugin/{TENANT}"
    cases = []
    for route in PAGED:
        size = 100 if route.startswith("endpoint") else 256
        for value in ABSURD_INTEGERS:
            cases.append(Case(f"{route} page={value[:24]}", "GET", f"{t}/{route}?page={value}&page_size=10",
                              message=tag_failure("Page", "number")))
            cases.append(Case(f"{route} page_size={value[:24]}", "GET", f"{t}/{route}?page=1&page_size={value}",
                              message=tag_failure("PageSize", "number")))
        for value in ABSURD_JSON_PAGES:
            cases.append(Case(f"{route} JSON page {value}", "GET", f"{t}/{route}",
                              body=b'{"page":%s,"page_size":10}' % value.encode(),
                              message=tag_failure("Page", "number")))
        # the last page int64 can hold: an empty page, not an overflow
        cases.append(Case(f"{route} farthest page", "GET", f"{t}/{route}?page={INT64_MAX}&page_size={size}",
                          status=200, code=0))
    cases += [
        # Go's endpoint lists only want page and page_size non-zero
        Case("endpoint/list lowest page", "GET", f"{t}/endpoint/list?page={INT64_MIN}&page_size=10", status=200,
             code=0),
        Case("endpoint/list no limit", "GET", f"{t}/endpoint/list?page={INT64_MAX}&page_size=-1", status=200,
             code=0),
        # path parameters
        Case("asset id 10 kB", "GET", f"{t}/asset/{LONG}", status=200, code=None, body_is=b""),
        Case("asset id with NUL", "GET", f"{t}/asset/a{NUL}b.svg", message="control byte in the path"),
        Case("asset id ..", "GET", f"{t}/asset/..", status=404, code=None, body_is=envelope.ROUTE_NOT_FOUND),
        Case("asset id not UTF-8", "GET", f"{t}/asset/{NOT_UTF8}", message="the request URL is not valid UTF-8"),
        Case("tenant not UTF-8", "GET", f"/plugin/{NOT_UTF8}/management/list?page=1&page_size=10",
             message="the request URL is not valid UTF-8"),
        Case("tenant with NUL", "GET", f"/plugin/a{NUL}b/management/list?page=1&page_size=10",
             message="control byte in the path"),
        Case("tenant 10 kB", "GET", f"/plugin/{LONG}/management/list?page=1&page_size=10",
             message=tag_failure("TenantId", "max")),
        Case("tenant with NUL, endpoints", "GET", f"/plugin/a{NUL}b/endpoint/list?page=1&page_size=10",
             message="control byte in the path"),
        Case("tenant with NUL, tool check", "POST", f"/plugin/a{NUL}/management/tools/check_existence",
             body=orjson.dumps({"provider_ids": [{"plugin_id": "a", "provider_name": "b"}]}),
             message="control byte in the path"),
        Case("task id 10 kB", "GET", f"{t}/management/install/tasks/{LONG}", status=200, code=-500,
             message="record not found"),
        Case("task id with NUL", "GET", f"{t}/management/install/tasks/a{NUL}", message="control byte in the path"),
        Case("task id not UTF-8", "GET", f"{t}/management/install/tasks/{NOT_UTF8}",
             message="the request URL is not valid UTF-8"),
        Case("delete task 10 kB", "POST", f"{t}/management/install/tasks/{LONG}/delete", status=200, code=0),
        Case("delete task item, identifier with NUL", "POST",
             f"{t}/management/install/tasks/{LONG}/delete/a{NUL}b", message="control byte in the path"),
        Case("category 10 kB", "GET", f"{t}/management/{LONG}/list?page=1&page_size=10",
             message="invalid plugin category"),
        Case("category with NUL", "GET", f"{t}/management/a{NUL}/list?page=1&page_size=10",
             message="control byte in the path"),
        Case("extract-asset file_path 10 kB", "GET",
             f"{t}/extract-asset/?plugin_unique_identifier={IDENTIFIER}&file_path={LONG}", status=500,
             code=-400, message="plugin package not found, please upload it firstly"),
        # the public endpoint entrypoint (§2.6): no authentication, so anyone can send these
        Case("public endpoint hook id with NUL", "GET", f"/e/a{NUL}b/x", message="control byte in the path"),
        Case("public endpoint hook id 10 kB", "GET", f"/e/{LONG}/x", status=404, code=-400,
             message="endpoint not found"),
        # query and body strings that reach the database
        Case("tool plugin_id with NUL", "GET", f"{t}/management/tool?plugin_id=a{NUL}b&provider=p",
             message=tag_failure("PluginId", "excludesrune")),
        Case("datasource plugin_id with NUL", "GET", f"{t}/management/datasource?plugin_id=a{NUL}&provider=p",
             message=tag_failure("PluginId", "excludesrune")),
        Case("agent_strategy provider with NUL", "GET",
             f"{t}/management/agent_strategy?plugin_id=a&provider={NUL}",
             message=tag_failure("Provider", "excludesrune")),
        Case("trigger 10 kB plugin_id", "GET", f"{t}/management/trigger?plugin_id={LONG}&provider=p",
             status=200, code=-404),
        Case("endpoint list of plugin with NUL", "GET",
             f"{t}/endpoint/list/plugin?plugin_id=a{NUL}&page=1&page_size=1",
             message=tag_failure("PluginId", "excludesrune")),
        Case("batch plugin_ids with NUL", "POST", f"{t}/management/installation/fetch/batch",
             body=orjson.dumps({"plugin_ids": ["a\x00b"]}), message=tag_failure("PluginIds", "excludesrune")),
        Case("tool check with NUL", "POST", f"{t}/management/tools/check_existence",
             body=orjson.dumps({"provider_ids": [{"plugin_id": "a\x00", "provider_name": "b"}]}),
             message=tag_failure("ProviderIds", "excludesrune")),
        Case("uninstall id with NUL", "POST", f"{t}/management/uninstall",
             body=orjson.dumps({"plugin_installation_id": "a\x00"}),
             message=tag_failure("PluginInstallationId", "excludesrune")),
        Case("endpoint remove id with NUL", "POST", f"{t}/endpoint/remove",
             body=orjson.dumps({"endpoint_id": "a\x00"}), message=tag_failure("EndpointId", "excludesrune")),
        Case("endpoint enable id 10 kB", "POST", f"{t}/endpoint/enable",
             body=orjson.dumps({"endpoint_id": LONG}), status=200, code=-404),
        Case("install source 10 kB", "POST", f"{t}/management/install/identifiers",
             body=orjson.dumps({"plugin_unique_identifiers": [IDENTIFIER], "source": LONG, "metas": [{}]}),
             message=tag_failure("Source", "max")),
        Case("install source with NUL", "POST", f"{t}/management/install/identifiers",
             body=orjson.dumps({"plugin_unique_identifiers": [IDENTIFIER], "source": "a\x00", "metas": [{}]}),
             message=tag_failure("Source", "excludesrune")),
        Case("upgrade source 10 kB", "POST", f"{t}/management/install/upgrade",
             body=orjson.dumps({"original_plugin_unique_identifier": IDENTIFIER,
                                "new_plugin_unique_identifier": IDENTIFIER.replace("0.0.1", "0.0.2"),
                                "source": LONG}),
             message=tag_failure("Source", "max")),
        Case("endpoint setup name 10 kB", "POST", f"{t}/endpoint/setup",
             body=orjson.dumps({"plugin_unique_identifier": IDENTIFIER, "user_id": "u", "name": LONG,
                                "settings": {}}),
             message=tag_failure("Name", "max")),
        Case("endpoint update user_id 10 kB", "POST", f"{t}/endpoint/update",
             body=orjson.dumps({"endpoint_id": "e", "user_id": LONG, "name": "n", "settings": {}}),
             message=tag_failure("UserId", "max")),
    ]
    return cases


def wrong_answer(case: Case, status: int, body: bytes) -> str | None:
    """What is wrong with ``status`` and ``body`` as the answer to ``case``; None if nothing."""
    got = f"{case.name}: got {status} {body[:200]!r}"
    if status != case.status:
        return got
    if case.code is None:
        return None if body == case.body_is else got
    try:
        envelope = orjson.loads(body)
        if envelope["code"] != case.code:
            return got
        if case.code != 0:
            message = orjson.loads(envelope["message"])["message"]
            if message == "internal server error" or (case.message is not None and case.message not in message):
                return got
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return got
    return None


def request_bytes(case: Case, key: str) -> bytes:
    """The whole HTTP/1.1 request of ``case``, closing the connection after it."""
    body = case.body if case.body is not None else b""
    head = f"{case.method} {case.path} HTTP/1.1\r\nHost: daemon.test\r\nX-Api-Key: {key}\r\nConnection: close\r\n"
    if case.body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


class AbsurdRequestTests(SynchronousTestCase):
    """The table of absurd requests through the in-memory daemon."""

    def test_every_case(self):
        """Every absurd request gets its route's 400 / -400 or not-found answer, never an internal error."""
        daemon = EndpointHarness(self)
        wrong = []
        for case in absurd_cases():
            kw = {"data": case.body, "headers": {"Content-Type": "application/json"}} \
                if case.body is not None else {}
            response, body = daemon.request(case.method, case.path, **kw)
            wrong.append(wrong_answer(case, response.code, body))
        self.maxDiff = None
        self.assertEqual([w for w in wrong if w is not None], [])
        self.assertEqual(self.flushLoggedErrors(), [])


class DispatchAbsurdIdsTests(SynchronousTestCase):
    """Dispatch ids no installation can have are not looked up."""

    def test_nul_in_tenant_is_refused_at_once(self):
        """A tenant with a NUL is a bad request target on both stacks, without a database lookup."""
        for lean in (True, False):
            connection = Connection(self, lean=lean, script=False, hold_lookups=True)
            raw = connection.send(post(path="/plugin/a%00b/dispatch/tool/invoke"))
            head, _, body = raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw)
            self.assertEqual(orjson.loads(orjson.loads(body)["message"])["error_type"], "PluginDaemonBadRequestError")
            self.assertEqual(connection.daemon.lookups.pending, [])


class _BrokenLoads(MemoryObjectStorage):
    """A store whose loads hit a bug."""

    def load(self, key: str):
        return fail(ZeroDivisionError("bug"))


class RawRouteBugTests(SynchronousTestCase):
    """The routes that answer raw bytes answer a bug with the 500 envelope, not Klein's HTML page."""

    def test_asset_bug(self):
        """A bug behind /asset/ is a 500 -500 envelope, and is logged."""
        daemon = DaemonHarness(self, storage=_BrokenLoads())
        response, body = daemon.request("GET", f"/plugin/{TENANT}/asset/{'a' * 64}.svg")
        self.assertEqual(response.code, 500)
        self.assertEqual(orjson.loads(orjson.loads(body)["message"])["message"], "internal server error")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_extract_asset_bug(self):
        """A bug behind /extract-asset/ is a 500 -500 envelope, and is logged."""
        daemon = DaemonHarness(self, storage=_BrokenLoads())
        response, body = daemon.request(
            "GET", f"/plugin/{TENANT}/extract-asset/",
            params={"plugin_unique_identifier": IDENTIFIER, "file_path": "icon.svg"},
        )
        self.assertEqual(response.code, 500)
        self.assertEqual(orjson.loads(orjson.loads(body)["message"])["message"], "internal server error")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
