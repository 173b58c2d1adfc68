"""A few compromised devices among honest ones cannot steer a rollout (issue 19, finding 3):
simulated devices (``edgebento simulate``) on a real Mosquitto, the liars publishing only on
their own status and telemetry topics. They can neither carry a failing version to the fleet nor
abort a healthy one; a liar whose figures no device can serve is named as a suspect; and a
device cannot enrol itself in a group (``edgebento fleet group`` keeps them in the store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync.rollout_store import load_state
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.support.services import Mosquitto
from tests.support.sim import wait_for

pytestmark = pytest.mark.slow
HUGE = 10**15


def _rollout(
    sim_store_url: str, broker: Mosquitto, prefix: str, key: Path, devices: list[str]
) -> int:
    return main(
        [
            *("rollout", "tiny", "2", "--store", sim_store_url, "--broker", broker.url),
            *("--prefix", prefix, "--key", str(key), "--devices", ",".join(devices)),
            *("--canary", "100", "--bake", "3", "--wave-timeout", "30", "--min-inferences", "40"),
            *("--min-devices", "10", "--lease-ttl", "3", "--rollback-wait", "20", "--json"),
        ]
    )


def test_three_liars_cannot_carry_a_failing_version_to_ten_honest_devices(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    honest = simulate(10, 0, "--error-rate", "2=0.5")  # v2 fails half its inferences
    # Two claim more than any device serves, naming v2 whatever they run; one claims a clean v2.
    huge = simulate(2, 10, "--lie", f"ok={HUGE},errors=0,version=2")
    clean = simulate(1, 12, "--lie", "ok=20,errors=0,version=2")
    everyone = honest.names + huge.names + clean.names
    code = _rollout(sim_store_url, broker, topic_prefix, keys[0], everyone)
    shown = json.loads(capsys.readouterr().out)
    assert code == 1 and shown["phase"] == "aborted", shown["reason"]
    assert "inference error rate on v2 is" in shown["reason"]
    figures = shown["figures"]
    assert figures["reporting"] >= 10 and figures["bad"] / figures["reporting"] > 0.25
    assert set(shown["suspects"]) <= set(huge.names)  # no honest device is called a liar
    wait_for(broker, topic_prefix, dict.fromkeys(everyone, 1), timeout=60)


def test_three_liars_cannot_abort_a_healthy_rollout_of_ten_devices(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    honest = simulate(10, 0)
    huge = simulate(1, 10, "--lie", f"ok=0,errors={HUGE},version=2")  # aborted it by itself
    failing = simulate(2, 11, "--lie", "ok=0,errors=20,p99_ms=100000")  # plausible, all bad
    everyone = honest.names + huge.names + failing.names
    code = _rollout(sim_store_url, broker, topic_prefix, keys[0], everyone)
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["phase"] == "completed", shown["reason"]
    (check,) = shown["checks"]
    assert check["verified"] and check["figures"]["bad"] <= 2
    assert "reported" in shown["suspects"][huge.names[0]]  # named, with what it claimed
    assert set(shown["suspects"]) == set(huge.names)
    wait_for(broker, topic_prefix, dict.fromkeys(everyone, 2))
    saved = load_state(open_store(sim_store_url), shown["id"])
    assert saved.phase == "completed" and saved.suspects == shown["suspects"]


def test_a_group_is_what_the_store_says_never_what_a_device_claims(
    simulate, sim_store_url: str, broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    members = simulate(2, 0)
    claimer = simulate(1, 2, "--group", "lobby")  # lists the group in its own status
    group = ["fleet", "group"]
    signed = ("--store", sim_store_url, "--key", str(keys[0]))
    assert main([*group, "add", "lobby", *members.names, *signed]) == 0
    assert capsys.readouterr().out.strip() == f"lobby: {' '.join(members.names)}"
    code = main(
        [
            *("rollout", "tiny", "2", "--store", sim_store_url, "--broker", broker.url),
            *("--prefix", topic_prefix, "--key", str(keys[0]), "--group", "lobby"),
            *("--canary", "100", "--bake", "0", "--allow-unverified", "--lease-ttl", "3"),
            "--json",
        ]
    )
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and {d["device"] for d in shown["devices"]} == set(members.names)
    wait_for(broker, topic_prefix, {**dict.fromkeys(members.names, 2), claimer.names[0]: 1})
    assert main([*group, "remove", "lobby", members.names[0], *signed]) == 0
    assert capsys.readouterr().out.strip() == f"lobby: {members.names[1]}"
    assert main([*group, "list", "--store", sim_store_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"groups": {"lobby": members.names[1:]}}
