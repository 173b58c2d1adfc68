from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import AgentConfig, PipelineConfig
from edge_agent.inference import InferenceService
from edge_agent.pipelines import Pipeline
from edge_agent.updater import HealthCheckError, Updater
from modelpack import Samples, create_pack, write_archive
from modelpack.errors import InputError, IntegrityError, VersionError
from tests.support import models


def _pack(out: Path, model: Path, key: Path, version: int, wrong: bool = False) -> Path:
    inputs, outputs = models.golden_samples(model)
    if wrong:
        outputs = {k: v * 2 + 1 for k, v in outputs.items()}
    create_pack(model, out, name="tiny", version=version, samples=Samples(inputs, outputs), key=key)
    return out


@pytest.fixture
def setup(
    tmp_path: Path, keys: tuple[Path, Path]
) -> tuple[Updater, InferenceService, list[dict[str, Any]]]:
    config = AgentConfig(device="d1", data_dir=tmp_path / "data", trust=[keys[1]])
    inference = InferenceService()
    events: list[dict[str, Any]] = []
    return Updater(config, inference, events.append), inference, events


def test_boot_installs_the_pack_then_deploys_verify_and_rollback(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, events = setup
    updater.boot(_pack(tmp_path / "v1", mlp_model, keys[0], 1))
    assert inference.model_ref == {"name": "tiny", "version": 1}
    archive = write_archive(_pack(tmp_path / "v2", mlp_model, keys[0], 2), tmp_path / "v2.tar.gz")
    result = updater.deploy_url(f"file://{archive}")
    assert result["outcome"] == "installed" and result["health"]["golden"] == "ok"
    assert inference.model_ref == {"name": "tiny", "version": 2}
    state = json.loads(updater.state_file.read_text())
    assert state["current"].startswith("tiny-v2-") and state["history"][0].startswith("tiny-v1-")
    assert updater.deploy_url(str(tmp_path / "v2"))["outcome"] == "unchanged"
    with pytest.raises(VersionError, match="explicit rollback"):
        updater.deploy_url(str(tmp_path / "v1"))
    assert updater.rollback()["outcome"] == "rolled_back"
    assert inference.model_ref == {"name": "tiny", "version": 1}
    assert [e["outcome"] for e in events] == [
        "installed",
        "installed",
        "unchanged",
        "refused",
        "rolled_back",
    ]
    assert not list(updater.staging_dir.iterdir())


def test_a_failing_health_check_keeps_the_old_model_live(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, events = setup
    updater.boot(_pack(tmp_path / "v1", mlp_model, keys[0], 1))
    with pytest.raises(HealthCheckError, match="still serving tiny v1"):
        updater.deploy_url(str(_pack(tmp_path / "v2", mlp_model, keys[0], 2, wrong=True)))
    assert inference.model_ref == {"name": "tiny", "version": 1}
    assert events[-1]["outcome"] == "rolled_back"
    assert [p.name.split("-")[1] for p in updater.packs_dir.iterdir()] == ["v1"]


def test_a_pack_tampered_on_the_device_is_refused_at_boot(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, _inference, events = setup
    updater.boot(_pack(tmp_path / "v1", mlp_model, keys[0], 1))
    updater.deploy_url(str(_pack(tmp_path / "v2", mlp_model, keys[0], 2)))
    live = updater.packs_dir / json.loads(updater.state_file.read_text())["current"]
    (live / "samples.npz").write_bytes(b"changed")
    again = Updater(updater.config, InferenceService(), events.append)
    again.boot(None)  # falls back to the previous good pack
    assert again.inference.model_ref == {"name": "tiny", "version": 1}
    assert events[-1]["event"] == "boot_refused" and "the manifest says" in events[-1]["error"]
    with pytest.raises(IntegrityError):
        again._verify(live)


def test_inference_counts_and_a_pipeline_decides(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, _ = setup
    updater.boot(_pack(tmp_path / "v1", mlp_model, keys[0], 1))
    answer = inference.infer({"inputs": {"x": [[0.0] * 8]}})
    assert set(answer["outputs"]) == {"logits", "probs"}
    with pytest.raises(InputError):
        inference.infer({"inputs": {"x": [[0.0] * 3]}})
    snap = inference.stats.snapshot()
    assert snap["ok"] == 1 and snap["rejected"] == {"shape": 1} and sum(snap["latency_counts"]) == 1
    sent: list[tuple[str, bytes]] = []
    pipe = Pipeline(
        PipelineConfig(
            name="p", input_topic="in", output_topic="out", labels=["a", "b", "c"], threshold=0.0
        ),
        inference,
        lambda t, p: sent.append((t, p)),
    )
    pipe.handle(json.dumps([1.0] * 8).encode())
    pipe.handle(b"not json")
    result = json.loads(sent[0][1])
    probs = np.asarray(result["outputs"]["probs"][0])
    assert result["label"] == "abc"[int(np.argmax(probs))] and pipe.failed == 1


def test_rollback_to_prefers_the_kept_copy_else_fetches_exactly_that_version(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, events = setup
    v1 = _pack(tmp_path / "v1", mlp_model, keys[0], 1)
    updater.boot(v1)
    updater.deploy_url(str(_pack(tmp_path / "v2", mlp_model, keys[0], 2)))
    kept = updater.rollback_to("tiny", 1)  # no url and no store: only the kept copy can serve
    assert kept["outcome"] == "rolled_back" and "kept on the device" in kept["message"]
    assert inference.model_ref == {"name": "tiny", "version": 1}
    assert json.loads(updater.state_file.read_text())["history"] == []

    updater.deploy_url(str(tmp_path / "v2"))
    kept_dir = next(p for p in updater.packs_dir.iterdir() if p.name.startswith("tiny-v1-"))
    (kept_dir / "model.onnx").write_bytes(b"tampered on the device")
    with pytest.raises(VersionError, match="not the tiny v1 the rollback asks for"):
        updater.rollback_to("tiny", 1, url=str(tmp_path / "v2"))
    assert inference.model_ref == {"name": "tiny", "version": 2}
    fetched = updater.rollback_to("tiny", 1, url=str(v1))
    assert fetched["outcome"] == "rolled_back" and "fetched from" in fetched["message"]
    assert inference.model_ref == {"name": "tiny", "version": 1}
    state = json.loads(updater.state_file.read_text())
    assert state["current"].startswith("tiny-v1-") and state["history"] == []
    assert [e["outcome"] for e in events][-3:] == ["installed", "refused", "rolled_back"]
