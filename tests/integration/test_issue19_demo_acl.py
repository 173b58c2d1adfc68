"""Issue 19, done when: ``make demo`` runs its broker with the ACL of ``deploy/mosquitto/``.

The demo's own set-up step (``edgebento.demo_mtls.set_up``: a fleet CA, ``edgebento fleet
broker-config``, Mosquitto on the generated configuration) is run here as the demo runs it. The
broker it starts reads an ACL holding every rule of ``deploy/mosquitto/acl``, and enforces it: a
device identity's publish on another device's desired state or commands, or on its own desired
state, reaches no subscriber, while its own status does."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgebento import demo_mtls
from edgebento.demo_runner import Demo
from edgebento.localservices import ACL_TEMPLATE, fleet_acl

pytestmark = pytest.mark.slow


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path / "demo")
    (running.workdir / "logs").mkdir(parents=True)
    yield running
    running.stop_all()


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_demo_broker_enforces_the_acl_of_deploy_mosquitto(demo: Demo, tmp_path: Path) -> None:
    pki, broker = demo_mtls.set_up(demo, tmp_path / "store")
    conf = (broker.workdir / "demo.conf").read_text()
    acl_files = [line.split(" ", 1)[1] for line in conf.splitlines() if line.startswith("acl_file")]
    assert acl_files, conf
    served = Path(acl_files[0]).read_text()
    shipped = _rules(fleet_acl("edgebento"))
    assert shipped and _rules(ACL_TEMPLATE.read_text()) == shipped  # the default prefix
    missing = [rule for rule in shipped if rule not in served.splitlines()]
    assert missing == [], missing

    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    operator = pki.client("operator", broker.port)
    operator.on_message = lambda _c, _u, msg: seen.put((msg.topic, bytes(msg.payload)))
    assert operator.subscribe("edgebento/#", qos=1)[0] == 0
    intruder = pki.client("intruder", broker.port)  # a device identity of the fleet CA
    status = "edgebento/intruder/status"

    def control(body: bytes) -> list[tuple[str, bytes]]:
        """Publish ``body`` on the intruder's own status until the operator has it; what the
        operator got up to then (one publisher's messages arrive in order)."""
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 30
        while (status, body) not in got:
            intruder.publish(status, body, qos=1).wait_for_publish(10)
            assert time.monotonic() < deadline, got
            end = time.monotonic() + 1
            while (status, body) not in got and (left := end - time.monotonic()) > 0:
                try:
                    got.append(seen.get(timeout=left))
                except queue.Empty:
                    break
        return got

    try:
        control(b'{"control": 1}')  # the operator's subscription is live from here
        forged = json.dumps({"schema_version": 1, "generation": 10**6}).encode()
        for topic in ("edgebento/dev-1/desired", "edgebento/intruder/desired"):
            intruder.publish(topic, forged, qos=1, retain=True).wait_for_publish(10)
        intruder.publish("edgebento/dev-1/cmd/deploy", forged, qos=1).wait_for_publish(10)
        got = control(b'{"control": 2}')
        assert [t for t, _ in got if t != status] == [], got
    finally:
        for client in (intruder, operator):
            client.loop_stop()
            client.disconnect()
