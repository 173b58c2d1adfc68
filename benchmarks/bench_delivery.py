"""Delivery under broker crashes: 20 devices' telemetry through a Mosquitto without persistence
(as it ships), killed with -9 five times, into ``edgebento sync`` and moto's S3, counting every
seq of every device: stored once, duplicated, still waiting in the outbox, or lost.

Side by side in the same run: today's design (a record leaves the outbox on the broker's PUBACK;
the code of the commit before, see ``benchmarks.baseline``) and end-to-end acknowledgements (a
record leaves when the ingestion says it is stored). Both run the agent's own telemetry code.
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


def run(results_dir: Path) -> dict[str, Any]:
    for name, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(name, value)
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        work = Path(tmp)
        s3 = MotoS3().start()
        try:
            puback = _scenario("PUBACK (today)", baseline_tree(work), work / "puback", s3)
            e2e = _scenario("end-to-end acks", REPO, work / "e2e", s3)
        finally:
            s3.stop()
    met = e2e["lost"] == 0 and e2e["duplicated"] == 0 and e2e["records"] > 0
    return {
        "headline": (
            f"{KILLS} broker kills -9, persistence off, {DEVICES} devices: end-to-end acks lost "
            f"{e2e['lost']} and duplicated {e2e['duplicated']} of {e2e['records']:,} records; "
            f"PUBACK lost {puback['lost']} of {puback['records']:,}"
        ),
        "targets_met": met,
        "setup": {
            "broker": "Mosquitto 2, persistence false, kill -9 then restart, 4 s apart",
            "devices": "the agent's Outbox + Session + TelemetryPublisher, 20 in one process",
            "rate_per_device": RATE_PER_DEVICE,
            "sync": "edgebento sync in its own process, flush every 0.5 s, moto S3",
        },
        "end_to_end": e2e,
        "baseline_puback": puback,
    }
