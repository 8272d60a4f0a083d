"""
The multipart reader of the upload routes: the scanner at every split
offset, malformed bodies, and reading only the parts asked for from a file.
"""

from __future__ import annotations

import io
import os

from difydaemon.api.multipart import (
    MAX_FIELD_SIZE,
    MAX_PART_HEAD,
    FileTooLarge,
    MultipartError,
    Part,
    PartScanner,
    boundary_of,
    parse_form,
    read_form,
    scan,
)
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.harness import encode_form

CONTENT_TYPE = "multipart/form-data; boundary=XyZ"
#: preamble, a text field, a file whose content looks like delimiters, a part without headers, epilogue
BODY = (
    b"preamble\r\n--XyZ\r\n"
    b'Content-Disposition: form-data; name="verify_signature"\r\n\r\n'
    b"true\r\n"
    b"--XyZ  \t\r\n"
    b'content-disposition: form-data; name="dify_pkg"; filename="a;b \\"c\\".difypkg"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
    b"PK\x03\x04--XyZ\r\n-\r\n--Xy\r\r\n\r\n--XyZ\r\n"
    b"\r\n"
    b"no headers\r\n"
    b"--XyZ--\r\nepilogue --XyZ\r\n"
)
FILE = b"PK\x03\x04--XyZ\r\n-\r\n--Xy\r\r\n"


def parts_of(pieces) -> list[Part]:
    scanner = PartScanner(b"XyZ")
    parts = []
    for piece in pieces:
        parts.extend(scanner.feed(piece))
    scanner.finish()
    return parts


class ScannerTests(SynchronousTestCase):
    """PartScanner reports where each part lies, whatever the cuts."""

    def test_parts(self):
        """Each part's name, filename and content span, in order; preamble and epilogue ignored."""
        parts = parts_of([BODY])
        self.assertEqual([(p.name, p.filename) for p in parts],
                         [("verify_signature", None), ("dify_pkg", 'a;b "c".difypkg'), (None, None)])
        self.assertEqual([BODY[p.start:p.end] for p in parts], [b"true", FILE, b"no headers"])

    def test_every_split_offset(self):
        """The body cut in two at every offset gives the same parts."""
        expected = parts_of([BODY])
        for offset in range(len(BODY) + 1):
            self.assertEqual(parts_of([BODY[:offset], BODY[offset:]]), expected, offset)

    def test_byte_at_a_time(self):
        """The body fed one byte at a time gives the same parts, and keeps little buffered."""
        scanner = PartScanner(b"XyZ")
        parts = []
        for index in range(len(BODY)):
            parts.extend(scanner.feed(BODY[index:index + 1]))
            self.assertLessEqual(len(scanner._buffer), 256)
        scanner.finish()
        self.assertEqual(parts, parts_of([BODY]))

    def test_body_starting_with_delimiter(self):
        """A body without preamble starts with its first delimiter."""
        parts = parts_of([b"--XyZ\r\n\r\nv\r\n--XyZ--"])
        self.assertEqual([(p.start, p.end) for p in parts], [(9, 10)])

    def test_unterminated(self):
        """A body that ends before its closing delimiter is malformed, wherever it stops."""
        for end in range(len(BODY) - len(b"--\r\nepilogue --XyZ\r\n")):
            self.assertRaises(MultipartError, parts_of, [BODY[:end]])

    def test_malformed_delimiter_line(self):
        """A delimiter followed by anything but -- or blanks and a line end is malformed."""
        self.assertRaises(MultipartError, parts_of, [b"--XyZ\r\n\r\nv\r\n--XyZjunk\r\n\r\n--XyZ--"])
        self.assertRaises(MultipartError, parts_of, [b"--XyZ" + b" " * 2000])

    def test_part_head_too_large(self):
        """A part's header block longer than MAX_PART_HEAD is malformed, before it ends."""
        self.assertRaises(MultipartError, parts_of, [b"--XyZ\r\nA: " + b"a" * MAX_PART_HEAD])


class BoundaryTests(SynchronousTestCase):
    """The boundary comes from the Content-Type."""

    def test_boundaries(self):
        """Plain and quoted boundaries are read; other types, or none, are refused."""
        self.assertEqual(boundary_of("multipart/form-data; boundary=abc"), b"abc")
        self.assertEqual(boundary_of('Multipart/Form-Data; charset=x; boundary="a b;c"'), b"a b;c")
        for bad in (None, "", "application/json", "multipart/form-data", "multipart/form-data; boundary=",
                    "multipart/form-data; boundary=" + "x" * 71):
            self.assertRaises(MultipartError, boundary_of, bad)


