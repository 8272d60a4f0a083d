"""
Request heads two HTTP readers could frame differently (request
smuggling), each followed by a second request a lax reader would serve:
both HTTP stacks of the daemon must answer 400 and close instead.
"""

from __future__ import annotations


def shapes(target: bytes, key: bytes) -> dict[str, bytes]:
    """name -> the bytes of a smuggling attempt on ``target`` (a POST route), with ``key``."""
    start = b"POST " + target + b" HTTP/1.1\r\nHost: daemon.test\r\nX-Api-Key: " + key + b"\r\n"
    hidden = b"GET /health/check HTTP/1.1\r\nHost: daemon.test\r\n\r\n"
    return {
        "bare LF line ends": start.replace(b"\r\n", b"\n") + b"Content-Length: 2\n\n{}" + hidden,
        "a bare LF inside the head": start + b"X-A: 1\nContent-Length: 2\r\n\r\n{}" + hidden,
        "obsolete line folding": start + b"X-A: 1\r\n Content-Length: 60\r\nContent-Length: 2\r\n\r\n{}" + hidden,
        "folded Content-Length": start + b"Content-Length:\r\n\t2\r\n\r\n{}" + hidden,
        "two different Content-Lengths": start + b"Content-Length: 2\r\nContent-Length: 60\r\n\r\n{}" + hidden,
        "Content-Length and Transfer-Encoding": start + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"0\r\n\r\n" + hidden,
        "Transfer-Encoding and Content-Length": start + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        + b"0\r\n\r\n" + hidden,
        "a bad chunk size": start + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n" + hidden,
        "a negative chunk size": start + b"Transfer-Encoding: chunked\r\n\r\n-2\r\n{}\r\n0\r\n\r\n" + hidden,
    }
