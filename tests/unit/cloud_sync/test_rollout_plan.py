from __future__ import annotations

import time

import pytest

from cloud_sync.protocol import ModelRef, Status, Topics
from cloud_sync.rollout import abort_reason, device_outcome
from cloud_sync.rollout_state import (
    DeviceProgress,
    Thresholds,
    load_state,
    new_rollout,
    plan_waves,
    save_state,
)
from cloud_sync.store import LocalStore
from cloud_sync.watch import FleetWatch, VersionStats
from modelpack.errors import ConfigError

TARGET = ModelRef(name="m", version=2)


def test_plan_waves_puts_a_canary_first() -> None:
    devices = [f"d{i:02d}" for i in range(10)]
    assert plan_waves(devices, 10, 2) == [["d00"], devices[1:6], devices[6:]]
    assert plan_waves(["a"], 10, 3) == [["a"]]
    assert plan_waves(["b", "a", "c"], 50, 1) == [["a", "b"], ["c"]]
    with pytest.raises(ConfigError):
        plan_waves([], 10, 2)


def status(version: int, **extra: object) -> Status:
    return Status.model_validate(
        {"device": "d", "state": "online", "model": {"name": "m", "version": version}, **extra}
    )


def test_device_outcome_reads_the_status() -> None:
    progress = DeviceProgress(device="d", wave=0, desired_at=time.time())
    assert device_outcome(progress, None, TARGET) is None
    assert device_outcome(progress, status(1), TARGET) is None
    assert device_outcome(progress, status(2), TARGET) == ("done", "runs v2")
    failed = status(
        1,
        last_update={
            "outcome": "rolled_back",
            "message": "health check failed: x",
            "source": "m v2",
            "ts": time.time(),
        },
    )
    assert device_outcome(progress, failed, TARGET) == ("failed", "health check failed: x")
    old = status(1, last_update={"outcome": "refused", "source": "m v2", "ts": 0})
    assert device_outcome(progress, old, TARGET) is None  # from before this rollout


def rollout(states: dict[str, str], thresholds: Thresholds | None = None):  # type: ignore[no-untyped-def]
    state = new_rollout("m", 2, list(states), {}, thresholds or Thresholds(), "p")
    for d in state.devices:
        d.state = states[d.device]  # type: ignore[assignment]
    return state


def test_abort_on_failed_devices_errors_and_latency() -> None:
    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("p"))
    healthy = {f"d{i}": "done" for i in range(30)}
    assert abort_reason(rollout(healthy), watch) is None
    assert "1 of 1 updated devices failed" in (abort_reason(rollout({"a": "failed"}), watch) or "")
    one_in_thirty = {**healthy, "d0": "failed"}
    assert abort_reason(rollout(one_in_thirty), watch) is None  # 3.3% is under 5%

    watch.stats[("d1", 2)] = VersionStats(count=100, errors=10, p99s=[5.0])
    assert "error rate on v2 is 10.0%" in (abort_reason(rollout(healthy), watch) or "")
    watch.stats[("d1", 2)] = VersionStats(count=100, errors=0, p99s=[5.0])
    watch.stats[("d2", 1)] = VersionStats(count=100, errors=0, p99s=[2.0])
    assert "2.50x the previous" in (abort_reason(rollout(healthy), watch) or "")
    relaxed = Thresholds(abort_p99_ratio=3.0)
    assert abort_reason(rollout(healthy, relaxed), watch) is None


def test_state_round_trips_through_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(tmp_path)
    state = rollout({"a": "done", "b": "pending"})
    save_state(store, state)
    again = load_state(store, state.id)
    assert again.devices == state.devices and again.phase == "running"
    with pytest.raises(ConfigError):
        load_state(store, "../x")


def test_group_targets_come_from_the_retained_status() -> None:
    import argparse

    from edgebento.cli.rollout import _targets

    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("p"))
    for device, groups in (("a", ["lobby"]), ("b", ["dock"]), ("c", ["lobby", "dock"])):
        watch.statuses[device] = Status.model_validate(
            {"device": device, "state": "online", "groups": groups}
        )
    args = argparse.Namespace(devices=None, group="lobby")
    assert sorted(_targets(args, watch)) == ["a", "c"]
    with pytest.raises(ConfigError, match="no device reports group"):
        _targets(argparse.Namespace(devices=None, group="roof"), watch)
    with pytest.raises(ConfigError, match="either --devices"):
        _targets(argparse.Namespace(devices="a", group="lobby"), watch)
    assert _targets(argparse.Namespace(devices="x, y", group=None), watch) == ["x", "y"]
