"""baseline.json: built from data through the real model, listed and signed in the manifest,
refused when changed; the reducers for tabular, image, token and class tensors; --monitor specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelpack.baseline import BASELINE_FILE, Baseline, build_baseline, make_baseline, read_baseline
from modelpack.errors import ConfigError, IntegrityError
from modelpack.loader import load_pack
from modelpack.monitor import (
    Binner,
    MonitorSpec,
    TensorInfo,
    default_spec,
    feature_names,
    parse_monitor,
    reduce,
)
from tests.support.agent import make_pack

REPO = Path(__file__).resolve().parents[3]


def test_a_signed_pack_gets_a_baseline_listed_and_signed(
    tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    root = make_pack(tmp_path / "p", mlp_model, keys[0], 1)
    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    baseline = make_baseline(root, {"x": x}, key=keys[0])
    pack = load_pack(root, trusted=[keys[1]])  # signed again over the new listing
    assert pack.manifest.file(BASELINE_FILE) is not None
    names = [f.name for f in baseline.features]
    assert names[:8] == [f"x[{i}]" for i in range(8)]
    assert "probs.class" in names and "probs.confidence" in names
    col = baseline.features[0]
    assert 10 <= len(col.edges) - 1 <= 20  # quantile bins
    assert sum(col.counts) == 3000 and col.counts[0] == col.counts[-1] == 0
    assert col.mean == pytest.approx(float(x[:, 0].mean()), abs=1e-6)
    assert col.std == pytest.approx(float(x[:, 0].std()), rel=1e-5)
    assert col.nan_share == 0 and col.out_of_range_share == 0
    classes = next(f for f in baseline.features if f.name == "probs.class")
    assert classes.kind == "categorical" and sum(classes.frequencies) == pytest.approx(1)
    assert 0.33 < (classes.mean_confidence or 0) <= 1
    assert read_baseline(root) == baseline


def test_a_changed_baseline_is_refused_and_an_old_pack_without_one_loads(
    tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    old = make_pack(tmp_path / "old", mlp_model, keys[0], 1)
    assert read_baseline(load_pack(old, trusted=[keys[1]]).root) is None
    root = make_pack(tmp_path / "p", mlp_model, keys[0], 1)
    make_baseline(root, {"x": np.zeros((50, 8), np.float32)}, key=keys[0])
    doc = json.loads((root / BASELINE_FILE).read_text())
    doc["features"][0]["counts"][1] += 1
    (root / BASELINE_FILE).write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        load_pack(root, trusted=[keys[1]])


def test_pack_create_records_a_baseline_with_monitor_specs(
    tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32))
    out = tmp_path / "pack"
    cli = [sys.executable, "-c", "import sys; from edgebento.cli import main; sys.exit(main())"]
    done = subprocess.run(
        [*cli, "pack", "create", str(mlp_model), "--name", "m", "--version", "1", "--out",
         str(out), "--key", str(keys[0]), "--data", str(data), "--monitor", "x=summary",
         "--monitor", "logits=none"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "baseline: 4 monitored features on 500 rows" in done.stdout
    baseline = read_baseline(load_pack(out, trusted=[keys[1]]).root)
    assert baseline is not None
    assert [f.name for f in baseline.features] == [
        "x.mean", "x.std", "probs.class", "probs.confidence",
    ]  # fmt: skip
    bad = subprocess.run(
        [*cli, "pack", "create", str(mlp_model), "--name", "m", "--version", "1", "--out",
         str(tmp_path / "p2"), "--data", str(data), "--monitor", "x=tokens:unk=abc"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "unk must be a token id" in bad.stderr


def test_image_reducer_gives_channel_stats_and_brightness() -> None:
    img = np.zeros((2, 3, 4, 4), np.float32)
    img[:, 0] = 1.0  # red
    img[1, 2] = 0.5
    spec = MonitorSpec("img", "image")
    assert default_spec(TensorInfo("img", "float32", ["b", 3, 4, 4]), img).reducer == "image"
    names = feature_names(spec, img)
    assert names[:2] == ["img.c0.mean", "img.c0.std"] and names[-1] == "img.brightness"
    values = reduce(spec, img)
    assert values[0, 0] == 1.0 and values[0, -1] == pytest.approx(0.299)
    assert values[1, -1] == pytest.approx(0.299 + 0.114 * 0.5)
    nhwc = np.moveaxis(img, 1, -1)
    assert np.allclose(reduce(MonitorSpec("img", "image", (("channels", "last"),)), nhwc), values)


def test_token_reducer_gives_length_and_unknown_share() -> None:
    ids = np.array([[101, 100, 7, 102, 0, 0], [101, 5, 6, 7, 8, 102]], np.int64)
    spec = default_spec(TensorInfo("input_ids", "int64", ["b", "s"]), ids)
    assert spec.reducer == "tokens"
    assert reduce(spec, ids).tolist() == [[4.0, 0.25], [6.0, 0.0]]
    mask = TensorInfo("attention_mask", "int64", ["b", "s"], mask=True)
    assert default_spec(mask, ids).reducer == "none"


def test_class_reducer_on_logits_and_nan_rows() -> None:
    logits = np.array([[0.0, 2.0, 0.0], [np.nan, 0.0, 0.0]], np.float32)
    out = reduce(MonitorSpec("y", "classes", output=True), logits)
    assert out[0, 0] == 1 and out[0, 1] == pytest.approx(np.exp(2) / (np.exp(2) + 2))
    assert np.isnan(out[1, 0])


def test_binner_counts_out_of_range_and_nan_apart() -> None:
    binner = Binner([[0.0, 1.0, 2.0], [-0.5, 0.5, 1.5, 2.5]])
    m = np.array([[-1.0, 0.0], [0.5, 1.0], [2.0, 2.0], [np.nan, 3.0], [1.5, np.nan]])
    counts, nan = binner.count(m)
    assert binner.trim(counts) == [[1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert nan.tolist() == [1, 1]


def test_too_many_features_and_unknown_tensors_are_config_errors() -> None:
    wide = {"x": np.zeros((10, 70), np.float32)}
    info = [TensorInfo("x", "float32", ["b", 70])]
    assert build_baseline(wide, info).features[0].name == "x.mean"  # wide: summary by default
    with pytest.raises(ConfigError, match="columns"):
        build_baseline(wide, info, [MonitorSpec("x", "columns")])
    with pytest.raises(ConfigError, match="names 'y'"):
        build_baseline(wide, info, [MonitorSpec("y", "summary")])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_monitor_text_parses_or_is_one_config_error(text: str) -> None:
    try:
        spec = parse_monitor(text)
    except ConfigError:
        return
    assert parse_monitor(spec.text) == spec


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=200),
    st.integers(2, 30),
)
def test_baselines_of_any_numbers_are_valid_documents(values: list[float], bins: int) -> None:
    x = np.asarray(values, np.float32).reshape(-1, 1)
    baseline = build_baseline({"x": x}, [TensorInfo("x", "float32", ["b", 1])], bins=bins)
    again = Baseline.from_bytes(baseline.to_bytes())
    f = again.features[0]
    assert sum(f.counts) + round(f.nan_share * len(x)) == len(x)
