"""A message over the broker's packet limit, through a real Mosquitto (``max_packet_size``) and a
real agent process, on MQTT 3.1.1 (which cannot say the limit) and MQTT 5 (which says it).

Mosquitto closes the connection of a 3.1.1 client that sends a packet over its limit, and says
nothing. Before ``edge_agent.packet_limit`` paho sent that message again at every reconnect and
the broker dropped every connection for it: the device answered no one again, its telemetry
stopped, and the agent read the drops as another client taking its client id. Each 3.1.1 test
here fails on that code (no answer, no record, within the wait); the MQTT 5 telemetry test fails
on it too (a batch over the limit was refused before it was sent, again and again, for ever).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from edge_agent.packet_evidence import CLOSES
from tests.support.agent import AgentProcess, Client, wait_online
from tests.support.agent_telemetry import (
    DeviceWatch,
    readings,
    session_config,
    stated_limit_run,
    telemetry_session,
)
from tests.support.services import SmallPacketMosquitto, free_port

LIMIT = SmallPacketMosquitto.max_packet  # the small_broker fixture's
X = [[0.5] * 8]
REFUSED = re.compile(r"the message is (\d+) bytes; the broker takes at most (\d+)")


@pytest.fixture
def devices(
    small_broker: SmallPacketMosquitto, topic_prefix: str
) -> Iterator[tuple[Client, DeviceWatch]]:
    client = Client(small_broker, v5=False)  # replies to its reply_to
    watch = DeviceWatch(small_broker, topic_prefix, "dev-a")
    yield client, watch
    watch.close()
    client.close()


@pytest.fixture
def start(
    agent_factory: Any,
    small_broker: SmallPacketMosquitto,
    devices: tuple[Client, DeviceWatch],
    pack_v1: Path,
    topic_prefix: str,
) -> Callable[[str], tuple[AgentProcess, int]]:
    """Starts the agent on the small broker over MQTT ``protocol``, and waits until it is online:
    the agent, and the port of its /metrics."""

    def run(protocol: str) -> tuple[AgentProcess, int]:
        port = free_port()
        args = ("--protocol", protocol, "--metrics-port", str(port))
        agent = agent_factory(broker=small_broker, pack=pack_v1, args=args)
        wait_online(devices[0], topic_prefix, "dev-a", timeout=60)
        return agent, port

    return run


def _infer(client: Client, prefix: str, rows: int) -> dict[str, Any]:
    return client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": [[0.25] * 8] * rows}}, 60)


def _too_large(reply: dict[str, Any]) -> tuple[int, int]:
    """(the answer's size, the limit the agent named) of a short refusal."""
    assert reply["ok"] is False and reply["reason"] == "too_large", reply
    found = REFUSED.search(reply["error"])
    assert found, reply
    return int(found[1]), int(found[2])


def _still_serving(client: Client, prefix: str) -> None:
    answer = client.request(f"{prefix}/dev-a/infer", {"inputs": {"x": X}}, timeout=20)
    assert answer["ok"] is True and set(answer["outputs"]) == {"logits", "probs"}
    assert client.request(f"{prefix}/dev-a/cmd/ping", {}, timeout=20)["pong"] is True


def _beat_after(watch: DeviceWatch, since: float) -> dict[str, Any]:
    """A heartbeat sampled after ``since`` (unix time): the device's telemetry still arrives."""
    return watch.wait(  # type: ignore[no-any-return]
        lambda rs: next(
            (r for r in reversed(rs) if r["kind"] == "heartbeat" and r["ts"] > since), None
        ),
        30,
    )


def test_an_answer_over_a_311_brokers_limit_becomes_a_refusal_and_the_device_stays(
    start: Callable[[str], tuple[AgentProcess, int]],
    devices: tuple[Client, DeviceWatch],
    topic_prefix: str,
) -> None:
    client, watch = devices
    agent, port = start("3.1.1")

    # 8 KiB of request (the broker takes it), about 20 KiB of answer (it does not).
    size, bound = _too_large(_infer(client, topic_prefix, 256))
    assert size > LIMIT and LIMIT <= bound < size  # learned: below that answer, not below the limit
    _still_serving(client, topic_prefix)

    # An answer between the broker's limit and what was learned: dropped for, learned again.
    rows = 256 * (LIMIT + (size - LIMIT) // 2) // size
    middle, lower = _too_large(_infer(client, topic_prefix, rows))
    assert LIMIT < middle <= bound and LIMIT <= lower < middle
    # Over what is known now: refused before it is sent, naming that bound.
    again, named = _too_large(_infer(client, topic_prefix, 256))
    assert named == lower < again  # (the answer's size moves with its latency_ms)
    _still_serving(client, topic_prefix)

    since = time.time()
    beat = _beat_after(watch, since)
    assert beat["data"]["taken_over"] == 0  # the drops were not read as a takeover
    assert beat["data"]["connects"] >= 1 + 2 * CLOSES  # then CLOSES drops for each learned
    too_large = watch.wait(lambda rs: len(_unanswered(rs)) >= 3 and _unanswered(rs))
    assert [e["reason"] for e in too_large] == ["too_large"] * 3
    log = agent.output()
    assert log.count("over the broker's packet limit") >= 2, log[-3000:]
    assert "closed this agent's connection" not in log  # the takeover's ERROR
    metrics = _metrics(port)
    assert metrics["edgebento_agent_packets_over_limit_total"] >= 2
    assert metrics["edgebento_agent_packet_limit_bytes"] == lower
    assert metrics["edgebento_agent_session_taken_over_total"] == 0


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in lines if not line.startswith("#"))
    }


