"""What a learned packet limit must not be fooled by, and what it must tell, through a real
Mosquitto (``max_packet_size``) and a link the test cuts for real (``tests.support.cut_link``):
a link that drops soon after each reconnect teaches no bound; a link cut just before an answer
over the limit is no takeover; a pipeline's result over the limit is reported unpublished; a
result held back after a cut is not overtaken by a later one on its topic.
Each test fails on the code before it (said in each).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess, Client, wait_for, wait_online
from tests.support.agent_telemetry import DeviceWatch
from tests.support.cut_link import CutLink
from tests.support.services import SmallPacketMosquitto

pytestmark = pytest.mark.integration

LIMIT = SmallPacketMosquitto.max_packet  # the small_broker fixture's
# One more than the three drops the old rule took for a verdict (the rule now takes CLOSES, and
# no count of such drops reaches one: tests/unit/edge_agent/test_packet_evidence_links.py). Each
# drop is a takeover to the takeover watch, whose backoff grows: six took 90 s.
FLAKY = 4


@pytest.fixture
def link(small_broker: SmallPacketMosquitto) -> Iterator[CutLink]:
    cut_link = CutLink(small_broker.port)
    yield cut_link
    cut_link.close()


def _session(tmp_path: Path, port: int, prefix: str, connects: threading.Condition) -> Any:
    """The agent's session, MQTT 3.1.1, to the broker through the link on ``port``."""
    from edge_agent.config import AgentConfig
    from edge_agent.session import Session

    config = AgentConfig(
        device="dev-f", broker=f"mqtt://127.0.0.1:{port}", data_dir=tmp_path,
        trust=[tmp_path / "unused.pub"], protocol="3.1.1", prefix=prefix,
    )  # fmt: skip

    def connected(_present: bool) -> None:
        with connects:
            connects.notify_all()

    return Session(config, will=(f"{prefix}/dev-f/status", {}), on_message=lambda _m: None,
                   on_connect=connected)  # fmt: skip


def test_a_link_that_drops_soon_after_each_reconnect_teaches_no_bound(
    small_broker: SmallPacketMosquitto, link: CutLink, tmp_path: Path, topic_prefix: str
) -> None:
    """A 12 KB answer (the broker takes up to 16 KiB) on its way when the uplink stalls and
    drops, then FLAKY connections that the link drops half a second after each opens. Each
    drop came within a second of paho's resend of the answer at the CONNACK: the old session
    took three of them for the broker's verdict, took the answer out of its queue (too_large)
    and never sent it. Now the answer is held back until a connection held a second without
    it; the link drops before: no bound, and once the link holds the broker gets the answer."""
    connects = threading.Condition()
    session = _session(tmp_path, link.port, topic_prefix, connects)
    reader = Client(small_broker, v5=False)
    arrived = reader.collect(f"{topic_prefix}/dev-f/answer")
    told: list[str] = []
    answer = b"a" * 12_000
    try:
        with session:
            assert session.wait_connected(30)
            link.stall(after_s=0.3)
            link.flaky(FLAKY, after_s=0.5)
            session.publish(f"{topic_prefix}/dev-f/answer", answer, on_too_large=told.append)
            assert arrived.get(timeout=90).payload == answer
            assert link.cuts >= FLAKY + 1  # the stall's, then each flaky connection's
            assert told == [] and session.limit.bound is None and session.limit.refused == 0
    finally:
        reader.close()


def test_a_link_cut_just_before_an_answer_over_the_limit_is_no_takeover(
    small_broker: SmallPacketMosquitto, link: CutLink, tmp_path: Path, topic_prefix: str
) -> None:
    """The link cut (a broker restarted, an uplink lost) with nothing in flight, then, right
    after the reconnect, an answer over the limit: the cut and the answer's first close are two
    unexplained drops in a row soon after a reconnect, which the takeover watch counts as two
    takeovers. The old code kept them once the verdict explained the answer's closes (the
    heartbeat, the retained status and edgebento_agent_session_taken_over_total said 2)."""
    connects = threading.Condition()
    session = _session(tmp_path, link.port, topic_prefix, connects)
    told: list[str] = []
    refused = threading.Event()

    def too_large(why: str) -> None:
        told.append(why)
        refused.set()

    with session:
        with connects:
            assert connects.wait_for(lambda: session.connects >= 1, 30)
        link.cut()
        with connects:
            assert connects.wait_for(lambda: session.connects >= 2, 30)
        session.publish(f"{topic_prefix}/dev-f/answer", b"r" * 20_000, on_too_large=too_large)
        assert refused.wait(60)
        assert "the broker takes at most" in told[0]
        bound = session.limit.bound
        assert bound is not None and LIMIT <= bound < 20_100
        assert session.takeover.taken_over == 0


