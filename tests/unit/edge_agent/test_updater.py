from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config import AgentConfig, PipelineConfig
from edge_agent.inference import InferenceService
from edge_agent.pipelines import Pipeline
from edge_agent.updater import HealthCheckError, Updater
from modelpack import Samples, create_pack, write_archive
from modelpack.errors import ExpiredError, InputError, IntegrityError, PackError, VersionError
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
    config = AgentConfig(
        device="d1", data_dir=tmp_path / "data", trust=[keys[1]], file_roots=[tmp_path]
    )
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
    with pytest.raises(VersionError, match="signed rollback instruction"):
        updater.deploy_url(str(tmp_path / "v1"))
    assert updater.rollback_to("tiny", 1)["outcome"] == "rolled_back"
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
        again.checks.verify(live)


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
        lambda t, p, _not_sent: sent.append((t, p)),
    )
    pipe.handle(json.dumps([1.0] * 8).encode(), 1 << 20, time.monotonic(), False)
    pipe.handle(b"not json", 1 << 20, time.monotonic(), False)
    result = json.loads(sent[0][1])
    probs = np.asarray(result["outputs"]["probs"][0])
    assert result["label"] == "abc"[int(np.argmax(probs))] and pipe.refused == {"invalid_json": 1}


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

    with pytest.raises(VersionError, match="not above v2"):  # the mark stays at 2
        updater.deploy_url(str(tmp_path / "v2"))
    updater.deploy_url(str(_pack(tmp_path / "v3", mlp_model, keys[0], 3)))
    kept_dir = next(p for p in updater.packs_dir.iterdir() if p.name.startswith("tiny-v1-"))
    (kept_dir / "model.onnx").write_bytes(b"tampered on the device")
    with pytest.raises(VersionError, match="not the tiny v1 the rollback asks for"):
        updater.rollback_to("tiny", 1, url=str(tmp_path / "v2"))
    assert inference.model_ref == {"name": "tiny", "version": 3}
    fetched = updater.rollback_to("tiny", 1, url=str(v1))
    assert fetched["outcome"] == "rolled_back" and "fetched from" in fetched["message"]
    assert inference.model_ref == {"name": "tiny", "version": 1}
    state = json.loads(updater.state_file.read_text())
    assert state["current"].startswith("tiny-v1-") and state["history"] == []
    assert [e["outcome"] for e in events][-3:] == ["installed", "refused", "rolled_back"]


def _named(
    out: Path, model: Path, key: Path, name: str, version: int, samples: bool = True
) -> Path:
    inputs, outputs = models.golden_samples(model)
    golden = Samples(inputs, outputs) if samples else None
    create_pack(model, out, name=name, version=version, samples=golden, key=key)
    return out


def test_the_high_water_mark_is_per_name_and_survives_other_names(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, _events = setup
    updater.boot(_named(tmp_path / "a2", mlp_model, keys[0], "A", 2))
    updater.deploy_url(str(_named(tmp_path / "b1", mlp_model, keys[0], "B", 1)))
    with pytest.raises(VersionError, match="highest A"):  # on main, A v1 installed here
        updater.deploy_url(str(_named(tmp_path / "a1", mlp_model, keys[0], "A", 1)))
    assert inference.model_ref == {"name": "B", "version": 1}
    assert json.loads(updater.state_file.read_text())["highest"] == {"A": 2, "B": 1}


def test_rollback_to_matches_the_manifest_exactly_not_a_directory_prefix(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, _events = setup
    updater.boot(_named(tmp_path / "a1", mlp_model, keys[0], "A", 1))
    updater.deploy_url(str(_named(tmp_path / "f3", mlp_model, keys[0], "A-v1-foo", 3)))
    updater.deploy_url(str(_named(tmp_path / "b1", mlp_model, keys[0], "B", 1)))
    updater.rollback_to("A", 1)  # on main, the substring match picked A-v1-foo v3
    assert inference.model_ref == {"name": "A", "version": 1}


def test_a_pack_without_samples_is_health_checked_on_synthesized_inputs(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, _inference, _events = setup
    updater.boot(_named(tmp_path / "a1", mlp_model, keys[0], "A", 1, samples=False))
    result = updater.deploy_url(
        str(_named(tmp_path / "a2", mlp_model, keys[0], "A", 2, samples=False))
    )
    assert result["health"]["synthesized"] == "ok" and result["health"]["median_ms"] >= 0
    updater.config.limits = updater.config.limits.model_copy(update={"latency_budget_ms": 1e-9})
    with pytest.raises(HealthCheckError, match="synthesized batch is over"):
        updater.deploy_url(str(_named(tmp_path / "a3", mlp_model, keys[0], "A", 3, samples=False)))


def test_a_state_file_that_cannot_be_written_leaves_the_old_model_serving(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    updater, inference, _events = setup
    updater.boot(_named(tmp_path / "a1", mlp_model, keys[0], "A", 1))
    updater.state_file.with_name(".state.json.tmp").mkdir()  # the write fails for real
    with pytest.raises(PackError, match=r"cannot record the update.*still serving A v1"):
        updater.deploy_url(str(_named(tmp_path / "a2", mlp_model, keys[0], "A", 2)))
    assert inference.model_ref == {"name": "A", "version": 1}
    assert json.loads(updater.state_file.read_text())["current"].startswith("A-v1-")


def test_an_expired_pack_is_refused_new_but_keeps_serving_once_installed(
    setup: Any, tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    import datetime as dt

    updater, _inference, events = setup
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    inputs, outputs = models.golden_samples(mlp_model)
    pack = tmp_path / "e1"
    create_pack(mlp_model, pack, name="E", version=1,
                       samples=Samples(inputs, outputs), expires_at=soon, key=keys[0])  # fmt: skip
    updater.boot(pack)
    import time

    time.sleep(2.2)
    with pytest.raises(ExpiredError):
        updater.deploy_url(str(pack))  # a new install of an expired pack
    again = Updater(updater.config, InferenceService(), events.append)
    again.boot(None)  # a reboot after expiry: still serving, flagged
    assert again.current is not None and again.expired
    assert events[-1]["event"] == "expired"
    updater.config.refuse_expired = True
    refusing = Updater(updater.config, InferenceService(), events.append)
    refusing.boot(None)
    assert refusing.current is None
