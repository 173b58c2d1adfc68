"""What the operator is shown of the fleet's identities: one row per device from the store's
records (``cloud_sync.identity_store``), and where a device's own word on its certificate
disagrees with them. Read-only views, for ``fleet identity``, ``fleet status`` and the
enrollment service's metrics: nothing here changes a record or acts on a disagreement.

Import path and API::

    from cloud_sync.identity_view import identity_rows, reported_mismatch
    rows = identity_rows(IdentityStore(store).devices(), time.time())
    reported_mismatch(rows.get("cam-1"), status.identity)   # ["serial"], [] when they agree
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_sync.identity_store import DeviceIdentity


def identity_rows(
    devices: dict[str, DeviceIdentity], now: float, refused: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """What ``fleet identity``, ``fleet status`` and the fleet metrics show per device;
    ``refused`` (device, or the key of an object that is no device's: reason), records the CA
    did not sign as they are there, shown as refused with the reason and nothing of what they
    say (``revoked`` None: not known, neither way)."""
    rows: dict[str, dict[str, Any]] = {}
    for device, reason in sorted((refused or {}).items()):
        unknown = dict.fromkeys(("serial", "not_after", "expires_in_s", "last_rotation"))
        unknown["pending"] = None
        state = f"record refused ({reason})"
        rows[device] = {"state": state, "refused": reason, **unknown}
        rows[device] |= {"revoked": None, "revoked_at": None}
    for device, doc in sorted(devices.items()):
        current = doc.current_record()
        expires_in = None if current is None else current.not_after - now
        state = "revoked" if doc.revoked else "no certificate" if current is None else "valid"
        if state == "valid" and expires_in is not None and expires_in <= 0:
            state = "expired"
        rows[device] = {
            "state": state,
            "refused": None,
            "serial": doc.current,
            "not_after": None if current is None else current.not_after,
            "expires_in_s": expires_in,
            "last_rotation": doc.last_rotation,
            # Renewed, not yet confirmed by the device's rotated: the old serial stays valid.
            "pending": list(doc.pending),
            "revoked": doc.revoked,
            "revoked_at": doc.revoked_at,
        }
    return rows


def reported_mismatch(row: dict[str, Any] | None, reported: dict[str, Any]) -> list[str]:
    """Where what a device says of its certificate (``Status.identity``) disagrees with the
    cloud's own record (``identity_rows``): shown to the operator as a flag, never acted on.
    A device mid-rotation disagrees for a moment (it reports the new certificate once it has
    reconnected with it, the store takes it as current at the device's ``rotated``)."""
    if row is None:
        return ["no record"]  # the store never issued this device a certificate
    out = []
    if reported.get("serial") and row.get("serial") and reported["serial"] != row["serial"]:
        out.append("serial")
    said, kept = reported.get("not_after"), row.get("not_after")
    if said is not None and kept is not None and abs(float(said) - float(kept)) > 1.0:
        out.append("not_after")
    if row.get("revoked") and reported.get("state") == "valid":
        out.append("revoked")  # the store revoked it; the device says it is valid
    return out
