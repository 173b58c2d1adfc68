"""Rollback through the retained desired state: a device that was offline when a rollout aborted
goes back when it reconnects, but only when the desired state says ``"rollback": true``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.support.agent import Client, wait_for, wait_online

X = [[0.5] * 8]


def _desired(version: int, rollback: bool, url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": 1, "model": {"name": "tiny", "version": version}}
    if url is not None:
        doc["url"] = url
    if rollback:
        doc.update(rollback=True, rollout="r-aborted")
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
) -> None:
    # dev-a kept v1 as its last good pack; dev-b started on v2 and has to fetch v1.
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-a", pack_v1, pack_v2)
    _on_v2_then_offline(agent_factory, client, topic_prefix, "dev-b", pack_v2, pack_v2)
    v1_source = tmp_path / "v1-in-the-registry"
    shutil.copytree(pack_v1, v1_source)
    shutil.rmtree(pack_v1)  # dev-a must use its kept copy: there is nothing else to fetch
    # The rollout aborts while both are offline: the cloud sets v1 back, on purpose.
    client.publish(f"{topic_prefix}/dev-a/desired", _desired(1, rollback=True), retain=True)
    client.publish(
        f"{topic_prefix}/dev-b/desired", _desired(1, True, url=str(v1_source)), retain=True
    )
    telemetry = client.collect(f"{topic_prefix}/+/telemetry")
    for device, how in (("dev-a", "kept on the device"), ("dev-b", "fetched from")):
        agent_factory(pack=pack_v2, device=device, data_dir=tmp_path / f"data-{device}")
        status = wait_online(client, topic_prefix, device, version=1)
        assert status["last_update"]["outcome"] == "rolled_back"
        assert status["last_update"]["trigger"] == "desired"
        assert how in status["last_update"]["message"]
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
    assert "lower than the running v2" in refused["last_update"]["message"]
    assert _served_version(client, topic_prefix, "dev-a") == 2
