"""
Package signatures (``runtimes.md`` §5.5): RSA PKCS#1 v1.5 with SHA-256 over
the SHA-256 of every entry in zip order followed by the decimal signing time;
the signature travels in the zip comment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.resources
import io
import json
import re
import zipfile
from collections.abc import Iterable

from attrs import frozen
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from difydaemon.packaging.archive import PackageFiles, read_package

VERIFICATION_FILE = ".verification.dify.json"
AUTHORIZED_CATEGORIES = ("langgenius", "partner", "community")

_PUBLIC_PEM = re.compile(
    rb"\A\s*(-----BEGIN RSA PUBLIC KEY-----\r?\n[A-Za-z0-9+/=\r\n]+-----END RSA PUBLIC KEY-----)(.*)\Z",
    re.DOTALL,
)
_PRIVATE_PEM = re.compile(
    rb"\A\s*(-----BEGIN RSA PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]+-----END RSA PRIVATE KEY-----)(.*)\Z",
    re.DOTALL,
)
# Signing re-reads a whole package in memory; bundles hold packages of up to
# 12 x 50 MB, so the limit here only guards against nonsense.
_SIGN_MAX_SIZE = 12 * 52428800


@frozen
class Verification:
    """
    The outcome of a successful verification.

    :ivar authorized_category: ``langgenius``, ``partner`` or ``community``.
    """

    authorized_category: str

    def to_json(self) -> dict:
        """The wire shape, ``{"authorized_category": ...}``."""
        return {"authorized_category": self.authorized_category}


def load_public_key(pem_bytes: bytes) -> rsa.RSAPublicKey:
    """
    Load a PKCS#1 ``RSA PUBLIC KEY`` PEM block, as the Go daemon does.

    :raises ValueError: for SPKI ``PUBLIC KEY`` blocks, other key types, bad
        encodings and anything but whitespace after the block.
    """
    match = _PUBLIC_PEM.match(pem_bytes)
    if match is None:
        raise ValueError("not a PKCS#1 RSA PUBLIC KEY PEM block")
    if match.group(2).strip():
        raise ValueError("unexpected data after the RSA PUBLIC KEY PEM block")
    key = serialization.load_pem_public_key(match.group(1) + b"\n")
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def _load_private_key(pem_bytes: bytes) -> rsa.RSAPrivateKey:
    match = _PRIVATE_PEM.match(pem_bytes)
    if match is None:
        raise ValueError("not a PKCS#1 RSA PRIVATE KEY PEM block")
    if match.group(2).strip():
        raise ValueError("unexpected data after the RSA PRIVATE KEY PEM block")
    key = serialization.load_pem_private_key(match.group(1) + b"\n", password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def official_public_key() -> rsa.RSAPublicKey:
    """The langgenius public key embedded in the Go daemon."""
    pem = importlib.resources.files("difydaemon.packaging").joinpath("keys/official.pem").read_bytes()
    return load_public_key(pem)


def generate_key_pair(bits: int = 4096) -> tuple[bytes, bytes]:
    """
    A new RSA key pair as ``(private PEM, public PEM)``, both PKCS#1, as
    ``dify signature generate`` writes them.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    return private_pem, public_pem


def _signed_data(contents: Iterable[bytes], signing_time: int) -> bytes:
    buffer = bytearray()
    for content in contents:
        buffer += hashlib.sha256(content).digest()
    buffer += str(signing_time).encode("ascii")
    return bytes(buffer)


def _parse_comment(comment: bytes) -> tuple[bytes, int] | None:
    try:
        document = json.loads(comment.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    signature = document.get("signature")
    signing_time = document.get("time")
    if not isinstance(signature, str) or not signature:
        return None
    if isinstance(signing_time, bool) or not isinstance(signing_time, int):
        return None
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw, signing_time


def _read_category(files: PackageFiles) -> str | None:
    content = files.get(VERIFICATION_FILE)
    if content is None:
        # Packages signed before the file existed are all langgenius's.
        return "langgenius"
    try:
        document = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    category = document.get("authorized_category")
    return category if category in AUTHORIZED_CATEGORIES else None


def verify_package(files: PackageFiles, public_keys: Iterable[rsa.RSAPublicKey]) -> Verification | None:
    """
    Check the signature in the zip comment against each key.

    :returns: the verification when any key matches, otherwise None (an
        empty or unreadable comment, or a bad verification file, is simply
        not verified).
    """
    parsed = _parse_comment(files.comment)
    if parsed is None:
        return None
    signature, signing_time = parsed
    data = _signed_data((content for _, content in files.entries), signing_time)
    for key in public_keys:
        try:
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        category = _read_category(files)
        return Verification(category) if category is not None else None
    return None


def sign_package(data: bytes, private_key_pem: bytes, authorized_category: str, now: int) -> bytes:
    """
    A signed copy of a package zip.

    Entries keep their order and bytes; a previous ``.verification.dify.json``
    is replaced by one naming ``authorized_category``; the comment carries
    ``{"signature","time"}`` for time ``now`` (unix seconds).

    :raises ValueError: bad key or unknown category.
    """
    if authorized_category not in AUTHORIZED_CATEGORIES:
        raise ValueError(f"unknown authorized category: {authorized_category!r}")
    key = _load_private_key(private_key_pem)
    files = read_package(data, _SIGN_MAX_SIZE)
    entries = [(name, content) for name, content in files.entries if name != VERIFICATION_FILE]
    verification = json.dumps({"authorized_category": authorized_category}, separators=(",", ":")).encode()
    entries.append((VERIFICATION_FILE, verification))

    signing_time = int(now)
    signature = key.sign(
        _signed_data((content for _, content in entries), signing_time), padding.PKCS1v15(), hashes.SHA256()
    )
    comment = json.dumps(
        {"signature": base64.b64encode(signature).decode("ascii"), "time": signing_time}, separators=(",", ":")
    ).encode()

    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, content)
        archive.comment = comment
    return output.getvalue()
