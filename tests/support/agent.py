"""The agent in its own process, and an MQTT client that drives it like the cloud would.

The fixtures built on these (pack_v1, agent_factory, client) are in tests/integration/conftest.py.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import models
from tests.support.services import Mosquitto

REPO = Path(__file__).resolve().parents[2]


def make_pack(
    out: Path,
    model: Path,
    key: Path | None,
    version: int,
    name: str = "tiny",
    expires_at: datetime | None = None,
    wrong_golden: bool = False,
) -> Path:
    """A pack of ``model`` with golden samples (deliberately wrong ones with ``wrong_golden``)."""
    from modelpack import Samples, create_pack

    inputs, outputs = models.golden_samples(model)
    if wrong_golden:
        outputs = {k: v + 1.0 for k, v in outputs.items()}
    create_pack(
        model,
        out,
        name=name,
        version=version,
        samples=Samples(inputs, outputs),
        expires_at=expires_at,
        key=key,
    )
    return out


def expiring_pack(
    out: Path,
    model: Path,
    key: Path,
    version: int,
    install: Callable[[Path], bool],
    window_s: float = 2.0,
) -> datetime:
    """A pack that expires soon after ``install`` installed it, and the time it expired at
    (passed when this returns). ``install`` returns False when the pack had already expired on
    arrival (a busy machine took longer than the window to install it): a pack of twice the
    window is then tried, so the test never depends on how fast the install was."""
    for attempt in range(6):
        expires_at = datetime.now(UTC) + timedelta(seconds=window_s * 2**attempt)
        pack = make_pack(out / f"try-{attempt}", model, key, version, expires_at=expires_at)
        if install(pack):
            break
    else:
        raise AssertionError(f"no pack of {out.name} was installed before it expired")
    while (left := (expires_at - datetime.now(UTC)).total_seconds()) >= 0:
        time.sleep(left + 0.05)  # the wall clock, which expiry is checked against
    return expires_at


def rollback_authorization(
    key: Path,
    device: str,
    name: str,
    version: int,
    expires_in_s: float = 3600.0,
    rollout: str | None = None,
    generation: int = 1,
    leaves: int | None = None,
) -> dict[str, Any]:
    """A signed RollbackInstruction (the ``authorization`` of a rollback), as JSON: at
    ``generation`` (a device applies each once), leaving ``name`` v``leaves`` when given."""
    from cloud_sync.authority import sign_rollback
    from cloud_sync.protocol import ModelRef
    from modelpack.signing import load_private_key

    signed = sign_rollback(
        load_private_key(key),
        device,
        ModelRef(name=name, version=version),
        generation=generation,
        leaves=ModelRef(name=name, version=leaves) if leaves is not None else None,
        rollout=rollout,
        expires_in_s=expires_in_s,
    )
    return signed.model_dump()


class Client:
    """A paho client (MQTT 5 unless told otherwise) with request/reply and topic collectors."""

    def __init__(
        self,
        broker: Mosquitto,
        v5: bool = True,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.v5 = v5
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.queues: dict[str, queue.Queue[mqtt.MQTTMessage]] = {}
        self.client.on_message = self._on_message
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}"
        self.client.connect("127.0.0.1", broker.port, 30)
        self.client.loop_start()
        self.collect(self.reply_topic)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # A snapshot: collect() adds queues from the test's thread while paho's thread is
        # here, and a RuntimeError in this callback would end paho's network loop for good.
        for pattern, q in list(self.queues.items()):
            if mqtt.topic_matches_sub(pattern, msg.topic):
                q.put(msg)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        with self._subacks:
            self._subacked.add(mid)
            self._subacks.notify_all()

    def collect(self, pattern: str, qos: int = 1) -> queue.Queue[mqtt.MQTTMessage]:
        """A queue of what arrives on ``pattern``, once the broker's SUBACK says it is
        subscribed: what anyone publishes from then on reaches it."""
        if not hasattr(self, "_subacks"):  # here, for the clients built without __init__ too
            self._subacked: set[int] = set()
            self._subacks = threading.Condition()
            self.client.on_subscribe = self._on_subscribe
        q: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.queues[pattern] = q
        result, mid = self.client.subscribe(pattern, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        with self._subacks:
            acked = self._subacks.wait_for(lambda: mid in self._subacked, timeout=30)
        assert acked, f"no SUBACK for {pattern} within 30 s"
        return q

    def publish(
        self, topic: str, doc: Any, retain: bool = False, properties: Properties | None = None
    ) -> None:
        payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(
            topic, payload, qos=1, retain=retain, properties=properties
        ).wait_for_publish(5)

    def request(
        self, topic: str, doc: dict[str, Any], timeout: float = 20.0, via: str = "auto"
    ) -> dict[str, Any]:
        """Send a request and wait for its reply (response topic on MQTT 5, else reply_to)."""
        doc = {"id": uuid.uuid4().hex, **doc}
        correlation = uuid.uuid4().bytes
        props = None
        if self.v5 and via in ("auto", "response_topic"):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        else:
            doc.setdefault("reply_to", self.reply_topic)
        self.publish(topic, doc, properties=props)
        return self.wait_reply(doc["id"], timeout, correlation if props else None)

    def wait_reply(
        self, request_id: str, timeout: float = 20.0, correlation: bytes | None = None
    ) -> dict[str, Any]:
        q = self.queues[self.reply_topic]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            body = json.loads(msg.payload)
            if body.get("id") == request_id:
                if correlation is not None:
                    assert msg.properties.CorrelationData == correlation
                return body
        raise AssertionError(f"no reply to {request_id} within {timeout}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(
    q: queue.Queue[mqtt.MQTTMessage],
    check: Any,
    timeout: float = 20.0,
    agent: AgentProcess | None = None,
) -> dict[str, Any]:
    """The first JSON message on q for which check(doc) is true. With ``agent`` (one that is
    starting: on a loaded machine its imports and the signature check in a child process may
    take many seconds, so give a wide ``timeout``), an agent that exits fails at once, with its
    log."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        left = max(0.01, deadline - time.monotonic())
        try:
            msg = q.get(timeout=left if agent is None else min(left, 0.2))
        except queue.Empty:
            if agent is None:
                break
            if agent.process is not None and agent.process.poll() is not None:
                raise AssertionError(
                    f"the agent exited ({agent.process.returncode}) before a matching message:\n"
                    f"{agent.output()[-2000:]}"
                ) from None
            continue
        if not msg.payload:
            continue
        doc = json.loads(msg.payload)
        seen.append(doc)
        if check(doc):
            return doc
    log = "" if agent is None else f"; log:\n{agent.output()[-2000:]}"
    raise AssertionError(f"no matching message within {timeout}s; saw {seen[-3:]}{log}")


