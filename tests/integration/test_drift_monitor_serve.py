"""``edgebento monitor --metrics-port``: a real process serving the drift gauges by cohort,
checking the store again every ``--every`` seconds, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

from cloud_sync.groups import change_group
from cloud_sync.store import open_store
from tests.support.drift_monitor import serve_monitor
from tests.support.drift_sim import SimFleet, drift_pack, mean_shift
from tests.support.promtool import assert_promtool_passes
from tests.support.services import free_port
from tests.unit.cloud_sync.test_drift_monitor_cli import records, write


def _metrics(port: int, deadline: float) -> str:
    while True:
        try:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                .read()
                .decode()
            )
        except OSError:
            assert time.monotonic() < deadline, "no /metrics"
            time.sleep(0.2)


def test_monitor_serves_cohort_gauges_and_sees_new_summaries(tmp_path: Path) -> None:
    pack = drift_pack(tmp_path / "sim")
    fleet = SimFleet(pack, {"lobby": [f"l{i}" for i in range(4)]})
    for _ in range(2):
        fleet.window()
    store = tmp_path / "store"
    write(store, records(fleet))
    change_group(open_store(str(store)), "lobby", add=[f"l{i}" for i in range(4)])
    port = free_port()
    proc = serve_monitor(store, pack.root, tmp_path / "o", port)
    try:
        text = _metrics(port, time.monotonic() + 60)
        assert_promtool_passes(text)
        assert 'edgebento_drift_alarm{cohort="lobby",model="drifty",version="1"} 0.0' in text
        for _ in range(3):  # the lobby's inputs move; the summaries reach the store later
            fleet.window({"lobby": mean_shift(0, 1.0)})
        write(store, records(fleet))
        deadline = time.monotonic() + 60
        alarm = 'edgebento_drift_alarm{cohort="lobby",model="drifty",version="1"} 1.0'
        while alarm not in _metrics(port, deadline):
            assert time.monotonic() < deadline, "the served gauges never saw the new summaries"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "drifty v1 cohort lobby: ok" in out  # what it printed at its first check
