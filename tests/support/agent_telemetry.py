"""What a device says about itself, read as the cloud reads it: its telemetry records (each once,
acknowledged like the ingestion does) and its retained status, with the broker's last will."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt

from tests.support.services import Mosquitto, SmallPacketMosquitto


class DeviceWatch:
    def __init__(self, broker: Mosquitto, prefix: str, device: str) -> None:
        self.records: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self._seen: dict[str, set[int]] = {}
        self.unreadable: list[str] = []
        self._lock = threading.Lock()
        self.telemetry = f"{prefix}/{device}/telemetry"
        self.status = f"{prefix}/{device}/status"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", broker.port, 30)
        self.client.loop_start()
        self.client.subscribe([(self.telemetry, 1), (self.status, 1)])
        assert subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho re-raises what a callback raises, which ends its network loop for good: every
        # later record would be lost and the test would time out far from the cause. A message
        # this watch cannot read is kept, and named by the wait that then fails.
        try:
            self._record(client, msg)
        except Exception as exc:
            with self._lock:
                self.unreadable.append(f"{msg.topic}: {exc!r} in {bytes(msg.payload)[:200]!r}")

    def _record(self, client: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        doc = json.loads(msg.payload)
        with self._lock:
            if msg.topic == self.status:
                self.statuses.append(doc)
                return
            for record in doc["records"]:
                seen = self._seen.setdefault(record["boot_id"], set())
                if record["seq"] not in seen:
                    seen.add(record["seq"])
                    self.records.append(record)
            boot = doc["records"][0]["boot_id"]
            high = min(self._seen[boot]) - 1
            while high + 1 in self._seen[boot]:
                high += 1
        ack = {"schema_version": 1, "boot_id": boot, "seq": high}
        client.publish(f"{self.telemetry}/ack", json.dumps(ack), qos=1)

    def wait(self, found: Callable[[list[dict[str, Any]]], Any], timeout: float = 30.0) -> Any:
        """The first truthy ``found(records)``, polled as records arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                records = list(self.records)
            result = found(records)
            if result:
                return result
            time.sleep(0.05)
        with self._lock:
            kinds = [(r["kind"], r["data"].get("event")) for r in self.records[-8:]]
            unreadable = self.unreadable[-3:]
        raise AssertionError(
            f"not found within {timeout}s; the last records: {kinds}; unreadable: {unreadable}"
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                r["data"]
                for r in self.records
                if r["kind"] == "event" and r["data"].get("event") == name
            ]

    def rejected(self, reason: str) -> int:
        """Inference requests refused for ``reason``, summed over every inference record."""
        with self._lock:
            return sum(
                r["data"].get("rejected", {}).get(reason, 0)
                for r in self.records
                if r["kind"] == "inference"
            )

    def wait_offline(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.offline() < count:
            assert time.monotonic() < deadline, f"fewer than {count} offline statuses"
            time.sleep(0.05)

    def offline(self) -> int:
        """Offline statuses: the broker's last will each time it dropped the device."""
        with self._lock:
            return sum(1 for s in self.statuses if s.get("state") == "offline")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def session_config(
    broker: Mosquitto, data_dir: Path, device: str, protocol: Literal["3.1.1", "5"], prefix: str
) -> Any:
    """An AgentConfig for the agent's session (and telemetry publisher) run on their own in the
    test's process: no model, no trusted key."""
    from edge_agent.config import AgentConfig

    return AgentConfig(
        device=device,
        broker=broker.url,
        data_dir=data_dir,
        trust=[data_dir / "unused.pub"],
        protocol=protocol,
        prefix=prefix,
    )


def telemetry_session(
    config: Any, outbox: Any, rate: float, ack_timeout: float = 10.0
) -> tuple[Any, Any]:
    """The agent's session and its telemetry publisher (started, batches of 100, ``rate``
    records a second), acks routed to it: run ``with session``, stop the publisher after."""
    from edge_agent.session import Session
    from edge_agent.telemetry import TelemetryPublisher

    topic = f"{config.prefix}/{config.device}/telemetry"
    publisher: list[TelemetryPublisher] = []
    session = Session(
        config,
        will=(f"{config.prefix}/{config.device}/status", {}),
        on_message=lambda _m: None,
        on_connect=lambda _present: publisher[0].reconnected(),
    )
    drain = TelemetryPublisher(outbox, session, topic, 100, lambda: rate, ack_timeout=ack_timeout)
    publisher.append(drain.start())
    session.route(f"{topic}/ack", lambda m: drain.on_ack(m.payload))
    return session, drain


def readings(records: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """The ``reading`` records whose data's ``i`` is ``i``."""
    return [r for r in records if r["kind"] == "reading" and r["data"]["i"] == i]


@dataclass
class StatedLimitRun:
    """The agent's session and publisher over a broker that states its packet limit (MQTT 5),
    draining an outbox that holds reading 0 (padded) and reading 1; ``watch`` is the ingestion."""

    broker: SmallPacketMosquitto
    outbox: Any
    session: Any
    drain: Any
    watch: DeviceWatch

    def raise_limit(self, max_packet: int = 1 << 20) -> DeviceWatch:
        """The broker restarted with a higher limit; it keeps no state, so a new watch."""
        self.watch.close()
        self.broker.max_packet = max_packet
        self.broker.restart()
        self.watch = DeviceWatch(self.broker, self.session.config.prefix, "dev-r")
        return self.watch


@contextmanager
def stated_limit_run(
    tmp_path: Path, prefix: str, max_packet: int, pad: int
) -> Iterator[StatedLimitRun]:
    from edge_agent.outbox import Outbox

    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto")
    broker.max_packet = max_packet
    broker.start()
    outbox = Outbox(tmp_path / "telemetry.db", "dev-r", 16 << 20)
    outbox.append("reading", {"i": 0, "pad": "x" * pad})
    outbox.append("reading", {"i": 1})
    config = session_config(broker, tmp_path, "dev-r", "5", prefix)
    watch = DeviceWatch(broker, prefix, "dev-r")
    session, drain = telemetry_session(config, outbox, 1000.0)
    run = StatedLimitRun(broker, outbox, session, drain, watch)
    try:
        with session:
            yield run
    finally:
        drain.stop()
        outbox.close()
        run.watch.close()
        broker.stop()