class AgentProcess:
    """``python -m edge_agent run`` in its own process; kill -9 it, restart it."""

    def __init__(
        self,
        broker: Mosquitto,
        data_dir: Path,
        trust: Path,
        prefix: str,
        device: str = "dev-a",
        pack: Path | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.broker, self.data_dir, self.trust = broker, data_dir, trust
        self.prefix, self.device, self.pack = prefix, device, pack
        self.args, self.env = args, env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"agent-{device}.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "edge_agent",
            "run",
            "--device",
            self.device,
            "--broker",
            self.broker.url,
            "--data-dir",
            str(self.data_dir),
            "--trust",
            str(self.trust),
            "--prefix",
            self.prefix,
            "--telemetry-interval",
            "0.5",
            # Tests deploy packs from their tmp dirs with file:// and plain paths.
            "--file-root",
            str(self.data_dir.parent),
        ]
        if self.pack is not None:
            cmd += ["--pack", str(self.pack)]
        if "--client-id" not in self.args:
            # The default (``edge-agent-DEVICE``) is one id for every test's ``dev-a`` on the
            # session's broker: a module's agent and a test's own took the session from each
            # other, and the requests of one went to the other (ignored: not its prefix).
            cmd += ["--client-id", f"edge-agent-{self.prefix}-{self.device}"]
        return cmd + list(self.args)

    def start(self) -> AgentProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        self.process = subprocess.Popen(
            self.command(), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("ab")
        )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the agent did not stop on SIGTERM:\n{self.output()[-2000:]}"
            ) from None


@dataclass(frozen=True)
class ModuleAgent:
    """An agent serving tiny v1 as ``dev-a`` under ``prefix``, its local endpoint on ``port``
    (the ``module_agent`` fixture: one start for a module's tests)."""

    agent: AgentProcess
    prefix: str
    port: int


def wait_online(
    client: Client, prefix: str, device: str, version: int | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    q = client.collect(f"{prefix}/{device}/status")
    return wait_for(
        q,
        lambda d: (
            d.get("state") == "online"
            and (version is None or (d.get("model") or {}).get("version") == version)
        ),
        timeout,
    )
