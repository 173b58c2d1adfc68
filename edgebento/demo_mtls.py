"""The demo fleet's identity, set up as an operator would (docs/fleet-identity.md): a fleet CA,
a certificate per cloud identity, the broker configuration ``edgebento fleet broker-config``
writes (mTLS, the generated ACL, the CRL), the enrollment service, and one-time claim tokens
that the devices enroll with at their first start."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebento.demo_runner import BIN, Demo
from edgebento.localservices import LOOPBACK, Mosquitto, free_port

# The cloud's identities: each its own certificate (CN = its user name in the ACL).
CLOUD = ("enroll", "claim", "sync", "controller", "operator")
# Device certificates live this long in the demo: each device renews at two thirds of it, so
# every device rotates at least once while the story runs, under its traffic.
VALIDITY = "75s"
# Renewing every 50 s is 72 renewals an hour: past the default budget (4 a day), which is for
# 90-day certificates.
RENEWAL_BUDGET = "100/1h"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's directory (ca-bundle.pem, crl.pem, the issuing key)
    ids: Path  # the cloud's certificates and keys
    broker: Path  # what fleet broker-config wrote

    @property
    def bundle(self) -> Path:
        return self.ca / "ca-bundle.pem"

    @property
    def crl(self) -> Path:
        return self.broker / "crl.pem"  # the copy the broker reads; revocations rewrite it

    @property
    def pid_file(self) -> Path:
        return self.broker / "data" / "mosquitto.pid"

    def env_as(self, user: str) -> dict[str, str]:
        """What the cloud's commands (sync, rollout, fleet status) connect with."""
        return {
            "EDGEBENTO_MQTT_CA_FILE": str(self.bundle),
            "EDGEBENTO_MQTT_CERT_FILE": str(self.ids / f"{user}.crt"),
            "EDGEBENTO_MQTT_KEY_FILE": str(self.ids / f"{user}.key"),
        }

    def tls_args(self, user: str) -> list[str]:
        """``--cafile --cert --key`` for mosquitto_pub, _sub and _rr."""
        return [
            "--cafile", str(self.bundle),
            "--cert", str(self.ids / f"{user}.crt"), "--key", str(self.ids / f"{user}.key"),
        ]  # fmt: skip

    def client(self, user: str, port: int) -> Any:
        """A paho client of ``user``, connected, its loop running. On the device listener the
        client id is the CN: one connection per identity at a time."""
        import paho.mqtt.client as mqtt

        from cloud_sync.fleet_ca import tls_context

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        client.tls_set_context(
            tls_context(self.bundle, self.ids / f"{user}.crt", self.ids / f"{user}.key")
        )
        client.connect(LOOPBACK, port, 30)
        client.loop_start()
        return client


@dataclass
class GeneratedBroker(Mosquitto):
    """Mosquitto on the configuration ``fleet broker-config`` wrote, persistence off for the
    demo (a broker killed with -9 then loses every queued message and retained state)."""

    conf: Path = Path("mosquitto.conf")

    def _write_config(self) -> Path:
        kept = [ln for ln in self.conf.read_text().splitlines() if not ln.startswith("persist")]
        lines = [*kept, "persistence false", "log_dest stderr", "log_type error"]
        lines.append("log_type warning")
        if os.geteuid() == 0:
            lines.append("user root")  # else Mosquitto drops to a user who cannot read workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        out = self.workdir / "demo.conf"
        out.write_text("\n".join(lines) + "\n")
        return out


def set_up(demo: Demo, store: Path) -> tuple[Pki, GeneratedBroker]:
    """The CA, the cloud's certificates, the generated broker config, the broker, and the
    enrollment service (which signs each device's own CSR and keeps the CRL)."""
    work = demo.workdir / "identity"
    pki = Pki(work / "ca", work / "ids", work / "broker")
    edgebento = BIN / "edgebento"
    demo.run(edgebento, "fleet", "ca", "init", "--out", pki.ca)
    names = [arg for name in (*CLOUD, "intruder") for arg in ("--name", name)]
    demo.run(edgebento, "fleet", "ca", "issue", "--out", pki.ca, *names, "--to", pki.ids)
    port, claim_port = free_port(), free_port()
    demo.run(
        edgebento, "fleet", "broker-config", "--out", pki.broker, "--ca", pki.ca,
        "--bind", LOOPBACK, "--host", LOOPBACK, "--port", str(port),
        "--claim-port", str(claim_port),
    )  # fmt: skip
    broker = GeneratedBroker(
        workdir=demo.workdir / "mosquitto",
        port=port,
        claim_port=claim_port,
        tls=pki.broker,  # mqtts:// URLs
        conf=pki.broker / "mosquitto.conf",
    )
    broker.start()
    demo.stoppers.append(broker.stop)
    demo.start(
        "enroll-service", edgebento, "fleet", "enroll-service", "--broker", broker.url,
        "--ca", pki.ca, "--cert", pki.ids / "enroll.crt", "--key", pki.ids / "enroll.key",
        "--store", store, "--validity", VALIDITY, "--renewal-budget", RENEWAL_BUDGET,
        "--crl-file", pki.crl,
        # A pid file, not a pid: the broker killed with -9 later comes back with another one.
        "--broker-pid-file", pki.pid_file,
    )  # fmt: skip
    return pki, broker


def claim(demo: Demo, store: Path, devices: tuple[str, ...]) -> dict[str, Path]:
    """One token per device, each in a file of its own (0600): not on a command line, where
    ``ps`` would show it. The store keeps only their hashes."""
    claimed = demo.run(
        BIN / "edgebento", "fleet", "claim", "--devices", ",".join(devices), "--ttl", "1h",
        "--store", store, "--ca", demo.workdir / "identity" / "ca", quiet=True,
    )  # fmt: skip
    tokens = json.loads(claimed.stdout)["claims"]
    files = {}
    for device in devices:
        path = demo.workdir / "identity" / "tokens" / device
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(tokens[device])
        files[device] = path
    return files


def agent_args(pki: Pki, broker: Mosquitto, token_file: Path) -> list[str | Path]:
    """What a device needs to enroll by claim and then run on its own certificate."""
    return [
        "--broker", broker.url, "--ca-file", pki.bundle, "--claim-broker", broker.claim_url,
        "--claim-cert", pki.ids / "claim.crt", "--claim-key", pki.ids / "claim.key",
        "--enroll-file", token_file,
    ]  # fmt: skip
