"""A small packet limit an MQTT 5 broker states in its CONNACK (Mosquitto's max_packet_size):
the agent's own ``telemetry_set_aside`` event about a record over it is over it too. On the
code before, each such event was set aside in turn and wrote another (hundreds a second), and
within 64 turns the real record was pushed out of the aside table: never delivered, even once
the limit rose. Under a limit below the smallest record nothing is set aside: the queue is kept.
The agent's session and telemetry publisher on their own, over real Mosquitto."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.outbox import Outbox
from tests.support.agent_telemetry import (
    DeviceWatch,
    readings,
    session_config,
    stated_limit_run,
    telemetry_session,
)
from tests.support.services import SmallPacketMosquitto

pytestmark = pytest.mark.slow


def test_a_small_stated_limit_keeps_the_record_aside_until_the_limit_rises(
    tmp_path: Path, topic_prefix: str
) -> None:
    # 300 bytes: over the smallest record, under the set-aside event about one
    with stated_limit_run(tmp_path, topic_prefix, 300, 2000) as run:
        run.watch.wait(lambda rs: readings(rs, 1), 60)
        # Reading 0 and the event about it (over the limit too, with no event of its own)
        run.watch.wait(lambda rs: run.drain.set_aside >= 2, 60)
        watch = run.raise_limit()
        got = watch.wait(lambda rs: readings(rs, 0), 60)
        assert got[0]["data"]["pad"] == "x" * 2000
        events = watch.wait(lambda rs: watch.events("telemetry_set_aside"), 60)
        # One event, about reading 0 (seq 0), kept aside with it and delivered after it; on
        # the code before, hundreds of set-asides, each writing another event.
        assert [(e["seq"], e["kind"], e["kept"]) for e in events] == [(0, "reading", True)]
        assert run.drain.set_aside == 2
        watch.wait(lambda rs: run.outbox.count == 0, 30)  # stored: acknowledged, deleted
        assert run.outbox.counters()["dropped_aside"] == 0


def test_a_stated_limit_under_the_smallest_record_keeps_the_queue(
    tmp_path: Path, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto")
    broker.max_packet = 100  # under any record
    broker.start()
    outbox = Outbox(tmp_path / "telemetry.db", "dev-s", 16 << 20)
    for i in range(3):
        outbox.append("reading", {"i": i})
    config = session_config(broker, tmp_path, "dev-s", "5", topic_prefix)
    watch: DeviceWatch | None = None
    session, drain = telemetry_session(config, outbox, 1000.0)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_agent.telemetry"), session:
            watch = DeviceWatch(broker, topic_prefix, "dev-s")
            watch.wait(lambda rs: "telemetry held" in caplog.text, 60)
            assert drain.set_aside == 0 and outbox.count == 3  # the queue kept, as it was
            watch.close()
            broker.max_packet = 1 << 20
            broker.restart()
            watch = DeviceWatch(broker, topic_prefix, "dev-s")
            got = watch.wait(lambda rs: len(rs) == 3 and rs, 60)
            assert sorted(r["data"]["i"] for r in got) == [0, 1, 2]
            assert [r["seq"] for r in got] == [0, 1, 2]  # never set aside: their own seqs
            assert drain.set_aside == 0
    finally:
        drain.stop()
        outbox.close()
        if watch is not None:
            watch.close()
        broker.stop()
