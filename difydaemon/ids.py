"""
Row ids and timestamps in the shapes Dify expects (``http-api.md`` §1.5).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone


def new_id(now: float) -> str:
    """
    A UUID version 7 string for ``now`` (unix seconds): time-ordered, so
    newest-first ordering by id matches ordering by creation time.
    """
    millis = int(now * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def utc_from_timestamp(now: float) -> datetime:
    """An aware UTC datetime for unix seconds ``now``."""
    return datetime.fromtimestamp(now, tz=timezone.utc)


def rfc3339(moment: datetime) -> str:
    """
    RFC 3339 with fractional seconds and a zone, ``Z`` for UTC, as Go's
    ``time.RFC3339Nano`` prints it (trailing zeros of the fraction dropped).
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    text = moment.isoformat()
    if "." in text:
        head, rest = text.split(".", 1)
        frac, zone = rest[:6], rest[6:]
        frac = frac.rstrip("0")
        text = f"{head}.{frac}{zone}" if frac else f"{head}{zone}"
    return text.replace("+00:00", "Z")
