"""The demo's fleet: a real Mosquitto with mTLS, a registry in a directory, ``edgebento sync``,
two edge agents that enroll by claim, rollouts (a good one and a broken one that aborts), traffic
through a broker killed with -9, and the check that every telemetry record is in the store
exactly once.

Identity is the default path (docs/fleet-identity.md, ``edgebento.demo_mtls``): the broker runs
the configuration ``edgebento fleet broker-config`` writes (a certificate required, the CN as
user name and client id, the ACL of ``deploy/mosquitto/`` plus enrollment, the CRL); each agent
makes its own key and enrolls with a one-time claim token, then renews its certificate while
the story runs; ``edgebento sync``, ``edgebento rollout`` and the person at the keyboard
(``fleet status``, ``mosquitto_rr``/``_sub``) connect with the certificates of ``sync``,
``controller`` and ``operator``. Requests name a response topic under the device's own
``{prefix}/{device}/replies/``, the only place the ACL lets a device answer."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebento import demo_mtls
from edgebento.demo_cloud import Packs, Request
from edgebento.demo_runner import BIN, Demo, console
from edgebento.localservices import LOOPBACK, Mosquitto, free_port

DEVICES = ("dev-1", "dev-2")
TELEMETRY_INTERVAL = "1"


@dataclass(frozen=True)
class MetricsPorts:
    """Chosen before anything starts, so that Prometheus scrapes from the first request on."""

    sync: int = field(default_factory=free_port)
    rollout: int = field(default_factory=free_port)  # up while a rollout runs
    monitor: int = field(default_factory=free_port)  # edgebento monitor, from the drift step
    agents: dict[str, int] = field(default_factory=lambda: {d: free_port() for d in DEVICES})


@dataclass
class Fleet:
    broker: Mosquitto
    store: Path
    keys: Path
    ports: MetricsPorts
    pki: demo_mtls.Pki

    @property
    def url(self) -> str:
        return self.broker.url

    def mosquitto_args(self, user: str = "operator") -> list[str]:
        """``-h -p --cafile --cert --key`` for mosquitto_pub, _sub and _rr."""
        return ["-h", LOOPBACK, "-p", str(self.broker.port), *self.pki.tls_args(user)]

    def client(self, user: str = "operator") -> Any:
        """A connected paho client of ``user`` (one connection per identity at a time)."""
        return self.pki.client(user, self.broker.port)


def reply_topic(device: str, name: str) -> str:
    """Under the device's own replies/: the only topics the ACL lets it answer on."""
    return f"edgebento/{device}/replies/{name}"


def start_agent(
    demo: Demo, fleet: Fleet, device: str, token: Path, *extra: str | Path
) -> subprocess.Popen[bytes]:
    """An agent that enrolls by claim at its first start and runs on its own certificate."""
    return demo.start(  # type: ignore[no-any-return]
        device, BIN / "edge-agent", "run", "--device", device,
        *demo_mtls.agent_args(fleet.pki, fleet.broker, token),
        "--data-dir", demo.workdir / "devices" / device, "--trust", fleet.keys / "signing.pub",
        *extra,
    )  # fmt: skip


def start_fleet(demo: Demo, packs: Packs, keys: Path, ports: MetricsPorts) -> Fleet:
    store = demo.workdir / "store"
    pki, broker = demo_mtls.set_up(demo, store)
    fleet = Fleet(broker, store, keys, ports, pki)
    console.print(
        f"Mosquitto with mTLS on {fleet.url} (claims on {broker.claim_url}), the configuration "
        f"and ACL fleet broker-config wrote ({pki.broker}); the registry and telemetry live in "
        f"{fleet.store}"
    )
    for pack in (packs.v1, packs.v2, packs.v3_broken):
        demo.run(
            BIN / "edgebento", "publish", pack, "--store", fleet.store, "--key",
            keys / "signing.key", "--force", quiet=pack == packs.v3_broken,
        )  # fmt: skip
    demo.run(BIN / "edgebento", "registry", "list", "--store", fleet.store)
    demo.start(
        "sync", BIN / "edgebento", "sync", "--broker", fleet.url, "--store", fleet.store,
        "--metrics-port", str(ports.sync), env=pki.env_as("sync"),
    )  # fmt: skip
    tokens = demo_mtls.claim(demo, fleet.store, DEVICES)
    console.print(f"{len(tokens)} one-time claim tokens, one file each (the store keeps hashes)")
    for device in DEVICES:
        start_agent(
            demo, fleet, device, tokens[device], "--store", fleet.store, "--pack", packs.v1,
            "--telemetry-interval", TELEMETRY_INTERVAL,
            "--metrics-port", str(ports.agents[device]),
        )  # fmt: skip
    wait_online(fleet, DEVICES, timeout=90)  # a key, a CSR and a certificate each, first
    return fleet


