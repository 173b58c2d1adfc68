"""Revoking a device: the store, the CRL Mosquitto reads, a reload, and its live session.

Import path and API::

    from cloud_sync.revocation import publish_crl, revoke_device, kick_session
    publish_crl(ca, ids, crl_path, broker_pid=1234)     # cloud_sync.crl_publish's: write, SIGHUP
    revoke_device(ids, ca, "cam-3", crl_path, broker_pid, broker=("127.0.0.1", 8883))
    revoke_certificate(ids, ca, claim_crt, crl_path, broker_pid, broker)  # the claim's, say

Measured on Debian's Mosquitto 2.0.11 (tests/integration/test_identity_enrollment.py): a SIGHUP
re-reads ``crlfile``, so a revoked certificate can no longer connect, but a session that is
already connected stays connected and keeps publishing. So the revocation also takes the session
over: it connects with a throw-away certificate for the same CN (two minutes, key in memory
only), which under ``use_username_as_clientid`` is the same client id, so Mosquitto drops the
device's connection; it connects with a clean start and a session expiry of 0, so what the
broker queued for the device is discarded too. Every other device stays connected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cloud_sync.crl_publish import hang_up as _hang_up
from cloud_sync.crl_publish import publish_crl
from cloud_sync.fleet_ca import ISSUING_DAYS, FleetCA, cert_pem, load_cert, new_key
from cloud_sync.identity_store import DeviceIdentity, IdentityStore
from modelpack.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)
KICK_CERT_S = 120


def _ephemeral(ca: FleetCA, common_name: str) -> tuple[ssl.SSLContext, int]:
    """A TLS context with a two-minute certificate for ``common_name`` (key in memory only)."""
    from cryptography.hazmat.primitives import serialization

    key = new_key()
    cert = ca._issue(common_name, key.public_key(), KICK_CERT_S / 86400, [])
    with tempfile.TemporaryDirectory() as tmp:
        # ssl takes a chain from files only: a private directory, deleted on return.
        cert_file, key_file = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
        cert_file.write_bytes(cert_pem(cert))
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx = ssl.create_default_context(cafile=str(ca.paths.bundle))
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx, int(cert.serial_number)


def _connect(
    ctx: ssl.SSLContext,
    client_id: str,
    host: str,
    port: int,
    timeout: float,
    last_words: tuple[str, bytes] | None = None,
) -> bool:
    """True once the broker accepted a connection with ``ctx``; ``last_words`` (topic,
    payload) are published retained before it disconnects."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.tls_set_context(ctx)
    answered, accepted = threading.Event(), threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            accepted.set()
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_a: answered.set()
    try:
        client.connect(host, port, keepalive=10, clean_start=True)
    except ssl.SSLError:
        return False  # refused in the handshake: a revoked certificate
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        answered.wait(timeout)
        if accepted.is_set() and last_words is not None:
            info = client.publish(last_words[0], last_words[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        return accepted.is_set()
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


def kick_session(
    ca: FleetCA, device: str, host: str, port: int, timeout: float = 10.0, prefix: str = "edgebento"
) -> bool:
    """Take over ``device``'s session (see the module's docstring); True once the broker took
    the throw-away connection, which means it dropped the device's. Its retained status says
    ``offline``, so that nothing in the cloud counts a revoked device as still connected."""
    from cloud_sync.protocol import Status, Topics

    ctx, _serial = _ephemeral(ca, device)
    offline = Status(device=device, state="offline").model_dump_json(exclude_none=True)
    words = (Topics(prefix).status(device), offline.encode())
    return _connect(ctx, device, host, port, timeout, words)


def _reloaded(
    ids: IdentityStore,
    ca: FleetCA,
    crl_path: Path,
    broker_pid: int | Path | None,
    broker: tuple[str, int],
    timeout: float,
    extra: dict[int, float] | None = None,
    devices: dict[str, float] | None = None,
) -> None:
    """The CRL written, and the broker running on it: a probe certificate is revoked in the same
    CRL, and the broker has reloaded when the probe is refused.

    While the probe is still taken, the broker is signalled again: Mosquitto notes a SIGHUP in
    a flag that it clears after its reload, so a SIGHUP that comes while it reloads (another
    writer's CRL, a moment before) is lost, and a CRL written after its reload read the file
    waited for the next one (seen once in CI: a revocation that never took)."""
    probe, probe_serial = _ephemeral(ca, "revocation-probe")
    listed = {probe_serial: time.time() + KICK_CERT_S, **(extra or {})}
    # Signalled by the writer, also when its write fails after it put the last good copy back.
    publish_crl(ca, ids, crl_path, broker_pid, extra=listed, devices=devices)
    deadline = time.monotonic() + timeout
    while _connect(probe, "revocation-probe", *broker, timeout=timeout):
        if time.monotonic() > deadline:
            raise BrokerError(f"the broker at {broker[0]}:{broker[1]} did not reload its CRL")
        time.sleep(0.1)
        _hang_up(broker_pid)


def revoke_device(
    ids: IdentityStore,
    ca: FleetCA,
    device: str,
    crl_path: Path,
    broker_pid: int | Path | None,
    broker: tuple[str, int] | None,
    timeout: float = 10.0,
    prefix: str = "edgebento",
) -> tuple[DeviceIdentity, bool]:
    """Revoked in the store, in the CRL, reloaded, and its session dropped (if ``broker``).

    The session is taken over only once the broker runs on the new CRL (``_reloaded``), or the
    device could come straight back. Its certificates go into this CRL whatever the store's
    index says (one that does not verify is not written to), and the device into its ledger
    (``cloud_sync.crl_disk``), so that a claim issued before now is refused whatever the
    bucket's record says or lost."""
    doc = ids.revoke(device)
    now = time.time()
    serials = {int(c.serial, 16): c.not_after for c in doc.certificates if c.not_after > now}
    named = {device: doc.revoked_at or now}  # the CRL's ledger: no older claim re-enrolls it
    if broker is None:
        publish_crl(ca, ids, crl_path, broker_pid, extra=serials, devices=named)
        return doc, False
    _reloaded(ids, ca, crl_path, broker_pid, broker, timeout, extra=serials, devices=named)
    kicked = kick_session(ca, device, *broker, timeout=timeout, prefix=prefix)
    log.info("%s revoked; live session %s", device, "dropped" if kicked else "not dropped")
    return doc, kicked


def revoke_certificate(
    ids: IdentityStore,
    ca: FleetCA,
    cert_pem_bytes: bytes,
    crl_path: Path,
    broker_pid: int | Path | None,
    broker: tuple[str, int] | None,
    timeout: float = 10.0,
) -> tuple[str, bool]:
    """A certificate that is no device's (the shared claim certificate that leaked, a cloud
    identity's) into the CRL, the broker reloaded; its CN, and whether a live session on the
    device listener was taken over (client id = CN there). On the claim listener client ids
    are the client's own, so a live claim connection is not dropped: it only lasts one
    enrollment, and every new one is refused in the handshake."""
    from cryptography.exceptions import InvalidSignature

    cert = load_cert(cert_pem_bytes)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError("that certificate was not issued by this fleet CA") from exc
    name = peer_identity(cert)
    until = cert.not_valid_after_utc.timestamp()
    if not revoke_serial(ids, ca, cert.serial_number, crl_path, broker_pid, broker, timeout, until):
        return name, False
    assert broker is not None
    kicked = _connect(_ephemeral(ca, name)[0], name, *broker, timeout=timeout)
    log.info("certificate %x of %s revoked", cert.serial_number, name)
    return name, kicked


def revoke_serial(
    ids: IdentityStore,
    ca: FleetCA,
    serial: int,
    crl_path: Path,
    broker_pid: int | Path | None,
    broker: tuple[str, int] | None,
    timeout: float = 10.0,
    not_after: float | None = None,
) -> bool:
    """A certificate known by its serial alone (``fleet revoke --serial``: its file is lost, a
    device's record was spoiled) into the CRL, listed until ``not_after`` or, not known, until
    the issuing key expires; whether the broker was seen to reload. Listing a serial this CA
    never issued costs nothing."""
    until = not_after or time.time() + ISSUING_DAYS * 86400.0
    ids.revoke_serial(serial, until)
    if broker is None:
        publish_crl(ca, ids, crl_path, broker_pid, extra={serial: until})
        return False
    _reloaded(ids, ca, crl_path, broker_pid, broker, timeout, extra={serial: until})
    return True


def peer_identity(cert: Any) -> str:
    """The CN a certificate names (what Mosquitto takes as the user name)."""
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
