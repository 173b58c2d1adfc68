"""Renewal retries and the retired certificate, with a real Mosquitto over mTLS, the real
enrollment service and a real agent (issue 20 item 4: "renews at two thirds of its
certificate's life (with jitter and retries) ... and then the old certificate is revoked").

A renewal answered ``rate_limited`` (a busy service: a fleet enrolled on one day renews within
a few minutes) stopped the agent's renewals for good, as if it were revoked, and the device
went on to expire. Now it is tried again with backoff; and the certificate it rotated away
from can no longer connect. So is a renewal answered ``renewal_budget`` (the device's renewals
for the day spent, as lost answers spend them): it is tried again until one is free, where the
agent before stopped renewing and expired."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import RateLimit
from cloud_sync.fleet_ca import tls_context
from cloud_sync.renewal_budget import RenewalBudget
from cloud_sync.revocation import _connect
from tests.support.agent import wait_online
from tests.support.identity_cli import as_operator, fleet_cli
from tests.support.identity_fleet import PREFIX, IdentityFleet, enrolling_agent, identity_status

DEVICE = "ren-a"


class BusyForRenewals(RateLimit):
    """The service's rate limit, answering a device's first ``times`` renewals ``rate_limited``
    as a busy service does; everything else passes."""

    def __init__(self, device: str, times: int) -> None:
        super().__init__(rate=1000, burst=1000, per_device_s=0.0)
        self.device, self.left, self.refused = device, times, 0

    def allow(self, device: str) -> bool:
        with self._lock:  # paho's thread calls it
            if device == self.device and self.left > 0:
                self.left -= 1
                self.refused += 1
                return False
        return super().allow(device)


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path / "fleet", validity_s=30.0).start()
    yield fleet
    fleet.stop()


def test_a_renewal_answered_busy_is_retried_and_the_old_certificate_is_shut_out(
    short_lived: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    fleet = short_lived
    busy = BusyForRenewals(DEVICE, times=2)
    fleet.service.limit = busy
    agent = enrolling_agent(fleet, agent_factory, tmp_path / "agent", DEVICE)
    operator = fleet.client("operator")
    wait_online(operator, PREFIX, DEVICE)
    first = fleet.ids.device(DEVICE)
    assert first is not None and first.current is not None
    # The certificate it enrolled with, kept aside: after the rotation it must be shut out.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("device.crt", "device.key"):
        shutil.copy(agent.data_dir / "identity" / name, old / name)

    # Until it rotated, or gave up (what the old code did on the first rate_limited).
    deadline = time.monotonic() + 60
    while True:
        record = fleet.ids.device(DEVICE)
        if record is not None and record.last_rotation is not None:
            break
        state = identity_status(agent).get("state")
        assert state != "renewal_refused", (identity_status(agent), agent.output()[-2000:])
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.2)
    assert busy.refused == 2 and fleet.service.refusals["rate_limited"] >= 2
    assert "certificate renewal failed (try 1)" in agent.output()
    assert record.current != first.current and first.current in record.retired
    # It reconnected with the new certificate before it said so (a CRL reload alone would have
    # left it on its old connection): a second connect, before anything below could drop it.
    deadline = time.monotonic() + 30
    while "certificate rotated" not in agent.output():
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.2)
    assert agent.output().count("connected to") >= 2, agent.output()[-2000:]

    # The old certificate is in the CRL the broker reads: a connection with it is refused in
    # the handshake. (A SIGHUP is asynchronous: until the broker has re-read its CRL, the old
    # certificate may still get in, and takes the device's session over for a moment.)
    context = tls_context(fleet.ca.paths.bundle, old / "device.crt", old / "device.key")
    deadline = time.monotonic() + 20
    while _connect(context, DEVICE, "127.0.0.1", fleet.broker.port, 10):
        assert time.monotonic() < deadline, "the retired certificate still connects"
        time.sleep(0.2)
    # The device runs on its new certificate and answers, and says so in its status.
    operator.reply_topic = f"{PREFIX}/{DEVICE}/replies/operator"
    operator.collect(operator.reply_topic)
    assert operator.request(f"{PREFIX}/{DEVICE}/cmd/ping", {}, timeout=30)["ok"] is True
    # (A 30-second certificate renews again 20 s later: each check takes any rotation.)
    deadline = time.monotonic() + 20
    while identity_status(agent).get("serial") in (None, first.current):
        assert time.monotonic() < deadline, identity_status(agent)
        time.sleep(0.2)
    assert identity_status(agent)["state"] == "valid" and identity_status(agent)["last_rotation"]
    operator.close()
    # What an operator reads of it (item 6): the expiry and the last rotation, from the store.
    store = str(fleet.root / "store")
    rows = json.loads(fleet_cli("fleet", "identity", "--store", store, "--json"))["devices"]
    assert rows[DEVICE]["state"] == "valid" and rows[DEVICE]["serial"] != first.current
    assert rows[DEVICE]["last_rotation"] >= record.last_rotation
    assert 0 < rows[DEVICE]["expires_in_s"] <= 30
    table = fleet_cli(
        "fleet", "status", "--broker", fleet.broker.url, "--store", store,
        "--ca", str(fleet.root / "ca"), env=as_operator(fleet),
    )  # fmt: skip
    line = next(ln for ln in table.splitlines() if ln.startswith(DEVICE))
    assert " left, rotated " in line and " ago" in line, table


def test_a_renewal_past_the_budget_is_tried_again_until_one_is_free(
    short_lived: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    fleet = short_lived
    fleet.service.budget = RenewalBudget(count=1, window_s=3600.0)
    agent = enrolling_agent(fleet, agent_factory, tmp_path / "agent", DEVICE)
    # Its first renewal spends the budget; its second (10 s before its certificate expires) is
    # refused. The agent before this took that for "never": renewal_refused, and it expired.
    deadline = time.monotonic() + 90
    while "(renewal_budget)" not in agent.output():
        assert "certificate renewal refused" not in agent.output(), agent.output()[-2000:]
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.2)
    assert identity_status(agent).get("state") != "renewal_refused", identity_status(agent)
    record = fleet.ids.device(DEVICE)
    assert record is not None and len(record.renewals) == 1
    # A renewal free again (here: the budget raised): the next try renews and rotates.
    fleet.service.budget = RenewalBudget(count=100, window_s=3600.0)
    deadline = time.monotonic() + 60
    while True:
        record = fleet.ids.device(DEVICE)
        if record is not None and len(record.renewals) >= 2:
            break
        assert "certificate renewal refused" not in agent.output(), agent.output()[-2000:]
        assert time.monotonic() < deadline, agent.output()[-2000:]
        time.sleep(0.2)
    assert identity_status(agent).get("state") != "renewal_refused", identity_status(agent)
