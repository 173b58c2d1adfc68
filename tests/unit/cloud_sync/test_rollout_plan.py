from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.groups import change_group, list_groups
from cloud_sync.protocol import Applied, ModelRef, Status, Topics
from cloud_sync.rollout_checks import abort_reason, device_outcome, judge
from cloud_sync.rollout_plan import exit_code, resolve_targets
from cloud_sync.rollout_state import RolloutState, Thresholds, new_rollout, plan_waves
from cloud_sync.rollout_store import list_states, load_state, save_state
from cloud_sync.sealed import public_of
from cloud_sync.store import LocalStore
from cloud_sync.watch import FleetWatch, VersionStats
from modelpack.errors import ConfigError, SignatureError

TARGET = ModelRef(name="m", version=2)
RID = "m-v2-x"


def test_plan_waves_puts_a_canary_first() -> None:
    devices = [f"d{i:02d}" for i in range(10)]
    assert plan_waves(devices, 10, 2) == [["d00"], devices[1:6], devices[6:]]
    assert plan_waves(["a"], 10, 3) == [["a"]]
    assert plan_waves(["b", "a", "c"], 50, 1) == [["a", "b"], ["c"]]
    with pytest.raises(ConfigError):
        plan_waves([], 10, 2)


def status(version: int, applied: Applied | None = None, ts: float | None = None) -> Status:
    doc = {"device": "d", "state": "online", "model": {"name": "m", "version": version}}
    if ts is not None:
        doc["ts"] = ts
    return Status.model_validate({**doc, "applied": applied})


def applied(outcome: str, generation: int = 7, rollout: str | None = RID, **model: object):
    return Applied(
        generation=generation,
        rollout=rollout,
        model=ModelRef.model_validate(model or {"name": "m", "version": 2}),
        outcome=outcome,  # type: ignore[arg-type]
        reason="health check failed",
    )


def test_outcomes_are_matched_by_structured_fields_not_clocks_or_text() -> None:
    assert device_outcome(None, TARGET, RID, 7) is None
    assert device_outcome(status(1), TARGET, RID, 7) is None
    assert device_outcome(status(2), TARGET, RID, 7) == ("done", "runs v2")
    failed = status(1, applied("rolled_back"))
    assert device_outcome(failed, TARGET, RID, 7) == (
        "failed",
        "rolled_back: health check failed",
    )
    # A clock 5 s behind or 60 s ahead changes nothing: no timestamp is read.
    assert device_outcome(status(1, applied("refused"), ts=0.0), TARGET, RID, 7) is not None
    assert device_outcome(status(1, applied("refused"), ts=1e10), TARGET, RID, 7) is not None
    # A failure of another generation, rollout or model is not this rollout's failure.
    assert device_outcome(status(1, applied("refused", generation=6)), TARGET, RID, 7) is None
    assert device_outcome(status(1, applied("refused", rollout="old")), TARGET, RID, 7) is None
    det_v12 = applied("refused", name="m", version=12)
    assert device_outcome(status(1, det_v12), TARGET, RID, 7) is None
    other_v2 = applied("refused", name="other", version=2)
    assert device_outcome(status(1, other_v2), TARGET, RID, 7) is None


def rollout(states: dict[str, str], thresholds: Thresholds | None = None) -> RolloutState:
    state = new_rollout("m", 2, list(states), {}, thresholds or Thresholds(), "p")
    for d in state.devices:
        state.move(d, states[d.device], "x")  # type: ignore[arg-type]
    state.current_wave = state.wave_count - 1  # every wave pushed: judged together
    return state


def test_abort_on_failed_devices_errors_and_latency() -> None:
    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("p"))
    healthy = {f"d{i}": "done" for i in range(30)}
    assert abort_reason(rollout(healthy), watch) is None
    reason, figures = abort_reason(rollout({"a": "failed"}), watch) or ("", None)
    assert "1 of 1 updated devices failed" in reason and figures and figures.failed == 1
    one_late = {**healthy, "d9": "failed"}  # in a wave of 13: one device that says so
    assert abort_reason(rollout(one_late), watch) is None
    in_the_canary = {**healthy, "d0": "failed"}  # a canary of 3 stops at its first failure
    assert (
        "1 of 3 updated devices failed in the canary"
        in abort_reason(rollout(in_the_canary), watch)[0]
    )  # type: ignore[index]
    two_late = {**one_late, "d8": "failed"}  # 2 of 13: 15% of a wave, over 5%
    assert (
        "2 of 13 updated devices failed in the wave 2" in abort_reason(rollout(two_late), watch)[0]
    )  # type: ignore[index]

    # Telemetry is judged per device: d0 alone failing 10% of its inferences is 1 of 30.
    state = rollout(healthy)
    for i in range(30):
        watch.figures[f"d{i}"] = {2: VersionStats(count=100, errors=10 if i == 0 else 0)}
    assert abort_reason(state, watch) is None
    assert state.figures is not None and (state.figures.reporting, state.figures.bad) == (30, 1)
    for i in range(10):  # a third of them: over the 25% of devices allowed
        watch.figures[f"d{i}"][2].errors = 10
    reason, figures = abort_reason(rollout(healthy), watch) or ("", None)
    assert "error rate on v2 is 10.0% on d0 (over 5%)" in reason and "10 of 30 reporting" in reason
    assert figures is not None and figures.bad == 10
    for i in range(30):  # the p99 of each against its own on v1
        old, new = VersionStats(count=100), VersionStats(count=100)
        old.p99s.append(2.0)
        new.p99s.append(5.0)
        watch.figures[f"d{i}"] = {1: old, 2: new}
    with_previous = rollout(healthy)
    for d in with_previous.devices:
        d.previous = ModelRef(name="m", version=1)
    reason, figures = abort_reason(with_previous, watch) or ("", None)
    assert "2.50x the previous 2.0 ms" in reason and figures and figures.old_p99_ms == 2.0
    lenient = rollout(healthy, Thresholds(abort_p99_ratio=3.0))
    for d in lenient.devices:
        d.previous = ModelRef(name="m", version=1)
    assert abort_reason(lenient, watch) is None


