"""ed25519 keys and signatures over the exact manifest bytes. The algorithm is fixed.

Reading a public key and naming it needs no cryptography: a ``TrustedKey`` holds the key's 32
raw bytes. Only verifying and signing import it, and a process that must not hold it (the edge
agent: 1.8 MB of a device's memory, for a check made once per update) calls
``verify_out_of_process()``: each check then runs in a short-lived child, ``signature_child``,
over bytes this process hands it and keeps, so what the child vouched for is exactly what the
caller goes on to parse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelpack.errors import KeyFileError, SignatureError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_SIZE = 64
# An ed25519 SubjectPublicKeyInfo in DER is this fixed header, then the 32-byte key (RFC 8410).
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_CHILD = Path(__file__).with_name("signature_child.py")
# A safety net only: the child starts Python and imports cryptography (about 0.2 s here).
_CHILD_TIMEOUT_S = 120.0
_out_of_process = False


@dataclass(frozen=True, init=False)
class TrustedKey:
    raw: bytes  # the 32-byte ed25519 public key
    key_id: str  # first 16 hex digits of sha256 over the raw public key
    source: str

    def __init__(self, key: Ed25519PublicKey | bytes, key_id: str, source: str) -> None:
        object.__setattr__(self, "raw", key if isinstance(key, bytes) else _raw_public(key))
        object.__setattr__(self, "key_id", key_id)
        object.__setattr__(self, "source", source)

    @property
    def key(self) -> Ed25519PublicKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(self.raw)


def verify_out_of_process(enabled: bool = True) -> None:
    """Check every signature of this process in a child (see the module's docstring)."""
    global _out_of_process
    _out_of_process = enabled


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def key_id(key: Ed25519PublicKey | bytes) -> str:
    raw = key if isinstance(key, bytes) else _raw_public(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into out_dir."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an ed25519 private key")
    return key


def _ed25519_from_pem(pem: bytes) -> bytes | None:
    """The raw key in the PEM that ``generate_keypair`` writes, read without cryptography: its
    serialization package alone pulls in SSH keys, ciphers and bcrypt, 1.3 MB that a device
    holds for nothing. None for any other text, which ``load_public_key`` hands to the full
    parser (to read, or to refuse with its reason)."""
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
    return der[len(_ED25519_SPKI) :]


def load_public_key(path: Path | str) -> TrustedKey:
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc
    raw = _ed25519_from_pem(pem)
    if raw is None:
        raw = _raw_from_full_parser(pem, path)
    return TrustedKey(key=raw, key_id=key_id(raw), source=str(path))


def _raw_from_full_parser(pem: bytes, path: Path | str) -> bytes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # an unknown key OID
        raise KeyFileError(f"cannot read public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an ed25519 public key")
    return _raw_public(key)


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
    found = _verify_in_child if _out_of_process else _verify_here
    signer = found(data, signature, keys)
    if signer is not None:
        return signer
    ids = ", ".join(k.key_id for k in keys)
    raise SignatureError(
        f"manifest.sig does not verify against any trusted key ({ids}): "
        "the manifest was changed after signing or was signed by another key"
    )


def _verify_here(data: bytes, signature: bytes, keys: list[TrustedKey]) -> TrustedKey | None:
    from cryptography.exceptions import InvalidSignature

    for candidate in keys:
        try:
            candidate.key.verify(signature, data)
        except InvalidSignature:
            continue
        return candidate
    return None


def _verify_in_child(data: bytes, signature: bytes, keys: list[TrustedKey]) -> TrustedKey | None:
    """The same check in ``signature_child``, fed ``data`` on its stdin: the child reads no
    file, so nothing written to the disk meanwhile can change what it vouched for. -I: neither
    the environment nor the working directory chooses the code that runs."""
    request = json.dumps(
        {
            "data": base64.b64encode(data).decode(),
            "signature": base64.b64encode(signature).decode(),
            "keys": [k.raw.hex() for k in keys],
        }
    ).encode()
    try:
        done = subprocess.run(
            [sys.executable, "-I", str(_CHILD)],
            input=request,
            capture_output=True,
            timeout=_CHILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _verify_here_instead(data, signature, keys, str(exc))
    answer = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0 or not answer.lstrip("-").isdigit():
        why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no answer"])[-1]
        return _verify_here_instead(data, signature, keys, why)
    index = int(answer)
    return keys[index] if 0 <= index < len(keys) else None


def _verify_here_instead(
    data: bytes, signature: bytes, keys: list[TrustedKey], why: str
) -> TrustedKey | None:
    """The child did not answer (no memory to start it, a broken install): the same check in
    this process, which then holds cryptography, rather than a device that serves nothing
    because a fork failed at boot."""
    log.warning("the signature checker did not run (%s); checking in this process", why)
    try:
        return _verify_here(data, signature, keys)
    except ImportError as exc:
        raise SignatureError(f"cannot check the signature: {exc}") from exc
