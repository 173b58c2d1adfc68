"""Per-device identity (issue 20): what enrollment costs, and what mTLS costs the agent.

- Enrollment time per device: the agent's own enrollment by claim (a P-256 key, a CSR, a TLS
  connection to the claim listener, the answer, the files), one device after another.
- Enrollment service throughput: 1,000 simulated devices (CSRs made beforehand, the device's
  part) send their claims through the claim listener of a real Mosquitto over TLS, on 10
  connections; the service checks each token in the store, signs, records and answers.
- The agent with and without mTLS, side by side in one run: two real agent processes, one on a
  plain listener and one on the mTLS listener with its enrolled certificate; RSS, and the
  round-trip p50 of 300 ``ping`` commands each.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.agent_memory import agent_rss_mb
from cloud_sync.enroll import RateLimit, enroll_topic
from cloud_sync.fleet_ca import new_key
from edge_agent.config import AgentConfig
from edge_agent.identity import IdentityFiles, KeyMaker, enroll_by_claim
from tests.support.agent import AgentProcess, Client, wait_online
from tests.support.identity_fleet import PREFIX, IdentityFleet
from tests.support.services import Mosquitto

DEVICES = 1000
CONNECTIONS = 10
SEQUENTIAL = 20
PINGS = 300


def _enroll_one_by_one(fleet: IdentityFleet, work: Path) -> list[float]:
    devices = [f"seq-{i}" for i in range(SEQUENTIAL)]
    tokens = fleet.ids.create_claims(devices, ttl_s=3600)
    claim_cert, claim_key = fleet.certs["claim"]
    times = []
    for device in devices:
        config = AgentConfig(
            device=device,
            data_dir=work / device,
            trust=[work / "unused.pub"],
            broker=fleet.broker.url,
            claim_broker=fleet.broker.claim_url,
            ca_file=fleet.ca.paths.bundle,
            claim_cert_file=claim_cert,
            claim_key_file=claim_key,
        )
        started = time.perf_counter()
        enroll_by_claim(config, tokens[device], IdentityFiles(work / device / "identity"))
        times.append((time.perf_counter() - started) * 1000)
    return times


def _service_throughput(fleet: IdentityFleet) -> dict[str, Any]:
    devices = [f"sim-{i}" for i in range(DEVICES)]
    tokens = fleet.ids.create_claims(devices, ttl_s=3600)
    maker = KeyMaker()
    requests = {
        d: json.dumps(
            {"id": uuid.uuid4().hex, "csr": maker.csr(new_key(), d).decode(), "token": tokens[d]}
        ).encode()
        for d in devices
    }
    answered: dict[str, bool] = {}
    done = threading.Event()
    lock = threading.Lock()
    clients = [fleet.client("claim", claim=True) for _ in range(CONNECTIONS)]

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        doc = json.loads(msg.payload)
        with lock:
            answered[msg.topic.split("/")[-2]] = bool(doc.get("ok"))
            if len(answered) == DEVICES:
                done.set()

    for c in clients:
        c.client.on_message = on_message
        c.client.subscribe(enroll_topic(PREFIX, "+", "response"), 1)
    time.sleep(0.5)  # the SUBACKs
    started = time.perf_counter()
    for i, device in enumerate(devices):
        clients[i % CONNECTIONS].client.publish(
            enroll_topic(PREFIX, device, "claim"), requests[device], qos=1
        )
    done.wait(600)
    took = time.perf_counter() - started
    for c in clients:
        c.close()
    return {
        "devices": DEVICES,
        "connections": CONNECTIONS,
        "answered": len(answered),
        "issued": sum(answered.values()),
        "seconds": round(took, 2),
        "devices_per_s": round(len(answered) / took, 1),
    }


def _agent_side_by_side(fleet: IdentityFleet, plain: Mosquitto, work: Path) -> dict[str, Any]:
    from modelpack.signing import generate_keypair

    _, pub = generate_keypair(work / "keys")
    token = fleet.ids.create_claims(["tls-dev"], ttl_s=3600)["tls-dev"]
    agents = {
        "plain": AgentProcess(plain, work / "plain", pub, PREFIX, device="plain-dev"),
        "mtls": AgentProcess(
            fleet.broker, work / "mtls", pub, PREFIX, "tls-dev", args=fleet.agent_args(token)
        ),
    }
    out: dict[str, Any] = {}
    try:
        for agent in agents.values():
            agent.start()
        clients = {"plain": Client(plain), "mtls": fleet.client("operator")}
        for name, agent in agents.items():
            client = clients[name]
            # The benchmark's own client must not add Nagle's 40 ms to what is measured.
            client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wait_online(client, PREFIX, agent.device, timeout=60)
            client.reply_topic = f"{PREFIX}/{agent.device}/replies/bench"
            client.collect(client.reply_topic)
            rtts = []
            for _ in range(PINGS):
                started = time.perf_counter()
                client.request(f"{PREFIX}/{agent.device}/cmd/ping", {})
                rtts.append((time.perf_counter() - started) * 1000)
            assert agent.process is not None
            out[name] = {
                "rtt_p50_ms": round(statistics.median(rtts), 2),
                "rtt_p95_ms": round(sorted(rtts)[int(len(rtts) * 0.95)], 2),
                "rss_mb": round(agent_rss_mb(agent.process.pid), 1),
            }
            client.close()
    finally:
        for agent in agents.values():
            if agent.process is not None:
                agent.process.terminate()
                agent.process.wait(10)
    return out


def run(results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        work = Path(tmp)
        fleet = IdentityFleet(work / "fleet").start()
        # The ceiling of the service, not its default limit (200 signatures a second).
        fleet.service.limit = RateLimit(rate=100_000, burst=100_000, per_device_s=0)
        plain = Mosquitto(workdir=work / "plain-broker").start()
        try:
            one_by_one = _enroll_one_by_one(fleet, work / "seq")
            service = _service_throughput(fleet)
            agents = _agent_side_by_side(fleet, plain, work / "agents")
        finally:
            plain.stop()
            fleet.stop()
    per_device = {
        "devices": SEQUENTIAL,
        "p50_ms": round(statistics.median(one_by_one), 1),
        "max_ms": round(max(one_by_one), 1),
    }
    return {
        "headline": (
            f"enrollment {per_device['p50_ms']:.0f} ms per device (p50); the service "
            f"{service['devices_per_s']:.0f} devices/s for {DEVICES:,}; agent p50 "
            f"{agents['plain']['rtt_p50_ms']} ms / {agents['plain']['rss_mb']} MB plain vs "
            f"{agents['mtls']['rtt_p50_ms']} ms / {agents['mtls']['rss_mb']} MB with mTLS"
        ),
        "targets_met": service["issued"] == DEVICES,
        "setup": {
            "broker": "Mosquitto 2.0.11, TLS 1.2+, require_certificate, ACL, CRL",
            "keys": "EC P-256 (device keys, CA)",
            "store": "local directory store",
            "service": "in the benchmark's process, over MQTT (cloud_sync.mqtt.CloudClient)",
        },
        "enrollment_per_device": per_device,
        "enrollment_service": service,
        "agent_plain_vs_mtls": agents,
    }
