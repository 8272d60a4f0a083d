"""
Daemon -> plugin answers to backwards invocations (``runtimes.md`` §4.3).

Each answer is one §0.2 message with ``event: "backwards_response"``, the
session's id and context fields, and a ``data`` naming the plugin's
``backwards_request_id``.  Every exchange ends with an ``end`` event, after
``response`` events or after one ``error``.
"""

from __future__ import annotations

#: The §0.2 keys copied from the session's request into every answer.
_SESSION_KEYS = ("session_id", "conversation_id", "message_id", "app_id", "endpoint_id", "context")


def backwards_response(session_request: dict, backwards_request_id: str, event: str, message: str = "", data=None) -> dict:
    """
    One backwards_response message.

    :param session_request: the §0.2 request that opened the session (its
        session_id, conversation_id, message_id, app_id, endpoint_id and
        context are repeated).
    :param event: ``response``, ``error`` or ``end``.
    :param message: ``stream`` or ``struct`` for a response, the error text
        for an error, empty for end.
    :param data: the response object; None for error and end.
    """
    out = {key: session_request.get(key) for key in _SESSION_KEYS}
    out["event"] = "backwards_response"
    out["data"] = {
        "backwards_request_id": backwards_request_id,
        "event": event,
        "message": message,
        "data": data,
    }
    return out


def backwards_error(session_request: dict, backwards_request_id: str, message: str) -> list[dict]:
    """The two messages refusing a backwards invocation: ``error``, then ``end``."""
    return [
        backwards_response(session_request, backwards_request_id, "error", message),
        backwards_response(session_request, backwards_request_id, "end"),
    ]
