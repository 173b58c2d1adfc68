"""A renewal refused ``renewal_budget`` is tried again when the service said a renewal is free
(``retry_after_s``), not at the backoff's pace: Mosquitto with mTLS, the real enrollment
service on moto's S3 server, and a real agent enrolling by claim and renewing on its own.

The previous agent never read ``retry_after_s``: refused, it asked again within a tenth of its
certificate's remaining life (here every 0.4-3.3 s, 4 or more refusals before the renewal was
free; with 90-day certificates and the 4/24h default, every 2.5-5 minutes for up to a day),
each try a read of the device's record in the bucket. Now it is refused once, says in its log
and status when it tries again, and renews at that try."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.fleet_ca import new_key
from cloud_sync.renewal_budget import RenewalBudget
from edge_agent.identity import KeyMaker
from tests.support.identity_fleet import (
    IdentityFleet,
    claim_request,
    enrolling_agent,
    identity_status,
)
from tests.support.services import MotoS3

DEVICE = "wait-a"
# 90-second certificates (99 s with the CA's backdating), renewed at ~57 s after issue (±3 s);
# one renewal per 64 s: a renewal spent at enrollment is free again ~7 s after that, well
# before the certificate's last stretch (its last 9.9 s) begins.
VALIDITY_S, BUDGET = 90.0, RenewalBudget(count=1, window_s=64.0)


def _fleet(
    root: Path, s3_server: MotoS3, validity_s: float, budget: RenewalBudget
) -> IdentityFleet:
    bucket = f"wait-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    fleet = IdentityFleet(
        root,
        validity_s=validity_s,
        store_url=f"s3://{bucket}/prod",
        endpoint_url=s3_server.endpoint_url,
    ).start()
    fleet.service.budget = budget
    return fleet


@pytest.fixture
def fleet(tmp_path: Path, s3_server: MotoS3) -> Iterator[IdentityFleet]:
    fleet = _fleet(tmp_path / "fleet", s3_server, VALIDITY_S, BUDGET)
    yield fleet
    fleet.stop()


def _enrolled_and_spent(fleet: IdentityFleet, agent: Any, device: str) -> None:
    """Once ``agent`` enrolled ``device``: its budget spent, as a renewal whose answer was lost
    spends it."""
    deadline = time.monotonic() + 60
    while (record := fleet.ids.device(device)) is None or record.current is None:
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.1)
    spent = fleet.service.handle(
        device, "renew", claim_request(KeyMaker().csr(new_key(), device), None)
    )
    assert spent.ok, spent


def test_a_refused_renewal_waits_for_the_budget_and_asks_once(
    fleet: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    agent = enrolling_agent(fleet, agent_factory, tmp_path / "agent", DEVICE)
    # Its budget spent right after it enrolled: its own renewal, due ~57 s after it enrolled,
    # is refused until ~64 s.
    _enrolled_and_spent(fleet, agent, DEVICE)
    before = Counter(fleet.service.refusals)
    said: dict[str, Any] = {}
    deadline = time.monotonic() + 150
    while (record := fleet.ids.device(DEVICE)) is None or record.last_rotation is None:
        assert "certificate renewal refused" not in agent.output(), agent.output()[-2000:]
        assert time.monotonic() < deadline, agent.output()[-2000:]
        status = identity_status(agent)
        if "renewal_budget" in str(status.get("reason")):
            said = status  # what the device says while it waits
        time.sleep(0.1)
    refusals = Counter(fleet.service.refusals)
    refusals.subtract(before)
    # One refusal, then the renewal at the moment the service named: the previous agent was
    # refused at every try of its backoff in between.
    assert +refusals == Counter({"renewal_budget": 1}), (+refusals, agent.output()[-2000:])
    assert len(record.renewals) == 2
    output = agent.output()
    assert "(renewal_budget)" in output and "trying again in" in output, output[-2000:]
    # Its status said when it would try again, and that was after the budget freed.
    assert said and said["state"] == "valid", said
    assert said["renew_after"] >= record.renewals[0].at + BUDGET.window_s, said


def test_an_expired_certificate_still_connected_waits_as_asked_not_every_second(
    tmp_path: Path, s3_server: MotoS3, agent_factory: Any
) -> None:
    """A 45 s certificate and a ``1/15m`` budget spent: refused at its renewal, the device
    tries in its last stretch at the backoff's pace, and its certificate expires while
    Mosquitto keeps its session (certificates are checked at the handshake). The previous agent
    then asked every 0.5-1 s (the backoff's cap is a tenth of the life left: none), whatever
    the service said (its status: next try 0.52 s after it was written); now it waits as asked,
    at most 5 minutes."""
    fleet = _fleet(tmp_path / "fleet", s3_server, 45.0, RenewalBudget(count=1, window_s=900.0))
    try:
        agent = enrolling_agent(fleet, agent_factory, tmp_path / "agent", "wait-x")
        _enrolled_and_spent(fleet, agent, "wait-x")
        deadline = time.monotonic() + 120
        while True:
            status = identity_status(agent)
            if status.get("state") == "expired" and "renewal_budget" in str(status.get("reason")):
                break  # the first refusal answered after the certificate expired
            assert "certificate renewal refused" not in agent.output(), agent.output()[-2000:]
            assert time.monotonic() < deadline, (status, agent.output()[-2000:])
            time.sleep(0.05)
    finally:
        fleet.stop()
    assert status["renew_after"] - status["ts"] >= 60.0, status