def test_state_is_saved_by_wave_and_only_what_changed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    state = rollout({f"d{i:02d}": "pending" for i in range(20)}, Thresholds(waves=3))
    signer = Ed25519PrivateKey.generate()
    save_state(store, state, signer)
    assert sorted(store.list(f"rollouts/{state.id}/")) == [
        f"rollouts/{state.id}/wave-{i}.json" for i in range(4)
    ]
    before = {k: (tmp_path / k).stat().st_mtime_ns for k in store.list("rollouts/")}
    state.move(state.wave(2)[0], "done", "runs v2")
    save_state(store, state, signer)
    changed = {k for k in before if (tmp_path / k).stat().st_mtime_ns != before[k]}
    assert changed == {f"rollouts/{state.id}.json", f"rollouts/{state.id}/wave-2.json"}
    again = load_state(store, state.id, public_of(signer))
    assert again.devices == state.devices and again.counts == {"pending": 19, "done": 1}
    assert [h.id for h in list_states(store)] == [state.id]
    assert exit_code(again, wait_all=False) == 1  # still running
    with pytest.raises(ConfigError):
        load_state(store, "../x")


def test_group_targets_come_from_the_store_never_from_a_status(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    signer = Ed25519PrivateKey.generate()
    trusted = public_of(signer)
    change_group(store, "lobby", add=["a", "c", "a"], signer=signer)
    change_group(store, "dock", add=["b", "c"])  # unsigned: a cohort for monitor, not a target
    assert resolve_targets(store, (), "lobby", trusted) == ["a", "c"]
    assert change_group(store, "lobby", remove=["c"], signer=signer) == ["a"]
    assert list_groups(store) == {"dock": ["b", "c"], "lobby": ["a"]}
    with pytest.raises(SignatureError, match="not signed"):
        resolve_targets(store, (), "dock", trusted)
    with pytest.raises(SignatureError, match="another key"):
        resolve_targets(store, (), "lobby", public_of(Ed25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match="fleet group add roof"):
        resolve_targets(store, (), "roof", trusted)
    with pytest.raises(ConfigError, match="either --devices"):
        resolve_targets(store, ("a",), "lobby", trusted)
    assert resolve_targets(store, ("x", "y", "x"), None, trusted) == ["x", "y"]
    with pytest.raises(ConfigError):
        change_group(store, "../x", add=["a"])
    with pytest.raises(ConfigError):
        change_group(store, "lobby", add=["a/#"])


def test_topics_are_parsed_exactly() -> None:
    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("a/b"))
    assert watch._device_and_kind("a/b/dev/status") == ("dev", "status")
    for topic in ("a/b/dev/status/x", "a/b/group/status", "a/dev/status", "x/b/dev/status",
                  "a/b/dev/cmd", "a/b//status"):  # fmt: skip
        assert watch._device_and_kind(topic) is None, topic


class _Msg:
    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload


_STATUS_JSON = st.fixed_dictionaries(
    {
        "device": st.sampled_from(["a", "b", "evil"]),
        "state": st.sampled_from(["online", "offline", "rebooting"]),
        "model": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"name": st.text(max_size=5), "version": st.one_of(st.integers(), st.text())}
            ),
        ),
    }
).map(lambda d: json.dumps(d).encode())


@settings(max_examples=300, deadline=None)
@given(
    topic=st.one_of(
        st.sampled_from(["p/a/status", "p/b/status", "p/a/telemetry", "p/a/desired"]),
        st.text(max_size=30),
    ),
    payload=st.one_of(_STATUS_JSON, st.binary(max_size=200)),
)
def test_no_message_escapes_the_watch_or_speaks_for_another_device(
    topic: str, payload: bytes
) -> None:
    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("p"))
    watch._on_message(None, None, _Msg(topic, payload))  # never raises
    for device, seen in watch.statuses.items():
        assert seen.device == device and topic == f"p/{device}/status"


def test_each_wave_is_verified_by_its_own_devices_not_by_earlier_ones() -> None:
    watch = FleetWatch("mqtt://127.0.0.1:1", Topics("p"))
    state = rollout({"a": "done", "b": "done"}, Thresholds(canary_pct=50, waves=1))
    watch.figures["a"] = {2: VersionStats(count=100)}  # the canary served; b has not yet
    assert judge(state, watch, 0).kind == "verified"
    waiting = judge(state, watch, 1)
    assert waiting.kind == "waiting" and "0 of the 1 of this wave" in waiting.reason
    watch.figures["b"] = {2: VersionStats(count=100)}
    assert judge(state, watch, 1).kind == "verified"
