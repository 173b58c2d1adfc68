"""Issue 19, finding 4: what an abort restores must be a version the signed registry holds, never
only what a document says the devices ran (a simulated fleet on a real Mosquitto, the real
``edgebento rollout``).

The devices report v1 before the rollout, but the registry holds only v2 (v1 was never
published, or a bucket writer removed it from the index). When v2 fails and the rollout aborts,
no rollback to v1 is signed: each device is marked failed with the reason, and no desired state
carries an authorization the operator's key made for a version the registry does not vouch
for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.integration.test_rollout_sim import base, devices
from tests.support.agent import Client, make_pack
from tests.support.services import Mosquitto
from tests.support.sim import versions

pytestmark = pytest.mark.slow


def test_an_abort_signs_no_rollback_to_a_version_the_registry_does_not_hold(
    simulate, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, mlp_model: Path, client: Client, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store_url = str(tmp_path / "store")
    Registry(open_store(store_url)).publish(
        make_pack(tmp_path / "v2", mlp_model, keys[0], 2), key=keys[0]
    )
    fleet = simulate(4, 0, "--error-rate", "2=0.5")  # v2 installs, then fails half its runs
    args = base(store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(fleet), "--canary", "100", "--bake", "3", "--min-devices", "4"]
    flags += ["--min-inferences", "20", "--wave-timeout", "30", "--rollback-wait", "5"]
    assert main(["rollout", "tiny", "2", *args, *flags]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "aborted", shown
    details = {d["device"]: (d["state"], d.get("detail") or "") for d in shown["devices"]}
    assert set(details) == set(fleet.names)
    for device, (state, detail) in details.items():
        assert state == "failed" and "v1 is not in the registry" in detail, (device, detail)
    assert set(versions(broker, topic_prefix, fleet.names).values()) == {2}  # left where it is
    # Every retained desired state, known complete once a marker sent after subscribing is back
    # (the broker sends a subscription's retained messages before it handles later publishes).
    retained = client.collect(f"{topic_prefix}/+/desired")
    marker = client.collect(f"{topic_prefix}-marker")
    client.publish(f"{topic_prefix}-marker", {"marker": True})
    marker.get(timeout=30)
    docs = []
    while not retained.empty():
        payload = retained.get().payload
        docs.extend([json.loads(payload)] if payload else [])
    assert not [d for d in docs if d.get("authorization")], docs
