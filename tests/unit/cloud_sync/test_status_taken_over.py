"""``Status.taken_over``, how often another client with the device's client id took its
session, as the device says: in the fleet view beside its state, and absent from a device that
does not say (an agent from before the field). Never decided on (cloud_sync.protocol.Status)."""

from __future__ import annotations

from cloud_sync.fleet_metrics import FleetView
from cloud_sync.protocol import Status


def test_the_count_reaches_the_fleet_view_and_an_older_device_says_nothing() -> None:
    view = FleetView()
    view.on_status(Status(device="a", state="online", taken_over=3), "a")
    view.on_status(Status(device="b", state="online"), "b")
    devices = view.snapshot()
    assert devices["a"].as_json()["taken_over"] == 3
    assert "taken_over" not in devices["b"].as_json()
    # As the agent publishes it (exclude_none): a status without the count has no field.
    assert "taken_over" not in Status(device="b", state="online").model_dump_json(exclude_none=True)
