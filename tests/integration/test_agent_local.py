"""The perceive-decide-act loop from a TOML config file, and the local HTTP endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.agent import Client, wait_for, wait_online
from tests.support.promtool import assert_promtool_passes
from tests.support.services import free_port, wait_for_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_pipeline_from_the_config_file_turns_readings_into_actions(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[agent]
metrics_port = {port}
groups = ["lab"]

[[agent.pipelines]]
name = "classify"
input_topic = "{topic_prefix}/sensors/dev-a/reading"
output_topic = "{topic_prefix}/actuators/dev-a/decision"
labels = ["left", "stay", "right"]
"""
    )
    agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    decisions = client.collect(f"{topic_prefix}/actuators/dev-a/decision")
    client.publish(f"{topic_prefix}/sensors/dev-a/reading", [0.3] * 8)
    decision = wait_for(decisions, lambda d: "label" in d)
    assert decision["label"] in ("left", "stay", "right") and 0 < decision["score"] <= 1
    assert decision["model"] == {"name": "tiny", "version": 1}
    client.publish(f"{topic_prefix}/sensors/dev-a/reading", {"values": [0.1] * 8})
    assert wait_for(decisions, lambda d: "label" in d)["pipeline"] == "classify"

    # A group command reaches the device too.
    assert client.request(f"{topic_prefix}/group/lab/cmd/ping", {})["device"] == "dev-a"

    wait_for_port(port)
    base = f"http://127.0.0.1:{port}"
    status, answer = _post(f"{base}/infer", json.dumps({"inputs": {"x": [[0.2] * 8]}}).encode())
    assert status == 200 and answer["model"]["version"] == 1
    status, refused = _post(f"{base}/infer", b'{"inputs": {"x": [[1]]}}')
    assert status == 400 and refused["reason"] == "shape"
    status, metrics = _get(f"{base}/metrics")
    text = metrics.decode()
    assert status == 200
    assert 'edgebento_model_info{name="tiny",version="1"} 1.0' in text
    assert 'edgebento_input_rejected_total{reason="shape"} 1.0' in text
    assert "edgebento_inference_seconds_count" in text
    assert_promtool_passes(text)
    status, health = _get(f"{base}/healthz")
    assert status == 200 and json.loads(health)["model"]["name"] == "tiny"
