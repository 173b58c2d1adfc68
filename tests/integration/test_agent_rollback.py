"""Rollback through the retained desired state: a device that was offline when a rollout aborted
goes back when it reconnects, but only when the desired state says ``"rollback": true``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.support.agent import Client, rollback_authorization, wait_for, wait_online

X = [[0.5] * 8]


def _desired(
    version: int,
    rollback: bool,
    url: str | None = None,
    signed: dict[str, Any] | None = None,
    generation: int = 7,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "model": {"name": "tiny", "version": version},
        "generation": generation,
    }
    if url is not None:
        doc["url"] = url
    if rollback:
        doc.update(rollback=True, rollout="r-aborted")
    if signed is not None:
        doc["authorization"] = signed
    return doc


def _served_version(client: Client, prefix: str, device: str) -> int:
    answer = client.request(f"{prefix}/{device}/infer", {"inputs": {"x": X}})
    assert answer["ok"] is True
    return int(answer["model"]["version"])


def _on_v2_then_offline(
    agent_factory: Any, client: Client, prefix: str, device: str, pack: Path, v2: Path
) -> Any:
    """A device that installed v2 (over ``pack``), then went offline."""
    agent = agent_factory(pack=pack, device=device, data_dir=v2.parent / f"data-{device}")
    wait_online(client, prefix, device)
    if pack != v2:
        assert client.request(f"{prefix}/{device}/cmd/deploy", {"url": str(v2)})["ok"] is True
    assert _served_version(client, prefix, device) == 2
    assert agent.stop() == 0
    return agent


def test_an_offline_device_rolls_back_through_the_desired_state_when_it_reconnects(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    # dev-a kept v1 as its last good pack; dev-b started on v2 and has to fetch v1.
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-a", pack_v1, pack_v2)
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-b", pack_v2, pack_v2)
    v1_source = tmp_path / "v1-in-the-registry"
    shutil.copytree(pack_v1, v1_source)
    shutil.rmtree(pack_v1)  # dev-a must use its kept copy: there is nothing else to fetch
    # The rollout aborts while both are offline: the cloud sets v1 back, on purpose.
    for device, url in (("dev-a", None), ("dev-b", str(v1_source))):
        signed = rollback_authorization(keys[0], device, "tiny", 1, rollout="r-aborted", leaves=2)
        doc = _desired(1, True, url=url, signed=signed)
        client.publish(f"{topic_prefix}/{device}/desired", doc, retain=True)
    telemetry = client.collect(f"{topic_prefix}/+/telemetry")
    for device, how in (("dev-a", "kept on the device"), ("dev-b", "fetched from")):
        agent_factory(pack=pack_v2, device=device, data_dir=tmp_path / f"data-{device}")
        status = wait_online(client, topic_prefix, device, version=1)
        assert status["last_update"]["outcome"] == "rolled_back"
        assert status["last_update"]["trigger"] == "desired"
        assert how in status["last_update"]["message"]
        applied = wait_for(
            client.collect(f"{topic_prefix}/{device}/status"), lambda d: d.get("applied")
        )
        assert applied["applied"] == {
            "generation": 7,
            "rollout": "r-aborted",
            "model": {"name": "tiny", "version": 1},
            "outcome": "rolled_back",
        }
        assert _served_version(client, topic_prefix, device) == 1
        state = json.loads((tmp_path / f"data-{device}" / "state.json").read_text())
        assert state["current"].startswith("tiny-v1-")
        wait_for(
            telemetry,
            lambda b, d=device: any(
                r["device"] == d
                and r["kind"] == "update"
                and r["data"].get("outcome") == "rolled_back"
                and r["data"]["model"]["version"] == 1
                for r in b["records"]
            ),
        )


def test_a_lower_desired_version_without_the_rollback_flag_is_refused(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-a", pack_v1, pack_v2)
    client.publish(
        f"{topic_prefix}/dev-a/desired", _desired(1, False, url=str(pack_v1)), retain=True
    )
    agent_factory(pack=pack_v1, device="dev-a", data_dir=tmp_path / "data-dev-a")
    status = client.collect(f"{topic_prefix}/dev-a/status")
    refused = wait_for(status, lambda d: (d.get("last_update") or {}).get("outcome") == "refused")
    assert refused["model"]["version"] == 2
    assert '"rollback": true' in refused["last_update"]["message"]
    assert "not above v2, the highest" in refused["last_update"]["message"]
    assert _served_version(client, topic_prefix, "dev-a") == 2


def test_a_rollback_desired_state_unsigned_or_expired_or_for_another_device_is_refused(
    agent_factory: Any,
    client: Client,
    pack_v1: Path,
    pack_v2: Path,
    topic_prefix: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    """On main, ``"rollback": true`` alone installed any older signed version."""
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-a", pack_v1, pack_v2)
    agent_factory(pack=pack_v1, device="dev-a", data_dir=tmp_path / "data-dev-a")
    wait_online(client, topic_prefix, "dev-a", version=2)
    status = client.collect(f"{topic_prefix}/dev-a/status")
    cases = [
        (None, "needs a signed rollback instruction"),
        (rollback_authorization(keys[0], "dev-a", "tiny", 1, expires_in_s=-1), "expired"),
        (rollback_authorization(keys[0], "dev-z", "tiny", 1), "for device 'dev-z'"),
    ]
    for generation, (signed, why) in enumerate(cases, start=1):
        doc = _desired(1, True, url=str(pack_v1), signed=signed, generation=generation)
        client.publish(f"{topic_prefix}/dev-a/desired", doc, retain=True)
        refused = wait_for(
            status, lambda d, g=generation: (d.get("applied") or {}).get("generation") == g
        )
        assert refused["applied"]["outcome"] == "refused" and why in refused["applied"]["reason"]
        assert refused["model"]["version"] == 2
    assert _served_version(client, topic_prefix, "dev-a") == 2
