"""Keys and certificates as PEM files: made, written (keys 0600, never world-readable) and read.

Import path and API (also importable from ``cloud_sync.fleet_ca``, which uses them)::

    from cloud_sync.pem_files import cert_pem, load_cert, new_key, write_private, write_public
    key = new_key()                       # EC P-256
    write_private(Path("d.key"), key)     # created 0600, renamed into place
    write_public(Path("crl.pem"), data)   # through a temporary file of this writer's own
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from modelpack.errors import ConfigError


def new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def write_private(path: Path, key: Any) -> None:
    """The key in PEM, created 0600 (never world-readable, not even for a moment)."""
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of this writer's own: two writers of one file (the enrollment service's
    # CRL refresh and a `fleet revoke`) sharing one would rename each other's half-written bytes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_cert(data: bytes) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
