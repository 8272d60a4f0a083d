"""The raw HTTP request an endpoint plugin receives (http-api §2.6)."""

from __future__ import annotations

from difydaemon.api.endpoint_http import (
    MAX_BODY,
    IncomingRequest,
    canonical_header_name,
    encode_query,
    escape_path,
    parse_query,
    query_unescape,
    raw_http_request,
)
from difydaemon.testing.cases import SynchronousTestCase


def incoming(method=b"GET", path=b"/", query=b"", headers=(), host=b"dify.example", secure=False, body=b""):
    """An IncomingRequest with the usual defaults."""
    return IncomingRequest(
        method=method, path=path, query=query, headers=tuple(headers), host=host, secure=secure, body=body
    )


def head_lines(raw: bytes) -> list:
    """The lines of the request head, request line first."""
    head, _, _ = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


def header_map(raw: bytes) -> dict:
    """Header name -> list of values, from the head."""
    found = {}
    for line in head_lines(raw)[1:]:
        name, _, value = line.partition(b": ")
        found.setdefault(name, []).append(value)
    return found


class RawRequestTests(SynchronousTestCase):
    """raw_http_request lays the request out as Go's http.Request.Write does."""

    def test_whole_request(self):
        """A POST becomes request line, Host, User-Agent, Content-Length, sorted headers, body."""
        raw = raw_http_request(
            incoming(
                method=b"POST",
                path=b"/hooks/in",
                query=b"z=1&a=2",
                headers=[
                    (b"Host", b"dify.example"),
                    (b"User-Agent", b"curl/8.5"),
                    (b"Content-Type", b"application/json"),
                    (b"Accept", b"*/*"),
                    (b"Content-Length", b"13"),
                ],
                body=b'{"hello": 1}\n',
            ),
            "abcdefghij012345",
        )
        self.assertEqual(
            raw,
            b"POST /hooks/in?a=2&z=1 HTTP/1.1\r\n"
            b"Host: dify.example\r\n"
            b"User-Agent: curl/8.5\r\n"
            b"Content-Length: 13\r\n"
            b"Accept: */*\r\n"
            b"Content-Type: application/json\r\n"
            b"Dify-Hook-Id: abcdefghij012345\r\n"
            b"Dify-Hook-Url: http://dify.example/e/abcdefghij012345/hooks/in\r\n"
            b"\r\n"
            b'{"hello": 1}\n',
        )

    def test_get_without_body_has_no_length(self):
        """A GET without a body announces no Content-Length and no User-Agent it did not get."""
        raw = raw_http_request(incoming(), "h")
        self.assertEqual(head_lines(raw)[:2], [b"GET / HTTP/1.1", b"Host: dify.example"])
        self.assertNotIn(b"Content-Length", header_map(raw))
        self.assertNotIn(b"User-Agent", header_map(raw))
        self.assertTrue(raw.endswith(b"\r\n\r\n"))

    def test_empty_post_says_zero(self):
        """An empty POST or PUT says Content-Length: 0, so the plugin's parser sees no body."""
        for method in (b"POST", b"PUT"):
            self.assertEqual(header_map(raw_http_request(incoming(method=method), "h"))[b"Content-Length"], [b"0"])

    def test_body_cut_at_ten_mebibytes(self):
        """Only the first 10 MiB of a body are forwarded, and Content-Length says so."""
        body = b"x" * (MAX_BODY + 1000)
        raw = raw_http_request(incoming(method=b"POST", body=body), "h")
        head, _, forwarded = raw.partition(b"\r\n\r\n")
        self.assertEqual(len(forwarded), MAX_BODY)
        self.assertEqual(header_map(raw)[b"Content-Length"], [str(MAX_BODY).encode()])

    def test_forwarding_headers_removed(self):
        """Proxy headers are dropped; Transfer-Encoding and the client's Content-Length too."""
        raw = raw_http_request(
            incoming(
                method=b"POST",
                headers=[
                    (b"x-forwarded-for", b"10.0.0.1"),
                    (b"X-Real-IP", b"10.0.0.2"),
                    (b"x-forwarded", b"for=10.0.0.3"),
                    (b"x-original-forwarded-for", b"10.0.0.4"),
                    (b"x-original-url", b"/e/h/x"),
                    (b"x-original-host", b"public.example"),
                    (b"transfer-encoding", b"chunked"),
                    (b"content-length", b"999"),
                    (b"trailer", b"x-sum"),
                    (b"x-keep", b"kept"),
                ],
                body=b"abc",
            ),
            "h",
        )
        headers = header_map(raw)
        for name in (b"X-Forwarded-For", b"X-Real-Ip", b"X-Forwarded", b"X-Original-Forwarded-For",
                     b"X-Original-Url", b"X-Original-Host", b"Transfer-Encoding", b"Trailer"):
            self.assertNotIn(name, headers)
        self.assertEqual(headers[b"Content-Length"], [b"3"])
        self.assertEqual(headers[b"X-Keep"], [b"kept"])

    def test_original_host_wins(self):
        """X-Original-Host (set by Dify's proxy) becomes Host and the host of Dify-Hook-Url."""
        raw = raw_http_request(
            incoming(path=b"/p", headers=[(b"host", b"daemon:5002"), (b"x-original-host", b"dify.public.example")],
                     host=b"daemon:5002"),
            "hook",
        )
        headers = header_map(raw)
        self.assertEqual(headers[b"Host"], [b"dify.public.example"])
        self.assertEqual(headers[b"Dify-Hook-Url"], [b"http://dify.public.example/e/hook/p"])

    def test_empty_original_host_ignored(self):
        """An empty X-Original-Host is as good as none: the request's host is used."""
        raw = raw_http_request(incoming(headers=[(b"x-original-host", b"")], host=b"daemon:5002"), "hook")
        self.assertEqual(header_map(raw)[b"Host"], [b"daemon:5002"])

    def test_hook_url_scheme(self):
        """Dify-Hook-Url is https over TLS or behind X-Forwarded-Proto: https, else http."""
        url = lambda raw: header_map(raw)[b"Dify-Hook-Url"][0]  # noqa: E731
        self.assertEqual(url(raw_http_request(incoming(secure=True), "h")), b"https://dify.example/e/h/")
        self.assertEqual(
            url(raw_http_request(incoming(headers=[(b"x-forwarded-proto", b"https")]), "h")),
            b"https://dify.example/e/h/",
        )
        self.assertEqual(
            url(raw_http_request(incoming(headers=[(b"x-forwarded-proto", b"HTTPS")]), "h")),
            b"http://dify.example/e/h/",
        )
        self.assertEqual(url(raw_http_request(incoming(), "h")), b"http://dify.example/e/h/")

    def test_hook_url_kept_hook_id_replaced(self):
        """A Dify-Hook-Url the caller sent is kept; a Dify-Hook-Id it sent is replaced."""
        raw = raw_http_request(
            incoming(headers=[(b"dify-hook-url", b"https://given/e/x"), (b"dify-hook-id", b"forged")]), "real"
        )
        headers = header_map(raw)
        self.assertEqual(headers[b"Dify-Hook-Url"], [b"https://given/e/x"])
        self.assertEqual(headers[b"Dify-Hook-Id"], [b"real"])

    def test_repeated_headers_keep_their_order(self):
        """Several values of one header are written as several lines, in arrival order."""
        raw = raw_http_request(incoming(headers=[(b"x-b", b"2"), (b"X-A", b"1"), (b"x-b", b"3")]), "h")
        lines = head_lines(raw)
        self.assertEqual([line for line in lines if line.startswith(b"X-")], [b"X-A: 1", b"X-B: 2", b"X-B: 3"])

    def test_path_escaped(self):
        """The decoded path is escaped as Go escapes paths; the hook URL keeps it decoded."""
        raw = raw_http_request(incoming(path=b"/a b/\xc3\xa9/x?y/!*'()$&+,:;=@"), "h")
        self.assertEqual(head_lines(raw)[0], b"GET /a%20b/%C3%A9/x%3Fy/%21%2A%27%28%29$&+,:;=@ HTTP/1.1")
        self.assertEqual(header_map(raw)[b"Dify-Hook-Url"], [b"http://dify.example/e/h/a b/\xc3\xa9/x?y/!*'()$&+,:;=@"])

    def test_empty_path_is_root(self):
        """No path after the hook id is the path /."""
        self.assertEqual(head_lines(raw_http_request(incoming(path=b""), "h"))[0], b"GET / HTTP/1.1")


