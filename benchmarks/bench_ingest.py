"""Telemetry ingestion into the S3 API: ``edgebento sync`` (its own process) draining the fleet's
telemetry from Mosquitto into moto's S3 server, with end-to-end acknowledgements (a
``TelemetryAck`` to each device after each flush), against today's PUBACK design (the code of the
commit before, ``benchmarks.baseline``) and the naive baseline of one S3 object per MQTT message,
all measured in the same run.

Two figures: records per second stored (target >= 10,000 with acknowledgements) and objects
written per 10,000 records. The backlog is published first while the sync process is away (the
broker queues it for its persistent session), so the clock measures ingestion alone: MQTT
delivery, parsing, deduplication, gzip, S3 PUTs and the acknowledgements after them.

The broker, moto and today's tree are set up once; then ``EDGEBENTO_BENCH_RUNS`` rounds (3 by
default) each measure the three, in an order that rotates each round, each run with a store
prefix, topic prefix and MQTT session of its own. Each figure is the median of its rounds with
its range; the target is judged on the median, and on every round storing each record once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchmarks.baseline import REPO, baseline_tree
from benchmarks.runs import CpuMeter, load, median_of, summarize
from tests.support.services import Mosquitto, MotoS3, free_port

DEVICES = 20
RECORDS_PER_DEVICE = 3_000
RECORDS_PER_MESSAGE = 50
TARGET_RECORDS_PER_S = 10_000
BASELINE_MESSAGES = 200
MARKER = "dev-marker"  # the device of the records that show the sync's session subscribed
CLI = "import sys; from edgebento.cli import main; sys.exit(main())"


def _record(device: str, boot: str, seq: int) -> dict[str, Any]:
    """What an agent sends every interval: counts and a latency histogram."""
    return {
        "schema_version": 1,
        "device": device,
        "boot_id": boot,
        "seq": seq,
        "ts": time.time(),
        "kind": "inference",
        "data": {
            "ok": 120,
            "errors": 0,
            "rejected": {},
            "latency_buckets_s": [0.0005, 0.001, 0.0025, 0.005, 0.01, "+Inf"],
            "latency_counts": [10, 80, 25, 5, 0, 0],
            "mean_ms": 0.91,
        },
    }


def _messages() -> list[tuple[str, bytes]]:
    out = []
    for d in range(DEVICES):
        device, boot = f"dev-{d:03d}", uuid.uuid4().hex[:12]
        for start in range(0, RECORDS_PER_DEVICE, RECORDS_PER_MESSAGE):
            records = [_record(device, boot, s) for s in range(start, start + RECORDS_PER_MESSAGE)]
            out.append((device, json.dumps({"schema_version": 1, "records": records}).encode()))
    return out


def _publish(broker: Mosquitto, prefix: str, messages: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-fleet")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(f"{prefix}/{d}/telemetry", p, qos=1) for d, p in messages]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def _stored(metrics_port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    except OSError:  # not listening yet
        return 0.0
    match = re.search(r'edgebento_sync_records_total\{root="telemetry"\} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def _until_subscribed(broker: Mosquitto, prefix: str, metrics_port: int) -> None:
    """Until the sync's session holds its subscription: a marker record, sent each second from a
    device of its own, is stored. The sync logs that it runs before it has connected; a process
    stopped then may leave a session without a subscription, and the broker drops the backlog
    (a round of this benchmark waited for ever on such a run)."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"marker-{prefix}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        boot, deadline = uuid.uuid4().hex[:12], time.monotonic() + 60
        for seq in range(1_000_000):
            if time.monotonic() > deadline:
                raise RuntimeError("the sync process did not take its subscription in 60 s")
            body = {"schema_version": 1, "records": [_record(MARKER, boot, seq)]}
            client.publish(
                f"{prefix}/{MARKER}/telemetry", json.dumps(body), qos=1
            ).wait_for_publish(10)
            wait = time.monotonic() + 1.0
            while time.monotonic() < wait:
                if _stored(metrics_port) >= 1:
                    return
                time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()


