"""The agent's ``rotated`` is what retires its old certificate now, so it must get through:
under the enrollment service's default rate limit (a 1 s gap per device) the ``rotated`` that
follows a renewal within a second is answered ``rate_limited``; the agent says it again until
the service takes it, and the old certificate is retired at once, not after the grace of days.
A real agent with 30-second certificates, Mosquitto with mTLS, the real enrollment service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.enroll import RateLimit
from tests.support.agent import wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet

DEVICE = "conf-a"


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path / "fleet", validity_s=30.0).start()
    yield fleet
    fleet.stop()


def test_the_rotation_is_confirmed_under_the_default_rate_limit(
    short_lived: IdentityFleet, agent_factory: Any, tmp_path: Path
) -> None:
    fleet = short_lived
    fleet.service.limit = RateLimit(rate=1000, burst=1000)  # per device: 1 s, as deployed
    token = fleet.ids.create_claims([DEVICE], ttl_s=600)[DEVICE]
    agent = agent_factory(
        broker=fleet.broker,
        device=DEVICE,
        data_dir=tmp_path / "agent",
        prefix=PREFIX,
        args=fleet.agent_args(token),
    )
    operator = fleet.client("operator")
    wait_online(operator, PREFIX, DEVICE)
    operator.close()
    first = fleet.ids.device(DEVICE)
    assert first is not None and first.current is not None
    # Until its first renewal (at two thirds of 30 s) is confirmed: retired, not pending.
    deadline = time.monotonic() + 60
    while True:
        record = fleet.ids.device(DEVICE)
        assert record is not None
        if first.current in record.retired:
            break
        assert time.monotonic() < deadline, (record, agent.output()[-2000:])
        time.sleep(0.2)
    assert record.current != first.current and record.last_rotation is not None
    assert "certificate rotated" in agent.output() or record.pending == []