def step_mqtt_inference(demo: Demo, fleet: Fleet, request: Request) -> str:
    infer = {**json.loads(request.body), "id": "demo-1"}
    answer = demo.run(
        "mosquitto_rr", *fleet.mosquitto_args(), "-t", "edgebento/dev-1/infer",
        "-e", reply_topic("dev-1", "demo"), "-m", json.dumps(infer), "-W", "20", quiet=True,
    )  # fmt: skip
    reply = json.loads(answer.stdout)
    probs = reply["outputs"]["probs"][0]
    predicted = max(range(len(probs)), key=lambda i: probs[i])
    return (
        f"dev-1 answered over MQTT: {predicted} (label {request.label}) in {reply['latency_ms']} ms"
    )


def rollout(demo: Demo, fleet: Fleet, version: int) -> subprocess.CompletedProcess[str]:
    return demo.run(
        BIN / "edgebento", "rollout", "digits", str(version), "--store", fleet.store,
        "--broker", fleet.url, "--devices", ",".join(DEVICES), "--canary", "50",
        "--waves", "1",
        "--bake", "2", "--wave-timeout", "60", "--key", fleet.keys / "signing.key",
        "--metrics-port", str(fleet.ports.rollout), "--wait", "--timeout", "120",
        # The demo's devices serve no traffic while it rolls out: nothing to judge health by, so
        # it goes on and says so, instead of stopping as unverified after each wave's timeout.
        "--allow-unverified", check=False, env=fleet.pki.env_as("controller"),
    )  # fmt: skip


def step_rollout_v2(demo: Demo, fleet: Fleet) -> str:
    done = rollout(demo, fleet, 2)
    if done.returncode != 0:
        raise RuntimeError(f"the rollout of v2 exited with {done.returncode}")
    return "digits v2 runs on dev-1 and dev-2 (canary, then a wave)"


def step_broken_rollout(demo: Demo, fleet: Fleet) -> str:
    """v3's golden samples fail on the canary, which rolls back; the rollout aborts."""
    done = rollout(demo, fleet, 3)
    if done.returncode == 0:
        raise RuntimeError("the rollout of the broken v3 completed")
    listed = demo.run(BIN / "edgebento", "rollout", "list", "--store", fleet.store, quiet=True)
    console.print(listed.stdout)
    versions = running_versions(fleet, DEVICES)
    if any(v != 2 for v in versions.values()):
        raise RuntimeError(f"devices did not stay on or return to v2: {versions}")
    return f"v3 rolled back by the canary's health check, rollout aborted; devices run {versions}"


def step_broker_kill(demo: Demo, fleet: Fleet, request: Request) -> str:
    """Traffic, the broker killed with -9 in the middle of it, then restarted on its port."""
    traffic = send_traffic(demo, fleet, DEVICES, json.loads(request.body), 6, 40)
    time.sleep(2.5)
    console.print(f"[bold red]kill -9 mosquitto[/bold red] (pid {fleet.broker.process.pid})")  # type: ignore[union-attr]
    fleet.broker.kill()
    time.sleep(2)
    fleet.broker.start()
    console.print("mosquitto restarted on the same port, persistence off: nothing kept")
    traffic.join(timeout=60)
    wait_online(fleet, DEVICES)
    return "broker killed with -9 during traffic and restarted; the agents and sync reconnected"


def step_exactly_once(fleet: Fleet, timeout: float = 60.0) -> str:
    """Every record of every (device, boot) is stored exactly once: no duplicate, no gap."""
    deadline = time.monotonic() + timeout
    while True:
        seqs, duplicates = stored_seqs(fleet.store)
        gaps = {k: _gaps(v) for k, v in seqs.items() if _gaps(v)}
        if not gaps and not duplicates and seqs:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{duplicates} duplicates; missing seqs {dict(gaps)}")
        time.sleep(1)
    total = sum(len(v) for v in seqs.values())
    streams = ", ".join(f"{d}: seq 0..{max(v)}" for (d, _), v in sorted(seqs.items()))
    return f"{total} records in the store exactly once, no gap ({streams})"