def _start_sync(
    broker: Mosquitto, s3: MotoS3, url: str, prefix: str, port: int, log: Path, tree: Path
) -> Any:
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url, "PYTHONPATH": str(tree)}
    # A session per run (its prefix): one run's persistent subscriptions do not carry into the next.
    args = ["sync", "--broker", broker.url, "--store", url, "--prefix", prefix,
            "--client-id", f"sync-{prefix}", "--metrics-port", str(port)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.DEVNULL,
        stderr=log.open("ab"), cwd=tree,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "syncing telemetry" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sync did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


def _sync_run(
    work: Path,
    broker: Mosquitto,
    s3: MotoS3,
    bucket: str,
    tree: Path,
    name: str,
    messages: list[tuple[str, bytes]],
) -> dict[str, Any]:
    from cloud_sync.parts import decode_jsonl_gz
    from cloud_sync.store import open_store

    prefix, port, url = f"bench-{name}", free_port(), f"s3://{bucket}/{name}"
    total = len(messages) * RECORDS_PER_MESSAGE
    # Connect once so the broker holds a persistent session, then queue the backlog for it.
    sync = _start_sync(broker, s3, url, prefix, port, work / f"{name}-0.log", tree)
    _until_subscribed(broker, prefix, port)
    sync.terminate()
    sync.wait(30)
    _publish(broker, prefix, messages)
    sync = _start_sync(broker, s3, url, prefix, port, work / f"{name}.log", tree)
    # The sync's own CPU per record moves less with other work on the machine than the rate.
    meter = CpuMeter(sync.pid)
    meter.start()
    start = time.perf_counter()
    while _stored(port) < total:
        if time.perf_counter() - start > 600:
            raise RuntimeError("the sync process did not store the backlog in 10 minutes")
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    sync.terminate()
    sync.wait(30)
    store = open_store(url, endpoint_url=s3.endpoint_url)
    keys = [k for k in store.list("telemetry/") if f"device={MARKER}/" not in k]
    seen = [(r["device"], r["seq"]) for k in keys for r in decode_jsonl_gz(store.get_bytes(k))]
    size = sum(len(store.get_bytes(k)) for k in keys[:50]) / max(1, min(50, len(keys)))
    return {
        "records": total,
        "seconds": round(seconds, 3),
        "records_per_s": round(total / seconds),
        "sync_cpu_us_per_record": round(1e6 * cpu / total, 1),
        "objects": len(keys),
        "objects_per_10k_records": round(len(keys) * 10_000 / total, 1),
        "mean_object_bytes": round(size),
        "stored_exactly_once": len(seen) == total and len(set(seen)) == total,
    }


def _baseline_run(
    s3: MotoS3, bucket: str, name: str, messages: list[tuple[str, bytes]]
) -> dict[str, Any]:
    """One gzipped object per MQTT message, written in order: what no batching gives."""
    import gzip

    client: Any = s3.client()
    messages = messages[:BASELINE_MESSAGES]
    start = time.perf_counter()
    for i, (device, payload) in enumerate(messages):
        client.put_object(
            Bucket=bucket, Key=f"{name}/{device}/{i}.json.gz", Body=gzip.compress(payload)
        )
    seconds = time.perf_counter() - start
    records = len(messages) * RECORDS_PER_MESSAGE
    return {
        "records": records,
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds),
        "objects_per_10k_records": round(10_000 / RECORDS_PER_MESSAGE, 1),
    }


def _rounds() -> int:
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


PATHS = ("sync", "baseline_puback_design", "baseline_one_object_per_message")


def run(results_dir: Path) -> dict[str, Any]:
    # moto accepts any credentials; boto3 only needs some to sign with.
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        s3 = MotoS3().start()
        broker = Mosquitto(workdir=work / "mosquitto").start()
        try:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            s3.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
            today, messages = baseline_tree(work), _messages()
            measures = {
                "sync": lambda n: _sync_run(work, broker, s3, bucket, REPO, n, messages),
                "baseline_puback_design": lambda n: _sync_run(
                    work, broker, s3, bucket, today, n, messages
                ),
                "baseline_one_object_per_message": lambda n: _baseline_run(s3, bucket, n, messages),
            }
            for r in range(_rounds()):
                order = [PATHS[(r + i) % len(PATHS)] for i in range(len(PATHS))]
                one: dict[str, Any] = {"order": order, "load_before": load()}
                for path in order:
                    one[path] = measures[path](f"{path.rsplit('_', 1)[-1]}-{r}")
                per_round.append(one)
        finally:
            broker.stop()
            s3.stop()
    figures = {path: summarize([r[path] for r in per_round]) for path in PATHS}
    sync, puback, baseline = ({k: median_of(v) for k, v in figures[path].items()} for path in PATHS)
    once = all(r["sync"]["stored_exactly_once"] for r in per_round)
    met = sync["records_per_s"] >= TARGET_RECORDS_PER_S and once
    n = len(per_round)
    return {
        "headline": (
            f"{sync['records_per_s']:,.0f} records/s into S3 (moto) with end-to-end acks, "
            f"{puback['records_per_s']:,.0f} with today's PUBACK design (the sync's CPU "
            f"{sync['sync_cpu_us_per_record']:.0f} against {puback['sync_cpu_us_per_record']:.0f} "
            "us per record); "
            f"{sync['objects_per_10k_records']} objects per 10k records; "
            f"one object per message: {baseline['records_per_s']:,.0f} records/s, "
            f"{baseline['objects_per_10k_records']} objects per 10k (medians of {n} runs)"
        ),
        "targets_met": met,
        "target_records_per_s": TARGET_RECORDS_PER_S,
        "runs": n,
        "setup": {
            "devices": DEVICES,
            "records_per_message": RECORDS_PER_MESSAGE,
            "sync": "edgebento sync in its own process, flush every 1 s or 20,000 records",
            "s3": "moto ThreadedMotoServer on 127.0.0.1 (real boto3 calls)",
            "broker": "Mosquitto 2 on 127.0.0.1, backlog queued for the sync's session",
            "rounds": "the three measured in an order that rotates each round; medians judged",
        },
        **figures,
        "per_round": [
            {
                "round": i + 1,
                "order": " ".join(r["order"]),
                "load_1m": r["load_before"]["load_1m"],
                **{f"{path}_records_per_s": r[path]["records_per_s"] for path in PATHS},
                **{
                    f"{path}_cpu_us_per_record": r[path]["sync_cpu_us_per_record"]
                    for path in PATHS[:2]
                },
            }
            for i, r in enumerate(per_round)
        ],
    }