class QueryTests(SynchronousTestCase):
    """Query strings are parsed and re-encoded as Go's net/url does."""

    def test_sorted_keys_values_in_order(self):
        """Keys are sorted; the values of one key keep their order."""
        self.assertEqual(encode_query(b"b=2&a=1&b=1&a=0"), b"a=1&a=0&b=2&b=1")

    def test_escaping(self):
        """Values are query-escaped: space as +, reserved characters as %XX, UTF-8 bytes kept."""
        self.assertEqual(
            encode_query(b"q=a%20b+c&s=%2F%3F%26%3D&u=%E4%BD%A0&t=-_.~"),
            b"q=a+b+c&s=%2F%3F%26%3D&t=-_.~&u=%E4%BD%A0",
        )

    def test_blank_and_bare(self):
        """A key without = gets an empty value; empty pairs vanish."""
        self.assertEqual(encode_query(b"&&flag&x=&y=1&"), b"flag=&x=&y=1")

    def test_dropped_pairs(self):
        """Pairs with a semicolon or a malformed escape are dropped, as Go drops them."""
        self.assertEqual(parse_query(b"a=1;b=2&c=%zz&d=%4&e=ok"), {b"e": [b"ok"]})

    def test_unescape(self):
        """query_unescape turns + into space and %XX into the byte, and refuses a bad escape."""
        self.assertEqual(query_unescape(b"a+b%2b%41"), b"a b+A")
        self.assertIsNone(query_unescape(b"100%"))

    def test_empty(self):
        """An empty query encodes to nothing (and the request line has no ?)."""
        self.assertEqual(encode_query(b""), b"")
        self.assertNotIn(b"?", head_lines(raw_http_request(incoming(query=b"&"), "h"))[0])


class NameTests(SynchronousTestCase):
    """Header names and paths in Go's canonical forms."""

    def test_canonical_header_name(self):
        """Each dash-separated word is capitalized; a name with a space is left alone."""
        self.assertEqual(canonical_header_name(b"x-api-key"), b"X-Api-Key")
        self.assertEqual(canonical_header_name(b"CONTENT-TYPE"), b"Content-Type")
        self.assertEqual(canonical_header_name(b"x_custom"), b"X_custom")
        self.assertEqual(canonical_header_name(b"bad name"), b"bad name")

    def test_escape_path(self):
        """Letters, digits, -_.~ and $&+,/:;=@ stay; everything else is %XX."""
        self.assertEqual(escape_path(b"/a-b_c.d~e/$&+,:;=@"), b"/a-b_c.d~e/$&+,:;=@")
        self.assertEqual(escape_path(b"/%?#[] "), b"/%25%3F%23%5B%5D%20")
