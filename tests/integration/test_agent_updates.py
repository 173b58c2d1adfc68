"""Verified updates: bad packs refused while the old one serves; failing golden samples roll back;
the retained desired state is reconciled on connect; a restart serves what was installed."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support import models
from tests.support.agent import Client, make_pack, wait_for, wait_online

X = [[0.5] * 8]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _tampered(tmp: Path, model: Path, key: Path) -> Path:
    pack = make_pack(tmp / "tampered", model, key, 5)
    _flip_byte(pack / "model.onnx")
    return pack


def _expired(tmp: Path, model: Path, key: Path) -> Path:
    # Signed while valid, expired by the time it is deployed.
    return make_pack(
        tmp / "expired", model, key, 5, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )


def _unsigned(tmp: Path, model: Path, key: Path) -> Path:
    return make_pack(tmp / "unsigned", model, None, 5)


def _foreign(tmp: Path, model: Path, key: Path) -> Path:
    from modelpack import generate_keypair

    other_key, _ = generate_keypair(tmp / "other-keys")
    return make_pack(tmp / "foreign", model, other_key, 5)


@pytest.mark.parametrize(
    ("build", "error_type", "words"),
    [
        (_tampered, "IntegrityError", "does not match its sha256"),
        (_expired, "ExpiredError", "expired"),
        (_unsigned, "SignatureError", "not signed"),
        (_foreign, "SignatureError", ""),
    ],
    ids=["tampered", "expired", "unsigned", "untrusted-key"],
)
def test_a_bad_pack_is_refused_and_the_old_one_keeps_serving(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    build: Any,
    error_type: str,
    words: str,
) -> None:
    bad = build(tmp_path, mlp_model, keys[0])
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": f"file://{bad}"})
    assert reply["ok"] is False and reply["error_type"] == error_type
    assert words in reply["error"]
    answer = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})
    assert answer["ok"] is True and answer["model"] == {"name": "tiny", "version": 1}


def test_a_downgrade_is_refused_but_an_explicit_rollback_is_not(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
) -> None:
    agent_factory(pack=pack_v2)
    wait_online(client, topic_prefix, "dev-a", version=2)
    down = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(pack_v1)})
    assert down["ok"] is False and down["error_type"] == "VersionError"
    assert "not above v2, the highest tiny this device installed" in down["error"]
    assert (
        client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["model"]["version"] == 2
    )


def test_a_pack_failing_its_golden_samples_is_rolled_back_automatically(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    # Signed and intact, but its model does not reproduce the outputs it ships with.
    other = models.mlp(tmp_path / "other.onnx", seed=9)
    bad = make_pack(tmp_path / "v2", other, keys[0], 2, wrong_golden=True)
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    status = client.collect(f"{topic_prefix}/dev-a/status")
    telemetry = client.collect(f"{topic_prefix}/dev-a/telemetry")
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": str(bad)})
    assert reply["ok"] is False and reply["error_type"] == "HealthCheckError"
    assert "differs from the golden samples" in reply["error"]
    assert "rolled back automatically; still serving tiny v1" in reply["error"]
    assert (
        client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})["model"]["version"] == 1
    )
    seen = wait_for(status, lambda d: (d.get("last_update") or {}).get("outcome") == "rolled_back")
    assert seen["model"]["version"] == 1
    wait_for(
        telemetry,
        lambda b: any(r["data"].get("outcome") == "rolled_back" for r in b["records"]),
    )


def test_retained_desired_state_is_reconciled_on_connect_and_kept_across_restarts(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    # The rollout happened while the device was off.
    desired = {"schema_version": 1, "model": {"name": "tiny", "version": 2}, "url": str(pack_v2)}
    client.publish(f"{topic_prefix}/dev-a/desired", desired, retain=True)
    agent = agent_factory(pack=pack_v1)
    online = wait_online(client, topic_prefix, "dev-a", version=2)
    assert online["last_update"]["trigger"] == "desired"
    assert agent.stop() == 0
    client.publish(f"{topic_prefix}/dev-a/desired", b"", retain=True)  # clear it
    shutil.rmtree(pack_v2)  # the restart must serve the installed copy, not the source
    agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a", version=2)
    state = json.loads((tmp_path / "agent" / "state.json").read_text())
    assert state["current"].startswith("tiny-v2-") and state["history"][0].startswith("tiny-v1-")


def test_kill_9_during_an_update_leaves_the_old_or_the_new_pack(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    agent = agent_factory(pack=pack_v1)
    wait_online(client, topic_prefix, "dev-a")
    client.publish(f"{topic_prefix}/dev-a/cmd/deploy", {"id": "d1", "url": str(pack_v2)})
    agent.kill9()  # somewhere between "not started" and "done"
    agent_factory(pack=pack_v1)
    online = wait_online(client, topic_prefix, "dev-a")
    assert online["model"]["version"] in (1, 2)
    answer = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}})
    assert answer["ok"] is True
    # A redelivered deploy may still run. The update worker runs deploys one at a time, in
    # order, so this one's reply comes after it finished (installed or unchanged: v2 is the top).
    deploy = {"id": "d2", "url": str(pack_v2)}
    assert client.request(f"{topic_prefix}/dev-a/cmd/deploy", deploy, timeout=60)["ok"]
    assert not list((tmp_path / "agent" / "staging").iterdir())  # no half-staged leftovers
