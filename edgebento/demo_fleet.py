"""The demo's fleet: a real Mosquitto, a registry in a directory, ``edgebento sync``, two edge
agents, rollouts (a good one and a broken one that aborts), traffic through a broker killed with
-9, and the check that every telemetry record is in the store exactly once.

The broker runs with the ACL of ``deploy/mosquitto/`` and no anonymous clients; every client the
demo starts has its identity: each agent its device id (``EDGEBENTO_USERNAME``/``_PASSWORD``),
``edgebento sync`` the user ``sync``, ``edgebento rollout`` ``controller``, and the person at the
keyboard (``fleet status``, ``mosquitto_pub``/``_sub``/``_rr``) ``operator``. Requests name a
response topic under the device's own ``{prefix}/{device}/replies/``, the only place the ACL
lets a device answer."""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    agents: dict[str, int] = field(default_factory=lambda: {d: free_port() for d in DEVICES})


CLOUD = ("sync", "controller", "operator")  # the cloud's identities in deploy/mosquitto/acl


@dataclass
class Fleet:
    broker: Mosquitto
    store: Path
    keys: Path
    ports: MetricsPorts

    @property
    def url(self) -> str:
        return self.broker.url

    def password(self, user: str) -> str:
        return (self.broker.users or {})[user]

    def url_as(self, user: str) -> str:
        """The broker URL with ``user``'s credentials (the CLI redacts the password it prints)."""
        return f"mqtt://{user}:{self.password(user)}@{LOOPBACK}:{self.broker.port}"

    def mosquitto_args(self, user: str = "operator") -> list[str]:
        """``-h -p -u -P`` for mosquitto_pub, _sub and _rr."""
        port = str(self.broker.port)
        return ["-h", LOOPBACK, "-p", port, "-u", user, "-P", self.password(user)]


def reply_topic(device: str, name: str) -> str:
    """Under the device's own replies/: the only topics the ACL lets it answer on."""
    return f"edgebento/{device}/replies/{name}"


def start_fleet(demo: Demo, packs: Packs, keys: Path, ports: MetricsPorts) -> Fleet:
    # Persistence off: a broker killed with -9 then loses every queued message and retained
    # state, the setting under which "nothing lost" is worth showing.
    users = {user: secrets.token_urlsafe(12) for user in (*DEVICES, *CLOUD)}
    broker = Mosquitto(workdir=demo.workdir / "mosquitto", persistence=False, users=users)
    broker.start()
    demo.stoppers.append(broker.stop)
    fleet = Fleet(broker, demo.workdir / "store", keys, ports)
    console.print(
        f"Mosquitto listens on {fleet.url} with the ACL of deploy/mosquitto/ (a user per device,"
        f" and {', '.join(CLOUD)}); the registry and telemetry live in {fleet.store}"
    )
    for pack in (packs.v1, packs.v2, packs.v3_broken):
        demo.run(
            BIN / "edgebento", "publish", pack, "--store", fleet.store, "--key",
            keys / "signing.key", "--force", quiet=pack == packs.v3_broken,
        )  # fmt: skip
    demo.run(BIN / "edgebento", "registry", "list", "--store", fleet.store)
    demo.start(
        "sync", BIN / "edgebento", "sync", "--broker", fleet.url_as("sync"), "--store", fleet.store,
        "--metrics-port", str(ports.sync), "--client-id", "demo-sync",
    )  # fmt: skip
    for device in DEVICES:
        demo.start(
            device, BIN / "edge-agent", "run", "--device", device, "--broker", fleet.url,
            "--data-dir", demo.workdir / "devices" / device, "--trust", keys / "signing.pub",
            "--store", fleet.store, "--pack", packs.v1, "--telemetry-interval", TELEMETRY_INTERVAL,
            "--metrics-port", str(ports.agents[device]),
            env={"EDGEBENTO_USERNAME": device, "EDGEBENTO_PASSWORD": fleet.password(device)},
        )  # fmt: skip
    wait_online(fleet, DEVICES)
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
        "--broker", fleet.url_as("controller"), "--devices", ",".join(DEVICES), "--canary", "50",
        "--waves", "1",
        "--bake", "2", "--wave-timeout", "60", "--key", fleet.keys / "signing.key",
        "--metrics-port", str(fleet.ports.rollout), "--wait", "--timeout", "120",
        # The demo's devices serve no traffic while it rolls out: nothing to judge health by, so
        # it goes on and says so, instead of stopping as unverified after each wave's timeout.
        "--allow-unverified", check=False,
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
        BIN / "edgebento", "fleet", "status", "--broker", fleet.url_as("operator"), "--listen", "2"
    )
    return "edgebento fleet status: both devices online, their version, rate and p99"


def send_traffic(
    demo: Demo,
    fleet: Fleet,
    devices: Sequence[str],
    request: dict[str, Any],
    seconds: float,
    rate: int,
) -> threading.Thread:
    """Inference traffic over MQTT in the background, ``rate`` requests/s per device, one JSON
    request per line into ``mosquitto_pub -l``, as a sensor gateway would send it. A publisher
    the broker's death disconnects is started again."""

    def publisher(device: str) -> subprocess.Popen[str]:
        argv = ["mosquitto_pub", *fleet.mosquitto_args(), "-q", "1",
                "-t", f"edgebento/{device}/infer", "-l"]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL)
        demo.processes.append(proc)  # type: ignore[arg-type]
        return proc

    for device in devices:
        console.print(
            f"[dim]$[/dim] [bold]{shlex.join(['mosquitto_pub', '-t', f'edgebento/{device}/infer', '-l'])}[/bold]"
            f" [dim]< {rate} requests/s for {seconds:.0f}s &[/dim]"
        )
    pubs = {device: publisher(device) for device in devices}

    def feed() -> None:
        for i in range(int(seconds * rate)):
            for device in devices:
                line = {**request, "id": f"load-{i}", "reply_to": reply_topic(device, "load")}
                try:
                    pubs[device].stdin.write(json.dumps(line) + "\n")  # type: ignore[union-attr]
                    pubs[device].stdin.flush()  # type: ignore[union-attr]
                except (BrokenPipeError, OSError):
                    if fleet.broker.process is not None:  # back up: a new publisher
                        pubs[device] = publisher(device)
            time.sleep(1 / rate)
        for pub in pubs.values():
            try:
                pub.stdin.close()  # type: ignore[union-attr]
                pub.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pub.kill()

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


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
