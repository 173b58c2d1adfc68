"""Staged rollouts to real edge agents (each in its own process) over a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_sync.protocol import Topics
from cloud_sync.registry import Registry
from cloud_sync.rollout_state import load_state
from cloud_sync.store import open_store
from cloud_sync.watch import FleetWatch
from edgebento.cli import main
from modelpack import Samples, create_pack
from tests.support import models
from tests.support.services import Mosquitto, MotoS3

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = "import sys; from edgebento.cli import main; sys.exit(main())"


def make_pack(out: Path, model: Path, key: Path, version: int, broken: bool = False) -> Path:
    inputs, outputs = models.golden_samples(model)
    if broken:  # golden outputs the model does not reproduce: the health check must fail
        outputs = {name: value + 1.0 for name, value in outputs.items()}
    create_pack(model, out, name="tiny", version=version, samples=Samples(inputs, outputs), key=key)
    return out


class Agent:
    def __init__(
        self,
        broker: Mosquitto,
        root: Path,
        device: str,
        pub: Path,
        prefix: str,
        store: str,
        pack: Path,
        env: dict[str, str],
    ) -> None:
        self.device, self.log = device, root / f"{device}.log"
        self.cmd = [
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--device",
            device,
            "--broker",
            broker.url,
            "--data-dir",
            str(root / device),
            "--trust",
            str(pub),
            "--prefix",
            prefix,
            "--store",
            store,
            "--pack",
            str(pack),
            "--telemetry-interval",
            "0.5",
        ]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        self.proc = subprocess.Popen(
            self.cmd, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture
def fleet(
    broker: Mosquitto,
    tmp_path: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
    mlp_model: Path,
    s3_server: MotoS3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., list[Agent]]]:
    """Publish v1 and v2 (of ``v2_model`` when given) to the store and start agents serving v1."""
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store_url = f"s3://{s3_bucket}/fleet"
    agents: list[Agent] = []

    def start(
        devices: list[str], broken_v2: bool = False, v2_model: Path | None = None
    ) -> list[Agent]:
        registry = Registry(open_store(store_url))
        v1 = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
        registry.publish(v1, key=keys[0])
        v2 = make_pack(tmp_path / "v2", v2_model or mlp_model, keys[0], 2, broken_v2)
        registry.publish(v2, key=keys[0])
        for device in devices:
            agents.append(
                Agent(broker, tmp_path, device, keys[1], topic_prefix, store_url, v1, env).start()
            )
        wait_versions(broker, topic_prefix, dict.fromkeys(devices, 1))
        return agents

    start.store_url = store_url  # type: ignore[attr-defined]
    yield start
    for agent in agents:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


def wait_versions(
    broker: Mosquitto, prefix: str, want: dict[str, int], timeout: float = 60
) -> None:
    with FleetWatch(broker.url, Topics(prefix), set(want)) as watch:
        deadline = time.monotonic() + timeout
        while True:
            have = {
                d: s.model.version if s.model and s.state == "online" else None
                for d, s in watch.statuses.items()
            }
            if all(have.get(d) == v for d, v in want.items()):
                return
            assert time.monotonic() < deadline, f"devices report {have}, expected {want}"
            watch.wait(0.5)


def rollout_ids(store_url: str) -> list[str]:
    return [k.split("/")[1].removesuffix(".json") for k in open_store(store_url).list("rollouts/")]


def test_rollout_across_three_devices_completes_and_survives_a_restart(
    fleet: Callable[..., list[Agent]],
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet(["a", "b", "c"])
    store_url = fleet.store_url  # type: ignore[attr-defined]
    base = ["--store", store_url, "--broker", broker.url, "--prefix", topic_prefix, "--bake", "0"]
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
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "rollout.log").open("ab"),
    )
    deadline = time.monotonic() + 60
    while True:
        ids = rollout_ids(store_url)
        if ids and load_state(open_store(store_url), ids[0]).current_wave >= 1:
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
    fleet: Callable[..., list[Agent]],
    broker: Mosquitto,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
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
            "--timeout",
            "60",
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
    assert desired.model.version == 1 and desired.model_dump().get("rollback") is True


def test_offline_device_catches_up_from_its_retained_desired_state(
    fleet: Callable[..., list[Agent]],
    broker: Mosquitto,
    topic_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agents = fleet(["a", "b"])
    store_url = fleet.store_url  # type: ignore[attr-defined]
    agents[1].stop()  # b goes offline (its status says so) before the rollout
    base = ["--store", store_url, "--broker", broker.url, "--prefix", topic_prefix, "--bake", "0"]
    assert (
        main(["rollout", "tiny", "2", *base, "--devices", "a,b", "--timeout", "60", "--json"]) == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["phase"] == "completed" and "offline" in shown["reason"]
    assert {d["device"]: d["state"] for d in shown["devices"]} == {"a": "done", "b": "offline"}
    agents[1].start()  # reconnects, finds its retained desired state, updates
    wait_versions(broker, topic_prefix, {"a": 2, "b": 2})
    assert main(["rollout", "resume", shown["id"], *base, "--wait", "--timeout", "30"]) == 0
