"""Issue 19: a device that claims its own update failed is one device, not a verdict. Install
failures are judged per wave with a minimum count, so one liar in a wave of 4 or more devices
cannot abort a healthy rollout (simulated fleet, ``edgebento simulate``, real Mosquitto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgebento.cli import main
from tests.integration.test_rollout_sim import base, devices
from tests.support.services import Mosquitto
from tests.support.sim import wait_for

pytestmark = pytest.mark.slow


def test_one_device_claiming_its_update_failed_does_not_abort_thirteen(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str,
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    honest = simulate(12)
    liar = simulate(1, 12, "--fail-version", "2")  # says its health check failed on v2
    args = [*base(sim_store_url, broker, topic_prefix, keys[0]), "--allow-unverified"]
    flags = ["--devices", devices(honest, liar), "--bake", "0", "--wave-timeout", "20"]
    assert main(["rollout", "tiny", "2", *args, *flags]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "completed", shown["reason"]
    states = {d["device"]: d["state"] for d in shown["devices"]}
    assert states.pop(liar.names[0]) == "failed" and set(states.values()) == {"done"}
    wait_for(broker, topic_prefix, {**dict.fromkeys(honest.names, 2), liar.names[0]: 1})
