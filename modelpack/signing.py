"""ed25519 keys and signatures over the exact manifest bytes. The algorithm is fixed."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelpack.errors import KeyFileError, SignatureError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_SIZE = 64
# An ed25519 SubjectPublicKeyInfo in DER is this fixed header, then the 32-byte key (RFC 8410).
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    key_id: str  # first 16 hex digits of sha256 over the raw public key
    source: str


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into out_dir."""
    from cryptography.hazmat.primitives import serialization

    out_dir.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    if key_path.exists():
        raise KeyFileError(f"{key_path} exists already; refusing to overwrite a signing key")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an ed25519 private key")
    return key


def _ed25519_from_pem(pem: bytes) -> Ed25519PublicKey | None:
    """The key in the PEM that ``generate_keypair`` writes, read without cryptography's
    serialization package: importing it pulls in SSH keys, ciphers and bcrypt, 1.3 MB that a
    device holds for nothing. None for any other text, which ``load_public_key`` hands to the
    full parser (to read, or to refuse with its reason)."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----":
        return None
    if lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        return None
    return Ed25519PublicKey.from_public_bytes(der[len(_ED25519_SPKI) :])


def load_public_key(path: Path | str) -> TrustedKey:
    try:
        pem = Path(path).read_bytes()
        key: object = _ed25519_from_pem(pem)
        if key is None:
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_public_key(pem)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:  # an unknown key OID
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an ed25519 public key")
    return TrustedKey(key=key, key_id=key_id(key), source=str(path))


def trusted_keys(items: Iterable[Path | str | TrustedKey]) -> list[TrustedKey]:
    return [k if isinstance(k, TrustedKey) else load_public_key(k) for k in items]


def sign(data: bytes, private: Ed25519PrivateKey) -> bytes:
    return private.sign(data)


def verify(data: bytes, signature: bytes, trusted: Iterable[TrustedKey]) -> TrustedKey:
    """Return the trusted key that made ``signature`` over ``data``, or raise SignatureError."""
    keys = list(trusted)
    if not keys:
        raise SignatureError("no trusted public key was given to verify the pack against")
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(
            f"manifest.sig is {len(signature)} bytes; an ed25519 signature is {SIGNATURE_SIZE}"
        )
    for candidate in keys:
        try:
            candidate.key.verify(signature, data)
        except InvalidSignature:
            continue
        return candidate
    ids = ", ".join(k.key_id for k in keys)
    raise SignatureError(
        f"manifest.sig does not verify against any trusted key ({ids}): "
        "the manifest was changed after signing or was signed by another key"
    )
