"""Hostile external-data entries of an ONNX source, each through ``edgebento optimize``."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tests.integration.test_build_inputs import _external, _optimize, _refused


def _set_entry(source: Path, key: str, value: str, data_type: int | None = None) -> None:
    model = onnx.load(str(source), load_external_data=False)
    tensor = model.graph.initializer[0]
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)
    if data_type is not None:
        tensor.data_type = data_type
    onnx.save(model, str(source))


@pytest.mark.parametrize(
    ("key", "value", "data_type", "says"),
    [
        ("location", "/etc/passwd", None, "not a relative path inside the model's directory"),
        ("location", "etc/passwd", None, "leads out of the model's directory"),  # symlinked dir
        ("location", "weights\x00.bin", None, "not a relative path inside"),  # was a ValueError
        ("offset", str(10**30), None, "starts at byte"),
        ("location", "weights.bin", 999, "has no known data type"),  # was a KeyError
    ],
    ids=["absolute", "symlinked-dir", "nul", "offset-past-end", "data-type"],
)
def test_a_hostile_external_data_entry_is_one_error_line(
    tmp_path: Path, key: str, value: str, data_type: int | None, says: str
) -> None:
    source = _external(tmp_path / "model")
    (tmp_path / "model" / "etc").symlink_to("/etc", target_is_directory=True)
    _set_entry(source, key, value, data_type)
    done, _ = _optimize(tmp_path, source)
    assert says in _refused(done, tmp_path)
