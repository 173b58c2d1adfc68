"""Resuming a rollout that a newer one has superseded, on a simulated fleet and real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.integration.test_rollout_sim import base, devices
from tests.support.agent import make_pack
from tests.support.services import Mosquitto
from tests.support.sim import publish_v1_v2, versions, wait_for

pytestmark = pytest.mark.slow


def test_a_superseded_rollout_is_not_resumed_over_the_newer_one(
    simulate, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    tmp_path: Path, mlp_model: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    store_url = str(tmp_path / "store")
    publish_v1_v2(store_url, tmp_path, mlp_model, keys[0])
    Registry(open_store(store_url)).publish(
        make_pack(tmp_path / "v3", mlp_model, keys[0], 3), key=keys[0]
    )
    fleet = simulate(4)
    args = base(store_url, broker, topic_prefix, keys[0])
    flags = ["--devices", devices(fleet), "--bake", "0", "--wave-timeout", "5", "--waves", "1"]
    flags += ["--canary", "25"]
    # v2 reaches the canary only: the timeout leaves no time to judge the wave after it.
    assert main(["rollout", "tiny", "2", *args, *flags, "--timeout", "5.2"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "timed_out" and shown["counts"].get("pending"), shown["counts"]
    assert main(["rollout", "tiny", "3", *args, *flags]) == 0
    wait_for(broker, topic_prefix, dict.fromkeys(fleet.names, 3))
    capsys.readouterr()

    # Resumed, v2's rollout would push v2 again: refused as a downgrade, its abort would then
    # sign rollbacks to v1 and take the fleet back past both rollouts.
    assert main(["rollout", "resume", shown["id"], *args, "--timeout", "30"]) == 1
    err = capsys.readouterr().err
    assert set(versions(broker, topic_prefix, fleet.names).values()) == {3}
    assert "was superseded by" in err and "resuming would undo it" in err
