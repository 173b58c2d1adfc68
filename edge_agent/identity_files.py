"""The files of a device's identity under ``{data_dir}/identity/``: its key and certificate,
the next ones during a rotation, ``status.json``; and the check of an enrollment's answer
before it replaces them (split from ``edge_agent.identity``).

Import path and API::

    from edge_agent.identity_files import IdentityFiles, check_answer
    files = IdentityFiles(data_dir / "identity")
    files.install(cert_pem, "cam-1", key.public_key())   # AuthError unless ours: CN and key
    files.write_status("valid", serial=...)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.fleet_ca import load_cert, write_public
from modelpack import untrusted_json
from modelpack.errors import AuthError, ConfigError


@dataclass(frozen=True)
class IdentityFiles:
    dir: Path

    @property
    def key(self) -> Path:
        return self.dir / "device.key"

    @property
    def cert(self) -> Path:
        return self.dir / "device.crt"

    @property
    def next_key(self) -> Path:
        return self.dir / "next.key"

    @property
    def next_cert(self) -> Path:
        return self.dir / "next.crt"

    @property
    def status(self) -> Path:
        return self.dir / "status.json"

    def finish_swap(self) -> None:
        """A rotation that stopped between the new certificate and the swap is completed."""
        if self.next_key.exists() and self.next_cert.exists():
            os.replace(self.next_key, self.key)
            os.replace(self.next_cert, self.cert)

    def install(self, cert_pem: str, device: str, public_key: Any) -> None:
        """The answered certificate in place of the current one, once it is for this device
        and the key just made: a wrong answer (a faulty or hostile enrollment service) must
        not replace a working identity with one that cannot connect."""
        check_answer(cert_pem, device, public_key)
        write_public(self.next_cert, cert_pem.encode())
        self.finish_swap()

    def read_status(self) -> dict[str, Any]:
        try:
            doc = untrusted_json.loads(self.status.read_bytes())
        except (OSError, untrusted_json.NotJsonError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def write_status(self, state: str, **fields: Any) -> None:
        """``status.json``, which the agent's MQTT status carries (``identity``): the state, the
        facts of the certificate on disk, and what earlier writes said that still holds."""
        previous = self.read_status()
        doc: dict[str, Any] = {"schema_version": 1, "state": state, "ts": time.time()}
        doc.update({k: previous[k] for k in KEPT_STATUS if k in previous})
        if self.cert.exists():
            try:
                doc.update(cert_facts(self.cert))
            except (OSError, ValueError, ConfigError) as exc:
                doc["reason"] = f"the certificate on disk cannot be read: {exc}"
        write_public(self.status, json.dumps({**doc, **fields}).encode())


def check_answer(cert_pem: str, device: str, public_key: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    def spki(key: Any) -> bytes:
        return bytes(
            key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    try:
        cert = load_cert(cert_pem.encode())
    except ConfigError as exc:
        raise AuthError(f"the enrollment answer is not a certificate: {exc}") from exc
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device]:
        raise AuthError(f"the enrollment answer is a certificate for {names}, not {device}")
    if spki(cert.public_key()) != spki(public_key):
        raise AuthError("the enrollment answer is a certificate for another key than ours")


# Written once and true until the next such event: kept by every later write of status.json.
KEPT_STATUS = ("enrolled", "last_rotation", "renew_after")


def cert_facts(path: Path) -> dict[str, Any]:
    """What an operator reads of a certificate: serial (hex), validity and issuer."""
    cert = load_cert(path.read_bytes())
    return {
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "issuer": cert.issuer.rfc4514_string(),
    }


def cert_window(path: Path) -> tuple[float, float, str]:
    cert = load_cert(path.read_bytes())
    return (
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
        format(cert.serial_number, "x"),
    )
