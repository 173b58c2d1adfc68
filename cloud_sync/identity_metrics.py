"""The identity metrics the enrollment service serves (docs/metrics.md, the identity rules of
deploy/observability/rules/identity.rules.yml).

Import path and API::

    from cloud_sync.identity_metrics import IdentityCollector
    registry.register(IdentityCollector(service, refresh_s=30))

Per device: seconds to its certificate's expiry. For the fleet: enrollments and refusals by
reason, revoked devices, revoked devices whose retained status still says online (a
revocation that did not drop the session), and records read back that the CA did not sign
(every object and reason at 0 from the start). The store is read at most every
``refresh_s``.
With ``crl_file`` (the CRL the broker reads): seconds until its nextUpdate, past which OpenSSL
refuses every client (0 when it cannot be read or the CA did not sign it: the broker cannot
use it either), how often its last good copy was put back (``crl_disk.RESTORES``), and whether
the host's list of spent claims beside it reads (1 while it does not: every claim is refused).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloud_sync.crl_disk import RESTORES
from cloud_sync.enroll import EnrollmentService
from cloud_sync.identity_view import identity_rows
from modelpack.errors import ConfigError

REFUSED_LABELS = [
    *(("device", r) for r in ("unsigned", "forged", "malformed", "misplaced", "unreadable")),
    *(("crl_index", r) for r in ("unsigned", "forged", "malformed", "misplaced", "replayed")),
]


class IdentityCollector:
    def __init__(
        self, service: EnrollmentService, refresh_s: float = 30.0, crl_file: Path | None = None
    ) -> None:
        self.service, self.refresh_s, self.crl_file = service, refresh_s, crl_file
        self._rows: dict[str, dict[str, Any]] = {}
        self._at = -1e9
        self._lock = threading.Lock()

    def rows(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._rows = identity_rows(self.service.ids.devices(), time.time())
                self._at = time.monotonic()
            return self._rows

    def crl_left_s(self) -> float:
        """0 also for a CRL the fleet CA did not sign: Mosquitto refuses every client on it."""
        assert self.crl_file is not None
        try:
            crl = self.service.ca.checked_crl(self.crl_file.read_bytes(), self.crl_file)
        except (OSError, ConfigError):
            return 0.0
        next_update = crl.next_update_utc
        return 0.0 if next_update is None else next_update.timestamp() - time.time()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rows = self.rows()
        expiry = GaugeMetricFamily(
            "edgebento_identity_cert_expiry_seconds",
            "Seconds until the device's current certificate expires (negative: expired)",
            labels=["device"],
        )
        for device, row in rows.items():
            if row["not_after"] is not None and not row["revoked"]:
                expiry.add_metric([device], row["not_after"] - time.time())
        yield expiry
        revoked = [d for d, r in rows.items() if r["revoked"]]
        yield GaugeMetricFamily(
            "edgebento_identity_revoked_devices", "Devices revoked", value=len(revoked)
        )
        yield GaugeMetricFamily(
            "edgebento_identity_revoked_connected_devices",
            "Revoked devices whose retained status still says online",
            value=sum(1 for d in revoked if self.service.online.get(d)),
        )
        enrolled = CounterMetricFamily(
            "edgebento_enrollments", "Certificates issued, by kind", labels=["kind"]
        )
        for kind in ("claim", "renew"):
            enrolled.add_metric([kind], self.service.enrolled.get(kind, 0))
        yield enrolled
        refused = CounterMetricFamily(
            "edgebento_enrollment_refusals",
            "Enrollments and renewals refused, by reason",
            labels=["reason"],
        )
        # renewal_budget at 0 from the start: its alert sees the first one as an increase.
        for reason, count in sorted(({"renewal_budget": 0} | dict(self.service.refusals)).items()):
            refused.add_metric([reason], count)
        yield refused
        store_refused = CounterMetricFamily(
            "edgebento_identity_records_refused",
            "Device records and CRL indexes read back that the fleet CA did not sign as they "
            "are (changed, moved, unsigned), by object and reason",
            labels=["object", "reason"],
        )
        # Every label pair from the start, at 0: an alert on increase() sees the first refusal
        # only if the series was there before it.
        counts = {pair: 0 for pair in REFUSED_LABELS} | dict(self.service.ids.refused)
        for (kind, reason), count in sorted(counts.items()):
            store_refused.add_metric([kind, reason], count)
        yield store_refused
        if self.crl_file is not None:
            yield GaugeMetricFamily(
                "edgebento_identity_crl_next_update_seconds",
                "Seconds until the broker's CRL passes its nextUpdate (then every client is "
                "refused); 0 when it cannot be read",
                value=self.crl_left_s(),
            )
            # At 0 from the start, so that the first restore is an increase and alerts.
            yield CounterMetricFamily(
                "edgebento_identity_crl_restored",
                "Times the CRL on disk did not verify and its last good copy was put back (a "
                "broker that reloaded it meanwhile ran without a CRL check)",
                value=RESTORES[str(self.crl_file)],
            )
            spent = self.service.ids.spent
            yield GaugeMetricFamily(
                "edgebento_identity_spent_claims_unreadable",
                "1 while the host's list of spent claims (crl.pem.spent-claims.json) does not "
                "read: every claim is refused until `fleet rebuild-spent-claims`",
                value=0 if spent is None or spent.problem() is None else 1,
            )
