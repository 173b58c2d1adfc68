"""Local state, secrets, the clock and version trust through a real agent (findings 3, 4, 8-10).

On main: a corrupt ``telemetry.db`` or ``commands.db`` kept the agent from starting; a failed
``state.json`` write left v2 serving while the state said v1; a presigned URL of a failed deploy
went into telemetry and the retained status; an installed pack that expired refused to load
after a reboot; a pack without golden samples skipped its health check; A v2, then B v1, then
A v1 installed A v1; and a status naming another device was believed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from modelpack import create_pack
from tests.support.agent import (
    REPO,
    AgentProcess,
    Client,
    expiring_pack,
    wait_for,
    wait_online,
)
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
X = [[0.5] * 8]


def test_corrupt_local_databases_are_quarantined_and_the_agent_starts(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    data = tmp_path / "agent"
    data.mkdir()
    for name in ("telemetry.db", "commands.db"):
        (data / name).write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 4000)
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    assert client.request(f"{topic_prefix}/dev-a/cmd/ping", {})["pong"] is True
    files: set[str] = set()

    def quarantined(batch: dict[str, Any]) -> bool:
        for r in batch["records"]:
            if r["data"].get("event") == "state_quarantined":
                files.add(r["data"]["file"].split(".corrupt-")[0])
        return files == {"telemetry.db", "commands.db"}

    wait_for(telemetry, quarantined)
    assert len(list(data.glob("*.corrupt-*"))) >= 2


def test_a_state_file_that_cannot_be_written_keeps_the_old_model_and_state(
    agent_factory: Any, client: Client, pack_v1: Path, pack_v2: Path, topic_prefix: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    (tmp_path / "agent" / ".state.json.tmp").mkdir()  # the next state write fails for real
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v2)})
    assert reply["ok"] is False and "still serving tiny v1" in reply["error"]
    assert (
        client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["model"]["version"] == 1
    )
    assert agent.stop() == 0
    agent_factory(pack=pack_v1)  # a restart serves what the state says: v1, as before
    wait_online(client, topic_prefix, "dev-a", version=1)


def test_secrets_never_reach_replies_status_or_telemetry(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str
) -> None:
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    status = client.collect(f"{topic_prefix}/dev-a/status")
    url = ("http://user:hunter2@127.0.0.1:9/p.tar.gz?X-Amz-Credential=AKIASECRET"
           "&X-Amz-Signature=deadbeefsecret")  # fmt: skip
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": url})
    assert reply["ok"] is False
    seen = [json.dumps(reply)]
    seen.append(json.dumps(wait_for(status, lambda d: d.get("last_update"))))
    seen.append(
        json.dumps(wait_for(telemetry, lambda b: any(r["kind"] == "update" for r in b["records"])))
    )
    assert agent.stop() == 0
    seen.append(agent.output())
    for text in seen:
        assert "hunter2" not in text and "SECRET" not in text and "deadbeef" not in text, text


def test_sync_never_prints_the_broker_password(auth_broker: Mosquitto, tmp_path: Path) -> None:
    url = f"mqtt://admin:wrong-secret-pw@127.0.0.1:{auth_broker.port}"
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "sync", "--broker", url, "--store", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "wrong-secret-pw" not in done.stdout + done.stderr
    assert "admin:***@" in done.stderr


def test_a_pack_that_expired_after_install_keeps_serving_across_a_reboot(
    agent_factory: Any, client: Client, mlp_model: Path, keys: tuple[Path, Path],
    topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    agents: list[AgentProcess] = []

    def boot(pack: Path) -> bool:
        agents.append(agent_factory(pack=pack, data_dir=tmp_path / f"agent-{len(agents)}"))
        status = wait_online(client, topic_prefix, "dev-a")  # after its boot's install
        if status.get("model") is None:  # it came after the pack had expired: refused
            assert "expired at" in status["last_update"]["message"], status
            assert agents[-1].stop() == 0
            return False
        return True

    expiring_pack(tmp_path / "e1", mlp_model, keys[0], 1, boot)  # and it expired since
    agent = agents[-1]
    assert agent.stop() == 0
    agent_factory(pack=agent.pack, data_dir=agent.data_dir)  # on main: "expired", went dark
    status = wait_online(client, topic_prefix, "dev-a", version=1)
    assert status["expired"] is True
    assert client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["ok"] is True


def test_a_pack_without_samples_is_health_checked_and_versions_are_marked_per_name(
    agent_factory: Any, client: Client, mlp_model: Path, keys: tuple[Path, Path],
    pack_v1: Path, topic_prefix: str, tmp_path: Path,
) -> None:  # fmt: skip
    def plain(name: str, version: int) -> Path:
        out = tmp_path / f"{name}{version}"
        create_pack(mlp_model, out, name=name, version=version, key=keys[0])
        return out

    agent_factory(pack=plain("A", 2))
    wait_online(client, topic_prefix, "dev-a")
    cmd = f"{topic_prefix}/dev-a/cmd/deploy"
    b1 = client.request(cmd, {"url": str(plain("B", 1))})
    assert b1["ok"] is True and b1["health"]["synthesized"] == "ok"  # on main: no check at all
    a1 = client.request(cmd, {"url": str(plain("A", 1))})
    assert a1["ok"] is False and "highest A" in a1["error"]  # on main: A v1 installed
    assert (
        client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["model"]["name"] == "B"
    )


def test_fleet_status_takes_identity_from_the_topic(
    fleet: Any, broker: Mosquitto, topic_prefix: str, client: Client,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from edgebento.cli import main

    fleet(["dev-x", "dev-y"])
    lie = {"schema_version": 1, "device": "dev-y", "state": "offline",
           "model": {"name": "tiny", "version": 9}, "ts": time.time() + 10}  # fmt: skip
    client.publish(f"{topic_prefix}/dev-x/status", lie, retain=True)
    client.publish(f"{topic_prefix}/dev-x/telemetry", b"\xff not json")
    args = ["fleet", "status", "--broker", broker.url, "--prefix", topic_prefix, "--json"]
    assert main([*args, "--listen", "1"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert devices["dev-y"]["state"] == "online" and devices["dev-y"]["version"] == 1
    client.publish(f"{topic_prefix}/dev-x/status", b"", retain=True)