class ReadFormTests(SynchronousTestCase):
    """read_form reads only the parts asked for, from a file, in pieces."""

    def test_reads_file_and_field(self):
        """The first file part of the name and the text fields asked for; nothing else."""
        form = read_form(io.BytesIO(BODY), CONTENT_TYPE, "dify_pkg", ("verify_signature",))
        self.assertEqual(form.files, {"dify_pkg": FILE})
        self.assertEqual(form.fields, {"verify_signature": "true"})
        form = read_form(io.BytesIO(BODY), CONTENT_TYPE, "other", ())
        self.assertEqual((form.files, form.fields), ({}, {}))

    def test_file_name_kept(self):
        """The file part's filename is kept (the SRI launch is keyed by it)."""
        form = read_form(io.BytesIO(BODY), CONTENT_TYPE, "dify_pkg", ())
        self.assertEqual(form.filenames, {"dify_pkg": 'a;b "c".difypkg'})

    def test_first_part_wins_and_fields_are_no_files(self):
        """The first file part of a name wins; a part without a filename is not a file."""
        content_type, body = encode_form({"dify_pkg": "text"}, {"dify_pkg": b"one"})
        body = body.replace(b"--\r\n", b"\r\n", 1)[:-len(b"\r\n")]
        body += b'\r\nContent-Disposition: form-data; name="dify_pkg"; filename="x"\r\n\r\ntwo\r\n' + \
            body[:body.index(b"\r\n")] + b"--\r\n"
        form = read_form(io.BytesIO(body), content_type, "dify_pkg", ())
        self.assertEqual(form.files, {"dify_pkg": b"one"})

    def test_streams_from_the_file(self):
        """The body is read in chunk_size pieces, and the file part once, exactly."""
        data = os.urandom(3 * 65536 + 17)
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": data})

        class Recording(io.BytesIO):
            sizes = []

            def read(self, size=-1):
                chunk = super().read(size)
                self.sizes.append((size, len(chunk)))
                return chunk

        stream = Recording(body)
        form = read_form(stream, content_type, "dify_pkg", ("verify_signature",), chunk_size=4096)
        self.assertEqual(form.files["dify_pkg"], data)
        self.assertEqual(form.fields["verify_signature"], "false")
        self.assertEqual([size for size in stream.sizes if size[0] not in (4096,)], [(5, 5), (len(data), len(data))])

    def test_file_too_large_not_read(self):
        """A file part over max_file_size is refused without being read."""
        stream = io.BytesIO(BODY)
        error = self.assertRaises(FileTooLarge, read_form, stream, CONTENT_TYPE, "dify_pkg", (), len(FILE) - 1)
        self.assertIsInstance(error, MultipartError)
        form = read_form(io.BytesIO(BODY), CONTENT_TYPE, "dify_pkg", (), len(FILE))
        self.assertEqual(form.files["dify_pkg"], FILE)

    def test_text_field_bounded(self):
        """A wanted text field longer than MAX_FIELD_SIZE is refused; unwanted ones are never read."""
        content_type, body = encode_form({"verify_signature": "t" * (MAX_FIELD_SIZE + 1)}, {"dify_pkg": b"p"})
        self.assertRaises(MultipartError, read_form, io.BytesIO(body), content_type, "dify_pkg", ("verify_signature",))
        self.assertEqual(read_form(io.BytesIO(body), content_type, "dify_pkg", ()).files, {"dify_pkg": b"p"})

    def test_not_multipart(self):
        """Another content type, or a malformed body, is a MultipartError."""
        self.assertRaises(MultipartError, read_form, io.BytesIO(b"{}"), "application/json", "dify_pkg")
        self.assertRaises(MultipartError, read_form, io.BytesIO(b"junk"), CONTENT_TYPE, "dify_pkg")

    def test_scan_from_start(self):
        """scan reads from the start of the file, wherever its position was."""
        stream = io.BytesIO(BODY)
        stream.seek(0, io.SEEK_END)
        self.assertEqual(len(scan(stream, b"XyZ")), 3)


class ParseFormTests(SynchronousTestCase):
    """parse_form splits a whole body held in memory."""

    def test_fields_and_files(self):
        """Every named part: files by filename, fields decoded as UTF-8; the first of a name wins."""
        form = parse_form(CONTENT_TYPE, BODY)
        self.assertEqual(form.files, {"dify_pkg": FILE})
        self.assertEqual(form.fields, {"verify_signature": "true"})
        content_type, body = encode_form({"a": "é", "b": "x"}, {"file": b"\x00\xff"})
        form = parse_form(content_type, body)
        self.assertEqual((form.fields, form.files), ({"a": "é", "b": "x"}, {"file": b"\x00\xff"}))
