"""``optimize_model`` on a BERT-like model whose LayerNorms have outlier channels.

Dynamic int8 of the model as it is loses the pooled embedding (the outliers take the whole
int8 range of the activations); the smoothed base (optimize.smooth) keeps it. The search must
find that base on its own, judge it on rows it did not calibrate on, and never pick below the
budget, whatever smoothing offers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimize import optimize_model
from optimize.search import smooth_scored
from tests.unit.optimize import tiny_bert


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smooth")
    np.savez(root / "cal.npz", **tiny_bert.tokens(64, 16, seed=1))  # type: ignore[arg-type]
    np.savez(root / "eval.npz", **tiny_bert.tokens(64, 16, seed=2))  # type: ignore[arg-type]
    return {
        "onnx": tiny_bert.build(root / "bert.onnx"),
        "root": root,
        "cache": root / "cache",  # shared: the second run reuses the first one's passes
    }


def _optimize(model: dict[str, Path], out: str, **options: Any) -> list[dict[str, Any]]:
    optimize_model(
        model["onnx"],
        model["root"] / out,
        name="tiny-bert",
        version=1,
        data=model["root"] / "cal.npz",
        eval_data=model["root"] / "eval.npz",
        quantize="dynamic",
        prune="off",
        progress=False,
        cache=model["cache"],
        latency_seconds=0.2,
        time_budget=0,
        **options,
    )
    report = json.loads((model["root"] / out / "report.json").read_text())
    rows: list[dict[str, Any]] = report["candidates"]
    return rows


def test_the_smoothed_base_keeps_the_budget_where_plain_int8_misses(
    model: dict[str, Path],
) -> None:
    rows = {r["candidate"]: r for r in _optimize(model, "pack")}
    smoothed = [n for n in rows if n.startswith("smooth-") and rows[n]["config"]]
    assert smoothed, f"no smoothed candidate among {sorted(rows)}"
    family = smooth_scored().label  # 7-bit weights where this CPU's int8 products saturate
    plain = rows[family]
    assert not plain["within_budget"], plain["violation"]
    best = next(n for n in smoothed if n.endswith(f" + {family}"))
    assert rows[best]["within_budget"], rows[best]["violation"]
    assert rows[best]["fidelity"]["decisive_value"] >= 0.99  # pooled cosine on unseen rows
    base = best.split(" + ")[0]
    assert rows[base]["within_budget"]  # the float smoothed model is the same function
    chosen = [r for r in rows.values() if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["within_budget"]


def test_nothing_below_the_budget_is_picked_even_with_smoothing(model: dict[str, Path]) -> None:
    # A budget no int8 can keep: the pick falls back to a model within it.
    rows = _optimize(model, "strict", metrics=["last_hidden_state=pooled-cosine>=0.99999"])
    assert any(r["candidate"].startswith("smooth-") for r in rows)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["within_budget"]
    assert not chosen[0]["config"].get("mode"), chosen[0]["candidate"]  # float, not int8
    for row in rows:
        if row["config"].get("mode"):
            assert not row["within_budget"]
