"""The agent classifies run failures as the serving core does (issue 18, finding 6), and its
telemetry, what a rollout reads, follows: through a real agent process and Mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.support import fault_models
from tests.support.agent import Client, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.services import Mosquitto

GOOD = {"a": [[6, 4]], "b": [[3, 2]]}
ZERO = {"a": [[6, 4]], "b": [[0, 2]]}


def test_a_division_by_zero_is_the_clients_on_the_agent_and_no_error_in_its_telemetry(
    agent_factory: Any,
    client: Client,
    broker: Mosquitto,
    topic_prefix: str,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    from modelpack import Samples, create_pack

    model = fault_models.divide(tmp_path / "divide.onnx")
    inputs = {k: np.array(v, np.int64) for k, v in GOOD.items()}
    samples = Samples(inputs, {"y": np.array([[2, 2]], np.int64)})
    create_pack(model, tmp_path / "pack", name="divide", version=1, samples=samples, key=keys[0])
    watch = DeviceWatch(broker, topic_prefix, "dev-a")
    try:
        agent_factory(pack=tmp_path / "pack")
        wait_online(client, topic_prefix, "dev-a")
        infer = f"{topic_prefix}/dev-a/infer"
        first = client.request(infer, {"inputs": ZERO})  # the first request the model sees
        assert first["ok"] is False and first["reason"] == "invalid", first
        assert "division by zero" in first["error"]
        ok = client.request(infer, {"inputs": GOOD})
        assert ok["ok"] is True and ok["outputs"]["y"] == [[2, 2]]
        for _ in range(20):
            assert client.request(infer, {"inputs": ZERO})["reason"] == "invalid"
        watch.wait(lambda rs: watch.rejected("invalid") >= 21)
        inference = [r["data"] for r in watch.records if r["kind"] == "inference"]
        assert sum(d["errors"] for d in inference) == 0, inference
        assert sum(d["ok"] for d in inference) == 1
    finally:
        watch.close()
