"""Delivery under broker crashes: 20 devices' telemetry through a Mosquitto without persistence
(as it ships), killed with -9 five times, into ``edgebento sync`` and moto's S3, counting every
seq of every device: stored once, duplicated, still waiting in the outbox, or lost.

Side by side in the same run: today's design (a record leaves the outbox on the broker's PUBACK;
the code of the commit before, see ``benchmarks.baseline``) and end-to-end acknowledgements (a
record leaves when the ingestion says it is stored). Both run the agent's own telemetry code.

``EDGEBENTO_BENCH_RUNS`` rounds (3 by default), each running both designs (the order alternating
between rounds) against one moto S3; the counts are summed over the rounds and kept by round.
The target (nothing lost, nothing duplicated with end-to-end acks) must hold in every round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.baseline import REPO, baseline_tree
from benchmarks.runs import rounds, summarize
from tests.support.services import MotoS3, VolatileMosquitto

DEVICES = 20
RATE_PER_DEVICE = 20.0  # records per second each
KILLS = 5
CLI = "import sys; from edgebento.cli import main; sys.exit(main())"


def _env(tree: Path, s3: MotoS3) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "AWS_ENDPOINT_URL": s3.endpoint_url}


def _sync(
    tree: Path, broker: VolatileMosquitto, s3: MotoS3, url: str, prefix: str, log: Path
) -> Any:
    args = ["sync", "--broker", broker.url, "--store", url, "--prefix", prefix,
            "--client-id", f"bench-{prefix}", "--flush-interval", "0.5"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env=_env(tree, s3),
                            stdout=subprocess.DEVNULL, stderr=log.open("ab"), cwd=tree)  # fmt: skip
    deadline = time.monotonic() + 60
    while "syncing telemetry" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sync did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


def _scenario(label: str, tree: Path, work: Path, s3: MotoS3) -> dict[str, Any]:
    from cloud_sync.parts import decode_jsonl_gz
    from cloud_sync.store import open_store

    work.mkdir(parents=True)
    bucket, prefix = f"delivery-{uuid.uuid4().hex[:8]}", f"d{uuid.uuid4().hex[:6]}"
    s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    url = f"s3://{bucket}/fleet"
    broker = VolatileMosquitto(workdir=work / "mosquitto").start()
    sync = _sync(tree, broker, s3, url, prefix, work / "sync.log")
    fleet = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "delivery_fleet.py"), str(work / "fleet"),
         broker.url, prefix, str(DEVICES), str(RATE_PER_DEVICE)],
        env=_env(tree, s3), cwd=tree,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(work / "fleet.log").open("ab"),
    )  # fmt: skip
    try:
        assert fleet.stdout is not None and fleet.stdin is not None
        assert fleet.stdout.readline().strip() == b"ready", (work / "fleet.log").read_text()
        time.sleep(3)
        for _ in range(KILLS):
            broker.kill()
            time.sleep(0.5)
            broker.start()
            time.sleep(4)
        fleet.stdin.write(b"stop\n")
        fleet.stdin.flush()
        report = json.loads(fleet.stdout.readline())
        time.sleep(2)
    finally:
        if fleet.poll() is None:
            fleet.kill()
        sync.terminate()
        sync.wait(30)
        broker.stop()
    store = open_store(url, endpoint_url=s3.endpoint_url)
    got = Counter((r["device"], r["boot_id"], r["seq"])
                  for k in store.list("telemetry/") for r in decode_jsonl_gz(store.get_bytes(k)))  # fmt: skip
    numbered = lost = held = 0
    for device, doc in report.items():
        stored = {s for (d, b, s) in got if d == device and b == doc["boot_id"]}
        every = stored | set(doc["held"])
        numbered += doc["numbered"]
        held += len(doc["held"])
        lost += len(set(range(doc["numbered"])) - every)
    return {
        "design": label,
        "devices": DEVICES,
        "broker_kills": KILLS,
        "records": numbered,
        "stored": len(got),
        "duplicated": sum(n - 1 for n in got.values()),
        "lost": lost,
        "still_in_outboxes": held,
    }


COUNTS = ("records", "stored", "duplicated", "lost", "still_in_outboxes")


def _totals(each: list[dict[str, Any]]) -> dict[str, Any]:
    """One design over the rounds: every count summed, and by round."""
    return {
        "design": each[0]["design"],
        "devices": DEVICES,
        "broker_kills": KILLS,
        "rounds": len(each),
        **{k: sum(r[k] for r in each) for k in COUNTS},
        "each_round": {k: [r[k] for r in each] for k in COUNTS},
        "per_round": summarize([{k: r[k] for k in COUNTS} for r in each], digits=1),
    }


def run(results_dir: Path) -> dict[str, Any]:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    designs = {"puback": "PUBACK (today)", "e2e": "end-to-end acks"}
    rounds_: dict[str, list[dict[str, Any]]] = {k: [] for k in designs}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        work = Path(tmp)
        s3 = MotoS3().start()  # one S3 and one unpacked baseline for every round
        trees = {"puback": baseline_tree(work), "e2e": REPO}
        try:
            for i in range(rounds()):
                order = list(designs) if i % 2 == 0 else list(designs)[::-1]
                for key in order:
                    where = work / f"{key}-{i}"
                    rounds_[key].append(_scenario(designs[key], trees[key], where, s3))
        finally:
            s3.stop()
    e2e, puback = _totals(rounds_["e2e"]), _totals(rounds_["puback"])
    # Counts that must be 0: every round holds it, not only the median.
    met = all(r["lost"] == 0 and r["duplicated"] == 0 and r["records"] > 0 for r in rounds_["e2e"])
    n = e2e["rounds"]
    return {
        "headline": (
            f"{KILLS} broker kills -9 a round, persistence off, {DEVICES} devices, {n} rounds: "
            f"end-to-end acks lost {e2e['lost']} and duplicated {e2e['duplicated']} of "
            f"{e2e['records']:,} records (lost by round {_by_round(e2e, 'lost')}); PUBACK lost "
            f"{puback['lost']} of {puback['records']:,} (by round {_by_round(puback, 'lost')})"
        ),
        "targets_met": met,
        "targets": {"end_to_end_lost_and_duplicated": "0 in every round"},
        "setup": {
            "broker": f"Mosquitto 2, persistence false, kill -9 then restart, 4 s apart, "
            f"{KILLS} times a round",
            "devices": "the agent's Outbox + Session + TelemetryPublisher, 20 in one process",
            "rate_per_device": RATE_PER_DEVICE,
            "sync": "edgebento sync in its own process, flush every 0.5 s, moto S3",
            "rounds": f"{n}, both designs each round, the order alternating; one S3 for all",
        },
        "end_to_end": e2e,
        "baseline_puback": puback,
    }


def _by_round(design: dict[str, Any], key: str) -> str:
    return "/".join(str(v) for v in design["each_round"][key])
