"""When a renewed device's old certificate is retired (goes into the CRL): once the device
shows that it holds the new one, never when the new one is merely signed.

Import path and API (pure: a device's record in, the changed record out; ``IdentityStore``
writes them)::

    from cloud_sync.identity_rotation import issued, rotated, settled, ROTATION_GRACE_S
    doc = issued(doc, cert_record, via="renew", now=now)   # pending: the old one still valid
    doc = rotated(doc, serial, now)     # the device runs with ``serial``: the others retired
    doc = settled(doc, now, grace_s)    # no word after grace_s: the newest becomes current

Why: a renewal's answer can be lost (the broker restarts, the device drops off, the service
crashes after writing the record). Retired when it was signed, the old certificate went into
the next CRL while the device still ran with it: the broker refused the device, which then
needed a new claim token. So a renewal adds the new certificate as ``pending`` and ``current``
stays the one the device runs with; the device says ``rotated`` (``cloud_sync.enroll``) over a
connection made with the new certificate, and only then are the old one and any other pending
one (answers it never received) retired. The device id comes from the topic, which the broker's
ACL ties to the certificate's CN: it cannot tell which of its certificates the device used, so
``rotated`` (sent by the agent only once it has connected with the new certificate) is the sign.

If the device never says so (its ``rotated`` lost, an agent that does not send it), the record
is settled after ``ROTATION_GRACE_S`` (7 days): the newest certificate issued becomes current
and the others are retired, at the next renewal, rotation or CRL refresh. A device whose
renewal answers were all lost for that long then needs a claim; one that got its answer is on
the new certificate long before (the agent retries a failed renewal within 5 minutes). A
renewed certificate's predecessor has a third of its life left (90-day certificates renew at
two thirds), so 7 days keeps a stolen old key usable for at most 7 days past a renewal whose
device stays silent, instead of to its expiry.
"""

from __future__ import annotations

from cloud_sync.identity_records import CertRecord, DeviceIdentity

ROTATION_GRACE_S = 7 * 86400.0
MAX_PENDING = 10  # renewals answered and unconfirmed; an older one is retired
_KEPT_CERTIFICATES, _KEPT_RETIRED = 20, 50


def _retire(doc: DeviceIdentity, serials: list[str]) -> list[str]:
    retired = [*doc.retired, *(s for s in serials if s not in doc.retired)]
    return retired[-_KEPT_RETIRED:]


def issued(doc: DeviceIdentity, record: CertRecord, via: str, now: float) -> DeviceIdentity:
    """``doc`` with the certificate ``record`` just issued (``via`` claim or renew). A claim
    makes it current at once (the device has nothing else); a renewal leaves it pending. A
    revoked device enrolled again by claim keeps its old certificates in the CRL."""
    certificates = [*doc.certificates[-(_KEPT_CERTIFICATES - 1) :], record]
    if doc.revoked:  # only a claim gets here: its old certificates stay listed till expiry
        retired = _retire(doc, [c.serial for c in doc.certificates])
        return doc.model_copy(
            update={
                "certificates": certificates,
                "current": record.serial,
                "pending": [],
                "retired": retired,
                "revoked": False,
                "revoked_at": None,
            }
        )
    if via != "renew" or doc.current is None:
        return doc.model_copy(update={"certificates": certificates, "current": record.serial})
    pending = [*doc.pending, record.serial]
    over = pending[:-MAX_PENDING]  # renewed again and again, none confirmed: never received
    return doc.model_copy(
        update={
            "certificates": certificates,
            "pending": pending[-MAX_PENDING:],
            "retired": _retire(doc, over),
            "last_rotation": now if over else doc.last_rotation,
        }
    )


def rotated(doc: DeviceIdentity, serial: str, now: float) -> DeviceIdentity:
    """``doc`` once the device shows it runs with ``serial`` (its current certificate or a
    pending one): every other of them is retired. ValueError for a serial that is neither."""
    held = [s for s in (doc.current, *doc.pending) if s is not None]
    if serial not in held:
        raise ValueError(f"{serial} is not a certificate the device may run with")
    if serial == doc.current and not doc.pending:
        return doc
    return doc.model_copy(
        update={
            "current": serial,
            "pending": [],
            "retired": _retire(doc, [s for s in held if s != serial]),
            "last_rotation": now if serial != doc.current else doc.last_rotation,
        }
    )


def settled(doc: DeviceIdentity, now: float, grace_s: float = ROTATION_GRACE_S) -> DeviceIdentity:
    """``doc`` with pending certificates older than ``grace_s`` settled: the newest issued of
    them and the current one is taken as what the device runs with."""
    if not doc.pending or doc.revoked:
        return doc
    issued_at = {c.serial: c.issued_at for c in doc.certificates}
    if now < max(issued_at.get(s, 0.0) for s in doc.pending) + grace_s:
        return doc
    held = [s for s in (doc.current, *doc.pending) if s is not None]
    return rotated(doc, max(held, key=lambda s: issued_at.get(s, 0.0)), now)


def overdue(doc: DeviceIdentity, now: float, grace_s: float = ROTATION_GRACE_S) -> bool:
    """Whether ``settled`` would change ``doc``."""
    return settled(doc, now, grace_s) != doc
