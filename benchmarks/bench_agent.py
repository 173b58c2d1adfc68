"""The edge agent on loopback: MQTT inference round trip, pipelined throughput, a model swap under
load, and this run's RSS (``bench_agent_memory`` compares the agent's memory side by side).

Baselines from the same run: the in-process ``Predictor.run`` latency (the floor the MQTT hop
adds to), and AWS IoT Greengrass v2's documented minimum of 96 MB RAM for its nucleus.

The agent runs on CPUs of its own, the broker and the requesting client (this process) on the
others (``benchmarks/pinning.py``; recorded as ``pinning``): on shared cores the client's and the
broker's CPU came out of the agent's, by how fast they sent. After a warm-up, the round trips and
the pipelined throughput are measured ``EDGEBENTO_BENCH_RUNS`` times (3 by default); each figure
is the median with its range, beside the agent's CPU per inference, which other work on the
machine moves less than inferences per second.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.agent_memory import REPO, agent_private_mb, agent_rss_mb
from benchmarks.pinning import Pinning, generator_side, split, tree_affinity
from benchmarks.runs import CpuMeter, load, summarize
from tests.support.services import Mosquitto

TARGETS = {"p50_ms": 2.0, "p99_ms": 10.0, "throughput_per_s": 2000.0}
GREENGRASS_MIN_RAM_MB = 96  # docs.aws.amazon.com/greengrass/v2: device requirements (Java nucleus)


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Requester:
    """An MQTT 5 client that sends inference requests and matches replies by correlation data."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.reply_topic = f"bench/{uuid.uuid4().hex[:8]}/reply"
        self.replies: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"bench-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_socket_open = _no_delay
        self.client.on_message = lambda c, u, m: self.replies.put(
            (time.perf_counter(), json.loads(m.payload))
        )
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        self.client.subscribe(self.reply_topic, 1)
        time.sleep(0.2)

    def send(self, body: bytes, correlation: bytes) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        self.client.publish(self.topic, body, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _body(i: int, x: list[list[float]]) -> bytes:
    return json.dumps({"id": f"r{i}", "inputs": {"x": x}}).encode()


def round_trips(req: Requester, x: list[list[float]], n: int) -> list[float]:
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        req.send(_body(i, x), b"c")
        done, reply = req.replies.get(timeout=10)
        assert reply["ok"] and reply["id"] == f"r{i}", reply
        latencies.append((done - start) * 1000)
    return latencies


def pipelined(req: Requester, x: list[list[float]], n: int, window: int = 64) -> dict[str, Any]:
    """n requests with up to ``window`` in flight; answers per second and failures."""
    sent = got = failed = 0
    start = time.perf_counter()
    while got < n:
        while sent < n and sent - got < window:
            req.send(_body(sent, x), b"p")
            sent += 1
        _, reply = req.replies.get(timeout=10)
        got += 1
        failed += not reply.get("ok")
    seconds = time.perf_counter() - start
    return {
        "requests": n,
        "seconds": round(seconds, 3),
        "per_s": round(n / seconds, 1),
        "failed": failed,
    }


def digits_packs(work: Path) -> tuple[Path, list[Path], list[list[float]]]:
    """The publisher's public key, the digits MLP signed as v1, v2 and v3, and one input row."""
    from modelpack import Samples, create_pack, generate_keypair
    from tests.support import models

    key, pub = generate_keypair(work / "keys")
    packs = []
    for version in (1, 2, 3):
        model = models.mlp(
            work / f"digits{version}.onnx", n_in=64, hidden=64, n_out=10, seed=version
        )
        inputs, outputs = models.golden_samples(model, n_in=64)
        packs.append(work / f"v{version}")
        create_pack(
            model,
            packs[-1],
            name="digits",
            version=version,
            samples=Samples(inputs, outputs),
            key=key,
        )
    return pub, packs, np.random.default_rng(0).random((1, 64), dtype=np.float32).tolist()


def _rounds() -> int:
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


def _measure_once(req: Requester, x: list[list[float]], agent_pid: int) -> dict[str, Any]:
    """One run: 1,000 round trips and 10,000 pipelined inferences, with the agent's CPU."""
    meter = CpuMeter(agent_pid)
    lat = np.asarray(round_trips(req, x, 1000))
    meter.start()
    throughput = pipelined(req, x, 10000)
    cpu = meter.stop()
    return {
        "load_before": load(),
        "round_trip_ms": {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
        },
        "pipelined_per_s": throughput["per_s"],
        "pipelined_failed": throughput["failed"],
        "agent_cpu_us_per_inference": 1e6 * cpu / throughput["requests"],
    }


def run(results_dir: Path) -> dict[str, Any]:
    pinning = split()
    with generator_side(pinning):
        result = _run(pinning)
    result["pinning"] = {**pinning.as_dict(), "agent_found_on": result.pop("agent_found_on")}
    return result


def _run(pinning: Pinning) -> dict[str, Any]:
    from modelpack import Predictor, load_pack

    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        work = Path(tmp)
        pub, packs, x = digits_packs(work)

        # The floor: the same model in-process, no MQTT.
        predictor = Predictor.from_pack(load_pack(packs[0], [pub], check_model=False))
        floor = []
        for _ in range(2000):
            t = time.perf_counter()
            predictor.run({"x": np.asarray(x, np.float32)})
            floor.append((time.perf_counter() - t) * 1000)

        broker = Mosquitto(workdir=work / "mosquitto").start()
        agent = _start_agent("bench", broker.url, work, pub, packs[0], {}, pinning=pinning)
        req = Requester(broker.port, "bench/bench/infer")
        try:
            _wait_ready(req, x)
            round_trips(req, x, 300)  # warm up
            pipelined(req, x, 3000)
            rss_idle = agent_rss_mb(agent.pid)
            found_on = tree_affinity(agent.pid)
            runs = [_measure_once(req, x, agent.pid) for _ in range(_rounds())]
            swap = _swap_under_load(req, x, packs[1:], broker.port)
            rss_after = agent_rss_mb(agent.pid)
            private = agent_private_mb(agent.pid)
        finally:
            req.close()
            agent.terminate()
            agent.wait(15)
            broker.stop()
    merged = summarize(runs)
    p50 = merged["round_trip_ms"]["p50"]["median"]
    p99 = merged["round_trip_ms"]["p99"]["median"]
    per_s = merged["pipelined_per_s"]
    failed = sum(r["pipelined_failed"] for r in runs)
    n = len(runs)
    result = {
        "model": "digits MLP 64-64-10, float32, batch 1",
        "runs": n,
        "round_trip_ms": {**merged["round_trip_ms"], "n_per_run": 1000},
        "baseline_in_process_ms": {
            "p50": round(float(np.percentile(floor, 50)), 4),
            "p99": round(float(np.percentile(floor, 99)), 4),
        },
        "pipelined": {
            "per_s": per_s,
            "requests_per_run": 10000,
            "window": 64,
            "failed": failed,
        },
        "agent_cpu_us_per_inference": merged["agent_cpu_us_per_inference"],
        "per_round": [
            {
                "round": i + 1,
                "p50 ms": round(r["round_trip_ms"]["p50"], 3),
                "p99 ms": round(r["round_trip_ms"]["p99"], 3),
                "pipelined/s": r["pipelined_per_s"],
                "agent CPU µs/inference": round(r["agent_cpu_us_per_inference"], 1),
                "load 1m": r["load_before"]["load_1m"],
            }
            for i, r in enumerate(runs)
        ],
        "swap_under_load": swap,
        # This agent run's own figures (plain python); benchmarks/bench_agent_memory.py
        # compares trees and the way the systemd unit starts it.
        "agent_rss_mb": {
            "connected_idle": round(rss_idle, 1),
            "after_load_and_swaps": round(rss_after, 1),
            **private,
        },
        "baseline_greengrass_min_ram_mb": GREENGRASS_MIN_RAM_MB,
        "targets": TARGETS,
        "agent_found_on": found_on,
    }
    result["targets_met"] = bool(
        p50 <= TARGETS["p50_ms"]
        and p99 <= TARGETS["p99_ms"]
        and per_s["median"] >= TARGETS["throughput_per_s"]
        and failed == 0
        and swap["failed"] == 0
    )
    result["headline"] = (
        f"round trip p50 {p50:.2f} ms, p99 {p99:.2f} ms; {per_s['median']:.0f} inferences/s "
        f"pipelined ({per_s['min']:.0f}-{per_s['max']:.0f}, median of {n} runs, the agent on "
        f"CPUs of its own); {swap['failed']} failed of {swap['requests']} during "
        f"{swap['swaps']} swaps; RSS {rss_after:.0f} MB after them (python without -OO; the "
        f"agent's memory is bench_agent_memory's)"
    )
    return result


def _start_agent(
    device: str,
    broker_url: str,
    work: Path,
    pub: Path,
    pack: Path,
    env: dict[str, str],
    tree: Path = REPO,
    flags: tuple[str, ...] = (),
    pinning: Pinning | None = None,
) -> subprocess.Popen[bytes]:
    command = [sys.executable, *flags, "-m", "edge_agent", "run", "--device", device]
    command += ["--broker", broker_url, "--data-dir", str(work / f"agent-{device}")]
    command += ["--trust", str(pub), "--pack", str(pack), "--prefix", "bench"]
    if "--file-root" in (tree / "edge_agent" / "cli.py").read_text():
        command += ["--file-root", str(work)]  # the swap deploys packs from the work dir
    environ = {**os.environ, "PYTHONPATH": str(tree), **env}
    return subprocess.Popen(
        [*command, "--log-level", "WARNING"],
        cwd=tree,
        env={k: v for k, v in environ.items() if v != ""},  # "": unset it
        preexec_fn=None if pinning is None else pinning.server_preexec(),
    )


def _memory_after_load(
    device: str,
    broker: Mosquitto,
    work: Path,
    pub: Path,
    pack: Path,
    x: list[list[float]],
    env: dict[str, str],
    tree: Path = REPO,
    swaps: list[Path] | None = None,
    flags: tuple[str, ...] = (),
) -> dict[str, float]:
    """A fresh agent with ``env`` (glibc malloc settings), the interpreter's ``flags`` and the
    code in ``tree``, after the same load (and the same model swaps, if any)."""
    agent = _start_agent(device, broker.url, work, pub, pack, env, tree, flags)
    req = Requester(broker.port, f"bench/{device}/infer")
    try:
        _wait_ready(req, x)
        round_trips(req, x, 300)
        pipelined(req, x, 3000)
        if swaps:
            _swap_under_load(req, x, swaps, broker.port, device)
        return {"rss": round(agent_rss_mb(agent.pid), 1), **agent_private_mb(agent.pid)}
    finally:
        req.close()
        agent.terminate()
        agent.wait(15)


def _wait_ready(req: Requester, x: list[list[float]]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        req.send(_body(-1, x), b"w")
        try:
            if req.replies.get(timeout=0.5)[1].get("ok"):
                return
        except queue.Empty:
            continue
    raise RuntimeError("the agent did not answer within 30 s")


def _swap_under_load(
    req: Requester, x: list[list[float]], packs: list[Path], port: int, device: str = "bench"
) -> dict[str, Any]:
    """Deploy each pack while pipelined requests run; every request must be answered ok."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def load() -> None:
        total = {"requests": 0, "failed": 0, "per_s": []}
        while not done.is_set():
            chunk = pipelined(req, x, 500, window=32)
            total["requests"] += chunk["requests"]
            total["failed"] += chunk["failed"]
        outcome.update(total)

    worker = threading.Thread(target=load)
    worker.start()
    ctl = Requester(port, f"bench/{device}/cmd/deploy")
    versions = []
    try:
        time.sleep(0.5)
        for pack in packs:
            ctl.send(json.dumps({"id": uuid.uuid4().hex, "url": str(pack)}).encode(), b"d")
            _, reply = ctl.replies.get(timeout=60)
            assert reply["ok"], reply
            versions.append(reply["model"]["version"])
            time.sleep(0.5)
    finally:
        done.set()
        worker.join()
        ctl.close()
    return {
        "requests": outcome["requests"],
        "failed": outcome["failed"],
        "swaps": len(packs),
        "versions": versions,
    }
