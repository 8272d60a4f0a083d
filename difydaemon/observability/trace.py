"""
The W3C trace context header ``traceparent`` (https://www.w3.org/TR/trace-context/),
checked before the daemon passes it on.

An incoming ``traceparent`` goes, unchanged, to the plugin session (the
``traceparent`` key of the session's request line, ``runtimes.md`` §0.2,
which the SDK ignores as it ignores every key it does not know) and as a
header on the daemon's calls back into Dify for that session.  With
OpenTelemetry on (:mod:`difydaemon.observability.otel`) the daemon's own
spans come in between and each hop gets its parent's id instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from attrs import frozen

#: the header name, as HTTP carries it
HEADER = b"traceparent"

#: version 00 is exactly this; a later version may add fields after a "-"
_SHAPE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.DOTALL)
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


def parse_traceparent(value) -> str | None:
    """
    ``value`` (bytes or str) as a valid ``traceparent`` string, or None
    when it is malformed: not lowercase hex in the 2-32-16-2 shape, version
    ``ff``, an all-zero trace or parent id, or a version 00 value with
    anything after the flags.  Only the four known fields are kept.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    if not isinstance(value, bytes) or len(value) > 512:
        return None
    match = _SHAPE.match(value.strip(b" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == b"00" and rest is not None:
        return None
    return b"-".join((version, trace_id, parent_id, flags)).decode("ascii")


def traceparent_of(headers) -> str | None:
    """The valid ``traceparent`` of a twisted.web ``Headers`` (the first one), or None."""
    values = headers.getRawHeaders(HEADER)
    if not values:
        return None
    return parse_traceparent(values[0])


@frozen
class TracedProgress:
    """
    An install's progress reporter that also carries the trace context of
    its install span: the launcher gets it as it gets any progress callable,
    and one that calls out (the serverless runtime, to its SRI connector)
    reads :func:`traceparent_of_progress` to join the install's trace,
    without every launcher's signature growing a parameter.

    :ivar report: the progress callable itself.
    :ivar traceparent: the install span's ``traceparent``.
    """

    report: Callable[[str], None]
    traceparent: str

    def __call__(self, line: str) -> None:
        self.report(line)


def traceparent_of_progress(progress) -> str | None:
    """The ``traceparent`` a progress reporter carries (:class:`TracedProgress`), or None."""
    return progress.traceparent if isinstance(progress, TracedProgress) else None
