"""The session is made from the bytes checked against the signed manifest: a model rewritten on
disk between the pack's verification and ONNX Runtime's load is never run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelpack import create_pack, load_pack
from modelpack.errors import IntegrityError
from modelpack.predictor import Predictor
from modelpack.signing import load_private_key, sign
from tests.support import models

X = np.ones((2, 8), np.float32)


def _pack(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    out = tmp_path / "pack"
    create_pack(models.mlp(tmp_path / "m.onnx"), out, name="tiny", version=1, key=keys[0])
    return out


def test_a_model_swapped_after_verification_is_not_loaded(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    out = _pack(tmp_path, keys)
    pack = load_pack(out, trusted=[keys[1]])
    # Between the check and the load, a local writer puts another valid model in its place.
    (out / "model.onnx").write_bytes(models.mlp(tmp_path / "other.onnx", seed=7).read_bytes())
    with pytest.raises(IntegrityError, match="changed on disk after the pack was verified"):
        Predictor.from_pack(pack)


def test_a_pack_with_external_data_loads_from_its_checked_bytes(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    import onnx

    from modelpack.pack import list_files

    out = _pack(tmp_path, keys)
    before = Predictor.from_pack(load_pack(out, trusted=[keys[1]])).run({"x": X})
    onnx.save_model(
        onnx.load(str(out / "model.onnx")),
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    doc = json.loads((out / "manifest.json").read_text())
    doc["files"] = [f.model_dump() for f in list_files(out)]
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    (out / "manifest.json").write_bytes(data)
    (out / "manifest.sig").write_bytes(sign(data, load_private_key(keys[0])))
    pack = load_pack(out, trusted=[keys[1]])
    assert pack.manifest.file("weights.bin") is not None
    after = Predictor.from_pack(pack).run({"x": X})
    for name, value in before.items():
        np.testing.assert_array_equal(value, after[name])
