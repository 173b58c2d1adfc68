"""The identity metrics the enrollment service serves (docs/metrics.md, the identity rules of
deploy/observability/rules/identity.rules.yml).

Import path and API::

    from cloud_sync.identity_metrics import IdentityCollector
    registry.register(IdentityCollector(service, refresh_s=30))

Per device: seconds to its certificate's expiry. For the fleet: enrollments and refusals by
reason, revoked devices, and revoked devices whose retained status still says online (a
revocation that did not drop the session). The store is read at most every ``refresh_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from cloud_sync.enroll import EnrollmentService
from cloud_sync.identity_store import identity_rows


class IdentityCollector:
    def __init__(self, service: EnrollmentService, refresh_s: float = 30.0) -> None:
        self.service, self.refresh_s = service, refresh_s
        self._rows: dict[str, dict[str, Any]] = {}
        self._at = -1e9
        self._lock = threading.Lock()

    def rows(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._rows = identity_rows(self.service.ids.devices(), time.time())
                self._at = time.monotonic()
            return self._rows

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
        for reason, count in sorted(self.service.refusals.items()):
            refused.add_metric([reason], count)
        yield refused
