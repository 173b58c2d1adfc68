"""What the agent's MQTT status says of its certificate (``Status.identity``), read from the
``status.json`` that ``edge_agent.identity`` keeps, so that the agent itself never loads x509:
a device without an identity of its own reports none.

The cloud shows it beside its own record and decides nothing by it (a device may lie:
docs/fleet-identity.md)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from modelpack import untrusted_json

# The bounds of cloud_sync.protocol.CertificateReport: a value past them is cut, not refused,
# so that a long error never costs the device its status.
_TEXT = {"state": 32, "serial": 64, "issuer": 256, "reason": 512}
_TIMES = ("not_before", "not_after", "renew_after", "last_rotation")


class IdentityStatus:
    """``report()`` for the status; ``changed()`` when the file moved since the last report."""

    def __init__(self, data_dir: Path, cert_file: Path | None) -> None:
        own = data_dir / "identity"
        # Certificates the operator manages (another --cert-file) are not ours to report.
        self.path = own / "status.json" if cert_file == own / "device.crt" else None
        self._seen: float | None = None

    def _mtime(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime if self.path is not None else None
        except OSError:
            return None

    def changed(self) -> bool:
        return self.path is not None and self._mtime() != self._seen

    def report(self, now: float) -> dict[str, Any] | None:
        if self.path is None:
            return None
        self._seen = self._mtime()
        try:
            doc = untrusted_json.loads(self.path.read_bytes())
        except (OSError, untrusted_json.NotJsonError):
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), str):
            return None
        out: dict[str, Any] = {
            k: doc[k][:limit] for k, limit in _TEXT.items() if isinstance(doc.get(k), str)
        }
        out.update({k: float(doc[k]) for k in _TIMES if _number(doc.get(k))})
        if "not_after" in out:
            out["days_left"] = round((out["not_after"] - now) / 86400, 4)
        if "renew_after" in out:
            out["rotation_due"] = now >= out["renew_after"]
        return out


def _number(value: object) -> bool:
    """A time to report: a finite number (an integer of 400 digits overflows a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
