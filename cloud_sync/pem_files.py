"""Keys and certificates as PEM files: made, written (keys 0600, never world-readable) and read.

Import path and API (also importable from ``cloud_sync.fleet_ca``, which uses them)::

    from cloud_sync.pem_files import cert_pem, check_key, load_cert, new_key, write_private
    from cloud_sync.pem_files import write_public
    key = new_key()                       # EC P-256
    write_private(Path("d.key"), key)     # created 0600, renamed into place
    write_public(Path("crl.pem"), data)   # through a temporary file of this writer's own
    check_key(csr.public_key())           # ConfigError unless EC P-256/P-384 or RSA >= 2048

Both writers put the bytes in a temporary file, fsync it, rename it into place and fsync the
directory: a power cut after the call leaves the new file whole (not an empty or half-written
one under the final name, as a rename that reaches the disk before the data can on ext4 and
XFS), and the rename itself survives it. A CRL that the broker cannot read runs it without a
CRL check after its next SIGHUP (``cloud_sync.crl_disk``).
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
    _durably(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), data, tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of this writer's own: two writers of one file (the enrollment service's
    # CRL refresh and a `fleet revoke`) sharing one would rename each other's half-written bytes.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    _durably(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), data, tmp, path)


def _durably(fd: int, data: bytes, tmp: Path, path: Path) -> None:
    """``data`` through ``fd`` (``tmp``, open for writing) to ``path``: written, fsynced,
    renamed into place, and the directory fsynced (see the module's docstring)."""
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


EC_CURVES = ("secp256r1", "secp384r1")
RSA_MIN_BITS = 2048


def check_key(public_key: Any) -> None:
    """A device key the fleet accepts: EC P-256 or P-384, or RSA of 2048 bits or more (what
    OpenSSL's default security level and AWS IoT Core take); nothing weaker is certified."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in EC_CURVES:
            raise ConfigError(f"the request's key is on {public_key.curve.name}, not P-256/P-384")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < RSA_MIN_BITS:
            raise ConfigError(f"the request's key is RSA-{public_key.key_size}, under 2048 bits")
    else:
        raise ConfigError(f"the request's key is a {type(public_key).__name__}: EC or RSA only")


def cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_cert(data: bytes) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
