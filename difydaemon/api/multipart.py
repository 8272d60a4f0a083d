"""
A ``multipart/form-data`` reader for the upload routes.

The site runs with ``parsePOSTFormSubmission=False`` (twisted.web's own form
parsing costs every request); the two upload routes read their bodies here.
twisted.web has spooled such a body to a temporary file as it arrived;
:func:`read_form` streams through that file (in a thread: it is blocking
work on tens of megabytes) with :class:`PartScanner`, which only records
where each part's content lies, and then reads just the parts asked for.
So an upload costs about one copy of its file in memory, where parsing the
whole body as an email message cost more than ten.

:class:`PartScanner` is pure: bytes in, :class:`Part` spans out, whatever
the bytes' cuts.
"""

from __future__ import annotations

import io
import re

from attrs import field, frozen

#: Bytes read from the body file at a time.
CHUNK_SIZE = 1024 * 1024
#: A part's header block may not be longer than this.
MAX_PART_HEAD = 16384
#: A text field read by :func:`read_form` may not be longer than this.
MAX_FIELD_SIZE = 65536

_PREAMBLE, _AFTER_DELIMITER, _PART_HEAD, _PART_BODY, _DONE = range(5)
# RFC 2046 allows blanks between a delimiter and its line end
_PADDING_LIMIT = 1024
_PARAMETER = re.compile(
    rb';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)'
)
_QUOTED_PAIR = re.compile(rb"\\(.)")


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


class FileTooLarge(MultipartError):
    """The file part is larger than allowed."""


@frozen
class FormData:
    """
    The text fields and file parts of one form body.

    :ivar filenames: the ``filename`` each file part was sent with, by name.
    """

    fields: dict
    files: dict
    filenames: dict = field(factory=dict)


@frozen
class Part:
    """
    Where one part lies in the body.

    :ivar name: the ``name`` of its ``Content-Disposition`` (None without).
    :ivar filename: its ``filename`` (None for a text field).
    :ivar start: the offset of its first content byte.
    :ivar end: the offset just past its last content byte.
    """

    name: str | None
    filename: str | None
    start: int
    end: int

    @property
    def size(self) -> int:
        """The content's length."""
        return self.end - self.start


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; MultipartError for anything else."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise MultipartError("request is not multipart/form-data")
    raw = content_type.encode("latin-1", "replace")
    for name, value in _parameters(raw[raw.find(b";"):] if b";" in raw else b""):
        if name == b"boundary":
            boundary = _unquote(value)
            if 0 < len(boundary) <= 70:
                return boundary
            break
    raise MultipartError("multipart/form-data without a valid boundary")


def _parameters(text: bytes):
    for match in _PARAMETER.finditer(text):
        yield match.group(1).lower(), match.group(2).strip()


def _unquote(value: bytes) -> bytes:
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        return _QUOTED_PAIR.sub(rb"\1", value[1:-1])
    return value


def _disposition(head: bytes) -> tuple[str | None, str | None]:
    """(name, filename) from a part's header block."""
    for line in head.split(b"\r\n"):
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == b"content-disposition":
            kind, _, rest = value.strip().partition(b";")
            if kind.strip().lower() != b"form-data":
                return None, None
            name = filename = None
            for key, raw in _parameters(b";" + rest):
                if key == b"name" and name is None:
                    name = _unquote(raw).decode("utf-8", "replace")
                elif key in (b"filename", b"filename*") and filename is None:
                    filename = _unquote(raw).decode("utf-8", "replace")
            return name, filename
    return None, None


