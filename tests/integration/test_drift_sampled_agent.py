"""Budgeted sampling through the real agent: a real agent (1-second drift windows, a budget of
1,000 rows a window) answering requests of 250 rows as fast as MQTT brings them, real Mosquitto,
``edgebento sync`` in its own process and ``edgebento monitor`` on the store.

Windows after the first report more rows answered than binned; every answered row is still in
the summaries (``rows``, exact); the monitor stays quiet on the windows of unshifted inputs and
flags the windows of shifted ones (one device: ``local``, carried by it), sampled windows
included."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.drift import Loaded, evaluate, load_summaries
from cloud_sync.store import open_store
from modelpack.baseline import BASELINE_FILE, make_baseline, read_baseline
from modelpack.hashing import sha256_file
from tests.integration.test_drift_e2e import CLI, REPO, start_sync, stored_drift
from tests.support.agent import AgentProcess, Client, make_pack, wait_online
from tests.support.services import Mosquitto

pytestmark = pytest.mark.slow
ROWS, BUDGET = 250, 1000


def _sampled(records: list[dict], starts: set[float] | None = None) -> list[dict]:
    """The summaries that binned a sample (answered more rows than they binned) of at least
    the monitor's minimum rows, optionally only those of windows in ``starts``."""
    return [
        r["data"]
        for r in records
        if r["data"]["binned"] < r["data"]["rows"]
        and r["data"]["binned"] >= 200
        and (starts is None or r["data"]["window_start"] in starts)
    ]


def test_sampled_windows_count_every_row_and_the_monitor_still_tells_drift_from_none(
    own_broker: Mosquitto,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
) -> None:
    pack = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
    rng = np.random.default_rng(0)
    make_baseline(pack, {"x": rng.standard_normal((4000, 8)).astype(np.float32)}, key=keys[0])
    store = tmp_path / "store"
    agent = AgentProcess(
        own_broker,
        tmp_path / "agent",
        keys[1],
        topic_prefix,
        device="dev-s",
        pack=pack,
        env={"EDGEBENTO_DRIFT_WINDOW_S": "1", "EDGEBENTO_DRIFT_BUDGET_ROWS": str(BUDGET)},
    ).start()
    client = Client(own_broker)
    sync = start_sync(own_broker, store, topic_prefix, tmp_path / "sync.log")
    answered = 0
    try:
        wait_online(client, topic_prefix, "dev-s", 1)

        def phase(shift: float, before: set[float]) -> set[float]:
            """Requests until the store holds a sampled window of this phase, then every row
            answered stored (the phase's last window closed): the phase's window starts."""
            nonlocal answered
            deadline = time.monotonic() + 120
            while True:
                for _ in range(10):
                    x = rng.standard_normal((ROWS, 8)) + shift
                    reply = client.request(
                        f"{topic_prefix}/dev-s/infer", {"inputs": {"x": x.tolist()}}
                    )
                    assert "outputs" in reply, reply
                    answered += ROWS
                records = stored_drift(store)
                starts = {r["data"]["window_start"] for r in records} - before
                if _sampled(records, starts):
                    break
                assert time.monotonic() < deadline, "no sampled window stored"
            while sum(r["data"]["rows"] for r in stored_drift(store)) < answered:
                assert time.monotonic() < deadline, "summaries missing from the store"
                time.sleep(0.2)
            return {r["data"]["window_start"] for r in stored_drift(store)} - before

        quiet = phase(0.0, set())
        shifted = phase(1.0, quiet)  # every feature one standard deviation up
        assert agent.stop() == 0
    finally:
        client.close()
        agent.stop()
        sync.terminate()
        sync.wait(30)

    records = stored_drift(store)
    assert sum(r["data"]["rows"] for r in records) == answered  # every row counted, once
    assert all(r["data"]["binned"] <= r["data"]["rows"] for r in records)
    first = min(records, key=lambda r: r["data"]["window_start"])["data"]
    assert first["binned"] == first["rows"]  # the first window: no rate yet, every row

    sha = sha256_file(pack / BASELINE_FILE)
    baseline = read_baseline(pack)
    assert baseline is not None
    loaded: Loaded = load_summaries(open_store(str(store)))
    windows = evaluate(loaded, {("tiny", 1): (sha, baseline)}, {})[("tiny", 1, "all")]
    assert loaded.rejected == {}  # a window whose requests were all let pass counts too
    assert sum(w.rows for w in windows) == answered
    judged = {w.start: w for w in windows if w.verdict != "insufficient"}
    sampled_quiet = [judged[s["window_start"]] for s in _sampled(records, quiet)]
    sampled_shifted = [judged[s["window_start"]] for s in _sampled(records, shifted)]
    assert sampled_quiet and sampled_shifted
    assert all(w.binned < w.rows for w in sampled_quiet + sampled_shifted)
    assert [judged[s].verdict for s in sorted(quiet & judged.keys())] == ["ok"] * len(
        quiet & judged.keys()
    )
    for w in sampled_shifted:  # one device: its drift is named, carried by it
        assert w.verdict == "local" and w.local_devices == ("dev-s",)
        assert all(f.drift for f in w.features[:8])  # x[0]..x[7]

    out = tmp_path / "report"
    done = subprocess.run(
        [*CLI, "monitor", "--store", str(store), "--pack", str(pack), "--trust", str(keys[1]),
         "--out", str(out), "--confirm", "1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (cohort,) = json.loads((out / "drift.json").read_text())["cohorts"]
    assert cohort["rows_total"] == answered
    assert cohort["verdict"] == "local", done.stdout