def _unanswered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r["data"] for r in records if r["kind"] == "event" and r["data"]["event"] == "unanswered"
    ]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_telemetry_record_over_the_limit_is_set_aside_and_the_rest_arrives(
    protocol: str,
    start: Callable[[str], tuple[AgentProcess, int]],
    devices: tuple[Client, DeviceWatch],
    topic_prefix: str,
) -> None:
    client, watch = devices
    agent, port = start(protocol)

    # A deploy from a URL the agent cannot fetch: the update record names the URL (up to the
    # protocol's 4096 characters), and the outbox writes it with JSON escapes (6 bytes for each
    # 2-byte character): 5 KiB of request the broker takes become a record it does not. (What
    # a client sends is clipped in the records of its refusals: this URL is the operator's.)
    doc = {"id": "big-record", "url": "file:///" + "é" * 2500}
    client.publish(f"{topic_prefix}/dev-a/cmd/deploy", json.dumps(doc, ensure_ascii=False).encode())
    behind = {"id": "behind", "action": "status"}  # a ping's answer would hold the URL too
    assert client.request(f"{topic_prefix}/dev-a/cmd/capture", behind, 20)["ok"] is True

    aside = watch.wait(lambda rs: _events(rs, "telemetry_set_aside"), 150)  # two verdicts
    assert len(aside) == 1 and aside[0]["kind"] == "update" and aside[0]["bytes"] > LIMIT
    # Kept aside, whether the limit was learned (3.1.1) or said in the CONNACK (5): the old
    # publisher deleted a record over a limit the broker said, which may rise (never stored).
    assert aside[0]["kept"] is True
    assert "the broker takes at most" in aside[0]["error"]
    # The records behind it arrive: the command after it, and heartbeats.
    watch.wait(lambda rs: [e for e in _events(rs, "command") if e["id"] == "behind"])
    beat = _beat_after(watch, time.time())
    assert beat["data"]["taken_over"] == 0
    assert aside[0]["seq"] not in {r["seq"] for r in watch.records}  # the record set aside
    answer = client.request(f"{topic_prefix}/dev-a/infer", {"inputs": {"x": X}}, timeout=20)
    assert answer["ok"] is True
    log = agent.output()
    assert log.count("set aside, never sent") == 1, log[-3000:]
    assert "closed this agent's connection" not in log
    assert _metrics(port)["edgebento_agent_telemetry_set_aside_total"] == 1