class PartScanner:
    """
    Finds the parts of a multipart body fed in pieces of any size.

    Only the delimiter's length of bytes is kept between two pieces (and a
    part's header block until it is whole): a part's content is never
    buffered, only its offsets reported.

    :param boundary: the body's boundary.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # a line end before the body makes the first delimiter like the others
        self._buffer = b"\r\n"
        self._offset = -2
        self._state = _PREAMBLE
        self._name = None
        self._filename = None
        self._start = 0

    @property
    def done(self) -> bool:
        """Whether the closing delimiter has been read."""
        return self._state == _DONE

    def feed(self, data: bytes) -> list[Part]:
        """Read more of the body; the parts it completes, in order."""
        if self._state == _DONE:
            return []
        buffer = self._buffer + data if self._buffer else data
        offset = self._offset
        delimiter = self._delimiter
        parts = []
        position = 0
        while True:
            state = self._state
            if state == _PREAMBLE or state == _PART_BODY:
                found = buffer.find(delimiter, position)
                if found < 0:
                    # keep what may be the start of a delimiter
                    position = max(position, len(buffer) - len(delimiter) + 1)
                    break
                if state == _PART_BODY:
                    parts.append(Part(self._name, self._filename, self._start, offset + found))
                position = found + len(delimiter)
                self._state = _AFTER_DELIMITER
            elif state == _AFTER_DELIMITER:
                if len(buffer) - position < 2:
                    break
                if buffer.startswith(b"--", position):
                    self._state = _DONE
                    position = len(buffer)
                    break
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    if len(buffer) - position > _PADDING_LIMIT:
                        raise MultipartError("malformed multipart delimiter")
                    break
                if buffer[position:line_end].strip(b" \t"):
                    raise MultipartError("malformed multipart delimiter")
                position = line_end + 2
                self._state = _PART_HEAD
            else:  # _PART_HEAD
                if buffer.startswith(b"\r\n", position):
                    head_end, head = position, b""
                else:
                    head_end = buffer.find(b"\r\n\r\n", position)
                    if head_end < 0:
                        if len(buffer) - position > MAX_PART_HEAD:
                            raise MultipartError("multipart part header too large")
                        break
                    head = buffer[position:head_end]
                    head_end += 2
                self._name, self._filename = _disposition(head)
                position = head_end + 2
                self._start = offset + position
                self._state = _PART_BODY
        self._buffer = buffer[position:]
        self._offset = offset + position
        return parts

    def finish(self) -> None:
        """The body has ended: MultipartError unless it was closed properly."""
        if self._state != _DONE:
            raise MultipartError("multipart body ends before its closing delimiter")


def scan(stream, boundary: bytes, chunk_size: int = CHUNK_SIZE) -> list[Part]:
    """Every part of the body read from ``stream`` (from its start)."""
    stream.seek(0)
    scanner = PartScanner(boundary)
    parts = []
    while not scanner.done:
        data = stream.read(chunk_size)
        if not data:
            break
        parts.extend(scanner.feed(data))
    scanner.finish()
    return parts


def _read(stream, part: Part) -> bytes:
    stream.seek(part.start)
    return stream.read(part.size)


def read_form(stream, content_type: str | None, file_field: str, text_fields=(), max_file_size: int | None = None,
              chunk_size: int = CHUNK_SIZE) -> FormData:
    """
    Read the first file part named ``file_field`` and the first text part of
    each of ``text_fields`` from a multipart body (blocking: run it in a
    thread for a large body).

    :param stream: a seekable binary file holding the body.
    :param max_file_size: FileTooLarge for a larger file part (which is
        then not read).
    :raise MultipartError: the body is not well-formed multipart/form-data,
        or a wanted text field is longer than :data:`MAX_FIELD_SIZE`.
    """
    parts = scan(stream, boundary_of(content_type), chunk_size)
    files: dict = {}
    fields: dict = {}
    filenames: dict = {}
    for part in parts:
        if part.filename is not None:
            if part.name == file_field and file_field not in files:
                if max_file_size is not None and part.size > max_file_size:
                    raise FileTooLarge(f"the file part is larger than {max_file_size} bytes")
                files[file_field] = _read(stream, part)
                filenames[file_field] = part.filename
        elif part.name in text_fields and part.name not in fields:
            if part.size > MAX_FIELD_SIZE:
                raise MultipartError(f"form field {part.name} is larger than {MAX_FIELD_SIZE} bytes")
            fields[part.name] = _read(stream, part).decode("utf-8", "replace")
    return FormData(fields=fields, files=files, filenames=filenames)


def parse_form(content_type: str | None, body: bytes) -> FormData:
    """
    Split a whole ``multipart/form-data`` body into text fields and files
    (parts with a filename); the first part of a name wins.  Raises
    :class:`MultipartError` on other content.
    """
    stream = io.BytesIO(body)
    fields: dict = {}
    files: dict = {}
    for part in scan(stream, boundary_of(content_type)):
        if not part.name:
            continue
        payload = body[part.start:part.end]
        if part.filename is not None:
            files.setdefault(part.name, payload)
        else:
            fields.setdefault(part.name, payload.decode("utf-8", "replace"))
    return FormData(fields=fields, files=files)