def _events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r["data"] for r in records if r["kind"] == "event" and r["data"]["event"] == name]


def _pipeline(tmp_path: Path, prefix: str) -> tuple[Path, str, str]:
    """An agent config with one pipeline ``p``: its config file, input and output topics."""
    sensors, actions = f"{prefix}-sensors", f"{prefix}-actions/decision"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[[agent.pipelines]]\nname = "p"\ninput_topic = "{sensors}/#"\n'
        f'output_topic = "{actions}"\n'
    )
    return config, sensors, actions


def test_a_pipeline_result_over_the_limit_is_reported_unpublished(
    agent_factory: Callable[..., AgentProcess],
    small_broker: SmallPacketMosquitto,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    """A reading of 256 rows (8 KiB: the broker takes it) whose result is about 20 KiB (it does
    not), from a pipeline of an MQTT 3.1.1 agent: after the broker's drops the result is taken
    out of the session's queue. The old agent told nobody: the pipeline counted it published,
    no log, no event. Now the pipeline logs it and the cloud gets an ``unpublished`` event."""
    config, sensors, actions = _pipeline(tmp_path, topic_prefix)
    client = Client(small_broker, v5=False)
    watch = DeviceWatch(small_broker, topic_prefix, "dev-a")
    try:
        agent = agent_factory(
            broker=small_broker, pack=pack_v1,
            args=("--protocol", "3.1.1", "--config", str(config)),
        )  # fmt: skip
        wait_online(client, topic_prefix, "dev-a", timeout=60)
        results = client.collect(actions)
        client.publish(f"{sensors}/a", {"id": "big", "inputs": {"x": [[0.25] * 8] * 256}})
        unpublished = watch.wait(lambda rs: _events(rs, "unpublished"), 60)
        assert len(unpublished) == 1 and unpublished[0]["pipeline"] == "p"
        assert unpublished[0]["reason"] == "too_large" and unpublished[0]["topic"] == actions
        assert "the broker takes at most" in unpublished[0]["error"]
        client.publish(f"{sensors}/a", {"id": "small", "inputs": {"x": [[0.25] * 8]}})
        small = wait_for(results, lambda doc: doc.get("id") == "small", 30)
        assert small["pipeline"] == "p"
        assert "pipeline p: result not published" in agent.output()
    finally:
        watch.close()
        client.close()


def test_a_result_held_back_after_a_cut_is_not_overtaken_by_a_later_one(
    agent_factory: Callable[..., AgentProcess],
    small_broker: SmallPacketMosquitto,
    link: CutLink,
    pack_v1: Path,
    topic_prefix: str,
    tmp_path: Path,
) -> None:
    """A pipeline's result of about 12 KB (the broker takes it) is on its way when the link
    stalls and is cut: the next connection holds it back for a second. Reading B, published as
    soon as the agent reconnects, gets a small result on the same actions topic: the old agent
    sent it at once, the held result after it, so the actuator acted on B, then on the older A.
    Now B waits behind A: A, then B."""
    config, sensors, actions = _pipeline(tmp_path, topic_prefix)
    client = Client(small_broker, v5=False)
    try:
        agent_factory(
            broker=link, pack=pack_v1, args=("--protocol", "3.1.1", "--config", str(config))
        )
        wait_online(client, topic_prefix, "dev-a", timeout=60)
        results = client.collect(actions)
        opened = link.opened
        link.stall(after_s=0.3)
        client.publish(f"{sensors}/a", {"id": "A", "inputs": {"x": [[0.25] * 8] * 150}})
        assert link.wait_for(lambda now: now.opened > opened, 60)
        client.publish(f"{sensors}/a", {"id": "B", "inputs": {"x": [[0.25] * 8]}})
        order: list[str] = []
        while "A" not in order or "B" not in order:
            order.append(json.loads(results.get(timeout=60).payload)["id"])
        assert order.index("A") < order.index("B") and order[-1] == "B"
    finally:
        client.close()