def _events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r["data"] for r in records if r["kind"] == "event" and r["data"]["event"] == name]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_batch_over_the_limit_goes_in_batches_that_fit(
    protocol: Literal["3.1.1", "5"],
    tmp_path: Path,
    small_broker: SmallPacketMosquitto,
    topic_prefix: str,
) -> None:
    """A backlog (a device that was offline) of records that each fit and together do not: the
    session and the telemetry publisher of the agent, on their own, through the broker."""
    from edge_agent.outbox import Outbox

    outbox = Outbox(tmp_path / "telemetry.db", "dev-b", 16 << 20)
    for i in range(60):  # about 700 bytes each: one batch of 42 KiB
        assert outbox.append("reading", {"i": i, "pad": "x" * 600}) == i
    config = session_config(small_broker, tmp_path, "dev-b", protocol, topic_prefix)
    watch = DeviceWatch(small_broker, topic_prefix, "dev-b")
    session, drain = telemetry_session(config, outbox, 1000.0)
    try:
        with session:
            got = watch.wait(lambda rs: len(rs) >= 60 and rs, 150)  # 3.1.1: verdicts of 5 drops
            assert sorted(r["data"]["i"] for r in got) == list(range(60))
            watch.wait(lambda rs: outbox.count == 0, 30)  # every one acknowledged
            assert drain.set_aside == 0 and session.takeover.taken_over == 0
            # 3.1.1: learned from the broker's drops; 5: said in its CONNACK, nothing dropped.
            assert (session.limit.refused > 0) == (protocol == "3.1.1")
            assert (
                session.max_packet >= LIMIT if protocol == "3.1.1" else session.max_packet == LIMIT
            )
    finally:
        drain.stop()
        outbox.close()
        watch.close()


def test_a_record_over_a_limit_the_broker_said_is_sent_once_the_limit_rises(
    tmp_path: Path, topic_prefix: str
) -> None:
    """MQTT 5: the broker says 16 KiB in its CONNACK, and a record of 30 KB is set aside. The
    operator raises max_packet_size and restarts the broker: its CONNACK says 1 MiB, and the
    record, kept aside, is queued again and stored. The old publisher deleted it for good when
    it set it aside: it left the device without the ingestion ever storing it."""
    with stated_limit_run(tmp_path, topic_prefix, 16384, 30_000) as run:
        run.watch.wait(lambda rs: readings(rs, 1), 60)
        aside = run.watch.wait(lambda rs: _events(rs, "telemetry_set_aside"), 60)
        assert aside[0]["kept"] is True and run.drain.set_aside == 1
        watch = run.raise_limit()  # no persistence: a new watch (the ingestion) subscribes again
        got = watch.wait(lambda rs: readings(rs, 0), 60)
        assert got[0]["data"]["pad"] == "x" * 30_000 and run.session.max_packet == 1 << 20
        watch.wait(lambda rs: run.outbox.count == 0, 30)  # stored: acknowledged, deleted
        assert run.drain.set_aside == 1


def test_a_broker_restarted_with_a_lower_limit_does_not_keep_the_device_offline(
    tmp_path: Path, topic_prefix: str
) -> None:
    """The operator lowers max_packet_size and restarts the broker (or the device fails over to
    another): a packet the old broker acknowledged says nothing of the new one's limit. The old
    code kept the largest acknowledged for the whole run, so a message between the new limit and
    that was never a suspect: paho sent it at every reconnect, the broker dropped every
    connection for it, and nothing behind it ever arrived."""
    from edge_agent.session import Session

    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto", max_packet=1 << 20).start()
    config = session_config(broker, tmp_path, "dev-l", "3.1.1", topic_prefix)
    connects = threading.Condition()
    session = Session(
        config,
        will=(f"{topic_prefix}/dev-l/status", {}),
        on_message=lambda _m: None,
        on_connect=lambda _present: _notify(connects),
    )
    told: list[str] = []
    refused = threading.Event()

    def too_large(why: str) -> None:
        told.append(why)
        refused.set()

    try:
        with session:
            assert session.wait_connected(30)
            session.publish(f"{topic_prefix}/big/early", b"e" * 30_000).wait_for_publish(20)
            broker.max_packet = LIMIT
            broker.restart()
            with connects:
                assert connects.wait_for(lambda: session.connects >= 2, 60)
            client = Client(broker, v5=False)
            arrived = client.collect(f"{topic_prefix}/small/#")
            session.publish(f"{topic_prefix}/big/answer", b"a" * 20_000, on_too_large=too_large)
            session.publish(f"{topic_prefix}/small/behind", b"s" * 100)
            # Behind it: sent while the answer is held back, or after its verdict.
            assert arrived.get(timeout=60).payload == b"s" * 100
            client.close()
            assert refused.wait(60)
            assert len(told) == 1 and "the broker takes at most" in told[0]
            assert session.limit.bound is not None and LIMIT <= session.limit.bound < 20_100
    finally:
        broker.stop()


def _notify(condition: threading.Condition) -> None:
    with condition:
        condition.notify_all()
