"""A fleet with per-device identity on one machine: the fleet CA, Mosquitto with mTLS and the
generated ACL, the enrollment service over MQTT, and TLS clients for the cloud's identities."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_sync.broker_config import BrokerTls
from cloud_sync.enroll import EnrollmentService, RateLimit, enroll_topic
from cloud_sync.fleet_ca import FleetCA, init_ca, tls_context
from cloud_sync.identity_store import IdentityStore
from cloud_sync.revocation import publish_crl
from cloud_sync.store import open_store
from tests.support.agent import Client, wait_for
from tests.support.services import Mosquitto

PREFIX = "edgebento"  # the ACL is rendered for it


@dataclass
class IdentityFleet:
    root: Path
    validity_s: float = 90 * 86400.0
    store_url: str | None = None  # a bucket (s3://...) on moto's server; a local directory if None
    endpoint_url: str | None = None
    ca: FleetCA = field(init=False)
    ids: IdentityStore = field(init=False)
    broker: Mosquitto = field(init=False)
    service: EnrollmentService = field(init=False)
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def start(self) -> IdentityFleet:
        init_ca(self.root / "ca")
        self.ca = FleetCA.load(self.root / "ca")
        store = self.store_url or str(self.root / "store")
        self.ids = IdentityStore(
            open_store(store, endpoint_url=self.endpoint_url), self.ca, self.ca.paths.crl
        )
        out = self.root / "identities"
        server = self.ca.issue_identity("broker", out, 30, ["127.0.0.1", "localhost"])
        for name in ("enroll", "claim", "operator", "controller", "sync"):
            self.certs[name] = self.ca.issue_identity(name, out)
        tls = BrokerTls(self.ca.paths.bundle, server[0], server[1], self.ca.paths.crl)
        self.broker = Mosquitto(workdir=self.root / "mosquitto", tls=tls).start()
        self.service = EnrollmentService(
            self.ca,
            self.ids,
            days=self.validity_s / 86400,
            limit=RateLimit(rate=1000, burst=1000, per_device_s=0.0),
            on_retired=self.publish_crl,
        )
        self.service.serve(self.broker.url, self.context("enroll"), PREFIX)
        self.service.wait_serving(30)  # subscribed, not just connected: no claim is missed
        return self

    def publish_crl(self) -> None:
        assert self.broker.process is not None
        publish_crl(self.ca, self.ids, self.ca.paths.crl, self.broker.process.pid)

    def context(self, name: str) -> Any:
        cert, key = self.certs[name]
        return tls_context(self.ca.paths.bundle, cert, key)

    def device_cert(self, device: str) -> tuple[Path, Path]:
        """A certificate made by the CA directly (not enrolled), for ACL tests."""
        if device not in self.certs:
            self.certs[device] = self.ca.issue_identity(device, self.root / "identities")
        return self.certs[device]

    def client(self, name: str, claim: bool = False) -> TlsClient:
        return TlsClient(self, name, claim)

    def agent_args(self, token: str | None = None) -> tuple[str, ...]:
        args = ("--ca-file", str(self.ca.paths.bundle))
        if token is None:
            return args
        cert, key = self.certs["claim"]
        return (
            *args,
            "--enroll",
            token,
            "--claim-broker",
            self.broker.claim_url,
            "--claim-cert",
            str(cert),
            "--claim-key",
            str(key),
        )

    def ask_claim(self, device: str, payload: bytes) -> dict[str, Any]:
        """A claim sent over the claim listener with the claim certificate; the answer."""
        claim = self.client("claim", claim=True)
        answers = claim.collect(enroll_topic(PREFIX, device, "response"))
        request_id = json.loads(payload)["id"]
        claim.publish(enroll_topic(PREFIX, device, "claim"), payload)
        doc = wait_for(answers, lambda d: d.get("id") == request_id, 10)
        claim.close()
        return dict(doc)

    def stop(self) -> None:
        self.service.stop()
        self.broker.stop()


def enrolling_agent(fleet: IdentityFleet, agent_factory: Any, data_dir: Path, device: str) -> Any:
    """A real agent that enrolls ``device`` with a fresh claim and renews on its own."""
    token = fleet.ids.create_claims([device], ttl_s=600)[device]
    return agent_factory(
        broker=fleet.broker,
        device=device,
        data_dir=data_dir,
        prefix=PREFIX,
        args=fleet.agent_args(token),
    )


def identity_status(agent: Any) -> dict[str, Any]:
    """The agent's ``identity/status.json``; empty while not written yet, or being replaced."""
    try:
        return dict(json.loads((agent.data_dir / "identity" / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


class TlsClient(Client):
    """tests.support.agent.Client over mTLS with a certificate of the fleet CA."""

    def __init__(self, fleet: IdentityFleet, name: str, claim: bool = False) -> None:
        self.v5 = True
        client_id = f"claim-{uuid.uuid4().hex[:8]}" if claim else name
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        cert, key = fleet.certs[name] if name in fleet.certs else fleet.device_cert(name)
        self.client.tls_set_context(tls_context(fleet.ca.paths.bundle, cert, key))
        self.queues = {}
        self.client.on_message = self._on_message
        self.reply_topic = f"{PREFIX}/{name}/replies/{uuid.uuid4().hex[:8]}"
        port = fleet.broker.claim_port if claim else fleet.broker.port
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        if not claim:
            self.collect(self.reply_topic)


def claim_request(csr: bytes, token: str | None) -> bytes:
    doc: dict[str, Any] = {"schema_version": 1, "id": uuid.uuid4().hex, "csr": csr.decode()}
    if token is not None:
        doc["token"] = token
    return json.dumps(doc).encode()
