"""A whole JSON answer written at once, as the dispatch path and its forwarding both answer errors."""

from __future__ import annotations

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


def answer_json(request, status: int, body: bytes) -> None:
    """Answer ``body`` (JSON) with ``status``, sized rather than chunked, and finish."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    # sized, as the answers render() returns are, rather than chunked
    request.setHeader(b"content-length", b"%d" % len(body))
    finish_with = getattr(request, "finish_with", None)
    if finish_with is not None:
        # the lean channel's request: head and body in one send, now
        finish_with(body)
        return
    request.write(body)
    request.finish()
