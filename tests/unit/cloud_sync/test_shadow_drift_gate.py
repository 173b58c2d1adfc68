"""The rollout gate on drift (``cloud_sync.rollout_drift_gate``) on summaries as the ingestion
stores them: a canary whose class outputs moved from the control cohort's aborts the rollout; an
unmoved one, a single lying device, a one-device canary and windows from before the wave do not."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cloud_sync.parts import encode_jsonl_gz, group_runs
from cloud_sync.rollout_drift_gate import DriftGate
from cloud_sync.store import open_store

SHA = "ab" * 32


def now() -> float:
    """Read when used: the module is imported at collection, maybe minutes before its tests
    run, and windows from before the wave are (rightly) left out."""
    return time.time()


def summary(version: int, classes: list[float], rows: int, start: float) -> dict[str, Any]:
    counts = [0, *np.round(np.asarray(classes) * rows).astype(int).tolist(), 0]
    return {
        "model": "tiny", "version": version, "baseline": SHA, "window_start": start,
        "window_s": 60, "rows": sum(counts),
        "features": {"probs.class": {"c": counts}, "x[0]": {"c": [1, 2, 3]}},
    }  # fmt: skip


def store_with(tmp: Path, docs: list[tuple[str, dict[str, Any]]]) -> Any:
    recs = [
        {"device": d, "boot_id": "b", "seq": i, "ts": now(), "kind": "drift", "data": doc}
        for i, (d, doc) in enumerate(docs)
    ]
    store = open_store(str(tmp / "store"))
    for run in group_runs(recs):
        store.put_bytes(run.key, encode_jsonl_gz(run.records))
    return store


def rollout(canary: list[str], store: Any) -> Any:
    said: list[str] = []
    devices = [SimpleNamespace(device=d, wave=0, state="done") for d in canary]
    state = SimpleNamespace(
        name="tiny", version=2, wave=lambda w: devices if w == 0 else [], devices=devices
    )
    return SimpleNamespace(
        state=state, _wave_started=time.monotonic() - 120, say=said.append, said=said
    )


BALANCED = [0.34, 0.33, 0.33]
SKEWED = [0.6, 0.2, 0.2]
CANARY = ["c0", "c1", "c2"]
CONTROL = [f"k{i}" for i in range(4)]


def fleet(canary_classes: list[list[float]], start: float | None = None) -> list[tuple[str, Any]]:
    start = now() - 60 if start is None else start
    docs = [(d, summary(1, BALANCED, 300, start)) for d in CONTROL]
    docs += [(d, summary(2, c, 300, start)) for d, c in zip(CANARY, canary_classes, strict=True)]
    return docs


def test_a_canary_whose_classes_moved_aborts_with_the_figures(tmp_path: Path) -> None:
    store = store_with(tmp_path, fleet([SKEWED] * 3))
    r = rollout(CANARY, store)
    found = DriftGate(store, 0.2).check(r, 0)
    assert found is not None
    reason, figures = found
    assert "probs.class of v2 moved" in reason and "900 rows from 3 devices" in reason, reason
    assert figures.reporting == 3


def test_an_unmoved_canary_goes_on(tmp_path: Path) -> None:
    store = store_with(tmp_path, fleet([BALANCED] * 3))
    r = rollout(CANARY, store)
    assert DriftGate(store, 0.2).check(r, 0) is None
    assert "no output moved" in r.said[-1] and "900 rows from 3" in r.said[-1]


def test_one_device_cannot_abort_alone(tmp_path: Path) -> None:
    liar = [[1.0, 0.0, 0.0], BALANCED, BALANCED]
    store = store_with(tmp_path, fleet(liar))
    assert DriftGate(store, 0.2).check(rollout(CANARY, store), 0) is None
    one = store_with(tmp_path / "one", fleet([SKEWED] * 3)[:5])  # a one-device canary
    assert DriftGate(one, 0.2).check(rollout(["c0"], one), 0) is None


def test_windows_from_before_the_wave_do_not_count(tmp_path: Path) -> None:
    store = store_with(tmp_path, fleet([SKEWED] * 3, start=now() - 3600))
    r = rollout(CANARY, store)
    assert DriftGate(store, 0.2).check(r, 0) is None
    assert "no class output summarised by both" in r.said[-1]


def test_too_few_rows_say_nothing(tmp_path: Path) -> None:
    docs = [(d, summary(1, BALANCED, 30, now() - 60)) for d in CONTROL]
    docs += [(d, summary(2, SKEWED, 30, now() - 60)) for d in CANARY]
    store = store_with(tmp_path, docs)
    assert DriftGate(store, 0.2).check(rollout(CANARY, store), 0) is None
