"""The cloud's MQTT consumers are subscribed once they say they started: what a device
publishes from then on reaches them, a second start is a no-op, and a subscription the broker
refuses (its ACL) is a configuration error, not a hang.

They returned at CONNACK, with the subscriptions still to go out: a claim a device sends once,
or a telemetry batch on the shared subscription, published in between reached nobody. The
proxy (tests/support/slow_uplink.py) delays what the consumer sends, as a network would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.enroll import EnrollmentService
from cloud_sync.fleet import FleetListener
from cloud_sync.fleet_ca import new_key
from cloud_sync.ingest import SyncOptions, TelemetrySync
from cloud_sync.protocol import Topics
from cloud_sync.store import open_store
from edge_agent.identity import KeyMaker
from modelpack.errors import ConfigError
from tests.support.cli_run import run_cli
from tests.support.identity_fleet import PREFIX, IdentityFleet, claim_request
from tests.support.services import LOOPBACK, Mosquitto
from tests.support.slow_uplink import device_client, publish_markers_until, slow_uplink


class RefusingMosquitto(Mosquitto):
    """Mosquitto with its dynamic security plugin, which refuses a subscription its ACL does
    not allow in the SUBACK (the acl_file grants every subscription and filters deliveries):
    anonymous clients may subscribe to ``{prefix}/+/status`` only."""

    def _write_config(self) -> Path:
        conf = super()._write_config()
        found = sorted(Path("/usr").glob("lib*/**/mosquitto_dynamic_security.so"))
        if not found:
            pytest.skip("Mosquitto's dynamic security plugin is not installed")
        acl = {"acltype": "subscribePattern", "topic": f"{self.prefix}/+/status", "allow": True}
        doc = {
            "defaultACLAccess": {
                "publishClientSend": True,
                "publishClientReceive": True,
                "subscribe": False,
                "unsubscribe": True,
            },
            "clients": [],
            "groups": [{"groupname": "anonymous", "roles": [{"rolename": "status"}]}],
            "anonymousGroup": "anonymous",
            "roles": [{"rolename": "status", "acls": [{**acl, "priority": 0}]}],
        }
        (self.workdir / "dynsec.json").write_text(json.dumps(doc))
        extra = f"plugin {found[0]}\nplugin_opt_config_file {self.workdir / 'dynsec.json'}\n"
        conf.write_text(conf.read_text() + extra)
        return conf


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefusingMosquitto]:
    broker = RefusingMosquitto(workdir=tmp_path_factory.mktemp("refusing"), prefix="p").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityFleet]:
    fleet = IdentityFleet(tmp_path_factory.mktemp("idsubscribed")).start()
    yield fleet
    fleet.stop()


def _serve_through(fleet: IdentityFleet, port: int, identity: str = "enroll") -> None:
    fleet.service.stop()  # one connection per identity: the broker drops the older one
    fleet.service.serve(f"mqtts://{LOOPBACK}:{port}", fleet.context(identity), PREFIX)


def test_a_claim_sent_once_the_service_is_serving_is_answered(idfleet: IdentityFleet) -> None:
    token = idfleet.ids.create_claims(["sub-a"], ttl_s=600)["sub-a"]
    try:
        with slow_uplink(idfleet.broker.port) as port:
            _serve_through(idfleet, port)
            idfleet.service.wait_serving(30)
            idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)  # no-op
            # The device sends its claim once (ask_claim waits 10 s for the answer).
            answer = idfleet.ask_claim(
                "sub-a", claim_request(KeyMaker().csr(new_key(), "sub-a"), token)
            )
            assert answer["ok"] is True and "BEGIN CERTIFICATE" in answer["certificate"]
    finally:
        idfleet.service.stop()
        idfleet.service.serve(idfleet.broker.url, idfleet.context("enroll"), PREFIX)
        idfleet.service.wait_serving(30)


def _telemetry(device: str, seq: int) -> bytes:
    record = {"device": device, "boot_id": "b", "seq": seq, "ts": time.time(), "kind": "heartbeat"}
    return json.dumps({"records": [record]}).encode()


def test_telemetry_sent_once_sync_started_is_stored(
    broker: Mosquitto, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics(topic_prefix)
    store = open_store(tmp_path / "telemetry")
    options = SyncOptions(client_id=f"{topic_prefix}-sync", flush_interval_s=0.2)
    with (
        device_client(broker.port) as device,
        slow_uplink(broker.port) as port,
        TelemetrySync(store, f"mqtt://{LOOPBACK}:{port}", topics=topics, options=options) as sync,
    ):
        assert sync.start() is sync  # a second start is a no-op
        # On the shared subscription, what nobody in the share is subscribed to is dropped.
        device.publish(topics.telemetry("a"), _telemetry("a", 0), qos=1).wait_for_publish(10)
        publish_markers_until(
            device, topics.telemetry, _telemetry, lambda: "marker" in sync.view.devices, "the sync"
        )
        assert "a" in sync.view.devices
    stored = [key for key in store.list("telemetry/") if "/device=a/" in key]
    assert stored, list(store.list("telemetry/"))


def test_subscriptions_the_broker_refuses_are_a_configuration_error(
    refusing: RefusingMosquitto, idfleet: IdentityFleet, tmp_path: Path
) -> None:
    store = open_store(tmp_path / "telemetry")
    sync = TelemetrySync(store, refusing.url, topics=Topics("p"))
    with pytest.raises(ConfigError, match=r"refused .* the subscription to \$share/.*telemetry"):
        sync.start()
    assert not sync.client.client.is_connected()
    with pytest.raises(ConfigError, match=r"p/\+/desired \(Not authorized\)"):
        FleetListener(refusing.url, Topics("p")).start()
    service = EnrollmentService(idfleet.ca, idfleet.ids)
    service.serve(refusing.url, None, "p")
    try:
        with pytest.raises(ConfigError, match=r"p/enroll/\+/claim"):
            service.wait_serving(30)
    finally:
        service.stop()


def test_the_sync_daemon_stops_on_a_refused_subscription(
    refusing: RefusingMosquitto, tmp_path: Path
) -> None:
    """``edgebento sync`` connects in the background; a refusal must end it, said, not leave it
    running deaf."""
    args = ("sync", "--broker", refusing.url, "--store", str(tmp_path / "s"), "--prefix", "p")
    done = run_cli(*args, timeout=120)
    assert done.returncode != 0
    assert "refused" in done.stderr and "telemetry" in done.stderr, done.stderr[-2000:]


def test_telemetry_sent_once_fleet_status_started_is_heard(
    broker: Mosquitto, topic_prefix: str
) -> None:
    """``fleet status`` listens for ``--listen`` seconds from its start: from the SUBACK."""
    topics = Topics(topic_prefix)
    with (
        device_client(broker.port) as device,
        slow_uplink(broker.port) as port,
        FleetListener(f"mqtt://{LOOPBACK}:{port}", topics).start(settle_s=0) as listener,
    ):
        device.publish(topics.telemetry("a"), _telemetry("a", 0), qos=1).wait_for_publish(10)
        publish_markers_until(
            device,
            topics.telemetry,
            _telemetry,
            lambda: "marker" in listener.heard_at,
            "fleet status",
        )
        assert "a" in listener.heard_at
