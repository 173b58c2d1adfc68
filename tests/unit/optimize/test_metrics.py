"""Fidelity where the output is used: masks, pooled cosine, --metric and user metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelpack.errors import ConfigError
from optimize import metrics, optimize_model


def _tokens(rows: int = 4, tokens: int = 6, hidden: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.zeros((rows, tokens), np.int64)
    for r in range(rows):
        mask[r, : 2 + r % 3] = 1
    return rng.standard_normal((rows, tokens, hidden)).astype(np.float32), mask


def test_padding_is_masked_and_pooled_cosine_decides() -> None:
    ref, mask = _tokens()
    noisy = ref.copy()
    noisy[mask == 0] = np.random.default_rng(1).standard_normal((int((mask == 0).sum()), 8))
    outputs = {"last_hidden_state": ref}
    inputs = {"input_ids": mask * 5, "attention_mask": mask}
    plan = metrics.plan([], outputs, metrics.mask_input(inputs), labels=False)
    assert [(s.name, s.decides) for s in plan] == [
        ("pooled-cosine", True),
        ("cosine", False),
        ("max-abs", False),
    ]
    scores = metrics.evaluate(plan, outputs, {"last_hidden_state": noisy}, inputs, None, 0.01)
    # Noise on padding only: every real-token figure is exact.
    assert all(s.ok for s in scores)
    assert {s.metric: round(s.value, 6) for s in scores}["pooled-cosine@min"] == 1.0
    # Without the mask the same noise sinks the cosine: what the 0.93 came from.
    unmasked = metrics.evaluate(
        [metrics.MetricSpec("cosine", "last_hidden_state")],
        outputs,
        {"last_hidden_state": noisy},
        {"input_ids": mask},
        None,
        0.01,
    )
    assert unmasked[0].value < 0.9


def test_spec_parsing() -> None:
    spec = metrics.MetricSpec.parse("logits=max-abs@max<=0.5")
    assert (spec.output, spec.name, spec.reduction, spec.bound) == ("logits", "max-abs", "max", 0.5)
    assert metrics.MetricSpec.parse("first-token-cosine").output is None
    bare = metrics.MetricSpec.parse("max-abs<=0.5")  # a bound without an output
    assert (bare.output, bare.name, bare.bound) == (None, "max-abs", 0.5)
    with pytest.raises(ConfigError, match="unknown metric 'cosin'"):
        metrics.MetricSpec.parse("cosin")
    with pytest.raises(ConfigError, match="cannot import"):
        metrics.MetricSpec.parse("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="reduction"):
        metrics.MetricSpec.parse("cosine@median")


def test_a_user_metric_decides_and_the_report_says_so(
    wide_mlp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_metrics.py").write_text(
        "import numpy as np\n"
        "def margin_agreement(reference, candidate, context):\n"
        "    # share of rows whose top class wins by the same margin (to 0.05)\n"
        "    def margin(x):\n"
        "        top = np.sort(x, axis=-1)\n"
        "        return top[:, -1] - top[:, -2]\n"
        "    return np.abs(margin(reference) - margin(candidate)) < 0.05\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    result = optimize_model(
        wide_mlp,
        tmp_path / "pack",
        name="mlp",
        version=1,
        data=tmp_path / "data.npz",
        prune="off",
        quantize="dynamic",
        metrics=["logits=my_metrics:margin_agreement"],
        progress=False,
        cache=tmp_path / "cache",
        latency_seconds=0.1,
    )
    report = json.loads(result.report_json.read_text())
    assert report["decided_by"] == ["logits my_metrics:margin_agreement@mean"]
    assert "my_metrics:margin_agreement" in report["budget"]
    for row in report["candidates"]:
        assert row["fidelity"]["decided_by"] == "logits my_metrics:margin_agreement@mean"
    assert "decided by logits my_metrics:margin_agreement@mean" in result.report_html.read_text()


def test_the_prune_cache_changes_with_the_data_alone(wide_mlp: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    runs = []
    for i in range(2):
        np.savez(tmp_path / f"d{i}.npz", x=rng.standard_normal((48, 16)).astype(np.float32))
        result = optimize_model(
            wide_mlp,
            tmp_path / f"pack{i}",
            name="mlp",
            version=1,
            data=tmp_path / f"d{i}.npz",
            prune=0.5,
            quantize="off",
            progress=False,
            cache=tmp_path / "cache",
            latency_seconds=0.1,
        )
        steps = json.loads(result.report_json.read_text())["footprint"]
        runs.append([s for s in steps if s["name"] == "prune"])
    assert runs[0][0]["cached"] is False
    # Same model, same config, other data: pruning is computed again, not reused.
    assert runs[1][0]["cached"] is False
