"""Per-device identity (issue 20): what enrollment costs, and what mTLS costs the agent.

- Enrollment time per device: the agent's own enrollment by claim (a P-256 key, a CSR, a TLS
  connection to the claim listener, the answer, the files), one device after another.
- Enrollment service throughput: 1,000 simulated devices (CSRs made beforehand, the device's
  part) send their claims through the claim listener of a real Mosquitto over TLS, on 10
  connections; the service checks each token in the store, signs, records and answers.
- The agent with and without mTLS, side by side in one run: two real agent processes, one on a
  plain listener and one on the mTLS listener with its enrolled certificate; RSS, and the
  round-trip p50 of 300 ``ping`` commands each.

The brokers, the service and both agents start once; then ``EDGEBENTO_BENCH_RUNS`` rounds (3 by
default) each enroll new devices (one by one, then the 1,000) and ping both agents, one ping of
each in turn; every figure is the median of the rounds, with their range.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.agent_memory import agent_rss_mb
from benchmarks.figure import num
from benchmarks.runs import rounds, summarize
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


def _enroll_one_by_one(fleet: IdentityFleet, work: Path, round_: int) -> list[float]:
    devices = [f"seq-{round_}-{i}" for i in range(SEQUENTIAL)]
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


def _service_throughput(fleet: IdentityFleet, round_: int) -> dict[str, Any]:
    devices = [f"sim-{round_}-{i}" for i in range(DEVICES)]
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


@contextlib.contextmanager
def _agents(fleet: IdentityFleet, plain: Mosquitto, work: Path) -> Iterator[dict[str, Any]]:
    """Both agents started, online and each with a client to ping it: set up once, measured in
    every round."""
    from modelpack.signing import generate_keypair

    _, pub = generate_keypair(work / "keys")
    token = fleet.ids.create_claims(["tls-dev"], ttl_s=3600)["tls-dev"]
    agents = {
        "plain": AgentProcess(plain, work / "plain", pub, PREFIX, device="plain-dev"),
        "mtls": AgentProcess(
            fleet.broker, work / "mtls", pub, PREFIX, "tls-dev", args=fleet.agent_args(token)
        ),
    }
    clients: dict[str, Any] = {}
    try:
        for agent in agents.values():
            agent.start()
        clients.update(plain=Client(plain), mtls=fleet.client("operator"))
        for name, agent in agents.items():
            client = clients[name]
            # The benchmark's own client must not add Nagle's 40 ms to what is measured.
            client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wait_online(client, PREFIX, agent.device, timeout=60)
            client.reply_topic = f"{PREFIX}/{agent.device}/replies/bench"
            client.collect(client.reply_topic)
        yield {name: (agent, clients[name]) for name, agent in agents.items()}
    finally:
        for client in clients.values():
            client.close()
        for agent in agents.values():
            if agent.process is not None:
                agent.process.terminate()
                agent.process.wait(10)


def _ping_both(agents: dict[str, Any], first: int) -> dict[str, dict[str, float]]:
    """``PINGS`` pings of each agent, one of each in turn (the order alternating), so that other
    work on the machine lands on both alike."""
    rtts: dict[str, list[float]] = {name: [] for name in agents}
    for i in range(PINGS):
        names = list(agents) if (i + first) % 2 == 0 else list(agents)[::-1]
        for name in names:
            agent, client = agents[name]
            started = time.perf_counter()
            client.request(f"{PREFIX}/{agent.device}/cmd/ping", {})
            rtts[name].append((time.perf_counter() - started) * 1000)
    out = {}
    for name, (agent, _client) in agents.items():
        assert agent.process is not None
        found = sorted(rtts[name])
        out[name] = {
            "rtt_p50_ms": statistics.median(found),
            "rtt_p95_ms": found[int(len(found) * 0.95)],
            "rss_mb": agent_rss_mb(agent.process.pid),
        }
    return out


def _round(fleet: IdentityFleet, agents: dict[str, Any], work: Path, i: int) -> dict[str, Any]:
    one_by_one = _enroll_one_by_one(fleet, work / f"seq-{i}", i)
    service = _service_throughput(fleet, i)
    pings = _ping_both(agents, i)
    return {
        "enrollment_per_device": {
            "devices": SEQUENTIAL,
            "p50_ms": statistics.median(one_by_one),
            "max_ms": max(one_by_one),
        },
        "enrollment_service": service,
        "agent_plain_vs_mtls": {name: pings[name] for name in ("plain", "mtls")},
        # Within the round, where both agents saw the same load: what mTLS adds.
        "mtls_rtt_p50_x_plain": pings["mtls"]["rtt_p50_ms"] / pings["plain"]["rtt_p50_ms"],
        "mtls_rss_mb_more": pings["mtls"]["rss_mb"] - pings["plain"]["rss_mb"],
    }


def run(results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as tmp:
        work = Path(tmp)
        fleet = IdentityFleet(work / "fleet").start()
        # The ceiling of the service, not its default limit (200 signatures a second).
        fleet.service.limit = RateLimit(rate=100_000, burst=100_000, per_device_s=0)
        plain = Mosquitto(workdir=work / "plain-broker").start()
        try:
            with _agents(fleet, plain, work / "agents") as agents:
                each = [_round(fleet, agents, work, i) for i in range(rounds())]
        finally:
            plain.stop()
            fleet.stop()
    merged = summarize(each, digits=2)
    per_device, service = merged["enrollment_per_device"], merged["enrollment_service"]
    agents_ = merged["agent_plain_vs_mtls"]
    plain_, mtls = agents_["plain"], agents_["mtls"]
    return {
        "headline": (
            f"enrollment {num(per_device['p50_ms'], '.0f', ' ms')} per device (p50); the service "
            f"{num(service['devices_per_s'], '.0f', ' devices/s')} for {DEVICES:,}; agent p50 "
            f"{plain_['rtt_p50_ms']['median']:.2f} ms / {plain_['rss_mb']['median']:.1f} MB plain "
            f"vs {mtls['rtt_p50_ms']['median']:.2f} ms / {mtls['rss_mb']['median']:.1f} MB with "
            f"mTLS (medians of {len(each)} rounds; mTLS's p50 "
            f"{num(merged['mtls_rtt_p50_x_plain'], '.2f', 'x')} plain's in the same round)"
        ),
        "targets_met": all(r["enrollment_service"]["issued"] == DEVICES for r in each),
        "targets": {"every_claim_issued": f"{DEVICES:,} of {DEVICES:,} in every round"},
        "runs": len(each),
        "setup": {
            "broker": "Mosquitto 2.0.11, TLS 1.2+, require_certificate, ACL, CRL",
            "keys": "EC P-256 (device keys, CA)",
            "store": "local directory store",
            "service": "in the benchmark's process, over MQTT (cloud_sync.mqtt.CloudClient)",
            "rounds": "brokers, service and both agents started once; each round enrolls new "
            "devices and pings both agents, one ping of each in turn",
        },
        "enrollment_per_device": per_device,
        "enrollment_service": service,
        "agent_plain_vs_mtls": agents_,
        "mtls_rtt_p50_x_plain": merged["mtls_rtt_p50_x_plain"],
        "mtls_rss_mb_more": merged["mtls_rss_mb_more"],
    }