def stored_seqs(store: Path) -> tuple[dict[tuple[str, str], set[int]], int]:
    from cloud_sync.parts import CAPTURE_ROOT, DRIFT_ROOT, TELEMETRY_ROOT, decode_jsonl_gz

    seqs: dict[tuple[str, str], set[int]] = defaultdict(set)
    duplicates = 0
    # One sequence per device and boot, whatever root the sync process files a record under.
    for root in (TELEMETRY_ROOT, CAPTURE_ROOT, DRIFT_ROOT):
        for part in (
            sorted((store / root).rglob("part-*.jsonl.gz")) if (store / root).exists() else []
        ):
            if ".samples-" in part.name:
                continue  # capture files an agent ships itself are numbered by sample
            for record in decode_jsonl_gz(part.read_bytes()):
                key = (str(record["device"]), str(record["boot_id"]))
                duplicates += int(record["seq"]) in seqs[key]
                seqs[key].add(int(record["seq"]))
    return dict(seqs), duplicates


def _gaps(seqs: set[int]) -> list[int]:
    return sorted(set(range(max(seqs) + 1)) - seqs)[:5] if seqs else []


def step_fleet_status(demo: Demo, fleet: Fleet) -> str:
    demo.run(
        BIN / "edgebento", "fleet", "status", "--broker", fleet.url, "--listen", "2",
        "--store", fleet.store, env=fleet.pki.env_as("operator"),
    )  # fmt: skip
    return (
        "edgebento fleet status: both devices online, their version, rate and p99, and each "
        "certificate as the store records it beside what the device says"
    )


def send_traffic(
    demo: Demo,
    fleet: Fleet,
    devices: Sequence[str],
    request: dict[str, Any],
    seconds: float,
    rate: int,
) -> threading.Thread:
    """Inference traffic over MQTT in the background, ``rate`` requests/s per device, as a
    sensor gateway sends it: one connection (the operator's certificate; on the device listener
    an identity has one connection at a time), QoS 1, held by paho while the broker is away."""
    for device in devices:
        console.print(
            f"[dim]>>>[/dim] [bold]publish('edgebento/{device}/infer', request, qos=1)[/bold]"
            f" [dim]{rate} requests/s for {seconds:.0f}s, in the background[/dim]"
        )

    def lines() -> Any:
        for i in range(int(seconds * rate)):
            for device in devices:
                doc = {**request, "id": f"load-{i}", "reply_to": reply_topic(device, "load")}
                yield f"edgebento/{device}/infer", doc
            time.sleep(1 / rate)

    thread = threading.Thread(target=publish_all, args=(fleet, lines()), daemon=True)
    thread.start()
    return thread


def publish_all(fleet: Fleet, messages: Any, drain_s: float = 30.0) -> int:
    """Publish each ``(topic, doc)`` of ``messages`` at QoS 1 as the operator; waits until the
    broker has acknowledged them (or ``drain_s``), then disconnects. How many were sent."""
    client = fleet.client()
    sent = []
    try:
        for topic, doc in messages:
            sent.append(client.publish(topic, json.dumps(doc), qos=1))
        deadline = time.monotonic() + drain_s
        for info in sent:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(left)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(sent)


def retained_status(fleet: Fleet, device: str) -> dict[str, Any] | None:
    got = subprocess.run(
        ["mosquitto_sub", *fleet.mosquitto_args(),
         "-t", f"edgebento/{device}/status", "-C", "1", "-W", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    try:
        return json.loads(got.stdout) if got.returncode == 0 else None
    except ValueError:
        return None


def running_versions(fleet: Fleet, devices: Sequence[str]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for device in devices:
        status = retained_status(fleet, device) or {}
        out[device] = (status.get("model") or {}).get("version")
    return out


def wait_online(fleet: Fleet, devices: Sequence[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(devices)
    while pending and time.monotonic() < deadline:
        for device in sorted(pending):
            status = retained_status(fleet, device)
            if status and status.get("state") == "online":
                pending.discard(device)
        time.sleep(0.5)
    if pending:
        raise RuntimeError(f"devices did not come online: {', '.join(sorted(pending))}")
