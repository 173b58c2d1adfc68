"""A fleet of devices in one process for the delivery benchmark: each one the agent's own
telemetry machinery (``Outbox``, ``Session``, ``TelemetryPublisher``), without the model.

``python -m benchmarks.delivery_fleet WORKDIR BROKER_URL PREFIX DEVICES RATE``: records are
appended at RATE per device per second until a line arrives on stdin; then appending stops,
the devices keep delivering for DRAIN_S, and one JSON line reports, per device, its boot id, how
many seqs it numbered and which seqs its outbox still holds. It runs against whichever code is on
PYTHONPATH (today's PUBACK design or end-to-end acknowledgements), so both run the same way.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

DRAIN_S = 25.0


def _device(work: Path, broker: str, prefix: str, name: str) -> tuple[Any, Any, Any]:
    from cloud_sync.protocol import Topics
    from edge_agent.config import AgentConfig
    from edge_agent.outbox import Outbox
    from edge_agent.session import Session
    from edge_agent.telemetry import TelemetryPublisher

    config = AgentConfig(device=name, broker=broker, data_dir=work / name, trust=[work / "k"],
                         prefix=prefix, backoff_min=0.2, backoff_max=1.0)  # fmt: skip
    topics = Topics(prefix)
    outbox = Outbox(work / name / "telemetry.db", name, 16 << 20)
    holder: dict[str, Any] = {}

    def on_message(msg: Any) -> None:
        on_ack = getattr(holder["publisher"], "on_ack", None)  # absent in the PUBACK design
        if on_ack is not None and msg.topic.endswith("/telemetry/ack"):
            on_ack(msg.payload)

    def on_connect(_present: bool) -> None:
        holder["publisher"].reconnected()

    will = (
        topics.status(name),
        b'{"schema_version":1,"device":"%s","state":"offline"}' % name.encode(),
    )
    session = Session(config, will, on_message, on_connect)
    session.subscribe(f"{prefix}/{name}/telemetry/ack", 1)
    kwargs: dict[str, Any] = {}
    if "ack_timeout" in TelemetryPublisher.__init__.__code__.co_varnames:
        kwargs = {"ack_timeout": 3.0}
    publisher = TelemetryPublisher(
        outbox, session, topics.telemetry(name), 50, lambda: 2000.0, **kwargs
    )
    holder["publisher"] = publisher
    return outbox, session, publisher


def main(argv: list[str]) -> int:
    work, broker, prefix = Path(argv[0]), argv[1], argv[2]
    devices, rate = int(argv[3]), float(argv[4])
    work.mkdir(parents=True, exist_ok=True)
    (work / "k").write_text("unused")
    fleet = [_device(work, broker, prefix, f"dev-{i:03d}") for i in range(devices)]
    for _outbox, session, publisher in fleet:
        session.start()
        publisher.start()
    stop = threading.Event()

    def produce() -> None:
        tick = 1.0 / rate
        while not stop.is_set():
            for outbox, _s, publisher in fleet:
                outbox.append("heartbeat", {"uptime_s": time.monotonic(), "pad": "x" * 120})
                publisher.nudge()
            stop.wait(tick)

    producer = threading.Thread(target=produce)
    producer.start()
    print("ready", flush=True)
    sys.stdin.readline()
    stop.set()
    producer.join()
    time.sleep(DRAIN_S)
    report = {}
    for outbox, session, publisher in fleet:
        publisher.stop()
        db = sqlite3.connect(outbox.path)
        held = [
            s for (s,) in db.execute("SELECT seq FROM records WHERE boot_id = ?", (outbox.boot_id,))
        ]
        db.close()
        report[outbox.device] = {
            "boot_id": outbox.boot_id,
            "numbered": outbox.next_seq,
            "held": held,
        }
        session.stop()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
