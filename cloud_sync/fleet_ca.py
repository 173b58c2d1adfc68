"""The fleet CA: an offline root, a device-issuing intermediate, certificates and the CRL.

Import path and API::

    from cloud_sync.fleet_ca import FleetCA, init_ca
    paths = init_ca(Path("ca"))              # ca/offline/root.{key,crt}, ca/issuing/ca.{key,crt}
    ca = FleetCA.load(Path("ca"))            # the intermediate only: the root stays offline
    pem = ca.sign_device_csr(csr_pem, "cam-1", days=90)   # CN and SAN URI = the device id
    ca.issue_identity("sync", Path("out"))   # a cloud identity: key and certificate (0600 key)
    ca.crl([(serial, revoked_at), ...])      # the CRL Mosquitto reads (``crlfile``)

Keys are EC P-256 (what AWS IoT Core and every TLS stack take), written 0600 and never printed.
The root signs only the intermediate: after ``init_ca`` its key can leave the machine, and a
leaked intermediate is replaced without touching the trust anchor on every device and broker.
A device certificate says who it is twice: CN (Mosquitto's ``use_identity_as_username``) and a
SAN URI ``urn:edgebento:device:{id}`` (what other TLS stacks match on).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The PEM helpers are pem_files', imported from here too.
from cloud_sync.pem_files import (
    cert_pem,
    check_key,
    load_cert,
    new_key,
    write_private,
    write_public,
)
from modelpack.errors import ConfigError, KeyFileError

DEVICE_URI = "urn:edgebento:device:"
ROOT_DAYS = 3650
ISSUING_DAYS = 1825
DEVICE_DAYS = 90
CRL_DAYS = 30  # a CRL past its nextUpdate makes OpenSSL refuse every client: keep it fresh


@dataclass(frozen=True)
class CaPaths:
    root_key: Path
    root_cert: Path
    issuing_key: Path
    issuing_cert: Path
    bundle: Path  # root + intermediate: the broker's ``cafile`` and the devices' ``ca_file``
    crl: Path


def ca_paths(out: Path) -> CaPaths:
    return CaPaths(
        root_key=out / "offline" / "root.key",
        root_cert=out / "root.crt",
        issuing_key=out / "issuing" / "ca.key",
        issuing_cert=out / "issuing" / "ca.crt",
        bundle=out / "ca-bundle.pem",
        crl=out / "crl.pem",
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgebento fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def backdate_s(validity_s: float) -> float:
    """How far before the moment of issue a certificate's ``not_valid_before`` is set: a device
    clock a little behind; a tenth at most, so that two thirds of a short validity (a test's
    minutes) still fall after the moment of issue. An agent renews at a share of the life from
    ``not_valid_before``, so this moves its renewal earlier (``renewal_budget.check_fits``)."""
    return min(300.0, validity_s / 10)


def _builder(subject: Any, issuer: Any, public_key: Any, days: float, ca: bool) -> Any:
    from cryptography import x509

    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=backdate_s(days * 86400)))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    return builder.add_extension(usage, critical=True)


def init_ca(out: Path, name: str = "edgebento fleet", force: bool = False) -> CaPaths:
    """A root (10 years) and a device-issuing intermediate (5 years) under ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    paths = ca_paths(out)
    if paths.root_key.exists() and not force:
        raise ConfigError(f"{out} already holds a fleet CA (its root key is {paths.root_key})")
    root_key, issuing_key = new_key(), new_key()
    root_name, issuing_name = _name(f"{name} root CA"), _name(f"{name} issuing CA")
    root = (
        _builder(root_name, root_name, root_key.public_key(), ROOT_DAYS, ca=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    issuing = (
        _builder(issuing_name, root_name, issuing_key.public_key(), ISSUING_DAYS, ca=True)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    write_private(paths.root_key, root_key)
    write_private(paths.issuing_key, issuing_key)
    write_public(paths.root_cert, cert_pem(root))
    write_public(paths.issuing_cert, cert_pem(issuing))
    write_public(paths.bundle, cert_pem(issuing) + cert_pem(root))
    ca = FleetCA(paths, issuing_key, issuing)
    write_public(paths.crl, ca.crl([]))
    return paths


class FleetCA:
    """The issuing intermediate: signs device CSRs and cloud identities, and the CRL."""

    def __init__(self, paths: CaPaths, key: Any, cert: Any) -> None:
        self.paths, self.key, self.cert = paths, key, cert

    @classmethod
    def load(cls, out: Path) -> FleetCA:
        from cryptography.hazmat.primitives import serialization

        paths = ca_paths(out)
        try:
            key = serialization.load_pem_private_key(paths.issuing_key.read_bytes(), None)
            cert = load_cert(paths.issuing_cert.read_bytes())
        except OSError as exc:
            raise KeyFileError(f"no fleet CA in {out}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise KeyFileError(f"the issuing key in {out} cannot be read: {exc}") from exc
        return cls(paths, key, cert)

    def sign_record(self, data: bytes) -> str:
        """The issuing key's signature (base64) over ``data``: a record of the store (a claim)
        that a writer to the store without this key cannot make or widen."""
        import base64

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return base64.b64encode(self.key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()

    def verify_record(self, data: bytes, signature: str | None) -> bool:
        import base64

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        if not signature:
            return False
        try:
            raw = base64.b64decode(signature, validate=True)
            self.cert.public_key().verify(raw, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def checked_crl(self, data: bytes, what: object = "the CRL") -> Any:
        """The CRL in ``data`` (PEM) if this CA signed it; ConfigError saying why not. Read a
        CRL file once and take everything from the object this returns: a second read of the
        file is of whatever was put there meanwhile, checked by nobody."""
        from cryptography import x509

        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError as exc:
            raise ConfigError(f"{what}: no CRL to read ({exc})") from exc
        if not crl.is_signature_valid(self.cert.public_key()):
            raise ConfigError(f"{what} is not signed by the fleet CA")
        return crl

    def crl_entries(self, path: Path) -> dict[int, dt.datetime]:
        """What the CRL at ``path`` lists (serial: revocation date), if this CA signed it."""
        try:
            crl = self.checked_crl(path.read_bytes(), path)
        except OSError as exc:
            raise ConfigError(f"{path}: no CRL to read ({exc})") from exc
        return {r.serial_number: r.revocation_date_utc for r in crl}

    @property
    def chain(self) -> bytes:
        """What a device keeps beside its certificate: the intermediate, then the root."""
        return self.paths.bundle.read_bytes()

    def _issue(self, common_name: str, public_key: Any, days: float, extra: list[Any]) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        builder = (
            _builder(_name(common_name), self.cert.subject, public_key, days, ca=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        for ext in extra:
            if ext == "server":
                usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            else:
                builder = builder.add_extension(ext, critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def check_device_csr(self, csr_pem: bytes, device: str) -> Any:
        """The CSR's public key; ConfigError when its signature is bad or it names anything but
        CN = ``device`` (a request for another device is never signed)."""
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise ConfigError(f"not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise ConfigError("the request's signature does not match its key")
        check_key(csr.public_key())
        names = [(a.oid, a.value) for a in csr.subject]
        if names != [(NameOID.COMMON_NAME, device)]:
            subject = csr.subject.rfc4514_string()
            raise ConfigError(f"the request's subject is {subject!r}, not CN={device}")
        return csr.public_key()

    def sign_device_csr(self, csr_pem: bytes, device: str, days: float = DEVICE_DAYS) -> Any:
        """A certificate for ``device`` from its CSR (checked by ``check_device_csr``)."""
        from cryptography import x509

        public_key = self.check_device_csr(csr_pem, device)
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(DEVICE_URI + device)])
        return self._issue(device, public_key, days, [san])

    def issue_identity(
        self, name: str, out: Path, days: float = 365, hosts: Iterable[str] = ()
    ) -> tuple[Path, Path]:
        """A key and certificate for a cloud identity (``sync``, ``enroll``, ``claim``...), or a
        broker's server certificate with ``hosts`` (IP addresses or DNS names)."""
        import ipaddress

        from cryptography import x509

        key = new_key()
        extra: list[Any] = []
        hosts = list(hosts)
        if hosts:
            alt: list[Any] = []
            for host in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alt.append(x509.DNSName(host))
            extra = [x509.SubjectAlternativeName(alt), "server"]
        cert = self._issue(name, key.public_key(), days, extra)
        key_path, cert_path = out / f"{name}.key", out / f"{name}.crt"
        write_private(key_path, key)
        write_public(cert_path, cert_pem(cert))
        return cert_path, key_path

    def crl(
        self,
        revoked: Iterable[tuple[int, dt.datetime]],
        days: float = CRL_DAYS,
        number: int = 0,
        extensions: Iterable[Any] = (),
    ) -> bytes:
        """The CRL, its CRLNumber ``number`` (``cloud_sync.crl_disk``: the index generation),
        with ``extensions`` (non-critical: ``crl_disk``'s ledger)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        for serial, when in revoked:
            entry = (
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self.key, hashes.SHA256())
        return bytes(crl.public_bytes(serialization.Encoding.PEM))


def tls_context(ca_file: Path, cert_file: Path | None, key_file: Path | None) -> Any:
    """A client's TLS context: the fleet's CA bundle and, for mTLS, its certificate and key."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx
