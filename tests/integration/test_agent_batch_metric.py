"""The agent's ``edgebento_batch_size`` counts its model runs, as BentoML's does: one observation
per run, of the rows it ran, on every path that runs the model (MQTT, the local HTTP endpoint in
tensor JSON and OIP, pipelines); a refused request runs nothing and is not counted. ``GET
/metadata``'s ``batches`` says the same (it counted only the Batcher's runs, and stayed 0 here)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import Client, wait_for, wait_online
from tests.support.services import free_port, wait_for_port


def _batch_size(port: int) -> dict[str, float]:
    """The histogram's samples from the agent's /metrics: ``count``, ``sum`` and each ``le``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "edgebento_batch_size":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found[sample.labels["le"]] = sample.value
            else:
                found[sample.name.rsplit("_", 1)[1]] = sample.value
    assert found, "the agent does not export edgebento_batch_size"
    return found


def _metadata_batches(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=10) as response:
        return dict(json.loads(response.read())["batches"])


def _post(port: int, path: str, doc: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_every_model_run_of_the_agent_is_one_batch_size_observation_of_its_rows(
    agent_factory: Any, client: Client, pack_v1: Path, topic_prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[agent]
metrics_port = {port}

[[agent.pipelines]]
name = "classify"
input_topic = "{topic_prefix}/sensors/dev-a/reading"
output_topic = "{topic_prefix}/actuators/dev-a/decision"
labels = ["left", "stay", "right"]
"""
    )
    agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    wait_for_port(port)
    before = _batch_size(port)
    assert before["count"] == 0 and before["sum"] == 0, before  # installing ran no request
    assert _metadata_batches(port) == {"count": 0, "rows": 0}

    runs: list[int] = []
    for rows in (1, 3, 5):  # MQTT, tensor JSON
        reply = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [[0.1] * 8] * rows}})
        assert reply["ok"], reply
        runs.append(rows)
    for rows in (2, 1):  # the local endpoint, tensor JSON
        assert _post(port, "/infer", {"inputs": {"x": [[0.2] * 8] * rows}}) == 200
        runs.append(rows)
    oip = {"inputs": [{"name": "x", "shape": [4, 8], "datatype": "FP32", "data": [0.3] * 32}]}
    assert _post(port, "/v2/models/tiny/infer", oip) == 200  # the local endpoint, OIP
    runs.append(4)
    decisions = client.collect(f"{topic_prefix}/actuators/dev-a/decision")
    client.publish(f"{topic_prefix}/sensors/dev-a/reading", [0.3] * 8)  # a pipeline, one row
    assert "label" in wait_for(decisions, lambda d: "label" in d)
    runs.append(1)
    # Refused before the model runs: counted elsewhere (edgebento_input_rejected_total), not here.
    assert _post(port, "/infer", {"inputs": {"x": [[1.0]]}}) == 400
    refused = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": [[1.0, 2.0]]}})
    assert not refused["ok"]

    after = _batch_size(port)
    assert after["count"] == len(runs), (after, runs)
    assert after["sum"] == sum(runs), (after, runs)
    for bound in ("1.0", "2.0", "4.0", "8.0"):
        assert after[bound] == sum(1 for rows in runs if rows <= float(bound)), (bound, after)
    assert _metadata_batches(port) == {"count": len(runs), "rows": sum(runs)}
