"""Staged rollouts to real edge agents (each in its own process) over a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_sync.protocol import Topics
from cloud_sync.rollout_store import load_state
from cloud_sync.store import open_store
from cloud_sync.watch import FleetWatch
from edgebento.cli import main
from tests.support.agent import AgentProcess
from tests.support.fleet import rollout_ids, wait_versions
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from edgebento.cli import main; sys.exit(main())"


def test_rollout_across_three_devices_completes_and_survives_a_restart(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keys: tuple[Path, Path],
) -> None:
    fleet(["a", "b", "c"])
    store_url = fleet.store_url  # type: ignore[attr-defined]
    base = [
        *("--store", store_url, "--broker", broker.url, "--prefix", topic_prefix),
        *("--bake", "0", "--wave-timeout", "30", "--key", str(keys[0]), "--lease-ttl", "5"),
        "--allow-unverified",  # no traffic: nothing to judge their health by
    ]
    # The first run dies by kill -9 after the canary is done; 'resume' carries on from the store.
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "rollout",
            "tiny",
            "2",
            *base,
            "--devices",
            "a,b,c",
            "--canary",
            "30",
            "--waves",
            "1",
            "--bake",  # the canary bakes 3 s before wave 1: the kill lands inside the rollout
            "3",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "rollout.log").open("ab"),
    )
    deadline = time.monotonic() + 60
    while True:
        ids = rollout_ids(store_url)
        if ids and [d.state for d in load_state(open_store(store_url), ids[0]).wave(0)] == ["done"]:
            break
        assert first.poll() is None and time.monotonic() < deadline, (
            tmp_path / "rollout.log"
        ).read_text()
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    state = load_state(open_store(store_url), ids[0])
    assert state.phase == "running" and [d.state for d in state.wave(0)] == ["done"]

    assert main(["rollout", "resume", ids[0], *base, "--wait", "--timeout", "60", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "completed"
    assert {d["device"]: d["state"] for d in shown["devices"]} == dict.fromkeys("abc", "done")
    wait_versions(broker, topic_prefix, {"a": 2, "b": 2, "c": 2})

    assert main(["rollout", "status", ids[0], "--store", store_url]) == 0
    assert "completed" in capsys.readouterr().out


def test_rollout_aborts_on_a_failed_health_check_and_leaves_the_old_version(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
    keys: tuple[Path, Path],
) -> None:
    fleet(["a", "b", "c"], broken_v2=True)
    store_url = fleet.store_url  # type: ignore[attr-defined]
    code = main(
        [
            "rollout",
            "tiny",
            "2",
            "--store",
            store_url,
            "--broker",
            broker.url,
            "--prefix",
            topic_prefix,
            "--devices",
            "a,b,c",
            "--bake",
            "0",
            "--wave-timeout",
            "20",
            "--key",
            str(keys[0]),
            "--json",
        ]
    )
    shown = json.loads(capsys.readouterr().out)
    assert code == 1 and shown["phase"] == "aborted"
    assert "health check failed" in shown["reason"]
    states = {d["device"]: d["state"] for d in shown["devices"]}
    assert states == {"a": "rolled_back", "b": "pending", "c": "pending"}
    wait_versions(broker, topic_prefix, {"a": 1, "b": 1, "c": 1})
    with FleetWatch(broker.url, Topics(topic_prefix), {"a"}) as watch:
        desired = watch.desired["a"]
    assert desired.model.version == 1 and desired.rollback and desired.authorization is not None


def test_offline_device_catches_up_from_its_retained_desired_state(
    fleet: Callable[..., list[AgentProcess]],
    broker: Mosquitto,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
    keys: tuple[Path, Path],
) -> None:
    agents = fleet(["a", "b"])
    store_url = fleet.store_url  # type: ignore[attr-defined]
    agents[1].stop()  # b goes offline (its status says so) before the rollout
    base = [
        *("--store", store_url, "--broker", broker.url, "--prefix", topic_prefix),
        *("--bake", "0", "--wave-timeout", "30", "--key", str(keys[0]), "--lease-ttl", "5"),
        "--allow-unverified",  # no traffic: nothing to judge their health by
    ]
    assert main(["rollout", "tiny", "2", *base, "--devices", "a,b", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "completed" and "offline" in shown["reason"]
    assert {d["device"]: d["state"] for d in shown["devices"]} == {"a": "done", "b": "offline"}
    agents[1].start()  # reconnects, finds its retained desired state, updates
    wait_versions(broker, topic_prefix, {"a": 2, "b": 2})
    assert main(["rollout", "resume", shown["id"], *base, "--wait", "--timeout", "30"]) == 0
