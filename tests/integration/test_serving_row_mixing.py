"""A pack whose rows are not independent (dynamic int8's batch-wide scales, batch statistics) is
served one request at a time: the service says so when it starts, in its log, beside
``/metadata``'s ``"batching": false`` (issue 23: the user lost batching's throughput silently)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from benchmarks.serving_common import import_to_store, start_bento
from tests.support import serving_models

pytestmark = pytest.mark.integration


def test_the_service_warns_at_start_when_it_cannot_batch(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from modelpack import create_pack

    model = serving_models.row_mixing(tmp_path / "mixing.onnx")
    create_pack(model, tmp_path / "pack", name="mixing", version=3, key=keys[0])
    tag = import_to_store(tmp_path / "pack", keys[1], tmp_path / "bentoml")
    proc = start_bento(tmp_path / "bentoml", tag, tmp_path, EDGEBENTO_WORKERS="1")
    try:
        meta = httpx.get(proc.url + "/metadata", timeout=30).json()
        assert meta["batching"] is False and "changes when other rows" in meta["batching_off"]
        # The line is written when the worker loads the pack, before it is ready.
        deadline = time.monotonic() + 30
        while "no batching" not in proc.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = [line for line in proc.log.read_text().splitlines() if "no batching" in line]
        assert lines, proc.log.read_text()[-2000:]
        assert "WARNING" in lines[0] and "mixing v3 runs requests one at a time" in lines[0]
        assert "changes when other rows run beside it" in lines[0]
    finally:
        proc.stop()
