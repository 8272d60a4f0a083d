"""A scripted fake function (``POST /invoke``) for the invoke client's and runtime's unit tests."""

from __future__ import annotations

import orjson
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


def session_line(session_id: str, kind: str, data) -> bytes:
    """One SDK event line (and its blank line)."""
    return (
        orjson.dumps({"event": "session", "session_id": session_id, "data": {"type": kind, "data": data}}) + b"\n\n"
    )


class Reply:
    """One scripted answer: status, headers, body pieces; ``hang`` keeps the response open after them."""

    def __init__(self, status=200, body=(), headers=None, hang=False):
        self.status = status
        self.body = list(body)
        self.headers = headers or {}
        self.hang = hang


class FakeFunction(Resource):
    """
    Answers ``POST .../invoke`` with the next scripted :class:`Reply` (the
    last one repeats), or with ``handler(request_body)`` -> Reply when
    given.  Records every request as ``(path, args, headers, body)``.
    """

    isLeaf = True

    def __init__(self, replies=(), handler=None):
        super().__init__()
        self.replies = list(replies)
        self.handler = handler
        self.requests = []
        self.open_requests = []

    def render_POST(self, request):
        body = request.content.read()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.path.decode(), request.args, headers, body))
        if self.handler is not None:
            reply = self.handler(orjson.loads(body))
        else:
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        for piece in reply.body:
            request.write(piece)
        if reply.hang:
            self.open_requests.append(request)
            return NOT_DONE_YET
        request.finish()
        return NOT_DONE_YET


def never() -> Deferred:
    return Deferred()
