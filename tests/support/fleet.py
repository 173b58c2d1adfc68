"""Watching a fleet of agents from the cloud side, for rollout and fleet tests."""

from __future__ import annotations

import time

from cloud_sync.protocol import Topics
from cloud_sync.store import open_store
from cloud_sync.watch import FleetWatch
from tests.support.services import Mosquitto


def wait_versions(
    broker: Mosquitto, prefix: str, want: dict[str, int], timeout: float = 60
) -> None:
    """Until every device in ``want`` is online and reports the version it names."""
    # No settling time after the subscription: the loop below waits for the retained statuses
    # (and any later one) as they come, instead of a fixed half second each call.
    with FleetWatch(broker.url, Topics(prefix), set(want)).start(settle_s=0) as watch:
        deadline = time.monotonic() + timeout
        while True:
            # wait() returns at once while a change is untaken: taken here, it sleeps until the
            # next status (before, this loop spun a core the agents it waits for needed).
            watch.take_changed()
            have = {
                d: s.model.version if s.model and s.state == "online" else None
                for d, s in list(watch.statuses.items())
            }
            if all(have.get(d) == v for d, v in want.items()):
                return
            assert time.monotonic() < deadline, f"devices report {have}, expected {want}"
            watch.wait(0.5)


def rollout_ids(store_url: str) -> list[str]:
    from cloud_sync.rollout_store import list_states

    return [h.id for h in list_states(open_store(store_url))]
