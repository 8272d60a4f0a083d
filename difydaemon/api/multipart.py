"""
A ``multipart/form-data`` parser for the upload routes.

The site runs with ``parsePOSTFormSubmission=False`` (twisted.web's own form
parsing costs every request); the two upload routes parse their bodies here.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

from attrs import frozen


@frozen
class FormData:
    """The text fields and file parts of one form body."""

    fields: dict
    files: dict


class MultipartError(ValueError):
    """The body is not multipart/form-data."""


def parse_form(content_type: str | None, body: bytes) -> FormData:
    """
    Split a ``multipart/form-data`` body into text fields and files (parts
    with a filename).  Raises :class:`MultipartError` on other content.
    """
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("request is not multipart/form-data")
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("malformed multipart body")
    fields: dict = {}
    files: dict = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files.setdefault(name, payload)
        else:
            fields.setdefault(name, payload.decode("utf-8", "replace"))
    return FormData(fields=fields, files=files)
