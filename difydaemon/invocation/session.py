"""
What the daemon knows about the plugin session a backwards invocation
comes from (``runtimes.md`` §4.2): who asked, under which access type, with
which manifest permissions, and where answers go.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class InvocationSession:
    """
    One open plugin session, as a backwards invocation sees it.

    :ivar tenant_id: the workspace the session serves.
    :ivar user_id: the session's user (the dispatch body's ``user_id``).
    :ivar plugin_id: ``author/name`` of the plugin.
    :ivar access_type: the session's access type (``tool``, ``model``,
        ``endpoint``, ...): model sessions may not call back.
    :ivar declaration: the plugin's declaration (its
        ``resource.permission`` decides what it may call).
    :ivar session_request: the §0.2 request that opened the session; its
        session_id and context keys are repeated in every answer.
    :ivar runtime: the IPluginRuntime serving the session; answers are
        written with ``runtime.send(session_id, message)``.
    """

    tenant_id: str
    user_id: str
    plugin_id: str
    access_type: str
    declaration: dict
    session_request: dict
    runtime: object

    @property
    def session_id(self) -> str:
        """The id of the session the invocation belongs to."""
        return self.session_request["session_id"]

    @classmethod
    def of(cls, tenant_id: str, plugin_id: str, session_request: dict, runtime) -> InvocationSession:
        """
        The session a §0.2 request opened on ``runtime``: user and access
        type come from the request's data, the permissions from the
        runtime's declaration.
        """
        data = session_request.get("data") or {}
        user_id = data.get("user_id")
        declaration = getattr(runtime, "declaration", None)
        # positional, in field order (tenant_id, user_id, plugin_id,
        # access_type, declaration, session_request, runtime): made on
        # every dispatch, and keywords cost an attrs __init__ a third more
        return cls(
            tenant_id,
            user_id if isinstance(user_id, str) else "",
            plugin_id,
            str(data.get("type") or ""),
            declaration if isinstance(declaration, dict) else {},
            session_request,
            runtime,
        )


class MalformedInvokeError(ValueError):
    """
    An ``invoke`` message without a string ``type``, a string
    ``backwards_request_id`` or an object ``request``: the daemon closes
    the session's stream with ``invoke_dify_error`` (§4.2 step 1) instead
    of answering it.
    """


def parse_invoke(data) -> tuple[str, str, dict]:
    """
    The ``(type, backwards_request_id, request)`` of an ``invoke`` message.

    :raises MalformedInvokeError: when one is missing or of the wrong kind.
    """
    if isinstance(data, dict):
        invoke_type = data.get("type")
        backwards_id = data.get("backwards_request_id")
        request = data.get("request")
        if isinstance(invoke_type, str) and isinstance(backwards_id, str) and isinstance(request, dict):
            return invoke_type, backwards_id, request
    raise MalformedInvokeError("invoke dify failed: malformed invoke request")
