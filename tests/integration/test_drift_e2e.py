"""Drift summaries end to end: a real agent serving a pack with a baseline, a real Mosquitto
without persistence, ``edgebento sync`` in its own process, and ``edgebento monitor`` on the store.

The broker is killed -9 and restarted while summaries flow, then the sync process is; afterwards
every request the agent answered is counted exactly once in the summaries the monitor reads
(nothing lost, nothing doubled), and the drifted inputs of the last phase are found, carried by
the one device that sent them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.parts import decode_jsonl_gz
from cloud_sync.store import open_store
from modelpack.baseline import make_baseline
from tests.support.agent import AgentProcess, Client, make_pack, wait_online
from tests.support.services import Mosquitto, VolatileMosquitto

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from edgebento.cli import main; sys.exit(main())"]


@pytest.fixture
def volatile_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = VolatileMosquitto(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


def start_sync(broker: Mosquitto, store: Path, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            *CLI,
            "-v",
            "sync",
            "--broker",
            broker.url,
            "--store",
            str(store),
            "--prefix",
            prefix,
            "--client-id",
            "sync-drift",
            "--flush-interval",
            "0.3",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    deadline = time.monotonic() + 30
    while "syncing telemetry" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "sync did not start"
        time.sleep(0.05)
    return proc


def stored_drift(store: Path) -> list[dict]:
    s = open_store(str(store))
    return [r for key in s.list("drift/") for r in decode_jsonl_gz(s.get_bytes(key))]


def infer(client: Client, prefix: str, rows: np.ndarray) -> None:
    reply = client.request(f"{prefix}/dev-d/infer", {"inputs": {"x": rows.tolist()}})
    assert "outputs" in reply, reply


def test_summaries_survive_broker_and_sync_kill_9_and_the_monitor_sees_the_drift(
    volatile_broker: Mosquitto,
    tmp_path: Path,
    mlp_model: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
) -> None:
    pack = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
    rng = np.random.default_rng(0)
    make_baseline(pack, {"x": rng.standard_normal((4000, 8)).astype(np.float32)}, key=keys[0])
    store, procs = tmp_path / "store", []
    agent = AgentProcess(
        volatile_broker,
        tmp_path / "agent",
        keys[1],
        topic_prefix,
        device="dev-d",
        pack=pack,
        args=("--ack-timeout", "1"),
        env={"EDGEBENTO_DRIFT_WINDOW_S": "1"},
    ).start()
    client = Client(volatile_broker)
    answered = 0
    try:
        procs.append(start_sync(volatile_broker, store, topic_prefix, tmp_path / "sync.log"))
        wait_online(client, topic_prefix, "dev-d", 1)

        def phase(requests: int, shift: float = 0.0) -> None:
            nonlocal answered
            for _ in range(requests):
                infer(client, topic_prefix, rng.standard_normal((10, 8)) + shift)
                answered += 10

        phase(60)
        volatile_broker.kill()  # summaries in the broker and the agent's unacknowledged ones
        time.sleep(1.5)  # windows close meanwhile: the agent keeps them in its outbox
        volatile_broker.start()
        client.close()
        client = Client(volatile_broker)
        wait_online(client, topic_prefix, "dev-d", 1)
        phase(60)
        procs[0].send_signal(signal.SIGKILL)  # buffered, not yet stored nor acknowledged
        procs[0].wait()
        phase(40)
        procs.append(start_sync(volatile_broker, store, topic_prefix, tmp_path / "sync.log"))
        phase(120, shift=1.0)  # the inputs drift: every feature one standard deviation up
        time.sleep(1.2)
        assert agent.stop() == 0  # closes the last window and flushes the outbox
        deadline = time.monotonic() + 30
        while sum(r["data"]["rows"] for r in stored_drift(store)) < answered:
            assert time.monotonic() < deadline, "summaries missing from the store"
            time.sleep(0.3)
    finally:
        client.close()
        agent.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    records = stored_drift(store)
    seqs = Counter((r["boot_id"], r["seq"]) for r in records)
    assert max(seqs.values()) == 1, "a summary stored twice"
    assert all(r["kind"] == "drift" for r in records)
    assert sum(r["data"]["rows"] for r in records) == answered  # nothing lost, nothing doubled

    out = tmp_path / "report"
    done = subprocess.run(
        [
            *CLI,
            "monitor",
            "--store",
            str(store),
            "--pack",
            str(pack),
            "--trust",
            str(keys[1]),
            "--out",
            str(out),
            "--min-samples",
            "100",
            "--confirm",
            "1",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "drift.json").read_text())
    (cohort,) = doc["cohorts"]
    assert (cohort["model"], cohort["version"], cohort["cohort"]) == ("tiny", 1, "all")
    assert cohort["rows_total"] == answered
    judged = [w for w in cohort["windows"] if w["verdict"] != "insufficient"]
    # The shifted inputs of the last phase drift, every feature; with one device in the cohort
    # that device carries it alone: "local", named, never the cohort's "drift" (issue 19's rule).
    assert judged[-1]["verdict"] == "local", done.stdout
    assert judged[-1]["local_devices"] == ["dev-d"]
    assert [f["drift"] for f in judged[-1]["features"][:8]] == [True] * 8  # x[0]..x[7]
    verdicts = [w["verdict"] for w in judged]  # the last 10 windows
    first = verdicts.index("local")
    assert set(verdicts[:first]) <= {"ok"} and set(verdicts[first:]) == {"local"}, verdicts
    assert "tiny v1 cohort all:" in done.stdout
    assert "<svg" in (out / "drift.html").read_text()
    assert (
        'edgebento_drift_window_rows{cohort="all",model="tiny",version="1"}'
        in (out / "drift.prom").read_text()
    )
