"""``edgebento monitor`` on a store the ingestion wrote: cohorts from the cloud's registry of
groups, hostile records counted and skipped, the JSON, HTML and Prometheus outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.drift import load_summaries
from cloud_sync.groups import change_group
from cloud_sync.parts import encode_jsonl_gz, group_runs
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.support.drift_sim import SimFleet, drift_pack, mean_shift


def records(fleet: SimFleet, extra: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    out: list[dict[str, Any]] = []
    seqs: dict[str, int] = {}
    for device, summary in fleet.summaries:
        seq = seqs[device] = seqs.get(device, -1) + 1
        out.append(
            {"device": device, "boot_id": "b1", "seq": seq, "ts": summary.window_start + 60,
             "kind": "drift", "data": summary.model_dump(mode="json")}
        )  # fmt: skip
    return out + list(extra)


def write(store_dir: Path, recs: list[dict[str, Any]]) -> None:
    store = open_store(str(store_dir))
    for run in group_runs(recs):
        store.put_bytes(run.key, encode_jsonl_gz(run.records))


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return drift_pack(tmp_path_factory.mktemp("drift"))


def test_monitor_judges_registry_cohorts_and_skips_hostile_records(
    pack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    devices = {"lobby": [f"l{i}" for i in range(4)], "dock": [f"k{i}" for i in range(4)]}
    fleet = SimFleet(pack, devices)
    for _ in range(2):
        fleet.window()
    for _ in range(3):
        fleet.window({"lobby": mean_shift(1, 1.0)})
    hostile = {"device": "l0", "boot_id": "b2", "seq": 0, "ts": fleet.now, "kind": "drift",
               "data": {"model": "drifty", "version": 1, "rows": -1}}  # fmt: skip
    store = tmp_path / "store"
    write(store, records(fleet, [hostile]))
    s = open_store(str(store))
    change_group(s, "lobby", add=devices["lobby"])
    change_group(s, "dock", add=devices["dock"])
    out = tmp_path / "out"
    code = main(["monitor", "--store", str(store), "--pack", str(pack.root), "--out", str(out),
                 "--check"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 3  # --check: a cohort raises the alarm
    doc = json.loads((out / "drift.json").read_text())
    by = {c["cohort"]: c for c in doc["cohorts"]}
    assert set(by) == {"all", "lobby", "dock"}
    assert by["lobby"]["alarm"] and by["lobby"]["verdict"] == "drift"
    assert by["dock"]["alarms"] == 0 and by["dock"]["verdict"] == "ok"
    assert by["lobby"]["rows_total"] == 5 * 4 * fleet.rows_per_device
    assert doc["rejected_summaries"] == {"schema": 1}
    assert "drifty v1 cohort lobby: drift ALARM" in printed
    prom = (out / "drift.prom").read_text()
    assert 'edgebento_drift_alarm{cohort="lobby",model="drifty",version="1"} 1.0' in prom
    assert 'edgebento_drift_alarm{cohort="dock",model="drifty",version="1"} 0.0' in prom
    assert "device=" not in prom and '"l0"' not in prom  # by cohort, never by device
    page = (out / "drift.html").read_text()
    assert page.count("<svg") == 3 * 13 and "http" not in page.replace("http://www.w3.org", "")


_value = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
    st.lists(st.integers(-5, 2**60), max_size=5),
)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(["model", "version", "baseline", "window_start",
                                        "window_s", "rows", "refused", "features"]),
                       _value, max_size=8))  # fmt: skip
def test_any_record_data_is_read_or_counted_as_refused(tmp_path: Path, data: dict) -> None:  # type: ignore[type-arg]
    store = tmp_path / f"s{abs(hash(json.dumps(data, default=str))) % 10**9}"
    write(store, [{"device": "d", "boot_id": "b", "seq": 0, "ts": 1.7e9, "kind": "drift",
                   "data": data}])  # fmt: skip
    loaded = load_summaries(open_store(str(store)))
    assert len(loaded.summaries) + sum(loaded.rejected.values()) == 1
