"""Issue 19, finding 5, through a real agent on a real Mosquitto: a rollback instruction works
once (its generation is spent) and never undoes a later install, and a retained signed abort
rollback is not re-applied at boot after a newer deploy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import (
    REPO,
    Client,
    make_pack,
    rollback_authorization,
    wait_for,
    wait_online,
)
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
X = [[0.5] * 8]
REFUSED_5 = {
    "generation": 5,
    "rollout": "r-v2",
    "model": {"name": "tiny", "version": 1},
    "outcome": "refused",
    "reason": None,
}


def _served(client: Client, prefix: str) -> int:
    answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}})
    assert answer["ok"] is True, answer
    return int(answer["model"]["version"])


def _until_served(client: Client, prefix: str, version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (served := _served(client, prefix)) != version:
        assert time.monotonic() < deadline, f"serves v{served}, expected v{version}"
        time.sleep(0.3)


def test_a_rollback_sent_again_after_a_later_deploy_is_refused(
    agent_factory: Any, client: Client, broker: Mosquitto, pack_v1: Path, pack_v2: Path,
    topic_prefix: str, keys: tuple[Path, Path], tmp_path: Path, mlp_model: Path,
) -> None:  # fmt: skip
    pack_v3 = make_pack(tmp_path / "v3", mlp_model, keys[0], 3)
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v2)})["ok"]
    sent = client.collect(f"{topic_prefix}/dev-a/cmd/rollback")
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "rollback", "--device", "dev-a", "--name", "tiny",
         "--version", "1", "--key", str(keys[0]), "--broker", broker.url, "--prefix",
         topic_prefix, "--timeout", "30"],
        capture_output=True, text=True, cwd=REPO, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0 and '"outcome": "rolled_back"' in done.stdout, done.stderr
    assert _served(client, topic_prefix) == 1
    authorization = json.loads(sent.get(timeout=5).payload)["authorization"]
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v3)})["ok"]
    assert _served(client, topic_prefix) == 3
    # The legitimate operator's authorization, captured and sent again under a new command id.
    replay = {"name": "tiny", "version": 1, "authorization": authorization}
    reply = client.request(f"{topic_prefix}/dev-a/cmd/rollback", replay)
    assert reply["ok"] is False and "not newer than generation" in reply["error"], reply
    assert _served(client, topic_prefix) == 3
    state = json.loads((tmp_path / "agent" / "state.json").read_text())
    assert state["rollback_generation"] >= 1 and state["current"].startswith("tiny-v3-")


def test_a_retained_abort_rollback_is_not_reapplied_at_boot_after_a_newer_deploy(
    agent_factory: Any, client: Client, pack_v1: Path, pack_v2: Path,
    topic_prefix: str, keys: tuple[Path, Path], tmp_path: Path, mlp_model: Path,
) -> None:  # fmt: skip
    pack_v4 = make_pack(tmp_path / "v4", mlp_model, keys[0], 4)
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    desired = f"{topic_prefix}/dev-a/desired"
    update = {"model": {"name": "tiny", "version": 2}, "url": str(pack_v2), "generation": 4}
    client.publish(desired, {"schema_version": 1, **update, "rollout": "r-v2"}, retain=True)
    _until_served(client, topic_prefix, 2)
    # The rollout aborts: its signed rollback to v1 stays retained on the desired topic.
    signed = rollback_authorization(
        keys[0], "dev-a", "tiny", 1, rollout="r-v2", generation=5, leaves=2
    )
    abort = {"schema_version": 1, "model": {"name": "tiny", "version": 1}, "generation": 5}
    abort.update(rollback=True, rollout="r-v2", authorization=signed)
    client.publish(desired, abort, retain=True)
    _until_served(client, topic_prefix, 1)
    # Later, the operator deploys v4 by command: the retained desired state still says v1.
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v4)})["ok"]
    assert _served(client, topic_prefix) == 4
    assert agent.stop() == 0
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    agent.start()
    wait_online(client, topic_prefix, "dev-a", version=4)
    wait_for(  # the device looked at the retained document, and let it be
        telemetry,
        lambda batch: any(
            r["data"].get("event") == "desired_not_newer" for r in batch.get("records", [])
        ),
    )
    # The echo of this boot (the retained status of the last one said rolled_back).
    statuses = client.collect(f"{topic_prefix}/dev-a/status")
    status = wait_for(
        statuses, lambda d: (d.get("applied") or {}) | {"reason": None} == {**REFUSED_5}
    )
    assert "not newer than the last desired state" in status["applied"]["reason"]
    assert _served(client, topic_prefix) == 4
    state = json.loads((tmp_path / "agent" / "state.json").read_text())
    assert (state["desired_generation"], state["rollback_generation"]) == (5, 5)
